//! A partitioned stream source (the Kafka / Event Hubs ingest): each
//! partition's committed offset, written in the same transaction as the
//! batch read at it, and the partition leases replicas share (decisions:
//! `hub_domain::stream::lease`).

use hub_domain::stream::lease::Lease;
use shared_protocol::v1::Batch;

use crate::{Associations, IngestReport, StoreError};

/// Where the next record of a partition is: the offset written when the
/// record before it has been stored (or dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    /// The source's name (e.g. `kafka:{topic}`): offsets and leases of
    /// different sources are independent.
    pub source: String,
    pub partition: i32,
    /// The offset of the first record not yet stored.
    pub next_offset: i64,
}

/// Offsets and leases of stream sources.
pub trait StreamStore {
    /// `IngestStore::ingest`, and in the same transaction the partition's
    /// offset moved to `position.next_offset` — also for a re-sent batch
    /// (a duplicate still advances the offset). An offset never goes
    /// backwards: a lower one than stored leaves it as it is.
    fn ingest_at(
        &self,
        gateway_id: &str,
        batch: &Batch,
        associations: &Associations,
        received_us: i64,
        now_us: i64,
        position: &StreamPosition,
    ) -> Result<IngestReport, StoreError>;
    /// Moves a partition's offset without a batch (past records that were
    /// dropped); never backwards.
    fn commit_offset(&self, position: &StreamPosition) -> Result<(), StoreError>;
    /// The committed offsets of `source`: (partition, next offset).
    fn committed_offsets(&self, source: &str) -> Result<Vec<(i32, i64)>, StoreError>;

    /// Records that `replica` is alive until `expires_at_ms` and forgets
    /// replicas of `source` expired at `now_ms`.
    fn replica_heartbeat(
        &self,
        source: &str,
        replica: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), StoreError>;
    /// The replicas of `source` alive at `now_ms`, sorted by id.
    fn live_replicas(&self, source: &str, now_ms: i64) -> Result<Vec<String>, StoreError>;
    /// Stored leases of `source` (expired ones included).
    fn leases(&self, source: &str) -> Result<Vec<Lease>, StoreError>;
    /// Takes or renews the lease of `partition` for `owner` until
    /// `expires_at_ms`, in one conditional write: it succeeds only if the
    /// partition is free, its lease expired at `now_ms`, or `owner` holds
    /// it. Whether `owner` holds it now.
    fn claim_lease(
        &self,
        source: &str,
        partition: i32,
        owner: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Gives up `owner`'s lease of `partition` (nothing if another holds it).
    fn release_lease(&self, source: &str, partition: i32, owner: &str) -> Result<(), StoreError>;
}
