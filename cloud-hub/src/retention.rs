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
use hub_transport::audit::AuditKeys;

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

/// The audit log's retention at `now_us`: up to the newest checkpoint
/// signed before the cut-off, with a keyed purge entry (see
/// `hub_domain::audit::purge_point`). Returns the entries removed.
pub fn purge_audit(
    store: &Store,
    keys: &AuditKeys,
    days: u32,
    now_us: i64,
) -> Result<u64, hub_transport::store::StoreError> {
    let Some(key) = keys.current() else {
        return Ok(0);
    };
    let cutoff = now_us - i64::from(days) * 86_400 * 1_000_000;
    let checkpoints = store.audit_checkpoints()?;
    let Some(through) = hub_transport::audit::purge_point(&checkpoints, cutoff, 0) else {
        return Ok(0);
    };
    let entry = hub_transport::audit::purge_entry(through, cutoff, now_us);
    store.purge_audit(through, &entry, key)
}

/// Applies retention by class every [`INTERVAL`] until `shutdown` is
/// cancelled (the audit log's only with `keys`' current key).
pub async fn run(
    store: Store,
    days: RetentionConfig,
    keys: AuditKeys,
    shutdown: CancellationToken,
) {
    loop {
        if let Some(audit_days) = days.audit_days {
            let (s, k) = (store.clone(), keys.clone());
            let now = crate::store::now_us();
            match tokio::task::spawn_blocking(move || purge_audit(&s, &k, audit_days, now)).await {
                Ok(Ok(n)) => tracing::info!(audit_days, entries = n, "audit retention applied"),
                Ok(Err(e)) => tracing::error!(error = %e, "audit retention failed"),
                Err(e) => tracing::error!(error = %e, "audit retention task panicked"),
            }
        }
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

/// How often exports retention looks for old bulk export jobs.
pub const EXPORTS_INTERVAL: Duration = Duration::from_secs(600);

/// Deletes bulk export jobs (their files) older than `max_age` every
/// [`EXPORTS_INTERVAL`] until `shutdown` is cancelled.
pub async fn run_exports(
    exports: std::sync::Arc<hub_transport::export::Exports>,
    max_age: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let n = exports.expire(max_age);
        if n > 0 {
            tracing::info!(jobs = n, "exports retention applied");
        }
        tokio::select! {
            _ = tokio::time::sleep(EXPORTS_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
