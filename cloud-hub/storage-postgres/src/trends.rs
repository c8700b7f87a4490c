//! Chart buckets on PostgreSQL (`vital_rollups`, migration 4): merged in
//! the ingest transaction, rebuilt from the stored rows when readings
//! change patient, read by `TrendStore::series`. The bucket maths is
//! `hub_domain::trends`, as for SQLite.

use hub_domain::trends::{Point, Rollup, chart_value};
use hub_storage::{SeriesQuery, StoreError, TrendStore};
use prost::Message;
use shared_protocol::v1::Reading;
use tokio_postgres::Transaction;

use crate::{DbError, PgStore};

const HOUR_US: i64 = 3600 * 1_000_000;

/// The statement [`write`] runs: the arrays unnested into rows, each
/// merged into its bucket.
pub(crate) const MERGE: &str = "INSERT INTO vital_rollups AS v (patient_id, mdc_code,
         resolution_s, bucket_us, gateway_id, device_id, n, sum, min, max)
     SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[],
         $6::text[], $7::bigint[], $8::float8[], $9::float8[], $10::float8[])
     ON CONFLICT (gateway_id, device_id, bucket_us, resolution_s, mdc_code, patient_id)
     DO UPDATE SET n = v.n + excluded.n, sum = v.sum + excluded.sum,
         min = LEAST(v.min, excluded.min), max = GREATEST(v.max, excluded.max)";

/// Merges a rollup's buckets in one statement, `merge` ([`MERGE`]
/// prepared by the caller; each key occurs once in a rollup, as `ON
/// CONFLICT DO UPDATE` needs). Keys are sorted, so two transactions
/// touching the same buckets lock them in the same order.
pub(crate) async fn write(
    tx: &Transaction<'_>,
    merge: &tokio_postgres::Statement,
    roll: Rollup,
) -> Result<(), DbError> {
    if roll.is_empty() {
        return Ok(());
    }
    let mut rows: Vec<_> = roll.rows().collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let len = rows.len();
    let (mut patient, mut mdc, mut res, mut bucket) = (
        Vec::with_capacity(len),
        Vec::with_capacity(len),
        Vec::with_capacity(len),
        Vec::with_capacity(len),
    );
    let (mut gateway, mut device) = (Vec::with_capacity(len), Vec::with_capacity(len));
    let (mut n, mut sum, mut min, mut max) = (
        Vec::with_capacity(len),
        Vec::with_capacity(len),
        Vec::with_capacity(len),
        Vec::with_capacity(len),
    );
    for ((p, m, r, b, g, d), (cn, cs, cmin, cmax)) in rows {
        patient.push(p);
        mdc.push(i64::from(m));
        res.push(r);
        bucket.push(b);
        gateway.push(g);
        device.push(d);
        n.push(cn);
        sum.push(cs);
        min.push(cmin);
        max.push(cmax);
    }
    tx.execute(
        merge,
        &[
            &patient, &mdc, &res, &bucket, &gateway, &device, &n, &sum, &min, &max,
        ],
    )
    .await?;
    Ok(())
}

/// Recomputes device `(g, d)`'s buckets over `[lo, hi)` (widened to whole
/// hours, so every bucket of every resolution that holds a moved reading
/// is rebuilt whole) from the stored rows, after their attribution changed.
pub(crate) async fn rebuild_device(
    tx: &Transaction<'_>,
    g: &str,
    d: &str,
    lo: i64,
    hi: i64,
) -> Result<(), DbError> {
    let from = lo.div_euclid(HOUR_US) * HOUR_US;
    let to = if hi >= i64::MAX - HOUR_US {
        i64::MAX
    } else {
        (hi + HOUR_US - 1).div_euclid(HOUR_US) * HOUR_US
    };
    tx.execute(
        "DELETE FROM vital_rollups WHERE gateway_id = $1 AND device_id = $2
            AND bucket_us >= $3 AND bucket_us < $4",
        &[&g, &d, &from, &to],
    )
    .await?;
    // The device's rows of the buckets' span, through its device minutes.
    let (lo_min, hi_min) = crate::minutes::minutes_of(from, to);
    let rows = tx
        .query(
            &crate::minutes::window_rows(
                "o.patient_id, o.mdc_code, o.effective_us, o.value, o.payload",
                ("$1", "$2"),
                ("$3", "$4"),
                ("$5", "$6"),
                "o.kind = 'reading' AND o.status = 'final' AND o.value IS NOT NULL
                 AND o.patient_id IS NOT NULL",
            ),
            &[&g, &d, &from, &to, &lo_min, &hi_min],
        )
        .await?;
    let mut roll = Rollup::default();
    for r in &rows {
        let payload: Option<&[u8]> = r.get(4);
        let Some(reading) = payload.and_then(|b| Reading::decode(b).ok()) else {
            continue;
        };
        let (mdc, v): (i64, f64) = (r.get(1), r.get(3));
        let Ok(mdc) = u32::try_from(mdc) else {
            continue;
        };
        if let Some(v) = chart_value(&reading, v) {
            roll.add(r.get(0), g, d, mdc, r.get(2), v);
        }
    }
    let merge = tx.prepare(MERGE).await?;
    write(tx, &merge, roll).await
}

impl PgStore {
    async fn db_series(&self, q: &SeriesQuery) -> Result<Vec<Point>, DbError> {
        let c = self.conn().await?;
        // Prepared once per connection: one round trip, no re-planning.
        let st = c
            .prepare_cached(
                "SELECT bucket_us, SUM(n)::bigint, SUM(sum), MIN(min), MAX(max) FROM vital_rollups
                  WHERE patient_id = $1 AND mdc_code = $2 AND resolution_s = $3
                    AND bucket_us >= $4 AND bucket_us < $5
                  GROUP BY bucket_us ORDER BY bucket_us",
            )
            .await?;
        let rows = c
            .query(
                &st,
                &[
                    &q.patient,
                    &i64::from(q.mdc),
                    &q.resolution_s,
                    &q.from_bucket_us,
                    &q.to_us,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Point::from_sums(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect())
    }
}

impl TrendStore for PgStore {
    fn series(&self, q: &SeriesQuery) -> Result<Vec<Point>, StoreError> {
        self.run(self.db_series(q))
    }
    fn series_future(
        &self,
        q: &SeriesQuery,
    ) -> Option<hub_storage::ReadFuture<'static, Vec<Point>>> {
        let q = q.clone();
        Some(self.future(move |me| async move { me.db_series(&q).await }))
    }
}
