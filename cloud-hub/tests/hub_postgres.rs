//! The hub served with `[storage] backend = "postgres"` against a throwaway
//! PostgreSQL server: gateway administration, HTTPS-less loopback ingest,
//! FHIR reads and search, all through the config file's storage section.

use crate::common;
use crate::pg_server;

use cloud_hub::Config;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_serves_from_postgres_selected_by_config() {
    let server = pg_server::PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "").replace(
        "[[associations]]",
        &format!(
            "backend = \"postgres\"\n[storage.postgres]\nurl = \"{}\"\npool_size = 2\n\n[[associations]]",
            server.url()
        ),
    );
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

    // Not on PostgreSQL yet, and said so: the gateways view answers 501;
    // audited requests are served but counted as not audited (the two FHIR
    // reads and this one).
    let (status, body) = hub.get_json("/api/v1/gateways").await;
    assert_eq!(status, 501, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("postgres"),
        "{body}"
    );
    let metrics = hub
        .client
        .get(hub.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let unaudited: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vigil_hub_audit_failures_total "))
        .expect("the audit failure counter")
        .trim()
        .parse()
        .unwrap();
    assert!(unaudited >= 3.0, "{metrics}");

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
