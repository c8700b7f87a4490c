//! Every Bluetooth GATT health decoder (`device_drivers::ble::gatt`): the
//! first byte picks the characteristic, the rest is its value. Must never
//! panic; a decoded measurement must survive encode → decode unchanged, and
//! its readings must be catalogued, with no NaN/∞ number and every missing
//! value flagged INVALID + VALUE_MISSING.
#![no_main]
use device_drivers::ble::gatt::{self, Measurement, uuids};
use device_drivers::ble::to_readings;
use libfuzzer_sys::fuzz_target;
use shared_protocol::catalogue::CATALOGUE;
use shared_protocol::v1::{QualityFlag, Validity, reading::Value};

fn reencode(m: &Measurement) -> Vec<u8> {
    use gatt::*;
    match m {
        Measurement::HeartRate(x) => heart_rate::encode(x),
        Measurement::BloodPressure(x) => blood_pressure::encode(x),
        Measurement::Temperature(x) => thermometer::encode(x),
        Measurement::PlxSpotCheck(x) => plx::encode_spot_check(x),
        Measurement::PlxContinuous(x) => plx::encode_continuous(x),
        Measurement::Weight(x) => weight::encode(x),
        Measurement::Glucose(x) => glucose::encode(x),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, value)) = data.split_first() else {
        return;
    };
    let c = uuids::MEASUREMENTS[usize::from(pick) % uuids::MEASUREMENTS.len()];
    let Some(Ok(m)) = gatt::decode(c, value) else {
        return;
    };
    let again = gatt::decode(c, &reencode(&m)).unwrap().unwrap();
    assert_eq!(again, m);
    let out = to_readings(&m, time::UtcOffset::UTC, 1_800_000_000_000_000);
    for r in &out.readings {
        let metric = CATALOGUE.by_mdc(r.mdc_code).expect("catalogued metric");
        assert!(metric.in_unit(r.mdc_unit, &r.ucum_unit).is_some());
        match r.value {
            Some(Value::Numeric(v)) => assert!(v.is_finite()),
            None => {
                assert_eq!(r.validity, Validity::Invalid as i32);
                assert!(r.flags.contains(&(QualityFlag::ValueMissing as i32)));
            }
            _ => panic!("non-numeric BLE reading"),
        }
    }
});
