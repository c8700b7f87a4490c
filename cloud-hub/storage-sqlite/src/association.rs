//! Patient association on SQLite: beds, device placements and patient
//! stays (schema v5), and the re-attribution of stored readings. Every
//! change runs in one transaction on the store's single connection (which
//! serialises it with ingest); the decisions are
//! `hub_domain::association`'s: this module loads the intervals they look
//! at, applies the plan they return and runs one bounded `UPDATE` per
//! constant piece of the affected devices' attribution.

use hub_domain::association::{
    self as model, Affected, Bed, BedOccupancy, Change, Interval, Keyed, OPEN, OccupantDevice,
    OccupantPatient, PatientId, Plan, Target,
};
use hub_storage::{AssocError, AssociationStore, Associations, StoreError};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::{DbError, SqliteStore};

/// A change's outcome: `Ok(Err(_))` is a refusal (the transaction is rolled
/// back), `Err(_)` a database failure.
type Outcome<T> = Result<Result<T, AssocError>, DbError>;

fn store_error(e: impl Into<DbError>) -> AssocError {
    AssocError::Store(StoreError::from(e.into()))
}

/// The two timelines share their shape: intervals of a key (device or
/// patient) at beds.
#[derive(Clone, Copy)]
struct Timeline {
    table: &'static str,
    k1: &'static str,
    k2: &'static str,
    /// Whether rows have a `visit` (stays).
    visit: bool,
}

const PLACEMENTS: Timeline = Timeline {
    table: "device_placements",
    k1: "gateway_id",
    k2: "device_id",
    visit: false,
};
const STAYS: Timeline = Timeline {
    table: "patient_stays",
    k1: "patient_system",
    k2: "patient_value",
    visit: true,
};

fn row_interval(r: &rusqlite::Row<'_>) -> rusqlite::Result<Interval> {
    Ok(Interval {
        id: r.get(0)?,
        bed: r.get(1)?,
        from: r.get(2)?,
        to: r.get(3)?,
        visit: r.get(4)?,
    })
}

impl Timeline {
    /// The columns [`row_interval`] reads.
    fn columns(self) -> &'static str {
        if self.visit {
            "id, bed_id, from_us, to_us, visit"
        } else {
            "id, bed_id, from_us, to_us, NULL"
        }
    }

    /// The key's intervals overlapping `[lo, hi)`, by start.
    fn overlapping(
        self,
        c: &Connection,
        k: (&str, &str),
        lo: i64,
        hi: i64,
    ) -> rusqlite::Result<Vec<Interval>> {
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = ?1 AND {} = ?2
               AND from_us < ?4 AND COALESCE(to_us, {OPEN}) > ?3 ORDER BY from_us",
            self.columns(),
            self.table,
            self.k1,
            self.k2
        );
        let mut st = c.prepare_cached(&sql)?;
        st.query_map(params![k.0, k.1, lo, hi], row_interval)?
            .collect()
    }

    /// The key's intervals ending at or after `at` (what a change at `at`
    /// looks at, including the one ending exactly there).
    fn ending_from(
        self,
        c: &Connection,
        k: (&str, &str),
        at: i64,
    ) -> rusqlite::Result<Vec<Interval>> {
        self.overlapping(c, k, at.saturating_sub(1), OPEN)
    }

    /// Intervals of a bed overlapping `[lo, hi)`, with their keys.
    fn at_bed(self, c: &Connection, bed: &str, lo: i64, hi: i64) -> rusqlite::Result<Vec<Keyed>> {
        let sql = format!(
            "SELECT {}, {}, {} FROM {} WHERE bed_id = ?1
               AND from_us < ?3 AND COALESCE(to_us, {OPEN}) > ?2 ORDER BY from_us",
            self.columns(),
            self.k1,
            self.k2,
            self.table
        );
        let mut st = c.prepare_cached(&sql)?;
        st.query_map(params![bed, lo, hi], |r| {
            Ok((r.get(5)?, r.get(6)?, row_interval(r)?))
        })?
        .collect()
    }

    /// Writes a plan of key `k`: deletes, new ends, inserts.
    fn apply(self, tx: &Transaction<'_>, k: (&str, &str), plan: &Plan) -> rusqlite::Result<()> {
        for id in &plan.delete {
            tx.execute(&format!("DELETE FROM {} WHERE id = ?1", self.table), [id])?;
        }
        for (id, to) in &plan.set_end {
            tx.execute(
                &format!("UPDATE {} SET to_us = ?2 WHERE id = ?1", self.table),
                params![id, to],
            )?;
        }
        for n in &plan.insert {
            if self.visit {
                tx.execute(
                    &format!(
                        "INSERT INTO {} ({}, {}, bed_id, from_us, to_us, visit)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        self.table, self.k1, self.k2
                    ),
                    params![k.0, k.1, n.bed, n.from, n.to, n.visit],
                )?;
            } else {
                tx.execute(
                    &format!(
                        "INSERT INTO {} ({}, {}, bed_id, from_us, to_us)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        self.table, self.k1, self.k2
                    ),
                    params![k.0, k.1, n.bed, n.from, n.to],
                )?;
            }
        }
        Ok(())
    }

    /// Applies `plan` and re-attributes what it affects.
    fn run(
        self,
        tx: &Transaction<'_>,
        k: (&str, &str),
        plan: Plan,
        fallback: &Associations,
    ) -> Result<Change, DbError> {
        self.apply(tx, k, &plan)?;
        reattribute(tx, plan.affected, fallback)
    }
}

/// Recomputes the attribution of every affected reading.
fn reattribute(
    tx: &Transaction<'_>,
    affected: Affected,
    fallback: &Associations,
) -> Result<Change, DbError> {
    let mut spans = affected.devices;
    for (bed, lo, hi) in &affected.beds {
        let at_bed = PLACEMENTS.at_bed(tx, bed, *lo, *hi)?;
        spans.extend(model::device_spans(*lo, *hi, &at_bed));
    }
    let mut n = 0;
    for (g, d, lo, hi) in spans {
        n += reattribute_device(tx, &g, &d, lo, hi, fallback)?;
    }
    Ok(Change { reattributed: n })
}

/// Re-attributes device `(g, d)`'s readings in `[lo, hi)` that are not
/// attributed by their own subject (nor `legacy`); the number of rows that
/// changed. Chart buckets follow the rows to their new patient.
fn reattribute_device(
    tx: &Transaction<'_>,
    g: &str,
    d: &str,
    lo: i64,
    hi: i64,
    fallback: &Associations,
) -> Result<u64, DbError> {
    let placements = PLACEMENTS.overlapping(tx, (g, d), lo, hi)?;
    let mut stays = Vec::new();
    for (bed, a, b) in model::bed_windows(lo, hi, &placements) {
        for (system, value, s) in STAYS.at_bed(tx, &bed, a, b)? {
            stays.push((bed.clone(), PatientId { system, value }, s));
        }
    }
    let config = fallback
        .get(&(g.to_owned(), d.to_owned()))
        .map(String::as_str);
    let mut st = tx.prepare_cached(
        "UPDATE observations SET patient_system = ?5, patient_id = ?6, attribution = ?7
          WHERE gateway_id = ?1 AND device_id = ?2 AND effective_us >= ?3 AND effective_us < ?4
            AND attribution IN ('stay', 'config', 'unattributed')
            AND (patient_system IS NOT ?5 OR patient_id IS NOT ?6 OR attribution IS NOT ?7)",
    )?;
    let mut n = 0u64;
    for piece in model::pieces(lo, hi, &placements, &stays) {
        let t = Target::of(&piece, config);
        n += st.execute(params![
            g, d, piece.from, piece.to, t.system, t.value, t.how
        ])? as u64;
    }
    if n > 0 {
        crate::trends::rebuild_device(tx, g, d, lo, hi)?;
    }
    Ok(n)
}

fn bed_exists(c: &Connection, bed: &str) -> rusqlite::Result<bool> {
    Ok(
        c.query_row("SELECT 1 FROM beds WHERE id = ?1", [bed], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

/// A refusal or a plan's outcome, as the transaction closure returns it.
fn decided(
    r: Result<Option<Plan>, model::Conflict>,
    f: impl FnOnce(Plan) -> Result<Change, DbError>,
) -> Outcome<Change> {
    match r {
        Err(c) => Ok(Err(c.into())),
        Ok(None) => Ok(Ok(Change::default())),
        Ok(Some(plan)) => Ok(Ok(f(plan)?)),
    }
}

impl SqliteStore {
    /// Runs `f` in one transaction, committed unless it refuses or fails.
    fn assoc_tx<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Outcome<T>) -> Result<T, AssocError> {
        let mut conn = self.conn().map_err(store_error)?;
        let tx = conn.transaction().map_err(store_error)?;
        match f(&tx) {
            Ok(Ok(v)) => {
                tx.commit().map_err(store_error)?;
                Ok(v)
            }
            Ok(Err(refused)) => Err(refused),
            Err(e) => Err(store_error(e)),
        }
    }

    fn db_occupancy(&self, at: i64) -> Result<Vec<BedOccupancy>, DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let beds = list_beds(&tx)?;
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
}

fn list_beds(c: &Connection) -> rusqlite::Result<Vec<Bed>> {
    let mut st = c.prepare_cached("SELECT id, ward, label FROM beds ORDER BY ward, id")?;
    st.query_map([], |r| {
        Ok(Bed {
            id: r.get(0)?,
            ward: r.get(1)?,
            label: r.get(2)?,
        })
    })?
    .collect()
}

impl AssociationStore for SqliteStore {
    fn create_bed(&self, bed: &Bed) -> Result<(), AssocError> {
        self.assoc_tx(|tx| {
            let n = tx.execute(
                "INSERT OR IGNORE INTO beds (id, ward, label, created_us) VALUES (?1, ?2, ?3, ?4)",
                params![bed.id, bed.ward, bed.label, hub_domain::clock::now_us()],
            )?;
            Ok(if n == 0 {
                Err(AssocError::BedExists(bed.id.clone()))
            } else {
                Ok(())
            })
        })
    }

    fn list_beds(&self) -> Result<Vec<Bed>, AssocError> {
        let conn = self.conn().map_err(store_error)?;
        list_beds(&conn).map_err(store_error)
    }

    fn place_device(
        &self,
        g: &str,
        d: &str,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        self.assoc_tx(|tx| {
            if !bed_exists(tx, bed)? {
                return Ok(Err(AssocError::BedNotFound(bed.to_owned())));
            }
            let mine = PLACEMENTS.ending_from(tx, (g, d), at)?;
            decided(Ok(model::place(g, d, &mine, bed, at)), |plan| {
                PLACEMENTS.run(tx, (g, d), plan, fallback)
            })
        })
    }

    fn remove_device(
        &self,
        g: &str,
        d: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        self.assoc_tx(|tx| {
            let mine = PLACEMENTS.ending_from(tx, (g, d), at)?;
            decided(model::remove(g, d, &mine, at).map(Some), |plan| {
                PLACEMENTS.run(tx, (g, d), plan, fallback)
            })
        })
    }

    fn admit(
        &self,
        patient: &PatientId,
        bed: &str,
        at: i64,
        visit: Option<&str>,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        let k = (patient.system.as_str(), patient.value.as_str());
        self.assoc_tx(|tx| {
            if !bed_exists(tx, bed)? {
                return Ok(Err(AssocError::BedNotFound(bed.to_owned())));
            }
            let mine = STAYS.ending_from(tx, k, at)?;
            let at_bed = STAYS.at_bed(tx, bed, at, OPEN)?;
            decided(model::admit(&mine, &at_bed, bed, at, visit), |plan| {
                STAYS.run(tx, k, plan, fallback)
            })
        })
    }

    fn transfer(
        &self,
        patient: &PatientId,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        let k = (patient.system.as_str(), patient.value.as_str());
        self.assoc_tx(|tx| {
            if !bed_exists(tx, bed)? {
                return Ok(Err(AssocError::BedNotFound(bed.to_owned())));
            }
            let mine = STAYS.ending_from(tx, k, at)?;
            let at_bed = STAYS.at_bed(tx, bed, at, OPEN)?;
            decided(model::transfer(k, &mine, &at_bed, bed, at), |plan| {
                STAYS.run(tx, k, plan, fallback)
            })
        })
    }

    fn discharge(
        &self,
        patient: &PatientId,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        let k = (patient.system.as_str(), patient.value.as_str());
        self.assoc_tx(|tx| {
            let mine = STAYS.ending_from(tx, k, at)?;
            decided(model::discharge(&mine, at), |plan| {
                STAYS.run(tx, k, plan, fallback)
            })
        })
    }

    fn stay_of_visit(&self, visit: &str, at: i64) -> Result<Option<PatientId>, AssocError> {
        let conn = self.conn().map_err(store_error)?;
        conn.query_row(
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
        .optional()
        .map_err(store_error)
    }

    fn bed_of(&self, patient: &PatientId, at: i64) -> Result<Option<String>, AssocError> {
        let conn = self.conn().map_err(store_error)?;
        let k = (patient.system.as_str(), patient.value.as_str());
        Ok(STAYS
            .overlapping(&conn, k, at, at.saturating_add(1))
            .map_err(store_error)?
            .into_iter()
            .next()
            .map(|s| s.bed))
    }

    fn change_identifier(
        &self,
        old: &PatientId,
        new: &PatientId,
        visit: &str,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        self.assoc_tx(|tx| {
            let stays: Vec<Interval> = tx
                .prepare_cached(&format!(
                    "SELECT {} FROM patient_stays
                      WHERE visit = ?1 AND patient_system = ?2 AND patient_value = ?3",
                    STAYS.columns()
                ))?
                .query_map(params![visit, old.system, old.value], row_interval)?
                .collect::<Result<_, _>>()?;
            let theirs = match model::span(&stays) {
                Some((lo, hi)) => STAYS.overlapping(tx, (&new.system, &new.value), lo, hi)?,
                None => Vec::new(),
            };
            let affected = match model::change_identifier(&stays, &theirs) {
                Ok(a) => a,
                Err(c) => return Ok(Err(c.into())),
            };
            for s in &stays {
                tx.execute(
                    "UPDATE patient_stays SET patient_system = ?2, patient_value = ?3 WHERE id = ?1",
                    params![s.id, new.system, new.value],
                )?;
            }
            Ok(Ok(reattribute(tx, affected, fallback)?))
        })
    }

    fn occupancy(&self, at: i64) -> Result<Vec<BedOccupancy>, AssocError> {
        self.db_occupancy(at).map_err(store_error)
    }

    fn unattributed_count(&self) -> Result<u64, AssocError> {
        let conn = self.conn().map_err(store_error)?;
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM observations WHERE attribution = 'unattributed'",
                [],
                |r| r.get(0),
            )
            .map_err(store_error)?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hub_domain::association::{Bed, PatientId};
    use hub_storage::{AssocError, AssociationStore, Associations, IngestStore};
    use shared_protocol::catalogue::codes;
    use shared_protocol::v1::{DeviceData, DeviceInfo, Identifier, Reading, reading};

    const G: &str = "gw";
    /// A time in 2023, µs.
    const T0: i64 = 1_700_000_000_000_000;
    const MIN: i64 = 60_000_000;

    struct Fx {
        _dir: tempfile::TempDir,
        s: SqliteStore,
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
            let s = SqliteStore::open(&dir.path().join("a.sqlite")).unwrap();
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
            let now = hub_domain::clock::now_us();
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
            let s = SqliteStore::open(&path).unwrap();
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
        let s = SqliteStore::open(&path).unwrap();
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
