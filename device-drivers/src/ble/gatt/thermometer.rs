//! Temperature Measurement (0x2A1C): Health Thermometer Service 1.0 §3.1 /
//! GATT Specification Supplement (GSS), "Temperature Measurement".
//!
//! ```text
//! flags u8   bit 0 units: 0 = °C, 1 = °F
//!            bit 1 Time Stamp present (Date Time, 7 octets)
//!            bit 2 Temperature Type present (uint8)
//!            bits 7..3 reserved
//! temperature FLOAT (IEEE 11073-20601 §F.7) [time stamp] [type]
//! ```
//!
//! Temperature Type (HTS 1.0 §3.2, GSS "Temperature Type"): 1 armpit, 2 body (general),
//! 3 ear (usually ear lobe), 4 finger, 5 gastro-intestinal tract, 6 mouth,
//! 7 rectum, 8 toe, 9 tympanum (ear drum); 0 and 10..=255 reserved.

use super::{DateTime, GattError, Numeric, Reader, put_float};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemperatureUnit {
    Celsius,
    Fahrenheit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemperatureMeasurement {
    pub unit: TemperatureUnit,
    pub temperature: Numeric,
    pub time_stamp: Option<DateTime>,
    /// Raw Temperature Type (see [`type_name`]).
    pub temperature_type: Option<u8>,
    pub reserved_flags: u8,
}

/// The name of a Temperature Type value, `None` for reserved values.
pub fn type_name(t: u8) -> Option<&'static str> {
    Some(match t {
        1 => "armpit",
        2 => "body",
        3 => "ear",
        4 => "finger",
        5 => "gi-tract",
        6 => "mouth",
        7 => "rectum",
        8 => "toe",
        9 => "tympanum",
        _ => return None,
    })
}

const FAHRENHEIT: u8 = 0x01;
const TIME: u8 = 0x02;
const TYPE: u8 = 0x04;
const RESERVED: u8 = 0xF8;

pub fn decode(value: &[u8]) -> Result<TemperatureMeasurement, GattError> {
    let mut r = Reader::new(value);
    let flags = r.u8("flags")?;
    let temperature = r.float("temperature")?;
    let time_stamp = (flags & TIME != 0)
        .then(|| r.date_time("time stamp"))
        .transpose()?;
    let temperature_type = (flags & TYPE != 0)
        .then(|| r.u8("temperature type"))
        .transpose()?;
    r.finish()?;
    Ok(TemperatureMeasurement {
        unit: if flags & FAHRENHEIT != 0 {
            TemperatureUnit::Fahrenheit
        } else {
            TemperatureUnit::Celsius
        },
        temperature,
        time_stamp,
        temperature_type,
        reserved_flags: flags & RESERVED,
    })
}

pub fn encode(m: &TemperatureMeasurement) -> Vec<u8> {
    let mut flags = m.reserved_flags & RESERVED;
    if m.unit == TemperatureUnit::Fahrenheit {
        flags |= FAHRENHEIT;
    }
    if m.time_stamp.is_some() {
        flags |= TIME;
    }
    if m.temperature_type.is_some() {
        flags |= TYPE;
    }
    let mut out = vec![flags];
    put_float(&mut out, m.temperature);
    if let Some(t) = &m.time_stamp {
        t.encode(&mut out);
    }
    if let Some(t) = m.temperature_type {
        out.push(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::strategies;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn celsius_with_time_and_type() {
        // HTS 1.0 §3.1 / GSS "Temperature Measurement":
        let v = [
            0x06, // flags: °C (bit 0 = 0), time stamp (bit 1), type (bit 2)
            0x6F, 0x01, 0x00,
            0xFF, // FLOAT 0xFF00016F: exponent -1, mantissa 367 → 36.7 °C
            0xEA, 0x07, 11, 24, 10, 5, 30,   // 2026-11-24 10:05:30
            0x09, // type 9 = tympanum
        ];
        let m = decode(&v).unwrap();
        assert_eq!(m.unit, TemperatureUnit::Celsius);
        assert_eq!(m.temperature.value(), Some(36.7));
        assert_eq!(m.temperature_type.and_then(type_name), Some("tympanum"));
        assert_eq!(encode(&m), v);
    }

    #[test]
    fn fahrenheit_and_special_values() {
        let v = [
            0x01, // flags: °F
            0xB2, 0x03, 0x00,
            0xFF, // FLOAT 0xFF0003B2: mantissa 946, exponent -1 → 94.6 °F
        ];
        let m = decode(&v).unwrap();
        assert_eq!(m.unit, TemperatureUnit::Fahrenheit);
        assert_eq!(m.temperature.value(), Some(94.6));
        // FLOAT +INF 0x007FFFFE (IEEE 11073-20601 §F.7): no number.
        let m = decode(&[0x00, 0xFE, 0xFF, 0x7F, 0x00]).unwrap();
        assert_eq!(m.temperature, Numeric::PositiveInfinity);
        assert!(decode(&[0x00, 0xFE, 0xFF, 0x7F]).is_err());
        assert_eq!(decode(&[0x00, 1, 0, 0, 0, 9]), Err(GattError::Trailing(1)));
    }

    fn measurement() -> impl Strategy<Value = TemperatureMeasurement> {
        (
            any::<bool>(),
            strategies::float(),
            proptest::option::of(strategies::date_time()),
            proptest::option::of(any::<u8>()),
            any::<u8>(),
        )
            .prop_map(|(f, t, ts, ty, res)| TemperatureMeasurement {
                unit: if f {
                    TemperatureUnit::Fahrenheit
                } else {
                    TemperatureUnit::Celsius
                },
                temperature: t,
                time_stamp: ts,
                temperature_type: ty,
                reserved_flags: res & RESERVED,
            })
    }

    proptest! {
        #[test]
        fn round_trips(m in measurement()) {
            prop_assert_eq!(decode(&encode(&m)).unwrap(), m);
        }

        #[test]
        fn never_panics(v in proptest::collection::vec(any::<u8>(), 0..24)) {
            let _ = decode(&v);
        }
    }
}
