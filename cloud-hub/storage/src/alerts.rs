//! Alerts: the engine's alerts with the audit trail of their transitions,
//! and per-patient rule overrides. The engine (`hub_domain::alerts`)
//! decides; the store persists and loads.

use hub_domain::alerts::engine::{Alert, Change, Tracked};

use crate::StoreError;

/// A patient's rule override as stored: the rule id and the override's
/// JSON (written and read by the hub's alert service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOverride {
    pub patient: String,
    pub rule_id: String,
    pub body: String,
}

/// What the alert engine starts from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertsLoaded {
    /// Alerts not resolved.
    pub open: Vec<Alert>,
    /// The id the next new alert gets (one more than the highest stored).
    pub next_id: i64,
    /// Every patient's rule overrides, by patient then rule id.
    pub overrides: Vec<StoredOverride>,
}

/// Filters of an alert list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertFilter {
    /// Only open (active or acknowledged) alerts.
    pub open: bool,
    pub patient: Option<String>,
    /// Most alerts returned (the newest).
    pub limit: u32,
}

/// Which of the engine's tracked state ([`Tracked`]) an evaluation reads
/// and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking<'a> {
    /// None (acknowledgements, scores).
    Nothing,
    /// The pending conditions, and this gateway's devices and last batch
    /// (a batch from it).
    Gateway(&'a str),
    /// All of it (the clock).
    Everything,
}

/// What an evaluation starts from, as stored now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    /// Alerts not resolved.
    pub open: Vec<Alert>,
    /// The id the next new alert gets.
    pub next_id: i64,
    /// The tracked state asked for (`None` for [`Tracking::Nothing`]).
    pub tracked: Option<Tracked>,
    /// Every patient's rule overrides as stored now, by patient then rule
    /// id (`None` for [`Tracking::Nothing`]).
    pub overrides: Option<Vec<StoredOverride>>,
}

/// What an evaluation changed in the tracked state: the rows a store
/// writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackedChanges {
    /// Pending conditions gone (keys).
    pub pending_gone: Vec<String>,
    /// Pending conditions new or changed (key, since).
    pub pending: Vec<(String, i64)>,
    /// Devices new or changed: (gateway, device, last value time, patient).
    pub devices: Vec<(String, String, i64, Option<String>)>,
    /// Gateways new or changed: (gateway, last batch time).
    pub gateways: Vec<(String, i64)>,
}

impl TrackedChanges {
    /// The rows to write to go from `before` (as loaded) to `after`.
    pub fn between(before: &Tracked, after: &Tracked) -> Self {
        Self {
            pending_gone: before
                .pending
                .keys()
                .filter(|k| !after.pending.contains_key(*k))
                .cloned()
                .collect(),
            pending: after
                .pending
                .iter()
                .filter(|(k, v)| before.pending.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            devices: after
                .devices
                .iter()
                .filter(|(k, v)| before.devices.get(*k) != Some(*v))
                .map(|((g, d), (t, p))| (g.clone(), d.clone(), *t, p.clone()))
                .collect(),
            gateways: after
                .gateways
                .iter()
                .filter(|(k, v)| before.gateways.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending_gone.is_empty()
            && self.pending.is_empty()
            && self.devices.is_empty()
            && self.gateways.is_empty()
    }
}

/// A stored transition: time (UTC µs), transition, actor.
pub type Transitioned = (i64, String, Option<String>);

/// Alerts, their transitions and patient rule overrides.
pub trait AlertStore {
    fn load_alerts(&self) -> Result<AlertsLoaded, StoreError>;
    /// Stores each change's alert (inserted or replaced by id) and its
    /// transition at `now_us`, all in one transaction.
    fn commit_alerts(&self, changes: &[Change], now_us: i64) -> Result<(), StoreError>;
    /// Alerts, newest (highest id) first.
    /// Evaluates alerts against the stored state, once across every hub
    /// on the database: in one transaction serialized with every other
    /// evaluation (PostgreSQL: a transaction advisory lock; SQLite: its
    /// single writer), `evaluate` gets the open alerts as stored now, the
    /// id the next new alert gets and the tracked state `tracking` names;
    /// the changes it returns are stored (as [`Self::commit_alerts`]) with
    /// what changed in that tracked state ([`TrackedChanges`]), and
    /// announced on the change feed ([`Self::alert_changes`]) when the
    /// transaction commits. Returns the changes.
    fn evaluate_alerts(
        &self,
        now_us: i64,
        tracking: Tracking<'_>,
        evaluate: &mut dyn FnMut(Evaluation) -> (Vec<Change>, Tracked),
    ) -> Result<Vec<Change>, StoreError>;
    /// The change feed: every alert change committed from now on by any
    /// hub on this database (PostgreSQL: LISTEN/NOTIFY, re-read after a
    /// reconnect; SQLite: in process), in commit order. A lagging receiver
    /// loses the oldest changes (`RecvError::Lagged`).
    fn alert_changes(&self) -> tokio::sync::broadcast::Receiver<Change>;
    fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>, StoreError>;
    /// One alert with its transitions, oldest first.
    fn alert(&self, id: i64) -> Result<Option<(Alert, Vec<Transitioned>)>, StoreError>;
    /// Replaces `patient`'s rule overrides (rule id, JSON body), in one
    /// transaction.
    fn set_alert_overrides(
        &self,
        patient: &str,
        overrides: &[(String, String)],
        actor: &str,
        now_us: i64,
    ) -> Result<(), StoreError>;
}
