//! The analytics lake in the hub (`[lake]`, docs/lake.md): `cloud-hub lake
//! export` and, with `[lake] interval_s`, the export loop of `serve`. The
//! lake itself is `hub_lake`.

use std::time::Duration;

use hub_lake::{ExportOptions, LakeConfig, LakeKey, Progress, Sink, Summary};
use hub_transport::Store;
use tokio_util::sync::CancellationToken;

use crate::HubError;
use crate::config::Config;

/// The config field of the pseudonym key (in errors).
pub const KEY_SETTING: &str = "lake.pseudonym_key_file";

/// What one export needs, opened from `[lake]` (blocking: opens the
/// destination's client; drop it outside async code).
#[derive(Debug)]
pub struct Lake {
    pub sink: Sink,
    pub key: LakeKey,
    pub options: ExportOptions,
}

impl Lake {
    pub fn open(config: &LakeConfig) -> Result<Self, HubError> {
        let key = LakeKey::load(&config.pseudonym_key_file, KEY_SETTING)
            .map_err(hub_lake::LakeError::from)?;
        Ok(Self {
            sink: Sink::open(config)?,
            key,
            options: ExportOptions::from_config(config),
        })
    }

    /// One export under the store's lake lock (None: another hub is
    /// exporting).
    pub fn export(
        &self,
        store: &Store,
        progress: &dyn Progress,
    ) -> Result<Option<Summary>, HubError> {
        Ok(hub_lake::export_exclusive(
            &**store,
            &self.sink,
            &self.key,
            &self.options,
            progress,
        )?)
    }
}

/// The `[lake]` section, or the error naming it.
pub fn lake_config(config: &Config) -> Result<&LakeConfig, HubError> {
    config.lake.as_ref().ok_or_else(|| {
        HubError::Config(crate::ConfigError::invalid(
            "lake",
            "the config has no [lake] section (docs/lake.md)",
        ))
    })
}

/// `cloud-hub lake export`: one export of everything new (the first is the
/// backfill). Returns the summary (None: another hub holds the lock) and
/// where the lake is.
pub fn export(
    config: &Config,
    progress: &dyn Progress,
) -> Result<(Option<Summary>, String), HubError> {
    let lake = Lake::open(lake_config(config)?)?;
    let store = crate::open_store(config)?;
    let summary = lake.export(&store, progress)?;
    Ok((summary, lake.sink.location.clone()))
}

/// `serve` with `[lake] interval_s > 0`: an export every `interval_s`
/// (the first one `interval_s` after start) until `shutdown`; a failed
/// run is logged and retried at the next tick. The export runs on a
/// blocking thread; an export in progress finishes before the hub stops.
pub async fn run(store: Store, config: LakeConfig, shutdown: CancellationToken) {
    let every = Duration::from_secs(config.interval_s.max(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let (s, c) = (store.clone(), config.clone());
        let run = tokio::task::spawn_blocking(move || {
            Lake::open(&c).and_then(|lake| lake.export(&s, &hub_lake::NoProgress))
        });
        match run.await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => tracing::info!("lake export skipped: another hub is exporting"),
            Ok(Err(e)) => tracing::error!(error = %e, "lake export failed; retrying next interval"),
            Err(e) => tracing::error!(error = %e, "lake export task panicked"),
        }
    }
}
