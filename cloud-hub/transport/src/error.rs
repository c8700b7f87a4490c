//! The transport layer's error: what its own work can fail with (storage
//! calls run off the async threads, serving, TLS setup). The composition
//! root's `HubError` takes it in unchanged (`cloud_hub::HubError`).

use crate::store::StoreError;

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}
