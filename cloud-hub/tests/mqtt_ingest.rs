//! MQTT ingest against a throwaway Mosquitto (MQTT 5, shared
//! subscriptions): two hub processes share one SQLite database and one
//! subscription group; gateways publish batches as the agent does (MQTT
//! 3.1.1, QoS 1, `devices/{id}/messages/events/{property bag}`). Every
//! reading is stored exactly once, both hubs take a share, and a hub killed
//! with SIGKILL mid-stream and restarted loses nothing. Messages of
//! unregistered or revoked gateways, of a gateway claiming another's id,
//! and undecodable ones are counted and dropped; a zstd-compressed batch
//! (`$.ce=zstd`) is stored.
//!
//! Needs `mosquitto` and `mosquitto_passwd` (Debian package `mosquitto`,
//! installed by `scripts/setup.sh`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Batch, DeviceData, DeviceInfo, Reading, reading};

const BIN: &str = env!("CARGO_BIN_EXE_cloud-hub");
const GATEWAYS: [&str; 3] = ["gw-a", "gw-b", "gw-c"];
/// Readings per batch.
const R: u64 = 3;
const BAG: &str = "$.ct=application%2Fx-protobuf&$.ce=identity";

fn require(bin: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{bin}` not found: this test needs the Debian package `mosquitto`; run scripts/setup.sh"
    );
}

fn write_private(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

fn passwd(file: &Path, user: &str, password: &str) {
    let out = Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(file)
        .arg(user)
        .arg(password)
        .output()
        .expect("mosquitto_passwd (package mosquitto; run scripts/setup.sh)");
    assert!(
        out.status.success(),
        "mosquitto_passwd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Test CA + broker certificate, password file and ACL; starts mosquitto.
fn start_broker(d: &Path, port: u16) -> Proc {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Vigil test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let srv_key = rcgen::KeyPair::generate().unwrap();
    let srv_cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&srv_key, &issuer)
        .unwrap();
    std::fs::write(d.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(d.join("server.pem"), srv_cert.pem()).unwrap();
    write_private(&d.join("server.key"), srv_key.serialize_pem().as_bytes());

    let pw = d.join("passwd");
    std::fs::write(&pw, "").unwrap();
    passwd(&pw, "hub", "hub-secret");
    for g in GATEWAYS.iter().chain(&["gw-unknown", "gw-revoked"]) {
        passwd(&pw, g, &format!("{g}-pw"));
    }
    // Each device may publish only to its own topic (what binds a client
    // to its gateway id); the hub reads everything under devices/.
    std::fs::write(
        d.join("acl"),
        "user hub\ntopic read devices/#\ntopic write devices/+/messages/devicebound/#\n\n\
         pattern write devices/%u/messages/events/#\npattern read devices/%u/messages/devicebound/#\n",
    )
    .unwrap();
    std::fs::create_dir_all(d.join("mq")).unwrap();
    std::fs::write(
        d.join("mosquitto.conf"),
        format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {pw}\nacl_file {acl}\n\
             persistence true\npersistence_location {mq}/\nuser root\nmax_queued_messages 100000\n\
             listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n",
            pw = pw.display(),
            acl = d.join("acl").display(),
            mq = d.join("mq").display(),
            ca = d.join("ca.pem").display(),
            cert = d.join("server.pem").display(),
            key = d.join("server.key").display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("mosquitto.log")).unwrap();
    let broker = Proc(Some(
        Command::new("mosquitto")
            .arg("-c")
            .arg(d.join("mosquitto.conf"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mosquitto (run scripts/setup.sh)"),
    ));
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return broker;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "mosquitto did not listen on {port}: {}",
        std::fs::read_to_string(d.join("mosquitto.log")).unwrap_or_default()
    );
}

fn hub_config(d: &Path, port: u16, client_id: &str) -> PathBuf {
    let path = d.join(format!("{client_id}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[server]
bind = "127.0.0.1:0"
[storage]
sqlite_path = "hub.sqlite"
[mqtt]
host = "localhost"
port = {port}
client_id = "{client_id}"
group = "hubs"
username = "hub"
password_file = "hub.pw"
session_expiry_s = 600
[mqtt.tls]
ca_file = "ca.pem"
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
        .env_remove("VIGIL_HUB_MQTT_CLIENT_ID")
        .env("RUST_LOG", "cloud_hub=info")
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

/// The value of an unlabelled or labelled sample in a hub's /metrics.
async fn metric(client: &reqwest::Client, url: &str, sample: &str) -> u64 {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{sample} not in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
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

/// Publishes `(topic suffix, payload)` messages as `user` at QoS 1, like
/// the agent (MQTT 3.1.1), and waits for every PUBACK.
/// The BatchAcks the hub publishes for `user`'s batches, collected by a
/// client connected as `user` (the ACL lets it read only its own).
fn collect_acks(port: u16, ca: &Path, user: &str) -> Arc<std::sync::Mutex<BTreeSet<u64>>> {
    let (client, mut events) =
        AsyncClient::new(client_opts(port, ca, user, &format!("acks-{user}")), 16);
    let got: Arc<std::sync::Mutex<BTreeSet<u64>>> = Arc::default();
    let g = got.clone();
    let topic = format!("devices/{user}/messages/devicebound/#");
    tokio::spawn(async move {
        client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let ack = shared_protocol::v1::BatchAck::decode(p.payload.as_ref()).unwrap();
                    g.lock().unwrap().insert(ack.sequence);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    got
}

fn client_opts(port: u16, ca: &Path, user: &str, client_id: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, "localhost", port);
    opts.set_credentials(user, format!("{user}-pw"));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    opts
}

async fn publish(port: u16, ca: &Path, user: &str, messages: Vec<(String, Vec<u8>)>) {
    let opts = client_opts(port, ca, user, &format!("pub-{user}"));
    let (client, mut events) = AsyncClient::new(opts, 16);
    let n = messages.len();
    let topic_user = user.to_owned();
    let pub_task = tokio::spawn(async move {
        for (suffix, payload) in messages {
            client
                .publish(
                    format!("devices/{topic_user}/messages/events/{suffix}"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher {user}: {e}"),
            Err(_) => panic!("publisher {user}: no PUBACK in time ({acked}/{n})"),
        }
    }
    let client = pub_task.await.unwrap();
    let _ = client.disconnect().await;
}

async fn publish_batches(port: u16, ca: &Path, seqs: std::ops::RangeInclusive<u64>) {
    let mut tasks = Vec::new();
    for g in GATEWAYS {
        let msgs = seqs
            .clone()
            .map(|s| (BAG.to_owned(), batch(g, s).encode_to_vec()))
            .collect();
        let ca = ca.to_owned();
        tasks.push(tokio::spawn(
            async move { publish(port, &ca, g, msgs).await },
        ));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn stored_readings(db: &Path) -> Vec<(String, i64)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare("SELECT gateway_id, sequence FROM observations ORDER BY gateway_id, sequence")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_share_the_stream_and_a_killed_hub_loses_nothing() {
    require("mosquitto");
    require("mosquitto_passwd");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let _broker = start_broker(d, port);
    let ca = d.join("ca.pem");
    write_private(&d.join("hub.pw"), b"hub-secret\n");

    let cfg_a = hub_config(d, port, "hub-a");
    let cfg_b = hub_config(d, port, "hub-b");
    // Registry (also creates the shared database before both hubs open it).
    let config = cloud_hub::Config::load(&cfg_a).unwrap();
    for g in GATEWAYS.iter().chain(&["gw-revoked"]) {
        cloud_hub::gateway_add(&config, g).unwrap();
    }
    cloud_hub::gateway_revoke(&config, "gw-revoked").unwrap();

    let http = http();
    let (mut hub_a, url_a) = start_hub(&cfg_a, &d.join("hub-a.log"));
    let (_hub_b, url_b) = start_hub(&cfg_b, &d.join("hub-b.log"));
    for url in [&url_a, &url_b] {
        wait_for("hub connected and subscribed", async || {
            metric(&http, url, "vigil_hub_mqtt_connected").await == 1
        })
        .await;
    }

    // The gateway gw-a listens for the hub's acknowledgements, as an agent
    // with `uplink.iothub.delivery = "hub"` does.
    let acks = collect_acks(port, &ca, "gw-a");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Phase 1, then kill hub A (SIGKILL) as soon as it has stored a share.
    const N1: u64 = 30;
    const N: u64 = 90;
    publish_batches(port, &ca, 1..=N1).await;
    wait_for("hub A stores a share", async || {
        metric(&http, &url_a, "vigil_hub_mqtt_batches_stored_total").await > 0
    })
    .await;
    hub_a.kill();
    // Phase 2 while A is down, then A comes back with the same client id.
    publish_batches(port, &ca, N1 + 1..=N).await;
    let (_hub_a, url_a) = start_hub(&cfg_a, &d.join("hub-a.log"));

    let db = d.join("hub.sqlite");
    let expected = GATEWAYS.len() * (N * R) as usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stored_readings(&db).len() < expected {
        if tokio::time::Instant::now() > deadline {
            let tail = |f: &str| {
                let t = std::fs::read_to_string(d.join(f)).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            };
            panic!(
                "timed out with {} of {expected} readings stored\n--- hub A\n{}\n--- hub B\n{}\n--- broker\n{}",
                stored_readings(&db).len(),
                tail("hub-a.log"),
                tail("hub-b.log"),
                tail("mosquitto.log")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Re-deliveries are over once nothing is in flight; give them time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = stored_readings(&db);
    assert_eq!(rows.len(), expected, "each reading stored exactly once");
    for g in GATEWAYS {
        let seqs: BTreeSet<i64> = rows
            .iter()
            .filter(|(gw, _)| gw == g)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(seqs, (1..=(N * R) as i64).collect(), "{g}");
    }
    let c = rusqlite::Connection::open(&db).unwrap();
    let batches: i64 = c
        .query_row("SELECT COUNT(*) FROM batches", [], |r| r.get(0))
        .unwrap();
    assert_eq!(batches as usize, GATEWAYS.len() * N as usize);
    assert!(
        metric(&http, &url_b, "vigil_hub_mqtt_batches_stored_total").await > 0,
        "hub B took a share"
    );
    // The restarted hub resumed its session: what the broker kept for it
    // (in flight when it was killed, or queued while it was away) came back.
    assert!(
        metric(&http, &url_a, "vigil_hub_mqtt_batches_stored_total").await > 0,
        "restarted hub A resumed its queue"
    );

    // Every stored batch of gw-a was acknowledged to gw-a by one of the hubs.
    wait_for("gw-a's batches acknowledged", async || {
        acks.lock().unwrap().len() as u64 >= N
    })
    .await;
    assert_eq!(
        *acks.lock().unwrap(),
        (1..=N).collect::<BTreeSet<u64>>(),
        "one BatchAck per stored batch of gw-a"
    );

    // Unusable messages: counted and dropped (acknowledged), nothing stored.
    publish(
        port,
        &ca,
        "gw-unknown",
        vec![(BAG.into(), batch("gw-unknown", 1).encode_to_vec())],
    )
    .await;
    publish(
        port,
        &ca,
        "gw-revoked",
        vec![(BAG.into(), batch("gw-revoked", 1).encode_to_vec())],
    )
    .await;
    publish(
        port,
        &ca,
        "gw-a",
        vec![
            // gw-a claiming to be gw-b.
            (BAG.into(), batch("gw-b", N + 1).encode_to_vec()),
            (BAG.into(), vec![0xff, 0xff, 0xff]),
            (
                "$.ct=application%2Fx-protobuf&$.ce=gzip".into(),
                batch("gw-a", N + 1).encode_to_vec(),
            ),
            // Not a zstd frame although $.ce says so.
            ("$.ce=zstd".into(), batch("gw-a", N + 1).encode_to_vec()),
            // A zstd frame, as the agent sends with uplink.compression = "zstd".
            (
                "$.ct=application%2Fx-protobuf&$.ce=zstd".into(),
                zstd::encode_all(&batch("gw-a", N + 2).encode_to_vec()[..], 3).unwrap(),
            ),
        ],
    )
    .await;
    let sum = async |sample: &str| {
        metric(&http, &url_a, sample).await + metric(&http, &url_b, sample).await
    };
    let dropped = |r: &str| format!("vigil_hub_mqtt_messages_dropped_total{{reason=\"{r}\"}}");
    wait_for("six messages dropped", async || {
        let mut total = 0;
        for r in [
            "unknown_gateway",
            "gateway_mismatch",
            "malformed",
            "unsupported_encoding",
        ] {
            total += sum(&dropped(r)).await;
        }
        total == 6
    })
    .await;
    assert_eq!(sum(&dropped("unknown_gateway")).await, 2);
    assert_eq!(sum(&dropped("gateway_mismatch")).await, 1);
    assert_eq!(sum(&dropped("malformed")).await, 2);
    assert_eq!(sum(&dropped("unsupported_encoding")).await, 1);
    // Only the zstd batch was stored.
    wait_for("the zstd batch stored", async || {
        stored_readings(&db).len() == expected + R as usize
    })
    .await;
    let rows = stored_readings(&db);
    assert!(rows.iter().all(|(g, _)| GATEWAYS.contains(&g.as_str())));
    assert!(rows.contains(&("gw-a".into(), ((N + 1) * R + 1) as i64)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_broker_login_is_counted_and_http_keeps_serving() {
    require("mosquitto");
    require("mosquitto_passwd");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let _broker = start_broker(d, port);
    write_private(&d.join("wrong.pw"), b"not-the-password\n");
    let cfg = hub_config(d, port, "hub-wrong");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("password_file = \"hub.pw\"", "password_file = \"wrong.pw\"");
    std::fs::write(&cfg, text).unwrap();
    let (_hub, url) = start_hub(&cfg, &d.join("hub-wrong.log"));
    let http = http();
    wait_for("refused connections counted", async || {
        metric(&http, &url, "vigil_hub_mqtt_connection_errors_total").await >= 2
    })
    .await;
    assert_eq!(metric(&http, &url, "vigil_hub_mqtt_connected").await, 0);
    let r = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let log = std::fs::read_to_string(d.join("hub-wrong.log")).unwrap();
    assert!(log.contains("MQTT connection refused"), "{log}");
    assert!(!log.contains("not-the-password"), "no secret in the log");
}

#[test]
fn a_password_file_readable_by_others_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("hub.pw"), "secret\n").unwrap();
    std::fs::set_permissions(d.join("hub.pw"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(d.join("ca.pem"), "").unwrap();
    let config = cloud_hub::Config::load(&hub_config(d, 8883, "hub-x")).unwrap();
    let err = cloud_hub::Hub::open(config).unwrap_err().to_string();
    assert!(
        err.contains("mqtt.password_file") && err.contains("chmod 600"),
        "{err}"
    );
}
