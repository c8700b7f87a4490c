//! Patient association on PostgreSQL: the same timelines as on SQLite, in
//! transactions holding the exclusive association advisory lock
//! ([`ASSOC_LOCK`]; ingest holds it shared). What to load, write and
//! re-attribute is decided once, by `hub_storage::procedure` and
//! `hub_domain::association`; this module is the SQL of [`AssocTx`].

use futures_executor::block_on;
use hub_domain::association::{
    Bed, BedOccupancy, Change, Interval, Keyed, OPEN, PatientId, Piece, Plan, Subject, Target,
};
use hub_storage::{
    AssocError, AssocTx, AssociationStore, Associations, StoreError, SystemsMigrated, Timeline,
    procedure, systems_to_migrate,
};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::{ASSOC_LOCK, DbError, PgStore};

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
    /// The columns [`interval`] reads.
    columns: &'static str,
}

fn table(t: Timeline) -> Table {
    match t {
        Timeline::Placements => Table {
            name: "device_placements",
            k1: "gateway_id",
            k2: "device_id",
            columns: "id, bed_id, from_us, to_us, NULL::text",
        },
        Timeline::Stays => Table {
            name: "patient_stays",
            k1: "patient_system",
            k2: "patient_value",
            columns: "id, bed_id, from_us, to_us, visit",
        },
    }
}

fn interval(r: &Row) -> Interval {
    Interval {
        id: r.get(0),
        bed: r.get(1),
        from: r.get(2),
        to: r.get(3),
        visit: r.get(4),
    }
}

/// [`AssocTx`] on a PostgreSQL transaction. The procedures of
/// `hub_storage::procedure` are synchronous: each statement is awaited here,
/// on the calling thread (which has the store's I/O runtime entered, see
/// [`PgStore::assoc_tx`]).
pub(crate) struct Tx<'a, 'b>(pub(crate) &'a deadpool_postgres::Transaction<'b>);

pub(crate) type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl Tx<'_, '_> {
    // Each statement prepared once per connection (the pool's statement
    // cache; the texts are a fixed set).
    pub(crate) fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, DbError> {
        Ok(block_on(async {
            let st = self.0.prepare_cached(sql).await?;
            self.0.query(&st, params).await
        })?)
    }
    pub(crate) fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, DbError> {
        Ok(block_on(async {
            let st = self.0.prepare_cached(sql).await?;
            self.0.query_opt(&st, params).await
        })?)
    }
    pub(crate) fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, DbError> {
        Ok(block_on(async {
            let st = self.0.prepare_cached(sql).await?;
            self.0.query_one(&st, params).await
        })?)
    }
    pub(crate) fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, DbError> {
        Ok(block_on(async {
            let st = self.0.prepare_cached(sql).await?;
            self.0.execute(&st, params).await
        })?)
    }
}

impl AssocTx for Tx<'_, '_> {
    type Error = DbError;

    fn bed_exists(&mut self, bed: &str) -> Result<bool, DbError> {
        Ok(self
            .query_opt("SELECT 1 FROM beds WHERE id = $1", &[&bed])?
            .is_some())
    }

    fn overlapping(
        &mut self,
        t: Timeline,
        k: (&str, &str),
        lo: i64,
        hi: i64,
    ) -> Result<Vec<Interval>, DbError> {
        let t = table(t);
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = $1 AND {} = $2
               AND from_us < $4 AND COALESCE(to_us, {OPEN}) > $3 ORDER BY from_us",
            t.columns, t.name, t.k1, t.k2
        );
        Ok(self
            .query(&sql, &[&k.0, &k.1, &lo, &hi])?
            .iter()
            .map(interval)
            .collect())
    }

    fn at_bed(&mut self, t: Timeline, bed: &str, lo: i64, hi: i64) -> Result<Vec<Keyed>, DbError> {
        let t = table(t);
        let sql = format!(
            "SELECT {}, {}, {} FROM {} WHERE bed_id = $1
               AND from_us < $3 AND COALESCE(to_us, {OPEN}) > $2 ORDER BY from_us",
            t.columns, t.k1, t.k2, t.name
        );
        Ok(self
            .query(&sql, &[&bed, &lo, &hi])?
            .iter()
            .map(|r| (r.get(5), r.get(6), interval(r)))
            .collect())
    }

    fn stays_of_visit(&mut self, visit: &str, key: (&str, &str)) -> Result<Vec<Interval>, DbError> {
        let sql = format!(
            "SELECT {} FROM patient_stays
              WHERE visit = $1 AND patient_system = $2 AND patient_value = $3",
            table(Timeline::Stays).columns
        );
        Ok(self
            .query(&sql, &[&visit, &key.0, &key.1])?
            .iter()
            .map(interval)
            .collect())
    }

    fn apply(&mut self, t: Timeline, k: (&str, &str), plan: &Plan) -> Result<(), DbError> {
        let tb = table(t);
        for id in &plan.delete {
            self.execute(&format!("DELETE FROM {} WHERE id = $1", tb.name), &[id])?;
        }
        for (id, to) in &plan.set_end {
            self.execute(
                &format!("UPDATE {} SET to_us = $2 WHERE id = $1", tb.name),
                &[id, to],
            )?;
        }
        for n in &plan.insert {
            match t {
                Timeline::Stays => self.execute(
                    "INSERT INTO patient_stays
                         (patient_system, patient_value, bed_id, from_us, to_us, visit)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&k.0, &k.1, &n.bed, &n.from, &n.to, &n.visit],
                )?,
                Timeline::Placements => self.execute(
                    "INSERT INTO device_placements (gateway_id, device_id, bed_id, from_us, to_us)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&k.0, &k.1, &n.bed, &n.from, &n.to],
                )?,
            };
        }
        Ok(())
    }

    fn rekey_stays(&mut self, ids: &[i64], new: &PatientId) -> Result<(), DbError> {
        for id in ids {
            self.execute(
                "UPDATE patient_stays SET patient_system = $2, patient_value = $3 WHERE id = $1",
                &[id, &new.system, &new.value],
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
        // The patients the rows had, counted: the old values of exactly the
        // rows the UPDATE changed (RETURNING), in one statement.
        // The device's rows of the piece, through its device minutes.
        let (lo_min, hi_min) = crate::minutes::minutes_of(piece.from, piece.to);
        let rows = self.query(
            &format!(
                "WITH moved AS ({}),
             changed AS (
                 UPDATE observations o
                    SET patient_system = $5, patient_id = $6, attribution = $7,
                        version = o.version + 1, updated_us = $8
                   FROM moved m
                  WHERE o.rid = m.rid AND o.effective_us = m.effective_us
                        AND o.gateway_id = $1 AND o.device_id = $2
                        AND o.effective_us >= $3 AND o.effective_us < $4
                 RETURNING m.old_system, m.old_id)
             SELECT old_system, old_id, COUNT(*) FROM changed GROUP BY old_system, old_id",
                crate::minutes::window_rows(
                    "o.rid, o.effective_us, o.patient_system AS old_system, o.patient_id AS old_id",
                    ("$1", "$2"),
                    ("$3", "$4"),
                    ("$9", "$10"),
                    "o.attribution IN ('stay', 'config', 'unattributed')
                     AND (o.patient_system IS DISTINCT FROM $5 OR o.patient_id IS DISTINCT FROM $6
                          OR o.attribution IS DISTINCT FROM $7)",
                )
            ),
            &[
                &g,
                &d,
                &piece.from,
                &piece.to,
                &t.system,
                &t.value,
                &t.how,
                &stamp_us,
                &lo_min,
                &hi_min,
            ],
        )?;
        Ok(rows
            .iter()
            .map(|r| (Subject::of(r.get(0), r.get(1)), r.get::<_, i64>(2) as u64))
            .collect())
    }

    /// Chart buckets follow the rows to their new patient.
    fn reattributed(&mut self, g: &str, d: &str, lo: i64, hi: i64) -> Result<(), DbError> {
        block_on(crate::trends::rebuild_device(self.0, g, d, lo, hi))
    }

    fn erased_at(&mut self, patient: &PatientId) -> Result<Option<i64>, DbError> {
        crate::privacy::erased_at(self, patient)
    }
}

fn list_beds(c: &Tx<'_, '_>) -> Result<Vec<Bed>, DbError> {
    Ok(
        c.query("SELECT id, ward, label FROM beds ORDER BY ward, id", &[])?
            .iter()
            .map(|r| Bed {
                id: r.get(0),
                ward: r.get(1),
                label: r.get(2),
            })
            .collect(),
    )
}

impl PgStore {
    /// Runs `f` in one transaction holding the exclusive association lock,
    /// committed unless it refuses or fails.
    fn assoc_tx<T>(
        &self,
        f: impl for<'a, 'b> FnOnce(&mut Tx<'a, 'b>) -> Outcome<T>,
    ) -> Result<T, AssocError> {
        let out = self.in_tx(|tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ASSOC_LOCK])?;
            f(tx)
        });
        out.map_err(store_error)?
    }

    /// Runs a read in one transaction (a consistent view).
    fn assoc_read<T>(
        &self,
        f: impl for<'a, 'b> FnOnce(&mut Tx<'a, 'b>) -> Result<T, DbError>,
    ) -> Result<T, AssocError> {
        self.in_tx(|tx| f(tx).map(Ok)).map_err(store_error)?
    }

    /// One transaction on a pooled connection, on the calling thread:
    /// committed when `f` returns `Ok(Ok(_))`, rolled back otherwise.
    fn in_tx<T>(&self, f: impl for<'a, 'b> FnOnce(&mut Tx<'a, 'b>) -> Outcome<T>) -> Outcome<T> {
        let _entered = self.io.handle().enter();
        let mut c = block_on(self.conn())?;
        let tx = block_on(c.transaction())?;
        let out = f(&mut Tx(&tx))?;
        if out.is_ok() {
            block_on(tx.commit())?;
        }
        Ok(out)
    }
}

impl AssociationStore for PgStore {
    fn create_bed(&self, bed: &Bed) -> Result<(), AssocError> {
        self.assoc_tx(|tx| {
            let n = tx.execute(
                "INSERT INTO beds (id, ward, label, created_us) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO NOTHING",
                &[&bed.id, &bed.ward, &bed.label, &hub_domain::clock::now_us()],
            )?;
            Ok(if n == 0 {
                Err(AssocError::BedExists(bed.id.clone()))
            } else {
                Ok(())
            })
        })
    }

    fn list_beds(&self) -> Result<Vec<Bed>, AssocError> {
        self.assoc_read(|tx| list_beds(tx))
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
        self.assoc_read(|tx| {
            Ok(tx
                .query_opt(
                    "SELECT patient_system, patient_value FROM patient_stays
                      WHERE visit = $1 AND from_us <= $2 AND COALESCE(to_us, $3) > $2
                      ORDER BY from_us DESC LIMIT 1",
                    &[&visit, &at, &OPEN],
                )?
                .map(|r| PatientId {
                    system: r.get(0),
                    value: r.get(1),
                }))
        })
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
            let beds = list_beds(tx)?;
            procedure::occupancy(tx, beds, at)
        })
    }

    fn unattributed_count(&self) -> Result<u64, AssocError> {
        self.assoc_read(|tx| {
            let n: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM observations WHERE attribution = 'unattributed'",
                    &[],
                )?
                .get(0);
            Ok(n as u64)
        })
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
                stored.extend(tx.query(sql, &[])?.iter().map(|r| r.get::<_, String>(0)));
            }
            let mut done = SystemsMigrated::default();
            for (old, new) in systems_to_migrate(stored, map) {
                done.systems += 1;
                done.stays += tx.execute(
                    "UPDATE patient_stays SET patient_system = $2 WHERE patient_system = $1",
                    &[&old, &new],
                )?;
                done.observations += tx.execute(
                    "UPDATE observations SET patient_system = $2 WHERE patient_system = $1",
                    &[&old, &new],
                )?;
            }
            Ok(Ok(done))
        })
    }
}
