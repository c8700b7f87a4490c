//! Patient association: beds, device placements and patient stays, and the
//! re-attribution of stored readings when they change. The decisions are
//! `hub_domain::association`'s pure functions; the procedures of
//! [`procedure`] (written once) ask them what to do, over an [`AssocTx`]: the
//! loads and writes a backend implements on its transaction holding its
//! association lock.

use hub_domain::association::{
    self as model, Affected, Bed, BedOccupancy, Change, Conflict, Interval, Invalid, Keyed, OPEN,
    PatientId, Piece, Plan, Subject, Target,
};

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
    /// A stay dated before the patient's erasure would bring erased data
    /// back (docs/privacy.md); a new admission after it is allowed.
    #[error("the patient's data was erased; a stay may not start before the erasure")]
    Erased,
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
    /// Rewrites every stored patient identifier system that is not an
    /// absolute URI (an HL7 assigning authority stored before
    /// `[identifiers]`, e.g. `HOSP`) to `map(system)`, on patient stays and
    /// observations, in one transaction; empty systems stay empty. With
    /// `hub_domain::identifiers::IdentifierSystems::system_uri` as `map`,
    /// running it again changes nothing.
    fn migrate_patient_systems(
        &self,
        map: &(dyn Fn(&str) -> String + Sync),
    ) -> Result<SystemsMigrated, AssocError>;
}

/// What [`AssociationStore::migrate_patient_systems`] rewrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemsMigrated {
    /// Distinct stored systems rewritten.
    pub systems: u64,
    /// Patient stays rewritten.
    pub stays: u64,
    /// Observation rows rewritten.
    pub observations: u64,
}

/// The stored systems [`AssociationStore::migrate_patient_systems`]
/// rewrites, each with its new system: those not absolute URIs whose
/// mapping differs (`stored`: the distinct stored systems).
pub fn systems_to_migrate(
    mut stored: Vec<String>,
    map: &(dyn Fn(&str) -> String + Sync),
) -> Vec<(String, String)> {
    stored.sort_unstable();
    stored.dedup();
    stored
        .into_iter()
        .filter(|s| !s.trim().is_empty() && !hub_domain::identifiers::is_absolute_uri(s))
        .filter_map(|old| {
            let new = map(&old);
            (!new.is_empty() && new != old).then_some((old, new))
        })
        .collect()
}

/// The two timelines: device placements (keyed by gateway and device) and
/// patient stays (keyed by identifier system and value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeline {
    Placements,
    Stays,
}

/// The loads and writes of one association change, on a backend's
/// transaction that holds its association lock. Only persistence: what to
/// load, write and re-attribute is decided by [`procedure`].
pub trait AssocTx {
    type Error;
    fn bed_exists(&mut self, bed: &str) -> Result<bool, Self::Error>;
    /// The key's intervals overlapping `[lo, hi)`, by start.
    fn overlapping(
        &mut self,
        t: Timeline,
        key: (&str, &str),
        lo: i64,
        hi: i64,
    ) -> Result<Vec<Interval>, Self::Error>;
    /// The intervals at `bed` overlapping `[lo, hi)`, with their keys, by
    /// start.
    fn at_bed(
        &mut self,
        t: Timeline,
        bed: &str,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<Keyed>, Self::Error>;
    /// The stays of `visit` of the patient `key`.
    fn stays_of_visit(
        &mut self,
        visit: &str,
        key: (&str, &str),
    ) -> Result<Vec<Interval>, Self::Error>;
    /// Writes `plan` for `key`: its deletes, then its new ends, then its
    /// inserts.
    fn apply(&mut self, t: Timeline, key: (&str, &str), plan: &Plan) -> Result<(), Self::Error>;
    /// Gives stays `ids` the identifier `new`.
    fn rekey_stays(&mut self, ids: &[i64], new: &PatientId) -> Result<(), Self::Error>;
    /// Sets the attribution of device `(g, d)`'s readings in the piece's
    /// span to `target`, for rows attributed by `stay`, `config` or not at
    /// all and only where it differs, giving each changed row the next
    /// version (`version + 1`, FHIR `meta.versionId`) updated at `stamp_us`
    /// (`meta.lastUpdated`). Returns the rows changed, counted by the
    /// patient they had (`patient_system`, `patient_id` before the change;
    /// see [`Subject::of`]).
    fn set_attribution(
        &mut self,
        g: &str,
        d: &str,
        piece: &Piece,
        target: &Target,
        stamp_us: i64,
    ) -> Result<Vec<(Option<Subject>, u64)>, Self::Error>;
    /// Device `(g, d)`'s readings in `[lo, hi)` changed patient (a backend
    /// with derived data, e.g. chart buckets, recomputes it).
    fn reattributed(&mut self, g: &str, d: &str, lo: i64, hi: i64) -> Result<(), Self::Error>;
    /// When `patient` was last erased (`hub_domain::privacy`: by subject
    /// key, with their system or none), if ever.
    fn erased_at(&mut self, patient: &PatientId) -> Result<Option<i64>, Self::Error>;
}

/// The association changes, written once over an [`AssocTx`]. Each returns
/// `Ok(Err(_))` for a refusal (the caller rolls back) and `Err(_)` for a
/// storage failure.
pub mod procedure {
    use super::*;

    type Outcome<T, E> = Result<Result<T, AssocError>, E>;

    /// The key's intervals a change at `at` looks at: those ending at or
    /// after `at` (including the one ending exactly there).
    fn ending_from<X: AssocTx>(
        tx: &mut X,
        t: Timeline,
        key: (&str, &str),
        at: i64,
    ) -> Result<Vec<Interval>, X::Error> {
        tx.overlapping(t, key, at.saturating_sub(1), OPEN)
    }

    fn run<X: AssocTx>(
        tx: &mut X,
        t: Timeline,
        key: (&str, &str),
        decided: Result<Option<Plan>, Conflict>,
        fallback: &Associations,
    ) -> Outcome<Change, X::Error> {
        match decided {
            Err(c) => Ok(Err(c.into())),
            Ok(None) => Ok(Ok(Change::default())),
            Ok(Some(plan)) => {
                tx.apply(t, key, &plan)?;
                Ok(Ok(reattribute(tx, plan.affected, fallback)?))
            }
        }
    }

    /// Recomputes the attribution of every affected reading, one update
    /// per constant piece of each affected device's timeline.
    pub fn reattribute<X: AssocTx>(
        tx: &mut X,
        affected: Affected,
        fallback: &Associations,
    ) -> Result<Change, X::Error> {
        let mut spans = affected.devices;
        for (bed, lo, hi) in &affected.beds {
            let at_bed = tx.at_bed(Timeline::Placements, bed, *lo, *hi)?;
            spans.extend(model::device_spans(*lo, *hi, &at_bed));
        }
        let stamp = hub_domain::clock::now_us();
        let mut change = Change::default();
        for (g, d, lo, hi) in spans {
            let placements = tx.overlapping(Timeline::Placements, (&g, &d), lo, hi)?;
            let mut stays = Vec::new();
            for (bed, a, b) in model::bed_windows(lo, hi, &placements) {
                for (system, value, s) in tx.at_bed(Timeline::Stays, &bed, a, b)? {
                    stays.push((bed.clone(), PatientId { system, value }, s));
                }
            }
            let config = fallback.get(&(g.clone(), d.clone())).map(String::as_str);
            let mut changed = 0;
            for piece in model::pieces(lo, hi, &placements, &stays) {
                let target = Target::of(&piece, config);
                for (from, n) in tx.set_attribution(&g, &d, &piece, &target, stamp)? {
                    change.add(from, target.subject(), n);
                    changed += n;
                }
            }
            if changed > 0 {
                tx.reattributed(&g, &d, lo, hi)?;
            }
        }
        Ok(change)
    }

    pub fn place_device<X: AssocTx>(
        tx: &mut X,
        g: &str,
        d: &str,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Outcome<Change, X::Error> {
        if !tx.bed_exists(bed)? {
            return Ok(Err(AssocError::BedNotFound(bed.to_owned())));
        }
        let mine = ending_from(tx, Timeline::Placements, (g, d), at)?;
        let plan = model::place(g, d, &mine, bed, at);
        run(tx, Timeline::Placements, (g, d), Ok(plan), fallback)
    }

    pub fn remove_device<X: AssocTx>(
        tx: &mut X,
        g: &str,
        d: &str,
        at: i64,
        fallback: &Associations,
    ) -> Outcome<Change, X::Error> {
        let mine = ending_from(tx, Timeline::Placements, (g, d), at)?;
        let plan = model::remove(g, d, &mine, at).map(Some);
        run(tx, Timeline::Placements, (g, d), plan, fallback)
    }

    pub fn admit<X: AssocTx>(
        tx: &mut X,
        patient: &PatientId,
        bed: &str,
        at: i64,
        visit: Option<&str>,
        fallback: &Associations,
    ) -> Outcome<Change, X::Error> {
        let k = (patient.system.as_str(), patient.value.as_str());
        if !tx.bed_exists(bed)? {
            return Ok(Err(AssocError::BedNotFound(bed.to_owned())));
        }
        if tx.erased_at(patient)?.is_some_and(|t| at < t) {
            return Ok(Err(AssocError::Erased));
        }
        let mine = ending_from(tx, Timeline::Stays, k, at)?;
        let at_bed = tx.at_bed(Timeline::Stays, bed, at, OPEN)?;
        let plan = model::admit(&mine, &at_bed, bed, at, visit);
        run(tx, Timeline::Stays, k, plan, fallback)
    }

    pub fn transfer<X: AssocTx>(
        tx: &mut X,
        patient: &PatientId,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Outcome<Change, X::Error> {
        let k = (patient.system.as_str(), patient.value.as_str());
        if !tx.bed_exists(bed)? {
            return Ok(Err(AssocError::BedNotFound(bed.to_owned())));
        }
        let mine = ending_from(tx, Timeline::Stays, k, at)?;
        let at_bed = tx.at_bed(Timeline::Stays, bed, at, OPEN)?;
        let plan = model::transfer(k, &mine, &at_bed, bed, at);
        run(tx, Timeline::Stays, k, plan, fallback)
    }

    pub fn discharge<X: AssocTx>(
        tx: &mut X,
        patient: &PatientId,
        at: i64,
        fallback: &Associations,
    ) -> Outcome<Change, X::Error> {
        let k = (patient.system.as_str(), patient.value.as_str());
        let mine = ending_from(tx, Timeline::Stays, k, at)?;
        let plan = model::discharge(&mine, at);
        run(tx, Timeline::Stays, k, plan, fallback)
    }

    pub fn change_identifier<X: AssocTx>(
        tx: &mut X,
        old: &PatientId,
        new: &PatientId,
        visit: &str,
        fallback: &Associations,
    ) -> Outcome<Change, X::Error> {
        let stays = tx.stays_of_visit(visit, (&old.system, &old.value))?;
        let theirs = match model::span(&stays) {
            Some((lo, hi)) => tx.overlapping(Timeline::Stays, (&new.system, &new.value), lo, hi)?,
            None => Vec::new(),
        };
        let affected = match model::change_identifier(&stays, &theirs) {
            Ok(a) => a,
            Err(c) => return Ok(Err(c.into())),
        };
        let ids: Vec<i64> = stays.iter().map(|s| s.id).collect();
        tx.rekey_stays(&ids, new)?;
        Ok(Ok(reattribute(tx, affected, fallback)?))
    }

    /// The bed of the patient's stay covering `at`.
    pub fn bed_of<X: AssocTx>(
        tx: &mut X,
        patient: &PatientId,
        at: i64,
    ) -> Result<Option<String>, X::Error> {
        let k = (patient.system.as_str(), patient.value.as_str());
        Ok(tx
            .overlapping(Timeline::Stays, k, at, at.saturating_add(1))?
            .into_iter()
            .next()
            .map(|s| s.bed))
    }

    /// Each bed's patient and devices at `at`.
    pub fn occupancy<X: AssocTx>(
        tx: &mut X,
        beds: Vec<Bed>,
        at: i64,
    ) -> Result<Vec<BedOccupancy>, X::Error> {
        let mut out = Vec::with_capacity(beds.len());
        for bed in beds {
            let patient = tx
                .at_bed(Timeline::Stays, &bed.id, at, at.saturating_add(1))?
                .into_iter()
                .next()
                .map(|(system, value, s)| model::OccupantPatient {
                    system,
                    value,
                    since_us: s.from,
                });
            let devices = tx
                .at_bed(Timeline::Placements, &bed.id, at, at.saturating_add(1))?
                .into_iter()
                .map(|(gateway_id, device_id, p)| model::OccupantDevice {
                    gateway_id,
                    device_id,
                    since_us: p.from,
                })
                .collect();
            out.push(BedOccupancy {
                bed,
                patient,
                devices,
            });
        }
        Ok(out)
    }
}
