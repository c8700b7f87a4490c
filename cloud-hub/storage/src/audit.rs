//! The audit log: append-only, chained (keyed with the audit key when one
//! is configured; the chain itself is `hub_domain::audit`), and its signed
//! checkpoints.

pub use hub_domain::audit::{
    AuditKey, Checkpoint as AuditCheckpoint, CheckpointPolicy, Entry as AuditEntry,
    Stored as StoredAuditEntry,
};

use crate::StoreError;

/// The audit log's persistence.
pub trait AuditStore {
    /// Appends `entry` after the newest one, in one transaction that reads
    /// the newest entry and writes the entry chained to it with
    /// `hub_domain::audit::next_link` under `key` (concurrent appends never
    /// fork the chain). Without a key the entry is unkeyed, which is
    /// refused once the log holds a keyed entry
    /// ([`StoreError::Audit`]). Returns the new entry's seq.
    /// (A batch of one: backends implement [`Self::append_audit_batch`].)
    fn append_audit(&self, entry: &AuditEntry, key: Option<&AuditKey>) -> Result<i64, StoreError> {
        self.append_audit_batch(std::slice::from_ref(entry), key)?
            .first()
            .copied()
            .ok_or_else(|| StoreError::Corrupt("an audit append stored no entry".into()))
    }
    /// Group commit: appends `entries` in order after the newest one, in
    /// **one** transaction (read the head once, chain each entry to the one
    /// before it under `key`, commit once). All or nothing: on any error no
    /// entry of the batch is stored. Returns each entry's seq, in order
    /// (an empty batch: nothing, no transaction).
    fn append_audit_batch(
        &self,
        entries: &[AuditEntry],
        key: Option<&AuditKey>,
    ) -> Result<Vec<i64>, StoreError>;
    /// The entries with `seq >= since_seq`, by seq (`i64::MIN`: all of
    /// them, as verification needs).
    fn audit_entries(&self, since_seq: i64) -> Result<Vec<StoredAuditEntry>, StoreError>;
    /// Under the same lock as appends: when `policy` says a checkpoint of
    /// the head is due at `now_us`, signs it with `key`, stores it and
    /// returns it (several hubs sharing the database take each checkpoint
    /// once).
    fn audit_checkpoint(
        &self,
        key: &AuditKey,
        policy: CheckpointPolicy,
        now_us: i64,
    ) -> Result<Option<AuditCheckpoint>, StoreError>;
    /// The stored checkpoints, by seq.
    fn audit_checkpoints(&self) -> Result<Vec<AuditCheckpoint>, StoreError>;
    /// Retention of the audit log: in one transaction under the append
    /// lock, when entries up to `through.seq` remain and `through` is a
    /// stored checkpoint (same seq and link), appends `entry`
    /// (`hub_domain::audit::purge_entry`) chained to the head under `key`,
    /// records the purge and deletes entries `..= through.seq`. Returns
    /// the entries deleted (0: nothing to purge, nothing appended).
    fn purge_audit(
        &self,
        through: &AuditCheckpoint,
        entry: &AuditEntry,
        key: &AuditKey,
    ) -> Result<u64, StoreError>;
}
