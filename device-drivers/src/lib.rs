//! Device drivers for Vigil's edge agent.
//!
//! Each protocol lives in its own module, split the same way:
//! - `codec`: sans-IO parsing/encoding over bytes, one decoder contract
//!   `decode(&mut BytesMut) -> Result<Option<Frame>, Error>` (`Ok(None)` =
//!   need more bytes), frame size caps, resync on corruption with the dropped
//!   bytes reported;
//! - the module root: mapping of frames to [`shared_protocol::v1::Reading`]s
//!   and a thin async driver over `AsyncRead`/`AsyncWrite` (serial port,
//!   socket) that reconnects on failure.
//!
//! Drivers never assign sequence numbers or touch storage: the agent does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shared_protocol::v1::{Reading, TechnicalReading, Waveform};

pub mod ble;
pub mod datex;
pub mod hl7;
pub mod intellivue;
pub mod masimo;
pub mod medibus;
pub mod modbus;
pub mod nonin;
pub mod session;
pub mod udp;

pub use session::{
    Direction, DriverError, Protocol, RunOptions, SerialOverrides, SerialSettings, SessionCtx, Tap,
    run_link, run_serial,
};

/// Shutdown signal: drivers stop when the value becomes `true` (or the
/// sender is dropped).
pub type Shutdown = tokio::sync::watch::Receiver<bool>;

/// What a driver hands to the agent: data of one device, in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DriverOutput {
    pub device_id: String,
    /// Serial number as reported by the device itself, when it says.
    pub serial_number: Option<String>,
    pub readings: Vec<Reading>,
    pub waveforms: Vec<Waveform>,
    /// Link/session state changes (connected, silent, disconnected).
    pub technical: Vec<TechnicalReading>,
}

impl DriverOutput {
    /// Readings + waveforms + technical readings.
    pub fn len(&self) -> usize {
        self.readings.len() + self.waveforms.len() + self.technical.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-device counters, shared with the agent's metrics.
#[derive(Debug, Default)]
pub struct DriverStats {
    bytes_read: AtomicU64,
    frames_ok: AtomicU64,
    frames_bad: AtomicU64,
    bytes_dropped: AtomicU64,
    link_errors: AtomicU64,
    unknown_flags: AtomicU64,
    /// Requests the device answered with an exception (polled protocols).
    exceptions: AtomicU64,
    /// Requests the device did not answer in time (polled protocols).
    timeouts: AtomicU64,
    connected: AtomicBool,
    /// Gateway time (UTC µs) of the last valid frame; 0 = none yet.
    last_frame_us: std::sync::atomic::AtomicI64,
}

/// A point-in-time copy of [`DriverStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DriverStatsSnapshot {
    pub bytes_read: u64,
    pub frames_ok: u64,
    pub frames_bad: u64,
    pub bytes_dropped: u64,
    pub link_errors: u64,
    pub unknown_flags: u64,
    pub exceptions: u64,
    pub timeouts: u64,
    pub connected: bool,
    /// Gateway time (UTC µs) of the last valid frame; 0 = none yet.
    pub last_frame_us: i64,
}

impl DriverStats {
    pub fn add_bytes(&self, n: usize) {
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn frame_ok(&self) {
        self.frames_ok.fetch_add(1, Ordering::Relaxed);
        self.last_frame_us
            .store(session::now_us(), Ordering::Relaxed);
    }
    pub fn frame_error(&self, dropped: usize) {
        self.frames_bad.fetch_add(1, Ordering::Relaxed);
        self.bytes_dropped
            .fetch_add(dropped as u64, Ordering::Relaxed);
    }
    pub fn link_error(&self) {
        self.link_errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn unknown_flags(&self) {
        self.unknown_flags.fetch_add(1, Ordering::Relaxed);
    }
    pub fn exception(&self) {
        self.exceptions.fetch_add(1, Ordering::Relaxed);
    }
    pub fn timeout(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }
    pub fn connected(&self, yes: bool) {
        self.connected.store(yes, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> DriverStatsSnapshot {
        DriverStatsSnapshot {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            frames_ok: self.frames_ok.load(Ordering::Relaxed),
            frames_bad: self.frames_bad.load(Ordering::Relaxed),
            bytes_dropped: self.bytes_dropped.load(Ordering::Relaxed),
            link_errors: self.link_errors.load(Ordering::Relaxed),
            unknown_flags: self.unknown_flags.load(Ordering::Relaxed),
            exceptions: self.exceptions.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            last_frame_us: self.last_frame_us.load(Ordering::Relaxed),
        }
    }
}
