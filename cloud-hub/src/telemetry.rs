//! Optional OpenTelemetry traces, and the log filter ([`log_filter`]).
//!
//! Off unless the standard `OTEL_*` environment names a collector
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`):
//! then the hub's trace spans (target [`TRACE_TARGET`], one per ingested
//! batch) are exported over OTLP/HTTP. A batch that carries the agent's W3C
//! `traceparent` (`Batch.traceparent`) gets an ingest span that is a child
//! of the agent's send span ([`adopt_remote_parent`]). Span attributes are
//! ids, counts and timings only, never patient data. The export and the
//! `traceparent` helpers are shared with the agent
//! ([`vigil_io::telemetry`]); this module names the hub.

pub use vigil_io::telemetry::{
    InvalidTraceparent, OtlpConfig, RemoteParent, TRACE_TARGET, Telemetry, TelemetryError,
    adopt_remote_parent, remote_context,
};

/// Service name (and tracer name) when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "cloud-hub";

/// A log filter (`RUST_LOG` syntax) for the hub's logs: every directive
/// that names the hub's crate (`cloud_hub`, `cloud_hub::mqtt_ingest`, …)
/// also applies to the transport layer's crate under the same module path
/// (`hub_transport`, `hub_transport::mqtt_ingest`, …), where most of the
/// hub's logging happens since it became its own crate: a filter written
/// for the hub keeps selecting the same log lines.
pub fn log_filter(spec: &str) -> String {
    let mut directives: Vec<&str> = spec.split(',').collect();
    let aliases: Vec<String> = directives
        .iter()
        .filter_map(|d| d.trim().strip_prefix("cloud_hub"))
        .filter(|rest| rest.is_empty() || rest.starts_with(['=', ':', '[']))
        .map(|rest| format!("hub_transport{rest}"))
        .collect();
    directives.extend(aliases.iter().map(String::as_str));
    directives.join(",")
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn hub_directives_also_name_the_transport_layer() {
        assert_eq!(
            log_filter("cloud_hub=info"),
            "cloud_hub=info,hub_transport=info"
        );
        assert_eq!(
            log_filter("warn,cloud_hub::mqtt_ingest=debug,hub_sqlite=trace"),
            "warn,cloud_hub::mqtt_ingest=debug,hub_sqlite=trace,hub_transport::mqtt_ingest=debug"
        );
        assert_eq!(log_filter("info"), "info");
        assert_eq!(log_filter("cloud_hubx=info"), "cloud_hubx=info");
        assert_eq!(log_filter("cloud_hub"), "cloud_hub,hub_transport");
    }
}
