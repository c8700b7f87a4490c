//! Optional OpenTelemetry traces.
//!
//! Off unless the standard `OTEL_*` environment names a collector
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`):
//! then the agent's trace spans (target [`TRACE_TARGET`], one per batch send
//! attempt) are exported over OTLP/HTTP with protobuf bodies (reqwest + rustls
//! with the ring provider; no gRPC, no OpenSSL), and each batch carries its
//! send span's W3C `traceparent` (`Batch.traceparent`) so that the hub's
//! ingest span joins the same trace. Span attributes are ids, counts and
//! timings only, never patient data. (The hub has the same settings code in
//! `cloud_hub::telemetry`.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// `tracing` target of the spans that are exported (and only those: the
/// hub's log events and other crates' spans are not).
pub const TRACE_TARGET: &str = "vigil_trace";

/// Service name when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "edge-agent";

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
    /// PEM CA bundle trusted instead of the public roots (https only).
    pub ca_file: Option<PathBuf>,
    /// Time limit of one export request.
    pub timeout: Duration,
}

impl OtlpConfig {
    /// `None` (traces off) when no endpoint is set, or `OTEL_SDK_DISABLED=true`
    /// or `OTEL_TRACES_EXPORTER=none`.
    pub fn from_env(default_service: &str) -> Result<Option<Self>, TelemetryError> {
        Self::from_lookup(default_service, |k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) over any variable lookup (tests).
    pub fn from_lookup(
        default_service: &str,
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
            service_name: get("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service.to_owned()),
            ca_file: get("OTEL_EXPORTER_OTLP_CERTIFICATE").map(PathBuf::from),
            timeout,
        }))
    }
}

/// The running trace export; [`shutdown`](Self::shutdown) flushes it.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Builds the exporter (batching, on the SDK's own thread). Callable
    /// inside or outside a tokio runtime.
    pub fn start(cfg: &OtlpConfig) -> Result<Self, TelemetryError> {
        let tls = tls_config(cfg.ca_file.as_deref())?;
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
        Ok(Telemetry { provider })
    }

    /// The `tracing` layer that turns [`TRACE_TARGET`] spans into exported
    /// OpenTelemetry spans (log events and other spans are not exported).
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("edge-agent"))
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

fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, TelemetryError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect())
                .map_err(|e| {
                    env_err(
                        "OTEL_EXPORTER_OTLP_CERTIFICATE",
                        format!("{}: {e}", path.display()),
                    )
                })?;
            if certs.is_empty() {
                return Err(env_err(
                    "OTEL_EXPORTER_OTLP_CERTIFICATE",
                    format!("{}: no PEM certificate", path.display()),
                ));
            }
            for c in certs {
                roots.add(c).map_err(|e| {
                    env_err(
                        "OTEL_EXPORTER_OTLP_CERTIFICATE",
                        format!("{}: {e}", path.display()),
                    )
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TelemetryError::Exporter(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The W3C `traceparent` of `span` for `Batch.traceparent`: empty when
/// traces are off (no OpenTelemetry layer) or the span is disabled.
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_send_span_has_a_traceparent_only_when_traces_are_on() {
        let off = tracing::info_span!(target: "vigil_trace", "batch_send");
        assert_eq!(traceparent(&off), "");
        let t = Telemetry {
            provider: SdkTracerProvider::builder().build(),
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
                ("OTEL_SERVICE_NAME", "gw-ward-3"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.traces_url, "https://c.example/t");
        assert_eq!(c.service_name, "gw-ward-3");
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
    }
}
