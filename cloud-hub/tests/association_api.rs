//! The association API over HTTP: admin token, beds, placements, stays,
//! occupancy, re-attribution of stored readings, and error shapes.

use crate::common;

use common::*;
use serde_json::{Value, json};

const ADMIN: &str = "0123456789abcdef0123456789abcdef-admin";
/// T0 (2024-05-01T10:00:00Z) and later, as RFC 3339.
const AT_T0: &str = "2024-05-01T10:00:00Z";
const AT_T0_PLUS_5: &str = "2024-05-01T10:05:00Z";

async fn hub_with_admin_token() -> TestHub {
    let data = tempfile::tempdir().unwrap();
    let mut hub = start_with_admin(data.path(), ADMIN, "").await;
    hub.dir = data;
    hub
}

async fn call(hub: &TestHub, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_as(hub, Some(ADMIN), method, path, body).await
}

async fn call_as(
    hub: &TestHub,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    call_json(hub, token, method, path, body).await
}

async fn total_for(hub: &TestHub, patient: &str) -> u64 {
    let (status, bundle) = hub
        .get_json(&format!("/fhir/Observation?patient={patient}"))
        .await;
    assert_eq!(status, 200, "{bundle}");
    bundle["total"].as_u64().unwrap()
}

#[tokio::test]
async fn without_credentials_the_api_answers_401_saying_how_to_authenticate() {
    let hub = TestHub::start().await;
    let (status, body) = call_as(&hub, None, "GET", "/api/v1/beds", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer"),
        "{body}"
    );
    // Without an admin token file, an API token of a permitted role works.
    let (status, body) = call_as(&hub, Some(&hub.reader), "GET", "/api/v1/beds", None).await;
    assert_eq!(status, 200, "{body}");
    hub.stop().await;
}

#[tokio::test]
async fn the_admin_token_is_required() {
    let hub = hub_with_admin_token().await;
    let (status, body) = call_as(&hub, None, "GET", "/api/v1/beds", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = call_as(&hub, Some("not-the-token"), "GET", "/api/v1/beds", None).await;
    assert_eq!(status, 401);
    // A gateway's token is not an admin token.
    let gw = hub.token.clone();
    let (status, _) = call_as(&hub, Some(&gw), "GET", "/api/v1/beds", None).await;
    assert_eq!(status, 401);
    let (status, body) = call(&hub, "GET", "/api/v1/beds", None).await;
    assert_eq!((status, body), (200, json!({ "beds": [] })));
    hub.stop().await;
}

#[tokio::test]
async fn beds_placements_and_stays_attribute_readings_over_http() {
    let hub = hub_with_admin_token().await;
    for (id, label) in [("icu3-07", "Bed 7"), ("icu3-08", "Bed 8")] {
        let (status, body) = call(
            &hub,
            "POST",
            "/api/v1/beds",
            Some(json!({ "id": id, "ward": "ICU 3", "label": label })),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/beds",
        Some(json!({ "id": "icu3-07", "ward": "ICU 3", "label": "again" })),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (_, body) = call(&hub, "GET", "/api/v1/beds", None).await;
    assert_eq!(body["beds"].as_array().unwrap().len(), 2);

    // A reading of a device nobody placed yet: held, no patient.
    let ack = hub
        .ingest(&batch(1, "mon-7", vec![spo2(1, 95.0, T0 + MINUTE)]))
        .await;
    assert_eq!(ack.accepted, 1);
    assert_eq!(total_for(&hub, "MRN-1").await, 0);

    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/placements",
        Some(json!({ "gateway_id": GATEWAY, "device_id": "mon-7", "bed_id": "icu3-07", "at": AT_T0, "reason": "recorded late" })),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "reattributed": 0 })));
    let patient = json!({ "system": "urn:oid:1.2.3.4", "value": "MRN-1" });
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/patients/admit",
        Some(json!({ "patient": patient, "bed_id": "icu3-07", "at": AT_T0, "reason": "recorded late" })),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "reattributed": 1 })));
    assert_eq!(total_for(&hub, "MRN-1").await, 1);

    // New readings are attributed at ingest.
    hub.ingest(&batch(2, "mon-7", vec![spo2(2, 96.0, T0 + 2 * MINUTE)]))
        .await;
    assert_eq!(total_for(&hub, "MRN-1").await, 2);

    let (status, body) = call(
        &hub,
        "GET",
        &format!("/api/v1/occupancy?at={}", "2024-05-01T10:03:00Z"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let bed = &body["beds"][0];
    assert_eq!(bed["id"], "icu3-07");
    assert_eq!(bed["patient"]["value"], "MRN-1");
    assert_eq!(bed["patient"]["since"], "2024-05-01T10:00:00Z");
    assert_eq!(bed["devices"][0]["device_id"], "mon-7");
    assert_eq!(body["beds"][1]["patient"], Value::Null);

    // Conflicts and unknown beds.
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/patients/admit",
        Some(json!({ "patient": { "value": "MRN-2" }, "bed_id": "icu3-07", "at": AT_T0_PLUS_5, "reason": "recorded late" })),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/patients/transfer",
        Some(json!({ "patient": patient, "bed_id": "icu9-01" })),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["field"], "bed_id");

    // Discharged (back-dated) one minute after admission: the reading at
    // T0 + 2 min no longer belongs to MRN-1.
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/patients/discharge",
        Some(
            json!({ "patient": patient, "at": "2024-05-01T10:01:30Z", "reason": "recorded late" }),
        ),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "reattributed": 1 })));
    assert_eq!(total_for(&hub, "MRN-1").await, 1);

    // Ending the placement at T0: the remaining reading is held again.
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/placements/end",
        Some(json!({ "gateway_id": GATEWAY, "device_id": "mon-7", "at": AT_T0, "reason": "recorded late" })),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "reattributed": 1 })));
    assert_eq!(total_for(&hub, "MRN-1").await, 0);
    hub.stop().await;
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let hub = hub_with_admin_token().await;
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/beds",
        Some(json!({ "id": "bed 1", "ward": "W", "label": "L" })),
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("id")),
        "{body}"
    );
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/beds",
        Some(json!({ "id": "b1", "label": "L" })),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("`ward`"), "{body}");
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/beds",
        Some(json!({ "id": "b1", "ward": "W", "label": "L", "patient_name": "x" })),
    )
    .await;
    assert_eq!(status, 400, "unknown fields are refused: {body}");
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/patients/admit",
        Some(json!({ "patient": { "value": "MRN-1" }, "bed_id": "b1", "at": "yesterday" })),
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("at")),
        "{body}"
    );
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/patients/admit",
        Some(json!({ "patient": { "value": "" }, "bed_id": "b1" })),
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("patient.value")),
        "{body}"
    );
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/patients/discharge",
        Some(json!({ "patient": { "value": "MRN-404" } })),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = call(&hub, "GET", "/api/v1/occupancy?at=2024-13-01", None).await;
    assert_eq!(status, 400);
    hub.stop().await;
}

#[tokio::test]
async fn an_admin_token_file_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, ADMIN).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let text = format!(
        "{}\n[association]\nadmin_token_file = \"{}\"\n",
        config_text(dir.path(), ""),
        token_file.display()
    );
    let config = cloud_hub::Config::parse(&text).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = cloud_hub::run(config, listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("association.admin_token_file"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
}

mod validation {
    //! The behaviour of the timelines is tested on each backend
    //! (`vigil-hub-sqlite`'s unit tests, `tests/storage_suite.rs`); here,
    //! what `cloud_hub::association` adds: validation before storage.
    use cloud_hub::association::{AssocError, Bed, Change, PatientId};
    use cloud_hub::store::{Associations, Store};

    #[test]
    fn invalid_input_is_refused_before_storage() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("a.sqlite")).unwrap();
        let none = Associations::new();
        let p = |v: &str| PatientId {
            system: "urn:mrn".into(),
            value: v.into(),
        };
        let err = s.admit(&p(""), "icu-1", 0, None, &none).unwrap_err();
        assert!(
            matches!(
                err,
                AssocError::Invalid {
                    field: "patient.value",
                    ..
                }
            ),
            "{err}"
        );
        let err = s
            .create_bed(&Bed {
                id: "a b".into(),
                ward: "W".into(),
                label: "L".into(),
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("`id`"), "{err}");
        assert!(matches!(
            s.place_device("gw", "", "icu-1", 0, &none),
            Err(AssocError::Invalid {
                field: "device_id",
                ..
            })
        ));
        assert!(matches!(
            s.transfer(&p("MRN-1"), "no bed", 0, &none),
            Err(AssocError::Invalid {
                field: "bed_id",
                ..
            })
        ));
        // Nothing was stored, and an unchanged identifier is a no-op.
        assert!(s.list_beds().unwrap().is_empty());
        assert_eq!(
            s.change_identifier(&p("MRN-1"), &p("MRN-1"), "V1", &none)
                .unwrap(),
            Change::default()
        );
    }
}
