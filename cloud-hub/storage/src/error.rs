//! The storage error every backend returns: backend-neutral, so the layers
//! above never see a driver's types.

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a statement (the driver's message).
    #[error("database error: {0}")]
    Database(String),
    /// The database cannot be reached right now, or every connection is in
    /// use: the request may succeed later (HTTP 503 with `Retry-After`).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("gateway `{0}` already exists and is active")]
    GatewayExists(String),
    #[error("gateway `{0}` not found")]
    GatewayNotFound(String),
    #[error("gateway `{0}` is revoked (re-add it with `gateway add` instead of rotating)")]
    GatewayRevoked(String),
    #[error("enrolment token unknown, already used or expired")]
    EnrollmentRefused,
    #[error("stored data does not decode: {0}")]
    Corrupt(String),
    #[error("the database lock was poisoned by a panic")]
    Poisoned,
    #[error("making the database durable (fsync): {0}")]
    Io(std::io::Error),
    /// The backend's configuration is unusable (the message names the field).
    #[error("{0}")]
    Config(String),
    /// A batch whose identity cannot be stored (a sequence or incarnation
    /// above 2^63-1): refused as a whole, nothing stored (HTTP 400).
    #[error(transparent)]
    BatchRefused(#[from] hub_domain::ingest::BatchRefused),
    /// An audit entry that the chain refuses (an unkeyed entry after keyed
    /// ones).
    #[error(transparent)]
    Audit(#[from] hub_domain::audit::ChainError),
}

impl StoreError {
    /// Whether retrying later may succeed (the transport layer answers 503).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}
