//! Score inputs, manual inputs (`manual_inputs`, schema v8) and score
//! history (`score_history`, schema v13) in SQLite.

use hub_domain::early_warning::{ReadingCandidates, StoredManual, StoredReading};
use hub_domain::score_history::{Entry, Kind, Point, WriteRule};
use hub_storage::{ScoreStore, StoreError};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{DbError, SqliteStore};

fn names(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn names_json(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

pub(crate) const HISTORY_COLUMNS: &str = "time_us, total, band, missing, stale, components";

pub(crate) fn history_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Point> {
    let components: Option<String> = r.get(5)?;
    Ok((
        r.get(0)?,
        Entry {
            total: r.get(1)?,
            band: r.get(2)?,
            missing: names(&r.get::<_, String>(3)?),
            stale: names(&r.get::<_, String>(4)?),
            components: components.and_then(|c| serde_json::from_str(&c).ok()),
        },
    ))
}

fn last_row(conn: &Connection, patient: &str, kind: Kind) -> rusqlite::Result<Option<Point>> {
    conn.query_row(
        &format!(
            "SELECT {HISTORY_COLUMNS} FROM score_history
             WHERE patient_id = ?1 AND kind = ?2 ORDER BY time_us DESC, id DESC LIMIT 1"
        ),
        params![patient, kind.as_str()],
        history_row,
    )
    .optional()
}

/// `patient`'s candidate rows of metric `mdc` on `conn`.
fn readings_on(
    conn: &rusqlite::Connection,
    patient: &str,
    mdc: u32,
    panel_part: bool,
    limit: usize,
) -> Result<ReadingCandidates, DbError> {
    let panel = if panel_part {
        "panel_id IS NOT NULL"
    } else {
        "panel_id IS NULL"
    };
    let row = |r: &rusqlite::Row<'_>| {
        Ok(StoredReading {
            observation_id: r.get(0)?,
            effective_us: r.get(1)?,
            value: r.get(2)?,
            status: r.get(3)?,
            payload: r.get(4)?,
        })
    };
    // The limit is written into the statement, not bound: with `LIMIT ?`
    // SQLite plans this query without the index walk that stops after the
    // newest rows (the ward overview took 4× as long; `cargo bench --bench
    // ward`). `limit` is a count from code, never from a request.
    let usable = conn
        .prepare_cached(&format!(
            "SELECT id, effective_us, value, status, payload FROM observations
             WHERE patient_id = ?1 AND mdc_code = ?2 AND {panel} AND kind = 'reading'
               AND value IS NOT NULL AND status = 'final'
             ORDER BY effective_us DESC LIMIT {limit}"
        ))?
        .query_map(params![patient, mdc], row)?
        .collect::<Result<_, _>>()?;
    let newest = conn
        .prepare_cached(&format!(
            "SELECT id, effective_us, value, status, NULL FROM observations
             WHERE patient_id = ?1 AND mdc_code = ?2 AND {panel} AND kind = 'reading'
             ORDER BY effective_us DESC LIMIT 1"
        ))?
        .query_row(params![patient, mdc], row)
        .optional()?;
    Ok(ReadingCandidates {
        mdc,
        usable,
        newest,
    })
}

/// The latest manual input of `kind` on `conn`.
fn manual_on(
    conn: &rusqlite::Connection,
    patient: &str,
    kind: &str,
) -> Result<Option<StoredManual>, DbError> {
    Ok(conn
        .prepare_cached(
            "SELECT value, effective_us FROM manual_inputs WHERE patient_id = ?1 AND kind = ?2
             ORDER BY effective_us DESC, rowid DESC LIMIT 1",
        )?
        .query_row(params![patient, kind], |r| {
            Ok(StoredManual {
                value: r.get(0)?,
                effective_us: r.get(1)?,
            })
        })
        .optional()?)
}

impl SqliteStore {
    fn db_score_readings(
        &self,
        patient: &str,
        mdc: u32,
        panel_part: bool,
        limit: usize,
    ) -> Result<ReadingCandidates, DbError> {
        readings_on(&*self.reader()?, patient, mdc, panel_part, limit)
    }

    fn db_latest_manual(&self, patient: &str, kind: &str) -> Result<Option<StoredManual>, DbError> {
        manual_on(&*self.reader()?, patient, kind)
    }

    #[allow(clippy::type_complexity)]
    fn db_score_inputs(
        &self,
        patient: &str,
        readings: &[(u32, bool)],
        limit: usize,
        manual: &[&str],
    ) -> Result<(Vec<ReadingCandidates>, Vec<Option<StoredManual>>), DbError> {
        // One read connection (one lock, one statement cache) for all.
        let conn = self.reader()?;
        let r = readings
            .iter()
            .map(|&(mdc, panel_part)| readings_on(&conn, patient, mdc, panel_part, limit))
            .collect::<Result<_, _>>()?;
        let m = manual
            .iter()
            .map(|kind| manual_on(&conn, patient, kind))
            .collect::<Result<_, _>>()?;
        Ok((r, m))
    }

    fn db_has_manual_inputs(&self, patient: &str) -> Result<bool, DbError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT 1 FROM manual_inputs WHERE patient_id = ?1 LIMIT 1",
                [patient],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    fn db_record_manual(
        &self,
        patient: &str,
        inputs: &[(&str, String)],
        effective_us: i64,
        recorded_us: i64,
    ) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        for (kind, value) in inputs {
            tx.execute(
                "INSERT INTO manual_inputs (patient_id, kind, value, effective_us, recorded_us)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![patient, kind, value, effective_us, recorded_us],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn db_record_scores(
        &self,
        patient: &str,
        at_us: i64,
        entries: &[(Kind, Entry)],
        rule: WriteRule,
    ) -> Result<usize, DbError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let mut written = 0;
        for (kind, e) in entries {
            let last = last_row(&tx, patient, *kind)?;
            if !rule(last.as_ref(), e, at_us) {
                continue;
            }
            tx.execute(
                "INSERT INTO score_history (patient_id, kind, time_us, total, band, missing, stale, components)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    patient,
                    kind.as_str(),
                    at_us,
                    e.total,
                    e.band,
                    names_json(&e.missing),
                    names_json(&e.stale),
                    e.components.as_ref().map(|c| c.to_string()),
                ],
            )?;
            written += 1;
        }
        tx.commit()?;
        Ok(written)
    }

    fn db_score_history(
        &self,
        patient: &str,
        kind: Kind,
        from_us: i64,
        to_us: i64,
        limit: usize,
    ) -> Result<Vec<Point>, DbError> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {HISTORY_COLUMNS} FROM score_history
             WHERE patient_id = ?1 AND kind = ?2 AND time_us >= ?3 AND time_us < ?4
             ORDER BY time_us DESC, id DESC LIMIT ?5"
        ))?;
        let rows = stmt
            .query_map(
                params![
                    patient,
                    kind.as_str(),
                    from_us,
                    to_us,
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                history_row,
            )?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

impl ScoreStore for SqliteStore {
    fn score_readings(
        &self,
        patient: &str,
        mdc: u32,
        panel_part: bool,
        limit: usize,
    ) -> Result<ReadingCandidates, StoreError> {
        Ok(self.db_score_readings(patient, mdc, panel_part, limit)?)
    }
    fn latest_manual(&self, patient: &str, kind: &str) -> Result<Option<StoredManual>, StoreError> {
        Ok(self.db_latest_manual(patient, kind)?)
    }
    fn score_inputs(
        &self,
        patient: &str,
        readings: &[(u32, bool)],
        limit: usize,
        manual: &[&str],
    ) -> Result<(Vec<ReadingCandidates>, Vec<Option<StoredManual>>), StoreError> {
        Ok(self.db_score_inputs(patient, readings, limit, manual)?)
    }
    fn has_manual_inputs(&self, patient: &str) -> Result<bool, StoreError> {
        Ok(self.db_has_manual_inputs(patient)?)
    }
    fn record_manual(
        &self,
        patient: &str,
        inputs: &[(&str, String)],
        effective_us: i64,
        recorded_us: i64,
    ) -> Result<(), StoreError> {
        Ok(self.db_record_manual(patient, inputs, effective_us, recorded_us)?)
    }
    fn last_score(&self, patient: &str, kind: Kind) -> Result<Option<Point>, StoreError> {
        let conn = self.conn()?;
        Ok(last_row(&conn, patient, kind).map_err(DbError::from)?)
    }
    fn record_scores(
        &self,
        patient: &str,
        at_us: i64,
        entries: &[(Kind, Entry)],
        rule: WriteRule,
    ) -> Result<usize, StoreError> {
        Ok(self.db_record_scores(patient, at_us, entries, rule)?)
    }
    fn score_history(
        &self,
        patient: &str,
        kind: Kind,
        from_us: i64,
        to_us: i64,
        limit: usize,
    ) -> Result<Vec<Point>, StoreError> {
        Ok(self.db_score_history(patient, kind, from_us, to_us, limit)?)
    }
}
