//! Patients' rights in storage: the subject salt, erasure and its
//! tombstones, legal holds, a patient's whole record (subject access) and
//! retention by data class (`hub_domain::privacy`, docs/privacy.md).
//!
//! The erasure is written once, in [`erase`], over an [`ErasureTx`]: the
//! backend's association transaction (PostgreSQL: under the association
//! lock, which ingest holds shared, so no batch is attributed to the
//! patient while the erasure runs).

pub use hub_domain::privacy::{
    DeviceWindow, ErasedStay, ErasedSubjects, KEY_LEN, PlacementSpan, SubjectKey, Tombstone,
};

use hub_domain::association::{Interval, OPEN};
use hub_domain::privacy::{erasure_windows, subject_key};

use crate::association::{AssocTx, Timeline};
use crate::{StoreError, StoredAuditEntry};

/// A legal hold on a patient: blocks erasure and retention of their data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegalHold {
    pub patient: String,
    pub reason: String,
    pub set_by: String,
    pub set_us: i64,
}

/// What an erasure removed, per table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErasedCounts {
    pub observations: u64,
    pub stays: u64,
    pub manual_inputs: u64,
    pub alerts: u64,
    pub scores: u64,
    pub chart_buckets: u64,
    pub rule_overrides: u64,
}

/// A completed erasure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erased {
    pub tombstone_id: i64,
    pub subject: SubjectKey,
    pub windows: Vec<DeviceWindow>,
    pub counts: ErasedCounts,
}

/// Why an erasure was not done.
#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    #[error("patient `{0}` is not known")]
    UnknownPatient(String),
    #[error("patient is under a legal hold (set by {by}: {reason})")]
    LegalHold { by: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A stay as subject access returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StayRecord {
    pub system: String,
    pub bed: String,
    pub ward: String,
    pub from_us: i64,
    pub to_us: Option<i64>,
    pub visit: Option<String>,
}

/// A manual score input as subject access returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualRecord {
    pub kind: String,
    pub value: String,
    pub effective_us: i64,
    pub recorded_us: i64,
}

/// Retention cut-offs by data class (UTC µs; `None`: keep).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionCutoffs {
    /// Readings (observations), device events, rejected readings.
    pub readings: Option<i64>,
    /// Chart buckets and score history.
    pub aggregates: Option<i64>,
    /// Resolved alerts (by resolution time) and their transitions.
    pub alerts: Option<i64>,
}

/// What a purge by class removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgedByClass {
    pub observations: u64,
    pub device_events: u64,
    pub rejected: u64,
    pub chart_buckets: u64,
    pub scores: u64,
    pub alerts: u64,
}

/// The privacy tables' persistence.
pub trait PrivacyStore {
    /// The database's subject salt (32 random bytes, created once, never
    /// changed: every subject key depends on it).
    fn subject_salt(&self) -> Result<[u8; KEY_LEN], StoreError>;
    /// Tombstones with `id > after_id`, by id (`0`: all of them).
    fn tombstones_since(&self, after_id: i64) -> Result<Vec<Tombstone>, StoreError>;
    /// Erases patient `value` at `now_us` ([`erase`], in one transaction).
    fn erase_patient(&self, value: &str, now_us: i64) -> Result<Erased, ErasureError>;
    /// Sets (`Some`) or lifts (`None`) the legal hold of patient `value`.
    /// Returns whether the patient is known (a hold is only set on one).
    fn set_legal_hold(&self, value: &str, hold: Option<&LegalHold>) -> Result<bool, StoreError>;
    /// Every legal hold, by patient.
    fn legal_holds(&self) -> Result<Vec<LegalHold>, StoreError>;
    /// Patient `value`'s stays (any identifier system), oldest first.
    fn stays_of(&self, value: &str) -> Result<Vec<StayRecord>, StoreError>;
    /// Patient `value`'s manual score inputs, oldest first.
    fn manual_inputs_of(&self, value: &str) -> Result<Vec<ManualRecord>, StoreError>;
    /// The audit entries naming patient `value` (alone or among several),
    /// by seq.
    fn audit_entries_of(&self, value: &str) -> Result<Vec<StoredAuditEntry>, StoreError>;
}

/// A new subject salt from the operating system's random source.
pub fn new_salt() -> Result<[u8; KEY_LEN], StoreError> {
    use ring::rand::SecureRandom;
    let mut salt = [0u8; KEY_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| StoreError::Corrupt("no random source for the subject salt".into()))?;
    Ok(salt)
}

/// What [`erase`] needs of a backend's transaction, beyond [`AssocTx`].
pub trait ErasureTx: AssocTx {
    /// The subject salt, created in this transaction when missing.
    fn salt(&mut self) -> Result<[u8; KEY_LEN], Self::Error>;
    /// The stored system of patient `value` (from its stays, then its
    /// readings; `Some("")` when it has none), or None when the hub holds
    /// nothing of the patient.
    fn patient_system(&mut self, value: &str) -> Result<Option<String>, Self::Error>;
    fn legal_hold(&mut self, value: &str) -> Result<Option<LegalHold>, Self::Error>;
    /// The patient's stays, whatever their identifier system.
    fn stays(&mut self, value: &str) -> Result<Vec<Interval>, Self::Error>;
    /// Per device (gateway, device): the first and last effective time of
    /// the readings attributed to the patient.
    fn observed(
        &mut self,
        value: &str,
    ) -> Result<Vec<hub_domain::privacy::ObservedSpan>, Self::Error>;
    /// Deletes every row of the patient (readings, panels, chart buckets,
    /// score history, manual inputs, alerts with their transitions, rule
    /// overrides, stays; the alert engine's device→patient memory is
    /// cleared) and every reading inside `windows`.
    fn delete_subject(
        &mut self,
        value: &str,
        windows: &[DeviceWindow],
    ) -> Result<ErasedCounts, Self::Error>;
    /// Stores the tombstone; returns its id.
    fn insert_tombstone(
        &mut self,
        subject: &SubjectKey,
        erased_us: i64,
        windows: &[DeviceWindow],
    ) -> Result<i64, Self::Error>;
}

/// The erasure, once for every backend: refused for an unknown patient or
/// one under a legal hold; otherwise the device windows of the patient's
/// data (stays × placements, plus the spans of readings attributed to
/// them) are computed, every row of the patient and every reading in those
/// windows deleted, and a tombstone (subject key and windows, never the
/// identifier) stored so late data is dropped at ingest.
pub fn erase<X: ErasureTx>(
    tx: &mut X,
    value: &str,
    now_us: i64,
) -> Result<Result<Erased, ErasureError>, X::Error> {
    let Some(system) = tx.patient_system(value)? else {
        return Ok(Err(ErasureError::UnknownPatient(value.to_owned())));
    };
    if let Some(h) = tx.legal_hold(value)? {
        return Ok(Err(ErasureError::LegalHold {
            by: h.set_by,
            reason: h.reason,
        }));
    }
    let salt = tx.salt()?;
    let subject = subject_key(&salt, &system, value);
    let mut stays = Vec::new();
    let mut placements = Vec::new();
    for s in tx.stays(value)? {
        let to_us = s.to.unwrap_or(now_us).max(s.from);
        for (gateway_id, device_id, p) in tx.at_bed(Timeline::Placements, &s.bed, s.from, to_us)? {
            placements.push(PlacementSpan {
                gateway_id,
                device_id,
                bed: p.bed,
                from_us: p.from,
                to_us: p.to.unwrap_or(OPEN),
            });
        }
        stays.push(ErasedStay {
            bed: s.bed,
            from_us: s.from,
            to_us,
        });
    }
    let observed = tx.observed(value)?;
    let windows = erasure_windows(&stays, &placements, &observed);
    let counts = tx.delete_subject(value, &windows)?;
    let tombstone_id = tx.insert_tombstone(&subject, now_us, &windows)?;
    Ok(Ok(Erased {
        tombstone_id,
        subject,
        windows,
        counts,
    }))
}
