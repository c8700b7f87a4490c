//! Shared pieces of the IoT Hub tests: a throwaway Mosquitto on a free
//! loopback port set up like IoT Hub (TLS with a test CA, no anonymous
//! clients, password file, ACL), a "cloud" MQTT client playing IoT Hub's
//! service side, and a socat PTY pair for a serial device.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;

pub const HOST: &str = "localhost";

pub fn require(bin: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{bin}` not found: this test needs the Debian packages `mosquitto` and `socat`; run scripts/setup.sh"
    );
}

pub fn write_private(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Test CA and a `localhost` server certificate: `ca.pem`, `server.pem`,
/// `server.key` in `dir`.
pub fn make_ca(dir: &Path) {
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
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), srv_cert.pem()).unwrap();
    write_private(&dir.join("server.key"), srv_key.serialize_pem().as_bytes());
}

/// A Mosquitto started by the test, stopped on drop.
pub struct Broker {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Start Mosquitto with TLS (the test CA), the given users
    /// (`(user, password)`) and ACL text. `make_ca` must have run in `dir`.
    pub fn start(dir: &Path, users: &[(String, String)], acl: &str) -> Broker {
        require("mosquitto");
        require("mosquitto_passwd");
        let pw = dir.join("passwd");
        std::fs::write(&pw, "").unwrap();
        for (u, p) in users {
            let out = Command::new("mosquitto_passwd")
                .arg("-b")
                .arg(&pw)
                .arg(u)
                .arg(p)
                .output()
                .expect("mosquitto_passwd");
            assert!(
                out.status.success(),
                "mosquitto_passwd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(dir.join("acl"), acl).unwrap();
        let port = free_port();
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "per_listener_settings false\nallow_anonymous false\npassword_file {pw}\nacl_file {acl}\n\
                 user root\nlistener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n",
                pw = pw.display(),
                acl = dir.join("acl").display(),
                ca = dir.join("ca.pem").display(),
                cert = dir.join("server.pem").display(),
                key = dir.join("server.key").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        let b = Broker {
            dir: dir.to_owned(),
            port,
            child: Some(child),
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return b;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("mosquitto did not listen: {}", b.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A message the cloud side saw.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: bytes::Bytes,
}

/// An MQTT client with the service's view: subscribes to `filters` and
/// forwards every message; publish with the returned client.
pub fn cloud_client(
    port: u16,
    ca: &Path,
    user: &str,
    password: &str,
    filters: &[&str],
) -> (
    AsyncClient,
    mpsc::UnboundedReceiver<Msg>,
    tokio::task::JoinHandle<()>,
) {
    let mut opts = MqttOptions::new(user, HOST, port);
    opts.set_credentials(user, password);
    opts.set_max_packet_size(512 * 1024, 512 * 1024);
    let tls = edge_agent::uplink::tls_config(Some(ca)).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (client, mut events) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let c = client.clone();
    let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in &filters {
                        let _ = c.subscribe(f.clone(), QoS::AtLeastOnce).await;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                    });
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    (client, rx, task)
}

/// Wait for a message matching `pred`, keeping the others in `other`.
pub async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<Msg>,
    secs: u64,
    what: &str,
    mut pred: impl FnMut(&Msg) -> bool,
    other: &mut Vec<Msg>,
) -> Msg {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) if pred(&m) => return m,
            Ok(Some(m)) => other.push(m),
            Ok(None) => panic!("cloud client ended while waiting for {what}"),
            Err(_) => panic!(
                "timed out waiting for {what}; seen meanwhile: {:?}",
                other.iter().map(|m| &m.topic).collect::<Vec<_>>()
            ),
        }
    }
}

/// A socat PTY pair: the agent opens `agent`, the test writes to `sim`.
pub struct Pty {
    pub agent: PathBuf,
    pub sim: PathBuf,
    child: Child,
}

impl Pty {
    pub fn new(dir: &Path) -> Pty {
        require("socat");
        let agent = dir.join("tty-agent");
        let sim = dir.join("tty-sim");
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", agent.display()))
            .arg(format!("pty,raw,echo=0,link={}", sim.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat");
        let pty = Pty { agent, sim, child };
        for _ in 0..200 {
            if pty.agent.exists() && pty.sim.exists() {
                return pty;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("socat PTY links did not appear");
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One Masimo "ASCII 1" line (3 readings: SpO2, pulse rate, PI).
pub fn masimo_line(i: u32) -> String {
    format!(
        "11/24/26 10:00:{:02} SN=0000056661 SPO2=0{}% BPM=07{} PI=03.50% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000000\r\n",
        i % 60,
        90 + i % 10,
        i % 10
    )
}
