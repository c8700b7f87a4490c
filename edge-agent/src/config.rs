//! Agent configuration: a TOML file (see `agent.example.toml`), with
//! environment overrides, validated with errors that name the field.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This gateway's id, as enrolled at the hub (`cloud-hub gateway add`).
    pub gateway_id: String,
    /// Directory for the encrypted buffer (sled) and, by default, its key.
    /// Env: `VIGIL_AGENT_DATA_DIR`.
    pub data_dir: PathBuf,
    /// AES-256 key for the buffer: 32 raw bytes or 64 hex digits, mode 0600.
    /// Generated (0600) if missing. Default: `<data_dir>/buffer.key`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Bound and overflow policy of the buffer.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// The status endpoint (`/healthz`, `/metrics`); off unless set.
    #[serde(default)]
    pub status: Option<StatusConfig>,
    pub uplink: UplinkConfig,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
}

/// `[status]`: where the agent serves `/healthz` and `/metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// e.g. `127.0.0.1:9464`. The endpoint has no authentication.
    pub listen: String,
    /// Allow a non-loopback `listen` (e.g. for a Prometheus scraper in the
    /// same IoT Edge network). Off by default.
    #[serde(default)]
    pub allow_non_loopback: bool,
}

/// `[buffer]`: how much the encrypted buffer may hold.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Maximum stored bytes (encrypted records); sled adds a constant
    /// overhead of a few MiB on disk. Default 1 GiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// `drop-oldest` (default: delete the oldest readings, count them and
    /// report a BUFFER_OVERFLOW event to the hub) or `refuse-new` (keep what
    /// is stored, refuse new readings and count them).
    #[serde(default)]
    pub overflow: crate::buffer::OverflowPolicy,
    /// Start although stored records are sealed under a buffer key that no
    /// configured key opens (a lost or replaced key). Default false: the
    /// agent refuses to start so that the key can be restored. The records
    /// stay stored and are sent once the key is back; the loss is counted
    /// and reported to the hub. `edge-agent run --accept-key-loss` does the
    /// same for one start.
    #[serde(default)]
    pub accept_key_loss: bool,
}

fn default_max_bytes() -> u64 {
    1 << 30
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: default_max_bytes(),
            overflow: Default::default(),
            accept_key_loss: false,
        }
    }
}

impl BufferConfig {
    pub fn limits(&self) -> crate::buffer::Limits {
        crate::buffer::Limits {
            max_bytes: self.max_bytes,
            overflow: self.overflow,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// `https` (default: the Vigil hub) or `iothub-mqtt` (Azure IoT Hub,
    /// configured in `[uplink.iothub]`).
    #[serde(default)]
    pub kind: UplinkKind,
    /// Hub ingest URL, e.g. `https://hub.example.org/api/v1/ingest`.
    /// Plain `http://` is accepted only for loopback hosts. Required for
    /// kind `https`. Env: `VIGIL_AGENT_HUB_URL`.
    #[serde(default)]
    pub url: String,
    /// Azure IoT Hub over MQTT (kind `iothub-mqtt`). Optional when the agent
    /// runs as an IoT Edge module (identity from `IOTEDGE_*`).
    #[serde(default)]
    pub iothub: Option<IotHubConfig>,
    /// The `IOTEDGE_*` variables found in the environment (IoT Edge module
    /// mode; see `iothub::edge`). Not a config key.
    #[serde(skip)]
    pub iot_edge_env: Vec<(String, String)>,
    /// File holding the gateway's bearer token (mode 0600). Env:
    /// `VIGIL_AGENT_TOKEN_FILE`; or give the token itself in
    /// `VIGIL_AGENT_TOKEN`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM file of CA certificates to trust instead of the public web roots
    /// (a hospital's private CA). When set, only these are trusted (pinning).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) the agent presents to the hub (mutual
    /// TLS); needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`, mode 0600.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Most readings in one batch.
    #[serde(default = "default_batch_max_readings")]
    pub batch_max_readings: usize,
    /// Adaptive batching: live readings go as soon as no batch is in
    /// flight, at most one batch per `batch_min_interval_ms` (from the
    /// previous batch's start, or the forwarder's; default 100); while one
    /// is in flight the next accumulates, so batches grow with the load.
    /// 0: no pacing.
    #[serde(default = "default_batch_min_interval_ms")]
    pub batch_min_interval_ms: u64,
    /// The longest the pacing may hold a live reading back (caps
    /// `batch_min_interval_ms`).
    #[serde(default = "default_batch_max_wait_ms")]
    pub batch_max_wait_ms: u64,
    /// Most bytes of one encoded (uncompressed) protobuf `Batch`: a batch is
    /// cut before the record that would make it larger. A single record
    /// larger than this is sent alone (never dropped). Default 128 KiB, well
    /// under the hub's default 4 MiB body limit and IoT Hub's 256 KiB.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// Compress each batch: `none` (default) or `zstd` (HTTPS:
    /// `Content-Encoding: zstd`; IoT Hub: property `$.ce=zstd`).
    #[serde(default)]
    pub compression: Compression,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Longest wait between retries (exponential backoff with jitter).
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// After an outage, new readings go first; the backlog follows, oldest
    /// first, at most this many readings per second.
    #[serde(default = "default_backlog_rate")]
    pub backlog_rate_per_s: u32,
    /// On SIGTERM, keep delivering what is buffered for at most this long
    /// before exiting (what is left stays buffered). 0 = exit at once.
    #[serde(default = "default_shutdown_drain_ms")]
    pub shutdown_drain_ms: u64,
}

/// How batches are compressed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    #[default]
    None,
    /// Zstandard (RFC 8878), one frame per batch with its content size.
    Zstd,
}

/// Which uplink the forwarder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UplinkKind {
    /// protobuf `Batch` over HTTPS to the Vigil hub, which answers a `BatchAck`.
    #[default]
    Https,
    /// Azure IoT Hub device-to-cloud messages over MQTT 3.1.1 + TLS.
    IothubMqtt,
}

/// `[uplink.iothub]`: the IoT Hub device identity and endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IotHubConfig {
    /// IoT Hub host name, e.g. `myhub.azure-devices.net` (not with `dps`).
    #[serde(default)]
    pub host: String,
    /// The device id registered in IoT Hub (MQTT client id; not with `dps`).
    #[serde(default)]
    pub device_id: String,
    /// Get the hub and device id from the Device Provisioning Service.
    #[serde(default)]
    pub dps: Option<DpsConfig>,
    #[serde(default = "default_iothub_port")]
    pub port: u16,
    /// File (mode 0600) holding the device's base64 symmetric key; the
    /// agent signs SAS tokens with it. Either this or `cert_file` + `key_file`.
    #[serde(default)]
    pub sas_key_file: Option<PathBuf>,
    /// PEM X.509 client certificate (chain) for the device.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (mode 0600).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle to trust instead of the public web roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Lifetime of each SAS token; the agent reconnects with a fresh one at
    /// 80 % of it.
    #[serde(default = "default_sas_ttl_s")]
    pub sas_ttl_s: u64,
    /// Device twin reported properties: a change of a device's state is
    /// reported at most this often...
    #[serde(default = "default_twin_min_interval_ms")]
    pub twin_min_interval_ms: u64,
    /// ...and counters, times and the backlog at most this often.
    #[serde(default = "default_twin_refresh_s")]
    pub twin_refresh_s: u64,
    /// When a batch counts as delivered (and leaves the buffer): `broker`
    /// (default) on the broker's PUBACK — right for Azure IoT Hub, which
    /// keeps what it acknowledged; `hub` only when the Vigil hub's own
    /// `BatchAck` arrives on `devices/{device_id}/messages/devicebound/#`
    /// (published by the hub's `[mqtt]` ingest after the batch is stored) —
    /// for a plain MQTT broker such as Mosquitto, which may acknowledge and
    /// then discard a message (a restart loses shared subscriptions).
    #[serde(default)]
    pub delivery: Delivery,
}

/// `uplink.iothub.delivery`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    #[default]
    Broker,
    Hub,
}

/// `[uplink.iothub.dps]`: registration with the Device Provisioning
/// Service (symmetric key); the assignment is cached in `data_dir`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpsConfig {
    /// The DPS instance's ID scope, e.g. `0ne00ABC123`.
    pub id_scope: String,
    /// This gateway's registration id.
    pub registration_id: String,
    /// File (mode 0600) with the base64 key: the individual enrollment's
    /// key, or the group enrollment's key when `group_key = true` (the
    /// device key is then derived from it and the registration id).
    pub key_file: PathBuf,
    #[serde(default)]
    pub group_key: bool,
    #[serde(default = "default_dps_endpoint")]
    pub global_endpoint: String,
    #[serde(default = "default_iothub_port")]
    pub port: u16,
}

fn default_dps_endpoint() -> String {
    crate::iothub::dps::GLOBAL_ENDPOINT.to_string()
}

fn default_iothub_port() -> u16 {
    8883
}
pub(crate) fn default_sas_ttl_s() -> u64 {
    3600
}
pub(crate) fn default_twin_min_interval_ms() -> u64 {
    5000
}
pub(crate) fn default_twin_refresh_s() -> u64 {
    300
}

fn default_shutdown_drain_ms() -> u64 {
    5000
}

/// 10 000 readings/s: a 24 h backlog of 16 devices at 64 readings/s
/// drains at up to 156x real time (see docs/agent.md, Benchmarks).
fn default_backlog_rate() -> u32 {
    10_000
}

fn default_batch_max_readings() -> usize {
    500
}
fn default_batch_min_interval_ms() -> u64 {
    100
}
fn default_batch_max_wait_ms() -> u64 {
    1000
}
fn default_batch_max_bytes() -> usize {
    128 * 1024
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_max_backoff_ms() -> u64 {
    30_000
}

/// One device attached to the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Protocol on the port; see docs/protocols.md.
    pub kind: DeviceKind,
    /// Gateway-local device id (never patient data).
    pub id: String,
    /// Serial port path, e.g. `/dev/ttyUSB0` (serial kinds).
    #[serde(default)]
    pub port: Option<String>,
    /// Network address `host:port` of the device (network kinds).
    #[serde(default)]
    pub address: Option<String>,
    /// Address the agent listens on, `ip:port` (listener kinds).
    #[serde(default)]
    pub listen: Option<String>,
    /// Bed / location label, e.g. `ICU-3/bed-07`.
    #[serde(default)]
    pub location: String,
    /// Device model, for the hub's device registry.
    #[serde(default)]
    pub model: String,
    /// No data from the device for this long ends the session with a
    /// technical "silent" reading and a reconnect (default 5000).
    #[serde(default)]
    pub silence_timeout_ms: Option<u64>,
    /// Serial settings overriding the protocol's defaults
    /// (`baud_rate`, `data_bits`, `parity`, `stop_bits`, `flow_control`).
    #[serde(default)]
    pub serial: device_drivers::SerialOverrides,
    /// Protocol-specific options (see docs/protocols.md).
    #[serde(default)]
    pub options: toml::Table,
}

/// The protocols a device port can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// Masimo Radical-7 / Rad-8, serial output mode "ASCII 1".
    MasimoSerial,
    /// Philips IntelliVue, Data Export over the MIB/RS-232 port.
    IntellivueSerial,
    /// GE Datex-Ohmeda S/5, computer interface.
    DatexS5Serial,
    /// Dräger, MEDIBUS.X.
    MedibusSerial,
    /// Nonin OEM pulse oximeter, serial Data Format 7.
    NoninSerial,
    /// Modbus TCP device read through a register map (`address`).
    ModbusTcp,
    /// Modbus RTU device on a serial line, read through a register map (`port`).
    ModbusRtu,
    /// Philips IntelliVue, Data Export over the LAN (UDP 24105).
    IntellivueLan,
    /// HL7 v2 ORU^R01 messages pushed to the agent over MLLP (TCP/TLS).
    Hl7Mllp,
    /// Bluetooth LE health device (Heart Rate, Blood Pressure, Health
    /// Thermometer, Pulse Oximeter, Weight Scale, Glucose services).
    Ble,
}

/// How a device kind is reached, which decides the fields it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A serial port: `port` (and `[device.serial]`).
    Serial,
    /// A TCP connection to `address` (`host:port`).
    Tcp,
    /// UDP datagrams to `address` (`host:port`).
    Udp,
    /// The agent listens on `listen` (`ip:port`) and the device connects.
    Listener,
    /// Bluetooth LE: optional `address` (`AA:BB:CC:DD:EE:FF`); without it the
    /// first device advertising a health service is used.
    Ble,
}

impl DeviceKind {
    pub fn transport(self) -> Transport {
        match self {
            DeviceKind::MasimoSerial
            | DeviceKind::IntellivueSerial
            | DeviceKind::DatexS5Serial
            | DeviceKind::MedibusSerial
            | DeviceKind::NoninSerial
            | DeviceKind::ModbusRtu => Transport::Serial,
            DeviceKind::ModbusTcp => Transport::Tcp,
            DeviceKind::IntellivueLan => Transport::Udp,
            DeviceKind::Hl7Mllp => Transport::Listener,
            DeviceKind::Ble => Transport::Ble,
        }
    }
}

impl DeviceConfig {
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl UplinkConfig {
    /// The IoT Edge module identity, when the `IOTEDGE_*` environment is
    /// present; an error names the missing or unusable variable.
    pub fn iot_edge(&self) -> Result<Option<crate::iothub::edge::EdgeEnv>, ConfigError> {
        crate::iothub::edge::EdgeEnv::from_vars(|k| {
            self.iot_edge_env
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        })
        .map_err(|(var, message)| invalid(format!("environment {var}"), message))
    }
    pub fn batch_min_interval(&self) -> Duration {
        Duration::from_millis(self.batch_min_interval_ms)
    }
    pub fn batch_max_wait(&self) -> Duration {
        Duration::from_millis(self.batch_max_wait_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }
}

impl AgentConfig {
    /// Load from a TOML file, apply env overrides, resolve relative paths
    /// against the file's directory, and validate.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, |k| std::env::var(k).ok())
    }

    /// [`load`](Self::load) with the environment given as a function
    /// (tests).
    pub fn load_with(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg: AgentConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.apply_env(env);
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(v) = get("VIGIL_AGENT_HUB_URL") {
            self.uplink.url = v;
        }
        if let Some(v) = get("VIGIL_AGENT_TOKEN_FILE") {
            self.uplink.token_file = Some(v.into());
        }
        if let Some(v) = get("VIGIL_AGENT_DATA_DIR") {
            self.data_dir = v.into();
        }
        self.uplink.iot_edge_env = crate::iothub::edge::VARS
            .iter()
            .filter_map(|k| get(k).map(|v| (k.to_string(), v)))
            .collect();
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        if let Some(p) = self.key_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.uplink.token_file.as_mut() {
            fix(p);
        }
        for p in [
            &mut self.uplink.ca_file,
            &mut self.uplink.client_cert_file,
            &mut self.uplink.client_key_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if let Some(h) = self.uplink.iothub.as_mut() {
            for p in [
                &mut h.sas_key_file,
                &mut h.cert_file,
                &mut h.key_file,
                &mut h.ca_file,
            ]
            .into_iter()
            .flatten()
            {
                fix(p);
            }
            if let Some(d) = h.dps.as_mut() {
                fix(&mut d.key_file);
            }
        }
        // Modbus register maps (`options.map`) are relative to this file too.
        for d in &mut self.devices {
            if matches!(d.kind, DeviceKind::ModbusTcp | DeviceKind::ModbusRtu)
                && let Some(toml::Value::String(m)) = d.options.get_mut("map")
                && Path::new(m.as_str()).is_relative()
            {
                *m = base.join(m.as_str()).display().to_string();
            }
        }
    }

    pub fn key_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("buffer.key"))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_valid_id(&self.gateway_id) {
            return Err(invalid(
                "gateway_id",
                "must be 1-64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        match self.uplink.kind {
            UplinkKind::Https => {
                if self.uplink.url.trim().is_empty() {
                    return Err(invalid("uplink.url", "required for kind \"https\""));
                }
                validate_hub_url(&self.uplink.url)?;
                if self.uplink.iothub.is_some() {
                    return Err(invalid(
                        "uplink.iothub",
                        "only used with uplink.kind = \"iothub-mqtt\"",
                    ));
                }
                match (&self.uplink.client_cert_file, &self.uplink.client_key_file) {
                    (Some(_), None) => {
                        return Err(invalid(
                            "uplink.client_key_file",
                            "required with client_cert_file (the certificate's private key)",
                        ));
                    }
                    (None, Some(_)) => {
                        return Err(invalid(
                            "uplink.client_cert_file",
                            "required with client_key_file (the client certificate)",
                        ));
                    }
                    _ => {}
                }
            }
            UplinkKind::IothubMqtt
                if self.uplink.client_cert_file.is_some()
                    || self.uplink.client_key_file.is_some() =>
            {
                return Err(invalid(
                    "uplink.client_cert_file",
                    "only used with uplink.kind = \"https\" (IoT Hub: uplink.iothub.cert_file)",
                ));
            }
            UplinkKind::IothubMqtt => match (&self.uplink.iothub, self.uplink.iot_edge()?) {
                (None, None) => {
                    return Err(invalid(
                        "uplink.iothub",
                        "required for uplink.kind = \"iothub-mqtt\" (unless running as an IoT Edge module)",
                    ));
                }
                (Some(h), _) => validate_iothub(h)?,
                (None, Some(_)) => {}
            },
        }
        if let Some(st) = &self.status {
            let addr: std::net::SocketAddr = st
                .listen
                .parse()
                .map_err(|_| invalid("status.listen", format!("{:?} is not ip:port", st.listen)))?;
            if !addr.ip().is_loopback() && !st.allow_non_loopback {
                return Err(invalid(
                    "status.listen",
                    "not a loopback address; the endpoint has no authentication (set status.allow_non_loopback = true to allow)",
                ));
            }
        }
        if self.uplink.backlog_rate_per_s == 0 {
            return Err(invalid("uplink.backlog_rate_per_s", "must be at least 1"));
        }
        if self.buffer.max_bytes < 64 * 1024 {
            return Err(invalid("buffer.max_bytes", "must be at least 65536"));
        }
        if self.uplink.batch_max_readings == 0 || self.uplink.batch_max_readings > 10_000 {
            return Err(invalid(
                "uplink.batch_max_readings",
                "must be between 1 and 10000",
            ));
        }
        if self.uplink.batch_min_interval_ms > 3_600_000 {
            return Err(invalid(
                "uplink.batch_min_interval_ms",
                "must be at most 3600000 (1 h)",
            ));
        }
        if self.uplink.batch_max_wait_ms == 0 {
            return Err(invalid("uplink.batch_max_wait_ms", "must be at least 1"));
        }
        // IoT Hub counts the topic and property bag too; leave 4 KiB for them.
        let max_bytes_cap = match self.uplink.kind {
            UplinkKind::Https => 64 << 20,
            UplinkKind::IothubMqtt => crate::iothub::MAX_MESSAGE_BYTES - 4096,
        };
        if !(1024..=max_bytes_cap).contains(&self.uplink.batch_max_bytes) {
            return Err(invalid(
                "uplink.batch_max_bytes",
                format!("must be between 1024 and {max_bytes_cap} for this uplink kind"),
            ));
        }
        if self.uplink.request_timeout_ms < 100 {
            return Err(invalid("uplink.request_timeout_ms", "must be at least 100"));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            if !is_valid_id(d.id()) {
                return Err(invalid(
                    format!("device[{i}].id"),
                    "must be 1-64 characters of A-Z a-z 0-9 . _ -",
                ));
            }
            if !ids.insert(d.id()) {
                return Err(invalid(
                    format!("device[{i}].id"),
                    format!("duplicate device id {:?}", d.id()),
                ));
            }
            let field = |f: &str| format!("device[{i}].{f}");
            let need = |v: &Option<String>, f: &str, what: &str| match v.as_deref() {
                Some(x) if !x.trim().is_empty() => Ok(()),
                _ => Err(invalid(
                    field(f),
                    format!("required for kind {:?} ({what})", d.kind),
                )),
            };
            let unused = |v: &Option<String>, f: &str| match v {
                Some(_) => Err(invalid(field(f), format!("not used by kind {:?}", d.kind))),
                None => Ok(()),
            };
            match d.kind.transport() {
                Transport::Serial => {
                    need(&d.port, "port", "a serial port path")?;
                    unused(&d.address, "address")?;
                    unused(&d.listen, "listen")?;
                }
                Transport::Tcp | Transport::Udp => {
                    need(&d.address, "address", "host:port")?;
                    let a = d.address.as_deref().unwrap_or_default();
                    let port_ok = a.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                    });
                    if !port_ok {
                        return Err(invalid(field("address"), format!("{a:?} is not host:port")));
                    }
                    unused(&d.port, "port")?;
                    unused(&d.listen, "listen")?;
                }
                Transport::Ble => {
                    if let Some(a) = d.address.as_deref() {
                        device_drivers::ble::validate_address(a)
                            .map_err(|m| invalid(field("address"), m))?;
                    }
                    unused(&d.port, "port")?;
                    unused(&d.listen, "listen")?;
                    crate::devices::ble_config(d).map_err(|m| invalid(field("options"), m))?;
                    // Run by the BLE driver, not as a link protocol.
                    continue;
                }
                Transport::Listener => {
                    need(
                        &d.listen,
                        "listen",
                        "ip:port to listen on, e.g. 0.0.0.0:2575",
                    )?;
                    unused(&d.port, "port")?;
                    unused(&d.address, "address")?;
                    crate::hl7::check(d).map_err(|(f, m)| invalid(field(f), m))?;
                    // A listener has no driver protocol to build below.
                    continue;
                }
            }
            if d.silence_timeout_ms.is_some_and(|ms| ms < 500) {
                return Err(invalid(
                    format!("device[{i}].silence_timeout_ms"),
                    "must be at least 500",
                ));
            }
            crate::devices::AnyProtocol::from_config(d)
                .map_err(|e| invalid(format!("device[{i}].options"), e))?;
        }
        self.check_port_conflicts()
    }

    /// The addresses the agent listens on, with the field that sets each:
    /// `status.listen` and every `device[i].listen` (HL7 MLLP).
    pub fn listen_addresses(&self) -> Vec<(String, std::net::SocketAddr)> {
        let mut out = vec![];
        if let Some(a) = self.status.as_ref().and_then(|s| s.listen.parse().ok()) {
            out.push(("status.listen".to_owned(), a));
        }
        for (i, d) in self.devices.iter().enumerate() {
            if let Some(a) = d.listen.as_deref().and_then(|l| l.parse().ok()) {
                out.push((format!("device[{i}].listen"), a));
            }
        }
        out
    }

    /// Two of the agent's own listeners on one port (same address, or
    /// either on all addresses) cannot both bind.
    fn check_port_conflicts(&self) -> Result<(), ConfigError> {
        let addrs = self.listen_addresses();
        for (j, (field, b)) in addrs.iter().enumerate() {
            for (other, a) in &addrs[..j] {
                let overlap =
                    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
                if a.port() == b.port() && a.port() != 0 && overlap {
                    return Err(invalid(
                        field.clone(),
                        format!("{b} conflicts with {other} = {a} (same port)"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Settings that are valid but have no effect, as lines to print or
    /// log: fields of the other uplink kind left in the file.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = vec![];
        if self.uplink.kind == UplinkKind::IothubMqtt {
            if !self.uplink.url.trim().is_empty() {
                out.push(
                    "uplink.url is set but not used with uplink.kind = \"iothub-mqtt\" (the IoT Hub endpoint is uplink.iothub.host)".to_owned(),
                );
            }
            if self.uplink.token_file.is_some() {
                out.push(
                    "uplink.token_file is set but not used with uplink.kind = \"iothub-mqtt\" (IoT Hub credentials: uplink.iothub.sas_key_file or cert_file + key_file)".to_owned(),
                );
            }
        }
        out
    }
}

fn validate_dps(h: &IotHubConfig, d: &DpsConfig) -> Result<(), ConfigError> {
    for (field, set) in [
        ("host", !h.host.is_empty()),
        ("device_id", !h.device_id.is_empty()),
        ("sas_key_file", h.sas_key_file.is_some()),
        ("cert_file", h.cert_file.is_some()),
        ("key_file", h.key_file.is_some()),
    ] {
        if set {
            return Err(invalid(
                format!("uplink.iothub.{field}"),
                "not used with [uplink.iothub.dps] (DPS assigns the hub and device id; the key is dps.key_file)",
            ));
        }
    }
    if d.id_scope.is_empty() || !d.id_scope.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(invalid(
            "uplink.iothub.dps.id_scope",
            "must be the DPS ID scope (letters and digits, e.g. 0ne00ABC123)",
        ));
    }
    let reg = &d.registration_id;
    if reg.is_empty()
        || reg.len() > 128
        || !reg.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_' | b':')
        })
    {
        return Err(invalid(
            "uplink.iothub.dps.registration_id",
            "must be 1-128 characters of a-z 0-9 - . _ : (DPS registration ids are lower case)",
        ));
    }
    let host_ok = !d.global_endpoint.is_empty()
        && d.global_endpoint
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    if !host_ok {
        return Err(invalid(
            "uplink.iothub.dps.global_endpoint",
            "must be a host name (e.g. global.azure-devices-provisioning.net)",
        ));
    }
    if d.port == 0 {
        return Err(invalid("uplink.iothub.dps.port", "must not be 0"));
    }
    Ok(())
}

fn validate_iothub(h: &IotHubConfig) -> Result<(), ConfigError> {
    if let Some(d) = &h.dps {
        validate_dps(h, d)?;
        return validate_iothub_timing(h);
    }
    let host_ok = !h.host.is_empty()
        && h.host.len() <= 253
        && h.host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    if !host_ok {
        return Err(invalid(
            "uplink.iothub.host",
            format!(
                "{:?} is not a host name (e.g. myhub.azure-devices.net; no scheme, port or path)",
                h.host
            ),
        ));
    }
    if let Err(why) = check_iothub_device_id(&h.device_id) {
        return Err(invalid("uplink.iothub.device_id", why));
    }
    if h.port == 0 {
        return Err(invalid("uplink.iothub.port", "must not be 0"));
    }
    match (&h.sas_key_file, &h.cert_file, &h.key_file) {
        (Some(_), None, None) => {}
        (Some(_), _, _) => {
            return Err(invalid(
                "uplink.iothub.sas_key_file",
                "give either sas_key_file or cert_file + key_file, not both",
            ));
        }
        (None, Some(_), Some(_)) => {}
        (None, Some(_), None) => {
            return Err(invalid(
                "uplink.iothub.key_file",
                "required with cert_file (the client certificate's private key)",
            ));
        }
        (None, None, Some(_)) => {
            return Err(invalid(
                "uplink.iothub.cert_file",
                "required with key_file (the client certificate)",
            ));
        }
        (None, None, None) => {
            return Err(invalid(
                "uplink.iothub.sas_key_file",
                "device authentication required: sas_key_file, or cert_file + key_file",
            ));
        }
    }
    validate_iothub_timing(h)
}

fn validate_iothub_timing(h: &IotHubConfig) -> Result<(), ConfigError> {
    if !(60..=365 * 24 * 3600).contains(&h.sas_ttl_s) {
        return Err(invalid(
            "uplink.iothub.sas_ttl_s",
            "must be between 60 and 31536000 seconds",
        ));
    }
    if !(100..=3_600_000).contains(&h.twin_min_interval_ms) {
        return Err(invalid(
            "uplink.iothub.twin_min_interval_ms",
            "must be between 100 and 3600000",
        ));
    }
    if !(1..=86_400).contains(&h.twin_refresh_s) {
        return Err(invalid(
            "uplink.iothub.twin_refresh_s",
            "must be between 1 and 86400 seconds",
        ));
    }
    Ok(())
}

/// An IoT Hub device id as IoT Hub registers it: 1-128 ASCII letters,
/// digits and `- : . + % _ # * ? ! ( ) , = @ ; $ '`, except `+` and `#`,
/// which MQTT forbids in the topic names the agent publishes to
/// (`devices/{device_id}/messages/events/`; MQTT 3.1.1, 4.7.1).
pub fn check_iothub_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!(
            "must be 1-128 characters (IoT Hub's limit), got {}",
            id.len()
        ));
    }
    if let Some(c) = id.chars().find(|c| matches!(c, '+' | '#')) {
        return Err(format!(
            "{c:?} is allowed by IoT Hub but is an MQTT wildcard and cannot appear in the device's topic names; register the device under an id without it"
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-:._%*?!(),=@;$'".contains(c);
    if let Some(c) = id.chars().find(|&c| !allowed(c)) {
        return Err(format!(
            "{c:?} is not allowed; IoT Hub device ids are ASCII letters, digits and - : . % _ * ? ! ( ) , = @ ; $ '"
        ));
    }
    Ok(())
}

pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// TLS by default off loopback: `http://` only to a loopback host.
pub(crate) fn validate_hub_url(url: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid("uplink.url", e.to_string()))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match parsed.host() {
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
                Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(invalid(
                    "uplink.url",
                    "plain http:// is only allowed to a loopback host; use https://",
                ))
            }
        }
        other => Err(invalid(
            "uplink.url",
            format!("unsupported scheme {other:?}; use https://"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../agent.example.toml");

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: "t".into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The example with its `[uplink]` table replaced by an IoT Hub one.
    fn iothub(extra: &str) -> String {
        let start = EXAMPLE.find("[uplink]").unwrap();
        let end = EXAMPLE.find("\n[[device]]\n").unwrap();
        format!(
            "{}[uplink]\nkind = \"iothub-mqtt\"\n[uplink.iothub]\nhost = \"myhub.azure-devices.net\"\ndevice_id = \"gw-1\"\n{extra}\n{}",
            &EXAMPLE[..start],
            &EXAMPLE[end..]
        )
    }

    #[test]
    fn fields_of_the_other_uplink_kind_are_warned_about() {
        let clean = parse(&iothub("sas_key_file = \"k\"")).unwrap();
        assert!(clean.warnings().is_empty(), "{:?}", clean.warnings());
        let leftover = iothub("sas_key_file = \"k\"").replace(
            "kind = \"iothub-mqtt\"\n",
            "kind = \"iothub-mqtt\"\nurl = \"https://hub.example.org/api/v1/ingest\"\ntoken_file = \"gateway.token\"\n",
        );
        let w = parse(&leftover).unwrap().warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("uplink.url ") && w[1].starts_with("uplink.token_file "),
            "{w:?}"
        );
        // The HTTPS example carries nothing of IoT Hub's.
        assert!(parse(EXAMPLE).unwrap().warnings().is_empty());
    }

    #[test]
    fn listeners_on_one_port_are_refused_naming_the_field() {
        let hl7 = |listen: &str| {
            format!(
                "\n[[device]]\nkind = \"hl7-mllp\"\nid = \"hl7-1\"\nlisten = \"{listen}\"\n[device.options]\nallow_plaintext = true\n"
            )
        };
        let with = |status: &str, listen: &str| {
            let text = format!("{EXAMPLE}{}", hl7(listen)).replacen(
                "listen = \"127.0.0.1:9464\"",
                &format!("listen = \"{status}\""),
                1,
            );
            parse(&text)
        };
        with("127.0.0.1:9464", "127.0.0.1:2575").unwrap();
        let e = with("127.0.0.1:2575", "127.0.0.1:2575")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("device[1].listen") && e.contains("status.listen"),
            "{e}"
        );
        let e = with("127.0.0.1:2575", "0.0.0.0:2575")
            .unwrap_err()
            .to_string();
        assert!(e.contains("device[1].listen"), "{e}");
    }

    #[test]
    fn iothub_uplink_config_is_validated_naming_the_field() {
        let cfg = parse(&iothub("sas_key_file = \"k\"")).unwrap();
        assert_eq!(cfg.uplink.kind, UplinkKind::IothubMqtt);
        let h = cfg.uplink.iothub.unwrap();
        assert_eq!((h.port, h.sas_ttl_s), (8883, 3600));
        parse(&iothub(
            "cert_file = \"c.pem\"\nkey_file = \"k.pem\"\nport = 443",
        ))
        .unwrap();
        let err = |extra: &str| parse(&iothub(extra)).unwrap_err().to_string();
        assert!(
            err("").contains("uplink.iothub.sas_key_file"),
            "{}",
            err("")
        );
        let e = err("sas_key_file = \"k\"\ncert_file = \"c\"\nkey_file = \"x\"");
        assert!(
            e.contains("uplink.iothub.sas_key_file") && e.contains("not both"),
            "{e}"
        );
        assert!(err("cert_file = \"c\"").contains("uplink.iothub.key_file"));
        assert!(err("key_file = \"c\"").contains("uplink.iothub.cert_file"));
        assert!(err("sas_key_file = \"k\"\nsas_ttl_s = 5").contains("uplink.iothub.sas_ttl_s"));
        assert!(err("sas_key_file = \"k\"\nport = 0").contains("uplink.iothub.port"));
        let e = parse(&iothub("sas_key_file = \"k\"").replace(
            "myhub.azure-devices.net",
            "mqtts://myhub.azure-devices.net:8883",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("uplink.iothub.host"), "{e}");
        let e = parse(&iothub("sas_key_file = \"k\"").replace("\"gw-1\"", "\"gw 1\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("uplink.iothub.device_id"), "{e}");
        // What IoT Hub registers: up to 128 characters and its symbols.
        let long = "d".repeat(128);
        for ok in ["gw:icu3(07)@site;a=b,c!$'*?%", long.as_str()] {
            parse(&iothub("sas_key_file = \"k\"").replace("\"gw-1\"", &format!("{ok:?}")))
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["d".repeat(129), "gw+1".into(), "gw#1".into(), "gw/1".into()] {
            let e = parse(&iothub("sas_key_file = \"k\"").replace("\"gw-1\"", &format!("{bad:?}")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("uplink.iothub.device_id"), "{bad}: {e}");
        }
        // The kind needs its table, and the table needs its kind.
        let no_table = iothub("sas_key_file = \"k\"").replace("[uplink.iothub]", "[x]");
        assert!(parse(&no_table).is_err());
        let e = parse(&EXAMPLE.replace(
            "\n[[device]]\n",
            "\n[uplink.iothub]\nhost = \"h\"\ndevice_id = \"d\"\n[[device]]\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("uplink.iothub") && e.contains("only used"),
            "{e}"
        );
        let e = parse(&EXAMPLE.replace("url = \"http://127.0.0.1:8080/api/v1/ingest\"", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("uplink.url") && e.contains("required"), "{e}");
    }

    #[test]
    fn batch_bytes_compression_and_client_certificate_are_validated() {
        let with = |extra: &str| EXAMPLE.replace("[uplink]\n", &format!("[uplink]\n{extra}\n"));
        let cfg = parse(EXAMPLE).unwrap();
        assert_eq!(cfg.uplink.batch_max_bytes, 128 * 1024);
        assert_eq!(cfg.uplink.compression, Compression::None);
        assert_eq!(cfg.uplink.client_cert_file, None);
        let cfg = parse(&with(
            "compression = \"zstd\"\nclient_cert_file = \"a.crt\"\nclient_key_file = \"a.key\"",
        ))
        .unwrap();
        assert_eq!(cfg.uplink.compression, Compression::Zstd);
        let err = |extra: &str| parse(&with(extra)).unwrap_err().to_string();
        assert!(err("compression = \"gzip\"").contains("gzip"));
        let e = err("client_cert_file = \"a.crt\"");
        assert!(e.contains("uplink.client_key_file"), "{e}");
        let e = err("client_key_file = \"a.key\"");
        assert!(e.contains("uplink.client_cert_file"), "{e}");
        let e = parse(&EXAMPLE.replace("batch_max_bytes = 131072", "batch_max_bytes = 100"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("uplink.batch_max_bytes"), "{e}");
        // IoT Hub: at most its message limit less room for the topic.
        let e = parse(&iothub("sas_key_file = \"k\"").replace(
            "kind = \"iothub-mqtt\"",
            "kind = \"iothub-mqtt\"\nbatch_max_bytes = 262144",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("uplink.batch_max_bytes"), "{e}");
        let e = parse(&iothub("sas_key_file = \"k\"").replace(
            "kind = \"iothub-mqtt\"",
            "kind = \"iothub-mqtt\"\nclient_cert_file = \"a.crt\"\nclient_key_file = \"a.key\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("uplink.client_cert_file"), "{e}");
    }

    #[test]
    fn example_config_is_valid() {
        let cfg = parse(EXAMPLE).unwrap();
        assert_eq!(cfg.devices.len(), 1);
        assert_eq!(cfg.uplink.batch_max_readings, 500);
    }

    #[test]
    fn modbus_map_paths_are_relative_to_the_config_file() {
        let dir = std::env::temp_dir().join(format!("vigil-modbus-cfg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("maps")).unwrap();
        let map = include_str!("../maps/sim-ventilator.toml");
        std::fs::write(dir.join("maps/vent.toml"), map).unwrap();
        let text = format!(
            "{EXAMPLE}\n[[device]]\nkind = \"modbus-tcp\"\nid = \"vent-1\"\naddress = \"127.0.0.1:502\"\n[device.options]\nmap = \"maps/vent.toml\"\nunit_id = 3\n"
        );
        let path = dir.join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let cfg = AgentConfig::load(&path).unwrap();
        let d = cfg.devices.last().unwrap();
        assert_eq!(d.kind.transport(), Transport::Tcp);
        assert_eq!(
            d.options.get("map").and_then(|v| v.as_str()),
            Some(dir.join("maps/vent.toml").display().to_string().as_str())
        );
        // A map that fails validation is refused naming the device and entry.
        std::fs::write(
            dir.join("maps/vent.toml"),
            map.replace("unit = \"mL\"", "unit = \"L\""),
        )
        .unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(".options") && err.contains("points[1] (\"VT\")"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn plaintext_off_loopback_is_refused_naming_the_field() {
        let text = EXAMPLE.replace("http://127.0.0.1:8080", "http://10.1.2.3:8080");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("uplink.url"), "{err}");
        let ok = EXAMPLE.replace("http://127.0.0.1:8080", "https://hub.example.org");
        parse(&ok).unwrap();
        let ok = EXAMPLE.replace("http://127.0.0.1:8080", "http://localhost:9");
        parse(&ok).unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_devices_are_named() {
        let err = parse(&format!("{EXAMPLE}\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        let dup = format!(
            "{EXAMPLE}\n[[device]]\nkind = \"masimo-serial\"\nid = \"masimo-1\"\nport = \"/dev/x\"\n"
        );
        let err = parse(&dup).unwrap_err().to_string();
        assert!(
            err.contains("device[1].id") && err.contains("duplicate"),
            "{err}"
        );
        let bad = EXAMPLE.replace("gateway_id = \"gw-demo\"", "gateway_id = \"gw demo!\"");
        assert!(parse(&bad).unwrap_err().to_string().contains("gateway_id"));
    }

    #[test]
    fn device_options_and_serial_overrides_are_checked() {
        let bad = EXAMPLE.replace("clock_offset_minutes = 0", "clock_offset_minutes = 5000");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("device[0].options"), "{err}");
        let bad = EXAMPLE.replace("clock_offset_minutes = 0", "no_such_option = 1");
        assert!(
            parse(&bad)
                .unwrap_err()
                .to_string()
                .contains("no_such_option")
        );
        let bad = EXAMPLE.replace("baud_rate = 9600", "baud_rate = \"fast\"");
        assert!(parse(&bad).is_err());
        let bad = EXAMPLE.replace("kind = \"masimo-serial\"", "kind = \"telepathy\"");
        assert!(parse(&bad).unwrap_err().to_string().contains("telepathy"));
    }

    #[test]
    fn each_transport_needs_its_own_address_field() {
        let lan = |extra: &str| {
            format!("{EXAMPLE}\n[[device]]\nkind = \"intellivue-lan\"\nid = \"iv-lan\"\n{extra}\n")
        };
        parse(&lan("address = \"10.0.0.7:24105\"")).unwrap();
        let err = parse(&lan("")).unwrap_err().to_string();
        assert!(
            err.contains("device[1].address") && err.contains("required"),
            "{err}"
        );
        let err = parse(&lan("address = \"10.0.0.7\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not host:port"), "{err}");
        let err = parse(&lan("address = \"h:1\"\nport = \"/dev/x\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("device[1].port") && err.contains("not used"),
            "{err}"
        );
        let serial_without_port = EXAMPLE.replace("port = \"/dev/ttyUSB0\"", "");
        let err = parse(&serial_without_port).unwrap_err().to_string();
        assert!(err.contains("device[0].port"), "{err}");
    }

    #[test]
    fn ble_address_is_optional_and_checked() {
        let ble = |extra: &str| {
            format!("{EXAMPLE}\n[[device]]\nkind = \"ble\"\nid = \"hr-1\"\n{extra}\n")
        };
        parse(&ble("")).unwrap();
        parse(&ble("address = \"C0:FF:EE:00:00:01\"")).unwrap();
        let err = parse(&ble("address = \"10.0.0.7:1\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("device[1].address"), "{err}");
        let err = parse(&ble("port = \"/dev/x\"")).unwrap_err().to_string();
        assert!(
            err.contains("device[1].port") && err.contains("not used"),
            "{err}"
        );
        let err = parse(&ble("[device.options]\nuser_id = 255"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("device[1].options"), "{err}");
    }

    #[test]
    fn env_overrides_apply() {
        let mut cfg = parse(EXAMPLE).unwrap();
        cfg.apply_env(|k| match k {
            "VIGIL_AGENT_HUB_URL" => Some("https://h.example/api/v1/ingest".into()),
            "VIGIL_AGENT_DATA_DIR" => Some("/var/lib/x".into()),
            _ => None,
        });
        assert_eq!(cfg.uplink.url, "https://h.example/api/v1/ingest");
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(cfg.key_path(), PathBuf::from("/var/lib/x/buffer.key"));
    }
}
