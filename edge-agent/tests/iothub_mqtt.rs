//! The IoT Hub MQTT uplink against a local Mosquitto set up like IoT Hub:
//! TLS with a test CA, no anonymous clients, the device's user name
//! (`{host}/{device}/?api-version=...`) with its SAS token as password, and
//! an ACL letting the device publish only to `devices/{id}/messages/events/#`.
//! A second user subscribes and checks what arrives. The test starts and
//! stops its own `mosquitto` (Debian package `mosquitto`, installed by
//! `scripts/setup.sh`).

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use device_drivers::DriverOutput;
use edge_agent::buffer::Buffer;
use edge_agent::config::AgentConfig;
use edge_agent::iothub::{self, IotHubUplink};
use edge_agent::uplink::{AnyUplink, UplinkError};
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use shared_protocol::v1::{Batch, Reading, reading};
use tokio::sync::{mpsc, watch};

const DEVICE: &str = "dev-1";
const HOST: &str = "localhost";
const N: u64 = 200;
/// The fixed clock the agent's SAS tokens are computed from, so that the
/// broker's password file can hold the exact token.
const CLOCK: u64 = 3_000_000_000;
const TTL: u64 = 3600;

fn fixed_clock() -> u64 {
    CLOCK
}

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

struct Broker {
    conf: PathBuf,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mosquitto (run scripts/setup.sh)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "mosquitto did not listen on {}: {}",
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// SIGTERM, so that mosquitto saves its persistent sessions.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            for _ in 0..100 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
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

fn agent_config(dir: &Path, port: u16, key_file: &str) -> AgentConfig {
    let text = format!(
        r#"
gateway_id = "gw-mqtt"
data_dir = "data"
[uplink]
kind = "iothub-mqtt"
batch_max_readings = 10
batch_max_wait_ms = 100
request_timeout_ms = 3000
max_backoff_ms = 500
backlog_rate_per_s = 40
[uplink.iothub]
host = "{HOST}"
device_id = "{DEVICE}"
port = {port}
sas_key_file = "{key_file}"
ca_file = "ca.pem"
"#
    );
    let path = dir.join(format!("agent-{key_file}.toml"));
    std::fs::write(&path, text).unwrap();
    AgentConfig::load(&path).unwrap()
}

fn uplink(cfg: &AgentConfig) -> IotHubUplink {
    IotHubUplink::new(
        cfg.uplink.iothub.as_ref().unwrap(),
        cfg.uplink.request_timeout(),
    )
    .unwrap()
    .with_clock(fixed_clock)
}

/// Messages seen by the subscriber: (topic, batch).
type Seen = mpsc::UnboundedReceiver<(String, Batch)>;

fn subscriber(port: u16, ca: &Path) -> (Seen, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new("reader", HOST, port);
    opts.set_credentials("reader", "reader-pw");
    // A persistent session: messages published while the broker restarts
    // and this client reconnects are queued for it.
    opts.set_clean_session(false);
    opts.set_max_packet_size(512 * 1024, 512 * 1024);
    let tls = edge_agent::uplink::tls_config(Some(ca)).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (client, mut events) = AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client
                        .subscribe(
                            format!("devices/{DEVICE}/messages/events/#"),
                            QoS::AtLeastOnce,
                        )
                        .await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let payload = if p.topic.ends_with("$.ce=zstd") {
                        zstd::decode_all(p.payload.as_ref()).expect("zstd payload")
                    } else {
                        p.payload.to_vec()
                    };
                    let batch = Batch::decode(payload.as_ref()).expect("payload is a Batch");
                    let _ = tx.send((p.topic.clone(), batch));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    (rx, task)
}

async fn preload(cfg: &AgentConfig) {
    let keys = edge_agent::secrets::load_keyring(&cfg.key_path()).unwrap();
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    let buffer = Buffer::open_with(&cfg.data_dir, &keys, cfg.buffer.limits()).unwrap();
    let outputs: Vec<DriverOutput> = (0..N)
        .map(|i| DriverOutput {
            device_id: "spo2-1".into(),
            readings: vec![Reading {
                mdc_code: 150456,
                value: Some(reading::Value::Numeric(90.0 + (i % 10) as f64)),
                ucum_unit: "%".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    buffer.append(outputs).await.unwrap();
    assert_eq!(buffer.pending_readings(), N);
}

fn pending(cfg: &AgentConfig) -> u64 {
    let keys = edge_agent::secrets::load_keyring(&cfg.key_path()).unwrap();
    Buffer::open_with(&cfg.data_dir, &keys, cfg.buffer.limits())
        .unwrap()
        .pending_readings()
}

async fn run_agent(
    cfg: AgentConfig,
    up: IotHubUplink,
) -> (
    watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), edge_agent::AgentError>>,
) {
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(edge_agent::run_with_uplink(
        cfg,
        AnyUplink::IotHub(Box::new(up)),
        rx,
    ));
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iothub_mqtt_uplink_against_mosquitto() {
    require("mosquitto");
    require("mosquitto_passwd");
    let _ = tracing_subscriber::fmt()
        .with_env_filter("edge_agent=info")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Test CA and a server certificate for localhost signed by it.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Vigil test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let srv_key = rcgen::KeyPair::generate().unwrap();
    let srv_cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&srv_key, &issuer)
        .unwrap();
    std::fs::write(d.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(d.join("server.pem"), srv_cert.pem()).unwrap();
    write_private(&d.join("server.key"), srv_key.serialize_pem().as_bytes());

    // Device keys: the registered one and a wrong one.
    let key = b"vigil-test-device-key-32-bytes!!";
    write_private(&d.join("sas.key"), BASE64.encode(key).as_bytes());
    write_private(
        &d.join("wrong.key"),
        BASE64.encode(b"not the device key").as_bytes(),
    );

    // The broker, configured like IoT Hub.
    let port = free_port();
    let user = iothub::username(HOST, DEVICE);
    let token = iothub::sas_token(&iothub::resource_uri(HOST, DEVICE), key, CLOCK + TTL, None);
    let pw = d.join("passwd");
    std::fs::write(&pw, "").unwrap();
    passwd(&pw, &user, &token);
    passwd(&pw, "reader", "reader-pw");
    std::fs::write(
        d.join("acl"),
        format!(
            "user {user}\ntopic write devices/{DEVICE}/messages/events/#\n\nuser reader\ntopic read devices/#\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(d.join("mq")).unwrap();
    std::fs::write(
        d.join("mosquitto.conf"),
        format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {pw}\nacl_file {acl}\n\
             persistence true\npersistence_location {mq}/\nuser root\n\
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
    let mut broker = Broker {
        conf: d.join("mosquitto.conf"),
        log: d.join("mosquitto.log"),
        port,
        child: None,
    };
    broker.start();
    let (mut seen, sub_task) = subscriber(port, &d.join("ca.pem"));

    // 1. A wrong SAS token is refused, and the agent keeps its records.
    let good = agent_config(d, port, "sas.key");
    let wrong = agent_config(d, port, "wrong.key");
    preload(&good).await;
    let mut probe = uplink(&wrong);
    // Over IoT Hub's 256 KiB message limit: refused before any I/O, so
    // that the forwarder halves the batch (by records).
    let big = Batch {
        gateway_id: "x".repeat(iothub::MAX_MESSAGE_BYTES),
        ..Default::default()
    };
    let err = probe.send(&big).await.unwrap_err();
    assert!(matches!(err, UplinkError::MessageTooLarge { .. }), "{err}");
    let err = probe
        .send(&Batch {
            gateway_id: "gw-mqtt".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, UplinkError::MqttRefused(_)), "{err}");
    let (stop, task) = run_agent(wrong.clone(), uplink(&wrong)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert!(
        seen.try_recv().is_err(),
        "nothing may arrive with a wrong token"
    );
    assert_eq!(pending(&good), N, "records kept after refused connections");

    // 2. The right token: everything arrives, across a broker restart.
    let (stop, task) = run_agent(good.clone(), uplink(&good)).await;
    let mut seqs: Vec<u64> = Vec::new();
    let mut restarted = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while seqs.iter().collect::<BTreeSet<_>>().len() < N as usize {
        let (topic, batch) = tokio::time::timeout_at(deadline, seen.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out with {} distinct readings; broker log:\n{}",
                    seqs.iter().collect::<BTreeSet<_>>().len(),
                    std::fs::read_to_string(d.join("mosquitto.log")).unwrap_or_default()
                )
            })
            .unwrap();
        assert_eq!(
            topic,
            format!("devices/{DEVICE}/messages/events/$.ct=application%2Fx-protobuf&$.ce=identity")
        );
        assert_eq!(batch.gateway_id, "gw-mqtt");
        for dev in &batch.devices {
            assert_eq!(dev.device.as_ref().unwrap().device_id, "spo2-1");
            for r in &dev.readings {
                assert_eq!(r.mdc_code, 150456);
                assert_eq!(r.ucum_unit, "%");
                let Some(reading::Value::Numeric(v)) = r.value else {
                    panic!("numeric value expected: {r:?}");
                };
                assert!((90.0..100.0).contains(&v));
                seqs.push(r.sequence);
            }
        }
        if !restarted && seqs.len() >= 40 {
            restarted = true;
            broker.stop();
            tokio::time::sleep(Duration::from_secs(1)).await;
            broker.start();
        }
    }
    assert!(restarted);
    let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
    let (lo, hi) = (*distinct.first().unwrap(), *distinct.last().unwrap());
    assert_eq!(hi - lo + 1, N, "sequences contiguous: {lo}..={hi}");
    // The agent deletes only what was PUBACKed, so it ends empty.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(pending(&good), 0);

    // 3. uplink.compression = "zstd": the payload is zstd and the property
    // bag says so ($.ce=zstd).
    let mut zup = uplink(&good).with_compression(edge_agent::config::Compression::Zstd);
    let sent = Batch {
        gateway_id: "gw-mqtt".into(),
        sequence: 999,
        devices: vec![shared_protocol::v1::DeviceData {
            readings: (0..50)
                .map(|i| Reading {
                    mdc_code: 150456,
                    ucum_unit: "%".into(),
                    sequence: 10_000 + i,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    zup.send(&sent).await.unwrap();
    let (topic, got) = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (t, b) = seen.recv().await.unwrap();
            if b.sequence == 999 {
                return (t, b);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        topic,
        format!("devices/{DEVICE}/messages/events/$.ct=application%2Fx-protobuf&$.ce=zstd")
    );
    assert_eq!(got, sent);
    sub_task.abort();
    drop(broker);
}
