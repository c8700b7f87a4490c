//! Chart buckets in SQLite (`vital_rollups`, schema v10): merged at ingest,
//! rebuilt from the stored rows after a re-attribution. The bucket maths is
//! `hub_domain::trends`.

use hub_domain::trends::{Rollup, chart_value};
use prost::Message;
use rusqlite::{Transaction, params};
use shared_protocol::v1::Reading;

const S: i64 = 1_000_000;

/// Merges a rollup's buckets into the table.
pub fn write(roll: Rollup, tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached(
        "INSERT INTO vital_rollups (patient_id, mdc_code, resolution_s, bucket_us, gateway_id,
             device_id, n, sum, min, max)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT DO UPDATE SET n = n + excluded.n, sum = sum + excluded.sum,
             min = MIN(min, excluded.min), max = MAX(max, excluded.max)",
    )?;
    for ((p, mdc, res, bucket, g, d), (n, sum, min, max)) in roll.rows() {
        st.execute(params![p, mdc, res, bucket, g, d, n, sum, min, max])?;
    }
    Ok(())
}

/// Recomputes device `(g, d)`'s buckets over `[lo, hi)` (widened to whole
/// hours) from the stored rows, after their attribution changed.
pub fn rebuild_device(
    tx: &Transaction<'_>,
    g: &str,
    d: &str,
    lo: i64,
    hi: i64,
) -> rusqlite::Result<()> {
    let hour = 3600 * S;
    let from = lo.div_euclid(hour) * hour;
    let to = if hi >= i64::MAX - hour {
        i64::MAX
    } else {
        (hi + hour - 1).div_euclid(hour) * hour
    };
    tx.execute(
        "DELETE FROM vital_rollups WHERE gateway_id = ?1 AND device_id = ?2
            AND bucket_us >= ?3 AND bucket_us < ?4",
        params![g, d, from, to],
    )?;
    let mut roll = Rollup::default();
    {
        // The device's rows of the window, through its minutes.
        let mut st = tx.prepare_cached(&format!(
            "SELECT patient_id, mdc_code, effective_us, value, payload FROM observations
              WHERE rowid IN ({}) AND kind = 'reading' AND status = 'final'
                AND value IS NOT NULL AND patient_id IS NOT NULL",
            crate::minutes::device_window("?1", "?2", "?3", "?4", "?5", "?6")
        ))?;
        let (lo_min, hi_min) = crate::minutes::minutes_of(from, to);
        let rows = st.query_map(params![g, d, from, to, lo_min, hi_min], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, f64>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
            ))
        })?;
        for row in rows {
            let (p, mdc, t, v, payload) = row?;
            let Some(r) = payload.and_then(|b| Reading::decode(b.as_slice()).ok()) else {
                continue;
            };
            if let Some(v) = chart_value(&r, v) {
                roll.add(&p, g, d, mdc, t, v);
            }
        }
    }
    write(roll, tx)
}

impl crate::SqliteStore {
    fn db_series(
        &self,
        q: &hub_storage::SeriesQuery,
    ) -> Result<Vec<hub_domain::trends::Point>, crate::DbError> {
        let conn = self.reader()?;
        let mut st = conn.prepare_cached(
            "SELECT bucket_us, SUM(n), SUM(sum), MIN(min), MAX(max) FROM vital_rollups
              WHERE patient_id = ?1 AND mdc_code = ?2 AND resolution_s = ?3
                AND bucket_us >= ?4 AND bucket_us < ?5
              GROUP BY bucket_us ORDER BY bucket_us",
        )?;
        let points = st
            .query_map(
                params![q.patient, q.mdc, q.resolution_s, q.from_bucket_us, q.to_us],
                |r| {
                    Ok(hub_domain::trends::Point::from_sums(
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                    ))
                },
            )?
            .collect::<Result<_, _>>()?;
        Ok(points)
    }
}

impl hub_storage::TrendStore for crate::SqliteStore {
    fn series(
        &self,
        q: &hub_storage::SeriesQuery,
    ) -> Result<Vec<hub_domain::trends::Point>, hub_storage::StoreError> {
        Ok(self.db_series(q)?)
    }
}
