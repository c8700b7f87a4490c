//! The hub's storage contract: one trait per concern, each implemented once
//! per backend (`vigil-hub-sqlite`, `vigil-hub-postgres`), and [`Storage`],
//! the whole of them, which the composition root opens and hands to the
//! transport layer. Nothing here runs SQL: backends persist and load, the
//! domain (`vigil-hub-domain`) decides.
//!
//! Every method is blocking: the transport layer calls it from
//! `tokio::task::spawn_blocking`.

use std::collections::HashMap;

use hub_domain::fhir::ObservationSearch;
use hub_domain::fhir::render::{DeviceRow, ObservationRow};
use shared_protocol::v1::{Batch, BatchAck, RejectReason};

mod alerts;
mod association;
mod error;
pub mod hours;
pub mod minutes;
mod scores;
mod stream;
mod trends;

pub use alerts::{
    AlertFilter, AlertStore, AlertsLoaded, Evaluation, StoredOverride, TrackedChanges, Tracking,
    Transitioned,
};
pub use association::{
    AssocError, AssocTx, AssociationStore, SystemsMigrated, Timeline, procedure, systems_to_migrate,
};
pub use error::StoreError;
pub use scores::ScoreStore;
pub use stream::{StreamPosition, StreamStore};
pub use trends::{SeriesQuery, TrendStore};
mod access;
mod audit;
mod gateway_view;
mod lake;
mod privacy;

pub use access::{AccountStore, SessionRecord, TokenRecord, UserRecord};
pub use audit::{
    AuditCheckpoint, AuditEntry, AuditKey, AuditStore, CheckpointPolicy, StoredAuditEntry,
};
pub use gateway_view::{BatchCounts, DeviceActivity, GatewayActivity, GatewayViewStore, LastBatch};
pub use lake::{LakeReading, LakeScore, LakeStore};
pub use privacy::{
    DeviceWindow, Erased, ErasedCounts, ErasedSubjects, ErasureError, ErasureTx, LegalHold,
    ManualRecord, PrivacyStore, PurgedByClass, RetentionCutoffs, StayRecord, SubjectKey, Tombstone,
    erase, new_salt,
};

/// A gateway as listed (never its token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRow {
    pub id: String,
    pub created_us: i64,
    pub revoked_us: Option<i64>,
}

/// Static (gateway_id, device_id) → patient_id mapping (`[[associations]]`).
pub type Associations = HashMap<(String, String), String>;

/// What ingesting a batch did.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestReport {
    /// The ack to send (with `duplicate_batch` set for a re-sent batch).
    pub ack: BatchAck,
    /// Reasons of this processing's rejections (empty for a duplicate batch).
    pub rejected_reasons: Vec<RejectReason>,
    /// Stored values outside the metric's possible range.
    pub out_of_range: u32,
    /// Newly stored readings that feed alerts (score inputs from the last
    /// `alerts::LIVE_WINDOW_US`), with their patient.
    pub live: Vec<hub_domain::alerts::LiveValue>,
    /// Set when this batch is the first the hub sees of a (non-zero) buffer
    /// incarnation of the gateway; a `buffer-incarnation` gateway event
    /// was stored with it.
    pub new_incarnation: Option<NewIncarnation>,
    /// Readings dropped as an erased patient's data (neither stored nor
    /// counted in the ack).
    pub erased: u32,
}

/// A buffer incarnation the hub had not seen for a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewIncarnation {
    pub incarnation: i64,
    /// The incarnation of the gateway's newest earlier batch (0: an agent
    /// without incarnations); None for the gateway's first batch.
    pub previous: Option<i64>,
}

/// Gateways, their tokens and enrolment tokens.
pub trait GatewayStore {
    /// Records a one-time enrolment token (its SHA-256), valid until `expires_us`.
    fn add_enrollment(&self, token_sha256: &str, expires_us: i64) -> Result<(), StoreError>;
    /// Uses an enrolment token once to register gateway `id` with its token's hash.
    fn enroll(
        &self,
        enrollment_sha256: &str,
        id: &str,
        gateway_token_sha256: &str,
        now_us: i64,
    ) -> Result<(), StoreError>;
    /// Registers a gateway with the hash of its token. A revoked gateway id
    /// may be re-added (it gets the new token); an active one may not.
    fn add_gateway(&self, id: &str, token_sha256: &str) -> Result<(), StoreError>;
    fn list_gateways(&self) -> Result<Vec<GatewayRow>, StoreError>;
    fn revoke_gateway(&self, id: &str) -> Result<(), StoreError>;
    /// Replaces a gateway's token; the previous one stays valid until
    /// `grace_until` (µs) when given.
    fn rotate_gateway(
        &self,
        id: &str,
        new_token_sha256: &str,
        grace_until: Option<i64>,
        now_us: i64,
    ) -> Result<(), StoreError>;
    /// The active gateway a token (its SHA-256) belongs to at hub time `now_us`.
    fn authenticate_at(
        &self,
        token_sha256: &str,
        now_us: i64,
    ) -> Result<Option<String>, StoreError>;
    fn gateway_is_active(&self, id: &str) -> Result<bool, StoreError>;
}

/// Batch ingest: one transaction per batch, de-duplicated by batch and by
/// reading identity, acknowledged only once durable.
pub trait IngestStore {
    /// Stores a batch of an authenticated gateway. `received_us` is the hub
    /// receive time; `now_us` the hub clock of the "too far in the future" check.
    fn ingest(
        &self,
        gateway_id: &str,
        batch: &Batch,
        associations: &Associations,
        received_us: i64,
        now_us: i64,
    ) -> Result<IngestReport, StoreError>;
}

/// A read of a store whose reads wait on the network, as a future the API
/// awaits on its own async worker: no thread is held while the database
/// answers.
pub type ReadFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Stored observations, devices and patients as the FHIR API reads them.
pub trait ObservationStore {
    /// One stored Observation row (rendered on read by `fhir::render`).
    fn observation(&self, id: &str) -> Result<Option<ObservationRow>, StoreError>;
    /// A search: the total and one page of rows.
    fn search(&self, s: &ObservationSearch) -> Result<(u64, Vec<ObservationRow>), StoreError>;
    /// [`Self::observation`] as a [`ReadFuture`], when the store has a
    /// non-blocking way to answer it (PostgreSQL). `None` (the default):
    /// the caller runs [`Self::observation`] itself.
    fn observation_future<'a>(
        &'a self,
        _id: &'a str,
    ) -> Option<ReadFuture<'a, Option<ObservationRow>>> {
        None
    }
    /// [`Self::search`] as a [`ReadFuture`]; see [`Self::observation_future`].
    fn search_future<'a>(
        &'a self,
        _s: &'a ObservationSearch,
    ) -> Option<ReadFuture<'a, (u64, Vec<ObservationRow>)>> {
        None
    }
    /// The system of a known patient (`Some("")` when it has none).
    fn patient(&self, value: &str) -> Result<Option<String>, StoreError>;
    /// Rows for a bulk export after `after_rowid` (a cursor), oldest first.
    fn export_observations(
        &self,
        after_rowid: i64,
        limit: usize,
        since_us: Option<i64>,
        patient_level: bool,
        ward: Option<&str>,
    ) -> Result<Vec<(i64, ObservationRow)>, StoreError>;
    /// Patients (value, system) for a bulk export, optionally of one ward.
    fn export_patients(&self, ward: Option<&str>) -> Result<Vec<(String, String)>, StoreError>;
    fn device(&self, fhir_id: &str) -> Result<Option<DeviceRow>, StoreError>;
    fn devices(&self, count: u32, offset: u64) -> Result<(u64, Vec<DeviceRow>), StoreError>;
}

/// What a retention purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub observations: u64,
    pub device_events: u64,
    pub rejected: u64,
    /// Score history rows (by evaluation time).
    pub scores: u64,
}

/// Retention by data class (`[retention]`, docs/privacy.md).
pub trait RetentionStore {
    /// Deletes, per class with a cut-off: readings (observations by
    /// effective time, device events, rejected readings), aggregates
    /// (chart buckets, score history) and resolved alerts with their
    /// transitions, older than the class's cut-off (UTC µs). Rows of
    /// patients under a legal hold are kept; batch acks are kept.
    fn purge_classes(&self, cutoffs: &RetentionCutoffs) -> Result<PurgedByClass, StoreError>;
    /// One cut-off for readings and aggregates (`[storage] retention_days`
    /// alone).
    fn purge_before(&self, cutoff_us: i64) -> Result<Purged, StoreError> {
        let p = self.purge_classes(&RetentionCutoffs {
            readings: Some(cutoff_us),
            aggregates: Some(cutoff_us),
            alerts: None,
        })?;
        Ok(Purged {
            observations: p.observations,
            device_events: p.device_events,
            rejected: p.rejected,
            scores: p.scores,
        })
    }
}

/// The whole storage of one backend. Each concern's trait can also be used on
/// its own (`&dyn ObservationStore`), so a part of the hub sees only what it needs.
pub trait Storage:
    GatewayStore
    + IngestStore
    + ObservationStore
    + RetentionStore
    + ScoreStore
    + AlertStore
    + TrendStore
    + AccountStore
    + AuditStore
    + GatewayViewStore
    + AssociationStore
    + StreamStore
    + PrivacyStore
    + LakeStore
    + std::fmt::Debug
    + Send
    + Sync
{
    /// `"sqlite"` or `"postgres"` (logs, metrics, errors).
    fn backend(&self) -> &'static str;
    /// Whether the database answers a query.
    fn ping(&self) -> Result<(), StoreError>;
    /// Whether a point read (one resource, one search page, one trend
    /// series) is answered from local files without network waits, in
    /// well under a millisecond: the API then runs it on its own async
    /// worker instead of handing it to the blocking pool and back (two
    /// thread switches per request). False for a networked database,
    /// whose reads may wait on the network or the connection pool.
    fn reads_are_local(&self) -> bool {
        false
    }
}
