//! The lake export's reads (`hub_storage::LakeStore`): reading rows by
//! rowid and the score history by id, from a read connection.

use hub_storage::{LakeReading, LakeScore, LakeStore, StoreError};
use rusqlite::params;

use crate::scores::{HISTORY_COLUMNS, history_row};
use crate::{DbError, OBS_COLUMN_COUNT, OBS_COLUMNS, OBS_FROM, SqliteStore, obs_row};

impl SqliteStore {
    fn db_lake_readings(
        &self,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<LakeReading>, DbError> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {OBS_COLUMNS}, o.rowid FROM {OBS_FROM}
             WHERE o.rowid > ?1 AND o.rowid <= ?2 AND o.kind = 'reading'
             ORDER BY o.rowid LIMIT ?3"
        ))?;
        let rows = stmt
            .query_map(
                params![after, upto, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok(LakeReading {
                        cursor: r.get(OBS_COLUMN_COUNT)?,
                        row: obs_row(r)?,
                    })
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn db_lake_readings_count(&self, after: i64) -> Result<u64, DbError> {
        let n: i64 = self.reader()?.query_row(
            "SELECT COUNT(*) FROM observations WHERE rowid > ?1 AND kind = 'reading'",
            [after],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn db_lake_scores(
        &self,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<LakeScore>, DbError> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {HISTORY_COLUMNS}, id, patient_id, kind FROM score_history
             WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3"
        ))?;
        let rows = stmt
            .query_map(
                params![after, upto, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok(LakeScore {
                        point: history_row(r)?,
                        cursor: r.get(6)?,
                        patient_id: r.get(7)?,
                        kind: r.get(8)?,
                    })
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

impl LakeStore for SqliteStore {
    fn lake_readings(
        &self,
        after: i64,
        upto: Option<i64>,
        limit: usize,
    ) -> Result<Vec<LakeReading>, StoreError> {
        Ok(self.db_lake_readings(after, upto.unwrap_or(i64::MAX), limit)?)
    }
    fn lake_readings_count(&self, after: i64) -> Result<u64, StoreError> {
        Ok(self.db_lake_readings_count(after)?)
    }
    fn lake_scores(
        &self,
        after: i64,
        upto: Option<i64>,
        limit: usize,
    ) -> Result<Vec<LakeScore>, StoreError> {
        Ok(self.db_lake_scores(after, upto.unwrap_or(i64::MAX), limit)?)
    }
    fn lake_exclusive(&self, export: &mut dyn FnMut()) -> Result<bool, StoreError> {
        // One hub per SQLite database, and its exports run one after the
        // other (the serve loop waits for each).
        export();
        Ok(true)
    }
}
