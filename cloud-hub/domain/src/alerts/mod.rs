//! The alert engine (sans-IO, [`engine`]), its rules ([`rules`]) and what
//! ingest hands it ([`LiveValue`]).

pub mod engine;
pub mod rules;

use crate::association::PatientId;

/// A reading of a score input as ingest hands it to the alerts: who it
/// belongs to and its usable value in the chart unit.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveValue {
    pub patient: Option<PatientId>,
    pub device_id: String,
    pub parameter: crate::early_warning::Parameter,
    /// `None` unless the value is usable: stored (device-valid, physically
    /// possible), final and convertible to the chart unit.
    pub value: Option<f64>,
    pub flags: Vec<i32>,
    pub time_us: i64,
}

/// Readings older than this (relative to the hub's clock) are not handed
/// to the alerts at all: bounds the work of a drained backlog.
pub const LIVE_WINDOW_US: i64 = 15 * 60 * 1_000_000;

/// Decodes the stored names of an alert's kind, priority and state. A name
/// this build does not know reads as technical, high priority and active:
/// an alert is never hidden or downgraded because its row is unreadable.
pub fn decode_stored(
    kind: &str,
    priority: &str,
    state: &str,
) -> (engine::Kind, rules::Priority, engine::State) {
    (
        engine::Kind::parse(kind).unwrap_or(engine::Kind::Technical),
        rules::Priority::parse(priority).unwrap_or(rules::Priority::High),
        engine::State::parse(state).unwrap_or(engine::State::Active),
    )
}
