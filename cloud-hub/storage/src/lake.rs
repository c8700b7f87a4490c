//! What the analytics lake export (`hub_lake`) reads: stored readings and
//! the score history, each in cursor order, so an export can resume where
//! the last one stopped and never reads a row twice.

use hub_domain::fhir::render::ObservationRow;
use hub_domain::score_history::Point;

use crate::StoreError;

/// A stored reading row (`kind = 'reading'`, stand-alone or a part of a
/// blood-pressure panel) with its export cursor.
#[derive(Debug, Clone)]
pub struct LakeReading {
    /// Store-assigned, increasing in insertion order (SQLite: the rowid;
    /// PostgreSQL: `rid`).
    pub cursor: i64,
    pub row: ObservationRow,
}

/// A score history row with its export cursor.
#[derive(Debug, Clone, PartialEq)]
pub struct LakeScore {
    /// The row's id (increasing in insertion order).
    pub cursor: i64,
    /// The patient identifier's value.
    pub patient_id: String,
    /// `news2`, `qsofa` or `mews`.
    pub kind: String,
    /// Evaluation time and the entry.
    pub point: Point,
}

/// Cursor-paged reads for the lake export.
pub trait LakeStore {
    /// Reading rows with `after < cursor <= upto` (no upper bound when
    /// `upto` is None), by cursor, at most `limit`.
    fn lake_readings(
        &self,
        after: i64,
        upto: Option<i64>,
        limit: usize,
    ) -> Result<Vec<LakeReading>, StoreError>;
    /// How many reading rows have a cursor above `after` (progress).
    fn lake_readings_count(&self, after: i64) -> Result<u64, StoreError>;
    /// Score history rows with `after < cursor <= upto`, by cursor, at
    /// most `limit`.
    fn lake_scores(
        &self,
        after: i64,
        upto: Option<i64>,
        limit: usize,
    ) -> Result<Vec<LakeScore>, StoreError>;
    /// Runs `export` while holding the lake export lock, so that one hub
    /// at a time writes a lake: PostgreSQL takes a session advisory lock
    /// without waiting and returns false (without running `export`) when
    /// another hub holds it; SQLite (one hub per database) runs it at once.
    fn lake_exclusive(&self, export: &mut dyn FnMut()) -> Result<bool, StoreError>;
}
