//! Modbus devices (TCP and RTU) read through a register map.
//!
//! Modbus carries no semantics: which register holds which value, in which
//! type, byte order and scale, is the device manufacturer's register map,
//! written down as a [`map`] file. The driver polls the mapped points
//! (reads coalesced by [`plan`]), decodes them ([`codec`]) and emits one
//! [`Reading`] per point with its catalogue metric and unit.
//!
//! Framing (MBAP header over TCP; address + CRC-16 over serial RTU) is done
//! by the `tokio-modbus` client over the session's byte link, so the same
//! session runs on a TCP stream ([`crate::run_link`]), a serial port
//! ([`crate::run_serial`]) or, in tests, a PTY.
//!
//! Sources: Modbus Application Protocol Specification v1.1b3 (functions
//! 0x01–0x04, limits, exceptions); Modbus Messaging on TCP/IP
//! Implementation Guide v1.0b (MBAP, unit identifier); Modbus over Serial
//! Line Specification and Implementation Guide v1.02 (§2.5.1: RTU default
//! even parity, 8 data bits, 1 stop bit; 19200 baud is the required default
//! rate, §3.2.1 / "Implementation classes").

pub mod codec;
pub mod map;
pub mod plan;

use std::path::PathBuf;
use std::time::Duration;

use shared_protocol::v1::{QualityFlag, Reading, TimeSource, Validity, reading::Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{Request, Response, Slave};

pub use codec::{NoValue, RawValue};
pub use map::{MapError, MapFile, Point, PointSpec, Table, ValueType, WordOrder};
pub use plan::{Limits, ReadRequest, plan_reads};

use crate::session::{DataBits, FlowControl, Parity, StopBits, now_us};
use crate::{DriverError, Protocol, SerialSettings, SessionCtx};

/// Agent-config kind of a Modbus TCP device.
pub const KIND_TCP: &str = "modbus-tcp";
/// Agent-config kind of a Modbus RTU (serial) device.
pub const KIND_RTU: &str = "modbus-rtu";
/// RTU default: 19200 baud, 8 data bits, even parity, 1 stop bit (Modbus
/// over Serial Line v1.02 §2.5.1 "the default parity mode must be even
/// parity"; 19200 bps the required default baud rate).
pub const SERIAL: SerialSettings = SerialSettings::new(
    19200,
    DataBits::Eight,
    Parity::Even,
    StopBits::One,
    FlowControl::None,
);

/// Which ADU framing the link carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// MBAP header (Modbus TCP).
    Tcp,
    /// Slave address + PDU + CRC-16 (Modbus RTU).
    Rtu,
}

fn default_unit_id() -> u8 {
    1
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_gap_fill() -> u16 {
    8
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_max_registers() -> u16 {
    plan::MAX_REGISTERS
}
fn default_max_bits() -> u16 {
    plan::MAX_BITS
}

/// Options of a Modbus device (`[device.options]`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusOptions {
    /// Unit identifier / slave address (default 1). RTU: 1..=247; TCP:
    /// 0..=255 (many TCP devices ignore it, gateways route by it).
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,
    /// Register map file (relative paths: against the agent config's
    /// directory). Exactly one of `map` and `points`.
    #[serde(default)]
    pub map: Option<PathBuf>,
    /// Inline register map (`[[device.options.points]]`).
    #[serde(default)]
    pub points: Option<Vec<PointSpec>>,
    /// Poll interval of points without their own, ms (default 1000).
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Unmapped registers (bits) read to join two points into one request
    /// (default 8; 0 for devices that refuse reads of unmapped addresses).
    #[serde(default = "default_gap_fill")]
    pub gap_fill: u16,
    /// Time to wait for each answer, ms (default 1000).
    #[serde(default = "default_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Registers per read request, 4..=125 (default 125).
    #[serde(default = "default_max_registers")]
    pub max_registers_per_read: u16,
    /// Bits per read request, 1..=2000 (default 2000).
    #[serde(default = "default_max_bits")]
    pub max_bits_per_read: u16,
}

impl Default for ModbusOptions {
    fn default() -> Self {
        ModbusOptions {
            unit_id: default_unit_id(),
            map: None,
            points: None,
            poll_interval_ms: default_poll_ms(),
            gap_fill: default_gap_fill(),
            response_timeout_ms: default_timeout_ms(),
            max_registers_per_read: default_max_registers(),
            max_bits_per_read: default_max_bits(),
        }
    }
}

/// A Modbus device protocol instance.
#[derive(Debug, Clone)]
pub struct Modbus {
    framing: Framing,
    unit_id: u8,
    points: Vec<Point>,
    reads: Vec<ReadRequest>,
    response_timeout: Duration,
}

impl Modbus {
    /// Build from options: loads and validates the register map (file or
    /// inline) and plans the reads. Errors name the option or map entry.
    pub fn new(framing: Framing, opts: ModbusOptions) -> Result<Self, String> {
        match framing {
            Framing::Rtu if !(1..=247).contains(&opts.unit_id) => {
                return Err(format!(
                    "unit_id {} must be 1..=247 on a serial line (0 is broadcast)",
                    opts.unit_id
                ));
            }
            _ => {}
        }
        if !(map::MIN_POLL_INTERVAL_MS..=map::MAX_POLL_INTERVAL_MS).contains(&opts.poll_interval_ms)
        {
            return Err(format!(
                "poll_interval_ms must be within {}..={}",
                map::MIN_POLL_INTERVAL_MS,
                map::MAX_POLL_INTERVAL_MS
            ));
        }
        if !(50..=60_000).contains(&opts.response_timeout_ms) {
            return Err("response_timeout_ms must be within 50..=60000".into());
        }
        if !(4..=plan::MAX_REGISTERS).contains(&opts.max_registers_per_read) {
            return Err(format!(
                "max_registers_per_read must be within 4..={}",
                plan::MAX_REGISTERS
            ));
        }
        if !(1..=plan::MAX_BITS).contains(&opts.max_bits_per_read) {
            return Err(format!(
                "max_bits_per_read must be within 1..={}",
                plan::MAX_BITS
            ));
        }
        let specs = match (&opts.map, &opts.points) {
            (Some(path), None) => map::load_map_file(path).map_err(|e| e.0)?.points,
            (None, Some(points)) => points.clone(),
            (Some(_), Some(_)) => {
                return Err("give either `map` (a file) or `points` (inline), not both".into());
            }
            (None, None) => {
                return Err(
                    "a register map is required: `map = \"file.toml\"` or [[device.options.points]]"
                        .into(),
                );
            }
        };
        let points =
            map::validate(&specs, Duration::from_millis(opts.poll_interval_ms)).map_err(|e| e.0)?;
        let reads = plan_reads(
            &points,
            Limits {
                gap_fill: opts.gap_fill,
                max_registers: opts.max_registers_per_read,
                max_bits: opts.max_bits_per_read,
            },
        );
        Ok(Modbus {
            framing,
            unit_id: opts.unit_id,
            points,
            reads,
            response_timeout: Duration::from_millis(opts.response_timeout_ms),
        })
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// The planned read requests.
    pub fn reads(&self) -> &[ReadRequest] {
        &self.reads
    }
}

/// What one read returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadData {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
}

/// The readings of one answered read request. Returns the readings and the
/// number of points the response was too short for (counted as bad
/// frames; no reading is made up for them).
pub fn response_to_readings(
    points: &[Point],
    req: &ReadRequest,
    data: &ReadData,
    gateway_time_us: i64,
) -> (Vec<Reading>, usize) {
    let mut out = Vec::with_capacity(req.points.len());
    let mut short = 0;
    for &i in &req.points {
        let Some(p) = points.get(i) else {
            short += 1;
            continue;
        };
        let raw = match data {
            ReadData::Registers(w) => codec::decode_registers(p, req.start, w),
            ReadData::Bits(b) => codec::decode_bits(p, req.start, b),
        };
        let Ok(raw) = raw else {
            short += 1;
            continue;
        };
        out.push(point_reading(p, raw, gateway_time_us));
    }
    (out, short)
}

/// One point's reading: a number, or no value marked INVALID +
/// VALUE_MISSING (sentinel, NaN/infinite, or scale overflow).
pub fn point_reading(p: &Point, raw: RawValue, gateway_time_us: i64) -> Reading {
    let (value, validity, flags) = match codec::physical(p, raw) {
        Ok(v) => (Some(Value::Numeric(v)), Validity::Valid, vec![]),
        Err(_) => (
            None,
            Validity::Invalid,
            vec![QualityFlag::ValueMissing as i32],
        ),
    };
    Reading {
        mdc_code: p.metric.mdc,
        vendor_label: p.label.clone(),
        value,
        mdc_unit: p.unit.mdc,
        ucum_unit: p.unit.ucum.to_string(),
        device_time_us: gateway_time_us,
        time_source: TimeSource::GatewayReceive as i32,
        gateway_time_us,
        validity: validity as i32,
        flags,
        sequence: 0,
        subject: None,
        // This protocol carries no abnormal flag the driver maps.
        interpretation: 0,
    }
}

fn request_of(r: &ReadRequest) -> Request<'static> {
    match r.table {
        Table::Holding => Request::ReadHoldingRegisters(r.start, r.count),
        Table::Input => Request::ReadInputRegisters(r.start, r.count),
        Table::Coils => Request::ReadCoils(r.start, r.count),
        Table::Discrete => Request::ReadDiscreteInputs(r.start, r.count),
    }
}

/// The data of a response if it is the right kind and length for the
/// request (the coil/discrete answer is padded to whole bytes: cut to
/// `count`, never shorter).
fn response_data(r: &ReadRequest, resp: Response) -> Option<ReadData> {
    let n = usize::from(r.count);
    match (r.table, resp) {
        (Table::Holding, Response::ReadHoldingRegisters(w))
        | (Table::Input, Response::ReadInputRegisters(w)) => {
            (w.len() == n).then_some(ReadData::Registers(w))
        }
        (Table::Coils, Response::ReadCoils(mut b))
        | (Table::Discrete, Response::ReadDiscreteInputs(mut b)) => {
            if b.len() < n || b.len() > n + 7 {
                return None;
            }
            b.truncate(n);
            Some(ReadData::Bits(b))
        }
        _ => None,
    }
}

/// How a read ended.
enum Outcome {
    Data(ReadData),
    Exception(tokio_modbus::ExceptionCode),
    /// Wrong header/function/length: counted, not an answer.
    Bad(String),
    Timeout,
}

impl Modbus {
    async fn read_once(
        &self,
        client: &mut Context,
        r: &ReadRequest,
    ) -> Result<Outcome, DriverError> {
        match tokio::time::timeout(self.response_timeout, client.call(request_of(r))).await {
            Err(_) => Ok(Outcome::Timeout),
            Ok(Err(tokio_modbus::Error::Transport(e))) => Err(match e.kind() {
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe => {
                    DriverError::Eof
                }
                // The codecs report undecodable frames as InvalidData.
                std::io::ErrorKind::InvalidData => return Ok(Outcome::Bad(e.to_string())),
                _ => DriverError::Link(e),
            }),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => Ok(Outcome::Bad(e.to_string())),
            Ok(Ok(Err(exc))) => Ok(Outcome::Exception(exc)),
            Ok(Ok(Ok(resp))) => Ok(match response_data(r, resp) {
                Some(d) => Outcome::Data(d),
                None => Outcome::Bad("response of the wrong kind or length".into()),
            }),
        }
    }
}

impl Protocol for Modbus {
    fn kind(&self) -> &'static str {
        match self.framing {
            Framing::Tcp => KIND_TCP,
            Framing::Rtu => KIND_RTU,
        }
    }

    fn manufacturer(&self) -> &'static str {
        // Modbus says nothing about who made the device.
        ""
    }

    fn default_serial(&self) -> SerialSettings {
        SERIAL
    }

    /// Poll every planned read at its interval. A device that answers
    /// (values or exceptions) is connected; one that gives no valid answer
    /// for the silence limit ends the session (SILENT, reconnect).
    async fn session<L>(&self, link: L, ctx: &mut SessionCtx<'_>) -> Result<(), DriverError>
    where
        L: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static,
    {
        let slave = Slave(self.unit_id);
        let mut client = match self.framing {
            Framing::Tcp => tokio_modbus::client::tcp::attach_slave(link, slave),
            Framing::Rtu => tokio_modbus::client::rtu::attach_slave(link, slave),
        };
        let start = Instant::now();
        let mut due: Vec<Instant> = vec![start; self.reads.len()];
        let mut last_answer = start;
        loop {
            let Some((next, _)) = due.iter().enumerate().min_by_key(|(_, t)| **t) else {
                // Nothing to poll (cannot happen after validation): idle.
                ctx.sleep(ctx.silence).await?;
                continue;
            };
            let now = Instant::now();
            if due[next] > now {
                ctx.sleep(due[next] - now).await?;
            }
            if ctx.is_shutdown() {
                return Ok(());
            }
            let r = &self.reads[next];
            // Next poll one interval after this one was due; skip missed
            // slots instead of bursting after a stall.
            due[next] += r.interval;
            let now = Instant::now();
            if due[next] < now {
                due[next] = now + r.interval;
            }
            match self.read_once(&mut client, r).await? {
                Outcome::Data(d) => {
                    last_answer = Instant::now();
                    ctx.stats.frame_ok();
                    ctx.connected().await?;
                    let (readings, short) = response_to_readings(&self.points, r, &d, now_us());
                    if short > 0 {
                        ctx.stats.frame_error(0);
                    }
                    ctx.emit(readings, vec![]).await?;
                }
                Outcome::Exception(e) => {
                    // The device is there but refuses this read: count it,
                    // no readings (nothing is made up).
                    last_answer = Instant::now();
                    ctx.stats.exception();
                    ctx.connected().await?;
                    tracing::debug!(device_id = %ctx.device_id, table = %r.table, start = r.start, count = r.count, exception = ?e, "modbus exception");
                }
                Outcome::Bad(why) => {
                    ctx.stats.frame_error(0);
                    tracing::debug!(device_id = %ctx.device_id, error = %why, "bad modbus response");
                }
                Outcome::Timeout => {
                    ctx.stats.timeout();
                }
            }
            if last_answer.elapsed() >= ctx.silence {
                return Err(DriverError::Silent(ctx.silence));
            }
        }
    }
}

#[cfg(test)]
mod tests;
