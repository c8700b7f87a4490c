//! Alerts: the engine's alerts with the audit trail of their transitions,
//! and per-patient rule overrides. The engine (`hub_domain::alerts`)
//! decides; the store persists and loads.

use hub_domain::alerts::engine::{Alert, Change};

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
    /// single writer), `evaluate` gets the open alerts as stored now and
    /// the id the next new alert gets, and the changes it returns are
    /// stored (as [`Self::commit_alerts`]) and announced on the change feed
    /// ([`Self::alert_changes`]) when the transaction commits. Returns them.
    fn evaluate_alerts(
        &self,
        now_us: i64,
        evaluate: &mut dyn FnMut(Vec<Alert>, i64) -> Vec<Change>,
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
