//! `cloud-hub` binary: CLI, logging, config loading; the work is in the
//! library.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use cloud_hub::{Config, Hub};

/// mimalloc instead of glibc's malloc: rendering FHIR JSON allocates many
/// small objects from several threads, where glibc's arenas spent about a
/// third of the hub's CPU under the `fhir_load` bench (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "cloud-hub", version, about = "Vigil cloud hub")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(
        long,
        global = true,
        env = "VIGIL_HUB_CONFIG",
        default_value = "hub.toml"
    )]
    config: PathBuf,
    /// Log format (logs go to stderr; filter with RUST_LOG).
    #[arg(long, global = true, env = "VIGIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve ingest and the FHIR API until SIGINT/SIGTERM.
    Serve,
    /// Manage gateways and their tokens.
    Gateway {
        #[command(subcommand)]
        command: GatewayCommand,
    },
    /// Local users of the dashboard and API (Argon2id passwords).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// API bearer tokens for scripts and integrations.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// One-time enrolment tokens for `edge-agent provision`.
    Enrollment {
        #[command(subcommand)]
        command: EnrollmentCommand,
    },
    /// Copy the embedded database to a new file while the hub runs
    /// (online backup; the copy is integrity-checked and written 0600).
    Backup {
        /// The backup file to create (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// The hash-chained audit log: verify it, export it as FHIR AuditEvent.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The de-identified analytics lake (`[lake]`; docs/lake.md).
    Lake {
        #[command(subcommand)]
        command: LakeCommand,
    },
    /// Patients' rights: subject access, erasure, legal hold
    /// (docs/privacy.md).
    Patient {
        #[command(subcommand)]
        command: PatientCommand,
    },
    /// Replace the embedded database with a backup (stop the hub first).
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// Replace an existing database.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LakeCommand {
    /// Export everything stored since the last export (the first run is the
    /// backfill) as bronze, silver and gold Parquet files to the `[lake]`
    /// destination; progress and ETA on stderr, then a summary line.
    Export,
    /// Write a new random pseudonym key (for `[lake] pseudonym_key_file`;
    /// 0600).
    Keygen {
        /// The key file to create (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PatientCommand {
    /// Print everything the hub holds about a patient as FHIR NDJSON
    /// (Patient, Observation, Encounter, Flag, AuditEvent) on stdout.
    Everything {
        /// The patient id (identifier value, as in `Patient/{id}`).
        id: String,
    },
    /// Erase a patient's data from every table (irreversible); a
    /// tombstone keeps late data for them out. Refused under a legal hold.
    Erase {
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Put a patient's data under legal hold (blocks erasure and retention).
    Hold {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Lift a patient's legal hold.
    Release { id: String },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute the chain (MACs with `[audit] key_file` and any retired
    /// keys) and check it against every checkpoint; exit status 1 when an
    /// entry was edited, inserted or removed. Prints the head (SEQ:HASH)
    /// to record as the next anchor.
    Verify {
        /// A head recorded earlier (SEQ:HASH) that must still be in the
        /// chain (detects removal of the newest entries).
        #[arg(long)]
        anchor: Option<String>,
        /// A file of checkpoints kept outside the database (the hub's
        /// `checkpoint_file`, or its JSON log lines with target
        /// `vigil_audit_checkpoint`); repeatable.
        #[arg(long)]
        checkpoints: Vec<PathBuf>,
    },
    /// Write the entries as FHIR R4 AuditEvent NDJSON.
    Export {
        /// The file to create (0600).
        #[arg(long)]
        out: PathBuf,
        /// First entry to export.
        #[arg(long, default_value_t = 1)]
        since: i64,
    },
    /// Write a new random audit key (for `[audit] key_file`; 0600).
    Keygen {
        /// The key file to create (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Take a checkpoint of the head now (the running hub takes them by
    /// itself; e.g. before a maintenance window).
    Checkpoint,
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create a user.
    Add {
        name: String,
        /// clinician, biomed, operator, admin or privacy.
        #[arg(long)]
        role: cloud_hub::access::Role,
        /// File holding the password on its first line (mode 0600), or `-`
        /// for standard input. At least 12 characters.
        #[arg(long)]
        password_file: PathBuf,
    },
    /// Set a new password (the user's sessions end).
    Passwd {
        name: String,
        #[arg(long)]
        password_file: PathBuf,
    },
    /// Disable a user (no more logins; the user's sessions end).
    Disable { name: String },
    /// List users (never password hashes).
    List,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create an API token; prints it alone on stdout (shown once).
    Create {
        name: String,
        /// clinician, biomed, operator, admin or privacy.
        #[arg(long)]
        role: cloud_hub::access::Role,
    },
    /// Revoke an API token.
    Revoke { name: String },
    /// List API tokens (never the tokens).
    List,
}

#[derive(Debug, Subcommand)]
enum EnrollmentCommand {
    /// Create a one-time enrolment token; prints it alone on stdout.
    Create {
        /// Hours until the token expires.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
    },
}

#[derive(Debug, Subcommand)]
enum GatewayCommand {
    /// Create a gateway; prints its bearer token alone on stdout.
    Add { gateway_id: String },
    /// List gateways (never tokens).
    List,
    /// Revoke a gateway's token.
    Revoke { gateway_id: String },
    /// Give a gateway a new token; prints it alone on stdout. The old token
    /// stops working (after --grace-secs, if given).
    Rotate {
        gateway_id: String,
        /// Seconds during which the old token still works too (at most
        /// 604800 = 7 days; 0 = it stops at once).
        #[arg(long, default_value_t = 0)]
        grace_secs: u64,
    },
}

/// Logs to stderr (filtered by RUST_LOG) and, with `traces` (`serve`) and
/// when the `OTEL_*` environment names a collector, trace spans to it
/// (`cloud_hub::telemetry`).
fn init_logging(
    format: LogFormat,
    traces: bool,
) -> Result<Option<cloud_hub::telemetry::Telemetry>> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // RUST_LOG, with directives for the hub also naming the transport
    // layer's crate (`cloud_hub::telemetry::log_filter`).
    let filter = std::env::var(tracing_subscriber::EnvFilter::DEFAULT_ENV)
        .ok()
        .and_then(|spec| {
            tracing_subscriber::EnvFilter::try_new(cloud_hub::telemetry::log_filter(&spec)).ok()
        })
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"))
        // Trace spans are for the collector, not for the log lines.
        .add_directive(
            format!("{}=off", cloud_hub::telemetry::TRACE_TARGET)
                .parse()
                .expect("static directive"),
        );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let otlp = if traces {
        cloud_hub::telemetry::OtlpConfig::from_env(cloud_hub::telemetry::DEFAULT_SERVICE_NAME)
            .context("OpenTelemetry settings")?
    } else {
        None
    };
    let telemetry = otlp
        .as_ref()
        .map(cloud_hub::telemetry::Telemetry::start)
        .transpose()
        .context("starting the OpenTelemetry trace export")?;
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(telemetry.as_ref().map(|t| t.layer()))
        .init();
    if let Some(c) = &otlp {
        tracing::info!(endpoint = %c.traces_url, service = %c.service_name,
            "exporting OpenTelemetry traces");
    }
    Ok(telemetry)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let telemetry = init_logging(cli.log_format, matches!(cli.command, Command::Serve))?;
    let result = run(cli);
    if let Some(t) = telemetry {
        t.shutdown();
    }
    result
}

fn run(cli: Cli) -> Result<()> {
    // A new key needs no configuration.
    if let Command::Audit {
        command: AuditCommand::Keygen { out },
    } = &cli.command
    {
        let id = cloud_hub::audit::keygen(out).context("writing the audit key")?;
        eprintln!(
            "Audit key {id} written to {} (0600). Set [audit] key_file to it and keep a copy \
             where the database's administrators cannot read it.",
            out.display()
        );
        return Ok(());
    }
    if let Command::Lake {
        command: LakeCommand::Keygen { out },
    } = &cli.command
    {
        let id = hub_lake::keygen(out).context("writing the lake pseudonym key")?;
        eprintln!(
            "Lake pseudonym key {id} written to {} (0600). Set [lake] pseudonym_key_file to it and \
             keep it outside the lake: whoever holds it can link pseudonyms to patients.",
            out.display()
        );
        return Ok(());
    }
    let config = Config::load(&cli.config)
        .with_context(|| format!("loading config {}", cli.config.display()))?;
    match cli.command {
        Command::Lake {
            command: LakeCommand::Export,
        } => lake_export(&config),
        Command::Lake {
            command: LakeCommand::Keygen { .. },
        } => unreachable!("handled before the config is loaded"),
        Command::Serve => serve(config),
        Command::Gateway { command } => gateway(&config, command),
        Command::Audit { command } => audit(&config, command),
        Command::Patient { command } => patient(&config, command),
        Command::User { command } => user(&config, command),
        Command::Token { command } => token(&config, command),
        Command::Backup { .. } | Command::Restore { .. }
            if config.storage.backend == cloud_hub::config::StorageBackend::Postgres =>
        {
            anyhow::bail!(
                "backup and restore are for the SQLite backend; with storage.backend = \"postgres\" \
                 use PostgreSQL's own tools (pg_dump / pg_restore, or continuous archiving)"
            )
        }
        Command::Backup { out } => {
            let db = &config.storage.sqlite_path;
            let pages = hub_sqlite::backup::backup(db, &out)
                .with_context(|| format!("backing up {} to {}", db.display(), out.display()))?;
            eprintln!(
                "Backup of {} written to {} ({pages} pages, integrity checked).",
                db.display(),
                out.display()
            );
            Ok(())
        }
        Command::Restore { from, force } => {
            let db = &config.storage.sqlite_path;
            hub_sqlite::backup::restore(&from, db, force)
                .with_context(|| format!("restoring {} from {}", db.display(), from.display()))?;
            eprintln!("{} restored from {}.", db.display(), from.display());
            Ok(())
        }
        Command::Enrollment {
            command: EnrollmentCommand::Create { ttl_hours },
        } => {
            let ttl = std::time::Duration::from_secs(ttl_hours.saturating_mul(3600));
            let token = cloud_hub::enrollment_create(&config, ttl)
                .context("creating an enrolment token")?;
            println!("{token}");
            eprintln!(
                "One-time enrolment token, valid for {ttl_hours} h. On the gateway: \
edge-agent provision --hub <hub url> --enrollment-token <token> --gateway-id <id> --out <dir>"
            );
            Ok(())
        }
    }
}

fn patient(config: &Config, command: PatientCommand) -> Result<()> {
    match command {
        PatientCommand::Everything { id } => {
            let record = cloud_hub::patient_everything(config, &id)
                .with_context(|| format!("reading patient `{id}`"))?;
            let mut out = std::io::stdout().lock();
            for line in &record {
                writeln!(out, "{line}")?;
            }
            eprintln!("{} resources of patient `{id}`.", record.len());
            Ok(())
        }
        PatientCommand::Erase { id, reason } => {
            let e = cloud_hub::patient_erase(config, &id, &reason)
                .with_context(|| format!("erasing patient `{id}`"))?;
            let c = &e.counts;
            eprintln!(
                "Patient `{id}` erased (tombstone {}, {} device windows): {} observations, \
                 {} stays, {} manual inputs, {} alerts, {} scores, {} chart buckets removed.",
                e.tombstone_id,
                e.windows.len(),
                c.observations,
                c.stays,
                c.manual_inputs,
                c.alerts,
                c.scores,
                c.chart_buckets
            );
            Ok(())
        }
        PatientCommand::Hold { id, reason } => {
            cloud_hub::patient_hold(config, &id, Some(&reason))
                .with_context(|| format!("holding patient `{id}`"))?;
            eprintln!("Patient `{id}` is under legal hold.");
            Ok(())
        }
        PatientCommand::Release { id } => {
            cloud_hub::patient_hold(config, &id, None)
                .with_context(|| format!("releasing patient `{id}`"))?;
            eprintln!("Patient `{id}`'s legal hold is lifted.");
            Ok(())
        }
    }
}

fn audit(config: &Config, command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify {
            anchor,
            checkpoints,
        } => {
            let anchor = anchor
                .as_deref()
                .map(|a| {
                    let (seq, hash) = a
                        .split_once(':')
                        .context("--anchor must be SEQ:HASH as printed by `audit verify`")?;
                    let seq: i64 = seq.parse().context("--anchor SEQ is not a number")?;
                    Ok::<_, anyhow::Error>((seq, hash.to_owned()))
                })
                .transpose()?;
            let v = cloud_hub::audit_verify(
                config,
                anchor.as_ref().map(|(s, h)| (*s, h.as_str())),
                &checkpoints,
            )
            .context("verifying the audit log")?;
            let keyed = match v.keyed_from {
                Some(1) => "keyed (HMAC-SHA256) throughout".to_owned(),
                Some(k) => format!("keyed (HMAC-SHA256) from entry {k}, unkeyed before"),
                None => "NOT KEYED: without [audit] key_file anyone with the database could \
                         have rewritten it"
                    .to_owned(),
            };
            match (&v.broken, &v.head) {
                (Some((seq, why)), _) => {
                    eprintln!(
                        "AUDIT LOG TAMPERED: entry {seq} {why} ({} entries read, {} checkpoints).",
                        v.entries, v.checkpoints
                    );
                    std::process::exit(1);
                }
                (None, Some((seq, hash))) => {
                    println!("{seq}:{hash}");
                    eprintln!(
                        "Audit log intact: {} entries, chain verified, {keyed}; {} checkpoints \
                         match. Head above: record it as the next --anchor.",
                        v.entries, v.checkpoints
                    );
                }
                (None, None) => eprintln!(
                    "Audit log is empty (no checkpoint says otherwise: {} checked).",
                    v.checkpoints
                ),
            }
            Ok(())
        }
        AuditCommand::Keygen { .. } => unreachable!("handled before the config is loaded"),
        AuditCommand::Checkpoint => {
            match cloud_hub::audit_checkpoint(config).context("taking an audit checkpoint")? {
                Some(c) => {
                    println!("{}", c.to_line());
                    eprintln!("Checkpoint of entry {} taken.", c.seq);
                }
                None => eprintln!("No new entry since the last checkpoint."),
            }
            Ok(())
        }
        AuditCommand::Export { out, since } => {
            let mut f = vigil_io::private_fs::create_new(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let n = cloud_hub::audit_export(config, since, &mut f)
                .context("exporting the audit log")?;
            f.sync_all()?;
            eprintln!("{n} AuditEvent resources written to {}.", out.display());
            Ok(())
        }
    }
}

fn format_time(us: i64) -> String {
    cloud_hub::fhir::format_instant(us)
}

fn user(config: &Config, command: UserCommand) -> Result<()> {
    match command {
        UserCommand::Add {
            name,
            role,
            password_file,
        } => {
            let pw = cloud_hub::read_password(&password_file)
                .with_context(|| format!("reading {}", password_file.display()))?;
            cloud_hub::user_add(config, &name, role, &pw)
                .with_context(|| format!("adding user `{name}`"))?;
            eprintln!("User `{name}` created with role {role}.");
        }
        UserCommand::Passwd {
            name,
            password_file,
        } => {
            let pw = cloud_hub::read_password(&password_file)
                .with_context(|| format!("reading {}", password_file.display()))?;
            cloud_hub::user_set_password(config, &name, &pw)
                .with_context(|| format!("setting the password of `{name}`"))?;
            eprintln!("Password of `{name}` changed; its sessions ended.");
        }
        UserCommand::Disable { name } => {
            cloud_hub::user_disable(config, &name)
                .with_context(|| format!("disabling user `{name}`"))?;
            eprintln!("User `{name}` disabled; its sessions ended.");
        }
        UserCommand::List => {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<32} {:<10} {:<28} DISABLED",
                "NAME", "ROLE", "CREATED"
            )?;
            for u in cloud_hub::user_list(config)? {
                writeln!(
                    out,
                    "{:<32} {:<10} {:<28} {}",
                    u.name,
                    u.role,
                    format_time(u.created_us),
                    u.disabled_us.map(format_time).unwrap_or_else(|| "-".into())
                )?;
            }
        }
    }
    Ok(())
}

fn token(config: &Config, command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create { name, role } => {
            let token = cloud_hub::token_create(config, &name, role)
                .with_context(|| format!("creating token `{name}`"))?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{token}")?;
            out.flush()?;
            eprintln!(
                "API token `{name}` (role {role}) created. It is shown only once; send it as \
                 `Authorization: Bearer <token>`."
            );
        }
        TokenCommand::Revoke { name } => {
            cloud_hub::token_revoke(config, &name)
                .with_context(|| format!("revoking token `{name}`"))?;
            eprintln!("API token `{name}` revoked.");
        }
        TokenCommand::List => {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<32} {:<10} {:<28} REVOKED",
                "NAME", "ROLE", "CREATED"
            )?;
            for t in cloud_hub::token_list(config)? {
                writeln!(
                    out,
                    "{:<32} {:<10} {:<28} {}",
                    t.name,
                    t.role,
                    format_time(t.created_us),
                    t.revoked_us.map(format_time).unwrap_or_else(|| "-".into())
                )?;
            }
        }
    }
    Ok(())
}

fn gateway(config: &Config, command: GatewayCommand) -> Result<()> {
    match command {
        GatewayCommand::Add { gateway_id } => {
            let token = cloud_hub::gateway_add(config, &gateway_id)
                .with_context(|| format!("adding gateway `{gateway_id}`"))?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{token}")?;
            out.flush()?;
            eprintln!(
                "Gateway `{gateway_id}` created. The token above is shown only once: \
                 configure it on the gateway now."
            );
        }
        GatewayCommand::List => {
            let rows = cloud_hub::gateway_list(config)?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:<32} {:<28} REVOKED", "ID", "CREATED")?;
            for g in rows {
                let revoked = g.revoked_us.map(format_time).unwrap_or_else(|| "-".into());
                writeln!(
                    out,
                    "{:<32} {:<28} {}",
                    g.id,
                    format_time(g.created_us),
                    revoked
                )?;
            }
            out.flush()?;
        }
        GatewayCommand::Revoke { gateway_id } => {
            cloud_hub::gateway_revoke(config, &gateway_id)
                .with_context(|| format!("revoking gateway `{gateway_id}`"))?;
            eprintln!("Gateway `{gateway_id}` revoked.");
        }
        GatewayCommand::Rotate {
            gateway_id,
            grace_secs,
        } => {
            let grace = std::time::Duration::from_secs(grace_secs);
            let token = cloud_hub::gateway_rotate(config, &gateway_id, grace)
                .with_context(|| format!("rotating the token of gateway `{gateway_id}`"))?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{token}")?;
            out.flush()?;
            if grace_secs == 0 {
                eprintln!(
                    "Gateway `{gateway_id}` has a new token (shown once, above); the old one no \
                     longer works."
                );
            } else {
                eprintln!(
                    "Gateway `{gateway_id}` has a new token (shown once, above); the old one \
                     works for {grace_secs} s more: configure the new one on the gateway now."
                );
            }
        }
    }
    Ok(())
}

/// The backfill's progress bar (stderr): readings, rate and ETA.
struct Bar(indicatif::ProgressBar);

impl hub_lake::Progress for Bar {
    fn start(&self, readings: u64) {
        self.0.set_length(readings);
    }
    fn advance(&self, readings: u64) {
        self.0.inc(readings);
    }
}

fn lake_export(config: &Config) -> Result<()> {
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} readings  {per_sec}  ETA {eta}",
        )
        .context("progress bar template")?,
    );
    let (summary, location) =
        cloud_hub::lake::export(config, &Bar(bar.clone())).context("exporting the lake")?;
    bar.finish_and_clear();
    match summary {
        Some(s) => eprintln!(
            "Lake at {location}: {} readings ({} silver rows, {} score rows, {} skipped), \
             {} erasures applied, {} files, {} bytes, {:.0} readings/s.",
            s.readings,
            s.silver_rows,
            s.scores,
            s.skipped,
            s.erasures,
            s.files,
            s.bytes,
            s.readings_per_s()
        ),
        None => eprintln!("Lake at {location}: another hub is exporting; nothing done."),
    }
    Ok(())
}

fn serve(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = config.bind_addr()?;
        let hub = Hub::open(config).context("opening the hub")?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        let scheme = if hub.is_tls() { "https" } else { "http" };
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {scheme}://{local}")?;
            out.flush()?;
        }
        hub.serve(listener, shutdown_signal())
            .await
            .context("serving")?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested");
}
