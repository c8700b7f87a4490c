//! Score inputs, manual inputs and score history on PostgreSQL (migration
//! 4: `manual_inputs`, `score_history`), with the SQLite store's semantics.
//! What is used or written is decided by `hub_domain::early_warning` and
//! `hub_domain::score_history`.

use futures_util::future::try_join_all;
use hub_domain::early_warning::{ReadingCandidates, StoredManual, StoredReading};
use hub_domain::score_history::{Entry, Kind, Point, WriteRule};
use hub_storage::{ScoreStore, StoreError};
use tokio_postgres::{GenericClient, IsolationLevel, Row};

use crate::{DbError, PgStore};

/// Two-key advisory lock class of a patient's score history (class 1 is a
/// gateway's ingest).
const SCORE_LOCK_CLASS: i32 = 2;

pub(crate) const HISTORY_COLUMNS: &str = "time_us, total, band, missing, stale, components::text";

pub(crate) fn history_row(r: &Row) -> Point {
    let components: Option<String> = r.get(5);
    (
        r.get(0),
        Entry {
            total: r.get(1),
            band: r.get(2),
            missing: r.get(3),
            stale: r.get(4),
            components: components.and_then(|c| serde_json::from_str(&c).ok()),
        },
    )
}

fn reading_row(r: &Row) -> StoredReading {
    StoredReading {
        observation_id: r.get(0),
        effective_us: r.get(1),
        value: r.get(2),
        status: r.get(3),
        payload: r.get(4),
    }
}

/// `patient`'s candidate rows of metric `mdc`: the usable ones newest first
/// (at most `limit`) and the newest whatever its value and status. Rows
/// sharing a time are ordered by arrival (`rid`), as SQLite's by rowid.
async fn readings_on(
    c: &impl deadpool_postgres::GenericClient,
    patient: &str,
    mdc: u32,
    panel_part: bool,
    limit: usize,
) -> Result<ReadingCandidates, DbError> {
    // The integer panel flag of the score-input index (migration 7).
    let panel = if panel_part {
        "(panel_id IS NOT NULL)::integer = 1"
    } else {
        "(panel_id IS NOT NULL)::integer = 0"
    };
    let code = i64::from(mdc);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let usable = format!(
        "SELECT id, effective_us, value, status, payload FROM observations
          WHERE patient_id = $1 AND mdc_code = $2 AND {panel} AND kind = 'reading'
            AND value IS NOT NULL AND status = 'final'
          ORDER BY effective_us DESC, rid DESC LIMIT $3"
    );
    let newest = format!(
        "SELECT id, effective_us, value, status, NULL::bytea FROM observations
          WHERE patient_id = $1 AND mdc_code = $2 AND {panel} AND kind = 'reading'
          ORDER BY effective_us DESC, rid DESC LIMIT 1"
    );
    // Both sent at once (pipelined on the connection), each prepared once
    // per connection (the statement cache): planning a statement over the
    // partitioned table costs more than running it.
    let (usable, newest) = futures_util::try_join!(
        async {
            let st = c.prepare_cached(usable.as_str()).await?;
            c.query(&st, &[&patient, &code, &limit]).await
        },
        async {
            let st = c.prepare_cached(newest.as_str()).await?;
            c.query_opt(&st, &[&patient, &code]).await
        },
    )?;
    Ok(ReadingCandidates {
        mdc,
        usable: usable.iter().map(reading_row).collect(),
        newest: newest.as_ref().map(reading_row),
    })
}

/// The latest manual input of `kind`: by effective time, then the last
/// recorded.
async fn manual_on(
    c: &impl deadpool_postgres::GenericClient,
    patient: &str,
    kind: &str,
) -> Result<Option<StoredManual>, DbError> {
    let st = c
        .prepare_cached(
            "SELECT value, effective_us FROM manual_inputs WHERE patient_id = $1 AND kind = $2
              ORDER BY effective_us DESC, id DESC LIMIT 1",
        )
        .await?;
    Ok(c.query_opt(&st, &[&patient, &kind])
        .await?
        .map(|r| StoredManual {
            value: r.get(0),
            effective_us: r.get(1),
        }))
}

async fn last_on(
    c: &impl GenericClient,
    patient: &str,
    kind: Kind,
) -> Result<Option<Point>, DbError> {
    Ok(c.query_opt(
        &format!(
            "SELECT {HISTORY_COLUMNS} FROM score_history
              WHERE patient_id = $1 AND kind = $2 ORDER BY time_us DESC, id DESC LIMIT 1"
        ),
        &[&patient, &kind.as_str()],
    )
    .await?
    .as_ref()
    .map(history_row))
}

impl PgStore {
    /// Every input in one read-only snapshot, the statements pipelined.
    #[allow(clippy::type_complexity)]
    async fn db_score_inputs(
        &self,
        patient: &str,
        readings: &[(u32, bool)],
        limit: usize,
        manual: &[&str],
    ) -> Result<(Vec<ReadingCandidates>, Vec<Option<StoredManual>>), DbError> {
        let mut c = self.conn().await?;
        let tx = c
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let t = &tx;
        let (r, m) = futures_util::try_join!(
            try_join_all(
                readings
                    .iter()
                    .map(|&(mdc, part)| readings_on(t, patient, mdc, part, limit))
            ),
            try_join_all(manual.iter().map(|kind| manual_on(t, patient, kind))),
        )?;
        tx.commit().await?;
        Ok((r, m))
    }

    async fn db_record_manual(
        &self,
        patient: &str,
        inputs: &[(&str, String)],
        effective_us: i64,
        recorded_us: i64,
    ) -> Result<(), DbError> {
        if inputs.is_empty() {
            return Ok(());
        }
        let kinds: Vec<&str> = inputs.iter().map(|(k, _)| *k).collect();
        let values: Vec<&str> = inputs.iter().map(|(_, v)| v.as_str()).collect();
        // One statement (one transaction); ids follow the inputs' order, so
        // of two inputs of one kind the later is the latest.
        self.conn()
            .await?
            .execute(
                "INSERT INTO manual_inputs (patient_id, kind, value, effective_us, recorded_us)
                 SELECT $1, k, v, $4, $5 FROM unnest($2::text[], $3::text[]) WITH ORDINALITY
                     AS i (k, v, n)
                  ORDER BY n",
                &[&patient, &kinds, &values, &effective_us, &recorded_us],
            )
            .await?;
        Ok(())
    }

    /// The write rule against the last stored row of each kind, in one
    /// transaction that holds the patient's score lock: hubs sharing the
    /// database never both write the same change.
    async fn db_record_scores(
        &self,
        patient: &str,
        at_us: i64,
        entries: &[(Kind, Entry)],
        rule: WriteRule,
    ) -> Result<usize, DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&SCORE_LOCK_CLASS, &patient],
        )
        .await?;
        let mut kinds: Vec<Kind> = Vec::new();
        for (k, _) in entries {
            if !kinds.contains(k) {
                kinds.push(*k);
            }
        }
        let t = &*tx;
        let lasts = try_join_all(kinds.iter().map(|k| last_on(t, patient, *k))).await?;
        let mut last: Vec<(Kind, Option<Point>)> = kinds.into_iter().zip(lasts).collect();
        let mut written: Vec<(Kind, &Entry)> = Vec::new();
        for (kind, e) in entries {
            // A kind listed twice sees its first entry's row, as on SQLite.
            let Some((_, previous)) = last.iter_mut().find(|(k, _)| k == kind) else {
                continue;
            };
            if rule(previous.as_ref(), e, at_us) {
                written.push((*kind, e));
                *previous = Some((at_us, e.clone()));
            }
        }
        if !written.is_empty() {
            let st = tx
                .prepare(
                    "INSERT INTO score_history (patient_id, kind, time_us, total, band, missing,
                         stale, components)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, CAST($8::text AS jsonb))",
                )
                .await?;
            let components: Vec<Option<String>> = written
                .iter()
                .map(|(_, e)| e.components.as_ref().map(|c| c.to_string()))
                .collect();
            let (st, t) = (&st, &*tx);
            // Pipelined; executed in this order (the ids follow it).
            try_join_all(written.iter().zip(&components).map(|((kind, e), comp)| {
                let kind = kind.as_str();
                async move {
                    t.execute(
                        st,
                        &[
                            &patient, &kind, &at_us, &e.total, &e.band, &e.missing, &e.stale, comp,
                        ],
                    )
                    .await
                }
            }))
            .await?;
        }
        tx.commit().await?;
        Ok(written.len())
    }

    async fn db_score_history(
        &self,
        patient: &str,
        kind: Kind,
        from_us: i64,
        to_us: i64,
        limit: usize,
    ) -> Result<Vec<Point>, DbError> {
        let c = self.conn().await?;
        Ok(c.query(
            &format!(
                "SELECT {HISTORY_COLUMNS} FROM score_history
                  WHERE patient_id = $1 AND kind = $2 AND time_us >= $3 AND time_us < $4
                  ORDER BY time_us DESC, id DESC LIMIT $5"
            ),
            &[
                &patient,
                &kind.as_str(),
                &from_us,
                &to_us,
                &i64::try_from(limit).unwrap_or(i64::MAX),
            ],
        )
        .await?
        .iter()
        .map(history_row)
        .collect())
    }
}

impl ScoreStore for PgStore {
    fn score_readings(
        &self,
        patient: &str,
        mdc: u32,
        panel_part: bool,
        limit: usize,
    ) -> Result<ReadingCandidates, StoreError> {
        self.run(async {
            let c = self.conn().await?;
            readings_on(&c, patient, mdc, panel_part, limit).await
        })
    }
    fn score_inputs(
        &self,
        patient: &str,
        readings: &[(u32, bool)],
        limit: usize,
        manual: &[&str],
    ) -> Result<(Vec<ReadingCandidates>, Vec<Option<StoredManual>>), StoreError> {
        self.run(self.db_score_inputs(patient, readings, limit, manual))
    }
    fn latest_manual(&self, patient: &str, kind: &str) -> Result<Option<StoredManual>, StoreError> {
        self.run(async {
            let c = self.conn().await?;
            manual_on(&c, patient, kind).await
        })
    }
    fn has_manual_inputs(&self, patient: &str) -> Result<bool, StoreError> {
        self.run(async {
            let c = self.conn().await?;
            Ok(c.query_opt(
                "SELECT 1 FROM manual_inputs WHERE patient_id = $1 LIMIT 1",
                &[&patient],
            )
            .await?
            .is_some())
        })
    }
    fn record_manual(
        &self,
        patient: &str,
        inputs: &[(&str, String)],
        effective_us: i64,
        recorded_us: i64,
    ) -> Result<(), StoreError> {
        self.run(self.db_record_manual(patient, inputs, effective_us, recorded_us))
    }
    fn last_score(&self, patient: &str, kind: Kind) -> Result<Option<Point>, StoreError> {
        self.run(async {
            let c = self.conn().await?;
            last_on(&**c, patient, kind).await
        })
    }
    fn record_scores(
        &self,
        patient: &str,
        at_us: i64,
        entries: &[(Kind, Entry)],
        rule: WriteRule,
    ) -> Result<usize, StoreError> {
        self.run(self.db_record_scores(patient, at_us, entries, rule))
    }
    fn score_history(
        &self,
        patient: &str,
        kind: Kind,
        from_us: i64,
        to_us: i64,
        limit: usize,
    ) -> Result<Vec<Point>, StoreError> {
        self.run(self.db_score_history(patient, kind, from_us, to_us, limit))
    }
}
