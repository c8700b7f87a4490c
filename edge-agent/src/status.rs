//! The agent's status endpoint, for the gateway's own monitoring: `GET
//! /healthz` and Prometheus `GET /metrics` (text format 0.0.4). It has no
//! authentication, so it listens on loopback only unless
//! `status.allow_non_loopback` says otherwise. Labels carry gateway-local
//! device ids only: never patient data.
//!
//! Metrics (names, labels, meaning):
//! - `vigil_agent_device_frames_total{device,outcome="ok|bad"}`: frames decoded / refused.
//! - `vigil_agent_device_bytes_dropped_total{device}`: bytes skipped while resynchronising.
//! - `vigil_agent_device_link_errors_total{device}`: link failures (port gone, I/O error).
//! - `vigil_agent_device_exceptions_total{device}`, `vigil_agent_device_timeouts_total{device}`: refused / unanswered requests (polled protocols).
//! - `vigil_agent_device_connected{device}`: 1 while a session is established.
//! - `vigil_agent_device_last_frame_timestamp_seconds{device}`: time of the last valid frame (0 = never).
//! - `vigil_agent_buffer_records`, `vigil_agent_buffer_items`, `vigil_agent_buffer_bytes`, `vigil_agent_buffer_max_bytes`: what waits for delivery, and the bound.
//! - `vigil_agent_buffer_oldest_age_seconds`: age of the oldest waiting item (0 when empty).
//! - `vigil_agent_buffer_dropped_total`: items dropped by the drop-oldest overflow policy since start.
//! - `vigil_agent_buffer_refused_total{reason="policy|io"}`: items refused since start: by the refuse-new policy (or too large), or because the buffer could not write (disk full, I/O error) for longer than the writer could hold them.
//! - `vigil_agent_buffer_write_errors_total`: failed buffer writes (disk full, I/O error) since start.
//! - `vigil_agent_buffer_writable`: 1 while the buffer writes, 0 from a failed write until it recovers (`/healthz` answers 503 meanwhile).
//! - `vigil_agent_buffer_quarantined_total`: records that failed authentication or decoding.
//! - `vigil_agent_buffer_locked_records`: records sealed under a buffer key no configured key opens (kept unsent until the key is restored; see docs/agent.md).
//! - `vigil_agent_uplink_batches_total`, `vigil_agent_uplink_items_total{outcome="accepted|duplicate|rejected"}`: hub acks.
//! - `vigil_agent_uplink_send_failures_total`: failed sends (each retry counts).
//! - `vigil_agent_uplink_ack_mismatches_total`: hub acks that can never match their batch (the hub holds another batch under that sequence); the records are kept and re-sent under a new batch sequence.
//! - `vigil_agent_uplink_up`: 1 if the last send reached the hub.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use device_drivers::DriverStats;

use crate::ForwardStats;
use crate::buffer::Buffer;

/// Everything the endpoint reports.
#[derive(Debug, Clone)]
pub struct Status {
    pub gateway_id: String,
    pub buffer: Arc<Buffer>,
    pub devices: Vec<(String, Arc<DriverStats>)>,
    pub forward: Arc<ForwardStats>,
}

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A per-device family: name, type, help, and how to read it.
type PerDevice = (
    &'static str,
    &'static str,
    &'static str,
    fn(&device_drivers::DriverStatsSnapshot) -> f64,
);

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escape a label value (Prometheus text format).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Status {
    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let snaps: Vec<(String, device_drivers::DriverStatsSnapshot)> = self
            .devices
            .iter()
            .map(|(id, s)| (label(id), s.snapshot()))
            .collect();
        family(
            &mut o,
            "vigil_agent_device_frames_total",
            "counter",
            "Frames decoded (ok) or refused (bad), per device.",
        );
        for (d, s) in &snaps {
            let _ = writeln!(
                o,
                "vigil_agent_device_frames_total{{device=\"{d}\",outcome=\"ok\"}} {}",
                s.frames_ok
            );
            let _ = writeln!(
                o,
                "vigil_agent_device_frames_total{{device=\"{d}\",outcome=\"bad\"}} {}",
                s.frames_bad
            );
        }
        let per_device: [PerDevice; 6] = [
            (
                "vigil_agent_device_bytes_dropped_total",
                "counter",
                "Bytes skipped while resynchronising.",
                |s| s.bytes_dropped as f64,
            ),
            (
                "vigil_agent_device_link_errors_total",
                "counter",
                "Link failures (port gone, I/O error).",
                |s| s.link_errors as f64,
            ),
            (
                "vigil_agent_device_exceptions_total",
                "counter",
                "Requests the device refused (polled protocols).",
                |s| s.exceptions as f64,
            ),
            (
                "vigil_agent_device_timeouts_total",
                "counter",
                "Requests the device did not answer in time.",
                |s| s.timeouts as f64,
            ),
            (
                "vigil_agent_device_connected",
                "gauge",
                "1 while a session with the device is established.",
                |s| f64::from(u8::from(s.connected)),
            ),
            (
                "vigil_agent_device_last_frame_timestamp_seconds",
                "gauge",
                "Time of the last valid frame (Unix seconds; 0 = never).",
                |s| s.last_frame_us as f64 / 1e6,
            ),
        ];
        for (name, kind, help, f) in per_device {
            family(&mut o, name, kind, help);
            for (d, s) in &snaps {
                let _ = writeln!(o, "{name}{{device=\"{d}\"}} {}", f(s));
            }
        }
        let b = &self.buffer;
        let gauges: [(&str, &str, &str, f64); 9] = [
            (
                "vigil_agent_buffer_records",
                "gauge",
                "Records waiting for delivery.",
                b.pending_records() as f64,
            ),
            (
                "vigil_agent_buffer_items",
                "gauge",
                "Readings, waveforms and technical readings waiting for delivery.",
                b.pending_readings() as f64,
            ),
            (
                "vigil_agent_buffer_bytes",
                "gauge",
                "Bytes of encrypted records waiting.",
                b.pending_bytes() as f64,
            ),
            (
                "vigil_agent_buffer_max_bytes",
                "gauge",
                "The buffer bound.",
                b.limits().max_bytes as f64,
            ),
            (
                "vigil_agent_buffer_oldest_age_seconds",
                "gauge",
                "Age of the oldest waiting item (0 when empty).",
                b.oldest_age_us().map_or(0.0, |us| us as f64 / 1e6),
            ),
            (
                "vigil_agent_buffer_dropped_total",
                "counter",
                "Items dropped by the drop-oldest policy since start.",
                b.dropped_total() as f64,
            ),
            (
                "vigil_agent_buffer_quarantined_total",
                "counter",
                "Records quarantined (failed authentication or decoding).",
                b.quarantined() as f64,
            ),
            (
                "vigil_agent_buffer_locked_records",
                "gauge",
                "Records sealed under a buffer key no configured key opens (kept, not sent).",
                b.locked().records as f64,
            ),
            (
                "vigil_agent_uplink_up",
                "gauge",
                "1 if the last send reached the hub.",
                f64::from(u8::from(self.forward.uplink_up.load(Ordering::Relaxed))),
            ),
        ];
        for (name, kind, help, v) in gauges {
            family(&mut o, name, kind, help);
            let _ = writeln!(o, "{name} {v}");
            if name == "vigil_agent_buffer_dropped_total" {
                family(
                    &mut o,
                    "vigil_agent_buffer_refused_total",
                    "counter",
                    "Items refused since start: by the refuse-new policy, or because the buffer could not write.",
                );
                for (reason, v) in [("policy", b.refused_total()), ("io", b.refused_io_total())] {
                    let _ = writeln!(
                        o,
                        "vigil_agent_buffer_refused_total{{reason=\"{reason}\"}} {v}"
                    );
                }
            }
            if name == "vigil_agent_buffer_locked_records" {
                for (name, kind, help, v) in [
                    (
                        "vigil_agent_buffer_write_errors_total",
                        "counter",
                        "Failed buffer writes (disk full, I/O error) since start.",
                        b.write_errors_total() as f64,
                    ),
                    (
                        "vigil_agent_buffer_writable",
                        "gauge",
                        "1 while the buffer writes; 0 from a failed write until it recovers.",
                        f64::from(u8::from(b.writable())),
                    ),
                ] {
                    family(&mut o, name, kind, help);
                    let _ = writeln!(o, "{name} {v}");
                }
            }
        }
        let f = &self.forward;
        family(
            &mut o,
            "vigil_agent_uplink_batches_total",
            "counter",
            "Batches acknowledged by the hub.",
        );
        let _ = writeln!(
            o,
            "vigil_agent_uplink_batches_total {}",
            f.batches_sent.load(Ordering::Relaxed)
        );
        family(
            &mut o,
            "vigil_agent_uplink_items_total",
            "counter",
            "Items in acknowledged batches, by the hub's outcome.",
        );
        for (outcome, v) in [
            ("accepted", &f.readings_acked),
            ("duplicate", &f.readings_duplicate),
            ("rejected", &f.readings_rejected_by_hub),
        ] {
            let _ = writeln!(
                o,
                "vigil_agent_uplink_items_total{{outcome=\"{outcome}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        family(
            &mut o,
            "vigil_agent_uplink_send_failures_total",
            "counter",
            "Failed sends to the hub (each retry counts).",
        );
        let _ = writeln!(
            o,
            "vigil_agent_uplink_send_failures_total {}",
            f.send_failures.load(Ordering::Relaxed)
        );
        family(
            &mut o,
            "vigil_agent_uplink_ack_mismatches_total",
            "counter",
            "Hub acks that can never match their batch (records kept, re-sent under a new batch sequence).",
        );
        let _ = writeln!(
            o,
            "vigil_agent_uplink_ack_mismatches_total {}",
            f.ack_mismatches.load(Ordering::Relaxed)
        );
        o
    }
}

async fn metrics(State(s): State<Arc<Status>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], s.render())
}

/// `/healthz`: 200 `"status":"ok"`, or 503 `"status":"degraded"` with the
/// reason while the buffer cannot write (readings are held or refused).
async fn healthz(State(s): State<Arc<Status>>) -> impl IntoResponse {
    let (code, status, reason) = match s.buffer.write_failure() {
        None => (StatusCode::OK, "ok", String::new()),
        Some((f, error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "degraded",
            format!(
                ",\"reason\":\"buffer not writable: {}\",\"buffer_write_errors\":{},\"refused_io\":{}",
                label(&error),
                f.errors,
                f.refused
            ),
        ),
    };
    let body = format!(
        "{{\"status\":\"{status}\",\"gateway_id\":\"{}\",\"pending_items\":{},\"uplink_up\":{},\"buffer_writable\":{}{reason}}}",
        label(&s.gateway_id),
        s.buffer.pending_readings(),
        s.forward.uplink_up.load(Ordering::Relaxed),
        s.buffer.writable()
    );
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

pub fn router(status: Arc<Status>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(status)
}

/// Serve until `shutdown`; returns the bound address through `bound`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    status: Arc<Status>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "status endpoint listening (/healthz, /metrics)");
    axum::serve(listener, router(status))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

/// Every metric family the endpoint serves (the module docs describe each).
pub const METRIC_FAMILIES: &[&str] = &[
    "vigil_agent_device_frames_total",
    "vigil_agent_device_bytes_dropped_total",
    "vigil_agent_device_link_errors_total",
    "vigil_agent_device_exceptions_total",
    "vigil_agent_device_timeouts_total",
    "vigil_agent_device_connected",
    "vigil_agent_device_last_frame_timestamp_seconds",
    "vigil_agent_buffer_records",
    "vigil_agent_buffer_items",
    "vigil_agent_buffer_bytes",
    "vigil_agent_buffer_max_bytes",
    "vigil_agent_buffer_oldest_age_seconds",
    "vigil_agent_buffer_dropped_total",
    "vigil_agent_buffer_refused_total",
    "vigil_agent_buffer_quarantined_total",
    "vigil_agent_buffer_locked_records",
    "vigil_agent_buffer_write_errors_total",
    "vigil_agent_buffer_writable",
    "vigil_agent_uplink_up",
    "vigil_agent_uplink_batches_total",
    "vigil_agent_uplink_items_total",
    "vigil_agent_uplink_send_failures_total",
    "vigil_agent_uplink_ack_mismatches_total",
];

#[cfg(test)]
mod tests {
    use super::*;
    use device_drivers::DriverOutput;
    use shared_protocol::v1::Reading;

    #[tokio::test]
    async fn served_families_are_exactly_the_documented_ones_and_values_are_current() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Arc::new(Buffer::open(dir.path(), &[1u8; 32]).unwrap());
        let stats = Arc::new(DriverStats::default());
        stats.frame_ok();
        stats.frame_error(7);
        buffer
            .append(vec![DriverOutput {
                device_id: "bed\"7".into(),
                readings: vec![Reading {
                    gateway_time_us: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }])
            .await
            .unwrap();
        let status = Status {
            gateway_id: "gw".into(),
            buffer,
            devices: vec![("bed\"7".into(), stats)],
            forward: Arc::new(ForwardStats::default()),
        };
        let text = status.render();
        let served: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            served, METRIC_FAMILIES,
            "update the module docs and METRIC_FAMILIES together"
        );
        // Module docs name every family.
        let docs = include_str!("status.rs");
        for f in METRIC_FAMILIES {
            assert!(
                docs.contains(&format!("//! - `{f}")) || docs.contains(&format!("`, `{f}")),
                "{f} undocumented"
            );
        }
        assert!(
            text.contains("vigil_agent_device_frames_total{device=\"bed\\\"7\",outcome=\"bad\"} 1"),
            "{text}"
        );
        assert!(text.contains("vigil_agent_device_bytes_dropped_total{device=\"bed\\\"7\"} 7"));
        assert!(text.contains("vigil_agent_buffer_items 1\n"));
        assert!(text.contains("vigil_agent_uplink_up 0\n"));
        assert!(text.contains("vigil_agent_buffer_refused_total{reason=\"io\"} 0\n"));
        assert!(text.contains("vigil_agent_buffer_writable 1\n"));
        // Every sample line is `name{labels} number`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }
}
