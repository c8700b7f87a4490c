//! MQTT ingest (`[mqtt]`): the hub consumes the protobuf `Batch`es that
//! agents publish to an MQTT broker (Azure IoT Hub's routing to a broker,
//! or Mosquitto), next to `POST /api/v1/ingest`.
//!
//! - **Shared subscription.** Every hub instance connects with MQTT 5
//!   (rumqttc `v5`, rustls with the ring provider) under its own stable
//!   client id and subscribes to `$share/{group}/{topic_filter}`; the broker
//!   hands each message to one instance of the group.
//! - **Topic and trust.** Agents publish to
//!   `devices/{device_id}/messages/events/{property bag}` (see
//!   `edge-agent/src/iothub.rs`). The hub takes the gateway id from the
//!   topic's `{device_id}`: **the broker's ACL is what binds a publishing
//!   client to its topic**, so a broker that lets one device publish to
//!   another's topic breaks gateway identity. The gateway must be
//!   registered and not revoked, and `Batch.gateway_id` must equal it;
//!   otherwise the message is counted, logged and dropped.
//! - **Encoding.** `$.ce=identity` (or no `$.ce`) is the plain protobuf,
//!   `$.ce=zstd` one zstd frame of it, decompressed with the HTTP ingest's
//!   bounded decoder (`crate::encoding`, at most `server.max_body_bytes`);
//!   any other encoding is refused (counted, logged, dropped).
//! - **Acknowledgement = stored.** Manual acks: the PUBACK for a message is
//!   sent only after `Store::ingest` has committed its batch (or after the
//!   message was dropped as unusable). A hub that stops or crashes before
//!   that gets the message again (clean start off, session expiry
//!   `session_expiry_s`: the broker keeps the instance's subscription and
//!   queue while it is away); the store's de-duplication by batch and by
//!   reading identity makes the re-delivery harmless. A store failure is
//!   retried with backoff, never acked.
//! - **Operational consequence.** Messages the broker has queued for an
//!   instance's session wait for *that* instance (same client id) to come
//!   back; an instance that is retired must first be drained, or its queue
//!   is lost when the session expires.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use serde::Deserialize;
use shared_protocol::v1::Batch;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vigil_io::tls::{self, PemFile};

use crate::config_error::ConfigError;
use crate::encoding::{ContentCoding, DecodeError};
pub use crate::metrics::{DropReason, MqttMetrics};
use crate::pipeline::Pipeline;

/// MQTT keep-alive of the hub's connection.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How many unacknowledged messages the broker may have in flight to one
/// hub instance (MQTT 5 receive maximum).
const RECEIVE_MAXIMUM: u16 = 32;
/// Longest wait between reconnection attempts and store retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Room for the topic and properties above `server.max_body_bytes`.
const PACKET_OVERHEAD: usize = 64 * 1024;

/// Default MQTT port with TLS.
pub const DEFAULT_MQTT_PORT: u16 = 8883;
/// Default shared-subscription group.
pub const DEFAULT_MQTT_GROUP: &str = "vigil-hub";
/// Default topic filter: every device's events (IoT Hub / agent layout).
pub const DEFAULT_MQTT_TOPIC_FILTER: &str = "devices/+/messages/events/#";
/// Default MQTT session expiry: 7 days.
pub const DEFAULT_MQTT_SESSION_EXPIRY_S: u32 = 7 * 24 * 3600;

/// `[mqtt]`: consume agent batches from an MQTT 5 broker with a shared
/// subscription (`$share/{group}/{topic_filter}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host name or IP address.
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// MQTT client id of this hub instance: stable across restarts (the
    /// broker keeps the instance's session and queue under it) and unique
    /// among the instances. Env `VIGIL_HUB_MQTT_CLIENT_ID` overrides.
    pub client_id: String,
    /// Shared-subscription group; the broker spreads messages across the
    /// instances subscribed with the same group.
    #[serde(default = "default_mqtt_group")]
    pub group: String,
    /// Topic filter, without the `$share/{group}/` prefix.
    #[serde(default = "default_mqtt_topic_filter")]
    pub topic_filter: String,
    /// User name for the broker (with `password_file`).
    pub username: Option<String>,
    /// File (mode 0600) holding the broker password.
    pub password_file: Option<PathBuf>,
    /// How long the broker keeps this instance's session (subscription and
    /// queued messages) while it is disconnected.
    #[serde(default = "default_mqtt_session_expiry_s")]
    pub session_expiry_s: u32,
    /// `[mqtt.tls]`: TLS to the broker; required unless the broker is on
    /// loopback.
    pub tls: Option<MqttTlsConfig>,
    /// After a batch is stored, publish its `BatchAck` (protobuf, QoS 1) to
    /// `devices/{gateway}/messages/devicebound/vigil-ack`, where agents
    /// with `uplink.iothub.delivery = "hub"` wait for it before deleting
    /// the batch (so a broker restart that loses a message loses nothing).
    /// Default true; the broker's ACL must let the hub write there.
    #[serde(default = "default_publish_acks")]
    pub publish_acks: bool,
}

fn default_publish_acks() -> bool {
    true
}

/// The topic a gateway's batch acknowledgements are published to (IoT
/// Hub's cloud-to-device layout, `devices/{id}/messages/devicebound/…`).
pub fn ack_topic(gateway_id: &str) -> String {
    format!("devices/{gateway_id}/messages/devicebound/{ACK_TOPIC_SUFFIX}")
}

/// Last level of [`ack_topic`].
pub const ACK_TOPIC_SUFFIX: &str = "vigil-ack";

fn default_mqtt_port() -> u16 {
    DEFAULT_MQTT_PORT
}
fn default_mqtt_group() -> String {
    DEFAULT_MQTT_GROUP.into()
}
fn default_mqtt_topic_filter() -> String {
    DEFAULT_MQTT_TOPIC_FILTER.into()
}
fn default_mqtt_session_expiry_s() -> u32 {
    DEFAULT_MQTT_SESSION_EXPIRY_S
}

impl MqttConfig {
    /// Checks the values, naming the offending field (TLS is required
    /// unless the broker is on loopback).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = self;
        if m.host.is_empty() {
            return Err(ConfigError::invalid("mqtt.host", "must not be empty"));
        }
        if m.port == 0 {
            return Err(ConfigError::invalid("mqtt.port", "must not be 0"));
        }
        if m.client_id.is_empty() || m.client_id.len() > 128 {
            return Err(ConfigError::invalid(
                "mqtt.client_id",
                "must be 1-128 characters, stable and unique per hub instance",
            ));
        }
        if m.group.is_empty() || m.group.contains(['/', '+', '#']) {
            return Err(ConfigError::invalid(
                "mqtt.group",
                "must be non-empty without '/', '+' or '#'",
            ));
        }
        let f = &m.topic_filter;
        let levels_ok = f.split('/').enumerate().all(|(i, level)| {
            let last = i + 1 == f.split('/').count();
            (level == "#" && last) || level == "+" || !level.contains(['+', '#'])
        });
        if f.is_empty() || f.starts_with('$') || !levels_ok {
            return Err(ConfigError::invalid(
                "mqtt.topic_filter",
                "must be an MQTT topic filter (without the $share/ prefix), e.g. devices/+/messages/events/#",
            ));
        }
        match (&m.username, &m.password_file) {
            (Some(u), Some(_)) if u.is_empty() => {
                return Err(ConfigError::invalid("mqtt.username", "must not be empty"));
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "mqtt.password_file",
                    "is required with mqtt.username",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "mqtt.username",
                    "is required with mqtt.password_file",
                ));
            }
            _ => {}
        }
        if m.session_expiry_s == 0 {
            return Err(ConfigError::invalid(
                "mqtt.session_expiry_s",
                "must be greater than 0 (0 would drop this instance's queue on every disconnect)",
            ));
        }
        match &m.tls {
            None if !is_loopback_host(&m.host) => Err(ConfigError::invalid(
                "mqtt.tls",
                format!(
                    "broker `{}` is not on loopback: configure [mqtt.tls]",
                    m.host
                ),
            )),
            Some(t) if t.cert_file.is_some() != t.key_file.is_some() => Err(ConfigError::invalid(
                "mqtt.tls.key_file",
                "cert_file and key_file go together",
            )),
            _ => Ok(()),
        }
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `[mqtt.tls]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsConfig {
    /// PEM CA certificate(s) to verify the broker; default: the public
    /// web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (mode 0600).
    pub key_file: Option<PathBuf>,
}

/// Errors setting up MQTT ingest (at hub start).
#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("{field} {path}: {message}")]
    File {
        field: &'static str,
        path: String,
        message: String,
    },
    #[error("MQTT TLS setup: {0}")]
    Tls(String),
}

fn file_err(
    field: &'static str,
    path: &std::path::Path,
    e: impl std::fmt::Display,
) -> MqttSetupError {
    MqttSetupError::File {
        field,
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Reads a secret file, refusing one that group or others may read.
fn read_private(field: &'static str, path: &std::path::Path) -> Result<Vec<u8>, MqttSetupError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| file_err(field, path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(file_err(
                field,
                path,
                "is accessible by group or others; chmod 600 it",
            ));
        }
    }
    std::fs::read(path).map_err(|e| file_err(field, path, e))
}

/// What the topic says about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub gateway_id: String,
    pub encoding: ContentCoding,
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `devices/{gateway_id}/messages/events/{property bag}`; the
/// property bag (`k=v&k=v`, URL-encoded) may be empty. `$.ce` must be
/// `identity` or `zstd` when present, `$.ct` `application/x-protobuf`.
pub fn parse_topic(topic: &str) -> Result<TopicInfo, DropReason> {
    let rest = topic.strip_prefix("devices/").ok_or(DropReason::BadTopic)?;
    let (gateway_id, rest) = rest.split_once('/').ok_or(DropReason::BadTopic)?;
    let bag = rest
        .strip_prefix("messages/events")
        .ok_or(DropReason::BadTopic)?;
    let bag = match bag.strip_prefix('/') {
        Some(b) => b,
        None if bag.is_empty() => "",
        None => return Err(DropReason::BadTopic),
    };
    if !crate::auth::is_valid_gateway_id(gateway_id) {
        return Err(DropReason::BadTopic);
    }
    let mut encoding = ContentCoding::Identity;
    for pair in bag.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (percent_decode(k), percent_decode(v)) else {
            return Err(DropReason::BadTopic);
        };
        match k.as_str() {
            "$.ce" => {
                encoding =
                    ContentCoding::parse(Some(&v)).map_err(|_| DropReason::UnsupportedEncoding)?;
            }
            "$.ct" => {
                let media = v.split(';').next().unwrap_or("").trim();
                if !media.eq_ignore_ascii_case(shared_protocol::CONTENT_TYPE_PROTOBUF) {
                    return Err(DropReason::UnsupportedEncoding);
                }
            }
            _ => {}
        }
    }
    Ok(TopicInfo {
        gateway_id: gateway_id.to_owned(),
        encoding,
    })
}

/// Decodes a message body (decompressed per `$.ce`, at most `max_bytes`
/// before and after) into a `Batch` of the topic's gateway.
pub fn decode_message(
    info: &TopicInfo,
    payload: bytes::Bytes,
    max_bytes: usize,
) -> Result<Batch, DropReason> {
    if payload.len() > max_bytes {
        return Err(DropReason::TooLarge);
    }
    let body = crate::encoding::decode(info.encoding, payload, max_bytes).map_err(|e| match e {
        DecodeError::TooLarge { .. } => DropReason::TooLarge,
        DecodeError::Unsupported(_) => DropReason::UnsupportedEncoding,
        DecodeError::Corrupt(_) => DropReason::Malformed,
    })?;
    let batch = Batch::decode(body).map_err(|_| DropReason::Malformed)?;
    if batch.gateway_id != info.gateway_id {
        return Err(DropReason::GatewayMismatch);
    }
    Ok(batch)
}

/// MQTT ingest prepared at hub start (options built, secrets read).
pub struct MqttIngest {
    options: MqttOptions,
    filter: String,
    host: String,
    publish_acks: bool,
}

impl std::fmt::Debug for MqttIngest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the options: they hold the password.
        f.debug_struct("MqttIngest")
            .field("host", &self.host)
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

/// rumqttc's TLS: the common client builder ([`vigil_io::tls`]), pinned
/// `mqtt.tls.ca_file` or the public roots, and the client certificate if
/// configured.
fn tls_config(t: &MqttTlsConfig) -> Result<rustls::ClientConfig, MqttSetupError> {
    let roots = tls::pinned_or_public_roots(
        t.ca_file
            .as_deref()
            .map(|p| PemFile::new("mqtt.tls.ca_file", p)),
    )?;
    let identity = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => Some(tls::Identity::load(
            PemFile::new("mqtt.tls.cert_file", cert),
            PemFile::new("mqtt.tls.key_file", key),
        )?),
        _ => None,
    };
    Ok(tls::client_config(roots, identity)?)
}

impl From<tls::TlsError> for MqttSetupError {
    fn from(e: tls::TlsError) -> Self {
        MqttSetupError::Tls(e.to_string())
    }
}

impl MqttIngest {
    /// Builds the connection options from validated config: reads the
    /// password file (0600) and the TLS material.
    pub fn prepare(m: &MqttConfig, max_body_bytes: usize) -> Result<Self, MqttSetupError> {
        let mut options = MqttOptions::new(&m.client_id, &m.host, m.port);
        options
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(m.session_expiry_s))
            .set_manual_acks(true)
            .set_receive_maximum(Some(RECEIVE_MAXIMUM))
            .set_max_packet_size(Some(
                u32::try_from(max_body_bytes.saturating_add(PACKET_OVERHEAD)).unwrap_or(u32::MAX),
            ));
        if let (Some(user), Some(path)) = (&m.username, &m.password_file) {
            let raw = read_private("mqtt.password_file", path)?;
            let pw = String::from_utf8(raw)
                .map_err(|_| file_err("mqtt.password_file", path, "is not UTF-8 text"))?;
            let pw = pw.trim_end_matches(['\r', '\n']);
            if pw.is_empty() {
                return Err(file_err("mqtt.password_file", path, "is empty"));
            }
            options.set_credentials(user, pw);
        }
        if let Some(t) = &m.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls_config(t)?),
            )));
        }
        Ok(Self {
            options,
            filter: format!("$share/{}/{}", m.group, m.topic_filter),
            host: m.host.clone(),
            publish_acks: m.publish_acks,
        })
    }
}

/// One received message, labelled with the connection it came on.
struct Delivery {
    connection: u64,
    publish: Publish,
}

/// Runs MQTT ingest until `shutdown` is cancelled:
/// connects, subscribes on every connection, and stores each message's
/// batch before acknowledging it. Returns after the acknowledgements of
/// stored messages have been handed to the connection and a DISCONNECT
/// was sent (best effort).
pub async fn run(ingest: MqttIngest, st: Pipeline, shutdown: CancellationToken) {
    let metrics = st.metrics().clone();
    let (client, mut events) = AsyncClient::new(ingest.options, 64);
    let connection = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::unbounded_channel::<Delivery>();
    let mut worker = tokio::spawn(worker(
        st,
        client.clone(),
        rx,
        connection.clone(),
        ingest.publish_acks,
        shutdown.clone(),
    ));
    let mut failures: u32 = 0;
    tracing::info!(host = %ingest.host, filter = %ingest.filter, "MQTT ingest starting");
    loop {
        tokio::select! {
            _ = &mut worker => break,
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    failures = 0;
                    let n = connection.fetch_add(1, Ordering::SeqCst) + 1;
                    metrics.mqtt.connects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        host = %ingest.host,
                        session_present = ack.session_present,
                        connection = n,
                        "MQTT connected"
                    );
                    // Subscribing again on a resumed session is harmless and
                    // covers a session the broker expired. Never wait here:
                    // only this loop drains the request queue.
                    if let Err(e) = client.try_subscribe(ingest.filter.clone(), QoS::AtLeastOnce) {
                        tracing::error!(error = %e, "MQTT subscribe request failed");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused: Vec<_> = ack
                        .return_codes
                        .iter()
                        .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                        .collect();
                    if refused.is_empty() {
                        metrics.mqtt.connected.store(1, Ordering::Relaxed);
                        tracing::info!(filter = %ingest.filter, "MQTT subscribed");
                    } else {
                        metrics.mqtt.connection_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            filter = %ingest.filter,
                            reasons = ?refused,
                            "MQTT broker refused the subscription (ACL? shared subscriptions?)"
                        );
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let connection = connection.load(Ordering::SeqCst);
                    // The worker only ends on shutdown; then nothing more is needed.
                    let _ = tx.send(Delivery { connection, publish });
                }
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    metrics.mqtt.connected.store(0, Ordering::Relaxed);
                    tracing::warn!(reason = ?d.reason_code, "MQTT broker disconnected the hub");
                }
                Ok(_) => {}
                Err(e) => {
                    metrics.mqtt.connected.store(0, Ordering::Relaxed);
                    metrics.mqtt.connection_errors.fetch_add(1, Ordering::Relaxed);
                    let delay = backoff(failures);
                    failures = failures.saturating_add(1);
                    match &e {
                        ConnectionError::ConnectionRefused(code) => tracing::error!(
                            host = %ingest.host, code = ?code, retry_in_ms = delay.as_millis() as u64,
                            "MQTT connection refused"
                        ),
                        _ => tracing::warn!(
                            host = %ingest.host, error = %e, retry_in_ms = delay.as_millis() as u64,
                            "MQTT connection failed"
                        ),
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
            }
        }
    }
    // The worker has handed its last acknowledgements to the client; send
    // them and a DISCONNECT (the session stays on the broker).
    // (try_: nothing else drains the request queue; the acks queued before
    // it go out while polling below either way.)
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    metrics.mqtt.connected.store(0, Ordering::Relaxed);
    tracing::info!("MQTT ingest stopped");
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << failures.min(6))).min(MAX_BACKOFF)
}

/// Stores messages one at a time, in arrival order, acknowledging each
/// after its batch is stored (MQTT wants PUBACKs in order).
async fn worker(
    st: Pipeline,
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<Delivery>,
    connection: Arc<AtomicU64>,
    publish_acks: bool,
    shutdown: CancellationToken,
) {
    loop {
        let d = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            d = rx.recv() => match d {
                Some(d) => d,
                None => return,
            },
        };
        let stored = match handle(&st, &d.publish, &shutdown).await {
            Handled::Stored(gateway, ack) => Some((gateway, ack)),
            Handled::Dropped => None,
            Handled::Shutdown => return,
        };
        // The application-level acknowledgement, before the PUBACK: an
        // agent waiting for it deletes the batch only now, whatever the
        // broker did with its message.
        if let Some((gateway, ack)) = stored
            && publish_acks
        {
            match client
                .publish(
                    ack_topic(&gateway),
                    QoS::AtLeastOnce,
                    false,
                    ack.encode_to_vec(),
                )
                .await
            {
                Ok(()) => {
                    st.metrics()
                        .mqtt
                        .acks_published
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(gateway_id = %gateway, error = %e, "batch acknowledgement not queued")
                }
            }
        }
        // A message received on an earlier connection is stored (harmless:
        // de-duplicated) but not acknowledged: the broker re-delivers it on
        // the resumed session under a packet id that the new copy acks.
        // Known narrow window: if the connection drops between this check
        // and the PUBACK leaving, the PUBACK goes out on the new connection
        // (same packet id, same message: correct) and the re-delivered copy
        // is acked again later; should the broker have reused that id by
        // then, another stored-or-queued message is acked early and would be
        // lost only if this hub also crashed before storing it.
        if d.connection == connection.load(Ordering::SeqCst)
            && let Err(e) = client.ack(&d.publish).await
        {
            tracing::warn!(error = %e, "MQTT acknowledgement not queued");
        }
    }
}

/// What became of one message.
enum Handled {
    /// Stored (or a duplicate of a stored batch): the gateway and the ack.
    Stored(String, shared_protocol::v1::BatchAck),
    /// Unusable: dropped (counted, logged); acknowledged to the broker.
    Dropped,
    /// Shutdown before it could be stored: not acknowledged.
    Shutdown,
}

/// Handles one message: stores its batch (retrying store failures with
/// backoff) or drops it.
async fn handle(st: &Pipeline, p: &Publish, shutdown: &CancellationToken) -> Handled {
    let metrics = st.metrics();
    let topic = String::from_utf8_lossy(&p.topic);
    let dropped = |reason: DropReason, gateway_id: Option<&str>| {
        metrics.mqtt.drop_message(reason);
        tracing::warn!(
            gateway_id = gateway_id.unwrap_or("-"),
            reason = reason.as_str(),
            bytes = p.payload.len(),
            "MQTT message dropped"
        );
        Handled::Dropped
    };
    let info = match parse_topic(&topic) {
        Ok(i) => i,
        Err(r) => return dropped(r, None),
    };
    let batch = match decode_message(&info, p.payload.clone(), st.max_body_bytes()) {
        Ok(b) => b,
        Err(r) => return dropped(r, Some(&info.gateway_id)),
    };
    // A sequence or incarnation above 2^63-1 cannot be stored: dropped as
    // malformed (never retried, never wrapped).
    if let Err(e) = crate::ingest::check_batch(&batch) {
        tracing::warn!(gateway_id = %info.gateway_id, field = e.field, "MQTT batch refused: {e}");
        return dropped(DropReason::Malformed, Some(&info.gateway_id));
    }
    let mut failures = 0u32;
    loop {
        let store = st.store().clone();
        let id = info.gateway_id.clone();
        let active = match tokio::task::spawn_blocking(move || store.gateway_is_active(&id)).await {
            Ok(r) => r.map_err(crate::TransportError::from),
            Err(e) => Err(e.into()),
        };
        let res = match active {
            Ok(false) => return dropped(DropReason::UnknownGateway, Some(&info.gateway_id)),
            Ok(true) => st.store_batch(&info.gateway_id, batch.clone()).await,
            Err(e) => Err(e),
        };
        match res {
            Ok(ack) => {
                metrics.mqtt.stored.fetch_add(1, Ordering::Relaxed);
                return Handled::Stored(info.gateway_id.clone(), ack);
            }
            Err(e) => {
                metrics.mqtt.store_errors.fetch_add(1, Ordering::Relaxed);
                let delay = backoff(failures);
                failures = failures.saturating_add(1);
                tracing::error!(
                    gateway_id = %info.gateway_id,
                    batch_sequence = batch.sequence,
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "storing an MQTT batch failed; not acknowledged, retrying"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Handled::Shutdown,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_of_the_agent_parse() {
        let t =
            parse_topic("devices/gw-1/messages/events/$.ct=application%2Fx-protobuf&$.ce=identity")
                .unwrap();
        assert_eq!(t.gateway_id, "gw-1");
        assert_eq!(t.encoding, ContentCoding::Identity);
        assert_eq!(
            parse_topic("devices/gw-1/messages/events/$.ce=zstd")
                .unwrap()
                .encoding,
            ContentCoding::Zstd
        );
        assert_eq!(
            parse_topic("devices/gw-1/messages/events")
                .unwrap()
                .encoding,
            ContentCoding::Identity
        );
        assert_eq!(
            parse_topic("devices/gw-1/messages/events/")
                .unwrap()
                .gateway_id,
            "gw-1"
        );
    }

    #[test]
    fn bad_topics_and_encodings_are_refused() {
        for t in [
            "devices/gw-1/messages/eventsX",
            "devices/gw 1/messages/events/",
            "devices//messages/events/",
            "other/gw-1/messages/events/",
            "devices/gw-1/messages/events/$.ce=%zz",
        ] {
            assert_eq!(parse_topic(t), Err(DropReason::BadTopic), "{t}");
        }
        for t in [
            "devices/gw-1/messages/events/$.ce=gzip",
            "devices/gw-1/messages/events/$.ct=application%2Fjson",
        ] {
            assert_eq!(parse_topic(t), Err(DropReason::UnsupportedEncoding), "{t}");
        }
    }

    #[test]
    fn payload_checks() {
        let info = parse_topic("devices/gw-1/messages/events/").unwrap();
        let good = Batch {
            gateway_id: "gw-1".into(),
            sequence: 3,
            ..Default::default()
        }
        .encode_to_vec();
        let good = bytes::Bytes::from(good);
        assert_eq!(
            decode_message(&info, good.clone(), 1024).unwrap().sequence,
            3
        );
        assert_eq!(
            decode_message(&info, good.clone(), 2).unwrap_err(),
            DropReason::TooLarge
        );
        assert_eq!(
            decode_message(&info, bytes::Bytes::from_static(&[0xff, 0xff, 0xff]), 1024)
                .unwrap_err(),
            DropReason::Malformed
        );
        let other = Batch {
            gateway_id: "gw-2".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            decode_message(&info, other.into(), 1024).unwrap_err(),
            DropReason::GatewayMismatch
        );
        let zstd = TopicInfo {
            encoding: ContentCoding::Zstd,
            ..info
        };
        let packed = bytes::Bytes::from(zstd::encode_all(&good[..], 3).unwrap());
        assert_eq!(decode_message(&zstd, packed, 1024).unwrap().sequence, 3);
        // Not zstd: malformed. Expanding beyond the limit: too large.
        assert_eq!(
            decode_message(&zstd, good.clone(), 1024).unwrap_err(),
            DropReason::Malformed
        );
        let bomb = bytes::Bytes::from(zstd::encode_all(&vec![0u8; 1 << 20][..], 3).unwrap());
        assert!(bomb.len() < 1024);
        assert_eq!(
            decode_message(&zstd, bomb, 1024).unwrap_err(),
            DropReason::TooLarge
        );
    }

    #[test]
    fn metrics_render_every_family() {
        let m = MqttMetrics::default();
        m.drop_message(DropReason::UnknownGateway);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("vigil_hub_mqtt_messages_dropped_total{reason=\"unknown_gateway\"} 1")
        );
        assert!(out.contains("# TYPE vigil_hub_mqtt_connected gauge"));
        assert!(out.contains("vigil_hub_mqtt_batches_stored_total 0"));
    }
}
