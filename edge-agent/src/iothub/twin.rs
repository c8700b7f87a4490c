//! Device twin reported properties over IoT Hub's MQTT topics.
//!
//! The agent reports what an operator wants to see in the Azure portal
//! without logging into the gateway: its version and uplink, each configured
//! device's kind, link state (from the drivers' CONNECTED / SILENT /
//! DISCONNECTED / DEVICE_REFUSED technical readings), time of the last
//! accepted reading and readings accepted since start, and the buffer's
//! backlog. Never patient data, never values.
//!
//! Protocol (IoT Hub MQTT support, "update device twin's reported
//! properties"): publish the JSON patch to
//! `$iothub/twin/PATCH/properties/reported/?$rid={rid}`; IoT Hub answers on
//! `$iothub/twin/res/{status}/?$rid={rid}&$version={version}` (subscribed
//! as `$iothub/twin/res/#`), 204 on success.
//!
//! When: on every (re)connect; then a change of a device's state or of the
//! device set is reported at most every `twin_min_interval_ms`; counters,
//! times and the backlog (which change all the time) at most every
//! `twin_refresh_s`. One patch in flight at a time; a failed or unanswered
//! patch is counted, logged and sent again at the next opportunity.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::{Arc, Weak};
use std::time::Duration;

use device_drivers::DriverOutput;
use serde_json::{Value, json};
use shared_protocol::v1::TechnicalKind;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::buffer::Buffer;

/// Topic filter for twin responses.
pub const RESPONSE_FILTER: &str = "$iothub/twin/res/#";
const RESPONSE_PREFIX: &str = "$iothub/twin/res/";
/// How long to wait for IoT Hub's answer to a patch before counting it as
/// failed.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The topic a reported-properties patch is published to.
pub fn patch_topic(rid: &str) -> String {
    format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}")
}

/// A twin response: `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinResponse {
    pub status: u16,
    pub rid: String,
    pub version: Option<u64>,
}

/// Parse a twin response topic; `None` when it is not one.
pub fn parse_response(topic: &str) -> Option<TwinResponse> {
    let rest = topic.strip_prefix(RESPONSE_PREFIX)?;
    let (status, query) = rest.split_once("/?")?;
    let status: u16 = status.parse().ok()?;
    let mut rid = None;
    let mut version = None;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("$rid", v)) if !v.is_empty() => rid = Some(v.to_string()),
            Some(("$version", v)) => version = v.parse().ok(),
            _ => {}
        }
    }
    Some(TwinResponse {
        status,
        rid: rid?,
        version,
    })
}

/// Per-device activity seen by the writer: link state and accepted readings.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Activity {
    /// The last link state technical reading accepted from the device.
    pub state: Option<TechnicalKind>,
    /// Readings accepted since the agent started.
    pub readings: u64,
    /// Gateway time (UTC µs) the last reading was accepted; 0 = none yet.
    pub last_reading_us: i64,
}

/// What the drivers delivered, per device (fed by the writer after each
/// durable append).
#[derive(Debug, Default)]
pub struct DeviceActivity {
    inner: Mutex<HashMap<String, Activity>>,
}

impl DeviceActivity {
    /// Record outputs that were just accepted into the buffer.
    pub fn observe(&self, outputs: &[DriverOutput]) {
        let now = crate::iothub::now_us();
        let Ok(mut map) = self.inner.lock() else {
            return;
        };
        for o in outputs {
            let a = map.entry(o.device_id.clone()).or_default();
            if !o.readings.is_empty() {
                a.readings += o.readings.len() as u64;
                a.last_reading_us = now;
            }
            for t in &o.technical {
                if let Ok(kind) = TechnicalKind::try_from(t.kind)
                    && kind != TechnicalKind::Unspecified
                    && !matches!(
                        kind,
                        TechnicalKind::BufferOverflow
                            | TechnicalKind::BufferKeyLost
                            | TechnicalKind::BufferWriteFailed
                    )
                {
                    a.state = Some(kind);
                }
            }
        }
    }

    pub fn get(&self, device_id: &str) -> Activity {
        self.inner
            .lock()
            .ok()
            .and_then(|m| m.get(device_id).cloned())
            .unwrap_or_default()
    }
}

/// A configured device as the twin shows it.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    pub id: String,
    /// The config's `kind`, e.g. `masimo-serial`.
    pub kind: String,
    /// The device connects to the agent (HL7 listener): its traffic does not
    /// pass the writer, so only its kind is reported.
    pub listener: bool,
}

/// What the IoT Hub session needs from the running agent (twin report and
/// the `flush` method).
#[derive(Debug, Clone)]
pub struct AgentLink {
    /// Weak: the session may outlive the agent's run by a moment, and the
    /// buffer (sled) must close when the agent stops.
    pub buffer: Weak<Buffer>,
    pub devices: Vec<DeviceEntry>,
    pub activity: Arc<DeviceActivity>,
    /// Notified by the `flush` direct method.
    pub flush: Arc<Notify>,
    /// Uplink description for the twin, e.g. `iothub-mqtt`.
    pub uplink: String,
}

fn state_name(a: &Activity, listener: bool) -> &'static str {
    if listener {
        return "listening";
    }
    match a.state {
        Some(TechnicalKind::Connected) => "connected",
        Some(TechnicalKind::Silent) => "silent",
        Some(TechnicalKind::Disconnected) => "disconnected",
        Some(TechnicalKind::DeviceRefused) => "refused",
        _ => "unknown",
    }
}

/// A twin property name for a device id: IoT Hub forbids `.`, `$` and
/// spaces in property names (device ids may contain `.`).
fn property_name(id: &str) -> String {
    id.replace(['.', '$', ' '], "_")
}

fn rfc3339(us: i64) -> Option<String> {
    if us <= 0 {
        return None;
    }
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

impl AgentLink {
    /// The part whose change is reported promptly: the device set and each
    /// device's state.
    pub fn significant(&self) -> Vec<(String, &'static str)> {
        self.devices
            .iter()
            .map(|d| {
                (
                    d.id.clone(),
                    state_name(&self.activity.get(&d.id), d.listener),
                )
            })
            .collect()
    }

    /// The full reported-properties patch (`None` once the agent stopped).
    pub fn report(&self) -> Option<Value> {
        let buffer = self.buffer.upgrade()?;
        let mut devices = serde_json::Map::new();
        for d in &self.devices {
            let a = self.activity.get(&d.id);
            let mut name = property_name(&d.id);
            while devices.contains_key(&name) {
                name.push('_');
            }
            let entry = if d.listener {
                json!({"id": d.id, "kind": d.kind, "state": state_name(&a, true)})
            } else {
                json!({
                    "id": d.id,
                    "kind": d.kind,
                    "state": state_name(&a, false),
                    "lastReadingTime": rfc3339(a.last_reading_us),
                    "readings": a.readings,
                })
            };
            devices.insert(name, entry);
        }
        let oldest_s = buffer.oldest_age_us().map(|us| us / 1_000_000).unwrap_or(0);
        Some(json!({
            "agentVersion": env!("CARGO_PKG_VERSION"),
            "uplink": self.uplink,
            "devices": devices,
            "buffer": {
                "records": buffer.pending_records(),
                "items": buffer.pending_readings(),
                "oldestAgeSeconds": oldest_s,
            },
        }))
    }
}

/// Report timing: see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct TwinSettings {
    pub min_interval: Duration,
    pub refresh: Duration,
}

/// Decides when to publish a patch and tracks the one in flight.
#[derive(Debug)]
pub struct Reporter {
    settings: TwinSettings,
    last_sent: Option<Instant>,
    last_significant: Option<Vec<(String, &'static str)>>,
    /// Send at the next opportunity regardless of changes (after connect or
    /// a failure).
    force: bool,
    pending: Option<(String, Instant)>,
    next_rid: u64,
}

/// What a twin response meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseOutcome {
    Accepted {
        version: Option<u64>,
    },
    Failed {
        status: u16,
    },
    /// Not the patch in flight (late or unknown request id).
    Unexpected,
}

impl Reporter {
    pub fn new(settings: TwinSettings) -> Self {
        Reporter {
            settings,
            last_sent: None,
            last_significant: None,
            force: true,
            pending: None,
            next_rid: 1,
        }
    }

    /// A new MQTT session: report again at once.
    pub fn on_connect(&mut self) {
        self.force = true;
        self.pending = None;
        self.last_sent = None;
    }

    /// Whether a patch is due now, given the current significant state.
    /// Returns a request id to publish with, and remembers the state as sent.
    pub fn due(
        &mut self,
        now: Instant,
        significant: Vec<(String, &'static str)>,
    ) -> Option<String> {
        if self.pending.is_some() {
            return None;
        }
        let since = self.last_sent.map(|t| now.duration_since(t));
        let changed = self.last_significant.as_ref() != Some(&significant);
        let send = match since {
            None => true,
            Some(s) => {
                ((self.force || changed) && s >= self.settings.min_interval)
                    || s >= self.settings.refresh
            }
        };
        if !send {
            return None;
        }
        let rid = self.next_rid.to_string();
        self.next_rid += 1;
        self.force = false;
        self.last_sent = Some(now);
        self.last_significant = Some(significant);
        self.pending = Some((rid.clone(), now));
        Some(rid)
    }

    /// The publish of a patch failed locally: try again later.
    pub fn send_failed(&mut self) {
        self.pending = None;
        self.force = true;
    }

    pub fn on_response(&mut self, r: &TwinResponse) -> ResponseOutcome {
        match &self.pending {
            Some((rid, _)) if *rid == r.rid => {
                self.pending = None;
                if r.status == 204 || r.status == 200 {
                    ResponseOutcome::Accepted { version: r.version }
                } else {
                    self.force = true;
                    ResponseOutcome::Failed { status: r.status }
                }
            }
            _ => ResponseOutcome::Unexpected,
        }
    }

    /// A patch unanswered for [`RESPONSE_TIMEOUT`]: forget it, report again.
    pub fn timed_out(&mut self, now: Instant) -> bool {
        match &self.pending {
            Some((_, at)) if now.duration_since(*at) >= RESPONSE_TIMEOUT => {
                self.pending = None;
                self.force = true;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_protocol::v1::{Reading, TechnicalReading};

    #[test]
    fn responses_are_parsed_and_others_refused() {
        assert_eq!(
            parse_response("$iothub/twin/res/204/?$rid=7&$version=12"),
            Some(TwinResponse {
                status: 204,
                rid: "7".into(),
                version: Some(12)
            })
        );
        assert_eq!(
            parse_response("$iothub/twin/res/429/?$rid=8").map(|r| (r.status, r.version)),
            Some((429, None))
        );
        for bad in [
            "$iothub/twin/res/204/",
            "$iothub/twin/res/abc/?$rid=1",
            "$iothub/twin/res/204/?$version=1",
            "$iothub/methods/POST/x/?$rid=1",
            "$iothub/twin/res/204/?$rid=",
        ] {
            assert_eq!(parse_response(bad), None, "{bad}");
        }
        assert_eq!(
            patch_topic("3"),
            "$iothub/twin/PATCH/properties/reported/?$rid=3"
        );
    }

    #[test]
    fn activity_follows_technical_readings_and_counts_readings() {
        let a = DeviceActivity::default();
        let tech = |kind: TechnicalKind| DriverOutput {
            device_id: "d1".into(),
            technical: vec![TechnicalReading {
                kind: kind as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(a.get("d1"), Activity::default());
        a.observe(&[tech(TechnicalKind::Connected)]);
        assert_eq!(a.get("d1").state, Some(TechnicalKind::Connected));
        a.observe(&[DriverOutput {
            device_id: "d1".into(),
            readings: vec![Reading::default(), Reading::default()],
            ..Default::default()
        }]);
        assert_eq!(a.get("d1").readings, 2);
        assert!(a.get("d1").last_reading_us > 0);
        a.observe(&[tech(TechnicalKind::Silent)]);
        assert_eq!(a.get("d1").state, Some(TechnicalKind::Silent));
        // A gateway event does not change a device's link state.
        a.observe(&[tech(TechnicalKind::BufferOverflow)]);
        assert_eq!(a.get("d1").state, Some(TechnicalKind::Silent));
        assert_eq!(state_name(&a.get("d1"), false), "silent");
        assert_eq!(state_name(&a.get("other"), false), "unknown");
    }

    #[test]
    fn reporter_debounces_state_changes_and_refreshes_counters_slowly() {
        let s = TwinSettings {
            min_interval: Duration::from_secs(5),
            refresh: Duration::from_secs(300),
        };
        let mut r = Reporter::new(s);
        let t0 = Instant::now();
        let st = |v: &'static str| vec![("d1".to_string(), v)];
        // On connect at once.
        let rid = r.due(t0, st("unknown")).expect("first report");
        // Nothing new while one is in flight.
        assert_eq!(r.due(t0 + Duration::from_secs(10), st("connected")), None);
        let ok = r.on_response(&TwinResponse {
            status: 204,
            rid: rid.clone(),
            version: Some(2),
        });
        assert_eq!(ok, ResponseOutcome::Accepted { version: Some(2) });
        // A state change waits for the minimum interval...
        assert_eq!(r.due(t0 + Duration::from_secs(1), st("connected")), None);
        let rid2 = r.due(t0 + Duration::from_secs(5), st("connected")).unwrap();
        assert_ne!(rid, rid2);
        assert_eq!(
            r.on_response(&TwinResponse {
                status: 204,
                rid: rid.clone(),
                version: None
            }),
            ResponseOutcome::Unexpected
        );
        // A failure is retried after the minimum interval.
        assert_eq!(
            r.on_response(&TwinResponse {
                status: 400,
                rid: rid2,
                version: None
            }),
            ResponseOutcome::Failed { status: 400 }
        );
        assert_eq!(r.due(t0 + Duration::from_secs(6), st("connected")), None);
        let rid3 = r
            .due(t0 + Duration::from_secs(10), st("connected"))
            .unwrap();
        r.on_response(&TwinResponse {
            status: 204,
            rid: rid3,
            version: None,
        });
        // Unchanged state: only the slow refresh.
        assert_eq!(r.due(t0 + Duration::from_secs(200), st("connected")), None);
        let rid4 = r
            .due(t0 + Duration::from_secs(310), st("connected"))
            .unwrap();
        // Unanswered: counted after the timeout and sent again.
        assert!(!r.timed_out(t0 + Duration::from_secs(311)));
        assert!(r.timed_out(t0 + Duration::from_secs(310) + RESPONSE_TIMEOUT));
        assert!(
            r.due(t0 + Duration::from_secs(350), st("connected"))
                .is_some()
        );
        let _ = rid4;
        // A new session reports at once.
        r.send_failed();
        r.on_connect();
        assert!(
            r.due(t0 + Duration::from_secs(351), st("connected"))
                .is_some()
        );
    }

    #[test]
    fn property_names_avoid_forbidden_characters() {
        assert_eq!(property_name("icu.bed-7"), "icu_bed-7");
        assert_eq!(property_name("spo2-1"), "spo2-1");
    }
}
