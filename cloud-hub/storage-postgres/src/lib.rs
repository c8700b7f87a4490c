//! PostgreSQL storage backend (`[storage] backend = "postgres"`).
//!
//! The async client (tokio-postgres) with a maintained pool
//! (deadpool-postgres), behind the same blocking `hub_storage` traits as
//! SQLite (the transport layer calls them from `spawn_blocking`). The pool's
//! connections run on one I/O thread owned by the store; a call runs its
//! async body on the calling thread ([`PgStore::block`]), so no thread is
//! started per call, and independent statements of one call are pipelined
//! on its connection. TLS to the server is rustls with the ring provider
//! (tokio-postgres-rustls); there is no OpenSSL.
//!
//! **Pool**: deadpool-postgres, up to `pool_size` connections opened
//! lazily; a caller waits up to 30 s for a free one (then the call answers
//! "unavailable", a 503); a connection the client found closed is replaced.
//! Every method takes one connection for one transaction.
//!
//! **Layout**: compact observation rows (protobuf `payload`, rendered to
//! FHIR on read by `fhir::render`, as for SQLite) in a table partitioned by
//! month of effective time; see [`schema`] and `docs/hub.md`.
//!
//! **Concurrency**: a gateway's batches are serialized by a transaction
//! advisory lock on the gateway id (so a re-sent batch is either seen as
//! stored or stored once). Association changes take an exclusive
//! transaction advisory lock that ingest takes shared: a change and an
//! ingest never interleave, so a reading is attributed either at ingest or
//! by the change's re-attribution (the SQLite store gets the same from its
//! single connection). Audit appends are serialized by their own
//! transaction advisory lock (one hash chain whatever the number of hubs),
//! and a patient's score-history writes by a lock on the patient (the
//! write rule sees the last row any hub wrote).

mod access;
mod alerts;
mod association;
mod audit;
mod error;
mod feed;
mod gateway_view;
mod hours;
mod ids;
mod ingest;
mod lake;
mod minutes;
mod privacy;
pub mod schema;
mod scores;
mod stream;
mod trends;

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Transaction};

use hub_domain::clock::now_us;
use hub_domain::fhir::render::{DeviceRow, ObservationRow};
use hub_domain::fhir::{ObservationIds, ObservationSearch, SortOrder};
use hub_storage::{
    Associations, GatewayRow, GatewayStore, IngestReport, IngestStore, ObservationStore, Storage,
    StoreError,
};
use shared_protocol::v1::Batch;

pub use error::DbError;

/// Environment variable holding the PostgreSQL password (instead of
/// `storage.postgres.password_file`).
pub const ENV_PG_PASSWORD: &str = "VIGIL_HUB_PG_PASSWORD";
/// Environment variable overriding `storage.postgres.url`.
pub const ENV_PG_URL: &str = "VIGIL_HUB_PG_URL";

/// `[storage.postgres]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    /// Connection string, URL (`postgresql://vigil@db.example.org/vigil?sslmode=require`)
    /// or key/value form. It must not hold a password.
    pub url: String,
    /// File holding the password (mode 0600 or stricter). Else the
    /// environment variable `VIGIL_HUB_PG_PASSWORD`, else none (trust,
    /// peer or certificate authentication).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connections kept open at most (default 8).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// CA bundle (PEM) to verify the server's certificate with; default:
    /// the public web roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allow a connection to a non-loopback server without
    /// `sslmode=require` (default false).
    #[serde(default)]
    pub allow_plaintext: bool,
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn default_pool_size() -> u32 {
    8
}

const MAX_POOL_SIZE: u32 = 256;
const POOL_WAIT: Duration = Duration::from_secs(30);

impl PgConfig {
    /// A config for `url` with defaults (tests, benchmarks).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password_file: None,
            pool_size: default_pool_size(),
            ca_file: None,
            allow_plaintext: false,
        }
    }

    /// Checks the fields; errors name the field (`storage.postgres.…`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let field = |f: &str| format!("storage.postgres.{f}");
        let cfg = tokio_postgres::Config::from_str(&self.url).map_err(|e| {
            (
                field("url"),
                format!("not a PostgreSQL connection string: {e}"),
            )
        })?;
        if cfg.get_password().is_some() {
            return Err((
                field("url"),
                format!(
                    "must not hold a password; use storage.postgres.password_file or {ENV_PG_PASSWORD}"
                ),
            ));
        }
        if !(1..=MAX_POOL_SIZE).contains(&self.pool_size) {
            return Err((
                field("pool_size"),
                format!("must be between 1 and {MAX_POOL_SIZE}"),
            ));
        }
        let local = cfg.get_hosts().iter().all(|h| match h {
            tokio_postgres::config::Host::Unix(_) => true,
            tokio_postgres::config::Host::Tcp(name) => is_loopback_host(name),
        });
        if !local
            && cfg.get_ssl_mode() != tokio_postgres::config::SslMode::Require
            && !self.allow_plaintext
        {
            return Err((
                field("url"),
                "a non-loopback server needs sslmode=require (or storage.postgres.allow_plaintext = true)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn password(&self) -> Result<Option<String>, DbError> {
        if let Some(path) = &self.password_file {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|e| {
                DbError::Pool(format!(
                    "storage.postgres.password_file {}: {e}",
                    path.display()
                ))
            })?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(DbError::Pool(format!(
                    "storage.postgres.password_file {} is readable by others: chmod 600 it",
                    path.display()
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|e| {
                DbError::Pool(format!(
                    "storage.postgres.password_file {}: {e}",
                    path.display()
                ))
            })?;
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
        }
        Ok(std::env::var(ENV_PG_PASSWORD)
            .ok()
            .filter(|p| !p.is_empty()))
    }

    /// tokio-postgres-rustls over the common client builder
    /// ([`vigil_io::tls`]): pinned `storage.postgres.ca_file` or the public
    /// roots.
    fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, DbError> {
        use vigil_io::tls::{self, PemFile, TlsError};
        let ca = self
            .ca_file
            .as_deref()
            .map(|p| PemFile::new("storage.postgres.ca_file", p));
        let config = tls::pinned_or_public_roots(ca)
            .and_then(|roots| tls::client_config(roots, None))
            .map_err(|e| match e {
                TlsError::Protocol(e) => DbError::Pool(format!("TLS setup: {e}")),
                e => DbError::Pool(e.to_string()),
            })?;
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}

/// The runtime that drives the pool's connections: one worker thread
/// running every connection's I/O task. Store methods are blocking (the
/// `hub_storage` contract: the transport layer calls them from
/// `spawn_blocking`); each runs its async body on the calling thread with
/// this runtime entered ([`PgStore::block`]), so no thread is started per
/// call and the caller's runtime is never blocked on.
struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    fn new() -> Result<Self, DbError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("vigil-pg-io")
            .enable_all()
            .build()
            .map_err(|e| DbError::Pool(format!("cannot start the PostgreSQL I/O thread: {e}")))?;
        Ok(Self(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("runtime present until drop")
            .handle()
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        // Never blocks: the store may be dropped inside an async task.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The PostgreSQL store: a deadpool-postgres pool of tokio-postgres
/// connections, the runtime driving them, and the months whose
/// observation partition exists.
#[derive(Clone)]
pub struct PgStore {
    pool: deadpool_postgres::Pool,
    io: Arc<IoRuntime>,
    partitions: Arc<Mutex<HashSet<i64>>>,
    /// How to open the change feed's own LISTEN connection.
    listen: Arc<feed::Listen>,
    /// The alert change feed, started by its first subscriber.
    alert_feed: Arc<
        std::sync::OnceLock<tokio::sync::broadcast::Sender<hub_domain::alerts::engine::Change>>,
    >,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool_size", &self.pool.status().max_size)
            .finish_non_exhaustive()
    }
}

/// Advisory lock key of association changes (exclusive) vs ingest (shared).
pub(crate) const ASSOC_LOCK: i64 = 0x5649_4749_4c41_5353; // "VIGILASS"

/// Session advisory lock key of retention (one hub purges at a time).
pub(crate) const RETENTION_LOCK: i64 = 0x5649_4749_4c52_4554; // "VIGILRET"

/// A pooled connection (returned to the pool on drop).
pub(crate) type Conn = deadpool_postgres::Object;

impl PgStore {
    /// Connects to PostgreSQL (one connection, to check) and applies its
    /// pending migrations.
    pub fn open(cfg: &PgConfig) -> Result<Self, StoreError> {
        Self::open_db(cfg).map_err(Into::into)
    }

    fn open_db(cfg: &PgConfig) -> Result<Self, DbError> {
        cfg.validate()
            .map_err(|(f, m)| DbError::Pool(format!("invalid `{f}`: {m}")))?;
        let mut config = tokio_postgres::Config::from_str(&cfg.url)
            .map_err(|e| DbError::Pool(format!("storage.postgres.url: {e}")))?;
        if let Some(p) = cfg.password()? {
            config.password(p);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("vigil-hub");
        let listen = Arc::new(feed::Listen {
            config: config.clone(),
            tls: cfg.tls()?,
        });
        let manager = deadpool_postgres::Manager::from_config(
            config,
            cfg.tls()?,
            deadpool_postgres::ManagerConfig {
                // A connection that failed is detected by the client
                // (`is_closed`), not by a test query per checkout.
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(cfg.pool_size as usize)
            .wait_timeout(Some(POOL_WAIT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Pool(e.to_string()))?;
        let store = Self {
            pool,
            io: Arc::new(IoRuntime::new()?),
            partitions: Arc::new(Mutex::new(HashSet::new())),
            listen,
            alert_feed: Arc::default(),
        };
        store.block(store.migrate())?;
        Ok(store)
    }

    /// Runs `fut` to completion on the calling thread, with the I/O
    /// runtime entered (new connections spawn their task there).
    pub(crate) fn block<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        let _entered = self.io.handle().enter();
        futures_executor::block_on(fut)
    }

    /// [`Self::block`] for a trait method: the error made backend-neutral.
    pub(crate) fn run<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, DbError>>,
    ) -> Result<T, StoreError> {
        self.block(fut).map_err(Into::into)
    }

    /// The read `read` makes of a clone of this store, as a
    /// [`hub_storage::ReadFuture`] polled by the API's own async workers
    /// (which also decode the rows), with this store's I/O runtime entered
    /// at each poll, so a connection the pool opens meanwhile gets its task
    /// and its socket there, as under [`Self::block`]. No thread waits on
    /// the network. A read dropped before its end (the request went away)
    /// leaves its connection usable: the statements it sent are answered
    /// and their results discarded, and a search sends its transaction's
    /// start, its statements and its end in one poll
    /// ([`in_search_snapshot`]), so it never leaves a transaction open.
    pub(crate) fn future<T, F>(
        &self,
        read: impl FnOnce(PgStore) -> F,
    ) -> hub_storage::ReadFuture<'static, T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, DbError>> + Send + 'static,
    {
        let io = self.io.handle().clone();
        let mut read = Box::pin(read(self.clone()));
        Box::pin(std::future::poll_fn(move |cx| {
            let _entered = io.enter();
            read.as_mut().poll(cx).map_err(Into::into)
        }))
    }

    pub(crate) async fn conn(&self) -> Result<Conn, DbError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => DbError::Postgres(e),
            deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                DbError::Pool(format!(
                    "no free connection within {} s (pool_size {})",
                    POOL_WAIT.as_secs(),
                    self.pool.status().max_size
                ))
            }
            e => DbError::Unavailable(e.to_string()),
        })
    }

    async fn migrate(&self) -> Result<(), DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        // Serialize hubs migrating the same database at once.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&(ASSOC_LOCK + 1)])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version bigint PRIMARY KEY, applied_us bigint NOT NULL)",
        )
        .await?;
        let current: Option<i64> = tx
            .query_one("SELECT MAX(version) FROM schema_migrations", &[])
            .await?
            .get(0);
        for (version, sql) in schema::MIGRATIONS {
            if current.unwrap_or(0) < *version {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_us) VALUES ($1, $2)",
                    &[version, &now_us()],
                )
                .await?;
            }
        }
        if current.unwrap_or(0) < 15 {
            ids::fill(&tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The applied migration versions, ascending.
    pub fn migrations(&self) -> Result<Vec<i64>, DbError> {
        self.block(async {
            let c = self.conn().await?;
            Ok(c.query(
                "SELECT version FROM schema_migrations ORDER BY version",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    /// The names of the existing observation partitions, ascending.
    pub fn partitions(&self) -> Result<Vec<String>, DbError> {
        self.block(async {
            let c = self.conn().await?;
            Ok(c.query(
                "SELECT c.relname::text FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
              WHERE p.relname = 'observations' ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    /// Creates the monthly partitions holding `times` that are not known
    /// to exist, each in its own short transaction (outside the ingest
    /// transaction, so concurrent hubs do not deadlock on DDL).
    pub(crate) async fn ensure_partitions(
        &self,
        times: impl IntoIterator<Item = i64>,
    ) -> Result<(), DbError> {
        let mut missing: Vec<(i64, i64, String)> = Vec::new();
        {
            let known = self.partitions.lock().map_err(|_| DbError::Poisoned)?;
            for t in times {
                let m = schema::month_of(t);
                if !known.contains(&m.0) && !missing.iter().any(|x| x.0 == m.0) {
                    missing.push(m);
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        for (start, end, name) in missing {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&(ASSOC_LOCK + 2)])
                .await?;
            let exists = tx
                .query_opt("SELECT 1 FROM pg_class WHERE relname = $1", &[&name])
                .await?
                .is_some();
            if !exists {
                // Names and bounds are computed here, never from input text.
                tx.batch_execute(&format!(
                    "CREATE TABLE {name} PARTITION OF observations FOR VALUES FROM ({start}) TO ({end})"
                )).await?;
                tracing::info!(partition = %name, "created observation partition");
            }
            tx.commit().await?;
            self.partitions
                .lock()
                .map_err(|_| DbError::Poisoned)?
                .insert(start);
        }
        Ok(())
    }

    async fn db_ping(&self) -> Result<(), DbError> {
        let c = self.conn().await?;
        c.query_one("SELECT COUNT(*) FROM schema_migrations", &[])
            .await?;
        Ok(())
    }

    async fn db_add_enrollment(&self, token_sha256: &str, expires_us: i64) -> Result<(), DbError> {
        let c = self.conn().await?;
        c.execute(
            "INSERT INTO enrollment_tokens (token_sha256, created_us, expires_us) VALUES ($1, $2, $3)",
            &[&token_sha256, &now_us(), &expires_us],
        ).await?;
        Ok(())
    }

    async fn db_enroll(
        &self,
        enrollment_sha256: &str,
        id: &str,
        gateway_token_sha256: &str,
        now: i64,
    ) -> Result<(), DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let row = tx.query_opt(
            "SELECT expires_us, used_us FROM enrollment_tokens WHERE token_sha256 = $1 FOR UPDATE",
            &[&enrollment_sha256],
        ).await?;
        match row.map(|r| (r.get::<_, i64>(0), r.get::<_, Option<i64>>(1))) {
            Some((expires, None)) if expires > now => {}
            _ => return Err(StoreError::EnrollmentRefused.into()),
        }
        put_gateway(&tx, id, gateway_token_sha256, now).await?;
        tx.execute(
            "UPDATE enrollment_tokens SET used_us = $2, gateway_id = $3 WHERE token_sha256 = $1",
            &[&enrollment_sha256, &now, &id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn db_add_gateway(&self, id: &str, token_sha256: &str) -> Result<(), DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        put_gateway(&tx, id, token_sha256, now_us()).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn db_list_gateways(&self) -> Result<Vec<GatewayRow>, DbError> {
        let c = self.conn().await?;
        Ok(c.query(
            "SELECT id, created_us, revoked_us FROM gateways ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| GatewayRow {
            id: r.get(0),
            created_us: r.get(1),
            revoked_us: r.get(2),
        })
        .collect())
    }

    async fn db_revoke_gateway(&self, id: &str) -> Result<(), DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        if tx
            .query_opt("SELECT 1 FROM gateways WHERE id = $1 FOR UPDATE", &[&id])
            .await?
            .is_none()
        {
            return Err(StoreError::GatewayNotFound(id.to_owned()).into());
        }
        tx.execute(
            "UPDATE gateways SET revoked_us = $2 WHERE id = $1 AND revoked_us IS NULL",
            &[&id, &now_us()],
        )
        .await?;
        tx.execute(
            "DELETE FROM gateway_grace_tokens WHERE gateway_id = $1",
            &[&id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn db_rotate_gateway(
        &self,
        id: &str,
        new_token_sha256: &str,
        grace_until: Option<i64>,
        now: i64,
    ) -> Result<(), DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT token_sha256, revoked_us FROM gateways WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?;
        let old: String = match row.map(|r| (r.get::<_, String>(0), r.get::<_, Option<i64>>(1))) {
            None => return Err(StoreError::GatewayNotFound(id.to_owned()).into()),
            Some((_, Some(_))) => return Err(StoreError::GatewayRevoked(id.to_owned()).into()),
            Some((old, None)) => old,
        };
        tx.execute(
            "DELETE FROM gateway_grace_tokens WHERE gateway_id = $1",
            &[&id],
        )
        .await?;
        if let Some(until) = grace_until.filter(|&t| t > now) {
            tx.execute(
                "INSERT INTO gateway_grace_tokens (token_sha256, gateway_id, expires_us) VALUES ($1, $2, $3)",
                &[&old, &id, &until],
            ).await?;
        }
        tx.execute(
            "UPDATE gateways SET token_sha256 = $2 WHERE id = $1",
            &[&id, &new_token_sha256],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn db_authenticate_at(
        &self,
        token_sha256: &str,
        now: i64,
    ) -> Result<Option<String>, DbError> {
        let c = self.conn().await?;
        Ok(c.query_opt(
            "SELECT id FROM gateways WHERE token_sha256 = $1 AND revoked_us IS NULL
             UNION ALL
             SELECT g.id FROM gateway_grace_tokens t JOIN gateways g ON g.id = t.gateway_id
              WHERE t.token_sha256 = $1 AND t.expires_us > $2 AND g.revoked_us IS NULL
             LIMIT 1",
            &[&token_sha256, &now],
        )
        .await?
        .map(|r| r.get(0)))
    }

    async fn db_gateway_is_active(&self, id: &str) -> Result<bool, DbError> {
        let c = self.conn().await?;
        Ok(c.query_opt(
            "SELECT 1 FROM gateways WHERE id = $1 AND revoked_us IS NULL",
            &[&id],
        )
        .await?
        .is_some())
    }

    async fn db_observation(&self, id: &str) -> Result<Option<ObservationRow>, DbError> {
        let c = self.conn().await?;
        // Prepared once per connection: one round trip, no re-planning.
        let st = c
            .prepare_cached(&format!("{} LIMIT 1", ids::rows_of(OBS_COLUMNS)))
            .await?;
        let split = ObservationIds::split(id);
        Ok(
            c.query_opt(&st, &[&split.map(|s| s.0), &split.map(|s| s.1), &id])
                .await?
                .map(|r| obs_row(&r, 0)),
        )
    }

    async fn db_search(
        &self,
        s: &ObservationSearch,
    ) -> Result<(u64, Vec<ObservationRow>), DbError> {
        if s.codes.iter().any(Vec::is_empty) || s.categories.iter().any(Vec::is_empty) {
            return Ok((0, Vec::new()));
        }
        // The panel flag as the integer expression of the patient/code
        // index (migration 7), so a search by patient and code walks that
        // index in date order and stops at the page's end.
        let mut clauses: Vec<String> = vec!["(o.panel_id IS NOT NULL)::integer = 0".into()];
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        fn arg(
            args: &mut Vec<Box<dyn ToSql + Sync + Send>>,
            v: impl ToSql + Sync + Send + 'static,
        ) -> String {
            args.push(Box::new(v));
            format!("${}", args.len())
        }
        // The patient and code conditions over a table alias: the same
        // placeholders serve the rows (`o`) and the hours (`h`, below).
        let patient: Option<(String, bool)> = match s.patients.as_slice() {
            [] => None,
            // One patient (the common case) as an equality: the index then
            // yields its rows already in date order; `= ANY` would not.
            [one] => Some((arg(&mut args, one.clone()), false)),
            many => Some((arg(&mut args, many.to_vec()), true)),
        };
        let patient_sql = |a: &str, (p, many): &(String, bool)| match many {
            false => format!("{a}.patient_id = {p}"),
            true => format!("{a}.patient_id = ANY({p})"),
        };
        clauses.extend(patient.as_ref().map(|p| patient_sql("o", p)));
        let mut code_sets: Vec<Vec<(String, Option<String>)>> = Vec::new();
        for set in &s.codes {
            code_sets.push(
                set.iter()
                    .map(|c| {
                        let m = arg(&mut args, i64::from(c.mdc));
                        (m, c.loinc.map(|l| arg(&mut args, l.to_owned())))
                    })
                    .collect(),
            );
        }
        let code_sql = |a: &str, set: &[(String, Option<String>)]| {
            let alternatives: Vec<String> = set
                .iter()
                .map(|(m, l)| match l {
                    Some(l) => format!("({a}.mdc_code = {m} AND {a}.loinc = {l})"),
                    None => format!("{a}.mdc_code = {m}"),
                })
                .collect();
            format!("({})", alternatives.join(" OR "))
        };
        clauses.extend(code_sets.iter().map(|set| code_sql("o", set)));
        // The parameters the hours' rows need (the patient's and codes').
        let keyed = args.len();
        for set in &s.categories {
            let p = arg(&mut args, set.clone());
            clauses.push(format!("o.category = ANY({p})"));
        }
        if !s.devices.is_empty() {
            let p = arg(&mut args, s.devices.clone());
            clauses.push(format!(
                "(o.gateway_id, o.device_id) IN (SELECT gateway_id, device_id FROM devices WHERE fhir_id = ANY({p}))"
            ));
        }
        for d in &s.dates {
            let (lo, hi) = d.bounds();
            if let Some(lo) = lo {
                let p = arg(&mut args, lo);
                clauses.push(format!("o.effective_us >= {p}"));
            }
            if let Some(hi) = hi {
                let p = arg(&mut args, hi);
                clauses.push(format!("o.effective_us < {p}"));
            }
        }
        let where_sql = format!("WHERE {}", clauses.join(" AND "));
        // The total through the hours when the filters allow
        // (`crate::hours`). Its statement takes the parameters it names:
        // the patient's and codes', the whole filter's when it counts a
        // partial hour in the index, then the span's bounds. The page's
        // limit and offset follow the filter's.
        let filters = args.len();
        let after = |k: usize| format!("${}", filters + k);
        let lo = s.dates.iter().filter_map(|d| d.bounds().0).max();
        let hi = s.dates.iter().filter_map(|d| d.bounds().1).min();
        let mut count_bounds: Vec<i64> = Vec::new();
        let mut count_args = filters;
        let count_sql = match (hub_storage::hours::span(s, lo, hi), &patient) {
            (Some((_, span)), Some(patient)) => {
                if span.head_before.is_none() && span.tail_from.is_none() {
                    count_args = keyed;
                }
                let mut bound = |t: i64| {
                    count_bounds.push(t);
                    format!("${}", count_args + count_bounds.len())
                };
                let (first, end) = (bound(span.first), bound(span.end));
                let head = span.head_before.map(&mut bound);
                let tail = span.tail_from.map(&mut bound);
                hours::count_sql(
                    &patient_sql("h", patient),
                    &code_sql("h", &code_sets[0]),
                    &where_sql,
                    (&first, &end),
                    head.as_deref(),
                    tail.as_deref(),
                )
            }
            _ => format!("SELECT COUNT(*) FROM observations o {where_sql}"),
        };
        let c = self.conn().await?;
        // The statements of a search shape are prepared once per
        // connection (the text depends on the shape, not the values). The
        // shapes are many (codes and categories OR-ed, dates): a
        // connection's cache is emptied past a bound, so no sequence of
        // searches grows it (or the server's prepared statements) without
        // end.
        if c.statement_cache.size() > MAX_CACHED_STATEMENTS {
            c.statement_cache.clear();
        }
        let count_st = c.prepare_cached(&count_sql).await?;
        let mut count_refs: Vec<&(dyn ToSql + Sync)> =
            args[..count_args].iter().map(|a| a.as_ref() as _).collect();
        count_refs.extend(count_bounds.iter().map(|b| b as &(dyn ToSql + Sync)));
        if s.count == 0 {
            let total = in_search_snapshot(&c, c.query_one(&count_st, &count_refs)).await?;
            return Ok((total.get::<_, i64>(0) as u64, Vec::new()));
        }
        // Rows sharing a time in arrival order (`rid`, the index's last
        // column), as SQLite orders them by rowid.
        let order = match s.sort {
            SortOrder::DateAsc => "o.effective_us ASC, o.rid ASC",
            SortOrder::DateDesc => "o.effective_us DESC, o.rid DESC",
        };
        let (limit, offset) = (after(1), after(2));
        let page_bounds = [
            i64::from(s.count),
            i64::try_from(s.offset).unwrap_or(i64::MAX),
        ];
        let page_st = c
            .prepare_cached(&format!(
                "SELECT {OBS_COLUMNS} FROM {OBS_FROM} {where_sql} ORDER BY {order} LIMIT {limit} OFFSET {offset}"
            ))
            .await?;
        let mut refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as _).collect();
        refs.extend(page_bounds.iter().map(|b| b as &(dyn ToSql + Sync)));
        // The count and the page pipelined on the connection: one wait.
        let (total, rows) = in_search_snapshot(
            &c,
            futures_util::future::try_join(
                c.query_one(&count_st, &count_refs),
                c.query(&page_st, &refs),
            ),
        )
        .await?;
        let total: i64 = total.get(0);
        Ok((total as u64, rows.iter().map(|r| obs_row(r, 0)).collect()))
    }

    async fn db_patient(&self, value: &str) -> Result<Option<String>, DbError> {
        let c = self.conn().await?;
        if let Some(r) = c
            .query_opt(
                "SELECT patient_system FROM patient_stays WHERE patient_value = $1 LIMIT 1",
                &[&value],
            )
            .await?
        {
            return Ok(Some(r.get(0)));
        }
        Ok(c.query_opt(
            "SELECT COALESCE(patient_system, '') FROM observations WHERE patient_id = $1 LIMIT 1",
            &[&value],
        )
        .await?
        .map(|r| r.get(0)))
    }

    /// Like SQLite's, paging by `rid` (a sequence) instead of `rowid`.
    async fn db_export_observations(
        &self,
        after_rowid: i64,
        limit: usize,
        since_us: Option<i64>,
        patient_level: bool,
        ward: Option<&str>,
    ) -> Result<Vec<(i64, ObservationRow)>, DbError> {
        let mut sql = format!(
            "SELECT o.rid, {OBS_COLUMNS} FROM {OBS_FROM} WHERE o.rid > $1 AND o.panel_id IS NULL"
        );
        let mut args: Vec<Box<dyn ToSql + Sync>> = vec![Box::new(after_rowid)];
        if let Some(s) = since_us {
            args.push(Box::new(s));
            sql.push_str(&format!(" AND o.received_us >= ${}", args.len()));
        }
        if patient_level {
            sql.push_str(" AND o.patient_id IS NOT NULL");
        }
        if let Some(w) = ward {
            args.push(Box::new(w.to_owned()));
            sql.push_str(&format!(
                " AND o.patient_id IN (SELECT s.patient_value FROM patient_stays s
                   JOIN beds b ON b.id = s.bed_id WHERE b.ward = ${})",
                args.len()
            ));
        }
        args.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
        sql.push_str(&format!(" ORDER BY o.rid LIMIT ${}", args.len()));
        let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as _).collect();
        let c = self.conn().await?;
        Ok(c.query(&sql, &refs)
            .await?
            .iter()
            .map(|r| (r.get(0), obs_row(r, 1)))
            .collect())
    }

    async fn db_export_patients(
        &self,
        ward: Option<&str>,
    ) -> Result<Vec<(String, String)>, DbError> {
        let c = self.conn().await?;
        let rows = match ward {
            Some(w) => {
                c.query(
                    "SELECT s.patient_value, MAX(s.patient_system) FROM patient_stays s
                   JOIN beds b ON b.id = s.bed_id WHERE b.ward = $1
                  GROUP BY s.patient_value ORDER BY s.patient_value",
                    &[&w],
                )
                .await?
            }
            None => {
                c.query(
                    "SELECT v, MAX(sys) FROM (
                     SELECT patient_value AS v, patient_system AS sys FROM patient_stays
                     UNION ALL
                     SELECT patient_id, COALESCE(patient_system, '') FROM observations
                      WHERE patient_id IS NOT NULL) p
                 GROUP BY v ORDER BY v",
                    &[],
                )
                .await?
            }
        };
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn db_device(&self, fhir_id: &str) -> Result<Option<DeviceRow>, DbError> {
        let c = self.conn().await?;
        Ok(c.query_opt(
            &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE fhir_id = $1"),
            &[&fhir_id],
        )
        .await?
        .map(|r| device_row(&r)))
    }

    async fn db_devices(&self, count: u32, offset: u64) -> Result<(u64, Vec<DeviceRow>), DbError> {
        let c = self.conn().await?;
        let total: i64 = c
            .query_one("SELECT COUNT(*) FROM devices", &[])
            .await?
            .get(0);
        let rows = c.query(
            &format!(
                "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY gateway_id, device_id LIMIT $1 OFFSET $2"
            ),
            &[
                &i64::from(count),
                &i64::try_from(offset).unwrap_or(i64::MAX),
            ],
        ).await?;
        Ok((total as u64, rows.iter().map(device_row).collect()))
    }
}

/// Create gateway `id` or re-activate it when revoked (as SQLite's).
async fn put_gateway(
    tx: &Transaction<'_>,
    id: &str,
    token_sha256: &str,
    now: i64,
) -> Result<(), DbError> {
    let existing = tx
        .query_opt(
            "SELECT revoked_us FROM gateways WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
    match existing.map(|r| r.get::<_, Option<i64>>(0)) {
        Some(None) => Err(StoreError::GatewayExists(id.to_owned()).into()),
        Some(Some(_)) => {
            tx.execute(
                "DELETE FROM gateway_grace_tokens WHERE gateway_id = $1",
                &[&id],
            )
            .await?;
            tx.execute(
                "UPDATE gateways SET token_sha256 = $2, created_us = $3, revoked_us = NULL WHERE id = $1",
                &[&id, &token_sha256, &now],
            ).await?;
            Ok(())
        }
        None => {
            // ON CONFLICT: a concurrent add of the same id is refused, not an error.
            let n = tx
                .execute(
                    "INSERT INTO gateways (id, token_sha256, created_us) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO NOTHING",
                    &[&id, &token_sha256, &now],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::GatewayExists(id.to_owned()).into());
            }
            Ok(())
        }
    }
}

const OBS_COLUMNS: &str = "o.id, o.kind, o.gateway_id, o.device_id, o.patient_id, o.received_us, \
     o.payload, o.resource, COALESCE(d.manufacturer, ''), COALESCE(d.model, ''), \
     COALESCE(d.serial_number, ''), o.patient_system, o.version, COALESCE(o.updated_us, o.received_us)";
/// Prepared statements a pooled connection keeps before its cache is
/// emptied (the fixed statements are a few dozen; search shapes add one
/// or two each).
const MAX_CACHED_STATEMENTS: usize = 256;

/// A search's count and page run on their statement's generic plan. In
/// the default mode the server plans a prepared statement afresh for its
/// values ("custom" plans) for as long as their estimated cost stays below
/// the generic plan's, and a search's did, request after request: the
/// planner's functions filled the server's profile under the FHIR load
/// bench, and forcing the generic plan served 30 % more searches (2 189 ->
/// 2 852 and 2 964 requests/s, 1 M observations, 32 connections). The plan
/// of a search shape does not depend on its values: the filters present
/// pick the index (patient and code, else code, else time), and the month
/// partitions outside a date range are pruned when the plan starts. The
/// mode is set for a search's statements only (every other statement
/// keeps the default): they run in a read-only transaction that sets it
/// `LOCAL`ly, its start and end sent in the same pipeline
/// ([`in_search_snapshot`]): no extra wait. The transaction is `REPEATABLE
/// READ`, so the count and the page read one snapshot (the total agrees
/// with the page although ingest commits in between), as on SQLite.
const SEARCH_BEGIN: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; \
     SET LOCAL plan_cache_mode = force_generic_plan";
/// Ends [`SEARCH_BEGIN`]'s transaction, and with it the plan cache mode
/// (a transaction in which a statement failed is rolled back by it).
const SEARCH_END: &str = "COMMIT";

/// Runs `work` (statements of one connection `c`) on generic plans, in one
/// snapshot: see [`SEARCH_BEGIN`]. The transaction's start, `work`'s
/// statements and its end go out in this order in one pipeline: each is
/// sent when first polled, and `join!` polls all three at its first poll
/// (`work`'s statements are prepared before, so it sends them at once
/// too). So the end is sent even when the caller drops the read after
/// that poll (an awaited read whose request went away, [`PgStore::future`]).
async fn in_search_snapshot<T>(
    c: &Conn,
    work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, DbError> {
    let (begin, out, end) = futures_util::join!(
        c.batch_execute(SEARCH_BEGIN),
        work,
        c.batch_execute(SEARCH_END)
    );
    begin?;
    end?;
    Ok(out?)
}

const OBS_FROM: &str = "observations o LEFT JOIN devices d \
     ON d.gateway_id = o.gateway_id AND d.device_id = o.device_id";

fn obs_row(r: &Row, at: usize) -> ObservationRow {
    ObservationRow {
        id: r.get(at),
        kind: r.get(at + 1),
        gateway_id: r.get(at + 2),
        device_id: r.get(at + 3),
        patient_id: r.get(at + 4),
        received_us: r.get(at + 5),
        payload: r.get(at + 6),
        resource: r.get(at + 7),
        manufacturer: r.get(at + 8),
        model: r.get(at + 9),
        serial_number: r.get(at + 10),
        patient_system: r.get(at + 11),
        version: i64::from(r.get::<_, i32>(at + 12)),
        updated_us: r.get(at + 13),
    }
}

const DEVICE_COLUMNS: &str = "gateway_id, device_id, protocol, manufacturer, model, serial_number, \
     first_seen_us, last_seen_us";

fn device_row(r: &Row) -> DeviceRow {
    DeviceRow {
        gateway_id: r.get(0),
        device_id: r.get(1),
        protocol: r.get(2),
        manufacturer: r.get(3),
        model: r.get(4),
        serial_number: r.get(5),
        first_seen_us: r.get(6),
        last_seen_us: r.get(7),
    }
}

impl GatewayStore for PgStore {
    fn add_enrollment(&self, token_sha256: &str, expires_us: i64) -> Result<(), StoreError> {
        self.run(self.db_add_enrollment(token_sha256, expires_us))
    }
    fn enroll(
        &self,
        enrollment_sha256: &str,
        id: &str,
        gateway_token_sha256: &str,
        now_us: i64,
    ) -> Result<(), StoreError> {
        self.run(self.db_enroll(enrollment_sha256, id, gateway_token_sha256, now_us))
    }
    fn add_gateway(&self, id: &str, token_sha256: &str) -> Result<(), StoreError> {
        self.run(self.db_add_gateway(id, token_sha256))
    }
    fn list_gateways(&self) -> Result<Vec<GatewayRow>, StoreError> {
        self.run(self.db_list_gateways())
    }
    fn revoke_gateway(&self, id: &str) -> Result<(), StoreError> {
        self.run(self.db_revoke_gateway(id))
    }
    fn rotate_gateway(
        &self,
        id: &str,
        new_token_sha256: &str,
        grace_until: Option<i64>,
        now_us: i64,
    ) -> Result<(), StoreError> {
        self.run(self.db_rotate_gateway(id, new_token_sha256, grace_until, now_us))
    }
    fn authenticate_at(
        &self,
        token_sha256: &str,
        now_us: i64,
    ) -> Result<Option<String>, StoreError> {
        self.run(self.db_authenticate_at(token_sha256, now_us))
    }
    fn gateway_is_active(&self, id: &str) -> Result<bool, StoreError> {
        self.run(self.db_gateway_is_active(id))
    }
}

impl IngestStore for PgStore {
    fn ingest(
        &self,
        gateway_id: &str,
        batch: &Batch,
        associations: &Associations,
        received_us: i64,
        now_us: i64,
    ) -> Result<IngestReport, StoreError> {
        self.run(self.db_ingest(gateway_id, batch, associations, received_us, now_us, None))
    }
}

impl ObservationStore for PgStore {
    fn observation(&self, id: &str) -> Result<Option<ObservationRow>, StoreError> {
        self.run(self.db_observation(id))
    }
    fn search(&self, s: &ObservationSearch) -> Result<(u64, Vec<ObservationRow>), StoreError> {
        self.run(self.db_search(s))
    }
    fn observation_future<'a>(
        &'a self,
        id: &'a str,
    ) -> Option<hub_storage::ReadFuture<'a, Option<ObservationRow>>> {
        let id = id.to_owned();
        Some(self.future(|me| async move { me.db_observation(&id).await }))
    }
    fn search_future<'a>(
        &'a self,
        s: &'a ObservationSearch,
    ) -> Option<hub_storage::ReadFuture<'a, (u64, Vec<ObservationRow>)>> {
        let s = s.clone();
        Some(self.future(|me| async move { me.db_search(&s).await }))
    }
    fn patient(&self, value: &str) -> Result<Option<String>, StoreError> {
        self.run(self.db_patient(value))
    }
    fn export_observations(
        &self,
        after_rowid: i64,
        limit: usize,
        since_us: Option<i64>,
        patient_level: bool,
        ward: Option<&str>,
    ) -> Result<Vec<(i64, ObservationRow)>, StoreError> {
        self.run(self.db_export_observations(after_rowid, limit, since_us, patient_level, ward))
    }
    fn export_patients(&self, ward: Option<&str>) -> Result<Vec<(String, String)>, StoreError> {
        self.run(self.db_export_patients(ward))
    }
    fn device(&self, fhir_id: &str) -> Result<Option<DeviceRow>, StoreError> {
        self.run(self.db_device(fhir_id))
    }
    fn devices(&self, count: u32, offset: u64) -> Result<(u64, Vec<DeviceRow>), StoreError> {
        self.run(self.db_devices(count, offset))
    }
}

impl Storage for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }
    fn ping(&self) -> Result<(), StoreError> {
        self.run(self.db_ping())
    }
}
