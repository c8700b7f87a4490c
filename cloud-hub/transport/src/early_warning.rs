//! Early-warning scores of a patient computed from stored data: the latest
//! usable value of each input within a freshness window, scored with the
//! pure functions of [`crate::scores`].
//!
//! Inputs:
//! - Device readings (stored observations with the patient's id):
//!   respiration rate, SpO2, systolic blood pressure (stand-alone readings
//!   and the systolic part of a blood-pressure panel, which is stored as its
//!   own row), pulse (the newest of ECG heart rate, pulse-oximeter pulse
//!   rate and NIBP pulse rate) and body temperature. A reading is usable
//!   only when its value is stored (`value` is NULL when withheld: device
//!   said invalid, or physically impossible) and its status is `final`
//!   (validity "valid"; questionable, calibrating or unspecified readings
//!   are `preliminary` and not used). Values are converted to the chart's
//!   unit (°F → °C, kPa → mmHg); a reading whose unit cannot be read (rows
//!   stored before schema v4 have no payload) is not used.
//! - Manual inputs (`PUT /api/v1/patients/{id}/manual-inputs`, table
//!   `manual_inputs`): level of consciousness (ACVPU), supplemental oxygen
//!   (yes/no) and the SpO2 scale. Consciousness and oxygen follow the
//!   freshness window like readings; the SpO2 scale is a standing clinical
//!   decision and applies until changed (Scale 1 when never set).
//!
//! An input older than `[scores] freshness_s` is *stale*: reported with its
//! value and time, never scored. A score is computed only when all of its
//! inputs are usable and fresh; otherwise it is `null` and the report lists
//! what is missing or stale. A reading newer than the one used that was not
//! usable is listed under `withheld` (so a monitor that went invalid is
//! visible, never silently replaced by its value).
//!
//! The rows come from the storage layer (`hub_storage::ScoreStore`); the
//! choice among them is `hub_domain::early_warning::evaluate`.
//!
//! Who may call the HTTP routes is decided by `crate::access::POLICY`
//! (clinicians and administrators).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::scores::Spo2Scale;
use crate::store::{Store, StoreError, now_us};

pub use hub_domain::early_warning::*;

/// Errors of the scores.
#[derive(Debug, thiserror::Error)]
pub enum ScoresError {
    #[error(transparent)]
    Store(StoreError),
    #[error("{field} {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("unknown patient")]
    UnknownPatient,
}

impl From<StoreError> for ScoresError {
    fn from(e: StoreError) -> Self {
        ScoresError::Store(e)
    }
}

/// Whether the hub knows `patient` (manual inputs, stays or attributed
/// readings).
fn known_patient(store: &Store, patient: &str) -> Result<bool, ScoresError> {
    Ok(store.has_manual_inputs(patient)? || store.patient(patient)?.is_some())
}

/// The rows `patient`'s scores are computed from.
fn load_inputs(store: &Store, patient: &str) -> Result<LoadedInputs, ScoresError> {
    // Every (parameter, code, kind of row) and manual kind, asked at once.
    let mut queries = Vec::new();
    for p in DEVICE_PARAMETERS {
        for &code in p.metric_codes() {
            for panel_part in [false, true] {
                queries.push((code, panel_part));
            }
        }
    }
    let manual: Vec<(Parameter, &str)> = MANUAL_PARAMETERS
        .into_iter()
        .filter_map(|p| p.manual_kind().map(|k| (p, k)))
        .collect();
    let kinds: Vec<&str> = manual.iter().map(|(_, k)| *k).collect();
    // The newest usable row of each source is nearly always the one used:
    // ask for one, and for up to CANDIDATES only where its unit cannot be
    // read (the first convertible one is used, as `latest_reading` says).
    let (mut rows, stored) = store.score_inputs(patient, &queries, 1, &kinds)?;
    for (c, &(mdc, panel_part)) in rows.iter_mut().zip(&queries) {
        let first_converts = c.usable.first().is_none_or(|r| {
            r.value
                .and_then(|v| {
                    hub_domain::early_warning::chart_value(c.mdc, v, r.payload.as_deref())
                })
                .is_some()
        });
        if !first_converts {
            *c = store.score_readings(patient, mdc, panel_part, CANDIDATES)?;
        }
    }
    let mut loaded = LoadedInputs::default();
    let mut rows = rows.drain(..);
    for p in DEVICE_PARAMETERS {
        let n = p.metric_codes().len() * 2;
        loaded.readings.push((p, rows.by_ref().take(n).collect()));
    }
    for ((p, _), m) in manual.into_iter().zip(stored) {
        if let Some(m) = m {
            loaded.manual.push((p, m));
        }
    }
    Ok(loaded)
}

/// Computes `patient`'s scores at `now_us` (see the module docs): the
/// store loads the rows, [`evaluate`] decides and scores.
pub fn compute(
    store: &Store,
    patient: &str,
    cfg: &ScoresConfig,
    now_us: i64,
) -> Result<ScoreReport, ScoresError> {
    if !known_patient(store, patient)? {
        return Err(ScoresError::UnknownPatient);
    }
    let loaded = load_inputs(store, patient)?;
    Ok(evaluate(patient, cfg, now_us, &loaded))
}

/// Stores manual inputs for a known patient.
pub fn record_manual(store: &Store, patient: &str, m: &ManualInputs) -> Result<(), ScoresError> {
    if !known_patient(store, patient)? {
        return Err(ScoresError::UnknownPatient);
    }
    store.record_manual(patient, &m.stored(), m.effective_us, now_us())?;
    Ok(())
}

// ---- HTTP ----------------------------------------------------------------

/// State of the scores routes.
#[derive(Debug, Clone)]
pub struct ScoresState {
    store: Store,
    config: ScoresConfig,
}

impl ScoresState {
    pub fn new(store: Store, config: ScoresConfig) -> Self {
        Self { store, config }
    }
}

/// The scores routes (who may call them: `crate::access::POLICY`).
pub fn router<S: Clone + Send + Sync + 'static>(state: ScoresState) -> Router<S> {
    Router::new()
        .route("/api/v1/patients/{id}/scores", get(get_scores))
        .route("/api/v1/patients/{id}/scores/news2", get(get_news2_fhir))
        .route(
            "/api/v1/patients/{id}/manual-inputs",
            put(put_manual_inputs),
        )
        .layer(DefaultBodyLimit::max(4 * 1024))
        .with_state(state)
}

fn error(status: StatusCode, message: &str, field: Option<&str>) -> Response {
    let body = match field {
        Some(f) => json!({ "error": message, "field": f }),
        None => json!({ "error": message }),
    };
    (status, axum::Json(body)).into_response()
}

impl IntoResponse for ScoresError {
    fn into_response(self) -> Response {
        match &self {
            ScoresError::Invalid { field, .. } => {
                error(StatusCode::BAD_REQUEST, &self.to_string(), Some(field))
            }
            ScoresError::UnknownPatient => error(StatusCode::NOT_FOUND, &self.to_string(), None),
            ScoresError::Store(e) => {
                tracing::error!(error = %e, "early-warning scores failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, "internal error", None)
            }
        }
    }
}

/// Runs a store call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ScoresError> + Send + 'static,
) -> Result<T, ScoresError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "early-warning scores task failed");
        Err(ScoresError::Store(StoreError::Poisoned))
    })
}

async fn get_scores(State(st): State<ScoresState>, Path(id): Path<String>) -> Response {
    let (store, cfg) = (st.store.clone(), st.config);
    match blocking(move || compute(&store, &id, &cfg, now_us())).await {
        Ok(report) => axum::Json(report_json(&report)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_news2_fhir(State(st): State<ScoresState>, Path(id): Path<String>) -> Response {
    let (store, cfg) = (st.store.clone(), st.config);
    match blocking(move || compute(&store, &id, &cfg, now_us())).await {
        Ok(report) => match crate::fhir::render::render_news2(&report) {
            Some(obs) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(crate::fhir::FHIR_JSON),
                )],
                obs.to_string(),
            )
                .into_response(),
            None => {
                let missing: Vec<&str> = report
                    .missing
                    .iter()
                    .chain(report.stale.iter().map(|i| &i.parameter))
                    .map(|p| p.as_str())
                    .collect();
                error(
                    StatusCode::CONFLICT,
                    &format!(
                        "NEWS2 cannot be computed: missing or stale inputs: {}",
                        missing.join(", ")
                    ),
                    None,
                )
            }
        },
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManualInputsBody {
    consciousness: Option<String>,
    supplemental_oxygen: Option<bool>,
    spo2_scale: Option<u8>,
    /// RFC 3339; absent: now.
    at: Option<String>,
}

/// How far ahead of the hub clock a manual input's time may be.
const MAX_FUTURE_US: i64 = 60 * 1_000_000;

fn invalid(field: &'static str, message: impl Into<String>) -> ScoresError {
    ScoresError::Invalid {
        field,
        message: message.into(),
    }
}

fn parse_manual(body: &[u8], now: i64) -> Result<ManualInputs, ScoresError> {
    let b: ManualInputsBody = serde_json::from_slice(body)
        .map_err(|e| invalid("body", format!("is not a valid manual-inputs object: {e}")))?;
    let consciousness = b
        .consciousness
        .as_deref()
        .map(|c| {
            parse_consciousness(c).ok_or_else(|| {
                invalid(
                    "consciousness",
                    "must be one of alert, new_confusion, voice, pain, unresponsive",
                )
            })
        })
        .transpose()?;
    let spo2_scale = match b.spo2_scale {
        None => None,
        Some(1) => Some(Spo2Scale::Scale1),
        Some(2) => Some(Spo2Scale::Scale2),
        Some(_) => return Err(invalid("spo2_scale", "must be 1 or 2")),
    };
    if consciousness.is_none() && b.supplemental_oxygen.is_none() && spo2_scale.is_none() {
        return Err(invalid(
            "body",
            "needs at least one of consciousness, supplemental_oxygen, spo2_scale",
        ));
    }
    let effective_us = match b.at.as_deref() {
        None => now,
        Some(text) => {
            let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
                invalid(
                    "at",
                    format!("must be an RFC 3339 time like 2026-11-24T08:30:00Z: {e}"),
                )
            })?;
            let us = i64::try_from(t.unix_timestamp_nanos() / 1000)
                .map_err(|_| invalid("at", "is out of range"))?;
            if us < shared_protocol::EPOCH_2000_US {
                return Err(invalid("at", "must not be before 2000-01-01"));
            }
            if us > now.saturating_add(MAX_FUTURE_US) {
                return Err(invalid("at", "must not be ahead of the hub clock"));
            }
            us
        }
    };
    Ok(ManualInputs {
        consciousness,
        supplemental_oxygen: b.supplemental_oxygen,
        spo2_scale,
        effective_us,
    })
}

async fn put_manual_inputs(
    State(st): State<ScoresState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let now = now_us();
    let inputs = match parse_manual(&body, now) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let (store, cfg) = (st.store.clone(), st.config);
    let result = blocking(move || {
        record_manual(&store, &id, &inputs)?;
        let report = compute(&store, &id, &cfg, now_us())?;
        // A bedside entry changes the score now, not at the next batch
        // (when the score history is on: `[scores] history`).
        if cfg.history
            && let Err(e) = crate::score_history::record(&store, &report)
        {
            tracing::warn!(error = %e, "recording the score history failed");
        }
        Ok(report)
    })
    .await;
    match result {
        Ok(report) => axum::Json(report_json(&report)).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scores::Consciousness;

    #[test]
    fn manual_input_bodies_are_checked() {
        let now = 1_800_000_000_000_000;
        let m = parse_manual(
            br#"{"consciousness":"voice","supplemental_oxygen":true}"#,
            now,
        )
        .unwrap();
        assert_eq!(m.consciousness, Some(Consciousness::Voice));
        assert_eq!(m.supplemental_oxygen, Some(true));
        assert_eq!(m.effective_us, now);
        let field = |b: &[u8]| match parse_manual(b, now) {
            Err(ScoresError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(br#"{"consciousness":"sleepy"}"#), "consciousness");
        assert_eq!(field(br#"{"spo2_scale":3}"#), "spo2_scale");
        assert_eq!(field(br#"{}"#), "body");
        assert_eq!(field(br#"{"oxygen":true}"#), "body");
        assert_eq!(
            field(br#"{"consciousness":"alert","at":"yesterday"}"#),
            "at"
        );
        assert_eq!(
            field(br#"{"consciousness":"alert","at":"2099-01-01T00:00:00Z"}"#),
            "at"
        );
    }
}
