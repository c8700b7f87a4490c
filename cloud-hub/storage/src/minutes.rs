//! The minute arithmetic of the device minutes both backends keep
//! (`observation_minutes`: per device, buffer incarnation, UTC minute of
//! effective time and sign of sequence, the span of sequences stored).

/// Microseconds in a minute.
const MINUTE_US: i64 = 60_000_000;

/// The minute (floor, also before 1970) of `us`.
pub fn minute_of(us: i64) -> i64 {
    us.div_euclid(MINUTE_US)
}

/// The first and last minute of `[lo, hi)`; an empty window gives a first
/// minute after the last.
pub fn minutes_of(lo: i64, hi: i64) -> (i64, i64) {
    if hi <= lo {
        return (1, 0);
    }
    (minute_of(lo), minute_of(hi - 1))
}

/// The spans of new rows `(device, sequence, effective_us)` of one
/// gateway and incarnation, by (device, minute, sign of sequence): what a
/// batch widens its minute rows with, keys in order.
pub fn spans<'a>(
    rows: impl Iterator<Item = (&'a str, i64, i64)>,
) -> std::collections::BTreeMap<(&'a str, i64, bool), (i64, i64)> {
    let mut spans = std::collections::BTreeMap::new();
    for (device, seq, at) in rows {
        let span = spans
            .entry((device, minute_of(at), seq < 0))
            .or_insert((seq, seq));
        span.0 = span.0.min(seq);
        span.1 = span.1.max(seq);
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_floor_also_before_1970() {
        assert_eq!(minute_of(0), 0);
        assert_eq!(minute_of(59_999_999), 0);
        assert_eq!(minute_of(60_000_000), 1);
        assert_eq!(minute_of(-1), -1);
        assert_eq!(minute_of(-60_000_000), -1);
        assert_eq!(minute_of(-60_000_001), -2);
        assert_eq!(minutes_of(0, 60_000_000), (0, 0));
        assert_eq!(minutes_of(0, 60_000_001), (0, 1));
        assert_eq!(minutes_of(5, 5), (1, 0));
        assert_eq!(minutes_of(i64::MIN, i64::MAX).0, minute_of(i64::MIN));
    }

    #[test]
    fn spans_are_per_device_minute_and_sign() {
        let rows = [
            ("d", 5, 0),
            ("d", 3, 59_999_999),
            ("d", 9, 60_000_000),
            ("d", -2, 1),
            ("e", 4, 2),
        ];
        let s = spans(rows.into_iter());
        assert_eq!(
            s.into_iter().collect::<Vec<_>>(),
            [
                (("d", 0, false), (3, 5)),
                (("d", 0, true), (-2, -2)),
                (("d", 1, false), (9, 9)),
                (("e", 0, false), (4, 4)),
            ]
        );
    }
}
