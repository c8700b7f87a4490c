//! Mapping tests: measurement → readings (metrics, units, time, quality).

use super::*;
use gatt::uuids;
use shared_protocol::catalogue::CATALOGUE;
use time::macros::offset;

const GW: i64 = 1_800_000_000_000_000;

fn map(characteristic: u16, value: &[u8]) -> Mapped {
    let m = gatt::decode(characteristic, value).unwrap().unwrap();
    to_readings(&m, offset!(+1), GW)
}

/// Every reading names a catalogue metric in a unit the catalogue knows for
/// it, so the hub accepts it.
fn assert_catalogued(rs: &[Reading]) {
    for r in rs {
        let m = CATALOGUE.by_mdc(r.mdc_code).expect("metric in catalogue");
        assert!(
            m.in_unit(r.mdc_unit, &r.ucum_unit).is_some(),
            "{} in {}",
            m.mdc_name,
            r.ucum_unit
        );
    }
}

fn flags(r: &Reading) -> Vec<QualityFlag> {
    r.flags
        .iter()
        .map(|f| QualityFlag::try_from(*f).unwrap())
        .collect()
}

fn num(r: &Reading) -> Option<f64> {
    match r.value {
        Some(Value::Numeric(v)) => Some(v),
        _ => None,
    }
}

// 2026-11-24 10:05:30 at UTC+01:00 = 09:05:30Z.
const T_UTC_US: i64 = 1_795_514_400_000_000 - 3_600_000_000 + 5 * 60_000_000 + 30_000_000;

#[test]
fn heart_rate_is_ecg_heart_rate_at_gateway_time() {
    let out = map(uuids::HEART_RATE_MEASUREMENT, &[0x16, 72, 0x00, 0x04]);
    assert_catalogued(&out.readings);
    let r = &out.readings[0];
    assert_eq!(out.readings.len(), 1, "RR intervals are not emitted");
    assert_eq!(r.mdc_code, codes::ECG_HEART_RATE);
    assert_eq!(num(r), Some(72.0));
    assert_eq!(r.ucum_unit, "/min");
    assert_eq!(r.validity, Validity::Valid as i32);
    assert_eq!(r.time_source, TimeSource::GatewayReceive as i32);
    assert_eq!((r.device_time_us, r.gateway_time_us), (GW, GW));
    // Contact supported but not detected: the value is kept, INVALID.
    let r = &map(uuids::HEART_RATE_MEASUREMENT, &[0x04, 0]).readings[0];
    assert_eq!(r.validity, Validity::Invalid as i32);
    assert_eq!(flags(r), vec![QualityFlag::SensorOff]);
    assert_eq!(num(r), Some(0.0));
}

#[test]
fn blood_pressure_units_time_and_status() {
    let v = [
        0x1E, 0x79, 0x00, 0x51, 0x00, 0x5E, 0x00, 0xEA, 0x07, 11, 24, 10, 5, 30, 0x48, 0x00, 0x01,
        0x03, 0x00, // body movement + cuff too loose
    ];
    let out = map(uuids::BLOOD_PRESSURE_MEASUREMENT, &v);
    assert_catalogued(&out.readings);
    let codes_: Vec<u32> = out.readings.iter().map(|r| r.mdc_code).collect();
    assert_eq!(
        codes_,
        vec![
            codes::PRESS_BLD_NONINV_SYS,
            codes::PRESS_BLD_NONINV_DIA,
            codes::PRESS_BLD_NONINV_MEAN,
            codes::PULS_RATE_NON_INV
        ]
    );
    for r in &out.readings {
        assert_eq!(r.validity, Validity::Questionable as i32);
        assert_eq!(
            flags(r),
            vec![QualityFlag::Interference, QualityFlag::LowSignal]
        );
        assert_eq!(r.time_source, TimeSource::DeviceClockUnsynced as i32);
        assert_eq!(r.device_time_us, T_UTC_US);
    }
    assert_eq!(out.readings[0].ucum_unit, "mm[Hg]");
    assert_eq!(num(&out.readings[0]), Some(121.0));
    assert_eq!(out.readings[3].ucum_unit, "/min");
    assert!(!out.unknown_bits);
}

#[test]
fn blood_pressure_in_kpa_with_nan_and_pulse_out_of_range() {
    let v = [
        0x15, 0xA1, 0xF0, 0x6D, 0xF0, 0xFF, 0x07, 0xFA, 0x00, 0x08, 0x00,
    ];
    let out = map(uuids::BLOOD_PRESSURE_MEASUREMENT, &v);
    assert_catalogued(&out.readings);
    let [sys, _dia, map_, pulse] = &out.readings[..] else {
        panic!("{out:?}")
    };
    assert_eq!((sys.ucum_unit.as_str(), num(sys)), ("kPa", Some(16.1)));
    assert_eq!(sys.validity, Validity::Questionable as i32);
    // NaN mean: no number, INVALID, VALUE_MISSING.
    assert_eq!(map_.value, None);
    assert_eq!(map_.validity, Validity::Invalid as i32);
    assert!(flags(map_).contains(&QualityFlag::ValueMissing));
    // Pulse beyond the device's range: kept, INVALID, OUT_OF_DEVICE_RANGE.
    assert_eq!(num(pulse), Some(250.0));
    assert_eq!(pulse.validity, Validity::Invalid as i32);
    assert_eq!(flags(pulse), vec![QualityFlag::OutOfDeviceRange]);
    assert_eq!(sys.time_source, TimeSource::GatewayReceive as i32);
}

#[test]
fn temperature_keeps_fahrenheit_and_names_the_site() {
    let out = map(
        uuids::TEMPERATURE_MEASUREMENT,
        &[0x05, 0xB2, 0x03, 0x00, 0xFF, 0x06],
    );
    assert_catalogued(&out.readings);
    let r = &out.readings[0];
    assert_eq!((r.ucum_unit.as_str(), num(r)), ("[degF]", Some(94.6)));
    assert_eq!(r.vendor_label, "Temperature/mouth");
    // FLOAT -INF: no number, out of the device's range.
    let out = map(
        uuids::TEMPERATURE_MEASUREMENT,
        &[0x00, 0x02, 0x00, 0x80, 0x00],
    );
    let r = &out.readings[0];
    assert_eq!(r.value, None);
    assert_eq!(r.validity, Validity::Invalid as i32);
    assert_eq!(
        flags(r),
        vec![QualityFlag::ValueMissing, QualityFlag::OutOfDeviceRange]
    );
    assert_eq!(r.ucum_unit, "Cel");
}

#[test]
fn plx_spot_check_status_bits_become_flags() {
    let v = [
        0x0F, 0x61, 0x00, 0x48, 0x00, 0xEA, 0x07, 11, 24, 10, 5, 30, 0x80, 0x00, 0x20, 0x00, 0x00,
        0x24, 0xF0,
    ];
    let out = map(uuids::PLX_SPOT_CHECK_MEASUREMENT, &v);
    assert_catalogued(&out.readings);
    let [spo2, pr, pai] = &out.readings[..] else {
        panic!()
    };
    assert_eq!(
        (spo2.mdc_code, num(spo2)),
        (codes::PULS_OXIM_SAT_O2, Some(97.0))
    );
    assert_eq!(
        (pr.mdc_code, num(pr)),
        (codes::PULS_OXIM_PULS_RATE, Some(72.0))
    );
    assert_eq!(
        (pai.mdc_code, num(pai)),
        (codes::PULS_OXIM_PERF_REL, Some(3.6))
    );
    assert_eq!(spo2.validity, Validity::Questionable as i32);
    assert_eq!(flags(spo2), vec![QualityFlag::LowSignal]);
    assert_eq!(spo2.device_time_us, T_UTC_US);
    // "Device Clock is Not Set" (bit 4): the time stamp is ignored.
    let mut v2 = v;
    v2[0] |= 0x10;
    let r = &map(uuids::PLX_SPOT_CHECK_MEASUREMENT, &v2).readings[0];
    assert_eq!(r.time_source, TimeSource::GatewayReceive as i32);
}

#[test]
fn plx_continuous_sensor_off_demo_and_unavailable() {
    // Normal 97/72, device & sensor status: sensor disconnected (bit 15).
    let out = map(
        uuids::PLX_CONTINUOUS_MEASUREMENT,
        &[0x08, 0x61, 0x00, 0x48, 0x00, 0x00, 0x80, 0x00],
    );
    assert_catalogued(&out.readings);
    assert_eq!(out.readings.len(), 2);
    assert_eq!(out.readings[0].validity, Validity::Invalid as i32);
    assert_eq!(flags(&out.readings[0]), vec![QualityFlag::Disconnected]);
    assert_eq!(num(&out.readings[0]), Some(97.0));
    // Measurement status: demonstration data (bit 10) and unavailable (13).
    let out = map(
        uuids::PLX_CONTINUOUS_MEASUREMENT,
        &[0x04, 0x61, 0x00, 0x48, 0x00, 0x00, 0x24],
    );
    let r = &out.readings[0];
    assert_eq!(r.value, None, "unavailable measurement keeps no number");
    assert_eq!(r.validity, Validity::Invalid as i32);
    assert_eq!(
        flags(r),
        vec![QualityFlag::DemoMode, QualityFlag::ValueMissing]
    );
    // Reserved measurement-status bits are reported as unknown.
    let out = map(
        uuids::PLX_CONTINUOUS_MEASUREMENT,
        &[0x04, 0x61, 0x00, 0x48, 0x00, 0x01, 0x00],
    );
    assert!(out.unknown_bits);
}

#[test]
fn weight_in_kg_and_lb_never_converted() {
    let out = map(
        uuids::WEIGHT_MEASUREMENT,
        &[0x0C, 0x60, 0x36, 0x02, 0xE3, 0x00, 0xE6, 0x06],
    );
    assert_catalogued(&out.readings);
    assert_eq!(out.readings.len(), 1, "BMI and height are not emitted");
    let r = &out.readings[0];
    assert_eq!((r.ucum_unit.as_str(), num(r)), ("kg", Some(69.6)));
    let out = map(
        uuids::WEIGHT_MEASUREMENT,
        &[0x03, 0x5A, 0x3C, 0xEA, 0x07, 11, 24, 10, 5, 30],
    );
    assert_catalogued(&out.readings);
    let r = &out.readings[0];
    assert_eq!((r.ucum_unit.as_str(), num(r)), ("[lb_av]", Some(154.5)));
    assert_eq!(r.mdc_unit, units::LB.mdc);
    assert_eq!(r.device_time_us, T_UTC_US);
    let r = &map(uuids::WEIGHT_MEASUREMENT, &[0x00, 0xFF, 0xFF]).readings[0];
    assert_eq!(
        (r.value.clone(), r.validity),
        (None, Validity::Invalid as i32)
    );
}

#[test]
fn glucose_units_types_and_status() {
    let v = [
        0x0B, 0x2A, 0x00, 0xEA, 0x07, 11, 24, 7, 30, 0, 0x0F, 0x00, 0x5F, 0xB0, 0x11, 0x20, 0x00,
    ];
    let out = map(uuids::GLUCOSE_MEASUREMENT, &v);
    assert_catalogued(&out.readings);
    let r = &out.readings[0];
    assert_eq!((r.ucum_unit.as_str(), num(r)), ("kg/L", Some(0.00095)));
    // Result higher than the device can process (bit 5).
    assert_eq!(r.validity, Validity::Invalid as i32);
    assert_eq!(flags(r), vec![QualityFlag::OutOfDeviceRange]);
    // 07:45 local at UTC+01:00 = 06:45Z = 10:00Z - 3 h 15 min.
    assert_eq!(r.device_time_us, 1_795_514_400_000_000 - 11_700_000_000);
    // mol/L stays mol/L.
    let v = [
        0x06, 0x01, 0x00, 0xEA, 0x07, 11, 24, 7, 30, 0, 0x35, 0xC0, 0x11,
    ];
    let out = map(uuids::GLUCOSE_MEASUREMENT, &v);
    assert_catalogued(&out.readings);
    assert_eq!(out.readings[0].ucum_unit, "mol/L");
    assert_eq!(num(&out.readings[0]), Some(0.0053));
    // Control solution (type 10) and capillary plasma (type 2): not emitted.
    let mut c = v;
    c[12] = 0x1A;
    assert!(map(uuids::GLUCOSE_MEASUREMENT, &c).readings.is_empty());
    c[12] = 0x12;
    let out = map(uuids::GLUCOSE_MEASUREMENT, &c);
    assert!(out.readings.is_empty() && out.note.is_some());
    // Time fault (bit 11): gateway time.
    let v = [
        0x0A, 0x01, 0x00, 0xEA, 0x07, 11, 24, 7, 30, 0, 0x5F, 0xB0, 0x11, 0x00, 0x08,
    ];
    let r = &map(uuids::GLUCOSE_MEASUREMENT, &v).readings[0];
    assert_eq!(r.time_source, TimeSource::GatewayReceive as i32);
    assert_eq!(r.validity, Validity::Questionable as i32);
}

#[test]
fn options_are_checked() {
    assert!(Ble::new(BleOptions::default()).is_ok());
    let bad = BleOptions {
        clock_offset_minutes: 5000,
        ..Default::default()
    };
    assert!(Ble::new(bad).is_err());
    let bad = BleOptions {
        user_id: Some(255),
        ..Default::default()
    };
    assert!(Ble::new(bad).is_err());
    let o: BleOptions = toml::from_str("user_id = 1\nadapter = \"hci1\"").unwrap();
    assert_eq!(o.user_id, Some(1));
    assert!(toml::from_str::<BleOptions>("bogus = 1").is_err());
    assert!(validate_address("AA:bb:CC:00:11:22").is_ok());
    assert!(validate_address("AA:BB:CC:00:11").is_err());
    assert!(validate_address("AA:BB:CC:00:11:2G").is_err());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a device sends: no panic, every reading is catalogued,
        /// a reading without a number is INVALID with VALUE_MISSING, and no
        /// number is NaN or infinite.
        #[test]
        fn any_value_maps_to_safe_readings(
            c in proptest::sample::select(uuids::MEASUREMENTS.to_vec()),
            v in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            if let Some(Ok(m)) = gatt::decode(c, &v) {
                let out = to_readings(&m, UtcOffset::UTC, GW);
                assert_catalogued(&out.readings);
                for r in &out.readings {
                    match r.value {
                        Some(Value::Numeric(x)) => prop_assert!(x.is_finite()),
                        None => {
                            prop_assert_eq!(r.validity, Validity::Invalid as i32);
                            prop_assert!(r.flags.contains(&(QualityFlag::ValueMissing as i32)));
                        }
                        _ => prop_assert!(false),
                    }
                }
            }
        }
    }
}
