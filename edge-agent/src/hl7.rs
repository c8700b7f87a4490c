//! The HL7 v2 / MLLP listener (device kind `hl7-mllp`): a TCP server, TLS
//! optional (rustls, ring provider), on the device's `listen` address.
//!
//! For each message: [`device_drivers::hl7::process`] → readings (each with
//! its PID-3 patient identifier) → one [`Buffer::append`] for the whole
//! message → only when that returned Ok (durable) the ACK says AA. A refused
//! message (AE/AR) stores nothing; a failed append answers AE ("temporarily
//! unable"), never AA. The readings' device id is the configured one.
//!
//! Limits: `max_connections` concurrent connections (more are closed at
//! once), `max_message_bytes` per message (larger ones are dropped and
//! answered AR), `max_junk_bytes` of unframed input per connection and
//! `idle_timeout_s` of silence before a connection is closed. The TCP/TLS
//! server, framing and limits are the hub's too ([`vigil_io::mllp`]); this
//! module is its [`Handler`](vigil_io::mllp::Handler).
//!
//! Logs and counters carry the device id, counts, ACK codes and error
//! locations/codes only: never message content, identifiers or values.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use device_drivers::hl7::{self, Hl7Options, MllpError, Outcome, Processed};
use device_drivers::{DriverOutput, DriverStats};
use shared_protocol::v1::DeviceInfo;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use vigil_io::mllp::{self, Counters, Event};
use vigil_io::tls::{self, ClientAuth, Identity, PemFile};

use crate::buffer::Buffer;
use crate::config::DeviceConfig;

/// Parse `listen`: `ip:port`, or an IP alone (port 2575).
pub fn listen_addr(listen: &str) -> Result<SocketAddr, String> {
    let l = listen.trim();
    if let Ok(a) = l.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip = l.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, hl7::DEFAULT_PORT))
        .map_err(|_| format!("{listen:?} is not ip:port (or an IP address, port 2575)"))
}

/// Validate an `hl7-mllp` device's `listen` and options. Errors name the
/// field (`listen` or `options`).
pub fn check(dev: &DeviceConfig) -> Result<Hl7Options, (&'static str, String)> {
    let listen = dev.listen.as_deref().unwrap_or_default();
    let addr = listen_addr(listen).map_err(|m| ("listen", m))?;
    let opts: Hl7Options = toml::Value::Table(dev.options.clone())
        .try_into()
        .map_err(|e: toml::de::Error| ("options", e.message().to_string()))?;
    opts.validate().map_err(|m| ("options", m))?;
    // TLS off loopback, as for the hub.
    if !opts.tls() && !addr.ip().is_loopback() && !opts.allow_plaintext {
        return Err((
            "options",
            format!(
                "{addr} is not a loopback address: set tls_cert_file/tls_key_file, or \
                 allow_plaintext = true on a network you trust"
            ),
        ));
    }
    Ok(opts)
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct Hl7Stats {
    /// Connections accepted and refused, bytes dropped by the framer.
    pub listener: Counters,
    /// Messages answered AA (readings durably buffered).
    pub messages_accepted: AtomicU64,
    /// Messages answered AE for their content.
    pub messages_refused: AtomicU64,
    /// Messages answered AR.
    pub messages_rejected: AtomicU64,
    /// Messages answered AE because the buffer did not take them.
    pub store_errors: AtomicU64,
    pub readings_accepted: AtomicU64,
    /// The same traffic as the status endpoint's per-device counters
    /// (`vigil_agent_device_*`): a frame ok per message answered AA, a
    /// frame bad per message answered AE/AR and per resync over junk,
    /// with the bytes dropped.
    pub device: Arc<DriverStats>,
}

impl Hl7Stats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Where accepted messages go: the durable buffer in the agent. Ok means
/// durably stored (only then is the ACK AA).
pub trait Sink: Send + Sync + std::fmt::Debug + 'static {
    fn store(
        &self,
        out: DriverOutput,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

impl Sink for Buffer {
    fn store(
        &self,
        out: DriverOutput,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            self.append(vec![out])
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

#[derive(Debug)]
struct Ctx {
    device_id: String,
    opts: Hl7Options,
    sink: Arc<dyn Sink>,
    notify: Arc<Notify>,
    stats: Arc<Hl7Stats>,
    acks: AtomicU64,
}

/// A bound listener, ready to [`serve`](Self::serve).
#[derive(Debug)]
pub struct Hl7Listener {
    device_id: String,
    opts: Hl7Options,
    server: mllp::Server,
    stats: Arc<Hl7Stats>,
}

impl Hl7Listener {
    /// Validate the device config, load TLS material, bind.
    pub async fn bind(dev: &DeviceConfig) -> Result<Self, String> {
        let opts = check(dev).map_err(|(f, m)| format!("{f}: {m}"))?;
        let addr = listen_addr(dev.listen.as_deref().unwrap_or_default())?;
        let tls = match (&opts.tls_cert_file, &opts.tls_key_file) {
            (Some(c), Some(k)) => Some(load_tls(c, k)?),
            _ => None,
        };
        let limits = mllp::Limits {
            max_connections: opts.max_connections,
            max_message_bytes: opts.max_message_bytes,
            max_junk_bytes: opts.max_junk_bytes,
            idle_timeout: Duration::from_secs(opts.idle_timeout_s),
            handshake_timeout: mllp::HANDSHAKE_TIMEOUT,
        };
        let server = mllp::Server::bind(addr, tls, limits)
            .await
            .map_err(|e| format!("listen {addr}: {e}"))?;
        Ok(Hl7Listener {
            device_id: dev.id.clone(),
            opts,
            server,
            stats: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    pub fn stats(&self) -> Arc<Hl7Stats> {
        self.stats.clone()
    }

    /// `DeviceInfo` for the hub, from the config (an HL7 source does not
    /// describe itself here).
    pub fn device_info(dev: &DeviceConfig) -> DeviceInfo {
        DeviceInfo {
            device_id: dev.id.clone(),
            protocol: hl7::KIND.into(),
            manufacturer: String::new(),
            model: dev.model.clone(),
            serial_number: String::new(),
            location: dev.location.clone(),
        }
    }

    /// Accept connections until shutdown; then wait for the open
    /// connections to finish the message in hand.
    pub async fn serve(
        self,
        buffer: Arc<Buffer>,
        notify: Arc<Notify>,
        shutdown: watch::Receiver<bool>,
    ) {
        self.serve_with(buffer, notify, shutdown).await
    }

    /// [`serve`](Self::serve) into any [`Sink`].
    pub async fn serve_with(
        self,
        sink: Arc<dyn Sink>,
        notify: Arc<Notify>,
        shutdown: watch::Receiver<bool>,
    ) {
        let ctx = Arc::new(Ctx {
            device_id: self.device_id,
            opts: self.opts,
            sink,
            notify,
            stats: self.stats,
            acks: AtomicU64::new(0),
        });
        self.server.serve(ctx, shutdown).await
    }
}

/// The agent's part of the MLLP server: messages into the buffer, the
/// listener's logs and counters.
impl mllp::Handler for Ctx {
    async fn message(&self, _peer: &mllp::Peer, message: Vec<u8>) -> Vec<u8> {
        self.handle(&message).await
    }

    fn oversized(&self, head: &[u8], max: usize) -> Vec<u8> {
        Hl7Stats::add(&self.stats.messages_rejected, 1);
        tracing::warn!(device_id = %self.device_id, max, "HL7 message too large; AR");
        let p = Processed {
            target: hl7::AckTarget::best_effort(head),
            outcome: Outcome::Reject(hl7::AckError {
                location: "MSH".into(),
                code: 207,
                text: format!("message larger than {max} bytes"),
            }),
        };
        self.ack(&p, false)
    }

    fn counters(&self) -> &Counters {
        &self.stats.listener
    }

    fn event(&self, event: Event<'_>) {
        let device_id = &self.device_id;
        match event {
            Event::Ready { listen, tls } => {
                tracing::info!(device_id = %device_id, listen = ?listen, tls, "HL7 MLLP listener ready")
            }
            Event::AcceptFailed(e) => {
                tracing::warn!(device_id = %device_id, error = %e, "accept failed")
            }
            Event::Refused { max } => {
                tracing::warn!(device_id = %device_id, max,
                    "too many HL7 connections; closing the new one")
            }
            Event::Connected { peer } => {
                tracing::debug!(device_id = %device_id, peer = %peer.ip(), "HL7 connection")
            }
            Event::HandshakeFailed(e) => {
                tracing::warn!(device_id = %device_id, error = %e, "TLS handshake failed")
            }
            Event::HandshakeTimedOut => {
                tracing::warn!(device_id = %device_id, "TLS handshake timed out")
            }
            Event::Unframed(e) => {
                self.stats.device.frame_error(e.dropped());
                if !matches!(e, MllpError::Oversized { .. }) {
                    tracing::debug!(device_id = %device_id, dropped = e.dropped(), "MLLP resync");
                }
            }
            Event::TooMuchJunk { junk } => {
                tracing::warn!(device_id = %device_id, junk,
                    "too much unframed input; closing the connection")
            }
            Event::Idle => tracing::debug!(device_id = %device_id, "HL7 connection idle; closing"),
            Event::Stopped => {
                let s = &self.stats;
                tracing::info!(
                    device_id = %device_id,
                    connections = Counters::get(&s.listener.connections),
                    messages_accepted = Hl7Stats::get(&s.messages_accepted),
                    messages_refused = Hl7Stats::get(&s.messages_refused),
                    messages_rejected = Hl7Stats::get(&s.messages_rejected),
                    store_errors = Hl7Stats::get(&s.store_errors),
                    readings_accepted = Hl7Stats::get(&s.readings_accepted),
                    bytes_dropped = Counters::get(&s.listener.bytes_dropped),
                    "HL7 listener stopped"
                );
            }
            _ => {}
        }
    }
}

impl Ctx {
    fn ack(&self, p: &Processed, stored: bool) -> Vec<u8> {
        let now = OffsetDateTime::now_utc();
        let n = self.acks.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "{:x}{:04x}",
            (now.unix_timestamp_nanos() / 1000) as i64,
            n & 0xffff
        );
        hl7::ack_for(p, stored, now, &id)
    }

    /// Process one message; the ACK to send.
    async fn handle(&self, bytes: &[u8]) -> Vec<u8> {
        let now_us = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
        let p = hl7::process(bytes, &self.opts, now_us);
        let stored = match &p.outcome {
            Outcome::Accept { readings, skipped } => {
                let n = readings.len();
                let ok = if n == 0 {
                    true
                } else {
                    let out = DriverOutput {
                        device_id: self.device_id.clone(),
                        serial_number: None,
                        readings: readings.clone(),
                        waveforms: vec![],
                        technical: vec![],
                    };
                    match self.sink.store(out).await {
                        Ok(_) => {
                            self.notify.notify_one();
                            true
                        }
                        Err(e) => {
                            tracing::error!(device_id = %self.device_id, error = %e,
                                "buffer did not take an HL7 message; answering AE");
                            false
                        }
                    }
                };
                if ok {
                    self.stats.device.frame_ok();
                    Hl7Stats::add(&self.stats.messages_accepted, 1);
                    Hl7Stats::add(&self.stats.readings_accepted, n as u64);
                    tracing::debug!(device_id = %self.device_id, readings = n, skipped, "HL7 message accepted");
                } else {
                    Hl7Stats::add(&self.stats.store_errors, 1);
                }
                ok
            }
            Outcome::Error(errors) => {
                self.stats.device.frame_error(0);
                Hl7Stats::add(&self.stats.messages_refused, 1);
                let at: Vec<String> = errors
                    .iter()
                    .map(|e| format!("{}:{}", e.location, e.code))
                    .collect();
                tracing::warn!(device_id = %self.device_id, errors = ?at, "HL7 message refused (AE); nothing stored");
                false
            }
            Outcome::Reject(e) => {
                self.stats.device.frame_error(0);
                Hl7Stats::add(&self.stats.messages_rejected, 1);
                tracing::warn!(device_id = %self.device_id, location = %e.location, code = e.code,
                    "HL7 message rejected (AR)");
                false
            }
        };
        self.ack(&p, stored)
    }
}

fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let identity = Identity::load(
        PemFile::new("tls_cert_file", cert),
        PemFile::new("tls_key_file", key),
    )
    .map_err(|e| e.to_string())?;
    let config = tls::server_config(identity, ClientAuth::None).map_err(|e| match e {
        tls::TlsError::CertKey(_) => format!("tls {e}"),
        e => e.to_string(),
    })?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
