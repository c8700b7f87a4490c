//! `device-sim`: plays the device side of each supported protocol on a real
//! port, for tests, the demo and a biomedical engineer's bench.

use clap::{Parser, Subcommand};

mod datex;
mod hl7;
mod intellivue;
mod masimo;
mod medibus;
mod modbus;
mod nonin;

#[derive(Debug, Parser)]
#[command(
    name = "device-sim",
    version,
    about = "Bedside device simulators for Vigil"
)]
struct Cli {
    #[command(subcommand)]
    device: Device,
}

#[derive(Debug, Subcommand)]
enum Device {
    /// Masimo Radical-7 / Rad-8 pulse oximeter, "ASCII 1" serial output.
    Masimo(masimo::MasimoArgs),
    /// Philips IntelliVue MP-series monitor, Data Export over MIB/RS232, 115200 8N1.
    Intellivue(intellivue::IntellivueArgs),
    /// Dräger ventilator (Evita/Savina/Primus), MEDIBUS.X slow data, 19200 8E1.
    Medibus(medibus::MedibusArgs),
    /// GE Datex-Ohmeda S/5 monitor, computer interface (DRI), displayed values.
    Datex(datex::DatexArgs),
    /// Nonin OEM pulse oximeter module, serial Data Format 7 (9600 8N1, 75 frames/s).
    Nonin(nonin::NoninArgs),
    /// HL7 v2 sender: ORU^R01 messages over MLLP (TCP) to an agent's listener, one ACK each.
    Hl7(hl7::Hl7Args),
    /// Modbus device (ventilator, multi-parameter module, …) per a register
    /// map: Modbus TCP server (`--listen`) or RTU slave (`--port`).
    Modbus(modbus::ModbusArgs),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.device {
        Device::Masimo(args) => masimo::run(args).await,
        Device::Intellivue(args) => intellivue::run(args).await,
        Device::Medibus(args) => medibus::run(args).await,
        Device::Datex(args) => datex::run(args).await,
        Device::Nonin(args) => nonin::run(args).await,
        Device::Hl7(args) => hl7::run(args).await,
        Device::Modbus(args) => modbus::run(args).await,
    }
}
