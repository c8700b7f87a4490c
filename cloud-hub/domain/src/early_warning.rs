//! Early-warning scores of a patient from the latest usable value of each
//! input within a freshness window, scored with the pure functions of
//! [`crate::scores`]. Pure: the storage layer loads the candidate inputs
//! ([`LoadedInputs`]), [`evaluate`] decides which are used, stale, missing or
//! withheld and scores them.
//!
//! Inputs:
//! - Device readings: respiration rate, SpO2, systolic blood pressure
//!   (stand-alone readings and the systolic part of a blood-pressure panel),
//!   pulse (the newest of ECG heart rate, pulse-oximeter pulse rate and NIBP
//!   pulse rate) and body temperature. A reading is usable only when its
//!   value is stored (withheld when the device said invalid, or physically
//!   impossible) and its status is `final` (validity "valid"; questionable,
//!   calibrating or unspecified readings are `preliminary` and not used).
//!   Values are converted to the chart's unit (°F → °C, kPa → mmHg); a
//!   reading whose unit cannot be read is not used.
//! - Manual inputs: level of consciousness (ACVPU), supplemental oxygen
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

use prost::Message;
use serde::Deserialize;
use serde_json::{Value as Json, json};
use shared_protocol::catalogue::{CATALOGUE, codes, units};
use shared_protocol::v1::Reading;

use crate::clock::format_instant;
use crate::scores::{self, Consciousness, Spo2Scale};

/// `[scores]`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoresConfig {
    /// An input older than this many seconds is stale and not scored.
    #[serde(default = "default_freshness_s")]
    pub freshness_s: u64,
    /// Record the scores over time (score history) after each batch
    /// (default true); independent of `[alerts] enabled`.
    #[serde(default = "default_history")]
    pub history: bool,
}

fn default_history() -> bool {
    true
}

fn default_freshness_s() -> u64 {
    900
}

impl Default for ScoresConfig {
    fn default() -> Self {
        Self {
            freshness_s: default_freshness_s(),
            history: default_history(),
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
    pub fn metric_codes(self) -> &'static [u32] {
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
    pub fn unit(self) -> Option<&'static str> {
        match self {
            Self::RespirationRate | Self::Pulse => Some("/min"),
            Self::Spo2 => Some("%"),
            Self::SystolicBp => Some("mm[Hg]"),
            Self::Temperature => Some("Cel"),
            _ => None,
        }
    }

    pub fn manual_kind(self) -> Option<&'static str> {
        match self {
            Self::Consciousness => Some("consciousness"),
            Self::SupplementalOxygen => Some("supplemental_oxygen"),
            Self::Spo2Scale => Some("spo2_scale"),
            _ => None,
        }
    }
}

pub const DEVICE_PARAMETERS: [Parameter; 5] = [
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

    pub fn number(&self, p: Parameter) -> Option<f64> {
        match self.input(p)?.value {
            InputValue::Number(v) => Some(v),
            _ => None,
        }
    }

    pub fn consciousness(&self) -> Option<Consciousness> {
        match self.input(Parameter::Consciousness)?.value {
            InputValue::Consciousness(c) => Some(c),
            _ => None,
        }
    }

    pub fn oxygen(&self) -> Option<bool> {
        match self.input(Parameter::SupplementalOxygen)?.value {
            InputValue::Oxygen(o) => Some(o),
            _ => None,
        }
    }

    pub fn scale(&self) -> Spo2Scale {
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

/// The reading's value in the chart unit of its metric: the unit is read
/// from the stored reading (°F and kPa are converted).
pub fn chart_value(mdc: u32, value: f64, payload: Option<&[u8]>) -> Option<f64> {
    let reading = Reading::decode(payload?).ok()?;
    in_chart_unit(mdc, value, &reading)
}

/// The score input readings of metric `mdc` feed, if any.
pub fn parameter_of(mdc: u32) -> Option<Parameter> {
    DEVICE_PARAMETERS
        .into_iter()
        .find(|p| p.metric_codes().contains(&mdc))
}

pub fn in_chart_unit(mdc: u32, value: f64, reading: &Reading) -> Option<f64> {
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

pub fn parse_consciousness(s: &str) -> Option<Consciousness> {
    Some(match s {
        "alert" => Consciousness::Alert,
        "new_confusion" => Consciousness::NewConfusion,
        "voice" => Consciousness::Voice,
        "pain" => Consciousness::Pain,
        "unresponsive" => Consciousness::Unresponsive,
        _ => return None,
    })
}

pub fn consciousness_str(c: Consciousness) -> &'static str {
    match c {
        Consciousness::Alert => "alert",
        Consciousness::NewConfusion => "new_confusion",
        Consciousness::Voice => "voice",
        Consciousness::Pain => "pain",
        Consciousness::Unresponsive => "unresponsive",
    }
}

/// Manual inputs to record (at least one).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ManualInputs {
    pub consciousness: Option<Consciousness>,
    pub supplemental_oxygen: Option<bool>,
    pub spo2_scale: Option<Spo2Scale>,
    pub effective_us: i64,
}

impl ManualInputs {
    /// The (kind, stored value) of each input given, as the storage layer
    /// keeps them (read back by [`manual_input`]).
    pub fn stored(&self) -> Vec<(&'static str, String)> {
        let rows = [
            self.consciousness
                .map(|c| ("consciousness", consciousness_str(c).to_owned())),
            self.supplemental_oxygen
                .map(|o| ("supplemental_oxygen", o.to_string())),
            self.spo2_scale.map(|s| {
                (
                    "spo2_scale",
                    if s == Spo2Scale::Scale2 { "2" } else { "1" }.to_owned(),
                )
            }),
        ];
        rows.into_iter().flatten().collect()
    }
}

// ---- Inputs as the storage layer loads them ------------------------------

/// Usable rows loaded per metric code and kind of row (stand-alone or
/// panel part), newest first: a few, in case the newest has a unit that
/// cannot be read.
pub const CANDIDATES: usize = 8;

/// A stored reading of a score input.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    pub observation_id: String,
    pub effective_us: i64,
    /// `None` when withheld (device said invalid, or physically impossible).
    pub value: Option<f64>,
    /// FHIR status (`final` only when the device said valid).
    pub status: String,
    /// The stored reading (protobuf), where its unit is read; `None` for
    /// rows stored before schema v4.
    pub payload: Option<Vec<u8>>,
}

impl StoredReading {
    /// A stored value with status `final`.
    pub fn is_usable(&self) -> bool {
        self.value.is_some() && self.status == "final"
    }
}

/// A patient's readings of one metric code, either the stand-alone rows or
/// the parts of panels (`kind = 'reading'` only).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadingCandidates {
    pub mdc: u32,
    /// Usable rows (stored value, status `final`), newest first, at most
    /// the number asked for ([`CANDIDATES`]).
    pub usable: Vec<StoredReading>,
    /// The newest row whatever its value and status.
    pub newest: Option<StoredReading>,
}

/// A manual input as stored (see [`ManualInputs::stored`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManual {
    pub value: String,
    pub effective_us: i64,
}

/// The rows the scores of a patient are computed from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadedInputs {
    /// Per device parameter, one entry per metric code
    /// ([`Parameter::metric_codes`]) and kind of row (stand-alone, panel part).
    pub readings: Vec<(Parameter, Vec<ReadingCandidates>)>,
    /// The latest stored value of each manual parameter that has one.
    pub manual: Vec<(Parameter, StoredManual)>,
}

/// The latest usable reading of `p` among its sources (the first of each
/// source's usable rows whose unit converts to the chart's; the newest of
/// those across sources) and, when the newest row of all is newer than it
/// and not usable, that row as withheld.
pub fn latest_reading(
    p: Parameter,
    sources: &[ReadingCandidates],
) -> (Option<Input>, Option<Withheld>) {
    let mut best: Option<Input> = None;
    let mut newest_any: Option<&StoredReading> = None;
    for src in sources {
        let first_convertible = src.usable.iter().filter(|r| r.is_usable()).find_map(|r| {
            let v = chart_value(src.mdc, r.value?, r.payload.as_deref())?;
            Some((r, v))
        });
        if let Some((r, v)) = first_convertible
            && best
                .as_ref()
                .is_none_or(|b| b.effective_us < Some(r.effective_us))
        {
            best = Some(Input {
                parameter: p,
                value: InputValue::Number(v),
                effective_us: Some(r.effective_us),
                source: Source::Observation(r.observation_id.clone()),
            });
        }
        if let Some(n) = &src.newest
            && newest_any.is_none_or(|a| a.effective_us < n.effective_us)
        {
            newest_any = Some(n);
        }
    }
    let withheld = newest_any.and_then(|n| {
        let newer = best
            .as_ref()
            .is_none_or(|b| b.effective_us.is_some_and(|u| u < n.effective_us));
        (newer && !n.is_usable()).then(|| Withheld {
            parameter: p,
            observation_id: n.observation_id.clone(),
            effective_us: n.effective_us,
            status: n.status.clone(),
        })
    });
    (best, withheld)
}

/// A stored manual input of `p` as a score input (`None` when it does not
/// read as one).
pub fn manual_input(p: Parameter, m: &StoredManual) -> Option<Input> {
    let value = match p {
        Parameter::Consciousness => InputValue::Consciousness(parse_consciousness(&m.value)?),
        Parameter::SupplementalOxygen => InputValue::Oxygen(m.value == "true"),
        Parameter::Spo2Scale => InputValue::Scale(if m.value == "2" {
            Spo2Scale::Scale2
        } else {
            Spo2Scale::Scale1
        }),
        _ => return None,
    };
    Some(Input {
        parameter: p,
        value,
        effective_us: Some(m.effective_us),
        source: Source::Manual,
    })
}

/// The manual parameters (stored in `manual_inputs` by kind).
pub const MANUAL_PARAMETERS: [Parameter; 3] = [
    Parameter::Consciousness,
    Parameter::SupplementalOxygen,
    Parameter::Spo2Scale,
];

/// `patient`'s scores at `now_us` from the loaded rows (see the module
/// docs): which inputs are used, stale, missing or withheld, and the scores
/// whose inputs are all usable and fresh.
pub fn evaluate(
    patient: &str,
    cfg: &ScoresConfig,
    now_us: i64,
    loaded: &LoadedInputs,
) -> ScoreReport {
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
    let manual = |p: Parameter| {
        loaded
            .manual
            .iter()
            .find(|(q, _)| *q == p)
            .and_then(|(_, m)| manual_input(p, m))
    };
    for p in DEVICE_PARAMETERS {
        let sources = loaded
            .readings
            .iter()
            .find(|(q, _)| *q == p)
            .map_or(&[][..], |(_, s)| s.as_slice());
        let (input, withheld) = latest_reading(p, sources);
        place(&mut report, p, input);
        report.withheld.extend(withheld);
    }
    for p in [Parameter::Consciousness, Parameter::SupplementalOxygen] {
        place(&mut report, p, manual(p));
    }
    // The SpO2 scale does not expire; Scale 1 unless a clinician set it.
    let scale = manual(Parameter::Spo2Scale).unwrap_or(Input {
        parameter: Parameter::Spo2Scale,
        value: InputValue::Scale(Spo2Scale::Scale1),
        effective_us: None,
        source: Source::Default,
    });
    report.used.push(scale);
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
    report
}

// ---- JSON ----------------------------------------------------------------

pub fn value_json(v: InputValue) -> Json {
    match v {
        InputValue::Number(n) => json!(n),
        InputValue::Consciousness(c) => json!(consciousness_str(c)),
        InputValue::Oxygen(o) => json!(o),
        InputValue::Scale(Spo2Scale::Scale1) => json!(1),
        InputValue::Scale(Spo2Scale::Scale2) => json!(2),
    }
}

pub fn input_json(i: &Input) -> Json {
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

    fn row(
        id: &str,
        t: i64,
        value: Option<f64>,
        status: &str,
        unit: Option<shared_protocol::catalogue::Unit>,
    ) -> StoredReading {
        StoredReading {
            observation_id: id.into(),
            effective_us: t,
            value,
            status: status.into(),
            payload: unit.map(payload),
        }
    }

    #[test]
    fn the_first_convertible_usable_row_is_used_and_a_newer_unusable_one_withheld() {
        let t = 1_800_000_000_000_000;
        // Stand-alone: the newest usable row has no payload (pre-v4), the
        // next converts (°F). The newest row of all is invalid (no value).
        let standalone = ReadingCandidates {
            mdc: codes::TEMP_BODY,
            usable: vec![
                row("a", t - 10, Some(37.0), "final", None),
                row("b", t - 20, Some(98.6), "final", Some(units::DEGF)),
            ],
            newest: Some(row("c", t, None, "final", None)),
        };
        let (input, withheld) =
            latest_reading(Parameter::Temperature, std::slice::from_ref(&standalone));
        let input = input.unwrap();
        assert_eq!(input.source, Source::Observation("b".into()));
        assert_eq!(input.effective_us, Some(t - 20));
        let InputValue::Number(v) = input.value else {
            panic!()
        };
        assert!((v - 37.0).abs() < 1e-9);
        let w = withheld.unwrap();
        assert_eq!((w.observation_id.as_str(), w.effective_us), ("c", t));
        // A newer usable panel part wins; the invalid row, newer still, stays
        // withheld.
        let panel = ReadingCandidates {
            mdc: codes::TEMP_BODY,
            usable: vec![row("p", t - 5, Some(36.5), "final", Some(units::DEGC))],
            newest: Some(row("p", t - 5, Some(36.5), "final", None)),
        };
        let (input, withheld) = latest_reading(Parameter::Temperature, &[standalone, panel]);
        assert_eq!(input.unwrap().source, Source::Observation("p".into()));
        assert_eq!(withheld.unwrap().observation_id, "c");
        // The newest row is the one used: nothing withheld. A preliminary
        // row among the candidates is never used.
        let only = ReadingCandidates {
            mdc: codes::TEMP_BODY,
            usable: vec![
                row("q", t, Some(39.0), "preliminary", Some(units::DEGC)),
                row("u", t - 1, Some(36.9), "final", Some(units::DEGC)),
            ],
            newest: Some(row("u", t - 1, Some(36.9), "final", None)),
        };
        let (input, withheld) = latest_reading(Parameter::Temperature, &[only]);
        assert_eq!(input.unwrap().source, Source::Observation("u".into()));
        assert_eq!(withheld, None);
        // Nothing convertible: missing, and the newest unusable row withheld.
        let none = ReadingCandidates {
            mdc: codes::TEMP_BODY,
            usable: vec![row("n", t - 1, Some(37.0), "final", Some(units::MMHG))],
            newest: Some(row("z", t, Some(38.0), "preliminary", None)),
        };
        let (input, withheld) = latest_reading(Parameter::Temperature, &[none]);
        assert_eq!(input, None);
        assert_eq!(withheld.unwrap().status, "preliminary");
    }

    #[test]
    fn evaluate_scores_only_fresh_inputs_and_defaults_the_scale() {
        let now = 1_800_000_000_000_000;
        let cfg = ScoresConfig {
            freshness_s: 900,
            history: true,
        };
        let fresh = now - 60 * 1_000_000;
        let old = now - 3600 * 1_000_000;
        let num = |mdc, v, t, unit| ReadingCandidates {
            mdc,
            usable: vec![row("x", t, Some(v), "final", Some(unit))],
            newest: None,
        };
        let mut loaded = LoadedInputs {
            readings: vec![
                (
                    Parameter::RespirationRate,
                    vec![num(codes::RESP_RATE, 18.0, fresh, units::RESP_PER_MIN)],
                ),
                (
                    Parameter::SystolicBp,
                    vec![num(codes::PRESS_BLD_NONINV_SYS, 120.0, fresh, units::MMHG)],
                ),
            ],
            manual: vec![(
                Parameter::Consciousness,
                StoredManual {
                    value: "voice".into(),
                    effective_us: fresh,
                },
            )],
        };
        let r = evaluate("p", &cfg, now, &loaded);
        assert_eq!(r.scale(), Spo2Scale::Scale1);
        assert!(
            r.input(Parameter::Spo2Scale)
                .is_some_and(|i| i.source == Source::Default)
        );
        assert!(r.qsofa.is_some_and(|q| q.altered_mentation));
        assert!(r.news2.is_none() && r.mews.is_none());
        assert!(r.missing.contains(&Parameter::Spo2));
        // The same consciousness an hour old: stale, no qSOFA.
        loaded.manual[0].1.effective_us = old;
        let r = evaluate("p", &cfg, now, &loaded);
        assert_eq!(r.stale.len(), 1);
        assert!(r.qsofa.is_none());
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
    fn freshness_is_validated() {
        assert!(ScoresConfig::default().validate().is_ok());
        assert_eq!(
            ScoresConfig {
                freshness_s: 0,
                history: true
            }
            .validate()
            .unwrap_err()
            .0,
            "scores.freshness_s"
        );
    }
}
