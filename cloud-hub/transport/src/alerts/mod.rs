//! Alerts: physiological limits, NEWS2 bands and technical conditions,
//! with a lifecycle (active → acknowledged → resolved), escalation, an
//! audit trail of every transition and a live stream.
//!
//! [`engine`] decides (sans-IO); this module feeds it from ingest and the
//! clock, evaluates against the stored alerts and stores their transitions
//! through `hub_storage::AlertStore` (one evaluation at a time across every
//! hub on the database, so an alert is raised, escalated and stored once
//! whichever replica saw the batch), and serves the store's change feed,
//! which carries every hub's changes, as the live stream ([`api`]). See
//! docs/alerts.md.

pub mod api;

pub use hub_domain::alerts::{LIVE_WINDOW_US, LiveValue, engine, rules};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use shared_protocol::v1::{Batch, QualityFlag, TechnicalKind};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::association::PatientId;
use crate::config_error::ConfigError;
use crate::storage::{StoreError, StoredOverride, Tracking};
use crate::store::Store;
use engine::{Alert, Change, Engine, EngineConfig, LinkEvent, News2Band, Technical, ValueInput};
use rules::{Priority, RuleOverride, RuleSet};

/// `[alerts]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Run the alert engine (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// An alert still unacknowledged this long after it was raised is
    /// escalated (default 120 s).
    #[serde(default = "default_escalate")]
    pub escalate_after_s: u64,
    /// No value from a device for this long: technical alert "data stale"
    /// (default 60 s).
    #[serde(default = "default_stale")]
    pub stale_after_s: u64,
    /// No batch from a gateway for this long: "gateway offline" (default
    /// 120 s).
    #[serde(default = "default_offline")]
    pub gateway_offline_after_s: u64,
    /// Values older than this when they arrive (a drained backlog) raise
    /// no alerts (default 300 s).
    #[serde(default = "default_max_age")]
    pub max_value_age_s: u64,
    /// How often the clock is checked (default 1000 ms).
    #[serde(default = "default_tick")]
    pub tick_ms: u64,
    /// Changes to the default rules, global or per ward.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleOverride>,
}

fn yes() -> bool {
    true
}
fn default_escalate() -> u64 {
    120
}
fn default_stale() -> u64 {
    60
}
fn default_offline() -> u64 {
    120
}
fn default_max_age() -> u64 {
    300
}
fn default_tick() -> u64 {
    1000
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            escalate_after_s: default_escalate(),
            stale_after_s: default_stale(),
            gateway_offline_after_s: default_offline(),
            max_value_age_s: default_max_age(),
            tick_ms: default_tick(),
            rules: vec![],
        }
    }
}

impl AlertsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let day = 86_400;
        for (field, v, lo, hi) in [
            ("alerts.escalate_after_s", self.escalate_after_s, 1, day),
            ("alerts.stale_after_s", self.stale_after_s, 1, day),
            (
                "alerts.gateway_offline_after_s",
                self.gateway_offline_after_s,
                1,
                day,
            ),
            ("alerts.max_value_age_s", self.max_value_age_s, 1, day),
            ("alerts.tick_ms", self.tick_ms, 50, 60_000),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(ConfigError::Invalid {
                    field: field.into(),
                    message: format!("must be between {lo} and {hi}"),
                });
            }
        }
        self.rule_set().map(|_| ())
    }

    pub fn rule_set(&self) -> Result<RuleSet, ConfigError> {
        RuleSet::from_config(&self.rules).map_err(|(field, message)| ConfigError::Invalid {
            field: format!("alerts.{field}"),
            message,
        })
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            escalate_after_s: self.escalate_after_s,
            stale_after_s: self.stale_after_s,
            gateway_offline_after_s: self.gateway_offline_after_s,
            max_value_age_s: self.max_value_age_s,
        }
    }
}

/// An alert change as the live stream and the API show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub transition: engine::Transition,
    pub alert: Alert,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

impl From<Change> for Event {
    fn from(c: Change) -> Self {
        Self {
            transition: c.transition,
            alert: c.alert,
            actor: c.actor,
        }
    }
}

/// Errors of the alert service.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Ack(#[from] engine::AckError),
    #[error("invalid `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("the alert engine is disabled (`alerts.enabled = false`)")]
    Disabled,
}

impl From<StoreError> for AlertError {
    fn from(e: StoreError) -> Self {
        AlertError::Store(e)
    }
}

/// The alert service: the engine and its store (whose change feed is the
/// live stream).
pub struct AlertService {
    engine: Mutex<Engine>,
    store: Store,
    config: AlertsConfig,
    /// The configured rules, before patient overrides.
    base: RuleSet,
    /// The patient overrides the engine's rules were last built with
    /// (as stored: another hub may change them).
    overrides: Mutex<Vec<StoredOverride>>,
}

/// `base` with the stored patient overrides applied.
fn with_overrides(base: &RuleSet, stored: &[StoredOverride]) -> RuleSet {
    let mut rules = base.clone();
    let mut overrides: HashMap<&str, Vec<RuleOverride>> = HashMap::new();
    for o in stored {
        match serde_json::from_str::<RuleOverride>(&o.body) {
            Ok(r) => overrides.entry(o.patient.as_str()).or_default().push(r),
            Err(e) => {
                tracing::error!(error = %e, "stored alert rule override unreadable; ignored")
            }
        }
    }
    for (p, o) in overrides {
        rules.set_patient(p, o);
    }
    rules
}

impl std::fmt::Debug for AlertService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertService").finish_non_exhaustive()
    }
}

pub use crate::storage::Transitioned;

/// Filters of the alert list (`limit` is clamped to 1..=1000).
pub type ListFilter = crate::storage::AlertFilter;

impl AlertService {
    /// Loads the open alerts and patient overrides from the store. `None`
    /// when disabled.
    pub fn start(store: &Store, config: &AlertsConfig) -> Result<Option<Arc<Self>>, AlertError> {
        if !config.enabled {
            return Ok(None);
        }
        let loaded = store.load_alerts()?;
        let base = config.rule_set().map_err(|e| AlertError::Invalid {
            field: "alerts.rule".into(),
            message: e.to_string(),
        })?;
        let (open, next_id) = (loaded.open, loaded.next_id);
        let rules = with_overrides(&base, &loaded.overrides);
        tracing::info!(open = open.len(), "alert engine started");
        // The change feed from now on (on PostgreSQL: its listener starts).
        drop(store.alert_changes());
        Ok(Some(Arc::new(Self {
            engine: Mutex::new(Engine::new(config.engine_config(), rules, next_id, open)),
            store: store.clone(),
            config: config.clone(),
            base,
            overrides: Mutex::new(loaded.overrides),
        })))
    }

    pub fn config(&self) -> &AlertsConfig {
        &self.config
    }

    /// A receiver of every change from now on, made by any hub on the
    /// database (the store's change feed).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.store.alert_changes()
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `decide` on the engine synchronized with the stored open
    /// alerts and tracked state (`tracking`), inside the store's
    /// evaluation transaction (serialized with every other hub's), and
    /// stores its changes and the tracked state there.
    fn evaluate(
        &self,
        now_us: i64,
        tracking: crate::storage::Tracking<'_>,
        mut decide: impl FnMut(&mut Engine) -> Vec<Change>,
    ) -> Result<Vec<Change>, AlertError> {
        let mut run = |ev: crate::storage::Evaluation| {
            let mut e = self.engine();
            e.sync(ev.open, ev.next_id, ev.tracked);
            // Patient overrides another hub changed since.
            if let Some(stored) = ev.overrides {
                let mut seen = self.overrides.lock().unwrap_or_else(|p| p.into_inner());
                if *seen != stored {
                    e.set_rules(with_overrides(&self.base, &stored));
                    *seen = stored;
                }
            }
            let changes = decide(&mut e);
            (changes, e.tracked())
        };
        let changes = self.store.evaluate_alerts(now_us, tracking, &mut run)?;
        for c in &changes {
            // No PHI in logs: ids and codes only.
            tracing::info!(
                alert_id = c.alert.id,
                code = %c.alert.code,
                priority = c.alert.priority.as_str(),
                transition = c.transition.as_str(),
                "alert"
            );
        }
        Ok(changes)
    }

    /// The ward of a patient's bed now, if any.
    fn ward_of(
        &self,
        patient: &PatientId,
        now_us: i64,
        beds: &HashMap<String, String>,
    ) -> Option<String> {
        let bed = self.store.bed_of(patient, now_us).ok().flatten()?;
        beds.get(&bed).cloned()
    }

    /// Feeds what a stored batch brought: the gateway is online, device
    /// link events, buffer overflows, values; then the NEWS2 of every
    /// patient with a new scored value. Blocking (database).
    pub fn on_batch(
        &self,
        gateway_id: &str,
        events: &BatchEvents,
        live: &[LiveValue],
        now_us: i64,
    ) -> Result<(), AlertError> {
        let beds: HashMap<String, String> = if live.iter().any(|v| v.patient.is_some()) {
            self.store
                .list_beds()
                .map(|b| b.into_iter().map(|b| (b.id, b.ward)).collect())
                .unwrap_or_default()
        } else {
            HashMap::new()
        };
        let mut wards: HashMap<PatientId, Option<String>> = HashMap::new();
        for v in live {
            if let Some(p) = &v.patient {
                if !wards.contains_key(p) {
                    let w = self.ward_of(p, now_us, &beds);
                    wards.insert(p.clone(), w);
                }
            }
        }
        self.evaluate(now_us, Tracking::Gateway(gateway_id), |e| {
            let mut changes = Vec::new();
            changes.extend(e.gateway_seen(gateway_id, now_us));
            for (kind, time_us) in &events.gateway {
                changes.extend(e.gateway_event(*kind, gateway_id, *time_us, now_us));
            }
            let patient_of = |device: &str| {
                live.iter()
                    .rev()
                    .find(|v| v.device_id == device)
                    .and_then(|v| v.patient.as_ref().map(|p| p.value.clone()))
            };
            for (device, kind, time_us) in &events.links {
                let ev = match kind {
                    TechnicalKind::Connected => LinkEvent::Connected,
                    TechnicalKind::Disconnected | TechnicalKind::Silent => LinkEvent::Lost,
                    _ => continue,
                };
                changes.extend(e.link(
                    gateway_id,
                    device,
                    patient_of(device),
                    ev,
                    *time_us,
                    now_us,
                ));
            }
            for v in live {
                let has = |f: QualityFlag| v.flags.contains(&(f as i32));
                let input = ValueInput {
                    patient: v.patient.as_ref().map(|p| p.value.clone()),
                    ward: v
                        .patient
                        .as_ref()
                        .and_then(|p| wards.get(p).cloned().flatten()),
                    gateway_id: gateway_id.into(),
                    device_id: v.device_id.clone(),
                    parameter: v.parameter,
                    value: v.value,
                    usable: v.value.is_some(),
                    sensor_off: has(QualityFlag::SensorOff),
                    poor_signal: has(QualityFlag::LowSignal) || has(QualityFlag::Interference),
                    time_us: v.time_us,
                };
                changes.extend(e.value(&input, now_us));
            }
            changes
        })?;
        Ok(())
    }

    /// Values older than this (relative to the hub clock) when they arrive
    /// raise no alerts and trigger no score evaluation.
    pub fn max_value_age_us(&self) -> i64 {
        self.config.max_value_age_s as i64 * 1_000_000
    }

    /// NEWS2 band changes from a patient's freshly computed scores (the
    /// after-ingest step computes them once for alerts and score history).
    pub fn on_scores(
        &self,
        report: &hub_domain::early_warning::ScoreReport,
        now_us: i64,
    ) -> Result<(), AlertError> {
        let Some(n) = report.news2 else {
            return Ok(());
        };
        let band = match n.risk {
            crate::scores::News2Risk::High => News2Band::High,
            crate::scores::News2Risk::Medium => News2Band::Medium,
            crate::scores::News2Risk::LowMedium => News2Band::SingleParameter3,
            crate::scores::News2Risk::Low => News2Band::Low,
        };
        self.evaluate(now_us, Tracking::Nothing, |e| {
            e.news2(&report.patient, n.total, band, now_us, now_us)
        })?;
        Ok(())
    }

    /// The clock: stale data, offline gateways, escalation.
    pub fn tick(&self, now_us: i64) -> Result<(), AlertError> {
        self.evaluate(now_us, Tracking::Everything, |e| e.tick(now_us))?;
        Ok(())
    }

    /// Acknowledges an open alert.
    pub fn acknowledge(&self, id: i64, actor: &str, now_us: i64) -> Result<Alert, AlertError> {
        let mut refused = None;
        let changes = self.evaluate(now_us, Tracking::Nothing, |e| {
            match e.acknowledge(id, actor, now_us) {
                Ok(c) => c,
                Err(r) => {
                    refused = Some(r);
                    vec![]
                }
            }
        })?;
        if let Some(r) = refused {
            return Err(r.into());
        }
        Ok(changes[0].alert.clone())
    }

    /// Alerts, newest first.
    pub fn list(&self, f: &ListFilter) -> Result<Vec<Alert>, AlertError> {
        let f = ListFilter {
            limit: f.limit.clamp(1, 1000),
            ..f.clone()
        };
        Ok(self.store.list_alerts(&f)?)
    }

    /// One alert with its transitions (time, transition, actor).
    pub fn get(&self, id: i64) -> Result<Option<(Alert, Vec<Transitioned>)>, AlertError> {
        Ok(self.store.alert(id)?)
    }

    /// The rules in force for a patient (the ward of their bed now).
    pub fn rules_for(&self, patient: &str, now_us: i64) -> Vec<rules::Rule> {
        let ward = self.store.occupancy(now_us).ok().and_then(|beds| {
            beds.into_iter()
                .find(|b| b.patient.as_ref().is_some_and(|p| p.value == patient))
                .map(|b| b.bed.ward)
        });
        self.engine().rules().effective(patient, ward.as_deref())
    }

    /// Replaces a patient's rule overrides (stored, then in force).
    pub fn set_patient_rules(
        &self,
        patient: &str,
        overrides: Vec<RuleOverride>,
        actor: &str,
        now_us: i64,
    ) -> Result<(), AlertError> {
        for (i, o) in overrides.iter().enumerate() {
            if o.ward.is_some() {
                return Err(AlertError::Invalid {
                    field: format!("[{i}].ward"),
                    message: "ward overrides are set in the hub config".into(),
                });
            }
            let base = self
                .engine()
                .rules()
                .global()
                .iter()
                .find(|r| r.id == o.id)
                .cloned();
            o.apply(base.as_ref())
                .map_err(|(field, message)| AlertError::Invalid {
                    field: format!("[{i}].{field}"),
                    message,
                })?;
        }
        let stored: Vec<(String, String)> = overrides
            .iter()
            .map(|o| (o.id.clone(), serde_json::to_string(o).unwrap_or_default()))
            .collect();
        self.store
            .set_alert_overrides(patient, &stored, actor, now_us)?;
        let mut e = self.engine();
        let mut set = e.rules().clone();
        set.set_patient(patient, overrides);
        e.set_rules(set);
        Ok(())
    }

    pub fn patient_overrides(&self, patient: &str) -> Vec<RuleOverride> {
        self.engine().rules().patient_overrides(patient).to_vec()
    }

    /// A patient's open alerts: how many and the highest priority.
    pub fn open_for_patient(&self, patient: &str) -> (usize, Option<Priority>) {
        let e = self.engine();
        let open: Vec<&Alert> = e
            .open_alerts()
            .filter(|a| a.patient.as_deref() == Some(patient))
            .collect();
        (open.len(), open.iter().map(|a| a.priority).max())
    }
}

/// The technical content of a batch, taken before it is stored.
#[derive(Debug, Clone, Default)]
pub struct BatchEvents {
    /// (device id, kind, time) of device technical readings.
    pub links: Vec<(String, TechnicalKind, i64)>,
    /// (kind, time) of gateway events that raise a technical alert
    /// (buffer overflow, key loss, storage failure).
    pub gateway: Vec<(TechnicalKind, i64)>,
}

impl BatchEvents {
    pub fn of(batch: &Batch) -> Self {
        let mut ev = Self::default();
        for d in &batch.devices {
            let Some(dev) = d.device.as_ref().filter(|i| !i.device_id.is_empty()) else {
                continue;
            };
            for t in &d.technical {
                ev.links.push((dev.device_id.clone(), t.kind(), t.time_us));
            }
        }
        for g in &batch.gateway_events {
            if Technical::of_gateway_event(g.kind()).is_some() {
                ev.gateway.push((g.kind(), g.time_us));
            }
        }
        ev
    }
}

/// Runs the clock until `shutdown` is cancelled.
pub async fn run_clock(service: Arc<AlertService>, shutdown: CancellationToken) {
    let every = std::time::Duration::from_millis(service.config.tick_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let s = service.clone();
        let r = tokio::task::spawn_blocking(move || s.tick(crate::store::now_us())).await;
        match r {
            Ok(Err(e)) => tracing::error!(error = %e, "alert clock failed"),
            Err(e) => tracing::error!(error = %e, "alert clock task failed"),
            Ok(Ok(())) => {}
        }
    }
}
