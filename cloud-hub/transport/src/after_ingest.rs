//! What runs after a batch is stored (and acknowledged as durable): the
//! consumers of what ingest newly stored, registered once by the
//! composition root (`cloud-hub`'s `Hub`), each switchable on its own.
//!
//! - **Alerts** (`[alerts] enabled`): values, link and gateway events into
//!   the engine ([`crate::alerts::AlertService::on_batch`]), then NEWS2
//!   band changes from the fresh scores.
//! - **Score history** (`[scores] history`): the NEWS2/qSOFA/MEWS results
//!   of each patient with a fresh usable value, under the history's write
//!   rule ([`crate::score_history::record`]).
//!
//! Both consumers read the same score reports: each patient's scores are
//! computed once per batch, only when a consumer wants them. Chart buckets
//! are not a consumer: they are written inside the ingest transaction
//! (atomic with the rows they sum), see `hub_domain::ingest::outcome`.
//! A consumer's failure is logged and never fails the ingest.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::alerts::{AlertService, BatchEvents, LiveValue};
use crate::early_warning::{ScoresConfig, ScoresError};
use crate::store::Store;

/// Values older than this when they arrive trigger no score evaluation
/// (`[alerts] max_value_age_s`, which also bounds alerts).
fn fresh(v: &LiveValue, now_us: i64, max_age_us: i64) -> bool {
    v.value.is_some() && now_us - v.time_us <= max_age_us
}

/// The after-ingest consumers of one hub.
#[derive(Debug, Clone)]
pub struct AfterIngest {
    store: Store,
    alerts: Option<Arc<AlertService>>,
    scores: ScoresConfig,
    max_value_age_us: i64,
}

impl AfterIngest {
    pub fn new(
        store: Store,
        alerts: Option<Arc<AlertService>>,
        scores: ScoresConfig,
        max_value_age_s: u64,
    ) -> Self {
        Self {
            store,
            alerts,
            scores,
            max_value_age_us: i64::try_from(max_value_age_s)
                .unwrap_or(i64::MAX / 1_000_000)
                .saturating_mul(1_000_000),
        }
    }

    /// Whether any consumer runs (else ingest skips the step entirely).
    pub fn is_active(&self) -> bool {
        self.alerts.is_some() || self.scores.history
    }

    /// Runs the consumers for what a batch of `gateway_id` newly stored.
    /// Blocking: call it from `spawn_blocking`.
    pub fn run(&self, gateway_id: &str, events: &BatchEvents, live: &[LiveValue], now_us: i64) {
        if !self.is_active() {
            return;
        }
        if let Some(alerts) = &self.alerts
            && let Err(e) = alerts.on_batch(gateway_id, events, live, now_us)
        {
            tracing::error!(error = %e, "alert evaluation failed");
        }
        let patients: BTreeSet<&str> = live
            .iter()
            .filter(|v| fresh(v, now_us, self.max_value_age_us))
            .filter_map(|v| v.patient.as_ref().map(|p| p.value.as_str()))
            .collect();
        for patient in patients {
            let report =
                match crate::early_warning::compute(&self.store, patient, &self.scores, now_us) {
                    Ok(r) => r,
                    Err(ScoresError::UnknownPatient) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "scores after ingest failed");
                        continue;
                    }
                };
            if let Some(alerts) = &self.alerts
                && let Err(e) = alerts.on_scores(&report, now_us)
            {
                tracing::error!(error = %e, "NEWS2 alert evaluation failed");
            }
            if self.scores.history
                && let Err(e) = crate::score_history::record(&self.store, &report)
            {
                tracing::warn!(error = %e, "score history not written");
            }
        }
    }
}
