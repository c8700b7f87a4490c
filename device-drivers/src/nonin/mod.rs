//! Nonin OEM pulse oximeter modules (OEM III, Xpod, 3150 serial), serial
//! Data Format 7: codec, mapping of packets to SpO2 / pulse-rate readings
//! and a pleth waveform, and the receive-only session.
//!
//! See [`codec`] for the frame layout and the sources of the facts used.
//!
//! One packet (25 frames, 1/3 s) yields one SpO2 reading, one pulse-rate
//! reading and one 25-sample pleth waveform: readings are emitted **once
//! per packet** (3 per second per metric). The device sends no time: every
//! reading carries the gateway receive time (`GATEWAY_RECEIVE`), the
//! waveform starts one packet duration before it.

pub mod codec;

use bytes::BytesMut;
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{QualityFlag, Reading, TimeSource, Validity, Waveform, reading::Value};
use tokio::io::{AsyncRead, AsyncWrite};

pub use codec::{
    FrameFault, NoninDecoder, NoninError, NoninFrame, NoninPacket, PacketValues, Perfusion,
};

use crate::session::{DataBits, FlowControl, Parity, StopBits, now_us};
use crate::{DriverError, Protocol, SerialSettings, SessionCtx};

/// Agent-config kind, also carried in `DeviceInfo.protocol`.
pub const KIND: &str = "nonin-serial";
/// Data Format 7 serial settings: 9600 baud, 8 data bits, no parity, 1 stop
/// bit, no flow control. Unconfirmed against the OEM III document itself:
/// a public restatement of a Nonin OEM serial specification (iPod 3211) gives
/// 9600 8N1, no flow control, "for all data formats", and the Data Format 7
/// rate (75 five-byte frames/s = 3750 bit/s at 10 bits per byte) fits 9600.
pub const SERIAL: SerialSettings = SerialSettings::new(
    9600,
    DataBits::Eight,
    Parity::None,
    StopBits::One,
    FlowControl::None,
);

/// MDC_PULS_OXIM_PLETH (2::19380). Not in the shared catalogue (waveform
/// codes are not validated against it); defined here.
pub const MDC_PULS_OXIM_PLETH: u32 = (2 << 16) | 19380;
/// MDC_DIM_DIMLESS (4::512), UCUM "1": the pleth is in device units. The
/// shared catalogue has no dimensionless unit yet (it is being restructured
/// by its owner), so it is defined here.
pub const MDC_DIM_DIMLESS: u32 = (4 << 16) | 512;
pub const UCUM_DIMLESS: &str = "1";

/// Which of the device's SpO2 / pulse-rate variants become readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Averaging {
    /// SpO2 (frame 3) and HR (frames 1–2): 4-beat averages, standard mode.
    #[default]
    FourBeat,
    /// E-SpO2 (frame 16) and E-HR (frames 14–15): 8-beat extended averages.
    EightBeat,
    /// SpO2-D (frame 9) and HR-D (frames 20–21): 4-beat, display-formatted.
    FourBeatDisplay,
    /// E-SpO2-D (frame 17) and E-HR-D (frames 22–23): 8-beat,
    /// display-formatted.
    EightBeatDisplay,
}

/// Options of a Nonin module.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoninOptions {
    /// Which averaged values to report: `"four-beat"` (default),
    /// `"eight-beat"`, `"four-beat-display"`, `"eight-beat-display"`.
    pub averaging: Averaging,
    /// Emit the pleth waveform (25 samples per packet). Default true.
    pub pleth: bool,
}

impl Default for NoninOptions {
    fn default() -> Self {
        NoninOptions {
            averaging: Averaging::FourBeat,
            pleth: true,
        }
    }
}

/// The Data Format 7 protocol.
#[derive(Debug, Clone)]
pub struct Nonin {
    averaging: Averaging,
    pleth: bool,
}

impl Nonin {
    pub fn new(opts: NoninOptions) -> Result<Self, String> {
        Ok(Nonin {
            averaging: opts.averaging,
            pleth: opts.pleth,
        })
    }
}

fn add(flags: &mut Vec<i32>, f: QualityFlag) {
    if !flags.contains(&(f as i32)) {
        flags.push(f as i32);
    }
}

/// Validity and flags from the status bits of a packet:
/// SNSD → SENSOR_OFF, INVALID; SNSA → DEVICE_FAULT, INVALID (the
/// specification says the data is unusable); OOT → SEARCHING, ARTF →
/// INTERFERENCE, red perfusion → LOW_SIGNAL, each QUESTIONABLE.
pub fn status_quality(p: &NoninPacket) -> (Validity, Vec<i32>) {
    use codec::status::*;
    let s = p.status_any();
    let mut flags = vec![];
    let mut invalid = false;
    if s & SNSD != 0 {
        add(&mut flags, QualityFlag::SensorOff);
        invalid = true;
    }
    if s & SNSA != 0 {
        add(&mut flags, QualityFlag::DeviceFault);
        invalid = true;
    }
    if s & OOT != 0 {
        add(&mut flags, QualityFlag::Searching);
    }
    if s & ARTF != 0 {
        add(&mut flags, QualityFlag::Interference);
    }
    if p.red_perfusion() {
        add(&mut flags, QualityFlag::LowSignal);
    }
    let validity = if invalid {
        Validity::Invalid
    } else if flags.is_empty() {
        Validity::Valid
    } else {
        Validity::Questionable
    };
    (validity, flags)
}

/// The SpO2 and pulse-rate values selected by `averaging`.
pub fn selected(v: &PacketValues, averaging: Averaging) -> (u8, u16, &'static str, &'static str) {
    match averaging {
        Averaging::FourBeat => (v.spo2, v.hr, "SpO2", "HR"),
        Averaging::EightBeat => (v.e_spo2, v.e_hr, "E-SpO2", "E-HR"),
        Averaging::FourBeatDisplay => (v.spo2_d, v.hr_d, "SpO2-D", "HR-D"),
        Averaging::EightBeatDisplay => (v.e_spo2_d, v.e_hr_d, "E-SpO2-D", "E-HR-D"),
    }
}

/// Map one packet to its SpO2 and pulse-rate readings. Missing-data values
/// (SpO2 127, HR 511) become readings without a value, INVALID +
/// VALUE_MISSING; an SpO2 above 100 that is not the missing-data value is
/// kept but marked INVALID + OUT_OF_DEVICE_RANGE (it is not a possible
/// saturation). Returns the readings and the number of such unexpected
/// values (for the `unknown_flags` counter).
pub fn packet_to_readings(
    p: &NoninPacket,
    averaging: Averaging,
    gateway_time_us: i64,
) -> (Vec<Reading>, usize) {
    let (validity, flags) = status_quality(p);
    let (spo2, hr, spo2_label, hr_label) = selected(&p.values(), averaging);
    let mut unexpected = 0;
    let mut reading = |mdc: u32,
                       label: &str,
                       unit: shared_protocol::catalogue::Unit,
                       raw: u32,
                       missing: u32,
                       max: Option<u32>| {
        let mut flags = flags.clone();
        let (value, validity) = if raw == missing {
            add(&mut flags, QualityFlag::ValueMissing);
            (None, Validity::Invalid)
        } else if max.is_some_and(|m| raw > m) {
            unexpected += 1;
            add(&mut flags, QualityFlag::OutOfDeviceRange);
            (Some(Value::Numeric(f64::from(raw))), Validity::Invalid)
        } else {
            (Some(Value::Numeric(f64::from(raw))), validity)
        };
        Reading {
            mdc_code: mdc,
            vendor_label: label.to_string(),
            value,
            mdc_unit: unit.mdc,
            ucum_unit: unit.ucum.to_string(),
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
    };
    let readings = vec![
        reading(
            codes::PULS_OXIM_SAT_O2,
            spo2_label,
            units::PERCENT,
            u32::from(spo2),
            u32::from(codec::SPO2_MISSING),
            Some(100),
        ),
        reading(
            codes::PULS_OXIM_PULS_RATE,
            hr_label,
            units::BEAT_PER_MIN,
            u32::from(hr),
            u32::from(codec::HR_MISSING),
            None,
        ),
    ];
    (readings, unexpected)
}

/// The packet's pleth as a waveform: 25 samples, 13 333 µs apart, raw
/// device units (scale 1, offset 0, dimensionless), starting one packet
/// duration before the receive time (`GATEWAY_RECEIVE`); validity and flags
/// from the status bits as for the readings.
pub fn packet_to_waveform(p: &NoninPacket, gateway_time_us: i64) -> Waveform {
    let (validity, flags) = status_quality(p);
    Waveform {
        mdc_code: MDC_PULS_OXIM_PLETH,
        vendor_label: "Pleth".into(),
        start_time_us: gateway_time_us - codec::PACKET_DURATION_US,
        time_source: TimeSource::GatewayReceive as i32,
        sample_period_us: codec::FRAME_PERIOD_US,
        scale: 1.0,
        offset: 0.0,
        mdc_unit: MDC_DIM_DIMLESS,
        ucum_unit: UCUM_DIMLESS.into(),
        samples: p.pleth().iter().map(|&s| i32::from(s)).collect(),
        validity: validity as i32,
        flags,
        sequence: 0,
    }
}

impl Protocol for Nonin {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn manufacturer(&self) -> &'static str {
        "Nonin Medical"
    }

    fn default_serial(&self) -> SerialSettings {
        SERIAL
    }

    async fn session<L>(&self, mut link: L, ctx: &mut SessionCtx<'_>) -> Result<(), DriverError>
    where
        L: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // Receive-only: Data Format 7 streams without a request.
        let mut dec = NoninDecoder::new();
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            let res = ctx.read(&mut link, &mut buf).await;
            let eof = matches!(res, Err(DriverError::Eof));
            match res {
                Ok(_) | Err(DriverError::Eof) => {}
                Err(e) => return Err(e),
            }
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(packet)) => {
                        ctx.stats.frame_ok();
                        ctx.connected().await?;
                        let now = now_us();
                        let (readings, unexpected) =
                            packet_to_readings(&packet, self.averaging, now);
                        for _ in 0..unexpected {
                            ctx.stats.unknown_flags();
                        }
                        let waveforms = if self.pleth {
                            vec![packet_to_waveform(&packet, now)]
                        } else {
                            vec![]
                        };
                        ctx.emit(readings, waveforms).await?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        ctx.stats.frame_error(e.dropped());
                        tracing::debug!(device_id = %ctx.device_id, error = %e, "nonin: bad input skipped");
                    }
                }
            }
            if eof {
                if !buf.is_empty() {
                    ctx.stats.frame_error(buf.len());
                }
                return Err(DriverError::Eof);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::codec::*;
    use super::*;
    use std::time::Duration;

    fn vals(spo2: u8, hr: u16) -> PacketValues {
        PacketValues {
            hr,
            spo2,
            e_hr: hr + 1,
            e_spo2: spo2.saturating_sub(1),
            hr_d: hr,
            spo2_d: spo2,
            e_hr_d: hr + 1,
            e_spo2_d: spo2.saturating_sub(1),
            ..Default::default()
        }
    }

    fn packet(extra_status: u8, v: &PacketValues) -> NoninPacket {
        let mut statuses = [0x80 | extra_status; 25];
        for s in statuses.iter_mut().take(12) {
            *s |= status::GPRF;
        }
        let pleth = std::array::from_fn(|i| 1000 * i as u16);
        NoninPacket::build(&statuses, &pleth, v)
    }

    #[test]
    fn values_map_with_codes_units_and_gateway_time() {
        let (rs, u) = packet_to_readings(&packet(0, &vals(97, 72)), Averaging::FourBeat, 42);
        assert_eq!(u, 0);
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[0].mdc_code, codes::PULS_OXIM_SAT_O2);
        assert_eq!(rs[0].mdc_code, 150_456);
        assert_eq!(rs[0].value, Some(Value::Numeric(97.0)));
        assert_eq!(rs[0].ucum_unit, "%");
        assert_eq!(rs[0].mdc_unit, units::PERCENT.mdc);
        assert_eq!(rs[1].mdc_code, 149_530);
        assert_eq!(rs[1].value, Some(Value::Numeric(72.0)));
        assert_eq!(rs[1].ucum_unit, "/min");
        for r in &rs {
            assert_eq!(r.validity, Validity::Valid as i32);
            assert!(r.flags.is_empty());
            assert_eq!(r.device_time_us, 42);
            assert_eq!(r.gateway_time_us, 42);
            assert_eq!(r.time_source, TimeSource::GatewayReceive as i32);
        }
        let (rs, _) = packet_to_readings(&packet(0, &vals(97, 72)), Averaging::EightBeat, 0);
        assert_eq!(rs[0].value, Some(Value::Numeric(96.0)));
        assert_eq!(rs[1].value, Some(Value::Numeric(73.0)));
        assert_eq!(rs[0].vendor_label, "E-SpO2");
    }

    #[test]
    fn missing_data_and_sensor_off_have_no_value() {
        let p = packet(status::SNSD, &vals(SPO2_MISSING, HR_MISSING));
        let (rs, _) = packet_to_readings(&p, Averaging::FourBeat, 0);
        for r in &rs {
            assert_eq!(r.value, None);
            assert_eq!(r.validity, Validity::Invalid as i32);
            assert!(r.flags.contains(&(QualityFlag::ValueMissing as i32)));
            assert!(r.flags.contains(&(QualityFlag::SensorOff as i32)));
        }
        let w = packet_to_waveform(&p, 1_000_000);
        assert_eq!(w.validity, Validity::Invalid as i32);
        assert_eq!(w.flags, vec![QualityFlag::SensorOff as i32]);
    }

    #[test]
    fn status_conditions_qualify_values() {
        for (bits, flag, validity) in [
            (status::SNSA, QualityFlag::DeviceFault, Validity::Invalid),
            (status::OOT, QualityFlag::Searching, Validity::Questionable),
            (
                status::ARTF,
                QualityFlag::Interference,
                Validity::Questionable,
            ),
            (status::RPRF, QualityFlag::LowSignal, Validity::Questionable),
        ] {
            let (rs, _) = packet_to_readings(&packet(bits, &vals(95, 80)), Averaging::FourBeat, 0);
            for r in &rs {
                assert!(r.value.is_some());
                assert_eq!(r.validity, validity as i32, "{bits:#x}");
                assert_eq!(r.flags, vec![flag as i32], "{bits:#x}");
            }
        }
        // Yellow (RPRF + GPRF) is not red: no LOW_SIGNAL.
        let (rs, _) = packet_to_readings(
            &packet(status::RPRF | status::GPRF, &vals(95, 80)),
            Averaging::FourBeat,
            0,
        );
        assert_eq!(rs[0].validity, Validity::Valid as i32);
        // An SpO2 above 100 is kept but not trusted.
        let (rs, u) = packet_to_readings(&packet(0, &vals(110, 80)), Averaging::FourBeat, 0);
        assert_eq!(u, 1);
        assert_eq!(rs[0].value, Some(Value::Numeric(110.0)));
        assert_eq!(rs[0].validity, Validity::Invalid as i32);
        assert_eq!(rs[0].flags, vec![QualityFlag::OutOfDeviceRange as i32]);
    }

    #[test]
    fn waveform_has_the_packet_samples_and_timing() {
        let w = packet_to_waveform(&packet(0, &vals(97, 72)), 10_000_000);
        assert_eq!(w.mdc_code, 150_452);
        assert_eq!(w.samples.len(), 25);
        assert_eq!(w.samples[3], 3000);
        assert_eq!(w.sample_period_us, 13_333);
        assert_eq!(w.start_time_us, 10_000_000 - 333_325);
        assert_eq!(w.mdc_unit, 262_656);
        assert_eq!(w.ucum_unit, "1");
        assert_eq!((w.scale, w.offset), (1.0, 0.0));
        assert_eq!(w.time_source, TimeSource::GatewayReceive as i32);
        assert_eq!(w.validity, Validity::Valid as i32);
    }

    #[test]
    fn options_parse() {
        let o: NoninOptions = toml::from_str("averaging = \"eight-beat\"").unwrap();
        assert_eq!(o.averaging, Averaging::EightBeat);
        assert!(o.pleth);
        assert!(toml::from_str::<NoninOptions>("bogus = 1").is_err());
        assert!(toml::from_str::<NoninOptions>("averaging = \"fast\"").is_err());
        assert!(Nonin::new(NoninOptions::default()).is_ok());
    }

    #[tokio::test]
    async fn session_connects_after_a_packet_and_ends_on_eof() {
        use crate::DriverStats;
        use tokio::io::AsyncWriteExt;
        let stats = DriverStats::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let (_stop, mut shutdown) = tokio::sync::watch::channel(false);
        let (mut dev, host) = tokio::io::duplex(4096);
        let proto = Nonin::new(NoninOptions::default()).unwrap();
        let device = tokio::spawn(async move {
            let p = packet(0, &vals(98, 64)).encode();
            let mut out = p[50..].to_vec(); // joined mid-packet: 75 bytes
            out.extend_from_slice(&p);
            out.extend_from_slice(&p[..10]); // cut off
            dev.write_all(&out).await.unwrap();
        });
        let mut ctx = SessionCtx::new("ox", &stats, &tx, &mut shutdown, Duration::from_secs(5));
        let end = proto.session(host, &mut ctx).await;
        assert!(matches!(end, Err(DriverError::Eof)), "{end:?}");
        device.await.unwrap();
        let connected = rx.recv().await.unwrap();
        assert_eq!(connected.technical.len(), 1);
        let out = rx.recv().await.unwrap();
        assert_eq!(out.readings.len(), 2);
        assert_eq!(out.waveforms.len(), 1);
        assert_eq!(out.readings[0].value, Some(Value::Numeric(98.0)));
        let snap = stats.snapshot();
        assert_eq!(snap.frames_ok, 1);
        assert_eq!(snap.bytes_dropped, 75 + 10);
    }
}
