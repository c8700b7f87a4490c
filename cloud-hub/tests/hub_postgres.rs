//! The hub served with `[storage] backend = "postgres"` against a throwaway
//! PostgreSQL server: gateway administration, HTTPS-less loopback ingest,
//! FHIR reads and search, the gateways view, the audit log, alerts and
//! trend series, all through the config file's storage section.

use crate::common;
use crate::pg_server;

use cloud_hub::Config;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_serves_from_postgres_selected_by_config() {
    let server = pg_server::PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "").on_postgres(&server.url(), 2);
    let config = Config::parse(&text).unwrap();
    config.validate().unwrap();
    let hub = TestHub::start_config(dir, config, "http").await;

    let ack = hub
        .ingest(&batch(
            1,
            DEVICE,
            vec![spo2(1, 97.0, T0), pulse(2, 70.0, T0 + MINUTE)],
        ))
        .await;
    assert_eq!((ack.accepted, ack.duplicates), (2, 0));
    let again = hub.ingest(&batch(1, DEVICE, vec![])).await;
    assert!(again.duplicate_batch);

    let (status, bundle) = hub
        .get_json(&format!("/fhir/Observation?patient={PATIENT}&_sort=date"))
        .await;
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(bundle["total"], 2);
    let first = &bundle["entry"][0]["resource"];
    assert_eq!(first["resourceType"], "Observation");
    assert_eq!(first["subject"]["reference"], format!("Patient/{PATIENT}"));
    let id = first["id"].as_str().unwrap().to_owned();
    let (status, obs) = hub.get_json(&format!("/fhir/Observation/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(obs["valueQuantity"]["value"], 97.0);

    // The gateways view, from PostgreSQL.
    let (status, body) = hub.get_json("/api/v1/gateways").await;
    assert_eq!(status, 200, "{body}");
    let gw = &body["gateways"][0];
    assert_eq!(gw["id"], GATEWAY, "{body}");
    assert_eq!(gw["devices"][0]["id"], DEVICE, "{body}");
    // Every audited request was recorded, in one valid chain.
    let metrics = hub.metrics().await;
    let unaudited: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vigil_hub_audit_failures_total "))
        .expect("the audit failure counter")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(unaudited, 0.0, "{metrics}");
    let config = hub.config.clone();
    let v = tokio::task::spawn_blocking(move || cloud_hub::audit_verify(&config, None, &[]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.broken, None);
    assert!(v.entries >= 4, "FHIR reads and the gateways view: {v:?}");

    // Nothing was written to the SQLite path.
    assert!(!hub.config.storage.sqlite_path.exists());

    // PostgreSQL goes away for a while: ingest answers 503 with
    // Retry-After (the gateway keeps the batch and retries), not 500; once
    // it is back, ingest works again.
    let server = std::sync::Arc::new(server);
    let s2 = server.clone();
    let restart = std::thread::spawn(move || s2.restart("fast", std::time::Duration::from_secs(4)));
    // Posts one-reading batches (a new sequence each) until the status is
    // `until`; every other answer must be `otherwise`. Returns the answer.
    async fn post_until(
        hub: &TestHub,
        seq: &mut u64,
        until: u16,
        otherwise: u16,
    ) -> Option<reqwest::Response> {
        for _ in 0..50 {
            *seq += 1;
            let b = batch(*seq, DEVICE, vec![spo2(*seq, 96.0, T0)]);
            let resp = hub
                .post_raw(
                    Some(&hub.token),
                    "application/x-protobuf",
                    prost::Message::encode_to_vec(&b),
                )
                .await;
            if resp.status() == until {
                return Some(resp);
            }
            assert_eq!(resp.status(), otherwise, "{:?}", resp.text().await);
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        }
        None
    }
    let mut seq = 10;
    let down = post_until(&hub, &mut seq, 503, 200)
        .await
        .expect("a 503 while PostgreSQL is down");
    assert_eq!(down.headers()["retry-after"], "5");
    tokio::task::spawn_blocking(move || restart.join().unwrap())
        .await
        .unwrap();
    let ok = post_until(&hub, &mut seq, 200, 503).await.is_some();
    assert!(ok, "ingest works again after PostgreSQL is back");
    hub.stop().await;
    drop(server);
}

/// The alert engine and the chart series on PostgreSQL: a low SpO2 held
/// past its delay raises its alerts, which are acknowledged and kept with
/// their transitions; the values are charted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_trends_work_on_postgres() {
    const S: i64 = 1_000_000;
    let server = pg_server::PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text =
        config_text(dir.path(), "").on_postgres(&server.url(), 2) + "\n[alerts]\ntick_ms = 100\n";
    let config = Config::parse(&text).unwrap();
    config.validate().unwrap();
    let hub = TestHub::start_config(dir, config, "http").await;

    let t = now_us();
    // SpO2 90 % (below both default limits) for 12 s: past the 10 s delay.
    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 90.0, t - 12 * S)]))
        .await;
    hub.ingest(&batch(2, DEVICE, vec![spo2(2, 90.0, t)])).await;
    let (status, body) = hub.get_json("/api/v1/alerts?open=true").await;
    assert_eq!(status, 200, "{body}");
    let mut codes: Vec<&str> = body["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["code"].as_str().unwrap())
        .collect();
    codes.sort();
    assert_eq!(codes, ["spo2-low-high", "spo2-low-medium"], "{body}");
    let high = body["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["code"] == "spo2-low-high")
        .unwrap();
    assert_eq!(high["patient"], PATIENT);
    let id = high["id"].as_i64().unwrap();
    let (status, a) = call_json(
        &hub,
        Some(hub.reader.as_str()),
        "POST",
        &format!("/api/v1/alerts/{id}/acknowledge"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["state"], "acknowledged");
    let (status, a) = hub.get_json(&format!("/api/v1/alerts/{id}")).await;
    assert_eq!(status, 200, "{a}");
    let transitions: Vec<&str> = a["events"]
        .as_array()
        .unwrap_or_else(|| panic!("{a}"))
        .iter()
        .map(|e| e["transition"].as_str().unwrap())
        .collect();
    assert_eq!(transitions, ["raised", "acknowledged"], "{a}");

    // Both readings in the chart series (one-minute buckets).
    // Whole seconds (no fraction to escape in the query).
    let from = cloud_hub::fhir::format_instant((t / S - 60) * S);
    let to = cloud_hub::fhir::format_instant((t / S + 60) * S);
    let (status, series) = hub
        .get_json(&format!(
            "/api/v1/patients/{PATIENT}/series?code=59408-5&from={from}&to={to}&resolution=60"
        ))
        .await;
    assert_eq!(status, 200, "{series}");
    let count: i64 = series["points"]
        .as_array()
        .unwrap_or_else(|| panic!("{series}"))
        .iter()
        .map(|p| p["count"].as_i64().unwrap())
        .sum();
    assert_eq!(count, 2, "{series}");
    hub.stop().await;
    drop(server);
}

#[test]
fn a_postgres_backend_without_its_section_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "").replace(
        "[[associations]]",
        "backend = \"postgres\"\n[[associations]]",
    );
    let err = Config::parse(&text).unwrap().validate().unwrap_err();
    assert!(err.to_string().contains("storage.postgres"), "{err}");
}

/// The backup and restore docs/operations.md gives for PostgreSQL: a
/// `pg_dump -Fc` of a running hub's database, `pg_restore` into a new
/// database, the hub pointed at it. The restored hub serves the same
/// observations, its audit chain verifies with the same head, it keeps
/// appending to that chain, and the append-only trigger came back with
/// the dump (a DELETE is still refused by the database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_dump_restored_into_a_new_database_serves_the_same_data_and_audit_chain() {
    let server = pg_server::PgServer::start();
    let pg_config = |url: String| {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(dir.path(), "").on_postgres(&url, 2);
        (dir, Config::parse(&text).unwrap())
    };
    let (dir, config) = pg_config(server.url());
    let hub = TestHub::start_config(dir, config, "http").await;
    let readings: Vec<_> = (0..20)
        .map(|i| spo2(i + 1, 90.0 + (i % 8) as f64, T0 + i as i64 * MINUTE))
        .collect();
    let ack = hub.ingest(&batch(1, DEVICE, readings)).await;
    assert_eq!(ack.accepted, 20);
    let search = format!("/fhir/Observation?patient={PATIENT}&_sort=date&_count=100");
    let (status, before) = hub.get_json(&search).await;
    assert_eq!(status, 200, "{before}");
    let config = hub.config.clone();
    let v_before = tokio::task::spawn_blocking(move || cloud_hub::audit_verify(&config, None, &[]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v_before.broken, None);

    // The documented commands, while the hub runs.
    let dump = tempfile::tempdir().unwrap();
    let file = dump.path().join("vigil.dump");
    let file_s = file.to_str().unwrap().to_owned();
    let srv = std::sync::Arc::new(server);
    let s2 = srv.clone();
    tokio::task::spawn_blocking(move || {
        s2.run_tool("pg_dump", &["-Fc", "-d", "postgres", "-f", &file_s]);
        s2.run_tool(
            "psql",
            &["-d", "postgres", "-c", "CREATE DATABASE vigil_restored"],
        );
        s2.run_tool("pg_restore", &["-d", "vigil_restored", &file_s]);
    })
    .await
    .unwrap();
    hub.stop().await;

    let (dir, config) = pg_config(srv.url_of("vigil_restored"));
    let restored = TestHub::start_config(dir, config, "http").await;
    // The restored chain still holds the head taken before the dump
    // (`audit verify --anchor`).
    let config = restored.config.clone();
    let anchor = v_before.head.clone().unwrap();
    let v_after = tokio::task::spawn_blocking(move || {
        cloud_hub::audit_verify(&config, Some((anchor.0, anchor.1.as_str())), &[])
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(v_after.broken, None, "{v_after:?}");
    let (status, after) = restored.get_json(&search).await;
    assert_eq!(status, 200, "{after}");
    let values = |b: &serde_json::Value| -> Vec<(String, serde_json::Value)> {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let r = &e["resource"];
                (
                    r["effectiveDateTime"].as_str().unwrap().to_owned(),
                    r["valueQuantity"]["value"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(values(&after), values(&before));
    assert_eq!(values(&after).len(), 20);
    // The restored hub appends to the restored chain.
    let config = restored.config.clone();
    let v_more = tokio::task::spawn_blocking(move || cloud_hub::audit_verify(&config, None, &[]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v_more.broken, None);
    assert!(
        v_more.entries > v_after.entries,
        "{v_more:?} after {v_after:?}"
    );
    restored.stop().await;
    // The append-only guard is part of the dump.
    let refused = std::process::Command::new(srv.tool("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &srv.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-d", "vigil_restored", "-c", "DELETE FROM audit_log"])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "DELETE FROM audit_log was allowed after restore"
    );
}

/// Fail closed on PostgreSQL too: the audit log cannot be written (its
/// table taken away), so the patient data is withheld (503, Retry-After)
/// and the failure counted; served again once the log is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_withholds_patient_data_when_the_audit_entry_cannot_be_written() {
    let server = pg_server::PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    // One pooled connection: every request after a failure runs on the
    // connection the failure left behind.
    let text = config_text(dir.path(), "").on_postgres(&server.url(), 1);
    let hub = TestHub::start_config(dir, Config::parse(&text).unwrap(), "http").await;
    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, now_us())]))
        .await;
    let url = server.url();
    let sql = move |q: &'static str| {
        let url = url.clone();
        std::thread::spawn(move || {
            let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
            c.batch_execute(q).unwrap();
        })
        .join()
        .unwrap();
    };
    sql("ALTER TABLE audit_log RENAME TO audit_log_away");
    let path = format!("/fhir/Observation?patient={PATIENT}");
    let resp = hub.client.get(hub.url(&path)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(!resp.text().await.unwrap().contains(PATIENT));
    let metrics = hub.metrics().await;
    assert!(
        metrics.contains("\nvigil_hub_audit_failures_total 1\n"),
        "{metrics}"
    );
    sql("ALTER TABLE audit_log_away RENAME TO audit_log");
    let (status, _) = hub.get_json(&path).await;
    assert_eq!(status, 200);

    // The group's INSERT itself fails (the lock and the head were fine):
    // its pipelined COMMIT must end the failed transaction, store nothing
    // and leave every pooled connection usable.
    sql(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$;
         CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log
           FOR EACH STATEMENT EXECUTE FUNCTION refuse_audit()",
    );
    for _ in 0..3 {
        let resp = hub.client.get(hub.url(&path)).send().await.unwrap();
        assert_eq!(resp.status(), 503);
    }
    sql("DROP TRIGGER refuse_audit ON audit_log");
    for i in 0..6 {
        let (status, body) = hub.get_json(&path).await;
        assert_eq!(status, 200, "request {i} after the trigger went: {body}");
    }
    let metrics = hub.metrics().await;
    assert!(
        metrics.contains("\nvigil_hub_audit_failures_total 4\n"),
        "the three refused entries only: {metrics}"
    );
    let config = hub.config.clone();
    let v = tokio::task::spawn_blocking(move || cloud_hub::audit_verify(&config, None, &[]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.broken, None, "{v:?}");
    hub.stop().await;
}
