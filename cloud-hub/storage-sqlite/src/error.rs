//! The SQLite backend's own error, so that `?` works on rusqlite's errors
//! inside the crate; converted to the backend-neutral
//! [`hub_storage::StoreError`] at every trait method.

use hub_storage::StoreError;

/// Errors inside the SQLite backend.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored ack of a batch does not decode: {0}")]
    CorruptAck(#[from] prost::DecodeError),
    #[error("the database lock was poisoned by a panic")]
    Poisoned,
    #[error("making the database durable (fsync): {0}")]
    Io(std::io::Error),
    #[error("creating or securing {path}: {source}", path = .0.display(), source = .1)]
    File(std::path::PathBuf, std::io::Error),
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Sqlite(e) => sqlite_error(e),
            DbError::Store(e) => e,
            DbError::CorruptAck(e) => StoreError::Corrupt(e.to_string()),
            DbError::Poisoned => StoreError::Poisoned,
            DbError::Io(e) => StoreError::Io(e),
            DbError::File(p, e) => StoreError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", p.display()),
            )),
        }
    }
}

/// A busy or locked database (another hub instance holds the write lock past
/// the busy timeout) may succeed later; anything else is a database error.
pub fn sqlite_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Database(e.to_string()),
    }
}

impl From<hub_domain::ingest::BatchRefused> for DbError {
    fn from(e: hub_domain::ingest::BatchRefused) -> Self {
        DbError::Store(StoreError::BatchRefused(e))
    }
}
