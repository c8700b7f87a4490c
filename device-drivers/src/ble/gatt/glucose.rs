//! Glucose Measurement (0x2A18): Glucose Service 1.0 (GLS) §3.1 / GATT
//! Specification Supplement (GSS), "Glucose Measurement".
//!
//! ```text
//! flags u8   bit 0 Time Offset present (sint16, minutes)
//!            bit 1 Glucose Concentration, Type and Sample Location present
//!            bit 2 concentration units: 0 = kg/L, 1 = mol/L
//!            bit 3 Sensor Status Annunciation present (uint16)
//!            bit 4 Context Information follows (a separate characteristic)
//!            bits 7..5 reserved
//! sequence number uint16, base time (Date Time, 7 octets)
//! [time offset] [concentration SFLOAT, type-sample location u8
//!   (type: low nibble, sample location: high nibble)] [sensor status]
//! ```
//!
//! Type (GLS "Type-Sample Location" field): 1 capillary whole blood, 2 capillary plasma,
//! 3 venous whole blood, 4 venous plasma, 5 arterial whole blood, 6 arterial
//! plasma, 7 undetermined whole blood, 8 undetermined plasma, 9 interstitial
//! fluid, 10 control solution. Sample location: 1 finger, 2 alternate site
//! test, 3 earlobe, 4 control solution, 15 not available.
//!
//! Sensor Status Annunciation bits: 0 device battery low, 1 sensor
//! malfunction, 2 sample size insufficient, 3 strip insertion error, 4 strip
//! type incorrect, 5 result higher than the device can process, 6 result
//! lower than the device can process, 7 sensor temperature too high,
//! 8 sensor temperature too low, 9 sensor read interrupted (strip pulled
//! too soon), 10 general device fault, 11 time fault, 15..12 reserved.

use super::{DateTime, GattError, Numeric, Reader, put_sfloat};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcentrationUnit {
    KgPerL,
    MolPerL,
}

pub const TYPE_CAPILLARY_WHOLE_BLOOD: u8 = 1;
pub const TYPE_CONTROL_SOLUTION: u8 = 10;
pub const LOCATION_CONTROL_SOLUTION: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concentration {
    pub unit: ConcentrationUnit,
    pub value: Numeric,
    /// Fluid type (low nibble).
    pub sample_type: u8,
    /// Sample location (high nibble).
    pub location: u8,
}

/// The Sensor Status Annunciation field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SensorStatus(pub u16);

impl SensorStatus {
    pub const BATTERY_LOW: u16 = 1 << 0;
    pub const SENSOR_MALFUNCTION: u16 = 1 << 1;
    pub const SAMPLE_SIZE_INSUFFICIENT: u16 = 1 << 2;
    pub const STRIP_INSERTION_ERROR: u16 = 1 << 3;
    pub const STRIP_TYPE_INCORRECT: u16 = 1 << 4;
    pub const RESULT_TOO_HIGH: u16 = 1 << 5;
    pub const RESULT_TOO_LOW: u16 = 1 << 6;
    pub const TEMPERATURE_TOO_HIGH: u16 = 1 << 7;
    pub const TEMPERATURE_TOO_LOW: u16 = 1 << 8;
    pub const READ_INTERRUPTED: u16 = 1 << 9;
    pub const GENERAL_DEVICE_FAULT: u16 = 1 << 10;
    pub const TIME_FAULT: u16 = 1 << 11;
    pub const RESERVED: u16 = 0xF000;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlucoseMeasurement {
    pub sequence_number: u16,
    pub base_time: DateTime,
    /// Minutes to add to the base time.
    pub time_offset_minutes: Option<i16>,
    pub concentration: Option<Concentration>,
    /// The units flag (bit 2) as sent, also when no concentration is present.
    pub units_flag_mol: bool,
    pub sensor_status: Option<SensorStatus>,
    pub context_follows: bool,
    pub reserved_flags: u8,
}

impl GlucoseMeasurement {
    /// Base time + time offset, when the base time is a valid date.
    pub fn time(&self) -> Option<time::PrimitiveDateTime> {
        let base = self.base_time.to_primitive()?;
        base.checked_add(time::Duration::minutes(i64::from(
            self.time_offset_minutes.unwrap_or(0),
        )))
    }
}

const OFFSET: u8 = 0x01;
const CONC: u8 = 0x02;
const MOL: u8 = 0x04;
const STATUS: u8 = 0x08;
const CONTEXT: u8 = 0x10;
const RESERVED: u8 = 0xE0;

pub fn decode(value: &[u8]) -> Result<GlucoseMeasurement, GattError> {
    let mut r = Reader::new(value);
    let flags = r.u8("flags")?;
    let sequence_number = r.u16("sequence number")?;
    let base_time = r.date_time("base time")?;
    let time_offset_minutes = (flags & OFFSET != 0)
        .then(|| r.i16("time offset"))
        .transpose()?;
    let concentration = if flags & CONC != 0 {
        let value = r.sfloat("glucose concentration")?;
        let ts = r.u8("type-sample location")?;
        Some(Concentration {
            unit: if flags & MOL != 0 {
                ConcentrationUnit::MolPerL
            } else {
                ConcentrationUnit::KgPerL
            },
            value,
            sample_type: ts & 0x0F,
            location: ts >> 4,
        })
    } else {
        None
    };
    let sensor_status = (flags & STATUS != 0)
        .then(|| r.u16("sensor status annunciation").map(SensorStatus))
        .transpose()?;
    r.finish()?;
    Ok(GlucoseMeasurement {
        sequence_number,
        base_time,
        time_offset_minutes,
        concentration,
        units_flag_mol: flags & MOL != 0,
        sensor_status,
        context_follows: flags & CONTEXT != 0,
        reserved_flags: flags & RESERVED,
    })
}

pub fn encode(m: &GlucoseMeasurement) -> Vec<u8> {
    let mut flags = m.reserved_flags & RESERVED;
    if m.time_offset_minutes.is_some() {
        flags |= OFFSET;
    }
    if let Some(c) = &m.concentration {
        flags |= CONC;
        if c.unit == ConcentrationUnit::MolPerL {
            flags |= MOL;
        }
    } else if m.units_flag_mol {
        flags |= MOL;
    }
    if m.sensor_status.is_some() {
        flags |= STATUS;
    }
    if m.context_follows {
        flags |= CONTEXT;
    }
    let mut out = vec![flags];
    out.extend_from_slice(&m.sequence_number.to_le_bytes());
    m.base_time.encode(&mut out);
    if let Some(o) = m.time_offset_minutes {
        out.extend_from_slice(&o.to_le_bytes());
    }
    if let Some(c) = &m.concentration {
        put_sfloat(&mut out, c.value);
        out.push((c.location << 4) | (c.sample_type & 0x0F));
    }
    if let Some(s) = m.sensor_status {
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
    fn kg_per_l_capillary_with_offset_and_status() {
        // GLS 1.0 §3.1 / GSS "Glucose Measurement":
        let v = [
            0x0B, // flags: time offset (bit 0), concentration+type+location (bit 1), kg/L (bit 2 = 0), sensor status (bit 3)
            0x2A, 0x00, // sequence number 42
            0xEA, 0x07, 11, 24, 7, 30, 0, // base time 2026-11-24 07:30:00
            0x0F, 0x00, // time offset +15 min
            0x5F, 0xB0, // SFLOAT 0xB05F: exponent -5, mantissa 95 → 0.00095 kg/L (95 mg/dL)
            0x11, // type 1 capillary whole blood (low nibble), location 1 finger (high nibble)
            0x01, 0x00, // sensor status: device battery low (bit 0)
        ];
        let m = decode(&v).unwrap();
        assert_eq!(m.sequence_number, 42);
        assert_eq!(
            m.time().unwrap(),
            time::macros::datetime!(2026-11-24 07:45:00)
        );
        let c = m.concentration.unwrap();
        assert_eq!(c.unit, ConcentrationUnit::KgPerL);
        assert_eq!(c.value.value(), Some(0.00095));
        assert_eq!((c.sample_type, c.location), (1, 1));
        assert_eq!(
            m.sensor_status,
            Some(SensorStatus(SensorStatus::BATTERY_LOW))
        );
        assert_eq!(encode(&m), v);
    }

    #[test]
    fn mol_per_l_and_lengths() {
        let v = [
            0x06, // flags: concentration (bit 1), mol/L (bit 2)
            0x01, 0x00, // sequence 1
            0xEA, 0x07, 11, 24, 7, 30, 0, // base time
            0x35,
            0xC0, // SFLOAT 0xC035: exponent -4, mantissa 53 → 0.0053 mol/L (5.3 mmol/L)
            0x11, // capillary whole blood, finger
        ];
        let m = decode(&v).unwrap();
        let c = m.concentration.unwrap();
        assert_eq!(c.unit, ConcentrationUnit::MolPerL);
        assert_eq!(c.value.value(), Some(0.0053));
        assert!(decode(&v[..v.len() - 1]).is_err());
        assert!(decode(&[0x00, 0x01, 0x00, 0xEA, 0x07, 11]).is_err());
        let mut t = v.to_vec();
        t.push(0);
        assert_eq!(decode(&t), Err(GattError::Trailing(1)));
    }

    fn measurement() -> impl Strategy<Value = GlucoseMeasurement> {
        (
            any::<u16>(),
            strategies::date_time(),
            proptest::option::of(any::<i16>()),
            proptest::option::of((any::<bool>(), strategies::sfloat(), 0u8..16, 0u8..16)),
            any::<bool>(),
            proptest::option::of(any::<u16>().prop_map(SensorStatus)),
            any::<bool>(),
            any::<u8>(),
        )
            .prop_map(|(seq, base, off, conc, mol, st, ctx, res)| {
                let concentration = conc.map(|(m, value, t, l)| Concentration {
                    unit: if m {
                        ConcentrationUnit::MolPerL
                    } else {
                        ConcentrationUnit::KgPerL
                    },
                    value,
                    sample_type: t,
                    location: l,
                });
                GlucoseMeasurement {
                    sequence_number: seq,
                    base_time: base,
                    time_offset_minutes: off,
                    units_flag_mol: concentration
                        .map_or(mol, |c| c.unit == ConcentrationUnit::MolPerL),
                    concentration,
                    sensor_status: st,
                    context_follows: ctx,
                    reserved_flags: res & RESERVED,
                }
            })
    }

    proptest! {
        #[test]
        fn round_trips(m in measurement()) {
            prop_assert_eq!(decode(&encode(&m)).unwrap(), m);
        }

        #[test]
        fn never_panics(v in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(m) = decode(&v) { let _ = m.time(); }
        }
    }
}
