//! Optional OpenTelemetry traces.
//!
//! Off unless the standard `OTEL_*` environment names a collector
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`):
//! then the agent's trace spans (target [`TRACE_TARGET`], one per batch send
//! attempt) are exported over OTLP/HTTP, and each batch carries its send
//! span's W3C `traceparent` (`Batch.traceparent`) so that the hub's ingest
//! span joins the same trace. Span attributes are ids, counts and timings
//! only, never patient data. The export and the `traceparent` helpers are
//! shared with the hub ([`vigil_io::telemetry`]); this module names the
//! agent.

pub use vigil_io::telemetry::{
    OtlpConfig, TRACE_TARGET, TRACEPARENT_LEN, Telemetry, TelemetryError, traceparent,
};

/// Service name (and tracer name) when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "edge-agent";
