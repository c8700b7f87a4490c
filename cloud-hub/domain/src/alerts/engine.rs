//! The alert engine, sans-IO: inputs (values, device and gateway events,
//! scores, the clock) in, transitions out. No database, no clock, no
//! channels: [`super::AlertService`] feeds it and stores what it says.
//!
//! Behaviour (see docs/alerts.md):
//! - **Physiological** rules compare a valid value in the chart unit with a
//!   limit (`below`: value < limit, `above`: value > limit). The condition
//!   must hold for `delay_s` of reading time (every valid value in between
//!   also meeting it) before the alert is raised; it resolves only when a
//!   valid value is back past the limit by `hysteresis`. Invalid or
//!   questionable values never raise, hold or resolve an alert.
//! - **Score** alerts follow the NEWS2 clinical-risk band of each new score.
//! - **Technical** alerts: device disconnected/silent (technical readings),
//!   sensor off and poor signal (reading flags), data stale (no value from a
//!   device for `stale_after_s`), gateway offline (no batch for
//!   `gateway_offline_after_s`), edge buffer overflow (gateway event;
//!   resolved by acknowledging it).
//! - Lifecycle: active → acknowledged → resolved; an alert still
//!   unacknowledged `escalate_after_s` after it was raised is escalated once.
//!   A resolved alert is never reopened: the condition coming back raises a
//!   new alert.
//! - Values older than `max_value_age_s` (a backlog delivered after an
//!   outage) are stored and charted but neither raise nor resolve alerts.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use shared_protocol::v1::TechnicalKind;

use super::rules::{Direction, Priority, Rule};
use crate::early_warning::Parameter;

/// Seconds → µs.
const S: i64 = 1_000_000;

/// Engine settings (from `[alerts]`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub escalate_after_s: u64,
    pub stale_after_s: u64,
    pub gateway_offline_after_s: u64,
    pub max_value_age_s: u64,
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Physiological,
    Score,
    Technical,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Physiological => "physiological",
            Self::Score => "score",
            Self::Technical => "technical",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Physiological, Self::Score, Self::Technical]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Active,
    Acknowledged,
    Resolved,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Acknowledged => "acknowledged",
            Self::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Acknowledged, Self::Resolved]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Technical conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Technical {
    DeviceDisconnected,
    SensorOff,
    PoorSignal,
    DataStale,
    GatewayOffline,
    EdgeBufferOverflow,
    EdgeBufferKeyLost,
    EdgeBufferWriteFailed,
}

impl Technical {
    pub fn code(self) -> &'static str {
        match self {
            Self::DeviceDisconnected => "device-disconnected",
            Self::SensorOff => "sensor-off",
            Self::PoorSignal => "poor-signal",
            Self::DataStale => "data-stale",
            Self::GatewayOffline => "gateway-offline",
            Self::EdgeBufferOverflow => "edge-buffer-overflow",
            Self::EdgeBufferKeyLost => "edge-buffer-key-lost",
            Self::EdgeBufferWriteFailed => "edge-buffer-write-failed",
        }
    }

    /// The technical alert a gateway event raises (None: no alert). These
    /// report something that happened, with no event that clears it, so
    /// acknowledging the alert resolves it.
    pub fn of_gateway_event(kind: TechnicalKind) -> Option<Self> {
        match kind {
            TechnicalKind::BufferOverflow => Some(Self::EdgeBufferOverflow),
            TechnicalKind::BufferKeyLost => Some(Self::EdgeBufferKeyLost),
            TechnicalKind::BufferWriteFailed => Some(Self::EdgeBufferWriteFailed),
            _ => None,
        }
    }

    /// Priorities of technical alerts (IEC 60601-1-8 allows technical
    /// alarm conditions at any priority): a monitored patient whose data no
    /// longer arrives is medium; a degraded signal is low.
    pub fn priority(self) -> Priority {
        match self {
            Self::PoorSignal => Priority::Low,
            _ => Priority::Medium,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::DeviceDisconnected => "Device disconnected or not answering",
            Self::SensorOff => "Sensor off",
            Self::PoorSignal => "Poor signal quality",
            Self::DataStale => "No data from the device",
            Self::GatewayOffline => "Gateway offline",
            Self::EdgeBufferOverflow => "Gateway buffer overflowed: oldest readings dropped",
            Self::EdgeBufferKeyLost => {
                "Gateway buffer key lost: stored readings cannot be sent until the key is restored"
            }
            Self::EdgeBufferWriteFailed => {
                "Gateway storage failed for a while (disk full or I/O error): readings may have been refused"
            }
        }
    }
}

/// An alert as the engine keeps it (and the service stores it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub id: i64,
    pub kind: Kind,
    /// Rule id (physiological), `news2-…` (score) or the technical code.
    pub code: String,
    pub priority: Priority,
    pub state: State,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The value that raised it and its unit (physiological, score).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// When the condition began (reading or event time, UTC µs).
    pub condition_since_us: i64,
    pub raised_us: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged_us: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalated_us: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_us: Option<i64>,
}

impl Alert {
    /// The identity of the condition: at most one open alert per key.
    pub fn key(&self) -> String {
        let who = |o: &Option<String>| o.clone().unwrap_or_default();
        match self.kind {
            Kind::Physiological | Kind::Score => {
                format!(
                    "{}|{}|{}",
                    self.kind.as_str(),
                    who(&self.patient),
                    self.code
                )
            }
            Kind::Technical => format!(
                "technical|{}|{}|{}",
                who(&self.gateway_id),
                who(&self.device_id),
                self.code
            ),
        }
    }
}

/// A change the engine made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transition {
    Raised,
    Acknowledged,
    Escalated,
    Resolved,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raised => "raised",
            Self::Acknowledged => "acknowledged",
            Self::Escalated => "escalated",
            Self::Resolved => "resolved",
        }
    }
}

/// One output: the transition and the alert after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub transition: Transition,
    pub alert: Alert,
    /// Who caused it (acknowledgement), else the engine.
    pub actor: Option<String>,
}

/// A valid or invalid value from a device, in the chart unit of its
/// parameter.
#[derive(Debug, Clone)]
pub struct ValueInput {
    pub patient: Option<String>,
    pub ward: Option<String>,
    pub gateway_id: String,
    pub device_id: String,
    pub parameter: Parameter,
    /// `None` when the device sent no value.
    pub value: Option<f64>,
    /// Device validity "valid" and the value within the metric's possible
    /// range: the only values alerts look at.
    pub usable: bool,
    pub sensor_off: bool,
    pub poor_signal: bool,
    pub time_us: i64,
}

/// A device-level technical reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    Connected,
    Lost,
}

/// The NEWS2 result of a new score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum News2Band {
    Low,
    /// A score of 3 in a single parameter (RCP "low–medium").
    SingleParameter3,
    Medium,
    High,
}

/// What the engine keeps between inputs besides its open alerts: stored
/// by the hub so that every replica evaluates from the same state (see
/// [`Engine::sync`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tracked {
    /// Conditions met but not yet for their delay: alert key → since (µs).
    pub pending: BTreeMap<String, i64>,
    /// Per (gateway, device): the newest value's time and its patient.
    pub devices: BTreeMap<(String, String), (i64, Option<String>)>,
    /// Per gateway: when its last batch arrived.
    pub gateways: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    since_us: i64,
}

/// What the engine knows of a device for technical alerts.
#[derive(Debug, Clone)]
struct DeviceSeen {
    last_value_us: i64,
    patient: Option<String>,
}

/// The engine. Rules are chosen per value: a patient's own override of a
/// rule first, then the ward's, then the global one (see
/// [`super::rules::RuleSet`]).
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    rules: super::rules::RuleSet,
    next_id: i64,
    /// Conditions met but not yet for their delay, by alert key.
    pending: HashMap<String, Pending>,
    /// Open (active or acknowledged) alerts by key.
    open: HashMap<String, Alert>,
    devices: HashMap<(String, String), DeviceSeen>,
    gateways: HashMap<String, i64>,
}

impl Engine {
    /// `open` are the alerts still open in the store (after a restart):
    /// they keep their ids and are resolved by the same rules. Conditions
    /// that were waiting for their delay start again.
    pub fn new(
        cfg: EngineConfig,
        rules: super::rules::RuleSet,
        next_id: i64,
        open: Vec<Alert>,
    ) -> Self {
        Self {
            cfg,
            rules,
            next_id,
            pending: HashMap::new(),
            open: open.into_iter().map(|a| (a.key(), a)).collect(),
            devices: HashMap::new(),
            gateways: HashMap::new(),
        }
    }

    pub fn rules(&self) -> &super::rules::RuleSet {
        &self.rules
    }

    pub fn set_rules(&mut self, rules: super::rules::RuleSet) {
        self.rules = rules;
    }

    /// Replaces the open alerts, the next id and the tracked state with
    /// the stored ones (an evaluation against the database, where other
    /// hubs change them too). `tracked: None` keeps the engine's own.
    pub fn sync(&mut self, open: Vec<Alert>, next_id: i64, tracked: Option<Tracked>) {
        self.open = open.into_iter().map(|a| (a.key(), a)).collect();
        self.next_id = next_id;
        if let Some(t) = tracked {
            self.pending = t
                .pending
                .into_iter()
                .map(|(k, since_us)| (k, Pending { since_us }))
                .collect();
            self.devices = t
                .devices
                .into_iter()
                .map(|(k, (last_value_us, patient))| {
                    (
                        k,
                        DeviceSeen {
                            last_value_us,
                            patient,
                        },
                    )
                })
                .collect();
            self.gateways = t.gateways.into_iter().collect();
        }
    }

    /// The tracked state now (to store after an evaluation).
    pub fn tracked(&self) -> Tracked {
        Tracked {
            pending: self
                .pending
                .iter()
                .map(|(k, p)| (k.clone(), p.since_us))
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|(k, d)| (k.clone(), (d.last_value_us, d.patient.clone())))
                .collect(),
            gateways: self.gateways.iter().map(|(k, t)| (k.clone(), *t)).collect(),
        }
    }

    /// Open alerts (active or acknowledged).
    pub fn open_alerts(&self) -> impl Iterator<Item = &Alert> {
        self.open.values()
    }

    fn raise(&mut self, mut a: Alert, out: &mut Vec<Change>) {
        a.id = self.next_id;
        self.next_id += 1;
        self.open.insert(a.key(), a.clone());
        out.push(Change {
            transition: Transition::Raised,
            alert: a,
            actor: None,
        });
    }

    fn resolve(&mut self, key: &str, now_us: i64, out: &mut Vec<Change>) {
        if let Some(mut a) = self.open.remove(key) {
            a.state = State::Resolved;
            a.resolved_us = Some(now_us);
            out.push(Change {
                transition: Transition::Resolved,
                alert: a,
                actor: None,
            });
        }
    }

    fn technical(
        kind: Technical,
        gateway_id: &str,
        device_id: Option<&str>,
        patient: Option<String>,
        since_us: i64,
        now_us: i64,
    ) -> Alert {
        Alert {
            id: 0,
            kind: Kind::Technical,
            code: kind.code().into(),
            priority: kind.priority(),
            state: State::Active,
            message: kind.message().into(),
            patient,
            gateway_id: Some(gateway_id.into()),
            device_id: device_id.map(Into::into),
            value: None,
            unit: None,
            condition_since_us: since_us,
            raised_us: now_us,
            acknowledged_us: None,
            acknowledged_by: None,
            escalated_us: None,
            resolved_us: None,
        }
    }

    /// Raises the technical alert unless one with its key is open.
    fn technical_on(&mut self, a: Alert, out: &mut Vec<Change>) {
        if !self.open.contains_key(&a.key()) {
            self.raise(a, out);
        }
    }

    fn technical_key(kind: Technical, gateway_id: &str, device_id: Option<&str>) -> String {
        format!(
            "technical|{gateway_id}|{}|{}",
            device_id.unwrap_or_default(),
            kind.code()
        )
    }

    /// A batch arrived from a gateway (it is online).
    pub fn gateway_seen(&mut self, gateway_id: &str, now_us: i64) -> Vec<Change> {
        let mut out = vec![];
        self.gateways.insert(gateway_id.into(), now_us);
        let key = Self::technical_key(Technical::GatewayOffline, gateway_id, None);
        self.resolve(&key, now_us, &mut out);
        out
    }

    /// The gateway's buffer dropped readings (overflow policy).
    pub fn buffer_overflow(&mut self, gateway_id: &str, time_us: i64, now_us: i64) -> Vec<Change> {
        self.gateway_event(TechnicalKind::BufferOverflow, gateway_id, time_us, now_us)
    }

    /// A gateway event (`Batch.gateway_events`): raises its technical alert
    /// ([`Technical::of_gateway_event`]); other kinds raise nothing.
    pub fn gateway_event(
        &mut self,
        kind: TechnicalKind,
        gateway_id: &str,
        time_us: i64,
        now_us: i64,
    ) -> Vec<Change> {
        let mut out = vec![];
        let Some(t) = Technical::of_gateway_event(kind) else {
            return out;
        };
        let a = Self::technical(t, gateway_id, None, None, time_us, now_us);
        self.technical_on(a, &mut out);
        out
    }

    /// A device's link came up or went away (technical readings).
    pub fn link(
        &mut self,
        gateway_id: &str,
        device_id: &str,
        patient: Option<String>,
        event: LinkEvent,
        time_us: i64,
        now_us: i64,
    ) -> Vec<Change> {
        let mut out = vec![];
        let key = Self::technical_key(Technical::DeviceDisconnected, gateway_id, Some(device_id));
        match event {
            LinkEvent::Lost => {
                let a = Self::technical(
                    Technical::DeviceDisconnected,
                    gateway_id,
                    Some(device_id),
                    patient,
                    time_us,
                    now_us,
                );
                self.technical_on(a, &mut out);
            }
            LinkEvent::Connected => self.resolve(&key, now_us, &mut out),
        }
        out
    }

    /// A value from a device.
    pub fn value(&mut self, v: &ValueInput, now_us: i64) -> Vec<Change> {
        let mut out = vec![];
        // Old values (a drained backlog) are history, not alarms.
        if now_us.saturating_sub(v.time_us) > self.cfg.max_value_age_s as i64 * S {
            return out;
        }
        let dev = (v.gateway_id.clone(), v.device_id.clone());
        let seen = self.devices.entry(dev).or_insert(DeviceSeen {
            last_value_us: v.time_us,
            patient: v.patient.clone(),
        });
        seen.last_value_us = seen.last_value_us.max(v.time_us);
        seen.patient = v.patient.clone();
        let gw = v.gateway_id.as_str();
        let dev_id = Some(v.device_id.as_str());
        // Data arrives again: not stale; the link is evidently up.
        self.resolve(
            &Self::technical_key(Technical::DataStale, gw, dev_id),
            now_us,
            &mut out,
        );
        // Signal-quality technical alerts.
        for (on, kind) in [
            (v.sensor_off, Technical::SensorOff),
            (v.poor_signal, Technical::PoorSignal),
        ] {
            if on {
                let a = Self::technical(kind, gw, dev_id, v.patient.clone(), v.time_us, now_us);
                self.technical_on(a, &mut out);
            } else if v.usable {
                self.resolve(&Self::technical_key(kind, gw, dev_id), now_us, &mut out);
            }
        }
        let (Some(patient), Some(value), true) = (&v.patient, v.value, v.usable) else {
            return out;
        };
        let rules: Vec<Rule> = self
            .rules
            .effective(patient, v.ward.as_deref())
            .into_iter()
            .filter(|r| r.parameter == v.parameter)
            .collect();
        for rule in rules {
            let key = format!("physiological|{patient}|{}", rule.id);
            if self.open.contains_key(&key) {
                let back = match rule.direction {
                    Direction::Below => value >= rule.limit + rule.hysteresis,
                    Direction::Above => value <= rule.limit - rule.hysteresis,
                };
                if back {
                    self.resolve(&key, now_us, &mut out);
                }
                continue;
            }
            let met = match rule.direction {
                Direction::Below => value < rule.limit,
                Direction::Above => value > rule.limit,
            };
            if !met {
                self.pending.remove(&key);
                continue;
            }
            let since = self.pending.entry(key.clone()).or_insert(Pending {
                since_us: v.time_us,
            });
            // An older value than the one that started the condition does
            // not move its start.
            since.since_us = since.since_us.min(v.time_us);
            let since_us = since.since_us;
            if v.time_us - since_us >= rule.delay_s as i64 * S {
                self.pending.remove(&key);
                let a = Alert {
                    id: 0,
                    kind: Kind::Physiological,
                    code: rule.id.clone(),
                    priority: rule.priority,
                    state: State::Active,
                    message: rule.message(),
                    patient: Some(patient.clone()),
                    gateway_id: Some(v.gateway_id.clone()),
                    device_id: Some(v.device_id.clone()),
                    value: Some(value),
                    unit: Some(super::rules::unit_of(v.parameter).into()),
                    condition_since_us: since_us,
                    raised_us: now_us,
                    acknowledged_us: None,
                    acknowledged_by: None,
                    escalated_us: None,
                    resolved_us: None,
                };
                self.raise(a, &mut out);
            }
        }
        out
    }

    /// A new NEWS2 result for a patient: the alert of its band is raised,
    /// those of other bands resolved.
    pub fn news2(
        &mut self,
        patient: &str,
        total: u8,
        band: News2Band,
        time_us: i64,
        now_us: i64,
    ) -> Vec<Change> {
        let mut out = vec![];
        let bands = [
            (
                News2Band::SingleParameter3,
                "news2-single-parameter-3",
                Priority::Medium,
                "NEWS2: score of 3 in a single parameter",
            ),
            (
                News2Band::Medium,
                "news2-medium",
                Priority::Medium,
                "NEWS2 medium clinical risk (5–6)",
            ),
            (
                News2Band::High,
                "news2-high",
                Priority::High,
                "NEWS2 high clinical risk (7 or more)",
            ),
        ];
        for (b, code, priority, message) in bands {
            let key = format!("score|{patient}|{code}");
            if b != band {
                self.resolve(&key, now_us, &mut out);
            } else if !self.open.contains_key(&key) {
                let a = Alert {
                    id: 0,
                    kind: Kind::Score,
                    code: code.into(),
                    priority,
                    state: State::Active,
                    message: message.into(),
                    patient: Some(patient.into()),
                    gateway_id: None,
                    device_id: None,
                    value: Some(f64::from(total)),
                    unit: Some("{score}".into()),
                    condition_since_us: time_us,
                    raised_us: now_us,
                    acknowledged_us: None,
                    acknowledged_by: None,
                    escalated_us: None,
                    resolved_us: None,
                };
                self.raise(a, &mut out);
            }
        }
        out
    }

    /// The clock: stale data, offline gateways, escalation.
    pub fn tick(&mut self, now_us: i64) -> Vec<Change> {
        let mut out = vec![];
        let stale = self.cfg.stale_after_s as i64 * S;
        let devices: Vec<_> = self
            .devices
            .iter()
            .filter(|(_, d)| now_us - d.last_value_us >= stale)
            .map(|((g, dv), d)| (g.clone(), dv.clone(), d.clone()))
            .collect();
        for (g, dv, d) in devices {
            let a = Self::technical(
                Technical::DataStale,
                &g,
                Some(&dv),
                d.patient,
                d.last_value_us,
                now_us,
            );
            self.technical_on(a, &mut out);
        }
        let offline = self.cfg.gateway_offline_after_s as i64 * S;
        let gateways: Vec<_> = self
            .gateways
            .iter()
            .filter(|(_, t)| now_us - **t >= offline)
            .map(|(g, t)| (g.clone(), *t))
            .collect();
        for (g, t) in gateways {
            let a = Self::technical(Technical::GatewayOffline, &g, None, None, t, now_us);
            self.technical_on(a, &mut out);
        }
        let escalate = self.cfg.escalate_after_s as i64 * S;
        for a in self.open.values_mut() {
            if a.state == State::Active
                && a.escalated_us.is_none()
                && now_us - a.raised_us >= escalate
            {
                a.escalated_us = Some(now_us);
                out.push(Change {
                    transition: Transition::Escalated,
                    alert: a.clone(),
                    actor: None,
                });
            }
        }
        out
    }

    /// A user acknowledges an open alert. An acknowledged buffer overflow
    /// (an event, not a lasting condition) is resolved at once.
    pub fn acknowledge(
        &mut self,
        id: i64,
        actor: &str,
        now_us: i64,
    ) -> Result<Vec<Change>, AckError> {
        let Some(key) = self
            .open
            .iter()
            .find(|(_, a)| a.id == id)
            .map(|(k, _)| k.clone())
        else {
            return Err(AckError::NotOpen);
        };
        let a = self.open.get_mut(&key).expect("found above");
        if a.state == State::Acknowledged {
            return Err(AckError::AlreadyAcknowledged);
        }
        a.state = State::Acknowledged;
        a.acknowledged_us = Some(now_us);
        a.acknowledged_by = Some(actor.into());
        let mut out = vec![Change {
            transition: Transition::Acknowledged,
            alert: a.clone(),
            actor: Some(actor.into()),
        }];
        if [
            Technical::EdgeBufferOverflow,
            Technical::EdgeBufferKeyLost,
            Technical::EdgeBufferWriteFailed,
        ]
        .iter()
        .any(|t| a.code == t.code())
        {
            self.resolve(&key, now_us, &mut out);
        }
        Ok(out)
    }
}

/// Why an acknowledgement was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("no open alert with this id (unknown or already resolved)")]
    NotOpen,
    #[error("the alert is already acknowledged")]
    AlreadyAcknowledged,
}

#[cfg(test)]
mod tests {
    use super::super::rules::{RuleSet, default_rules};
    use super::*;

    const T0: i64 = 1_795_514_400_000_000;

    fn engine() -> Engine {
        Engine::new(
            EngineConfig {
                escalate_after_s: 120,
                stale_after_s: 60,
                gateway_offline_after_s: 90,
                max_value_age_s: 300,
            },
            RuleSet::new(default_rules()),
            1,
            vec![],
        )
    }

    fn spo2(v: f64, t: i64) -> ValueInput {
        ValueInput {
            patient: Some("p1".into()),
            ward: None,
            gateway_id: "gw".into(),
            device_id: "mon".into(),
            parameter: Parameter::Spo2,
            value: Some(v),
            usable: true,
            sensor_off: false,
            poor_signal: false,
            time_us: t,
        }
    }

    fn raised(c: &[Change]) -> Vec<String> {
        c.iter()
            .filter(|c| c.transition == Transition::Raised)
            .map(|c| c.alert.code.clone())
            .collect()
    }

    fn resolved(c: &[Change]) -> Vec<String> {
        c.iter()
            .filter(|c| c.transition == Transition::Resolved)
            .map(|c| c.alert.code.clone())
            .collect()
    }

    /// Default SpO2 rules (NEWS2 Scale 1 bands): < 94 medium after 10 s,
    /// < 92 high after 10 s, hysteresis 1.
    #[test]
    fn a_condition_must_persist_for_its_delay() {
        let mut e = engine();
        let s = |v: f64, dt: i64| spo2(v, T0 + dt * S);
        assert!(e.value(&s(90.0, 0), T0).is_empty(), "not yet: delay");
        assert!(e.value(&s(90.0, 5), T0 + 5 * S).is_empty());
        // A normal value in between cancels the pending condition.
        assert!(e.value(&s(97.0, 8), T0 + 8 * S).is_empty());
        assert!(e.value(&s(90.0, 12), T0 + 12 * S).is_empty());
        assert!(e.value(&s(90.0, 20), T0 + 20 * S).is_empty());
        let c = e.value(&s(90.0, 22), T0 + 22 * S);
        assert_eq!(raised(&c), ["spo2-low-medium", "spo2-low-high"]);
        let high = c.iter().find(|c| c.alert.code == "spo2-low-high").unwrap();
        assert_eq!(high.alert.priority, Priority::High);
        assert_eq!(high.alert.condition_since_us, T0 + 12 * S);
        assert_eq!(high.alert.value, Some(90.0));
        // Once raised, not raised again.
        assert!(raised(&e.value(&s(89.0, 23), T0 + 23 * S)).is_empty());
    }

    #[test]
    fn hysteresis_keeps_an_alert_until_the_value_is_clearly_back() {
        let mut e = engine();
        let s = |v: f64, dt: i64| spo2(v, T0 + dt * S);
        e.value(&s(91.0, 0), T0);
        let c = e.value(&s(91.0, 10), T0 + 10 * S);
        assert_eq!(raised(&c), ["spo2-low-medium", "spo2-low-high"]);
        // 92 is no longer below 92, but not past the hysteresis (93).
        assert!(resolved(&e.value(&s(92.0, 11), T0 + 11 * S)).is_empty());
        let c = e.value(&s(93.0, 12), T0 + 12 * S);
        assert_eq!(resolved(&c), ["spo2-low-high"]);
        let c = e.value(&s(95.0, 13), T0 + 13 * S);
        assert_eq!(resolved(&c), ["spo2-low-medium"]);
        let r = &c[0].alert;
        assert_eq!(
            (r.state, r.resolved_us),
            (State::Resolved, Some(T0 + 13 * S))
        );
    }

    #[test]
    fn invalid_values_never_raise_hold_or_resolve() {
        let mut e = engine();
        let mut bad = spo2(70.0, T0);
        bad.usable = false;
        for dt in 0..30 {
            bad.time_us = T0 + dt * S;
            assert!(e.value(&bad, bad.time_us).is_empty());
        }
        e.value(&spo2(90.0, T0 + 30 * S), T0 + 30 * S);
        assert_eq!(
            raised(&e.value(&spo2(90.0, T0 + 40 * S), T0 + 40 * S)).len(),
            2
        );
        let mut good_looking = spo2(99.0, T0 + 41 * S);
        good_looking.usable = false;
        assert!(resolved(&e.value(&good_looking, T0 + 41 * S)).is_empty());
    }

    #[test]
    fn old_values_from_a_backlog_raise_nothing() {
        let mut e = engine();
        let now = T0 + 3600 * S;
        e.value(&spo2(80.0, T0), now);
        assert!(e.value(&spo2(80.0, T0 + 60 * S), now).is_empty());
        assert_eq!(e.open_alerts().count(), 0);
    }

    #[test]
    fn acknowledgement_and_escalation() {
        let mut e = engine();
        e.value(&spo2(90.0, T0), T0);
        let c = e.value(&spo2(90.0, T0 + 10 * S), T0 + 10 * S);
        let medium = c
            .iter()
            .find(|c| c.alert.code == "spo2-low-medium")
            .unwrap();
        let high = c.iter().find(|c| c.alert.code == "spo2-low-high").unwrap();
        let (m_id, h_id) = (medium.alert.id, high.alert.id);
        assert_ne!(m_id, h_id);
        // The high one is acknowledged in time; the medium one is not.
        let ack = e.acknowledge(h_id, "nurse-1", T0 + 60 * S).unwrap();
        assert_eq!(ack[0].transition, Transition::Acknowledged);
        assert_eq!(ack[0].alert.acknowledged_by.as_deref(), Some("nurse-1"));
        assert_eq!(
            e.acknowledge(h_id, "nurse-2", T0 + 61 * S),
            Err(AckError::AlreadyAcknowledged)
        );
        assert!(
            e.tick(T0 + 100 * S)
                .iter()
                .all(|c| c.transition != Transition::Escalated)
        );
        let c: Vec<_> = e
            .tick(T0 + 130 * S)
            .into_iter()
            .filter(|c| c.transition == Transition::Escalated)
            .collect();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].alert.id, m_id);
        // Escalated once only.
        assert!(
            e.tick(T0 + 200 * S)
                .iter()
                .all(|c| c.transition != Transition::Escalated)
        );
        // Resolved alerts cannot be acknowledged.
        let c = e.value(&spo2(97.0, T0 + 201 * S), T0 + 201 * S);
        assert_eq!(
            resolved(&c),
            ["data-stale", "spo2-low-medium", "spo2-low-high"]
        );
        assert_eq!(
            e.acknowledge(m_id, "nurse-1", T0 + 202 * S),
            Err(AckError::NotOpen)
        );
        // The condition coming back is a new alert with a new id.
        e.value(&spo2(90.0, T0 + 210 * S), T0 + 210 * S);
        let c = e.value(&spo2(90.0, T0 + 220 * S), T0 + 220 * S);
        assert!(c.iter().all(|c| c.alert.id > h_id && c.alert.id > m_id));
    }

    #[test]
    fn technical_alerts() {
        let mut e = engine();
        // Link lost / back.
        let c = e.link("gw", "mon", Some("p1".into()), LinkEvent::Lost, T0, T0);
        assert_eq!(raised(&c), ["device-disconnected"]);
        assert!(
            e.link("gw", "mon", None, LinkEvent::Lost, T0 + S, T0 + S)
                .is_empty()
        );
        let c = e.link(
            "gw",
            "mon",
            None,
            LinkEvent::Connected,
            T0 + 2 * S,
            T0 + 2 * S,
        );
        assert_eq!(resolved(&c), ["device-disconnected"]);
        // Sensor off (flag on a reading without value), then a valid value.
        let mut off = spo2(0.0, T0 + 3 * S);
        off.value = None;
        off.usable = false;
        off.sensor_off = true;
        assert_eq!(raised(&e.value(&off, T0 + 3 * S)), ["sensor-off"]);
        let c = e.value(&spo2(97.0, T0 + 4 * S), T0 + 4 * S);
        assert_eq!(resolved(&c), ["sensor-off"]);
        // Poor signal is low priority.
        let mut weak = spo2(96.0, T0 + 5 * S);
        weak.poor_signal = true;
        weak.usable = false;
        let c = e.value(&weak, T0 + 5 * S);
        assert_eq!(c[0].alert.priority, Priority::Low);
        // Data stale after 60 s without a value; resolved by the next one.
        e.gateway_seen("gw", T0 + 5 * S);
        let c = e.tick(T0 + 64 * S);
        assert!(raised(&c).is_empty());
        let c = e.tick(T0 + 66 * S);
        assert_eq!(raised(&c), ["data-stale"]);
        assert_eq!(c[0].alert.patient.as_deref(), Some("p1"));
        assert!(raised(&e.tick(T0 + 67 * S)).is_empty(), "raised once");
        // Gateway offline after 90 s without a batch.
        let c = e.tick(T0 + 96 * S);
        assert_eq!(raised(&c), ["gateway-offline"]);
        let c = e.gateway_seen("gw", T0 + 100 * S);
        assert_eq!(resolved(&c), ["gateway-offline"]);
        let c = e.value(&spo2(97.0, T0 + 100 * S), T0 + 100 * S);
        assert_eq!(resolved(&c), ["data-stale", "poor-signal"]);
        // Buffer overflow: raised, resolved by acknowledging it.
        let c = e.buffer_overflow("gw", T0 + 101 * S, T0 + 101 * S);
        let id = c[0].alert.id;
        let c = e.acknowledge(id, "biomed-1", T0 + 102 * S).unwrap();
        assert_eq!(
            c.iter().map(|c| c.transition).collect::<Vec<_>>(),
            [Transition::Acknowledged, Transition::Resolved]
        );
        // Key loss and storage failure: their own alerts and messages,
        // resolved by acknowledging them; other kinds raise nothing.
        for (kind, code, words) in [
            (
                TechnicalKind::BufferKeyLost,
                "edge-buffer-key-lost",
                "key lost",
            ),
            (
                TechnicalKind::BufferWriteFailed,
                "edge-buffer-write-failed",
                "storage failed",
            ),
        ] {
            let c = e.gateway_event(kind, "gw", T0 + 103 * S, T0 + 103 * S);
            assert_eq!(raised(&c), [code]);
            assert!(c[0].alert.message.contains(words), "{}", c[0].alert.message);
            assert!(!c[0].alert.message.contains("dropped"));
            assert_eq!(c[0].alert.priority, Priority::Medium);
            let id = c[0].alert.id;
            let c = e.acknowledge(id, "biomed-1", T0 + 104 * S).unwrap();
            assert_eq!(resolved(&c), [code]);
        }
        assert!(
            e.gateway_event(TechnicalKind::Silent, "gw", T0 + 105 * S, T0 + 105 * S)
                .is_empty()
        );
    }

    #[test]
    fn news2_bands() {
        let mut e = engine();
        let c = e.news2("p1", 3, News2Band::SingleParameter3, T0, T0);
        assert_eq!(raised(&c), ["news2-single-parameter-3"]);
        let c = e.news2("p1", 7, News2Band::High, T0 + S, T0 + S);
        assert_eq!(raised(&c), ["news2-high"]);
        assert_eq!(resolved(&c), ["news2-single-parameter-3"]);
        assert!(
            e.news2("p1", 8, News2Band::High, T0 + 2 * S, T0 + 2 * S)
                .is_empty()
        );
        let c = e.news2("p1", 1, News2Band::Low, T0 + 3 * S, T0 + 3 * S);
        assert_eq!(resolved(&c), ["news2-high"]);
        assert_eq!(e.open_alerts().count(), 0);
    }

    #[test]
    fn open_alerts_survive_a_restart_and_still_resolve() {
        let mut e = engine();
        e.value(&spo2(90.0, T0), T0);
        e.value(&spo2(90.0, T0 + 10 * S), T0 + 10 * S);
        let open: Vec<Alert> = e.open_alerts().cloned().collect();
        let mut again = Engine::new(e.cfg.clone(), RuleSet::new(default_rules()), 100, open);
        let c = again.value(&spo2(97.0, T0 + 20 * S), T0 + 20 * S);
        assert_eq!(resolved(&c).len(), 2);
        // New ids continue from the store's.
        again.value(&spo2(90.0, T0 + 30 * S), T0 + 30 * S);
        let c = again.value(&spo2(90.0, T0 + 40 * S), T0 + 40 * S);
        assert!(c.iter().all(|c| c.alert.id >= 100));
    }
}
