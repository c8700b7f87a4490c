//! Trend series for charts, read from the chart buckets ingest maintains
//! (bucket maths: `hub_domain::trends`).

use hub_domain::trends::{Point, bucket_start};

use crate::{ReadFuture, StoreError};

/// A series to read: `patient`'s series of metric `mdc` at
/// `resolution_s`, one point per bucket starting in
/// `[from_bucket_us, to_us)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesQuery {
    pub patient: String,
    pub mdc: u32,
    pub resolution_s: i64,
    pub from_bucket_us: i64,
    pub to_us: i64,
}

impl SeriesQuery {
    /// `patient`'s series of metric `mdc` over `[from, to)` at
    /// `resolution_s`, from the bucket holding `from`.
    pub fn new(patient: &str, mdc: u32, resolution_s: i64, from: i64, to: i64) -> Self {
        Self {
            patient: patient.to_owned(),
            mdc,
            resolution_s,
            from_bucket_us: bucket_start(from, resolution_s),
            to_us: to,
        }
    }
}

/// Chart series.
pub trait TrendStore {
    /// The points of `q` (each bucket's devices summed), oldest first.
    fn series(&self, q: &SeriesQuery) -> Result<Vec<Point>, StoreError>;
    /// [`Self::series`] as a [`ReadFuture`], when the store has a
    /// non-blocking way to answer it (PostgreSQL). `None` (the default):
    /// the caller runs [`Self::series`] itself.
    fn series_future(&self, _q: &SeriesQuery) -> Option<ReadFuture<'static, Vec<Point>>> {
        None
    }
}
