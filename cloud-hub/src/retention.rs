//! Retention by data class (`[retention]`, docs/privacy.md): readings
//! (observations by effective time, device events by event time, rejected
//! readings by receive time), aggregates (chart buckets, score history by
//! evaluation time) and resolved alerts, each older than its class's
//! window, are deleted hourly and at start-up; rows of patients under a
//! legal hold are kept. Batch acks are kept (they are
//! small), so a gateway re-sending a very old batch still gets its stored
//! ack instead of re-storing purged readings.
//!
//! SQLite deletes in chunks of 10 000 rows, one short transaction each,
//! so ingest interleaves; PostgreSQL deletes per table (partitions outside
//! the window are pruned by the planner; dropping whole monthly partitions
//! is an operator's option, see docs/hub.md).

use std::time::Duration;

use hub_transport::Store;
use tokio_util::sync::CancellationToken;

pub use hub_storage::{Purged, PurgedByClass, RetentionCutoffs};

use crate::config::RetentionConfig;

/// How often the hub applies retention.
pub const INTERVAL: Duration = Duration::from_secs(3600);

/// The cut-offs of `days` at hub time `now_us`.
pub fn cutoffs(days: &RetentionConfig, now_us: i64) -> RetentionCutoffs {
    let cut = |d: Option<u32>| d.map(|d| now_us - i64::from(d) * 86_400 * 1_000_000);
    RetentionCutoffs {
        readings: cut(days.readings_days),
        aggregates: cut(days.aggregates_days),
        alerts: cut(days.alerts_days),
    }
}

/// Applies retention by class every [`INTERVAL`] until `shutdown` is
/// cancelled.
pub async fn run(store: Store, days: RetentionConfig, shutdown: CancellationToken) {
    loop {
        let s = store.clone();
        let k = cutoffs(&days, crate::store::now_us());
        match tokio::task::spawn_blocking(move || s.purge_classes(&k)).await {
            Ok(Ok(p)) => tracing::info!(
                readings_days = days.readings_days,
                aggregates_days = days.aggregates_days,
                alerts_days = days.alerts_days,
                observations = p.observations,
                device_events = p.device_events,
                rejected = p.rejected,
                chart_buckets = p.chart_buckets,
                scores = p.scores,
                alerts = p.alerts,
                "retention applied"
            ),
            Ok(Err(e)) => tracing::error!(error = %e, "retention failed; retrying next hour"),
            Err(e) => tracing::error!(error = %e, "retention task panicked"),
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
