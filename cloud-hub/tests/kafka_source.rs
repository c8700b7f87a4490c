//! Kafka / Event Hubs ingest against a real Kafka-protocol broker: Tansu
//! 0.6.0 (`tansu broker`, SQLite storage so that it can be restarted,
//! installed by `scripts/setup.sh`; `support/tansu.rs`) on a free loopback
//! port. Records are produced as Azure IoT Hub routing
//! writes them to an Event Hubs namespace: value = the protobuf `Batch`,
//! no key, `content-type`/`content-encoding` as plain UTF-8 headers and
//! `iothub-connection-device-id`, `iothub-enqueuedtime`,
//! `iothub-message-source`, `x-opt-partition-key` AMQP-encoded; one device
//! always in one partition.
//!
//! Plaintext without SASL: Tansu's SASL offers SCRAM and OAUTHBEARER only
//! (no PLAIN) and it serves no TLS without a terminating proxy, so the
//! client configuration of TLS with SASL PLAIN is unit-tested in
//! `hub_transport::kafka_ingest` instead.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloud_hub::stream::headers::DEVICE_ID;
use prost::Message;
use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Batch, DeviceData, DeviceInfo, Reading, reading};

use crate::tansu::{Storage, Tansu};

const BIN: &str = env!("CARGO_BIN_EXE_cloud-hub");
const TOPIC: &str = "vigil-batches";
const PARTITIONS: i32 = 4;
const GATEWAYS: [&str; 4] = ["gw-a", "gw-b", "gw-c", "gw-d"];
/// Readings per batch.
const R: u64 = 2;

/// A child process killed (SIGKILL) when dropped.
struct Proc(Option<Child>);

impl Proc {
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn kafka(port: u16) -> Client {
    let mut last = None;
    for _ in 0..50 {
        match ClientBuilder::new(vec![format!("127.0.0.1:{port}")])
            .build()
            .await
        {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no Kafka client: {last:?}");
}

/// Creates the topic through the CreateTopics API.
async fn create_topic(client: &Client) {
    client
        .controller_client()
        .unwrap()
        .create_topic(TOPIC, PARTITIONS, 1, 5_000)
        .await
        .unwrap();
}

/// The partition IoT Hub routing would use for a device (one device, one partition).
fn partition_of(device: &str) -> i32 {
    GATEWAYS
        .iter()
        .position(|g| *g == device)
        .map_or(0, |i| i as i32 % PARTITIONS)
}

/// A record as IoT Hub message routing writes it to Event Hubs' Kafka endpoint.
fn routed(device: &str, body: Vec<u8>) -> Record {
    crate::iothub_routing::routed_record(device, "application/x-protobuf", Some("identity"), body)
}

async fn produce(client: &Client, partition: i32, records: Vec<Record>) {
    let pc = client
        .partition_client(TOPIC, partition, UnknownTopicHandling::Retry)
        .await
        .unwrap();
    // One record per request: Tansu reports a multi-record batch's high
    // watermark as its first offset + 1 (fetch still returns all).
    for r in records {
        pc.produce(vec![r], Compression::NoCompression)
            .await
            .unwrap();
    }
}

fn batch(gateway: &str, seq: u64) -> Batch {
    let now = cloud_hub::store::now_us();
    Batch {
        gateway_id: gateway.into(),
        sequence: seq,
        created_time_us: now,
        devices: vec![DeviceData {
            device: Some(DeviceInfo {
                device_id: "spo2-1".into(),
                protocol: "masimo-ascii1".into(),
                ..Default::default()
            }),
            readings: (0..R)
                .map(|k| Reading {
                    mdc_code: codes::PULS_OXIM_SAT_O2,
                    value: Some(reading::Value::Numeric(95.0)),
                    mdc_unit: units::PERCENT.mdc,
                    ucum_unit: "%".into(),
                    device_time_us: now - 10_000_000,
                    gateway_time_us: now - 10_000_000,
                    validity: 1,
                    sequence: (seq - 1) * R + k + 1,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        agent_version: "test".into(),
        ..Default::default()
    }
}

/// Every gateway's batches `seqs`, each into its device's partition.
async fn produce_batches(client: &Client, seqs: std::ops::RangeInclusive<u64>) {
    for g in GATEWAYS {
        let records = seqs
            .clone()
            .map(|s| routed(g, batch(g, s).encode_to_vec()))
            .collect();
        produce(client, partition_of(g), records).await;
    }
}

fn hub_config(d: &Path, storage: &str, port: u16, replica: &str) -> PathBuf {
    let path = d.join(format!("{replica}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[server]
bind = "127.0.0.1:0"
{storage}
[kafka]
brokers = ["127.0.0.1:{port}"]
topic = "{TOPIC}"
replica_id = "{replica}"
lease_ms = 2000
max_wait_ms = 200
max_in_flight = 8
"#
        ),
    )
    .unwrap();
    path
}

/// Starts `cloud-hub serve`; returns the process and its base URL.
fn start_hub(config: &Path, log: &Path) -> (Proc, String) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env_remove("VIGIL_HUB_BIND")
        .env_remove("VIGIL_HUB_SQLITE_PATH")
        .env_remove("VIGIL_HUB_KAFKA_REPLICA_ID")
        .env_remove("VIGIL_HUB_PG_URL")
        .env("RUST_LOG", "cloud_hub=info,hub_transport=info")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("hub did not start: {line:?}"))
        .to_owned();
    (Proc(Some(child)), url)
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn metrics_text(client: &reqwest::Client, url: &str) -> String {
    match client.get(format!("{url}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The value of a sample in a hub's /metrics (0 when absent or unreachable).
async fn metric(client: &reqwest::Client, url: &str, sample: &str) -> u64 {
    metrics_text(client, url)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// The partitions a hub consumes (its lag samples).
async fn owned(client: &reqwest::Client, url: &str) -> usize {
    metrics_text(client, url)
        .await
        .lines()
        .filter(|l| l.starts_with("vigil_hub_kafka_partition_lag{"))
        .count()
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn dropped(reason: &str) -> String {
    format!("vigil_hub_kafka_records_dropped_total{{reason=\"{reason}\"}}")
}

fn tail(d: &Path, f: &str) -> String {
    let t = std::fs::read_to_string(d.join(f)).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn sqlite_count(db: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_records_are_stored_once_and_bad_ones_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = Tansu::start(d, Storage::Sqlite);
    let port = broker.port;
    let client = kafka(port).await;
    create_topic(&client).await;

    let cfg = hub_config(d, "[storage]\nsqlite_path = \"hub.sqlite\"", port, "hub-1");
    let config = cloud_hub::Config::load(&cfg).unwrap();
    for g in GATEWAYS.iter().chain(&["gw-revoked"]) {
        cloud_hub::gateway_add(&config, g).unwrap();
    }
    cloud_hub::gateway_revoke(&config, "gw-revoked").unwrap();
    let http = http();
    let (_hub, url) = start_hub(&cfg, &d.join("hub.log"));

    const N: u64 = 10;
    produce_batches(&client, 1..=N).await;
    // A re-sent batch (the agent retried): stored once.
    produce(
        &client,
        partition_of("gw-a"),
        vec![routed("gw-a", batch("gw-a", 1).encode_to_vec())],
    )
    .await;
    let db = d.join("hub.sqlite");
    let expected = (GATEWAYS.len() as u64 * N * R) as i64;
    wait_for("every batch stored", async || {
        metric(&http, &url, "vigil_hub_kafka_batches_stored_total").await
            == GATEWAYS.len() as u64 * N + 1
    })
    .await;
    assert_eq!(
        sqlite_count(&db, "SELECT COUNT(*) FROM observations"),
        expected
    );
    assert_eq!(
        sqlite_count(&db, "SELECT COUNT(*) FROM batches"),
        (GATEWAYS.len() as u64 * N) as i64
    );
    assert_eq!(
        owned(&http, &url).await,
        PARTITIONS as usize,
        "one replica holds every partition"
    );

    // Unusable records: counted by reason, offsets move past them.
    let p = partition_of("gw-a");
    let mut plain_id = routed("gw-a", batch("gw-a", N + 1).encode_to_vec());
    plain_id.headers.insert(DEVICE_ID.into(), b"gw-a".to_vec());
    let mut no_id = routed("gw-a", batch("gw-a", N + 1).encode_to_vec());
    no_id.headers.remove(DEVICE_ID);
    let mut gzip = routed("gw-a", batch("gw-a", N + 1).encode_to_vec());
    gzip.headers
        .insert("content-encoding".into(), b"gzip".to_vec());
    produce(
        &client,
        p,
        vec![
            routed("gw-a", vec![0xff, 0xff, 0xff]),
            routed("gw-a", batch("gw-b", N + 1).encode_to_vec()),
            routed("gw-unknown", batch("gw-unknown", 1).encode_to_vec()),
            routed("gw-revoked", batch("gw-revoked", 1).encode_to_vec()),
            plain_id,
            no_id,
            gzip,
            // And a good one after them.
            routed("gw-a", batch("gw-a", N + 1).encode_to_vec()),
        ],
    )
    .await;
    wait_for("the good record after the bad ones stored", async || {
        metric(&http, &url, "vigil_hub_kafka_batches_stored_total").await
            == GATEWAYS.len() as u64 * N + 2
    })
    .await;
    for (reason, n) in [
        ("malformed", 1),
        ("gateway_mismatch", 1),
        ("unknown_gateway", 2),
        ("bad_headers", 1),
        ("missing_device_id", 1),
        ("unsupported_encoding", 1),
        ("too_large", 0),
    ] {
        assert_eq!(metric(&http, &url, &dropped(reason)).await, n, "{reason}");
    }
    assert_eq!(
        sqlite_count(&db, "SELECT COUNT(*) FROM observations"),
        expected + R as i64
    );
    assert_eq!(
        sqlite_count(
            &db,
            "SELECT COUNT(*) FROM observations WHERE gateway_id NOT IN ('gw-a','gw-b','gw-c','gw-d')"
        ),
        0
    );
    // The committed offsets are the records produced per partition.
    let per_partition = |part: i32| {
        let gws = GATEWAYS.iter().filter(|g| partition_of(g) == part).count() as i64;
        gws * N as i64 + if part == p { 1 + 8 } else { 0 }
    };
    for part in 0..PARTITIONS {
        let o = sqlite_count(
            &db,
            &format!(
                "SELECT COALESCE(MAX(next_offset), 0) FROM stream_offsets WHERE source = 'kafka:{TOPIC}' AND partition_id = {part}"
            ),
        );
        assert_eq!(o, per_partition(part), "partition {part}");
    }
    wait_for("no lag left", async || {
        metrics_text(&http, &url)
            .await
            .lines()
            .filter(|l| l.starts_with("vigil_hub_kafka_partition_lag{"))
            .all(|l| l.ends_with(" 0"))
    })
    .await;
}

fn pg_count(url: &str, sql: &str) -> i64 {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.query_one(sql, &[]).unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_partitions_and_a_killed_one_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pg = crate::pg_server::PgServer::start();
    let broker = Tansu::start(d, Storage::Sqlite);
    let port = broker.port;
    let client = kafka(port).await;
    create_topic(&client).await;

    let storage = format!(
        "[storage]\nsqlite_path = \"unused.sqlite\"\nbackend = \"postgres\"\n[storage.postgres]\nurl = \"{}\"\npool_size = 4",
        pg.url()
    );
    let cfg_a = hub_config(d, &storage, port, "hub-a");
    let cfg_b = hub_config(d, &storage, port, "hub-b");
    let config = cloud_hub::Config::load(&cfg_a).unwrap();
    for g in GATEWAYS {
        cloud_hub::gateway_add(&config, g).unwrap();
    }
    let http = http();
    let (mut hub_a, url_a) = start_hub(&cfg_a, &d.join("hub-a.log"));
    let (_hub_b, url_b) = start_hub(&cfg_b, &d.join("hub-b.log"));
    // Both replicas take an even share (2 + 2 of 4).
    wait_for("the partitions shared 2 + 2", async || {
        owned(&http, &url_a).await == 2 && owned(&http, &url_b).await == 2
    })
    .await;

    // Phase 1; kill -9 replica A once it has stored some of its share.
    const N1: u64 = 20;
    const N: u64 = 60;
    let producer = tokio::spawn(async move {
        let client = kafka(port).await;
        for s in 1..=N {
            produce_batches(&client, s..=s).await;
            if s == N1 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    wait_for("replica A stores a share", async || {
        metric(&http, &url_a, "vigil_hub_kafka_batches_stored_total").await > 0
    })
    .await;
    hub_a.kill();
    producer.await.unwrap();

    // B takes A's partitions once A's leases expire, from the committed offsets.
    let url = pg.url();
    let expected = (GATEWAYS.len() as u64 * N * R) as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let u = url.clone();
        let n =
            tokio::task::spawn_blocking(move || pg_count(&u, "SELECT COUNT(*) FROM observations"))
                .await
                .unwrap();
        if n == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out with {n} of {expected} readings stored\n--- hub A\n{}\n--- hub B\n{}\n--- broker\n{}",
            tail(d, "hub-a.log"),
            tail(d, "hub-b.log"),
            tail(d, "tansu.log")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        owned(&http, &url_b).await,
        PARTITIONS as usize,
        "B holds every partition"
    );
    let u = url.clone();
    let (observations, batches, offsets, identities) = tokio::task::spawn_blocking(move || {
        (
            pg_count(&u, "SELECT COUNT(*) FROM observations"),
            pg_count(&u, "SELECT COUNT(*) FROM batches"),
            pg_count(&u, "SELECT COALESCE(SUM(next_offset), 0)::bigint FROM stream_offsets"),
            pg_count(
                &u,
                "SELECT COUNT(*) FROM (SELECT DISTINCT gateway_id, device_id, sequence FROM observations) x",
            ),
        )
    })
    .await
    .unwrap();
    assert_eq!(observations, expected, "each reading stored exactly once");
    assert_eq!(identities, expected);
    assert_eq!(batches, (GATEWAYS.len() as u64 * N) as i64);
    assert_eq!(
        offsets,
        (GATEWAYS.len() as u64 * N) as i64,
        "every record's offset committed"
    );
    assert!(metric(&http, &url_b, "vigil_hub_kafka_batches_stored_total").await > 0);
}

/// The broker goes away mid-stream (killed, back after 1 s, twice) while
/// batches keep being produced (the producer retries like IoT Hub routing
/// does) and the hub consumes: the hub reconnects and resumes from the
/// offsets it committed with its batches; every reading is stored exactly
/// once and every record's offset is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut broker = Tansu::start(d, Storage::Sqlite);
    let port = broker.port;
    let client = kafka(port).await;
    create_topic(&client).await;
    drop(client);
    let cfg = hub_config(d, "[storage]\nsqlite_path = \"hub.sqlite\"", port, "hub-1");
    let config = cloud_hub::Config::load(&cfg).unwrap();
    for g in GATEWAYS {
        cloud_hub::gateway_add(&config, g).unwrap();
    }
    let http = http();
    let (_hub, url) = start_hub(&cfg, &d.join("hub.log"));

    // Produces batches `seqs`, each record retried until the broker takes it.
    async fn produce_retrying(port: u16, seqs: std::ops::RangeInclusive<u64>) {
        for s in seqs {
            for g in GATEWAYS {
                let record = routed(g, batch(g, s).encode_to_vec());
                loop {
                    let attempt = async {
                        let client = ClientBuilder::new(vec![format!("127.0.0.1:{port}")])
                            .build()
                            .await?;
                        let pc = client
                            .partition_client(TOPIC, partition_of(g), UnknownTopicHandling::Retry)
                            .await?;
                        pc.produce(vec![record.clone()], Compression::NoCompression)
                            .await
                            .map(drop)
                    };
                    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                        Ok(Ok(())) => break,
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
        }
    }
    const N: u64 = 30;
    let db = d.join("hub.sqlite");
    let stored = || sqlite_count(&db, "SELECT COUNT(*) FROM batches");
    produce_retrying(port, 1..=10).await;
    wait_for("the first batches stored", async || stored() > 0).await;
    for (k, range) in [(1, 11..=20), (2, 21..=N)] {
        broker.restart(Duration::from_secs(1));
        produce_retrying(port, range).await;
        let before = metric(&http, &url, "vigil_hub_kafka_batches_stored_total").await;
        wait_for(&format!("storing again after restart {k}"), async || {
            metric(&http, &url, "vigil_hub_kafka_batches_stored_total").await > before
                || stored() == (GATEWAYS.len() as u64 * N) as i64
        })
        .await;
    }
    let expected = (GATEWAYS.len() as u64 * N) as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stored() < expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {expected} batches stored\n--- hub\n{}\n--- broker\n{}",
            stored(),
            tail(d, "hub.log"),
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stored(), expected, "each batch once");
    assert_eq!(
        sqlite_count(&db, "SELECT COUNT(*) FROM observations"),
        expected * R as i64,
        "each reading exactly once"
    );
    assert_eq!(
        sqlite_count(
            &db,
            "SELECT COUNT(*) FROM (SELECT DISTINCT gateway_id, device_id, sequence FROM observations)"
        ),
        expected * R as i64
    );
    // (A record the producer re-sent after a lost answer is in the log
    // twice; its copy is consumed and de-duplicated like the rest.)
    wait_for("every offset committed", async || {
        sqlite_count(
            &db,
            "SELECT COALESCE(SUM(next_offset), 0) FROM stream_offsets",
        ) >= expected
    })
    .await;
}
