//! Patient association on PostgreSQL: the same timelines as on SQLite, in
//! transactions holding the exclusive association advisory lock
//! ([`ASSOC_LOCK`]; ingest holds it shared). The decisions are
//! `hub_domain::association`'s: this module loads the intervals they look
//! at, applies the plan they return and runs one bounded `UPDATE` per
//! constant piece of the affected devices' attribution.

use hub_domain::association::{
    self as model, Affected, Bed, BedOccupancy, Change, Interval, Keyed, OPEN, OccupantDevice,
    OccupantPatient, PatientId, Plan, Target,
};
use hub_storage::{AssocError, AssociationStore, Associations, StoreError};
use postgres::{GenericClient, Transaction};

use crate::{ASSOC_LOCK, DbError, PgStore, off_runtime};

/// A change's outcome: `Ok(Err(_))` is a refusal (the transaction is rolled
/// back), `Err(_)` a database failure.
type Outcome<T> = Result<Result<T, AssocError>, DbError>;

type Tx<'a, 'b> = &'a mut Transaction<'b>;

fn store_error(e: impl Into<DbError>) -> AssocError {
    AssocError::Store(StoreError::from(e.into()))
}

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

fn interval(r: &postgres::Row) -> Interval {
    Interval {
        id: r.get(0),
        bed: r.get(1),
        from: r.get(2),
        to: r.get(3),
        visit: r.get(4),
    }
}

impl Timeline {
    /// The columns [`interval`] reads.
    fn columns(self) -> &'static str {
        if self.visit {
            "id, bed_id, from_us, to_us, visit"
        } else {
            "id, bed_id, from_us, to_us, NULL::text"
        }
    }

    /// The key's intervals overlapping `[lo, hi)`, by start.
    fn overlapping(
        self,
        c: &mut impl GenericClient,
        k: (&str, &str),
        lo: i64,
        hi: i64,
    ) -> Result<Vec<Interval>, DbError> {
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = $1 AND {} = $2
               AND from_us < $4 AND COALESCE(to_us, {OPEN}) > $3 ORDER BY from_us",
            self.columns(),
            self.table,
            self.k1,
            self.k2
        );
        Ok(c.query(&sql, &[&k.0, &k.1, &lo, &hi])?
            .iter()
            .map(interval)
            .collect())
    }

    /// The key's intervals ending at or after `at`.
    fn ending_from(
        self,
        c: Tx<'_, '_>,
        k: (&str, &str),
        at: i64,
    ) -> Result<Vec<Interval>, DbError> {
        self.overlapping(c, k, at.saturating_sub(1), OPEN)
    }

    /// Intervals of a bed overlapping `[lo, hi)`, with their keys.
    fn at_bed(
        self,
        c: &mut impl GenericClient,
        bed: &str,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<Keyed>, DbError> {
        let sql = format!(
            "SELECT {}, {}, {} FROM {} WHERE bed_id = $1
               AND from_us < $3 AND COALESCE(to_us, {OPEN}) > $2 ORDER BY from_us",
            self.columns(),
            self.k1,
            self.k2,
            self.table
        );
        Ok(c.query(&sql, &[&bed, &lo, &hi])?
            .iter()
            .map(|r| (r.get(5), r.get(6), interval(r)))
            .collect())
    }

    /// Writes a plan of key `k`: deletes, new ends, inserts.
    fn apply(self, tx: Tx<'_, '_>, k: (&str, &str), plan: &Plan) -> Result<(), DbError> {
        for id in &plan.delete {
            tx.execute(&format!("DELETE FROM {} WHERE id = $1", self.table), &[id])?;
        }
        for (id, to) in &plan.set_end {
            tx.execute(
                &format!("UPDATE {} SET to_us = $2 WHERE id = $1", self.table),
                &[id, to],
            )?;
        }
        for n in &plan.insert {
            if self.visit {
                tx.execute(
                    &format!(
                        "INSERT INTO {} ({}, {}, bed_id, from_us, to_us, visit)
                         VALUES ($1, $2, $3, $4, $5, $6)",
                        self.table, self.k1, self.k2
                    ),
                    &[&k.0, &k.1, &n.bed, &n.from, &n.to, &n.visit],
                )?;
            } else {
                tx.execute(
                    &format!(
                        "INSERT INTO {} ({}, {}, bed_id, from_us, to_us)
                         VALUES ($1, $2, $3, $4, $5)",
                        self.table, self.k1, self.k2
                    ),
                    &[&k.0, &k.1, &n.bed, &n.from, &n.to],
                )?;
            }
        }
        Ok(())
    }

    /// Applies `plan` and re-attributes what it affects.
    fn run(
        self,
        tx: Tx<'_, '_>,
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
    tx: Tx<'_, '_>,
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
/// changed.
fn reattribute_device(
    tx: Tx<'_, '_>,
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
    let st = tx.prepare(
        "UPDATE observations SET patient_system = $5, patient_id = $6, attribution = $7
          WHERE gateway_id = $1 AND device_id = $2 AND effective_us >= $3 AND effective_us < $4
            AND attribution IN ('stay', 'config', 'unattributed')
            AND (patient_system IS DISTINCT FROM $5 OR patient_id IS DISTINCT FROM $6
                 OR attribution IS DISTINCT FROM $7)",
    )?;
    let mut n = 0u64;
    for piece in model::pieces(lo, hi, &placements, &stays) {
        let t = Target::of(&piece, config);
        n += tx.execute(
            &st,
            &[&g, &d, &piece.from, &piece.to, &t.system, &t.value, &t.how],
        )?;
    }
    Ok(n)
}

fn bed_exists(tx: Tx<'_, '_>, bed: &str) -> Result<bool, DbError> {
    Ok(tx
        .query_opt("SELECT 1 FROM beds WHERE id = $1", &[&bed])?
        .is_some())
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

fn list_beds(c: &mut impl GenericClient) -> Result<Vec<Bed>, DbError> {
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
    /// Runs `f` off the async runtime in one transaction holding the
    /// exclusive association lock, committed unless it refuses or fails.
    fn assoc_tx<T: Send>(
        &self,
        f: impl FnOnce(Tx<'_, '_>) -> Outcome<T> + Send,
    ) -> Result<T, AssocError> {
        let out = off_runtime(|| -> Outcome<T> {
            let mut c = self.conn()?;
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ASSOC_LOCK])?;
            let out = f(&mut tx)?;
            if out.is_ok() {
                tx.commit()?;
            }
            Ok(out)
        });
        out.map_err(store_error)?
    }

    /// Runs a read off the async runtime.
    fn assoc_read<T: Send>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, DbError> + Send,
    ) -> Result<T, AssocError> {
        off_runtime(|| {
            let mut c = self.conn()?;
            f(&mut c)
        })
        .map_err(store_error)
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
        self.assoc_read(list_beds)
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
        self.assoc_read(|c| {
            Ok(c.query_opt(
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
        let k = (patient.system.as_str(), patient.value.as_str());
        self.assoc_read(|c| {
            Ok(STAYS
                .overlapping(c, k, at, at.saturating_add(1))?
                .into_iter()
                .next()
                .map(|s| s.bed))
        })
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
                .query(
                    &format!(
                        "SELECT {} FROM patient_stays
                          WHERE visit = $1 AND patient_system = $2 AND patient_value = $3",
                        STAYS.columns()
                    ),
                    &[&visit, &old.system, &old.value],
                )?
                .iter()
                .map(interval)
                .collect();
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
                    "UPDATE patient_stays SET patient_system = $2, patient_value = $3 WHERE id = $1",
                    &[&s.id, &new.system, &new.value],
                )?;
            }
            Ok(Ok(reattribute(tx, affected, fallback)?))
        })
    }

    fn occupancy(&self, at: i64) -> Result<Vec<BedOccupancy>, AssocError> {
        self.assoc_read(|c| {
            let mut tx = c.transaction()?;
            let beds = list_beds(&mut tx)?;
            let mut out = Vec::with_capacity(beds.len());
            for bed in beds {
                let patient = STAYS
                    .at_bed(&mut tx, &bed.id, at, at.saturating_add(1))?
                    .into_iter()
                    .next()
                    .map(|(system, value, s)| OccupantPatient {
                        system,
                        value,
                        since_us: s.from,
                    });
                let devices = PLACEMENTS
                    .at_bed(&mut tx, &bed.id, at, at.saturating_add(1))?
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
        })
    }

    fn unattributed_count(&self) -> Result<u64, AssocError> {
        self.assoc_read(|c| {
            let n: i64 = c
                .query_one(
                    "SELECT COUNT(*) FROM observations WHERE attribution = 'unattributed'",
                    &[],
                )?
                .get(0);
            Ok(n as u64)
        })
    }
}
