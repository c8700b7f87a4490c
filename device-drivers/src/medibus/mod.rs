//! Dräger MEDIBUS / MEDIBUS.X (Evita, Savina, Fabius, Primus, …) over
//! RS-232: codec, mapping of codepage 1 measured data to readings, and the
//! async session.
//!
//! Session (MEDIBUS Protocol Definition, "communication initialisation" and
//! "keep-alive"; behaviour cross-checked with VSCaptureDrgVent `Class1.cs`):
//! 1. send ICC (`ESC 0x51`), resend every `response_timeout_ms` until the
//!    device answers (`SOH 0x51`) or sends its own ICC (which we answer);
//! 2. request device identification (`ESC 0x52`);
//! 3. poll "current measured data, codepage 1" (`ESC 0x24`) every
//!    `poll_interval_ms`, one request outstanding at a time;
//! 4. send NOP (`ESC 0x30`) when nothing was sent for `keepalive_ms` (the
//!    device ends communication after a few seconds without traffic);
//! 5. answer every command the device sends: ICC and NOP with an empty
//!    response of the same code, device identification with an empty
//!    response, STOP with its echo (then the session ends), anything else
//!    with an empty echo (as VSCaptureDrgVent does; unconfirmed in a Dräger
//!    document available to us);
//! 6. on shutdown send STOP (`ESC 0x55`).
//!
//! The data responses carry no time stamp: readings use the gateway receive
//! time (`TIME_SOURCE_GATEWAY_RECEIVE`).

pub mod codec;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use shared_protocol::catalogue::{Unit, codes, units};
use shared_protocol::v1::{QualityFlag, Reading, TimeSource, Validity, reading::Value as RValue};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub use codec::{
    DeviceIdentity, Frame, MedibusDecoder, MedibusError, Record, Value, cmd, encode_command,
    encode_response, parse_device_id, parse_measured,
};

use crate::session::{DataBits, FlowControl, Parity, StopBits, now_us};
use crate::{DriverError, Protocol, SerialSettings, SessionCtx};

/// Agent-config kind, also carried in `DeviceInfo.protocol`.
pub const KIND: &str = "medibus-serial";

/// MEDIBUS.X default line settings: 19200 baud, 8 data bits, even parity,
/// 1 stop bit, no flow control (VSCaptureDrgVent `DSerialPort()` defaults,
/// matching the MEDIBUS.X interface settings of Evita/Primus/Savina IfUs).
/// Older MEDIBUS devices default to 9600 baud; override `baud_rate` in the
/// agent config for them.
pub const SERIAL: SerialSettings = SerialSettings::new(
    19200,
    DataBits::Eight,
    Parity::Even,
    StopBits::One,
    FlowControl::None,
);

/// One codepage 1 data code the catalogue can express.
#[derive(Debug, Clone, Copy)]
pub struct Mapping {
    /// MEDIBUS.X codepage 1 data code.
    pub code: u8,
    /// Dräger's label for it.
    pub label: &'static str,
    pub mdc: u32,
    /// The unit the MEDIBUS.X data code list gives for this code (never
    /// converted; the catalogue row uses the same unit).
    pub unit: Unit,
}

/// Codepage 1 codes mapped to readings. Codes and units: MEDIBUS.X data
/// code list for codepage 1 as transcribed in VSCaptureDrgVent `Class2.cs`
/// (`MedibusXMeasurementCP1`). Pressures are in mbar; 1 mbar = 1 hPa exactly
/// (1 bar = 10^5 Pa), so they are labelled hPa without any conversion.
pub const MAPPINGS: &[Mapping] = &[
    Mapping {
        code: 0xD6,
        label: "RR",
        mdc: codes::RESP_RATE,
        unit: units::RESP_PER_MIN,
    },
    Mapping {
        code: 0x88,
        label: "VT",
        mdc: codes::VENT_VOL_TIDAL,
        unit: units::MILLI_L,
    },
    Mapping {
        code: 0x7D,
        label: "PIP",
        mdc: codes::VENT_PRESS_AWAY_MAX,
        unit: units::HECTO_PA,
    },
    Mapping {
        code: 0x73,
        label: "Pmean",
        mdc: codes::VENT_PRESS_AWAY_MEAN,
        unit: units::HECTO_PA,
    },
    Mapping {
        code: 0x78,
        label: "PEEP",
        mdc: codes::VENT_PRESS_AWAY_END_EXP_POS,
        unit: units::HECTO_PA,
    },
    Mapping {
        code: 0xF0,
        label: "FiO2",
        mdc: codes::CONC_AWAY_O2_INSP,
        unit: units::PERCENT,
    },
    Mapping {
        code: 0xE6,
        label: "etCO2",
        mdc: codes::CONC_AWAY_CO2_ET,
        unit: units::MMHG,
    },
    Mapping {
        code: 0xEB,
        label: "SpO2",
        mdc: codes::PULS_OXIM_SAT_O2,
        unit: units::PERCENT,
    },
    Mapping {
        code: 0xE1,
        label: "PLS",
        mdc: codes::PULS_OXIM_PULS_RATE,
        unit: units::BEAT_PER_MIN,
    },
    Mapping {
        code: 0x96,
        label: "NIBP S",
        mdc: codes::PRESS_BLD_NONINV_SYS,
        unit: units::MMHG,
    },
    Mapping {
        code: 0x8C,
        label: "NIBP D",
        mdc: codes::PRESS_BLD_NONINV_DIA,
        unit: units::MMHG,
    },
    Mapping {
        code: 0x91,
        label: "NIBP M",
        mdc: codes::PRESS_BLD_NONINV_MEAN,
        unit: units::MMHG,
    },
];

/// The mapping of a codepage 1 data code, if any.
pub fn mapping(code: u8) -> Option<&'static Mapping> {
    MAPPINGS.iter().find(|m| m.code == code)
}

/// Map the records of a codepage 1 response to readings. Unmapped codes are
/// skipped. A value the device sent blank/dashed/non-numeric becomes a
/// reading without a value, INVALID with `VALUE_MISSING`.
pub fn records_to_readings(records: &[Record], gateway_time_us: i64) -> Vec<Reading> {
    records
        .iter()
        .filter_map(|r| mapping(r.code).map(|m| (r, m)))
        .map(|(r, m)| {
            let (value, validity, flags) = match r.value {
                Value::Number(v) => (Some(RValue::Numeric(v)), Validity::Valid, vec![]),
                Value::Missing => (
                    None,
                    Validity::Invalid,
                    vec![QualityFlag::ValueMissing as i32],
                ),
            };
            Reading {
                mdc_code: m.mdc,
                vendor_label: m.label.to_string(),
                value,
                mdc_unit: m.unit.mdc,
                ucum_unit: m.unit.ucum.to_string(),
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
        })
        .collect()
}

fn default_poll() -> u64 {
    1000
}
fn default_keepalive() -> u64 {
    2000
}
fn default_response_timeout() -> u64 {
    2000
}

/// Options of a MEDIBUS device.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MedibusOptions {
    /// Interval between "current measured data, codepage 1" requests, in
    /// ms (100–60000; default 1000).
    #[serde(default = "default_poll")]
    pub poll_interval_ms: u64,
    /// Send a NOP when nothing was sent to the device for this long, in ms
    /// (100–10000; default 2000).
    #[serde(default = "default_keepalive")]
    pub keepalive_ms: u64,
    /// How long to wait for the device's answer to a request before giving
    /// up on it (ICC is then resent), in ms (100–10000; default 2000).
    #[serde(default = "default_response_timeout")]
    pub response_timeout_ms: u64,
}

impl Default for MedibusOptions {
    fn default() -> Self {
        MedibusOptions {
            poll_interval_ms: default_poll(),
            keepalive_ms: default_keepalive(),
            response_timeout_ms: default_response_timeout(),
        }
    }
}

/// The MEDIBUS protocol (client side).
#[derive(Debug, Clone, Copy)]
pub struct Medibus {
    poll: Duration,
    keepalive: Duration,
    response_timeout: Duration,
}

impl Medibus {
    pub fn new(opts: MedibusOptions) -> Result<Self, String> {
        let check = |name: &str, v: u64, max: u64| {
            if (100..=max).contains(&v) {
                Ok(Duration::from_millis(v))
            } else {
                Err(format!("{name} must be within 100..={max} ms"))
            }
        };
        Ok(Medibus {
            poll: check("poll_interval_ms", opts.poll_interval_ms, 60_000)?,
            keepalive: check("keepalive_ms", opts.keepalive_ms, 10_000)?,
            response_timeout: check("response_timeout_ms", opts.response_timeout_ms, 10_000)?,
        })
    }
}

/// Per-session state.
struct Session {
    established: bool,
    id_requested: bool,
    /// The request we wait an answer for, and when it was sent.
    pending: Option<(u8, Instant)>,
    last_tx: Instant,
    last_rx: Instant,
    next_poll: Instant,
}

async fn send<L: AsyncWrite + Unpin>(
    link: &mut L,
    bytes: &[u8],
    s: &mut Session,
) -> Result<(), DriverError> {
    link.write_all(bytes).await.map_err(DriverError::Link)?;
    link.flush().await.map_err(DriverError::Link)?;
    s.last_tx = Instant::now();
    Ok(())
}

impl Medibus {
    async fn request<L: AsyncWrite + Unpin>(
        &self,
        link: &mut L,
        code: u8,
        s: &mut Session,
    ) -> Result<(), DriverError> {
        send(link, &encode_command(code, b""), s).await?;
        s.pending = Some((code, Instant::now()));
        Ok(())
    }

    async fn run<L>(&self, link: &mut L, ctx: &mut SessionCtx<'_>) -> Result<(), DriverError>
    where
        L: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut dec = MedibusDecoder::new();
        let mut buf = BytesMut::with_capacity(4096);
        let now = Instant::now();
        let mut s = Session {
            established: false,
            id_requested: false,
            pending: None,
            last_tx: now,
            last_rx: now,
            next_poll: now,
        };
        self.request(link, cmd::ICC, &mut s).await?;
        loop {
            // Timers.
            if s.last_rx.elapsed() >= ctx.silence {
                return Err(DriverError::Silent(ctx.silence));
            }
            if let Some((code, at)) = s.pending {
                if at.elapsed() >= self.response_timeout {
                    tracing::warn!(device_id = %ctx.device_id, command = code, "medibus: no answer to request");
                    s.pending = None;
                }
            }
            if s.pending.is_none() {
                if !s.established {
                    self.request(link, cmd::ICC, &mut s).await?;
                } else if !s.id_requested {
                    s.id_requested = true;
                    self.request(link, cmd::DEVICE_ID, &mut s).await?;
                } else if Instant::now() >= s.next_poll {
                    s.next_poll = Instant::now() + self.poll;
                    self.request(link, cmd::MEASURED_CP1, &mut s).await?;
                } else if s.last_tx.elapsed() >= self.keepalive {
                    self.request(link, cmd::NOP, &mut s).await?;
                }
            }

            // Wait for bytes, at most until the next timer is due.
            let tick = Duration::from_millis(50);
            let eof = match ctx.read_within(link, &mut buf, tick).await {
                Ok(_) => {
                    s.last_rx = Instant::now();
                    false
                }
                Err(DriverError::Silent(_)) => continue,
                Err(DriverError::Eof) => true,
                Err(e) => return Err(e),
            };
            loop {
                let step = if eof {
                    dec.decode_eof(&mut buf)
                } else {
                    dec.decode(&mut buf)
                };
                match step {
                    Ok(Some(frame)) => {
                        ctx.stats.frame_ok();
                        self.handle(frame, link, ctx, &mut s).await?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        ctx.stats.frame_error(e.dropped());
                        tracing::warn!(device_id = %ctx.device_id, error = %e, "medibus: bad input skipped");
                    }
                }
            }
            if eof {
                return Err(DriverError::Eof);
            }
        }
    }

    async fn handle<L>(
        &self,
        frame: Frame,
        link: &mut L,
        ctx: &mut SessionCtx<'_>,
        s: &mut Session,
    ) -> Result<(), DriverError>
    where
        L: AsyncWrite + Unpin,
    {
        match frame {
            Frame::Command { code, .. } => {
                // The device's own requests are answered at once.
                send(link, &encode_response(code, b""), s).await?;
                match code {
                    cmd::ICC => {
                        // The device (re)initialised communication.
                        s.established = true;
                        ctx.connected().await?;
                    }
                    cmd::STOP => {
                        return Err(DriverError::Protocol("device stopped communication".into()));
                    }
                    cmd::NOP | cmd::DEVICE_ID => {}
                    other => {
                        tracing::debug!(device_id = %ctx.device_id, command = other, "medibus: device command echoed");
                    }
                }
            }
            Frame::Response { code, data } => {
                if s.pending.is_some_and(|(p, _)| p == code) || code == cmd::NAK {
                    s.pending = None;
                }
                match code {
                    cmd::ICC => {
                        // `connected` reports once per session.
                        s.established = true;
                        ctx.connected().await?;
                    }
                    cmd::DEVICE_ID => match parse_device_id(&data) {
                        Some(id) => {
                            tracing::info!(device_id = %ctx.device_id, medibus_id = %id.id, name = ?id.name, revision = %id.rest, "medibus: device identified");
                        }
                        None => {
                            tracing::warn!(device_id = %ctx.device_id, "medibus: unreadable device identification");
                        }
                    },
                    cmd::MEASURED_CP1 => match parse_measured(&data) {
                        Ok(records) => {
                            let readings = records_to_readings(&records, now_us());
                            ctx.emit(readings, vec![]).await?;
                        }
                        Err(reason) => {
                            ctx.stats.frame_error(data.len() + 5);
                            tracing::warn!(device_id = %ctx.device_id, reason, "medibus: bad data response skipped");
                        }
                    },
                    cmd::NAK => {
                        tracing::warn!(device_id = %ctx.device_id, "medibus: device reported a checksum error in our request");
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

impl Protocol for Medibus {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn manufacturer(&self) -> &'static str {
        "Dräger"
    }

    fn default_serial(&self) -> SerialSettings {
        SERIAL
    }

    async fn session<L>(&self, mut link: L, ctx: &mut SessionCtx<'_>) -> Result<(), DriverError>
    where
        L: AsyncRead + AsyncWrite + Unpin + Send,
    {
        match self.run(&mut link, ctx).await {
            Err(DriverError::Shutdown) => {
                // Best effort: tell the device we stop.
                let stop = encode_command(cmd::STOP, b"");
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    link.write_all(&stop).await?;
                    link.flush().await
                })
                .await;
                Ok(())
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DriverStats;
    use shared_protocol::CATALOGUE;
    use shared_protocol::v1::TechnicalKind;
    use tokio::io::AsyncReadExt;

    #[test]
    fn every_mapping_matches_its_catalogue_unit() {
        for m in MAPPINGS {
            let metric = CATALOGUE
                .by_mdc(m.mdc)
                .unwrap_or_else(|| panic!("{} not in catalogue", m.label));
            assert_eq!(metric.unit, m.unit, "{}", m.label);
        }
    }

    #[test]
    fn missing_values_become_invalid_readings_without_value() {
        let recs = parse_measured(b"D6  1288 500EB----E6    99 123").unwrap();
        let r = records_to_readings(&recs, 7);
        // 0x99 is not mapped.
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].mdc_code, codes::RESP_RATE);
        assert_eq!(r[0].value, Some(RValue::Numeric(12.0)));
        assert_eq!(r[0].validity, Validity::Valid as i32);
        assert_eq!(r[1].ucum_unit, "mL");
        for missing in &r[2..] {
            assert_eq!(missing.value, None);
            assert_eq!(missing.validity, Validity::Invalid as i32);
            assert_eq!(missing.flags, vec![QualityFlag::ValueMissing as i32]);
        }
        assert_eq!(r[0].time_source, TimeSource::GatewayReceive as i32);
        assert_eq!((r[0].device_time_us, r[0].gateway_time_us), (7, 7));
    }

    #[test]
    fn options_are_checked() {
        assert!(Medibus::new(MedibusOptions::default()).is_ok());
        let o: MedibusOptions = toml::from_str("poll_interval_ms = 50").unwrap();
        assert!(Medibus::new(o).is_err());
        assert!(toml::from_str::<MedibusOptions>("bogus = 1").is_err());
    }

    /// Read one message from the device side of a duplex (test helper).
    async fn read_msg(
        dev: &mut tokio::io::DuplexStream,
        dec: &mut MedibusDecoder,
        buf: &mut BytesMut,
    ) -> Frame {
        loop {
            if let Ok(Some(f)) = dec.decode(buf) {
                return f;
            }
            let n = dev.read_buf(buf).await.unwrap();
            assert!(n > 0, "link closed");
        }
    }

    #[tokio::test]
    async fn session_initialises_answers_device_and_polls() {
        use tokio::io::AsyncWriteExt;
        let stats = DriverStats::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let (stop, mut shutdown) = tokio::sync::watch::channel(false);
        let (mut dev, host) = tokio::io::duplex(4096);
        let proto = Medibus::new(MedibusOptions {
            poll_interval_ms: 100,
            ..Default::default()
        })
        .unwrap();
        let driver = tokio::spawn(async move {
            let mut ctx = SessionCtx::new("v1", &stats, &tx, &mut shutdown, Duration::from_secs(5));
            proto.session(host, &mut ctx).await
        });
        let mut dec = MedibusDecoder::new();
        let mut buf = BytesMut::new();
        // 1. The driver's ICC.
        assert_eq!(
            read_msg(&mut dev, &mut dec, &mut buf).await,
            Frame::Command {
                code: cmd::ICC,
                args: vec![]
            }
        );
        // The device sends its own NOP first; the driver must answer it.
        dev.write_all(&encode_command(cmd::NOP, b"")).await.unwrap();
        assert_eq!(
            read_msg(&mut dev, &mut dec, &mut buf).await,
            Frame::Response {
                code: cmd::NOP,
                data: vec![]
            }
        );
        dev.write_all(&encode_response(cmd::ICC, b""))
            .await
            .unwrap();
        // 2. Device identification.
        assert_eq!(
            read_msg(&mut dev, &mut dec, &mut buf).await,
            Frame::Command {
                code: cmd::DEVICE_ID,
                args: vec![]
            }
        );
        dev.write_all(&encode_response(
            cmd::DEVICE_ID,
            b"0161'Evita 4'04.20:06.00",
        ))
        .await
        .unwrap();
        // 3. Data request, answered with a value and a blank.
        assert_eq!(
            read_msg(&mut dev, &mut dec, &mut buf).await,
            Frame::Command {
                code: cmd::MEASURED_CP1,
                args: vec![]
            }
        );
        // Line noise before the answer is counted, not fatal.
        dev.write_all(b"\x7fjunk").await.unwrap();
        dev.write_all(&encode_response(cmd::MEASURED_CP1, b"D6  14EB    "))
            .await
            .unwrap();
        let connected = rx.recv().await.unwrap();
        assert_eq!(connected.technical[0].kind, TechnicalKind::Connected as i32);
        let out = rx.recv().await.unwrap();
        assert_eq!(out.readings.len(), 2);
        assert_eq!(out.readings[0].value, Some(RValue::Numeric(14.0)));
        assert_eq!(out.readings[1].value, None);
        // 4. Shutdown sends STOP.
        stop.send(true).unwrap();
        let end = driver.await.unwrap();
        assert!(end.is_ok(), "{end:?}");
        let mut last = None;
        while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(2), async {
            Some(read_msg(&mut dev, &mut dec, &mut buf).await)
        })
        .await
        {
            if f == (Frame::Command {
                code: cmd::STOP,
                args: vec![],
            }) {
                last = Some(f);
                break;
            }
        }
        assert!(last.is_some(), "no STOP on shutdown");
    }
}
