//! Modbus: the ADU framing (MBAP / RTU CRC) is tokio-modbus's; what Vigil
//! owns and fuzzes here is everything after it. Mode 0: arbitrary text as a
//! register map (parse, validate, plan reads: never panics; every point read
//! exactly once within the limits). Mode 1: arbitrary point parameters and
//! register / bit contents (decode, sentinels, scale, reading mapping:
//! never panics, never a non-finite value, NaN never a number).
#![no_main]
use std::time::Duration;

use device_drivers::modbus::map::{self, Point, Sentinel, Table, ValueType, WordOrder};
use device_drivers::modbus::{Limits, ReadData, codec, plan_reads, response_to_readings};
use libfuzzer_sys::fuzz_target;
use shared_protocol::catalogue::CATALOGUE;
use shared_protocol::v1::{Validity, reading::Value};

fn check_plan(points: &[Point], limits: Limits) {
    let reads = plan_reads(points, limits);
    let mut seen = vec![0u8; points.len()];
    for r in &reads {
        let max = if r.table.is_bits() {
            limits.max_bits
        } else {
            limits.max_registers
        };
        assert!(r.count >= 1 && r.count <= max.max(4));
        for &i in &r.points {
            seen[i] += 1;
            assert!(points[i].address >= r.start && points[i].last_address() <= r.last());
        }
    }
    assert!(seen.iter().all(|&n| n == 1));
}

fn u16_at(d: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([*d.get(i).unwrap_or(&0), *d.get(i + 1).unwrap_or(&0)])
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let text = String::from_utf8_lossy(rest);
        if let Ok(m) = map::parse_map(&text) {
            if let Ok(points) = map::validate(&m.points, Duration::from_secs(1)) {
                check_plan(&points, Limits::default());
                check_plan(
                    &points,
                    Limits {
                        gap_fill: 0,
                        max_registers: 4,
                        max_bits: 1,
                    },
                );
            }
        }
        return;
    }
    // Point parameters from the first 16 bytes, then register contents.
    if rest.len() < 16 {
        return;
    }
    let (p, words) = rest.split_at(16);
    let metrics = CATALOGUE.all();
    let metric = metrics[usize::from(p[0]) % metrics.len()];
    let table =
        [Table::Holding, Table::Input, Table::Coils, Table::Discrete][usize::from(p[1] % 4)];
    let ty = if table.is_bits() {
        ValueType::Bit
    } else {
        [
            ValueType::U16,
            ValueType::I16,
            ValueType::U32,
            ValueType::I32,
            ValueType::F32,
            ValueType::F64,
            ValueType::Bit,
        ][usize::from(p[2] % 7)]
    };
    let order = [
        WordOrder::ABCD,
        WordOrder::DCBA,
        WordOrder::BADC,
        WordOrder::CDAB,
    ][usize::from(p[3] % 4)];
    let width = if table.is_bits() { 1 } else { ty.width() };
    let address = u16_at(p, 4).min(u16::MAX - (width - 1));
    let scale = f64::from(f32::from_bits(
        u32::from(u16_at(p, 6)) << 16 | u32::from(u16_at(p, 8)),
    ));
    let invalid = match p[10] % 4 {
        0 => vec![],
        1 => vec![Sentinel::Int(i64::from(u16_at(p, 11)))],
        2 => vec![Sentinel::Float(f64::NAN)],
        _ => vec![Sentinel::Int(-1), Sentinel::Float(1.0)],
    };
    let point = Point {
        label: "fuzz".into(),
        table,
        address,
        ty,
        bit: (ty == ValueType::Bit && !table.is_bits()).then_some(p[13] % 16),
        order,
        scale: if scale.is_finite() && scale != 0.0 {
            scale
        } else {
            1.0
        },
        offset: f64::from(p[14]) - 128.0,
        metric,
        unit: metric.unit,
        invalid,
        poll_interval: Duration::from_millis(100 + u64::from(p[15])),
    };
    let regs: Vec<u16> = words.chunks(2).map(|c| u16_at(c, 0)).collect();
    let bits: Vec<bool> = words.iter().map(|b| b & 1 == 1).collect();
    let start = address.saturating_sub(u16::from(p[12] % 8));
    let raw = if table.is_bits() {
        codec::decode_bits(&point, start, &bits)
    } else {
        codec::decode_registers(&point, start, &regs)
    };
    if let Ok(raw) = raw {
        let r = device_drivers::modbus::point_reading(&point, raw, 0);
        match r.value {
            Some(Value::Numeric(v)) => {
                assert!(v.is_finite());
                assert_eq!(r.validity, Validity::Valid as i32);
            }
            None => assert_eq!(r.validity, Validity::Invalid as i32),
            Some(_) => unreachable!(),
        }
        if let codec::RawValue::Float { value, .. } = raw {
            if !value.is_finite() {
                assert!(r.value.is_none());
            }
        }
    }
    // Several copies of the point at shifted addresses, planned and fed a
    // response of arbitrary length: readings + short == points.
    let points: Vec<Point> = (0..4u16)
        .map(|k| Point {
            address: address.saturating_sub(k * u16::from(p[15] % 16)),
            ..point.clone()
        })
        .collect();
    let limits = Limits {
        gap_fill: u16::from(p[11] % 20),
        max_registers: 4 + u16::from(p[12] % 122),
        max_bits: 1 + u16::from(p[13]) * 8,
    };
    check_plan(&points, limits);
    for req in plan_reads(&points, limits) {
        let data = if table.is_bits() {
            ReadData::Bits(bits.clone())
        } else {
            ReadData::Registers(regs.clone())
        };
        let (rs, short) = response_to_readings(&points, &req, &data, 0);
        assert_eq!(rs.len() + short, req.points.len());
    }
});
