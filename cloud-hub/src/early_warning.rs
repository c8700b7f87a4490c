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
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use shared_protocol::catalogue::{CATALOGUE, codes, units};
use shared_protocol::v1::Reading;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::fhir::format_instant;
use crate::scores::{self, Consciousness, Spo2Scale};
use crate::store::{Store, StoreError, now_us};

/// v8: manual score inputs, and an index of blood-pressure panel parts by
/// patient (the v7 search index leaves panel parts out; the scores read the
/// systolic part of a panel).
pub const SCHEMA_V8: &str = r#"
CREATE TABLE IF NOT EXISTS manual_inputs (
    patient_id    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    value         TEXT NOT NULL,
    effective_us  INTEGER NOT NULL,
    recorded_us   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS manual_inputs_patient ON manual_inputs (patient_id, kind, effective_us);
CREATE INDEX IF NOT EXISTS observations_panel_parts ON observations (patient_id, mdc_code, effective_us)
    WHERE panel_id IS NOT NULL;
"#;

/// `[scores]`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoresConfig {
    /// An input older than this many seconds is stale and not scored.
    #[serde(default = "default_freshness_s")]
    pub freshness_s: u64,
}

fn default_freshness_s() -> u64 {
    900
}

impl Default for ScoresConfig {
    fn default() -> Self {
        Self {
            freshness_s: default_freshness_s(),
        }
    }
}

/// Longest freshness window accepted (24 h).
pub const MAX_FRESHNESS_S: u64 = 24 * 3600;

impl ScoresConfig {
    /// (field, message) of the first invalid value.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.freshness_s == 0 || self.freshness_s > MAX_FRESHNESS_S {
            return Err((
                "scores.freshness_s",
                format!("must be between 1 and {MAX_FRESHNESS_S} seconds"),
            ));
        }
        Ok(())
    }
}

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

/// A score input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Parameter {
    RespirationRate,
    Spo2,
    SupplementalOxygen,
    SystolicBp,
    Pulse,
    Consciousness,
    Temperature,
    Spo2Scale,
}

impl Parameter {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RespirationRate => "respiration_rate",
            Self::Spo2 => "spo2",
            Self::SupplementalOxygen => "supplemental_oxygen",
            Self::SystolicBp => "systolic_bp",
            Self::Pulse => "pulse",
            Self::Consciousness => "consciousness",
            Self::Temperature => "temperature",
            Self::Spo2Scale => "spo2_scale",
        }
    }

    /// Human-readable name (FHIR component text).
    pub fn display(self) -> &'static str {
        match self {
            Self::RespirationRate => "Respiration rate",
            Self::Spo2 => "SpO2",
            Self::SupplementalOxygen => "Air or oxygen",
            Self::SystolicBp => "Systolic blood pressure",
            Self::Pulse => "Pulse",
            Self::Consciousness => "Consciousness (ACVPU)",
            Self::Temperature => "Temperature",
            Self::Spo2Scale => "SpO2 scale",
        }
    }

    /// MDC codes of the device readings of this input (none: manual).
    fn metric_codes(self) -> &'static [u32] {
        match self {
            Self::RespirationRate => &[codes::RESP_RATE],
            Self::Spo2 => &[codes::PULS_OXIM_SAT_O2],
            Self::SystolicBp => &[codes::PRESS_BLD_NONINV_SYS],
            Self::Pulse => &[
                codes::ECG_HEART_RATE,
                codes::PULS_OXIM_PULS_RATE,
                codes::PULS_RATE_NON_INV,
            ],
            Self::Temperature => &[codes::TEMP_BODY],
            Self::SupplementalOxygen | Self::Consciousness | Self::Spo2Scale => &[],
        }
    }

    /// UCUM unit of the chart (device inputs).
    fn unit(self) -> Option<&'static str> {
        match self {
            Self::RespirationRate | Self::Pulse => Some("/min"),
            Self::Spo2 => Some("%"),
            Self::SystolicBp => Some("mm[Hg]"),
            Self::Temperature => Some("Cel"),
            _ => None,
        }
    }

    fn manual_kind(self) -> Option<&'static str> {
        match self {
            Self::Consciousness => Some("consciousness"),
            Self::SupplementalOxygen => Some("supplemental_oxygen"),
            Self::Spo2Scale => Some("spo2_scale"),
            _ => None,
        }
    }
}

const DEVICE_PARAMETERS: [Parameter; 5] = [
    Parameter::RespirationRate,
    Parameter::Spo2,
    Parameter::SystolicBp,
    Parameter::Pulse,
    Parameter::Temperature,
];

/// Where an input came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A stored reading (its Observation id).
    Observation(String),
    /// Entered through the manual-inputs API.
    Manual,
    /// Not recorded; the documented default applies (SpO2 Scale 1).
    Default,
}

/// An input's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputValue {
    /// In the chart's unit (see [`Parameter`]).
    Number(f64),
    Consciousness(Consciousness),
    Oxygen(bool),
    Scale(Spo2Scale),
}

/// One input with its time and source.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub parameter: Parameter,
    pub value: InputValue,
    /// None for a default.
    pub effective_us: Option<i64>,
    pub source: Source,
}

/// A reading newer than the input used (or than nothing) that was not used:
/// its value was withheld or it was not final.
#[derive(Debug, Clone, PartialEq)]
pub struct Withheld {
    pub parameter: Parameter,
    pub observation_id: String,
    pub effective_us: i64,
    pub status: String,
}

/// A patient's scores and what they were computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreReport {
    pub patient: String,
    pub computed_at_us: i64,
    pub freshness_s: u64,
    /// Fresh usable inputs, by parameter.
    pub used: Vec<Input>,
    /// Usable inputs older than the freshness window (not scored).
    pub stale: Vec<Input>,
    /// Inputs with no usable value at all.
    pub missing: Vec<Parameter>,
    pub withheld: Vec<Withheld>,
    pub news2: Option<scores::News2>,
    pub qsofa: Option<scores::Qsofa>,
    pub mews: Option<scores::Mews>,
}

impl ScoreReport {
    pub fn input(&self, p: Parameter) -> Option<&Input> {
        self.used.iter().find(|i| i.parameter == p)
    }

    fn number(&self, p: Parameter) -> Option<f64> {
        match self.input(p)?.value {
            InputValue::Number(v) => Some(v),
            _ => None,
        }
    }

    fn consciousness(&self) -> Option<Consciousness> {
        match self.input(Parameter::Consciousness)?.value {
            InputValue::Consciousness(c) => Some(c),
            _ => None,
        }
    }

    fn oxygen(&self) -> Option<bool> {
        match self.input(Parameter::SupplementalOxygen)?.value {
            InputValue::Oxygen(o) => Some(o),
            _ => None,
        }
    }

    fn scale(&self) -> Spo2Scale {
        match self.input(Parameter::Spo2Scale).map(|i| i.value) {
            Some(InputValue::Scale(s)) => s,
            _ => Spo2Scale::Scale1,
        }
    }

    /// Time of the newest input used (the score's effective time).
    pub fn newest_input_us(&self) -> Option<i64> {
        self.used.iter().filter_map(|i| i.effective_us).max()
    }
}

fn sqlite(store: &Store) -> Result<std::sync::MutexGuard<'_, Connection>, ScoresError> {
    if store.postgres().is_some() {
        return Err(ScoresError::Postgres);
    }
    Ok(store.lock()?)
}

/// The reading's value in the chart unit of its metric: the unit is read
/// from the stored reading (°F and kPa are converted).
fn chart_value(mdc: u32, value: f64, payload: Option<&[u8]>) -> Option<f64> {
    let reading = Reading::decode(payload?).ok()?;
    in_chart_unit(mdc, value, &reading)
}

/// The score input readings of metric `mdc` feed, if any.
pub(crate) fn parameter_of(mdc: u32) -> Option<Parameter> {
    DEVICE_PARAMETERS
        .into_iter()
        .find(|p| p.metric_codes().contains(&mdc))
}

pub(crate) fn in_chart_unit(mdc: u32, value: f64, reading: &Reading) -> Option<f64> {
    let metric = CATALOGUE.by_mdc(mdc)?;
    let variant = metric.in_unit(reading.mdc_unit, &reading.ucum_unit)?;
    if variant.unit == metric.unit {
        Some(value)
    } else if variant.unit == units::DEGF {
        Some((value - 32.0) * 5.0 / 9.0)
    } else if variant.unit == units::KILO_PA {
        // 1 mmHg = 133.322 Pa.
        Some(value * 1000.0 / 133.322_387_415)
    } else {
        None
    }
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

fn parse_consciousness(s: &str) -> Option<Consciousness> {
    Some(match s {
        "alert" => Consciousness::Alert,
        "new_confusion" => Consciousness::NewConfusion,
        "voice" => Consciousness::Voice,
        "pain" => Consciousness::Pain,
        "unresponsive" => Consciousness::Unresponsive,
        _ => return None,
    })
}

fn consciousness_str(c: Consciousness) -> &'static str {
    match c {
        Consciousness::Alert => "alert",
        Consciousness::NewConfusion => "new_confusion",
        Consciousness::Voice => "voice",
        Consciousness::Pain => "pain",
        Consciousness::Unresponsive => "unresponsive",
    }
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
    if store.patient(patient)?.is_some() {
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

/// Manual inputs to record (at least one).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ManualInputs {
    pub consciousness: Option<Consciousness>,
    pub supplemental_oxygen: Option<bool>,
    pub spo2_scale: Option<Spo2Scale>,
    pub effective_us: i64,
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

// ---- JSON ----------------------------------------------------------------

fn value_json(v: InputValue) -> Json {
    match v {
        InputValue::Number(n) => json!(n),
        InputValue::Consciousness(c) => json!(consciousness_str(c)),
        InputValue::Oxygen(o) => json!(o),
        InputValue::Scale(Spo2Scale::Scale1) => json!(1),
        InputValue::Scale(Spo2Scale::Scale2) => json!(2),
    }
}

fn input_json(i: &Input) -> Json {
    let mut o = serde_json::Map::new();
    o.insert("parameter".into(), json!(i.parameter.as_str()));
    o.insert("value".into(), value_json(i.value));
    if let Some(u) = i.parameter.unit() {
        o.insert("unit".into(), json!(u));
    }
    o.insert(
        "effective".into(),
        i.effective_us
            .map_or(Json::Null, |t| json!(format_instant(t))),
    );
    let source = match &i.source {
        Source::Observation(id) => format!("Observation/{id}"),
        Source::Manual => "manual".into(),
        Source::Default => "default".into(),
    };
    o.insert("source".into(), json!(source));
    Json::Object(o)
}

/// NEWS2 band name.
pub fn band(r: scores::News2Risk) -> &'static str {
    match r {
        scores::News2Risk::Low => "low",
        scores::News2Risk::LowMedium => "low-medium",
        scores::News2Risk::Medium => "medium",
        scores::News2Risk::High => "high",
    }
}

/// NEWS2 components in chart order: (parameter, score).
pub fn news2_components(n: &scores::News2) -> [(Parameter, u8); 7] {
    [
        (Parameter::RespirationRate, n.respiration),
        (Parameter::Spo2, n.spo2),
        (Parameter::SupplementalOxygen, n.air_or_oxygen),
        (Parameter::SystolicBp, n.systolic_bp),
        (Parameter::Pulse, n.pulse),
        (Parameter::Consciousness, n.consciousness),
        (Parameter::Temperature, n.temperature),
    ]
}

fn component(report: &ScoreReport, p: Parameter, score: impl Into<Json>) -> Json {
    json!({
        "parameter": p.as_str(),
        "score": score.into(),
        "input": report.input(p).map_or(Json::Null, input_json),
    })
}

/// The report as the API returns it.
pub fn report_json(r: &ScoreReport) -> Json {
    let news2 = r.news2.map_or(Json::Null, |n| {
        let mut components: Vec<Json> = news2_components(&n)
            .iter()
            .map(|(p, s)| component(r, *p, *s))
            .collect();
        if let Some(spo2) = components.get_mut(1) {
            spo2["scale"] = value_json(InputValue::Scale(r.scale()));
        }
        json!({
            "total": n.total,
            "band": band(n.risk),
            "single_parameter_3": n.any_single_3,
            "components": components,
        })
    });
    let qsofa = r.qsofa.map_or(Json::Null, |q| {
        json!({
            "score": q.score,
            "positive": q.positive,
            "components": [
                component(r, Parameter::RespirationRate, q.respiratory_rate),
                component(r, Parameter::SystolicBp, q.systolic_bp),
                component(r, Parameter::Consciousness, q.altered_mentation),
            ],
        })
    });
    let mews = r.mews.map_or(Json::Null, |m| {
        json!({
            "total": m.total,
            "components": [
                component(r, Parameter::SystolicBp, m.systolic_bp),
                component(r, Parameter::Pulse, m.heart_rate),
                component(r, Parameter::RespirationRate, m.respiration),
                component(r, Parameter::Temperature, m.temperature),
                component(r, Parameter::Consciousness, m.avpu),
            ],
        })
    });
    json!({
        "patient": r.patient,
        "computed_at": format_instant(r.computed_at_us),
        "freshness_s": r.freshness_s,
        "news2": news2,
        "qsofa": qsofa,
        "mews": mews,
        "inputs": {
            "used": r.used.iter().map(input_json).collect::<Vec<_>>(),
            "stale": r.stale.iter().map(input_json).collect::<Vec<_>>(),
            "missing": r.missing.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            "withheld": r.withheld.iter().map(|w| json!({
                "parameter": w.parameter.as_str(),
                "source": format!("Observation/{}", w.observation_id),
                "effective": format_instant(w.effective_us),
                "status": w.status,
            })).collect::<Vec<_>>(),
        },
    })
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

    fn payload(unit: shared_protocol::catalogue::Unit) -> Vec<u8> {
        Reading {
            mdc_unit: unit.mdc,
            ucum_unit: unit.ucum.into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn values_are_converted_to_the_chart_unit() {
        let c = chart_value(codes::TEMP_BODY, 98.6, Some(&payload(units::DEGF))).unwrap();
        assert!((c - 37.0).abs() < 1e-9, "{c}");
        let c = chart_value(codes::TEMP_BODY, 37.2, Some(&payload(units::DEGC))).unwrap();
        assert_eq!(c, 37.2);
        let c = chart_value(
            codes::PRESS_BLD_NONINV_SYS,
            16.0,
            Some(&payload(units::KILO_PA)),
        )
        .unwrap();
        assert!((c - 120.0).abs() < 0.01, "{c}");
        // No payload (rows stored before schema v4) or a foreign unit: unusable.
        assert_eq!(chart_value(codes::TEMP_BODY, 37.0, None), None);
        assert_eq!(
            chart_value(codes::TEMP_BODY, 37.0, Some(&payload(units::MMHG))),
            None
        );
    }

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

    #[test]
    fn freshness_is_validated() {
        assert!(ScoresConfig::default().validate().is_ok());
        assert_eq!(
            ScoresConfig { freshness_s: 0 }.validate().unwrap_err().0,
            "scores.freshness_s"
        );
    }
}
