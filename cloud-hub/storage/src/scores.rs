//! Early-warning scores: the rows a patient's scores are computed from
//! (device readings, manual inputs) and the score history. What is used,
//! stale or withheld, and whether a history row is written, is decided by
//! `hub_domain::early_warning::evaluate` and `hub_domain::score_history`.

use hub_domain::early_warning::{ReadingCandidates, StoredManual};
use hub_domain::score_history::{Entry, Kind, Point, WriteRule};

use crate::StoreError;

/// Score inputs, manual inputs and score history.
pub trait ScoreStore {
    /// `patient`'s readings (`kind = 'reading'`) of metric `mdc`, either
    /// stand-alone rows or the parts of panels (`panel_part`): the usable
    /// ones (stored value, status `final`) newest first, at most `limit`,
    /// and the newest row whatever its value and status.
    fn score_readings(
        &self,
        patient: &str,
        mdc: u32,
        panel_part: bool,
        limit: usize,
    ) -> Result<ReadingCandidates, StoreError>;
    /// Every score input of `patient` at once: [`Self::score_readings`] for
    /// each `(mdc, panel_part)` of `readings` and [`Self::latest_manual`] for
    /// each kind of `manual`, in their order. A backend may answer them from
    /// one read snapshot (SQLite: one read connection for all).
    #[allow(clippy::type_complexity)]
    fn score_inputs(
        &self,
        patient: &str,
        readings: &[(u32, bool)],
        limit: usize,
        manual: &[&str],
    ) -> Result<(Vec<ReadingCandidates>, Vec<Option<StoredManual>>), StoreError> {
        let r = readings
            .iter()
            .map(|&(mdc, panel_part)| self.score_readings(patient, mdc, panel_part, limit))
            .collect::<Result<_, _>>()?;
        let m = manual
            .iter()
            .map(|kind| self.latest_manual(patient, kind))
            .collect::<Result<_, _>>()?;
        Ok((r, m))
    }
    /// The latest manual input of `kind` (by effective time, then the last
    /// recorded), if any.
    fn latest_manual(&self, patient: &str, kind: &str) -> Result<Option<StoredManual>, StoreError>;
    /// Whether any manual input was recorded for `patient`.
    fn has_manual_inputs(&self, patient: &str) -> Result<bool, StoreError>;
    /// Records manual inputs (kind, value) at `effective_us`, in one
    /// transaction.
    fn record_manual(
        &self,
        patient: &str,
        inputs: &[(&str, String)],
        effective_us: i64,
        recorded_us: i64,
    ) -> Result<(), StoreError>;
    /// The last stored history row of `kind` for `patient`.
    fn last_score(&self, patient: &str, kind: Kind) -> Result<Option<Point>, StoreError>;
    /// In one transaction: each entry computed at `at_us` for which `rule`
    /// (given the last stored row of its kind) says so is stored. Returns
    /// the rows written.
    fn record_scores(
        &self,
        patient: &str,
        at_us: i64,
        entries: &[(Kind, Entry)],
        rule: WriteRule,
    ) -> Result<usize, StoreError>;
    /// `patient`'s history of `kind` in `[from_us, to_us)`, newest first, at
    /// most `limit` rows.
    fn score_history(
        &self,
        patient: &str,
        kind: Kind,
        from_us: i64,
        to_us: i64,
        limit: usize,
    ) -> Result<Vec<Point>, StoreError>;
}
