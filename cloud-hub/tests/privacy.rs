//! Patients' rights over HTTP (docs/privacy.md): subject access
//! (`$everything`), legal hold, erasure, all for the privacy role and
//! audited; late data of an erased patient stays out.

use crate::common;

use common::*;
use serde_json::{Value, json};

async fn token(hub: &TestHub, name: &str, role: cloud_hub::access::Role) -> String {
    cloud_hub::token_create(&hub.config, name, role).unwrap()
}

#[tokio::test]
async fn a_privacy_officer_exports_holds_and_erases_a_patient_and_late_data_stays_out() {
    subject_rights(TestHub::start().await).await;
}

#[tokio::test]
async fn a_privacy_officer_exports_holds_and_erases_a_patient_on_postgres() {
    let server = crate::pg_server::PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "").on_postgres(&server.url(), 2);
    let config = cloud_hub::Config::parse(&text).unwrap();
    subject_rights(TestHub::start_config(dir, config, "http").await).await;
    drop(server);
}

async fn subject_rights(hub: TestHub) {
    let officer = token(&hub, "dpo", cloud_hub::access::Role::Privacy).await;
    let nurse = token(&hub, "nurse", cloud_hub::access::Role::Clinician).await;
    // Two readings of the patient (the device is associated in the config).
    let ack = hub
        .ingest(&batch(
            1,
            DEVICE,
            vec![spo2(1, 97.0, T0), spo2(2, 93.0, T0 + MINUTE)],
        ))
        .await;
    assert_eq!(ack.accepted, 2);
    let path = format!("/api/v1/patients/{PATIENT}/$everything");
    let series = format!(
        "/api/v1/patients/{PATIENT}/series?code=59408-5&resolution=60\
         &from=2024-05-01T10:00:00Z&to=2024-05-01T11:00:00Z"
    );
    let (status, chart) = hub.get_json(&series).await;
    assert_eq!(status, 200, "{chart}");
    assert_eq!(chart["points"].as_array().map(Vec::len), Some(2), "{chart}");

    // Clinicians read wards, not whole records: 403. The officer gets a Bundle.
    let (status, _) = call_json(&hub, Some(&nurse), "GET", &path, None).await;
    assert_eq!(status, 403);
    let (status, bundle) = call_json(&hub, Some(&officer), "GET", &path, None).await;
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(bundle["resourceType"], "Bundle");
    let resources: Vec<&Value> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let of = |t: &str| resources.iter().filter(|r| r["resourceType"] == t).count();
    assert_eq!(of("Patient"), 1);
    let values: Vec<f64> = resources
        .iter()
        .filter(|r| r["resourceType"] == "Observation")
        .filter_map(|r| r["valueQuantity"]["value"].as_f64())
        .collect();
    assert_eq!(values, vec![97.0, 93.0]);
    // The nurse's refused read is an audit entry about the patient.
    assert!(of("AuditEvent") >= 1, "{bundle}");
    let owned: Vec<Value> = resources.iter().map(|r| (*r).clone()).collect();
    let (valid, report) = validate_fhir(&owned);
    assert!(valid, "{report}");
    // NDJSON: one resource per line, the same count.
    let resp = hub
        .client
        .get(hub.url(&format!("{path}?_format=ndjson")))
        .bearer_auth(&officer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.lines().count() >= resources.len());

    // A legal hold blocks the erasure.
    let hold = format!("/api/v1/patients/{PATIENT}/legal-hold");
    let (status, body) = call_json(
        &hub,
        Some(&officer),
        "PUT",
        &hold,
        Some(json!({ "reason": "claim 2026-41" })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let erase = format!("/api/v1/patients/{PATIENT}/erase");
    let why = Some(json!({ "reason": "GDPR art. 17 request 2026-12-06" }));
    let (status, body) = call_json(&hub, Some(&officer), "POST", &erase, why.clone()).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = call_json(&hub, Some(&officer), "DELETE", &hold, None).await;
    assert_eq!(status, 200);
    // A reason is required; then the erasure.
    let (status, body) = call_json(&hub, Some(&officer), "POST", &erase, Some(json!({}))).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = call_json(&hub, Some(&officer), "POST", &erase, why).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["removed"]["observations"], 2);

    // Nothing of the patient through any API.
    let (status, b) = hub
        .get_json(&format!("/fhir/Observation?patient={PATIENT}"))
        .await;
    assert_eq!((status, b["total"].as_u64()), (200, Some(0)));
    let (status, _) = hub.get_json(&format!("/fhir/Patient/{PATIENT}")).await;
    assert_eq!(status, 404);
    let (status, _) = call_json(&hub, Some(&officer), "GET", &path, None).await;
    assert_eq!(status, 404);
    let (status, chart) = hub.get_json(&series).await;
    assert_eq!(status, 200, "{chart}");
    assert_eq!(chart["points"].as_array().map(Vec::len), Some(0), "{chart}");
    let (_, history) = hub
        .get_json(&format!("/api/v1/patients/{PATIENT}/scores/history"))
        .await;
    assert!(
        !history.to_string().contains("\"total\""),
        "no score is left: {history}"
    );

    // A late reading from inside the erased span is dropped, not stored.
    let late = hub
        .ingest(&batch(2, DEVICE, vec![spo2(3, 95.0, T0 + MINUTE / 2)]))
        .await;
    assert_eq!((late.accepted, late.rejected), (0, 0));
    let (_, b) = hub.get_json("/fhir/Observation").await;
    assert_eq!(b["total"], 0, "{b}");
    let metrics = hub.metrics().await;
    assert!(
        metrics.contains("vigil_hub_readings_erased_total 1"),
        "{metrics}"
    );

    // The audit log keeps that the erasure happened, with the counts and
    // the reason, and no observation values.
    let entries = cloud_hub::audit::entries(
        &cloud_hub::Store::open_config(&hub.config.storage)
            .unwrap()
            .handle(),
        i64::MIN,
    )
    .unwrap();
    let erasure = entries
        .iter()
        .find(|e| e.entry.action == "erase")
        .expect("an erase entry");
    assert!(
        erasure.entry.detail.contains("observations=2"),
        "{:?}",
        erasure.entry
    );
    assert!(erasure.entry.detail.contains("GDPR art. 17"));
    assert!(
        erasure.entry.actor.starts_with("token:dpo"),
        "{}",
        erasure.entry.actor
    );
    assert!(entries.iter().any(|e| e.entry.action == "legal-hold"));
    hub.stop().await;
}

/// The CLI's commands (`cloud-hub patient everything|hold|release|erase`)
/// do the same through the library, audited as `cli`.
#[tokio::test]
async fn the_cli_exports_holds_and_erases_a_patient() {
    let hub = TestHub::start().await;
    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, T0)])).await;
    let config = hub.config.clone();
    tokio::task::spawn_blocking(move || {
        let lines = cloud_hub::patient_everything(&config, PATIENT).unwrap();
        let types: Vec<String> = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["resourceType"].to_string())
            .collect();
        assert!(types.contains(&"\"Patient\"".to_string()), "{types:?}");
        assert!(types.contains(&"\"Observation\"".to_string()), "{types:?}");
        cloud_hub::patient_hold(&config, PATIENT, Some("audit 7")).unwrap();
        assert!(matches!(
            cloud_hub::patient_erase(&config, PATIENT, "request 9"),
            Err(cloud_hub::HubError::Erasure(
                cloud_hub::privacy::ErasureError::LegalHold { .. }
            ))
        ));
        assert!(matches!(
            cloud_hub::patient_hold(&config, "nobody", Some("x")),
            Err(cloud_hub::HubError::UnknownPatient(_))
        ));
        cloud_hub::patient_hold(&config, PATIENT, None).unwrap();
        let erased = cloud_hub::patient_erase(&config, PATIENT, "request 9").unwrap();
        assert_eq!(erased.counts.observations, 1);
        assert!(matches!(
            cloud_hub::patient_everything(&config, PATIENT),
            Err(cloud_hub::HubError::UnknownPatient(_))
        ));
        let store = cloud_hub::Store::open_config(&config.storage).unwrap();
        let entries = cloud_hub::audit::entries(&store.handle(), i64::MIN).unwrap();
        let erase = entries.iter().find(|e| e.entry.action == "erase").unwrap();
        assert_eq!(erase.entry.actor, "cli");
        assert!(erase.entry.detail.contains("reason=request 9"));
    })
    .await
    .unwrap();
    hub.stop().await;
}
