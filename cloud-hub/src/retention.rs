//! Retention (`[storage] retention_days`): observations (by effective
//! time), device events (by event time), rejected readings (by receive
//! time) and score history rows (by evaluation time) older than the window
//! are deleted, hourly and at start-up. Batch acks are kept (they are
//! small), so a gateway re-sending a very old batch still gets its stored
//! ack instead of re-storing purged readings.
//!
//! SQLite deletes in chunks of [`CHUNK`] rows, one short transaction each,
//! so ingest interleaves; PostgreSQL deletes per table (partitions outside
//! the window are pruned by the planner; dropping whole monthly partitions
//! is an operator's option, see docs/hub.md).

use std::time::Duration;

use crate::store::{Store, StoreError};

/// Rows deleted per SQLite transaction.
pub const CHUNK: i64 = 10_000;
/// How often the hub applies retention.
pub const INTERVAL: Duration = Duration::from_secs(3600);

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub observations: u64,
    pub device_events: u64,
    pub rejected: u64,
    /// Score history rows (by evaluation time; SQLite only).
    pub scores: u64,
}

impl Store {
    /// Deletes what is older than `cutoff_us` (UTC µs); see the module doc.
    pub fn purge_before(&self, cutoff_us: i64) -> Result<Purged, StoreError> {
        if let Some(p) = self.postgres() {
            return crate::pg::off_runtime(|| p.purge_before(cutoff_us));
        }
        let mut purged = Purged::default();
        for (table, column, count) in [
            ("observations", "effective_us", &mut purged.observations),
            ("device_events", "time_us", &mut purged.device_events),
            ("rejected_readings", "received_us", &mut purged.rejected),
            ("score_history", "time_us", &mut purged.scores),
        ] {
            loop {
                let n = {
                    let conn = self.lock()?;
                    conn.execute(
                        &format!(
                            "DELETE FROM {table} WHERE rowid IN
                               (SELECT rowid FROM {table} WHERE {column} < ?1 LIMIT ?2)"
                        ),
                        rusqlite::params![cutoff_us, CHUNK],
                    )?
                };
                *count += n as u64;
                if (n as i64) < CHUNK {
                    break;
                }
            }
        }
        Ok(purged)
    }
}

/// Applies retention every [`INTERVAL`] until `stop` turns true.
pub async fn run(store: Store, days: u32, mut stop: tokio::sync::watch::Receiver<bool>) {
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
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
