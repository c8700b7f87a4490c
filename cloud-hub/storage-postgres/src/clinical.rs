//! The clinical concern (scores, manual inputs, score history, alerts,
//! trend series) has no PostgreSQL tables yet: every method answers
//! [`StoreError::Unsupported`], never a silent no-op. The hub turns that
//! into its documented answers (501 for scores, history and series; the
//! alert engine off). Implementing these is the next issue: the logic is
//! already in `hub_domain`, only the queries are missing.

use hub_domain::alerts::engine::{Alert, Change};
use hub_domain::early_warning::{ReadingCandidates, StoredManual};
use hub_domain::score_history::{Entry, Kind, Point, WriteRule};
use hub_storage::{
    AlertFilter, AlertStore, AlertsLoaded, ScoreStore, StoreError, Transitioned, TrendStore,
};

use crate::PgStore;

const BACKEND: &str = "postgres";

fn unsupported<T>(what: &'static str) -> Result<T, StoreError> {
    Err(StoreError::Unsupported(what, BACKEND))
}

impl ScoreStore for PgStore {
    fn score_readings(
        &self,
        _patient: &str,
        _mdc: u32,
        _panel_part: bool,
        _limit: usize,
    ) -> Result<ReadingCandidates, StoreError> {
        unsupported("early-warning score inputs")
    }
    fn latest_manual(
        &self,
        _patient: &str,
        _kind: &str,
    ) -> Result<Option<StoredManual>, StoreError> {
        unsupported("manual score inputs")
    }
    fn has_manual_inputs(&self, _patient: &str) -> Result<bool, StoreError> {
        unsupported("manual score inputs")
    }
    fn record_manual(
        &self,
        _patient: &str,
        _inputs: &[(&str, String)],
        _effective_us: i64,
        _recorded_us: i64,
    ) -> Result<(), StoreError> {
        unsupported("manual score inputs")
    }
    fn last_score(&self, _patient: &str, _kind: Kind) -> Result<Option<Point>, StoreError> {
        unsupported("score history")
    }
    fn record_scores(
        &self,
        _patient: &str,
        _at_us: i64,
        _entries: &[(Kind, Entry)],
        _rule: WriteRule,
    ) -> Result<usize, StoreError> {
        unsupported("score history")
    }
    fn score_history(
        &self,
        _patient: &str,
        _kind: Kind,
        _from_us: i64,
        _to_us: i64,
        _limit: usize,
    ) -> Result<Vec<Point>, StoreError> {
        unsupported("score history")
    }
}

impl AlertStore for PgStore {
    fn load_alerts(&self) -> Result<AlertsLoaded, StoreError> {
        unsupported("alerts")
    }
    fn commit_alerts(&self, _changes: &[Change], _now_us: i64) -> Result<(), StoreError> {
        unsupported("alerts")
    }
    fn list_alerts(&self, _filter: &AlertFilter) -> Result<Vec<Alert>, StoreError> {
        unsupported("alerts")
    }
    fn alert(&self, _id: i64) -> Result<Option<(Alert, Vec<Transitioned>)>, StoreError> {
        unsupported("alerts")
    }
    fn set_alert_overrides(
        &self,
        _patient: &str,
        _overrides: &[(String, String)],
        _actor: &str,
        _now_us: i64,
    ) -> Result<(), StoreError> {
        unsupported("alert rule overrides")
    }
}

impl TrendStore for PgStore {
    fn series(
        &self,
        _patient: &str,
        _mdc: u32,
        _resolution_s: i64,
        _from_bucket_us: i64,
        _to_us: i64,
    ) -> Result<Vec<hub_domain::trends::Point>, StoreError> {
        unsupported("trend series")
    }
}
