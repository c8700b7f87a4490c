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
    let db = rusqlite::Connection::open(data.path().join("hub-audit.sqlite")).unwrap();
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

/// `(resource, patient, patients, key_id)` of every audit entry, by seq.
type Row = (String, Option<String>, String, Option<String>);

fn audit_rows(db: &rusqlite::Connection) -> Vec<Row> {
    db.prepare("SELECT resource, patient_id, patients, key_id FROM audit_log ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn subject(mut r: shared_protocol::v1::Reading, value: &str) -> shared_protocol::v1::Reading {
    r.subject = Some(shared_protocol::v1::Identifier {
        system: "urn:oid:2.16.840.1.113883.19.5".into(),
        value: value.into(),
    });
    r
}

/// A hub with `[audit] key_file` (made by `cloud-hub audit keygen`): every
/// entry is keyed, PHI reads name the patients whose data went out (a read
/// by observation id, a search without `patient`), checkpoints reach the
/// checkpoint file, and `audit verify --checkpoints` passes, then fails on
/// an edited entry and on an emptied log.
#[tokio::test]
async fn a_keyed_log_names_the_patients_read_and_verify_catches_edits_and_emptying() {
    let data = tempfile::tempdir().unwrap();
    let key = data.path().join("audit.key");
    let out = Command::new(BIN)
        .args(["audit", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&key).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&key).unwrap().trim().len(), 64);
    }
    // Refused when others may read the key.
    let loose = data.path().join("loose.key");
    std::fs::write(&loose, "0123456789abcdef0123456789abcdef0123").unwrap();
    let err = cloud_hub::audit::load_key(&loose, "audit.key_file").unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
    let checkpoints = data.path().join("checkpoints.jsonl");
    let text = admin_config_text(
        data.path(),
        ADMIN,
        &format!(
            "[audit]\nkey_file = \"{}\"\ncheckpoint_file = \"{}\"\ncheckpoint_interval_s = 1\n",
            key.display(),
            checkpoints.display()
        ),
    );
    let config_path = data.path().join("hub.toml");
    std::fs::write(&config_path, &text).unwrap();
    let config = cloud_hub::Config::parse(&text).unwrap();
    let hub = TestHub::start_config(tempfile::tempdir().unwrap(), config, "http").await;
    let t = now_us();
    let ack = hub
        .ingest(&batch(
            1,
            DEVICE,
            vec![
                spo2(1, 97.0, t),
                subject(spo2(2, 95.0, t), "p-b"),
                subject(pulse(3, 80.0, t), "p-a"),
            ],
        ))
        .await;
    assert_eq!(ack.accepted, 3);
    let (status, page) = hub.get_json("/fhir/Observation?_count=10").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 3);
    let mine = page["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["subject"]["reference"] == format!("Patient/{PATIENT}"))
        .unwrap()["resource"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = hub.get_json(&format!("/fhir/Observation/{mine}")).await;
    assert_eq!(status, 200);
    // A search whose page holds one patient names that patient.
    let (status, _) = hub.get_json("/fhir/Observation?code=8867-4").await;
    assert_eq!(status, 200);
    // A checkpoint within the interval (1 s), and a last one on stop.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    hub.stop().await;

    let db = rusqlite::Connection::open(data.path().join("hub-audit.sqlite")).unwrap();
    let rows = audit_rows(&db);
    assert!(
        rows.iter().all(|r| r.3.is_some()),
        "every entry keyed: {rows:?}"
    );
    let find = |resource: &str| {
        rows.iter()
            .find(|r| r.0 == resource)
            .unwrap_or_else(|| panic!("{resource} in {rows:?}"))
    };
    assert_eq!(find("hub start").1, None);
    let search = find("/fhir/Observation");
    assert_eq!(search.1.as_deref(), Some("multiple: 3"), "{rows:?}");
    assert_eq!(search.2, format!("p-a\np-b\n{PATIENT}"));
    let read = find(&format!("/fhir/Observation/{mine}"));
    assert_eq!((read.1.as_deref(), read.2.as_str()), (Some(PATIENT), ""));
    let code_search = rows
        .iter()
        .filter(|r| r.0 == "/fhir/Observation")
        .nth(1)
        .unwrap();
    assert_eq!(
        code_search.1.as_deref(),
        Some("p-a"),
        "the pulse reading's patient"
    );
    let lines = std::fs::read_to_string(&checkpoints).unwrap();
    let cps = cloud_hub::audit::parse_checkpoints(&lines).unwrap();
    assert!(!cps.is_empty());
    assert_eq!(
        cps.last().unwrap().seq,
        rows.len() as i64,
        "the last one on stop"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&checkpoints)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .output()
            .unwrap()
    };
    let cp_arg = checkpoints.to_str().unwrap();
    // `audit checkpoint`: nothing new since the hub's last one; after a CLI
    // command (a keyed entry), one more, to the file as well.
    let out = run(&["audit", "checkpoint"]);
    assert!(out.status.success() && out.stdout.is_empty());
    assert!(run(&["gateway", "add", "gw-2"]).status.success());
    let out = run(&["audit", "checkpoint"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cp =
        cloud_hub::audit::Checkpoint::from_line(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(cp.seq, rows.len() as i64 + 1);
    let shipped =
        cloud_hub::audit::parse_checkpoints(&std::fs::read_to_string(&checkpoints).unwrap());
    assert_eq!(shipped.unwrap().last(), Some(&cp));
    let out = run(&["audit", "verify", "--checkpoints", cp_arg]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("keyed (HMAC-SHA256) throughout"), "{err}");
    // The database's owner rewrites whose data was read.
    db.execute_batch(
        "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete;
         DROP TRIGGER audit_checkpoints_no_delete;",
    )
    .unwrap();
    let seq: i64 = db
        .query_row(
            "SELECT seq FROM audit_log WHERE resource = ?1",
            [format!("/fhir/Observation/{mine}")],
            |r| r.get(0),
        )
        .unwrap();
    db.execute(
        "UPDATE audit_log SET patient_id = 'someone-else' WHERE seq = ?1",
        [seq],
    )
    .unwrap();
    let out = run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("AUDIT LOG TAMPERED: entry {seq} ")) && err.contains("MAC"),
        "{err}"
    );
    // Emptied, stored checkpoints too: the shipped checkpoints find it.
    db.execute_batch("DELETE FROM audit_log; DELETE FROM audit_checkpoints;")
        .unwrap();
    let out = run(&["audit", "verify", "--checkpoints", cp_arg]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the log is empty but a checkpoint"), "{err}");
}

/// Fail closed: when the audit entry cannot be written, the patient data
/// is not served (503 with Retry-After) and the failure is counted; once
/// the log is writable again, reads are served.
#[tokio::test]
async fn patient_data_is_withheld_when_the_audit_entry_cannot_be_written() {
    let hub = TestHub::start().await;
    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, now_us())]))
        .await;
    hub.db()
        .execute_batch("ALTER TABLE audit_log RENAME TO audit_log_away")
        .unwrap();
    let resp = hub
        .client
        .get(hub.url(&format!("/fhir/Observation?patient={PATIENT}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body = resp.text().await.unwrap();
    assert!(
        !body.contains(PATIENT) && !body.contains("Observation"),
        "{body}"
    );
    let metrics = hub.metrics().await;
    assert!(
        metrics.contains("\nvigil_hub_audit_failures_total 1\n"),
        "{metrics}"
    );
    hub.db()
        .execute_batch("ALTER TABLE audit_log_away RENAME TO audit_log")
        .unwrap();
    let (status, _) = hub
        .get_json(&format!("/fhir/Observation?patient={PATIENT}"))
        .await;
    assert_eq!(status, 200);
    hub.stop().await;
}

/// Group commit of the middleware's entries: many audited requests at once
/// each get their entry (one per request, the chain verified), and a
/// failing commit withholds every response of its group (503 each,
/// counted), after which reads are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_audited_requests_are_group_committed_and_fail_together() {
    const N: usize = 48;
    let hub = TestHub::start().await;
    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, now_us())]))
        .await;
    let before: i64 = hub
        .db()
        .query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get(0))
        .unwrap();
    let get_all = |n: usize| {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let req = hub
                .client
                .get(hub.url(&format!("/fhir/Observation?patient={PATIENT}&_count={i}")))
                .send();
            set.spawn(req);
        }
        set.join_all()
    };
    for r in get_all(N).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    let details: Vec<String> = hub
        .db()
        .prepare("SELECT detail FROM audit_log WHERE seq > ?1 ORDER BY seq")
        .unwrap()
        .query_map([before], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut counts: Vec<usize> = details
        .iter()
        .map(|d| {
            d.rsplit_once("_count=")
                .and_then(|(_, c)| c.parse().ok())
                .unwrap()
        })
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, (0..N).collect::<Vec<_>>(), "one entry per request");
    let store = cloud_hub::Store::open(&hub.config.storage.sqlite_path).unwrap();
    let v = cloud_hub::audit::verify(&store, &Default::default(), None, &[]).unwrap();
    assert_eq!(v.broken, None);
    assert_eq!(v.entries, (before as usize + N) as u64);

    // The log cannot be written: every response of the group is withheld.
    hub.db()
        .execute_batch("ALTER TABLE audit_log RENAME TO audit_log_away")
        .unwrap();
    for r in get_all(N).await {
        let r = r.unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        assert!(!r.text().await.unwrap().contains(PATIENT));
    }
    let metrics = hub.metrics().await;
    assert!(
        metrics.contains(&format!("\nvigil_hub_audit_failures_total {N}\n")),
        "{metrics}"
    );
    hub.db()
        .execute_batch("ALTER TABLE audit_log_away RENAME TO audit_log")
        .unwrap();
    for r in get_all(4).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    let v = cloud_hub::audit::verify(&store, &Default::default(), None, &[]).unwrap();
    assert_eq!(v.broken, None);
    assert_eq!(v.entries, (before as usize + N + 4) as u64);
    hub.stop().await;
}

/// The group-commit writer over a store: appends arriving together share
/// commits (fewer transactions than entries), each gets its own seq, the
/// keyed chain verifies; when the commit fails every waiter of the group
/// gets the error and nothing of the group is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_writer_groups_appends_and_fails_a_group_whole() {
    const N: i64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite");
    let store = cloud_hub::Store::open(&path).unwrap();
    let keys = cloud_hub::audit::AuditKeys::from_keys(vec![
        cloud_hub::audit::AuditKey::new(&[4; 32]).unwrap(),
    ]);
    let writer = cloud_hub::audit::GroupCommit::default();
    let entry = |i: i64| cloud_hub::audit::Entry {
        time_us: 1_795_514_400_000_000 + i,
        actor: "token:t".into(),
        action: "read".into(),
        resource: "/fhir/Observation".into(),
        patient: Some(format!("p-{i}")),
        patients: Vec::new(),
        outcome: 200,
        detail: String::new(),
    };
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..N {
        let (w, s, k) = (writer.clone(), store.handle(), keys.clone());
        appends.spawn(async move { w.append(&s, &k, entry(i)).await });
    }
    let mut seqs: Vec<i64> = appends
        .join_all()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    let commits = writer.commits();
    assert!(commits >= 1 && commits < N as u64, "{commits} commits");
    let v = cloud_hub::audit::verify(&store, &keys, None, &[]).unwrap();
    assert_eq!(
        (v.entries, v.broken, v.keyed_from),
        (N as u64, None, Some(1))
    );

    let db = rusqlite::Connection::open(cloud_hub::store::audit_path(&path)).unwrap();
    db.execute_batch("ALTER TABLE audit_log RENAME TO audit_log_away")
        .unwrap();
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (w, s, k) = (writer.clone(), store.handle(), keys.clone());
        appends.spawn(async move { w.append(&s, &k, entry(N + i)).await });
    }
    for r in appends.join_all().await {
        assert!(r.is_err(), "{r:?}");
    }
    db.execute_batch("ALTER TABLE audit_log_away RENAME TO audit_log")
        .unwrap();
    assert_eq!(writer.append(&store, &keys, entry(999)).await, Ok(N + 1));
    let v = cloud_hub::audit::verify(&store, &keys, None, &[]).unwrap();
    assert_eq!((v.entries, v.broken), (N as u64 + 1, None));
}
