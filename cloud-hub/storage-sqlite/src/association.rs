//! Patient association on SQLite: beds, device placements and patient
//! stays (schema v5), and the re-attribution of stored readings. Every
//! change runs in one transaction on the store's single connection (which
//! serialises it with ingest). What to load, write and re-attribute is
//! decided once, by `hub_storage::procedure` and `hub_domain::association`;
//! this module is the SQL of [`AssocTx`].

use hub_domain::association::{
    Bed, BedOccupancy, Change, Interval, Keyed, OPEN, PatientId, Piece, Plan, Subject, Target,
};
use hub_storage::{
    AssocError, AssocTx, AssociationStore, Associations, StoreError, SystemsMigrated, Timeline,
    procedure, systems_to_migrate,
};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::{DbError, SqliteStore};

/// A change's outcome: `Ok(Err(_))` is a refusal (the transaction is rolled
/// back), `Err(_)` a database failure.
type Outcome<T> = Result<Result<T, AssocError>, DbError>;

fn store_error(e: impl Into<DbError>) -> AssocError {
    AssocError::Store(StoreError::from(e.into()))
}

/// A timeline's table and key columns.
struct Table {
    name: &'static str,
    k1: &'static str,
    k2: &'static str,
    /// The columns [`row_interval`] reads.
    columns: &'static str,
}

fn table(t: Timeline) -> Table {
    match t {
        Timeline::Placements => Table {
            name: "device_placements",
            k1: "gateway_id",
            k2: "device_id",
            columns: "id, bed_id, from_us, to_us, NULL",
        },
        Timeline::Stays => Table {
            name: "patient_stays",
            k1: "patient_system",
            k2: "patient_value",
            columns: "id, bed_id, from_us, to_us, visit",
        },
    }
}

fn row_interval(r: &rusqlite::Row<'_>) -> rusqlite::Result<Interval> {
    Ok(Interval {
        id: r.get(0)?,
        bed: r.get(1)?,
        from: r.get(2)?,
        to: r.get(3)?,
        visit: r.get(4)?,
    })
}

/// The key's intervals overlapping `[lo, hi)`, by start.
fn overlapping(
    c: &Connection,
    t: Timeline,
    k: (&str, &str),
    lo: i64,
    hi: i64,
) -> rusqlite::Result<Vec<Interval>> {
    let t = table(t);
    let sql = format!(
        "SELECT {} FROM {} WHERE {} = ?1 AND {} = ?2
           AND from_us < ?4 AND COALESCE(to_us, {OPEN}) > ?3 ORDER BY from_us",
        t.columns, t.name, t.k1, t.k2
    );
    let mut st = c.prepare_cached(&sql)?;
    st.query_map(params![k.0, k.1, lo, hi], row_interval)?
        .collect()
}

/// Intervals of a bed overlapping `[lo, hi)`, with their keys.
fn at_bed(
    c: &Connection,
    t: Timeline,
    bed: &str,
    lo: i64,
    hi: i64,
) -> rusqlite::Result<Vec<Keyed>> {
    let t = table(t);
    let sql = format!(
        "SELECT {}, {}, {} FROM {} WHERE bed_id = ?1
           AND from_us < ?3 AND COALESCE(to_us, {OPEN}) > ?2 ORDER BY from_us",
        t.columns, t.k1, t.k2, t.name
    );
    let mut st = c.prepare_cached(&sql)?;
    st.query_map(params![bed, lo, hi], |r| {
        Ok((r.get(5)?, r.get(6)?, row_interval(r)?))
    })?
    .collect()
}

/// [`AssocTx`] on a SQLite transaction.
pub(crate) struct Tx<'a, 'c>(pub(crate) &'a Transaction<'c>);

impl AssocTx for Tx<'_, '_> {
    type Error = DbError;

    fn bed_exists(&mut self, bed: &str) -> Result<bool, DbError> {
        Ok(self
            .0
            .query_row("SELECT 1 FROM beds WHERE id = ?1", [bed], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn overlapping(
        &mut self,
        t: Timeline,
        key: (&str, &str),
        lo: i64,
        hi: i64,
    ) -> Result<Vec<Interval>, DbError> {
        Ok(overlapping(self.0, t, key, lo, hi)?)
    }

    fn at_bed(&mut self, t: Timeline, bed: &str, lo: i64, hi: i64) -> Result<Vec<Keyed>, DbError> {
        Ok(at_bed(self.0, t, bed, lo, hi)?)
    }

    fn stays_of_visit(&mut self, visit: &str, key: (&str, &str)) -> Result<Vec<Interval>, DbError> {
        let sql = format!(
            "SELECT {} FROM patient_stays
              WHERE visit = ?1 AND patient_system = ?2 AND patient_value = ?3",
            table(Timeline::Stays).columns
        );
        let mut st = self.0.prepare_cached(&sql)?;
        Ok(st
            .query_map(params![visit, key.0, key.1], row_interval)?
            .collect::<Result<_, _>>()?)
    }

    fn apply(&mut self, t: Timeline, k: (&str, &str), plan: &Plan) -> Result<(), DbError> {
        let tx = self.0;
        let tb = table(t);
        for id in &plan.delete {
            tx.execute(&format!("DELETE FROM {} WHERE id = ?1", tb.name), [id])?;
        }
        for (id, to) in &plan.set_end {
            tx.execute(
                &format!("UPDATE {} SET to_us = ?2 WHERE id = ?1", tb.name),
                params![id, to],
            )?;
        }
        for n in &plan.insert {
            match t {
                Timeline::Stays => tx.execute(
                    "INSERT INTO patient_stays
                         (patient_system, patient_value, bed_id, from_us, to_us, visit)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![k.0, k.1, n.bed, n.from, n.to, n.visit],
                )?,
                Timeline::Placements => tx.execute(
                    "INSERT INTO device_placements (gateway_id, device_id, bed_id, from_us, to_us)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![k.0, k.1, n.bed, n.from, n.to],
                )?,
            };
        }
        Ok(())
    }

    fn rekey_stays(&mut self, ids: &[i64], new: &PatientId) -> Result<(), DbError> {
        for id in ids {
            self.0.execute(
                "UPDATE patient_stays SET patient_system = ?2, patient_value = ?3 WHERE id = ?1",
                params![id, new.system, new.value],
            )?;
        }
        Ok(())
    }

    fn set_attribution(
        &mut self,
        g: &str,
        d: &str,
        piece: &Piece,
        t: &Target,
        stamp_us: i64,
    ) -> Result<Vec<(Option<Subject>, u64)>, DbError> {
        // The device's rows of the piece, through its minutes (`?9`, `?10`).
        let rows = crate::minutes::device_window("?1", "?2", "?3", "?4", "?9", "?10");
        let where_sql = format!(
            "rowid IN ({rows}) AND attribution IN ('stay', 'config', 'unattributed')
                AND (patient_system IS NOT ?5 OR patient_id IS NOT ?6 OR attribution IS NOT ?7)"
        );
        let (lo_min, hi_min) = crate::minutes::minutes_of(piece.from, piece.to);
        // `?8` (the stamp) is only the update's; bound to both statements.
        let args = params![
            g, d, piece.from, piece.to, t.system, t.value, t.how, stamp_us, lo_min, hi_min
        ];
        // The patients the rows had, counted, before they change (same
        // transaction, same rows).
        let before: Vec<(Option<Subject>, u64)> = self
            .0
            .prepare_cached(&format!(
                "SELECT patient_system, patient_id, COUNT(*) FROM observations WHERE {where_sql}
                  GROUP BY patient_system, patient_id"
            ))?
            .query_map(args, |r| {
                Ok((
                    Subject::of(r.get(0)?, r.get(1)?),
                    r.get::<_, i64>(2)? as u64,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        if before.is_empty() {
            return Ok(before);
        }
        self.0
            .prepare_cached(&format!(
                "UPDATE observations SET patient_system = ?5, patient_id = ?6, attribution = ?7,
                        version = version + 1, updated_us = ?8
                  WHERE {where_sql}"
            ))?
            .execute(args)?;
        Ok(before)
    }

    /// Chart buckets follow the rows to their new patient.
    fn reattributed(&mut self, g: &str, d: &str, lo: i64, hi: i64) -> Result<(), DbError> {
        Ok(crate::trends::rebuild_device(self.0, g, d, lo, hi)?)
    }

    fn erased_at(&mut self, patient: &PatientId) -> Result<Option<i64>, DbError> {
        crate::privacy::erased_at(self.0, patient)
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

impl SqliteStore {
    /// Runs `f` in one transaction, committed unless it refuses or fails.
    fn assoc_tx<T>(&self, f: impl FnOnce(&mut Tx<'_, '_>) -> Outcome<T>) -> Result<T, AssocError> {
        let mut conn = self.conn().map_err(store_error)?;
        let tx = conn.transaction().map_err(store_error)?;
        match f(&mut Tx(&tx)) {
            Ok(Ok(v)) => {
                tx.commit().map_err(store_error)?;
                Ok(v)
            }
            Ok(Err(refused)) => Err(refused),
            Err(e) => Err(store_error(e)),
        }
    }

    /// Runs a read in one transaction (a consistent view).
    fn assoc_read<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_, '_>) -> Result<T, DbError>,
    ) -> Result<T, AssocError> {
        self.assoc_tx(|tx| Ok(Ok(f(tx)?)))
    }
}

impl AssociationStore for SqliteStore {
    fn create_bed(&self, bed: &Bed) -> Result<(), AssocError> {
        self.assoc_tx(|tx| {
            let n = tx.0.execute(
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
        self.assoc_tx(|tx| procedure::place_device(tx, g, d, bed, at, fallback))
    }

    fn remove_device(
        &self,
        g: &str,
        d: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        self.assoc_tx(|tx| procedure::remove_device(tx, g, d, at, fallback))
    }

    fn admit(
        &self,
        patient: &PatientId,
        bed: &str,
        at: i64,
        visit: Option<&str>,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        self.assoc_tx(|tx| procedure::admit(tx, patient, bed, at, visit, fallback))
    }

    fn transfer(
        &self,
        patient: &PatientId,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        self.assoc_tx(|tx| procedure::transfer(tx, patient, bed, at, fallback))
    }

    fn discharge(
        &self,
        patient: &PatientId,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        self.assoc_tx(|tx| procedure::discharge(tx, patient, at, fallback))
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
        self.assoc_read(|tx| procedure::bed_of(tx, patient, at))
    }

    fn change_identifier(
        &self,
        old: &PatientId,
        new: &PatientId,
        visit: &str,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        self.assoc_tx(|tx| procedure::change_identifier(tx, old, new, visit, fallback))
    }

    fn occupancy(&self, at: i64) -> Result<Vec<BedOccupancy>, AssocError> {
        self.assoc_read(|tx| {
            let beds = list_beds(tx.0)?;
            procedure::occupancy(tx, beds, at)
        })
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

    fn migrate_patient_systems(
        &self,
        map: &(dyn Fn(&str) -> String + Sync),
    ) -> Result<SystemsMigrated, AssocError> {
        self.assoc_tx(|tx| {
            let mut stored = Vec::new();
            for sql in [
                "SELECT DISTINCT patient_system FROM patient_stays",
                "SELECT DISTINCT patient_system FROM observations WHERE patient_system IS NOT NULL",
            ] {
                let mut stmt = tx.0.prepare(sql)?;
                for s in stmt.query_map([], |r| r.get::<_, String>(0))? {
                    stored.push(s?);
                }
            }
            let mut done = SystemsMigrated::default();
            for (old, new) in systems_to_migrate(stored, map) {
                done.systems += 1;
                done.stays += tx.0.execute(
                    "UPDATE patient_stays SET patient_system = ?2 WHERE patient_system = ?1",
                    params![old, new],
                )? as u64;
                done.observations += tx.0.execute(
                    "UPDATE observations SET patient_system = ?2 WHERE patient_system = ?1",
                    params![old, new],
                )? as u64;
            }
            Ok(Ok(done))
        })
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
                .conn()
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
            f.s.conn()
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
            f.s.conn()
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
            f.s.conn()
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
            let c = s.conn().unwrap();
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
            .conn()
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
