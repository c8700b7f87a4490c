//! The device kinds the agent can run, built from config. Adding a protocol
//! means one variant here and one in `config::DeviceKind`.

use std::sync::Arc;

use device_drivers::{
    DriverOutput, DriverStats, Protocol, RunOptions, SerialSettings, Shutdown, masimo, run_serial,
};
use tokio::sync::mpsc;

use crate::config::{DeviceConfig, DeviceKind};

/// A configured protocol instance.
#[derive(Debug)]
pub enum AnyProtocol {
    Masimo(masimo::Masimo),
}

fn options<T: serde::de::DeserializeOwned>(table: &toml::Table) -> Result<T, String> {
    toml::Value::Table(table.clone())
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())
}

impl AnyProtocol {
    /// Build the protocol for a device from its kind and options.
    pub fn new(kind: DeviceKind, opts: &toml::Table) -> Result<Self, String> {
        Ok(match kind {
            DeviceKind::MasimoSerial => AnyProtocol::Masimo(masimo::Masimo::new(options(opts)?)?),
        })
    }

    pub fn from_config(d: &DeviceConfig) -> Result<Self, String> {
        Self::new(d.kind, &d.options)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            AnyProtocol::Masimo(p) => p.kind(),
        }
    }

    pub fn manufacturer(&self) -> &'static str {
        match self {
            AnyProtocol::Masimo(p) => p.manufacturer(),
        }
    }

    pub fn default_serial(&self) -> SerialSettings {
        match self {
            AnyProtocol::Masimo(p) => p.default_serial(),
        }
    }

    /// Run on a serial port until shutdown (see `device_drivers::run_serial`).
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        self,
        device_id: String,
        port: String,
        settings: SerialSettings,
        opts: RunOptions,
        stats: Arc<DriverStats>,
        tx: mpsc::Sender<DriverOutput>,
        shutdown: Shutdown,
    ) {
        match self {
            AnyProtocol::Masimo(p) => {
                run_serial(p, device_id, port, settings, opts, stats, tx, shutdown).await
            }
        }
    }
}
