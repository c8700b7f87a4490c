//! The Vigil hub's transport layer: everything that serves HTTP, MQTT and
//! MLLP, and the services those call.
//!
//! - HTTP: one router per concern ([`ingest_api`], [`fhir_api`],
//!   [`association_api`], [`early_warning`], [`score_history`], [`trends`],
//!   [`ward`], [`alerts::api`] with its live stream, [`dashboard`],
//!   [`access`] sessions, the operations routes of [`server`]), each over
//!   its sub-state of the one [`AppState`], merged in [`server::router`]
//!   under the access and audit layers; [`server::serve`] until the hub's
//!   cancellation token.
//! - MQTT: [`mqtt_ingest`], into the same ingest [`pipeline`] as HTTP, with
//!   the [`after_ingest`] consumers.
//! - Kafka / Event Hubs: [`kafka_ingest`], into the same pipeline, with
//!   partition leases and offsets in the store.
//! - MLLP: [`adt_listener`], HL7 ADT into the association procedures.
//!
//! Storage is seen only through the `vigil-hub-storage` traits behind
//! [`Store`]: this crate names no backend (the composition root,
//! `cloud-hub`, opens one and hands it over). Shutdown is one
//! `tokio_util::sync::CancellationToken` the root creates; every
//! long-running part here takes it (or a child of it).

pub mod access;
pub mod adt_listener;
pub mod after_ingest;
pub mod alerts;
pub mod association;
pub mod association_api;
pub mod audit;
pub mod auth;
pub mod config_error;
pub mod dashboard;
pub mod early_warning;
pub mod encoding;
pub mod error;
pub mod export;
pub mod fhir_api;
pub mod identifiers;
pub mod ingest_api;
pub mod kafka_ingest;
pub mod metrics;
pub mod mqtt_ingest;
pub mod pipeline;
pub mod privacy;
mod rate_limit;
pub mod score_history;
pub mod server;
pub mod store;
pub mod trends;
pub mod ward;

pub use hub_domain::{adt, fhir, ingest, scores, stream};
pub use hub_storage as storage;

use std::sync::Arc;

pub use config_error::ConfigError;
pub use error::TransportError;
pub use server::AppState;
pub use store::Store;

/// Shared, cheaply clonable handle to the hub's counters.
pub type SharedMetrics = Arc<metrics::Metrics>;
