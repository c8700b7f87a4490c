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

/// Whether an error of SQLSTATE `code` may succeed when tried again: a
/// connection failure (class 08), the server shutting down or in recovery
/// (57), or a transaction the server rolled back to resolve a conflict
/// (40: a deadlock, e.g. two replicas' ingests and a panel update locking
/// the same search-total hours in different orders, or a serialization
/// failure).
fn is_transient(code: &str) -> bool {
    ["08", "57", "40"]
        .iter()
        .any(|class| code.starts_with(class))
}

/// A transient error ([`is_transient`]) is `Unavailable` (the API answers
/// 503 and the sender tries again); anything else is a database error.
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
    if is_transient(code) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_and_outages_are_transient_faults_are_not() {
        // Deadlock, serialization failure, connection failure, admin
        // shutdown, cannot connect now.
        for code in ["40P01", "40001", "08006", "57P01", "57P03"] {
            assert!(is_transient(code), "{code}");
        }
        // Unique violation, undefined column (a fenced-off hub), syntax.
        for code in ["23505", "42703", "42601"] {
            assert!(!is_transient(code), "{code}");
        }
    }
}
