//! The lake export's reads (`hub_storage::LakeStore`): reading rows by
//! `rid` and the score history by id.

use hub_storage::{LakeReading, LakeScore, LakeStore, StoreError};

use crate::scores::{HISTORY_COLUMNS, history_row};
use crate::{DbError, OBS_COLUMNS, OBS_FROM, PgStore, obs_row};

/// The session advisory lock of the lake export ("VIGILAKE").
const LAKE_LOCK: i64 = 0x5649_4749_4c41_4b45;

fn limit_arg(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl PgStore {
    async fn db_lake_readings(
        &self,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<LakeReading>, DbError> {
        let c = self.conn().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT o.rid, {OBS_COLUMNS} FROM {OBS_FROM}
                     WHERE o.rid > $1 AND o.rid <= $2 AND o.kind = 'reading'
                     ORDER BY o.rid LIMIT $3"
                ),
                &[&after, &upto, &limit_arg(limit)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| LakeReading {
                cursor: r.get(0),
                row: obs_row(r, 1),
            })
            .collect())
    }

    async fn db_lake_readings_count(&self, after: i64) -> Result<u64, DbError> {
        let c = self.conn().await?;
        let n: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM observations WHERE rid > $1 AND kind = 'reading'",
                &[&after],
            )
            .await?
            .get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn db_lake_scores(
        &self,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<LakeScore>, DbError> {
        let c = self.conn().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {HISTORY_COLUMNS}, id, patient_id, kind FROM score_history
                     WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3"
                ),
                &[&after, &upto, &limit_arg(limit)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| LakeScore {
                point: history_row(r),
                cursor: r.get(6),
                patient_id: r.get(7),
                kind: r.get(8),
            })
            .collect())
    }
}

impl LakeStore for PgStore {
    fn lake_readings(
        &self,
        after: i64,
        upto: Option<i64>,
        limit: usize,
    ) -> Result<Vec<LakeReading>, StoreError> {
        self.run(self.db_lake_readings(after, upto.unwrap_or(i64::MAX), limit))
    }
    fn lake_readings_count(&self, after: i64) -> Result<u64, StoreError> {
        self.run(self.db_lake_readings_count(after))
    }
    fn lake_scores(
        &self,
        after: i64,
        upto: Option<i64>,
        limit: usize,
    ) -> Result<Vec<LakeScore>, StoreError> {
        self.run(self.db_lake_scores(after, upto.unwrap_or(i64::MAX), limit))
    }
    fn lake_exclusive(&self, export: &mut dyn FnMut()) -> Result<bool, StoreError> {
        // A session lock on one pooled connection, held (idle) while the
        // export runs on this thread with other connections.
        let c = self.run(self.conn())?;
        let got: bool = self.run(async {
            Ok(
                c.query_one("SELECT pg_try_advisory_lock($1)", &[&LAKE_LOCK])
                    .await?
                    .get(0),
            )
        })?;
        if !got {
            tracing::info!("lake export: another hub is exporting");
            return Ok(false);
        }
        export();
        self.run(async {
            c.execute("SELECT pg_advisory_unlock($1)", &[&LAKE_LOCK])
                .await?;
            Ok(())
        })?;
        Ok(true)
    }
}
