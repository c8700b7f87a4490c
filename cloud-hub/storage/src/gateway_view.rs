//! The dashboard's gateways view: per gateway and device, what the hub
//! last received and recent counts (rendered by the hub's `dashboard`).

pub use hub_domain::gateway_activity::BatchCounts;

use crate::StoreError;

/// A gateway's newest batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastBatch {
    pub sequence: i64,
    pub received_us: i64,
    pub created_us: i64,
    pub agent_version: String,
}

/// A device of a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceActivity {
    pub id: String,
    pub protocol: String,
    pub manufacturer: String,
    pub model: String,
    pub location: String,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
    /// (effective, received) of its reading with the highest sequence.
    pub last_reading: Option<(i64, i64)>,
    /// (kind, time, detail) of its newest link event.
    pub last_link_event: Option<(String, i64, String)>,
    pub rejected_total: u64,
}

/// A gateway (revoked ones included) with its figures and devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayActivity {
    pub id: String,
    pub created_us: i64,
    pub revoked_us: Option<i64>,
    pub last_batch: Option<LastBatch>,
    /// Batches of the window (see [`GatewayViewStore::gateway_activity`]).
    pub window: BatchCounts,
    pub rejected_total: u64,
    /// Buffer overflows the gateway reported: count and newest (time, detail).
    pub overflows: u64,
    pub last_overflow: Option<(i64, String)>,
    /// The newest `buffer-incarnation` gateway event (time, detail): when
    /// the hub first saw the gateway's current buffer.
    pub last_incarnation: Option<(i64, String)>,
    /// By device id.
    pub devices: Vec<DeviceActivity>,
}

/// The figures of the gateways view.
pub trait GatewayViewStore {
    /// Every gateway by id. `window` counts, among a gateway's newest
    /// `max_batches` batches by arrival, those down to the first received
    /// before `since_us` (exclusive), each with its stored ack
    /// (`BatchCounts::add`).
    fn gateway_activity(
        &self,
        since_us: i64,
        max_batches: u32,
    ) -> Result<Vec<GatewayActivity>, StoreError>;
}
