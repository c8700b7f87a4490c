//! The I/O that edge-agent and cloud-hub share, written once:
//!
//! - [`telemetry`]: optional OpenTelemetry trace export (OTLP/HTTP, from the
//!   standard `OTEL_*` environment) and the W3C `traceparent` helpers;
//! - [`tls`]: rustls configurations with the ring provider (servers with
//!   optional client-certificate verification; clients with a pinned CA or
//!   the public roots and an optional client certificate), PEM loading with
//!   errors that name the setting;
//! - [`private_fs`]: files only their owner may read (`0600` in `0700`
//!   directories, whatever the umask);
//! - [`mllp`]: the MLLP (HL7 v2 over TCP, TLS optional) server with its
//!   limits, counters and graceful shutdown; what a message means is the
//!   program's [`mllp::Handler`].
//!
//! The sans-IO protocol code (protobuf, HL7 v2 and MLLP codec) stays in
//! `shared-protocol`, which does no I/O; this crate is where that I/O lives.

pub mod mllp;
pub mod private_fs;
pub mod telemetry;
pub mod tls;
