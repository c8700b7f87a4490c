//! The association model (`crate::association`) on PostgreSQL: the same
//! timelines, invariants and re-attribution, in transactions holding the
//! exclusive association advisory lock (ingest holds it shared). Callers
//! (`Store`'s methods) have validated the input.

use std::collections::BTreeSet;

use postgres::Transaction;

use crate::association::{
    AssocError, Bed, BedOccupancy, Change, OccupantDevice, OccupantPatient, PatientId,
};
use crate::store::{Associations, StoreError};
use hub_postgres::{ASSOC_LOCK, PgStore};

const OPEN: i64 = i64::MAX;

type Tx<'a, 'b> = &'a mut Transaction<'b>;

fn pg(e: postgres::Error) -> AssocError {
    AssocError::Store(StoreError::Postgres(e))
}

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

fn interval(r: &postgres::Row) -> Interval {
    Interval {
        id: r.get(0),
        bed: r.get(1),
        from: r.get(2),
        to: r.get(3),
    }
}

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

impl Timeline {
    fn overlapping(
        self,
        tx: Tx<'_, '_>,
        k: (&str, &str),
        lo: i64,
        hi: i64,
    ) -> Result<Vec<Interval>, AssocError> {
        let sql = format!(
            "SELECT id, bed_id, from_us, to_us FROM {} WHERE {} = $1 AND {} = $2
               AND from_us < $4 AND COALESCE(to_us, {OPEN}) > $3 ORDER BY from_us",
            self.table, self.k1, self.k2
        );
        Ok(tx
            .query(&sql, &[&k.0, &k.1, &lo, &hi])
            .map_err(pg)?
            .iter()
            .map(interval)
            .collect())
    }

    fn covering(
        self,
        tx: Tx<'_, '_>,
        k: (&str, &str),
        at: i64,
    ) -> Result<Option<Interval>, AssocError> {
        Ok(self
            .overlapping(tx, k, at, at.saturating_add(1))?
            .into_iter()
            .next())
    }

    fn at_bed(
        self,
        tx: Tx<'_, '_>,
        bed: &str,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<(String, String, Interval)>, AssocError> {
        let sql = format!(
            "SELECT id, bed_id, from_us, to_us, {}, {} FROM {} WHERE bed_id = $1
               AND from_us < $3 AND COALESCE(to_us, {OPEN}) > $2 ORDER BY from_us",
            self.k1, self.k2, self.table
        );
        Ok(tx
            .query(&sql, &[&bed, &lo, &hi])
            .map_err(pg)?
            .iter()
            .map(|r| (r.get(4), r.get(5), interval(r)))
            .collect())
    }

    fn insert(
        self,
        tx: Tx<'_, '_>,
        k: (&str, &str),
        bed: &str,
        from: i64,
        to: Option<i64>,
    ) -> Result<i64, AssocError> {
        let sql = format!(
            "INSERT INTO {} ({}, {}, bed_id, from_us, to_us) VALUES ($1, $2, $3, $4, $5) RETURNING id",
            self.table, self.k1, self.k2
        );
        Ok(tx
            .query_one(&sql, &[&k.0, &k.1, &bed, &from, &to])
            .map_err(pg)?
            .get(0))
    }

    fn set_to(self, tx: Tx<'_, '_>, id: i64, to: Option<i64>) -> Result<(), AssocError> {
        tx.execute(
            &format!("UPDATE {} SET to_us = $2 WHERE id = $1", self.table),
            &[&id, &to],
        )
        .map_err(pg)?;
        Ok(())
    }

    fn delete(self, tx: Tx<'_, '_>, id: i64) -> Result<(), AssocError> {
        tx.execute(&format!("DELETE FROM {} WHERE id = $1", self.table), &[&id])
            .map_err(pg)?;
        Ok(())
    }

    fn cut(self, tx: Tx<'_, '_>, iv: &Interval, at: i64) -> Result<(), AssocError> {
        if iv.from >= at {
            self.delete(tx, iv.id)
        } else {
            self.set_to(tx, iv.id, Some(at))
        }
    }

    fn get(self, tx: Tx<'_, '_>, id: i64) -> Result<Option<Interval>, AssocError> {
        Ok(tx
            .query_opt(
                &format!(
                    "SELECT id, bed_id, from_us, to_us FROM {} WHERE id = $1",
                    self.table
                ),
                &[&id],
            )
            .map_err(pg)?
            .map(|r| interval(&r)))
    }

    fn merge(self, tx: Tx<'_, '_>, k: (&str, &str), id: i64) -> Result<(), AssocError> {
        let Some(mut iv) = self.get(tx, id)? else {
            return Ok(());
        };
        let prev: Option<i64> = tx
            .query_opt(
                &format!(
                    "SELECT id FROM {} WHERE {} = $1 AND {} = $2 AND bed_id = $3 AND to_us = $4",
                    self.table, self.k1, self.k2
                ),
                &[&k.0, &k.1, &iv.bed, &iv.from],
            )
            .map_err(pg)?
            .map(|r| r.get(0));
        if let Some(p) = prev {
            self.delete(tx, iv.id)?;
            self.set_to(tx, p, iv.to)?;
            iv = self.get(tx, p)?.unwrap_or(iv);
        }
        if let Some(to) = iv.to {
            let next: Option<(i64, Option<i64>)> = tx
                .query_opt(
                    &format!(
                        "SELECT id, to_us FROM {} WHERE {} = $1 AND {} = $2 AND bed_id = $3 AND from_us = $4",
                        self.table, self.k1, self.k2
                    ),
                    &[&k.0, &k.1, &iv.bed, &to],
                )
                .map_err(pg)?
                .map(|r| (r.get(0), r.get(1)));
            if let Some((n, n_to)) = next {
                self.delete(tx, n)?;
                self.set_to(tx, iv.id, n_to)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Affected {
    spans: Vec<(String, String, i64, i64)>,
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

    fn reattribute(self, tx: Tx<'_, '_>, fallback: &Associations) -> Result<Change, AssocError> {
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

fn pieces(
    tx: Tx<'_, '_>,
    g: &str,
    d: &str,
    lo: i64,
    hi: i64,
) -> Result<Vec<(i64, i64, Option<PatientId>)>, AssocError> {
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

fn reattribute_device(
    tx: Tx<'_, '_>,
    g: &str,
    d: &str,
    lo: i64,
    hi: i64,
    fallback: &Associations,
) -> Result<u64, AssocError> {
    let config = fallback.get(&(g.to_owned(), d.to_owned()));
    let st = tx
        .prepare(
            "UPDATE observations SET patient_system = $5, patient_id = $6, attribution = $7
              WHERE gateway_id = $1 AND device_id = $2 AND effective_us >= $3 AND effective_us < $4
                AND attribution IN ('stay', 'config', 'unattributed')
                AND (patient_system IS DISTINCT FROM $5 OR patient_id IS DISTINCT FROM $6
                     OR attribution IS DISTINCT FROM $7)",
        )
        .map_err(pg)?;
    let mut n = 0u64;
    for (x, y, who) in pieces(tx, g, d, lo, hi)? {
        let (sys, val, att): (Option<String>, Option<String>, &str) = match (who, config) {
            (Some(p), _) => (Some(p.system), Some(p.value), "stay"),
            (None, Some(c)) => (None, Some(c.clone()), "config"),
            (None, None) => (None, None, "unattributed"),
        };
        n += tx
            .execute(&st, &[&g, &d, &x, &y, &sys, &val, &att])
            .map_err(pg)?;
    }
    Ok(n)
}

fn bed_exists(tx: Tx<'_, '_>, bed: &str) -> Result<(), AssocError> {
    if tx
        .query_opt("SELECT 1 FROM beds WHERE id = $1", &[&bed])
        .map_err(pg)?
        .is_some()
    {
        Ok(())
    } else {
        Err(AssocError::BedNotFound(bed.to_owned()))
    }
}

/// Transitional: the association methods over a [`PgStore`], until they
/// move into `vigil-hub-postgres` behind the association storage trait.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PgAssoc<'a>(pub &'a PgStore);

impl std::ops::Deref for PgAssoc<'_> {
    type Target = PgStore;

    fn deref(&self) -> &PgStore {
        self.0
    }
}

impl PgAssoc<'_> {
    /// Runs `f` in a transaction holding the exclusive association lock.
    fn assoc_tx<T>(
        &self,
        f: impl FnOnce(Tx<'_, '_>) -> Result<T, AssocError>,
    ) -> Result<T, AssocError> {
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ASSOC_LOCK])
            .map_err(pg)?;
        let out = f(&mut tx)?;
        tx.commit().map_err(pg)?;
        Ok(out)
    }

    pub fn create_bed(&self, bed: &Bed) -> Result<(), AssocError> {
        self.assoc_tx(|tx| {
            let n = tx
                .execute(
                    "INSERT INTO beds (id, ward, label, created_us) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (id) DO NOTHING",
                    &[&bed.id, &bed.ward, &bed.label, &hub_domain::clock::now_us()],
                )
                .map_err(pg)?;
            if n == 0 {
                return Err(AssocError::BedExists(bed.id.clone()));
            }
            Ok(())
        })
    }

    pub fn list_beds(&self) -> Result<Vec<Bed>, AssocError> {
        let mut c = self.conn()?;
        Ok(
            c.query("SELECT id, ward, label FROM beds ORDER BY ward, id", &[])
                .map_err(pg)?
                .iter()
                .map(|r| Bed {
                    id: r.get(0),
                    ward: r.get(1),
                    label: r.get(2),
                })
                .collect(),
        )
    }

    pub fn place_device(
        &self,
        g: &str,
        d: &str,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        self.assoc_tx(|tx| {
            bed_exists(tx, bed)?;
            let mut aff = Affected::default();
            let end = match PLACEMENTS.covering(tx, (g, d), at)? {
                Some(p) if p.bed == bed => return Ok(Change::default()),
                Some(p) => {
                    PLACEMENTS.cut(tx, &p, at)?;
                    p.to
                }
                None => tx
                    .query_one(
                        "SELECT MIN(from_us) FROM device_placements
                          WHERE gateway_id = $1 AND device_id = $2 AND from_us > $3",
                        &[&g, &d, &at],
                    )
                    .map_err(pg)?
                    .get::<_, Option<i64>>(0),
            };
            let id = PLACEMENTS.insert(tx, (g, d), bed, at, end)?;
            PLACEMENTS.merge(tx, (g, d), id)?;
            aff.device(g, d, at, end.unwrap_or(OPEN));
            aff.reattribute(tx, fallback)
        })
    }

    pub fn remove_device(
        &self,
        g: &str,
        d: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
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

    pub fn admit(
        &self,
        patient: &PatientId,
        bed: &str,
        at: i64,
        visit: Option<&str>,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
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
                "UPDATE patient_stays SET visit = $2 WHERE id = $1",
                &[&id, &visit],
            )
            .map_err(pg)?;
            let mut aff = Affected::default();
            aff.bed(bed, at, OPEN);
            aff.reattribute(tx, fallback)
        })
    }

    pub fn transfer(
        &self,
        patient: &PatientId,
        bed: &str,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
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
            let visit: Option<String> = tx
                .query_one("SELECT visit FROM patient_stays WHERE id = $1", &[&s.id])
                .map_err(pg)?
                .get(0);
            STAYS.cut(tx, &s, at)?;
            let id = STAYS.insert(tx, k, bed, at, s.to)?;
            tx.execute(
                "UPDATE patient_stays SET visit = $2 WHERE id = $1",
                &[&id, &visit],
            )
            .map_err(pg)?;
            STAYS.merge(tx, k, id)?;
            let mut aff = Affected::default();
            aff.bed(&s.bed, at, s.end());
            aff.bed(bed, at, s.end());
            aff.reattribute(tx, fallback)
        })
    }

    pub fn discharge(
        &self,
        patient: &PatientId,
        at: i64,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        let k = (patient.system.as_str(), patient.value.as_str());
        self.assoc_tx(|tx| {
            let Some(first) = STAYS.covering(tx, k, at)? else {
                let ended: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM patient_stays
                           WHERE patient_system = $1 AND patient_value = $2 AND to_us = $3)",
                        &[&k.0, &k.1, &at],
                    )
                    .map_err(pg)?
                    .get(0);
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

    pub fn stay_of_visit(&self, visit: &str, at: i64) -> Result<Option<PatientId>, AssocError> {
        let mut c = self.conn()?;
        Ok(c.query_opt(
            "SELECT patient_system, patient_value FROM patient_stays
              WHERE visit = $1 AND from_us <= $2 AND COALESCE(to_us, $3) > $2
              ORDER BY from_us DESC LIMIT 1",
            &[&visit, &at, &OPEN],
        )
        .map_err(pg)?
        .map(|r| PatientId {
            system: r.get(0),
            value: r.get(1),
        }))
    }

    pub fn bed_of(&self, patient: &PatientId, at: i64) -> Result<Option<String>, AssocError> {
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(pg)?;
        let k = (patient.system.as_str(), patient.value.as_str());
        Ok(STAYS.covering(&mut tx, k, at)?.map(|s| s.bed))
    }

    pub fn change_identifier(
        &self,
        old: &PatientId,
        new: &PatientId,
        visit: &str,
        fallback: &Associations,
    ) -> Result<Change, AssocError> {
        self.assoc_tx(|tx| {
            let stays: Vec<Interval> = tx
                .query(
                    "SELECT id, bed_id, from_us, to_us FROM patient_stays
                      WHERE visit = $1 AND patient_system = $2 AND patient_value = $3",
                    &[&visit, &old.system, &old.value],
                )
                .map_err(pg)?
                .iter()
                .map(interval)
                .collect();
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
                    "UPDATE patient_stays SET patient_system = $2, patient_value = $3 WHERE id = $1",
                    &[&s.id, &new.system, &new.value],
                )
                .map_err(pg)?;
            }
            aff.reattribute(tx, fallback)
        })
    }

    pub fn occupancy(&self, at: i64) -> Result<Vec<BedOccupancy>, AssocError> {
        let beds = self.list_beds()?;
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(pg)?;
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
    }

    pub fn unattributed_count(&self) -> Result<u64, AssocError> {
        let mut c = self.conn()?;
        let n: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM observations WHERE attribution = 'unattributed'",
                &[],
            )
            .map_err(pg)?
            .get(0);
        Ok(n as u64)
    }
}
