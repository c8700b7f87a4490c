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

/// What the FHIR R4 vital-signs profiles require of an Observation that
/// claims them (read from the profile definitions, written independently of
/// the hub's own choice): for `vitalsigns` status, the vital-signs
/// category, a LOINC code, a subject, an effective time, and a value (a
/// Quantity in a UCUM vital-signs unit) or a dataAbsentReason, on each
/// component too; for the specific profiles their fixed LOINC code and unit.
fn profile_violations(r: &Value) -> Vec<String> {
    const VS: &str = "http://hl7.org/fhir/StructureDefinition/vitalsigns";
    const UNITS: &[&str] = &[
        "%", "cm", "[in_i]", "kg", "g", "[lb_av]", "Cel", "[degF]", "mm[Hg]", "/min", "kg/m2", "m2",
    ];
    let specific: &[(&str, &str, &[&str])] = &[
        ("heartrate", "8867-4", &["/min"]),
        ("resprate", "9279-1", &["/min"]),
        ("oxygensat", "2708-6", &["%"]),
        ("bodytemp", "8310-5", &["Cel", "[degF]"]),
        ("bodyweight", "29463-7", &["kg", "g", "[lb_av]"]),
        ("bp", "85354-9", &["mm[Hg]"]),
    ];
    let mut out = vec![];
    if let Some(entries) = r["entry"].as_array() {
        for e in entries {
            out.extend(profile_violations(&e["resource"]));
        }
        return out;
    }
    let Some(profiles) = r["meta"]["profile"].as_array() else {
        return out;
    };
    let id = r["id"].as_str().unwrap_or("?");
    let loinc = |cc: &Value, code: Option<&str>| {
        cc["coding"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["system"] == "http://loinc.org" && code.is_none_or(|k| c["code"] == k))
        })
    };
    // The element holding a value: the resource, or each component.
    let holders: Vec<&Value> = match r["component"].as_array() {
        Some(cs) if !cs.is_empty() => cs.iter().collect(),
        _ => vec![r],
    };
    let value_in = |h: &Value, units: &[&str]| match (&h["valueQuantity"], &h["dataAbsentReason"]) {
        (Value::Null, Value::Null) => false,
        (Value::Null, _) => true,
        (q, _) => {
            q["value"].is_number()
                && q["unit"].is_string()
                && q["system"] == "http://unitsofmeasure.org"
                && q["code"].as_str().is_some_and(|c| units.contains(&c))
        }
    };
    for p in profiles.iter().filter_map(Value::as_str) {
        let mut fail = |what: &str| out.push(format!("Observation/{id} claims {p} but {what}"));
        if p == VS {
            if !r["status"].is_string() {
                fail("has no status");
            }
            let cat = r["category"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["coding"].as_array().is_some_and(|cc| {
                        cc.iter().any(|x| {
                            x["system"]
                                == "http://terminology.hl7.org/CodeSystem/observation-category"
                                && x["code"] == "vital-signs"
                        })
                    })
                })
            });
            if !cat {
                fail("lacks the vital-signs category");
            }
            if !loinc(&r["code"], None) {
                fail("has no LOINC code");
            }
            if r["subject"].is_null() {
                fail("has no subject");
            }
            if r["effectiveDateTime"].is_null() && r["effectivePeriod"].is_null() {
                fail("has no effective time");
            }
            for h in &holders {
                if !value_in(h, UNITS) {
                    fail("has a value that is not a vital-signs Quantity (nor a dataAbsentReason)");
                }
            }
            continue;
        }
        let name = p.rsplit('/').next().unwrap_or_default();
        let Some((_, code, units)) = specific.iter().find(|(n, _, _)| *n == name) else {
            fail("the check does not know this profile");
            continue;
        };
        if !profiles.iter().any(|q| q == VS) {
            fail("not vitalsigns, which it derives from");
        }
        if !loinc(&r["code"], Some(code)) {
            fail(&format!("lacks LOINC {code}"));
        }
        for h in &holders {
            if !value_in(h, units) {
                fail(&format!("has a value not in {units:?}"));
            }
        }
        if name == "bp" {
            for part in ["8480-6", "8462-4"] {
                if !holders.iter().any(|h| loinc(&h["code"], Some(part))) {
                    fail(&format!("has no {part} component"));
                }
            }
        }
    }
    out
}

#[test]
fn the_profile_check_catches_what_it_should() {
    let ok = serde_json::json!({"resourceType": "Observation", "id": "a",
        "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns",
                             "http://hl7.org/fhir/StructureDefinition/oxygensat"]},
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2708-6"}]},
        "subject": {"reference": "Patient/p"}, "effectiveDateTime": "2024-01-01T00:00:00Z",
        "valueQuantity": {"value": 97, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}});
    assert_eq!(profile_violations(&ok), Vec::<String>::new());
    let mut no_subject = ok.clone();
    no_subject.as_object_mut().unwrap().remove("subject");
    assert_eq!(profile_violations(&no_subject).len(), 1);
    let mut text = ok.clone();
    text.as_object_mut().unwrap().remove("valueQuantity");
    text["valueString"] = "x".into();
    assert_eq!(profile_violations(&text).len(), 2);
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

    // No resource claims a profile it does not meet (the unattributed
    // readings, the text and coded values included), and the claims are
    // not simply dropped: attributed vital signs keep theirs.
    let violations: Vec<String> = resources.iter().flat_map(profile_violations).collect();
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(
        has(&|r| r["meta"]["profile"][1] == "http://hl7.org/fhir/StructureDefinition/oxygensat"),
        "an attributed SpO2 claims oxygensat"
    );
    assert!(
        has(&|r| r["meta"]["profile"][1] == "http://hl7.org/fhir/StructureDefinition/bp"),
        "an attributed BP panel claims bp"
    );

    let (ok, report) = validate_fhir(&resources);
    eprintln!("{report}");
    assert!(ok, "the FHIR validator found errors:\n{report}");
    assert!(report.contains(" 0 errors"), "{report}");
    hub.stop().await;
}
