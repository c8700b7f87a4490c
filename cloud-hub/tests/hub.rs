//! The hub's wire-level tests in one test binary. Every integration-test binary links the
//! whole hub, so one binary (instead of one per file) keeps the suite's build short on 2
//! cores. Each file beside this one is a module of it (`cargo nextest run -p cloud-hub --test
//! hub -- access::` runs one); `common` and `pg_server` are the helpers they share.

#[path = "support/azurite.rs"]
mod azurite;
#[path = "common/mod.rs"]
mod common;
#[path = "support/iothub_routing.rs"]
mod iothub_routing;
#[path = "support/pg_server.rs"]
mod pg_server;
#[path = "support/tansu.rs"]
mod tansu;

#[path = "access.rs"]
mod access;
#[path = "adt_mllp.rs"]
mod adt_mllp;
#[path = "alerts.rs"]
mod alerts;
#[path = "association_api.rs"]
mod association_api;
#[path = "audit.rs"]
mod audit;
#[path = "backup.rs"]
mod backup;
#[path = "bad_input.rs"]
mod bad_input;
#[path = "bulk_export.rs"]
mod bulk_export;
#[path = "dashboard.rs"]
mod dashboard;
#[path = "early_warning.rs"]
mod early_warning;
#[path = "fhir_api.rs"]
mod fhir_api;
#[path = "fhir_resources.rs"]
mod fhir_resources;
#[path = "fhir_validator.rs"]
mod fhir_validator;
#[path = "gateway_rotate.rs"]
mod gateway_rotate;
#[path = "hub_postgres.rs"]
mod hub_postgres;
#[path = "identifier_systems.rs"]
mod identifier_systems;
#[path = "ingest.rs"]
mod ingest;
#[path = "ingest_encoding.rs"]
mod ingest_encoding;
#[path = "kafka_source.rs"]
mod kafka_source;
#[path = "lake.rs"]
mod lake;
#[path = "mqtt_ingest.rs"]
mod mqtt_ingest;
#[path = "mtls.rs"]
mod mtls;
#[path = "privacy.rs"]
mod privacy;
#[path = "rate_limit.rs"]
mod rate_limit;
#[path = "replicas.rs"]
mod replicas;
#[path = "score_history.rs"]
mod score_history;
#[path = "storage_suite.rs"]
mod storage_suite;
#[path = "subject.rs"]
mod subject;
#[path = "tls_and_cli.rs"]
mod tls_and_cli;
#[path = "trace_context.rs"]
mod trace_context;
#[path = "trends.rs"]
mod trends;
#[path = "ward.rs"]
mod ward;
