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

/// State of the history route.
#[derive(Debug, Clone)]
pub struct HistoryState {
    store: Store,
}

impl HistoryState {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// The history route (who may call it: `crate::access::POLICY`).
pub fn router<S: Clone + Send + Sync + 'static>(state: HistoryState) -> Router<S> {
    Router::new()
        .route("/api/v1/patients/{id}/scores/history", get(get_history))
        .with_state(state)
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
