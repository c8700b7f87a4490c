//! The device kinds the agent can run, built from config. Adding a protocol
//! means one variant in `config::DeviceKind`, one here, and one line in
//! `each!`.

use std::sync::Arc;

use device_drivers::{
    DriverOutput, DriverStats, Protocol, RunOptions, SerialSettings, Shutdown, datex, intellivue,
    masimo, medibus, nonin, run_serial,
};
use tokio::sync::mpsc;

use crate::config::{DeviceConfig, DeviceKind};

/// A configured protocol instance.
#[derive(Debug)]
pub enum AnyProtocol {
    Masimo(masimo::Masimo),
    Intellivue(intellivue::Intellivue),
    Datex(datex::Datex),
    Medibus(medibus::Medibus),
    Nonin(nonin::Nonin),
}

/// Run `$body` with `$p` bound to the concrete protocol.
macro_rules! each {
    ($self:expr, $p:ident => $body:expr) => {
        match $self {
            AnyProtocol::Masimo($p) => $body,
            AnyProtocol::Intellivue($p) => $body,
            AnyProtocol::Datex($p) => $body,
            AnyProtocol::Medibus($p) => $body,
            AnyProtocol::Nonin($p) => $body,
        }
    };
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
            DeviceKind::IntellivueSerial => {
                AnyProtocol::Intellivue(intellivue::Intellivue::new(options(opts)?)?)
            }
            DeviceKind::DatexS5Serial => AnyProtocol::Datex(datex::Datex::new(options(opts)?)?),
            DeviceKind::MedibusSerial => {
                AnyProtocol::Medibus(medibus::Medibus::new(options(opts)?)?)
            }
            DeviceKind::NoninSerial => AnyProtocol::Nonin(nonin::Nonin::new(options(opts)?)?),
        })
    }

    pub fn from_config(d: &DeviceConfig) -> Result<Self, String> {
        Self::new(d.kind, &d.options)
    }

    pub fn kind(&self) -> &'static str {
        each!(self, p => p.kind())
    }

    pub fn manufacturer(&self) -> &'static str {
        each!(self, p => p.manufacturer())
    }

    pub fn default_serial(&self) -> SerialSettings {
        each!(self, p => p.default_serial())
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
        each!(self, p => run_serial(p, device_id, port, settings, opts, stats, tx, shutdown).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_with_default_options_and_names_itself() {
        for (kind, name) in [
            (DeviceKind::MasimoSerial, "masimo-serial"),
            (DeviceKind::IntellivueSerial, "intellivue-serial"),
            (DeviceKind::DatexS5Serial, "datex-s5-serial"),
            (DeviceKind::MedibusSerial, "medibus-serial"),
            (DeviceKind::NoninSerial, "nonin-serial"),
        ] {
            let p = AnyProtocol::new(kind, &toml::Table::new()).unwrap();
            assert_eq!(p.kind(), name);
            // The config spelling of the kind is the protocol's own name.
            let parsed: DeviceKind = toml::Value::String(name.into()).try_into().unwrap();
            assert_eq!(parsed, kind);
        }
    }
}
