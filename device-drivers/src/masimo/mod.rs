//! Masimo Radical-7 / Rad-8 "ASCII 1" serial output: codec, mapping to
//! readings, and the async serial driver.

pub mod codec;

use bytes::BytesMut;
use shared_protocol::catalogue::{Unit, codes, units};
use shared_protocol::v1::{QualityFlag, Reading, TimeSource, Validity, reading::Value};
use time::UtcOffset;
use tokio::io::{AsyncRead, AsyncWrite};

pub use codec::{Exceptions, Field, MasimoDecoder, MasimoError, MasimoFrame};

use crate::session::{DataBits, FlowControl, Parity, StopBits, now_us};
use crate::{DriverError, Protocol, SerialSettings, SessionCtx};

/// Agent-config kind, also carried in `DeviceInfo.protocol`.
pub const KIND: &str = "masimo-serial";
/// The device's serial settings: 9600 baud, 8N1, no flow control.
pub const SERIAL: SerialSettings = SerialSettings::new(
    9600,
    DataBits::Eight,
    Parity::None,
    StopBits::One,
    FlowControl::None,
);

/// Convert a device-clock time to UTC µs using the offset configured for the
/// device (the device clock has no zone).
fn device_time_us(f: &MasimoFrame, offset: UtcOffset) -> i64 {
    let t = f.device_time.assume_offset(offset);
    (t.unix_timestamp_nanos() / 1_000) as i64
}

/// Map a frame to readings: SpO2, pulse rate and perfusion index (the
/// catalogue metrics this device reports). SpCO/SpMet/SpHb/PVI have no
/// catalogue entry yet and are not emitted.
///
/// Rules (clinical safety): a dashed value becomes a reading without a value,
/// INVALID with `VALUE_MISSING`; exception bits that mark the sensor unusable
/// make every value INVALID; bits that qualify it make it QUESTIONABLE. No
/// value is altered.
pub fn frame_to_readings(f: &MasimoFrame, offset: UtcOffset, gateway_time_us: i64) -> Vec<Reading> {
    let exc = f.exceptions;
    let mut flags = Vec::new();
    let mut push = |bit: u32, flag: QualityFlag| {
        if exc.has(bit) && !flags.contains(&(flag as i32)) {
            flags.push(flag as i32);
        }
    };
    push(Exceptions::NO_SENSOR, QualityFlag::SensorOff);
    push(Exceptions::SENSOR_OFF, QualityFlag::SensorOff);
    push(Exceptions::DEFECTIVE_SENSOR, QualityFlag::DeviceFault);
    push(Exceptions::UNRECOGNIZED_SENSOR, QualityFlag::DeviceFault);
    push(Exceptions::LOW_PERFUSION, QualityFlag::LowSignal);
    push(Exceptions::LOW_SIGNAL_IQ, QualityFlag::LowSignal);
    push(Exceptions::PULSE_SEARCH, QualityFlag::Searching);
    push(Exceptions::INTERFERENCE, QualityFlag::Interference);
    push(Exceptions::AMBIENT_LIGHT, QualityFlag::Interference);

    let base_validity = if exc.0 & Exceptions::INVALIDATING != 0 {
        Validity::Invalid
    } else if exc.0 & Exceptions::QUESTIONING != 0 {
        Validity::Questionable
    } else {
        Validity::Valid
    };
    let device_time = device_time_us(f, offset);
    let metrics: [(u32, &str, Field, Unit); 3] = [
        (codes::PULS_OXIM_SAT_O2, "SPO2", f.spo2, units::PERCENT),
        (
            codes::PULS_OXIM_PULS_RATE,
            "BPM",
            f.pulse_rate,
            units::BEAT_PER_MIN,
        ),
        (
            codes::PULS_OXIM_PERF_REL,
            "PI",
            f.perfusion_index,
            units::PERCENT,
        ),
    ];
    metrics
        .into_iter()
        .filter(|(_, _, field, _)| *field != Field::Absent)
        .map(|(mdc, label, field, unit)| {
            let mut flags = flags.clone();
            let (value, validity) = match field {
                Field::Value(v) => (Some(Value::Numeric(v)), base_validity),
                _ => {
                    flags.push(QualityFlag::ValueMissing as i32);
                    (None, Validity::Invalid)
                }
            };
            Reading {
                mdc_code: mdc,
                vendor_label: label.to_string(),
                value,
                mdc_unit: unit.mdc,
                ucum_unit: unit.ucum.to_string(),
                device_time_us: device_time,
                time_source: TimeSource::DeviceClockUnsynced as i32,
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

/// Options of a Masimo device.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasimoOptions {
    /// UTC offset of the device clock in minutes (the device has no time
    /// zone setting; staff set it to local time).
    #[serde(default)]
    pub clock_offset_minutes: i32,
}

/// The Masimo "ASCII 1" protocol: unsolicited, one line per second; nothing
/// is ever sent to the device.
#[derive(Debug, Clone, Copy)]
pub struct Masimo {
    clock_offset: UtcOffset,
}

impl Masimo {
    pub fn new(opts: MasimoOptions) -> Result<Self, String> {
        if opts.clock_offset_minutes.abs() > 18 * 60 {
            return Err("clock_offset_minutes must be within ±1080".into());
        }
        let clock_offset = UtcOffset::from_whole_seconds(opts.clock_offset_minutes * 60)
            .map_err(|e| e.to_string())?;
        Ok(Masimo { clock_offset })
    }
}

impl Protocol for Masimo {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn manufacturer(&self) -> &'static str {
        "Masimo"
    }

    fn default_serial(&self) -> SerialSettings {
        SERIAL
    }

    async fn session<L>(&self, mut link: L, ctx: &mut SessionCtx<'_>) -> Result<(), DriverError>
    where
        L: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut dec = MasimoDecoder::new();
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            let res = ctx.read(&mut link, &mut buf).await;
            let eof = matches!(res, Err(DriverError::Eof));
            if let Err(e) = res {
                if !eof {
                    return Err(e);
                }
            }
            loop {
                let step = if eof {
                    dec.decode_eof(&mut buf)
                } else {
                    dec.decode(&mut buf)
                };
                match step {
                    Ok(Some(frame)) => {
                        ctx.stats.frame_ok();
                        if frame.exceptions.unknown_bits() != 0 {
                            ctx.stats.unknown_flags();
                        }
                        if let Some(sn) = &frame.serial {
                            ctx.set_serial_number(sn.clone());
                        }
                        ctx.connected().await?;
                        let readings = frame_to_readings(&frame, self.clock_offset, now_us());
                        ctx.emit(readings, vec![]).await?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        ctx.stats.frame_error(e.dropped());
                        tracing::warn!(device_id = %ctx.device_id, error = %e, "masimo: bad input skipped");
                    }
                }
            }
            if eof {
                return Err(DriverError::Eof);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{datetime, offset};

    fn frame(spo2: Field, exc: u32) -> MasimoFrame {
        MasimoFrame {
            device_time: datetime!(2026-11-24 10:00:00),
            serial: Some("1".into()),
            spo2,
            pulse_rate: Field::Value(72.0),
            perfusion_index: Field::Value(3.6),
            spco: Field::NoValue,
            spmet: Field::NoValue,
            sphb: Field::Absent,
            pvi: Field::Absent,
            desat: Field::NoValue,
            alarm: Some(0),
            exceptions: Exceptions(exc),
            other: vec![],
        }
    }

    #[test]
    fn valid_frame_maps_to_three_readings_with_units() {
        let r = frame_to_readings(&frame(Field::Value(98.0), 0x800), offset!(UTC), 42);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].mdc_code, 150_456);
        assert_eq!(r[0].value, Some(Value::Numeric(98.0)));
        assert_eq!(r[0].ucum_unit, "%");
        assert_eq!(r[0].validity, Validity::Valid as i32);
        assert_eq!(r[1].mdc_code, codes::PULS_OXIM_PULS_RATE);
        assert_eq!(r[1].ucum_unit, "/min");
        assert_eq!(r[2].mdc_code, codes::PULS_OXIM_PERF_REL);
        // 2026-11-24T10:00:00Z
        assert_eq!(r[0].device_time_us, 1_795_514_400_000_000);
        assert_eq!(r[0].gateway_time_us, 42);
        assert_eq!(r[0].time_source, TimeSource::DeviceClockUnsynced as i32);
    }

    #[test]
    fn device_clock_offset_is_applied() {
        // Device clock set to UTC+01:00 local time: 10:00 local = 09:00 UTC.
        let r = frame_to_readings(&frame(Field::Value(98.0), 0), offset!(+1), 0);
        assert_eq!(r[0].device_time_us, 1_795_514_400_000_000 - 3_600_000_000);
    }

    #[test]
    fn sensor_off_invalidates_and_missing_value_is_not_invented() {
        let r = frame_to_readings(
            &frame(Field::NoValue, Exceptions::SENSOR_OFF),
            offset!(UTC),
            0,
        );
        assert_eq!(r[0].value, None);
        assert_eq!(r[0].validity, Validity::Invalid as i32);
        assert!(r[0].flags.contains(&(QualityFlag::SensorOff as i32)));
        assert!(r[0].flags.contains(&(QualityFlag::ValueMissing as i32)));
        // Pulse rate still carries its number but is invalid too.
        assert_eq!(r[1].value, Some(Value::Numeric(72.0)));
        assert_eq!(r[1].validity, Validity::Invalid as i32);
    }

    #[test]
    fn low_perfusion_is_questionable() {
        let r = frame_to_readings(
            &frame(Field::Value(91.0), Exceptions::LOW_PERFUSION),
            offset!(UTC),
            0,
        );
        assert_eq!(r[0].validity, Validity::Questionable as i32);
        assert_eq!(r[0].flags, vec![QualityFlag::LowSignal as i32]);
    }

    #[tokio::test]
    async fn session_counts_garbage_and_delivers_good_lines() {
        use crate::DriverStats;
        use std::time::Duration;
        use tokio::io::AsyncWriteExt;
        let input: &[u8] = b"garbage\r\n02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% ALARM=0000 EXC=000000\r\n";
        let stats = DriverStats::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let (_keep, mut shutdown) = tokio::sync::watch::channel(false);
        let (mut dev, host) = tokio::io::duplex(1024);
        dev.write_all(input).await.unwrap();
        drop(dev);
        let mut ctx = SessionCtx::new("m1", &stats, &tx, &mut shutdown, Duration::from_secs(5));
        let proto = Masimo::new(MasimoOptions::default()).unwrap();
        let end = proto.session(host, &mut ctx).await.unwrap_err();
        assert!(matches!(end, DriverError::Eof), "{end}");
        let connected = rx.recv().await.unwrap();
        assert_eq!(connected.technical.len(), 1);
        let out = rx.recv().await.unwrap();
        assert_eq!(out.device_id, "m1");
        assert_eq!(out.serial_number.as_deref(), Some("0000056661"));
        assert_eq!(out.readings.len(), 3);
        let snap = stats.snapshot();
        assert_eq!(snap.frames_ok, 1);
        assert_eq!(snap.frames_bad, 1);
        assert_eq!(snap.bytes_dropped, 9);
    }
}
