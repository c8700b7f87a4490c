//! The PostgreSQL backend's own error, so that `?` works on the driver's
//! errors inside the crate; converted to the backend-neutral
//! [`hub_storage::StoreError`] at every trait method.

use hub_storage::StoreError;

/// Errors inside the PostgreSQL backend.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("PostgreSQL error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Connection pool: the server cannot be reached, the configuration is
    /// unusable, or every connection stayed busy.
    #[error("PostgreSQL connection pool: {0}")]
    Pool(String),
    #[error("stored ack of a batch does not decode: {0}")]
    CorruptAck(#[from] prost::DecodeError),
    /// The pool could not open a connection in time, or was closed.
    #[error("PostgreSQL connection pool: {0}")]
    Unavailable(String),
    #[error("the pool lock was poisoned by a panic")]
    Poisoned,
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Postgres(e) => postgres_error(e),
            DbError::Store(e) => e,
            // Every pooled connection busy for the pool's wait: overload.
            DbError::Pool(m) if m.starts_with("no free connection") => StoreError::Unavailable(m),
            DbError::Pool(m) => StoreError::Config(m),
            DbError::Unavailable(m) => StoreError::Unavailable(m),
            DbError::CorruptAck(e) => StoreError::Corrupt(e.to_string()),
            DbError::Poisoned => StoreError::Poisoned,
        }
    }
}

/// A connection failure, or the server shutting down / in recovery
/// (SQLSTATE classes 08 and 57), may succeed later; anything else is a
/// database error.
pub fn postgres_error(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        return StoreError::Unavailable(e.to_string());
    };
    // The server's message, the constraint and the SQLSTATE (the driver's
    // `Display` says only "db error"). Never DETAIL or the full `Display`:
    // a constraint violation's detail holds the row's values (patient
    // identifiers), and this message is logged.
    let code = db.code().code();
    let message = match db.constraint() {
        Some(c) => format!(
            "{}: {} (constraint {c}, SQLSTATE {code})",
            db.severity(),
            db.message()
        ),
        None => format!("{}: {} (SQLSTATE {code})", db.severity(), db.message()),
    };
    if code.starts_with("08") || code.starts_with("57") {
        StoreError::Unavailable(message)
    } else {
        StoreError::Database(message)
    }
}

impl From<hub_domain::ingest::BatchRefused> for DbError {
    fn from(e: hub_domain::ingest::BatchRefused) -> Self {
        DbError::Store(StoreError::BatchRefused(e))
    }
}
