//! The audit log: append-only, hash-chained (the chain itself is
//! `hub_domain::audit`).

pub use hub_domain::audit::{Entry as AuditEntry, Stored as StoredAuditEntry};

use crate::StoreError;

/// The audit log's persistence.
pub trait AuditStore {
    /// Appends `entry` after the newest one, in one transaction that reads
    /// the newest (seq, hash) and writes the entry chained to it with
    /// `hub_domain::audit::next_link` (concurrent appends never fork the
    /// chain). Returns the new entry's seq.
    fn append_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError>;
    /// The entries with `seq >= since_seq`, by seq (`i64::MIN`: all of
    /// them, as verification needs).
    fn audit_entries(&self, since_seq: i64) -> Result<Vec<StoredAuditEntry>, StoreError>;
}
