//! Optional OpenTelemetry traces.
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
