//! Pulse Oximeter Service 1.0 (PLXS): PLX Spot-check Measurement (0x2A5E,
//! PLXS §3.1) and PLX Continuous Measurement (0x2A5F, PLXS §3.2), as in the
//! GATT Specification Supplement (GSS).
//!
//! ```text
//! Spot-check flags u8: bit 0 Timestamp present, bit 1 Measurement Status
//!   present, bit 2 Device and Sensor Status present, bit 3 Pulse Amplitude
//!   Index present, bit 4 Device Clock is Not Set, bits 7..5 reserved.
//!   SpO2 SFLOAT (%), PR SFLOAT (bpm) [timestamp 7] [meas. status u16]
//!   [device & sensor status u24] [PAI SFLOAT (%)]
//! Continuous flags u8: bit 0 SpO2PR-Fast present, bit 1 SpO2PR-Slow
//!   present, bit 2 Measurement Status present, bit 3 Device and Sensor
//!   Status present, bit 4 Pulse Amplitude Index present, bits 7..5 reserved.
//!   SpO2PR-Normal (SpO2, PR SFLOATs) [SpO2PR-Fast] [SpO2PR-Slow]
//!   [meas. status u16] [device & sensor status u24] [PAI SFLOAT]
//! ```

use super::{DateTime, GattError, Numeric, Reader, put_sfloat};

/// Measurement Status (PLXS "Measurement Status" field): bits 4..0 reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasurementStatus(pub u16);

impl MeasurementStatus {
    pub const MEASUREMENT_ONGOING: u16 = 1 << 5;
    pub const EARLY_ESTIMATED: u16 = 1 << 6;
    pub const VALIDATED: u16 = 1 << 7;
    pub const FULLY_QUALIFIED: u16 = 1 << 8;
    pub const FROM_STORAGE: u16 = 1 << 9;
    pub const DEMONSTRATION: u16 = 1 << 10;
    pub const TESTING: u16 = 1 << 11;
    pub const CALIBRATION_ONGOING: u16 = 1 << 12;
    pub const UNAVAILABLE: u16 = 1 << 13;
    pub const QUESTIONABLE: u16 = 1 << 14;
    pub const INVALID: u16 = 1 << 15;
    pub const RESERVED: u16 = 0x001F;
}

/// Device and Sensor Status (PLXS "Device and Sensor Status" field, 24 bits): bits 23..16 reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSensorStatus(pub u32);

impl DeviceSensorStatus {
    pub const EXTENDED_DISPLAY_UPDATE: u32 = 1 << 0;
    pub const EQUIPMENT_MALFUNCTION: u32 = 1 << 1;
    pub const SIGNAL_PROCESSING_IRREGULARITY: u32 = 1 << 2;
    pub const INADEQUATE_SIGNAL: u32 = 1 << 3;
    pub const POOR_SIGNAL: u32 = 1 << 4;
    pub const LOW_PERFUSION: u32 = 1 << 5;
    pub const ERRATIC_SIGNAL: u32 = 1 << 6;
    pub const NONPULSATILE_SIGNAL: u32 = 1 << 7;
    pub const QUESTIONABLE_PULSE: u32 = 1 << 8;
    pub const SIGNAL_ANALYSIS_ONGOING: u32 = 1 << 9;
    pub const SENSOR_INTERFERENCE: u32 = 1 << 10;
    pub const SENSOR_UNCONNECTED_TO_USER: u32 = 1 << 11;
    pub const UNKNOWN_SENSOR: u32 = 1 << 12;
    pub const SENSOR_DISPLACED: u32 = 1 << 13;
    pub const SENSOR_MALFUNCTIONING: u32 = 1 << 14;
    pub const SENSOR_DISCONNECTED: u32 = 1 << 15;
    pub const RESERVED: u32 = 0x00FF_0000;
}

/// One SpO2 / pulse rate pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpO2Pr {
    /// Percent.
    pub spo2: Numeric,
    /// Beats per minute.
    pub pulse_rate: Numeric,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotCheckMeasurement {
    pub reading: SpO2Pr,
    pub time_stamp: Option<DateTime>,
    pub measurement_status: Option<MeasurementStatus>,
    pub device_sensor_status: Option<DeviceSensorStatus>,
    /// Percent.
    pub pulse_amplitude_index: Option<Numeric>,
    /// Flags bit 4: the device's clock is not set, so the time stamp is not
    /// a time.
    pub clock_not_set: bool,
    pub reserved_flags: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContinuousMeasurement {
    pub normal: SpO2Pr,
    /// Decoded, not emitted (the normal averaging is what a monitor shows).
    pub fast: Option<SpO2Pr>,
    /// Decoded, not emitted.
    pub slow: Option<SpO2Pr>,
    pub measurement_status: Option<MeasurementStatus>,
    pub device_sensor_status: Option<DeviceSensorStatus>,
    pub pulse_amplitude_index: Option<Numeric>,
    pub reserved_flags: u8,
}

fn pair(r: &mut Reader<'_>, spo2: &'static str, pr: &'static str) -> Result<SpO2Pr, GattError> {
    Ok(SpO2Pr {
        spo2: r.sfloat(spo2)?,
        pulse_rate: r.sfloat(pr)?,
    })
}

fn put_pair(out: &mut Vec<u8>, p: &SpO2Pr) {
    put_sfloat(out, p.spo2);
    put_sfloat(out, p.pulse_rate);
}

const RESERVED: u8 = 0xE0;

mod spot {
    pub const TIME: u8 = 0x01;
    pub const MEAS_STATUS: u8 = 0x02;
    pub const DEV_STATUS: u8 = 0x04;
    pub const PAI: u8 = 0x08;
    pub const CLOCK_NOT_SET: u8 = 0x10;
}

mod cont {
    pub const FAST: u8 = 0x01;
    pub const SLOW: u8 = 0x02;
    pub const MEAS_STATUS: u8 = 0x04;
    pub const DEV_STATUS: u8 = 0x08;
    pub const PAI: u8 = 0x10;
}

pub fn decode_spot_check(value: &[u8]) -> Result<SpotCheckMeasurement, GattError> {
    let mut r = Reader::new(value);
    let flags = r.u8("flags")?;
    let reading = pair(&mut r, "SpO2", "PR")?;
    let time_stamp = (flags & spot::TIME != 0)
        .then(|| r.date_time("timestamp"))
        .transpose()?;
    let measurement_status = (flags & spot::MEAS_STATUS != 0)
        .then(|| r.u16("measurement status").map(MeasurementStatus))
        .transpose()?;
    let device_sensor_status = (flags & spot::DEV_STATUS != 0)
        .then(|| r.u24("device and sensor status").map(DeviceSensorStatus))
        .transpose()?;
    let pulse_amplitude_index = (flags & spot::PAI != 0)
        .then(|| r.sfloat("pulse amplitude index"))
        .transpose()?;
    r.finish()?;
    Ok(SpotCheckMeasurement {
        reading,
        time_stamp,
        measurement_status,
        device_sensor_status,
        pulse_amplitude_index,
        clock_not_set: flags & spot::CLOCK_NOT_SET != 0,
        reserved_flags: flags & RESERVED,
    })
}

pub fn encode_spot_check(m: &SpotCheckMeasurement) -> Vec<u8> {
    let mut flags = m.reserved_flags & RESERVED;
    for (present, bit) in [
        (m.time_stamp.is_some(), spot::TIME),
        (m.measurement_status.is_some(), spot::MEAS_STATUS),
        (m.device_sensor_status.is_some(), spot::DEV_STATUS),
        (m.pulse_amplitude_index.is_some(), spot::PAI),
        (m.clock_not_set, spot::CLOCK_NOT_SET),
    ] {
        if present {
            flags |= bit;
        }
    }
    let mut out = vec![flags];
    put_pair(&mut out, &m.reading);
    if let Some(t) = &m.time_stamp {
        t.encode(&mut out);
    }
    put_statuses(&mut out, m.measurement_status, m.device_sensor_status);
    if let Some(p) = m.pulse_amplitude_index {
        put_sfloat(&mut out, p);
    }
    out
}

fn put_statuses(out: &mut Vec<u8>, m: Option<MeasurementStatus>, d: Option<DeviceSensorStatus>) {
    if let Some(s) = m {
        out.extend_from_slice(&s.0.to_le_bytes());
    }
    if let Some(s) = d {
        out.extend_from_slice(&s.0.to_le_bytes()[..3]);
    }
}

pub fn decode_continuous(value: &[u8]) -> Result<ContinuousMeasurement, GattError> {
    let mut r = Reader::new(value);
    let flags = r.u8("flags")?;
    let normal = pair(&mut r, "SpO2PR-Normal SpO2", "SpO2PR-Normal PR")?;
    let fast = (flags & cont::FAST != 0)
        .then(|| pair(&mut r, "SpO2PR-Fast SpO2", "SpO2PR-Fast PR"))
        .transpose()?;
    let slow = (flags & cont::SLOW != 0)
        .then(|| pair(&mut r, "SpO2PR-Slow SpO2", "SpO2PR-Slow PR"))
        .transpose()?;
    let measurement_status = (flags & cont::MEAS_STATUS != 0)
        .then(|| r.u16("measurement status").map(MeasurementStatus))
        .transpose()?;
    let device_sensor_status = (flags & cont::DEV_STATUS != 0)
        .then(|| r.u24("device and sensor status").map(DeviceSensorStatus))
        .transpose()?;
    let pulse_amplitude_index = (flags & cont::PAI != 0)
        .then(|| r.sfloat("pulse amplitude index"))
        .transpose()?;
    r.finish()?;
    Ok(ContinuousMeasurement {
        normal,
        fast,
        slow,
        measurement_status,
        device_sensor_status,
        pulse_amplitude_index,
        reserved_flags: flags & RESERVED,
    })
}

pub fn encode_continuous(m: &ContinuousMeasurement) -> Vec<u8> {
    let mut flags = m.reserved_flags & RESERVED;
    for (present, bit) in [
        (m.fast.is_some(), cont::FAST),
        (m.slow.is_some(), cont::SLOW),
        (m.measurement_status.is_some(), cont::MEAS_STATUS),
        (m.device_sensor_status.is_some(), cont::DEV_STATUS),
        (m.pulse_amplitude_index.is_some(), cont::PAI),
    ] {
        if present {
            flags |= bit;
        }
    }
    let mut out = vec![flags];
    put_pair(&mut out, &m.normal);
    if let Some(p) = &m.fast {
        put_pair(&mut out, p);
    }
    if let Some(p) = &m.slow {
        put_pair(&mut out, p);
    }
    put_statuses(&mut out, m.measurement_status, m.device_sensor_status);
    if let Some(p) = m.pulse_amplitude_index {
        put_sfloat(&mut out, p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::strategies;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spot_check_with_every_field() {
        // PLXS 1.0 §3.1 / GSS "PLX Spot-check Measurement":
        let v = [
            0x0F, // flags: timestamp, measurement status, device & sensor status, PAI
            0x61, 0x00, // SpO2 SFLOAT 0x0061 → 97 %
            0x48, 0x00, // PR SFLOAT 0x0048 → 72 bpm
            0xEA, 0x07, 11, 24, 10, 5, 30, // timestamp 2026-11-24 10:05:30
            0x80, 0x00, // measurement status 0x0080: validated data (bit 7)
            0x20, 0x00, 0x00, // device & sensor status 0x000020: low perfusion (bit 5)
            0x24, 0xF0, // PAI SFLOAT 0xF024: exponent -1, mantissa 36 → 3.6 %
        ];
        let m = decode_spot_check(&v).unwrap();
        assert_eq!(m.reading.spo2.value(), Some(97.0));
        assert_eq!(m.reading.pulse_rate.value(), Some(72.0));
        assert!(m.time_stamp.is_some());
        assert_eq!(
            m.measurement_status,
            Some(MeasurementStatus(MeasurementStatus::VALIDATED))
        );
        assert_eq!(
            m.device_sensor_status,
            Some(DeviceSensorStatus(DeviceSensorStatus::LOW_PERFUSION))
        );
        assert_eq!(m.pulse_amplitude_index.unwrap().value(), Some(3.6));
        assert!(!m.clock_not_set);
        assert_eq!(encode_spot_check(&m), v);
    }

    #[test]
    fn continuous_with_fast_slow_and_nan() {
        // PLXS 1.0 §3.2 / GSS "PLX Continuous Measurement":
        let v = [
            0x0B, // flags: fast (bit 0), slow (bit 1), device & sensor status (bit 3)
            0xFF, 0x07, // normal SpO2 0x07FF = NaN (no reading while searching)
            0xFF, 0x07, // normal PR NaN
            0x60, 0x00, 0x47, 0x00, // fast: 96 %, 71 bpm
            0x62, 0x00, 0x49, 0x00, // slow: 98 %, 73 bpm
            0x00, 0x88,
            0x00, // device & sensor status 0x008800: sensor unconnected to user (bit 11), sensor disconnected (bit 15)
        ];
        let m = decode_continuous(&v).unwrap();
        assert_eq!(m.normal.spo2, Numeric::NaN);
        assert_eq!(m.fast.unwrap().spo2.value(), Some(96.0));
        assert_eq!(m.slow.unwrap().pulse_rate.value(), Some(73.0));
        assert_eq!(m.device_sensor_status.unwrap().0, 0x8800);
        assert_eq!(m.measurement_status, None);
        assert_eq!(encode_continuous(&m), v);
    }

    #[test]
    fn lengths_are_checked_against_the_flags() {
        assert!(decode_spot_check(&[0x00, 0x61, 0x00, 0x48]).is_err());
        assert!(decode_spot_check(&[0x04, 0x61, 0x00, 0x48, 0x00, 0x20, 0x00]).is_err());
        assert_eq!(
            decode_continuous(&[0x00, 0x61, 0x00, 0x48, 0x00, 0x00]),
            Err(GattError::Trailing(1))
        );
        assert!(decode_continuous(&[0x01, 0x61, 0x00, 0x48, 0x00, 0x60, 0x00]).is_err());
    }

    fn pair_s() -> impl Strategy<Value = SpO2Pr> {
        (strategies::sfloat(), strategies::sfloat())
            .prop_map(|(spo2, pulse_rate)| SpO2Pr { spo2, pulse_rate })
    }

    fn statuses() -> impl Strategy<Value = (Option<MeasurementStatus>, Option<DeviceSensorStatus>)>
    {
        (
            proptest::option::of(any::<u16>().prop_map(MeasurementStatus)),
            proptest::option::of((0u32..0x0100_0000).prop_map(DeviceSensorStatus)),
        )
    }

    proptest! {
        #[test]
        fn spot_check_round_trips(
            reading in pair_s(),
            t in proptest::option::of(strategies::date_time()),
            (ms, ds) in statuses(),
            pai in proptest::option::of(strategies::sfloat()),
            clock_not_set in any::<bool>(),
            res in any::<u8>(),
        ) {
            let m = SpotCheckMeasurement { reading, time_stamp: t, measurement_status: ms, device_sensor_status: ds, pulse_amplitude_index: pai, clock_not_set, reserved_flags: res & RESERVED };
            prop_assert_eq!(decode_spot_check(&encode_spot_check(&m)).unwrap(), m);
        }

        #[test]
        fn continuous_round_trips(
            normal in pair_s(),
            fast in proptest::option::of(pair_s()),
            slow in proptest::option::of(pair_s()),
            (ms, ds) in statuses(),
            pai in proptest::option::of(strategies::sfloat()),
            res in any::<u8>(),
        ) {
            let m = ContinuousMeasurement { normal, fast, slow, measurement_status: ms, device_sensor_status: ds, pulse_amplitude_index: pai, reserved_flags: res & RESERVED };
            prop_assert_eq!(decode_continuous(&encode_continuous(&m)).unwrap(), m);
        }

        #[test]
        fn never_panics(v in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode_spot_check(&v);
            let _ = decode_continuous(&v);
        }
    }
}
