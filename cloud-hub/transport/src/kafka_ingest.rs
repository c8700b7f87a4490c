//! Kafka / Event Hubs ingest (`[kafka]`): the hub consumes the protobuf
//! `Batch`es that Azure IoT Hub message routing writes to an Event Hubs
//! namespace's Kafka endpoint (TLS, SASL PLAIN with user
//! `$ConnectionString` and the connection string as password), or that any
//! Kafka-protocol broker holds. Client: `rskafka` (pure Rust, rustls).
//!
//! - **Gateway identity.** IoT Hub adds `iothub-connection-device-id` to
//!   each routed message (AMQP-encoded, see `hub_domain::stream::headers`):
//!   the device the message came from over its own authenticated
//!   connection. It must be present, registered and not revoked, and equal
//!   `Batch.gateway_id`; `content-type` must be protobuf when present and
//!   `content-encoding` `identity` or `zstd` (the MQTT path's rules).
//!   Otherwise the record is counted by reason, logged and skipped. **The
//!   broker's ACL is what keeps anyone but the routing from producing to
//!   the topic**: a producer that may write there can claim any device id.
//! - **Exactly-once effect.** A partition's next offset is written in the
//!   same store transaction as the batch read before it
//!   (`StreamStore::ingest_at`); a consumer starts at the committed offset.
//!   A crash re-reads at most the records not yet committed; the store's
//!   de-duplication by batch and reading identity makes re-reads harmless.
//! - **Partitions across replicas.** Each replica heartbeats in the store
//!   and holds partition leases (owner + expiry, taken and renewed with one
//!   conditional write); every `lease_ms / 3` it applies
//!   `hub_domain::stream::lease::plan` (an even share of the partitions per
//!   live replica). A replica that dies stops renewing: its leases expire
//!   and the others take its partitions from their committed offsets.
//! - **Backpressure.** Per partition, the fetcher hands records to the
//!   storer through a bounded queue (`max_in_flight`); lag per partition
//!   (high watermark − committed offset) is a metric.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hub_domain::stream::headers::{self, RoutingProperties};
use hub_domain::stream::lease;
use hub_storage::StreamPosition;
use rskafka::client::partition::{OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use serde::Deserialize;
use shared_protocol::v1::Batch;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vigil_io::tls::{self, PemFile};

use crate::config_error::ConfigError;
use crate::encoding::ContentCoding;
use crate::metrics::DropReason;
use crate::mqtt_ingest::{TopicInfo, decode_message};
use crate::pipeline::{Pipeline, blocking};

/// SASL PLAIN user name of an Event Hubs connection string.
pub const EVENT_HUBS_USER: &str = "$ConnectionString";
/// Default lease time of a partition.
pub const DEFAULT_LEASE_MS: u64 = 30_000;
/// Default bound of records fetched but not yet stored, per partition.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Default longest wait of one fetch for new records.
pub const DEFAULT_MAX_WAIT_MS: u32 = 500;
/// Environment variable overriding `kafka.replica_id`.
pub const ENV_KAFKA_REPLICA_ID: &str = "VIGIL_HUB_KAFKA_REPLICA_ID";
/// Longest wait between reconnection attempts and store retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where to start a partition that has no committed offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    /// The oldest record the broker still keeps.
    #[default]
    Earliest,
    /// Only records produced from now on.
    Latest,
}

/// `[kafka]`: consume agent batches from a Kafka topic (an Event Hub of an
/// Event Hubs namespace, or any Kafka-protocol broker).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` (Event Hubs: `{namespace}.servicebus.windows.net:9093`).
    pub brokers: Vec<String>,
    /// The topic (the Event Hub's name).
    pub topic: String,
    /// This replica's id: unique among the hub replicas sharing the
    /// topic. Env `VIGIL_HUB_KAFKA_REPLICA_ID` overrides.
    pub replica_id: String,
    /// TLS to the brokers; default on unless every broker is on loopback.
    pub tls: Option<bool>,
    /// PEM CA certificate(s) to verify the brokers; default: public roots.
    pub ca_file: Option<PathBuf>,
    /// File (mode 0600) holding the SASL PLAIN password: for Event Hubs,
    /// the namespace's connection string (user `$ConnectionString`).
    pub connection_string_file: Option<PathBuf>,
    /// Environment variable holding the same (instead of the file).
    pub connection_string_env: Option<String>,
    /// SASL PLAIN user name (default `$ConnectionString`).
    #[serde(default = "default_sasl_username")]
    pub sasl_username: String,
    /// Partition lease time; renewed every third of it. A dead replica's
    /// partitions are taken over after at most this long.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Records fetched but not yet stored, per partition.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Longest wait of one fetch for new records.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u32,
    /// Where a partition without a committed offset starts.
    #[serde(default)]
    pub start_at: StartAt,
}

fn default_sasl_username() -> String {
    EVENT_HUBS_USER.into()
}
fn default_lease_ms() -> u64 {
    DEFAULT_LEASE_MS
}
fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT
}
fn default_max_wait_ms() -> u32 {
    DEFAULT_MAX_WAIT_MS
}

fn broker_host(b: &str) -> Option<&str> {
    let (host, port) = b.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|p| *p != 0)?;
    (!host.is_empty()).then_some(host)
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl KafkaConfig {
    /// Whether TLS is used: as configured, else unless every broker is on loopback.
    pub fn uses_tls(&self) -> bool {
        self.tls.unwrap_or_else(|| {
            !self
                .brokers
                .iter()
                .all(|b| broker_host(b).is_some_and(is_loopback_host))
        })
    }

    /// The source name offsets and leases are kept under.
    pub fn source(&self) -> String {
        format!("kafka:{}", self.topic)
    }

    /// Checks the values, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.is_empty() {
            return Err(ConfigError::invalid("kafka.brokers", "must not be empty"));
        }
        if let Some(b) = self.brokers.iter().find(|b| broker_host(b).is_none()) {
            return Err(ConfigError::invalid(
                "kafka.brokers",
                format!("`{b}` is not host:port"),
            ));
        }
        // Kafka topic names: 1-249 of [A-Za-z0-9._-].
        let t = &self.topic;
        if t.is_empty()
            || t.len() > 249
            || !t
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        {
            return Err(ConfigError::invalid(
                "kafka.topic",
                "must be 1-249 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        if self.replica_id.is_empty() || self.replica_id.len() > 128 {
            return Err(ConfigError::invalid(
                "kafka.replica_id",
                "must be 1-128 characters, unique per hub replica",
            ));
        }
        if self.connection_string_file.is_some() && self.connection_string_env.is_some() {
            return Err(ConfigError::invalid(
                "kafka.connection_string_env",
                "give connection_string_file or connection_string_env, not both",
            ));
        }
        if self.connection_string_env.as_deref() == Some("") {
            return Err(ConfigError::invalid(
                "kafka.connection_string_env",
                "must name an environment variable",
            ));
        }
        if self.sasl_username.is_empty() {
            return Err(ConfigError::invalid(
                "kafka.sasl_username",
                "must not be empty",
            ));
        }
        let off_loopback = self
            .brokers
            .iter()
            .find(|b| !broker_host(b).is_some_and(is_loopback_host));
        if let (false, Some(b)) = (self.uses_tls(), off_loopback) {
            return Err(ConfigError::invalid(
                "kafka.tls",
                format!("broker `{b}` is not on loopback: TLS cannot be off"),
            ));
        }
        if !(1_000..=600_000).contains(&self.lease_ms) {
            return Err(ConfigError::invalid(
                "kafka.lease_ms",
                "must be 1000-600000 (ms)",
            ));
        }
        if !(1..=10_000).contains(&self.max_in_flight) {
            return Err(ConfigError::invalid(
                "kafka.max_in_flight",
                "must be 1-10000",
            ));
        }
        if !(1..=60_000).contains(&self.max_wait_ms) {
            return Err(ConfigError::invalid(
                "kafka.max_wait_ms",
                "must be 1-60000 (ms)",
            ));
        }
        Ok(())
    }
}

/// Errors setting up Kafka ingest (at hub start).
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("{field} {path}: {message}")]
    File {
        field: &'static str,
        path: String,
        message: String,
    },
    #[error("kafka.connection_string_env: {0}")]
    Env(String),
    #[error("Kafka TLS setup: {0}")]
    Tls(String),
}

impl From<tls::TlsError> for KafkaSetupError {
    fn from(e: tls::TlsError) -> Self {
        KafkaSetupError::Tls(e.to_string())
    }
}

fn file_err(field: &'static str, path: &Path, e: impl std::fmt::Display) -> KafkaSetupError {
    KafkaSetupError::File {
        field,
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Reads a secret file, refusing one that group or others may read.
fn read_private(field: &'static str, path: &Path) -> Result<String, KafkaSetupError> {
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
    let raw = std::fs::read(path).map_err(|e| file_err(field, path, e))?;
    String::from_utf8(raw).map_err(|_| file_err(field, path, "is not UTF-8 text"))
}

/// SASL PLAIN credentials (user, password) from the configured file or
/// environment variable; `None` without either. `env` looks a variable up
/// (`std::env::var` in the hub; a map in tests).
pub fn sasl_credentials(
    c: &KafkaConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<(String, String)>, KafkaSetupError> {
    let secret = match (&c.connection_string_file, &c.connection_string_env) {
        (Some(path), _) => {
            let s = read_private("kafka.connection_string_file", path)?;
            let s = s.trim().to_owned();
            if s.is_empty() {
                return Err(file_err("kafka.connection_string_file", path, "is empty"));
            }
            s
        }
        (None, Some(var)) => match env(var).map(|s| s.trim().to_owned()) {
            Some(s) if !s.is_empty() => s,
            _ => return Err(KafkaSetupError::Env(format!("`{var}` is not set or empty"))),
        },
        (None, None) => return Ok(None),
    };
    Ok(Some((c.sasl_username.clone(), secret)))
}

/// The rustls client configuration of `c` (`None` when TLS is off).
pub fn tls_config(c: &KafkaConfig) -> Result<Option<Arc<rustls::ClientConfig>>, KafkaSetupError> {
    if !c.uses_tls() {
        return Ok(None);
    }
    let roots = tls::pinned_or_public_roots(
        c.ca_file
            .as_deref()
            .map(|p| PemFile::new("kafka.ca_file", p)),
    )?;
    Ok(Some(Arc::new(tls::client_config(roots, None)?)))
}

/// Kafka ingest prepared at hub start (secrets read, TLS built).
pub struct KafkaIngest {
    config: KafkaConfig,
    credentials: Option<(String, String)>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for KafkaIngest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("KafkaIngest")
            .field("brokers", &self.config.brokers)
            .field("topic", &self.config.topic)
            .field("replica_id", &self.config.replica_id)
            .field("tls", &self.tls.is_some())
            .field("sasl", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

impl KafkaIngest {
    /// Reads the connection string (file 0600 or environment) and builds TLS.
    pub fn prepare(c: &KafkaConfig) -> Result<Self, KafkaSetupError> {
        Ok(Self {
            credentials: sasl_credentials(c, |v| std::env::var(v).ok())?,
            tls: tls_config(c)?,
            config: c.clone(),
        })
    }

    /// Whether TLS and SASL PLAIN are configured (for logs and tests).
    pub fn security(&self) -> (bool, bool) {
        (self.tls.is_some(), self.credentials.is_some())
    }

    fn builder(&self) -> ClientBuilder {
        let mut b = ClientBuilder::new(self.config.brokers.clone());
        if let Some(t) = &self.tls {
            b = b.tls_config(t.clone());
        }
        if let Some((user, pass)) = &self.credentials {
            b = b.sasl_config(SaslConfig::Plain(Credentials::new(
                user.clone(),
                pass.clone(),
            )));
        }
        b
    }
}

/// Why a record was skipped (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaDropReason {
    /// A header the hub reads is badly encoded, of the wrong type or repeated.
    BadHeaders = 0,
    /// No (valid) `iothub-connection-device-id` header.
    MissingDeviceId = 1,
    /// `content-type` not protobuf or `content-encoding` not identity/zstd.
    UnsupportedEncoding = 2,
    /// Larger than `server.max_body_bytes` (before or after decompression).
    TooLarge = 3,
    /// The body is not a protobuf `vigil.v1.Batch` (or has no body).
    Malformed = 4,
    /// `Batch.gateway_id` differs from the device id header.
    GatewayMismatch = 5,
    /// The device is not a registered, active gateway.
    UnknownGateway = 6,
}

const KAFKA_DROP_REASONS: [&str; 7] = [
    "bad_headers",
    "missing_device_id",
    "unsupported_encoding",
    "too_large",
    "malformed",
    "gateway_mismatch",
    "unknown_gateway",
];

impl KafkaDropReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        KAFKA_DROP_REASONS[self as usize]
    }
}

/// Kafka ingest counters and per-partition state (rendered into `/metrics`).
#[derive(Debug, Default)]
pub struct KafkaMetrics {
    consumed: AtomicU64,
    stored: AtomicU64,
    dropped: [AtomicU64; 7],
    store_errors: AtomicU64,
    connection_errors: AtomicU64,
    /// partition → (high watermark, committed next offset).
    partitions: Mutex<BTreeMap<i32, (i64, i64)>>,
}

impl KafkaMetrics {
    /// Records read from the broker.
    pub fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }
    /// Records whose batch was stored (new or duplicate).
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }
    /// Records skipped for `reason`.
    pub fn dropped(&self, reason: KafkaDropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }
    /// Partitions this replica consumes, ascending.
    pub fn owned_partitions(&self) -> Vec<i32> {
        self.partitions
            .lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }
    fn drop_record(&self, reason: KafkaDropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
    fn set_partition(&self, p: i32, high_watermark: Option<i64>, committed: Option<i64>) {
        if let Ok(mut m) = self.partitions.lock() {
            let e = m.entry(p).or_insert((0, 0));
            if let Some(h) = high_watermark {
                e.0 = h;
            }
            if let Some(c) = committed {
                e.1 = c;
            }
        }
    }
    fn forget_partition(&self, p: i32) {
        if let Ok(mut m) = self.partitions.lock() {
            m.remove(&p);
        }
    }

    pub(crate) fn render(&self, out: &mut String) {
        let mut counter = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        counter(
            "vigil_hub_kafka_records_consumed_total",
            "Kafka records read from the broker.",
            &self.consumed,
        );
        counter(
            "vigil_hub_kafka_batches_stored_total",
            "Kafka records whose batch was stored (new or duplicate) with its offset.",
            &self.stored,
        );
        counter(
            "vigil_hub_kafka_store_errors_total",
            "Failed attempts to store a Kafka batch or offset (retried).",
            &self.store_errors,
        );
        counter(
            "vigil_hub_kafka_connection_errors_total",
            "Kafka connection and fetch failures (retried).",
            &self.connection_errors,
        );
        let name = "vigil_hub_kafka_records_dropped_total";
        let _ = writeln!(
            out,
            "# HELP {name} Kafka records skipped (offset committed, nothing stored), by reason."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for (n, v) in KAFKA_DROP_REASONS.iter().zip(&self.dropped) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{n}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let name = "vigil_hub_kafka_partition_lag";
        let _ = writeln!(
            out,
            "# HELP {name} Records of a partition this replica consumes not yet stored (high watermark - committed offset)."
        );
        let _ = writeln!(out, "# TYPE {name} gauge");
        if let Ok(m) = self.partitions.lock() {
            for (p, (high, committed)) in m.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{partition=\"{p}\"}} {}",
                    (high - committed).max(0)
                );
            }
        }
    }
}

/// Decodes one record: routing headers, then the body as the device id's
/// batch (content coding per `content-encoding`, at most `max_bytes`).
pub fn decode_record<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    value: Option<&[u8]>,
    max_bytes: usize,
) -> Result<(String, Batch), KafkaDropReason> {
    let RoutingProperties {
        device_id,
        content_type,
        content_encoding,
        ..
    } = headers::routing_properties(headers).map_err(|_| KafkaDropReason::BadHeaders)?;
    let gateway_id = device_id
        .filter(|d| crate::auth::is_valid_gateway_id(d))
        .ok_or(KafkaDropReason::MissingDeviceId)?;
    if let Some(ct) = &content_type {
        let media = ct.split(';').next().unwrap_or("").trim();
        if !media.eq_ignore_ascii_case(shared_protocol::CONTENT_TYPE_PROTOBUF) {
            return Err(KafkaDropReason::UnsupportedEncoding);
        }
    }
    let encoding = ContentCoding::parse(content_encoding.as_deref())
        .map_err(|_| KafkaDropReason::UnsupportedEncoding)?;
    let value = value.ok_or(KafkaDropReason::Malformed)?;
    let info = TopicInfo {
        gateway_id,
        encoding,
    };
    let batch = decode_message(&info, bytes::Bytes::copy_from_slice(value), max_bytes).map_err(
        |r| match r {
            DropReason::TooLarge => KafkaDropReason::TooLarge,
            DropReason::UnsupportedEncoding => KafkaDropReason::UnsupportedEncoding,
            DropReason::GatewayMismatch => KafkaDropReason::GatewayMismatch,
            DropReason::UnknownGateway => KafkaDropReason::UnknownGateway,
            DropReason::BadTopic | DropReason::Malformed => KafkaDropReason::Malformed,
        },
    )?;
    Ok((info.gateway_id, batch))
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << failures.min(8))).min(MAX_BACKOFF)
}

fn now_ms() -> i64 {
    hub_domain::clock::now_us() / 1_000
}

/// Sleeps `d` unless `token` is cancelled first; false when cancelled.
async fn pause(d: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = token.cancelled() => false,
    }
}

/// What one partition's consumer needs.
#[derive(Clone)]
struct PartitionCtx {
    client: Arc<Client>,
    topic: String,
    source: String,
    partition: i32,
    st: Pipeline,
    max_in_flight: usize,
    max_wait_ms: i32,
    start_at: StartAt,
}

/// A record handed from the fetcher to the storer.
struct Fetched {
    offset: i64,
    record: rskafka::record::Record,
}

/// One partition consumed by this replica.
struct Owned {
    token: CancellationToken,
    task: JoinHandle<()>,
    /// Until when the last successful claim or renewal holds it (ms).
    held_until: i64,
}

/// Runs Kafka ingest until `shutdown` is cancelled: connects, keeps this
/// replica's heartbeat and leases, and consumes the partitions it holds.
/// On shutdown the consumers stop after their current record and the
/// leases are released, so other replicas take over at once.
pub async fn run(ingest: KafkaIngest, st: Pipeline, shutdown: CancellationToken) {
    let metrics = st.metrics().clone();
    let c = &ingest.config;
    let source = c.source();
    let me = c.replica_id.clone();
    let lease_ms = i64::try_from(c.lease_ms).unwrap_or(i64::MAX);
    let renew_every = Duration::from_millis(c.lease_ms / 3);
    tracing::info!(brokers = ?c.brokers, topic = %c.topic, replica = %me,
        tls = ingest.tls.is_some(), sasl = ingest.credentials.is_some(), "Kafka ingest starting");
    let mut failures = 0u32;
    let client = loop {
        match ingest.builder().build().await {
            Ok(client) => break Arc::new(client),
            Err(e) => {
                metrics
                    .kafka
                    .connection_errors
                    .fetch_add(1, Ordering::Relaxed);
                let delay = backoff(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "Kafka connection failed");
                if !pause(delay, &shutdown).await {
                    tracing::info!("Kafka ingest stopped");
                    return;
                }
            }
        }
    };
    tracing::info!(topic = %c.topic, "Kafka connected");
    let mut owned: HashMap<i32, Owned> = HashMap::new();
    let mut tick = tokio::time::interval(renew_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        // A consumer that ended on its own (it never should) is restarted
        // while its lease holds.
        let ended: Vec<i32> = owned
            .iter()
            .filter(|(_, o)| o.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            owned.remove(&p);
            metrics.kafka.forget_partition(p);
        }
        // Bounded: leases must be renewed in time even while the broker
        // does not answer (the round then only renews what is held).
        let partitions = match tokio::time::timeout(renew_every, client.list_topics()).await {
            Ok(Ok(topics)) => {
                let found = topics
                    .into_iter()
                    .find(|t| t.name == c.topic)
                    .map(|t| t.partitions.into_iter().collect::<Vec<i32>>());
                if found.is_none() {
                    tracing::warn!(topic = %c.topic, "Kafka topic not found on the broker");
                }
                found
            }
            Ok(Err(e)) => {
                metrics
                    .kafka
                    .connection_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "Kafka metadata request failed");
                None
            }
            Err(_) => {
                metrics
                    .kafka
                    .connection_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("Kafka metadata request timed out");
                None
            }
        };
        let now = now_ms();
        let round = lease_round(&st, &source, &me, partitions.as_deref(), now, lease_ms).await;
        let (plan, claimed) = match round {
            Ok(r) => r,
            Err(e) => {
                metrics.kafka.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "Kafka lease round failed");
                // Stop what might expire before the next round.
                let margin = i64::try_from(renew_every.as_millis()).unwrap_or(i64::MAX);
                let expiring: Vec<i32> = owned
                    .iter()
                    .filter(|(_, o)| o.held_until - margin <= now)
                    .map(|(p, _)| *p)
                    .collect();
                for p in expiring {
                    stop(&mut owned, p, &metrics).await;
                }
                continue;
            }
        };
        for p in &plan.release {
            stop(&mut owned, *p, &metrics).await;
            let (store, src, id, p) = (st.store().clone(), source.clone(), me.clone(), *p);
            if let Err(e) = blocking(move || store.release_lease(&src, p, &id)).await {
                tracing::warn!(partition = p, error = %e, "releasing a Kafka lease failed");
            } else {
                tracing::info!(
                    partition = p,
                    "Kafka partition released for another replica"
                );
            }
        }
        // Held locally but neither renewed nor newly claimed: lost.
        let lost: Vec<i32> = owned
            .keys()
            .copied()
            .filter(|p| !claimed.contains(p))
            .collect();
        for p in lost {
            tracing::warn!(
                partition = p,
                "Kafka partition lease lost; stopping its consumer"
            );
            stop(&mut owned, p, &metrics).await;
        }
        for p in claimed {
            if let Some(o) = owned.get_mut(&p) {
                o.held_until = now + lease_ms;
                continue;
            }
            let Some(parent) = partitions.as_ref() else {
                continue;
            };
            if !parent.contains(&p) {
                continue;
            }
            tracing::info!(partition = p, replica = %me, "Kafka partition taken");
            let token = shutdown.child_token();
            let ctx = PartitionCtx {
                client: client.clone(),
                topic: c.topic.clone(),
                source: source.clone(),
                partition: p,
                st: st.clone(),
                max_in_flight: c.max_in_flight,
                max_wait_ms: i32::try_from(c.max_wait_ms).unwrap_or(i32::MAX),
                start_at: c.start_at,
            };
            metrics.kafka.set_partition(p, None, None);
            owned.insert(
                p,
                Owned {
                    task: tokio::spawn(consume(ctx, token.clone())),
                    token,
                    held_until: now + lease_ms,
                },
            );
        }
    }
    // Shutdown: stop the consumers, then hand the partitions back.
    let parts: Vec<i32> = owned.keys().copied().collect();
    for p in parts {
        stop(&mut owned, p, &metrics).await;
        let (store, src, id) = (st.store().clone(), source.clone(), me.clone());
        let _ = blocking(move || store.release_lease(&src, p, &id)).await;
    }
    let (store, src, id) = (st.store().clone(), source.clone(), me.clone());
    let now = now_ms();
    let _ = blocking(move || store.replica_heartbeat(&src, &id, now, now)).await;
    tracing::info!("Kafka ingest stopped");
}

/// One lease round in the store: heartbeat, read leases and live
/// replicas, plan, and claim/renew. Returns the plan and the partitions
/// this replica holds after it (renewed or newly claimed).
async fn lease_round(
    st: &Pipeline,
    source: &str,
    me: &str,
    partitions: Option<&[i32]>,
    now: i64,
    lease_ms: i64,
) -> Result<(lease::LeasePlan, Vec<i32>), crate::TransportError> {
    let (store, src, id) = (st.store().clone(), source.to_owned(), me.to_owned());
    let partitions = partitions.map(<[i32]>::to_vec);
    blocking(move || {
        store.replica_heartbeat(&src, &id, now, now + lease_ms)?;
        let live = store.live_replicas(&src, now)?;
        let leases = store.leases(&src)?;
        // Without fresh metadata the partition count is unknown, so no
        // quota can be computed: keep what is held (renew only), claim and
        // release nothing.
        let plan = match partitions {
            Some(parts) => lease::plan(&parts, &leases, &id, &live, now),
            None => lease::LeasePlan {
                claim: Vec::new(),
                renew: leases
                    .iter()
                    .filter(|l| l.owner == id)
                    .map(|l| l.partition)
                    .collect(),
                release: Vec::new(),
            },
        };
        let mut held = Vec::new();
        for p in plan.renew.iter().chain(&plan.claim) {
            if store.claim_lease(&src, *p, &id, now, now + lease_ms)? {
                held.push(*p);
            }
        }
        Ok::<_, hub_storage::StoreError>((plan, held))
    })
    .await
}

async fn stop(owned: &mut HashMap<i32, Owned>, p: i32, metrics: &crate::SharedMetrics) {
    if let Some(o) = owned.remove(&p) {
        o.token.cancel();
        let _ = o.task.await;
        metrics.kafka.forget_partition(p);
    }
}

/// Consumes one partition until `token` is cancelled: a fetcher feeding a
/// bounded queue, and the storer (this task) draining it in order.
async fn consume(ctx: PartitionCtx, token: CancellationToken) {
    let metrics = ctx.st.metrics().clone();
    let p = ctx.partition;
    let mut failures = 0u32;
    let pc = loop {
        let pc = tokio::select! {
            () = token.cancelled() => return,
            pc = ctx
                .client
                .partition_client(ctx.topic.clone(), p, UnknownTopicHandling::Retry) => pc,
        };
        match pc {
            Ok(pc) => break Arc::new(pc),
            Err(e) => {
                metrics
                    .kafka
                    .connection_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition = p, error = %e, "Kafka partition client failed");
                let d = backoff(failures);
                failures = failures.saturating_add(1);
                if !pause(d, &token).await {
                    return;
                }
            }
        }
    };
    // Where to start: the committed offset, else the configured end.
    let start = loop {
        let (store, src) = (ctx.st.store().clone(), ctx.source.clone());
        match blocking(move || store.committed_offsets(&src)).await {
            Ok(offsets) => match offsets.iter().find(|(q, _)| *q == p) {
                Some((_, o)) => break *o,
                None => match tokio::select! {
                    () = token.cancelled() => return,
                    o = start_offset(&pc, ctx.start_at) => o,
                } {
                    Ok(o) => break o,
                    Err(e) => {
                        metrics
                            .kafka
                            .connection_errors
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(partition = p, error = %e, "Kafka offset request failed");
                    }
                },
            },
            Err(e) => {
                metrics.kafka.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(partition = p, error = %e, "reading committed offsets failed");
            }
        }
        let d = backoff(failures);
        failures = failures.saturating_add(1);
        if !pause(d, &token).await {
            return;
        }
    };
    metrics.kafka.set_partition(p, None, Some(start));
    tracing::info!(
        partition = p,
        offset = start,
        "Kafka partition consumer starting"
    );
    let (tx, mut rx) = mpsc::channel::<Fetched>(ctx.max_in_flight);
    let fetch_token = token.child_token();
    let fetcher = tokio::spawn(fetch(ctx.clone(), pc, start, tx, fetch_token.clone()));
    loop {
        let f = tokio::select! {
            biased;
            () = token.cancelled() => break,
            f = rx.recv() => match f {
                Some(f) => f,
                None => break,
            },
        };
        if !handle(&ctx, f, &token).await {
            break;
        }
    }
    fetch_token.cancel();
    let _ = fetcher.await;
}

async fn start_offset(
    pc: &PartitionClient,
    at: StartAt,
) -> Result<i64, rskafka::client::error::Error> {
    pc.get_offset(match at {
        StartAt::Earliest => OffsetAt::Earliest,
        StartAt::Latest => OffsetAt::Latest,
    })
    .await
}

/// Fetches records from `offset` on into the bounded queue (waiting when
/// it is full: backpressure), until cancelled.
async fn fetch(
    ctx: PartitionCtx,
    pc: Arc<PartitionClient>,
    mut offset: i64,
    tx: mpsc::Sender<Fetched>,
    token: CancellationToken,
) {
    let metrics = ctx.st.metrics().clone();
    let p = ctx.partition;
    let max_bytes = i32::try_from(ctx.st.max_body_bytes().saturating_mul(4)).unwrap_or(i32::MAX);
    let mut failures = 0u32;
    loop {
        let res = tokio::select! {
            () = token.cancelled() => return,
            r = pc.fetch_records(offset, 1..max_bytes.max(1024 * 1024), ctx.max_wait_ms) => r,
        };
        match res {
            Ok((records, high_watermark)) => {
                failures = 0;
                metrics.kafka.set_partition(p, Some(high_watermark), None);
                for r in records {
                    // A fetch may start before the offset asked for (a
                    // compressed batch is returned whole).
                    if r.offset < offset {
                        continue;
                    }
                    offset = r.offset + 1;
                    metrics.kafka.consumed.fetch_add(1, Ordering::Relaxed);
                    let f = Fetched {
                        offset: r.offset,
                        record: r.record,
                    };
                    tokio::select! {
                        () = token.cancelled() => return,
                        sent = tx.send(f) => if sent.is_err() { return },
                    }
                }
            }
            Err(e) => {
                use rskafka::client::error::{Error as KError, ProtocolError};
                // The committed offset fell out of the broker's retention:
                // what was there is gone; go on from the oldest kept.
                if let KError::ServerError {
                    protocol_error: ProtocolError::OffsetOutOfRange,
                    ..
                } = &e
                    && let Ok(earliest) = pc.get_offset(OffsetAt::Earliest).await
                    && earliest > offset
                {
                    tracing::error!(
                        partition = p,
                        from = offset,
                        to = earliest,
                        "Kafka records expired before they were stored; skipping to the oldest kept"
                    );
                    offset = earliest;
                    continue;
                }
                metrics
                    .kafka
                    .connection_errors
                    .fetch_add(1, Ordering::Relaxed);
                let d = backoff(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(partition = p, error = %e, retry_in_ms = d.as_millis() as u64,
                    "Kafka fetch failed");
                if !pause(d, &token).await {
                    return;
                }
            }
        }
    }
}

/// Stores or drops one record, committing its offset with it (retrying
/// store failures with backoff). False when cancelled before it was done.
async fn handle(ctx: &PartitionCtx, f: Fetched, token: &CancellationToken) -> bool {
    let st = &ctx.st;
    let metrics = st.metrics();
    let position = StreamPosition {
        source: ctx.source.clone(),
        partition: ctx.partition,
        next_offset: f.offset + 1,
    };
    let headers = f
        .record
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()));
    let decoded = decode_record(headers, f.record.value.as_deref(), st.max_body_bytes()).and_then(
        |(gw, batch)| match crate::ingest::check_batch(&batch) {
            Ok(_) => Ok((gw, batch)),
            Err(_) => Err(KafkaDropReason::Malformed),
        },
    );
    let mut failures = 0u32;
    loop {
        let res = match &decoded {
            Ok((gw, batch)) => {
                let (store, id) = (st.store().clone(), gw.clone());
                match blocking(move || store.gateway_is_active(&id)).await {
                    Ok(true) => st
                        .store_batch_at(gw, batch.clone(), Some(position.clone()))
                        .await
                        .map(|_| None),
                    Ok(false) => Ok(Some(KafkaDropReason::UnknownGateway)),
                    Err(e) => Err(e),
                }
            }
            Err(r) => Ok(Some(*r)),
        };
        // A dropped record's offset is committed alone.
        let res = match res {
            Ok(Some(reason)) => {
                let (store, pos) = (st.store().clone(), position.clone());
                blocking(move || store.commit_offset(&pos))
                    .await
                    .map(|()| Some(reason))
            }
            other => other,
        };
        match res {
            Ok(None) => {
                metrics.kafka.stored.fetch_add(1, Ordering::Relaxed);
                metrics
                    .kafka
                    .set_partition(ctx.partition, None, Some(position.next_offset));
                return true;
            }
            Ok(Some(reason)) => {
                metrics.kafka.drop_record(reason);
                metrics
                    .kafka
                    .set_partition(ctx.partition, None, Some(position.next_offset));
                tracing::warn!(
                    partition = ctx.partition,
                    offset = f.offset,
                    gateway_id = decoded.as_ref().map(|(g, _)| g.as_str()).unwrap_or("-"),
                    reason = reason.as_str(),
                    "Kafka record dropped"
                );
                return true;
            }
            Err(e) => {
                metrics.kafka.store_errors.fetch_add(1, Ordering::Relaxed);
                let d = backoff(failures);
                failures = failures.saturating_add(1);
                tracing::error!(partition = ctx.partition, offset = f.offset, error = %e,
                    retry_in_ms = d.as_millis() as u64,
                    "storing a Kafka record failed; retrying");
                if !pause(d, token).await {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hub_domain::stream::headers::{DEVICE_ID, encode_amqp_string};
    use prost::Message;

    fn config(brokers: &[&str]) -> KafkaConfig {
        let text = format!(
            "brokers = {brokers:?}\ntopic = \"vigil\"\nreplica_id = \"hub-1\"\n",
            brokers = brokers
        );
        toml::from_str(&text).unwrap()
    }

    fn secret_file(dir: &Path, mode: u32, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(format!("conn-{mode:o}"));
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn defaults_and_tls_off_loopback() {
        let c = config(&["ns.servicebus.windows.net:9093"]);
        c.validate().unwrap();
        assert!(c.uses_tls());
        assert_eq!(c.sasl_username, "$ConnectionString");
        assert_eq!(c.lease_ms, DEFAULT_LEASE_MS);
        assert_eq!(c.start_at, StartAt::Earliest);
        assert_eq!(c.source(), "kafka:vigil");
        let local = config(&["127.0.0.1:9092", "localhost:9093"]);
        local.validate().unwrap();
        assert!(!local.uses_tls(), "plaintext by default on loopback only");
        let mut off = config(&["127.0.0.1:9092", "kafka.example.org:9093"]);
        assert!(off.uses_tls());
        off.tls = Some(false);
        let e = off.validate().unwrap_err().to_string();
        assert!(
            e.contains("kafka.tls") && e.contains("kafka.example.org"),
            "{e}"
        );
    }

    #[test]
    fn validation_names_the_field() {
        type Change = fn(&mut KafkaConfig);
        let cases: Vec<(&str, Change)> = vec![
            ("kafka.brokers", |c| c.brokers.clear()),
            ("kafka.brokers", |c| c.brokers = vec!["no-port".into()]),
            ("kafka.brokers", |c| c.brokers = vec!["h:0".into()]),
            ("kafka.topic", |c| c.topic = "a/b".into()),
            ("kafka.topic", |c| c.topic.clear()),
            ("kafka.replica_id", |c| c.replica_id.clear()),
            ("kafka.lease_ms", |c| c.lease_ms = 10),
            ("kafka.max_in_flight", |c| c.max_in_flight = 0),
            ("kafka.max_wait_ms", |c| c.max_wait_ms = 0),
            ("kafka.sasl_username", |c| c.sasl_username.clear()),
            ("kafka.connection_string_env", |c| {
                c.connection_string_env = Some("X".into());
                c.connection_string_file = Some("/f".into());
            }),
        ];
        for (field, change) in cases {
            let mut c = config(&["127.0.0.1:9092"]);
            change(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        // The secret never goes in the TOML.
        let e = toml::from_str::<KafkaConfig>(
            "brokers = [\"h:1\"]\ntopic = \"t\"\nreplica_id = \"r\"\nconnection_string = \"x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("connection_string"), "{e}");
    }

    #[test]
    fn sasl_plain_from_a_private_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let conn =
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=hub;SharedAccessKey=abc=";
        let mut c = config(&["ns.servicebus.windows.net:9093"]);
        assert_eq!(sasl_credentials(&c, |_| None).unwrap(), None);
        c.connection_string_file = Some(secret_file(dir.path(), 0o600, &format!("{conn}\n")));
        assert_eq!(
            sasl_credentials(&c, |_| None).unwrap(),
            Some(("$ConnectionString".into(), conn.into()))
        );
        // Readable by others: refused, naming the field.
        c.connection_string_file = Some(secret_file(dir.path(), 0o644, conn));
        let e = sasl_credentials(&c, |_| None).unwrap_err().to_string();
        assert!(
            e.contains("kafka.connection_string_file") && e.contains("chmod 600"),
            "{e}"
        );
        c.connection_string_file = Some(secret_file(dir.path(), 0o600, "\n"));
        assert!(
            sasl_credentials(&c, |_| None)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        // From the environment.
        c.connection_string_file = None;
        c.connection_string_env = Some("VIGIL_TEST_EH".into());
        let env = |v: &str| (v == "VIGIL_TEST_EH").then(|| conn.to_owned());
        assert_eq!(
            sasl_credentials(&c, env).unwrap(),
            Some(("$ConnectionString".into(), conn.into()))
        );
        let e = sasl_credentials(&c, |_| None).unwrap_err().to_string();
        assert!(e.contains("VIGIL_TEST_EH"), "{e}");
        // The prepared ingest never prints the secret.
        c.connection_string_env = None;
        c.connection_string_file = Some(secret_file(dir.path(), 0o600, conn));
        let k = KafkaIngest::prepare(&c).unwrap();
        assert_eq!(k.security(), (true, true));
        assert!(!format!("{k:?}").contains("SharedAccessKey"));
    }

    #[test]
    fn tls_is_built_with_public_or_pinned_roots() {
        let c = config(&["ns.servicebus.windows.net:9093"]);
        assert!(tls_config(&c).unwrap().is_some());
        let local = config(&["127.0.0.1:9092"]);
        assert!(tls_config(&local).unwrap().is_none());
        let mut pinned = c.clone();
        pinned.ca_file = Some("/nonexistent/ca.pem".into());
        let e = tls_config(&pinned).unwrap_err().to_string();
        assert!(e.contains("kafka.ca_file"), "{e}");
    }

    fn batch(gw: &str) -> Vec<u8> {
        Batch {
            gateway_id: gw.into(),
            sequence: 7,
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn records_are_checked_like_mqtt_messages() {
        let dev = encode_amqp_string("gw-1");
        let body = batch("gw-1");
        let h = |extra: &[(&'static str, &'static [u8])]| {
            let mut v: Vec<(&str, &[u8])> = vec![(DEVICE_ID, &dev[..])];
            v.extend_from_slice(extra);
            v
        };
        let (gw, b) = decode_record(h(&[]), Some(&body), 1024).unwrap();
        assert_eq!((gw.as_str(), b.sequence), ("gw-1", 7));
        let ok = decode_record(
            h(&[
                ("content-type", b"application/x-protobuf"),
                ("content-encoding", b"identity"),
            ]),
            Some(&body),
            1024,
        );
        assert!(ok.is_ok());
        let zstd = zstd::encode_all(&body[..], 3).unwrap();
        assert!(decode_record(h(&[("content-encoding", b"zstd")]), Some(&zstd), 1024).is_ok());
        let err = |headers: Vec<(&str, &[u8])>, body: Option<&[u8]>| {
            decode_record(headers, body, 1024).unwrap_err()
        };
        assert_eq!(err(vec![], Some(&body)), KafkaDropReason::MissingDeviceId);
        // A plain (not AMQP-encoded) device id is not what the routing writes.
        assert_eq!(
            err(vec![(DEVICE_ID, b"gw-1")], Some(&body)),
            KafkaDropReason::BadHeaders
        );
        let bad_id = encode_amqp_string("gw 1");
        assert_eq!(
            err(vec![(DEVICE_ID, &bad_id)], Some(&body)),
            KafkaDropReason::MissingDeviceId
        );
        assert_eq!(
            err(h(&[("content-type", b"application/json")]), Some(&body)),
            KafkaDropReason::UnsupportedEncoding
        );
        assert_eq!(
            err(h(&[("content-encoding", b"gzip")]), Some(&body)),
            KafkaDropReason::UnsupportedEncoding
        );
        assert_eq!(err(h(&[]), None), KafkaDropReason::Malformed);
        assert_eq!(err(h(&[]), Some(&[0xff, 0xff])), KafkaDropReason::Malformed);
        assert_eq!(
            err(h(&[]), Some(&batch("gw-2"))),
            KafkaDropReason::GatewayMismatch
        );
        assert_eq!(
            decode_record(h(&[]), Some(&body), 2).unwrap_err(),
            KafkaDropReason::TooLarge
        );
    }

    #[test]
    fn metrics_render_drops_and_lag() {
        let m = KafkaMetrics::default();
        m.drop_record(KafkaDropReason::UnknownGateway);
        m.set_partition(2, Some(10), Some(4));
        m.set_partition(0, Some(3), None);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("vigil_hub_kafka_records_dropped_total{reason=\"unknown_gateway\"} 1")
        );
        assert!(out.contains("vigil_hub_kafka_records_dropped_total{reason=\"bad_headers\"} 0"));
        assert!(out.contains("vigil_hub_kafka_partition_lag{partition=\"2\"} 6"));
        assert!(out.contains("vigil_hub_kafka_partition_lag{partition=\"0\"} 3"));
        assert_eq!(m.owned_partitions(), vec![0, 2]);
        m.forget_partition(2);
        assert_eq!(m.owned_partitions(), vec![0]);
    }
}
