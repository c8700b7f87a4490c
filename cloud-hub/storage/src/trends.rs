//! Trend series for charts, read from the chart buckets ingest maintains
//! (bucket maths: `hub_domain::trends`).

use hub_domain::trends::Point;

use crate::StoreError;

/// Chart series.
pub trait TrendStore {
    /// `patient`'s series of metric `mdc` at `resolution_s`: one point per
    /// bucket starting in `[from_bucket_us, to_us)` (its devices' buckets
    /// summed), oldest first.
    fn series(
        &self,
        patient: &str,
        mdc: u32,
        resolution_s: i64,
        from_bucket_us: i64,
        to_us: i64,
    ) -> Result<Vec<Point>, StoreError>;
}
