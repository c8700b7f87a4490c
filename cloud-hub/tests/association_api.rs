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

/// The audit entries of association changes: (actor, resource, patient,
/// detail), oldest first.
fn reattribution_audit(hub: &TestHub) -> Vec<(String, String, Option<String>, String)> {
    hub.db()
        .prepare(
            "SELECT actor, resource, patient_id, detail FROM audit_log
              WHERE detail LIKE '%re-attributed%' OR detail LIKE '%no stored reading%'
              ORDER BY seq",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Re-attribution is a clinical act: a biomedical engineer cannot move
/// stored readings back in time (403, nothing moves) but places devices in
/// the present; a clinician needs a reason (400 naming `reason`) and with
/// one moves them; every move is audited with the patients and the count,
/// and the moved Observations are new versions (the same by id and by
/// search).
#[tokio::test]
async fn a_biomed_cannot_move_readings_back_in_time() {
    use cloud_hub::access::Role;
    let hub = hub_with_admin_token().await;
    let biomed = cloud_hub::token_create(&hub.config, "bio", Role::Biomed).unwrap();
    let clinician = cloud_hub::token_create(&hub.config, "nurse", Role::Clinician).unwrap();
    for id in ["b1", "b2"] {
        let (status, body) = call(
            &hub,
            "POST",
            "/api/v1/beds",
            Some(json!({ "id": id, "ward": "ICU", "label": id })),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let why = "set up late";
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/placements",
        Some(json!({ "gateway_id": GATEWAY, "device_id": "mon-7", "bed_id": "b1", "at": AT_T0, "reason": why })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mrn_a = json!({ "system": "urn:oid:1.2.3.4", "value": "MRN-A" });
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/patients/admit",
        Some(json!({ "patient": mrn_a, "bed_id": "b1", "at": AT_T0, "reason": why })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    hub.ingest(&batch(
        1,
        "mon-7",
        vec![
            spo2(1, 95.0, T0 + MINUTE),
            spo2(2, 96.0, T0 + 2 * MINUTE),
            spo2(3, 97.0, T0 + 3 * MINUTE),
        ],
    ))
    .await;
    assert_eq!(total_for(&hub, "MRN-A").await, 3);

    // The biomed: ending the placement or placing elsewhere back-dated is
    // refused, with or without a reason; nothing moves.
    let ends = [
        (
            "/api/v1/placements/end",
            json!({ "gateway_id": GATEWAY, "device_id": "mon-7", "at": AT_T0 }),
        ),
        (
            "/api/v1/placements/end",
            json!({ "gateway_id": GATEWAY, "device_id": "mon-7", "at": AT_T0, "reason": "x" }),
        ),
        (
            "/api/v1/placements",
            json!({ "gateway_id": GATEWAY, "device_id": "mon-7", "bed_id": "b2", "at": "2020-01-01T00:00:00Z", "reason": "x" }),
        ),
    ];
    for (path, body) in ends {
        let (status, answer) = call_as(&hub, Some(&biomed), "POST", path, Some(body)).await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("clinician or admin"),
            "{answer}"
        );
    }
    assert_eq!(total_for(&hub, "MRN-A").await, 3);
    // In the present (within the window) the biomed places devices.
    let recent = cloud_hub::fhir::format_instant(now_us() - 5 * MINUTE);
    let (status, body) = call_as(
        &hub,
        Some(&biomed),
        "POST",
        "/api/v1/placements",
        Some(json!({ "gateway_id": GATEWAY, "device_id": "mon-8", "bed_id": "b2", "at": recent })),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "reattributed": 0 })));

    // The clinician: a back-dated discharge needs a reason.
    let discharge = |reason: Option<&str>| {
        let mut b = json!({ "patient": mrn_a, "at": "2024-05-01T10:01:30Z" });
        if let Some(r) = reason {
            b["reason"] = json!(r);
        }
        b
    };
    for r in [None, Some(" ")] {
        let (status, body) = call_as(
            &hub,
            Some(&clinician),
            "POST",
            "/api/v1/patients/discharge",
            Some(discharge(r)),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["field"], "reason", "{body}");
    }
    assert_eq!(total_for(&hub, "MRN-A").await, 3);
    let (status, body) = call_as(
        &hub,
        Some(&clinician),
        "POST",
        "/api/v1/patients/discharge",
        Some(discharge(Some("wrong patient charted"))),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "reattributed": 2 })));
    let mrn_b = json!({ "system": "urn:oid:1.2.3.4", "value": "MRN-B" });
    let (status, body) = call_as(
        &hub,
        Some(&clinician),
        "POST",
        "/api/v1/patients/admit",
        Some(
            json!({ "patient": mrn_b, "bed_id": "b1", "at": "2024-05-01T10:01:30Z",
                     "reason": "wrong patient charted" }),
        ),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "reattributed": 2 })));
    assert_eq!(total_for(&hub, "MRN-A").await, 1);
    assert_eq!(total_for(&hub, "MRN-B").await, 2);

    // Audited: who, the patients, the count, the reason.
    let audit = reattribution_audit(&hub);
    let discharged: Vec<_> = audit
        .iter()
        .filter(|e| e.1 == "/api/v1/patients/discharge")
        .collect();
    assert_eq!(discharged.len(), 1, "{audit:?}");
    let (actor, _, patient, detail) = discharged[0];
    assert_eq!(
        (actor.as_str(), patient.as_deref()),
        ("token:nurse", Some("MRN-A"))
    );
    assert!(
        detail.contains(
            "re-attributed 2 reading(s) from Patient/MRN-A (urn:oid:1.2.3.4) to no patient"
        ) && detail.ends_with("reason: wrong patient charted"),
        "{detail}"
    );
    let admitted: Vec<_> = audit
        .iter()
        .filter(|e| e.1 == "/api/v1/patients/admit" && e.2.as_deref() == Some("MRN-B"))
        .collect();
    assert_eq!(admitted.len(), 1, "{audit:?}");
    assert!(
        admitted[0].3.contains(
            "re-attributed 2 reading(s) from no patient to Patient/MRN-B (urn:oid:1.2.3.4)"
        ),
        "{admitted:?}"
    );

    // The moved Observations are version 3 (stored, discharged, admitted),
    // the same when read by id and found by search; the unmoved one is 1.
    let (status, bundle) = hub.get_json("/fhir/Observation?patient=MRN-B").await;
    assert_eq!(status, 200, "{bundle}");
    for e in bundle["entry"].as_array().unwrap() {
        let found = &e["resource"];
        assert_eq!(found["meta"]["versionId"], "3", "{found}");
        let (status, read) = hub
            .get_json(&format!(
                "/fhir/Observation/{}",
                found["id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(status, 200);
        assert_eq!(read["meta"], found["meta"]);
        assert_ne!(read["meta"]["lastUpdated"], read["issued"]);
    }
    let (_, bundle) = hub.get_json("/fhir/Observation?patient=MRN-A").await;
    assert_eq!(bundle["entry"][0]["resource"]["meta"]["versionId"], "1");
    hub.stop().await;
}

/// `[association] reattribution_window_minutes`: with 0, any change dated
/// before now is a re-attribution (a biomed's is refused), one without `at`
/// is dated now and is not; the setting is checked.
#[tokio::test]
async fn the_reattribution_window_is_configurable() {
    use cloud_hub::access::Role;
    let data = tempfile::tempdir().unwrap();
    let bad = cloud_hub::Config::parse(&admin_config_text(
        data.path(),
        ADMIN,
        "reattribution_window_minutes = 20000",
    ))
    .unwrap();
    let err = bad.validate().unwrap_err().to_string();
    assert!(
        err.contains("association.reattribution_window_minutes"),
        "{err}"
    );
    let mut hub = start_with_admin(data.path(), ADMIN, "reattribution_window_minutes = 0").await;
    hub.dir = data;
    let biomed = cloud_hub::token_create(&hub.config, "bio", Role::Biomed).unwrap();
    let (status, _) = call(
        &hub,
        "POST",
        "/api/v1/beds",
        Some(json!({ "id": "b1", "ward": "W", "label": "B1" })),
    )
    .await;
    assert_eq!(status, 201);
    let minute_ago = cloud_hub::fhir::format_instant(now_us() - MINUTE);
    let (status, body) = call_as(
        &hub,
        Some(&biomed),
        "POST",
        "/api/v1/placements",
        Some(json!({ "gateway_id": GATEWAY, "device_id": "m", "bed_id": "b1", "at": minute_ago })),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = call_as(
        &hub,
        Some(&biomed),
        "POST",
        "/api/v1/placements",
        Some(json!({ "gateway_id": GATEWAY, "device_id": "m", "bed_id": "b1" })),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "reattributed": 0 })));
    hub.stop().await;
}
