//! The device kinds the agent can run, built from config. Adding a protocol
//! means one variant in `config::DeviceKind`, one here, and one line in
//! `each!`.

use std::sync::Arc;

use device_drivers::udp::UdpLink;
use device_drivers::{
    DriverOutput, DriverStats, Protocol, RunOptions, SerialSettings, Shutdown, datex, intellivue,
    masimo, medibus, modbus, nonin, run_link, run_serial,
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
    IntellivueLan(intellivue::IntellivueLan),
    ModbusTcp(modbus::Modbus),
    ModbusRtu(modbus::Modbus),
}

/// Where a device's link comes from.
#[derive(Debug, Clone)]
pub enum LinkTarget {
    Serial {
        port: String,
        settings: SerialSettings,
    },
    Tcp {
        address: String,
    },
    Udp {
        address: String,
    },
    /// Bluetooth LE (`ble`): run by [`ble_task`], never as a link.
    Ble {
        address: Option<String>,
    },
    /// Listener kinds (`hl7-mllp`): the device connects to the agent; run
    /// by the agent's listener, never as a driver link.
    Listen {
        address: String,
    },
}

impl LinkTarget {
    /// The target of a configured device (its transport decides).
    pub fn of(dev: &DeviceConfig, proto: &AnyProtocol) -> LinkTarget {
        use crate::config::Transport;
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        match dev.kind.transport() {
            Transport::Serial => LinkTarget::Serial {
                port: text(&dev.port),
                settings: proto.default_serial().with(&dev.serial),
            },
            Transport::Tcp => LinkTarget::Tcp {
                address: text(&dev.address),
            },
            Transport::Udp => LinkTarget::Udp {
                address: text(&dev.address),
            },
            Transport::Ble => LinkTarget::Ble {
                address: dev.address.clone(),
            },
            Transport::Listener => LinkTarget::Listen {
                address: text(&dev.listen),
            },
        }
    }
}

/// The validated options of a `ble` device.
pub fn ble_config(dev: &DeviceConfig) -> Result<device_drivers::ble::Ble, String> {
    device_drivers::ble::Ble::new(options(&dev.options)?)
}

/// The driver task of a `ble` device (see `device_drivers::ble::run`).
#[cfg(feature = "ble")]
pub fn ble_task(
    dev: &DeviceConfig,
    stats: Arc<DriverStats>,
    tx: mpsc::Sender<DriverOutput>,
    shutdown: Shutdown,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, String> {
    let ble = ble_config(dev)?;
    Ok(device_drivers::ble::run(
        ble,
        dev.id.clone(),
        dev.address.clone(),
        RunOptions::default(),
        stats,
        tx,
        shutdown,
    ))
}

/// Without the `ble` feature a `ble` device is refused at start-up.
#[cfg(not(feature = "ble"))]
pub fn ble_task(
    _dev: &DeviceConfig,
    _stats: Arc<DriverStats>,
    _tx: mpsc::Sender<DriverOutput>,
    _shutdown: Shutdown,
) -> Result<std::future::Ready<()>, String> {
    Err("this edge-agent was built without the `ble` feature".into())
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
            AnyProtocol::IntellivueLan($p) => $body,
            AnyProtocol::ModbusTcp($p) => $body,
            AnyProtocol::ModbusRtu($p) => $body,
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
            DeviceKind::IntellivueLan => {
                AnyProtocol::IntellivueLan(intellivue::IntellivueLan::new(options(opts)?)?)
            }
            DeviceKind::ModbusTcp => {
                AnyProtocol::ModbusTcp(modbus::Modbus::new(modbus::Framing::Tcp, options(opts)?)?)
            }
            DeviceKind::ModbusRtu => {
                AnyProtocol::ModbusRtu(modbus::Modbus::new(modbus::Framing::Rtu, options(opts)?)?)
            }
            DeviceKind::Ble => {
                return Err(
                    "ble is run by the BLE driver (devices::ble_task), not as a link".into(),
                );
            }
            DeviceKind::Hl7Mllp => {
                return Err(
                    "hl7-mllp is a listener (the device connects to the agent), not a driver"
                        .into(),
                );
            }
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

    /// Run on its link until shutdown (see `device_drivers::run_link`).
    pub async fn run(
        self,
        device_id: String,
        target: LinkTarget,
        opts: RunOptions,
        stats: Arc<DriverStats>,
        tx: mpsc::Sender<DriverOutput>,
        shutdown: Shutdown,
    ) {
        match target {
            LinkTarget::Serial { port, settings } => {
                each!(self, p => run_serial(p, device_id, port, settings, opts, stats, tx, shutdown).await)
            }
            LinkTarget::Tcp { address } => {
                let a = address.clone();
                let connect = move || tokio::net::TcpStream::connect(a.clone());
                each!(self, p => run_link(p, device_id, address.clone(), connect.clone(), opts, stats, tx, shutdown).await)
            }
            LinkTarget::Udp { address } => {
                let a = address.clone();
                let connect = move || {
                    let a = a.clone();
                    async move { UdpLink::connect(&a).await }
                };
                each!(self, p => run_link(p, device_id, address.clone(), connect.clone(), opts, stats, tx, shutdown).await)
            }
            LinkTarget::Ble { .. } => {
                tracing::error!(device_id = %device_id, "ble devices are run by the BLE driver, not as links");
            }
            LinkTarget::Listen { .. } => {
                tracing::error!(device_id = %device_id, "listener kinds are not run as drivers");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modbus_kinds_build_with_a_register_map_and_name_themselves() {
        let map = concat!(env!("CARGO_MANIFEST_DIR"), "/maps/sim-ventilator.toml");
        let mut opts = toml::Table::new();
        opts.insert("map".into(), map.into());
        for (kind, name) in [
            (DeviceKind::ModbusTcp, "modbus-tcp"),
            (DeviceKind::ModbusRtu, "modbus-rtu"),
        ] {
            let p = AnyProtocol::new(kind, &opts).unwrap();
            assert_eq!(p.kind(), name);
            let parsed: DeviceKind = toml::Value::String(name.into()).try_into().unwrap();
            assert_eq!(parsed, kind);
            // Without a map the device is refused with the reason.
            let err = AnyProtocol::new(kind, &toml::Table::new()).unwrap_err();
            assert!(err.contains("register map is required"), "{err}");
        }
        // RTU default: 19200 8E1 (Modbus over Serial Line §2.5.1).
        let p = AnyProtocol::new(DeviceKind::ModbusRtu, &opts).unwrap();
        assert_eq!(p.default_serial().to_string(), "19200 8E1");
    }

    #[test]
    fn every_kind_builds_with_default_options_and_names_itself() {
        for (kind, name) in [
            (DeviceKind::MasimoSerial, "masimo-serial"),
            (DeviceKind::IntellivueSerial, "intellivue-serial"),
            (DeviceKind::DatexS5Serial, "datex-s5-serial"),
            (DeviceKind::MedibusSerial, "medibus-serial"),
            (DeviceKind::NoninSerial, "nonin-serial"),
            (DeviceKind::IntellivueLan, "intellivue-lan"),
        ] {
            let p = AnyProtocol::new(kind, &toml::Table::new()).unwrap();
            assert_eq!(p.kind(), name);
            // The config spelling of the kind is the protocol's own name.
            let parsed: DeviceKind = toml::Value::String(name.into()).try_into().unwrap();
            assert_eq!(parsed, kind);
        }
    }
}
