//! The audit log through the hub: FHIR reads, API writes and alert
//! acknowledgements are recorded with actor (a token fingerprint, never
//! the token), action, resource, patient and outcome; CLI changes too;
//! `cloud-hub audit verify` passes on the real log and fails (exit 1) once
//! an entry is edited; `cloud-hub audit export` writes AuditEvents the
//! independent FHIR validator accepts.

use crate::common;

use std::process::Command;

use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_cloud-hub");
const ADMIN: &str = "audit-admin-token-0123456789abcdef0123456";

#[tokio::test]
async fn accesses_are_chained_verified_and_exported() {
    let data = tempfile::tempdir().unwrap();
    let text = admin_config_text(data.path(), ADMIN, "");
    let config_path = data.path().join("hub.toml");
    std::fs::write(&config_path, &text).unwrap();
    let config = cloud_hub::Config::parse(&text).unwrap();
    let hub = TestHub::start_config(tempfile::tempdir().unwrap(), config, "http").await;

    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, now_us())]))
        .await;
    // A FHIR search for the patient and a read of a missing resource (the
    // tests' API token), a refused read without credentials, an admin write
    // and an admin read.
    let (status, _) = hub
        .get_json(&format!("/fhir/Observation?patient={PATIENT}&_count=5"))
        .await;
    assert_eq!(status, 200);
    let (status, _) = hub.get_json("/fhir/Observation/nope").await;
    assert_eq!(status, 404);
    let resp = common::client()
        .get(hub.url(&format!("/fhir/Observation?patient={PATIENT}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = hub
        .client
        .post(hub.url("/api/v1/beds"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(json!({ "id": "icu3-07", "ward": "ICU 3", "label": "Bed 7" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = hub
        .client
        .get(hub.url(&format!("/api/v1/patients/{PATIENT}/scores")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Ingest and health are not audited.
    let resp = hub.client.get(hub.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let rows: Vec<(String, String, String, Option<String>, i64, String)> = hub
        .db()
        .prepare("SELECT actor, action, resource, patient_id, outcome, detail FROM audit_log ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let admin = {
        let mut h = axum::http::HeaderMap::new();
        h.insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
        cloud_hub::audit::actor_of(&h)
    };
    assert!(!admin.contains(ADMIN));
    let got: Vec<(&str, &str, &str, Option<&str>, i64)> = rows
        .iter()
        .map(|(a, b, c, d, e, _)| (a.as_str(), b.as_str(), c.as_str(), d.as_deref(), *e))
        .collect();
    assert_eq!(
        got,
        [
            ("cli", "create", "gateway add", None, 0),
            ("cli", "create", "token create", None, 0),
            (
                "token:tests",
                "read",
                "/fhir/Observation",
                Some(PATIENT),
                200
            ),
            ("token:tests", "read", "/fhir/Observation/nope", None, 404),
            ("anonymous", "read", "/fhir/Observation", Some(PATIENT), 401),
            ("admin-token", "create", "/api/v1/beds", None, 201),
            (
                "admin-token",
                "read",
                &format!("/api/v1/patients/{PATIENT}/scores"),
                Some(PATIENT),
                200
            ),
        ]
    );
    assert_eq!(rows[0].5, format!("gateway_id={GATEWAY}"));
    assert_eq!(rows[1].5, "token=tests role=admin");
    assert_eq!(rows[2].5, format!("patient={PATIENT}&_count=5"));
    hub.stop().await;

    // The CLI: verify passes and prints the head; export validates.
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(head.starts_with("7:"), "{head}");
    let export = data.path().join("audit.ndjson");
    let out = run(&["audit", "export", "--out", export.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 7);
    assert_eq!(events[2]["action"], "R");
    assert_eq!(
        events[2]["entity"][1]["what"]["reference"],
        format!("Patient/{PATIENT}")
    );
    assert_eq!(events[3]["outcome"], "4");
    // The refused anonymous read is recorded as a failure.
    assert_eq!(events[4]["outcome"], "4");
    let (ok, report) = validate_fhir(&events);
    assert!(ok, "the FHIR validator found errors:\n{report}");

    // Tampering: someone with the database file drops the triggers and
    // rewrites who accessed the patient.
    let db = rusqlite::Connection::open(data.path().join("hub.sqlite")).unwrap();
    assert!(
        db.execute("UPDATE audit_log SET actor = 'nobody' WHERE seq = 2", [])
            .is_err(),
        "append-only"
    );
    db.execute_batch("DROP TRIGGER audit_log_no_update")
        .unwrap();
    db.execute("UPDATE audit_log SET actor = 'nobody' WHERE seq = 2", [])
        .unwrap();
    drop(db);
    let out = run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AUDIT LOG TAMPERED: entry 2"), "{err}");
    // A wrong anchor is refused too.
    let out = run(&["audit", "verify", "--anchor", "5:00ff"]);
    assert_eq!(out.status.code(), Some(1));
}
