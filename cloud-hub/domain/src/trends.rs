//! Chart aggregates: 1-minute, 5-minute and 1-hour buckets of count, sum,
//! min and max of the usable values of a patient's metric (status `final`
//! with a stored value: valid and physically possible), in the metric's
//! chart unit (°F and kPa converted, as for the scores; readings in a unit
//! that cannot be converted are left out), kept per device so that a
//! rebuild after re-attribution is exact; and the trend of a series.
//! Pure: the storage layer persists the buckets ([`Rollup::rows`]).

use std::collections::HashMap;

use shared_protocol::v1::Reading;

/// Bucket sizes in seconds.
pub const RESOLUTIONS: [i64; 3] = [60, 300, 3600];

const S: i64 = 1_000_000;

#[derive(Debug, Clone, Copy)]
struct Agg {
    n: i64,
    sum: f64,
    min: f64,
    max: f64,
}

/// A bucket's key: patient, MDC code, resolution (s), bucket start (µs), gateway, device.
pub type Key = (String, u32, i64, i64, String, String);

/// Buckets collected in memory (one batch, or one rebuild).
#[derive(Debug, Default)]
pub struct Rollup {
    /// The distinct (patient, gateway, device) of the buckets, which the
    /// buckets name by index: a batch has few, and readings come in runs
    /// of one device, so adding a value allocates nothing and the list is
    /// searched only when the owner changes.
    owners: Vec<(String, String, String)>,
    /// The owner of the last value added.
    last: usize,
    /// (owner, MDC code, resolution, bucket start) → aggregate.
    buckets: HashMap<(usize, u32, i64, i64), Agg>,
}

/// The value of a reading in its metric's chart unit, if usable there.
pub fn chart_value(r: &Reading, value: f64) -> Option<f64> {
    crate::early_warning::in_chart_unit(r.mdc_code, value, r)
}

impl Rollup {
    /// Adds a usable value (already in the chart unit).
    pub fn add(&mut self, patient: &str, gateway: &str, device: &str, mdc: u32, t_us: i64, v: f64) {
        let is = |o: &(String, String, String)| o.0 == patient && o.1 == gateway && o.2 == device;
        let owner = if self.owners.get(self.last).is_some_and(is) {
            self.last
        } else if let Some(i) = self.owners.iter().position(is) {
            i
        } else {
            self.owners
                .push((patient.to_owned(), gateway.to_owned(), device.to_owned()));
            self.owners.len() - 1
        };
        self.last = owner;
        for res in RESOLUTIONS {
            let bucket = bucket_start(t_us, res);
            let a = self
                .buckets
                .entry((owner, mdc, res, bucket))
                .or_insert(Agg {
                    n: 0,
                    sum: 0.0,
                    min: v,
                    max: v,
                });
            a.n += 1;
            a.sum += v;
            a.min = a.min.min(v);
            a.max = a.max.max(v);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The buckets as rows: (patient, mdc, resolution_s, bucket_us, gateway, device) and
    /// (n, sum, min, max).
    pub fn rows(self) -> impl Iterator<Item = (Key, (i64, f64, f64, f64))> {
        let owners = self.owners;
        self.buckets
            .into_iter()
            .map(move |((o, mdc, res, bucket), a)| {
                let (patient, gateway, device) = &owners[o];
                (
                    (
                        patient.clone(),
                        mdc,
                        res,
                        bucket,
                        gateway.clone(),
                        device.clone(),
                    ),
                    (a.n, a.sum, a.min, a.max),
                )
            })
    }
}

/// One point of a series.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Point {
    pub start_us: i64,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
}

impl Point {
    /// A point from a bucket's sums (`count` ≥ 1: buckets hold values).
    pub fn from_sums(start_us: i64, count: i64, sum: f64, min: f64, max: f64) -> Self {
        Self {
            start_us,
            count,
            min,
            max,
            mean: sum / count as f64,
        }
    }
}

/// The start of the bucket of `resolution_s` holding time `t_us`: a
/// series over `[from, to)` reads the buckets from the one holding `from`.
pub fn bucket_start(t_us: i64, resolution_s: i64) -> i64 {
    t_us.div_euclid(resolution_s * S) * resolution_s * S
}

/// Least-squares slope of the points' means (weighted by their counts)
/// per hour; `None` with fewer than two points.
pub fn slope_per_hour(points: &[Point]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let w: f64 = points.iter().map(|p| p.count as f64).sum();
    let x = |p: &Point| p.start_us as f64 / (3600.0 * S as f64);
    let mx = points.iter().map(|p| p.count as f64 * x(p)).sum::<f64>() / w;
    let my = points.iter().map(|p| p.count as f64 * p.mean).sum::<f64>() / w;
    let sxy: f64 = points
        .iter()
        .map(|p| p.count as f64 * (x(p) - mx) * (p.mean - my))
        .sum();
    let sxx: f64 = points
        .iter()
        .map(|p| p.count as f64 * (x(p) - mx).powi(2))
        .sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// The resolution for a span when none is asked: at most ~720 points.
pub fn auto_resolution(span_us: i64) -> i64 {
    if span_us <= 12 * 3600 * S {
        if span_us <= 2 * 3600 * S { 60 } else { 300 }
    } else {
        3600
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_514_400_000_000; // a whole hour

    #[test]
    fn values_fall_into_aligned_buckets_of_each_resolution() {
        let mut r = Rollup::default();
        r.add("p", "g", "d", 1, T0 + 59 * S, 10.0);
        r.add("p", "g", "d", 1, T0 + 61 * S, 20.0);
        r.add("p", "g", "d", 1, T0 + 299 * S, 30.0);
        let rows: HashMap<Key, (i64, f64, f64, f64)> = r.rows().collect();
        let get = |res: i64, bucket: i64| {
            rows.get(&("p".into(), 1, res, bucket, "g".into(), "d".into()))
                .copied()
        };
        assert_eq!(get(60, T0), Some((1, 10.0, 10.0, 10.0)));
        assert_eq!(get(60, T0 + 60 * S).unwrap().0, 1);
        assert_eq!(get(300, T0), Some((3, 60.0, 10.0, 30.0)));
        assert_eq!(get(3600, T0).unwrap().0, 3);
        assert_eq!(rows.len(), 3 + 1 + 1);
    }

    /// Values of several patients and devices, interleaved, each land in
    /// their own owner's buckets.
    #[test]
    fn interleaved_owners_keep_their_own_buckets() {
        let mut r = Rollup::default();
        let owners = [("p1", "g", "d1"), ("p2", "g", "d2"), ("p1", "g", "d2")];
        for i in 0..9 {
            let (p, g, d) = owners[i % 3];
            r.add(p, g, d, 7, T0, (i + 1) as f64);
        }
        r.add("p2", "g2", "d2", 7, T0, 100.0);
        let rows: HashMap<Key, (i64, f64, f64, f64)> = r.rows().collect();
        assert_eq!(rows.len(), 4 * RESOLUTIONS.len());
        let minute = |p: &str, g: &str, d: &str| rows[&(p.into(), 7, 60, T0, g.into(), d.into())];
        assert_eq!(minute("p1", "g", "d1"), (3, 1.0 + 4.0 + 7.0, 1.0, 7.0));
        assert_eq!(minute("p2", "g", "d2"), (3, 2.0 + 5.0 + 8.0, 2.0, 8.0));
        assert_eq!(minute("p1", "g", "d2"), (3, 3.0 + 6.0 + 9.0, 3.0, 9.0));
        assert_eq!(minute("p2", "g2", "d2"), (1, 100.0, 100.0, 100.0));
    }

    #[test]
    fn slope_of_a_steady_rise() {
        let pts: Vec<Point> = (0..6)
            .map(|i| Point {
                start_us: T0 + i * 600 * S,
                count: 60,
                min: 0.0,
                max: 0.0,
                mean: 90.0 + i as f64, // +1 per 10 min = +6 per hour
            })
            .collect();
        let s = slope_per_hour(&pts).unwrap();
        assert!((s - 6.0).abs() < 1e-9, "{s}");
        assert_eq!(slope_per_hour(&pts[..1]), None);
    }

    #[test]
    fn automatic_resolution_keeps_charts_small() {
        assert_eq!(auto_resolution(3600 * S), 60);
        assert_eq!(auto_resolution(8 * 3600 * S), 300);
        assert_eq!(auto_resolution(24 * 3600 * S), 3600);
    }
}
