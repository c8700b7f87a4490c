//! Rendering stored rows as FHIR R4 resources, on read.
//!
//! The store keeps compact rows (indexed columns plus the source protobuf);
//! this module turns them into JSON: single-reading Observations (through
//! [`super::map_observation`]), blood-pressure panels (LOINC 85354-9 with
//! systolic/diastolic/mean components, per the FHIR R4 vital-signs `bp`
//! profile), waveforms as `valueSampledData`, and `Device` resources.

use prost::Message;
use ring::digest;
use serde_json::value::{RawValue, to_raw_value};
use serde_json::{Value as Json, json};
use shared_protocol::catalogue::codes;
use shared_protocol::v1::{DeviceData, Reading, Validity, Waveform, reading};
use shared_protocol::{CATALOGUE, Metric};

use super::doc::Part;
use super::{
    DeviceRef, LOINC_SYSTEM, MDC_SYSTEM, UCUM_SYSTEM, absent_reason, format_instant,
    quality_extension, subject_json, time_source_code,
};

/// The FHIR R4 blood-pressure profile.
pub const BP_PROFILE: &str = "http://hl7.org/fhir/StructureDefinition/bp";
/// LOINC "Blood pressure panel with all children optional" (the vital-signs
/// BP panel code).
pub const BP_PANEL_LOINC: &str = "85354-9";
const BP_PANEL_DISPLAY: &str = "Blood pressure panel with all children optional";

/// A blood-pressure family: the MDC code of the panel and of its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpFamily {
    /// IEEE 11073-10101 compound code (e.g. MDC_PRESS_BLD_NONINV, 150020).
    pub mdc: u32,
    pub mdc_name: &'static str,
    pub systolic: u32,
    pub diastolic: u32,
    pub mean: u32,
}

/// Blood-pressure families the hub groups into panels. MDC term codes from
/// IEEE 11073-10101 (partition 2): the compound code is the systolic code − 1.
pub const BP_FAMILIES: &[BpFamily] = &[BpFamily {
    mdc: codes::PRESS_BLD_NONINV_SYS - 1,
    mdc_name: "MDC_PRESS_BLD_NONINV",
    systolic: codes::PRESS_BLD_NONINV_SYS,
    diastolic: codes::PRESS_BLD_NONINV_DIA,
    mean: codes::PRESS_BLD_NONINV_MEAN,
}];

/// The BP family a metric code belongs to, if any.
pub fn bp_family_of(mdc: u32) -> Option<&'static BpFamily> {
    BP_FAMILIES
        .iter()
        .find(|f| mdc == f.systolic || mdc == f.diastolic || mdc == f.mean)
}

/// What groups blood-pressure parts into one panel: the family, the
/// effective time, and the patient identifier the reading carried (system,
/// value). Parts naming different patients — e.g. two HL7 senders through
/// one listener in the same second — are never put in one panel.
pub type BpKey = (u32, i64, Option<(String, String)>);

/// The panel key of a BP part.
pub fn bp_key(family: &BpFamily, effective_us: i64, r: &Reading) -> BpKey {
    (
        family.mdc,
        effective_us,
        r.subject
            .as_ref()
            .map(|s| (s.system.clone(), s.value.clone())),
    )
}

/// The BP family whose panel (compound) code is `mdc`.
pub fn bp_family(mdc: u32) -> Option<&'static BpFamily> {
    BP_FAMILIES.iter().find(|f| f.mdc == mdc)
}

fn hashed_id(kind: &str, parts: &[&str]) -> String {
    let mut canonical = String::from(kind);
    for p in parts {
        canonical.push('\n');
        canonical.push_str(p);
    }
    let d = digest::digest(&digest::SHA256, canonical.as_bytes());
    hex::encode(&d.as_ref()[..16])
}

/// Deterministic id of the BP panel whose systolic reading is `sequence`.
pub fn panel_id(gateway_id: &str, device_id: &str, systolic_sequence: u64) -> String {
    panel_id_in(gateway_id, device_id, 0, systolic_sequence)
}

/// [`panel_id`] within buffer incarnation `incarnation` (0: exactly
/// [`panel_id`]'s ids).
pub fn panel_id_in(
    gateway_id: &str,
    device_id: &str,
    incarnation: u64,
    systolic_sequence: u64,
) -> String {
    let seq = systolic_sequence.to_string();
    if incarnation == 0 {
        hashed_id("vigil-bp-panel", &[gateway_id, device_id, &seq])
    } else {
        let inc = incarnation.to_string();
        hashed_id("vigil-bp-panel", &[gateway_id, device_id, &seq, &inc])
    }
}

/// Deterministic FHIR id of a device (gateway, gateway-local device id).
pub fn device_resource_id(gateway_id: &str, device_id: &str) -> String {
    hashed_id("vigil-device", &[gateway_id, device_id])
}

/// What a stored observation row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    Reading,
    BpPanel,
    Waveform,
}

impl RowKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Reading => "reading",
            RowKind::BpPanel => "bp-panel",
            RowKind::Waveform => "waveform",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reading" => RowKind::Reading,
            "bp-panel" => RowKind::BpPanel,
            "waveform" => RowKind::Waveform,
            _ => return None,
        })
    }
}

/// A stored observation row, as the store hands it to the renderer.
#[derive(Debug, Clone, Default)]
pub struct ObservationRow {
    pub id: String,
    pub kind: String,
    pub gateway_id: String,
    pub device_id: String,
    pub patient_id: Option<String>,
    /// The patient identifier's system, when known.
    pub patient_system: Option<String>,
    pub received_us: i64,
    /// The source protobuf (None for rows written before schema v4).
    pub payload: Option<Vec<u8>>,
    /// JSON stored by builds before schema v4 (empty for newer rows).
    pub resource: String,
    pub manufacturer: String,
    pub model: String,
    pub serial_number: String,
    /// The row's version: 1 when stored, one more each time a placement or
    /// stay change re-attributes it (`meta.versionId`).
    pub version: i64,
    /// When it was stored or last re-attributed (`meta.lastUpdated`).
    pub updated_us: i64,
}

/// A row that cannot be rendered (corrupt or unknown content).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("stored payload of observation {id} does not decode: {source}")]
    Decode {
        id: String,
        source: prost::DecodeError,
    },
    #[error("stored JSON of observation {id} does not parse: {source}")]
    Json {
        id: String,
        source: serde_json::Error,
    },
    #[error("observation {id} has no payload and no stored resource")]
    Empty { id: String },
    #[error("observation {id} is of unknown kind `{kind}`")]
    UnknownKind { id: String, kind: String },
    #[error("observation {id} names MDC code {mdc}, which is not in the catalogue")]
    UnknownMetric { id: String, mdc: u32 },
}

/// The catalogue metric (in the reading's unit) a stored reading was
/// validated against at ingest.
pub fn metric_of(r: &Reading) -> Option<Metric> {
    let m = CATALOGUE.by_mdc(r.mdc_code)?;
    Some(m.in_unit(r.mdc_unit, &r.ucum_unit).unwrap_or(*m))
}

impl ObservationRow {
    fn device_ref(&self) -> DeviceRef<'_> {
        DeviceRef {
            gateway_id: &self.gateway_id,
            device_id: &self.device_id,
            manufacturer: &self.manufacturer,
            model: &self.model,
            serial_number: &self.serial_number,
        }
    }

    fn decode<M: Message + Default>(&self) -> Result<M, RenderError> {
        let bytes = self.payload.as_deref().ok_or_else(|| RenderError::Empty {
            id: self.id.clone(),
        })?;
        M::decode(bytes).map_err(|source| RenderError::Decode {
            id: self.id.clone(),
            source,
        })
    }
}

/// Renders a stored row as a FHIR R4 Observation.
pub fn render_observation(row: &ObservationRow) -> Result<Json, RenderError> {
    let mut resource = render_payload(row)?;
    if is_stored_reading(row) {
        // Its document already carries the row's subject system and version.
        return Ok(resource);
    }
    complete_subject(&mut resource, row);
    if row.payload.is_none() {
        recheck_profiles(&mut resource);
    }
    set_version(&mut resource, row);
    Ok(resource)
}

/// Writes a stored row as a FHIR R4 Observation, as JSON, to `out`: the
/// same bytes as serializing [`render_observation`]'s value.
/// A reading row (the API's common case) is serialized straight from its
/// typed document, without a `Value` tree.
///
/// One row has nothing to share with another: its document is serialized
/// as built, without [`ObservationWriter`]'s memos.
pub fn write_observation(row: &ObservationRow, out: &mut Vec<u8>) -> Result<(), RenderError> {
    if !is_stored_reading(row) {
        return write_value(row, out);
    }
    let parts = super::doc::DeviceParts::of(&row.device_ref());
    reading_resource(row, parts, |obs, _| obs.write_json(out))
}

/// A row that is not a stored reading (a panel, a waveform, a stored
/// resource), through its `Value`.
fn write_value(row: &ObservationRow, out: &mut Vec<u8>) -> Result<(), RenderError> {
    let resource = render_observation(row)?;
    serde_json::to_writer(out, &resource).map_err(|e| json_error(row, e))
}

fn json_error(row: &ObservationRow, source: serde_json::Error) -> RenderError {
    RenderError::Json {
        id: row.id.clone(),
        source,
    }
}

/// Writes the rows of a page one after the other ([`write_observation`]'s
/// bytes for each). What depends on a row's device alone (its Device id is
/// a SHA-256; its `device` element) is worked out and serialized once for
/// a run of rows from one device, and the `category` and `code` elements
/// (a good third of an Observation's text, every character of which the
/// JSON writer checks for escapes) once for a run of rows of one metric: a
/// search page is mostly one patient's one code, from one device.
#[derive(Debug, Default)]
pub struct ObservationWriter {
    device: Option<DeviceMemo>,
    code: Option<CodeMemo>,
}

/// The last device's columns, its parts and its `device` element.
#[derive(Debug)]
struct DeviceMemo {
    columns: [String; 5],
    parts: super::doc::DeviceParts<'static>,
    element: Box<RawValue>,
}

/// The last metric's `category` and `code` elements.
#[derive(Debug)]
struct CodeMemo {
    metric: CodeKey,
    category: Box<RawValue>,
    code: Box<RawValue>,
}

/// What a reading's `category` and `code` elements are made of: its
/// metric's codes and names (`fhir::category` follows from the LOINC code).
#[derive(Debug, Clone, Copy, PartialEq)]
struct CodeKey {
    mdc: u32,
    mdc_name: &'static str,
    loinc: &'static str,
    loinc_display: &'static str,
    loinc_profile: Option<&'static str>,
    display: &'static str,
}

impl CodeKey {
    fn of(m: &Metric) -> Self {
        CodeKey {
            mdc: m.mdc,
            mdc_name: m.mdc_name,
            loinc: m.loinc,
            loinc_display: m.loinc_display,
            loinc_profile: m.loinc_profile,
            display: m.display,
        }
    }
}

impl ObservationWriter {
    pub fn write(&mut self, row: &ObservationRow, out: &mut Vec<u8>) -> Result<(), RenderError> {
        let json_error = |e| json_error(row, e);
        if !is_stored_reading(row) {
            return write_value(row, out);
        }
        let device = Self::device(&mut self.device, row).map_err(json_error)?;
        let memo = &mut self.code;
        reading_resource(row, device.parts.borrowed(), |obs, metric| {
            let key = CodeKey::of(metric);
            let current = match memo.take() {
                Some(m) if m.metric == key => m,
                _ => CodeMemo {
                    metric: key,
                    category: to_raw_value(&obs.category).map_err(json_error)?,
                    code: to_raw_value(&obs.code).map_err(json_error)?,
                },
            };
            let codes = memo.insert(current);
            let obs = super::doc::ReadingObservation {
                category: Part::Written(&codes.category),
                code: Part::Written(&codes.code),
                device: Part::Written(&device.element),
                ..obs
            };
            obs.write_json(out);
            Ok(())
        })?
    }

    /// The memo of `row`'s device, worked out anew when the last row's
    /// device differs.
    fn device<'m>(
        memo: &'m mut Option<DeviceMemo>,
        row: &ObservationRow,
    ) -> Result<&'m DeviceMemo, serde_json::Error> {
        let columns = [
            &row.gateway_id,
            &row.device_id,
            &row.manufacturer,
            &row.model,
            &row.serial_number,
        ];
        let same = |k: &[String; 5]| k.iter().zip(columns).all(|(a, b)| a == b);
        let current = match memo.take() {
            Some(m) if same(&m.columns) => m,
            _ => {
                let parts = super::doc::DeviceParts::of(&row.device_ref()).into_owned();
                DeviceMemo {
                    columns: columns.map(String::clone),
                    element: to_raw_value(&parts.doc)?,
                    parts,
                }
            }
        };
        Ok(memo.insert(current))
    }
}

/// A single reading stored with its payload: rendered from its typed
/// document (`doc.rs`), completed there.
fn is_stored_reading(row: &ObservationRow) -> bool {
    row.payload.is_some() && RowKind::parse(&row.kind) == Some(RowKind::Reading)
}

/// The Observation of a stored reading row as the row holds it now (its
/// stored id, the patient identifier's system, the version), handed to `f`.
fn reading_resource<T>(
    row: &ObservationRow,
    parts: super::doc::DeviceParts<'_>,
    f: impl FnOnce(super::doc::ReadingObservation<'_>, &Metric) -> T,
) -> Result<T, RenderError> {
    let r: Reading = row.decode()?;
    let metric = metric_of(&r).ok_or_else(|| RenderError::UnknownMetric {
        id: row.id.clone(),
        mdc: r.mdc_code,
    })?;
    let device = row.device_ref();
    let mut obs = super::doc::reading_observation(
        &device,
        parts,
        &r,
        &metric,
        row.patient_id.as_deref(),
        row.received_us,
        Some(&row.id),
    );
    obs.complete(
        row.patient_id.as_deref().zip(row.patient_system.as_deref()),
        row.version,
        row.updated_us.max(row.received_us),
    );
    Ok(f(obs, &metric))
}

/// `meta.versionId` and `meta.lastUpdated`: a re-attributed reading (moved
/// to another patient) is a new version of its Observation.
fn set_version(resource: &mut Json, row: &ObservationRow) {
    let Some(obs) = resource.as_object_mut() else {
        return;
    };
    let meta = obs
        .entry("meta")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(meta) = meta {
        meta.insert("versionId".into(), json!(row.version.max(1).to_string()));
        meta.insert(
            "lastUpdated".into(),
            json!(format_instant(row.updated_us.max(row.received_us))),
        );
    }
}

/// A resource stored as JSON by an old build keeps only the profiles it
/// meets as served now (e.g. none while it has no subject).
fn recheck_profiles(resource: &mut Json) {
    let Some(obs) = resource.as_object_mut() else {
        return;
    };
    let Some(claimed) = obs.get("meta").and_then(|m| m["profile"].as_array()) else {
        return;
    };
    let specific = claimed.iter().filter_map(Json::as_str).find_map(|p| {
        super::SPECIFIC_PROFILES
            .iter()
            .map(|(url, _, _)| *url)
            .find(|url| *url == p)
    });
    let profiles = super::claimed_profiles(obs, specific);
    if profiles.is_empty() {
        obs.remove("meta");
    } else {
        obs.insert("meta".into(), json!({ "profile": profiles }));
    }
}

fn render_payload(row: &ObservationRow) -> Result<Json, RenderError> {
    if row.payload.is_none() {
        if row.resource.is_empty() {
            return Err(RenderError::Empty { id: row.id.clone() });
        }
        return serde_json::from_str(&row.resource).map_err(|e| json_error(row, e));
    }
    match RowKind::parse(&row.kind) {
        Some(RowKind::Reading) => reading_resource(
            row,
            super::doc::DeviceParts::of(&row.device_ref()),
            |obs, _| serde_json::to_value(&obs).map_err(|e| json_error(row, e)),
        )?,
        Some(RowKind::BpPanel) => {
            let members: DeviceData = row.decode()?;
            Ok(render_bp_panel(row, &members.readings))
        }
        Some(RowKind::Waveform) => {
            let w: Waveform = row.decode()?;
            Ok(render_waveform(row, &w))
        }
        None => Err(RenderError::UnknownKind {
            id: row.id.clone(),
            kind: row.kind.clone(),
        }),
    }
}

/// `Observation.device`: a reference to the Device resource plus its
/// identifier and a display name.
pub fn device_json(device: &DeviceRef<'_>) -> Json {
    serde_json::to_value(super::doc::device(device)).unwrap_or_default()
}

/// The identifier system of a gateway's devices.
pub fn device_identifier_system(gateway_id: &str) -> String {
    format!("urn:vigil:gateway:{gateway_id}:device")
}

fn status_of(validity: i32) -> &'static str {
    match Validity::try_from(validity).unwrap_or(Validity::Unspecified) {
        Validity::Valid | Validity::Invalid => "final",
        _ => "preliminary",
    }
}

/// A BP panel (85354-9) whose components are the member readings; a
/// component whose value is missing, invalid or impossible carries a
/// `dataAbsentReason` instead of a value, as in single Observations. The
/// `bp` profile is claimed only when every component is in mm[Hg] (the
/// profile fixes that unit).
pub fn render_bp_panel(row: &ObservationRow, members: &[Reading]) -> Json {
    let family = members.iter().find_map(|r| bp_family_of(r.mdc_code));
    let first = members.first();
    let effective_us = first.map(Reading::effective_time_us).unwrap_or_default();
    let status = if members.iter().all(|r| status_of(r.validity) == "final") {
        "final"
    } else {
        "preliminary"
    };
    let mut components = Vec::new();
    let mut all_mmhg = true;
    // Systolic, diastolic, mean: the profile's order.
    let mut ordered: Vec<&Reading> = members.iter().collect();
    if let Some(f) = family {
        ordered.sort_by_key(|r| {
            [f.systolic, f.diastolic, f.mean]
                .iter()
                .position(|c| *c == r.mdc_code)
        });
    }
    for r in ordered {
        let Some(metric) = metric_of(r) else { continue };
        all_mmhg &= metric.unit.ucum == "mm[Hg]";
        let mut c = serde_json::Map::new();
        c.insert(
            "code".into(),
            json!({ "coding": [
                { "system": LOINC_SYSTEM, "code": metric.loinc, "display": metric.loinc_display },
                { "system": MDC_SYSTEM, "code": metric.mdc.to_string(), "display": metric.mdc_name },
            ], "text": metric.display }),
        );
        let (value, ext) = component_value(r, &metric);
        match value {
            ComponentValue::Quantity(q) => {
                c.insert("valueQuantity".into(), q);
            }
            ComponentValue::Absent(reason) => {
                c.insert("dataAbsentReason".into(), reason);
            }
        }
        if let Some(i) = super::interpretation_json(r) {
            c.insert("interpretation".into(), i);
        }
        c.insert("extension".into(), json!([ext]));
        components.push(Json::Object(c));
    }
    let mut obs = serde_json::Map::new();
    obs.insert("resourceType".into(), json!("Observation"));
    obs.insert("id".into(), json!(row.id));
    let mut identifiers = Vec::new();
    for r in members {
        identifiers.push(json!({
            "system": format!("urn:vigil:reading:{}:{}", row.gateway_id, row.device_id),
            "value": r.sequence.to_string(),
        }));
    }
    obs.insert("identifier".into(), Json::Array(identifiers));
    obs.insert("status".into(), json!(status));
    obs.insert(
        "category".into(),
        json!([{ "coding": [{ "system": super::CATEGORY_SYSTEM, "code": "vital-signs",
                              "display": "Vital Signs" }], "text": "Vital Signs" }]),
    );
    let mut coding = vec![json!({ "system": LOINC_SYSTEM, "code": BP_PANEL_LOINC,
                                  "display": BP_PANEL_DISPLAY })];
    if let Some(f) = family {
        coding.push(
            json!({ "system": MDC_SYSTEM, "code": f.mdc.to_string(), "display": f.mdc_name }),
        );
    }
    obs.insert(
        "code".into(),
        json!({ "coding": coding, "text": "Blood pressure" }),
    );
    if let (Some(p), Some(r)) = (row.patient_id.as_deref(), first) {
        obs.insert("subject".into(), subject_json(p, r));
    }
    obs.insert(
        "effectiveDateTime".into(),
        json!(format_instant(effective_us)),
    );
    let issued = first
        .map(|r| r.gateway_time_us)
        .filter(|t| *t != 0)
        .unwrap_or(row.received_us);
    obs.insert("issued".into(), json!(format_instant(issued)));
    if let Some(r) = first {
        obs.insert(
            "extension".into(),
            json!([{ "url": super::TIME_SOURCE_EXT, "valueCode": time_source_code(r.time_source) }]),
        );
    }
    obs.insert("device".into(), device_json(&row.device_ref()));
    obs.insert("component".into(), Json::Array(components));
    // `bp` needs every component in mm[Hg]; both need a subject.
    let profiles = super::claimed_profiles(&obs, all_mmhg.then_some(BP_PROFILE));
    if !profiles.is_empty() {
        obs.insert("meta".into(), json!({ "profile": profiles }));
    }
    Json::Object(obs)
}

enum ComponentValue {
    Quantity(Json),
    Absent(Json),
}

fn component_value(r: &Reading, metric: &Metric) -> (ComponentValue, Json) {
    let validity = Validity::try_from(r.validity).unwrap_or(Validity::Unspecified);
    let numeric = match &r.value {
        Some(reading::Value::Numeric(v)) => Some(*v),
        _ => None,
    };
    let out_of_range =
        numeric.is_some_and(|v| v < metric.possible_range.0 || v > metric.possible_range.1);
    let ext = quality_extension(r, metric, out_of_range, validity == Validity::Invalid);
    let value = match numeric {
        None => ComponentValue::Absent(absent_reason("unknown", "Unknown")),
        Some(_) if validity == Validity::Invalid || out_of_range => {
            ComponentValue::Absent(absent_reason("error", "Error"))
        }
        Some(n) => ComponentValue::Quantity(json!({
            "value": n, "unit": metric.unit.display, "system": UCUM_SYSTEM, "code": metric.unit.ucum,
        })),
    };
    (value, ext)
}

/// A waveform as an Observation with `valueSampledData`: physical value =
/// origin + factor × sample (the waveform's offset and scale), `period` in
/// milliseconds, one dimension; `effectivePeriod` spans the samples.
pub fn render_waveform(row: &ObservationRow, w: &Waveform) -> Json {
    let n = w.samples.len() as i64;
    let end_us = w
        .start_time_us
        .saturating_add(i64::from(w.sample_period_us).saturating_mul(n.max(1) - 1));
    let mut obs = serde_json::Map::new();
    obs.insert("resourceType".into(), json!("Observation"));
    obs.insert("id".into(), json!(row.id));
    obs.insert(
        "identifier".into(),
        json!([{ "system": format!("urn:vigil:reading:{}:{}", row.gateway_id, row.device_id),
                  "value": w.sequence.to_string() }]),
    );
    obs.insert("status".into(), json!(status_of(w.validity)));
    let text = if w.vendor_label.is_empty() {
        format!("Waveform (MDC {})", w.mdc_code)
    } else {
        w.vendor_label.clone()
    };
    obs.insert(
        "code".into(),
        json!({ "coding": [{ "system": MDC_SYSTEM, "code": w.mdc_code.to_string() }], "text": text }),
    );
    if let Some(p) = row.patient_id.as_deref() {
        obs.insert(
            "subject".into(),
            json!({ "reference": format!("Patient/{p}") }),
        );
    }
    obs.insert(
        "effectivePeriod".into(),
        json!({ "start": format_instant(w.start_time_us), "end": format_instant(end_us) }),
    );
    obs.insert("issued".into(), json!(format_instant(row.received_us)));
    let unit = if w.ucum_unit.is_empty() {
        CATALOGUE
            .unit_by_mdc(w.mdc_unit)
            .map(|u| u.ucum.to_owned())
            .unwrap_or_default()
    } else {
        w.ucum_unit.clone()
    };
    let mut origin = json!({ "value": w.offset });
    if !unit.is_empty() {
        origin["system"] = json!(UCUM_SYSTEM);
        origin["code"] = json!(unit);
        origin["unit"] = json!(unit);
    }
    let data: Vec<String> = w.samples.iter().map(i32::to_string).collect();
    let mut sd = json!({
        "origin": origin,
        "period": f64::from(w.sample_period_us) / 1000.0,
        "factor": w.scale,
        "dimensions": 1,
    });
    if !data.is_empty() {
        sd["data"] = json!(data.join(" "));
    }
    obs.insert("valueSampledData".into(), sd);
    let mut quality =
        vec![json!({ "url": "validity", "valueCode": super::validity_code(w.validity) })];
    for f in &w.flags {
        if let Some(code) = super::flag_code(*f) {
            quality.push(json!({ "url": "flag", "valueCode": code }));
        }
    }
    obs.insert(
        "extension".into(),
        json!([
            { "url": super::QUALITY_EXT, "extension": quality },
            { "url": super::TIME_SOURCE_EXT, "valueCode": time_source_code(w.time_source) },
        ]),
    );
    obs.insert("device".into(), device_json(&row.device_ref()));
    Json::Object(obs)
}

/// A stored device, as `GET /fhir/Device/{id}` shows it.
#[derive(Debug, Clone, Default)]
pub struct DeviceRow {
    pub gateway_id: String,
    pub device_id: String,
    pub protocol: String,
    pub manufacturer: String,
    pub model: String,
    pub serial_number: String,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
}

/// A FHIR R4 Device: identifier (gateway-scoped device id), manufacturer,
/// model, serial number, and the gateway's protocol name as the type text.
/// The gateway's bed label is not copied (beds are Locations).
pub fn render_device(d: &DeviceRow) -> Json {
    let mut dev = serde_json::Map::new();
    dev.insert("resourceType".into(), json!("Device"));
    dev.insert(
        "id".into(),
        json!(device_resource_id(&d.gateway_id, &d.device_id)),
    );
    dev.insert(
        "identifier".into(),
        json!([{ "system": device_identifier_system(&d.gateway_id), "value": d.device_id }]),
    );
    dev.insert("status".into(), json!("active"));
    if !d.manufacturer.is_empty() {
        dev.insert("manufacturer".into(), json!(d.manufacturer));
    }
    if !d.serial_number.is_empty() {
        dev.insert("serialNumber".into(), json!(d.serial_number));
    }
    if !d.model.is_empty() {
        dev.insert(
            "deviceName".into(),
            json!([{ "name": d.model, "type": "model-name" }]),
        );
        dev.insert("modelNumber".into(), json!(d.model));
    }
    if !d.protocol.is_empty() {
        dev.insert("type".into(), json!({ "text": d.protocol }));
    }
    Json::Object(dev)
}

/// A Patient as the hub knows one: an identifier, nothing else (no names:
/// PHI minimisation). `id` is the identifier's value (what Observation
/// `subject` references and `patient=` searches use).
pub fn render_patient(id: &str, system: Option<&str>) -> Json {
    let mut ident = serde_json::Map::new();
    if let Some(s) = system.filter(|s| !s.is_empty()) {
        ident.insert("system".into(), json!(s));
    }
    ident.insert("value".into(), json!(id));
    json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [Json::Object(ident)],
    })
}

/// The FHIR id of a bed's Location: the bed id when it is a valid FHIR id,
/// else a hash of it (bed ids may contain `_`).
pub fn location_id(bed_id: &str) -> String {
    if super::is_valid_id(bed_id) {
        bed_id.to_owned()
    } else {
        hashed_id("vigil-location", &[bed_id])
    }
}

/// A bed as a FHIR Location (physical type "bd"), with its ward in the
/// description and the bed id as identifier.
pub fn render_location(bed_id: &str, ward: &str, label: &str) -> Json {
    json!({
        "resourceType": "Location",
        "id": location_id(bed_id),
        "identifier": [{ "system": "urn:vigil:bed", "value": bed_id }],
        "status": "active",
        "name": if label.is_empty() { bed_id } else { label },
        "description": format!("{ward} / {}", if label.is_empty() { bed_id } else { label }),
        "mode": "instance",
        "physicalType": { "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/location-physical-type",
            "code": "bd", "display": "Bed" }] },
    })
}

/// Adds the patient identifier to `subject` when the row knows its system
/// and the subject has no identifier yet; an identifier of the row's
/// patient takes the row's system (the stored system is the mapped URI,
/// `crate::identifiers`, also for payloads stored with an HL7 authority
/// before the mapping and migrated since).
fn complete_subject(resource: &mut Json, row: &ObservationRow) {
    let (Some(p), Some(system)) = (row.patient_id.as_deref(), row.patient_system.as_deref()) else {
        return;
    };
    let Some(subject) = resource.get_mut("subject").and_then(Json::as_object_mut) else {
        return;
    };
    if let Some(ident) = subject.get_mut("identifier").and_then(Json::as_object_mut) {
        if !system.is_empty() && ident.get("value").and_then(Json::as_str) == Some(p) {
            ident.insert("system".into(), json!(system));
        }
        return;
    }
    let mut ident = serde_json::Map::new();
    if !system.is_empty() {
        ident.insert("system".into(), json!(system));
    }
    ident.insert("value".into(), json!(p));
    subject.insert("identifier".into(), Json::Object(ident));
}

/// A patient's current NEWS2 as a FHIR Observation (computed on request,
/// not stored: no `id`). The code is text only: no LOINC code for NEWS2
/// could be verified for this build. `valueInteger` is the total, one
/// component per chart parameter holds its score, `interpretation` the
/// clinical-risk band, and `derivedFrom` the readings scored. None when
/// NEWS2 could not be computed.
pub fn render_news2(report: &crate::early_warning::ScoreReport) -> Option<Json> {
    use crate::early_warning::{Source, band, news2_components};
    let n = report.news2?;
    let subject = if super::is_valid_id(&report.patient) {
        json!({ "reference": format!("Patient/{}", report.patient) })
    } else {
        json!({ "identifier": { "value": report.patient } })
    };
    let components: Vec<Json> = news2_components(&n)
        .iter()
        .map(|(p, score)| {
            json!({
                "code": { "text": format!("NEWS2 {} score", p.display()) },
                "valueInteger": score,
            })
        })
        .collect();
    let derived: Vec<Json> = report
        .used
        .iter()
        .filter_map(|i| match &i.source {
            Source::Observation(id) if super::is_valid_id(id) => {
                Some(json!({ "reference": format!("Observation/{id}") }))
            }
            _ => None,
        })
        .collect();
    let mut obs = json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "survey", "display": "Survey" }] }],
        "code": { "text": "National Early Warning Score 2 (NEWS2)" },
        "subject": subject,
        "issued": format_instant(report.computed_at_us),
        "valueInteger": n.total,
        "interpretation": [{ "text": format!("NEWS2 clinical risk: {}", band(n.risk)) }],
        "component": components,
    });
    if let Some(t) = report.newest_input_us() {
        obs["effectiveDateTime"] = json!(format_instant(t));
    }
    if !derived.is_empty() {
        obs["derivedFrom"] = Json::Array(derived);
    }
    Some(obs)
}
