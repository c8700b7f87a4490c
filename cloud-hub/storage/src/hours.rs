//! The hour arithmetic of the search totals both backends keep
//! (`observation_hours`: per patient, MDC code, LOINC code and UTC hour of
//! effective time, how many stored rows a search lists, panel parts left
//! out). A search's total (`Bundle.total`) over a range of hours adds a
//! row per whole hour and counts in the index only its partial first and
//! last hours, instead of every matching index entry (issue 18).

use std::collections::BTreeMap;

use hub_domain::fhir::{CodeMatch, ObservationSearch};

/// Microseconds in an hour.
pub const HOUR_US: i64 = 3_600_000_000;

/// The UTC hour (floor, also before 1970) holding `us`: the `hour` column.
pub fn hour_of(us: i64) -> i64 {
    us.div_euclid(HOUR_US)
}

/// How a search's total is counted through the hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourSpan {
    /// The whole hours `[first, end)` of the range: summed from the table.
    pub first: i64,
    pub end: i64,
    /// The partial first hour: the range's rows before this instant (µs),
    /// counted in the index. `None` when the range starts on an hour.
    pub head_before: Option<i64>,
    /// The partial last hour: the range's rows from this instant (µs),
    /// counted in the index. `None` when the range is open or ends on an
    /// hour.
    pub tail_from: Option<i64>,
}

/// The code set and the span that count search `s` over its date range
/// `[lo, hi)` through the hours, when its filters allow: patients, exactly
/// one set of codes, no category or device filter (the table's key holds
/// nothing else), and at least one whole hour in the range. `None`: count
/// the index entries. Arithmetic that would overflow (a range at the ends
/// of time) also gives `None`.
pub fn span(
    s: &ObservationSearch,
    lo: Option<i64>,
    hi: Option<i64>,
) -> Option<(&[CodeMatch], HourSpan)> {
    let [codes] = s.codes.as_slice() else {
        return None;
    };
    if s.patients.is_empty() || !s.categories.is_empty() || !s.devices.is_empty() {
        return None;
    }
    let first = lo.map_or(Some(i64::MIN), |t| t.checked_add(HOUR_US - 1).map(hour_of))?;
    let end = hi.map_or(i64::MAX, hour_of);
    if first >= end {
        return None;
    }
    let head_before = match lo {
        Some(t) => Some(first.checked_mul(HOUR_US)?).filter(|e| *e != t),
        None => None,
    };
    let tail_from = match hi {
        Some(t) => Some(end.checked_mul(HOUR_US)?).filter(|e| *e != t),
        None => None,
    };
    Some((
        codes,
        HourSpan {
            first,
            end,
            head_before,
            tail_from,
        },
    ))
}

/// How many new rows `(patient, MDC code, LOINC code, effective_us)` a
/// batch adds to each hour row, keys in order (two transactions then lock
/// the rows they share in one order).
pub fn counts<'a>(
    rows: impl Iterator<Item = (&'a str, u32, &'a str, i64)>,
) -> BTreeMap<(&'a str, u32, &'a str, i64), i64> {
    let mut counts = BTreeMap::new();
    for (patient, mdc, loinc, t) in rows {
        *counts.entry((patient, mdc, loinc, hour_of(t))).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_round_down_on_both_sides_of_the_epoch() {
        assert_eq!(hour_of(0), 0);
        assert_eq!(hour_of(HOUR_US - 1), 0);
        assert_eq!(hour_of(HOUR_US), 1);
        assert_eq!(hour_of(-1), -1);
        assert_eq!(hour_of(-HOUR_US), -1);
        assert_eq!(hour_of(-HOUR_US - 1), -2);
    }

    fn search(patients: &[&str], code_sets: usize) -> ObservationSearch {
        let mut s = hub_domain::fhir::parse_search(&[]).unwrap();
        s.patients = patients.iter().map(|p| (*p).to_owned()).collect();
        s.codes = vec![
            vec![CodeMatch {
                mdc: 150456,
                loinc: None
            }];
            code_sets
        ];
        s
    }

    #[test]
    fn spans_split_whole_hours_from_partial_ones() {
        let s = search(&["p"], 1);
        let h = HOUR_US;
        // Aligned on both sides: whole hours only.
        assert_eq!(
            span(&s, Some(2 * h), Some(5 * h)).unwrap().1,
            HourSpan {
                first: 2,
                end: 5,
                head_before: None,
                tail_from: None
            }
        );
        // Unaligned: the partial hours around the whole ones.
        assert_eq!(
            span(&s, Some(2 * h + 1), Some(5 * h - 1)).unwrap().1,
            HourSpan {
                first: 3,
                end: 4,
                head_before: Some(3 * h),
                tail_from: Some(4 * h)
            }
        );
        // Open ends run to the ends of time, before 1970 too.
        assert_eq!(
            span(&s, None, Some(-h + 7)).unwrap().1,
            HourSpan {
                first: i64::MIN,
                end: -1,
                head_before: None,
                tail_from: Some(-h)
            }
        );
        assert_eq!(span(&s, Some(h), None).unwrap().1.end, i64::MAX);
        // No whole hour: the index counts.
        assert_eq!(span(&s, Some(h + 1), Some(2 * h + 5)), None);
        assert_eq!(span(&s, Some(h), Some(h)), None);
        // Ranges at the ends of time do not overflow.
        assert_eq!(span(&s, Some(i64::MAX - 3), None), None);
        assert!(span(&s, Some(i64::MIN), Some(i64::MIN + 2 * h)).is_some());
    }

    #[test]
    fn only_patient_and_code_searches_use_the_hours() {
        let (lo, hi) = (Some(0), Some(10 * HOUR_US));
        assert!(span(&search(&["p"], 1), lo, hi).is_some());
        assert!(span(&search(&[], 1), lo, hi).is_none());
        assert!(span(&search(&["p"], 0), lo, hi).is_none());
        assert!(span(&search(&["p"], 2), lo, hi).is_none());
        let mut s = search(&["p"], 1);
        s.categories = vec![vec!["vital-signs".into()]];
        assert!(span(&s, lo, hi).is_none());
        let mut s = search(&["p"], 1);
        s.devices = vec!["dev".into()];
        assert!(span(&s, lo, hi).is_none());
    }

    #[test]
    fn counts_are_per_patient_code_and_hour_in_key_order() {
        let rows = [
            ("p2", 1, "a", 0),
            ("p1", 1, "a", HOUR_US + 5),
            ("p1", 1, "a", HOUR_US),
            ("p1", 1, "a", -1),
            ("p1", 2, "a", 0),
        ];
        let c: Vec<_> = counts(rows.into_iter()).into_iter().collect();
        assert_eq!(
            c,
            vec![
                (("p1", 1, "a", -1), 1),
                (("p1", 1, "a", 1), 2),
                (("p1", 2, "a", 0), 1),
                (("p2", 1, "a", 0), 1),
            ]
        );
    }
}
