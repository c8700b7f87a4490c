//! Early-warning scores of a patient computed from stored data: the latest
//! usable value of each input within a freshness window, scored with the
//! pure functions of [`crate::scores`].
//!
//! Inputs:
//! - Device readings (rows of `observations` with the patient's id):
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
//! SQLite only for now: on PostgreSQL every function returns
//! [`ScoresError::Postgres`] (HTTP 501).
//!
//! Who may call the HTTP routes is decided by `crate::access::POLICY`
//! (clinicians and administrators).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::scores::{self, Consciousness, Spo2Scale};
use crate::store::{Store, StoreError, now_us};

pub use hub_domain::early_warning::*;

/// Errors of the scores.
#[derive(Debug, thiserror::Error)]
pub enum ScoresError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("early-warning scores are not supported on PostgreSQL yet (SQLite backend only)")]
    Postgres,
    #[error("{field} {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("unknown patient")]
    UnknownPatient,
}

fn sqlite(store: &Store) -> Result<std::sync::MutexGuard<'_, Connection>, ScoresError> {
    if store.postgres().is_some() {
        return Err(ScoresError::Postgres);
    }
    Ok(store.lock()?)
}

/// Latest usable reading of `p` (any of its codes, stand-alone or panel
/// part) and the newest unusable reading newer than it.
fn latest_reading(
    conn: &Connection,
    patient: &str,
    p: Parameter,
) -> Result<(Option<Input>, Option<Withheld>), StoreError> {
    let mut best: Option<Input> = None;
    let mut newest_any: Option<(String, i64, Option<f64>, String)> = None;
    for &code in p.metric_codes() {
        for panel in ["panel_id IS NULL", "panel_id IS NOT NULL"] {
            // Usable candidates, newest first (a few, in case the newest
            // has a unit that cannot be read).
            let sql = format!(
                "SELECT id, effective_us, value, payload FROM observations
                 WHERE patient_id = ?1 AND mdc_code = ?2 AND {panel} AND kind = 'reading'
                   AND value IS NOT NULL AND status = 'final'
                 ORDER BY effective_us DESC LIMIT 8"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![patient, code], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, f64>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            })?;
            for row in rows {
                let (id, t, v, payload) = row?;
                let Some(v) = chart_value(code, v, payload.as_deref()) else {
                    continue;
                };
                if best.as_ref().is_none_or(|b| b.effective_us < Some(t)) {
                    best = Some(Input {
                        parameter: p,
                        value: InputValue::Number(v),
                        effective_us: Some(t),
                        source: Source::Observation(id),
                    });
                }
                break;
            }
            let sql = format!(
                "SELECT id, effective_us, value, status FROM observations
                 WHERE patient_id = ?1 AND mdc_code = ?2 AND {panel} AND kind = 'reading'
                 ORDER BY effective_us DESC LIMIT 1"
            );
            let newest = conn
                .prepare_cached(&sql)?
                .query_row(params![patient, code], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?;
            if let Some(n) = newest
                && newest_any.as_ref().is_none_or(|a| a.1 < n.1)
            {
                newest_any = Some(n);
            }
        }
    }
    let withheld = newest_any.and_then(|(id, t, value, status)| {
        let newer = best
            .as_ref()
            .is_none_or(|b| b.effective_us.is_some_and(|u| u < t));
        (newer && (value.is_none() || status != "final")).then_some(Withheld {
            parameter: p,
            observation_id: id,
            effective_us: t,
            status,
        })
    });
    Ok((best, withheld))
}

fn latest_manual(
    conn: &Connection,
    patient: &str,
    p: Parameter,
) -> Result<Option<Input>, StoreError> {
    let Some(kind) = p.manual_kind() else {
        return Ok(None);
    };
    let row: Option<(String, i64)> = conn
        .prepare_cached(
            "SELECT value, effective_us FROM manual_inputs WHERE patient_id = ?1 AND kind = ?2
             ORDER BY effective_us DESC, rowid DESC LIMIT 1",
        )?
        .query_row(params![patient, kind], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.and_then(|(v, t)| {
        let value = match p {
            Parameter::Consciousness => InputValue::Consciousness(parse_consciousness(&v)?),
            Parameter::SupplementalOxygen => InputValue::Oxygen(v == "true"),
            Parameter::Spo2Scale => InputValue::Scale(if v == "2" {
                Spo2Scale::Scale2
            } else {
                Spo2Scale::Scale1
            }),
            _ => return None,
        };
        Some(Input {
            parameter: p,
            value,
            effective_us: Some(t),
            source: Source::Manual,
        })
    }))
}

fn has_manual_inputs(conn: &Connection, patient: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM manual_inputs WHERE patient_id = ?1 LIMIT 1",
            [patient],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Whether the hub knows `patient` (stays, attributed readings, or manual
/// inputs).
fn known_patient(store: &Store, patient: &str) -> Result<bool, ScoresError> {
    if store.patient(patient).map_err(StoreError::from)?.is_some() {
        return Ok(true);
    }
    let conn = sqlite(store)?;
    Ok(has_manual_inputs(&conn, patient)?)
}

/// Computes `patient`'s scores at `now_us` (see the module docs).
pub fn compute(
    store: &Store,
    patient: &str,
    cfg: &ScoresConfig,
    now_us: i64,
) -> Result<ScoreReport, ScoresError> {
    if store.postgres().is_some() {
        return Err(ScoresError::Postgres);
    }
    if !known_patient(store, patient)? {
        return Err(ScoresError::UnknownPatient);
    }
    let conn = sqlite(store)?;
    let window_us = i64::try_from(cfg.freshness_s)
        .unwrap_or(i64::MAX / 1_000_000)
        .saturating_mul(1_000_000);
    let fresh_from = now_us.saturating_sub(window_us);
    let mut report = ScoreReport {
        patient: patient.to_owned(),
        computed_at_us: now_us,
        freshness_s: cfg.freshness_s,
        used: Vec::new(),
        stale: Vec::new(),
        missing: Vec::new(),
        withheld: Vec::new(),
        news2: None,
        qsofa: None,
        mews: None,
    };
    let place = |report: &mut ScoreReport, p: Parameter, input: Option<Input>| match input {
        None => report.missing.push(p),
        Some(i) if i.effective_us.is_some_and(|t| t < fresh_from) => report.stale.push(i),
        Some(i) => report.used.push(i),
    };
    for p in DEVICE_PARAMETERS {
        let (input, withheld) = latest_reading(&conn, patient, p)?;
        place(&mut report, p, input);
        report.withheld.extend(withheld);
    }
    for p in [Parameter::Consciousness, Parameter::SupplementalOxygen] {
        let input = latest_manual(&conn, patient, p)?;
        place(&mut report, p, input);
    }
    // The SpO2 scale does not expire; Scale 1 unless a clinician set it.
    let scale = latest_manual(&conn, patient, Parameter::Spo2Scale)?.unwrap_or(Input {
        parameter: Parameter::Spo2Scale,
        value: InputValue::Scale(Spo2Scale::Scale1),
        effective_us: None,
        source: Source::Default,
    });
    report.used.push(scale);
    drop(conn);
    report.used.sort_by_key(|i| i.parameter);
    report.stale.sort_by_key(|i| i.parameter);
    report.missing.sort();

    let rr = report.number(Parameter::RespirationRate);
    let spo2 = report.number(Parameter::Spo2);
    let sbp = report.number(Parameter::SystolicBp);
    let pulse = report.number(Parameter::Pulse);
    let temp = report.number(Parameter::Temperature);
    let acvpu = report.consciousness();
    let oxygen = report.oxygen();
    if let (Some(rr), Some(spo2), Some(sbp), Some(pulse), Some(temp), Some(c), Some(o)) =
        (rr, spo2, sbp, pulse, temp, acvpu, oxygen)
    {
        report.news2 = Some(scores::news2(&scores::News2Input {
            respiration_rate: rr,
            spo2,
            spo2_scale: report.scale(),
            on_oxygen: o,
            systolic_bp: sbp,
            pulse,
            consciousness: c,
            temperature_c: temp,
        }));
    }
    if let (Some(rr), Some(sbp), Some(c)) = (rr, sbp, acvpu) {
        // Altered mentation: any ACVPU other than alert (no GCS input yet).
        report.qsofa = Some(scores::qsofa(rr, sbp, c != Consciousness::Alert));
    }
    if let (Some(sbp), Some(pulse), Some(rr), Some(temp), Some(c)) = (sbp, pulse, rr, temp, acvpu) {
        report.mews = Some(scores::mews(sbp, pulse, rr, temp, c));
    }
    Ok(report)
}

/// Stores manual inputs for a known patient.
pub fn record_manual(store: &Store, patient: &str, m: &ManualInputs) -> Result<(), ScoresError> {
    if store.postgres().is_some() {
        return Err(ScoresError::Postgres);
    }
    if !known_patient(store, patient)? {
        return Err(ScoresError::UnknownPatient);
    }
    let mut conn = sqlite(store)?;
    let tx = conn.transaction().map_err(StoreError::from)?;
    let recorded = now_us();
    let rows = [
        m.consciousness
            .map(|c| ("consciousness", consciousness_str(c).to_owned())),
        m.supplemental_oxygen
            .map(|o| ("supplemental_oxygen", o.to_string())),
        m.spo2_scale.map(|s| {
            (
                "spo2_scale",
                if s == Spo2Scale::Scale2 { "2" } else { "1" }.to_owned(),
            )
        }),
    ];
    for (kind, value) in rows.into_iter().flatten() {
        tx.execute(
            "INSERT INTO manual_inputs (patient_id, kind, value, effective_us, recorded_us)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![patient, kind, value, m.effective_us, recorded],
        )
        .map_err(StoreError::from)?;
    }
    tx.commit().map_err(StoreError::from)?;
    Ok(())
}

// ---- HTTP ----------------------------------------------------------------

#[derive(Debug, Clone)]
struct ScoresState {
    store: Store,
    config: ScoresConfig,
}

/// The scores routes (who may call them: `crate::access::POLICY`).
pub fn router<S: Clone + Send + Sync + 'static>(store: Store, config: ScoresConfig) -> Router<S> {
    Router::new()
        .route("/api/v1/patients/{id}/scores", get(get_scores))
        .route("/api/v1/patients/{id}/scores/news2", get(get_news2_fhir))
        .route(
            "/api/v1/patients/{id}/manual-inputs",
            put(put_manual_inputs),
        )
        .layer(DefaultBodyLimit::max(4 * 1024))
        .with_state(ScoresState { store, config })
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
            ScoresError::Postgres => error(StatusCode::NOT_IMPLEMENTED, &self.to_string(), None),
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
        // A bedside entry changes the score now, not at the next batch.
        if let Err(e) = crate::score_history::record(&store, &report) {
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
