//! Every resource type the hub emits, checked by an independent FHIR R4
//! validator: the Python `fhir.resources` 6.1.0 models (FHIR 4.0.1),
//! installed by `scripts/setup.sh` into its own virtualenv
//! (`$VIGIL_FHIR_VENV`, default `~/.cache/vigil/fhir-r4-venv`) and run by
//! `tests/py/validate_fhir.py`.
//!
//! The hub is fed every catalogue metric in every unit it is reported in,
//! plus the awkward cases: invalid, impossible, questionable-with-flags,
//! missing, text and coded values, a blood-pressure panel with an invalid
//! component, a waveform, a reading carrying its own patient identifier
//! and an unattributed device. Then every Observation (read and searchset),
//! every Device, the CapabilityStatement and error OperationOutcomes go
//! through the validator, which must report 0 errors.

use crate::common;

use common::*;
use serde_json::Value;
use shared_protocol::CATALOGUE;
use shared_protocol::catalogue::codes;
use shared_protocol::v1::{CodedValue, Identifier, Interpretation, Reading, Waveform, reading};

fn reading_in(seq: u64, metric: &shared_protocol::Metric, value: f64) -> Reading {
    Reading {
        mdc_code: metric.mdc,
        vendor_label: metric.display.into(),
        value: Some(reading::Value::Numeric(value)),
        mdc_unit: metric.unit.mdc,
        ucum_unit: metric.unit.ucum.into(),
        ..spo2(seq, 0.0, T0 + seq as i64 * 1_000_000)
    }
}

#[test]
fn the_validator_catches_what_it_should() {
    // A guard against a validator that accepts anything.
    let (ok, report) = validate_fhir(&[
        serde_json::json!({"resourceType": "Observation", "status": "final"}),
        serde_json::json!({"resourceType": "Observation", "status": "final",
                           "code": {"text": "x"}, "effectiveDateTime": "yesterday"}),
        serde_json::json!({"resourceType": "Device", "unknownElement": 1}),
    ]);
    assert!(!ok, "{report}");
    assert!(report.contains("3 errors"), "{report}");
}

#[tokio::test]
async fn every_emitted_resource_is_valid_fhir_r4() {
    let hub = TestHub::start().await;
    let mut readings = Vec::new();
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };
    // Every metric in every unit, at a mid-range value.
    for m in CATALOGUE.all() {
        for v in m.variants() {
            let mid = (v.possible_range.0 + v.possible_range.1) / 2.0;
            readings.push(reading_in(next(), &v, mid));
        }
    }
    let spo2_metric = *CATALOGUE.by_mdc(codes::PULS_OXIM_SAT_O2).unwrap();
    // Invalid, impossible, questionable with flags, missing.
    let mut r = reading_in(next(), &spo2_metric, 50.0);
    r.validity = 3;
    readings.push(r);
    readings.push(reading_in(next(), &spo2_metric, 180.0));
    let mut r = reading_in(next(), &spo2_metric, 91.0);
    r.validity = 2;
    r.flags = vec![5, 6, 11];
    readings.push(r);
    let mut r = reading_in(next(), &spo2_metric, 0.0);
    r.value = None;
    readings.push(r);
    // Flagged by the device (HL7 OBX-8 "LL"; off scale high).
    let mut r = reading_in(next(), &spo2_metric, 84.0);
    r.interpretation = Interpretation::CriticalLow as i32;
    readings.push(r);
    let mut r = reading_in(next(), &spo2_metric, 99.0);
    r.interpretation = Interpretation::OffScaleHigh as i32;
    readings.push(r);
    // Text and coded values.
    let mut r = reading_in(next(), &spo2_metric, 0.0);
    r.value = Some(reading::Value::Text("SENSOR OFF".into()));
    r.mdc_unit = 0;
    r.ucum_unit = String::new();
    readings.push(r);
    let mut r = reading_in(next(), &spo2_metric, 0.0);
    r.value = Some(reading::Value::Coded(CodedValue {
        system: "urn:iso:std:iso:11073:10101".into(),
        code: "1234".into(),
        display: "coded".into(),
    }));
    r.mdc_unit = 0;
    r.ucum_unit = String::new();
    readings.push(r);
    // A BP panel with an invalid diastolic.
    let t_bp = T0 + 3_600_000_000;
    let bp = |seq, mdc, value| {
        let m = *CATALOGUE.by_mdc(mdc).unwrap();
        Reading {
            device_time_us: t_bp,
            ..reading_in(seq, &m, value)
        }
    };
    let mut sys = bp(next(), codes::PRESS_BLD_NONINV_SYS, 181.0);
    sys.interpretation = Interpretation::High as i32;
    readings.push(sys);
    let mut dia = bp(next(), codes::PRESS_BLD_NONINV_DIA, 79.0);
    dia.validity = 3;
    readings.push(dia);
    readings.push(bp(next(), codes::PRESS_BLD_NONINV_MEAN, 93.0));
    let mut b = batch(1, DEVICE, readings);
    b.devices[0].waveforms.push(Waveform {
        mdc_code: 150_452,
        vendor_label: "PLETH".into(),
        start_time_us: T0,
        time_source: 1,
        sample_period_us: 13_333,
        scale: 1.0,
        ucum_unit: "1".into(),
        samples: (0..25).map(|i| i * 7 - 50).collect(),
        validity: 1,
        sequence: next(),
        ..Default::default()
    });
    let ack = hub.ingest(&b).await;
    assert_eq!(ack.rejected, 0, "{ack:?}");

    // A reading that names its patient (system + value), and an
    // unattributed device.
    let mut own = reading_in(1, &spo2_metric, 96.0);
    own.subject = Some(Identifier {
        system: "urn:oid:2.16.840.1.113883.19.5".into(),
        value: "MRN-0042".into(),
    });
    let ack = hub.ingest(&batch(2, "hl7-dev", vec![own])).await;
    assert_eq!(ack.accepted, 1);
    let ack = hub
        .ingest(&batch(3, "stray", vec![reading_in(1, &spo2_metric, 95.0)]))
        .await;
    assert_eq!(ack.accepted, 1);

    let mut resources = Vec::new();
    let (status, cap) = hub.get_json("/fhir/metadata").await;
    assert_eq!(status, 200);
    resources.push(cap);
    let (status, all) = hub.get_json("/fhir/Observation?_count=1000").await;
    assert_eq!(status, 200);
    let entries = all["entry"].as_array().unwrap().clone();
    assert!(entries.len() > 20, "{}", entries.len());
    // Each kind of Observation is present.
    let has = |pred: &dyn Fn(&Value) -> bool| entries.iter().any(|e| pred(&e["resource"]));
    assert!(has(&|r| r.get("component").is_some()), "a BP panel");
    assert!(has(&|r| r.get("valueSampledData").is_some()), "a waveform");
    assert!(
        has(&|r| r.get("dataAbsentReason").is_some()),
        "an absent value"
    );
    assert!(has(&|r| r.get("valueString").is_some()), "a text value");
    assert!(
        has(&|r| r["interpretation"][0]["coding"][0]["code"] == "LL"
            && r["valueQuantity"]["value"] == 84.0),
        "a device-flagged value, the value kept as sent"
    );
    assert!(
        has(&|r| r["interpretation"][0]["coding"][0]["code"] == ">"),
        "off scale high"
    );
    assert!(
        has(&|r| r["component"][0]["interpretation"][0]["coding"][0]["code"] == "H"),
        "a flagged BP component"
    );
    assert!(
        entries
            .iter()
            .filter(|e| e["resource"].get("interpretation").is_some())
            .count()
            == 2,
        "no interpretation where the device gave none"
    );
    assert!(
        has(&|r| r.get("valueCodeableConcept").is_some()),
        "a coded value"
    );
    assert!(
        has(&|r| r.get("subject").is_none()),
        "an unattributed reading"
    );
    assert!(
        has(&|r| r["subject"]["identifier"]["value"] == "MRN-0042"),
        "a source identifier"
    );
    for e in &entries {
        let id = e["resource"]["id"].as_str().unwrap();
        let (status, r) = hub.get_json(&format!("/fhir/Observation/{id}")).await;
        assert_eq!(status, 200, "{r}");
        resources.push(r);
    }
    resources.push(all);
    let (status, devices) = hub.get_json("/fhir/Device").await;
    assert_eq!(status, 200);
    for e in devices["entry"].as_array().unwrap() {
        let id = e["resource"]["id"].as_str().unwrap();
        let (status, d) = hub.get_json(&format!("/fhir/Device/{id}")).await;
        assert_eq!(status, 200, "{d}");
        resources.push(d);
    }
    resources.push(devices);
    // Patients (identifier only) and beds as Locations.
    for p in [PATIENT, "MRN-0042"] {
        let (status, r) = hub.get_json(&format!("/fhir/Patient/{p}")).await;
        assert_eq!(status, 200, "{r}");
        resources.push(r);
    }
    hub.db()
        .execute(
            "INSERT INTO beds (id, ward, label, created_us) VALUES ('icu3_bed-07', 'ICU-3', 'Bed 7', 0)",
            [],
        )
        .unwrap();
    let (status, locations) = hub.get_json("/fhir/Location").await;
    assert_eq!(status, 200, "{locations}");
    let loc_id = locations["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, loc) = hub.get_json(&format!("/fhir/Location/{loc_id}")).await;
    assert_eq!(status, 200, "{loc}");
    resources.push(loc);
    resources.push(locations);
    // Errors are OperationOutcomes.
    let (status, nf) = hub.get_json("/fhir/Observation/nope").await;
    assert_eq!(status, 404);
    resources.push(nf);
    let (status, bad) = hub.get_json("/fhir/Observation?date=yesterday").await;
    assert_eq!(status, 400);
    resources.push(bad);

    let (ok, report) = validate_fhir(&resources);
    eprintln!("{report}");
    assert!(ok, "the FHIR validator found errors:\n{report}");
    assert!(report.contains(" 0 errors"), "{report}");
    hub.stop().await;
}
