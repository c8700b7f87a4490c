//! In-process hub for HTTP-level tests: loopback listener, tempdir SQLite.
#![allow(dead_code)]

use std::net::SocketAddr;

use cloud_hub::Config;
use prost::Message;
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Batch, BatchAck, DeviceData, DeviceInfo, Reading, reading};
use shared_protocol::{CONTENT_TYPE_PROTOBUF, INGEST_PATH};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const GATEWAY: &str = "gw-1";
pub const DEVICE: &str = "masimo-1";
pub const PATIENT: &str = "patient-1";

#[derive(Debug)]
pub struct TestHub {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub base: String,
    pub token: String,
    /// The tests' API token (role admin), sent by `client` by default.
    pub reader: String,
    pub config: Config,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), cloud_hub::HubError>>>,
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().unwrap()
}

/// A client sending `Authorization: Bearer <token>` unless a request sets
/// its own.
pub fn client_with_token(token: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

pub fn config_text(dir: &std::path::Path, extra_server: &str) -> String {
    format!(
        r#"
[server]
bind = "127.0.0.1:0"
max_body_bytes = 65536
{extra_server}
[storage]
sqlite_path = "{}"
[[associations]]
gateway_id = "{GATEWAY}"
device_id = "{DEVICE}"
patient_id = "{PATIENT}"
"#,
        dir.join("hub.sqlite").display()
    )
}

/// A hub config text moved onto PostgreSQL: the backend and its section
/// inserted before `[[associations]]` (as [`config_text`] writes it).
pub trait OnPostgres {
    fn on_postgres(&self, url: &str, pool_size: u32) -> String;
}

impl OnPostgres for String {
    fn on_postgres(&self, url: &str, pool_size: u32) -> String {
        assert!(self.contains("[[associations]]"), "{self}");
        self.replacen(
            "[[associations]]",
            &format!(
                "backend = \"postgres\"\n[storage.postgres]\nurl = \"{url}\"\npool_size = {pool_size}\n\n[[associations]]"
            ),
            1,
        )
    }
}

impl TestHub {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    pub async fn start_with(extra_server: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(&config_text(dir.path(), extra_server)).unwrap();
        config.validate().unwrap();
        Self::start_config(dir, config, "http").await
    }

    pub async fn start_config(dir: tempfile::TempDir, config: Config, scheme: &str) -> Self {
        // A database restored from another hub's backup already has the
        // gateway: it gets a new token.
        let token = match cloud_hub::gateway_add(&config, GATEWAY) {
            Err(cloud_hub::HubError::Store(cloud_hub::store::StoreError::GatewayExists(_))) => {
                cloud_hub::gateway_rotate(&config, GATEWAY, std::time::Duration::ZERO).unwrap()
            }
            t => t.unwrap(),
        };
        // The test client reads with an administrator's API token unless a
        // request sets its own Authorization header.
        // A restarted hub on the same database gets a token of its own.
        let reader = (1..)
            .map(|n| match n {
                1 => "tests".to_owned(),
                n => format!("tests-{n}"),
            })
            .find_map(|name| {
                match cloud_hub::token_create(&config, &name, cloud_hub::access::Role::Admin) {
                    Ok(t) => Some(t),
                    Err(cloud_hub::HubError::Account(
                        cloud_hub::access::accounts::AccountError::Exists(_),
                    )) => None,
                    Err(e) => panic!("creating the tests' API token: {e}"),
                }
            })
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(cloud_hub::run(config.clone(), listener, async move {
            let _ = rx.await;
        }));
        Self {
            dir,
            addr,
            base: format!("{scheme}://{addr}"),
            token,
            config,
            client: client_with_token(&reader),
            reader,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_raw(
        &self,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url(INGEST_PATH))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    /// Posts a batch with the hub's token; asserts 200 and decodes the ack.
    pub async fn ingest(&self, batch: &Batch) -> BatchAck {
        let resp = self
            .post_raw(
                Some(&self.token),
                CONTENT_TYPE_PROTOBUF,
                batch.encode_to_vec(),
            )
            .await;
        assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
        assert_eq!(resp.headers()["content-type"], CONTENT_TYPE_PROTOBUF);
        BatchAck::decode(resp.bytes().await.unwrap()).unwrap()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
        )
    }

    /// The hub's SQLite database, with its audit file attached (as
    /// `audit`: unqualified audit table names find it).
    pub fn db(&self) -> rusqlite::Connection {
        let path = &self.config.storage.sqlite_path;
        let c = rusqlite::Connection::open(path).unwrap();
        let audit = cloud_hub::store::audit_path(path.as_ref());
        if audit.exists() {
            c.execute(
                "ATTACH DATABASE ?1 AS audit",
                [audit.to_string_lossy().as_ref()],
            )
            .unwrap();
        }
        c
    }

    /// Requests shutdown and waits for the server to return.
    pub async fn stop(mut self) {
        self.shutdown.take().unwrap().send(()).unwrap();
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// Microseconds since the epoch, now.
pub fn now_us() -> i64 {
    cloud_hub::store::now_us()
}

/// 2024-05-01T10:00:00Z
pub const T0: i64 = 1_714_557_600_000_000;
pub const MINUTE: i64 = 60_000_000;

pub fn spo2(seq: u64, value: f64, time_us: i64) -> Reading {
    Reading {
        mdc_code: codes::PULS_OXIM_SAT_O2,
        vendor_label: "SPO2".into(),
        value: Some(reading::Value::Numeric(value)),
        mdc_unit: units::PERCENT.mdc,
        ucum_unit: "%".into(),
        device_time_us: time_us,
        time_source: 1,
        gateway_time_us: time_us + 1000,
        validity: 1,
        flags: vec![],
        sequence: seq,
        subject: None,
        interpretation: 0,
    }
}

pub fn pulse(seq: u64, value: f64, time_us: i64) -> Reading {
    Reading {
        mdc_code: codes::PULS_OXIM_PULS_RATE,
        mdc_unit: units::BEAT_PER_MIN.mdc,
        ucum_unit: "/min".into(),
        value: Some(reading::Value::Numeric(value)),
        ..spo2(seq, 0.0, time_us)
    }
}

pub fn batch(seq: u64, device_id: &str, readings: Vec<Reading>) -> Batch {
    Batch {
        gateway_id: GATEWAY.into(),
        sequence: seq,
        created_time_us: T0,
        devices: vec![DeviceData {
            device: Some(DeviceInfo {
                device_id: device_id.into(),
                protocol: "masimo-ascii1".into(),
                manufacturer: "Masimo".into(),
                model: "Radical-7".into(),
                serial_number: "1234".into(),
                location: "ICU-3/bed-07".into(),
            }),
            readings,
            waveforms: vec![],
            technical: vec![],
        }],
        agent_version: "test".into(),
        gateway_events: vec![],
        traceparent: String::new(),
        incarnation: 0,
    }
}

fn fhir_python() -> std::path::PathBuf {
    let venv = std::env::var_os("VIGIL_FHIR_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/vigil/fhir-r4-venv")
        });
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "the FHIR validator is not installed at {}: run scripts/setup.sh",
        py.display()
    );
    py
}

/// Runs the independent FHIR R4 validator (`tests/py/validate_fhir.py`,
/// fhir.resources 6.1.0) over `resources`; returns (no errors, report).
pub fn validate_fhir(resources: &[serde_json::Value]) -> (bool, String) {
    use std::io::Write;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/validate_fhir.py");
    let mut child = std::process::Command::new(fhir_python())
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start validator");
    {
        let mut stdin = child.stdin.take().unwrap();
        for r in resources {
            writeln!(stdin, "{r}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Writes `admin` as the association admin token (0600) in `data`, and a
/// hub config with its database in `data` plus the `[association]`
/// section and `extra` lines.
pub fn admin_config_text(data: &std::path::Path, admin: &str, extra: &str) -> String {
    let token_file = data.join("admin.token");
    std::fs::write(&token_file, format!("{admin}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    format!(
        "{}\n[association]\nadmin_token_file = \"{}\"\n{extra}\n",
        config_text(data, ""),
        token_file.display()
    )
}

/// A hub whose database and admin token live in `data` (kept by the
/// caller, so that a second hub can open them again).
pub async fn start_with_admin(data: &std::path::Path, admin: &str, extra: &str) -> TestHub {
    let config = Config::parse(&admin_config_text(data, admin, extra)).unwrap();
    config.validate().unwrap();
    TestHub::start_config(tempfile::tempdir().unwrap(), config, "http").await
}

/// A JSON request with an optional bearer token: (status, body or Null).
pub async fn call_json(
    hub: &TestHub,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    // Without a token: no credentials at all (not the test client's own).
    let mut req = match token {
        Some(t) => hub
            .client
            .request(method.parse().unwrap(), hub.url(path))
            .bearer_auth(t),
        None => client().request(method.parse().unwrap(), hub.url(path)),
    };
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}
