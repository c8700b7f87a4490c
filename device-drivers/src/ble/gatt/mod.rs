//! Sans-IO decoders (and encoders, for the simulator and the tests) of the
//! Bluetooth SIG health characteristics.
//!
//! A GATT characteristic value (a read, a notification or an indication) is
//! one complete PDU, so every decoder is a pure function
//! `decode(&[u8]) -> Result<Measurement, GattError>`: the flags say which
//! fields are present, the length must match them exactly (a short value
//! and trailing bytes are both errors), and nothing panics on any input.
//! All multi-octet fields are little-endian (GATT Specification Supplement,
//! "Data types": least significant octet first).
//!
//! Numeric formats follow IEEE 11073-20601: SFLOAT (§F.8, 16 bits) and FLOAT
//! (§F.7, 32 bits), including their special values, which are kept as
//! [`Numeric`] variants and never turned into numbers.

pub mod blood_pressure;
pub mod glucose;
pub mod heart_rate;
pub mod plx;
pub mod thermometer;
pub mod weight;

/// Why a characteristic value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GattError {
    /// Fewer bytes than the flags require.
    #[error("value too short: {field} needs {needed} more byte(s), {available} left")]
    Truncated {
        field: &'static str,
        needed: usize,
        available: usize,
    },
    /// More bytes than the flags describe.
    #[error("{0} trailing byte(s) after the last field the flags announce")]
    Trailing(usize),
    /// A field value the specification does not allow.
    #[error("invalid {field}: {detail}")]
    Invalid {
        field: &'static str,
        detail: &'static str,
    },
}

/// 16-bit SIG UUIDs of the services and characteristics the BLE driver
/// knows (Bluetooth Assigned Numbers, "16-bit UUIDs").
pub mod uuids {
    pub const SERVICE_GLUCOSE: u16 = 0x1808;
    pub const SERVICE_HEALTH_THERMOMETER: u16 = 0x1809;
    pub const SERVICE_HEART_RATE: u16 = 0x180D;
    pub const SERVICE_BATTERY: u16 = 0x180F;
    pub const SERVICE_BLOOD_PRESSURE: u16 = 0x1810;
    pub const SERVICE_WEIGHT_SCALE: u16 = 0x181D;
    pub const SERVICE_PULSE_OXIMETER: u16 = 0x1822;
    /// The health services a device is discovered by when no address is
    /// configured.
    pub const HEALTH_SERVICES: [u16; 6] = [
        SERVICE_HEART_RATE,
        SERVICE_BLOOD_PRESSURE,
        SERVICE_HEALTH_THERMOMETER,
        SERVICE_PULSE_OXIMETER,
        SERVICE_WEIGHT_SCALE,
        SERVICE_GLUCOSE,
    ];

    pub const GLUCOSE_MEASUREMENT: u16 = 0x2A18;
    pub const BATTERY_LEVEL: u16 = 0x2A19;
    pub const TEMPERATURE_MEASUREMENT: u16 = 0x2A1C;
    pub const BLOOD_PRESSURE_MEASUREMENT: u16 = 0x2A35;
    pub const HEART_RATE_MEASUREMENT: u16 = 0x2A37;
    pub const PLX_SPOT_CHECK_MEASUREMENT: u16 = 0x2A5E;
    pub const PLX_CONTINUOUS_MEASUREMENT: u16 = 0x2A5F;
    pub const WEIGHT_MEASUREMENT: u16 = 0x2A9D;
    /// The measurement characteristics the driver subscribes to.
    pub const MEASUREMENTS: [u16; 7] = [
        HEART_RATE_MEASUREMENT,
        BLOOD_PRESSURE_MEASUREMENT,
        TEMPERATURE_MEASUREMENT,
        PLX_SPOT_CHECK_MEASUREMENT,
        PLX_CONTINUOUS_MEASUREMENT,
        WEIGHT_MEASUREMENT,
        GLUCOSE_MEASUREMENT,
    ];

    /// The 128-bit form of a 16-bit SIG UUID, as text
    /// (`0000xxxx-0000-1000-8000-00805f9b34fb`, Core Vol 3 Part B §2.5.1).
    pub fn to_128(short: u16) -> String {
        format!("0000{short:04x}-0000-1000-8000-00805f9b34fb")
    }

    /// The 16-bit SIG UUID inside a 128-bit UUID text, if it is one.
    pub fn from_128(uuid: &str) -> Option<u16> {
        let u = uuid.to_ascii_lowercase();
        let rest = u.strip_prefix("0000")?;
        let (short, base) = rest.split_at_checked(4)?;
        if base != "-0000-1000-8000-00805f9b34fb" {
            return None;
        }
        u16::from_str_radix(short, 16).ok()
    }
}

/// An IEEE 11073-20601 SFLOAT or FLOAT: a finite decimal number, or one of
/// the special values (§F.7/§F.8 Table F.2), which carry no number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numeric {
    /// `mantissa × 10^exponent`.
    Finite { mantissa: i32, exponent: i8 },
    /// Not a Number (SFLOAT 0x07FF, FLOAT 0x007FFFFF).
    NaN,
    /// Not at this resolution (SFLOAT 0x0800, FLOAT 0x00800000).
    NRes,
    /// +INFINITY (SFLOAT 0x07FE, FLOAT 0x007FFFFE).
    PositiveInfinity,
    /// -INFINITY (SFLOAT 0x0802, FLOAT 0x00800002).
    NegativeInfinity,
    /// Reserved for future use (SFLOAT 0x0801, FLOAT 0x00800001).
    Reserved,
}

impl Numeric {
    /// The number, for finite values only.
    ///
    /// Negative exponents divide by a power of ten rather than multiply by
    /// its (inexact) reciprocal, so `986e-1` is exactly the double nearest
    /// 98.6.
    pub fn value(self) -> Option<f64> {
        match self {
            Numeric::Finite { mantissa, exponent } => {
                let m = f64::from(mantissa);
                let p = 10f64.powi(i32::from(exponent).abs());
                Some(if exponent < 0 { m / p } else { m * p })
            }
            _ => None,
        }
    }

    /// Decode an SFLOAT (IEEE 11073-20601 §F.8): bits 15..12 exponent,
    /// bits 11..0 mantissa, both two's complement.
    ///
    /// The special values are recognised by their mantissa (0x7FE..=0x802
    /// as 12-bit patterns) whatever the exponent: the standard defines them
    /// with exponent 0, and a value with such a mantissa and another exponent
    /// is far more likely a device error than a measurement, so it is
    /// reported as special (never as a number).
    pub fn from_sfloat(raw: u16) -> Numeric {
        let m = raw & 0x0FFF;
        match m {
            0x07FF => return Numeric::NaN,
            0x0800 => return Numeric::NRes,
            0x07FE => return Numeric::PositiveInfinity,
            0x0802 => return Numeric::NegativeInfinity,
            0x0801 => return Numeric::Reserved,
            _ => {}
        }
        let mantissa = i32::from(((m << 4) as i16) >> 4);
        let exponent = ((raw as i16) >> 12) as i8;
        Numeric::Finite { mantissa, exponent }
    }

    /// Decode a FLOAT (IEEE 11073-20601 §F.7): bits 31..24 exponent, bits
    /// 23..0 mantissa, both two's complement. Special values by mantissa,
    /// as for [`from_sfloat`](Self::from_sfloat).
    pub fn from_float(raw: u32) -> Numeric {
        let m = raw & 0x00FF_FFFF;
        match m {
            0x007F_FFFF => return Numeric::NaN,
            0x0080_0000 => return Numeric::NRes,
            0x007F_FFFE => return Numeric::PositiveInfinity,
            0x0080_0002 => return Numeric::NegativeInfinity,
            0x0080_0001 => return Numeric::Reserved,
            _ => {}
        }
        let mantissa = ((m << 8) as i32) >> 8;
        let exponent = (raw >> 24) as u8 as i8;
        Numeric::Finite { mantissa, exponent }
    }

    /// Encode as SFLOAT; `None` when the mantissa or exponent does not fit
    /// (mantissa -2045..=2045, exponent -8..=7) or the mantissa is one of
    /// the special patterns.
    pub fn to_sfloat(self) -> Option<u16> {
        Some(match self {
            Numeric::NaN => 0x07FF,
            Numeric::NRes => 0x0800,
            Numeric::PositiveInfinity => 0x07FE,
            Numeric::NegativeInfinity => 0x0802,
            Numeric::Reserved => 0x0801,
            Numeric::Finite { mantissa, exponent } => {
                if !(-2045..=2045).contains(&mantissa) || !(-8..=7).contains(&exponent) {
                    return None;
                }
                ((exponent as u16 & 0xF) << 12) | (mantissa as u16 & 0x0FFF)
            }
        })
    }

    /// Encode as FLOAT; `None` when the mantissa does not fit
    /// (-8388605..=8388605) or is a special pattern.
    pub fn to_float(self) -> Option<u32> {
        Some(match self {
            Numeric::NaN => 0x007F_FFFF,
            Numeric::NRes => 0x0080_0000,
            Numeric::PositiveInfinity => 0x007F_FFFE,
            Numeric::NegativeInfinity => 0x0080_0002,
            Numeric::Reserved => 0x0080_0001,
            Numeric::Finite { mantissa, exponent } => {
                if !(-8_388_605..=8_388_605).contains(&mantissa) {
                    return None;
                }
                (u32::from(exponent as u8) << 24) | (mantissa as u32 & 0x00FF_FFFF)
            }
        })
    }
}

/// The GSS "Date Time" structure (7 octets): year (1582..=9999,
/// 0 = unknown), month (1..=12, 0 = unknown), day (1..=31, 0 = unknown),
/// hours, minutes, seconds. It carries no time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hours: u8,
    pub minutes: u8,
    pub seconds: u8,
}

impl DateTime {
    pub const LEN: usize = 7;

    /// The calendar time, when every field is known and valid (an unknown
    /// year/month/day or an impossible date gives `None`: the reading then
    /// falls back to the gateway's receive time).
    pub fn to_primitive(self) -> Option<time::PrimitiveDateTime> {
        if !(1582..=9999).contains(&self.year) {
            return None;
        }
        let month = time::Month::try_from(self.month).ok()?;
        let date = time::Date::from_calendar_date(i32::from(self.year), month, self.day).ok()?;
        let t = time::Time::from_hms(self.hours, self.minutes, self.seconds).ok()?;
        Some(time::PrimitiveDateTime::new(date, t))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.year.to_le_bytes());
        out.extend_from_slice(&[self.month, self.day, self.hours, self.minutes, self.seconds]);
    }
}

/// A bounds-checked little-endian reader over one characteristic value.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], GattError> {
        if self.buf.len() < n {
            return Err(GattError::Truncated {
                field,
                needed: n,
                available: self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, GattError> {
        Ok(self.bytes(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, GattError> {
        let b = self.bytes(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn i16(&mut self, field: &'static str) -> Result<i16, GattError> {
        Ok(self.u16(field)? as i16)
    }

    pub(crate) fn u24(&mut self, field: &'static str) -> Result<u32, GattError> {
        let b = self.bytes(3, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], 0]))
    }

    pub(crate) fn sfloat(&mut self, field: &'static str) -> Result<Numeric, GattError> {
        Ok(Numeric::from_sfloat(self.u16(field)?))
    }

    pub(crate) fn float(&mut self, field: &'static str) -> Result<Numeric, GattError> {
        let b = self.bytes(4, field)?;
        Ok(Numeric::from_float(u32::from_le_bytes([
            b[0], b[1], b[2], b[3],
        ])))
    }

    pub(crate) fn date_time(&mut self, field: &'static str) -> Result<DateTime, GattError> {
        let b = self.bytes(DateTime::LEN, field)?;
        Ok(DateTime {
            year: u16::from_le_bytes([b[0], b[1]]),
            month: b[2],
            day: b[3],
            hours: b[4],
            minutes: b[5],
            seconds: b[6],
        })
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The end of the value: trailing bytes are an error.
    pub(crate) fn finish(self) -> Result<(), GattError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(GattError::Trailing(n)),
        }
    }
}

/// Encoding helpers shared by the characteristic encoders.
pub(crate) fn put_sfloat(out: &mut Vec<u8>, n: Numeric) {
    // Encoders take values built from representable parts; an unrepresentable
    // one is written as NaN rather than as a wrong number.
    out.extend_from_slice(&n.to_sfloat().unwrap_or(0x07FF).to_le_bytes());
}

pub(crate) fn put_float(out: &mut Vec<u8>, n: Numeric) {
    out.extend_from_slice(&n.to_float().unwrap_or(0x007F_FFFF).to_le_bytes());
}

/// A measurement decoded from any of the supported characteristics.
#[derive(Debug, Clone, PartialEq)]
pub enum Measurement {
    HeartRate(heart_rate::HeartRateMeasurement),
    BloodPressure(blood_pressure::BloodPressureMeasurement),
    Temperature(thermometer::TemperatureMeasurement),
    PlxSpotCheck(plx::SpotCheckMeasurement),
    PlxContinuous(plx::ContinuousMeasurement),
    Weight(weight::WeightMeasurement),
    Glucose(glucose::GlucoseMeasurement),
}

/// Decode the value of the characteristic with the given 16-bit UUID;
/// `None` for a characteristic this module does not decode.
pub fn decode(characteristic: u16, value: &[u8]) -> Option<Result<Measurement, GattError>> {
    use uuids::*;
    Some(match characteristic {
        HEART_RATE_MEASUREMENT => heart_rate::decode(value).map(Measurement::HeartRate),
        BLOOD_PRESSURE_MEASUREMENT => blood_pressure::decode(value).map(Measurement::BloodPressure),
        TEMPERATURE_MEASUREMENT => thermometer::decode(value).map(Measurement::Temperature),
        PLX_SPOT_CHECK_MEASUREMENT => plx::decode_spot_check(value).map(Measurement::PlxSpotCheck),
        PLX_CONTINUOUS_MEASUREMENT => plx::decode_continuous(value).map(Measurement::PlxContinuous),
        WEIGHT_MEASUREMENT => weight::decode(value).map(Measurement::Weight),
        GLUCOSE_MEASUREMENT => glucose::decode(value).map(Measurement::Glucose),
        _ => return None,
    })
}

#[cfg(test)]
pub(crate) mod strategies {
    //! proptest strategies shared by the characteristic tests.
    use super::*;
    use proptest::prelude::*;

    pub fn sfloat() -> impl Strategy<Value = Numeric> {
        prop_oneof![
            8 => (-2045i32..=2045, -8i8..=7).prop_map(|(mantissa, exponent)| Numeric::Finite { mantissa, exponent }),
            1 => prop_oneof![
                Just(Numeric::NaN),
                Just(Numeric::NRes),
                Just(Numeric::PositiveInfinity),
                Just(Numeric::NegativeInfinity),
                Just(Numeric::Reserved),
            ],
        ]
    }

    pub fn float() -> impl Strategy<Value = Numeric> {
        prop_oneof![
            8 => (-8_388_605i32..=8_388_605, any::<i8>()).prop_map(|(mantissa, exponent)| Numeric::Finite { mantissa, exponent }),
            1 => Just(Numeric::NaN),
            1 => Just(Numeric::PositiveInfinity),
            1 => Just(Numeric::NRes),
        ]
    }

    pub fn date_time() -> impl Strategy<Value = DateTime> {
        (
            any::<u16>(),
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
        )
            .prop_map(|(year, month, day, hours, minutes, seconds)| DateTime {
                year,
                month,
                day,
                hours,
                minutes,
                seconds,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sfloat_vectors_ieee_11073_20601_f8() {
        // 0xF3DA: exponent 0xF = -1, mantissa 0x3DA = 986 → 98.6.
        assert_eq!(
            Numeric::from_sfloat(0xF3DA),
            Numeric::Finite {
                mantissa: 986,
                exponent: -1
            }
        );
        assert_eq!(Numeric::from_sfloat(0xF3DA).value(), Some(98.6));
        // 0x0048: exponent 0, mantissa 72 → 72.
        assert_eq!(Numeric::from_sfloat(0x0048).value(), Some(72.0));
        // 0x2FFF: exponent +2, mantissa 0xFFF = -1 → -100.
        assert_eq!(Numeric::from_sfloat(0x2FFF).value(), Some(-100.0));
        // Table F.2 special values: never numbers.
        assert_eq!(Numeric::from_sfloat(0x07FF), Numeric::NaN);
        assert_eq!(Numeric::from_sfloat(0x0800), Numeric::NRes);
        assert_eq!(Numeric::from_sfloat(0x07FE), Numeric::PositiveInfinity);
        assert_eq!(Numeric::from_sfloat(0x0802), Numeric::NegativeInfinity);
        assert_eq!(Numeric::from_sfloat(0x0801), Numeric::Reserved);
        // Special mantissa with a non-zero exponent: still not a number.
        assert_eq!(Numeric::from_sfloat(0x17FF).value(), None);
    }

    #[test]
    fn float_vectors_ieee_11073_20601_f7() {
        // 0xFF00016F: exponent -1, mantissa 0x00016F = 367 → 36.7 (°C).
        assert_eq!(Numeric::from_float(0xFF00_016F).value(), Some(36.7));
        // 0xFE00_0E42: exponent -2, mantissa 3650 → 36.5.
        assert_eq!(Numeric::from_float(0xFE00_0E42).value(), Some(36.5));
        // Negative mantissa 0xFFFFFF = -1, exponent 0.
        assert_eq!(Numeric::from_float(0x00FF_FFFF).value(), Some(-1.0));
        assert_eq!(Numeric::from_float(0x007F_FFFF), Numeric::NaN);
        assert_eq!(Numeric::from_float(0x0080_0000), Numeric::NRes);
        assert_eq!(Numeric::from_float(0x007F_FFFE), Numeric::PositiveInfinity);
        assert_eq!(Numeric::from_float(0x0080_0002), Numeric::NegativeInfinity);
        assert_eq!(Numeric::from_float(0x0080_0001), Numeric::Reserved);
    }

    #[test]
    fn date_time_gss_3_70() {
        // 2026-11-24 10:05:30: year 0x07EA LE, month 11, day 24, 10, 5, 30.
        let mut r = Reader::new(&[0xEA, 0x07, 11, 24, 10, 5, 30]);
        let dt = r.date_time("t").unwrap();
        assert_eq!(
            dt.to_primitive().unwrap(),
            time::macros::datetime!(2026-11-24 10:05:30)
        );
        // Year 0 = not known; 31 February does not exist.
        let unknown = DateTime { year: 0, ..dt };
        assert!(unknown.to_primitive().is_none());
        let bad = DateTime {
            month: 2,
            day: 31,
            ..dt
        };
        assert!(bad.to_primitive().is_none());
    }

    #[test]
    fn uuid_forms() {
        assert_eq!(
            uuids::to_128(0x2A37),
            "00002a37-0000-1000-8000-00805f9b34fb"
        );
        assert_eq!(
            uuids::from_128("00002A37-0000-1000-8000-00805F9B34FB"),
            Some(0x2A37)
        );
        assert_eq!(
            uuids::from_128("12345678-0000-1000-8000-00805f9b34fb"),
            None
        );
        assert_eq!(uuids::from_128("0000"), None);
    }

    #[test]
    fn unknown_characteristics_are_not_decoded() {
        assert!(decode(0x2A00, &[1, 2]).is_none());
        assert!(decode(uuids::BATTERY_LEVEL, &[50]).is_none());
    }

    proptest! {
        #[test]
        fn sfloat_round_trips(n in strategies::sfloat()) {
            prop_assert_eq!(Numeric::from_sfloat(n.to_sfloat().unwrap()), n);
        }

        #[test]
        fn float_round_trips(n in strategies::float()) {
            prop_assert_eq!(Numeric::from_float(n.to_float().unwrap()), n);
        }

        #[test]
        fn any_raw_sfloat_and_float_decode_without_panicking(a in any::<u16>(), b in any::<u32>()) {
            let s = Numeric::from_sfloat(a);
            if let Some(v) = s.value() { prop_assert!(v.is_finite()); }
            let f = Numeric::from_float(b);
            // A FLOAT with exponent 127 may overflow f64 only far beyond any
            // characteristic's range; it stays a number, never a special.
            let _ = f.value();
            // Finite decodes re-encode to the same bits.
            if let Numeric::Finite { .. } = s { prop_assert_eq!(s.to_sfloat(), Some(a)); }
            if let Numeric::Finite { .. } = f { prop_assert_eq!(f.to_float(), Some(b)); }
        }

        #[test]
        fn decode_never_panics(c in any::<u16>(), v in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(c, &v);
        }
    }
}
