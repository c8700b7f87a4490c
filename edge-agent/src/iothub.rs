//! Azure IoT Hub uplink over MQTT 3.1.1 (TLS), spoken directly with
//! `rumqttc` (rustls with the ring provider), following IoT Hub's "MQTT
//! support" rules:
//! - client id = device id (`{device}/{module}` for an IoT Edge module); user
//!   name `{hub}/{device_id}/?api-version=2021-04-12` (modules:
//!   `{hub}/{device}/{module}/?api-version=…`); password = a SAS token
//!   (symmetric key, signed here or by the IoT Edge workload API) or empty
//!   (X.509 client certificate);
//! - each batch is one QoS 1 publish to
//!   `devices/{device_id}/messages/events/$.ct=application%2Fx-protobuf&$.ce=identity`
//!   (modules: `devices/{device}/modules/{module}/messages/events/…`);
//! - a message is at most 256 KiB: larger batches are refused with
//!   [`UplinkError::MessageTooLarge`] and the forwarder halves the batch (by
//!   records), as for an HTTP 413;
//! - **the broker's PUBACK counts as delivery**: there is no `BatchAck` on
//!   this path; the cloud-side consumer de-duplicates by reading identity
//!   (gateway, device, sequence), as the hub does.
//!
//! A session task owns the connection for as long as the uplink lives: it
//! subscribes to direct methods ([`methods`]) and twin responses
//! ([`twin`]), keeps the twin's reported properties current, reconnects
//! with backoff, and renews SAS tokens by reconnecting with a fresh one at
//! 80 % of the token's lifetime. Identities can also come from the Device
//! Provisioning Service ([`dps`]) or the IoT Edge module environment
//! ([`edge`]).

pub mod dps;
pub mod edge;
pub mod methods;
pub mod twin;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use shared_protocol::v1::Batch;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::buffer::Buffer;
use crate::config::{AgentConfig, IotHubConfig};
use crate::secrets;
use crate::uplink::{AnyUplink, UplinkError};

/// IoT Hub's MQTT API version used in the user name.
pub const API_VERSION: &str = "2021-04-12";
/// IoT Hub's device-to-cloud message size limit (body and properties).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// MQTT keep-alive; IoT Hub accepts at most 1177 s.
pub const KEEP_ALIVE: Duration = Duration::from_secs(240);
/// Property bag appended to the events topic: content type and encoding,
/// URL-encoded as IoT Hub expects.
pub const PROPERTY_BAG: &str = "$.ct=application%2Fx-protobuf&$.ce=identity";
/// The property bag of a zstd-compressed batch (`uplink.compression = "zstd"`).
pub const PROPERTY_BAG_ZSTD: &str = "$.ct=application%2Fx-protobuf&$.ce=zstd";
/// Longest wait between reconnection attempts unless set
/// (`uplink.max_backoff_ms`, via [`IotHubUplink::with_max_backoff`]).
const DEFAULT_MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(60);
/// The first wait after a failed connection or a dropped session.
const FIRST_RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// The wait after `current` failed: doubled, at most `max` (and never
/// below the first wait, unless `max` is smaller).
fn next_backoff(current: Duration, max: Duration) -> Duration {
    (current * 2).min(max)
}
/// How often the session checks whether a twin report is due.
const TWIN_TICK: Duration = Duration::from_millis(250);
/// With a DPS assignment: after this many "not authorized" refusals in a
/// row, the assignment is forgotten and the device registers again.
const DPS_REFUSALS_BEFORE_REREGISTER: u32 = 3;

/// Percent-encode everything but RFC 3986 unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`), upper-case hex; what `encodeURIComponent` and
/// Python's `quote_plus` produce for the characters a SAS token contains.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The resource URI a device's SAS token is scoped to.
pub fn resource_uri(host: &str, device_id: &str) -> String {
    format!("{host}/devices/{device_id}")
}

/// What a SAS token signs: `urlencode(uri) + "\n" + expiry`.
pub fn sas_string_to_sign(uri: &str, expiry: u64) -> String {
    format!("{}\n{expiry}", url_encode(uri))
}

/// A SAS token around a signature computed elsewhere (base64, e.g. by the
/// IoT Edge workload API).
pub fn sas_token_with_signature(uri: &str, signature_b64: &str, expiry: u64) -> String {
    format!(
        "SharedAccessSignature sr={}&sig={}&se={expiry}",
        url_encode(uri),
        url_encode(signature_b64)
    )
}

/// base64(HMAC-SHA256(key, data)).
pub fn hmac_b64(key: &[u8], data: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    BASE64.encode(ring::hmac::sign(&k, data).as_ref())
}

/// An IoT Hub SAS token:
/// `SharedAccessSignature sr={urlencode(uri)}&sig={urlencode(base64(HMAC-SHA256(key, urlencode(uri) + "\n" + expiry)))}&se={expiry}`
/// plus `&skn={policy}` when a policy name is given. `key` is the decoded
/// (raw) key; `expiry` is in seconds since the Unix epoch.
pub fn sas_token(uri: &str, key: &[u8], expiry: u64, policy: Option<&str>) -> String {
    let sig = hmac_b64(key, sas_string_to_sign(uri, expiry).as_bytes());
    let mut t = sas_token_with_signature(uri, &sig, expiry);
    if let Some(p) = policy {
        t.push_str("&skn=");
        t.push_str(&url_encode(p));
    }
    t
}

/// The MQTT user name IoT Hub expects.
pub fn username(host: &str, device_id: &str) -> String {
    format!("{host}/{device_id}/?api-version={API_VERSION}")
}

/// The topic a device publishes its events to, with the property bag.
pub fn events_topic(device_id: &str) -> String {
    format!("devices/{device_id}/messages/events/{PROPERTY_BAG}")
}

/// Who the agent is at IoT Hub, and where it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The IoT Hub host name (user name, token resource).
    pub hub: String,
    /// Where the MQTT connection goes: the hub, or an IoT Edge gateway
    /// (edgeHub); also the TLS server name.
    pub connect_host: String,
    pub port: u16,
    pub device_id: String,
    /// Set when the agent runs as an IoT Edge module.
    pub module_id: Option<String>,
}

impl Identity {
    /// A device connecting straight to its hub.
    pub fn device(hub: &str, device_id: &str, port: u16) -> Self {
        Identity {
            hub: hub.to_string(),
            connect_host: hub.to_string(),
            port,
            device_id: device_id.to_string(),
            module_id: None,
        }
    }

    /// MQTT client id: `{device}` or `{device}/{module}`.
    pub fn client_id(&self) -> String {
        match &self.module_id {
            None => self.device_id.clone(),
            Some(m) => format!("{}/{m}", self.device_id),
        }
    }

    /// MQTT user name: `{hub}/{device}/?api-version=…` or
    /// `{hub}/{device}/{module}/?api-version=…`.
    pub fn username(&self) -> String {
        match &self.module_id {
            None => username(&self.hub, &self.device_id),
            Some(m) => format!(
                "{}/{}/{m}/?api-version={API_VERSION}",
                self.hub, self.device_id
            ),
        }
    }

    /// The resource a SAS token is scoped to.
    pub fn resource_uri(&self) -> String {
        match &self.module_id {
            None => resource_uri(&self.hub, &self.device_id),
            Some(m) => format!("{}/devices/{}/modules/{m}", self.hub, self.device_id),
        }
    }

    /// Where batches are published (with the property bag).
    pub fn events_topic(&self) -> String {
        match &self.module_id {
            None => events_topic(&self.device_id),
            Some(m) => format!(
                "devices/{}/modules/{m}/messages/events/{PROPERTY_BAG}",
                self.device_id
            ),
        }
    }
}

/// How the MQTT password is made.
enum Signer {
    /// SAS token signed here with the decoded device key.
    Key(Vec<u8>),
    /// SAS token signed by the IoT Edge workload API (module identity).
    Workload(edge::WorkloadClient),
    /// The client certificate is in the TLS config; empty password.
    X509,
}

impl Signer {
    fn name(&self) -> &'static str {
        match self {
            Signer::Key(_) => "sas",
            Signer::Workload(_) => "iotedge-workload",
            Signer::X509 => "x509",
        }
    }
}

/// Counters of the IoT Hub session (twin, methods, subscriptions).
#[derive(Debug, Default)]
pub struct IotHubStats {
    /// `delivery = "hub"`: batches delivered on the hub's ack.
    pub hub_acks: AtomicU64,
    /// Hub acks of no batch in flight (an earlier attempt's).
    pub hub_acks_stale: AtomicU64,
    /// Hub acks that did not decode.
    pub hub_acks_malformed: AtomicU64,
    /// Sends the broker acknowledged but the hub did not within
    /// `request_timeout_ms` (sent again).
    pub hub_ack_timeouts: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub subscribe_failures: AtomicU64,
    pub twin_reports_sent: AtomicU64,
    pub twin_reports_accepted: AtomicU64,
    /// Patches answered with a status other than 204, or not answered.
    pub twin_reports_failed: AtomicU64,
    pub twin_responses_unexpected: AtomicU64,
    pub methods_received: AtomicU64,
    pub methods_unknown: AtomicU64,
    /// Method requests whose topic could not be parsed (not answerable).
    pub methods_malformed: AtomicU64,
    pub flushes_requested: AtomicU64,
    /// Messages on topics the agent does not handle.
    pub unexpected_messages: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why a connection attempt failed (kept to answer sends while the session
/// waits to reconnect).
#[derive(Debug, Clone)]
enum ConnFailure {
    Refused(String),
    Other(String),
}

impl ConnFailure {
    fn to_error(&self) -> UplinkError {
        match self {
            ConnFailure::Refused(c) => UplinkError::MqttRefused(c.clone()),
            ConnFailure::Other(m) => UplinkError::Mqtt(m.clone()),
        }
    }
}

/// One batch for the session to publish at QoS 1.
struct PublishCmd {
    topic: String,
    payload: Vec<u8>,
    /// The batch's sequence (matches the hub's ack in `delivery = "hub"`).
    sequence: u64,
    done: oneshot::Sender<SendResult>,
}

/// A publish's outcome: delivered on the broker's PUBACK (`None`) or on the
/// hub's `BatchAck` (`delivery = "hub"`).
type SendResult = Result<Option<shared_protocol::v1::BatchAck>, UplinkError>;

/// Last topic level under which the hub publishes batch acknowledgements
/// (`devices/{id}/messages/devicebound/vigil-ack`).
pub const HUB_ACK_SUFFIX: &str = "vigil-ack";

/// The identity the session connects as: known from config, or still to
/// come from DPS (with the last registration error).
#[derive(Debug, Clone)]
enum IdentityState {
    Known(Identity),
    Pending(String),
}

/// Everything the session task needs.
struct SessionCfg {
    identity: Arc<watch::Sender<IdentityState>>,
    /// `delivery = "hub"`: a batch is delivered on the hub's `BatchAck`.
    hub_ack: bool,
    /// Registration, when the identity comes from DPS.
    dps: Option<dps::DpsSetup>,
    /// The assigned hub's MQTT port (DPS).
    hub_port: u16,
    signer: Arc<Signer>,
    ttl: Duration,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    clock: fn() -> u64,
    twin: twin::TwinSettings,
    link: Option<twin::AgentLink>,
    stats: Arc<IotHubStats>,
    /// Longest wait between reconnection (and DPS registration) attempts.
    max_backoff: Duration,
}

/// The IoT Hub MQTT uplink. A session task owns the MQTT connection (so the
/// agent stays reachable for direct methods and keeps its twin current
/// between batches); [`IotHubUplink::send`] hands it one batch at a time.
pub struct IotHubUplink {
    identity: Arc<watch::Sender<IdentityState>>,
    dps: Option<dps::DpsSetup>,
    hub_port: u16,
    signer: Arc<Signer>,
    ttl: Duration,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    clock: fn() -> u64,
    twin: twin::TwinSettings,
    link: Option<twin::AgentLink>,
    stats: Arc<IotHubStats>,
    session: Option<mpsc::Sender<PublishCmd>>,
    /// `uplink.max_backoff_ms`: the longest wait between reconnections.
    max_backoff: Duration,
    /// `uplink.compression`: zstd payloads carry `$.ce=zstd`.
    compression: crate::config::Compression,
    /// `uplink.iothub.delivery = "hub"`: wait for the hub's `BatchAck`.
    hub_ack: bool,
    /// How the identity was obtained, for the twin: `iothub-mqtt`,
    /// `iothub-mqtt-dps` or `iotedge-module`.
    mode: &'static str,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

pub(crate) fn now_us() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

impl fmt::Debug for IotHubUplink {
    // Never prints the key or a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IotHubUplink")
            .field("identity", &*self.identity.borrow())
            .field("auth", &self.signer.name())
            .field("session", &self.session.is_some())
            .finish()
    }
}

/// Read a base64 symmetric key from a private (0600) file.
pub fn read_key_file(path: &std::path::Path, field: &str) -> Result<Vec<u8>, UplinkError> {
    let raw = secrets::read_private(path).map_err(|e| UplinkError::Credentials(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let key = BASE64.decode(text.trim()).map_err(|_| {
        UplinkError::Credentials(format!("{}: not a base64 key ({field})", path.display()))
    })?;
    if key.is_empty() {
        return Err(UplinkError::Credentials(format!(
            "{}: empty key ({field})",
            path.display()
        )));
    }
    Ok(key)
}

fn twin_settings(cfg: Option<&IotHubConfig>) -> twin::TwinSettings {
    let (min_ms, refresh_s) = cfg
        .map(|c| (c.twin_min_interval_ms, c.twin_refresh_s))
        .unwrap_or((
            crate::config::default_twin_min_interval_ms(),
            crate::config::default_twin_refresh_s(),
        ));
    twin::TwinSettings {
        min_interval: Duration::from_millis(min_ms),
        refresh: Duration::from_secs(refresh_s),
    }
}

impl IotHubUplink {
    /// Build from validated config: reads the SAS key file (0600, base64)
    /// or the client certificate and key (key file 0600).
    pub fn new(cfg: &IotHubConfig, timeout: Duration) -> Result<Self, UplinkError> {
        let (signer, client_auth) = match (&cfg.sas_key_file, &cfg.cert_file, &cfg.key_file) {
            (Some(path), _, _) => (
                Signer::Key(read_key_file(path, "uplink.iothub.sas_key_file")?),
                None,
            ),
            (None, Some(cert), Some(keyf)) => {
                let id = vigil_io::tls::Identity::load(
                    vigil_io::tls::PemFile::new("uplink.iothub.cert_file", cert),
                    vigil_io::tls::PemFile::new("uplink.iothub.key_file", keyf),
                )?;
                (Signer::X509, Some((id.certs, id.key)))
            }
            _ => {
                return Err(UplinkError::Credentials(
                    "uplink.iothub: set sas_key_file or cert_file + key_file".into(),
                ));
            }
        };
        let tls = crate::uplink::tls_config_with(cfg.ca_file.as_deref(), client_auth)?;
        Ok(Self::build(
            Identity::device(&cfg.host, &cfg.device_id, cfg.port),
            signer,
            Duration::from_secs(cfg.sas_ttl_s),
            tls,
            timeout,
            twin_settings(Some(cfg)),
        ))
    }

    /// A device whose hub and id come from the Device Provisioning
    /// Service (`[uplink.iothub.dps]`): registration (or the cached
    /// assignment in `data_dir`) happens in the session, retried with
    /// backoff, so the agent buffers while DPS is unreachable.
    pub fn with_dps(
        cfg: &IotHubConfig,
        data_dir: &std::path::Path,
        timeout: Duration,
    ) -> Result<Self, UplinkError> {
        let Some(d) = &cfg.dps else {
            return Err(UplinkError::Credentials(
                "uplink.iothub.dps: not configured".into(),
            ));
        };
        let key = read_key_file(&d.key_file, "uplink.iothub.dps.key_file")?;
        let device_key = if d.group_key {
            dps::derive_device_key(&key, &d.registration_id)
        } else {
            key
        };
        let tls = Arc::new(crate::uplink::tls_config(cfg.ca_file.as_deref())?);
        let setup = dps::DpsSetup {
            id_scope: d.id_scope.clone(),
            registration_id: d.registration_id.clone(),
            global_endpoint: d.global_endpoint.clone(),
            port: d.port,
            device_key: device_key.clone(),
            tls: tls.clone(),
            timeout,
            data_dir: data_dir.to_owned(),
        };
        let up = IotHubUplink {
            identity: Arc::new(watch::channel(IdentityState::Pending("registering".into())).0),
            dps: Some(setup),
            hub_port: cfg.port,
            signer: Arc::new(Signer::Key(device_key)),
            ttl: Duration::from_secs(cfg.sas_ttl_s),
            tls,
            timeout,
            clock: unix_now,
            twin: twin_settings(Some(cfg)),
            link: None,
            stats: Arc::new(IotHubStats::default()),
            session: None,
            max_backoff: DEFAULT_MAX_RECONNECT_BACKOFF,
            compression: crate::config::Compression::None,
            hub_ack: cfg.delivery == crate::config::Delivery::Hub,
            mode: "iothub-mqtt-dps",
        };
        Ok(up)
    }

    fn build(
        identity: Identity,
        signer: Signer,
        ttl: Duration,
        tls: rustls::ClientConfig,
        timeout: Duration,
        twin: twin::TwinSettings,
    ) -> Self {
        IotHubUplink {
            hub_port: identity.port,
            identity: Arc::new(watch::channel(IdentityState::Known(identity)).0),
            dps: None,
            signer: Arc::new(signer),
            ttl,
            tls: Arc::new(tls),
            timeout,
            clock: unix_now,
            twin,
            link: None,
            stats: Arc::new(IotHubStats::default()),
            session: None,
            max_backoff: DEFAULT_MAX_RECONNECT_BACKOFF,
            compression: crate::config::Compression::None,
            hub_ack: false,
            mode: "iothub-mqtt",
        }
    }

    /// As an IoT Edge module: identity from the environment, SAS tokens
    /// signed by the workload API, edgeHub's CA from its trust bundle.
    /// `cfg` (optional in module mode) supplies only the token lifetime and
    /// twin timing.
    pub async fn from_iot_edge(
        env: &edge::EdgeEnv,
        cfg: Option<&IotHubConfig>,
        timeout: Duration,
    ) -> Result<Self, UplinkError> {
        let workload =
            edge::WorkloadClient::new(env).map_err(|e| UplinkError::Credentials(e.to_string()))?;
        let pem = workload
            .trust_bundle()
            .await
            .map_err(|e| UplinkError::Tls(e.to_string()))?;
        let tls = edge::tls_trusting(&pem).map_err(UplinkError::Tls)?;
        let ttl = cfg
            .map(|c| c.sas_ttl_s)
            .unwrap_or(crate::config::default_sas_ttl_s());
        let mut up = Self::build(
            env.identity(),
            Signer::Workload(workload),
            Duration::from_secs(ttl),
            tls,
            timeout,
            twin_settings(cfg),
        );
        up.mode = "iotedge-module";
        Ok(up)
    }

    /// Compress each batch (`uplink.compression`); zstd payloads are
    /// published with `$.ce=zstd` in the property bag.
    pub fn with_compression(mut self, c: crate::config::Compression) -> Self {
        self.compression = c;
        self
    }

    /// Count a batch delivered only on the hub's `BatchAck`
    /// (`uplink.iothub.delivery = "hub"`), not on the broker's PUBACK.
    pub fn with_hub_ack(mut self, on: bool) -> Self {
        self.hub_ack = on;
        self
    }

    /// The longest wait between reconnection attempts
    /// (`uplink.max_backoff_ms`; the first wait is 0.5 s, doubled after each
    /// failure up to this).
    pub fn with_max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// The longest wait between reconnection attempts.
    pub fn max_backoff(&self) -> Duration {
        self.max_backoff
    }

    /// Replace the clock that SAS token expiries are computed from (tests
    /// use a fixed clock so that a broker can hold the exact token).
    pub fn with_clock(mut self, clock: fn() -> u64) -> Self {
        self.clock = clock;
        self
    }

    /// The identity, once known (DPS: after registration).
    pub fn identity(&self) -> Option<Identity> {
        match &*self.identity.borrow() {
            IdentityState::Known(i) => Some(i.clone()),
            IdentityState::Pending(_) => None,
        }
    }

    /// The identity to publish as; with DPS, starts the session (which
    /// registers) and waits for it at most the request timeout.
    async fn current_identity(&mut self) -> Result<Identity, UplinkError> {
        if let Some(i) = self.identity() {
            return Ok(i);
        }
        if self.session.as_ref().is_none_or(|s| s.is_closed()) {
            self.start();
        }
        let mut rx = self.identity.subscribe();
        let _ = tokio::time::timeout(
            self.timeout,
            rx.wait_for(|s| matches!(s, IdentityState::Known(_))),
        )
        .await;
        match &*self.identity.borrow() {
            IdentityState::Known(i) => Ok(i.clone()),
            IdentityState::Pending(e) => Err(UplinkError::Mqtt(format!(
                "no IoT Hub assignment from DPS yet: {e}"
            ))),
        }
    }

    /// The session's counters.
    pub fn stats(&self) -> Arc<IotHubStats> {
        self.stats.clone()
    }

    /// Connect the session to the running agent (twin report, `flush`) and
    /// start it, so the device is reachable before the first batch.
    pub fn attach(&mut self, link: twin::AgentLink) {
        self.link = Some(link);
        if self.session.is_none() {
            self.start();
        }
    }

    fn session_cfg(&self) -> SessionCfg {
        SessionCfg {
            identity: self.identity.clone(),
            hub_ack: self.hub_ack,
            dps: self.dps.clone(),
            hub_port: self.hub_port,
            signer: self.signer.clone(),
            ttl: self.ttl,
            tls: self.tls.clone(),
            timeout: self.timeout,
            clock: self.clock,
            twin: self.twin,
            link: self.link.clone(),
            stats: self.stats.clone(),
            max_backoff: self.max_backoff,
        }
    }

    fn start(&mut self) -> mpsc::Sender<PublishCmd> {
        let (tx, rx) = mpsc::channel(1);
        let cfg = self.session_cfg();
        tokio::spawn(run_session(cfg, rx));
        self.session = Some(tx.clone());
        tx
    }

    /// Publish one batch at QoS 1 and wait for its PUBACK (`None`), or with
    /// `delivery = "hub"` for the hub's `BatchAck` of it (`Some`).
    pub async fn send(
        &mut self,
        batch: &Batch,
    ) -> Result<Option<shared_protocol::v1::BatchAck>, UplinkError> {
        let payload = crate::uplink::encode_batch(batch, self.compression)?;
        let identity = self.current_identity().await?;
        let mut topic = identity.events_topic();
        if self.compression == crate::config::Compression::Zstd {
            topic = topic.replace(PROPERTY_BAG, PROPERTY_BAG_ZSTD);
        }
        if payload.len() + topic.len() > MAX_MESSAGE_BYTES {
            return Err(UplinkError::MessageTooLarge {
                bytes: payload.len() + topic.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        let session = match &self.session {
            Some(s) if !s.is_closed() => s.clone(),
            _ => self.start(),
        };
        let (done, result) = oneshot::channel();
        let cmd = PublishCmd {
            topic,
            payload,
            sequence: batch.sequence,
            done,
        };
        // The session answers within its own connect, PUBACK (and hub ack)
        // timeouts; this bound only guards against a wedged task.
        let bound = self.timeout * 4 + Duration::from_secs(1);
        match tokio::time::timeout(bound, async {
            session
                .send(cmd)
                .await
                .map_err(|_| UplinkError::Mqtt("session ended".into()))?;
            result
                .await
                .map_err(|_| UplinkError::Mqtt("session ended".into()))?
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(UplinkError::Mqtt("no PUBACK in time".into())),
        }
    }
}

/// The IoT Hub uplink the config asks for: an IoT Edge module when the
/// `IOTEDGE_*` environment is present, else the `[uplink.iothub]` device
/// (its key file or certificate).
pub async fn uplink_from_config(cfg: &AgentConfig) -> Result<IotHubUplink, UplinkError> {
    let hub_ack = cfg
        .uplink
        .iothub
        .as_ref()
        .is_some_and(|h| h.delivery == crate::config::Delivery::Hub);
    Ok(uplink_identity_from_config(cfg)
        .await?
        .with_max_backoff(cfg.uplink.max_backoff())
        .with_hub_ack(hub_ack))
}

async fn uplink_identity_from_config(cfg: &AgentConfig) -> Result<IotHubUplink, UplinkError> {
    let timeout = cfg.uplink.request_timeout();
    let h = cfg.uplink.iothub.as_ref();
    match cfg.uplink.iot_edge() {
        Err(e) => Err(UplinkError::Credentials(e.to_string())),
        Ok(Some(env)) => {
            if h.is_some() {
                tracing::warn!(
                    "running as an IoT Edge module: the identity in [uplink.iothub] is not used (IOTEDGE_* environment)"
                );
            }
            tracing::info!(device_id = %env.device_id, module_id = %env.module_id, gateway = ?env.gateway, "IoT Edge module mode");
            IotHubUplink::from_iot_edge(&env, h, timeout).await
        }
        Ok(None) => match h {
            Some(h) if h.dps.is_some() => IotHubUplink::with_dps(h, &cfg.data_dir, timeout),
            Some(h) => IotHubUplink::new(h, timeout),
            None => Err(UplinkError::Credentials(
                "uplink.iothub: required for uplink.kind = \"iothub-mqtt\"".into(),
            )),
        },
    }
}

/// `check` / `check-config`: the `[uplink.iothub]` credentials load (device
/// key, certificate, or the DPS key); no connection is made.
pub fn credentials_check(
    h: &IotHubConfig,
    data_dir: &std::path::Path,
    timeout: Duration,
) -> Result<&'static str, UplinkError> {
    match &h.dps {
        Some(d) => {
            let up = IotHubUplink::with_dps(h, data_dir, timeout)?;
            let cached = up.dps.as_ref().and_then(dps::cached).is_some();
            Ok(match (d.group_key, cached) {
                (true, true) => "DPS group key loads (device key derived); assignment cached",
                (true, false) => "DPS group key loads (device key derived); not registered yet",
                (false, true) => "DPS key loads; assignment cached",
                (false, false) => "DPS key loads; not registered yet",
            })
        }
        None => {
            IotHubUplink::new(h, timeout)?;
            Ok("device key / certificate loads")
        }
    }
}

/// `check`: one MQTT connection as the configured identity, the way `run`
/// connects: TLS verified against the configured CA (or the public roots),
/// CONNECT with the SAS token or client certificate, and the broker's
/// CONNACK. With DPS, the connection is to DPS with the registration
/// credentials (nothing is registered). Nothing is published. Returns what
/// was verified.
pub async fn check_connect(
    h: &IotHubConfig,
    data_dir: &std::path::Path,
    timeout: Duration,
) -> Result<String, UplinkError> {
    match &h.dps {
        Some(_) => {
            let up = IotHubUplink::with_dps(h, data_dir, timeout)?;
            let setup = up.dps.as_ref().expect("with_dps sets it");
            let token = sas_token(
                &dps::resource_uri(&setup.id_scope, &setup.registration_id),
                &setup.device_key,
                unix_now() + 3600,
                Some("registration"),
            );
            let mut opts =
                MqttOptions::new(&setup.registration_id, &setup.global_endpoint, setup.port);
            opts.set_keep_alive(Duration::from_secs(60));
            opts.set_clean_session(true);
            opts.set_credentials(
                dps::username(&setup.id_scope, &setup.registration_id),
                token,
            );
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                setup.tls.clone(),
            )));
            connack(opts, timeout).await.map_err(|f| f.to_error())?;
            Ok(format!(
                "{}:{} accepted registration {} (TLS verified, CONNACK)",
                setup.global_endpoint, setup.port, setup.registration_id
            ))
        }
        None => {
            let up = IotHubUplink::new(h, timeout)?;
            let id = up.identity().expect("known without DPS");
            connect(&up.session_cfg(), &id)
                .await
                .map_err(|f| f.to_error())?;
            Ok(format!(
                "{}:{} accepted device {} (TLS verified, CONNACK)",
                id.connect_host, id.port, id.device_id
            ))
        }
    }
}

/// Connect with `opts` and wait for the CONNACK, then disconnect.
async fn connack(opts: MqttOptions, timeout: Duration) -> Result<(), ConnFailure> {
    let (client, mut events) = AsyncClient::new(opts, 8);
    let res = tokio::time::timeout(timeout, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match res {
        Ok(Ok(())) => {
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(500), events.poll()).await;
            Ok(())
        }
        Ok(Err(ConnectionError::ConnectionRefused(code))) => {
            Err(ConnFailure::Refused(format!("{code:?}")))
        }
        Ok(Err(e)) => Err(ConnFailure::Other(format!("connect: {e}"))),
        Err(_) => Err(ConnFailure::Other("connect: timed out".into())),
    }
}

/// Wire the running agent to its uplink: the IoT Hub session gets what it
/// reports in the twin and the `flush` method's trigger. Returns the
/// forwarder's "send without waiting" signal (shutdown, or a flush in
/// progress; see [`methods::hurry_signal`]).
pub fn wire(
    uplink: &mut AnyUplink,
    cfg: &AgentConfig,
    buffer: &Arc<Buffer>,
    activity: Arc<twin::DeviceActivity>,
    shutdown: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let flush = Arc::new(Notify::new());
    let hurry = methods::hurry_signal(shutdown, stop, flush.clone(), Arc::downgrade(buffer));
    if let AnyUplink::IotHub(u) = uplink {
        let devices = cfg
            .devices
            .iter()
            .map(|d| twin::DeviceEntry {
                id: d.id.clone(),
                kind: serde_json::to_value(d.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                listener: d.kind.transport() == crate::config::Transport::Listener,
            })
            .collect();
        let mode = u.mode.to_string();
        u.attach(twin::AgentLink {
            buffer: Arc::downgrade(buffer),
            devices,
            activity,
            flush,
            uplink: mode,
        });
    }
    hurry
}

/// One connection attempt: fresh token, CONNECT, wait for CONNACK.
async fn connect(
    cfg: &SessionCfg,
    id: &Identity,
) -> Result<(AsyncClient, EventLoop, Instant), ConnFailure> {
    let now_unix = (cfg.clock)();
    let expiry = now_unix + cfg.ttl.as_secs();
    let uri = id.resource_uri();
    let (password, lifetime) = match cfg.signer.as_ref() {
        Signer::Key(key) => (sas_token(&uri, key, expiry, None), Some(cfg.ttl)),
        Signer::Workload(w) => {
            let sig = w
                .sign(&sas_string_to_sign(&uri, expiry))
                .await
                .map_err(|e| ConnFailure::Other(format!("IoT Edge workload API: {e}")))?;
            (sas_token_with_signature(&uri, &sig, expiry), Some(cfg.ttl))
        }
        Signer::X509 => (String::new(), None),
    };
    let mut opts = MqttOptions::new(id.client_id(), &id.connect_host, id.port);
    opts.set_keep_alive(KEEP_ALIVE);
    opts.set_clean_session(true);
    opts.set_max_packet_size(MAX_MESSAGE_BYTES + 4096, MAX_MESSAGE_BYTES + 4096);
    opts.set_credentials(id.username(), password);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        cfg.tls.clone(),
    )));
    let (client, mut events) = AsyncClient::new(opts, 64);
    let res = tokio::time::timeout(cfg.timeout, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(ConnectionError::ConnectionRefused(code))) => {
            return Err(ConnFailure::Refused(format!("{code:?}")));
        }
        Ok(Err(e)) => return Err(ConnFailure::Other(format!("connect: {e}"))),
        Err(_) => return Err(ConnFailure::Other("connect: timed out".into())),
    }
    // Renew at 80 % of the token's lifetime (certificates: never).
    let renew_at = match lifetime {
        Some(ttl) => Instant::now() + ttl.mul_f64(0.8),
        None => Instant::now() + Duration::from_secs(365 * 24 * 3600),
    };
    Ok((client, events, renew_at))
}

/// The batch waiting for its PUBACK.
struct Inflight {
    pkid: Option<u16>,
    sequence: u64,
    /// The broker's PUBACK came (`delivery = "hub"`: now waiting for the
    /// hub's ack).
    puback: bool,
    done: oneshot::Sender<SendResult>,
    deadline: Instant,
}

/// The session: connect, subscribe, then serve publishes, method calls and
/// twin reports until the connection drops (reconnect with backoff) or the
/// uplink is dropped.
async fn run_session(cfg: SessionCfg, mut cmds: mpsc::Receiver<PublishCmd>) {
    let mut backoff = FIRST_RECONNECT_BACKOFF.min(cfg.max_backoff);
    let mut reporter = twin::Reporter::new(cfg.twin);
    'identity: loop {
        // The identity: from config, or registered with DPS (retried with
        // backoff; no batch is handed over before it is known).
        let known = match &*cfg.identity.borrow() {
            IdentityState::Known(i) => Some(i.clone()),
            IdentityState::Pending(_) => None,
        };
        let identity = match known {
            Some(i) => i,
            None => loop {
                let Some(setup) = &cfg.dps else {
                    return;
                };
                let registration = dps::assignment(setup, cfg.clock);
                tokio::pin!(registration);
                let attempt = loop {
                    tokio::select! {
                        r = &mut registration => break r,
                        c = cmds.recv() => match c {
                            Some(c) => {
                                let _ = c.done.send(Err(UplinkError::Mqtt("DPS registration in progress".into())));
                            }
                            None => return,
                        },
                    }
                };
                match attempt {
                    Ok(a) => {
                        let i = a.identity(cfg.hub_port);
                        cfg.identity.send_replace(IdentityState::Known(i.clone()));
                        break i;
                    }
                    Err(e) => {
                        bump(&cfg.stats.connect_failures);
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "DPS registration failed");
                        cfg.identity
                            .send_replace(IdentityState::Pending(e.to_string()));
                        let until = Instant::now() + backoff;
                        loop {
                            tokio::select! {
                                _ = tokio::time::sleep_until(until) => break,
                                c = cmds.recv() => match c {
                                    Some(c) => {
                                        let _ = c.done.send(Err(UplinkError::Mqtt(e.to_string())));
                                    }
                                    None => return,
                                },
                            }
                        }
                        backoff = next_backoff(backoff, cfg.max_backoff);
                    }
                }
            },
        };
        let id = &identity;
        // Refusals in a row (not authorized): with DPS, the cached assignment
        // may be stale (device moved or deleted): register again.
        let mut refused = 0u32;
        loop {
            let (client, event_loop, renew_at) = match connect(&cfg, id).await {
                Ok(c) => c,
                Err(e) => {
                    bump(&cfg.stats.connect_failures);
                    if let (Some(setup), ConnFailure::Refused(code)) = (&cfg.dps, &e)
                        && (code.contains("NotAuthorized") || code.contains("BadUserNamePassword"))
                    {
                        refused += 1;
                        if refused >= DPS_REFUSALS_BEFORE_REREGISTER {
                            tracing::warn!(device_id = %id.device_id, hub = %id.hub, "the assigned hub keeps refusing the device; registering with DPS again");
                            dps::forget(setup);
                            cfg.identity.send_replace(IdentityState::Pending(
                                "registering again with DPS".into(),
                            ));
                            continue 'identity;
                        }
                    }
                    tracing::warn!(host = %id.connect_host, client_id = %id.client_id(), error = ?e, retry_in_ms = backoff.as_millis() as u64, "IoT Hub MQTT connection failed");
                    // Sends meanwhile fail at once with the reason.
                    let until = Instant::now() + backoff;
                    loop {
                        tokio::select! {
                            c = cmds.recv() => match c {
                                Some(c) => { let _ = c.done.send(Err(e.to_error())); }
                                None => return,
                            },
                            _ = tokio::time::sleep_until(until) => break,
                        }
                    }
                    backoff = next_backoff(backoff, cfg.max_backoff);
                    continue;
                }
            };
            backoff = FIRST_RECONNECT_BACKOFF.min(cfg.max_backoff);
            refused = 0;
            bump(&cfg.stats.connects);
            tracing::info!(host = %id.connect_host, client_id = %id.client_id(), auth = cfg.signer.name(), "IoT Hub MQTT connected");
            let mut filters = vec![
                SubscribeFilter::new(methods::REQUEST_FILTER.into(), QoS::AtMostOnce),
                SubscribeFilter::new(twin::RESPONSE_FILTER.into(), QoS::AtMostOnce),
            ];
            let ack_prefix = format!("devices/{}/messages/devicebound/", id.device_id);
            if cfg.hub_ack {
                filters.push(SubscribeFilter::new(
                    format!("{ack_prefix}#"),
                    QoS::AtLeastOnce,
                ));
            }
            if let Err(e) = client.try_subscribe_many(filters) {
                tracing::warn!(error = %e, "subscribing to methods, twin responses and acks failed");
            }
            reporter.on_connect();
            // The event loop runs in its own task and is never cancelled
            // half-way through a write (select! below only cancels a
            // channel receive).
            let (ev_tx, mut events) = mpsc::channel(64);
            let pump = tokio::spawn(pump_events(event_loop, ev_tx));
            let mut inflight: Option<Inflight> = None;
            let mut tick = tokio::time::interval(TWIN_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let reason: String = loop {
                let deadline = inflight.as_ref().map(|i| i.deadline);
                tokio::select! {
                    ev = events.recv() => match ev.unwrap_or_else(|| Err("event loop ended".into())) {
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                            if let Some(i) = inflight.as_mut()
                                && i.pkid.is_none()
                            {
                                i.pkid = Some(pkid);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if inflight.as_ref().is_some_and(|i| i.pkid == Some(ack.pkid) && !i.puback) {
                                if cfg.hub_ack {
                                    // The broker has it; the hub's ack decides.
                                    if let Some(i) = inflight.as_mut() {
                                        i.puback = true;
                                        i.deadline = Instant::now() + cfg.timeout;
                                    }
                                } else if let Some(i) = inflight.take() {
                                    let _ = i.done.send(Ok(None));
                                }
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(s))) => {
                            let failed = s.return_codes.iter().filter(|c| matches!(c, SubscribeReasonCode::Failure)).count();
                            if failed > 0 {
                                cfg.stats.subscribe_failures.fetch_add(failed as u64, Ordering::Relaxed);
                                tracing::warn!(refused = failed, "IoT Hub refused a subscription (direct methods / twin unavailable)");
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) if cfg.hub_ack && p.topic.starts_with(&ack_prefix) => {
                            match <shared_protocol::v1::BatchAck as prost::Message>::decode(p.payload.as_ref()) {
                                Ok(ack) if inflight.as_ref().is_some_and(|i| i.sequence == ack.sequence) => {
                                    bump(&cfg.stats.hub_acks);
                                    if let Some(i) = inflight.take() {
                                        let _ = i.done.send(Ok(Some(ack)));
                                    }
                                }
                                // An earlier attempt's ack, after its send
                                // timed out (the batch went again): harmless.
                                Ok(_) => bump(&cfg.stats.hub_acks_stale),
                                Err(_) => {
                                    bump(&cfg.stats.hub_acks_malformed);
                                    tracing::warn!(bytes = p.payload.len(), "malformed hub acknowledgement ignored");
                                }
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            on_message(&cfg, &client, &mut reporter, &p.topic);
                        }
                        Ok(_) => {}
                        Err(e) => break format!("connection lost: {e}"),
                    },
                    c = cmds.recv(), if inflight.is_none() => match c {
                        Some(c) => match client.try_publish(c.topic, QoS::AtLeastOnce, false, c.payload) {
                            Ok(()) => inflight = Some(Inflight { pkid: None, sequence: c.sequence, puback: false, done: c.done, deadline: Instant::now() + cfg.timeout }),
                            Err(e) => { let _ = c.done.send(Err(UplinkError::Mqtt(format!("publish: {e}")))); }
                        },
                        None => {
                            close(&client, &mut events).await;
                            pump.abort();
                            return;
                        }
                    },
                    _ = sleep_until_opt(deadline) => {
                        // The broker took the batch but the hub did not
                        // answer: this send fails (the forwarder sends the
                        // batch again; the hub de-duplicates), the
                        // connection stays.
                        if inflight.as_ref().is_some_and(|i| i.puback) {
                            bump(&cfg.stats.hub_ack_timeouts);
                            if let Some(i) = inflight.take() {
                                let _ = i.done.send(Err(UplinkError::Mqtt("no hub acknowledgement in time".into())));
                            }
                            continue;
                        }
                        break "no PUBACK in time".to_string();
                    }
                    _ = tokio::time::sleep_until(renew_at), if inflight.is_none() => {
                        tracing::info!(client_id = %id.client_id(), "renewing the SAS token (reconnect)");
                        close(&client, &mut events).await;
                        break String::new();
                    }
                    _ = tick.tick() => {
                        if let Some(link) = &cfg.link {
                            report_twin(&cfg, link, &client, &mut reporter);
                        }
                    }
                }
            };
            pump.abort();
            if let Some(i) = inflight.take() {
                let _ = i.done.send(Err(UplinkError::Mqtt(reason.clone())));
            }
            if !reason.is_empty() {
                tracing::warn!(host = %id.connect_host, reason = %reason, "IoT Hub MQTT session ended; reconnecting");
                // A short pause so that a broker dropping every connection at
                // once is not hammered.
                let until = Instant::now() + backoff;
                loop {
                    tokio::select! {
                        c = cmds.recv() => match c {
                            Some(c) => { let _ = c.done.send(Err(UplinkError::Mqtt(reason.clone()))); }
                            None => return,
                        },
                        _ = tokio::time::sleep_until(until) => break,
                    }
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// An event, or why the connection ended.
type PolledEvent = Result<Event, String>;

/// Poll the MQTT event loop until it fails (or nobody listens), handing
/// every event over.
async fn pump_events(mut events: EventLoop, tx: mpsc::Sender<PolledEvent>) {
    loop {
        let ev = events.poll().await.map_err(|e| e.to_string());
        let end = ev.is_err();
        if tx.send(ev).await.is_err() || end {
            return;
        }
    }
}

/// Send DISCONNECT and give it a moment to go out.
async fn close(client: &AsyncClient, events: &mut mpsc::Receiver<PolledEvent>) {
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(ev) = events.recv().await {
                if matches!(ev, Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) {
                    return;
                }
            }
        })
        .await;
    }
}

fn on_message(cfg: &SessionCfg, client: &AsyncClient, reporter: &mut twin::Reporter, topic: &str) {
    let stats = &cfg.stats;
    if topic.starts_with("$iothub/methods/POST/") {
        bump(&stats.methods_received);
        let req = match methods::parse_request(topic) {
            Ok(r) => r,
            Err(e) => {
                bump(&stats.methods_malformed);
                tracing::warn!(error = %e, topic_len = topic.len(), "malformed direct method request ignored");
                return;
            }
        };
        let buffer = cfg.link.as_ref().and_then(|l| l.buffer.upgrade());
        let (status, body) = methods::handle(
            &req,
            buffer.as_deref(),
            cfg.link.as_ref().map(|l| l.flush.as_ref()),
        );
        match status {
            200 if req.name == "flush" => bump(&stats.flushes_requested),
            404 => bump(&stats.methods_unknown),
            _ => {}
        }
        tracing::info!(method = %req.name, status, "direct method");
        if let Err(e) = client.try_publish(
            methods::response_topic(status, &req.rid),
            QoS::AtMostOnce,
            false,
            body.into_bytes(),
        ) {
            tracing::warn!(error = %e, "direct method response not sent");
        }
    } else if let Some(r) = twin::parse_response(topic) {
        match reporter.on_response(&r) {
            twin::ResponseOutcome::Accepted { version } => {
                bump(&stats.twin_reports_accepted);
                tracing::debug!(version = ?version, "twin reported properties updated");
            }
            twin::ResponseOutcome::Failed { status } => {
                bump(&stats.twin_reports_failed);
                tracing::warn!(
                    status,
                    "IoT Hub refused the twin reported properties; will retry"
                );
            }
            twin::ResponseOutcome::Unexpected => bump(&stats.twin_responses_unexpected),
        }
    } else {
        bump(&stats.unexpected_messages);
        tracing::debug!(
            topic_len = topic.len(),
            "message on an unhandled topic ignored"
        );
    }
}

fn report_twin(
    cfg: &SessionCfg,
    link: &twin::AgentLink,
    client: &AsyncClient,
    reporter: &mut twin::Reporter,
) {
    let now = Instant::now();
    if reporter.timed_out(now) {
        bump(&cfg.stats.twin_reports_failed);
        tracing::warn!("no answer to the twin reported properties; will retry");
    }
    let Some(rid) = reporter.due(now, link.significant()) else {
        return;
    };
    let Some(body) = link.report().map(|v| v.to_string()) else {
        reporter.send_failed();
        return;
    };
    match client.try_publish(
        twin::patch_topic(&rid),
        QoS::AtMostOnce,
        false,
        body.into_bytes(),
    ) {
        Ok(()) => bump(&cfg.stats.twin_reports_sent),
        Err(e) => {
            reporter.send_failed();
            tracing::warn!(error = %e, "twin reported properties not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding_keeps_unreserved_and_encodes_the_rest() {
        assert_eq!(url_encode("AZaz09-._~"), "AZaz09-._~");
        assert_eq!(
            url_encode("myhub.azure-devices.net/devices/dev-1"),
            "myhub.azure-devices.net%2Fdevices%2Fdev-1"
        );
        assert_eq!(url_encode("a+b/c=="), "a%2Bb%2Fc%3D%3D");
        assert_eq!(url_encode("x y&z?é"), "x%20y%26z%3F%C3%A9");
    }

    /// Vector built by hand from Microsoft's documented algorithm (the
    /// Python `generate_sas_token` in "Control access to IoT Hub with shared
    /// access signatures": `quote_plus(uri) + "\n" + expiry`, HMAC-SHA256
    /// with the base64-decoded key, base64, `urlencode`) and computed
    /// independently with Python's `hmac`/`urllib.parse` (see the docs).
    #[test]
    fn sas_token_matches_the_documented_algorithm() {
        let key = BASE64
            .decode("c2VjcmV0LWRldmljZS1rZXktZm9yLXZpZ2lsLXRlc3Q=")
            .unwrap();
        let uri = resource_uri("myhub.azure-devices.net", "dev-1");
        let t = sas_token(&uri, &key, 1_700_000_000, None);
        assert_eq!(t, EXPECTED_NO_POLICY);
        let t = sas_token(&uri, &key, 1_700_000_000, Some("device"));
        assert_eq!(t, EXPECTED_WITH_POLICY);
    }
    const EXPECTED_NO_POLICY: &str = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev-1&sig=Cgc4GlKn1lLgynzdmY%2Ffc7paF9DSAde%2BX90wurEJ4FQ%3D&se=1700000000";
    const EXPECTED_WITH_POLICY: &str = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev-1&sig=Cgc4GlKn1lLgynzdmY%2Ffc7paF9DSAde%2BX90wurEJ4FQ%3D&se=1700000000&skn=device";

    #[test]
    fn expiry_is_signed_so_tokens_differ_by_expiry() {
        let key = b"k";
        let a = sas_token("h/devices/d", key, 100, None);
        let b = sas_token("h/devices/d", key, 101, None);
        assert!(a.ends_with("&se=100") && b.ends_with("&se=101"));
        let sig = |t: &str| {
            t.split("&sig=")
                .nth(1)
                .unwrap()
                .split('&')
                .next()
                .unwrap()
                .to_string()
        };
        assert_ne!(sig(&a), sig(&b));
    }

    #[tokio::test]
    async fn the_reconnect_backoff_honours_uplink_max_backoff_ms() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("device.key");
        std::fs::write(&key, "c2VjcmV0LWRldmljZS1rZXk=").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = |max: &str| -> AgentConfig {
            toml::from_str(&format!(
                "gateway_id = \"gw-1\"\ndata_dir = {:?}\n[uplink]\nkind = \"iothub-mqtt\"\n{max}\n[uplink.iothub]\nhost = \"h.azure-devices.net\"\ndevice_id = \"gw-1\"\nsas_key_file = {:?}\n",
                dir.path().display().to_string(),
                key.display().to_string()
            ))
            .unwrap()
        };
        let up = uplink_from_config(&cfg("max_backoff_ms = 2000"))
            .await
            .unwrap();
        assert_eq!(up.max_backoff(), Duration::from_secs(2));
        let up = uplink_from_config(&cfg("")).await.unwrap();
        assert_eq!(up.max_backoff(), Duration::from_millis(30_000));
        // 0.5 s doubling, capped at the setting.
        let mut b = FIRST_RECONNECT_BACKOFF;
        let mut seen = vec![];
        for _ in 0..4 {
            b = next_backoff(b, Duration::from_secs(2));
            seen.push(b.as_millis());
        }
        assert_eq!(seen, [1000, 2000, 2000, 2000]);
    }

    #[test]
    fn session_names_follow_iot_hub() {
        assert_eq!(
            username("myhub.azure-devices.net", "dev-1"),
            "myhub.azure-devices.net/dev-1/?api-version=2021-04-12"
        );
        assert_eq!(
            events_topic("dev-1"),
            "devices/dev-1/messages/events/$.ct=application%2Fx-protobuf&$.ce=identity"
        );
    }
}
