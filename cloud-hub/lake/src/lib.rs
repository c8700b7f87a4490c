//! The de-identified analytics lake (docs/lake.md): readings and score
//! history exported incrementally as Parquet files through `object_store`,
//! to a local directory or an Azure Blob Storage / ADLS Gen2 container.
//!
//! - **bronze**: every stored reading as received (identified data);
//! - **silver**: validated, normalized readings of attributed patients,
//!   de-identified: the patient as a keyed pseudonym, no identifier, no
//!   free text, times kept or shifted per patient;
//! - **gold**: per patient-hour aggregates and the score history.
//!
//! The pure parts (rows and de-identification in [`rows`], pseudonyms and
//! date shifts in [`key`], aggregation in [`gold`], the Parquet encoding in
//! [`parquet_io`]) do no I/O; [`sink`] is the object store and [`export`]
//! the run, which reads the hub's store only through the `hub_storage`
//! traits ([`export::LakeSource`]).

pub mod config;
pub mod export;
pub mod gold;
pub mod key;
pub mod parquet_io;
pub mod rows;
pub mod sink;
pub mod state;

use std::path::PathBuf;

pub use config::{AzureConfig, Destination, LakeConfig};
pub use export::{
    ExportOptions, LakeSource, NoProgress, Progress, Summary, export, export_exclusive, layer_sizes,
};
pub use key::{KeyError, LakeKey, keygen};
pub use sink::Sink;

/// Errors of a lake export.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("invalid lake config: {0}")]
    Config(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("lake {op} of `{path}` failed: {source}")]
    Store {
        op: &'static str,
        path: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("lake directory {path}: {source}")]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the lake's I/O runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the lake's state object does not parse: {0}")]
    State(#[source] serde_json::Error),
    #[error("{0}")]
    Mismatch(String),
    #[error("reading the hub's store: {0}")]
    Source(#[from] hub_storage::StoreError),
    #[error(transparent)]
    Parquet(#[from] parquet_io::ParquetError),
    /// The fault injected by `ExportOptions::fail_after_files`.
    #[error("export stopped by the injected fault (test)")]
    Injected,
}
