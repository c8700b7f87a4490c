//! Patients' rights in storage: the subject salt, erasure tombstones,
//! legal holds (`hub_domain::privacy`).

pub use hub_domain::privacy::{DeviceWindow, SubjectKey, Tombstone};

use crate::StoreError;

/// The privacy tables' persistence.
pub trait PrivacyStore {
    /// The database's subject salt (32 random bytes, created once, never
    /// changed: every subject key depends on it).
    fn subject_salt(&self) -> Result<[u8; hub_domain::privacy::KEY_LEN], StoreError>;
    /// Tombstones with `id > after_id`, by id (`0`: all of them).
    fn tombstones_since(&self, after_id: i64) -> Result<Vec<Tombstone>, StoreError>;
}
