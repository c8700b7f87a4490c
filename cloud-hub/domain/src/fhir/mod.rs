//! FHIR R4 JSON: Observation mapping of readings, search parameter parsing,
//! OperationOutcome, CapabilityStatement and Bundle building.

mod doc;
#[cfg(test)]
mod golden;
pub mod render;
pub mod subject;

use ring::digest;
use serde_json::{Value as Json, json};
use shared_protocol::v1::{QualityFlag, Reading, TimeSource, Validity, reading};
use shared_protocol::{CATALOGUE, Metric};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

pub const FHIR_JSON: &str = "application/fhir+json";
pub const LOINC_SYSTEM: &str = "http://loinc.org";
pub const MDC_SYSTEM: &str = "urn:iso:std:iso:11073:10101";
pub const UCUM_SYSTEM: &str = "http://unitsofmeasure.org";
pub const VITALSIGNS_PROFILE: &str = "http://hl7.org/fhir/StructureDefinition/vitalsigns";
pub const QUALITY_EXT: &str = "http://vigil.health/fhir/StructureDefinition/reading-quality";
pub const TIME_SOURCE_EXT: &str = "http://vigil.health/fhir/StructureDefinition/time-source";
pub const CATEGORY_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const ABSENT_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/data-absent-reason";

/// Default and maximum page size of a search.
pub const DEFAULT_COUNT: u32 = 100;
pub const MAX_COUNT: u32 = 1000;

/// Most search parameters one request may carry (each becomes a condition
/// of the store's query; more are refused with a 400 naming this limit,
/// not left to fail deep in the database).
pub const MAX_SEARCH_PARAMS: usize = 32;

/// Most comma-separated values over all parameters of one search (patients,
/// codes, categories, devices: each an OR term of the query).
pub const MAX_SEARCH_VALUES: usize = 200;

/// Refuses a search with more than [`MAX_SEARCH_PARAMS`] parameters or
/// [`MAX_SEARCH_VALUES`] values in all.
fn check_search_size(pairs: &[(String, String)]) -> Result<(), SearchParamError> {
    if pairs.len() > MAX_SEARCH_PARAMS {
        return Err(SearchParamError {
            code: "too-costly",
            diagnostics: format!(
                "at most {MAX_SEARCH_PARAMS} search parameters per request (got {})",
                pairs.len()
            ),
        });
    }
    let values: usize = pairs.iter().map(|(_, v)| v.split(',').count()).sum();
    if values > MAX_SEARCH_VALUES {
        return Err(SearchParamError {
            code: "too-costly",
            diagnostics: format!(
                "at most {MAX_SEARCH_VALUES} values over all search parameters per request (got {values})"
            ),
        });
    }
    Ok(())
}

/// Whether `id` is a valid FHIR logical id (`[A-Za-z0-9\-\.]{1,64}`).
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Deterministic Observation id for a reading identity (gateway, device,
/// per-device sequence): 16 hex characters of SHA-256 over
/// `gateway_id \n device_id` (the device), then the sequence as 16 hex
/// digits. 32 characters, a valid FHIR id, the same for a re-sent reading;
/// and a device's readings get increasing ids, so the store's primary key
/// grows by appends instead of random inserts. (Rows stored before this
/// scheme keep the ids they were stored with.)
pub fn observation_id(gateway_id: &str, device_id: &str, sequence: u64) -> String {
    observation_id_in(gateway_id, device_id, 0, sequence)
}

/// [`observation_id`] of a reading of buffer incarnation `incarnation`
/// (`Batch.incarnation`): incarnation 0 (an agent without incarnations)
/// gives exactly [`observation_id`]'s ids; another incarnation adds
/// `\n<incarnation>` to the hashed device part, so a reading of a new
/// buffer never takes the id of an old one with the same sequence.
pub fn observation_id_in(
    gateway_id: &str,
    device_id: &str,
    incarnation: u64,
    sequence: u64,
) -> String {
    ObservationIds::new(gateway_id, device_id, incarnation).id(sequence)
}

/// The ids of one device's readings ([`observation_id_in`]) with the hashed
/// device part computed once: `ids.id(sequence)` equals
/// `observation_id_in(gateway_id, device_id, incarnation, sequence)`.
#[derive(Debug, Clone)]
pub struct ObservationIds {
    /// 16 hex characters of the device part.
    device: String,
}

impl ObservationIds {
    pub fn new(gateway_id: &str, device_id: &str, incarnation: u64) -> Self {
        let canonical = if incarnation == 0 {
            format!("vigil-reading\n{gateway_id}\n{device_id}")
        } else {
            format!("vigil-reading\n{gateway_id}\n{device_id}\n{incarnation}")
        };
        let d = digest::digest(&digest::SHA256, canonical.as_bytes());
        Self {
            device: hex::encode(&d.as_ref()[..8]),
        }
    }

    /// The hashed device part: the first 16 characters of every id.
    pub fn device_part(&self) -> &str {
        &self.device
    }

    /// The device part and the sequence of `id` when it has the form of a
    /// reading's id (32 lowercase hex characters) and a sequence a reading
    /// can be stored with (up to `i64::MAX`, as the stores hold it).
    pub fn split(id: &str) -> Option<(&str, i64)> {
        let is_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if id.len() != 32 || !is_hex(id) {
            return None;
        }
        let (device, sequence) = id.split_at(16);
        let sequence = u64::from_str_radix(sequence, 16).ok()?;
        Some((device, i64::try_from(sequence).ok()?))
    }

    pub fn id(&self, sequence: u64) -> String {
        use std::fmt::Write;
        let mut id = String::with_capacity(32);
        id.push_str(&self.device);
        let _ = write!(id, "{sequence:016x}");
        id
    }
}

/// UCUM codes of the FHIR R4 vital-signs units value set
/// (`ucum-vitals-common`), to which the `vitalsigns` profile binds
/// `valueQuantity.code` (required).
const VITALS_UCUM: &[&str] = &[
    "%", "cm", "[in_i]", "kg", "g", "[lb_av]", "Cel", "[degF]", "mm[Hg]", "/min", "kg/m2", "m2",
];

/// What each specific vital-signs profile fixes: the LOINC code that must
/// be among `code.coding` and the units its `valueQuantity` (for `bp`: each
/// component's) may have; their `value[x]` is a Quantity only.
const SPECIFIC_PROFILES: &[(&str, &str, &[&str])] = &[
    (
        "http://hl7.org/fhir/StructureDefinition/heartrate",
        "8867-4",
        &["/min"],
    ),
    (
        "http://hl7.org/fhir/StructureDefinition/resprate",
        "9279-1",
        &["/min"],
    ),
    (
        "http://hl7.org/fhir/StructureDefinition/oxygensat",
        "2708-6",
        &["%"],
    ),
    (
        "http://hl7.org/fhir/StructureDefinition/bodytemp",
        "8310-5",
        &["Cel", "[degF]"],
    ),
    (
        "http://hl7.org/fhir/StructureDefinition/bodyweight",
        "29463-7",
        &["kg", "g", "[lb_av]"],
    ),
    (render::BP_PROFILE, render::BP_PANEL_LOINC, &["mm[Hg]"]),
];

/// What the vital-signs profiles check in an Observation, read from its
/// JSON ([`claimed_profiles`]) or from a typed document (`doc.rs`), so the
/// rules below are written once.
pub(crate) struct ProfileFacts<'a> {
    /// `status` is present.
    pub status: bool,
    /// A `category` carries the vital-signs coding.
    pub vital_category: bool,
    /// The codes of the LOINC codings of `code` (None: a LOINC coding
    /// whose code is not text).
    pub loinc: Vec<Option<&'a str>>,
    /// `subject` has a reference or an identifier.
    pub subject: bool,
    /// `effectiveDateTime` or `effectivePeriod` is present.
    pub effective: bool,
    pub value: ValueFacts<'a>,
    /// Each component's LOINC codes and value.
    pub components: Vec<(Vec<Option<&'a str>>, ValueFacts<'a>)>,
}

/// The `value[x]` of an Observation or a component.
pub(crate) struct ValueFacts<'a> {
    /// One of the other `value[x]` types is present.
    pub other: bool,
    pub quantity: Option<QuantityFacts<'a>>,
    /// `dataAbsentReason` is present.
    pub absent: bool,
}

/// A `valueQuantity`.
pub(crate) struct QuantityFacts<'a> {
    /// `value` is a number.
    pub number: bool,
    /// `unit` is text.
    pub unit: bool,
    /// `system` is UCUM.
    pub ucum: bool,
    pub code: Option<&'a str>,
}

impl ValueFacts<'_> {
    /// A value in one of `units`, or none with a reason.
    fn ok(&self, units: &[&str]) -> bool {
        !self.other
            && match (&self.quantity, self.absent) {
                (Some(q), false) => {
                    q.number && q.unit && q.ucum && q.code.is_some_and(|c| units.contains(&c))
                }
                (None, true) => true,
                _ => false,
            }
    }
}

/// The profiles an Observation built by the hub meets, from its own
/// content: `vitalsigns` when it has a status, the vital-signs category, a
/// LOINC code, a subject, an effective time and a value in a vital-signs
/// unit (or a `dataAbsentReason`), on each component too; then `specific`
/// (a vital-signs profile URL) when its fixed code and unit hold as well.
/// Empty when `vitalsigns` is not met (e.g. a reading not yet attributed
/// to a patient).
pub(crate) fn profiles_of(
    f: &ProfileFacts<'_>,
    specific: Option<&'static str>,
) -> Vec<&'static str> {
    let values_ok = |units: &[&str]| {
        if f.components.is_empty() {
            f.value.ok(units)
        } else {
            f.value.quantity.is_none()
                && f.components
                    .iter()
                    .all(|(loinc, v)| !loinc.is_empty() && v.ok(units))
        }
    };
    let vitalsigns = f.status
        && f.vital_category
        && !f.loinc.is_empty()
        && f.subject
        && f.effective
        && values_ok(VITALS_UCUM);
    if !vitalsigns {
        return vec![];
    }
    let mut out = vec![VITALSIGNS_PROFILE];
    if let Some((url, code, units)) =
        specific.and_then(|p| SPECIFIC_PROFILES.iter().find(|(url, _, _)| *url == p))
    {
        let code_ok = f.loinc.contains(&Some(*code));
        let bp_parts = *url != render::BP_PROFILE
            || ["8480-6", "8462-4"].iter().all(|part| {
                f.components
                    .iter()
                    .any(|(loinc, _)| loinc.contains(&Some(*part)))
            });
        if code_ok && bp_parts && values_ok(units) {
            out.push(url);
        }
    }
    out
}

/// The profiles an Observation's JSON meets (see [`profiles_of`]).
pub fn claimed_profiles(
    obs: &serde_json::Map<String, Json>,
    specific: Option<&'static str>,
) -> Vec<&'static str> {
    fn codes_in<'j>(cc: Option<&'j Json>, system: &str) -> Vec<Option<&'j str>> {
        cc.and_then(|cc| cc["coding"].as_array())
            .map(|cs| {
                cs.iter()
                    .filter(|c| c["system"] == system)
                    .map(|c| c["code"].as_str())
                    .collect()
            })
            .unwrap_or_default()
    }
    const OTHER_VALUES: &[&str] = &[
        "valueCodeableConcept",
        "valueString",
        "valueBoolean",
        "valueInteger",
        "valueRange",
        "valueRatio",
        "valueSampledData",
        "valueTime",
        "valueDateTime",
        "valuePeriod",
    ];
    fn value(o: &serde_json::Map<String, Json>) -> ValueFacts<'_> {
        ValueFacts {
            other: OTHER_VALUES.iter().any(|k| o.contains_key(*k)),
            quantity: o.get("valueQuantity").map(|q| QuantityFacts {
                number: q["value"].is_number(),
                unit: q["unit"].is_string(),
                ucum: q["system"] == UCUM_SYSTEM,
                code: q["code"].as_str(),
            }),
            absent: o.contains_key("dataAbsentReason"),
        }
    }
    let facts = ProfileFacts {
        status: obs.get("status").is_some_and(Json::is_string),
        vital_category: obs
            .get("category")
            .and_then(Json::as_array)
            .is_some_and(|cats| {
                cats.iter()
                    .any(|c| codes_in(Some(c), CATEGORY_SYSTEM).contains(&Some("vital-signs")))
            }),
        loinc: codes_in(obs.get("code"), LOINC_SYSTEM),
        subject: obs
            .get("subject")
            .is_some_and(|s| s.get("reference").is_some() || s.get("identifier").is_some()),
        effective: obs.contains_key("effectiveDateTime") || obs.contains_key("effectivePeriod"),
        value: value(obs),
        components: obs
            .get("component")
            .and_then(Json::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(Json::as_object)
                    .map(|c| (codes_in(c.get("code"), LOINC_SYSTEM), value(c)))
                    .collect()
            })
            .unwrap_or_default(),
    };
    profiles_of(&facts, specific)
}

/// The specific vital-signs profile, if the metric's LOINC is in the FHIR
/// vital-signs set; `Some("")` means "vitalsigns only".
fn vital_profile(metric: &Metric) -> Option<&'static str> {
    match metric.loinc {
        "8867-4" | "8889-8" => Some("http://hl7.org/fhir/StructureDefinition/heartrate"),
        "9279-1" => Some("http://hl7.org/fhir/StructureDefinition/resprate"),
        "59408-5" | "2708-6" => Some("http://hl7.org/fhir/StructureDefinition/oxygensat"),
        "8310-5" => Some("http://hl7.org/fhir/StructureDefinition/bodytemp"),
        "29463-7" => Some("http://hl7.org/fhir/StructureDefinition/bodyweight"),
        "8480-6" | "8462-4" | "8478-0" => Some(""),
        _ => None,
    }
}

pub fn category(metric: &Metric) -> (&'static str, &'static str) {
    match metric.loinc {
        "41653-7" => ("laboratory", "Laboratory"),
        _ => ("vital-signs", "Vital Signs"),
    }
}

pub use crate::clock::format_instant;

pub fn validity_code(v: i32) -> &'static str {
    match Validity::try_from(v) {
        Ok(Validity::Valid) => "valid",
        Ok(Validity::Questionable) => "questionable",
        Ok(Validity::Invalid) => "invalid",
        _ => "unspecified",
    }
}

pub fn flag_code(f: i32) -> Option<&'static str> {
    Some(match QualityFlag::try_from(f).ok()? {
        QualityFlag::Unspecified => return None,
        QualityFlag::Calibrating => "calibrating",
        QualityFlag::SensorOff => "sensor-off",
        QualityFlag::Disconnected => "disconnected",
        QualityFlag::OutOfDeviceRange => "out-of-device-range",
        QualityFlag::LowSignal => "low-signal",
        QualityFlag::Interference => "interference",
        QualityFlag::Searching => "searching",
        QualityFlag::DemoMode => "demo-mode",
        QualityFlag::ValueMissing => "value-missing",
        QualityFlag::DeviceFault => "device-fault",
        QualityFlag::ClockSkew => "clock-skew",
    })
}

pub fn time_source_code(t: i32) -> &'static str {
    match TimeSource::try_from(t) {
        Ok(TimeSource::DeviceClockSynced) => "device-clock-synced",
        Ok(TimeSource::DeviceClockUnsynced) => "device-clock-unsynced",
        Ok(TimeSource::GatewayReceive) => "gateway-receive",
        _ => "unspecified",
    }
}

/// Device details for `Observation.device`.
#[derive(Debug, Clone, Default)]
pub struct DeviceRef<'a> {
    pub gateway_id: &'a str,
    pub device_id: &'a str,
    pub manufacturer: &'a str,
    pub model: &'a str,
    pub serial_number: &'a str,
}

/// An Observation built from a reading, with the values of its indexed
/// columns.
#[derive(Debug, Clone)]
pub struct MappedObservation {
    pub id: String,
    pub status: &'static str,
    /// The numeric value when it is carried as `valueQuantity`.
    pub value: Option<f64>,
    pub effective_us: i64,
    pub out_of_range: bool,
    pub resource: Json,
}

/// The patient id a reading's source carried (`Reading.subject`, e.g. HL7
/// PID-3), used when the device has no static association.
pub fn source_patient(reading: &Reading) -> Option<&str> {
    reading
        .subject
        .as_ref()
        .map(|s| s.value.as_str())
        .filter(|v| !v.trim().is_empty())
}

/// Maps a validated reading to a FHIR R4 Observation.
///
/// `received_us` is the hub's receive time, used for `issued` when the
/// reading carries no gateway receive time.
pub fn map_observation(
    device: &DeviceRef<'_>,
    reading: &Reading,
    metric: &Metric,
    patient_id: Option<&str>,
    received_us: i64,
) -> MappedObservation {
    let obs = doc::reading_observation(
        device,
        doc::DeviceParts::of(device),
        reading,
        metric,
        patient_id,
        received_us,
        None,
    );
    let cols = columns(reading, metric);
    MappedObservation {
        id: obs.id.to_string(),
        status: cols.status,
        value: cols.value,
        effective_us: reading.effective_time_us(),
        out_of_range: cols.out_of_range,
        // Serializing into a `Value` cannot fail: every key is text.
        resource: serde_json::to_value(&obs).unwrap_or_default(),
    }
}

/// The indexed column values of a reading's Observation, without building
/// its JSON (what ingest stores).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObservationColumns {
    pub status: &'static str,
    /// The numeric value when it is carried as `valueQuantity`.
    pub value: Option<f64>,
    pub out_of_range: bool,
}

/// Status, stored value and range check of a validated reading.
pub fn columns(reading: &Reading, metric: &Metric) -> ObservationColumns {
    let validity = Validity::try_from(reading.validity).unwrap_or(Validity::Unspecified);
    // INVALID readings are complete (the device said the value is unusable),
    // so they stay "final" with the value withheld.
    let status = match validity {
        Validity::Valid | Validity::Invalid => "final",
        _ => "preliminary",
    };
    let numeric = match &reading.value {
        Some(reading::Value::Numeric(v)) => Some(*v),
        _ => None,
    };
    let out_of_range =
        numeric.is_some_and(|v| v < metric.possible_range.0 || v > metric.possible_range.1);
    let value = numeric.filter(|_| validity != Validity::Invalid && !out_of_range);
    ObservationColumns {
        status,
        value,
        out_of_range,
    }
}

/// `Observation.subject` for patient `p`: a literal reference when `p` is a
/// FHIR id, plus the identifier the source carried when it named `p`.
pub fn subject_json(p: &str, reading: &Reading) -> Json {
    serde_json::to_value(doc::subject(p, reading)).unwrap_or_default()
}

/// The reading-quality extension: validity, device flags, the range
/// check, and the raw value/unit when the value is withheld.
pub fn quality_extension(
    reading: &Reading,
    metric: &Metric,
    out_of_range: bool,
    withhold: bool,
) -> Json {
    serde_json::to_value(doc::quality(reading, metric, out_of_range, withhold)).unwrap_or_default()
}

fn profile_loinc_display(code: &str) -> Option<&'static str> {
    match code {
        "2708-6" => Some("Oxygen saturation in Arterial blood"),
        "8867-4" => Some("Heart rate"),
        _ => CATALOGUE
            .all()
            .iter()
            .find(|m| m.loinc == code)
            .map(|m| m.loinc_display),
    }
}

/// `interpretation` as the device flagged the value (HL7 v2 OBX-8 and the
/// like, carried in `Reading.interpretation`), in the v3
/// ObservationInterpretation code system (THO). Never computed by the hub:
/// no flag from the device, no interpretation.
pub fn interpretation_json(r: &Reading) -> Option<Json> {
    doc::interpretation(r).map(|i| serde_json::to_value(i).unwrap_or_default())
}

pub const INTERPRETATION_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";

pub fn absent_reason(code: &str, display: &str) -> Json {
    serde_json::to_value(doc::absent(code, display)).unwrap_or_default()
}

/// An OperationOutcome with one issue.
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> Json {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "diagnostics": diagnostics }],
    })
}

/// The server's CapabilityStatement. `date` is an RFC 3339 time.
pub fn capability_statement(date: &str) -> Json {
    let param =
        |name: &str, ty: &str, doc: &str| json!({ "name": name, "type": ty, "documentation": doc });
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": { "name": "Vigil cloud-hub", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "Vigil cloud-hub FHIR API (vital signs)" },
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "resource": [{
                "type": "Observation",
                "profile": VITALSIGNS_PROFILE,
                "supportedProfile": [
                    VITALSIGNS_PROFILE,
                    "http://hl7.org/fhir/StructureDefinition/heartrate",
                    "http://hl7.org/fhir/StructureDefinition/oxygensat",
                    "http://hl7.org/fhir/StructureDefinition/resprate",
                    "http://hl7.org/fhir/StructureDefinition/bodytemp",
                    "http://hl7.org/fhir/StructureDefinition/bodyweight",
                ],
                "interaction": [{ "code": "read" }, { "code": "search-type" }],
                // meta.versionId: a re-attributed reading is a new version
                // (no vread of older ones).
                "versioning": "versioned",
                "readHistory": false,
                "updateCreate": false,
                "searchParam": [
                    param("patient", "reference", "Patient id or Patient/id; patient:identifier takes [system]|value (an HL7 assigning authority or its URI)"),
                    param("subject", "reference", "Patient id or Patient/id; subject:identifier takes [system]|value (an HL7 assigning authority or its URI)"),
                    param("code", "token", "LOINC (incl. vital-signs profile codes) or MDC (urn:iso:std:iso:11073:10101) code; comma = OR"),
                    param("date", "date", "effective time; prefixes eq, lt, le, gt, ge, sa, eb; repeatable"),
                    param("category", "token", "observation category (vital-signs, laboratory); comma = OR"),
                    param("device", "reference", "Device id or Device/id; comma = OR"),
                    param("_count", "number", "page size, default 100, max 1000"),
                    param("_offset", "number", "entries to skip (paging links carry it)"),
                    param("_sort", "string", "date or -date (default date)"),
                ],
            }, {
                "type": "Device",
                "interaction": [{ "code": "read" }, { "code": "search-type" }],
                "searchParam": [
                    param("_count", "number", "page size, default 100, max 1000"),
                    param("_offset", "number", "entries to skip (paging links carry it)"),
                ],
            }, {
                "type": "Patient",
                "interaction": [{ "code": "read" }],
            }, {
                "type": "Location",
                "interaction": [{ "code": "read" }, { "code": "search-type" }],
                "searchParam": [
                    param("_count", "number", "page size, default 100, max 1000"),
                    param("_offset", "number", "entries to skip (paging links carry it)"),
                ],
            }],
            "operation": [{
                "name": "export",
                "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
            }],
        }],
    })
}

// ---------------------------------------------------------------------------
// Search parameters

/// A search request that could not be understood; becomes a 400
/// OperationOutcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{diagnostics}")]
pub struct SearchParamError {
    /// OperationOutcome issue code: `invalid` or `not-supported`.
    pub code: &'static str,
    pub diagnostics: String,
}

fn invalid(param: &str, msg: impl std::fmt::Display) -> SearchParamError {
    SearchParamError {
        code: "invalid",
        diagnostics: format!("search parameter `{param}`: {msg}"),
    }
}

fn unsupported(param: &str, msg: impl std::fmt::Display) -> SearchParamError {
    SearchParamError {
        code: "not-supported",
        diagnostics: format!("search parameter `{param}`: {msg}"),
    }
}

/// `_count` and `_offset` of a search on a resource type that takes only
/// paging parameters (Device, Location); `_format` is ignored (JSON only).
/// Any other parameter is refused, naming it and the resource type.
pub fn parse_paging(
    resource: &str,
    pairs: &[(String, String)],
) -> Result<(u32, u64), SearchParamError> {
    check_search_size(pairs)?;
    let mut count = DEFAULT_COUNT;
    let mut offset = 0u64;
    for (k, v) in pairs {
        match k.as_str() {
            "_count" => {
                count = v
                    .parse::<u32>()
                    .map_err(|_| invalid(k, format!("`{v}` is not a non-negative integer")))?
                    .min(MAX_COUNT);
            }
            "_offset" => {
                offset = v
                    .parse::<u64>()
                    .map_err(|_| invalid(k, format!("`{v}` is not a non-negative integer")))?;
            }
            "_format" => {}
            other => {
                return Err(unsupported(
                    other,
                    format!("unknown for {resource} (supported: _count, _offset)"),
                ));
            }
        }
    }
    Ok((count, offset))
}

/// Date comparison prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatePrefix {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
    Sa,
    Eb,
}

/// A `date` search value: prefix and its implicit range `[start, end)` in
/// UTC microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateParam {
    pub prefix: DatePrefix,
    pub start_us: i64,
    pub end_us: i64,
}

impl DateParam {
    /// The condition on a point in time `t` (an `effectiveDateTime`):
    /// returns `(lower_inclusive, upper_exclusive)` bounds on `t`.
    pub fn bounds(&self) -> (Option<i64>, Option<i64>) {
        match self.prefix {
            DatePrefix::Eq => (Some(self.start_us), Some(self.end_us)),
            DatePrefix::Lt | DatePrefix::Eb => (None, Some(self.start_us)),
            DatePrefix::Le => (None, Some(self.end_us)),
            DatePrefix::Gt | DatePrefix::Sa => (Some(self.end_us), None),
            DatePrefix::Ge => (Some(self.start_us), None),
        }
    }
}

fn parse_num<T: std::str::FromStr>(s: &str, len: usize) -> Option<T> {
    (s.len() == len && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
}

/// Parses a FHIR `date` search value (`[prefix]YYYY[-MM[-DD[Thh:mm[:ss[.f]]<tz>]]]`).
/// Partial dates without a time are taken in UTC.
pub fn parse_date_param(raw: &str) -> Result<DateParam, SearchParamError> {
    let (prefix, rest) = match raw.get(..2) {
        Some("eq") => (DatePrefix::Eq, &raw[2..]),
        Some("lt") => (DatePrefix::Lt, &raw[2..]),
        Some("le") => (DatePrefix::Le, &raw[2..]),
        Some("gt") => (DatePrefix::Gt, &raw[2..]),
        Some("ge") => (DatePrefix::Ge, &raw[2..]),
        Some("sa") => (DatePrefix::Sa, &raw[2..]),
        Some("eb") => (DatePrefix::Eb, &raw[2..]),
        Some("ne") | Some("ap") => {
            return Err(unsupported(
                "date",
                format!("prefix `{}` is not supported", &raw[..2]),
            ));
        }
        _ => (DatePrefix::Eq, raw),
    };
    let bad = || {
        invalid(
            "date",
            format!("`{raw}` is not YYYY, YYYY-MM, YYYY-MM-DD or a dateTime with timezone"),
        )
    };
    let (date_part, time_part) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    let mut it = date_part.split('-');
    let year: i32 = parse_num(it.next().ok_or_else(bad)?, 4).ok_or_else(bad)?;
    let month: Option<u8> = it
        .next()
        .map(|m| parse_num(m, 2).ok_or_else(bad))
        .transpose()?;
    let day: Option<u8> = it
        .next()
        .map(|d| parse_num(d, 2).ok_or_else(bad))
        .transpose()?;
    if it.next().is_some() {
        return Err(bad());
    }
    let to_us = |dt: OffsetDateTime| -> i64 { (dt.unix_timestamp_nanos() / 1000) as i64 };
    let month_of = |m: u8| Month::try_from(m).map_err(|_| bad());
    let (start, end) = match (month, day, time_part) {
        (None, None, None) => {
            let s = Date::from_calendar_date(year, Month::January, 1).map_err(|_| bad())?;
            let e = Date::from_calendar_date(year + 1, Month::January, 1).map_err(|_| bad())?;
            (midnight(s), midnight(e))
        }
        (Some(m), None, None) => {
            let s = Date::from_calendar_date(year, month_of(m)?, 1).map_err(|_| bad())?;
            let e = if m == 12 {
                Date::from_calendar_date(year + 1, Month::January, 1)
            } else {
                Date::from_calendar_date(year, month_of(m + 1)?, 1)
            }
            .map_err(|_| bad())?;
            (midnight(s), midnight(e))
        }
        (Some(m), Some(d), None) => {
            let s = Date::from_calendar_date(year, month_of(m)?, d).map_err(|_| bad())?;
            let e = s.next_day().ok_or_else(bad)?;
            (midnight(s), midnight(e))
        }
        (Some(m), Some(d), Some(t)) => {
            let date = Date::from_calendar_date(year, month_of(m)?, d).map_err(|_| bad())?;
            let (start, precision_us) = parse_time_with_tz(date, t).ok_or_else(bad)?;
            // The end of the last second of year 9999 is outside the
            // representable range: refused, never a panic.
            let end = start
                .checked_add(time::Duration::microseconds(precision_us))
                .ok_or_else(bad)?;
            (start, end)
        }
        _ => return Err(bad()),
    };
    Ok(DateParam {
        prefix,
        start_us: to_us(start),
        end_us: to_us(end),
    })
}

fn midnight(d: Date) -> OffsetDateTime {
    PrimitiveDateTime::new(d, Time::MIDNIGHT).assume_utc()
}

/// Parses `hh:mm[:ss[.fff]]` followed by `Z` or `±hh:mm`; returns the instant
/// and the precision of the value in microseconds.
fn parse_time_with_tz(date: Date, t: &str) -> Option<(OffsetDateTime, i64)> {
    let tz_pos = t.find(['Z', '+', '-'])?;
    let (clock, tz) = t.split_at(tz_pos);
    let offset = if tz == "Z" {
        UtcOffset::UTC
    } else {
        let sign: i8 = if tz.starts_with('-') { -1 } else { 1 };
        let (h, m) = tz[1..].split_once(':')?;
        let h: i8 = parse_num(h, 2)?;
        let m: i8 = parse_num(m, 2)?;
        UtcOffset::from_hms(sign * h, sign * m, 0).ok()?
    };
    let mut parts = clock.split(':');
    let hour: u8 = parse_num(parts.next()?, 2)?;
    let minute: u8 = parse_num(parts.next()?, 2)?;
    let (second, micro, precision) = match parts.next() {
        None => (0u8, 0u32, 60_000_000i64),
        Some(s) => match s.split_once('.') {
            None => (parse_num(s, 2)?, 0, 1_000_000),
            Some((sec, frac)) => {
                if frac.is_empty() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let digits = frac.len() as u32;
                let micro: u32 = frac.parse::<u32>().ok()? * 10u32.pow(6 - digits);
                (parse_num(sec, 2)?, micro, 10i64.pow(6 - digits))
            }
        },
    };
    if parts.next().is_some() {
        return None;
    }
    let time = Time::from_hms_micro(hour, minute, second, micro).ok()?;
    Some((
        PrimitiveDateTime::new(date, time).assume_offset(offset),
        precision,
    ))
}

/// Sort order of a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortOrder {
    #[default]
    DateAsc,
    DateDesc,
}

/// A parsed Observation search.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservationSearch {
    /// Patient ids, OR-ed. Empty = any (including unattributed readings).
    pub patients: Vec<String>,
    /// `patient:identifier` / `subject:identifier` tokens, OR-ed: the
    /// caller resolves them to `patients` (a system is mapped to its URI
    /// by `[identifiers]`, so the raw HL7 authority and the URI both find
    /// the patient) before the store searches.
    pub patient_identifiers: Vec<IdentifierToken>,
    /// Each inner list is an OR-set of MDC codes; the lists are AND-ed. An
    /// empty inner list matches nothing (codes unknown to the catalogue).
    pub codes: Vec<Vec<CodeMatch>>,
    pub dates: Vec<DateParam>,
    /// Each inner list is an OR-set of category codes; the lists are AND-ed.
    pub categories: Vec<Vec<String>>,
    /// Device resource ids, OR-ed. Empty = any.
    pub devices: Vec<String>,
    pub count: u32,
    pub offset: u64,
    pub sort: SortOrder,
}

/// A `system|value` token naming a patient by identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifierToken {
    /// `None`: any system (`value` alone); `Some("")`: no system (`|value`).
    pub system: Option<String>,
    pub value: String,
}

fn parse_identifier_token(param: &str, token: &str) -> Result<IdentifierToken, SearchParamError> {
    let (system, value) = match token.split_once('|') {
        Some((s, v)) => (Some(s.to_owned()), v),
        None => (None, token),
    };
    if value.is_empty() || value.len() > 64 || value.chars().any(char::is_control) {
        return Err(invalid(
            param,
            format!("`{token}` is not [system]|value with a value of 1-64 characters"),
        ));
    }
    Ok(IdentifierToken {
        system,
        value: value.to_owned(),
    })
}

fn parse_reference(param: &str, value: &str) -> Result<String, SearchParamError> {
    let id = value.strip_prefix("Patient/").unwrap_or(value);
    if !is_valid_id(id) {
        return Err(invalid(
            param,
            format!("`{value}` is not a Patient id or Patient/<id>"),
        ));
    }
    Ok(id.to_owned())
}

/// What one resolved `code` token matches: observations of an MDC metric,
/// restricted to one stored LOINC code when the token was a LOINC code (a
/// metric's units have their own LOINC codes: EtCO2 as partial pressure is
/// not EtCO2 as volume fraction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CodeMatch {
    pub mdc: u32,
    pub loinc: Option<&'static str>,
}

/// Resolves one `code` token to what it matches in the catalogue.
fn resolve_code(token: &str) -> Result<Vec<CodeMatch>, SearchParamError> {
    let (system, code) = match token.split_once('|') {
        Some((s, c)) => (Some(s), c),
        None => (None, token),
    };
    if code.is_empty() {
        return Err(invalid("code", format!("`{token}` has no code")));
    }
    let by_loinc = || {
        let mut v = CATALOGUE
            .by_loinc(code)
            .map(|m| {
                // When every unit of the metric has this code, the MDC code
                // alone selects the same rows (and the search index has no
                // LOINC column).
                let all_units = CATALOGUE.by_mdc(m.mdc).is_some_and(|base| {
                    base.variants()
                        .all(|u| u.loinc == code || u.loinc_profile == Some(code))
                });
                CodeMatch {
                    mdc: m.mdc,
                    loinc: (!all_units).then_some(m.loinc),
                }
            })
            .collect::<Vec<_>>();
        if code == render::BP_PANEL_LOINC {
            v.extend(render::BP_FAMILIES.iter().map(|f| CodeMatch {
                mdc: f.mdc,
                loinc: Some(render::BP_PANEL_LOINC),
            }));
        }
        v
    };
    // A catalogue metric, a blood-pressure panel, or (any other MDC code)
    // a waveform.
    let by_mdc = || match code.parse::<u32>() {
        Ok(c) if render::bp_family(c).is_some() => vec![CodeMatch {
            mdc: c,
            loinc: Some(render::BP_PANEL_LOINC),
        }],
        Ok(c) => vec![CodeMatch {
            mdc: CATALOGUE.by_mdc(c).map_or(c, |m| m.mdc),
            loinc: None,
        }],
        Err(_) => Vec::new(),
    };
    Ok(match system {
        Some(LOINC_SYSTEM) => by_loinc(),
        Some(MDC_SYSTEM) => by_mdc(),
        None => {
            let mut v = by_loinc();
            v.extend(by_mdc());
            v
        }
        // `|code` (no system) or another system: nothing we store matches.
        Some(_) => Vec::new(),
    })
}

fn parse_int<T: std::str::FromStr>(param: &str, value: &str) -> Result<T, SearchParamError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            param,
            format!("`{value}` is not a non-negative integer"),
        ));
    }
    value
        .parse()
        .map_err(|_| invalid(param, format!("`{value}` is out of range")))
}

/// Parses the query parameters of `GET /fhir/Observation`.
pub fn parse_search(pairs: &[(String, String)]) -> Result<ObservationSearch, SearchParamError> {
    check_search_size(pairs)?;
    let mut s = ObservationSearch {
        patients: Vec::new(),
        patient_identifiers: Vec::new(),
        codes: Vec::new(),
        dates: Vec::new(),
        categories: Vec::new(),
        devices: Vec::new(),
        count: DEFAULT_COUNT,
        offset: 0,
        sort: SortOrder::DateAsc,
    };
    let mut patient_seen = false;
    for (name, value) in pairs {
        let name = name.as_str();
        if name == "_format" {
            continue;
        }
        if value.is_empty() {
            return Err(invalid(name, "empty value"));
        }
        match name {
            "patient" | "subject" | "patient:identifier" | "subject:identifier" => {
                if patient_seen {
                    return Err(unsupported(
                        name,
                        "patient/subject may be given once (use a comma for OR)",
                    ));
                }
                patient_seen = true;
                for v in value.split(',') {
                    if name.ends_with(":identifier") {
                        s.patient_identifiers.push(parse_identifier_token(name, v)?);
                    } else {
                        s.patients.push(parse_reference(name, v)?);
                    }
                }
            }
            "code" => {
                let mut set = Vec::new();
                for token in value.split(',') {
                    set.extend(resolve_code(token)?);
                }
                set.sort_unstable();
                set.dedup();
                s.codes.push(set);
            }
            "date" => s.dates.push(parse_date_param(value)?),
            "category" => {
                let mut set = Vec::new();
                for token in value.split(',') {
                    let code = match token.split_once('|') {
                        Some((CATEGORY_SYSTEM, c)) | Some(("", c)) => c,
                        Some((_, _)) => continue,
                        None => token,
                    };
                    if code.is_empty() {
                        return Err(invalid(name, format!("`{token}` has no code")));
                    }
                    set.push(code.to_owned());
                }
                s.categories.push(set);
            }
            "device" => {
                for v in value.split(',') {
                    let id = v.strip_prefix("Device/").unwrap_or(v);
                    if !is_valid_id(id) {
                        return Err(invalid(
                            name,
                            format!("`{v}` is not a Device id or Device/<id>"),
                        ));
                    }
                    s.devices.push(id.to_owned());
                }
            }
            "_count" => s.count = parse_int::<u32>(name, value)?.min(MAX_COUNT),
            "_offset" => s.offset = parse_int(name, value)?,
            "_sort" => {
                s.sort = match value.as_str() {
                    "date" => SortOrder::DateAsc,
                    "-date" => SortOrder::DateDesc,
                    other => {
                        return Err(unsupported(
                            "_sort",
                            format!("`{other}`: only date or -date"),
                        ));
                    }
                }
            }
            other if other.contains(':') => {
                return Err(unsupported(other, "modifiers are not supported"));
            }
            other => return Err(unsupported(other, "unknown search parameter")),
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn incarnation_zero_keeps_the_ids_and_another_gets_its_own() {
        let legacy = super::observation_id("gw-1", "dev", 7);
        assert_eq!(super::observation_id_in("gw-1", "dev", 0, 7), legacy);
        let new = super::observation_id_in("gw-1", "dev", 42, 7);
        assert_ne!(new, legacy);
        assert_eq!(new.len(), 32);
        assert!(new.ends_with("0000000000000007"));
        assert_ne!(new, super::observation_id_in("gw-1", "dev", 43, 7));
    }

    /// Stored ids never change: SHA-256 of `vigil-reading\ngw-1\ndev`
    /// (then `\n42` for incarnation 42), its first 8 bytes in hex, then the
    /// sequence in 16 hex digits (computed with Python's hashlib).
    #[test]
    fn observation_ids_match_their_definition() {
        assert_eq!(
            super::observation_id("gw-1", "dev", 7),
            "93ed17eacb4c3ba50000000000000007"
        );
        let ids = super::ObservationIds::new("gw-1", "dev", 42);
        assert_eq!(ids.id(0x1234_abcd), "754abadd3d1c4cd9000000001234abcd");
        assert_eq!(
            ids.id(0x1234_abcd),
            super::observation_id_in("gw-1", "dev", 42, 0x1234_abcd)
        );
    }

    #[test]
    fn a_reading_id_splits_into_its_device_part_and_sequence() {
        use super::ObservationIds;
        let ids = ObservationIds::new("gw-1", "dev", 42);
        assert_eq!(
            ObservationIds::split(&ids.id(77)),
            Some((ids.device_part(), 77))
        );
        let max = ids.id(i64::MAX as u64);
        assert_eq!(ObservationIds::split(&max).map(|s| s.1), Some(i64::MAX));
        // A sequence no reading is stored with, and ids of other forms.
        assert_eq!(ObservationIds::split(&ids.id(u64::MAX)), None);
        for other in [
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdeg",
            "",
        ] {
            assert_eq!(ObservationIds::split(other), None, "{other}");
        }
    }

    use super::*;
    use shared_protocol::catalogue::codes;
    use shared_protocol::v1::CodedValue;

    fn us(s: &str) -> i64 {
        let dt = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap();
        (dt.unix_timestamp_nanos() / 1000) as i64
    }

    const DEV: DeviceRef<'static> = DeviceRef {
        gateway_id: "gw-1",
        device_id: "masimo-1",
        manufacturer: "Masimo",
        model: "Radical-7",
        serial_number: "",
    };

    fn spo2(value: Option<reading::Value>, validity: Validity) -> Reading {
        Reading {
            mdc_code: codes::PULS_OXIM_SAT_O2,
            value,
            mdc_unit: 262_688,
            ucum_unit: "%".into(),
            device_time_us: us("2024-05-01T10:00:00.250Z"),
            time_source: TimeSource::DeviceClockSynced as i32,
            gateway_time_us: us("2024-05-01T10:00:01Z"),
            validity: validity as i32,
            flags: vec![],
            sequence: 7,
            ..Default::default()
        }
    }

    fn metric() -> &'static Metric {
        CATALOGUE.by_mdc(codes::PULS_OXIM_SAT_O2).unwrap()
    }

    #[test]
    fn spo2_maps_to_vital_signs_observation() {
        let r = spo2(Some(reading::Value::Numeric(98.0)), Validity::Valid);
        let m = map_observation(&DEV, &r, metric(), Some("p-1"), 0);
        let o = &m.resource;
        assert_eq!(o["status"], "final");
        assert_eq!(m.status, "final");
        assert_eq!(m.value, Some(98.0));
        let codings = o["code"]["coding"].as_array().unwrap();
        assert_eq!(codings[0]["system"], LOINC_SYSTEM);
        assert_eq!(codings[0]["code"], "59408-5");
        assert_eq!(codings[1]["code"], "2708-6");
        assert_eq!(codings[2]["system"], MDC_SYSTEM);
        assert_eq!(codings[2]["code"], "150456");
        assert_eq!(codings[2]["display"], "MDC_PULS_OXIM_SAT_O2");
        assert_eq!(o["valueQuantity"]["value"], 98.0);
        assert_eq!(o["valueQuantity"]["code"], "%");
        assert_eq!(o["valueQuantity"]["system"], UCUM_SYSTEM);
        assert!(o.get("dataAbsentReason").is_none());
        assert_eq!(o["subject"]["reference"], "Patient/p-1");
        assert_eq!(o["effectiveDateTime"], "2024-05-01T10:00:00.250000Z");
        assert_eq!(o["issued"], "2024-05-01T10:00:01Z");
        let profiles = o["meta"]["profile"].as_array().unwrap();
        assert!(profiles.contains(&json!(VITALSIGNS_PROFILE)));
        assert!(profiles.contains(&json!("http://hl7.org/fhir/StructureDefinition/oxygensat")));
        assert_eq!(o["category"][0]["coding"][0]["code"], "vital-signs");
        assert_eq!(o["device"]["display"], "Masimo Radical-7");
        assert_eq!(
            o["device"]["identifier"]["system"],
            "urn:vigil:gateway:gw-1:device"
        );
        assert_eq!(o["extension"][1]["valueCode"], "device-clock-synced");
        assert_eq!(o["extension"][0]["extension"][0]["valueCode"], "valid");
        assert!(is_valid_id(&m.id) && m.id.len() == 32);
        assert_eq!(m.id, observation_id("gw-1", "masimo-1", 7));
        assert_eq!(
            o["identifier"],
            json!([{ "system": "urn:vigil:reading:gw-1:masimo-1", "value": "7" }])
        );
    }

    #[test]
    fn out_of_range_withholds_value_and_keeps_raw() {
        let r = spo2(Some(reading::Value::Numeric(140.0)), Validity::Valid);
        let m = map_observation(&DEV, &r, metric(), None, 0);
        let o = &m.resource;
        assert!(m.out_of_range);
        assert!(o.get("valueQuantity").is_none());
        assert!(o.get("subject").is_none());
        assert_eq!(o["dataAbsentReason"]["coding"][0]["code"], "error");
        let q = o["extension"][0]["extension"].as_array().unwrap();
        assert!(q.contains(&json!({ "url": "out-of-range", "valueBoolean": true })));
        assert!(q.contains(&json!({ "url": "raw-value", "valueDecimal": 140.0 })));
        assert_eq!(m.value, None);
    }

    #[test]
    fn questionable_is_preliminary_and_flags_are_listed() {
        let mut r = spo2(Some(reading::Value::Numeric(91.0)), Validity::Questionable);
        r.flags = vec![
            QualityFlag::LowSignal as i32,
            QualityFlag::Interference as i32,
        ];
        let o = map_observation(&DEV, &r, metric(), None, 0).resource;
        assert_eq!(o["status"], "preliminary");
        assert_eq!(o["valueQuantity"]["value"], 91.0);
        let q = o["extension"][0]["extension"].as_array().unwrap();
        assert!(q.contains(&json!({ "url": "flag", "valueCode": "low-signal" })));
        assert!(q.contains(&json!({ "url": "flag", "valueCode": "interference" })));
    }

    #[test]
    fn invalid_and_missing_values_follow_obs_6() {
        let r = spo2(Some(reading::Value::Numeric(97.0)), Validity::Invalid);
        let o = map_observation(&DEV, &r, metric(), None, 0).resource;
        assert!(o.get("valueQuantity").is_none());
        assert_eq!(o["dataAbsentReason"]["coding"][0]["code"], "error");

        let mut r = spo2(None, Validity::Invalid);
        r.flags = vec![QualityFlag::SensorOff as i32];
        let o = map_observation(&DEV, &r, metric(), None, 0).resource;
        assert_eq!(o["dataAbsentReason"]["coding"][0]["code"], "unknown");
        assert!(
            o.as_object()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("value"))
        );

        let r = spo2(
            Some(reading::Value::Coded(CodedValue {
                system: "urn:x".into(),
                code: "a".into(),
                display: "A".into(),
            })),
            Validity::Valid,
        );
        let o = map_observation(&DEV, &r, metric(), None, 0).resource;
        assert_eq!(o["valueCodeableConcept"]["coding"][0]["code"], "a");
        assert!(o.get("dataAbsentReason").is_none());
    }

    #[test]
    fn profiles_and_categories_per_metric() {
        let r = Reading {
            validity: 1,
            value: Some(reading::Value::Numeric(1.0)),
            ..Default::default()
        };
        let profile_of = |mdc| {
            let m = CATALOGUE.by_mdc(mdc).unwrap();
            map_observation(&DEV, &r, m, Some("p-1"), 0).resource
        };
        let glu = profile_of(codes::CONC_GLU_CAPILLARY_WHOLEBLOOD);
        assert!(glu.get("meta").is_none());
        assert_eq!(glu["category"][0]["coding"][0]["code"], "laboratory");
        let pi = profile_of(codes::PULS_OXIM_PERF_REL);
        assert!(pi.get("meta").is_none());
        assert_eq!(pi["category"][0]["coding"][0]["code"], "vital-signs");
        let pr = profile_of(codes::PULS_OXIM_PULS_RATE);
        assert_eq!(
            pr["meta"]["profile"][1],
            "http://hl7.org/fhir/StructureDefinition/heartrate"
        );
        assert_eq!(pr["code"]["coding"][1]["code"], "8867-4");
        let sys = profile_of(codes::PRESS_BLD_NONINV_SYS);
        assert_eq!(sys["meta"]["profile"], json!([VITALSIGNS_PROFILE]));
    }

    #[test]
    fn profiles_are_claimed_only_when_met() {
        let m = CATALOGUE.by_mdc(codes::PULS_OXIM_SAT_O2).unwrap();
        let with = |value: Option<reading::Value>, patient: Option<&str>| {
            let r = Reading {
                validity: 1,
                value,
                ..Default::default()
            };
            map_observation(&DEV, &r, m, patient, 0).resource
        };
        let num = || Some(reading::Value::Numeric(97.0));
        let oxygensat = json!([
            VITALSIGNS_PROFILE,
            "http://hl7.org/fhir/StructureDefinition/oxygensat"
        ]);
        assert_eq!(with(num(), Some("p-1"))["meta"]["profile"], oxygensat);
        // Not (yet) attributed: vitalsigns requires a subject.
        assert!(with(num(), None).get("meta").is_none());
        // No value, with a reason: still met.
        assert_eq!(with(None, Some("p-1"))["meta"]["profile"], oxygensat);
        // A text value: oxygensat (and vitalsigns) take a Quantity only.
        let t = with(Some(reading::Value::Text("SENSOR OFF".into())), Some("p-1"));
        assert!(t.get("meta").is_none(), "{t}");
        // A unit outside the profile's: only what is met.
        let mut o = with(num(), Some("p-1")).as_object().unwrap().clone();
        o["valueQuantity"]["code"] = json!("mm[Hg]");
        assert_eq!(
            claimed_profiles(
                &o,
                Some("http://hl7.org/fhir/StructureDefinition/oxygensat")
            ),
            [VITALSIGNS_PROFILE]
        );
        o["valueQuantity"]["code"] = json!("kPa");
        assert!(claimed_profiles(&o, None).is_empty());
    }

    #[test]
    fn instants_format_with_z() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_instant(1_500_001), "1970-01-01T00:00:01.500001Z");
    }

    #[test]
    fn date_params_have_implicit_ranges() {
        let d = parse_date_param("2024").unwrap();
        assert_eq!(
            (d.prefix, d.start_us, d.end_us),
            (
                DatePrefix::Eq,
                us("2024-01-01T00:00:00Z"),
                us("2025-01-01T00:00:00Z")
            )
        );
        let d = parse_date_param("ge2024-02").unwrap();
        assert_eq!(
            (d.prefix, d.start_us, d.end_us),
            (
                DatePrefix::Ge,
                us("2024-02-01T00:00:00Z"),
                us("2024-03-01T00:00:00Z")
            )
        );
        let d = parse_date_param("le2024-12").unwrap();
        assert_eq!(d.end_us, us("2025-01-01T00:00:00Z"));
        assert_eq!(d.bounds(), (None, Some(us("2025-01-01T00:00:00Z"))));
        let d = parse_date_param("lt2024-02-29").unwrap();
        assert_eq!(d.bounds(), (None, Some(us("2024-02-29T00:00:00Z"))));
        let d = parse_date_param("gt2024-02-29").unwrap();
        assert_eq!(d.bounds(), (Some(us("2024-03-01T00:00:00Z")), None));
        let d = parse_date_param("eq2024-05-01T10:00:00+02:00").unwrap();
        assert_eq!(d.start_us, us("2024-05-01T08:00:00Z"));
        assert_eq!(d.end_us - d.start_us, 1_000_000);
        let d = parse_date_param("ge2024-05-01T10:00:00.25Z").unwrap();
        assert_eq!(d.start_us, us("2024-05-01T10:00:00.25Z"));
        assert_eq!(d.end_us - d.start_us, 10_000);
        let d = parse_date_param("sa2024-05-01T10:00Z").unwrap();
        assert_eq!(d.bounds(), (Some(us("2024-05-01T10:01:00Z")), None));
    }

    #[test]
    fn too_many_search_parameters_or_values_are_refused_naming_the_limit() {
        let many: Vec<(String, String)> = (0..1200)
            .map(|_| ("code".to_owned(), "8867-4".to_owned()))
            .collect();
        let e = parse_search(&many).unwrap_err();
        assert_eq!(e.code, "too-costly");
        assert!(
            e.diagnostics.contains("at most 32 search parameters"),
            "{e}"
        );
        assert!(e.diagnostics.contains("got 1200"), "{e}");
        let wide = vec![("code".to_owned(), vec!["8867-4"; 201].join(","))];
        let e = parse_search(&wide).unwrap_err();
        assert!(e.diagnostics.contains("at most 200 values"), "{e}");
        // At the limits: accepted.
        let ok: Vec<(String, String)> = (0..MAX_SEARCH_PARAMS)
            .map(|_| ("code".to_owned(), "8867-4".to_owned()))
            .collect();
        assert!(parse_search(&ok).is_ok());
        let ok = vec![("code".to_owned(), vec!["8867-4"; 200].join(","))];
        assert!(parse_search(&ok).is_ok());
        let e = parse_paging("Device", &many).unwrap_err();
        assert_eq!(e.code, "too-costly");
    }

    #[test]
    fn the_last_instant_of_year_9999_is_refused_not_a_panic() {
        for raw in [
            "le9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59.999999Z",
            "gt9999-12-31T23:59Z",
            "9999-12-31T23:59:59-14:00",
        ] {
            let _ = parse_date_param(raw);
        }
        assert!(parse_date_param("le9999-12-31T23:59:59Z").is_err());
        let p = parse_date_param("9999-12-31T23:59:58Z").unwrap();
        assert_eq!(p.end_us - p.start_us, 1_000_000);
        assert!(
            parse_date_param("9999-12-31").is_err(),
            "its end is year 10000"
        );
        assert!(parse_date_param("0000-01-01").is_ok());
    }

    proptest::proptest! {
        /// Any date, dateTime (every precision, every offset up to ±23:59)
        /// or prefix in the FHIR/RFC 3339 range, well formed or not, gives
        /// a value or an error: never a panic, and a value's range is
        /// ordered.
        #[test]
        fn any_fhir_date_parses_or_is_refused_without_panic(
            prefix in proptest::sample::select(vec!["", "eq", "lt", "le", "gt", "ge", "sa", "eb", "ne", "ap"]),
            // The range's ends weigh as much as all years between.
            year in proptest::prop_oneof![0u32..=1, 9998u32..=9999, 0u32..=9999],
            month in proptest::prop_oneof![0u32..=1, 12u32..=13, 0u32..=13],
            day in proptest::prop_oneof![30u32..=32, 0u32..=32],
            hour in proptest::prop_oneof![23u32..=24, 0u32..=24],
            minute in proptest::prop_oneof![59u32..=60, 0u32..=60],
            second in proptest::prop_oneof![58u32..=61, 0u32..=61],
            frac in proptest::option::of("[0-9]{1,7}"),
            tz in proptest::sample::select(vec!["Z", "+", "-", ""]),
            tzh in 0u32..=24,
            tzm in 0u32..=60,
            shape in 0u8..6,
        ) {
            let date = match shape {
                0 => format!("{year:04}"),
                1 => format!("{year:04}-{month:02}"),
                2 => format!("{year:04}-{month:02}-{day:02}"),
                3 => format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}"),
                _ => format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}"),
            };
            let mut raw = format!("{prefix}{date}");
            if shape >= 3 {
                if shape == 5 && let Some(f) = &frac {
                    raw.push('.');
                    raw.push_str(f);
                }
                raw.push_str(tz);
                if tz == "+" || tz == "-" {
                    raw.push_str(&format!("{tzh:02}:{tzm:02}"));
                }
            }
            if let Ok(p) = parse_date_param(&raw) {
                proptest::prop_assert!(p.start_us < p.end_us, "{raw}: {p:?}");
            }
        }

        /// Arbitrary text never panics the date parser.
        #[test]
        fn arbitrary_date_text_never_panics(raw in "\\PC{0,40}") {
            let _ = parse_date_param(&raw);
        }
    }

    #[test]
    fn malformed_dates_are_refused() {
        for bad in [
            "",
            "24",
            "2024-2",
            "2024-13",
            "2024-02-30",
            "2024-05-01T10:00:00",
            "2024-05-01T25:00Z",
            "xx2024",
            "2024-05-01T10:00:00.1234567Z",
            "2024-05-01-01",
        ] {
            let e = parse_date_param(bad).unwrap_err();
            assert_eq!(e.code, "invalid", "{bad}");
            assert!(e.diagnostics.contains("date"));
        }
        assert_eq!(
            parse_date_param("ne2024").unwrap_err().code,
            "not-supported"
        );
    }

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn search_codes_resolve_through_the_catalogue() {
        let m = |mdc, loinc| CodeMatch { mdc, loinc };
        // A LOINC code that every unit of a metric shares needs no LOINC
        // condition: the MDC code selects the same rows.
        let s = parse_search(&pairs(&[("code", "http://loinc.org|2708-6")])).unwrap();
        assert_eq!(s.codes, vec![vec![m(codes::PULS_OXIM_SAT_O2, None)]]);
        // A unit's own LOINC code selects that unit's observations only.
        let s = parse_search(&pairs(&[("code", "http://loinc.org|19888-7")])).unwrap();
        assert_eq!(
            s.codes,
            vec![vec![m(codes::CONC_AWAY_CO2_ET, Some("19888-7"))]]
        );
        let s = parse_search(&pairs(&[("code", "http://loinc.org|19891-1")])).unwrap();
        assert_eq!(
            s.codes,
            vec![vec![m(codes::CONC_AWAY_CO2_ET, Some("19891-1"))]]
        );
        let s = parse_search(&pairs(&[(
            "code",
            "8867-4,urn:iso:std:iso:11073:10101|150456",
        )]))
        .unwrap();
        // Every heart-rate metric of the catalogue (with its own stored
        // LOINC), plus the SpO2 MDC code: one OR-set.
        assert_eq!(s.codes.len(), 1);
        let set = &s.codes[0];
        for want in [
            m(codes::ECG_HEART_RATE, None),
            m(codes::PULS_OXIM_PULS_RATE, None),
            m(codes::PULS_OXIM_SAT_O2, None),
        ] {
            assert!(set.contains(&want), "{set:?} lacks {want:?}");
        }
        let hr_metrics = CATALOGUE.by_loinc("8867-4").count();
        assert_eq!(set.len(), hr_metrics + 1, "{set:?}");
        let s = parse_search(&pairs(&[("code", "http://snomed.info/sct|1234")])).unwrap();
        assert_eq!(s.codes, vec![Vec::<CodeMatch>::new()]);
    }

    #[test]
    fn patient_identifier_tokens_are_parsed() {
        let s = parse_search(&pairs(&[(
            "patient:identifier",
            "HOSP|123456,urn:vigil:authority:HOSP|7,|8,9",
        )]))
        .unwrap();
        let t = |system: Option<&str>, value: &str| IdentifierToken {
            system: system.map(str::to_owned),
            value: value.into(),
        };
        assert_eq!(
            s.patient_identifiers,
            vec![
                t(Some("HOSP"), "123456"),
                t(Some("urn:vigil:authority:HOSP"), "7"),
                t(Some(""), "8"),
                t(None, "9"),
            ]
        );
        assert!(s.patients.is_empty());
        let e = parse_search(&pairs(&[
            ("subject:identifier", "HOSP|1"),
            ("patient", "p-1"),
        ]))
        .unwrap_err();
        assert!(e.diagnostics.contains("once"), "{e}");
    }

    #[test]
    fn search_params_are_validated() {
        let s = parse_search(&pairs(&[
            ("patient", "Patient/p-1"),
            ("_count", "5000"),
            ("_sort", "-date"),
            ("_format", "json"),
        ]))
        .unwrap();
        assert_eq!(s.patients, vec!["p-1".to_owned()]);
        assert_eq!(s.count, MAX_COUNT);
        assert_eq!(s.sort, SortOrder::DateDesc);
        for (k, v) in [
            ("foo", "1"),
            ("_count", "-1"),
            ("_count", "ten"),
            ("_sort", "value"),
            ("patient", "Patient/a b"),
            ("date", "yesterday"),
            ("code", ""),
            ("code:text", "x"),
            ("patient:identifier", "HOSP|"),
            ("subject:missing", "true"),
        ] {
            let e = parse_search(&pairs(&[(k, v)])).unwrap_err();
            assert!(
                e.diagnostics.contains(k.split(':').next().unwrap()),
                "{k}={v}: {e}"
            );
        }
    }
}
