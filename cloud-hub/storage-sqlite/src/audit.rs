//! `AuditStore` on SQLite (schema v11: `audit_log`, whose triggers refuse
//! UPDATE and DELETE).

use hub_domain::audit::next_link;
use hub_storage::{AuditEntry, AuditStore, StoreError, StoredAuditEntry};
use rusqlite::{OptionalExtension, params};

use crate::{DbError, SqliteStore};

impl SqliteStore {
    fn db_append_audit(&self, e: &AuditEntry) -> Result<i64, DbError> {
        let mut conn = self.conn()?;
        // IMMEDIATE: the write lock from the read of the head on, so that
        // another process appending at once cannot fork the chain.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let last = tx
            .query_row(
                "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()?;
        let (seq, prev, hash) = next_link(last, e);
        tx.execute(
            "INSERT INTO audit_log (seq, time_us, actor, action, resource, patient_id, outcome,
                 detail, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                seq, e.time_us, e.actor, e.action, e.resource, e.patient, e.outcome, e.detail,
                prev, hash
            ],
        )?;
        tx.commit()?;
        Ok(seq)
    }

    fn db_audit_entries(&self, since_seq: i64) -> Result<Vec<StoredAuditEntry>, DbError> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare(
            "SELECT seq, time_us, actor, action, resource, patient_id, outcome, detail,
                    prev_hash, hash
               FROM audit_log WHERE seq >= ?1 ORDER BY seq",
        )?;
        let rows = stmt
            .query_map([since_seq], |r| {
                Ok(StoredAuditEntry {
                    seq: r.get(0)?,
                    entry: AuditEntry {
                        time_us: r.get(1)?,
                        actor: r.get(2)?,
                        action: r.get(3)?,
                        resource: r.get(4)?,
                        patient: r.get(5)?,
                        outcome: r.get(6)?,
                        detail: r.get(7)?,
                    },
                    prev_hash: r.get(8)?,
                    hash: r.get(9)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

impl AuditStore for SqliteStore {
    fn append_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
        Ok(self.db_append_audit(entry)?)
    }
    fn audit_entries(&self, since_seq: i64) -> Result<Vec<StoredAuditEntry>, StoreError> {
        Ok(self.db_audit_entries(since_seq)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hub_domain::audit::verify;

    fn e(i: i64) -> AuditEntry {
        AuditEntry {
            time_us: 1_795_514_400_000_000 + i,
            actor: "bearer:0123456789abcdef".into(),
            action: "read".into(),
            resource: "/fhir/Observation".into(),
            patient: Some(format!("p-{i}")),
            outcome: 200,
            detail: "patient=p&_count=10".into(),
        }
    }

    fn store_with(n: i64) -> (tempfile::TempDir, SqliteStore) {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("a.sqlite")).unwrap();
        for i in 0..n {
            assert_eq!(s.append_audit(&e(i)).unwrap(), i + 1);
        }
        (d, s)
    }

    fn check(s: &SqliteStore, anchor: Option<(i64, &str)>) -> hub_domain::audit::Verification {
        verify(&s.audit_entries(i64::MIN).unwrap(), anchor)
    }

    #[test]
    fn the_log_is_append_only_and_an_edit_behind_the_triggers_is_found() {
        let (_d, s) = store_with(5);
        let v = check(&s, None);
        assert_eq!((v.entries, v.broken.clone()), (5, None));
        assert_eq!(v.head.unwrap().0, 5);
        let conn = s.conn().unwrap();
        // Append-only: the triggers refuse edits and deletions.
        assert!(
            conn.execute("UPDATE audit_log SET actor = 'x' WHERE seq = 2", [])
                .is_err()
        );
        assert!(
            conn.execute("DELETE FROM audit_log WHERE seq = 5", [])
                .is_err()
        );
        // Someone with the file drops the triggers and edits an entry.
        conn.execute_batch("DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete;")
            .unwrap();
        conn.execute(
            "UPDATE audit_log SET patient_id = 'p-other' WHERE seq = 3",
            [],
        )
        .unwrap();
        drop(conn);
        let v = check(&s, None);
        assert_eq!(v.broken.as_ref().map(|b| b.0), Some(3), "{v:?}");
        assert!(v.broken.unwrap().1.contains("content"));
    }

    #[test]
    fn removed_entries_are_found() {
        let (_d, s) = store_with(5);
        let head = check(&s, None).head.unwrap();
        let conn = s.conn().unwrap();
        conn.execute_batch("DROP TRIGGER audit_log_no_delete;")
            .unwrap();
        // A middle entry: the sequence jumps.
        conn.execute("DELETE FROM audit_log WHERE seq = 2", [])
            .unwrap();
        drop(conn);
        assert_eq!(check(&s, None).broken.map(|b| b.0), Some(3));

        let (_d, s) = store_with(5);
        let conn = s.conn().unwrap();
        conn.execute_batch("DROP TRIGGER audit_log_no_delete;")
            .unwrap();
        // The newest entry: the chain is shorter but valid; the anchor
        // recorded before finds it.
        conn.execute("DELETE FROM audit_log WHERE seq = 5", [])
            .unwrap();
        drop(conn);
        assert_eq!(check(&s, None).broken, None);
        let v = check(&s, Some((head.0, &head.1)));
        assert_eq!(v.broken.map(|b| b.0), Some(5));
        let v4 = check(&s, None).head.unwrap();
        assert_eq!(check(&s, Some((v4.0, &v4.1))).broken, None);
    }
}
