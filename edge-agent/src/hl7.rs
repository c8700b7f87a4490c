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
//! `idle_timeout_s` of silence before a connection is closed.
//!
//! Logs and counters carry the device id, counts, ACK codes and error
//! locations/codes only: never message content, identifiers or values.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use device_drivers::hl7::{self, Hl7Options, MllpDecoder, MllpError, Outcome, Processed};
use device_drivers::{DriverOutput, DriverStats};
use shared_protocol::v1::DeviceInfo;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;

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
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Messages answered AA (readings durably buffered).
    pub messages_accepted: AtomicU64,
    /// Messages answered AE for their content.
    pub messages_refused: AtomicU64,
    /// Messages answered AR.
    pub messages_rejected: AtomicU64,
    /// Messages answered AE because the buffer did not take them.
    pub store_errors: AtomicU64,
    pub readings_accepted: AtomicU64,
    pub bytes_dropped: AtomicU64,
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
pub struct Hl7Listener {
    device_id: String,
    opts: Hl7Options,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stats: Arc<Hl7Stats>,
}

impl std::fmt::Debug for Hl7Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hl7Listener")
            .field("device_id", &self.device_id)
            .field("listen", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Hl7Listener {
    /// Validate the device config, load TLS material, bind.
    pub async fn bind(dev: &DeviceConfig) -> Result<Self, String> {
        let opts = check(dev).map_err(|(f, m)| format!("{f}: {m}"))?;
        let addr = listen_addr(dev.listen.as_deref().unwrap_or_default())?;
        let tls = match (&opts.tls_cert_file, &opts.tls_key_file) {
            (Some(c), Some(k)) => Some(tokio_rustls::TlsAcceptor::from(load_tls(c, k)?)),
            _ => None,
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("listen {addr}: {e}"))?;
        Ok(Hl7Listener {
            device_id: dev.id.clone(),
            opts,
            listener,
            tls,
            stats: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
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
        mut shutdown: watch::Receiver<bool>,
    ) {
        let addr = self.listener.local_addr().ok();
        tracing::info!(device_id = %self.device_id, listen = ?addr, tls = self.tls.is_some(),
            "HL7 MLLP listener ready");
        let limit = Arc::new(Semaphore::new(self.opts.max_connections));
        let ctx = Arc::new(Ctx {
            device_id: self.device_id.clone(),
            opts: self.opts.clone(),
            sink,
            notify,
            stats: self.stats.clone(),
            acks: AtomicU64::new(0),
        });
        let mut conns = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(device_id = %ctx.device_id, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                Hl7Stats::add(&ctx.stats.connections_refused, 1);
                tracing::warn!(device_id = %ctx.device_id, max = ctx.opts.max_connections,
                    "too many HL7 connections; closing the new one");
                drop(stream);
                continue;
            };
            Hl7Stats::add(&ctx.stats.connections, 1);
            let _ = stream.set_nodelay(true);
            let ctx = ctx.clone();
            let tls = self.tls.clone();
            let sd = shutdown.clone();
            conns.spawn(async move {
                let _permit = permit;
                tracing::debug!(device_id = %ctx.device_id, peer = %peer.ip(), "HL7 connection");
                match tls {
                    Some(acc) => {
                        let hs = tokio::time::timeout(Duration::from_secs(10), acc.accept(stream));
                        match hs.await {
                            Ok(Ok(s)) => connection(s, &ctx, sd).await,
                            Ok(Err(e)) => {
                                tracing::warn!(device_id = %ctx.device_id, error = %e, "TLS handshake failed")
                            }
                            Err(_) => {
                                tracing::warn!(device_id = %ctx.device_id, "TLS handshake timed out")
                            }
                        }
                    }
                    None => connection(stream, &ctx, sd).await,
                }
            });
        }
        drop(self.listener);
        while conns.join_next().await.is_some() {}
        let s = &self.stats;
        tracing::info!(
            device_id = %self.device_id,
            connections = Hl7Stats::get(&s.connections),
            messages_accepted = Hl7Stats::get(&s.messages_accepted),
            messages_refused = Hl7Stats::get(&s.messages_refused),
            messages_rejected = Hl7Stats::get(&s.messages_rejected),
            store_errors = Hl7Stats::get(&s.store_errors),
            readings_accepted = Hl7Stats::get(&s.readings_accepted),
            bytes_dropped = Hl7Stats::get(&s.bytes_dropped),
            "HL7 listener stopped"
        );
    }
}

/// One connection: MLLP in, one ACK out per message, in order.
async fn connection<S>(mut stream: S, ctx: &Ctx, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut dec = MllpDecoder::new(ctx.opts.max_message_bytes);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut junk = 0usize;
    let idle = Duration::from_secs(ctx.opts.idle_timeout_s);
    loop {
        loop {
            let reply = match dec.decode(&mut buf) {
                Ok(Some(msg)) => Some(ctx.message(&msg).await),
                Ok(None) => break,
                Err(e) => {
                    // Unframed bytes count toward the junk limit; an oversized
                    // message is answered (AR) and skipped without buffering.
                    if !matches!(e, MllpError::Oversized { .. }) {
                        junk += e.dropped();
                    }
                    Hl7Stats::add(&ctx.stats.bytes_dropped, e.dropped() as u64);
                    ctx.stats.device.frame_error(e.dropped());
                    match e {
                        MllpError::Oversized { head, max, .. } => {
                            Hl7Stats::add(&ctx.stats.messages_rejected, 1);
                            tracing::warn!(device_id = %ctx.device_id, max, "HL7 message too large; AR");
                            let p = Processed {
                                target: hl7::AckTarget::best_effort(&head),
                                outcome: Outcome::Reject(hl7::AckError {
                                    location: "MSH".into(),
                                    code: 207,
                                    text: format!("message larger than {max} bytes"),
                                }),
                            };
                            Some(ctx.ack(&p, false))
                        }
                        _ => {
                            tracing::debug!(device_id = %ctx.device_id, dropped = e.dropped(), "MLLP resync");
                            None
                        }
                    }
                }
            };
            if let Some(ack) = reply
                && stream.write_all(&hl7::mllp_encode(&ack)).await.is_err()
            {
                return;
            }
            if junk > ctx.opts.max_junk_bytes {
                tracing::warn!(device_id = %ctx.device_id, junk, "too much unframed input; closing the connection");
                return;
            }
        }
        let _ = stream.flush().await;
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let read = tokio::select! {
            r = tokio::time::timeout(idle, stream.read_buf(&mut buf)) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                tracing::debug!(device_id = %ctx.device_id, "HL7 connection idle; closing");
                return;
            }
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
    async fn message(&self, bytes: &[u8]) -> Vec<u8> {
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
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(key).map_err(|e| format!("tls_key_file {}: {e}", key.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "tls_key_file {} is accessible by group or others; chmod 600 it",
                key.display()
            ));
        }
    }
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls_cert_file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_cert_file {}: no certificate found",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("tls_key_file {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls certificate/key: {e}"))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
