//! The hub's SQLite storage backend (rusqlite, bundled SQLite, WAL): the
//! default, embedded store. Implements every `hub_storage` trait; all SQL of
//! the SQLite backend lives in this crate. Methods are blocking (the
//! transport layer calls them from `spawn_blocking`).
//!
//! `u64` sequences and incarnations are stored as SQLite `INTEGER` (i64);
//! one above 2^63-1 is refused by the ingest plan, never wrapped.

mod access;
mod alerts;
mod association;
mod attribution;
mod audit;
pub(crate) mod audit_file;
pub mod backup;
mod checkpoint;
mod error;
mod gateway_view;
mod hours;
pub mod ids;
mod lake;
mod minutes;
mod privacy;
pub mod schema;
mod scores;
mod stream;
pub mod trends;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hub_domain::fhir::render::{DeviceRow, ObservationRow, device_resource_id};
use hub_domain::fhir::{ObservationIds, ObservationSearch, SortOrder};
use hub_domain::ingest;
use hub_storage::{
    Associations, GatewayRow, GatewayStore, IngestReport, IngestStore, NewIncarnation,
    ObservationStore, Storage, StoreError,
};
use prost::Message;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use shared_protocol::v1::{Batch, BatchAck};

pub use audit_file::audit_path;
pub use error::DbError;
use hub_domain::clock::now_us;
use schema::MIGRATIONS;

/// The schema version a database opened by this build has.
pub fn schema_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// The SQLite store: one connection shared by the server's tasks, and the
/// WAL's group commit.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The one writer (SQLite allows one writing transaction at a time).
    conn: Arc<Mutex<Connection>>,
    /// Read-only connections for the read paths (FHIR API, dashboards):
    /// under WAL they read the last committed state while the writer
    /// ingests, so reads never wait behind ingest.
    readers: Option<Arc<ReadPool>>,
    /// Group commit of the WAL (None only for stores opened without a path).
    wal: Option<Arc<WalSync>>,
    /// WAL checkpoints on a thread of their own (None only for stores
    /// opened without a path).
    checkpointer: Option<Arc<checkpoint::Checkpointer>>,
    /// The audit log's own file (`audit_file`; None only for stores opened
    /// without a path: the log is then in the main database).
    audit: Option<Arc<audit_file::AuditDb>>,
    /// The alert change feed (in process: one hub per SQLite file).
    alert_feed: tokio::sync::broadcast::Sender<hub_domain::alerts::engine::Change>,
}

/// Prepared statements kept per connection: every statement of the hot
/// paths stays prepared (rusqlite's default keeps 16).
const STATEMENT_CACHE: usize = 128;

/// How many read-only connections a store keeps.
const READERS: usize = 4;

/// How much of the database file a read connection maps into memory
/// (`PRAGMA mmap_size`): all of it on a 64-bit machine (the build raises
/// SQLite's cap to match, `.cargo/config.toml`); none where address space
/// is scarce. Only address space is reserved: the pages are the OS page
/// cache's.
const READER_MMAP: i64 = if cfg!(target_pointer_width = "64") {
    1 << 40
} else {
    0
};

/// Settings every connection of a store gets, writer and readers alike.
fn tune(c: &Connection) -> Result<(), DbError> {
    c.busy_timeout(Duration::from_secs(5))?;
    // Room for every statement the hot paths prepare (rusqlite keeps 16).
    c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Query planner stability: a prepared statement keeps its plan whatever
    // values are bound. Without it SQLite marks statements whose plan could
    // depend on a bound value (`LIMIT ?`, a parameter compared with an
    // indexed column once ANALYZE has STAT4 samples) and compiles them
    // again on the first step after every rebinding, which made a cached
    // read by id cost a full prepare.
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// A small fixed set of read-only connections: a caller takes a free one
/// (round robin), or waits for one when all are busy.
#[derive(Debug)]
struct ReadPool {
    conns: Vec<Mutex<Connection>>,
    next: std::sync::atomic::AtomicUsize,
}

impl ReadPool {
    fn open(path: &Path, n: usize) -> Result<Self, DbError> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let c = Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            tune(&c)?;
            // A small page cache (SQLite's default 2 MB): a WAL reader drops
            // its whole cache when another connection has committed since
            // its last read, which with ingest committing a batch after
            // batch is nearly every read; freeing a large cache each time
            // cost more than the pages it kept.
            c.pragma_update(None, "cache_size", -2_000)?;
            // The database file mapped read-only into memory: a page of the
            // file (not of the WAL) is read in place from the OS page cache,
            // without a `pread` and a copy into the connection's cache, and
            // a commit elsewhere invalidates nothing. Search pages touch
            // one table page per row, mostly outside the small cache.
            c.pragma_update(None, "mmap_size", READER_MMAP)?;
            conns.push(Mutex::new(c));
        }
        Ok(Self {
            conns,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn get(&self) -> Result<MutexGuard<'_, Connection>, DbError> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(c) = self.conns[(start + i) % n].try_lock() {
                return Ok(c);
            }
        }
        self.conns[start].lock().map_err(|_| DbError::Poisoned)
    }
}

/// Durability of SQLite commits with group commit. Transactions commit with
/// `synchronous = NORMAL` (written to the WAL, not yet fsynced) under the
/// connection lock; then, outside the lock, [`WalSync::barrier`] fsyncs the
/// WAL once for every commit made so far, so concurrent ingests share one
/// fsync instead of paying one each. The ack of a batch is sent only after
/// its barrier: an acknowledged batch survives power loss, not only a
/// crash of the hub. (Checkpoints fsync the database file themselves.)
#[derive(Debug)]
pub(crate) struct WalSync {
    wal_path: std::path::PathBuf,
    committed: std::sync::atomic::AtomicU64,
    synced: Mutex<u64>,
    fsyncs: std::sync::atomic::AtomicU64,
}

impl WalSync {
    fn new(db_path: &Path) -> Self {
        Self {
            wal_path: side_file(db_path, "-wal"),
            committed: std::sync::atomic::AtomicU64::new(0),
            synced: Mutex::new(0),
            fsyncs: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Call right after a commit, still holding the connection lock:
    /// returns the commit's generation for [`Self::barrier`].
    pub(crate) fn committed(&self) -> u64 {
        self.committed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    /// Returns once commit `generation` is on stable storage.
    pub(crate) fn barrier(&self, generation: u64) -> Result<(), StoreError> {
        let mut synced = self.synced.lock().map_err(|_| StoreError::Poisoned)?;
        if *synced >= generation {
            return Ok(());
        }
        let target = self.committed.load(std::sync::atomic::Ordering::SeqCst);
        match std::fs::File::open(&self.wal_path) {
            Ok(f) => f.sync_data().map_err(StoreError::Io)?,
            // No WAL file: everything was checkpointed (and fsynced) into
            // the database file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Io(e)),
        }
        self.fsyncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *synced = target;
        Ok(())
    }
}

/// Create gateway `id` with a token hash, or re-activate it when revoked;
/// an active gateway of that id is refused.
fn put_gateway(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    token_sha256: &str,
    now: i64,
) -> Result<(), DbError> {
    let existing: Option<Option<i64>> = tx
        .query_row("SELECT revoked_us FROM gateways WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    match existing {
        Some(None) => Err(StoreError::GatewayExists(id.to_owned()).into()),
        Some(Some(_)) => {
            // A re-activated gateway starts with only its new token.
            tx.execute(
                "DELETE FROM gateway_grace_tokens WHERE gateway_id = ?1",
                [id],
            )?;
            tx.execute(
                "UPDATE gateways SET token_sha256 = ?2, created_us = ?3, revoked_us = NULL WHERE id = ?1",
                params![id, token_sha256, now],
            )?;
            Ok(())
        }
        None => {
            tx.execute(
                "INSERT INTO gateways (id, token_sha256, created_us) VALUES (?1, ?2, ?3)",
                params![id, token_sha256, now],
            )?;
            Ok(())
        }
    }
}

/// Gives devices stored before schema v4 their FHIR id.
fn backfill_device_ids(tx: &rusqlite::Transaction<'_>) -> Result<(), DbError> {
    let missing: Vec<(String, String)> = tx
        .prepare("SELECT gateway_id, device_id FROM devices WHERE fhir_id IS NULL")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (g, d) in missing {
        tx.execute(
            "UPDATE devices SET fhir_id = ?3 WHERE gateway_id = ?1 AND device_id = ?2",
            params![g, d, device_resource_id(&g, &d)],
        )?;
    }
    Ok(())
}

/// The database file (and the directory holding it, when missing) created
/// private: `0600` in `0700`, whatever the umask. SQLite gives its `-wal`
/// and `-shm` files the database file's mode when it creates them; ones
/// left by an older version, and a database file that group or others
/// could read, are narrowed to `0600` (and logged).
fn private_files(path: &Path) -> Result<(), DbError> {
    use vigil_io::private_fs;
    if let Some(dir) = path.parent() {
        private_fs::create_dir_all(dir).map_err(|e| DbError::File(dir.to_owned(), e))?;
    }
    let narrowed = |p: &Path, was: Option<u32>| {
        if let Some(mode) = was {
            tracing::warn!(path = %p.display(), was = format!("{mode:o}"), "narrowed the mode of a hub database file to 0600");
        }
    };
    narrowed(
        path,
        private_fs::ensure_file(path).map_err(|e| DbError::File(path.to_owned(), e))?,
    );
    for suffix in ["-wal", "-shm"] {
        let p = side_file(path, suffix);
        narrowed(
            &p,
            private_fs::narrow(&p).map_err(|e| DbError::File(p.clone(), e))?,
        );
    }
    Ok(())
}

/// The file SQLite keeps beside database `db` with `suffix` (`-wal`,
/// `-shm`) appended to its name.
pub(crate) fn side_file(db: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    p.into()
}

impl SqliteStore {
    /// Opens (creating if needed) the database and its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::open_db(path)?)
    }

    fn open_db(path: &Path) -> Result<Self, DbError> {
        private_files(path)?;
        let conn = Connection::open(path)?;
        let mut store = Self::init(conn)?;
        store.wal = Some(Arc::new(WalSync::new(path)));
        // Checkpoints leave the commits (`checkpoint`).
        let checkpointer = checkpoint::Checkpointer::start(path, &*store.conn()?)?;
        store.checkpointer = Some(Arc::new(checkpointer));
        let audit = audit_file::AuditDb::open(path, &*store.conn()?)?;
        store.audit = Some(Arc::new(audit));
        // After the migrations: the readers see the current schema.
        store.readers = Some(Arc::new(ReadPool::open(path, READERS)?));
        Ok(store)
    }

    /// WAL fsyncs made by ingest so far (group commit: usually fewer than
    /// the batches ingested concurrently). SQLite only.
    pub fn wal_fsyncs(&self) -> u64 {
        self.wal
            .as_ref()
            .map_or(0, |w| w.fsyncs.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn init(mut conn: Connection) -> Result<Self, DbError> {
        tune(&conn)?;
        // 64 MiB page cache for the one writer (the default is 2 MB): the
        // uniqueness and search indexes ingest updates stay in memory, and
        // only its own commits change the file it caches.
        conn.pragma_update(None, "cache_size", -65_536)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL: commits do not fsync; ingest makes its commits durable
        // with group commit (`WalSync`) before acknowledging.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let tx = conn.transaction()?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version INTEGER PRIMARY KEY, applied_us INTEGER NOT NULL)",
        )?;
        let current: Option<i64> =
            tx.query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })?;
        for (version, sql) in MIGRATIONS {
            if current.unwrap_or(0) < *version {
                tx.execute_batch(sql)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_us) VALUES (?1, ?2)",
                    params![version, now_us()],
                )?;
            }
        }
        if current.unwrap_or(0) < 23 {
            ids::fill(&tx)?;
        }
        backfill_device_ids(&tx)?;
        tx.commit()?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            readers: None,
            wal: None,
            checkpointer: None,
            audit: None,
            alert_feed: tokio::sync::broadcast::channel(1024).0,
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, DbError> {
        let c = self.conn.lock().map_err(|_| DbError::Poisoned)?;
        // Whatever the writer is taken for, a checkpoint follows shortly.
        if let Some(ck) = &self.checkpointer {
            ck.written();
        }
        Ok(c)
    }

    /// The audit file's writer (the main writer when the store has no
    /// audit file).
    fn audit_writer(&self) -> Result<MutexGuard<'_, Connection>, DbError> {
        match &self.audit {
            Some(a) => a.writer(),
            None => self.conn(),
        }
    }

    /// The audit file's reader (a main reader when the store has no audit
    /// file).
    fn audit_reader(&self) -> Result<MutexGuard<'_, Connection>, DbError> {
        match &self.audit {
            Some(a) => a.reader(),
            None => self.reader(),
        }
    }

    /// A read-only connection (the writer when the store has no readers).
    /// Only for methods that do not write.
    fn reader(&self) -> Result<MutexGuard<'_, Connection>, DbError> {
        match &self.readers {
            Some(pool) => pool.get(),
            None => self.conn(),
        }
    }
    /// Whether the database answers a query.
    fn db_ping(&self) -> Result<(), DbError> {
        let conn = self.conn()?;
        conn.query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| {
            r.get::<_, i64>(0)
        })?;
        Ok(())
    }

    /// Registers a gateway with the hash of its token. A revoked gateway id
    /// may be re-added (it gets the new token); an active one may not.
    /// Record a one-time enrolment token (its SHA-256), valid until `expires_us`.
    fn db_add_enrollment(&self, token_sha256: &str, expires_us: i64) -> Result<(), DbError> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO enrollment_tokens (token_sha256, created_us, expires_us) VALUES (?1, ?2, ?3)",
            params![token_sha256, now_us(), expires_us],
        )?;
        Ok(())
    }

    /// Exchange an enrolment token for a gateway: in one transaction, check
    /// the token is known, unused and unexpired, create (or re-activate a
    /// revoked) gateway `id` with `gateway_token_sha256`, and mark the token
    /// used. A gateway id that is already active is refused.
    fn db_enroll(
        &self,
        enrollment_sha256: &str,
        id: &str,
        gateway_token_sha256: &str,
        now: i64,
    ) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let row: Option<(i64, Option<i64>)> = tx
            .query_row(
                "SELECT expires_us, used_us FROM enrollment_tokens WHERE token_sha256 = ?1",
                [enrollment_sha256],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            Some((expires, None)) if expires > now => {}
            _ => return Err(StoreError::EnrollmentRefused.into()),
        }
        put_gateway(&tx, id, gateway_token_sha256, now)?;
        tx.execute(
            "UPDATE enrollment_tokens SET used_us = ?2, gateway_id = ?3 WHERE token_sha256 = ?1",
            params![enrollment_sha256, now, id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn db_add_gateway(&self, id: &str, token_sha256: &str) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        put_gateway(&tx, id, token_sha256, now_us())?;
        tx.commit()?;
        Ok(())
    }

    /// All gateways, by id.
    fn db_list_gateways(&self) -> Result<Vec<GatewayRow>, DbError> {
        let conn = self.reader()?;
        let mut stmt =
            conn.prepare("SELECT id, created_us, revoked_us FROM gateways ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(GatewayRow {
                    id: r.get(0)?,
                    created_us: r.get(1)?,
                    revoked_us: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Revokes a gateway's token. Revoking an already revoked gateway is a
    /// no-op.
    fn db_revoke_gateway(&self, id: &str) -> Result<(), DbError> {
        let conn = self.conn()?;
        let exists = conn
            .query_row("SELECT 1 FROM gateways WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some();
        if !exists {
            return Err(StoreError::GatewayNotFound(id.to_owned()).into());
        }
        conn.execute(
            "UPDATE gateways SET revoked_us = ?2 WHERE id = ?1 AND revoked_us IS NULL",
            params![id, now_us()],
        )?;
        conn.execute(
            "DELETE FROM gateway_grace_tokens WHERE gateway_id = ?1",
            [id],
        )?;
        Ok(())
    }

    /// Replaces the token of active gateway `id` by `new_token_sha256`.
    /// With `grace_until` (hub clock, µs) after `now`, the previous token
    /// keeps working until then; otherwise it stops at once. Any earlier
    /// grace token of the gateway is dropped either way.
    fn db_rotate_gateway(
        &self,
        id: &str,
        new_token_sha256: &str,
        grace_until: Option<i64>,
        now: i64,
    ) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row: Option<(String, Option<i64>)> = tx
            .query_row(
                "SELECT token_sha256, revoked_us FROM gateways WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let old = match row {
            None => return Err(StoreError::GatewayNotFound(id.to_owned()).into()),
            Some((_, Some(_))) => return Err(StoreError::GatewayRevoked(id.to_owned()).into()),
            Some((old, None)) => old,
        };
        tx.execute(
            "DELETE FROM gateway_grace_tokens WHERE gateway_id = ?1",
            [id],
        )?;
        if let Some(until) = grace_until.filter(|&t| t > now) {
            tx.execute(
                "INSERT INTO gateway_grace_tokens (token_sha256, gateway_id, expires_us) VALUES (?1, ?2, ?3)",
                params![old, id, until],
            )?;
        }
        tx.execute(
            "UPDATE gateways SET token_sha256 = ?2 WHERE id = ?1",
            params![id, new_token_sha256],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// [`Store::authenticate`] at hub time `now` (µs).
    fn db_authenticate_at(&self, token_sha256: &str, now: i64) -> Result<Option<String>, DbError> {
        let conn = self.reader()?;
        Ok(conn
            .query_row(
                "SELECT id FROM gateways WHERE token_sha256 = ?1 AND revoked_us IS NULL
                 UNION ALL
                 SELECT g.id FROM gateway_grace_tokens t JOIN gateways g ON g.id = t.gateway_id
                  WHERE t.token_sha256 = ?1 AND t.expires_us > ?2 AND g.revoked_us IS NULL
                 LIMIT 1",
                params![token_sha256, now],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Whether gateway `id` is registered and not revoked (MQTT ingest,
    /// where the broker authenticated the publisher).
    fn db_gateway_is_active(&self, id: &str) -> Result<bool, DbError> {
        let conn = self.reader()?;
        Ok(conn
            .query_row(
                "SELECT 1 FROM gateways WHERE id = ?1 AND revoked_us IS NULL",
                [id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Stores a batch of an authenticated gateway in one transaction: the
    /// plan `hub_domain::ingest::plan` makes (attribution loaded here, per
    /// device), each row inserted unless its identity is already stored,
    /// the chart buckets of the new usable values, and the batch's ack.
    fn db_ingest(
        &self,
        gateway_id: &str,
        batch: &Batch,
        associations: &Associations,
        received_us: i64,
        now_us: i64,
        position: Option<&hub_storage::StreamPosition>,
    ) -> Result<IngestReport, DbError> {
        let mut conn = self.conn()?;
        // IMMEDIATE: take the write lock up front, so that hub instances
        // sharing the database wait for each other (busy timeout) instead of
        // failing to upgrade a read transaction.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (incarnation, batch_seq) = ingest::check_batch(batch)?;
        let stored: Option<Vec<u8>> = tx
            .query_row(
                "SELECT ack FROM batches
                  WHERE gateway_id = ?1 AND incarnation = ?2 AND sequence = ?3",
                params![gateway_id, incarnation, batch_seq],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(bytes) = stored {
            let mut ack = BatchAck::decode(bytes.as_slice())?;
            ack.duplicate_batch = true;
            // A re-sent batch read from a stream still moves its offset.
            if let Some(p) = position {
                stream::write_offset(&tx, p)?;
                tx.commit()?;
                let generation = self.wal.as_ref().map(|w| w.committed());
                drop(conn);
                if let (Some(w), Some(g)) = (&self.wal, generation) {
                    w.barrier(g)?;
                }
            }
            return Ok(IngestReport {
                ack,
                rejected_reasons: Vec::new(),
                out_of_range: 0,
                live: Vec::new(),
                new_incarnation: None,
                erased: 0,
            });
        }
        // The first batch of a buffer incarnation this hub has not seen.
        let new_incarnation = if incarnation == 0 {
            None
        } else {
            let seen: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM batches WHERE gateway_id = ?1 AND incarnation = ?2)",
                )?
                .query_row(params![gateway_id, incarnation], |r| r.get(0))?;
            if seen {
                None
            } else {
                let previous: Option<i64> = tx
                    .prepare_cached(
                        "SELECT incarnation FROM batches WHERE gateway_id = ?1
                          ORDER BY received_us DESC LIMIT 1",
                    )?
                    .query_row([gateway_id], |r| r.get(0))
                    .optional()?;
                Some(NewIncarnation {
                    incarnation,
                    previous,
                })
            }
        };
        // Erased patients: only a batch with readings that name their
        // patient needs them (the HL7 path).
        let subjects = if ingest::names_patients(batch) {
            privacy::erased_subjects(&tx)?.map(std::sync::Arc::new)
        } else {
            None
        };
        let mut plan = ingest::plan(gateway_id, batch, now_us, |device, lo, hi| {
            let mut a = attribution::load(&tx, gateway_id, device, lo, hi, associations)?;
            a.erased = privacy::erased_windows(&tx, gateway_id, device, lo, hi)?;
            a.erased_subjects.clone_from(&subjects);
            Ok::<_, DbError>(a)
        })?;
        if let Some(n) = &new_incarnation {
            plan.events.push(ingest::incarnation_event(
                n.incarnation,
                n.previous,
                received_us,
            ));
        }
        let (row_new, event_new) = {
            let mut insert_rejected = tx.prepare_cached(
                "INSERT INTO rejected_readings (gateway_id, device_id, batch_sequence, sequence,
                     kind, reason, detail, raw, received_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for r in &plan.rejected {
                insert_rejected.execute(params![
                    gateway_id,
                    r.device_id,
                    batch_seq,
                    r.sequence,
                    r.kind,
                    r.reason,
                    r.detail,
                    r.raw,
                    received_us
                ])?;
            }
            let mut upsert_device = tx.prepare_cached(
                "INSERT INTO devices (gateway_id, device_id, protocol, manufacturer, model,
                     serial_number, location, first_seen_us, last_seen_us, fhir_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)
                 ON CONFLICT (gateway_id, device_id) DO UPDATE SET fhir_id = excluded.fhir_id,
                     protocol = excluded.protocol, manufacturer = excluded.manufacturer,
                     model = excluded.model, serial_number = excluded.serial_number,
                     location = excluded.location, last_seen_us = excluded.last_seen_us",
            )?;
            for d in &plan.devices {
                let i = &d.info;
                upsert_device.execute(params![
                    gateway_id,
                    i.device_id,
                    i.protocol,
                    i.manufacturer,
                    i.model,
                    i.serial_number,
                    i.location,
                    received_us,
                    d.fhir_id
                ])?;
            }
            let mut insert_event = tx.prepare_cached(
                "INSERT OR IGNORE INTO device_events (gateway_id, device_id, sequence, kind, time_us,
                     detail, batch_sequence, received_us, incarnation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            let mut event_new = Vec::with_capacity(plan.events.len());
            for e in &plan.events {
                let n = insert_event.execute(params![
                    gateway_id,
                    e.device_id,
                    e.sequence,
                    e.kind,
                    e.time_us,
                    e.detail,
                    batch_seq,
                    received_us,
                    incarnation
                ])?;
                event_new.push(n > 0);
            }
            let mut insert_obs = tx.prepare_cached(
                "INSERT OR IGNORE INTO observations (id, gateway_id, device_id, sequence, patient_id,
                     loinc, mdc_code, effective_us, status, value, batch_sequence, received_us,
                     resource, kind, category, payload, patient_system, attribution, incarnation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, '', ?13, ?14, ?15,
                     ?16, ?17, ?18)",
            )?;
            let mut row_new = Vec::with_capacity(plan.rows.len());
            for r in &plan.rows {
                let n = insert_obs.execute(params![
                    r.id,
                    gateway_id,
                    r.device_id,
                    r.sequence,
                    r.patient,
                    r.loinc,
                    r.mdc_code,
                    r.effective_us,
                    r.status,
                    r.value,
                    batch_seq,
                    received_us,
                    r.kind.as_str(),
                    r.category,
                    r.payload,
                    r.patient_system,
                    r.attribution,
                    incarnation
                ])?;
                row_new.push(n > 0);
            }
            // The search totals of the new rows (`hours`), before the
            // panel updates below take the parts out again.
            hours::record(
                &tx,
                plan.rows.iter().zip(&row_new).filter_map(|(r, new)| {
                    let patient = r.patient.as_deref().filter(|_| *new)?;
                    Some((patient, r.mdc_code, r.loinc, r.effective_us))
                }),
            )?;
            let mut mark_panel_member = tx.prepare_cached(
                "UPDATE observations SET panel_id = ?5
                  WHERE gateway_id = ?1 AND device_id = ?2 AND incarnation = ?3 AND sequence = ?4
                    AND panel_id IS NULL",
            )?;
            for p in &plan.panels {
                for (sequence, _) in &p.members {
                    mark_panel_member.execute(params![
                        gateway_id,
                        p.device_id,
                        incarnation,
                        sequence,
                        p.panel_id
                    ])?;
                }
            }
            (row_new, event_new)
        };
        // The device minutes of the new rows (`minutes`) and the device
        // parts of their ids (`ids`).
        let new_rows = || plan.rows.iter().zip(&row_new).filter(|(_, new)| **new);
        minutes::record(
            &tx,
            gateway_id,
            incarnation,
            new_rows().map(|(r, _)| (r.device_id.as_str(), r.sequence, r.effective_us)),
        )?;
        ids::record(
            &tx,
            gateway_id,
            incarnation,
            new_rows().map(|(r, _)| r.device_id.as_str()),
        )?;
        let outcome = ingest::outcome(gateway_id, plan, &row_new, &event_new);
        // Chart buckets of the new usable values (`trends`).
        trends::write(outcome.rollup, &tx)?;
        tx.execute(
            "INSERT INTO batches (gateway_id, sequence, received_us, created_us, agent_version, ack,
                 incarnation)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                gateway_id,
                batch_seq,
                received_us,
                batch.created_time_us,
                batch.agent_version,
                outcome.ack.encode_to_vec(),
                incarnation
            ],
        )?;
        if let Some(p) = position {
            stream::write_offset(&tx, p)?;
        }
        tx.commit()?;
        let generation = self.wal.as_ref().map(|w| w.committed());
        drop(conn);
        if let (Some(w), Some(g)) = (&self.wal, generation) {
            w.barrier(g)?;
        }
        Ok(IngestReport {
            ack: outcome.ack,
            rejected_reasons: outcome.reasons,
            out_of_range: outcome.out_of_range,
            live: outcome.live,
            new_incarnation,
            erased: outcome.erased,
        })
    }

    /// One stored Observation row (rendered by `fhir::render`).
    fn db_observation(&self, id: &str) -> Result<Option<ObservationRow>, DbError> {
        let split = ObservationIds::split(id);
        let conn = self.reader()?;
        // Cached: the statement is prepared once per read connection.
        Ok(conn
            .prepare_cached(&format!(
                "SELECT {OBS_COLUMNS} FROM {OBS_FROM}
                  WHERE o.rowid IN ({}) AND o.id = ?3",
                ids::ROWID_OF
            ))?
            .query_row(params![split.map(|s| s.0), split.map(|s| s.1), id], obs_row)
            .optional()?)
    }

    /// Runs a search; returns the total number of matches and the page's
    /// rows. Components of a blood-pressure panel are listed through their
    /// panel, not on their own.
    fn db_search(&self, s: &ObservationSearch) -> Result<(u64, Vec<ObservationRow>), DbError> {
        if s.codes.iter().any(Vec::is_empty) || s.categories.iter().any(Vec::is_empty) {
            return Ok((0, Vec::new()));
        }
        let mut clauses: Vec<String> = vec!["o.panel_id IS NULL".into()];
        let mut args: Vec<SqlValue> = Vec::new();
        let placeholders = |n: usize| vec!["?"; n].join(", ");
        if !s.patients.is_empty() {
            clauses.push(format!(
                "o.patient_id IN ({})",
                placeholders(s.patients.len())
            ));
            args.extend(s.patients.iter().cloned().map(SqlValue::Text));
        }
        for set in &s.codes {
            clauses.push(code_clause("o", set, &mut args));
        }
        for set in &s.categories {
            clauses.push(format!("o.category IN ({})", placeholders(set.len())));
            args.extend(set.iter().cloned().map(SqlValue::Text));
        }
        if !s.devices.is_empty() {
            clauses.push(format!(
                "(o.gateway_id, o.device_id) IN (SELECT gateway_id, device_id FROM devices WHERE fhir_id IN ({}))",
                placeholders(s.devices.len())
            ));
            args.extend(s.devices.iter().cloned().map(SqlValue::Text));
        }
        for d in &s.dates {
            let (lo, hi) = d.bounds();
            if let Some(lo) = lo {
                clauses.push("o.effective_us >= ?".into());
                args.push(SqlValue::Integer(lo));
            }
            if let Some(hi) = hi {
                clauses.push("o.effective_us < ?".into());
                args.push(SqlValue::Integer(hi));
            }
        }
        // Without a patient (whose index orders the rows), the rows of the
        // devices searched for, or of the dates, come through the device
        // minutes (`minutes`); the clauses above still decide each row.
        let lo = s.dates.iter().filter_map(|d| d.bounds().0).max();
        let hi = s.dates.iter().filter_map(|d| d.bounds().1).min();
        if s.patients.is_empty() && (!s.devices.is_empty() || lo.is_some() || hi.is_some()) {
            let lo_min = lo.map_or(i64::MIN, minutes::minute_of);
            let hi_min = hi.map_or(i64::MAX, |h| minutes::minute_of(h.saturating_sub(1)));
            let mut minute_filter = String::from("m.minute BETWEEN ? AND ?");
            args.push(SqlValue::Integer(lo_min));
            args.push(SqlValue::Integer(hi_min));
            let from = if s.devices.is_empty() {
                ""
            } else {
                minute_filter.push_str(&format!(
                    " AND m.gateway_id = dv.gateway_id AND m.device_id = dv.device_id
                      AND dv.fhir_id IN ({})",
                    placeholders(s.devices.len())
                ));
                args.extend(s.devices.iter().cloned().map(SqlValue::Text));
                "devices dv, "
            };
            clauses.push(format!(
                "o.rowid IN ({})",
                minutes::rowids(from, &minute_filter, "1")
            ));
        }
        let where_sql = format!("WHERE {}", clauses.join(" AND "));
        // The total through the hours when the filters allow (`hours`).
        let count = hours::count(s, lo, hi, &where_sql, &args);
        let conn = self.reader()?;
        // The count, the page and its devices read one snapshot: the total
        // agrees with the page although ingest commits in between, and the
        // read lock is taken once instead of once per statement.
        read_snapshot(&conn, |conn| {
            Self::search_in(conn, s, &where_sql, args, count)
        })
    }

    /// [`Self::db_search`]'s statements over its filter `where_sql`, whose
    /// parameters are `args`; `hours` is the statement that counts the
    /// matches through the hours, with its parameters (`None`: every index
    /// entry is counted).
    fn search_in(
        conn: &Connection,
        s: &ObservationSearch,
        where_sql: &str,
        mut args: Vec<SqlValue>,
        hours: Option<(String, Vec<SqlValue>)>,
    ) -> Result<(u64, Vec<ObservationRow>), DbError> {
        // Cached statements: a search's SQL depends only on its shape
        // (which parameters, how many values), so the same shapes recur.
        let total: i64 = match hours {
            Some((sql, hours_args)) => conn
                .prepare_cached(&sql)?
                .query_row(params_from_iter(hours_args.iter()), |r| r.get(0))?,
            None => conn
                .prepare_cached(&format!("SELECT COUNT(*) FROM observations o {where_sql}"))?
                .query_row(params_from_iter(args.iter()), |r| r.get(0))?,
        };
        if s.count == 0 {
            return Ok((total as u64, Vec::new()));
        }
        let order = match s.sort {
            SortOrder::DateAsc => "o.effective_us ASC, o.rowid ASC",
            SortOrder::DateDesc => "o.effective_us DESC, o.rowid DESC",
        };
        let sql = format!(
            "SELECT {PAGE_COLUMNS} FROM observations o {where_sql} ORDER BY {order} LIMIT ? OFFSET ?"
        );
        args.push(SqlValue::Integer(i64::from(s.count)));
        args.push(SqlValue::Integer(
            i64::try_from(s.offset).unwrap_or(i64::MAX),
        ));
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt
            .query_map(params_from_iter(args.iter()), obs_row)?
            .collect::<Result<Vec<_>, _>>()?;
        fill_devices(conn, &mut rows)?;
        Ok((total as u64, rows))
    }

    /// A patient known to the hub (from stays or attributed readings) by
    /// identifier value: `Some(system)` (empty when unknown).
    fn db_patient(&self, value: &str) -> Result<Option<String>, DbError> {
        let conn = self.reader()?;
        let from_stays: Option<String> = conn
            .query_row(
                "SELECT patient_system FROM patient_stays WHERE patient_value = ?1 LIMIT 1",
                [value],
                |r| r.get(0),
            )
            .optional()?;
        if from_stays.is_some() {
            return Ok(from_stays);
        }
        Ok(conn
            .query_row(
                "SELECT COALESCE(patient_system, '') FROM observations WHERE patient_id = ?1 LIMIT 1",
                [value],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Observation rows after `after_rowid` in rowid order, at most
    /// `limit`, for a bulk export: stored (received) at or after `since_us`;
    /// with `patient_level`, only attributed rows, and with `ward` only those
    /// of patients who stayed in a bed of that ward. Panel components are
    /// exported through their panel. Returns (rowid, row).
    fn db_export_observations(
        &self,
        after_rowid: i64,
        limit: usize,
        since_us: Option<i64>,
        patient_level: bool,
        ward: Option<&str>,
    ) -> Result<Vec<(i64, ObservationRow)>, DbError> {
        let mut sql = format!(
            "SELECT {OBS_COLUMNS}, o.rowid FROM {OBS_FROM} WHERE o.rowid > ?1 AND o.panel_id IS NULL"
        );
        let mut args: Vec<SqlValue> = vec![SqlValue::Integer(after_rowid)];
        if let Some(s) = since_us {
            args.push(SqlValue::Integer(s));
            sql.push_str(&format!(" AND o.received_us >= ?{}", args.len()));
        }
        if patient_level {
            sql.push_str(" AND o.patient_id IS NOT NULL");
        }
        if let Some(w) = ward {
            args.push(SqlValue::Text(w.to_owned()));
            sql.push_str(&format!(
                " AND o.patient_id IN (SELECT s.patient_value FROM patient_stays s
                   JOIN beds b ON b.id = s.bed_id WHERE b.ward = ?{})",
                args.len()
            ));
        }
        args.push(SqlValue::Integer(limit as i64));
        sql.push_str(&format!(" ORDER BY o.rowid LIMIT ?{}", args.len()));
        let conn = self.reader()?;
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt
            .query_map(params_from_iter(args.iter()), |r| {
                // The row's columns as everywhere else, then its rowid.
                Ok((r.get::<_, i64>(OBS_COLUMN_COUNT)?, obs_row(r)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Patients (identifier value, system or "") known from stays and
    /// attributed readings; with `ward`, those who stayed in its beds.
    fn db_export_patients(&self, ward: Option<&str>) -> Result<Vec<(String, String)>, DbError> {
        let conn = self.reader()?;
        let rows = match ward {
            Some(w) => conn
                .prepare(
                    "SELECT s.patient_value, MAX(s.patient_system) FROM patient_stays s
                     JOIN beds b ON b.id = s.bed_id WHERE b.ward = ?1
                     GROUP BY s.patient_value ORDER BY s.patient_value",
                )?
                .query_map([w], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?,
            None => conn
                .prepare(
                    "SELECT v, MAX(sys) FROM (
                         SELECT patient_value AS v, patient_system AS sys FROM patient_stays
                         UNION ALL
                         SELECT patient_id, COALESCE(patient_system, '') FROM observations
                          WHERE patient_id IS NOT NULL)
                     GROUP BY v ORDER BY v",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }

    /// A device by its FHIR id.
    fn db_device(&self, fhir_id: &str) -> Result<Option<DeviceRow>, DbError> {
        let conn = self.reader()?;
        Ok(conn
            .query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE fhir_id = ?1"),
                [fhir_id],
                device_row,
            )
            .optional()?)
    }

    /// Devices ordered by gateway and device id, a page at a time; with
    /// the total count.
    fn db_devices(&self, count: u32, offset: u64) -> Result<(u64, Vec<DeviceRow>), DbError> {
        let conn = self.reader()?;
        let total: i64 = conn.query_row("SELECT COUNT(*) FROM devices", [], |r| r.get(0))?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY gateway_id, device_id LIMIT ?1 OFFSET ?2"
        ))?;
        let rows = stmt
            .query_map(
                params![i64::from(count), i64::try_from(offset).unwrap_or(i64::MAX)],
                device_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok((total as u64, rows))
    }
}

impl GatewayStore for SqliteStore {
    fn add_enrollment(&self, token_sha256: &str, expires_us: i64) -> Result<(), StoreError> {
        Ok(self.db_add_enrollment(token_sha256, expires_us)?)
    }
    fn enroll(
        &self,
        enrollment_sha256: &str,
        id: &str,
        gateway_token_sha256: &str,
        now_us: i64,
    ) -> Result<(), StoreError> {
        Ok(self.db_enroll(enrollment_sha256, id, gateway_token_sha256, now_us)?)
    }
    fn add_gateway(&self, id: &str, token_sha256: &str) -> Result<(), StoreError> {
        Ok(self.db_add_gateway(id, token_sha256)?)
    }
    fn list_gateways(&self) -> Result<Vec<GatewayRow>, StoreError> {
        Ok(self.db_list_gateways()?)
    }
    fn revoke_gateway(&self, id: &str) -> Result<(), StoreError> {
        Ok(self.db_revoke_gateway(id)?)
    }
    fn rotate_gateway(
        &self,
        id: &str,
        new_token_sha256: &str,
        grace_until: Option<i64>,
        now_us: i64,
    ) -> Result<(), StoreError> {
        Ok(self.db_rotate_gateway(id, new_token_sha256, grace_until, now_us)?)
    }
    fn authenticate_at(
        &self,
        token_sha256: &str,
        now_us: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(self.db_authenticate_at(token_sha256, now_us)?)
    }
    fn gateway_is_active(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.db_gateway_is_active(id)?)
    }
}

impl IngestStore for SqliteStore {
    fn ingest(
        &self,
        gateway_id: &str,
        batch: &Batch,
        associations: &Associations,
        received_us: i64,
        now_us: i64,
    ) -> Result<IngestReport, StoreError> {
        Ok(self.db_ingest(gateway_id, batch, associations, received_us, now_us, None)?)
    }
}

impl ObservationStore for SqliteStore {
    fn observation(&self, id: &str) -> Result<Option<ObservationRow>, StoreError> {
        Ok(self.db_observation(id)?)
    }
    fn search(&self, s: &ObservationSearch) -> Result<(u64, Vec<ObservationRow>), StoreError> {
        Ok(self.db_search(s)?)
    }
    fn patient(&self, value: &str) -> Result<Option<String>, StoreError> {
        Ok(self.db_patient(value)?)
    }
    fn export_observations(
        &self,
        after_rowid: i64,
        limit: usize,
        since_us: Option<i64>,
        patient_level: bool,
        ward: Option<&str>,
    ) -> Result<Vec<(i64, ObservationRow)>, StoreError> {
        Ok(self.db_export_observations(after_rowid, limit, since_us, patient_level, ward)?)
    }
    fn export_patients(&self, ward: Option<&str>) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self.db_export_patients(ward)?)
    }
    fn device(&self, fhir_id: &str) -> Result<Option<DeviceRow>, StoreError> {
        Ok(self.db_device(fhir_id)?)
    }
    fn devices(&self, count: u32, offset: u64) -> Result<(u64, Vec<DeviceRow>), StoreError> {
        Ok(self.db_devices(count, offset)?)
    }
}

/// Rows deleted per statement by a purge (short write locks).
pub(crate) const PURGE_CHUNK: i64 = 10_000;

impl Storage for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }
    fn reads_are_local(&self) -> bool {
        true
    }
    fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db_ping()?)
    }
}

/// The columns [`obs_row`] reads, with `$device` for the device's
/// manufacturer, model and serial number.
macro_rules! obs_columns {
    ($device:literal) => {
        concat!(
            "o.id, o.kind, o.gateway_id, o.device_id, o.patient_id, o.received_us, \
             o.payload, o.resource, ",
            $device,
            ", o.patient_system, o.version, COALESCE(o.updated_us, o.received_us)"
        )
    };
}
const OBS_COLUMNS: &str = obs_columns!(
    "COALESCE(d.manufacturer, ''), COALESCE(d.model, ''), COALESCE(d.serial_number, '')"
);
/// [`OBS_COLUMNS`] without the device's columns (left empty), from
/// `observations o` alone: for the rows [`fill_devices`] completes.
const PAGE_COLUMNS: &str = obs_columns!("'', '', ''");
const OBS_FROM: &str = "observations o LEFT JOIN devices d \
     ON d.gateway_id = o.gateway_id AND d.device_id = o.device_id";

/// Number of columns in [`OBS_COLUMNS`].
const OBS_COLUMN_COUNT: usize = 14;

fn obs_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ObservationRow> {
    Ok(ObservationRow {
        id: r.get(0)?,
        kind: r.get(1)?,
        gateway_id: r.get(2)?,
        device_id: r.get(3)?,
        patient_id: r.get(4)?,
        received_us: r.get(5)?,
        payload: r.get(6)?,
        resource: r.get(7)?,
        manufacturer: r.get(8)?,
        model: r.get(9)?,
        serial_number: r.get(10)?,
        patient_system: r.get(11)?,
        version: r.get(12)?,
        updated_us: r.get(13)?,
    })
}

/// SQL: the condition that a row of table alias `alias` (with `mdc_code`
/// and `loinc` columns) matches one of the codes of `set`, whose values
/// are appended to `args`.
pub(crate) fn code_clause(
    alias: &str,
    set: &[hub_domain::fhir::CodeMatch],
    args: &mut Vec<SqlValue>,
) -> String {
    let alternatives: Vec<String> = set
        .iter()
        .map(|c| {
            args.push(SqlValue::Integer(i64::from(c.mdc)));
            match c.loinc {
                Some(l) => {
                    args.push(SqlValue::Text(l.to_owned()));
                    format!("({alias}.mdc_code = ? AND {alias}.loinc = ?)")
                }
                None => format!("{alias}.mdc_code = ?"),
            }
        })
        .collect();
    format!("({})", alternatives.join(" OR "))
}

/// Runs `read` inside one read transaction of `conn` (one snapshot of the
/// database for all its statements). The transaction only reads, so it
/// ends the same whichever way `read` returns.
fn read_snapshot<T>(
    conn: &Connection,
    read: impl FnOnce(&Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    conn.prepare_cached("BEGIN")?.execute([])?;
    let out = read(conn);
    let end = conn
        .prepare_cached("COMMIT")
        .and_then(|mut st| st.execute([]));
    if end.is_err() {
        // Never leave the pooled connection inside the transaction.
        let _ = conn.execute_batch("ROLLBACK");
    }
    let out = out?;
    end?;
    Ok(out)
}

/// Completes rows read with [`PAGE_COLUMNS`]: one lookup per device of the
/// page instead of a join per row (which SQLite also runs for each row an
/// `OFFSET` skips). A device not stored leaves its columns empty, as the
/// outer join does.
fn fill_devices(conn: &Connection, rows: &mut [ObservationRow]) -> Result<(), DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT COALESCE(manufacturer, ''), COALESCE(model, ''), COALESCE(serial_number, '')
         FROM devices WHERE gateway_id = ?1 AND device_id = ?2",
    )?;
    // (gateway, device) → manufacturer, model, serial number.
    let mut known: Vec<([String; 2], [String; 3])> = Vec::new();
    for row in rows.iter_mut() {
        let i = match known
            .iter()
            .position(|(k, _)| k[0] == row.gateway_id && k[1] == row.device_id)
        {
            Some(i) => i,
            None => {
                let columns = stmt
                    .query_row([&row.gateway_id, &row.device_id], |r| {
                        Ok([r.get(0)?, r.get(1)?, r.get(2)?])
                    })
                    .optional()?
                    .unwrap_or_default();
                known.push(([row.gateway_id.clone(), row.device_id.clone()], columns));
                known.len() - 1
            }
        };
        [row.manufacturer, row.model, row.serial_number] = known[i].1.clone();
    }
    Ok(())
}

const DEVICE_COLUMNS: &str = "gateway_id, device_id, protocol, manufacturer, model, serial_number, \
     first_seen_us, last_seen_us";

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        gateway_id: r.get(0)?,
        device_id: r.get(1)?,
        protocol: r.get(2)?,
        manufacturer: r.get(3)?,
        model: r.get(4)?,
        serial_number: r.get(5)?,
        first_seen_us: r.get(6)?,
        last_seen_us: r.get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::SCHEMA_V1;
    use shared_protocol::catalogue::codes;
    use shared_protocol::v1::{DeviceData, DeviceInfo, Reading, reading};

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.sqlite")).unwrap();
        (dir, s)
    }

    #[test]
    fn a_version_1_database_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old.sqlite");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_us INTEGER NOT NULL)",
            )
            .unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.execute("INSERT INTO schema_migrations VALUES (1, 0)", [])
                .unwrap();
            c.execute(
                "INSERT INTO gateways (id, token_sha256, created_us) VALUES ('g', 'h', 0)",
                [],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&p).unwrap();
        assert_eq!(s.list_gateways().unwrap().len(), 1, "data kept");
        s.add_enrollment("e", i64::MAX).unwrap();
        let versions: Vec<i64> = s
            .conn()
            .unwrap()
            .prepare("SELECT version FROM schema_migrations ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let expected: Vec<i64> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert_eq!(versions, expected);
        assert_eq!(versions.last(), Some(&schema_version()));
    }

    /// A database at `path` migrated up to schema `version`, as a hub of
    /// that version left it.
    fn database_at_version(path: &Path, version: i64) -> Connection {
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_us INTEGER NOT NULL)",
        )
        .unwrap();
        for (v, sql) in MIGRATIONS.iter().filter(|m| m.0 <= version) {
            c.execute_batch(sql).unwrap();
            c.execute("INSERT INTO schema_migrations VALUES (?1, 0)", [v])
                .unwrap();
        }
        c
    }

    /// v14 rebuilds `batches`, `observations` and `device_events`: their
    /// rows (and rowids) are kept as incarnation 0 and stay de-duplicated.
    #[test]
    fn a_version_13_database_keeps_its_rows_as_incarnation_0() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v13.sqlite");
        let t = now_us() - 60_000_000;
        {
            let c = database_at_version(&p, 13);
            let id = hub_domain::fhir::observation_id("g", "d", 1);
            c.execute(
                "INSERT INTO observations (rowid, id, gateway_id, device_id, sequence, loinc,
                     mdc_code, effective_us, status, batch_sequence, received_us, resource,
                     attribution)
                 VALUES (77, ?1, 'g', 'd', 1, 'l', 1, ?2, 'final', 1, 1, '', 'unattributed')",
                params![id, t],
            )
            .unwrap();
            c.execute_batch(
                "INSERT INTO batches VALUES ('g', 1, 1, 1, 'old', x'0801');
                 INSERT INTO device_events VALUES ('g', 'd', 2, 'connected', 1, '', 1, 1);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&p).unwrap();
        let (rowid, inc): (i64, i64) = s
            .conn()
            .unwrap()
            .query_row("SELECT rowid, incarnation FROM observations", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((rowid, inc), (77, 0));
        let b = |inc: u64, seq: u64| Batch {
            gateway_id: "g".into(),
            sequence: seq,
            incarnation: inc,
            devices: vec![DeviceData {
                device: Some(DeviceInfo {
                    device_id: "d".into(),
                    ..Default::default()
                }),
                readings: vec![Reading {
                    mdc_code: codes::PULS_OXIM_SAT_O2,
                    value: Some(reading::Value::Numeric(97.0)),
                    ucum_unit: "%".into(),
                    device_time_us: t,
                    validity: 1,
                    sequence: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let none = Associations::new();
        let now = now_us();
        assert!(
            s.ingest("g", &b(0, 1), &none, now, now)
                .unwrap()
                .ack
                .duplicate_batch
        );
        let r = s.ingest("g", &b(0, 2), &none, now, now).unwrap();
        assert_eq!((r.ack.accepted, r.ack.duplicates), (0, 1));
        let r = s.ingest("g", &b(9, 1), &none, now, now).unwrap();
        assert_eq!((r.ack.accepted, r.ack.duplicate_batch), (1, false));
        assert_eq!(r.new_incarnation.unwrap().previous, Some(0));
    }

    /// Schema v23 drops the index of every row's id: a version 22 store's
    /// rows keep their rowids and are all found by id, the readings through
    /// their device part and sequence, a panel and a reading stored under
    /// the first id scheme through the partial index, which holds only
    /// them. A device part two devices share finds the row with the id
    /// asked for.
    #[test]
    fn a_version_22_database_finds_every_row_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v22.sqlite");
        let first_scheme = "5f2c1e0d9b8a7f6e5d4c3b2a19081726";
        let reading = hub_domain::fhir::observation_id_in("g", "d", 0, 2);
        let panel = hub_domain::fhir::render::panel_id("g", "d", 2);
        let other_buffer = hub_domain::fhir::observation_id_in("g", "d", 9, 2);
        {
            let c = database_at_version(&p, 22);
            for (rowid, id, inc, seq) in [
                (5, first_scheme, 0, 1),
                (6, reading.as_str(), 0, 2),
                (7, panel.as_str(), 0, -2),
                (8, other_buffer.as_str(), 9, 2),
            ] {
                c.execute(
                    "INSERT INTO observations (rowid, id, gateway_id, device_id, incarnation,
                         sequence, loinc, mdc_code, effective_us, status, batch_sequence,
                         received_us, resource, attribution)
                     VALUES (?1, ?2, 'g', 'd', ?3, ?4, 'l', 1, 0, 'final', 1, 1, '',
                         'unattributed')",
                    params![rowid, id, inc, seq],
                )
                .unwrap();
            }
            c.execute_batch(schema::FILL_OBSERVATION_MINUTES).unwrap();
        }
        let s = SqliteStore::open(&p).unwrap();
        for id in [first_scheme, &reading, &panel, &other_buffer] {
            assert_eq!(s.db_observation(id).unwrap().expect(id).id, id);
        }
        let rowids = |sql: &str| -> Vec<i64> {
            s.conn()
                .unwrap()
                .prepare(sql)
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert_eq!(
            rowids("SELECT rowid FROM observations ORDER BY rowid"),
            [5, 6, 7, 8]
        );
        assert_eq!(
            rowids(concat!(
                "SELECT rowid FROM observations x INDEXED BY observations_id WHERE ",
                ids::id_keyed!("x"),
                " ORDER BY rowid"
            )),
            [5, 7]
        );
        // Not stored: another sequence of a known device, an unknown
        // device part, another form.
        let missing = hub_domain::fhir::observation_id_in("g", "d", 0, 3);
        let unknown = hub_domain::fhir::observation_id_in("g", "e", 0, 2);
        for id in [missing.as_str(), &unknown, "0000", ""] {
            assert!(s.db_observation(id).unwrap().is_none(), "{id}");
        }
        // Buffer 9's device part also names buffer 0's device (as a hash
        // collision would): its sequence 2 finds both rows, and the read
        // keeps the one whose id was asked for.
        s.conn()
            .unwrap()
            .execute(
                "INSERT INTO observation_id_devices VALUES (?1, 'g', 'd', 0)",
                [&other_buffer[..16]],
            )
            .unwrap();
        assert_eq!(
            s.db_observation(&other_buffer).unwrap().unwrap().id,
            other_buffer
        );
        assert_eq!(s.db_observation(&reading).unwrap().unwrap().id, reading);
    }

    #[test]
    fn enrollment_tokens_are_single_use_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("e.sqlite")).unwrap();
        s.add_enrollment("tok", 1_000).unwrap();
        assert!(
            matches!(
                s.enroll("tok", "gw", "g1", 2_000),
                Err(StoreError::EnrollmentRefused)
            ),
            "expired"
        );
        s.add_enrollment("tok2", 10_000).unwrap();
        s.enroll("tok2", "gw", "g1", 2_000).unwrap();
        assert_eq!(
            s.authenticate_at("g1", now_us()).unwrap().as_deref(),
            Some("gw")
        );
        assert!(
            matches!(
                s.enroll("tok2", "gw2", "g2", 2_001),
                Err(StoreError::EnrollmentRefused)
            ),
            "used"
        );
        s.add_enrollment("tok3", 10_000).unwrap();
        assert!(
            matches!(
                s.enroll("tok3", "gw", "g3", 2_002),
                Err(StoreError::GatewayExists(_))
            ),
            "active id"
        );
        // The refused attempt did not consume the token.
        s.revoke_gateway("gw").unwrap();
        s.enroll("tok3", "gw", "g3", 2_003).unwrap();
        assert_eq!(
            s.authenticate_at("g3", now_us()).unwrap().as_deref(),
            Some("gw")
        );
        assert_eq!(
            s.authenticate_at("g1", now_us()).unwrap(),
            None,
            "old token replaced"
        );
        assert!(matches!(
            s.enroll("nope", "x", "g4", 2_004),
            Err(StoreError::EnrollmentRefused)
        ));
    }

    #[test]
    fn reopening_keeps_schema() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.sqlite");
        SqliteStore::open(&p)
            .unwrap()
            .add_gateway("g", "h")
            .unwrap();
        let s = SqliteStore::open(&p).unwrap();
        assert_eq!(s.list_gateways().unwrap().len(), 1);
        s.ping().unwrap();
    }

    #[test]
    fn rotation_replaces_the_token_with_an_optional_bounded_grace() {
        let (_d, s) = store();
        let g = Some("g".to_owned());
        s.add_gateway("g", "t1").unwrap();
        // Without grace the old token stops at once.
        s.rotate_gateway("g", "t2", None, 1_000).unwrap();
        assert_eq!(s.authenticate_at("t1", 1_000).unwrap(), None);
        assert_eq!(s.authenticate_at("t2", 1_000).unwrap(), g);
        // With grace both work until it ends.
        s.rotate_gateway("g", "t3", Some(5_000), 2_000).unwrap();
        assert_eq!(s.authenticate_at("t2", 4_999).unwrap(), g);
        assert_eq!(s.authenticate_at("t3", 4_999).unwrap(), g);
        assert_eq!(s.authenticate_at("t2", 5_000).unwrap(), None);
        // A second rotation ends the first one's grace.
        s.rotate_gateway("g", "t4", Some(9_000), 3_000).unwrap();
        assert_eq!(s.authenticate_at("t2", 3_000).unwrap(), None);
        assert_eq!(s.authenticate_at("t3", 3_000).unwrap(), g);
        // Revocation ends grace tokens too; a revoked gateway is not rotated.
        s.revoke_gateway("g").unwrap();
        assert_eq!(s.authenticate_at("t3", 3_000).unwrap(), None);
        assert!(matches!(
            s.rotate_gateway("g", "t5", None, 3_000),
            Err(StoreError::GatewayRevoked(_))
        ));
        assert!(matches!(
            s.rotate_gateway("nope", "t6", None, 3_000),
            Err(StoreError::GatewayNotFound(_))
        ));
        // Re-added after revocation: only the new token.
        s.add_gateway("g", "t7").unwrap();
        assert_eq!(s.authenticate_at("t3", 3_000).unwrap(), None);
        assert_eq!(s.authenticate_at("t7", 3_000).unwrap(), g);
    }

    /// Reads go to the read-only connections: a search answers while the
    /// writer is held (as during a long ingest), from the last commit.
    #[test]
    fn reads_do_not_wait_for_the_writer() {
        let (_dir, s) = store();
        s.add_gateway("gw", "h").unwrap();
        let writer = s.conn().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || {
            let gateways = s2.list_gateways().map(|g| g.len());
            let search = s2
                .search(&hub_domain::fhir::parse_search(&[]).unwrap())
                .map(|r| r.0);
            let _ = tx.send((gateways.ok(), search.ok()));
        });
        let got = rx.recv_timeout(Duration::from_secs(10));
        drop(writer);
        assert_eq!(got, Ok((Some(1), Some(0))), "reads waited for the writer");
    }

    #[test]
    fn gateway_lifecycle() {
        let (_d, s) = store();
        s.add_gateway("g", "h1").unwrap();
        assert!(matches!(
            s.add_gateway("g", "h2"),
            Err(StoreError::GatewayExists(_))
        ));
        assert_eq!(
            s.authenticate_at("h1", now_us()).unwrap().as_deref(),
            Some("g")
        );
        s.revoke_gateway("g").unwrap();
        assert_eq!(s.authenticate_at("h1", now_us()).unwrap(), None);
        assert!(s.list_gateways().unwrap()[0].revoked_us.is_some());
        s.add_gateway("g", "h3").unwrap();
        assert_eq!(
            s.authenticate_at("h3", now_us()).unwrap().as_deref(),
            Some("g")
        );
        assert!(matches!(
            s.revoke_gateway("nope"),
            Err(StoreError::GatewayNotFound(_))
        ));
    }

    /// A search's statements read one snapshot: a commit made between two
    /// of them is not seen by the second (the total agrees with the page),
    /// and the connection leaves the snapshot whether the reads succeed or
    /// fail.
    #[test]
    fn a_search_reads_one_snapshot_and_leaves_it() {
        let (_d, s) = store();
        let count = |c: &Connection| -> Result<i64, DbError> {
            Ok(c.query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))?)
        };
        let reader = s.reader().unwrap();
        let before = count(&reader).unwrap();
        let (first, second) = read_snapshot(&reader, |c| {
            let first = count(c)?;
            s.conn()
                .unwrap()
                .execute("INSERT INTO schema_migrations VALUES (1000, 0)", [])
                .unwrap();
            Ok((first, count(c)?))
        })
        .unwrap();
        assert_eq!((first, second), (before, before));
        assert!(reader.is_autocommit());
        assert_eq!(
            count(&reader).unwrap(),
            before + 1,
            "the commit is seen after"
        );
        let failed = read_snapshot(&reader, |c| {
            c.query_row("SELECT no_such_column FROM schema_migrations", [], |r| {
                r.get::<_, i64>(0)
            })?;
            Ok(())
        });
        assert!(failed.is_err());
        assert!(
            reader.is_autocommit(),
            "a failed read leaves no transaction open"
        );
    }

    /// The read connections map the whole database file: the build's cap
    /// (`.cargo/config.toml`) lets the pragma through unclamped.
    #[test]
    fn readers_map_the_database_file() {
        let (_d, s) = store();
        let mapped: i64 = s
            .reader()
            .unwrap()
            .query_row("PRAGMA mmap_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mapped, READER_MMAP);
        let writer: i64 = s
            .conn()
            .unwrap()
            .query_row("PRAGMA mmap_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(writer, 0, "the writer reads through its own cache");
    }

    #[test]
    fn batch_in_one_transaction_with_dedup() {
        let (_d, s) = store();
        let now = now_us();
        let reading = |seq| Reading {
            mdc_code: codes::PULS_OXIM_SAT_O2,
            value: Some(reading::Value::Numeric(97.0)),
            ucum_unit: "%".into(),
            device_time_us: now,
            validity: 1,
            sequence: seq,
            ..Default::default()
        };
        let batch = |seq, readings| Batch {
            gateway_id: "g".into(),
            sequence: seq,
            devices: vec![DeviceData {
                device: Some(DeviceInfo {
                    device_id: "d".into(),
                    ..Default::default()
                }),
                readings,
                waveforms: vec![],
                technical: vec![],
            }],
            ..Default::default()
        };
        let assoc = Associations::new();
        let r = s
            .ingest(
                "g",
                &batch(1, vec![reading(1), reading(2)]),
                &assoc,
                now,
                now,
            )
            .unwrap();
        assert_eq!(
            (r.ack.accepted, r.ack.duplicates, r.ack.duplicate_batch),
            (2, 0, false)
        );
        let r = s
            .ingest("g", &batch(1, vec![reading(1)]), &assoc, now, now)
            .unwrap();
        assert_eq!((r.ack.accepted, r.ack.duplicate_batch), (2, true));
        let r = s
            .ingest(
                "g",
                &batch(2, vec![reading(2), reading(3)]),
                &assoc,
                now,
                now,
            )
            .unwrap();
        assert_eq!((r.ack.accepted, r.ack.duplicates), (1, 1));
        let all = ObservationSearch {
            patients: vec![],
            patient_identifiers: vec![],
            codes: vec![],
            dates: vec![],
            categories: vec![],
            devices: vec![],
            count: 10,
            offset: 0,
            sort: SortOrder::DateAsc,
        };
        assert_eq!(s.search(&all).unwrap().0, 3);
    }
}
