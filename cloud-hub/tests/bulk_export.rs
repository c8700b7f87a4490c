//! FHIR Bulk Data export: kick-off, status polling, NDJSON files, scopes
//! (system, patients, group = ward), `_type`/`_since`, cancel, errors.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Reading, reading};

fn nibp(seq: u64, mdc: u32, value: f64) -> Reading {
    Reading {
        mdc_code: mdc,
        value: Some(reading::Value::Numeric(value)),
        mdc_unit: units::MMHG.mdc,
        ucum_unit: "mm[Hg]".into(),
        ..spo2(seq, 0.0, T0)
    }
}

async fn seeded() -> TestHub {
    let hub = TestHub::start().await;
    let mut readings: Vec<Reading> = (1..=40)
        .map(|i| spo2(i, 95.0 + (i % 4) as f64, T0 + i as i64 * MINUTE))
        .collect();
    readings.push(nibp(41, codes::PRESS_BLD_NONINV_SYS, 120.0));
    readings.push(nibp(42, codes::PRESS_BLD_NONINV_DIA, 80.0));
    assert_eq!(hub.ingest(&batch(1, DEVICE, readings)).await.accepted, 42);
    // An unattributed device.
    assert_eq!(
        hub.ingest(&batch(2, "stray", vec![spo2(1, 90.0, T0)]))
            .await
            .accepted,
        1
    );
    hub
}

/// Kicks off `path`; returns the status URL.
async fn kick_off(hub: &TestHub, path: &str) -> String {
    let resp = hub
        .client
        .get(hub.url(path))
        .header("Prefer", "respond-async")
        .header("Accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        202,
        "{path}: {:?}",
        resp.text().await
    );
    resp.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn wait_done(hub: &TestHub, status_url: &str) -> Value {
    for _ in 0..200 {
        let resp = hub.client.get(status_url).send().await.unwrap();
        match resp.status().as_u16() {
            202 => {
                assert!(resp.headers().contains_key("x-progress"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            200 => return serde_json::from_str(&resp.text().await.unwrap()).unwrap(),
            s => panic!("status {s}: {:?}", resp.text().await),
        }
    }
    panic!("export did not finish");
}

/// Downloads every output file: (type, resources).
async fn download(hub: &TestHub, manifest: &Value) -> Vec<(String, Vec<Value>)> {
    let mut out = Vec::new();
    for o in manifest["output"].as_array().unwrap() {
        let resp = hub
            .client
            .get(o["url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["content-type"], "application/fhir+ndjson");
        let text = resp.text().await.unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, o["count"].as_u64().unwrap());
        for r in &lines {
            assert_eq!(r["resourceType"], o["type"]);
        }
        out.push((o["type"].as_str().unwrap().to_owned(), lines));
    }
    out
}

fn count(files: &[(String, Vec<Value>)], ty: &str) -> usize {
    files
        .iter()
        .filter(|(t, _)| t == ty)
        .map(|(_, v)| v.len())
        .sum()
}

#[tokio::test]
async fn system_export_has_everything_and_validates() {
    let hub = seeded().await;
    let status_url = kick_off(&hub, "/fhir/$export").await;
    assert!(status_url.contains("/fhir/$export-status/"), "{status_url}");
    let manifest = wait_done(&hub, &status_url).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    assert!(
        manifest["request"]
            .as_str()
            .unwrap()
            .ends_with("/fhir/$export")
    );
    assert!(manifest["transactionTime"].as_str().unwrap().ends_with('Z'));
    let files = download(&hub, &manifest).await;
    // 40 SpO2 + 1 BP panel (its two parts inside) + the stray reading.
    assert_eq!(count(&files, "Observation"), 42);
    assert_eq!(count(&files, "Patient"), 1);
    assert_eq!(count(&files, "Device"), 2);
    let all: Vec<Value> = files.into_iter().flat_map(|(_, v)| v).collect();
    let (ok, report) = validate_fhir(&all);
    assert!(ok, "{report}");
    hub.stop().await;
}

#[tokio::test]
async fn patient_and_group_exports_hold_only_attributed_data() {
    let hub = seeded().await;
    let manifest = wait_done(&hub, &kick_off(&hub, "/fhir/Patient/$export").await).await;
    let files = download(&hub, &manifest).await;
    assert_eq!(count(&files, "Observation"), 41, "no unattributed reading");
    assert_eq!(count(&files, "Device"), 1, "only the patient's device");
    assert_eq!(count(&files, "Location"), 0);
    // The download of a file holding the patient's data names the patient
    // in the audit log; the Device file names nobody.
    let audited: Vec<(String, Option<String>)> = hub
        .db()
        .prepare("SELECT resource, patient_id FROM audit_log WHERE resource LIKE '%$export-file%'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!audited.is_empty());
    for (resource, patient) in &audited {
        let expected = (!resource.contains("/Device-")).then_some(PATIENT);
        assert_eq!(patient.as_deref(), expected, "{resource}");
    }

    // A ward with patient-1's stay is a Group.
    let db = hub.db();
    db.execute(
        "INSERT INTO beds (id, ward, label, created_us) VALUES ('b1', 'ICU-3', 'Bed 1', 0)",
        [],
    )
    .unwrap();
    db.execute(
        "INSERT INTO patient_stays (patient_system, patient_value, bed_id, from_us)
         VALUES ('', ?1, 'b1', 0)",
        [PATIENT],
    )
    .unwrap();
    db.execute(
        "INSERT INTO beds (id, ward, label, created_us) VALUES ('b2', 'WARD-9', 'Bed 2', 0)",
        [],
    )
    .unwrap();
    let manifest = wait_done(&hub, &kick_off(&hub, "/fhir/Group/ICU-3/$export").await).await;
    assert_eq!(count(&download(&hub, &manifest).await, "Observation"), 41);
    let manifest = wait_done(&hub, &kick_off(&hub, "/fhir/Group/WARD-9/$export").await).await;
    assert_eq!(count(&download(&hub, &manifest).await, "Observation"), 0);
    let resp = hub
        .client
        .get(hub.url("/fhir/Group/nowhere/$export"))
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    hub.stop().await;
}

#[tokio::test]
async fn type_and_since_filter() {
    let hub = seeded().await;
    let manifest = wait_done(
        &hub,
        &kick_off(&hub, "/fhir/$export?_type=Device,Location").await,
    )
    .await;
    let files = download(&hub, &manifest).await;
    assert_eq!(count(&files, "Observation"), 0);
    assert_eq!(count(&files, "Device"), 2);
    // Everything was stored before a time in the future.
    let manifest = wait_done(
        &hub,
        &kick_off(
            &hub,
            "/fhir/$export?_type=Observation&_since=2100-01-01T00:00:00Z",
        )
        .await,
    )
    .await;
    assert_eq!(count(&download(&hub, &manifest).await, "Observation"), 0);
    hub.stop().await;
}

#[tokio::test]
async fn bad_requests_cancel_and_unknown_jobs() {
    let hub = seeded().await;
    // No Prefer: respond-async.
    let (status, body) = hub.get_json("/fhir/$export").await;
    assert_eq!(status, 400);
    assert_eq!(body["resourceType"], "OperationOutcome");
    for q in [
        "_type=Medication",
        "_since=last-week",
        "_outputFormat=text/csv",
        "_typeFilter=x",
    ] {
        let resp = hub
            .client
            .get(hub.url(&format!("/fhir/$export?{q}")))
            .header("Prefer", "respond-async")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{q}");
    }
    let status_url = kick_off(&hub, "/fhir/$export").await;
    let manifest = wait_done(&hub, &status_url).await;
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let resp = hub.client.delete(&status_url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(
        hub.client
            .get(&status_url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    assert_eq!(
        hub.client
            .get(&file_url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    // Path tricks do not reach the file system.
    let (status, _) = hub
        .get_json("/fhir/$export-file/0000/..%2F..%2Fhub.sqlite")
        .await;
    assert_eq!(status, 404);
    hub.stop().await;
}
