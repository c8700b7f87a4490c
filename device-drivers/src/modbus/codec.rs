//! Sans-IO decoding of Modbus register contents into point values.
//!
//! The ADU framing (MBAP header for TCP, address + CRC-16 for RTU) is done
//! by `tokio-modbus`; what this module owns is everything after the PDU:
//! turning the registers / bits of one read response into the value of each
//! point per its type, byte order, invalid sentinels, scale and offset.
//!
//! Facts used (Modbus Application Protocol Specification v1.1b3):
//! - §4.2: registers are 16 bits, transmitted big-endian (high byte first).
//! - §6.1/§6.2: coils and discrete inputs are returned packed, LSB of the
//!   first data byte = the first addressed bit (tokio-modbus unpacks them to
//!   `bool`s in order).
//! - Multi-register values are not defined by the specification; devices
//!   document their own byte/word order, hence [`WordOrder`].
//! - IEEE 754 binary32 / binary64 for f32 / f64.

use super::map::{Point, Sentinel, ValueType, WordOrder};

/// The raw value of a point before scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RawValue {
    /// Integer types and bits, as the typed value (i16 -1 is -1).
    Int {
        value: i64,
        /// The bits as transmitted, zero-extended (i16 -1 is 0xFFFF).
        pattern: u64,
    },
    Float {
        value: f64,
        pattern: u64,
    },
}

/// Why a point has no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoValue {
    /// The raw value is one of the point's `invalid` sentinels.
    Sentinel,
    /// The float is NaN or infinite (never a number in a reading).
    NotFinite,
    /// raw × scale + offset is not a finite number.
    Overflow,
}

/// The response did not hold the point (shorter than planned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("response too short for the point: need offset {need}, have {have}")]
pub struct Short {
    pub need: usize,
    pub have: usize,
}

/// Bytes of `words` in value order (most significant first), undoing
/// `order`. `words` has 2 or 4 entries.
pub fn ordered_bytes(words: &[u16], order: WordOrder) -> Vec<u8> {
    // As transmitted: register 0 high byte, register 0 low byte, …
    let wire: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    match order {
        WordOrder::ABCD => wire,
        WordOrder::DCBA => wire.into_iter().rev().collect(),
        WordOrder::BADC => wire.chunks(2).flat_map(|c| [c[1], c[0]]).collect(),
        WordOrder::CDAB => wire.chunks(2).rev().flatten().copied().collect(),
    }
}

/// Decode a register-table point from `words`, the registers of its read
/// starting at register `start` (the read's first address).
pub fn decode_registers(point: &Point, start: u16, words: &[u16]) -> Result<RawValue, Short> {
    let off = usize::from(point.address.wrapping_sub(start));
    let n = usize::from(point.ty.width());
    let Some(w) = words.get(off..off + n) else {
        return Err(Short {
            need: off + n,
            have: words.len(),
        });
    };
    Ok(match point.ty {
        ValueType::U16 => int(i64::from(w[0]), u64::from(w[0])),
        ValueType::I16 => int(i64::from(w[0] as i16), u64::from(w[0])),
        ValueType::Bit => {
            let b = (w[0] >> point.bit.unwrap_or(0)) & 1;
            int(i64::from(b), u64::from(b))
        }
        ValueType::U32 | ValueType::I32 | ValueType::F32 => {
            let b = ordered_bytes(w, point.order);
            let bits = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            match point.ty {
                ValueType::U32 => int(i64::from(bits), u64::from(bits)),
                ValueType::I32 => int(i64::from(bits as i32), u64::from(bits)),
                _ => RawValue::Float {
                    value: f64::from(f32::from_bits(bits)),
                    pattern: u64::from(bits),
                },
            }
        }
        ValueType::F64 => {
            let b = ordered_bytes(w, point.order);
            let mut a = [0u8; 8];
            a.copy_from_slice(&b);
            let bits = u64::from_be_bytes(a);
            RawValue::Float {
                value: f64::from_bits(bits),
                pattern: bits,
            }
        }
    })
}

/// Decode a coil / discrete-input point from `bits` of a read starting at
/// `start`.
pub fn decode_bits(point: &Point, start: u16, bits: &[bool]) -> Result<RawValue, Short> {
    let off = usize::from(point.address.wrapping_sub(start));
    let b = *bits.get(off).ok_or(Short {
        need: off + 1,
        have: bits.len(),
    })?;
    Ok(int(i64::from(b), u64::from(b)))
}

fn int(value: i64, pattern: u64) -> RawValue {
    RawValue::Int { value, pattern }
}

/// Does the raw value match a sentinel?
pub fn is_sentinel(raw: RawValue, sentinels: &[Sentinel]) -> bool {
    sentinels.iter().any(|s| match (raw, *s) {
        (RawValue::Int { value, pattern }, Sentinel::Int(i)) => {
            i == value || u64::try_from(i).is_ok_and(|p| p == pattern)
        }
        (RawValue::Float { pattern, .. }, Sentinel::Int(i)) => i as u64 == pattern,
        (RawValue::Float { value, .. }, Sentinel::Float(f)) => {
            (f.is_nan() && value.is_nan()) || f == value
        }
        (RawValue::Int { .. }, Sentinel::Float(_)) => false,
    })
}

/// The physical value of a point: sentinels and non-finite floats give no
/// value; otherwise raw × scale + offset (the map's encoding, not a unit
/// conversion).
pub fn physical(point: &Point, raw: RawValue) -> Result<f64, NoValue> {
    if is_sentinel(raw, &point.invalid) {
        return Err(NoValue::Sentinel);
    }
    let v = match raw {
        RawValue::Int { value, .. } => value as f64,
        RawValue::Float { value, .. } => {
            if !value.is_finite() {
                return Err(NoValue::NotFinite);
            }
            value
        }
    };
    let p = v * point.scale + point.offset;
    if p.is_finite() {
        Ok(p)
    } else {
        Err(NoValue::Overflow)
    }
}

/// Encode a raw value of `ty` in `order` as registers (the inverse of
/// [`decode_registers`]; used by tests and the fuzz target): the raw bit
/// pattern, truncated to the type's width.
pub fn encode_registers(ty: ValueType, order: WordOrder, raw: RawValue) -> Vec<u16> {
    let (RawValue::Int { pattern, .. } | RawValue::Float { pattern, .. }) = raw;
    let n = usize::from(ty.width()) * 2;
    let be = pattern.to_be_bytes()[8 - n..].to_vec();
    let wire: Vec<u8> = if be.len() == 2 {
        be
    } else {
        match order {
            WordOrder::ABCD => be,
            WordOrder::DCBA => be.into_iter().rev().collect(),
            WordOrder::BADC => be.chunks(2).flat_map(|c| [c[1], c[0]]).collect(),
            WordOrder::CDAB => be.chunks(2).rev().flatten().copied().collect(),
        }
    };
    wire.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::map::{Table, parse_map, validate};
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn point(ty: &str, order: Option<&str>, extra: &str) -> Point {
        let order = order
            .map(|o| format!("order = \"{o}\"\n"))
            .unwrap_or_default();
        let text = format!(
            "[[points]]\ntable = \"holding\"\naddress = 100\ntype = \"{ty}\"\n{order}unit = \"%\"\nmdc = \"MDC_CONC_AWAY_O2_INSP\"\n{extra}"
        );
        validate(&parse_map(&text).unwrap().points, Duration::from_secs(1))
            .unwrap()
            .remove(0)
    }

    #[test]
    fn f32_word_orders_of_one_value() {
        // 21.5 = 0x41AC0000: A=41 B=AC C=00 D=00.
        let cases = [
            ("ABCD", [0x41AC, 0x0000]),
            ("CDAB", [0x0000, 0x41AC]),
            ("BADC", [0xAC41, 0x0000]),
            ("DCBA", [0x0000, 0xAC41]),
        ];
        for (o, words) in cases {
            let p = point("f32", Some(o), "");
            let raw = decode_registers(&p, 100, &words).unwrap();
            assert_eq!(physical(&p, raw), Ok(21.5), "{o}");
        }
    }

    #[test]
    fn u32_i32_f64_and_16_bit_types() {
        // 0x0001_86A0 = 100000.
        let p = point("u32", Some("ABCD"), "");
        let raw = decode_registers(&p, 100, &[0x0001, 0x86A0]).unwrap();
        assert_eq!(physical(&p, raw), Ok(100_000.0));
        let p = point("i32", Some("CDAB"), "");
        // -2 = 0xFFFF_FFFE, word-swapped: FFFE FFFF.
        let raw = decode_registers(&p, 100, &[0xFFFE, 0xFFFF]).unwrap();
        assert_eq!(physical(&p, raw), Ok(-2.0));
        // f64 40.25 = 0x4044_2000_0000_0000; DCBA = bytes reversed.
        let p = point("f64", Some("DCBA"), "");
        let raw = decode_registers(&p, 100, &[0x0000, 0x0000, 0x0020, 0x4440]).unwrap();
        assert_eq!(physical(&p, raw), Ok(40.25));
        // i16 0xFF9C = -100, with scale 0.1 and offset 1 → -9.
        let p = point("i16", None, "scale = 0.1\noffset = 1.0\n");
        let raw = decode_registers(&p, 98, &[0, 0, 0xFF9C]).unwrap();
        assert!((physical(&p, raw).unwrap() - -9.0).abs() < 1e-9);
        let p = point("u16", None, "");
        let raw = decode_registers(&p, 100, &[0xFF9C]).unwrap();
        assert_eq!(physical(&p, raw), Ok(65436.0));
        // Bit 3 of 0x0008.
        let p = point("bit", None, "bit = 3\n");
        let raw = decode_registers(&p, 100, &[0x0008]).unwrap();
        assert_eq!(physical(&p, raw), Ok(1.0));
        let raw = decode_registers(&p, 100, &[0xFFF7]).unwrap();
        assert_eq!(physical(&p, raw), Ok(0.0));
    }

    #[test]
    fn sentinels_and_non_finite_floats_give_no_value() {
        let p = point("u16", None, "invalid = [0xFFFF]\n");
        let raw = decode_registers(&p, 100, &[0xFFFF]).unwrap();
        assert_eq!(physical(&p, raw), Err(NoValue::Sentinel));
        // i16 sentinel given as the pattern or as the typed value.
        for s in ["0x7FFF", "32767"] {
            let p = point("i16", None, &format!("invalid = [{s}]\n"));
            let raw = decode_registers(&p, 100, &[0x7FFF]).unwrap();
            assert_eq!(physical(&p, raw), Err(NoValue::Sentinel), "{s}");
        }
        let p = point("i16", None, "invalid = [-32768]\n");
        let raw = decode_registers(&p, 100, &[0x8000]).unwrap();
        assert_eq!(physical(&p, raw), Err(NoValue::Sentinel));
        // f32 NaN (quiet NaN 0x7FC00000, word-swapped) listed, or not: never a number.
        let p = point("f32", Some("CDAB"), "invalid = [nan]\n");
        let raw = decode_registers(&p, 100, &[0x0000, 0x7FC0]).unwrap();
        assert_eq!(physical(&p, raw), Err(NoValue::Sentinel));
        let p = point("f32", None, "");
        let raw = decode_registers(&p, 100, &[0x7FC0, 0x0000]).unwrap();
        assert_eq!(physical(&p, raw), Err(NoValue::NotFinite));
        let raw = decode_registers(&p, 100, &[0x7F80, 0x0000]).unwrap(); // +inf
        assert_eq!(physical(&p, raw), Err(NoValue::NotFinite));
        // f32 sentinel by bit pattern (-1.0 = 0xBF800000) and by value.
        for s in ["0xBF800000", "-1.0"] {
            let p = point("f32", None, &format!("invalid = [{s}]\n"));
            let raw = decode_registers(&p, 100, &[0xBF80, 0x0000]).unwrap();
            assert_eq!(physical(&p, raw), Err(NoValue::Sentinel), "{s}");
        }
        // Scale overflow to infinity is no value either.
        let p = point("f64", None, "scale = 1e300\n");
        let raw = decode_registers(
            &p,
            100,
            &encode_registers(
                ValueType::F64,
                WordOrder::ABCD,
                RawValue::Float {
                    value: 1e300,
                    pattern: 1e300f64.to_bits(),
                },
            ),
        )
        .unwrap();
        assert_eq!(physical(&p, raw), Err(NoValue::Overflow));
    }

    #[test]
    fn short_responses_are_errors_not_panics() {
        let p = point("f64", None, "");
        assert_eq!(
            decode_registers(&p, 99, &[0, 0, 0]),
            Err(Short { need: 5, have: 3 })
        );
        // A point before the read's start wraps to a huge offset: still an error.
        assert!(decode_registers(&p, 101, &[0; 10]).is_err());
        let mut c = p.clone();
        c.table = Table::Coils;
        c.ty = ValueType::Bit;
        assert_eq!(decode_bits(&c, 100, &[true]), Ok(int(1, 1)));
        assert!(decode_bits(&c, 90, &[true]).is_err());
    }

    fn order() -> impl Strategy<Value = WordOrder> {
        prop_oneof![
            Just(WordOrder::ABCD),
            Just(WordOrder::DCBA),
            Just(WordOrder::BADC),
            Just(WordOrder::CDAB)
        ]
    }

    proptest! {
        #[test]
        fn round_trip_every_type_and_order(o in order(), bits in any::<u64>(), f in any::<f32>(), d in any::<f64>()) {
            for (ty, raw) in [
                (ValueType::U16, int(bits as u16 as i64, bits as u16 as u64)),
                (ValueType::I16, int(bits as u16 as i16 as i64, bits as u16 as u64)),
                (ValueType::U32, int(bits as u32 as i64, bits as u32 as u64)),
                (ValueType::I32, int(bits as u32 as i32 as i64, bits as u32 as u64)),
                (ValueType::F32, RawValue::Float { value: f64::from(f), pattern: u64::from(f.to_bits()) }),
                (ValueType::F64, RawValue::Float { value: d, pattern: d.to_bits() }),
            ] {
                let mut p = point("u16", None, "");
                p.ty = ty;
                p.order = o;
                let words = encode_registers(ty, o, raw);
                prop_assert_eq!(words.len(), usize::from(ty.width()));
                let back = decode_registers(&p, 100, &words).unwrap();
                match (raw, back) {
                    (RawValue::Float { value: a, pattern: pa }, RawValue::Float { value: b, pattern: pb }) => {
                        prop_assert_eq!(pa, pb);
                        prop_assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                    }
                    (a, b) => prop_assert_eq!(a, b),
                }
            }
        }

        #[test]
        fn decoding_never_panics(words in proptest::collection::vec(any::<u16>(), 0..8),
                                 start in any::<u16>(), o in order(), bit in 0u8..16, scale in any::<f64>()) {
            for ty in ["u16", "i16", "u32", "i32", "f32", "f64", "bit"] {
                let mut p = point(ty, None, if ty == "bit" { "bit = 0\n" } else { "" });
                p.order = o;
                if ty == "bit" { p.bit = Some(bit); }
                if scale.is_finite() && scale != 0.0 { p.scale = scale; }
                if let Ok(raw) = decode_registers(&p, start, &words) {
                    if let Ok(v) = physical(&p, raw) {
                        prop_assert!(v.is_finite());
                    }
                }
            }
        }
    }
}
