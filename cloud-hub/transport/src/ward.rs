//! The ward overview: one entry per bed of a ward with its patient, the
//! latest usable value of each vital (with its time, age and whether it is
//! stale), NEWS2 with its band and the patient's open alerts; sorted by
//! risk (highest open alert priority, then NEWS2, then bed). What the
//! clinician dashboard's ward view shows. Built from the bed stays
//! (`association`), the score inputs (`early_warning::compute`, so the
//! same usable/stale rules) and the alert engine's open alerts.
//!
//! `GET /api/v1/wards/{ward}/overview` (clinicians: `crate::access::POLICY`).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value as Json, json};

use crate::alerts::AlertService;
use crate::alerts::rules::Priority;
use crate::early_warning::{InputValue, Parameter, ScoresConfig, ScoresError};
use crate::store::{Store, now_us};

/// One bed of the overview.
#[derive(Debug, Clone)]
pub struct BedView {
    pub json: Json,
    /// Sort key: (highest open alert priority, NEWS2 total), higher first.
    rank: (Option<Priority>, i32),
    bed_id: String,
}

/// The overview of `ward` at `now_us`, riskiest bed first.
pub fn overview(
    store: &Store,
    alerts: Option<&AlertService>,
    scores: &ScoresConfig,
    ward: &str,
    now_us: i64,
) -> Result<Vec<Json>, ScoresError> {
    let beds = store.occupancy(now_us).map_err(|e| match e {
        crate::association::AssocError::Store(e) => ScoresError::Store(e),
        other => ScoresError::Store(crate::store::StoreError::Io(std::io::Error::other(
            other.to_string(),
        ))),
    })?;
    let mut views = Vec::new();
    for b in beds.into_iter().filter(|b| b.bed.ward == ward) {
        let mut j = json!({
            "bed": { "id": b.bed.id, "label": b.bed.label, "ward": b.bed.ward },
            "devices": b.devices.iter().map(|d| json!({ "gateway_id": d.gateway_id, "device_id": d.device_id })).collect::<Vec<_>>(),
        });
        let mut rank = (None, -1);
        if let Some(p) = &b.patient {
            j["patient"] = json!({ "system": p.system, "value": p.value });
            let report = match crate::early_warning::compute(store, &p.value, scores, now_us) {
                Ok(r) => Some(r),
                Err(ScoresError::UnknownPatient) => None,
                Err(e) => return Err(e),
            };
            let mut vitals = Vec::new();
            if let Some(r) = &report {
                for (input, stale) in r
                    .used
                    .iter()
                    .map(|i| (i, false))
                    .chain(r.stale.iter().map(|i| (i, true)))
                {
                    let (InputValue::Number(v), Some(t)) = (input.value, input.effective_us) else {
                        continue;
                    };
                    vitals.push(json!({
                        "parameter": input.parameter.as_str(),
                        "value": v,
                        "unit": crate::alerts::rules::unit_of(input.parameter),
                        "time": crate::fhir::format_instant(t),
                        "age_s": (now_us - t).max(0) / 1_000_000,
                        "stale": stale,
                    }));
                }
                vitals.sort_by_key(|v| order(v["parameter"].as_str().unwrap_or_default()));
                if let Some(n) = &r.news2 {
                    j["news2"] =
                        json!({ "total": n.total, "band": crate::early_warning::band(n.risk) });
                    rank.1 = i32::from(n.total);
                }
            }
            j["vitals"] = Json::Array(vitals);
            if let Some(a) = alerts {
                let (count, highest) = a.open_for_patient(&p.value);
                j["alerts"] = json!({ "open": count, "highest": highest.map(Priority::as_str) });
                rank.0 = highest;
            }
        }
        views.push(BedView {
            json: j,
            rank,
            bed_id: b.bed.id,
        });
    }
    views.sort_by(|a, b| b.rank.cmp(&a.rank).then_with(|| a.bed_id.cmp(&b.bed_id)));
    Ok(views.into_iter().map(|v| v.json).collect())
}

/// The chart's order of the vitals.
fn order(p: &str) -> usize {
    [
        Parameter::RespirationRate,
        Parameter::Spo2,
        Parameter::SystolicBp,
        Parameter::Pulse,
        Parameter::Temperature,
    ]
    .iter()
    .position(|x| x.as_str() == p)
    .unwrap_or(usize::MAX)
}

/// State of the ward route.
#[derive(Debug, Clone)]
pub struct WardState {
    store: Store,
    alerts: Option<Arc<AlertService>>,
    scores: ScoresConfig,
}

impl WardState {
    /// `alerts`: the alert engine when it runs (the overview shows open alerts).
    pub fn new(store: Store, alerts: Option<Arc<AlertService>>, scores: ScoresConfig) -> Self {
        Self {
            store,
            alerts,
            scores,
        }
    }
}

/// The ward overview route.
pub fn router<S: Clone + Send + Sync + 'static>(state: WardState) -> Router<S> {
    Router::new()
        .route("/api/v1/wards/{ward}/overview", get(get_overview))
        .with_state(state)
}

async fn get_overview(State(st): State<WardState>, Path(ward): Path<String>) -> Response {
    let now = now_us();
    let w = ward.clone();
    let r = tokio::task::spawn_blocking(move || {
        overview(&st.store, st.alerts.as_deref(), &st.scores, &w, now)
    })
    .await;
    match r {
        Ok(Ok(beds)) => {
            // The audit entry names the patients shown.
            let patients: Vec<String> = beds
                .iter()
                .filter_map(|b| b["patient"]["value"].as_str().map(str::to_owned))
                .collect();
            crate::audit::with_patients(
                axum::Json(json!({
                    "ward": ward,
                    "at": crate::fhir::format_instant(now),
                    "beds": beds,
                }))
                .into_response(),
                patients,
            )
        }
        Ok(Err(e)) => e.into_response(),
        Err(e) => {
            tracing::error!(error = %e, "ward overview task failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}
