//! Patient association: beds, device placements and patient stays, and the
//! re-attribution of stored readings when they change. The decisions are
//! `hub_domain::association`'s pure functions; a backend loads the
//! intervals they need inside one transaction holding its association lock,
//! applies the returned plan and re-attributes the affected readings.

use hub_domain::association::{Bed, BedOccupancy, Change, Conflict, Invalid, PatientId};

use crate::{Associations, StoreError};

/// Errors of association changes. Each maps to one HTTP status and one
/// HL7 ACK code.
#[derive(Debug, thiserror::Error)]
pub enum AssocError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A field is invalid; `field` names it.
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("bed `{0}` not found")]
    BedNotFound(String),
    #[error("bed `{0}` already exists")]
    BedExists(String),
    #[error("bed `{0}` is occupied by another patient at or after that time")]
    BedOccupied(String),
    #[error("the patient already has a stay at or after that time (use transfer)")]
    AlreadyAdmitted,
    #[error("the patient has no stay at that time")]
    NotAdmitted,
    #[error("the device is not placed at a bed at that time")]
    NotPlaced,
}

impl From<Invalid> for AssocError {
    fn from(e: Invalid) -> Self {
        AssocError::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

impl From<Conflict> for AssocError {
    fn from(e: Conflict) -> Self {
        match e {
            Conflict::BedOccupied(bed) => AssocError::BedOccupied(bed),
            Conflict::AlreadyAdmitted => AssocError::AlreadyAdmitted,
            Conflict::NotAdmitted => AssocError::NotAdmitted,
            Conflict::NotPlaced => AssocError::NotPlaced,
        }
    }
}

/// Beds, placements, stays. Callers validate the input (ids, identifiers);
/// every change runs in one transaction and re-attributes the readings
/// whose patient it changes (`fallback`: the static `[[associations]]`
/// map). Instants are UTC µs; intervals are half-open.
pub trait AssociationStore {
    /// Creates a bed (`BedExists` when the id is taken).
    fn create_bed(&self, bed: &Bed) -> Result<(), AssocError>;
    /// All beds, by ward and id.
    fn list_beds(&self) -> Result<Vec<Bed>, AssocError>;
    /// Places device `(g, d)` at `bed` from `at` (see
    /// `hub_domain::association::place`).
    fn place_device(
        &self,
        g: &str,
        d: &str,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError>;
    /// Ends device `(g, d)`'s placement covering `at` there.
    fn remove_device(
        &self,
        g: &str,
        d: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError>;
    /// Admits a patient to `bed` from `at` (an open stay).
    fn admit(
        &self,
        patient: &PatientId,
        bed: &str,
        at: i64,
        visit: Option<&str>,
        fallback: &Associations,
    ) -> Result<Change, AssocError>;
    /// Transfers a patient to `bed` at `at`.
    fn transfer(
        &self,
        patient: &PatientId,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError>;
    /// Discharges a patient at `at` (with the admission's later transfers).
    fn discharge(
        &self,
        patient: &PatientId,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError>;
    /// The patient of `visit`'s stay covering `at`, if any.
    fn stay_of_visit(&self, visit: &str, at: i64) -> Result<Option<PatientId>, AssocError>;
    /// The bed of the patient's stay covering `at`.
    fn bed_of(&self, patient: &PatientId, at: i64) -> Result<Option<String>, AssocError>;
    /// Replaces `old` by `new` on every stay of `visit` (`old != new`).
    fn change_identifier(
        &self,
        old: &PatientId,
        new: &PatientId,
        visit: &str,
        fallback: &Associations,
    ) -> Result<Change, AssocError>;
    /// Every bed with its patient and devices at `at`.
    fn occupancy(&self, at: i64) -> Result<Vec<BedOccupancy>, AssocError>;
    /// How many stored readings have no patient.
    fn unattributed_count(&self) -> Result<u64, AssocError>;
}
