//! Trend series for charts, read from the chart buckets ingest maintains
//! (bucket maths: `hub_domain::trends`).

use hub_domain::trends::Point;

use crate::{ReadFuture, StoreError};

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
    /// [`Self::series`] as a [`ReadFuture`], when the store has a
    /// non-blocking way to answer it (PostgreSQL). `None` (the default):
    /// the caller runs [`Self::series`] itself.
    fn series_future(
        &self,
        _patient: &str,
        _mdc: u32,
        _resolution_s: i64,
        _from_bucket_us: i64,
        _to_us: i64,
    ) -> Option<ReadFuture<'static, Vec<Point>>> {
        None
    }
}
