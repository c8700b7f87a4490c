//! Aggregates and trends for charts: per patient and metric, 1-minute,
//! 5-minute and 1-hour buckets of count, sum, min and max of the usable
//! values (status `final` with a stored value: valid and physically
//! possible), in the metric's chart unit (°F and kPa converted, as for the
//! scores; readings in a unit that cannot be converted are left out).
//!
//! Maintained at ingest (grouped per batch, one upsert per bucket) and
//! rebuilt from the stored rows when readings are re-attributed to another
//! patient, so a chart never shows another patient's values. Buckets are
//! kept per device (key includes gateway and device) so that a rebuild is
//! exact; a patient's series sums its devices' buckets. A chart at any zoom
//! reads at most a few thousand bucket rows, never the raw readings.
//!
//! `GET /api/v1/patients/{id}/series?code=…&from=…&to=…&resolution=…`
//! (clinicians: `crate::access::POLICY`). See docs/scores.md "Trends". The
//! buckets are read through `hub_storage::TrendStore`.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use shared_protocol::CATALOGUE;

use crate::storage::StoreError;
use crate::store::{Store, now_us};

pub use hub_domain::trends::*;

const S: i64 = 1_000_000;

/// A patient's series of one metric over `[from, to)` at `resolution_s`
/// (from the bucket holding `from`).
pub fn series(
    store: &Store,
    patient: &str,
    mdc: u32,
    resolution_s: i64,
    from: i64,
    to: i64,
) -> Result<Vec<Point>, StoreError> {
    store.series(&crate::store::SeriesQuery::new(
        patient,
        mdc,
        resolution_s,
        from,
        to,
    ))
}

/// [`series`] as the API reads it: the store's non-blocking read when it
/// has one (`crate::pipeline::read_future`).
async fn series_read(
    store: &Store,
    q: crate::store::SeriesQuery,
) -> Result<Vec<Point>, crate::TransportError> {
    let future = store.series_future(&q);
    let s = store.clone();
    crate::pipeline::read_future(store, future, move || s.series(&q)).await
}

// ---- HTTP ----------------------------------------------------------------

/// State of the series route.
#[derive(Debug, Clone)]
pub struct TrendsState {
    store: Store,
}

impl TrendsState {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// The chart series route.
pub fn router<S: Clone + Send + Sync + 'static>(state: TrendsState) -> Router<S> {
    Router::new()
        .route("/api/v1/patients/{id}/series", get(get_series))
        .with_state(state)
}

#[derive(Debug, serde::Deserialize)]
struct SeriesQuery {
    code: Option<String>,
    from: Option<String>,
    to: Option<String>,
    resolution: Option<i64>,
}

/// 400 with the field at fault (also used by `score_history`).
pub(crate) fn bad(field: &str, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": message, "field": field })),
    )
        .into_response()
}

/// An optional RFC 3339 query time in UTC µs (`default` when absent).
pub(crate) fn parse_time(field: &str, s: Option<&str>, default: i64) -> Result<i64, Box<Response>> {
    match s {
        None => Ok(default),
        Some(s) => time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .ok()
            .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1000).ok())
            .ok_or_else(|| {
                Box::new(bad(
                    field,
                    "must be an RFC 3339 time like 2026-11-24T10:00:00Z",
                ))
            }),
    }
}

async fn get_series(
    State(st): State<TrendsState>,
    Path(patient): Path<String>,
    q: Result<Query<SeriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return bad("query", "code, from, to, resolution (60, 300 or 3600)");
    };
    let Some(code) = q.code.as_deref() else {
        return bad(
            "code",
            "required: an MDC code (e.g. 150456) or a LOINC code (e.g. 59408-5)",
        );
    };
    let metric = match code.parse::<u32>() {
        Ok(mdc) => CATALOGUE.by_mdc(mdc).copied(),
        Err(_) => CATALOGUE.by_loinc(code).next(),
    };
    let Some(metric) = metric else {
        return bad("code", "not a metric of the catalogue");
    };
    let now = now_us();
    let to = match parse_time("to", q.to.as_deref(), now) {
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
    let resolution = match q.resolution {
        None => auto_resolution(to - from),
        Some(r) if RESOLUTIONS.contains(&r) => r,
        Some(_) => return bad("resolution", "must be 60, 300 or 3600 (seconds)"),
    };
    if (to - from) / (resolution * S) > 5000 {
        return bad(
            "resolution",
            "more than 5000 points: use a coarser resolution",
        );
    }
    let q = crate::store::SeriesQuery::new(&patient, metric.mdc, resolution, from, to);
    let r = series_read(&st.store, q).await;
    let points = match r {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "series query failed");
            return (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response();
        }
    };
    let fmt = crate::fhir::format_instant;
    let trend = slope_per_hour(&points);
    // Serialized straight into the response buffer (no `Value` tree).
    let body = SeriesBody {
        patient: &patient,
        code: SeriesCode {
            mdc: metric.mdc,
            loinc: metric.loinc,
            display: metric.display,
        },
        unit: metric.unit.ucum,
        from: fmt(from),
        to: fmt(to),
        resolution_s: resolution,
        points: points
            .iter()
            .map(|p| SeriesPoint {
                start: fmt(p.start_us),
                count: p.count,
                min: p.min,
                max: p.max,
                mean: p.mean,
            })
            .collect(),
        trend: SeriesTrend {
            per_hour: trend,
            points: points.len(),
        },
    };
    axum::Json(body).into_response()
}

/// The series response (`points` and `trend` as documented in docs/hub.md).
#[derive(serde::Serialize)]
struct SeriesBody<'a> {
    patient: &'a str,
    code: SeriesCode,
    unit: &'static str,
    from: String,
    to: String,
    resolution_s: i64,
    points: Vec<SeriesPoint>,
    trend: SeriesTrend,
}

#[derive(serde::Serialize)]
struct SeriesCode {
    mdc: u32,
    loinc: &'static str,
    display: &'static str,
}

#[derive(serde::Serialize)]
struct SeriesPoint {
    start: String,
    count: i64,
    min: f64,
    max: f64,
    mean: f64,
}

#[derive(serde::Serialize)]
struct SeriesTrend {
    per_hour: Option<f64>,
    points: usize,
}
