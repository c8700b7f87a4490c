//! `AuditStore` on SQLite (schema v11: `audit_log`, whose triggers refuse
//! UPDATE and DELETE; v18: the key id and patient list of each entry, and
//! `audit_checkpoints`).

use hub_domain::audit::{Head, next_link};
use hub_storage::{
    AuditCheckpoint, AuditEntry, AuditKey, AuditStore, CheckpointPolicy, StoreError,
    StoredAuditEntry,
};
use rusqlite::{OptionalExtension, Transaction, params};

use crate::{DbError, SqliteStore};

/// The patient list as stored: one id per line, `''` for none.
pub(crate) fn join_patients(p: &[String]) -> String {
    p.join("\n")
}

pub(crate) fn split_patients(s: &str) -> Vec<String> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('\n').map(str::to_owned).collect()
    }
}

fn head(tx: &Transaction<'_>) -> Result<Option<Head>, DbError> {
    Ok(tx
        .prepare_cached("SELECT seq, hash, key_id FROM audit_log ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| {
            Ok(Head {
                seq: r.get(0)?,
                hash: r.get(1)?,
                key_id: r.get(2)?,
            })
        })
        .optional()?)
}

fn checkpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditCheckpoint> {
    Ok(AuditCheckpoint {
        seq: r.get(0)?,
        mac: r.get(1)?,
        entries: r.get(2)?,
        time_us: r.get(3)?,
        key_id: r.get(4)?,
        sig: r.get(5)?,
    })
}

const CHECKPOINT_COLUMNS: &str = "seq, mac, entries, time_us, key_id, sig";

/// Appends `entries` in order after the head, each chained to the one
/// before it under `key`, inside `tx` (which holds the write lock).
fn chain_in(
    tx: &Transaction<'_>,
    entries: &[AuditEntry],
    key: Option<&AuditKey>,
) -> Result<Vec<i64>, DbError> {
    let mut last = head(tx)?;
    let mut seqs = Vec::with_capacity(entries.len());
    let mut insert = tx.prepare_cached(
        "INSERT INTO audit_log (seq, time_us, actor, action, resource, patient_id, patients,
             outcome, detail, prev_hash, hash, key_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    for e in entries {
        let link = next_link(last.as_ref(), e, key).map_err(StoreError::from)?;
        insert.execute(params![
            link.seq,
            e.time_us,
            e.actor,
            e.action,
            e.resource,
            e.patient,
            join_patients(&e.patients),
            e.outcome,
            e.detail,
            link.prev_hash,
            link.hash,
            link.key_id
        ])?;
        seqs.push(link.seq);
        last = Some(Head {
            seq: link.seq,
            hash: link.hash,
            key_id: link.key_id,
        });
    }
    Ok(seqs)
}

impl SqliteStore {
    fn db_append_audit_batch(
        &self,
        entries: &[AuditEntry],
        key: Option<&AuditKey>,
    ) -> Result<Vec<i64>, DbError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.audit_writer()?;
        // IMMEDIATE: the write lock from the read of the head on, so that
        // another process appending at once cannot fork the chain.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let seqs = chain_in(&tx, entries, key)?;
        // Durable when it returns (the audit file commits with
        // `synchronous = FULL`): an audited response waits for its entry.
        tx.commit()?;
        Ok(seqs)
    }

    fn db_audit_entries(&self, since_seq: i64) -> Result<Vec<StoredAuditEntry>, DbError> {
        self.db_audit_entries_where("seq >= ?1", since_seq)
    }

    /// The entries matching `cond` (one parameter, `?1`), by seq.
    pub(crate) fn db_audit_entries_where(
        &self,
        cond: &str,
        param: impl rusqlite::ToSql,
    ) -> Result<Vec<StoredAuditEntry>, DbError> {
        let conn = self.audit_reader()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT seq, time_us, actor, action, resource, patient_id, outcome, detail,
                    prev_hash, hash, key_id, patients
               FROM audit_log WHERE {cond} ORDER BY seq"
        ))?;
        let rows = stmt
            .query_map([param], |r| {
                Ok(StoredAuditEntry {
                    seq: r.get(0)?,
                    entry: AuditEntry {
                        time_us: r.get(1)?,
                        actor: r.get(2)?,
                        action: r.get(3)?,
                        resource: r.get(4)?,
                        patient: r.get(5)?,
                        patients: split_patients(&r.get::<_, String>(11)?),
                        outcome: r.get(6)?,
                        detail: r.get(7)?,
                    },
                    prev_hash: r.get(8)?,
                    hash: r.get(9)?,
                    key_id: r.get(10)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn db_audit_checkpoint(
        &self,
        key: &AuditKey,
        policy: CheckpointPolicy,
        now_us: i64,
    ) -> Result<Option<AuditCheckpoint>, DbError> {
        let mut conn = self.audit_writer()?;
        // The append lock: the head cannot move while it is signed.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(h) = head(&tx)? else {
            return Ok(None);
        };
        let last = tx
            .query_row(
                &format!(
                    "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq DESC LIMIT 1"
                ),
                [],
                checkpoint_row,
            )
            .optional()?;
        if !policy.due(last.as_ref(), h.seq, now_us) {
            return Ok(None);
        }
        let c = AuditCheckpoint::sign(key, &h, now_us);
        tx.execute(
            &format!(
                "INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ),
            params![c.seq, c.mac, c.entries, c.time_us, c.key_id, c.sig],
        )?;
        tx.commit()?;
        Ok(Some(c))
    }

    fn db_audit_checkpoints(&self) -> Result<Vec<AuditCheckpoint>, DbError> {
        let conn = self.audit_reader()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq"
        ))?;
        let rows = stmt
            .query_map([], checkpoint_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

impl AuditStore for SqliteStore {
    fn append_audit_batch(
        &self,
        entries: &[AuditEntry],
        key: Option<&AuditKey>,
    ) -> Result<Vec<i64>, StoreError> {
        Ok(self.db_append_audit_batch(entries, key)?)
    }
    fn audit_entries(&self, since_seq: i64) -> Result<Vec<StoredAuditEntry>, StoreError> {
        Ok(self.db_audit_entries(since_seq)?)
    }
    fn audit_checkpoint(
        &self,
        key: &AuditKey,
        policy: CheckpointPolicy,
        now_us: i64,
    ) -> Result<Option<AuditCheckpoint>, StoreError> {
        Ok(self.db_audit_checkpoint(key, policy, now_us)?)
    }
    fn audit_checkpoints(&self) -> Result<Vec<AuditCheckpoint>, StoreError> {
        Ok(self.db_audit_checkpoints()?)
    }
    fn purge_audit(
        &self,
        through: &AuditCheckpoint,
        entry: &AuditEntry,
        key: &AuditKey,
    ) -> Result<u64, StoreError> {
        Ok(self.db_purge_audit(through, entry, key)?)
    }
}

impl SqliteStore {
    fn db_purge_audit(
        &self,
        through: &AuditCheckpoint,
        entry: &AuditEntry,
        key: &AuditKey,
    ) -> Result<u64, DbError> {
        let mut conn = self.audit_writer()?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let stored: Option<String> = tx
            .query_row(
                "SELECT mac FROM audit_checkpoints WHERE seq = ?1",
                [through.seq],
                |r| r.get(0),
            )
            .optional()?;
        if stored.as_deref() != Some(through.mac.as_str()) {
            return Err(StoreError::Corrupt(format!(
                "audit purge: checkpoint of entry {} is not stored",
                through.seq
            ))
            .into());
        }
        let pending: i64 = tx.query_row(
            "SELECT COUNT(*) FROM audit_log WHERE seq <= ?1",
            [through.seq],
            |r| r.get(0),
        )?;
        if pending == 0 {
            return Ok(0);
        }
        // The purge entry first, chained to the head (which may be the
        // checkpoint's own entry, about to go).
        chain_in(&tx, std::slice::from_ref(entry), Some(key))?;
        tx.execute(
            "INSERT INTO audit_purges (through, mac, time_us) VALUES (?1, ?2, ?3)",
            params![through.seq, through.mac, entry.time_us],
        )?;
        let n = tx.execute("DELETE FROM audit_log WHERE seq <= ?1", [through.seq])?;
        tx.commit()?;
        Ok(n as u64)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hub_domain::audit::verify;

    /// An audit entry numbered `i` (a read naming patient `p-i`).
    pub(crate) fn e(i: i64) -> AuditEntry {
        AuditEntry {
            time_us: 1_795_514_400_000_000 + i,
            actor: "bearer:0123456789abcdef".into(),
            action: "read".into(),
            resource: "/fhir/Observation".into(),
            patient: Some(format!("p-{i}")),
            patients: Vec::new(),
            outcome: 200,
            detail: "patient=p&_count=10".into(),
        }
    }

    fn store_with(n: i64) -> (tempfile::TempDir, SqliteStore) {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("a.sqlite")).unwrap();
        for i in 0..n {
            assert_eq!(s.append_audit(&e(i), None).unwrap(), i + 1);
        }
        (d, s)
    }

    fn check(s: &SqliteStore, anchor: Option<(i64, &str)>) -> hub_domain::audit::Verification {
        verify(&s.audit_entries(i64::MIN).unwrap(), &[], anchor, &[])
    }

    #[test]
    fn the_log_is_append_only_and_an_edit_behind_the_triggers_is_found() {
        let (_d, s) = store_with(5);
        let v = check(&s, None);
        assert_eq!((v.entries, v.broken.clone()), (5, None));
        assert_eq!(v.head.unwrap().0, 5);
        let conn = s.audit_writer().unwrap();
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
        let conn = s.audit_writer().unwrap();
        conn.execute_batch("DROP TRIGGER audit_log_no_delete;")
            .unwrap();
        // A middle entry: the sequence jumps.
        conn.execute("DELETE FROM audit_log WHERE seq = 2", [])
            .unwrap();
        drop(conn);
        assert_eq!(check(&s, None).broken.map(|b| b.0), Some(3));

        let (_d, s) = store_with(5);
        let conn = s.audit_writer().unwrap();
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
