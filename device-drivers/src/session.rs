//! The one driver shape every protocol shares.
//!
//! A protocol implements [`Protocol::session`]: run one session (association,
//! polling, keep-alive, release) over an already-open byte link, emitting
//! readings through the [`SessionCtx`], until the link fails, the device goes
//! silent, the device refuses, or shutdown. [`run_serial`] owns everything
//! around it: opening the serial port with the protocol's settings,
//! reporting technical readings on state changes, and reconnecting with
//! exponential backoff. A session never needs to know which transport it
//! runs on, so tests drive it over `tokio::io::duplex` or a PTY.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use serde::Deserialize;
use shared_protocol::v1::{Reading, TechnicalKind, TechnicalReading, Waveform};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;
use tokio_serial::SerialPortBuilderExt;

use crate::{DriverOutput, DriverStats, Shutdown};

/// Why a session ended. A device's refusal is distinct from a link failure.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("link failure: {0}")]
    Link(#[source] std::io::Error),
    #[error("link closed by the other end")]
    Eof,
    #[error("no data from the device for {0:?}")]
    Silent(Duration),
    #[error("device refused: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("shutting down")]
    Shutdown,
    #[error("the agent stopped taking readings")]
    Closed,
}

impl DriverError {
    /// The technical reading this ending is reported as, if any.
    pub fn technical_kind(&self) -> Option<TechnicalKind> {
        match self {
            DriverError::Link(_) | DriverError::Eof => Some(TechnicalKind::Disconnected),
            DriverError::Silent(_) | DriverError::Protocol(_) => Some(TechnicalKind::Silent),
            DriverError::Refused(_) => Some(TechnicalKind::DeviceRefused),
            DriverError::Shutdown | DriverError::Closed => None,
        }
    }
}

/// Serial line settings. Each protocol has defaults from its manual; the
/// agent config may override any field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSettings {
    pub baud_rate: u32,
    pub data_bits: DataBits,
    pub parity: Parity,
    pub stop_bits: StopBits,
    pub flow_control: FlowControl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DataBits {
    #[serde(rename = "7")]
    Seven,
    #[serde(rename = "8")]
    Eight,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum StopBits {
    #[serde(rename = "1")]
    One,
    #[serde(rename = "2")]
    Two,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    None,
    /// RTS/CTS.
    Hardware,
    /// XON/XOFF.
    Software,
}

/// Optional per-field overrides from the agent config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialOverrides {
    pub baud_rate: Option<u32>,
    pub data_bits: Option<DataBits>,
    pub parity: Option<Parity>,
    pub stop_bits: Option<StopBits>,
    pub flow_control: Option<FlowControl>,
}

impl SerialSettings {
    pub const fn new(
        baud_rate: u32,
        data_bits: DataBits,
        parity: Parity,
        stop_bits: StopBits,
        flow_control: FlowControl,
    ) -> Self {
        SerialSettings {
            baud_rate,
            data_bits,
            parity,
            stop_bits,
            flow_control,
        }
    }

    pub fn with(self, o: &SerialOverrides) -> Self {
        SerialSettings {
            baud_rate: o.baud_rate.unwrap_or(self.baud_rate),
            data_bits: o.data_bits.unwrap_or(self.data_bits),
            parity: o.parity.unwrap_or(self.parity),
            stop_bits: o.stop_bits.unwrap_or(self.stop_bits),
            flow_control: o.flow_control.unwrap_or(self.flow_control),
        }
    }

    /// Open a serial port (or PTY) with these settings.
    pub fn open(&self, path: &str) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
        tokio_serial::new(path, self.baud_rate)
            .data_bits(match self.data_bits {
                DataBits::Seven => tokio_serial::DataBits::Seven,
                DataBits::Eight => tokio_serial::DataBits::Eight,
            })
            .parity(match self.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            })
            .stop_bits(match self.stop_bits {
                StopBits::One => tokio_serial::StopBits::One,
                StopBits::Two => tokio_serial::StopBits::Two,
            })
            .flow_control(match self.flow_control {
                FlowControl::None => tokio_serial::FlowControl::None,
                FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
                FlowControl::Software => tokio_serial::FlowControl::Software,
            })
            .open_native_async()
    }
}

impl std::fmt::Display for SerialSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = match self.data_bits {
            DataBits::Seven => 7,
            DataBits::Eight => 8,
        };
        let p = match self.parity {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        };
        let s = match self.stop_bits {
            StopBits::One => 1,
            StopBits::Two => 2,
        };
        let fc = match self.flow_control {
            FlowControl::None => "",
            FlowControl::Hardware => " RTS/CTS",
            FlowControl::Software => " XON/XOFF",
        };
        write!(f, "{} {d}{p}{s}{fc}", self.baud_rate)
    }
}

/// A device protocol: one session over an open link.
pub trait Protocol: Send + Sync + 'static {
    /// The agent-config `kind`, e.g. `"masimo-serial"`; also
    /// `DeviceInfo.protocol`.
    fn kind(&self) -> &'static str;
    /// Manufacturer, for `DeviceInfo`.
    fn manufacturer(&self) -> &'static str;
    /// The serial settings the device's manual prescribes.
    fn default_serial(&self) -> SerialSettings;
    /// Run one session until it ends. Return `Ok(())` only on shutdown.
    fn session<L>(
        &self,
        link: L,
        ctx: &mut SessionCtx<'_>,
    ) -> impl Future<Output = Result<(), DriverError>> + Send
    where
        L: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static;
}

/// What a session sees of the agent: where readings go, the counters, the
/// shutdown signal, and the silence limit.
#[derive(Debug)]
pub struct SessionCtx<'a> {
    pub device_id: &'a str,
    pub stats: &'a DriverStats,
    tx: &'a mpsc::Sender<DriverOutput>,
    shutdown: &'a mut Shutdown,
    /// A device that sends nothing for this long is treated as silent.
    pub silence: Duration,
    connected_reported: bool,
    serial_number: Option<String>,
}

impl<'a> SessionCtx<'a> {
    pub fn new(
        device_id: &'a str,
        stats: &'a DriverStats,
        tx: &'a mpsc::Sender<DriverOutput>,
        shutdown: &'a mut Shutdown,
        silence: Duration,
    ) -> Self {
        SessionCtx {
            device_id,
            stats,
            tx,
            shutdown,
            silence,
            connected_reported: false,
            serial_number: None,
        }
    }

    /// Record the serial number the device reported about itself.
    pub fn set_serial_number(&mut self, sn: impl Into<String>) {
        self.serial_number = Some(sn.into());
    }

    async fn send(&mut self, out: DriverOutput) -> Result<(), DriverError> {
        self.tx.send(out).await.map_err(|_| DriverError::Closed)
    }

    /// Hand readings and waveforms to the agent (in device order).
    pub async fn emit(
        &mut self,
        readings: Vec<Reading>,
        waveforms: Vec<Waveform>,
    ) -> Result<(), DriverError> {
        if readings.is_empty() && waveforms.is_empty() {
            return Ok(());
        }
        let out = DriverOutput {
            device_id: self.device_id.to_string(),
            serial_number: self.serial_number.clone(),
            readings,
            waveforms,
            technical: vec![],
        };
        self.send(out).await
    }

    /// Emit a technical reading.
    pub async fn technical(
        &mut self,
        kind: TechnicalKind,
        detail: impl Into<String>,
    ) -> Result<(), DriverError> {
        let out = DriverOutput {
            device_id: self.device_id.to_string(),
            serial_number: self.serial_number.clone(),
            readings: vec![],
            waveforms: vec![],
            technical: vec![TechnicalReading {
                kind: kind as i32,
                time_us: now_us(),
                detail: detail.into(),
                sequence: 0,
            }],
        };
        self.send(out).await
    }

    /// Call once the session is established (association accepted, or the
    /// first valid frame seen): reports CONNECTED once per session.
    pub async fn connected(&mut self) -> Result<(), DriverError> {
        if !self.connected_reported {
            self.connected_reported = true;
            self.stats.connected(true);
            self.technical(TechnicalKind::Connected, "session established")
                .await?;
        }
        Ok(())
    }

    pub fn was_connected(&self) -> bool {
        self.connected_reported
    }

    pub fn is_shutdown(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Read more bytes into `buf`, failing with `Silent` after the silence
    /// limit, `Eof` at end of stream, `Shutdown` when asked to stop.
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        buf: &mut BytesMut,
    ) -> Result<usize, DriverError> {
        self.read_within(r, buf, self.silence).await
    }

    /// Like [`read`](Self::read) with an explicit limit (e.g. an answer
    /// timeout shorter than the silence limit).
    pub async fn read_within<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        buf: &mut BytesMut,
        limit: Duration,
    ) -> Result<usize, DriverError> {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(4096);
        }
        tokio::select! {
            res = tokio::time::timeout(limit, r.read_buf(buf)) => match res {
                Err(_) => Err(DriverError::Silent(limit)),
                Ok(Err(e)) => Err(DriverError::Link(e)),
                Ok(Ok(0)) => Err(DriverError::Eof),
                Ok(Ok(n)) => {
                    self.stats.add_bytes(n);
                    Ok(n)
                }
            },
            _ = self.shutdown.changed() => Err(DriverError::Shutdown),
        }
    }

    /// Sleep, waking early on shutdown.
    pub async fn sleep(&mut self, d: Duration) -> Result<(), DriverError> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = self.shutdown.changed() => Err(DriverError::Shutdown),
        }
    }
}

/// Direction of bytes seen by a [`Tap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the device to the gateway.
    FromDevice,
    /// From the gateway to the device.
    ToDevice,
}

/// Observer of every byte on the link (used by `edge-agent probe`).
pub type Tap = Arc<dyn Fn(Direction, &[u8]) + Send + Sync>;

/// Timing of the runner.
#[derive(Clone)]
pub struct RunOptions {
    /// No data for this long means the device is silent (cable pulled,
    /// monitor off): the session ends and a technical reading is emitted.
    pub silence: Duration,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// Optional observer of the raw bytes.
    pub tap: Option<Tap>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("silence", &self.silence)
            .field("max_backoff", &self.max_backoff)
            .field("tap", &self.tap.is_some())
            .finish()
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            silence: Duration::from_secs(5),
            max_backoff: Duration::from_secs(10),
            tap: None,
        }
    }
}

/// A link wrapper that shows every byte to a [`Tap`].
pub struct Tapped<L> {
    inner: L,
    tap: Tap,
}

impl<L> std::fmt::Debug for Tapped<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tapped")
    }
}

impl<L> Tapped<L> {
    pub fn new(inner: L, tap: Tap) -> Self {
        Tapped { inner, tap }
    }
}

impl<L: AsyncRead + Unpin> AsyncRead for Tapped<L> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                (self.tap)(Direction::FromDevice, new);
            }
        }
        r
    }
}

impl<L: AsyncWrite + Unpin> AsyncWrite for Tapped<L> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            (self.tap)(Direction::ToDevice, &data[..*n]);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Run a protocol on a serial port until shutdown: open, run sessions,
/// report state changes as technical readings (once per change, not per
/// retry), reconnect with exponential backoff. Never returns an error.
// Eight plain arguments read better at the call sites than a one-use struct.
#[allow(clippy::too_many_arguments)]
pub async fn run_serial<P: Protocol>(
    proto: P,
    device_id: String,
    port: String,
    settings: SerialSettings,
    opts: RunOptions,
    stats: Arc<DriverStats>,
    tx: mpsc::Sender<DriverOutput>,
    shutdown: Shutdown,
) {
    let target = format!("{port} ({settings})");
    let connect = move || {
        let r = settings
            .open(&port)
            .map_err(|e| std::io::Error::other(e.to_string()));
        async move { r }
    };
    run_link(proto, device_id, target, connect, opts, stats, tx, shutdown).await
}

/// Run a protocol over links made by `connect` (a serial port, a TCP
/// connection, …), one per session, until shutdown. Same state reporting
/// and backoff as [`run_serial`]. `target` names the link in logs.
#[allow(clippy::too_many_arguments)]
pub async fn run_link<P, L, F, Fut>(
    proto: P,
    device_id: String,
    target: String,
    connect: F,
    opts: RunOptions,
    stats: Arc<DriverStats>,
    tx: mpsc::Sender<DriverOutput>,
    mut shutdown: Shutdown,
) where
    P: Protocol,
    L: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static,
    F: Fn() -> Fut + Send,
    Fut: Future<Output = std::io::Result<L>> + Send,
{
    let mut backoff = Duration::from_millis(250);
    // The last state reported, so an outage is reported once.
    let mut down_reported = false;
    loop {
        if *shutdown.borrow() || tx.is_closed() {
            return;
        }
        let opened = tokio::select! {
            r = connect() => r,
            _ = shutdown.changed() => return,
        };
        let result = match opened {
            Ok(link) => {
                tracing::info!(device_id = %device_id, target = %target, kind = proto.kind(), "link open");
                let mut ctx = SessionCtx::new(&device_id, &stats, &tx, &mut shutdown, opts.silence);
                let r = match &opts.tap {
                    Some(tap) => {
                        proto
                            .session(Tapped::new(link, tap.clone()), &mut ctx)
                            .await
                    }
                    None => proto.session(link, &mut ctx).await,
                };
                if ctx.was_connected() {
                    down_reported = false;
                    backoff = Duration::from_millis(250);
                }
                r.err().unwrap_or(DriverError::Shutdown)
            }
            Err(e) => DriverError::Link(e),
        };
        stats.connected(false);
        match result {
            DriverError::Shutdown | DriverError::Closed => return,
            e => {
                if matches!(e, DriverError::Link(_) | DriverError::Eof) {
                    stats.link_error();
                }
                tracing::warn!(device_id = %device_id, target = %target, error = %e, "device session ended; reconnecting");
                if !down_reported {
                    if let Some(kind) = e.technical_kind() {
                        let mut ctx =
                            SessionCtx::new(&device_id, &stats, &tx, &mut shutdown, opts.silence);
                        if ctx.technical(kind, e.to_string()).await.is_err() {
                            return;
                        }
                        down_reported = true;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(opts.max_backoff);
    }
}

pub(crate) fn now_us() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_field_by_field() {
        let s = SerialSettings::new(
            19200,
            DataBits::Eight,
            Parity::Even,
            StopBits::One,
            FlowControl::Hardware,
        );
        let o: SerialOverrides = toml::from_str("baud_rate = 9600\nparity = \"none\"").unwrap();
        let s2 = s.with(&o);
        assert_eq!(s2.baud_rate, 9600);
        assert_eq!(s2.parity, Parity::None);
        assert_eq!(s2.flow_control, FlowControl::Hardware);
        assert_eq!(s.to_string(), "19200 8E1 RTS/CTS");
        assert!(toml::from_str::<SerialOverrides>("bogus = 1").is_err());
    }

    #[tokio::test]
    async fn read_reports_silence_eof_and_shutdown() {
        let stats = DriverStats::default();
        let (tx, _rx) = mpsc::channel(1);
        let (stop, mut sd) = tokio::sync::watch::channel(false);
        let mut ctx = SessionCtx::new("d", &stats, &tx, &mut sd, Duration::from_millis(50));
        let (mut a, b) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        assert!(matches!(
            ctx.read(&mut a, &mut buf).await,
            Err(DriverError::Silent(_))
        ));
        drop(b);
        assert!(matches!(
            ctx.read(&mut a, &mut buf).await,
            Err(DriverError::Eof)
        ));
        stop.send(true).unwrap();
        let (mut c, _d) = tokio::io::duplex(64);
        assert!(matches!(
            ctx.read(&mut c, &mut buf).await,
            Err(DriverError::Shutdown)
        ));
    }
}
