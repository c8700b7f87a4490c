//! Blood Pressure Measurement (0x2A35): Blood Pressure Service 1.0 §3.1 /
//! GATT Specification Supplement (GSS), "Blood Pressure Measurement".
//!
//! ```text
//! flags u8   bit 0 units: 0 = mmHg, 1 = kPa (systolic, diastolic, MAP)
//!            bit 1 Time Stamp present (Date Time, 7 octets)
//!            bit 2 Pulse Rate present (SFLOAT, bpm)
//!            bit 3 User ID present (uint8, 0xFF = unknown user)
//!            bit 4 Measurement Status present (uint16)
//!            bits 7..5 reserved
//! systolic SFLOAT, diastolic SFLOAT, mean arterial pressure SFLOAT
//! [time stamp] [pulse rate] [user id] [measurement status]
//! ```
//!
//! Measurement Status bits: 0 body movement detected, 1 cuff too loose,
//! 2 irregular pulse detected, 4..3 pulse rate range (0 within, 1 above the
//! upper limit, 2 below the lower limit, 3 reserved), 5 improper
//! measurement position, 15..6 reserved.

use super::{DateTime, GattError, Numeric, Reader, put_sfloat};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressureUnit {
    MmHg,
    KPa,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BloodPressureMeasurement {
    pub unit: PressureUnit,
    pub systolic: Numeric,
    pub diastolic: Numeric,
    pub mean_arterial: Numeric,
    pub time_stamp: Option<DateTime>,
    /// Beats per minute.
    pub pulse_rate: Option<Numeric>,
    pub user_id: Option<u8>,
    pub status: Option<MeasurementStatus>,
    pub reserved_flags: u8,
}

/// The Measurement Status field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasurementStatus(pub u16);

impl MeasurementStatus {
    pub const BODY_MOVEMENT: u16 = 1 << 0;
    pub const CUFF_TOO_LOOSE: u16 = 1 << 1;
    pub const IRREGULAR_PULSE: u16 = 1 << 2;
    pub const PULSE_RATE_RANGE_MASK: u16 = 0b11 << 3;
    pub const IMPROPER_POSITION: u16 = 1 << 5;
    pub const RESERVED: u16 = 0xFFC0;

    pub fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }

    /// Pulse rate range: `Some(true)` above the device's upper limit,
    /// `Some(false)` below its lower limit, `None` within (or reserved).
    pub fn pulse_out_of_range(self) -> Option<bool> {
        match (self.0 & Self::PULSE_RATE_RANGE_MASK) >> 3 {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Reserved bits set, including the reserved pulse-range value 3.
    pub fn unknown_bits(self) -> u16 {
        let range_reserved = if (self.0 & Self::PULSE_RATE_RANGE_MASK) >> 3 == 3 {
            Self::PULSE_RATE_RANGE_MASK
        } else {
            0
        };
        (self.0 & Self::RESERVED) | range_reserved
    }
}

const KPA: u8 = 0x01;
const TIME: u8 = 0x02;
const PULSE: u8 = 0x04;
const USER: u8 = 0x08;
const STATUS: u8 = 0x10;
const RESERVED: u8 = 0xE0;

pub fn decode(value: &[u8]) -> Result<BloodPressureMeasurement, GattError> {
    let mut r = Reader::new(value);
    let flags = r.u8("flags")?;
    let unit = if flags & KPA != 0 {
        PressureUnit::KPa
    } else {
        PressureUnit::MmHg
    };
    let systolic = r.sfloat("systolic")?;
    let diastolic = r.sfloat("diastolic")?;
    let mean_arterial = r.sfloat("mean arterial pressure")?;
    let time_stamp = (flags & TIME != 0)
        .then(|| r.date_time("time stamp"))
        .transpose()?;
    let pulse_rate = (flags & PULSE != 0)
        .then(|| r.sfloat("pulse rate"))
        .transpose()?;
    let user_id = (flags & USER != 0).then(|| r.u8("user id")).transpose()?;
    let status = (flags & STATUS != 0)
        .then(|| r.u16("measurement status").map(MeasurementStatus))
        .transpose()?;
    r.finish()?;
    Ok(BloodPressureMeasurement {
        unit,
        systolic,
        diastolic,
        mean_arterial,
        time_stamp,
        pulse_rate,
        user_id,
        status,
        reserved_flags: flags & RESERVED,
    })
}

pub fn encode(m: &BloodPressureMeasurement) -> Vec<u8> {
    let mut flags = m.reserved_flags & RESERVED;
    if m.unit == PressureUnit::KPa {
        flags |= KPA;
    }
    if m.time_stamp.is_some() {
        flags |= TIME;
    }
    if m.pulse_rate.is_some() {
        flags |= PULSE;
    }
    if m.user_id.is_some() {
        flags |= USER;
    }
    if m.status.is_some() {
        flags |= STATUS;
    }
    let mut out = vec![flags];
    put_sfloat(&mut out, m.systolic);
    put_sfloat(&mut out, m.diastolic);
    put_sfloat(&mut out, m.mean_arterial);
    if let Some(t) = &m.time_stamp {
        t.encode(&mut out);
    }
    if let Some(p) = m.pulse_rate {
        put_sfloat(&mut out, p);
    }
    if let Some(u) = m.user_id {
        out.push(u);
    }
    if let Some(s) = m.status {
        out.extend_from_slice(&s.0.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::strategies;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn full_measurement_in_mmhg() {
        // BLS 1.0 §3.1 / GSS "Blood Pressure Measurement":
        let v = [
            0x1E, // flags: mmHg (bit 0 = 0), time stamp, pulse rate, user id, status
            0x79, 0x00, // systolic SFLOAT 0x0079: exponent 0, mantissa 121 → 121 mmHg
            0x51, 0x00, // diastolic SFLOAT 0x0051 → 81 mmHg
            0x5E, 0x00, // MAP SFLOAT 0x005E → 94 mmHg
            0xEA, 0x07, 11, 24, 10, 5, 30, // time stamp 2026-11-24 10:05:30 (GSS "Date Time")
            0x48, 0x00, // pulse rate SFLOAT → 72 bpm
            0x01, // user id 1
            0x05, 0x00, // status 0x0005: body movement (bit 0), irregular pulse (bit 2)
        ];
        let m = decode(&v).unwrap();
        assert_eq!(m.unit, PressureUnit::MmHg);
        assert_eq!(m.systolic.value(), Some(121.0));
        assert_eq!(m.diastolic.value(), Some(81.0));
        assert_eq!(m.mean_arterial.value(), Some(94.0));
        assert_eq!(m.time_stamp.unwrap().year, 2026);
        assert_eq!(m.pulse_rate.unwrap().value(), Some(72.0));
        assert_eq!(m.user_id, Some(1));
        let s = m.status.unwrap();
        assert!(s.has(MeasurementStatus::BODY_MOVEMENT));
        assert!(s.has(MeasurementStatus::IRREGULAR_PULSE));
        assert!(!s.has(MeasurementStatus::CUFF_TOO_LOOSE));
        assert_eq!(s.pulse_out_of_range(), None);
        assert_eq!(encode(&m), v);
    }

    #[test]
    fn kpa_with_nan_mean_and_pulse_above_range() {
        let v = [
            0x15, // flags: kPa (bit 0), pulse rate (bit 2), status (bit 4)
            0xA1, 0xF0, // systolic SFLOAT 0xF0A1: exponent -1, mantissa 161 → 16.1 kPa
            0x6D, 0xF0, // diastolic 0xF06D → 10.9 kPa
            0xFF, 0x07, // MAP 0x07FF = NaN (IEEE 11073-20601 §F.8)
            0xFA, 0x00, // pulse 250 bpm
            0x08, 0x00, // status bits 4..3 = 0b01: pulse rate exceeds upper limit
        ];
        let m = decode(&v).unwrap();
        assert_eq!(m.unit, PressureUnit::KPa);
        assert_eq!(m.systolic.value(), Some(16.1));
        assert_eq!(m.mean_arterial, Numeric::NaN);
        assert_eq!(m.status.unwrap().pulse_out_of_range(), Some(true));
        assert_eq!(m.status.unwrap().unknown_bits(), 0);
        assert_eq!(MeasurementStatus(0x0018).unknown_bits(), 0x0018);
    }

    #[test]
    fn lengths_are_checked_against_the_flags() {
        assert!(decode(&[0x00, 0x79, 0x00, 0x51, 0x00]).is_err());
        assert!(decode(&[0x02, 0x79, 0x00, 0x51, 0x00, 0x5E, 0x00, 0xEA]).is_err());
        assert_eq!(
            decode(&[0x00, 0x79, 0x00, 0x51, 0x00, 0x5E, 0x00, 0x00]),
            Err(GattError::Trailing(1))
        );
    }

    fn measurement() -> impl Strategy<Value = BloodPressureMeasurement> {
        (
            any::<bool>(),
            (
                strategies::sfloat(),
                strategies::sfloat(),
                strategies::sfloat(),
            ),
            proptest::option::of(strategies::date_time()),
            proptest::option::of(strategies::sfloat()),
            proptest::option::of(any::<u8>()),
            proptest::option::of(any::<u16>().prop_map(MeasurementStatus)),
            any::<u8>(),
        )
            .prop_map(
                |(kpa, (s, d, m), t, p, u, st, res)| BloodPressureMeasurement {
                    unit: if kpa {
                        PressureUnit::KPa
                    } else {
                        PressureUnit::MmHg
                    },
                    systolic: s,
                    diastolic: d,
                    mean_arterial: m,
                    time_stamp: t,
                    pulse_rate: p,
                    user_id: u,
                    status: st,
                    reserved_flags: res & RESERVED,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trips(m in measurement()) {
            prop_assert_eq!(decode(&encode(&m)).unwrap(), m);
        }

        #[test]
        fn never_panics(v in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode(&v);
        }
    }
}
