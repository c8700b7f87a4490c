//! Bluetooth Low Energy health devices (agent kind `ble`): the standard
//! Bluetooth SIG health services (Heart Rate, Blood Pressure, Health
//! Thermometer, Pulse Oximeter, Weight Scale, Glucose).
//!
//! - [`gatt`]: sans-IO decoders/encoders of the measurement characteristics
//!   (always built, fuzzed);
//! - this module: the mapping of a decoded measurement to `Reading`s
//!   (catalogue metrics, units as the device flags them, special values and
//!   status bits → validity and quality flags, device time);
//! - `driver` (cargo feature `ble`): the btleplug/BlueZ driver that finds
//!   the device, connects, subscribes and reconnects.
//!
//! The mapping rules are documented in docs/protocols.md, "Bluetooth LE".

pub mod gatt;

#[cfg(feature = "ble")]
mod driver;
#[cfg(feature = "ble")]
pub use driver::{check_adapter, run};

use shared_protocol::catalogue::{Unit, codes, units};
use shared_protocol::v1::{QualityFlag, Reading, TimeSource, Validity, reading::Value};
use time::UtcOffset;

use gatt::weight as wt;
use gatt::{DateTime, Measurement, Numeric};
use gatt::{blood_pressure as bp, glucose as glu, heart_rate as hr, plx, thermometer as th};

/// Agent-config kind, also carried in `DeviceInfo.protocol`.
pub const KIND: &str = "ble";

/// Options of a BLE device (`[device.options]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BleOptions {
    /// UTC offset of the device clock in minutes: device time stamps carry
    /// no zone (the phone app or staff set the device to local time).
    #[serde(default)]
    pub clock_offset_minutes: i32,
    /// Accept only measurements of this user (Blood Pressure and Weight
    /// Measurement "User ID"; a shared home device keeps several users).
    /// Measurements of another user, or of the "unknown user" (0xFF), are
    /// dropped and logged; measurements without a user id are accepted.
    #[serde(default)]
    pub user_id: Option<u8>,
    /// Bluetooth adapter to use, e.g. `hci0` (default: the first one).
    #[serde(default)]
    pub adapter: Option<String>,
    /// How long one scan for the device may take before the attempt counts
    /// as failed (default 10000 ms).
    #[serde(default)]
    pub scan_timeout_ms: Option<u64>,
}

/// A validated BLE configuration.
#[derive(Debug, Clone)]
pub struct Ble {
    pub opts: BleOptions,
    pub clock_offset: UtcOffset,
}

impl Ble {
    pub fn new(opts: BleOptions) -> Result<Self, String> {
        if opts.clock_offset_minutes.abs() > 18 * 60 {
            return Err("clock_offset_minutes must be within ±1080".into());
        }
        if opts.scan_timeout_ms.is_some_and(|ms| ms < 500) {
            return Err("scan_timeout_ms must be at least 500".into());
        }
        if opts.user_id == Some(0xFF) {
            return Err("user_id 255 means \"unknown user\" and cannot be selected".into());
        }
        let clock_offset = UtcOffset::from_whole_seconds(opts.clock_offset_minutes * 60)
            .map_err(|e| e.to_string())?;
        Ok(Ble { opts, clock_offset })
    }

    pub fn kind(&self) -> &'static str {
        KIND
    }

    /// Manufacturer, for `DeviceInfo`: any vendor's device speaks these
    /// services.
    pub fn manufacturer(&self) -> &'static str {
        "Bluetooth SIG health profile"
    }
}

/// Check a configured device address (`AA:BB:CC:DD:EE:FF`).
pub fn validate_address(a: &str) -> Result<(), String> {
    let parts: Vec<&str> = a.split(':').collect();
    if parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        Ok(())
    } else {
        Err(format!(
            "{a:?} is not a Bluetooth address like AA:BB:CC:DD:EE:FF"
        ))
    }
}

/// What a measurement became.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Mapped {
    pub readings: Vec<Reading>,
    /// Why (part of) the measurement was not emitted, for the log.
    pub note: Option<&'static str>,
    /// The measurement had reserved flag or status bits set.
    pub unknown_bits: bool,
}

/// Validity and flags shared by the readings of one measurement.
#[derive(Debug, Clone, Default)]
struct Quality {
    validity: Option<Validity>,
    flags: Vec<i32>,
}

impl Quality {
    fn rank(v: Validity) -> u8 {
        match v {
            Validity::Invalid => 3,
            Validity::Questionable | Validity::Unspecified => 2,
            Validity::Valid => 1,
        }
    }
    /// Lower the validity to at most `v` and add a flag.
    fn set(&mut self, v: Validity, flag: Option<QualityFlag>) {
        if self
            .validity
            .is_none_or(|cur| Self::rank(v) > Self::rank(cur))
        {
            self.validity = Some(v);
        }
        if let Some(f) = flag {
            if !self.flags.contains(&(f as i32)) {
                self.flags.push(f as i32);
            }
        }
    }
    fn validity(&self) -> Validity {
        self.validity.unwrap_or(Validity::Valid)
    }
}

/// When a value applies: the device time (no zone: the configured offset,
/// `DEVICE_CLOCK_UNSYNCED`) or, without a usable time, the gateway's.
#[derive(Debug, Clone, Copy)]
struct When {
    device_time_us: i64,
    source: TimeSource,
    gateway_time_us: i64,
}

impl When {
    fn of(t: Option<time::PrimitiveDateTime>, offset: UtcOffset, gateway_time_us: i64) -> When {
        match t {
            Some(t) => When {
                device_time_us: (t.assume_offset(offset).unix_timestamp_nanos() / 1_000) as i64,
                source: TimeSource::DeviceClockUnsynced,
                gateway_time_us,
            },
            None => When {
                device_time_us: gateway_time_us,
                source: TimeSource::GatewayReceive,
                gateway_time_us,
            },
        }
    }
    fn of_date_time(d: Option<DateTime>, offset: UtcOffset, gw: i64) -> When {
        When::of(d.and_then(DateTime::to_primitive), offset, gw)
    }
}

/// One reading from an 11073 number: a special value becomes a reading
/// without a value, INVALID, VALUE_MISSING (+ OUT_OF_DEVICE_RANGE for ±INF
/// and NRes); a number keeps the measurement's validity and flags.
fn reading(mdc: u32, label: &str, n: Numeric, unit: Unit, q: &Quality, when: When) -> Reading {
    let mut q = q.clone();
    let value = match n {
        Numeric::Finite { .. } => n.value().filter(|v| v.is_finite()),
        _ => None,
    };
    match n {
        Numeric::Finite { .. } if value.is_some() => {}
        Numeric::PositiveInfinity | Numeric::NegativeInfinity | Numeric::NRes => {
            q.set(Validity::Invalid, Some(QualityFlag::ValueMissing));
            q.set(Validity::Invalid, Some(QualityFlag::OutOfDeviceRange));
        }
        _ => q.set(Validity::Invalid, Some(QualityFlag::ValueMissing)),
    }
    Reading {
        mdc_code: mdc,
        vendor_label: label.to_string(),
        value: value.map(Value::Numeric),
        mdc_unit: unit.mdc,
        ucum_unit: unit.ucum.to_string(),
        device_time_us: when.device_time_us,
        time_source: when.source as i32,
        gateway_time_us: when.gateway_time_us,
        validity: q.validity() as i32,
        flags: q.flags,
        sequence: 0,
        // BLE health devices do not identify the patient.
        subject: None,
        // This protocol carries no abnormal flag the driver maps.
        interpretation: 0,
    }
}

/// The user id a measurement names, if any (Blood Pressure, Weight).
pub fn user_id(m: &Measurement) -> Option<u8> {
    match m {
        Measurement::BloodPressure(b) => b.user_id,
        Measurement::Weight(w) => w.user_id,
        _ => None,
    }
}

/// Map a decoded measurement to readings.
pub fn to_readings(m: &Measurement, offset: UtcOffset, gateway_time_us: i64) -> Mapped {
    match m {
        Measurement::HeartRate(h) => heart_rate(h, gateway_time_us),
        Measurement::BloodPressure(b) => blood_pressure(b, offset, gateway_time_us),
        Measurement::Temperature(t) => temperature(t, offset, gateway_time_us),
        Measurement::PlxSpotCheck(s) => {
            let t = if s.clock_not_set { None } else { s.time_stamp };
            plx_readings(
                &s.reading,
                s.measurement_status,
                s.device_sensor_status,
                s.pulse_amplitude_index,
                When::of_date_time(t, offset, gateway_time_us),
                s.reserved_flags != 0,
            )
        }
        Measurement::PlxContinuous(c) => plx_readings(
            &c.normal,
            c.measurement_status,
            c.device_sensor_status,
            c.pulse_amplitude_index,
            When::of(None, offset, gateway_time_us),
            c.reserved_flags != 0,
        ),
        Measurement::Weight(w) => weight(w, offset, gateway_time_us),
        Measurement::Glucose(g) => glucose(g, offset, gateway_time_us),
    }
}

/// Heart rate → MDC_ECG_HEART_RATE (the IEEE 11073-10406 basic-ECG heart
/// rate; the Heart Rate Service defines its RR intervals as R-wave to
/// R-wave). Sensor contact "supported but not detected" → INVALID +
/// SENSOR_OFF (the value is kept, as sent). No device time.
fn heart_rate(h: &hr::HeartRateMeasurement, gw: i64) -> Mapped {
    let mut q = Quality::default();
    if h.contact == hr::SensorContact::NotDetected {
        q.set(Validity::Invalid, Some(QualityFlag::SensorOff));
    }
    let n = Numeric::Finite {
        mantissa: i32::from(h.heart_rate),
        exponent: 0,
    };
    Mapped {
        readings: vec![reading(
            codes::ECG_HEART_RATE,
            "HeartRate",
            n,
            units::BEAT_PER_MIN,
            &q,
            When::of(None, UtcOffset::UTC, gw),
        )],
        note: None,
        unknown_bits: h.reserved_flags != 0,
    }
}

/// Blood pressure → NIBP systolic/diastolic/mean in mmHg or kPa as flagged,
/// pulse rate → MDC_PULS_RATE_NON_INV. Status bits: body movement →
/// QUESTIONABLE + INTERFERENCE; cuff too loose → QUESTIONABLE + LOW_SIGNAL;
/// irregular pulse and improper position → QUESTIONABLE; pulse rate out of
/// the device's range → pulse reading INVALID + OUT_OF_DEVICE_RANGE, the
/// pressures QUESTIONABLE.
fn blood_pressure(b: &bp::BloodPressureMeasurement, offset: UtcOffset, gw: i64) -> Mapped {
    let mut q = Quality::default();
    let mut pulse_q = None;
    let mut unknown = b.reserved_flags != 0;
    if let Some(s) = b.status {
        use bp::MeasurementStatus as S;
        if s.has(S::BODY_MOVEMENT) {
            q.set(Validity::Questionable, Some(QualityFlag::Interference));
        }
        if s.has(S::CUFF_TOO_LOOSE) {
            q.set(Validity::Questionable, Some(QualityFlag::LowSignal));
        }
        if s.has(S::IRREGULAR_PULSE) || s.has(S::IMPROPER_POSITION) {
            q.set(Validity::Questionable, None);
        }
        if s.pulse_out_of_range().is_some() {
            q.set(Validity::Questionable, None);
            let mut p = q.clone();
            p.set(Validity::Invalid, Some(QualityFlag::OutOfDeviceRange));
            pulse_q = Some(p);
        }
        unknown |= s.unknown_bits() != 0;
    }
    let unit = match b.unit {
        bp::PressureUnit::MmHg => units::MMHG,
        bp::PressureUnit::KPa => units::KILO_PA,
    };
    let when = When::of_date_time(b.time_stamp, offset, gw);
    let mut readings = vec![
        reading(
            codes::PRESS_BLD_NONINV_SYS,
            "Systolic",
            b.systolic,
            unit,
            &q,
            when,
        ),
        reading(
            codes::PRESS_BLD_NONINV_DIA,
            "Diastolic",
            b.diastolic,
            unit,
            &q,
            when,
        ),
        reading(
            codes::PRESS_BLD_NONINV_MEAN,
            "MAP",
            b.mean_arterial,
            unit,
            &q,
            when,
        ),
    ];
    if let Some(p) = b.pulse_rate {
        let pq = pulse_q.as_ref().unwrap_or(&q);
        readings.push(reading(
            codes::PULS_RATE_NON_INV,
            "PulseRate",
            p,
            units::BEAT_PER_MIN,
            pq,
            when,
        ));
    }
    Mapped {
        readings,
        note: None,
        unknown_bits: unknown,
    }
}

/// Temperature → MDC_TEMP_BODY in °C or °F as flagged; the temperature type
/// (site) goes into the vendor label ("Temperature/tympanum").
fn temperature(t: &th::TemperatureMeasurement, offset: UtcOffset, gw: i64) -> Mapped {
    let unit = match t.unit {
        th::TemperatureUnit::Celsius => units::DEGC,
        th::TemperatureUnit::Fahrenheit => units::DEGF,
    };
    let site = t.temperature_type.and_then(th::type_name);
    let label = match site {
        Some(s) => format!("Temperature/{s}"),
        None => "Temperature".to_string(),
    };
    Mapped {
        readings: vec![reading(
            codes::TEMP_BODY,
            &label,
            t.temperature,
            unit,
            &Quality::default(),
            When::of_date_time(t.time_stamp, offset, gw),
        )],
        note: None,
        unknown_bits: t.reserved_flags != 0
            || t.temperature_type
                .is_some_and(|x| th::type_name(x).is_none()),
    }
}

/// PLX measurement and device/sensor status → validity and flags.
fn plx_quality(
    ms: Option<plx::MeasurementStatus>,
    ds: Option<plx::DeviceSensorStatus>,
) -> (Quality, bool, bool) {
    use QualityFlag as F;
    use Validity::{Invalid, Questionable};
    let mut q = Quality::default();
    let mut unknown = false;
    let mut unavailable = false;
    if let Some(plx::MeasurementStatus(s)) = ms {
        use plx::MeasurementStatus as M;
        let table: [(u16, Validity, Option<F>); 8] = [
            (M::MEASUREMENT_ONGOING, Questionable, Some(F::Searching)),
            (M::EARLY_ESTIMATED, Questionable, None),
            (M::DEMONSTRATION, Invalid, Some(F::DemoMode)),
            (M::TESTING, Invalid, Some(F::DemoMode)),
            (M::CALIBRATION_ONGOING, Questionable, Some(F::Calibrating)),
            (M::UNAVAILABLE, Invalid, Some(F::ValueMissing)),
            (M::QUESTIONABLE, Questionable, None),
            (M::INVALID, Invalid, None),
        ];
        for (bit, v, f) in table {
            if s & bit != 0 {
                q.set(v, f);
            }
        }
        unavailable = s & M::UNAVAILABLE != 0;
        unknown |= s & M::RESERVED != 0;
    }
    if let Some(plx::DeviceSensorStatus(s)) = ds {
        use plx::DeviceSensorStatus as D;
        let table: [(u32, Validity, Option<F>); 15] = [
            (D::EQUIPMENT_MALFUNCTION, Invalid, Some(F::DeviceFault)),
            (
                D::SIGNAL_PROCESSING_IRREGULARITY,
                Questionable,
                Some(F::Interference),
            ),
            (D::INADEQUATE_SIGNAL, Questionable, Some(F::LowSignal)),
            (D::POOR_SIGNAL, Questionable, Some(F::LowSignal)),
            (D::LOW_PERFUSION, Questionable, Some(F::LowSignal)),
            (D::ERRATIC_SIGNAL, Questionable, Some(F::Interference)),
            (D::NONPULSATILE_SIGNAL, Questionable, Some(F::LowSignal)),
            (D::QUESTIONABLE_PULSE, Questionable, None),
            (D::SIGNAL_ANALYSIS_ONGOING, Questionable, Some(F::Searching)),
            (D::SENSOR_INTERFERENCE, Questionable, Some(F::Interference)),
            (D::SENSOR_UNCONNECTED_TO_USER, Invalid, Some(F::SensorOff)),
            (D::UNKNOWN_SENSOR, Invalid, Some(F::DeviceFault)),
            (D::SENSOR_DISPLACED, Invalid, Some(F::SensorOff)),
            (D::SENSOR_MALFUNCTIONING, Invalid, Some(F::DeviceFault)),
            (D::SENSOR_DISCONNECTED, Invalid, Some(F::Disconnected)),
        ];
        for (bit, v, f) in table {
            if s & bit != 0 {
                q.set(v, f);
            }
        }
        unknown |= s & D::RESERVED != 0;
    }
    (q, unavailable, unknown)
}

/// SpO2 → MDC_PULS_OXIM_SAT_O2 (%), PR → MDC_PULS_OXIM_PULS_RATE, pulse
/// amplitude index → MDC_PULS_OXIM_PERF_REL (%), as IEEE 11073-10404 pulse
/// oximeters report them. "Measurement Unavailable" drops the numbers
/// (INVALID + VALUE_MISSING).
fn plx_readings(
    p: &plx::SpO2Pr,
    ms: Option<plx::MeasurementStatus>,
    ds: Option<plx::DeviceSensorStatus>,
    pai: Option<Numeric>,
    when: When,
    reserved_flags: bool,
) -> Mapped {
    let (q, unavailable, unknown) = plx_quality(ms, ds);
    let v = |n: Numeric| if unavailable { Numeric::NaN } else { n };
    let mut readings = vec![
        reading(
            codes::PULS_OXIM_SAT_O2,
            "SpO2",
            v(p.spo2),
            units::PERCENT,
            &q,
            when,
        ),
        reading(
            codes::PULS_OXIM_PULS_RATE,
            "PR",
            v(p.pulse_rate),
            units::BEAT_PER_MIN,
            &q,
            when,
        ),
    ];
    if let Some(pai) = pai {
        readings.push(reading(
            codes::PULS_OXIM_PERF_REL,
            "PAI",
            v(pai),
            units::PERCENT,
            &q,
            when,
        ));
    }
    Mapped {
        readings,
        note: None,
        unknown_bits: unknown || reserved_flags,
    }
}

/// Weight → MDC_MASS_BODY_ACTUAL in kg or [lb_av] as flagged; 0xFFFF
/// ("Measurement Unsuccessful") → no value, INVALID + VALUE_MISSING. BMI and
/// height are not emitted.
fn weight(w: &wt::WeightMeasurement, offset: UtcOffset, gw: i64) -> Mapped {
    let unit = match w.unit {
        wt::WeightUnit::Kilogram => units::KILO_G,
        wt::WeightUnit::Pound => units::LB,
    };
    // Resolution 0.005 kg = 5 × 10^-3; 0.01 lb = 1 × 10^-2: keep the
    // device's decimal value exactly (raw × 5 at exponent -3, raw at -2).
    let n = match (w.weight(), w.unit) {
        (None, _) => Numeric::NaN,
        (Some(_), wt::WeightUnit::Kilogram) => Numeric::Finite {
            mantissa: i32::from(w.weight_raw) * 5,
            exponent: -3,
        },
        (Some(_), wt::WeightUnit::Pound) => Numeric::Finite {
            mantissa: i32::from(w.weight_raw),
            exponent: -2,
        },
    };
    Mapped {
        readings: vec![reading(
            codes::MASS_BODY_ACTUAL,
            "Weight",
            n,
            unit,
            &Quality::default(),
            When::of_date_time(w.time_stamp, offset, gw),
        )],
        note: None,
        unknown_bits: w.reserved_flags != 0,
    }
}

/// Glucose → MDC_CONC_GLU_CAPILLARY_WHOLEBLOOD in kg/L or mol/L as flagged,
/// only for type 1 (capillary whole blood) and never for control solution;
/// other sample types are not emitted (no catalogue metric yet). Sensor
/// status bits → validity and flags (docs/protocols.md); a time fault drops
/// the device time.
fn glucose(g: &glu::GlucoseMeasurement, offset: UtcOffset, gw: i64) -> Mapped {
    let Some(c) = g.concentration else {
        return Mapped {
            note: Some("glucose measurement without a concentration"),
            unknown_bits: g.reserved_flags != 0,
            ..Mapped::default()
        };
    };
    if c.sample_type == glu::TYPE_CONTROL_SOLUTION || c.location == glu::LOCATION_CONTROL_SOLUTION {
        return Mapped {
            note: Some("control-solution glucose test, not patient data"),
            ..Mapped::default()
        };
    }
    if c.sample_type != glu::TYPE_CAPILLARY_WHOLE_BLOOD {
        return Mapped {
            note: Some("glucose sample type other than capillary whole blood is not supported"),
            ..Mapped::default()
        };
    }
    use QualityFlag as F;
    use Validity::{Invalid, Questionable};
    let mut q = Quality::default();
    let mut time_fault = false;
    let mut unknown = g.reserved_flags != 0;
    if let Some(glu::SensorStatus(s)) = g.sensor_status {
        use glu::SensorStatus as S;
        let table: [(u16, Validity, Option<F>); 12] = [
            (S::BATTERY_LOW, Questionable, None),
            (S::SENSOR_MALFUNCTION, Invalid, Some(F::DeviceFault)),
            (S::SAMPLE_SIZE_INSUFFICIENT, Invalid, Some(F::LowSignal)),
            (S::STRIP_INSERTION_ERROR, Invalid, Some(F::SensorOff)),
            (S::STRIP_TYPE_INCORRECT, Invalid, Some(F::DeviceFault)),
            (S::RESULT_TOO_HIGH, Invalid, Some(F::OutOfDeviceRange)),
            (S::RESULT_TOO_LOW, Invalid, Some(F::OutOfDeviceRange)),
            (S::TEMPERATURE_TOO_HIGH, Questionable, None),
            (S::TEMPERATURE_TOO_LOW, Questionable, None),
            (S::READ_INTERRUPTED, Invalid, Some(F::SensorOff)),
            (S::GENERAL_DEVICE_FAULT, Invalid, Some(F::DeviceFault)),
            (S::TIME_FAULT, Questionable, None),
        ];
        for (bit, v, f) in table {
            if s & bit != 0 {
                q.set(v, f);
            }
        }
        time_fault = s & S::TIME_FAULT != 0;
        unknown |= s & S::RESERVED != 0;
    }
    let unit = match c.unit {
        glu::ConcentrationUnit::KgPerL => units::KILO_G_PER_L,
        glu::ConcentrationUnit::MolPerL => units::MOLE_PER_L,
    };
    let t = if time_fault { None } else { g.time() };
    Mapped {
        readings: vec![reading(
            codes::CONC_GLU_CAPILLARY_WHOLEBLOOD,
            "Glucose",
            c.value,
            unit,
            &q,
            When::of(t, offset, gw),
        )],
        note: None,
        unknown_bits: unknown,
    }
}

#[cfg(test)]
mod tests;
