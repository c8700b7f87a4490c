//! `AuditStore` on PostgreSQL (migration 4: `audit_log`). Append-only by
//! the database itself: a statement trigger refuses UPDATE, DELETE and
//! TRUNCATE. Hash-chained exactly like SQLite's (`hub_domain::audit`):
//! an append reads the chain head and writes the entry chained to it in
//! one transaction holding [`AUDIT_LOCK`], so appends from any number of
//! hub processes sharing the database are serialized and the chain stays
//! linear (`seq` being the primary key, a fork could not be stored anyway).

use hub_domain::audit::next_link;
use hub_storage::{AuditEntry, AuditStore, StoreError, StoredAuditEntry};

use crate::{ASSOC_LOCK, DbError, PgStore};

/// Transaction advisory lock serializing audit appends.
pub(crate) const AUDIT_LOCK: i64 = ASSOC_LOCK + 3;

impl PgStore {
    async fn db_append_audit(&self, e: &AuditEntry) -> Result<i64, DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
            .await?;
        // Read committed: this statement's snapshot is taken after the lock
        // was granted, so it sees the previous holder's entry.
        let last = tx
            .query_opt(
                "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                &[],
            )
            .await?
            .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)));
        let (seq, prev, hash) = next_link(last, e);
        tx.execute(
            "INSERT INTO audit_log (seq, time_us, actor, action, resource, patient_id, outcome,
                 detail, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &seq,
                &e.time_us,
                &e.actor,
                &e.action,
                &e.resource,
                &e.patient,
                &i32::from(e.outcome),
                &e.detail,
                &prev,
                &hash,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(seq)
    }

    async fn db_audit_entries(&self, since_seq: i64) -> Result<Vec<StoredAuditEntry>, DbError> {
        let c = self.conn().await?;
        let rows = c
            .query(
                "SELECT seq, time_us, actor, action, resource, patient_id, outcome, detail,
                        prev_hash, hash
                   FROM audit_log WHERE seq >= $1 ORDER BY seq",
                &[&since_seq],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let outcome: i32 = r.get(6);
                Ok(StoredAuditEntry {
                    seq: r.get(0),
                    entry: AuditEntry {
                        time_us: r.get(1),
                        actor: r.get(2),
                        action: r.get(3),
                        resource: r.get(4),
                        patient: r.get(5),
                        outcome: u16::try_from(outcome).map_err(|_| {
                            StoreError::Corrupt(format!("audit outcome {outcome} is not a status"))
                        })?,
                        detail: r.get(7),
                    },
                    prev_hash: r.get(8),
                    hash: r.get(9),
                })
            })
            .collect()
    }
}

impl AuditStore for PgStore {
    fn append_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
        self.run(self.db_append_audit(entry))
    }
    fn audit_entries(&self, since_seq: i64) -> Result<Vec<StoredAuditEntry>, StoreError> {
        self.run(self.db_audit_entries(since_seq))
    }
}
