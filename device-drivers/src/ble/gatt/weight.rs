//! Weight Measurement (0x2A9D): Weight Scale Service 1.0 §3.2 / GATT
//! Specification Supplement (GSS), "Weight Measurement".
//!
//! ```text
//! flags u8   bit 0 units: 0 = SI (weight kg, height m),
//!                         1 = imperial (weight lb, height in)
//!            bit 1 Time Stamp present (Date Time, 7 octets)
//!            bit 2 User ID present (uint8, 0xFF = unknown user)
//!            bit 3 BMI and Height present (uint16 each)
//!            bits 7..4 reserved
//! weight uint16: SI resolution 0.005 kg, imperial 0.01 lb;
//!   0xFFFF = "Measurement Unsuccessful"
//! [time stamp] [user id] [BMI uint16, 0.1 kg/m²] [height uint16:
//!   SI 0.001 m, imperial 0.1 in]
//! ```

use super::{DateTime, GattError, Reader};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightUnit {
    /// Kilograms (resolution 0.005 kg); height in metres.
    Kilogram,
    /// Pounds (resolution 0.01 lb); height in inches.
    Pound,
}

/// The raw weight value meaning "Measurement Unsuccessful".
pub const WEIGHT_UNSUCCESSFUL: u16 = 0xFFFF;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightMeasurement {
    pub unit: WeightUnit,
    /// Raw weight in units of the resolution (see [`weight`](Self::weight)).
    pub weight_raw: u16,
    pub time_stamp: Option<DateTime>,
    pub user_id: Option<u8>,
    /// Raw (BMI in 0.1 kg/m², height in 0.001 m or 0.1 in). Decoded, not
    /// emitted: the height is the user's stored profile value and BMI is
    /// derived from it, not measured.
    pub bmi_height_raw: Option<(u16, u16)>,
    pub reserved_flags: u8,
}

impl WeightMeasurement {
    /// The weight in [`unit`](Self::unit), `None` when the scale reports the
    /// measurement as unsuccessful. Computed as raw ÷ 200 (kg) or raw ÷ 100
    /// (lb): the value the device means, at its resolution, with no unit
    /// conversion.
    pub fn weight(&self) -> Option<f64> {
        if self.weight_raw == WEIGHT_UNSUCCESSFUL {
            return None;
        }
        let raw = f64::from(self.weight_raw);
        Some(match self.unit {
            WeightUnit::Kilogram => raw / 200.0,
            WeightUnit::Pound => raw / 100.0,
        })
    }
}

const IMPERIAL: u8 = 0x01;
const TIME: u8 = 0x02;
const USER: u8 = 0x04;
const BMI_HEIGHT: u8 = 0x08;
const RESERVED: u8 = 0xF0;

pub fn decode(value: &[u8]) -> Result<WeightMeasurement, GattError> {
    let mut r = Reader::new(value);
    let flags = r.u8("flags")?;
    let weight_raw = r.u16("weight")?;
    let time_stamp = (flags & TIME != 0)
        .then(|| r.date_time("time stamp"))
        .transpose()?;
    let user_id = (flags & USER != 0).then(|| r.u8("user id")).transpose()?;
    let bmi_height_raw = if flags & BMI_HEIGHT != 0 {
        Some((r.u16("BMI")?, r.u16("height")?))
    } else {
        None
    };
    r.finish()?;
    Ok(WeightMeasurement {
        unit: if flags & IMPERIAL != 0 {
            WeightUnit::Pound
        } else {
            WeightUnit::Kilogram
        },
        weight_raw,
        time_stamp,
        user_id,
        bmi_height_raw,
        reserved_flags: flags & RESERVED,
    })
}

pub fn encode(m: &WeightMeasurement) -> Vec<u8> {
    let mut flags = m.reserved_flags & RESERVED;
    if m.unit == WeightUnit::Pound {
        flags |= IMPERIAL;
    }
    if m.time_stamp.is_some() {
        flags |= TIME;
    }
    if m.user_id.is_some() {
        flags |= USER;
    }
    if m.bmi_height_raw.is_some() {
        flags |= BMI_HEIGHT;
    }
    let mut out = vec![flags];
    out.extend_from_slice(&m.weight_raw.to_le_bytes());
    if let Some(t) = &m.time_stamp {
        t.encode(&mut out);
    }
    if let Some(u) = m.user_id {
        out.push(u);
    }
    if let Some((b, h)) = m.bmi_height_raw {
        out.extend_from_slice(&b.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::strategies;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn si_weight_with_user_bmi_and_height() {
        // WSS 1.0 §3.2 / GSS "Weight Measurement":
        let v = [
            0x0C, // flags: SI (bit 0 = 0), user id (bit 2), BMI and height (bit 3)
            0x60, 0x36, // weight 0x3660 = 13920 × 0.005 kg = 69.6 kg
            0x02, // user id 2
            0xE3, 0x00, // BMI 0x00E3 = 227 × 0.1 = 22.7 kg/m²
            0xE6, 0x06, // height 0x06E6 = 1766 × 0.001 = 1.766 m
        ];
        let m = decode(&v).unwrap();
        assert_eq!(m.unit, WeightUnit::Kilogram);
        assert_eq!(m.weight(), Some(69.6));
        assert_eq!(m.user_id, Some(2));
        assert_eq!(m.bmi_height_raw, Some((227, 1766)));
        assert_eq!(encode(&m), v);
    }

    #[test]
    fn imperial_and_unsuccessful() {
        let v = [
            0x03, // flags: imperial (bit 0), time stamp (bit 1)
            0x5A, 0x3C, // weight 0x3C5A = 15450 × 0.01 lb = 154.5 lb
            0xEA, 0x07, 11, 24, 7, 0, 0, // 2026-11-24 07:00:00
        ];
        let m = decode(&v).unwrap();
        assert_eq!(m.unit, WeightUnit::Pound);
        assert_eq!(m.weight(), Some(154.5));
        // 0xFFFF: measurement unsuccessful, no number.
        assert_eq!(decode(&[0x00, 0xFF, 0xFF]).unwrap().weight(), None);
        assert!(decode(&[0x08, 0x60, 0x36, 0xE3, 0x00]).is_err());
        assert_eq!(
            decode(&[0x00, 0x60, 0x36, 0x01]),
            Err(GattError::Trailing(1))
        );
    }

    proptest! {
        #[test]
        fn round_trips(
            lb in any::<bool>(),
            w in any::<u16>(),
            t in proptest::option::of(strategies::date_time()),
            u in proptest::option::of(any::<u8>()),
            bh in proptest::option::of((any::<u16>(), any::<u16>())),
            res in any::<u8>(),
        ) {
            let m = WeightMeasurement { unit: if lb { WeightUnit::Pound } else { WeightUnit::Kilogram }, weight_raw: w, time_stamp: t, user_id: u, bmi_height_raw: bh, reserved_flags: res & RESERVED };
            prop_assert_eq!(decode(&encode(&m)).unwrap(), m);
        }

        #[test]
        fn never_panics(v in proptest::collection::vec(any::<u8>(), 0..24)) {
            let _ = decode(&v);
        }
    }
}
