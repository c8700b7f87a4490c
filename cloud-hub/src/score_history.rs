//! Early-warning score history: the NEWS2, qSOFA and MEWS results the hub
//! computed for a patient over time, so charts can show the score.
//!
//! Rows are written where the scores are already recomputed after each
//! ingested batch (`alerts::AlertService::on_batch`, for every patient with
//! a new usable value), from the same [`ScoreReport`]. What a row holds
//! ([`entry`]) and the write rule ([`should_write`]) are
//! `hub_domain::score_history`; the rows are stored through
//! `hub_storage::ScoreStore`. **Write rule**, per
//! patient and score kind: a row when the result (total, band, components,
//! missing/stale inputs) differs from the last stored row, otherwise at most
//! one row per [`HEARTBEAT_US`] (one minute). An unchanged score therefore
//! costs at most 1 440 rows a day per kind; a changing one a row per
//! evaluation (at most one per ingested batch of the patient).
//!
//! A score that cannot be computed is stored with a NULL total and the
//! inputs that were missing or stale, never a guessed value. Rows are what
//! was computed at the time from the readings attributed then: a later
//! re-attribution (`association`) does not rewrite them.
//!
//! `GET /api/v1/patients/{id}/scores/history?kind=news2&from=…&to=…`
//! (clinicians: `crate::access::POLICY`). See docs/scores.md, "History".

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::storage::StoreError;
use crate::store::{Store, now_us};
use hub_domain::early_warning::ScoreReport;

pub use hub_domain::score_history::*;

const S: i64 = 1_000_000;

/// Stores the report's results by the write rule ([`should_write`]), at
/// the report's computation time, in one transaction. Returns the rows
/// written.
pub fn record(store: &Store, report: &ScoreReport) -> Result<usize, StoreError> {
    let entries: Vec<(Kind, Entry)> = Kind::ALL.map(|k| (k, entry(report, k))).into();
    store.record_scores(
        &report.patient,
        report.computed_at_us,
        &entries,
        should_write,
    )
}

/// A patient's history of `kind` in `[from_us, to_us)`, oldest first; at
/// most [`MAX_POINTS`] (the newest) and whether older ones were left out.
pub fn history(
    store: &Store,
    patient: &str,
    kind: Kind,
    from_us: i64,
    to_us: i64,
) -> Result<(Vec<Point>, bool), StoreError> {
    let mut rows = store.score_history(patient, kind, from_us, to_us, MAX_POINTS + 1)?;
    let truncated = rows.len() > MAX_POINTS;
    rows.truncate(MAX_POINTS);
    rows.reverse();
    Ok((rows, truncated))
}

// ---- HTTP ----------------------------------------------------------------

#[derive(Debug, Clone)]
struct HistoryState {
    store: Store,
}

/// The history route (who may call it: `crate::access::POLICY`).
pub fn router<S: Clone + Send + Sync + 'static>(store: Store) -> Router<S> {
    Router::new()
        .route("/api/v1/patients/{id}/scores/history", get(get_history))
        .with_state(HistoryState { store })
}

#[derive(Debug, serde::Deserialize)]
struct HistoryQuery {
    kind: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

use crate::trends::{bad, parse_time};

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "score history query failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(json!({ "error": "internal error" })),
    )
        .into_response()
}

async fn get_history(
    State(st): State<HistoryState>,
    Path(patient): Path<String>,
    q: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return bad("query", "kind, from, to");
    };
    let kind = match q.kind.as_deref() {
        None => Kind::News2,
        Some(k) => match Kind::parse(k) {
            Some(k) => k,
            None => return bad("kind", "must be news2, qsofa or mews"),
        },
    };
    let to = match parse_time("to", q.to.as_deref(), now_us()) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let from = match parse_time("from", q.from.as_deref(), to - 24 * 3600 * S) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    if from >= to {
        return bad("from", "must be before `to`");
    }
    if to - from > MAX_WINDOW_US {
        return bad("from", "the window may span at most 7 days");
    }
    let store = st.store.clone();
    let p = patient.clone();
    let (points, truncated) =
        match tokio::task::spawn_blocking(move || history(&store, &p, kind, from, to)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return internal(e),
            Err(e) => return internal(e),
        };
    let fmt = crate::fhir::format_instant;
    axum::Json(json!({
        "patient": patient,
        "kind": kind.as_str(),
        "from": fmt(from),
        "to": fmt(to),
        "heartbeat_s": HEARTBEAT_US / S,
        "truncated": truncated,
        "points": points.iter().map(|(t, e)| json!({
            "time": fmt(*t),
            "total": e.total,
            "band": e.band,
            "missing": e.missing,
            "stale": e.stale,
            "components": e.components,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scores::{self, Consciousness, News2Input, Spo2Scale};
    use hub_domain::early_warning::{Input, InputValue, Parameter, Source};

    const T0: i64 = 1_795_514_400_000_000;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("h.sqlite")).unwrap();
        (dir, s)
    }

    fn report(at: i64, rr: Option<f64>) -> ScoreReport {
        let mut r = ScoreReport {
            patient: "p-1".into(),
            computed_at_us: at,
            freshness_s: 900,
            used: vec![],
            stale: vec![],
            missing: vec![],
            withheld: vec![],
            news2: None,
            qsofa: None,
            mews: None,
        };
        match rr {
            Some(rr) => {
                r.news2 = Some(scores::news2(&News2Input {
                    respiration_rate: rr,
                    spo2: 97.0,
                    spo2_scale: Spo2Scale::Scale1,
                    on_oxygen: false,
                    systolic_bp: 120.0,
                    pulse: 80.0,
                    consciousness: Consciousness::Alert,
                    temperature_c: 37.0,
                }));
                r.qsofa = Some(scores::qsofa(rr, 120.0, false));
                r.mews = Some(scores::mews(120.0, 80.0, rr, 37.0, Consciousness::Alert));
            }
            None => {
                // Respiration rate stale: none of the three scores.
                r.stale.push(Input {
                    parameter: Parameter::RespirationRate,
                    value: InputValue::Number(18.0),
                    effective_us: Some(at - 3600 * S),
                    source: Source::Observation("1".into()),
                });
                r.missing.push(Parameter::Consciousness);
            }
        }
        r
    }

    fn news2_rows(s: &Store) -> Vec<Point> {
        history(s, "p-1", Kind::News2, 0, i64::MAX).unwrap().0
    }

    #[test]
    fn unchanged_results_are_stored_at_most_once_a_minute() {
        let (_d, s) = store();
        assert_eq!(record(&s, &report(T0, Some(16.0))).unwrap(), 3);
        // Same result 1 s and 59 s later: nothing written.
        assert_eq!(record(&s, &report(T0 + S, Some(16.0))).unwrap(), 0);
        assert_eq!(record(&s, &report(T0 + 59 * S, Some(16.0))).unwrap(), 0);
        // A minute after the last row: written again.
        assert_eq!(record(&s, &report(T0 + 60 * S, Some(16.0))).unwrap(), 3);
        // A change is written at once (NEWS2 RR 26 → 3; qSOFA RR ≥ 22; MEWS).
        assert_eq!(record(&s, &report(T0 + 61 * S, Some(26.0))).unwrap(), 3);
        let rows = news2_rows(&s);
        let times: Vec<i64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(times, vec![T0, T0 + 60 * S, T0 + 61 * S]);
        assert_eq!(rows[0].1.total, Some(0));
        assert_eq!(rows[0].1.band.as_deref(), Some("low"));
        assert_eq!(rows[2].1.total, Some(3));
        assert_eq!(rows[2].1.band.as_deref(), Some("low-medium"));
        assert_eq!(
            rows[2].1.components.as_ref().unwrap()["respiration_rate"],
            3
        );
        let q = history(&s, "p-1", Kind::Qsofa, 0, i64::MAX).unwrap().0;
        assert_eq!(q.last().unwrap().1.total, Some(1));
        assert_eq!(q.last().unwrap().1.band.as_deref(), Some("negative"));
    }

    #[test]
    fn a_score_that_cannot_be_computed_is_null_with_its_missing_inputs() {
        let (_d, s) = store();
        record(&s, &report(T0, Some(16.0))).unwrap();
        record(&s, &report(T0 + S, None)).unwrap();
        // Unchanged (still not computable) 10 s later: nothing new.
        assert_eq!(record(&s, &report(T0 + 11 * S, None)).unwrap(), 0);
        let rows = news2_rows(&s);
        assert_eq!(rows.len(), 2);
        let e = &rows[1].1;
        assert_eq!(e.total, None);
        assert_eq!(e.band, None);
        assert_eq!(e.components, None);
        assert_eq!(e.missing, vec!["consciousness", "respiration_rate"]);
        assert_eq!(e.stale, vec!["respiration_rate"]);
        // MEWS needs both too; qSOFA lists only its own inputs.
        let m = history(&s, "p-1", Kind::Mews, 0, i64::MAX).unwrap().0;
        assert_eq!(m[1].1.total, None);
        assert_eq!(m[1].1.missing, vec!["consciousness", "respiration_rate"]);
    }

    #[test]
    fn history_is_windowed_oldest_first_and_per_patient() {
        let (_d, s) = store();
        for i in 0..5 {
            record(&s, &report(T0 + i * 60 * S, Some(16.0 + i as f64))).unwrap();
        }
        let mut other = report(T0, Some(30.0));
        other.patient = "p-2".into();
        record(&s, &other).unwrap();
        let (rows, truncated) = history(&s, "p-1", Kind::News2, T0 + 60 * S, T0 + 240 * S).unwrap();
        assert!(!truncated);
        let times: Vec<i64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(times, vec![T0 + 60 * S, T0 + 120 * S, T0 + 180 * S]);
        assert_eq!(
            history(&s, "p-2", Kind::News2, 0, i64::MAX)
                .unwrap()
                .0
                .len(),
            1
        );
        assert!(Kind::parse("sofa").is_none());
        // Retention purges rows by evaluation time, like the observations.
        let purged = s.purge_before(T0 + 120 * S).unwrap();
        assert_eq!(purged.scores, 2 * 3 + 3);
        let left: Vec<i64> = news2_rows(&s).iter().map(|r| r.0).collect();
        assert_eq!(left, vec![T0 + 120 * S, T0 + 180 * S, T0 + 240 * S]);
        assert_eq!(Kind::parse("mews"), Some(Kind::Mews));
    }
}
