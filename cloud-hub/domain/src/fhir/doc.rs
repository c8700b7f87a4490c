//! The Observation of one reading as a typed document: built once from the
//! reading, then either serialized straight into a response buffer (the
//! API's hot path: no `serde_json::Value` tree, no key maps to build and
//! drop) or turned into a `Value` for the callers that edit JSON.
//!
//! Fields are declared in the byte order of their JSON names, so the
//! output is identical to serializing the equivalent `Value` (whose object
//! keys are sorted); `golden.rs` holds that to blessed bytes.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::value::RawValue;
use shared_protocol::Metric;
use shared_protocol::v1::{CodedValue, Interpretation, Reading, Validity, reading};

use super::{
    ABSENT_SYSTEM, CATEGORY_SYSTEM, DeviceRef, INTERPRETATION_SYSTEM, LOINC_SYSTEM, MDC_SYSTEM,
    ProfileFacts, QUALITY_EXT, QuantityFacts, TIME_SOURCE_EXT, UCUM_SYSTEM, ValueFacts, category,
    columns, flag_code, format_instant, is_valid_id, observation_id, profile_loinc_display,
    profiles_of, time_source_code, validity_code, vital_profile,
};

/// An element of the document: built for this row, or the same element
/// already serialized for an earlier row of the page and written as those
/// bytes (see `render::ObservationWriter`). Serialized, both are the same
/// JSON.
#[derive(Debug, Clone)]
pub(crate) enum Part<'a, T> {
    Built(T),
    Written(&'a RawValue),
}

impl<T> Part<'_, T> {
    /// The element when it was built for this row.
    pub(crate) fn built(&self) -> Option<&T> {
        match self {
            Part::Built(v) => Some(v),
            Part::Written(_) => None,
        }
    }
}

impl<T: Serialize> Serialize for Part<'_, T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Part::Built(v) => v.serialize(s),
            Part::Written(json) => json.serialize(s),
        }
    }
}

/// An instant of the document (UTC µs), written as [`format_instant`]
/// writes it: formatted while the document is written, into its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Instant(pub i64);

impl Serialize for Instant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_instant(self.0))
    }
}

fn none<T>(v: &Option<T>) -> bool {
    v.is_none()
}

fn no_profiles(v: &[&'static str]) -> bool {
    v.is_empty()
}

/// A Coding: `system` and `display` are left out when empty.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Coding<'a> {
    pub code: CodeText<'a>,
    #[serde(skip_serializing_if = "none")]
    pub display: Option<&'a str>,
    #[serde(skip_serializing_if = "none")]
    pub system: Option<&'a str>,
}

/// A code that is either text already held or a number written as text
/// (the MDC code).
#[derive(Debug, Clone, Copy)]
pub(crate) enum CodeText<'a> {
    Str(&'a str),
    Number(u32),
}

impl Serialize for CodeText<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            CodeText::Str(v) => s.serialize_str(v),
            CodeText::Number(n) => s.collect_str(n),
        }
    }
}

impl<'a> Coding<'a> {
    fn new(system: &'a str, code: &'a str, display: Option<&'a str>) -> Self {
        Coding {
            code: CodeText::Str(code),
            display,
            system: Some(system),
        }
    }

    /// A coding as the device sent it.
    fn sent(c: &'a CodedValue) -> Self {
        Coding {
            code: CodeText::Str(&c.code),
            display: Some(c.display.as_str()).filter(|d| !d.is_empty()),
            system: Some(c.system.as_str()).filter(|s| !s.is_empty()),
        }
    }
}

/// A CodeableConcept of up to three codings.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Concept<'a> {
    pub coding: Vec<Coding<'a>>,
    #[serde(skip_serializing_if = "none")]
    pub text: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Quantity<'a> {
    pub code: &'a str,
    pub system: &'static str,
    pub unit: &'a str,
    pub value: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SystemValue<'a> {
    #[serde(skip_serializing_if = "none")]
    pub system: Option<Cow<'a, str>>,
    pub value: Cow<'a, str>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Subject<'a> {
    #[serde(skip_serializing_if = "none")]
    pub identifier: Option<SystemValue<'a>>,
    #[serde(skip_serializing_if = "none")]
    pub reference: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeviceDoc<'a> {
    #[serde(skip_serializing_if = "none")]
    pub display: Option<Cow<'a, str>>,
    pub identifier: SystemValue<'a>,
    pub reference: Cow<'a, str>,
}

impl DeviceDoc<'_> {
    fn borrowed(&self) -> DeviceDoc<'_> {
        DeviceDoc {
            display: self.display.as_deref().map(Cow::Borrowed),
            identifier: SystemValue {
                system: self.identifier.system.as_deref().map(Cow::Borrowed),
                value: Cow::Borrowed(&self.identifier.value),
            },
            reference: Cow::Borrowed(&self.reference),
        }
    }
}

/// What the Observation of a reading takes from its device alone: the
/// `device` element (whose Device id is a SHA-256) and the system of the
/// reading's identifier. Worked out once per device, so the rows of a
/// page from one device share it.
#[derive(Debug, Clone)]
pub(crate) struct DeviceParts<'a> {
    pub doc: DeviceDoc<'a>,
    pub reading_system: Cow<'a, str>,
}

impl<'a> DeviceParts<'a> {
    pub(crate) fn of(device: &DeviceRef<'a>) -> Self {
        DeviceParts {
            doc: self::device(device),
            reading_system: format!(
                "urn:vigil:reading:{}:{}",
                device.gateway_id, device.device_id
            )
            .into(),
        }
    }

    pub(crate) fn borrowed(&self) -> DeviceParts<'_> {
        DeviceParts {
            doc: self.doc.borrowed(),
            reading_system: Cow::Borrowed(&self.reading_system),
        }
    }

    /// The same parts owning their text.
    pub(crate) fn into_owned(self) -> DeviceParts<'static> {
        let owned = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        DeviceParts {
            doc: DeviceDoc {
                display: self.doc.display.map(owned),
                identifier: SystemValue {
                    system: self.doc.identifier.system.map(owned),
                    value: owned(self.doc.identifier.value),
                },
                reference: owned(self.doc.reference),
            },
            reading_system: owned(self.reading_system),
        }
    }
}

/// One entry of an extension: `url` and one `value[x]`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExtensionValue<'a> {
    pub url: &'static str,
    #[serde(skip_serializing_if = "none")]
    pub value_boolean: Option<bool>,
    #[serde(skip_serializing_if = "none")]
    pub value_code: Option<&'a str>,
    #[serde(skip_serializing_if = "none")]
    pub value_coding: Option<Coding<'a>>,
    #[serde(skip_serializing_if = "none")]
    pub value_decimal: Option<f64>,
    #[serde(skip_serializing_if = "none")]
    pub value_string: Option<&'a str>,
}

impl<'a> ExtensionValue<'a> {
    /// An entry with no value yet.
    fn url(url: &'static str) -> Self {
        ExtensionValue {
            url,
            value_boolean: None,
            value_code: None,
            value_coding: None,
            value_decimal: None,
            value_string: None,
        }
    }

    fn code(url: &'static str, code: &'a str) -> Self {
        ExtensionValue {
            value_code: Some(code),
            ..Self::url(url)
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct QualityExtension<'a> {
    pub extension: Vec<ExtensionValue<'a>>,
    pub url: &'static str,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Meta {
    #[serde(skip_serializing_if = "none")]
    pub last_updated: Option<Instant>,
    #[serde(skip_serializing_if = "no_profiles")]
    pub profile: Vec<&'static str>,
    #[serde(skip_serializing_if = "none")]
    pub version_id: Option<String>,
}

/// The Observation of one reading.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReadingObservation<'a> {
    pub category: Part<'a, [Concept<'a>; 1]>,
    pub code: Part<'a, Concept<'a>>,
    #[serde(skip_serializing_if = "none")]
    pub data_absent_reason: Option<Concept<'a>>,
    pub device: Part<'a, DeviceDoc<'a>>,
    pub effective_date_time: Instant,
    pub extension: (QualityExtension<'a>, ExtensionValue<'a>),
    pub id: Cow<'a, str>,
    pub identifier: [SystemValue<'a>; 1],
    #[serde(skip_serializing_if = "none")]
    pub interpretation: Option<[Concept<'a>; 1]>,
    pub issued: Instant,
    #[serde(skip_serializing_if = "none")]
    pub meta: Option<Meta>,
    pub resource_type: &'static str,
    pub status: &'static str,
    #[serde(skip_serializing_if = "none")]
    pub subject: Option<Subject<'a>>,
    #[serde(skip_serializing_if = "none")]
    pub value_codeable_concept: Option<Concept<'a>>,
    #[serde(skip_serializing_if = "none")]
    pub value_quantity: Option<Quantity<'a>>,
    #[serde(skip_serializing_if = "none")]
    pub value_string: Option<&'a str>,
}

/// A `dataAbsentReason`.
pub(crate) fn absent<'a>(code: &'a str, display: &'a str) -> Concept<'a> {
    Concept {
        coding: vec![Coding::new(ABSENT_SYSTEM, code, Some(display))],
        text: Some(display.into()),
    }
}

/// The reading-quality extension: validity, device flags, the range check,
/// and the raw value/unit when the value is withheld.
pub(crate) fn quality<'a>(
    reading: &'a Reading,
    metric: &Metric,
    out_of_range: bool,
    withhold: bool,
) -> QualityExtension<'a> {
    let mut items = vec![ExtensionValue::code(
        "validity",
        validity_code(reading.validity),
    )];
    for f in &reading.flags {
        if let Some(code) = flag_code(*f) {
            items.push(ExtensionValue::code("flag", code));
        }
    }
    if out_of_range {
        items.push(ExtensionValue {
            value_boolean: Some(true),
            ..ExtensionValue::url("out-of-range")
        });
    }
    if withhold {
        let raw = ExtensionValue::url("raw-value");
        match &reading.value {
            Some(reading::Value::Numeric(n)) => {
                items.push(ExtensionValue {
                    value_decimal: Some(*n),
                    ..raw
                });
                items.push(ExtensionValue::code("raw-unit", metric.unit.ucum));
            }
            Some(reading::Value::Text(t)) => items.push(ExtensionValue {
                value_string: Some(t),
                ..raw
            }),
            Some(reading::Value::Coded(c)) => items.push(ExtensionValue {
                value_coding: Some(Coding::sent(c)),
                ..raw
            }),
            None => {}
        }
    }
    QualityExtension {
        extension: items,
        url: QUALITY_EXT,
    }
}

/// `interpretation` as the device flagged the value (never computed here).
pub(crate) fn interpretation(r: &Reading) -> Option<[Concept<'static>; 1]> {
    let (code, display) = match r.interpretation() {
        Interpretation::Unspecified => return None,
        Interpretation::Normal => ("N", "Normal"),
        Interpretation::Low => ("L", "Low"),
        Interpretation::High => ("H", "High"),
        Interpretation::CriticalLow => ("LL", "Critical low"),
        Interpretation::CriticalHigh => ("HH", "Critical high"),
        Interpretation::Abnormal => ("A", "Abnormal"),
        Interpretation::CriticalAbnormal => ("AA", "Critical abnormal"),
        Interpretation::OffScaleLow => ("<", "Off scale low"),
        Interpretation::OffScaleHigh => (">", "Off scale high"),
    };
    Some([Concept {
        coding: vec![Coding::new(INTERPRETATION_SYSTEM, code, Some(display))],
        text: Some(format!("{display} (flagged by the device)").into()),
    }])
}

/// `Observation.subject` for patient `p`: a literal reference when `p` is
/// a FHIR id, plus the identifier the source carried when it named `p`.
pub(crate) fn subject<'a>(p: &str, reading: &'a Reading) -> Subject<'a> {
    Subject {
        reference: is_valid_id(p).then(|| format!("Patient/{p}")),
        identifier: reading
            .subject
            .as_ref()
            .filter(|s| s.value == p)
            .map(|s| SystemValue {
                system: Some(s.system.as_str())
                    .filter(|s| !s.is_empty())
                    .map(Into::into),
                value: s.value.as_str().into(),
            }),
    }
}

/// `Observation.device`: the Device reference, its identifier and a
/// display name.
pub(crate) fn device<'a>(device: &DeviceRef<'a>) -> DeviceDoc<'a> {
    let serial = (!device.serial_number.is_empty()).then(|| format!("SN {}", device.serial_number));
    let parts: Vec<&str> = [device.manufacturer, device.model]
        .into_iter()
        .chain(serial.as_deref())
        .filter(|s| !s.is_empty())
        .collect();
    DeviceDoc {
        display: (!parts.is_empty()).then(|| parts.join(" ").into()),
        identifier: SystemValue {
            system: Some(super::render::device_identifier_system(device.gateway_id).into()),
            value: device.device_id.into(),
        },
        reference: format!(
            "Device/{}",
            super::render::device_resource_id(device.gateway_id, device.device_id)
        )
        .into(),
    }
}

/// Builds the Observation of a validated reading (see
/// [`super::map_observation`]) from device `device_ref` (whose
/// [`DeviceParts`] are `parts`); `id` is the stored id when the reading is
/// already stored, else it is derived from the reading's identity.
pub(crate) fn reading_observation<'a>(
    device_ref: &DeviceRef<'a>,
    parts: DeviceParts<'a>,
    reading: &'a Reading,
    metric: &Metric,
    patient_id: Option<&str>,
    received_us: i64,
    id: Option<&'a str>,
) -> ReadingObservation<'a> {
    let validity = Validity::try_from(reading.validity).unwrap_or(Validity::Unspecified);
    let cols = columns(reading, metric);
    let (cat_code, cat_display) = category(metric);
    let mut codings = vec![Coding::new(
        LOINC_SYSTEM,
        metric.loinc,
        Some(metric.loinc_display),
    )];
    if let Some(profile_code) = metric.loinc_profile {
        codings.push(Coding::new(
            LOINC_SYSTEM,
            profile_code,
            profile_loinc_display(profile_code),
        ));
    }
    codings.push(Coding {
        code: CodeText::Number(metric.mdc),
        display: Some(metric.mdc_name),
        system: Some(MDC_SYSTEM),
    });
    let issued = if reading.gateway_time_us != 0 {
        reading.gateway_time_us
    } else {
        received_us
    };
    let withhold = validity == Validity::Invalid || cols.out_of_range;
    let mut obs = ReadingObservation {
        category: Part::Built([Concept {
            coding: vec![Coding::new(CATEGORY_SYSTEM, cat_code, Some(cat_display))],
            text: Some(cat_display.into()),
        }]),
        code: Part::Built(Concept {
            coding: codings,
            text: Some(metric.display.into()),
        }),
        data_absent_reason: None,
        device: Part::Built(parts.doc),
        effective_date_time: Instant(reading.effective_time_us()),
        extension: (
            quality(reading, metric, cols.out_of_range, withhold),
            ExtensionValue::code(TIME_SOURCE_EXT, time_source_code(reading.time_source)),
        ),
        id: match id {
            Some(id) => id.into(),
            None => observation_id(
                device_ref.gateway_id,
                device_ref.device_id,
                reading.sequence,
            )
            .into(),
        },
        identifier: [SystemValue {
            system: Some(parts.reading_system),
            value: reading.sequence.to_string().into(),
        }],
        interpretation: interpretation(reading),
        issued: Instant(issued),
        meta: None,
        resource_type: "Observation",
        status: cols.status,
        subject: patient_id.map(|p| subject(p, reading)),
        value_codeable_concept: None,
        value_quantity: None,
        value_string: None,
    };
    match &reading.value {
        None => obs.data_absent_reason = Some(absent("unknown", "Unknown")),
        Some(_) if withhold => obs.data_absent_reason = Some(absent("error", "Error")),
        Some(reading::Value::Numeric(n)) => {
            obs.value_quantity = Some(Quantity {
                code: metric.unit.ucum,
                system: UCUM_SYSTEM,
                unit: metric.unit.display,
                value: *n,
            })
        }
        Some(reading::Value::Text(t)) => obs.value_string = Some(t),
        Some(reading::Value::Coded(c)) => {
            obs.value_codeable_concept = Some(Concept {
                coding: vec![Coding::sent(c)],
                text: Some(c.display.as_str())
                    .filter(|d| !d.is_empty())
                    .map(Into::into),
            })
        }
    }
    // Profiles only where this resource meets them (e.g. no subject yet:
    // none of the vital-signs profiles).
    if let Some(specific) = vital_profile(metric) {
        let profiles = profiles_of(&obs.facts(), Some(specific).filter(|p| !p.is_empty()));
        if !profiles.is_empty() {
            obs.meta = Some(Meta {
                last_updated: None,
                profile: profiles,
                version_id: None,
            });
        }
    }
    obs
}

impl<'a> ReadingObservation<'a> {
    /// What the vital-signs profiles look at (see [`super::claimed_profiles`]),
    /// worked out while the document is built (its category and code are
    /// then built for this row, not written bytes).
    fn facts(&self) -> ProfileFacts<'_> {
        ProfileFacts {
            status: true,
            vital_category: self.category.built().is_some_and(|[category]| {
                category.coding.iter().any(|c| {
                    c.system == Some(CATEGORY_SYSTEM)
                        && matches!(c.code, CodeText::Str("vital-signs"))
                })
            }),
            loinc: self
                .code
                .built()
                .map(|code| {
                    code.coding
                        .iter()
                        .filter(|c| c.system == Some(LOINC_SYSTEM))
                        .map(|c| match c.code {
                            CodeText::Str(s) => Some(s),
                            CodeText::Number(_) => None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            subject: self
                .subject
                .as_ref()
                .is_some_and(|s| s.reference.is_some() || s.identifier.is_some()),
            effective: true,
            value: ValueFacts {
                other: self.value_string.is_some() || self.value_codeable_concept.is_some(),
                quantity: self.value_quantity.as_ref().map(|q| QuantityFacts {
                    number: q.value.is_finite(),
                    unit: true,
                    ucum: true,
                    code: Some(q.code),
                }),
                absent: self.data_absent_reason.is_some(),
            },
            components: Vec::new(),
        }
    }

    /// The stored row's view of the resource: the patient identifier's
    /// system the store knows, and the version.
    pub(crate) fn complete(
        &mut self,
        patient: Option<(&'a str, &'a str)>,
        version: i64,
        last_updated_us: i64,
    ) {
        if let (Some((p, system)), Some(subject)) = (patient, self.subject.as_mut()) {
            match subject.identifier.as_mut() {
                Some(ident) => {
                    if !system.is_empty() && ident.value == p {
                        ident.system = Some(system.into());
                    }
                }
                None => {
                    subject.identifier = Some(SystemValue {
                        system: Some(system).filter(|s| !s.is_empty()).map(Into::into),
                        value: p.into(),
                    })
                }
            }
        }
        let meta = self.meta.get_or_insert(Meta {
            last_updated: None,
            profile: Vec::new(),
            version_id: None,
        });
        meta.version_id = Some(version.max(1).to_string());
        meta.last_updated = Some(Instant(last_updated_us));
    }
}

/// The document written as JSON straight into a buffer: the bytes serde
/// writes for it (field names in the same order, absent fields left out
/// the same way, strings escaped and numbers formatted by `serde_json`),
/// without serde's per-field calls and with the field names, which need no
/// escaping, copied as they are. `golden.rs` holds both to blessed bytes.
mod write {
    use super::*;

    /// A JSON string that needs no escaping: a constant of this crate
    /// (a URL, a code) or text made only of digits and separators. Tests
    /// (debug builds, the golden vectors) check that it needs none.
    fn plain(out: &mut Vec<u8>, s: &str) {
        debug_assert!(
            s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'),
            "{s:?} needs escaping"
        );
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }

    /// The last instant a document wrote and where its text is in the
    /// buffer: an Observation's times are often one instant (effective,
    /// issued, last updated), whose text is then copied.
    type LastInstant = Option<(i64, std::ops::Range<usize>)>;

    fn instant(out: &mut Vec<u8>, at: Instant, last: &mut LastInstant) {
        out.push(b'"');
        match last {
            Some((us, text)) if *us == at.0 => out.extend_from_within(text.clone()),
            _ => {
                let start = out.len();
                crate::clock::write_instant(out, at.0);
                *last = Some((at.0, start..out.len()));
            }
        }
        out.push(b'"');
    }

    /// A JSON string, escaped by `serde_json`.
    fn text(out: &mut Vec<u8>, s: &str) {
        // Serializing a `str` or an `f64` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }

    /// An object being written: its fields' names are literals that need no
    /// escaping (ASCII letters).
    struct Obj<'o> {
        out: &'o mut Vec<u8>,
        first: bool,
    }

    impl<'o> Obj<'o> {
        fn open(out: &'o mut Vec<u8>) -> Self {
            out.push(b'{');
            Obj { out, first: true }
        }

        /// Starts field `name` and returns the buffer for its value.
        fn field(&mut self, name: &str) -> &mut Vec<u8> {
            debug_assert!(name.bytes().all(|b| b.is_ascii_alphabetic()));
            if !self.first {
                self.out.push(b',');
            }
            self.first = false;
            self.out.push(b'"');
            self.out.extend_from_slice(name.as_bytes());
            self.out.extend_from_slice(b"\":");
            self.out
        }

        fn text(&mut self, name: &str, value: &str) {
            text(self.field(name), value);
        }

        fn opt_text(&mut self, name: &str, value: Option<&str>) {
            if let Some(v) = value {
                self.text(name, v);
            }
        }

        fn close(self) {
            self.out.push(b'}');
        }
    }

    fn list<T>(out: &mut Vec<u8>, items: &[T], mut each: impl FnMut(&mut Vec<u8>, &T)) {
        out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            each(out, item);
        }
        out.push(b']');
    }

    fn part<T>(out: &mut Vec<u8>, p: &Part<'_, T>, built: impl FnOnce(&mut Vec<u8>, &T)) {
        match p {
            Part::Built(v) => built(out, v),
            Part::Written(json) => out.extend_from_slice(json.get().as_bytes()),
        }
    }

    fn coding(out: &mut Vec<u8>, c: &Coding<'_>) {
        let mut o = Obj::open(out);
        match c.code {
            CodeText::Str(s) => o.text("code", s),
            CodeText::Number(n) => {
                let f = o.field("code");
                f.push(b'"');
                f.extend_from_slice(n.to_string().as_bytes());
                f.push(b'"');
            }
        }
        o.opt_text("display", c.display);
        o.opt_text("system", c.system);
        o.close();
    }

    fn concept(out: &mut Vec<u8>, c: &Concept<'_>) {
        let mut o = Obj::open(out);
        list(o.field("coding"), &c.coding, coding);
        o.opt_text("text", c.text.as_deref());
        o.close();
    }

    fn system_value(out: &mut Vec<u8>, v: &SystemValue<'_>) {
        let mut o = Obj::open(out);
        o.opt_text("system", v.system.as_deref());
        o.text("value", &v.value);
        o.close();
    }

    fn device(out: &mut Vec<u8>, d: &DeviceDoc<'_>) {
        let mut o = Obj::open(out);
        o.opt_text("display", d.display.as_deref());
        system_value(o.field("identifier"), &d.identifier);
        o.text("reference", &d.reference);
        o.close();
    }

    fn extension_value(out: &mut Vec<u8>, e: &ExtensionValue<'_>) {
        let mut o = Obj::open(out);
        plain(o.field("url"), e.url);
        if let Some(b) = e.value_boolean {
            o.field("valueBoolean")
                .extend_from_slice(if b { b"true" } else { b"false" });
        }
        o.opt_text("valueCode", e.value_code);
        if let Some(c) = &e.value_coding {
            coding(o.field("valueCoding"), c);
        }
        if let Some(d) = e.value_decimal {
            let _ = serde_json::to_writer(&mut *o.field("valueDecimal"), &d);
        }
        o.opt_text("valueString", e.value_string);
        o.close();
    }

    fn quality(out: &mut Vec<u8>, q: &QualityExtension<'_>) {
        let mut o = Obj::open(out);
        list(o.field("extension"), &q.extension, extension_value);
        plain(o.field("url"), q.url);
        o.close();
    }

    fn meta(out: &mut Vec<u8>, m: &Meta, last: &mut LastInstant) {
        let mut o = Obj::open(out);
        if let Some(at) = m.last_updated {
            instant(o.field("lastUpdated"), at, last);
        }
        if !m.profile.is_empty() {
            list(o.field("profile"), &m.profile, |out, p| plain(out, p));
        }
        if let Some(v) = &m.version_id {
            // Digits (`complete`).
            plain(o.field("versionId"), v);
        }
        o.close();
    }

    fn subject(out: &mut Vec<u8>, s: &Subject<'_>) {
        let mut o = Obj::open(out);
        if let Some(i) = &s.identifier {
            system_value(o.field("identifier"), i);
        }
        o.opt_text("reference", s.reference.as_deref());
        o.close();
    }

    fn quantity(out: &mut Vec<u8>, q: &Quantity<'_>) {
        let mut o = Obj::open(out);
        o.text("code", q.code);
        plain(o.field("system"), q.system);
        o.text("unit", q.unit);
        let _ = serde_json::to_writer(&mut *o.field("value"), &q.value);
        o.close();
    }

    impl ReadingObservation<'_> {
        /// Appends the document's JSON to `out`.
        pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
            let mut last = None;
            let mut o = Obj::open(out);
            part(o.field("category"), &self.category, |out, c| {
                list(out, c, concept)
            });
            part(o.field("code"), &self.code, concept);
            if let Some(c) = &self.data_absent_reason {
                concept(o.field("dataAbsentReason"), c);
            }
            part(o.field("device"), &self.device, device);
            instant(
                o.field("effectiveDateTime"),
                self.effective_date_time,
                &mut last,
            );
            {
                let out = o.field("extension");
                out.push(b'[');
                quality(out, &self.extension.0);
                out.push(b',');
                extension_value(out, &self.extension.1);
                out.push(b']');
            }
            o.text("id", &self.id);
            list(o.field("identifier"), &self.identifier, system_value);
            if let Some(i) = &self.interpretation {
                list(o.field("interpretation"), i, concept);
            }
            instant(o.field("issued"), self.issued, &mut last);
            if let Some(m) = &self.meta {
                meta(o.field("meta"), m, &mut last);
            }
            plain(o.field("resourceType"), self.resource_type);
            plain(o.field("status"), self.status);
            if let Some(s) = &self.subject {
                subject(o.field("subject"), s);
            }
            if let Some(c) = &self.value_codeable_concept {
                concept(o.field("valueCodeableConcept"), c);
            }
            if let Some(q) = &self.value_quantity {
                quantity(o.field("valueQuantity"), q);
            }
            o.opt_text("valueString", self.value_string);
            o.close();
        }
    }
}
