//! `AuditStore` on PostgreSQL (migration 4: `audit_log`; migration 9: key
//! ids, patient lists, `audit_checkpoints`). Append-only by
//! the database itself: a statement trigger refuses UPDATE, DELETE and
//! TRUNCATE. Hash-chained exactly like SQLite's (`hub_domain::audit`):
//! an append reads the chain head and writes the entry chained to it in
//! one transaction holding [`AUDIT_LOCK`], so appends from any number of
//! hub processes sharing the database are serialized and the chain stays
//! linear (`seq` being the primary key, a fork could not be stored anyway).

use hub_domain::audit::{Head, next_link};
use hub_storage::{
    AuditCheckpoint, AuditEntry, AuditKey, AuditStore, CheckpointPolicy, StoreError,
    StoredAuditEntry,
};

use crate::{ASSOC_LOCK, DbError, PgStore};

/// Transaction advisory lock serializing audit appends (and checkpoints).
pub(crate) const AUDIT_LOCK: i64 = ASSOC_LOCK + 3;

const CHECKPOINT_COLUMNS: &str = "seq, mac, entries, time_us, key_id, sig";

fn checkpoint_row(r: &tokio_postgres::Row) -> AuditCheckpoint {
    AuditCheckpoint {
        seq: r.get(0),
        mac: r.get(1),
        entries: r.get(2),
        time_us: r.get(3),
        key_id: r.get(4),
        sig: r.get(5),
    }
}

/// The head of the chain, read after the lock was granted (read committed:
/// the statement's snapshot sees the previous holder's entry).
///
/// Planned at every call (simple query protocol), never from a cached
/// plan: a plan cached while the log was small (a new deployment, or
/// statistics taken then) is a sequential scan and sort, which stays in
/// use as the log grows, under the lock every append waits for (0.43 ms a
/// read on average in the FHIR load bench's statement log; 9.7 ms at
/// 40 000 entries in a reproduction, against 0.05 ms for the index probe).
async fn head(c: &impl tokio_postgres::GenericClient) -> Result<Option<Head>, DbError> {
    let messages = c
        .simple_query("SELECT seq, hash, key_id FROM audit_log ORDER BY seq DESC LIMIT 1")
        .await?;
    let corrupt = |what: &str| DbError::Store(StoreError::Corrupt(format!("audit head: {what}")));
    for m in messages {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let seq = r
                .get(0)
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| corrupt("seq is not an integer"))?;
            let hash = r.get(1).ok_or_else(|| corrupt("no hash"))?.to_owned();
            return Ok(Some(Head {
                seq,
                hash,
                key_id: r.get(2).map(str::to_owned),
            }));
        }
    }
    Ok(None)
}

/// Appends `entries` in order after the head, each chained to the one
/// before it under `key`, inside `tx` (which holds the audit lock), in one
/// statement.
async fn chain_in(
    tx: &deadpool_postgres::Transaction<'_>,
    entries: &[AuditEntry],
    key: Option<&AuditKey>,
) -> Result<Vec<i64>, DbError> {
    let last = head(&**tx).await?;
    let chain = Chain::after(last, entries, key)?;
    let insert = tx.prepare_cached(INSERT_CHAIN).await?;
    let stored = tx.execute(&insert, &chain.params()).await?;
    chain.stored(stored)
}

/// Stores a group of entries: one `INSERT` of unnested column arrays (one
/// prepared statement, however many entries), not a statement per entry:
/// each statement has a fixed cost on the server that every request paid.
const INSERT_CHAIN: &str = "INSERT INTO audit_log (seq, time_us, actor, action, resource,
        patient_id, patients, outcome, detail, prev_hash, hash, key_id)
     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[],
         $5::text[], $6::text[], $7::text[], $8::integer[], $9::text[], $10::text[],
         $11::text[], $12::text[])";

/// Entries chained in order after a head, each to the one before it, as
/// the columns of [`INSERT_CHAIN`].
struct Chain<'e> {
    seq: Vec<i64>,
    time_us: Vec<i64>,
    actor: Vec<&'e str>,
    action: Vec<&'e str>,
    resource: Vec<&'e str>,
    patient: Vec<Option<&'e str>>,
    patients: Vec<String>,
    outcome: Vec<i32>,
    detail: Vec<&'e str>,
    prev_hash: Vec<String>,
    hash: Vec<String>,
    key_id: Vec<Option<String>>,
}

impl<'e> Chain<'e> {
    fn after(
        mut last: Option<Head>,
        entries: &'e [AuditEntry],
        key: Option<&AuditKey>,
    ) -> Result<Self, DbError> {
        let n = entries.len();
        let mut seq = Vec::with_capacity(n);
        let mut prev_hash = Vec::with_capacity(n);
        let mut hash = Vec::with_capacity(n);
        let mut key_id = Vec::with_capacity(n);
        for e in entries {
            let link = next_link(last.as_ref(), e, key).map_err(StoreError::from)?;
            seq.push(link.seq);
            prev_hash.push(link.prev_hash);
            hash.push(link.hash.clone());
            key_id.push(link.key_id.clone());
            last = Some(Head {
                seq: link.seq,
                hash: link.hash,
                key_id: link.key_id,
            });
        }
        let column = |f: fn(&AuditEntry) -> &str| entries.iter().map(f).collect::<Vec<_>>();
        Ok(Chain {
            seq,
            time_us: entries.iter().map(|e| e.time_us).collect(),
            actor: column(|e| &e.actor),
            action: column(|e| &e.action),
            resource: column(|e| &e.resource),
            patient: entries.iter().map(|e| e.patient.as_deref()).collect(),
            patients: entries.iter().map(|e| e.patients.join("\n")).collect(),
            outcome: entries.iter().map(|e| i32::from(e.outcome)).collect(),
            detail: column(|e| &e.detail),
            prev_hash,
            hash,
            key_id,
        })
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 12] {
        [
            &self.seq,
            &self.time_us,
            &self.actor,
            &self.action,
            &self.resource,
            &self.patient,
            &self.patients,
            &self.outcome,
            &self.detail,
            &self.prev_hash,
            &self.hash,
            &self.key_id,
        ]
    }

    /// The entries' seqs once `stored` rows were inserted; a short insert
    /// is an error, never a silent gap.
    fn stored(self, stored: u64) -> Result<Vec<i64>, DbError> {
        let n = self.seq.len();
        if stored != n as u64 {
            return Err(StoreError::Corrupt(format!(
                "audit append stored {stored} of {n} entries"
            ))
            .into());
        }
        Ok(self.seq)
    }
}

impl PgStore {
    async fn db_purge_audit(
        &self,
        through: &AuditCheckpoint,
        entry: &AuditEntry,
        key: &AuditKey,
    ) -> Result<u64, DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
            .await?;
        let stored = tx
            .query_opt(
                "SELECT mac FROM audit_checkpoints WHERE seq = $1",
                &[&through.seq],
            )
            .await?
            .map(|r| r.get::<_, String>(0));
        if stored.as_deref() != Some(through.mac.as_str()) {
            return Err(StoreError::Corrupt(format!(
                "audit purge: checkpoint of entry {} is not stored",
                through.seq
            ))
            .into());
        }
        let pending: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM audit_log WHERE seq <= $1",
                &[&through.seq],
            )
            .await?
            .get(0);
        if pending == 0 {
            return Ok(0);
        }
        // The purge entry first, chained to the head (which may be the
        // checkpoint's own entry, about to go).
        chain_in(&tx, std::slice::from_ref(entry), Some(key)).await?;
        tx.execute(
            "INSERT INTO audit_purges (through, mac, time_us) VALUES ($1, $2, $3)",
            &[&through.seq, &through.mac, &entry.time_us],
        )
        .await?;
        tx.execute("SET LOCAL vigil.audit_purge = 'on'", &[])
            .await?;
        let n = tx
            .execute("DELETE FROM audit_log WHERE seq <= $1", &[&through.seq])
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    /// One transaction for the whole batch, in two round trips: `BEGIN`,
    /// the lock and the read of the head go out together (the server runs
    /// them in order, so the head is read once the lock is held), then
    /// every entry chained after that head (one `INSERT`) and `COMMIT`
    /// together. A request waits for its group's commit, so each round
    /// trip a group saves shortens every audited request (a round trip
    /// passes between three threads: the caller's, the store's I/O thread
    /// and the server's). When the `INSERT` fails the pipelined `COMMIT`
    /// ends the failed transaction without committing anything; when
    /// anything before it fails the transaction is rolled back before the
    /// connection goes back to the pool. A short insert (which `unnest`
    /// over arrays of one length cannot give) is reported after its
    /// commit.
    async fn db_append_audit_batch(
        &self,
        entries: &[AuditEntry],
        key: Option<&AuditKey>,
    ) -> Result<Vec<i64>, DbError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.conn().await?;
        let lock = c.prepare_cached("SELECT pg_advisory_xact_lock($1)").await?;
        let insert = c.prepare_cached(INSERT_CHAIN).await?;
        let (begun, locked, last) = futures_util::join!(
            c.batch_execute("BEGIN"),
            c.execute(&lock, &[&AUDIT_LOCK]),
            head(&**c)
        );
        let chain = begun
            .map_err(DbError::from)
            .and(locked.map_err(DbError::from))
            .and_then(|_| Chain::after(last?, entries, key));
        let chain = match chain {
            Ok(chain) => chain,
            Err(e) => {
                // A connection that cannot even roll back is closed, and
                // the pool drops it.
                let _ = c.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        let params = chain.params();
        let (stored, committed) =
            futures_util::join!(c.execute(&insert, &params), c.batch_execute("COMMIT"));
        let stored = stored?;
        committed?;
        chain.stored(stored)
    }

    async fn db_audit_entries(&self, since_seq: i64) -> Result<Vec<StoredAuditEntry>, DbError> {
        self.db_audit_entries_where("seq >= $1", &since_seq).await
    }

    /// The entries matching `cond` (one parameter, `$1`), by seq.
    pub(crate) async fn db_audit_entries_where(
        &self,
        cond: &str,
        param: &(dyn tokio_postgres::types::ToSql + Sync),
    ) -> Result<Vec<StoredAuditEntry>, DbError> {
        let c = self.conn().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT seq, time_us, actor, action, resource, patient_id, outcome, detail,
                            prev_hash, hash, key_id, patients
                       FROM audit_log WHERE {cond} ORDER BY seq"
                ),
                &[param],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let outcome: i32 = r.get(6);
                let patients: String = r.get(11);
                Ok(StoredAuditEntry {
                    seq: r.get(0),
                    entry: AuditEntry {
                        time_us: r.get(1),
                        actor: r.get(2),
                        action: r.get(3),
                        resource: r.get(4),
                        patient: r.get(5),
                        patients: if patients.is_empty() {
                            Vec::new()
                        } else {
                            patients.split('\n').map(str::to_owned).collect()
                        },
                        outcome: u16::try_from(outcome).map_err(|_| {
                            StoreError::Corrupt(format!("audit outcome {outcome} is not a status"))
                        })?,
                        detail: r.get(7),
                    },
                    prev_hash: r.get(8),
                    hash: r.get(9),
                    key_id: r.get(10),
                })
            })
            .collect()
    }

    async fn db_audit_checkpoint(
        &self,
        key: &AuditKey,
        policy: CheckpointPolicy,
        now_us: i64,
    ) -> Result<Option<AuditCheckpoint>, DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        // The append lock: the head cannot move while it is signed, and
        // two hubs do not both take the same checkpoint.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
            .await?;
        let Some(h) = head(&*tx).await? else {
            return Ok(None);
        };
        let last = tx
            .query_opt(
                &format!(
                    "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq DESC LIMIT 1"
                ),
                &[],
            )
            .await?
            .map(|r| checkpoint_row(&r));
        if !policy.due(last.as_ref(), h.seq, now_us) {
            return Ok(None);
        }
        let cp = AuditCheckpoint::sign(key, &h, now_us);
        tx.execute(
            &format!(
                "INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
            ),
            &[&cp.seq, &cp.mac, &cp.entries, &cp.time_us, &cp.key_id, &cp.sig],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(cp))
    }

    async fn db_audit_checkpoints(&self) -> Result<Vec<AuditCheckpoint>, DbError> {
        let c = self.conn().await?;
        Ok(c.query(
            &format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq"),
            &[],
        )
        .await?
        .iter()
        .map(checkpoint_row)
        .collect())
    }
}

impl AuditStore for PgStore {
    fn append_audit_batch(
        &self,
        entries: &[AuditEntry],
        key: Option<&AuditKey>,
    ) -> Result<Vec<i64>, StoreError> {
        self.run(self.db_append_audit_batch(entries, key))
    }
    fn audit_entries(&self, since_seq: i64) -> Result<Vec<StoredAuditEntry>, StoreError> {
        self.run(self.db_audit_entries(since_seq))
    }
    fn audit_checkpoint(
        &self,
        key: &AuditKey,
        policy: CheckpointPolicy,
        now_us: i64,
    ) -> Result<Option<AuditCheckpoint>, StoreError> {
        self.run(self.db_audit_checkpoint(key, policy, now_us))
    }
    fn audit_checkpoints(&self) -> Result<Vec<AuditCheckpoint>, StoreError> {
        self.run(self.db_audit_checkpoints())
    }
    fn purge_audit(
        &self,
        through: &AuditCheckpoint,
        entry: &AuditEntry,
        key: &AuditKey,
    ) -> Result<u64, StoreError> {
        self.run(self.db_purge_audit(through, entry, key))
    }
}
