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
    },
    /// Check a config file (and its secrets' permissions) without running.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.cmd {
        Cmd::Run { config } => {
            let cfg = edge_agent::config::AgentConfig::load(&config)?;
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                let _ = tx.send(true);
            });
            edge_agent::run(cfg, rx)
                .await
                .context("edge-agent failed")?;
        }
        Cmd::CheckConfig { config } => {
            let cfg = edge_agent::config::AgentConfig::load(&config)?;
            edge_agent::secrets::load_token(
                cfg.uplink.token_file.as_deref(),
                std::env::var("VIGIL_AGENT_TOKEN").ok(),
            )?;
            if cfg.key_path().exists() {
                edge_agent::secrets::read_private(&cfg.key_path())?;
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
