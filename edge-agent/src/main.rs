//! `edge-agent`: thin binary over the library. Loads config, starts
//! tracing, runs until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "edge-agent", version, about = "Vigil gateway agent")]
struct Cli {
    /// Log format: human-readable text or JSON lines (production).
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "VIGIL_LOG_FORMAT",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Read the configured devices and forward their readings to the hub.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Start although buffered records are sealed under a buffer key
        /// that no configured key opens (lost or replaced key file). They
        /// stay stored and are sent once the key is restored; the loss is
        /// counted and reported to the hub. Prefer restoring the key.
        #[arg(long)]
        accept_key_loss: bool,
    },
    /// Watch one device live: raw bytes both ways and what they decode to.
    Probe {
        /// Protocol, as in the config's `kind` (e.g. masimo-serial).
        #[arg(long)]
        kind: String,
        /// Serial port, e.g. /dev/ttyUSB0 (or host:port for network kinds).
        #[arg(long, visible_alias = "address")]
        port: String,
        /// Protocol options as inline TOML, e.g. 'clock_offset_minutes = 60'.
        #[arg(long, default_value = "")]
        options: String,
        /// Override the protocol's baud rate.
        #[arg(long)]
        baud_rate: Option<u32>,
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// Do not print raw bytes, only decoded data.
        #[arg(long)]
        no_raw: bool,
    },
    /// Set this gateway up from a one-time enrolment token: buffer key,
    /// gateway credentials from the hub, a validated config. Safe to re-run.
    Provision {
        /// Base URL of the hub, e.g. https://hub.example.org
        #[arg(long)]
        hub: String,
        /// One-time token from `cloud-hub enrollment create`.
        #[arg(long, env = "VIGIL_ENROLLMENT_TOKEN", hide_env_values = true)]
        enrollment_token: String,
        #[arg(long)]
        gateway_id: String,
        /// Directory for agent.toml, gateway.token and the buffer.
        #[arg(long)]
        out: PathBuf,
        /// PEM CA bundle to trust for the hub.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Make a new buffer key; the old one is kept until its data is
    /// delivered. Restart the agent afterwards.
    RotateKey {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file (and its secrets' permissions) without running.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check everything before leaving the bedside: config, secrets, each
    /// device's link, the hub. Exit code 1 when anything fails.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Logs to stderr (filtered by RUST_LOG); with `traces`, also the trace
/// spans to the OpenTelemetry collector (`edge_agent::telemetry`).
fn init_tracing(format: LogFormat, traces: Option<&edge_agent::telemetry::Telemetry>) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // Trace spans are for the collector, not for the log lines.
        .add_directive(
            format!("{}=off", edge_agent::telemetry::TRACE_TARGET)
                .parse()
                .expect("static directive"),
        );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(traces.map(|t| t.layer()))
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Traces only for `run` (the forwarder's batch sends), from the standard
    // OTEL_* environment; off when no collector is named.
    let otlp = match cli.cmd {
        Cmd::Run { .. } => {
            edge_agent::telemetry::OtlpConfig::from_env(edge_agent::telemetry::DEFAULT_SERVICE_NAME)
                .context("OpenTelemetry settings")?
        }
        _ => None,
    };
    let telemetry = otlp
        .as_ref()
        .map(edge_agent::telemetry::Telemetry::start)
        .transpose()
        .context("starting the OpenTelemetry trace export")?;
    init_tracing(cli.log_format, telemetry.as_ref());
    if let Some(c) = &otlp {
        tracing::info!(endpoint = %c.traces_url, service = %c.service_name,
            "exporting OpenTelemetry traces");
    }
    let result = command(cli).await;
    if let Some(t) = telemetry {
        // Flushes the last spans; blocking, so off the async workers.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    result
}

async fn command(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Run {
            config,
            accept_key_loss,
        } => {
            let mut cfg = edge_agent::config::AgentConfig::load(&config)?;
            for w in cfg.warnings() {
                tracing::warn!("config: {w}");
            }
            cfg.buffer.accept_key_loss |= accept_key_loss;
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                let _ = tx.send(true);
            });
            edge_agent::run(cfg, rx)
                .await
                .context("edge-agent failed")?;
        }
        Cmd::Probe {
            kind,
            port,
            options,
            baud_rate,
            seconds,
            no_raw,
        } => {
            #[derive(serde::Deserialize)]
            struct K {
                kind: edge_agent::config::DeviceKind,
            }
            let kind = toml::from_str::<K>(&format!("kind = {kind:?}"))
                .map_err(|e| anyhow::anyhow!("--kind: {}", e.message()))?
                .kind;
            let options: toml::Table =
                toml::from_str(&options).context("--options is not valid TOML")?;
            let serial = device_drivers::SerialOverrides {
                baud_rate,
                ..Default::default()
            };
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                let _ = tx.send(true);
            });
            let args = edge_agent::probe::ProbeArgs {
                kind,
                port,
                options,
                serial,
                duration: seconds.map(std::time::Duration::from_secs),
                raw: !no_raw,
            };
            let s = edge_agent::probe::run(args, rx)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            println!(
                "counters: bytes {} frames ok {} bad {} bytes dropped {} link errors {}",
                s.bytes_read, s.frames_ok, s.frames_bad, s.bytes_dropped, s.link_errors
            );
        }
        Cmd::Provision {
            hub,
            enrollment_token,
            gateway_id,
            out,
            ca_file,
        } => {
            let args = edge_agent::provision::ProvisionArgs {
                hub,
                enrollment_token,
                gateway_id,
                out,
                ca_file,
            };
            match edge_agent::provision::provision(&args).await? {
                edge_agent::provision::Outcome::Provisioned { config } => println!(
                    "gateway {} provisioned: {} (add [[device]] tables, then: edge-agent run --config {})",
                    args.gateway_id,
                    config.display(),
                    config.display()
                ),
                edge_agent::provision::Outcome::AlreadyProvisioned { config } => {
                    println!(
                        "gateway {} already provisioned: {} (nothing changed)",
                        args.gateway_id,
                        config.display()
                    )
                }
            }
        }
        Cmd::RotateKey { config } => {
            let cfg = edge_agent::config::AgentConfig::load(&config)?;
            let (old, new) = edge_agent::secrets::rotate_key(&cfg.key_path())?;
            println!(
                "buffer key rotated: {} -> {} (the old key is kept until its records are delivered; restart the agent)",
                hex::encode(old),
                hex::encode(new)
            );
        }
        Cmd::Check { config } => {
            let findings = edge_agent::check::check(&config).await;
            print!("{}", edge_agent::check::render(&findings));
            if findings.iter().any(|f| !f.ok) {
                std::process::exit(1);
            }
        }
        Cmd::CheckConfig { config } => {
            let cfg = edge_agent::config::AgentConfig::load(&config)?;
            match (&cfg.uplink.kind, &cfg.uplink.iothub) {
                // An IoT Edge module: the IOTEDGE_* environment was checked
                // while loading; its credentials are the workload API's
                // (`edge-agent check` asks it).
                (edge_agent::config::UplinkKind::IothubMqtt, _)
                    if cfg.uplink.iot_edge()?.is_some() => {}
                // IoT Hub: the device key file (0600, base64) or the client
                // certificate and key must load; no connection is made.
                (edge_agent::config::UplinkKind::IothubMqtt, Some(h)) => {
                    edge_agent::iothub::credentials_check(
                        h,
                        &cfg.data_dir,
                        cfg.uplink.request_timeout(),
                    )?;
                }
                _ => {
                    edge_agent::secrets::load_token(
                        cfg.uplink.token_file.as_deref(),
                        std::env::var("VIGIL_AGENT_TOKEN").ok(),
                    )?;
                    // Pinned CA and client certificate (key 0600) must load.
                    edge_agent::uplink::https_tls_config(&cfg.uplink)?;
                }
            }
            if cfg.key_path().exists() {
                edge_agent::secrets::read_private(&cfg.key_path())?;
            }
            // Ports another process holds (e.g. a second agent on this
            // host): `run` would fail on them after opening the others.
            for (field, addr) in cfg.listen_addresses() {
                if let Err(e) = std::net::TcpListener::bind(addr) {
                    anyhow::bail!("{field}: cannot listen on {addr}: {e}");
                }
            }
            for w in cfg.warnings() {
                println!("warning: {w}");
            }
            println!(
                "config OK: gateway {} with {} device(s)",
                cfg.gateway_id,
                cfg.devices.len()
            );
        }
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
