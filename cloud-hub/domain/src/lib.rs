//! The hub's domain: what Vigil knows about readings, patients, scores and
//! alerts, as pure functions and types. No I/O, no SQL, no HTTP: the storage
//! crates persist what this crate decides, the transport layer serves it.
//!
//! - [`fhir`]: reading → FHIR R4 Observation mapping, search parameters,
//!   rendering of stored rows on read.
//! - [`ingest`]: validation of a batch's readings against the catalogue.
//! - [`association`]: beds, patient identifiers, occupancy.
//! - [`adt`]: HL7 v2 ADT → patient movements.
//! - [`scores`]: NEWS2, qSOFA, MEWS (published tables, cited);
//!   [`early_warning`]: a patient's inputs and score report.
//! - [`alerts`]: the alert engine and its rules.
//! - [`audit`]: the audit log's hash chain and its verification.
//! - [`identifiers`]: patient identifier systems (HL7 authorities) as URIs.
//! - [`gateway_activity`]: the dashboard's per-gateway batch totals.
//! - [`trends`]: chart buckets and trend slopes.
//! - [`privacy`]: subject keys, erasure tombstones, retention classes.
//! - [`stream`]: the Kafka / Event Hubs source's record headers and partition leases.

pub mod adt;
pub mod alerts;
pub mod association;
pub mod audit;
pub mod clock;
pub mod early_warning;
pub mod fhir;
pub mod gateway_activity;
pub mod identifiers;
pub mod ingest;
pub mod login_throttle;
pub mod privacy;
pub mod score_history;
pub mod scores;
pub mod stream;
pub mod trends;
