//! The rows of each layer and the de-identification that turns a stored
//! reading into a silver row (pure: no I/O). Which field goes where is the
//! table in docs/lake.md, "De-identification"; [`silver_of`] is its code.

use hub_domain::fhir::columns;
use hub_domain::fhir::render::{ObservationRow, metric_of};
use prost::Message;
use shared_protocol::v1::{Interpretation, QualityFlag, Reading, TimeSource, Validity, reading};

use crate::key::{DAY_US, LakeKey};

/// Bronze: a stored reading as received (identified data).
#[derive(Debug, Clone, PartialEq)]
pub struct BronzeRow {
    pub observation_id: String,
    pub gateway_id: String,
    pub device_id: String,
    pub sequence: u64,
    pub mdc_code: u32,
    pub vendor_label: String,
    pub value_numeric: Option<f64>,
    pub value_text: Option<String>,
    pub value_coded_system: Option<String>,
    pub value_coded_code: Option<String>,
    pub value_coded_display: Option<String>,
    pub mdc_unit: u32,
    pub ucum_unit: String,
    pub device_time_us: i64,
    pub time_source: String,
    pub gateway_time_us: i64,
    pub validity: String,
    pub quality_flags: String,
    pub subject_system: Option<String>,
    pub subject_value: Option<String>,
    pub interpretation: String,
    /// The reading's effective time (device time, else gateway time).
    pub effective_us: i64,
    pub received_us: i64,
    /// The patient the hub attributed the reading to when exported.
    pub patient_id: Option<String>,
    pub patient_system: Option<String>,
}

/// Silver: a validated, normalized, de-identified reading.
#[derive(Debug, Clone, PartialEq)]
pub struct SilverRow {
    pub pseudonym: String,
    /// Effective time, shifted by the patient's date shift (0 when off).
    pub effective_us: i64,
    pub loinc: String,
    pub mdc_code: u32,
    /// The catalogue's MDC reference id of the metric.
    pub metric: String,
    pub ucum: String,
    /// The value as the FHIR API serves it: None when the reading has none,
    /// is INVALID or physically impossible.
    pub value: Option<f64>,
    /// FHIR `Observation.status`: `final` or `preliminary`.
    pub status: String,
    pub validity: String,
    pub quality_flags: String,
    pub interpretation: String,
    pub out_of_range: bool,
    pub time_source: String,
}

/// A stored reading decoded once for both layers.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub row: ObservationRow,
    pub reading: Reading,
}

/// Why a stored row does not reach a layer (counted, never guessed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Stored before payloads (schema v4): no wire reading to export.
    NoPayload,
    /// The payload does not decode.
    Corrupt,
}

/// Decodes a stored row's wire reading.
pub fn decode(row: ObservationRow) -> Result<Decoded, Skip> {
    let bytes = row.payload.as_deref().ok_or(Skip::NoPayload)?;
    let reading = Reading::decode(bytes).map_err(|_| Skip::Corrupt)?;
    Ok(Decoded { row, reading })
}

fn enum_name<E: TryFrom<i32>>(v: i32, name: impl Fn(E) -> &'static str) -> String {
    E::try_from(v).map(name).unwrap_or("UNKNOWN").to_owned()
}

fn validity_name(r: &Reading) -> String {
    enum_name(r.validity, |v: Validity| v.as_str_name())
}

fn flags_text(r: &Reading) -> String {
    r.flags
        .iter()
        .map(|f| enum_name(*f, |q: QualityFlag| q.as_str_name()))
        .collect::<Vec<_>>()
        .join(",")
}

fn interpretation_name(r: &Reading) -> String {
    enum_name(r.interpretation, |i: Interpretation| i.as_str_name())
}

fn time_source_name(r: &Reading) -> String {
    enum_name(r.time_source, |t: TimeSource| t.as_str_name())
}

/// The bronze row of a stored reading: every field of the wire reading.
pub fn bronze_of(d: &Decoded) -> BronzeRow {
    let r = &d.reading;
    let (mut numeric, mut text, mut coded) = (None, None, None);
    match &r.value {
        Some(reading::Value::Numeric(v)) => numeric = Some(*v),
        Some(reading::Value::Text(t)) => text = Some(t.clone()),
        Some(reading::Value::Coded(c)) => coded = Some(c.clone()),
        None => {}
    }
    BronzeRow {
        observation_id: d.row.id.clone(),
        gateway_id: d.row.gateway_id.clone(),
        device_id: d.row.device_id.clone(),
        sequence: r.sequence,
        mdc_code: r.mdc_code,
        vendor_label: r.vendor_label.clone(),
        value_numeric: numeric,
        value_text: text,
        value_coded_system: coded.as_ref().map(|c| c.system.clone()),
        value_coded_code: coded.as_ref().map(|c| c.code.clone()),
        value_coded_display: coded.map(|c| c.display),
        mdc_unit: r.mdc_unit,
        ucum_unit: r.ucum_unit.clone(),
        device_time_us: r.device_time_us,
        time_source: time_source_name(r),
        gateway_time_us: r.gateway_time_us,
        validity: validity_name(r),
        quality_flags: flags_text(r),
        subject_system: r.subject.as_ref().map(|s| s.system.clone()),
        subject_value: r.subject.as_ref().map(|s| s.value.clone()),
        interpretation: interpretation_name(r),
        effective_us: r.effective_time_us(),
        received_us: d.row.received_us,
        patient_id: d.row.patient_id.clone(),
        patient_system: d.row.patient_system.clone(),
    }
}

/// Why a reading has no silver row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSilver {
    /// Not attributed to a patient.
    Unattributed,
    /// Not a number (text or coded values are free text or device
    /// vocabularies: not exported to silver).
    NotNumeric,
    /// Its metric is not in the catalogue (nothing to normalize against).
    UnknownMetric,
}

/// De-identifies a stored reading into its silver row. `pseudonym` is the
/// attributed patient's pseudonym ([`LakeKey::pseudonym`] of its subject
/// key) and `shift_days` their date shift. Only the fields listed here
/// leave: no gateway, device, sequence, serial, vendor label, identifier,
/// text value or receive time.
pub fn silver_of(d: &Decoded, pseudonym: &str, shift_days: i64) -> Result<SilverRow, NotSilver> {
    if d.row.patient_id.is_none() {
        return Err(NotSilver::Unattributed);
    }
    let r = &d.reading;
    if !matches!(r.value, Some(reading::Value::Numeric(_)) | None) {
        return Err(NotSilver::NotNumeric);
    }
    let metric = metric_of(r).ok_or(NotSilver::UnknownMetric)?;
    let cols = columns(r, &metric);
    Ok(SilverRow {
        pseudonym: pseudonym.to_owned(),
        effective_us: shift(r.effective_time_us(), shift_days),
        loinc: metric.loinc.to_owned(),
        mdc_code: metric.mdc,
        metric: metric.mdc_name.to_owned(),
        ucum: metric.unit.ucum.to_owned(),
        value: cols.value,
        status: cols.status.to_owned(),
        validity: validity_name(r),
        quality_flags: flags_text(r),
        interpretation: interpretation_name(r),
        out_of_range: cols.out_of_range,
        time_source: time_source_name(r),
    })
}

/// `t` moved by `days` whole days.
pub fn shift(t: i64, days: i64) -> i64 {
    t.saturating_add(days.saturating_mul(DAY_US))
}

/// The UTC date (`YYYY-MM-DD`) of a µs instant: the partition of a row.
pub fn date_of(us: i64) -> String {
    let days = us.div_euclid(DAY_US);
    let date = time::Date::from_julian_day(
        i32::try_from(days + 2_440_588).unwrap_or(time::Date::MIN.to_julian_day()),
    )
    .unwrap_or(time::Date::MIN);
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// The pseudonym and date shift of a patient (cached by the exporter).
pub fn patient_view(
    key: &LakeKey,
    subject: &hub_domain::privacy::SubjectKey,
    max_days: u16,
) -> (String, i64) {
    let p = key.pseudonym(subject);
    let d = key.date_shift_days(&p, max_days);
    (p, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_protocol::catalogue::codes;
    use shared_protocol::v1::{CodedValue, Identifier};

    fn stored(reading: &Reading, patient: Option<&str>) -> Decoded {
        let row = ObservationRow {
            id: "obs-1".into(),
            kind: "reading".into(),
            gateway_id: "gw-secret-7".into(),
            device_id: "dev-serial-99".into(),
            patient_id: patient.map(str::to_owned),
            patient_system: patient.map(|_| "urn:oid:1.2.3".to_owned()),
            received_us: 1_700_000_000_500_000,
            payload: Some(reading.encode_to_vec()),
            resource: String::new(),
            manufacturer: "Acme".into(),
            model: "M1".into(),
            serial_number: "SN-123456".into(),
            version: 1,
            updated_us: 1_700_000_000_500_000,
        };
        decode(row).unwrap()
    }

    fn spo2(value: f64) -> Reading {
        Reading {
            mdc_code: codes::PULS_OXIM_SAT_O2,
            vendor_label: "SpO2 bed 4 Mr Smith".into(),
            value: Some(reading::Value::Numeric(value)),
            mdc_unit: 0,
            ucum_unit: "%".into(),
            device_time_us: 1_700_000_000_000_000,
            time_source: TimeSource::DeviceClockSynced as i32,
            gateway_time_us: 1_700_000_000_100_000,
            validity: Validity::Valid as i32,
            flags: vec![QualityFlag::LowSignal as i32],
            sequence: 42,
            subject: Some(Identifier {
                system: "urn:oid:1.2.3".into(),
                value: "MRN-0042".into(),
            }),
            interpretation: Interpretation::Normal as i32,
        }
    }

    #[test]
    fn bronze_keeps_every_wire_field() {
        let r = spo2(97.0);
        let b = bronze_of(&stored(&r, Some("MRN-0042")));
        assert_eq!(b.sequence, 42);
        assert_eq!(b.gateway_id, "gw-secret-7");
        assert_eq!(b.device_id, "dev-serial-99");
        assert_eq!(b.value_numeric, Some(97.0));
        assert_eq!(b.vendor_label, "SpO2 bed 4 Mr Smith");
        assert_eq!(b.subject_value.as_deref(), Some("MRN-0042"));
        assert_eq!(b.quality_flags, "QUALITY_FLAG_LOW_SIGNAL");
        assert_eq!(b.validity, "VALIDITY_VALID");
        assert_eq!(b.time_source, "TIME_SOURCE_DEVICE_CLOCK_SYNCED");
        assert_eq!(b.interpretation, "INTERPRETATION_NORMAL");
        assert_eq!(b.effective_us, r.device_time_us);
        assert_eq!(b.gateway_time_us, r.gateway_time_us);
        assert_eq!(b.received_us, 1_700_000_000_500_000);
        let coded = Reading {
            value: Some(reading::Value::Coded(CodedValue {
                system: "s".into(),
                code: "c".into(),
                display: "d".into(),
            })),
            ..r
        };
        let b = bronze_of(&stored(&coded, None));
        assert_eq!(b.value_numeric, None);
        assert_eq!(
            (
                b.value_coded_system,
                b.value_coded_code,
                b.value_coded_display
            ),
            (Some("s".into()), Some("c".into()), Some("d".into()))
        );
    }

    #[test]
    fn silver_holds_no_identifier_and_no_free_text() {
        let d = stored(&spo2(97.0), Some("MRN-0042"));
        let s = silver_of(&d, "p".repeat(64).as_str(), 0).unwrap();
        // Every text column, checked against every identifier and free text
        // the stored row and its reading carry.
        let texts = [
            &s.pseudonym,
            &s.loinc,
            &s.metric,
            &s.ucum,
            &s.status,
            &s.validity,
            &s.quality_flags,
            &s.interpretation,
            &s.time_source,
        ];
        for secret in [
            "MRN-0042",
            "urn:oid:1.2.3",
            "gw-secret-7",
            "dev-serial-99",
            "SN-123456",
            "Mr Smith",
            "obs-1",
        ] {
            for t in texts {
                assert!(!t.contains(secret), "{secret} in {t}");
            }
        }
        assert_eq!(s.value, Some(97.0));
        assert_eq!(s.loinc, "59408-5");
        assert_eq!(s.ucum, "%");
        assert_eq!(s.status, "final");
        assert_eq!(s.effective_us, 1_700_000_000_000_000);
        assert!(!s.out_of_range);
    }

    #[test]
    fn silver_withholds_what_fhir_withholds_and_skips_what_it_cannot_export() {
        let impossible = stored(&spo2(250.0), Some("MRN-0042"));
        let s = silver_of(&impossible, "p", 0).unwrap();
        assert_eq!(s.value, None);
        assert!(s.out_of_range);
        let invalid = Reading {
            validity: Validity::Invalid as i32,
            ..spo2(90.0)
        };
        assert_eq!(
            silver_of(&stored(&invalid, Some("x")), "p", 0)
                .unwrap()
                .value,
            None
        );
        assert_eq!(
            silver_of(&stored(&spo2(97.0), None), "p", 0),
            Err(NotSilver::Unattributed)
        );
        let text = Reading {
            value: Some(reading::Value::Text("patient said ouch".into())),
            ..spo2(0.0)
        };
        assert_eq!(
            silver_of(&stored(&text, Some("x")), "p", 0),
            Err(NotSilver::NotNumeric)
        );
        let unknown = Reading {
            mdc_code: 1,
            ..spo2(1.0)
        };
        assert_eq!(
            silver_of(&stored(&unknown, Some("x")), "p", 0),
            Err(NotSilver::UnknownMetric)
        );
    }

    #[test]
    fn silver_times_are_shifted_by_whole_days() {
        let d = stored(&spo2(97.0), Some("MRN-0042"));
        let s = silver_of(&d, "p", -3).unwrap();
        assert_eq!(s.effective_us, 1_700_000_000_000_000 - 3 * DAY_US);
        assert_eq!(date_of(1_700_000_000_000_000), "2023-11-14");
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(-1), "1969-12-31");
    }

    #[test]
    fn payloadless_and_corrupt_rows_are_skipped() {
        let mut d = stored(&spo2(1.0), None).row;
        d.payload = None;
        assert_eq!(decode(d.clone()).err(), Some(Skip::NoPayload));
        d.payload = Some(vec![0xff, 0xff, 0xff]);
        assert_eq!(decode(d).err(), Some(Skip::Corrupt));
    }
}
