//! Heart Rate Measurement (0x2A37): Heart Rate Service 1.0 §3.1 / GATT
//! Specification Supplement §3.113.
//!
//! ```text
//! flags u8   bit 0     heart rate value format: 0 = uint8, 1 = uint16 (bpm)
//!            bits 2..1 sensor contact: 0/1 = not supported,
//!                      2 = supported, not detected; 3 = supported, detected
//!            bit 3     Energy Expended present (uint16, kJ)
//!            bit 4     RR-Interval(s) present (uint16 each, 1/1024 s, oldest first)
//!            bits 7..5 reserved
//! ```

use super::{GattError, Reader};

/// Sensor contact status (flags bits 2..1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensorContact {
    NotSupported,
    NotDetected,
    Detected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartRateMeasurement {
    /// Beats per minute.
    pub heart_rate: u16,
    /// Whether the value was sent in the 16-bit format (for re-encoding).
    pub wide: bool,
    pub contact: SensorContact,
    /// Energy expended since the last reset, kJ.
    pub energy_expended_kj: Option<u16>,
    /// RR intervals in units of 1/1024 s, oldest first. Decoded, not emitted
    /// as readings (see docs/protocols.md).
    pub rr_intervals: Vec<u16>,
    /// Reserved flag bits that were set.
    pub reserved_flags: u8,
}

const WIDE: u8 = 0x01;
const CONTACT_SUPPORTED: u8 = 0x04;
const CONTACT_DETECTED: u8 = 0x02;
const ENERGY: u8 = 0x08;
const RR: u8 = 0x10;
const RESERVED: u8 = 0xE0;

pub fn decode(value: &[u8]) -> Result<HeartRateMeasurement, GattError> {
    let mut r = Reader::new(value);
    let flags = r.u8("flags")?;
    let wide = flags & WIDE != 0;
    let heart_rate = if wide {
        r.u16("heart rate (uint16)")?
    } else {
        u16::from(r.u8("heart rate (uint8)")?)
    };
    let contact = match (
        flags & CONTACT_SUPPORTED != 0,
        flags & CONTACT_DETECTED != 0,
    ) {
        (false, _) => SensorContact::NotSupported,
        (true, false) => SensorContact::NotDetected,
        (true, true) => SensorContact::Detected,
    };
    let energy_expended_kj = if flags & ENERGY != 0 {
        Some(r.u16("energy expended")?)
    } else {
        None
    };
    let mut rr_intervals = Vec::new();
    if flags & RR != 0 {
        // One or more intervals fill the rest of the value.
        if r.remaining() == 0 {
            return Err(GattError::Truncated {
                field: "RR-interval",
                needed: 2,
                available: 0,
            });
        }
        while r.remaining() > 0 {
            rr_intervals.push(r.u16("RR-interval")?);
        }
    }
    r.finish()?;
    Ok(HeartRateMeasurement {
        heart_rate,
        wide,
        contact,
        energy_expended_kj,
        rr_intervals,
        reserved_flags: flags & RESERVED,
    })
}

/// Encode (for the simulator and the tests). A value above 255 is always
/// sent in the 16-bit format.
pub fn encode(m: &HeartRateMeasurement) -> Vec<u8> {
    let wide = m.wide || m.heart_rate > 255;
    let mut flags = m.reserved_flags & RESERVED;
    if wide {
        flags |= WIDE;
    }
    flags |= match m.contact {
        SensorContact::NotSupported => 0,
        SensorContact::NotDetected => CONTACT_SUPPORTED,
        SensorContact::Detected => CONTACT_SUPPORTED | CONTACT_DETECTED,
    };
    if m.energy_expended_kj.is_some() {
        flags |= ENERGY;
    }
    if !m.rr_intervals.is_empty() {
        flags |= RR;
    }
    let mut out = vec![flags];
    if wide {
        out.extend_from_slice(&m.heart_rate.to_le_bytes());
    } else {
        out.push(m.heart_rate as u8);
    }
    if let Some(e) = m.energy_expended_kj {
        out.extend_from_slice(&e.to_le_bytes());
    }
    for rr in &m.rr_intervals {
        out.extend_from_slice(&rr.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uint8_rate_with_contact_and_rr_intervals() {
        // HRS 1.0 §3.1 / GSS §3.113 Heart Rate Measurement:
        let v = [
            0x16, // flags: uint8 format, contact supported (bit 2) + detected (bit 1), RR present (bit 4)
            0x48, // heart rate 72 bpm
            0x00, 0x04, // RR-interval 0 = 0x0400 = 1024/1024 s = 1.000 s (oldest)
            0x16, 0x03, // RR-interval 1 = 0x0316 = 790/1024 s ≈ 0.771 s
        ];
        let m = decode(&v).unwrap();
        assert_eq!(m.heart_rate, 72);
        assert_eq!(m.contact, SensorContact::Detected);
        assert_eq!(m.energy_expended_kj, None);
        assert_eq!(m.rr_intervals, vec![1024, 790]);
        assert_eq!(encode(&m), v);
    }

    #[test]
    fn uint16_rate_energy_and_no_contact() {
        let v = [
            0x0D, // flags: uint16 format (bit 0), contact supported but not detected (bits 2..1 = 0b10), energy present (bit 3)
            0x2C, 0x01, // heart rate 0x012C = 300 bpm
            0x10, 0x27, // energy expended 0x2710 = 10000 kJ
        ];
        let m = decode(&v).unwrap();
        assert_eq!(m.heart_rate, 300);
        assert_eq!(m.contact, SensorContact::NotDetected);
        assert_eq!(m.energy_expended_kj, Some(10_000));
        assert!(m.rr_intervals.is_empty());
    }

    #[test]
    fn lengths_are_checked_against_the_flags() {
        assert!(matches!(decode(&[]), Err(GattError::Truncated { .. })));
        // uint16 format announced, one byte given.
        assert!(matches!(
            decode(&[0x01, 0x48]),
            Err(GattError::Truncated { .. })
        ));
        // RR announced but none present, then half an interval.
        assert!(matches!(
            decode(&[0x10, 0x48]),
            Err(GattError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&[0x10, 0x48, 0x00]),
            Err(GattError::Truncated { .. })
        ));
        // Energy announced but missing.
        assert!(matches!(
            decode(&[0x08, 0x48, 0x01]),
            Err(GattError::Truncated { .. })
        ));
        // Bytes the flags do not announce.
        assert_eq!(decode(&[0x00, 0x48, 0x00]), Err(GattError::Trailing(1)));
        // Contact "not supported" has two encodings (0b00 and 0b01).
        assert_eq!(
            decode(&[0x02, 60]).unwrap().contact,
            SensorContact::NotSupported
        );
    }

    fn measurement() -> impl Strategy<Value = HeartRateMeasurement> {
        (
            any::<u16>(),
            any::<bool>(),
            prop_oneof![
                Just(SensorContact::NotSupported),
                Just(SensorContact::NotDetected),
                Just(SensorContact::Detected)
            ],
            proptest::option::of(any::<u16>()),
            proptest::collection::vec(any::<u16>(), 0..9),
            any::<u8>(),
        )
            .prop_map(
                |(hr, wide, contact, energy, rr, res)| HeartRateMeasurement {
                    heart_rate: hr,
                    wide: wide || hr > 255,
                    contact,
                    energy_expended_kj: energy,
                    rr_intervals: rr,
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
