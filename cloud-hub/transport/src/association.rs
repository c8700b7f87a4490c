//! Patient association: which patient a device's readings belong to, over
//! time.
//!
//! # Model (schema v5)
//! - **Beds** (`beds`): a location a patient occupies: `id`, `ward`, `label`.
//! - **Device placements** (`device_placements`): device `(gateway_id,
//!   device_id)` is at bed `bed_id` during `[from_us, to_us)`; `to_us` NULL
//!   means "still there".
//! - **Patient stays** (`patient_stays`): the patient with identifier
//!   `(patient_system, patient_value)` occupies bed `bed_id` during
//!   `[from_us, to_us)`. Admission opens a stay, a transfer closes it and
//!   opens the next one at the same instant, a discharge closes it.
//!   Patients are identifiers only: the hub never stores names (PHI
//!   minimisation); `visit` is the optional encounter number (HL7 PV1-19)
//!   used to follow an identifier change of the same visit.
//!
//! Every interval is **half-open**, `[from, to)`: a reading taken exactly
//! at a transfer's instant belongs to the new bed, one taken exactly at a
//! discharge belongs to nobody. The store keeps these invariants: a
//! device is at one bed at a time, a bed holds one patient at a time and a
//! patient is in one bed at a time; adjacent intervals of the same device
//! (or patient) at the same bed are merged.
//!
//! # Attribution of a reading (`observations.patient_id`, `patient_system`,
//! `attribution`)
//! In order of precedence:
//! 1. `subject`: the reading carries its own patient identifier
//!    (`Reading.subject`, e.g. HL7 ORU PID-3 at the edge). The source knew
//!    the patient; it wins and is never re-attributed.
//! 2. `stay`: the device was placed at a bed at the reading's effective
//!    time and a patient's stay covered that bed at that time.
//! 3. `config`: the static `[[associations]]` map of the hub config
//!    (gateway, device) → patient, kept as a fallback for setups without
//!    bed management (it has no time; a placement + stay covering a reading
//!    takes precedence over it, also later).
//! 4. `unattributed`: none of these; stored with no patient, never guessed.
//!
//! Rows written before v5 are marked `legacy` (when they have a patient) or
//! `unattributed` and only the latter are ever re-attributed.
//!
//! **Held readings**: whenever a placement or stay is created, moved or
//! closed, the readings whose attribution can change — those of the
//! affected devices in the affected time span, and only rows attributed by
//! `stay`, `config` or not at all — are recomputed in the same transaction
//! with one bounded `UPDATE` per constant piece of the timeline. So a
//! reading that arrived before its placement or admission gets its patient
//! when that arrives, and a back-dated transfer or discharge moves readings
//! consistently.
//!
//! `patient_id` holds the identifier's value (what FHIR `subject` and the
//! `patient=` search use); `patient_system` its system when known.
//!
//! # Where it lives
//! The timeline decisions (overlaps, cuts, merges, the affected spans and
//! the constant pieces of attribution) are pure functions in
//! `hub_domain::association`; the
//! [`AssociationStore`](hub_storage::AssociationStore) trait
//! (`vigil-hub-storage`) is implemented by both backends, which load the
//! intervals, apply the plan and re-attribute the readings in one
//! transaction under their association lock. This module validates what
//! callers send and hands it to the trait.

use hub_storage::Storage;

use crate::store::{Associations, Store};

pub use hub_domain::association::{
    Bed, BedOccupancy, Change, Invalid, Moved, OccupantDevice, OccupantPatient, PatientId, Subject,
    check_key, is_valid_key,
};
pub use hub_storage::AssocError;

use hub_domain::association::check_device;

/// `[[associations]]`: a device of a gateway is attached to a patient (the
/// static fallback after a reading's own subject and the bed stays).
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Association {
    pub gateway_id: String,
    pub device_id: String,
    /// FHIR Patient logical id.
    pub patient_id: String,
}

/// The `[[associations]]` list as the map ingest and the association
/// procedures consult: (gateway, device) → patient.
pub fn static_map(list: &[Association]) -> Associations {
    list.iter()
        .map(|a| {
            (
                (a.gateway_id.clone(), a.device_id.clone()),
                a.patient_id.clone(),
            )
        })
        .collect()
}

impl Store {
    /// The association storage of the backend.
    fn assoc(&self) -> &dyn Storage {
        &**self
    }

    /// Creates a bed.
    pub fn create_bed(&self, bed: &Bed) -> Result<(), AssocError> {
        bed.validate()?;
        self.assoc().create_bed(bed)
    }

    /// All beds, by ward and id.
    pub fn list_beds(&self) -> Result<Vec<Bed>, AssocError> {
        self.assoc().list_beds()
    }

    /// Places device `(g, d)` at `bed` from `at`. A device placed elsewhere
    /// at `at` is moved (its placement there ends at `at`); the new
    /// placement lasts as long as the one it replaces (or until the
    /// device's next placement, or open).
    pub fn place_device(
        &self,
        g: &str,
        d: &str,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        check_device(g, d)?;
        check_key("bed_id", bed)?;
        self.assoc().place_device(g, d, bed, at, fallback)
    }

    /// Ends device `(g, d)`'s placement at `at`.
    pub fn remove_device(
        &self,
        g: &str,
        d: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        check_device(g, d)?;
        self.assoc().remove_device(g, d, at, fallback)
    }

    /// Admits a patient to `bed` from `at` (an open stay). Refused when the
    /// patient or the bed already has a stay at or after `at`; admitting
    /// again exactly as already recorded is a no-op.
    pub fn admit(
        &self,
        patient: &PatientId,
        bed: &str,
        at: i64,
        visit: Option<&str>,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        patient.validate()?;
        check_key("bed_id", bed)?;
        self.assoc().admit(patient, bed, at, visit, fallback)
    }

    /// Transfers a patient to `bed` at `at`: the stay covering `at` ends
    /// there and a stay at `bed` continues until that stay's end. A
    /// back-dated transfer thus moves the readings since `at`.
    pub fn transfer(
        &self,
        patient: &PatientId,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        patient.validate()?;
        check_key("bed_id", bed)?;
        self.assoc().transfer(patient, bed, at, fallback)
    }

    /// Discharges a patient at `at`: the stay covering `at` ends there, and
    /// the stays of the same admission after it (directly adjacent ones,
    /// i.e. later transfers) are removed. Discharging again at the instant
    /// the stay already ends is a no-op.
    pub fn discharge(
        &self,
        patient: &PatientId,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        patient.validate()?;
        self.assoc().discharge(patient, at, fallback)
    }

    /// The open-or-covering stay of `visit` at `at`, if any: its patient.
    pub fn stay_of_visit(&self, visit: &str, at: i64) -> Result<Option<PatientId>, AssocError> {
        self.assoc().stay_of_visit(visit, at)
    }

    /// The bed of the patient's stay covering `at`.
    pub fn bed_of(&self, patient: &PatientId, at: i64) -> Result<Option<String>, AssocError> {
        self.assoc().bed_of(patient, at)
    }

    /// Replaces a patient's identifier on every stay of `visit` (HL7 A08
    /// with a new PID-3 for the same visit) and re-attributes their
    /// readings. Refused when the new identifier has stays overlapping
    /// them.
    pub fn change_identifier(
        &self,
        old: &PatientId,
        new: &PatientId,
        visit: &str,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        new.validate()?;
        if old == new {
            return Ok(Change::default());
        }
        self.assoc().change_identifier(old, new, visit, fallback)
    }

    /// Every bed with its patient and devices at `at`.
    pub fn occupancy(&self, at: i64) -> Result<Vec<BedOccupancy>, AssocError> {
        self.assoc().occupancy(at)
    }

    /// How many stored readings have no patient.
    pub fn unattributed_count(&self) -> Result<u64, AssocError> {
        self.assoc().unattributed_count()
    }
}
