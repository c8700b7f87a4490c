//! `AuditStore` on PostgreSQL: not implemented yet (the audit log has no
//! PostgreSQL table). Every method fails with `StoreError::Unsupported`,
//! never a silent no-op; the conformance suite lists the audit case as an
//! expected failure here, so it fails once this is implemented.

use hub_storage::{AuditEntry, AuditStore, StoreError, StoredAuditEntry};

use crate::PgStore;

const WHAT: &str = "the audit log";

impl AuditStore for PgStore {
    fn append_audit(&self, _entry: &AuditEntry) -> Result<i64, StoreError> {
        Err(StoreError::Unsupported(WHAT, "postgres"))
    }
    fn audit_entries(&self, _since_seq: i64) -> Result<Vec<StoredAuditEntry>, StoreError> {
        Err(StoreError::Unsupported(WHAT, "postgres"))
    }
}
