//! The hub's storage, composed: the backend `[storage] backend` picks
//! (`vigil-hub-sqlite` or `vigil-hub-postgres`) behind the traits of
//! `vigil-hub-storage`. [`Store`] derefs to `dyn Storage`, so a call site
//! names the trait of its concern (see [`prelude`]) and never a backend.
//!
//! Transitional: [`Store::lock`] and [`Store::postgres`] still hand the
//! backend's connection to the hub modules whose SQL has not moved into the
//! storage crates yet; [`StoreError`] still has the drivers' variants for them.

use std::ops::Deref;
use std::path::Path;
use std::sync::{Arc, MutexGuard};

pub use hub_domain::clock::now_us;
pub use hub_postgres::PgStore;
pub use hub_sqlite::{SqliteStore, schema_version};
pub use hub_storage::{Associations, GatewayRow, IngestReport, NewIncarnation, Purged};

/// The storage traits, for `use crate::store::prelude::*`.
pub mod prelude {
    pub use hub_storage::{GatewayStore, IngestStore, ObservationStore, RetentionStore, Storage};
}

/// Errors of the store as the hub's modules see them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Storage(#[from] hub_storage::StoreError),
    /// Transitional (modules with their own SQLite SQL).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Transitional (modules with their own PostgreSQL SQL).
    #[error("PostgreSQL error: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("the database lock was poisoned by a panic")]
    Poisoned,
    #[error("this operation needs the SQLite backend")]
    NotSqlite,
    #[error("{0}")]
    Io(std::io::Error),
}

impl From<hub_postgres::DbError> for StoreError {
    fn from(e: hub_postgres::DbError) -> Self {
        match e {
            hub_postgres::DbError::Postgres(p) => StoreError::Postgres(p),
            other => StoreError::Storage(other.into()),
        }
    }
}

impl StoreError {
    /// Whether retrying later may succeed (HTTP 503 with `Retry-After`).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Storage(e) => e.is_transient(),
            StoreError::Postgres(e) => match e.as_db_error() {
                None => true,
                Some(db) => {
                    let code = db.code().code();
                    code.starts_with("08") || code.starts_with("57")
                }
            },
            _ => false,
        }
    }

    /// The neutral storage error, when that is what this is.
    pub fn storage(&self) -> Option<&hub_storage::StoreError> {
        match self {
            StoreError::Storage(e) => Some(e),
            _ => None,
        }
    }
}

/// The database, shared by the server's tasks: SQLite ([`Store::open`])
/// or PostgreSQL ([`Store::open_postgres`]). Both backends pass one
/// conformance suite (`tests/storage_suite.rs`).
#[derive(Debug, Clone)]
pub struct Store {
    storage: Arc<dyn hub_storage::Storage>,
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl Deref for Store {
    type Target = dyn hub_storage::Storage;

    fn deref(&self) -> &Self::Target {
        &*self.storage
    }
}

impl Store {
    /// Opens (creating if needed) the SQLite database and its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let s = SqliteStore::open(path)?;
        Ok(Self {
            storage: Arc::new(s.clone()),
            backend: Backend::Sqlite(s),
        })
    }

    /// Connects to PostgreSQL and applies its pending migrations.
    pub fn open_postgres(cfg: &hub_postgres::PgConfig) -> Result<Self, StoreError> {
        let p = PgStore::open(cfg)?;
        Ok(Self {
            storage: Arc::new(p.clone()),
            backend: Backend::Postgres(p),
        })
    }

    /// Opens the backend `[storage]` selects.
    pub fn open_config(storage: &crate::config::StorageConfig) -> Result<Self, StoreError> {
        match (&storage.backend, &storage.postgres) {
            (crate::config::StorageBackend::Postgres, Some(pg)) => Self::open_postgres(pg),
            (crate::config::StorageBackend::Postgres, None) => {
                Err(StoreError::Storage(hub_storage::StoreError::Config(
                    "storage.backend = \"postgres\" needs a [storage.postgres] section".into(),
                )))
            }
            (crate::config::StorageBackend::Sqlite, _) => Self::open(&storage.sqlite_path),
        }
    }

    /// The whole storage as a trait object (for sub-states that keep it).
    pub fn storage(&self) -> Arc<dyn hub_storage::Storage> {
        self.storage.clone()
    }

    /// WAL fsyncs made by ingest so far (group commit; SQLite only, else 0).
    pub fn wal_fsyncs(&self) -> u64 {
        match &self.backend {
            Backend::Sqlite(s) => s.wal_fsyncs(),
            Backend::Postgres(_) => 0,
        }
    }

    /// The active gateway a token (its SHA-256) belongs to now.
    pub fn authenticate(&self, token_sha256: &str) -> Result<Option<String>, StoreError> {
        Ok(self.storage.authenticate_at(token_sha256, now_us())?)
    }

    /// Transitional: the PostgreSQL store, when that is the backend.
    pub fn postgres(&self) -> Option<&PgStore> {
        match &self.backend {
            Backend::Postgres(p) => Some(p),
            Backend::Sqlite(_) => None,
        }
    }

    /// Transitional: the SQLite connection (`StoreError::NotSqlite` on
    /// PostgreSQL).
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, rusqlite::Connection>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => Ok(s.lock()?),
            Backend::Postgres(_) => Err(StoreError::NotSqlite),
        }
    }
}
