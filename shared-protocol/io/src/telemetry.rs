//! Optional OpenTelemetry traces, for both programs.
//!
//! Off unless the standard `OTEL_*` environment names a collector
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`):
//! then the program's trace spans (target [`TRACE_TARGET`]) are exported over
//! OTLP/HTTP with protobuf bodies (reqwest + rustls with the ring provider;
//! no gRPC, no OpenSSL). The W3C `traceparent` helpers carry a trace across
//! programs: [`traceparent`] names a span for the receiver (the agent puts it
//! in `Batch.traceparent`), [`adopt_remote_parent`] makes the receiver's span
//! its child (the hub's ingest span). Span attributes are ids, counts and
//! timings only, never patient data; which spans exist is the programs'
//! business.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

use crate::tls::{self, PemFile, TlsError};

/// `tracing` target of the spans that are exported (and only those: the
/// programs' log events and other crates' spans are not).
pub const TRACE_TARGET: &str = "vigil_trace";

/// A W3C `traceparent` (version 00) is exactly this long.
pub const TRACEPARENT_LEN: usize = 55;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An `OTEL_*` variable has a value this build cannot use.
    #[error("{var}: {reason}")]
    Env { var: &'static str, reason: String },
    #[error("OTLP trace exporter: {0}")]
    Exporter(String),
}

fn env_err(var: &'static str, reason: impl Into<String>) -> TelemetryError {
    TelemetryError::Env {
        var,
        reason: reason.into(),
    }
}

/// Where and how traces are exported, from the standard environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// Full URL of the collector's traces endpoint (`…/v1/traces`).
    pub traces_url: String,
    pub service_name: String,
    /// The program (`edge-agent`, `cloud-hub`): the tracer's name, and the
    /// service name unless `OTEL_SERVICE_NAME` is set.
    pub program: String,
    /// PEM CA bundle trusted instead of the public roots (https only).
    pub ca_file: Option<PathBuf>,
    /// Time limit of one export request.
    pub timeout: Duration,
}

impl OtlpConfig {
    /// `None` (traces off) when no endpoint is set, or `OTEL_SDK_DISABLED=true`
    /// or `OTEL_TRACES_EXPORTER=none`. `program` names the tracer and is
    /// the default service name.
    pub fn from_env(program: &str) -> Result<Option<Self>, TelemetryError> {
        Self::from_lookup(program, |k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) over any variable lookup (tests).
    pub fn from_lookup(
        program: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TelemetryError> {
        let get = |k: &str| {
            lookup(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match get("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(env_err(
                    "OTEL_TRACES_EXPORTER",
                    format!("`{other}` is not supported (otlp or none)"),
                ));
            }
        }
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = get(var) {
                if p != "http/protobuf" {
                    return Err(env_err(
                        var,
                        format!("`{p}` is not supported: only http/protobuf is built in"),
                    ));
                }
                break;
            }
        }
        let (var, traces_url) = if let Some(u) = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", u)
        } else if let Some(u) = get("OTEL_EXPORTER_OTLP_ENDPOINT") {
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("{}/v1/traces", u.trim_end_matches('/')),
            )
        } else {
            return Ok(None);
        };
        if !(traces_url.starts_with("http://") || traces_url.starts_with("https://")) {
            return Err(env_err(var, "must be an http:// or https:// URL"));
        }
        let timeout = match get("OTEL_EXPORTER_OTLP_TIMEOUT") {
            None => Duration::from_secs(10),
            Some(ms) => match ms.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    return Err(env_err(
                        "OTEL_EXPORTER_OTLP_TIMEOUT",
                        "must be a positive number of milliseconds",
                    ));
                }
            },
        };
        Ok(Some(OtlpConfig {
            traces_url,
            service_name: get("OTEL_SERVICE_NAME").unwrap_or_else(|| program.to_owned()),
            program: program.to_owned(),
            ca_file: get("OTEL_EXPORTER_OTLP_CERTIFICATE").map(PathBuf::from),
            timeout,
        }))
    }
}

/// The running trace export; [`shutdown`](Self::shutdown) flushes it.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    program: String,
}

impl Telemetry {
    /// Builds the exporter (batching, on the SDK's own thread). Callable
    /// inside or outside a tokio runtime.
    pub fn start(cfg: &OtlpConfig) -> Result<Self, TelemetryError> {
        let ca = cfg.ca_file.as_deref().map(|p| PemFile::new("", p));
        let tls = tls::pinned_or_public_roots(ca)
            .and_then(|roots| tls::client_config(roots, None))
            .map_err(|e| match e {
                TlsError::Protocol(e) => TelemetryError::Exporter(format!("TLS: {e}")),
                e => env_err("OTEL_EXPORTER_OTLP_CERTIFICATE", e.to_string()),
            })?;
        let timeout = cfg.timeout;
        // The blocking client runs its own runtime thread; it must not be
        // built on a thread of a running tokio runtime.
        let client = std::thread::spawn(move || {
            reqwest::blocking::Client::builder()
                .use_preconfigured_tls(tls)
                .timeout(timeout)
                .build()
        })
        .join()
        .map_err(|_| TelemetryError::Exporter("building the HTTP client panicked".into()))?
        .map_err(|e| TelemetryError::Exporter(format!("HTTP client: {e}")))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(cfg.traces_url.clone())
            .with_timeout(cfg.timeout)
            .with_http_client(client)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(cfg.service_name.clone())
                    .build(),
            )
            .build();
        Ok(Telemetry {
            provider,
            program: cfg.program.clone(),
        })
    }

    /// The `tracing` layer that turns [`TRACE_TARGET`] spans into exported
    /// OpenTelemetry spans (log events and other spans are not exported).
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(self.program.clone()))
            .with_threads(false)
            .with_filter(
                tracing_subscriber::filter::filter_fn(|m| {
                    m.is_span() && m.target() == TRACE_TARGET && *m.level() <= tracing::Level::INFO
                })
                // Keeps the global level hint from becoming TRACE (which
                // would make every `log` record and debug event be built).
                .with_max_level_hint(tracing::Level::INFO),
            )
    }

    /// Exports what is still queued and stops the export thread (blocking;
    /// call off the async runtime's worker threads).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing OpenTelemetry traces failed");
        }
    }
}

/// The W3C `traceparent` of `span` (to send along, e.g. in
/// `Batch.traceparent`): empty when traces are off (no OpenTelemetry layer)
/// or the span is disabled.
pub fn traceparent(span: &tracing::Span) -> String {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return String::new();
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier
        .remove("traceparent")
        .filter(|t| t.len() == TRACEPARENT_LEN)
        .unwrap_or_default()
}

/// What a received `traceparent` gave the receiver's span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteParent {
    /// No trace context sent (an old sender, or its tracing is off).
    Absent,
    /// The span is now a child of the sender's span.
    Adopted,
    /// Malformed: ignored (the span starts a new trace); count it.
    Invalid,
}

/// Parses a W3C `traceparent` strictly: version `00`, exactly
/// `00-<32 lowercase hex>-<16 lowercase hex>-<2 lowercase hex>`, trace and
/// span id not all zero. `Ok(None)` when empty.
pub fn remote_context(traceparent: &str) -> Result<Option<Context>, InvalidTraceparent> {
    if traceparent.is_empty() {
        return Ok(None);
    }
    let b = traceparent.as_bytes();
    let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let shape = b.len() == TRACEPARENT_LEN
        && b.starts_with(b"00-")
        && b[35] == b'-'
        && b[52] == b'-'
        && lower_hex(&b[3..35])
        && lower_hex(&b[36..52])
        && lower_hex(&b[53..55]);
    if !shape {
        return Err(InvalidTraceparent);
    }
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if !cx.span().span_context().is_valid() {
        return Err(InvalidTraceparent);
    }
    Ok(Some(cx))
}

/// A `traceparent` that is not a valid W3C version-00 value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed traceparent")]
pub struct InvalidTraceparent;

/// Makes `span` a child of the sender's span named by `traceparent`.
/// Never fails: a malformed value is reported as [`RemoteParent::Invalid`]
/// and the span keeps its own new trace.
pub fn adopt_remote_parent(span: &tracing::Span, traceparent: &str) -> RemoteParent {
    match remote_context(traceparent) {
        Ok(None) => RemoteParent::Absent,
        Ok(Some(cx)) => {
            // Without the OpenTelemetry layer (traces off) this does nothing.
            let _ = span.set_parent(cx);
            RemoteParent::Adopted
        }
        Err(InvalidTraceparent) => RemoteParent::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId};
    use tracing_subscriber::layer::SubscriberExt;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_send_span_has_a_traceparent_only_when_traces_are_on() {
        let off = tracing::info_span!(target: "vigil_trace", "batch_send");
        assert_eq!(traceparent(&off), "");
        let t = Telemetry {
            provider: SdkTracerProvider::builder().build(),
            program: "edge-agent".into(),
        };
        let subscriber = tracing_subscriber::registry().with(t.layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(target: "vigil_trace", "batch_send");
            let tp = traceparent(&span);
            let sc = span.context().span().span_context().clone();
            assert_eq!(
                tp,
                format!("00-{}-{}-01", sc.trace_id(), sc.span_id()),
                "sampled, version 00"
            );
            assert_eq!(tp.len(), TRACEPARENT_LEN);
            // Another target is not exported, so it has no trace context.
            let other = tracing::info_span!("not_traced");
            assert_eq!(traceparent(&other), "");
        });
    }

    #[test]
    fn a_valid_traceparent_names_the_remote_span() {
        let cx = remote_context(TP).unwrap().unwrap();
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(sc.span_id(), SpanId::from_hex("00f067aa0ba902b7").unwrap());
        assert!(sc.is_remote() && sc.is_sampled());
    }

    #[test]
    fn an_absent_traceparent_is_no_parent() {
        assert!(matches!(remote_context(""), Ok(None)));
        assert_eq!(
            adopt_remote_parent(&tracing::Span::none(), ""),
            RemoteParent::Absent
        );
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // short ids (the propagator alone would accept these)
            "00-abc-def-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            // upper case, non-hex, wrong version, extra part, all-zero ids
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}",
        ] {
            assert_eq!(remote_context(bad).err(), Some(InvalidTraceparent), "{bad}");
            assert_eq!(
                adopt_remote_parent(&tracing::Span::none(), bad),
                RemoteParent::Invalid,
                "{bad}"
            );
        }
    }

    #[test]
    fn the_ingest_span_becomes_a_child_of_the_remote_span() {
        let provider = SdkTracerProvider::builder().build();
        let t = Telemetry {
            provider,
            program: "cloud-hub".into(),
        };
        let subscriber = tracing_subscriber::registry().with(t.layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(target: "vigil_trace", "ingest_batch");
            assert_eq!(adopt_remote_parent(&span, TP), RemoteParent::Adopted);
            // Its own traceparent now names the remote trace.
            assert!(traceparent(&span).contains("4bf92f3577b34da6a3ce929d0e0e4736"));
            let cx = span.context();
            let sc = cx.span().span_context().clone();
            assert_eq!(
                sc.trace_id(),
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
            );
            assert_ne!(sc.span_id(), SpanId::from_hex("00f067aa0ba902b7").unwrap());
        });
    }

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn traces_are_off_unless_an_endpoint_is_set() {
        assert_eq!(
            OtlpConfig::from_lookup("edge-agent", lookup(&[])).unwrap(),
            None
        );
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318/")];
        let c = OtlpConfig::from_lookup("edge-agent", lookup(&on))
            .unwrap()
            .unwrap();
        assert_eq!(c.traces_url, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(c.service_name, "edge-agent");
        assert_eq!(c.program, "edge-agent");
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let vars = [on[0], off];
            assert_eq!(
                OtlpConfig::from_lookup("edge-agent", lookup(&vars)).unwrap(),
                None
            );
        }
        let c = OtlpConfig::from_lookup(
            "edge-agent",
            lookup(&[
                on[0],
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c.example/t"),
                ("OTEL_SERVICE_NAME", "hub-eu-1"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.traces_url, "https://c.example/t");
        assert_eq!(c.service_name, "hub-eu-1");
        assert_eq!(c.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn unusable_settings_name_the_variable() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        for (bad, var) in [
            (
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (("OTEL_TRACES_EXPORTER", "zipkin"), "OTEL_TRACES_EXPORTER"),
            (
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
            (
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4318"),
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
        ] {
            let vars = if bad.0 == on.0 {
                vec![bad]
            } else {
                vec![on, bad]
            };
            let e = OtlpConfig::from_lookup("edge-agent", lookup(&vars)).unwrap_err();
            assert!(e.to_string().starts_with(var), "{e}");
        }
        // An unreadable CA file is reported before anything is exported.
        let ca = ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem");
        let c = OtlpConfig::from_lookup("edge-agent", lookup(&[on, ca]))
            .unwrap()
            .unwrap();
        let e = Telemetry::start(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_CERTIFICATE: /nonexistent/ca.pem: "),
            "{e}"
        );
    }
}
