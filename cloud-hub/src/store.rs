//! The hub's storage, opened: the backend `[storage] backend` picks
//! (`vigil-hub-sqlite` or `vigil-hub-postgres`) behind the traits of
//! `vigil-hub-storage`. [`Store`] derefs to the transport layer's
//! backend-neutral handle ([`hub_transport::Store`], which derefs to
//! `dyn Storage`), so a call site names the trait of its concern (see
//! [`prelude`]) and never a backend; only this composition root knows which
//! backend it opened (its WAL counters, its migration listings).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

pub use hub_postgres::PgStore;
pub use hub_sqlite::{SqliteStore, audit_path, schema_version};
pub use hub_transport::store::{
    Associations, GatewayRow, IngestReport, NewIncarnation, Purged, StoreError, now_us, prelude,
};

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// SQLite database file; relative paths are relative to the config
    /// file's directory. With the PostgreSQL backend the file is not
    /// opened, but bulk-export files still go to a directory beside it.
    pub sqlite_path: PathBuf,
    /// `sqlite` (default) or `postgres`.
    #[serde(default)]
    pub backend: StorageBackend,
    /// `[storage.postgres]`, required with `backend = "postgres"`.
    #[serde(default)]
    pub postgres: Option<hub_postgres::PgConfig>,
    /// Keep observations, device events and rejected readings this many
    /// days (by their own time); unset = keep everything.
    #[serde(default)]
    pub retention_days: Option<u32>,
}

/// `storage.backend`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    #[default]
    Sqlite,
    Postgres,
}

/// The opened database: SQLite ([`Store::open`]) or PostgreSQL
/// ([`Store::open_postgres`]). Both backends pass one conformance suite
/// (`tests/storage_suite.rs`). The transport layer gets [`Store::handle`].
#[derive(Debug, Clone)]
pub struct Store {
    handle: hub_transport::Store,
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl Deref for Store {
    type Target = hub_transport::Store;

    fn deref(&self) -> &Self::Target {
        &self.handle
    }
}

impl From<Store> for hub_transport::Store {
    fn from(store: Store) -> Self {
        store.handle
    }
}

impl Store {
    /// Opens (creating if needed) the SQLite database and its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let s = SqliteStore::open(path)?;
        Ok(Self {
            handle: hub_transport::Store::new(Arc::new(s.clone())),
            backend: Backend::Sqlite(s),
        })
    }

    /// Connects to PostgreSQL and applies its pending migrations.
    pub fn open_postgres(cfg: &hub_postgres::PgConfig) -> Result<Self, StoreError> {
        let p = PgStore::open(cfg)?;
        Ok(Self {
            handle: hub_transport::Store::new(Arc::new(p.clone())),
            backend: Backend::Postgres(p),
        })
    }

    /// Opens the backend `[storage]` selects.
    pub fn open_config(storage: &StorageConfig) -> Result<Self, StoreError> {
        match (&storage.backend, &storage.postgres) {
            (StorageBackend::Postgres, Some(pg)) => Self::open_postgres(pg),
            (StorageBackend::Postgres, None) => Err(StoreError::Config(
                "storage.backend = \"postgres\" needs a [storage.postgres] section".into(),
            )),
            (StorageBackend::Sqlite, _) => Self::open(&storage.sqlite_path),
        }
    }

    /// The backend-neutral handle the transport layer works with.
    pub fn handle(&self) -> hub_transport::Store {
        self.handle.clone()
    }

    /// WAL fsyncs made by ingest so far (group commit; SQLite only, else 0).
    pub fn wal_fsyncs(&self) -> u64 {
        match &self.backend {
            Backend::Sqlite(s) => s.wal_fsyncs(),
            Backend::Postgres(_) => 0,
        }
    }

    /// The PostgreSQL store, when that is the backend (its migration and
    /// partition listings, for operators and tests).
    pub fn postgres(&self) -> Option<&PgStore> {
        match &self.backend {
            Backend::Postgres(p) => Some(p),
            Backend::Sqlite(_) => None,
        }
    }
}
