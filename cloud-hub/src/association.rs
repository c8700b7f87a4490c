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

use std::collections::BTreeSet;

use rusqlite::{OptionalExtension, Transaction, params};

use crate::store::{Associations, Store, StoreError};

/// Open end of an interval, for comparisons.
const OPEN: i64 = i64::MAX;

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

impl From<hub_postgres::DbError> for AssocError {
    fn from(e: hub_postgres::DbError) -> Self {
        AssocError::Store(e.into())
    }
}

impl From<rusqlite::Error> for AssocError {
    fn from(e: rusqlite::Error) -> Self {
        AssocError::Store(StoreError::Sqlite(e))
    }
}

pub use hub_domain::association::{
    Bed, BedOccupancy, Change, Invalid, OccupantDevice, OccupantPatient, PatientId, check_key,
    is_valid_key,
};

impl From<Invalid> for AssocError {
    fn from(e: Invalid) -> Self {
        AssocError::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

/// A placement or stay interval.
#[derive(Debug, Clone)]
struct Interval {
    id: i64,
    bed: String,
    from: i64,
    to: Option<i64>,
}

impl Interval {
    fn end(&self) -> i64 {
        self.to.unwrap_or(OPEN)
    }
}

/// The two timelines share their shape: intervals of a key (device or
/// patient) at beds.
#[derive(Clone, Copy)]
struct Timeline {
    table: &'static str,
    k1: &'static str,
    k2: &'static str,
}

const PLACEMENTS: Timeline = Timeline {
    table: "device_placements",
    k1: "gateway_id",
    k2: "device_id",
};
const STAYS: Timeline = Timeline {
    table: "patient_stays",
    k1: "patient_system",
    k2: "patient_value",
};

fn row_interval(r: &rusqlite::Row<'_>) -> rusqlite::Result<Interval> {
    Ok(Interval {
        id: r.get(0)?,
        bed: r.get(1)?,
        from: r.get(2)?,
        to: r.get(3)?,
    })
}

impl Timeline {
    /// The key's intervals overlapping `[lo, hi)`, by start.
    fn overlapping(
        self,
        tx: &Transaction<'_>,
        k: (&str, &str),
        lo: i64,
        hi: i64,
    ) -> rusqlite::Result<Vec<Interval>> {
        let sql = format!(
            "SELECT id, bed_id, from_us, to_us FROM {} WHERE {} = ?1 AND {} = ?2
               AND from_us < ?4 AND COALESCE(to_us, {OPEN}) > ?3 ORDER BY from_us",
            self.table, self.k1, self.k2
        );
        let mut st = tx.prepare_cached(&sql)?;
        st.query_map(params![k.0, k.1, lo, hi], row_interval)?
            .collect()
    }

    /// The key's interval covering `at`.
    fn covering(
        self,
        tx: &Transaction<'_>,
        k: (&str, &str),
        at: i64,
    ) -> rusqlite::Result<Option<Interval>> {
        Ok(self
            .overlapping(tx, k, at, at.saturating_add(1))?
            .into_iter()
            .next())
    }

    /// Intervals of a bed overlapping `[lo, hi)`, with their keys.
    fn at_bed(
        self,
        tx: &Transaction<'_>,
        bed: &str,
        lo: i64,
        hi: i64,
    ) -> rusqlite::Result<Vec<(String, String, Interval)>> {
        let sql = format!(
            "SELECT id, bed_id, from_us, to_us, {}, {} FROM {} WHERE bed_id = ?1
               AND from_us < ?3 AND COALESCE(to_us, {OPEN}) > ?2 ORDER BY from_us",
            self.k1, self.k2, self.table
        );
        let mut st = tx.prepare_cached(&sql)?;
        st.query_map(params![bed, lo, hi], |r| {
            Ok((r.get(4)?, r.get(5)?, row_interval(r)?))
        })?
        .collect()
    }

    fn insert(
        self,
        tx: &Transaction<'_>,
        k: (&str, &str),
        bed: &str,
        from: i64,
        to: Option<i64>,
    ) -> rusqlite::Result<i64> {
        let sql = format!(
            "INSERT INTO {} ({}, {}, bed_id, from_us, to_us) VALUES (?1, ?2, ?3, ?4, ?5)",
            self.table, self.k1, self.k2
        );
        tx.execute(&sql, params![k.0, k.1, bed, from, to])?;
        Ok(tx.last_insert_rowid())
    }

    fn set_to(self, tx: &Transaction<'_>, id: i64, to: Option<i64>) -> rusqlite::Result<()> {
        tx.execute(
            &format!("UPDATE {} SET to_us = ?2 WHERE id = ?1", self.table),
            params![id, to],
        )?;
        Ok(())
    }

    fn delete(self, tx: &Transaction<'_>, id: i64) -> rusqlite::Result<()> {
        tx.execute(&format!("DELETE FROM {} WHERE id = ?1", self.table), [id])?;
        Ok(())
    }

    /// Shorten interval `iv` to end at `at` (deleting it when it would be
    /// empty).
    fn cut(self, tx: &Transaction<'_>, iv: &Interval, at: i64) -> rusqlite::Result<()> {
        if iv.from >= at {
            self.delete(tx, iv.id)
        } else {
            self.set_to(tx, iv.id, Some(at))
        }
    }

    /// Merge interval `id` with a directly adjacent interval of the same key
    /// at the same bed (before and after).
    fn merge(self, tx: &Transaction<'_>, k: (&str, &str), id: i64) -> rusqlite::Result<()> {
        let get = |id: i64| -> rusqlite::Result<Option<Interval>> {
            tx.query_row(
                &format!(
                    "SELECT id, bed_id, from_us, to_us FROM {} WHERE id = ?1",
                    self.table
                ),
                [id],
                row_interval,
            )
            .optional()
        };
        let Some(mut iv) = get(id)? else {
            return Ok(());
        };
        // Previous, ending exactly where this starts.
        let prev: Option<i64> = tx
            .query_row(
                &format!(
                    "SELECT id FROM {} WHERE {} = ?1 AND {} = ?2 AND bed_id = ?3 AND to_us = ?4",
                    self.table, self.k1, self.k2
                ),
                params![k.0, k.1, iv.bed, iv.from],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(p) = prev {
            self.delete(tx, iv.id)?;
            self.set_to(tx, p, iv.to)?;
            iv = get(p)?.unwrap_or(iv);
        }
        if let Some(to) = iv.to {
            let next: Option<(i64, Option<i64>)> = tx
                .query_row(
                    &format!(
                        "SELECT id, to_us FROM {} WHERE {} = ?1 AND {} = ?2 AND bed_id = ?3 AND from_us = ?4",
                        self.table, self.k1, self.k2
                    ),
                    params![k.0, k.1, iv.bed, to],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((n, n_to)) = next {
                self.delete(tx, n)?;
                self.set_to(tx, iv.id, n_to)?;
            }
        }
        Ok(())
    }
}

/// Who a stored reading belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Stay(PatientId),
    Config(String),
    Unattributed,
}

/// The affected devices and span of a change, to re-attribute.
#[derive(Debug, Default)]
struct Affected {
    /// (gateway, device, lo, hi)
    spans: Vec<(String, String, i64, i64)>,
    /// (bed, lo, hi): every device placed there in the span.
    beds: Vec<(String, i64, i64)>,
}

impl Affected {
    fn device(&mut self, g: &str, d: &str, lo: i64, hi: i64) {
        if lo < hi {
            self.spans.push((g.to_owned(), d.to_owned(), lo, hi));
        }
    }
    fn bed(&mut self, bed: &str, lo: i64, hi: i64) {
        if lo < hi {
            self.beds.push((bed.to_owned(), lo, hi));
        }
    }

    /// Recompute the attribution of every affected reading.
    fn reattribute(
        self,
        tx: &Transaction<'_>,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        let mut spans = self.spans;
        for (bed, lo, hi) in &self.beds {
            for (g, d, iv) in PLACEMENTS.at_bed(tx, bed, *lo, *hi)? {
                spans.push((g, d, (*lo).max(iv.from), (*hi).min(iv.end())));
            }
        }
        let mut n = 0;
        for (g, d, lo, hi) in spans {
            n += reattribute_device(tx, &g, &d, lo, hi, fallback)?;
        }
        Ok(Change { reattributed: n })
    }
}

/// The constant pieces of device `(g, d)`'s attribution over `[lo, hi)`.
fn pieces(
    tx: &Transaction<'_>,
    g: &str,
    d: &str,
    lo: i64,
    hi: i64,
) -> rusqlite::Result<Vec<(i64, i64, Option<PatientId>)>> {
    let mut cuts = BTreeSet::from([lo, hi]);
    let placements = PLACEMENTS.overlapping(tx, (g, d), lo, hi)?;
    let mut stays = Vec::new();
    for p in &placements {
        let (a, b) = (p.from.max(lo), p.end().min(hi));
        cuts.insert(a);
        cuts.insert(b);
        for (sys, val, s) in STAYS.at_bed(tx, &p.bed, a, b)? {
            cuts.insert(s.from.clamp(a, b));
            cuts.insert(s.end().clamp(a, b));
            stays.push((
                p.bed.clone(),
                PatientId {
                    system: sys,
                    value: val,
                },
                s,
            ));
        }
    }
    let cuts: Vec<i64> = cuts.into_iter().collect();
    let mut out: Vec<(i64, i64, Option<PatientId>)> = Vec::new();
    for w in cuts.windows(2) {
        let (x, y) = (w[0], w[1]);
        let who = placements
            .iter()
            .find(|p| p.from <= x && x < p.end())
            .and_then(|p| {
                stays
                    .iter()
                    .find(|(bed, _, s)| *bed == p.bed && s.from <= x && x < s.end())
                    .map(|(_, pid, _)| pid.clone())
            });
        match out.last_mut() {
            Some(last) if last.2 == who && last.1 == x => last.1 = y,
            _ => out.push((x, y, who)),
        }
    }
    Ok(out)
}

/// Re-attribute device `(g, d)`'s readings in `[lo, hi)` that are not
/// attributed by their own subject; the number of rows that changed.
fn reattribute_device(
    tx: &Transaction<'_>,
    g: &str,
    d: &str,
    lo: i64,
    hi: i64,
    fallback: &Associations,
) -> Result<u64, AssocError> {
    let config = fallback.get(&(g.to_owned(), d.to_owned()));
    let mut st = tx.prepare_cached(
        "UPDATE observations SET patient_system = ?5, patient_id = ?6, attribution = ?7
          WHERE gateway_id = ?1 AND device_id = ?2 AND effective_us >= ?3 AND effective_us < ?4
            AND attribution IN ('stay', 'config', 'unattributed')
            AND (patient_system IS NOT ?5 OR patient_id IS NOT ?6 OR attribution IS NOT ?7)",
    )?;
    let mut n = 0u64;
    for (x, y, who) in pieces(tx, g, d, lo, hi)? {
        let target = match (who, config) {
            (Some(p), _) => Target::Stay(p),
            (None, Some(c)) => Target::Config(c.clone()),
            (None, None) => Target::Unattributed,
        };
        let (sys, val, att): (Option<String>, Option<String>, &str) = match target {
            Target::Stay(p) => (Some(p.system), Some(p.value), "stay"),
            Target::Config(c) => (None, Some(c), "config"),
            Target::Unattributed => (None, None, "unattributed"),
        };
        n += st.execute(params![g, d, x, y, sys, val, att])? as u64;
    }
    if n > 0 {
        // Chart buckets follow the rows to their new patient.
        hub_sqlite::trends::rebuild_device(tx, g, d, lo, hi)?;
    }
    Ok(n)
}

fn bed_exists(tx: &Transaction<'_>, bed: &str) -> Result<(), AssocError> {
    let found = tx
        .query_row("SELECT 1 FROM beds WHERE id = ?1", [bed], |_| Ok(()))
        .optional()?
        .is_some();
    if found {
        Ok(())
    } else {
        Err(AssocError::BedNotFound(bed.to_owned()))
    }
}

fn check_device(g: &str, d: &str) -> Result<(), AssocError> {
    check_key("gateway_id", g)?;
    if d.is_empty() || d.len() > 128 || d.chars().any(char::is_control) {
        return Err(AssocError::Invalid {
            field: "device_id",
            message: "must be 1-128 characters without control characters".into(),
        });
    }
    Ok(())
}

impl Store {
    fn assoc_tx<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, AssocError>,
    ) -> Result<T, AssocError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Creates a bed.
    pub fn create_bed(&self, bed: &Bed) -> Result<(), AssocError> {
        bed.validate()?;
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| crate::association_pg::PgAssoc(p).create_bed(bed));
        }
        self.assoc_tx(|tx| {
            let n = tx.execute(
                "INSERT OR IGNORE INTO beds (id, ward, label, created_us) VALUES (?1, ?2, ?3, ?4)",
                params![bed.id, bed.ward, bed.label, crate::store::now_us()],
            )?;
            if n == 0 {
                return Err(AssocError::BedExists(bed.id.clone()));
            }
            Ok(())
        })
    }

    /// All beds, by ward and id.
    pub fn list_beds(&self) -> Result<Vec<Bed>, AssocError> {
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| crate::association_pg::PgAssoc(p).list_beds());
        }
        let conn = self.lock()?;
        let mut st = conn.prepare("SELECT id, ward, label FROM beds ORDER BY ward, id")?;
        let beds = st
            .query_map([], |r| {
                Ok(Bed {
                    id: r.get(0)?,
                    ward: r.get(1)?,
                    label: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(beds)
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
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| {
                crate::association_pg::PgAssoc(p).place_device(g, d, bed, at, fallback)
            });
        }
        self.assoc_tx(|tx| {
            bed_exists(tx, bed)?;
            let mut aff = Affected::default();
            let end = match PLACEMENTS.covering(tx, (g, d), at)? {
                Some(p) if p.bed == bed => return Ok(Change::default()),
                Some(p) => {
                    PLACEMENTS.cut(tx, &p, at)?;
                    p.to
                }
                None => tx.query_row(
                    "SELECT MIN(from_us) FROM device_placements
                          WHERE gateway_id = ?1 AND device_id = ?2 AND from_us > ?3",
                    params![g, d, at],
                    |r| r.get::<_, Option<i64>>(0),
                )?,
            };
            let id = PLACEMENTS.insert(tx, (g, d), bed, at, end)?;
            PLACEMENTS.merge(tx, (g, d), id)?;
            aff.device(g, d, at, end.unwrap_or(OPEN));
            aff.reattribute(tx, fallback)
        })
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
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| {
                crate::association_pg::PgAssoc(p).remove_device(g, d, at, fallback)
            });
        }
        self.assoc_tx(|tx| {
            let p = PLACEMENTS
                .covering(tx, (g, d), at)?
                .ok_or(AssocError::NotPlaced)?;
            PLACEMENTS.cut(tx, &p, at)?;
            let mut aff = Affected::default();
            aff.device(g, d, at, p.end());
            aff.reattribute(tx, fallback)
        })
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
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| {
                crate::association_pg::PgAssoc(p).admit(patient, bed, at, visit, fallback)
            });
        }
        let k = (patient.system.as_str(), patient.value.as_str());
        self.assoc_tx(|tx| {
            bed_exists(tx, bed)?;
            let mine = STAYS.overlapping(tx, k, at, OPEN)?;
            if let Some(s) = mine.first() {
                if mine.len() == 1 && s.bed == bed && s.from == at {
                    return Ok(Change::default());
                }
                return Err(AssocError::AlreadyAdmitted);
            }
            if !STAYS.at_bed(tx, bed, at, OPEN)?.is_empty() {
                return Err(AssocError::BedOccupied(bed.to_owned()));
            }
            let id = STAYS.insert(tx, k, bed, at, None)?;
            tx.execute(
                "UPDATE patient_stays SET visit = ?2 WHERE id = ?1",
                params![id, visit],
            )?;
            let mut aff = Affected::default();
            aff.bed(bed, at, OPEN);
            aff.reattribute(tx, fallback)
        })
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
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| {
                crate::association_pg::PgAssoc(p).transfer(patient, bed, at, fallback)
            });
        }
        let k = (patient.system.as_str(), patient.value.as_str());
        self.assoc_tx(|tx| {
            bed_exists(tx, bed)?;
            let s = STAYS.covering(tx, k, at)?.ok_or(AssocError::NotAdmitted)?;
            if s.bed == bed {
                return Ok(Change::default());
            }
            if STAYS
                .at_bed(tx, bed, at, s.end())?
                .iter()
                .any(|(sys, val, _)| (sys.as_str(), val.as_str()) != k)
            {
                return Err(AssocError::BedOccupied(bed.to_owned()));
            }
            let visit: Option<String> = tx.query_row(
                "SELECT visit FROM patient_stays WHERE id = ?1",
                [s.id],
                |r| r.get(0),
            )?;
            STAYS.cut(tx, &s, at)?;
            let id = STAYS.insert(tx, k, bed, at, s.to)?;
            tx.execute(
                "UPDATE patient_stays SET visit = ?2 WHERE id = ?1",
                params![id, visit],
            )?;
            STAYS.merge(tx, k, id)?;
            let mut aff = Affected::default();
            aff.bed(&s.bed, at, s.end());
            aff.bed(bed, at, s.end());
            aff.reattribute(tx, fallback)
        })
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
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| {
                crate::association_pg::PgAssoc(p).discharge(patient, at, fallback)
            });
        }
        let k = (patient.system.as_str(), patient.value.as_str());
        self.assoc_tx(|tx| {
            let Some(first) = STAYS.covering(tx, k, at)? else {
                let ended: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM patient_stays
                       WHERE patient_system = ?1 AND patient_value = ?2 AND to_us = ?3)",
                    params![k.0, k.1, at],
                    |r| r.get(0),
                )?;
                return if ended {
                    Ok(Change::default())
                } else {
                    Err(AssocError::NotAdmitted)
                };
            };
            let mut aff = Affected::default();
            aff.bed(&first.bed, at, first.end());
            STAYS.cut(tx, &first, at)?;
            let mut end = first.to;
            while let Some(e) = end {
                let Some(next) = STAYS
                    .overlapping(tx, k, e, e.saturating_add(1))?
                    .into_iter()
                    .next()
                else {
                    break;
                };
                if next.from != e {
                    break;
                }
                aff.bed(&next.bed, next.from, next.end());
                STAYS.delete(tx, next.id)?;
                end = next.to;
            }
            aff.reattribute(tx, fallback)
        })
    }

    /// The open-or-covering stay of `visit` at `at`, if any: its patient.
    pub fn stay_of_visit(&self, visit: &str, at: i64) -> Result<Option<PatientId>, AssocError> {
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| {
                crate::association_pg::PgAssoc(p).stay_of_visit(visit, at)
            });
        }
        let conn = self.lock()?;
        Ok(conn
            .query_row(
                "SELECT patient_system, patient_value FROM patient_stays
                  WHERE visit = ?1 AND from_us <= ?2 AND COALESCE(to_us, ?3) > ?2
                  ORDER BY from_us DESC LIMIT 1",
                params![visit, at, OPEN],
                |r| {
                    Ok(PatientId {
                        system: r.get(0)?,
                        value: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    /// The bed of the patient's stay covering `at`.
    pub fn bed_of(&self, patient: &PatientId, at: i64) -> Result<Option<String>, AssocError> {
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| {
                crate::association_pg::PgAssoc(p).bed_of(patient, at)
            });
        }
        let mut conn = self.lock()?;
        let tx = conn.transaction()?;
        let k = (patient.system.as_str(), patient.value.as_str());
        Ok(STAYS.covering(&tx, k, at)?.map(|s| s.bed))
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
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| {
                crate::association_pg::PgAssoc(p).change_identifier(old, new, visit, fallback)
            });
        }
        self.assoc_tx(|tx| {
            let stays: Vec<Interval> = tx
                .prepare(
                    "SELECT id, bed_id, from_us, to_us FROM patient_stays
                      WHERE visit = ?1 AND patient_system = ?2 AND patient_value = ?3",
                )?
                .query_map(params![visit, old.system, old.value], row_interval)?
                .collect::<Result<_, _>>()?;
            let mut aff = Affected::default();
            for s in &stays {
                if !STAYS
                    .overlapping(tx, (&new.system, &new.value), s.from, s.end())?
                    .is_empty()
                {
                    return Err(AssocError::AlreadyAdmitted);
                }
                aff.bed(&s.bed, s.from, s.end());
            }
            for s in &stays {
                tx.execute(
                    "UPDATE patient_stays SET patient_system = ?2, patient_value = ?3 WHERE id = ?1",
                    params![s.id, new.system, new.value],
                )?;
            }
            aff.reattribute(tx, fallback)
        })
    }

    /// Every bed with its patient and devices at `at`.
    pub fn occupancy(&self, at: i64) -> Result<Vec<BedOccupancy>, AssocError> {
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| crate::association_pg::PgAssoc(p).occupancy(at));
        }
        let beds = self.list_beds()?;
        let mut conn = self.lock()?;
        let tx = conn.transaction()?;
        let mut out = Vec::with_capacity(beds.len());
        for bed in beds {
            let patient = STAYS
                .at_bed(&tx, &bed.id, at, at.saturating_add(1))?
                .into_iter()
                .next()
                .map(|(system, value, s)| OccupantPatient {
                    system,
                    value,
                    since_us: s.from,
                });
            let devices = PLACEMENTS
                .at_bed(&tx, &bed.id, at, at.saturating_add(1))?
                .into_iter()
                .map(|(gateway_id, device_id, p)| OccupantDevice {
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

    /// How many stored readings have no patient.
    pub fn unattributed_count(&self) -> Result<u64, AssocError> {
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| {
                crate::association_pg::PgAssoc(p).unattributed_count()
            });
        }
        let conn = self.lock()?;
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM observations WHERE attribution = 'unattributed'",
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_protocol::catalogue::codes;
    use shared_protocol::v1::{DeviceData, DeviceInfo, Identifier, Reading, reading};

    const G: &str = "gw";
    /// A time in 2023, µs.
    const T0: i64 = 1_700_000_000_000_000;
    const MIN: i64 = 60_000_000;

    struct Fx {
        _dir: tempfile::TempDir,
        s: Store,
        batch: u64,
        cfg: Associations,
    }

    fn p(v: &str) -> PatientId {
        PatientId {
            system: "urn:mrn".into(),
            value: v.into(),
        }
    }

    fn reading(seq: u64, t: i64) -> Reading {
        Reading {
            mdc_code: codes::PULS_OXIM_SAT_O2,
            value: Some(reading::Value::Numeric(97.0)),
            ucum_unit: "%".into(),
            device_time_us: t,
            validity: 1,
            sequence: seq,
            ..Default::default()
        }
    }

    impl Fx {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(&dir.path().join("a.sqlite")).unwrap();
            for (id, ward) in [("icu-1", "ICU"), ("icu-2", "ICU"), ("icu-3", "ICU")] {
                s.create_bed(&Bed {
                    id: id.into(),
                    ward: ward.into(),
                    label: id.to_uppercase(),
                })
                .unwrap();
            }
            Fx {
                _dir: dir,
                s,
                batch: 0,
                cfg: Associations::new(),
            }
        }

        fn ingest(&mut self, device: &str, readings: Vec<Reading>) {
            self.batch += 1;
            let b = shared_protocol::v1::Batch {
                gateway_id: G.into(),
                sequence: self.batch,
                devices: vec![DeviceData {
                    device: Some(DeviceInfo {
                        device_id: device.into(),
                        ..Default::default()
                    }),
                    readings,
                    ..Default::default()
                }],
                ..Default::default()
            };
            let now = crate::store::now_us();
            let r = self.s.ingest(G, &b, &self.cfg, now, now).unwrap();
            assert_eq!(r.ack.rejected, 0, "{:?}", r.ack.rejections);
        }

        /// (patient_id, attribution) of a reading row.
        fn who(&self, device: &str, seq: u64) -> (Option<String>, String) {
            self.s
                .lock()
                .unwrap()
                .query_row(
                    "SELECT patient_id, attribution FROM observations
                      WHERE device_id = ?1 AND sequence = ?2 AND kind = 'reading'",
                    params![device, seq as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap()
        }

        fn assert_who(&self, device: &str, seq: u64, patient: Option<&str>, attribution: &str) {
            assert_eq!(
                self.who(device, seq),
                (patient.map(str::to_owned), attribution.to_owned()),
                "{device} #{seq}"
            );
        }
    }

    #[test]
    fn a_reading_belongs_to_the_stay_covering_its_bed_at_its_time() {
        let mut f = Fx::new();
        f.s.place_device(G, "mon-1", "icu-1", T0, &f.cfg).unwrap();
        f.s.admit(&p("MRN-1"), "icu-1", T0 + MIN, None, &f.cfg)
            .unwrap();
        f.ingest(
            "mon-1",
            vec![
                reading(1, T0),
                reading(2, T0 + MIN),
                reading(3, T0 + 90 * MIN),
            ],
        );
        f.assert_who("mon-1", 1, None, "unattributed");
        // Exactly at the admission instant: inside [from, to).
        f.assert_who("mon-1", 2, Some("MRN-1"), "stay");
        f.assert_who("mon-1", 3, Some("MRN-1"), "stay");
        let system: Option<String> =
            f.s.lock()
                .unwrap()
                .query_row(
                    "SELECT patient_system FROM observations WHERE sequence = 3",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
        assert_eq!(system.as_deref(), Some("urn:mrn"));
        // A device nobody placed stays unattributed.
        f.ingest("mon-9", vec![reading(1, T0 + MIN)]);
        f.assert_who("mon-9", 1, None, "unattributed");
        assert_eq!(f.s.unattributed_count().unwrap(), 2);
    }

    #[test]
    fn held_readings_are_attributed_when_placement_and_stay_arrive_later() {
        let mut f = Fx::new();
        f.ingest(
            "mon-1",
            vec![
                reading(1, T0),
                reading(2, T0 + 10 * MIN),
                reading(3, T0 + 20 * MIN),
            ],
        );
        for s in 1..=3 {
            f.assert_who("mon-1", s, None, "unattributed");
        }
        // The stay alone does not attribute (the device is nowhere yet).
        let c = f.s.admit(&p("MRN-1"), "icu-1", T0, None, &f.cfg).unwrap();
        assert_eq!(c.reattributed, 0);
        // The placement, back-dated to T0 + 10 min, attributes 2 and 3 only.
        let c =
            f.s.place_device(G, "mon-1", "icu-1", T0 + 10 * MIN, &f.cfg)
                .unwrap();
        assert_eq!(c.reattributed, 2);
        f.assert_who("mon-1", 1, None, "unattributed");
        f.assert_who("mon-1", 2, Some("MRN-1"), "stay");
        f.assert_who("mon-1", 3, Some("MRN-1"), "stay");
        // Placing it where it is already is a no-op.
        let c =
            f.s.place_device(G, "mon-1", "icu-1", T0 + 15 * MIN, &f.cfg)
                .unwrap();
        assert_eq!(c.reattributed, 0);
        // Correcting the placement to an earlier time picks up reading 1.
        let c = f.s.place_device(G, "mon-1", "icu-1", T0, &f.cfg).unwrap();
        assert_eq!(c.reattributed, 1);
        f.assert_who("mon-1", 1, Some("MRN-1"), "stay");
        let placements: i64 =
            f.s.lock()
                .unwrap()
                .query_row("SELECT COUNT(*) FROM device_placements", [], |r| r.get(0))
                .unwrap();
        assert_eq!(placements, 1, "adjacent placements at one bed are merged");
    }

    #[test]
    fn interval_boundaries_are_half_open() {
        let mut f = Fx::new();
        f.s.place_device(G, "mon-1", "icu-1", T0, &f.cfg).unwrap();
        f.s.place_device(G, "mon-2", "icu-2", T0, &f.cfg).unwrap();
        f.s.admit(&p("MRN-1"), "icu-1", T0, None, &f.cfg).unwrap();
        let t_transfer = T0 + 30 * MIN;
        let t_discharge = T0 + 60 * MIN;
        f.s.transfer(&p("MRN-1"), "icu-2", t_transfer, &f.cfg)
            .unwrap();
        f.s.discharge(&p("MRN-1"), t_discharge, &f.cfg).unwrap();
        f.ingest(
            "mon-1",
            vec![reading(1, t_transfer - 1), reading(2, t_transfer)],
        );
        f.ingest(
            "mon-2",
            vec![
                reading(1, t_transfer - 1),
                reading(2, t_transfer),
                reading(3, t_discharge - 1),
                reading(4, t_discharge),
            ],
        );
        f.assert_who("mon-1", 1, Some("MRN-1"), "stay");
        f.assert_who("mon-1", 2, None, "unattributed");
        f.assert_who("mon-2", 1, None, "unattributed");
        f.assert_who("mon-2", 2, Some("MRN-1"), "stay");
        f.assert_who("mon-2", 3, Some("MRN-1"), "stay");
        f.assert_who("mon-2", 4, None, "unattributed");
        // Removing a device at an instant: a reading at that instant is no
        // longer at the bed.
        f.s.admit(&p("MRN-2"), "icu-1", t_discharge, None, &f.cfg)
            .unwrap();
        f.s.remove_device(G, "mon-1", t_discharge + MIN, &f.cfg)
            .unwrap();
        f.ingest(
            "mon-1",
            vec![
                reading(3, t_discharge + MIN - 1),
                reading(4, t_discharge + MIN),
            ],
        );
        f.assert_who("mon-1", 3, Some("MRN-2"), "stay");
        f.assert_who("mon-1", 4, None, "unattributed");
    }

    #[test]
    fn a_back_dated_transfer_moves_readings_consistently() {
        let mut f = Fx::new();
        f.s.place_device(G, "mon-a", "icu-1", T0, &f.cfg).unwrap();
        f.s.place_device(G, "mon-b", "icu-2", T0, &f.cfg).unwrap();
        f.s.admit(&p("MRN-1"), "icu-1", T0, None, &f.cfg).unwrap();
        f.ingest(
            "mon-a",
            vec![reading(1, T0 + MIN), reading(2, T0 + 40 * MIN)],
        );
        f.ingest(
            "mon-b",
            vec![reading(1, T0 + MIN), reading(2, T0 + 40 * MIN)],
        );
        f.assert_who("mon-a", 2, Some("MRN-1"), "stay");
        f.assert_who("mon-b", 2, None, "unattributed");
        // The transfer happened at T0 + 30 min; it is recorded later.
        let c =
            f.s.transfer(&p("MRN-1"), "icu-2", T0 + 30 * MIN, &f.cfg)
                .unwrap();
        assert_eq!(c.reattributed, 2);
        f.assert_who("mon-a", 1, Some("MRN-1"), "stay");
        f.assert_who("mon-a", 2, None, "unattributed");
        f.assert_who("mon-b", 1, None, "unattributed");
        f.assert_who("mon-b", 2, Some("MRN-1"), "stay");
        // A second patient admitted to the freed bed takes mon-a's reading.
        f.s.admit(&p("MRN-2"), "icu-1", T0 + 35 * MIN, None, &f.cfg)
            .unwrap();
        f.assert_who("mon-a", 2, Some("MRN-2"), "stay");
        // The transfer was even earlier (T0 + 20 min) for MRN-1: recorded
        // again, it moves the start of the icu-2 stay back.
        let c =
            f.s.transfer(&p("MRN-1"), "icu-2", T0 + 20 * MIN, &f.cfg)
                .unwrap();
        assert_eq!(c.reattributed, 0, "no reading in the moved span");
        assert_eq!(
            f.s.bed_of(&p("MRN-1"), T0 + 25 * MIN).unwrap().as_deref(),
            Some("icu-2")
        );
        let stays: i64 =
            f.s.lock()
                .unwrap()
                .query_row(
                    "SELECT COUNT(*) FROM patient_stays WHERE patient_value = 'MRN-1'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
        assert_eq!(stays, 2, "icu-1 then one merged icu-2 stay");
        // A back-dated discharge takes the readings back.
        let c = f.s.discharge(&p("MRN-1"), T0 + 30 * MIN, &f.cfg).unwrap();
        assert_eq!(c.reattributed, 1);
        f.assert_who("mon-b", 2, None, "unattributed");
    }

    #[test]
    fn the_readings_own_subject_wins_and_the_config_map_is_the_fallback() {
        let mut f = Fx::new();
        f.cfg
            .insert((G.into(), "mon-1".into()), "cfg-patient".into());
        f.s.place_device(G, "mon-1", "icu-1", T0, &f.cfg).unwrap();
        let mut own = reading(1, T0 + MIN);
        own.subject = Some(Identifier {
            system: "urn:other".into(),
            value: "MRN-9".into(),
        });
        f.ingest("mon-1", vec![own, reading(2, T0 + MIN)]);
        f.assert_who("mon-1", 1, Some("MRN-9"), "subject");
        f.assert_who("mon-1", 2, Some("cfg-patient"), "config");
        // A stay covering them takes the config-attributed reading only.
        let c = f.s.admit(&p("MRN-1"), "icu-1", T0, None, &f.cfg).unwrap();
        assert_eq!(c.reattributed, 1);
        f.assert_who("mon-1", 1, Some("MRN-9"), "subject");
        f.assert_who("mon-1", 2, Some("MRN-1"), "stay");
        // Undone (discharged at admission): back to the config map.
        f.s.discharge(&p("MRN-1"), T0, &f.cfg).unwrap();
        f.assert_who("mon-1", 2, Some("cfg-patient"), "config");
        f.assert_who("mon-1", 1, Some("MRN-9"), "subject");
    }

    #[test]
    fn conflicting_changes_are_refused_and_repeats_are_no_ops() {
        let f = Fx::new();
        let c = &f.cfg;
        f.s.admit(&p("MRN-1"), "icu-1", T0, Some("V1"), c).unwrap();
        assert!(matches!(
            f.s.admit(&p("MRN-2"), "icu-1", T0 + MIN, None, c),
            Err(AssocError::BedOccupied(_))
        ));
        // A back-dated admission into a bed occupied later is refused too.
        assert!(matches!(
            f.s.admit(&p("MRN-2"), "icu-1", T0 - MIN, None, c),
            Err(AssocError::BedOccupied(_))
        ));
        assert!(matches!(
            f.s.admit(&p("MRN-1"), "icu-2", T0 + MIN, None, c),
            Err(AssocError::AlreadyAdmitted)
        ));
        // The same admission again (an ADT resend) is accepted as is.
        f.s.admit(&p("MRN-1"), "icu-1", T0, Some("V1"), c).unwrap();
        assert!(matches!(
            f.s.admit(&p("MRN-3"), "nope", T0, None, c),
            Err(AssocError::BedNotFound(_))
        ));
        assert!(matches!(
            f.s.transfer(&p("MRN-2"), "icu-2", T0, c),
            Err(AssocError::NotAdmitted)
        ));
        f.s.admit(&p("MRN-2"), "icu-2", T0, None, c).unwrap();
        assert!(matches!(
            f.s.transfer(&p("MRN-1"), "icu-2", T0 + MIN, c),
            Err(AssocError::BedOccupied(_))
        ));
        assert!(matches!(
            f.s.discharge(&p("MRN-3"), T0, c),
            Err(AssocError::NotAdmitted)
        ));
        f.s.discharge(&p("MRN-1"), T0 + 5 * MIN, c).unwrap();
        f.s.discharge(&p("MRN-1"), T0 + 5 * MIN, c).unwrap();
        assert!(matches!(
            f.s.remove_device(G, "mon-1", T0, c),
            Err(AssocError::NotPlaced)
        ));
        let err =
            f.s.admit(&p(""), "icu-1", T0, None, c)
                .unwrap_err()
                .to_string();
        assert!(err.contains("patient.value"), "{err}");
        let err =
            f.s.create_bed(&Bed {
                id: "a b".into(),
                ward: "W".into(),
                label: "L".into(),
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("`id`"), "{err}");
        assert!(matches!(
            f.s.create_bed(&Bed {
                id: "icu-1".into(),
                ward: "W".into(),
                label: "L".into(),
            }),
            Err(AssocError::BedExists(_))
        ));
    }

    #[test]
    fn discharge_ends_the_admission_including_later_transfers() {
        let mut f = Fx::new();
        f.s.place_device(G, "mon-3", "icu-3", T0, &f.cfg).unwrap();
        f.s.admit(&p("MRN-1"), "icu-1", T0, None, &f.cfg).unwrap();
        f.s.transfer(&p("MRN-1"), "icu-2", T0 + 10 * MIN, &f.cfg)
            .unwrap();
        f.s.transfer(&p("MRN-1"), "icu-3", T0 + 20 * MIN, &f.cfg)
            .unwrap();
        f.ingest("mon-3", vec![reading(1, T0 + 25 * MIN)]);
        f.assert_who("mon-3", 1, Some("MRN-1"), "stay");
        // Discharged from icu-1 at T0 + 5 min: the later transfers were of
        // the same admission and go too.
        let c = f.s.discharge(&p("MRN-1"), T0 + 5 * MIN, &f.cfg).unwrap();
        assert_eq!(c.reattributed, 1);
        f.assert_who("mon-3", 1, None, "unattributed");
        assert_eq!(f.s.bed_of(&p("MRN-1"), T0 + 25 * MIN).unwrap(), None);
        let occ = f.s.occupancy(T0 + 25 * MIN).unwrap();
        assert!(occ.iter().all(|b| b.patient.is_none()));
        assert_eq!(
            occ.iter()
                .find(|b| b.bed.id == "icu-3")
                .unwrap()
                .devices
                .len(),
            1
        );
    }

    #[test]
    fn an_identifier_change_of_a_visit_re_attributes_its_readings() {
        let mut f = Fx::new();
        f.s.place_device(G, "mon-1", "icu-1", T0, &f.cfg).unwrap();
        f.s.admit(&p("TMP-1"), "icu-1", T0, Some("V7"), &f.cfg)
            .unwrap();
        f.ingest("mon-1", vec![reading(1, T0 + MIN)]);
        f.assert_who("mon-1", 1, Some("TMP-1"), "stay");
        assert_eq!(f.s.stay_of_visit("V7", T0 + MIN).unwrap(), Some(p("TMP-1")));
        let c =
            f.s.change_identifier(&p("TMP-1"), &p("MRN-5"), "V7", &f.cfg)
                .unwrap();
        assert_eq!(c.reattributed, 1);
        f.assert_who("mon-1", 1, Some("MRN-5"), "stay");
    }

    #[test]
    fn rows_stored_before_v5_are_legacy_or_unattributed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v4.sqlite");
        {
            let s = Store::open(&path).unwrap();
            let c = s.lock().unwrap();
            c.execute_batch(
                "INSERT INTO observations (id, gateway_id, device_id, sequence, patient_id, loinc,
                     mdc_code, effective_us, status, batch_sequence, received_us, resource, attribution)
                 VALUES ('a', 'g', 'd', 1, 'p', 'l', 1, 1, 'final', 1, 1, '', NULL),
                        ('b', 'g', 'd', 2, NULL, 'l', 1, 1, 'final', 1, 1, '', NULL);
                 DELETE FROM schema_migrations WHERE version >= 5;
                 DROP TABLE patient_stays; DROP TABLE device_placements; DROP TABLE beds;
                 DROP INDEX IF EXISTS observations_pending;
                 ALTER TABLE observations DROP COLUMN attribution;
                 ALTER TABLE observations DROP COLUMN patient_system;",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let rows: Vec<(String, String)> = s
            .lock()
            .unwrap()
            .prepare("SELECT id, attribution FROM observations ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            rows,
            vec![
                ("a".into(), "legacy".into()),
                ("b".into(), "unattributed".into())
            ]
        );
    }
}
