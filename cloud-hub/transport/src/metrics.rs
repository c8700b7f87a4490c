//! Prometheus counters, rendered in the text exposition format (0.0.4).
//! Labels carry only fixed vocabularies: never patient ids or tokens.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use shared_protocol::v1::RejectReason;

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Outcome label of batches and readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted = 0,
    Duplicate = 1,
    Rejected = 2,
}

const OUTCOMES: [&str; 3] = ["accepted", "duplicate", "rejected"];

/// Kind label of ingest request errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestErrorKind {
    Unauthorized = 0,
    Forbidden = 1,
    UnsupportedMediaType = 2,
    TooLarge = 3,
    Malformed = 4,
    /// Over the gateway's `[ingest]` rate limit (429 with `Retry-After`).
    RateLimited = 5,
}

const ERROR_KINDS: [&str; 6] = [
    "unauthorized",
    "forbidden",
    "unsupported_media_type",
    "too_large",
    "malformed",
    "rate_limited",
];

const REASONS: [(RejectReason, &str); 5] = [
    (RejectReason::Unspecified, "unspecified"),
    (RejectReason::UnknownMetric, "unknown_metric"),
    (RejectReason::ImpossibleTime, "impossible_time"),
    (RejectReason::Malformed, "malformed"),
    (RejectReason::MissingDevice, "missing_device"),
];

/// FHIR interaction label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FhirInteraction {
    Read = 0,
    Search = 1,
    Metadata = 2,
}

const INTERACTIONS: [&str; 3] = ["read", "search", "metadata"];

/// Reason label of refused user requests and logins (`access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials, or unknown/expired/revoked ones (401).
    Unauthenticated = 0,
    /// Authenticated, but the role may not use the route (403).
    Forbidden = 1,
    /// Cookie-authenticated write without the session's CSRF token (403).
    Csrf = 2,
    /// Login with a wrong user name or password (401).
    BadLogin = 3,
    /// Login refused while the user name is locked out (429).
    Throttled = 4,
    /// A JWT that failed validation (signature, issuer, audience, time, role).
    InvalidJwt = 5,
}

/// Why a login was held back (`access::session`).
#[derive(Debug, Clone, Copy)]
pub enum LoginThrottle {
    /// No password-check permit free: 429 at once.
    Busy = 0,
    /// The (user name, address) pair is locked: 429.
    Locked = 1,
    /// Checked after a step-up delay (account or address over its free
    /// attempts).
    StepUp = 2,
}

const LOGIN_THROTTLES: [&str; 3] = ["busy", "locked", "step_up"];

const AUTH_FAILURES: [&str; 6] = [
    "unauthenticated",
    "forbidden",
    "csrf",
    "bad_login",
    "throttled",
    "invalid_jwt",
];

/// The hub's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    batches: [AtomicU64; 3],
    readings: [AtomicU64; 3],
    errors: [AtomicU64; 6],
    rejected_reasons: [AtomicU64; 5],
    fhir: [AtomicU64; 3],
    auth_failures: [AtomicU64; 6],
    login_throttled: [AtomicU64; 3],
    logins: AtomicU64,
    /// MQTT ingest (`[mqtt]`) counters and connection state.
    pub mqtt: MqttMetrics,
    /// Kafka ingest (`[kafka]`) counters and partition lag.
    pub kafka: crate::kafka_ingest::KafkaMetrics,
    /// HL7 ADT listener (`[adt]`) counters.
    pub adt: std::sync::Arc<crate::adt_listener::AdtStats>,
    out_of_range: AtomicU64,
    erased: AtomicU64,
    trace_context_invalid: AtomicU64,
    audit_failures: AtomicU64,
    /// Buffer incarnations first seen: [first of the gateway, replacing another].
    incarnations: [AtomicU64; 2],
}

impl Metrics {
    pub fn batch(&self, outcome: Outcome) {
        self.batches[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn readings(&self, outcome: Outcome, n: u64) {
        self.readings[outcome as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn ingest_error(&self, kind: IngestErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Readings stored with the out-of-range quality flag.
    pub fn out_of_range(&self, n: u64) {
        self.out_of_range.fetch_add(n, Ordering::Relaxed);
    }

    /// Readings dropped as an erased patient's late data.
    pub fn erased(&self, n: u64) {
        self.erased.fetch_add(n, Ordering::Relaxed);
    }

    /// An audited request whose audit entry could not be written.
    pub fn audit_failure(&self) {
        self.audit_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A buffer incarnation seen for the first time; `replaced`: the
    /// gateway had sent batches under another one (or none) before.
    pub fn new_incarnation(&self, replaced: bool) {
        self.incarnations[usize::from(replaced)].fetch_add(1, Ordering::Relaxed);
    }

    /// A batch whose `traceparent` was malformed (ignored).
    pub fn trace_context_invalid(&self) {
        self.trace_context_invalid.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, reason: RejectReason) {
        let i = REASONS.iter().position(|(r, _)| *r == reason).unwrap_or(0);
        self.rejected_reasons[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A refused user request or login.
    pub fn auth_failure(&self, reason: AuthFailure) {
        self.auth_failures[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn login_throttled(&self, why: LoginThrottle) {
        self.login_throttled[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A successful login (a session started).
    pub fn login(&self) {
        self.logins.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fhir(&self, interaction: FhirInteraction) {
        self.fhir[interaction as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut family =
            |name: &str, help: &str, label: &str, names: &[&str], values: &[AtomicU64]| {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} counter");
                for (n, v) in names.iter().zip(values) {
                    let _ = writeln!(
                        out,
                        "{name}{{{label}=\"{n}\"}} {}",
                        v.load(Ordering::Relaxed)
                    );
                }
            };
        family(
            "vigil_hub_ingest_batches_total",
            "Ingest batches by outcome (rejected = refused request).",
            "outcome",
            &OUTCOMES,
            &self.batches,
        );
        family(
            "vigil_hub_ingest_readings_total",
            "Readings and waveforms received, by outcome.",
            "outcome",
            &OUTCOMES,
            &self.readings,
        );
        family(
            "vigil_hub_ingest_errors_total",
            "Ingest requests refused, by kind.",
            "kind",
            &ERROR_KINDS,
            &self.errors,
        );
        let reasons: Vec<&str> = REASONS.iter().map(|(_, n)| *n).collect();
        family(
            "vigil_hub_readings_rejected_total",
            "Readings and waveforms rejected, by reason.",
            "reason",
            &reasons,
            &self.rejected_reasons,
        );
        family(
            "vigil_hub_fhir_requests_total",
            "FHIR API requests, by interaction.",
            "interaction",
            &INTERACTIONS,
            &self.fhir,
        );
        family(
            "vigil_hub_gateway_incarnations_total",
            "Gateway buffer incarnations seen for the first time: a gateway's first \
             (`first`) or one replacing an earlier buffer (`new`: lost or wiped data \
             directory, reinstall, replacement).",
            "kind",
            &["first", "new"],
            &self.incarnations,
        );
        family(
            "vigil_hub_auth_failures_total",
            "User requests and logins refused, by reason.",
            "reason",
            &AUTH_FAILURES,
            &self.auth_failures,
        );
        family(
            "vigil_hub_login_throttled_total",
            "Logins held back: refused with no password-check permit free (`busy`) or \
             for a locked user name and address (`locked`); checked after a step-up \
             delay (`step_up`).",
            "reason",
            &LOGIN_THROTTLES,
            &self.login_throttled,
        );
        // Unlabelled counters.
        for (name, help, v) in [
            (
                "vigil_hub_logins_total",
                "Successful logins (sessions started).",
                &self.logins,
            ),
            (
                "vigil_hub_readings_out_of_range_total",
                "Readings stored with the out-of-range quality flag \
                 (value outside the metric's possible range, withheld from FHIR).",
                &self.out_of_range,
            ),
            (
                "vigil_hub_readings_erased_total",
                "Readings dropped at ingest as late data of an erased patient \
                 (inside an erasure's device windows, or naming the patient).",
                &self.erased,
            ),
            (
                "vigil_hub_trace_context_invalid_total",
                "Batches whose W3C traceparent was malformed (ignored; the batch is ingested).",
                &self.trace_context_invalid,
            ),
            (
                "vigil_hub_audit_failures_total",
                "Audited requests whose audit log entry could not be written (answered 503, response withheld).",
                &self.audit_failures,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        self.mqtt.render(&mut out);
        self.kafka.render(&mut out);
        self.adt.render(&mut out);
        out
    }
}

/// Why a message was dropped (counted by reason; acknowledged so that the
/// broker does not re-deliver it forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The topic is not `devices/{gateway id}/messages/events/...`.
    BadTopic = 0,
    /// `$.ce` names an encoding the hub does not decode, or `$.ct` is not
    /// protobuf.
    UnsupportedEncoding = 1,
    /// Larger than `server.max_body_bytes`.
    TooLarge = 2,
    /// The payload is not a protobuf `vigil.v1.Batch`.
    Malformed = 3,
    /// `Batch.gateway_id` differs from the topic's gateway id.
    GatewayMismatch = 4,
    /// The topic's gateway is not registered, or revoked.
    UnknownGateway = 5,
}

const DROP_REASONS: [&str; 6] = [
    "bad_topic",
    "unsupported_encoding",
    "too_large",
    "malformed",
    "gateway_mismatch",
    "unknown_gateway",
];

impl DropReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        DROP_REASONS[self as usize]
    }
}

/// MQTT ingest counters and connection state (rendered into `/metrics`).
#[derive(Debug, Default)]
pub struct MqttMetrics {
    pub(crate) stored: AtomicU64,
    pub(crate) acks_published: AtomicU64,
    pub(crate) dropped: [AtomicU64; 6],
    pub(crate) connected: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) connection_errors: AtomicU64,
    pub(crate) store_errors: AtomicU64,
}

impl MqttMetrics {
    /// Messages whose batch was stored (new or duplicate) and acknowledged.
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// Messages dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    /// Whether the hub is connected and subscribed.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed) == 1
    }

    pub(crate) fn drop_message(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn render(&self, out: &mut String) {
        let mut counter = |name: &str, help: &str, kind: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        counter(
            "vigil_hub_mqtt_connected",
            "1 while connected to the MQTT broker and subscribed, else 0.",
            "gauge",
            &self.connected,
        );
        counter(
            "vigil_hub_mqtt_acks_published_total",
            "Batch acknowledgements published to gateways (devices/{id}/messages/devicebound/vigil-ack).",
            "counter",
            &self.acks_published,
        );
        counter(
            "vigil_hub_mqtt_connects_total",
            "Successful MQTT connections (CONNACK accepted).",
            "counter",
            &self.connects,
        );
        counter(
            "vigil_hub_mqtt_connection_errors_total",
            "MQTT connection failures and refused subscriptions.",
            "counter",
            &self.connection_errors,
        );
        counter(
            "vigil_hub_mqtt_store_errors_total",
            "Failed attempts to store an MQTT batch (retried, not acknowledged).",
            "counter",
            &self.store_errors,
        );
        counter(
            "vigil_hub_mqtt_batches_stored_total",
            "MQTT messages whose batch was stored (new or duplicate) and acknowledged.",
            "counter",
            &self.stored,
        );
        let name = "vigil_hub_mqtt_messages_dropped_total";
        let _ = writeln!(
            out,
            "# HELP {name} MQTT messages dropped (acknowledged, not stored), by reason."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for (n, v) in DROP_REASONS.iter().zip(&self.dropped) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{n}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_help_and_type() {
        let m = Metrics::default();
        m.batch(Outcome::Accepted);
        m.readings(Outcome::Duplicate, 3);
        m.rejected(RejectReason::ImpossibleTime);
        m.ingest_error(IngestErrorKind::TooLarge);
        m.fhir(FhirInteraction::Search);
        m.new_incarnation(true);
        let text = m.render();
        assert!(text.contains("vigil_hub_gateway_incarnations_total{kind=\"new\"} 1"));
        assert!(text.contains("vigil_hub_gateway_incarnations_total{kind=\"first\"} 0"));
        assert!(text.contains("# TYPE vigil_hub_ingest_batches_total counter"));
        assert!(text.contains("vigil_hub_ingest_batches_total{outcome=\"accepted\"} 1"));
        assert!(text.contains("vigil_hub_ingest_readings_total{outcome=\"duplicate\"} 3"));
        assert!(text.contains("vigil_hub_readings_rejected_total{reason=\"impossible_time\"} 1"));
        assert!(text.contains("vigil_hub_ingest_errors_total{kind=\"too_large\"} 1"));
        assert!(text.contains("vigil_hub_fhir_requests_total{interaction=\"search\"} 1"));
    }
}
