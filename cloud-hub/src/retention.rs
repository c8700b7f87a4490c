//! Retention (`[storage] retention_days`): observations (by effective
//! time), device events (by event time), rejected readings (by receive
//! time) and score history rows (by evaluation time) older than the window
//! are deleted, hourly and at start-up. Batch acks are kept (they are
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

pub use hub_storage::Purged;

/// How often the hub applies retention.
pub const INTERVAL: Duration = Duration::from_secs(3600);

/// Applies retention every [`INTERVAL`] until `shutdown` is cancelled.
pub async fn run(store: Store, days: u32, shutdown: CancellationToken) {
    let window_us = i64::from(days) * 86_400 * 1_000_000;
    loop {
        let s = store.clone();
        let cutoff = crate::store::now_us() - window_us;
        match tokio::task::spawn_blocking(move || s.purge_before(cutoff)).await {
            Ok(Ok(p)) => tracing::info!(
                retention_days = days,
                observations = p.observations,
                device_events = p.device_events,
                rejected = p.rejected,
                scores = p.scores,
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
