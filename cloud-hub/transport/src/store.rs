//! The storage as the transport layer sees it: [`Store`], a cheap handle
//! that derefs to `dyn Storage` (the traits of `vigil-hub-storage`), so a
//! call site names the trait of its concern (see [`prelude`]) and never a
//! backend. Which backend is behind it is the composition root's choice
//! (`cloud-hub`'s `store.rs` opens it).

use std::ops::Deref;
use std::sync::Arc;

pub use hub_domain::clock::now_us;
pub use hub_storage::{
    Associations, GatewayRow, IngestReport, NewIncarnation, Purged, ReadFuture, SeriesQuery,
    StreamPosition,
};

/// The storage traits, for `use crate::store::prelude::*`.
pub mod prelude {
    pub use hub_storage::{
        GatewayStore, IngestStore, ObservationStore, RetentionStore, Storage, StreamStore,
    };
}

/// Errors of the store: the backend-neutral storage error.
pub use hub_storage::StoreError;

/// The database, shared by the server's tasks: whichever backend the
/// composition root opened, behind the storage traits.
#[derive(Debug, Clone)]
pub struct Store {
    storage: Arc<dyn hub_storage::Storage>,
}

impl Deref for Store {
    type Target = dyn hub_storage::Storage;

    fn deref(&self) -> &Self::Target {
        &*self.storage
    }
}

impl From<Arc<dyn hub_storage::Storage>> for Store {
    fn from(storage: Arc<dyn hub_storage::Storage>) -> Self {
        Self::new(storage)
    }
}

impl Store {
    /// A handle on an opened backend.
    pub fn new(storage: Arc<dyn hub_storage::Storage>) -> Self {
        Self { storage }
    }

    /// The whole storage as a trait object (for sub-states that keep it).
    pub fn storage(&self) -> Arc<dyn hub_storage::Storage> {
        self.storage.clone()
    }

    /// The active gateway a token (its SHA-256) belongs to now.
    pub fn authenticate(&self, token_sha256: &str) -> Result<Option<String>, StoreError> {
        self.storage.authenticate_at(token_sha256, now_us())
    }
}
