//! FHIR resources beyond single readings: blood-pressure panels, waveforms
//! as SampledData, Device resources, and the category/device search
//! parameters.

use crate::common;

use common::*;
use serde_json::Value;
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Reading, Waveform, reading};

fn nibp(seq: u64, mdc: u32, value: f64, time_us: i64) -> Reading {
    Reading {
        mdc_code: mdc,
        vendor_label: "NIBP".into(),
        value: Some(reading::Value::Numeric(value)),
        mdc_unit: units::MMHG.mdc,
        ucum_unit: "mm[Hg]".into(),
        ..spo2(seq, 0.0, time_us)
    }
}

fn entries(bundle: &Value) -> Vec<Value> {
    bundle["entry"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {bundle}"))
        .iter()
        .map(|e| e["resource"].clone())
        .collect()
}

fn code_of(r: &Value, system: &str) -> Option<String> {
    r["code"]["coding"]
        .as_array()?
        .iter()
        .find(|c| c["system"] == system)
        .and_then(|c| c["code"].as_str())
        .map(str::to_owned)
}

/// Systolic + diastolic + mean measured together become one BP panel
/// (85354-9) with three components; the parts are not listed on their own.
#[tokio::test]
async fn blood_pressure_is_one_panel_with_components() {
    let hub = TestHub::start().await;
    let ack = hub
        .ingest(&batch(
            1,
            DEVICE,
            vec![
                nibp(1, codes::PRESS_BLD_NONINV_SYS, 120.0, T0),
                nibp(2, codes::PRESS_BLD_NONINV_DIA, 80.0, T0),
                nibp(3, codes::PRESS_BLD_NONINV_MEAN, 93.0, T0),
                // A lone systolic at another time stays a single Observation.
                nibp(4, codes::PRESS_BLD_NONINV_SYS, 121.0, T0 + MINUTE),
                spo2(5, 97.0, T0),
            ],
        ))
        .await;
    assert_eq!((ack.accepted, ack.rejected), (5, 0));

    let (status, bundle) = hub
        .get_json(&format!(
            "/fhir/Observation?patient={PATIENT}&code=http://loinc.org|85354-9"
        ))
        .await;
    assert_eq!(status, 200, "{bundle}");
    let panels = entries(&bundle);
    assert_eq!(panels.len(), 1, "{bundle}");
    let p = &panels[0];
    assert_eq!(
        p["id"],
        cloud_hub::fhir::render::panel_id(GATEWAY, DEVICE, 1)
    );
    assert_eq!(code_of(p, "http://loinc.org").as_deref(), Some("85354-9"));
    assert_eq!(
        code_of(p, "urn:iso:std:iso:11073:10101").as_deref(),
        Some("150020")
    );
    let profiles = p["meta"]["profile"].as_array().unwrap();
    assert!(profiles.contains(&Value::from("http://hl7.org/fhir/StructureDefinition/bp")));
    assert!(
        p.get("valueQuantity").is_none(),
        "a panel has no value of its own"
    );
    assert_eq!(p["subject"]["reference"], format!("Patient/{PATIENT}"));
    assert_eq!(p["effectiveDateTime"], "2024-05-01T10:00:00Z");
    let comps = p["component"].as_array().unwrap();
    let got: Vec<(String, f64, String)> = comps
        .iter()
        .map(|c| {
            (
                code_of(c, "http://loinc.org").unwrap(),
                c["valueQuantity"]["value"].as_f64().unwrap(),
                c["valueQuantity"]["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("8480-6".into(), 120.0, "mm[Hg]".into()),
            ("8462-4".into(), 80.0, "mm[Hg]".into()),
            ("8478-0".into(), 93.0, "mm[Hg]".into()),
        ]
    );

    // The panel's parts are not listed again; the lone systolic is.
    let (_, all) = hub
        .get_json(&format!("/fhir/Observation?patient={PATIENT}"))
        .await;
    let all = entries(&all);
    assert_eq!(all.len(), 3, "panel + lone systolic + SpO2");
    let sys_alone: Vec<&Value> = all
        .iter()
        .filter(|r| code_of(r, "http://loinc.org").as_deref() == Some("8480-6"))
        .collect();
    assert_eq!(sys_alone.len(), 1);
    assert_eq!(sys_alone[0]["valueQuantity"]["value"], 121.0);
    // Searching by the MDC compound code finds the panel too.
    let (_, by_mdc) = hub
        .get_json("/fhir/Observation?code=urn:iso:std:iso:11073:10101|150020")
        .await;
    assert_eq!(entries(&by_mdc).len(), 1);

    // Re-sending the same readings in a new batch adds nothing.
    let ack = hub
        .ingest(&batch(
            2,
            DEVICE,
            vec![
                nibp(1, codes::PRESS_BLD_NONINV_SYS, 120.0, T0),
                nibp(2, codes::PRESS_BLD_NONINV_DIA, 80.0, T0),
                nibp(3, codes::PRESS_BLD_NONINV_MEAN, 93.0, T0),
            ],
        ))
        .await;
    assert_eq!((ack.accepted, ack.duplicates), (0, 3));
    let (_, again) = hub.get_json("/fhir/Observation?code=85354-9").await;
    assert_eq!(again["total"], 1);
    hub.stop().await;
}

/// An invalid component keeps the panel: the component gets a
/// dataAbsentReason, never a value.
#[tokio::test]
async fn invalid_component_is_absent_not_a_value() {
    let hub = TestHub::start().await;
    let mut dia = nibp(2, codes::PRESS_BLD_NONINV_DIA, 80.0, T0);
    dia.validity = 3; // INVALID
    let ack = hub
        .ingest(&batch(
            1,
            DEVICE,
            vec![nibp(1, codes::PRESS_BLD_NONINV_SYS, 120.0, T0), dia],
        ))
        .await;
    assert_eq!(ack.accepted, 2);
    let (_, bundle) = hub.get_json("/fhir/Observation?code=85354-9").await;
    let p = &entries(&bundle)[0];
    let comps = p["component"].as_array().unwrap();
    assert_eq!(comps.len(), 2);
    assert_eq!(comps[0]["valueQuantity"]["value"], 120.0);
    assert!(comps[1].get("valueQuantity").is_none(), "{p}");
    assert_eq!(comps[1]["dataAbsentReason"]["coding"][0]["code"], "error");
    hub.stop().await;
}

/// A waveform is an Observation with valueSampledData: physical value =
/// origin + factor × sample, period in ms.
#[tokio::test]
async fn waveform_is_sampled_data() {
    let hub = TestHub::start().await;
    let mut b = batch(1, DEVICE, vec![]);
    b.devices[0].waveforms.push(Waveform {
        mdc_code: 150_452,
        vendor_label: "PLETH".into(),
        start_time_us: T0,
        sample_period_us: 13_333,
        scale: 0.5,
        offset: -10.0,
        mdc_unit: 0,
        ucum_unit: "1".into(),
        samples: vec![1, -2, 300],
        validity: 1,
        sequence: 7,
        ..Default::default()
    });
    assert_eq!(hub.ingest(&b).await.accepted, 1);
    let id = cloud_hub::fhir::observation_id(GATEWAY, DEVICE, 7);
    let (status, r) = hub.get_json(&format!("/fhir/Observation/{id}")).await;
    assert_eq!(status, 200, "{r}");
    let sd = &r["valueSampledData"];
    assert_eq!(sd["origin"]["value"], -10.0);
    assert_eq!(sd["origin"]["code"], "1");
    assert_eq!(sd["factor"], 0.5);
    assert_eq!(sd["period"], 13.333);
    assert_eq!(sd["dimensions"], 1);
    assert_eq!(sd["data"], "1 -2 300");
    assert_eq!(r["effectivePeriod"]["start"], "2024-05-01T10:00:00Z");
    assert_eq!(r["effectivePeriod"]["end"], "2024-05-01T10:00:00.026666Z");
    assert_eq!(
        code_of(&r, "urn:iso:std:iso:11073:10101").as_deref(),
        Some("150452")
    );
    assert_eq!(r["subject"]["reference"], format!("Patient/{PATIENT}"));
    // Found by its MDC code; not a vital sign.
    let (_, by_code) = hub
        .get_json("/fhir/Observation?code=urn:iso:std:iso:11073:10101|150452")
        .await;
    assert_eq!(by_code["total"], 1);
    let (_, vitals) = hub.get_json("/fhir/Observation?category=vital-signs").await;
    assert_eq!(vitals["total"], 0);
    hub.stop().await;
}

/// Device resources, referenced from Observations and searchable by them.
#[tokio::test]
async fn devices_are_resources_and_search_parameters() {
    let hub = TestHub::start().await;
    assert_eq!(
        hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, T0)]))
            .await
            .accepted,
        1
    );
    assert_eq!(
        hub.ingest(&batch(2, "masimo-2", vec![spo2(1, 95.0, T0)]))
            .await
            .accepted,
        1
    );
    let dev_id = cloud_hub::fhir::render::device_resource_id(GATEWAY, DEVICE);
    let (status, d) = hub.get_json(&format!("/fhir/Device/{dev_id}")).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["resourceType"], "Device");
    assert_eq!(d["manufacturer"], "Masimo");
    assert_eq!(d["serialNumber"], "1234");
    assert_eq!(d["identifier"][0]["value"], DEVICE);
    assert!(
        d.to_string().find("ICU-3").is_none(),
        "the gateway's bed label is not a Device attribute: {d}"
    );
    let (status, _) = hub.get_json("/fhir/Device/unknown").await;
    assert_eq!(status, 404);
    let (_, all) = hub.get_json("/fhir/Device").await;
    assert_eq!(all["total"], 2);

    let (_, obs) = hub
        .get_json(&format!("/fhir/Observation?device=Device/{dev_id}"))
        .await;
    let found = entries(&obs);
    assert_eq!(found.len(), 1, "{obs}");
    assert_eq!(found[0]["device"]["reference"], format!("Device/{dev_id}"));
    assert_eq!(found[0]["valueQuantity"]["value"], 97.0);

    let (_, cat) = hub
        .get_json(
            "/fhir/Observation?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
        )
        .await;
    assert_eq!(cat["total"], 2);
    let (_, lab) = hub.get_json("/fhir/Observation?category=laboratory").await;
    assert_eq!(lab["total"], 0);
    let (_, other) = hub
        .get_json("/fhir/Observation?category=http://example.org|vital-signs")
        .await;
    assert_eq!(other["total"], 0);
    let (status, bad) = hub.get_json("/fhir/Observation?device=no%20spaces").await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["resourceType"], "OperationOutcome");
    hub.stop().await;
}

/// A stored row that can no longer be decoded is reported, not hidden:
/// read gives a 500 OperationOutcome, search an `outcome` entry.
#[tokio::test]
async fn a_corrupt_row_is_reported_not_hidden() {
    let hub = TestHub::start().await;
    assert_eq!(
        hub.ingest(&batch(
            1,
            DEVICE,
            vec![spo2(1, 97.0, T0), spo2(2, 98.0, T0 + MINUTE)]
        ))
        .await
        .accepted,
        2
    );
    let id1 = cloud_hub::fhir::observation_id(GATEWAY, DEVICE, 1);
    hub.db()
        .execute(
            "UPDATE observations SET payload = x'ffffffff' WHERE id = ?1",
            [&id1],
        )
        .unwrap();
    let (status, r) = hub.get_json(&format!("/fhir/Observation/{id1}")).await;
    assert_eq!(status, 500, "{r}");
    assert_eq!(r["resourceType"], "OperationOutcome");
    let (status, bundle) = hub.get_json("/fhir/Observation").await;
    assert_eq!(status, 200);
    assert_eq!(bundle["total"], 2);
    let e = bundle["entry"].as_array().unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0]["search"]["mode"], "outcome");
    assert_eq!(e[1]["resource"]["valueQuantity"]["value"], 98.0);
    hub.stop().await;
}

/// Patients are identifiers only; beds are Locations.
#[tokio::test]
async fn patients_and_locations() {
    let hub = TestHub::start().await;
    let mut own = spo2(1, 96.0, T0);
    own.subject = Some(shared_protocol::v1::Identifier {
        system: "urn:oid:1.2.3".into(),
        value: "MRN-7".into(),
    });
    assert_eq!(
        hub.ingest(&batch(1, "hl7-dev", vec![own])).await.accepted,
        1
    );
    let (status, p) = hub.get_json("/fhir/Patient/MRN-7").await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        p,
        serde_json::json!({ "resourceType": "Patient", "id": "MRN-7",
                            "identifier": [{ "system": "urn:oid:1.2.3", "value": "MRN-7" }] })
    );
    let (status, _) = hub.get_json("/fhir/Patient/nobody").await;
    assert_eq!(status, 404);

    hub.db()
        .execute(
            "INSERT INTO beds (id, ward, label, created_us) VALUES ('bed_7', 'ICU-3', 'Bed 7', 0)",
            [],
        )
        .unwrap();
    let (_, all) = hub.get_json("/fhir/Location").await;
    assert_eq!(all["total"], 1);
    let l = &all["entry"][0]["resource"];
    let id = cloud_hub::fhir::render::location_id("bed_7");
    assert_ne!(id, "bed_7", "`_` is not allowed in FHIR ids");
    assert_eq!(l["id"], id.as_str());
    assert_eq!(l["identifier"][0]["value"], "bed_7");
    assert_eq!(l["physicalType"]["coding"][0]["code"], "bd");
    let (status, one) = hub.get_json(&format!("/fhir/Location/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(&one, l);
    hub.stop().await;
}

/// The search index answers the common query (one patient, one metric, a
/// time range, newest first) without a sort step, and concurrent ingests
/// share WAL fsyncs (group commit) while every ack waits for one.
#[tokio::test]
async fn search_uses_the_index_and_acks_wait_for_wal_fsyncs() {
    let hub = TestHub::start().await;
    let db = hub.db();
    let plan: Vec<String> = db
        .prepare(
            "EXPLAIN QUERY PLAN SELECT o.id FROM observations o
              WHERE o.panel_id IS NULL AND o.patient_id IN (?1) AND (o.mdc_code = ?2)
                AND o.effective_us >= ?3
              ORDER BY o.effective_us DESC, o.rowid DESC LIMIT 100",
        )
        .unwrap()
        .query_map(rusqlite::params!["p", 150_456, 0], |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        plan.iter().any(|p| p.contains("observations_search")),
        "{plan:?}"
    );
    assert!(
        !plan.iter().any(|p| p.contains("TEMP B-TREE")),
        "no sort step: {plan:?}"
    );

    let store = cloud_hub::store::Store::open(&hub.dir.path().join("hub.sqlite")).unwrap();
    let mut threads = Vec::new();
    for t in 0..8u64 {
        let s = store.clone();
        threads.push(std::thread::spawn(move || {
            for k in 0..10u64 {
                let b = batch(
                    100 + t * 10 + k,
                    DEVICE,
                    vec![spo2(1000 + t * 10 + k, 97.0, T0)],
                );
                let r = s
                    .ingest(GATEWAY, &b, &Default::default(), now_us(), now_us())
                    .unwrap();
                assert_eq!(r.ack.accepted, 1);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let fsyncs = store.wal_fsyncs();
    assert!(
        (1..=80).contains(&fsyncs),
        "every ack waited for an fsync, at most one each: {fsyncs}"
    );
    hub.stop().await;
}

/// Blood-pressure parts naming different patients (two HL7 senders through
/// one listener in the same second) are never combined into one panel.
#[tokio::test]
async fn bp_parts_of_different_patients_are_not_one_panel() {
    let hub = TestHub::start().await;
    let with = |mut r: Reading, who: &str| {
        r.subject = Some(shared_protocol::v1::Identifier {
            system: "urn:oid:1.2.3".into(),
            value: who.into(),
        });
        r
    };
    let ack = hub
        .ingest(&batch(
            1,
            "hl7-1",
            vec![
                with(nibp(1, codes::PRESS_BLD_NONINV_SYS, 121.0, T0), "MRN-A"),
                with(nibp(2, codes::PRESS_BLD_NONINV_DIA, 76.0, T0), "MRN-B"),
            ],
        ))
        .await;
    assert_eq!(ack.accepted, 2);
    let (_, panels) = hub.get_json("/fhir/Observation?code=85354-9").await;
    assert_eq!(panels["total"], 0, "{panels}");
    for (p, loinc, v) in [("MRN-A", "8480-6", 121.0), ("MRN-B", "8462-4", 76.0)] {
        let (_, b) = hub
            .get_json(&format!("/fhir/Observation?patient={p}"))
            .await;
        let e = entries(&b);
        assert_eq!(e.len(), 1, "{b}");
        assert_eq!(code_of(&e[0], "http://loinc.org").as_deref(), Some(loinc));
        assert_eq!(e[0]["valueQuantity"]["value"], v);
    }
    hub.stop().await;
}
