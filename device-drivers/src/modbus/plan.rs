//! Coalescing of points into as few read requests as the protocol allows.
//!
//! Points of the same table and the same poll interval ("poll group") whose
//! addresses are contiguous, overlapping, or separated by at most
//! `gap_fill` unmapped registers are read with one request, as long as the
//! request stays within the protocol's limits (Modbus Application Protocol
//! v1.1b3 §6.1–§6.4: 2000 coils / discrete inputs, 125 registers per read).
//! Gap registers are read and ignored; a device that answers unmapped
//! addresses with an exception needs `gap_fill = 0`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::map::{Point, Table};

/// Protocol limit on registers per read (functions 0x03, 0x04).
pub const MAX_REGISTERS: u16 = 125;
/// Protocol limit on bits per read (functions 0x01, 0x02).
pub const MAX_BITS: u16 = 2000;

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub table: Table,
    pub start: u16,
    /// Registers (or bits) read.
    pub count: u16,
    pub interval: Duration,
    /// Indices into the point list, in address order.
    pub points: Vec<usize>,
}

impl ReadRequest {
    /// Last address read (inclusive).
    pub fn last(&self) -> u16 {
        self.start + (self.count - 1)
    }
}

/// Limits for [`plan_reads`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest gap of unmapped registers/bits read to join two points.
    pub gap_fill: u16,
    /// Registers per read (1..=125; at least the widest point, 4 for f64).
    pub max_registers: u16,
    /// Bits per read (1..=2000).
    pub max_bits: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            gap_fill: 8,
            max_registers: MAX_REGISTERS,
            max_bits: MAX_BITS,
        }
    }
}

/// Group points into read requests. Every point is served by exactly one
/// request, which covers all its registers; requests respect the limits
/// (a point wider than `max_registers` gets a request of its own width, so
/// validate `max_registers ≥ 4` beforehand). Deterministic: requests come
/// ordered by (interval, table, start).
pub fn plan_reads(points: &[Point], limits: Limits) -> Vec<ReadRequest> {
    let mut groups: BTreeMap<(Duration, Table), Vec<usize>> = BTreeMap::new();
    for (i, p) in points.iter().enumerate() {
        groups
            .entry((p.poll_interval, p.table))
            .or_default()
            .push(i);
    }
    let mut out = Vec::new();
    for ((interval, table), mut idx) in groups {
        idx.sort_by_key(|&i| (points[i].address, points[i].last_address(), i));
        let max = u32::from(if table.is_bits() {
            limits.max_bits
        } else {
            limits.max_registers
        });
        let mut cur: Option<ReadRequest> = None;
        for i in idx {
            let p = &points[i];
            let (a, b) = (u32::from(p.address), u32::from(p.last_address()));
            if let Some(r) = cur.as_mut() {
                let (start, last) = (u32::from(r.start), u32::from(r.last()));
                let new_last = last.max(b);
                let joins = a <= last + 1 + u32::from(limits.gap_fill);
                if joins && new_last - start < max {
                    r.count = (new_last - start + 1) as u16;
                    r.points.push(i);
                    continue;
                }
                out.extend(cur.take());
            }
            cur = Some(ReadRequest {
                table,
                start: p.address,
                count: (b - a + 1) as u16,
                interval,
                points: vec![i],
            });
        }
        out.extend(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::map::{ValueType, WordOrder};
    use super::*;
    use proptest::prelude::*;
    use shared_protocol::catalogue::{CATALOGUE, codes};

    fn pt(table: Table, address: u16, ty: ValueType, ms: u64) -> Point {
        let metric = *CATALOGUE.by_mdc(codes::PULS_OXIM_SAT_O2).unwrap();
        Point {
            label: format!("{table}@{address}"),
            table,
            address,
            ty,
            bit: (ty == ValueType::Bit && !table.is_bits()).then_some(0),
            order: WordOrder::ABCD,
            scale: 1.0,
            offset: 0.0,
            metric,
            unit: metric.unit,
            invalid: vec![],
            poll_interval: Duration::from_millis(ms),
        }
    }

    fn spans(rs: &[ReadRequest]) -> Vec<(Table, u16, u16, usize)> {
        rs.iter()
            .map(|r| (r.table, r.start, r.count, r.points.len()))
            .collect()
    }

    #[test]
    fn contiguous_and_small_gaps_merge_large_gaps_split() {
        use ValueType::*;
        let pts = vec![
            pt(Table::Holding, 0, U16, 1000),
            pt(Table::Holding, 1, F32, 1000),  // 1-2
            pt(Table::Holding, 11, U16, 1000), // gap 8 (3..=10): joins
            pt(Table::Holding, 21, U16, 1000), // gap 9: new read
            pt(Table::Holding, 21, Bit, 1000), // same register, another point
            pt(Table::Input, 0, U16, 1000),    // other table
            pt(Table::Holding, 2, U16, 500),   // other poll group
        ];
        let rs = plan_reads(&pts, Limits::default());
        assert_eq!(
            spans(&rs),
            vec![
                (Table::Holding, 2, 1, 1),
                (Table::Holding, 0, 12, 3),
                (Table::Holding, 21, 1, 2),
                (Table::Input, 0, 1, 1),
            ]
        );
        // gap_fill 0: only touching points merge.
        let rs = plan_reads(
            &pts,
            Limits {
                gap_fill: 0,
                ..Limits::default()
            },
        );
        assert_eq!(spans(&rs)[1], (Table::Holding, 0, 3, 2));
    }

    #[test]
    fn limits_split_long_runs() {
        // 130 contiguous registers: 125 + 5.
        let pts: Vec<Point> = (0..130)
            .map(|a| pt(Table::Input, a, ValueType::U16, 1000))
            .collect();
        let rs = plan_reads(&pts, Limits::default());
        assert_eq!(
            spans(&rs),
            vec![(Table::Input, 0, 125, 125), (Table::Input, 125, 5, 5)]
        );
        // An f32 straddling the limit starts the next read.
        let mut pts: Vec<Point> = (0..124)
            .map(|a| pt(Table::Holding, a, ValueType::U16, 1000))
            .collect();
        pts.push(pt(Table::Holding, 124, ValueType::F32, 1000));
        let rs = plan_reads(&pts, Limits::default());
        assert_eq!(rs[0].count, 124);
        assert_eq!((rs[1].start, rs[1].count), (124, 2));
        // 2001 coils: 2000 + 1.
        let pts: Vec<Point> = (0..2001)
            .map(|a| pt(Table::Coils, a, ValueType::Bit, 1000))
            .collect();
        let rs = plan_reads(&pts, Limits::default());
        assert_eq!(rs.iter().map(|r| r.count).collect::<Vec<_>>(), [2000, 1]);
    }

    #[test]
    fn the_top_of_the_address_space_does_not_overflow() {
        let pts = vec![
            pt(Table::Holding, 65531, ValueType::F64, 1000),
            pt(Table::Holding, 65535, ValueType::U16, 1000),
        ];
        let rs = plan_reads(&pts, Limits::default());
        assert_eq!(spans(&rs), vec![(Table::Holding, 65531, 5, 2)]);
        assert_eq!(rs[0].last(), 65535);
    }

    fn arb_point() -> impl Strategy<Value = Point> {
        let table = prop_oneof![
            Just(Table::Holding),
            Just(Table::Input),
            Just(Table::Coils),
            Just(Table::Discrete)
        ];
        let ty = prop_oneof![
            Just(ValueType::U16),
            Just(ValueType::I32),
            Just(ValueType::F32),
            Just(ValueType::F64),
            Just(ValueType::Bit)
        ];
        // Addresses clustered so merging happens, and near the top too.
        let addr = prop_oneof![0u16..300, 65000u16..=65535];
        (table, ty, addr, prop_oneof![Just(100u64), Just(1000)]).prop_map(|(t, ty, a, ms)| {
            let ty = if t.is_bits() { ValueType::Bit } else { ty };
            let a = a.min(u16::MAX - (ty.width() - 1));
            pt(t, a, ty, ms)
        })
    }

    proptest! {
        #[test]
        fn every_point_covered_exactly_once_within_limits(
            pts in proptest::collection::vec(arb_point(), 0..200),
            gap in 0u16..20, max_registers in 4u16..=125, max_bits in 1u16..=2000,
        ) {
            let limits = Limits { gap_fill: gap, max_registers, max_bits };
            let rs = plan_reads(&pts, limits);
            let mut seen = vec![0u32; pts.len()];
            for r in &rs {
                prop_assert!(r.count >= 1);
                let max = if r.table.is_bits() { max_bits } else { max_registers };
                prop_assert!(r.count <= max, "{r:?}");
                prop_assert!(u32::from(r.start) + u32::from(r.count) - 1 <= 65535);
                for &i in &r.points {
                    seen[i] += 1;
                    let p = &pts[i];
                    prop_assert_eq!(p.table, r.table);
                    prop_assert_eq!(p.poll_interval, r.interval);
                    prop_assert!(p.address >= r.start && p.last_address() <= r.last(), "{p:?} {r:?}");
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
            // Merging is maximal for neighbours: two consecutive reads of one
            // group are either too far apart or would exceed the limit.
            for w in rs.windows(2) {
                let (x, y) = (&w[0], &w[1]);
                if x.table == y.table && x.interval == y.interval {
                    let max = u32::from(if x.table.is_bits() { max_bits } else { max_registers });
                    let far = u32::from(y.start) > u32::from(x.last()) + 1 + u32::from(gap);
                    let long = u32::from(x.last().max(y.last())) - u32::from(x.start) + 1 > max;
                    prop_assert!(far || long, "{x:?} {y:?}");
                }
            }
        }
    }
}
