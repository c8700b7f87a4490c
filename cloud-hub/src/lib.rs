//! Vigil cloud hub: authenticates gateways, ingests protobuf batches from
//! edge agents, normalizes readings to FHIR R4 Observations stored in SQLite
//! or PostgreSQL, and serves a read/search FHIR API.
//!
//! This crate is the hub's composition root: it loads the configuration,
//! opens the storage backend it names (`vigil-hub-sqlite` or
//! `vigil-hub-postgres`), builds the transport layer's state
//! (`vigil-hub-transport`, which names no backend), registers the
//! after-ingest consumers, starts the listeners and owns the one
//! cancellation token that stops them; plus the administrative commands of
//! the CLI and the thin binary (`main.rs`).
//!
//! Entry points:
//! - [`run`]: serve on an already bound listener until `shutdown` resolves.
//! - [`Hub::open`] + [`Hub::serve`]: the same in two steps (open the
//!   database and load TLS material first, then serve).
//! - [`gateway_add`], [`gateway_list`], [`gateway_revoke`]: administration
//!   of gateway tokens.

pub mod config;
mod hub;
pub mod lake;
pub mod retention;
pub mod store;
pub mod telemetry;

pub use hub_postgres as pg;
// The transport layer under its former paths (`cloud_hub::access`, ...).
pub use hub_transport::{
    access, adt, adt_listener, after_ingest, alerts, association, association_api, audit, auth,
    dashboard, early_warning, encoding, export, fhir, fhir_api, identifiers, ingest, ingest_api,
    kafka_ingest, metrics, mqtt_ingest, pipeline, privacy, score_history, scores, server, storage,
    stream, trends, ward,
};

use std::future::Future;

pub use config::{Config, ConfigError};
pub use hub::Hub;
pub use hub_transport::{AppState, SharedMetrics, TransportError};
pub use store::{GatewayRow, Store, StoreError};

/// Errors of the hub library.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Token(#[from] auth::TokenError),
    #[error("invalid gateway id `{0}`: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    InvalidGatewayId(String),
    #[error("grace period of {secs} s is longer than the maximum of {max} s")]
    GraceTooLong { secs: u64, max: u64 },
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Adt(#[from] adt_listener::AdtSetupError),
    #[error(transparent)]
    Mqtt(#[from] mqtt_ingest::MqttSetupError),
    #[error(transparent)]
    Kafka(#[from] kafka_ingest::KafkaSetupError),
    #[error(transparent)]
    Account(#[from] access::accounts::AccountError),
    #[error(transparent)]
    AuditKey(#[from] audit::AuditKeyError),
    #[error("audit checkpoints: {0}")]
    Checkpoints(String),
    #[error(transparent)]
    Lake(#[from] hub_lake::LakeError),
    #[error(transparent)]
    Erasure(#[from] privacy::ErasureError),
    #[error("patient `{0}` is not known")]
    UnknownPatient(String),
}

/// The transport layer's errors are the hub's, variant for variant.
impl From<TransportError> for HubError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Store(e) => Self::Store(e),
            TransportError::Tls(e) => Self::Tls(e),
            TransportError::Io(e) => Self::Io(e),
            TransportError::Join(e) => Self::Join(e),
        }
    }
}

/// Serves the hub on `listener` until `shutdown` resolves, then stops
/// accepting and lets in-flight requests finish.
///
/// Opens the database the config names (SQLite, created if needed, or
/// PostgreSQL) and, with `[server.tls]`, serves HTTPS with rustls (ring).
/// Refuses plaintext on a non-loopback listener unless
/// `server.allow_plaintext` is set.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HubError> {
    Hub::open(config)?.serve(listener, shutdown).await
}

/// The backend `[storage]` names, as the backend-neutral handle the
/// administrative commands need.
pub(crate) fn open_store(config: &Config) -> Result<hub_transport::Store, HubError> {
    Ok(Store::open_config(&config.storage)?.handle())
}

/// `cloud-hub patient erase`: erases patient `id` (docs/privacy.md) and
/// records it in the audit log (actor `cli`, the reason and the counts).
pub fn patient_erase(config: &Config, id: &str, reason: &str) -> Result<privacy::Erased, HubError> {
    let store = open_store(config)?;
    let keys = config.audit.keys()?;
    let now = store::now_us();
    let erased = store.erase_patient(id, now)?;
    audit::append(
        &store,
        &keys,
        &privacy::erasure_entry("cli", id, reason, &erased, now),
    )?;
    Ok(erased)
}

/// `cloud-hub patient hold|release`: sets (with a reason) or lifts patient
/// `id`'s legal hold, audited.
pub fn patient_hold(config: &Config, id: &str, reason: Option<&str>) -> Result<(), HubError> {
    let store = open_store(config)?;
    let hold = reason.map(|r| privacy::LegalHold {
        patient: id.to_owned(),
        reason: r.to_owned(),
        set_by: "cli".into(),
        set_us: store::now_us(),
    });
    if !store.set_legal_hold(id, hold.as_ref())? && hold.is_some() {
        return Err(HubError::UnknownPatient(id.to_owned()));
    }
    let (action, detail) = match reason {
        Some(r) => ("legal-hold", format!("patient={id}; reason={r}")),
        None => ("legal-hold-lifted", format!("patient={id}")),
    };
    audit_cli(&store, config, action, "patient hold", detail)
}

/// `cloud-hub patient everything`: patient `id`'s whole record as FHIR
/// NDJSON lines (subject access), audited.
pub fn patient_everything(config: &Config, id: &str) -> Result<Vec<String>, HubError> {
    let store = open_store(config)?;
    let record =
        privacy::patient_record(&store, id)?.ok_or_else(|| HubError::UnknownPatient(id.into()))?;
    audit_cli(
        &store,
        config,
        "read",
        "patient everything",
        format!("patient={id}; resources={}", record.len()),
    )?;
    Ok(record.iter().map(ToString::to_string).collect())
}

/// Records an administrative command in the audit log (actor `cli`),
/// linked with the configured audit key.
fn audit_cli(
    store: &hub_transport::Store,
    config: &Config,
    action: &str,
    command: &str,
    detail: String,
) -> Result<(), HubError> {
    audit::append(
        store,
        &config.audit.keys()?,
        &audit::Entry {
            time_us: store::now_us(),
            actor: "cli".into(),
            action: action.into(),
            resource: command.into(),
            patient: None,
            patients: Vec::new(),
            outcome: 0,
            detail,
        },
    )?;
    Ok(())
}

/// Creates gateway `id` and returns its new bearer token (shown once; only
/// its hash is stored). Fails if an active gateway has this id; a revoked id
/// is re-activated with the new token.
pub fn gateway_add(config: &Config, id: &str) -> Result<String, HubError> {
    if !auth::is_valid_gateway_id(id) {
        return Err(HubError::InvalidGatewayId(id.to_owned()));
    }
    let store = open_store(config)?;
    let token = auth::generate_token()?;
    store.add_gateway(id, &auth::hash_token(&token))?;
    audit_cli(
        &store,
        config,
        "create",
        "gateway add",
        format!("gateway_id={id}"),
    )?;
    Ok(token)
}

/// A one-time enrolment token valid for `ttl`; only its hash is stored.
/// A gateway exchanges it for its credentials with `POST /api/v1/enroll`
/// (`edge-agent provision`).
pub fn enrollment_create(config: &Config, ttl: std::time::Duration) -> Result<String, HubError> {
    let store = open_store(config)?;
    let token = auth::generate_enrollment_token()?;
    let expires =
        store::now_us().saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
    store.add_enrollment(&auth::hash_token(&token), expires)?;
    audit_cli(
        &store,
        config,
        "create",
        "enrollment create",
        format!("ttl_s={}", ttl.as_secs()),
    )?;
    Ok(token)
}

/// `cloud-hub audit verify`: recomputes the audit log's chain with the
/// configured keys, checks it against every stored checkpoint and those in
/// `checkpoint_files` (kept outside the database), and against `anchor`, a
/// `(seq, link)` recorded earlier.
pub fn audit_verify(
    config: &Config,
    anchor: Option<(i64, &str)>,
    checkpoint_files: &[std::path::PathBuf],
) -> Result<audit::Verification, HubError> {
    let keys = config.audit.keys()?;
    let mut checkpoints = Vec::new();
    for f in checkpoint_files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| HubError::Checkpoints(format!("{}: {e}", f.display())))?;
        checkpoints.extend(
            audit::parse_checkpoints(&text)
                .map_err(|e| HubError::Checkpoints(format!("{}: {e}", f.display())))?,
        );
    }
    Ok(audit::verify(
        &open_store(config)?,
        &keys,
        anchor,
        &checkpoints,
    )?)
}

/// `cloud-hub audit checkpoint`: takes a checkpoint of the head now (if
/// there is any entry since the last), as the running hub does.
pub fn audit_checkpoint(config: &Config) -> Result<Option<audit::Checkpoint>, HubError> {
    let keys = config.audit.keys()?;
    let key = keys.current().ok_or_else(|| {
        HubError::Checkpoints("audit.key_file is not set: checkpoints are signed with it".into())
    })?;
    audit::take_checkpoint(
        &open_store(config)?,
        key,
        audit::CheckpointPolicy {
            every_entries: 1,
            every_us: 0,
        },
        config.audit.checkpoint_file.as_deref(),
    )
    .map_err(|e| HubError::Checkpoints(e.to_string()))
}

/// `cloud-hub audit export`: the audit log from `since_seq` as FHIR
/// AuditEvent resources, one JSON per line.
pub fn audit_export(
    config: &Config,
    since_seq: i64,
    out: &mut dyn std::io::Write,
) -> Result<u64, HubError> {
    let mut n = 0;
    for e in audit::entries(&open_store(config)?, since_seq)? {
        writeln!(out, "{}", audit::audit_event(&e))?;
        n += 1;
    }
    Ok(n)
}

/// Reads a password from `path` (`-`: standard input), first line only. A
/// file must not be readable by group or others.
pub fn read_password(path: &std::path::Path) -> Result<String, HubError> {
    let text = if path.as_os_str() == "-" {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line
    } else {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(HubError::Io(std::io::Error::other(format!(
                "{} is accessible by group or others; chmod 600 it",
                path.display()
            ))));
        }
        std::fs::read_to_string(path)?
    };
    Ok(text.lines().next().unwrap_or("").to_owned())
}

/// `cloud-hub user add`: a local user with `role` (password Argon2id-hashed).
pub fn user_add(
    config: &Config,
    name: &str,
    role: access::Role,
    password: &str,
) -> Result<(), HubError> {
    let store = open_store(config)?;
    access::accounts::add_user(&store, name, role, password, store::now_us())?;
    audit_cli(
        &store,
        config,
        "create",
        "user add",
        format!("user={name} role={role}"),
    )
}

/// `cloud-hub user passwd`: a new password; the user's sessions end.
pub fn user_set_password(config: &Config, name: &str, password: &str) -> Result<(), HubError> {
    let store = open_store(config)?;
    access::accounts::set_password(&store, name, password)?;
    audit_cli(
        &store,
        config,
        "update",
        "user passwd",
        format!("user={name}"),
    )
}

/// `cloud-hub user disable`: no more logins; the user's sessions end.
pub fn user_disable(config: &Config, name: &str) -> Result<(), HubError> {
    let store = open_store(config)?;
    access::accounts::disable_user(&store, name, store::now_us())?;
    audit_cli(
        &store,
        config,
        "update",
        "user disable",
        format!("user={name}"),
    )
}

/// `cloud-hub user list`.
pub fn user_list(config: &Config) -> Result<Vec<access::accounts::UserRow>, HubError> {
    Ok(access::accounts::list_users(&open_store(config)?)?)
}

/// `cloud-hub token create`: an API bearer token with `role`, returned
/// once (only its hash is stored).
pub fn token_create(config: &Config, name: &str, role: access::Role) -> Result<String, HubError> {
    let store = open_store(config)?;
    let token = access::accounts::create_token(&store, name, role, store::now_us())?;
    audit_cli(
        &store,
        config,
        "create",
        "token create",
        format!("token={name} role={role}"),
    )?;
    Ok(token)
}

/// `cloud-hub token revoke`.
pub fn token_revoke(config: &Config, name: &str) -> Result<(), HubError> {
    let store = open_store(config)?;
    access::accounts::revoke_token(&store, name, store::now_us())?;
    audit_cli(
        &store,
        config,
        "update",
        "token revoke",
        format!("token={name}"),
    )
}

/// `cloud-hub token list` (never the tokens).
pub fn token_list(config: &Config) -> Result<Vec<access::accounts::TokenRow>, HubError> {
    Ok(access::accounts::list_tokens(&open_store(config)?)?)
}

/// All gateways (never their tokens).
pub fn gateway_list(config: &Config) -> Result<Vec<GatewayRow>, HubError> {
    Ok(open_store(config)?.list_gateways()?)
}

/// Revokes gateway `id`: its token gets 401 from then on.
pub fn gateway_revoke(config: &Config, id: &str) -> Result<(), HubError> {
    let store = open_store(config)?;
    store.revoke_gateway(id)?;
    audit_cli(
        &store,
        config,
        "update",
        "gateway revoke",
        format!("gateway_id={id}"),
    )
}

/// Longest grace period of [`gateway_rotate`] (7 days).
pub const MAX_ROTATION_GRACE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Gives active gateway `id` a new bearer token and returns it (shown once;
/// only its hash is stored). The previous token keeps working for `grace`
/// (at most [`MAX_ROTATION_GRACE`]; zero: it stops at once), so that the
/// gateway can be reconfigured without a gap.
pub fn gateway_rotate(
    config: &Config,
    id: &str,
    grace: std::time::Duration,
) -> Result<String, HubError> {
    if grace > MAX_ROTATION_GRACE {
        return Err(HubError::GraceTooLong {
            secs: grace.as_secs(),
            max: MAX_ROTATION_GRACE.as_secs(),
        });
    }
    let store = open_store(config)?;
    let token = auth::generate_token()?;
    let now = store::now_us();
    let grace_until = (!grace.is_zero())
        .then(|| now.saturating_add(i64::try_from(grace.as_micros()).unwrap_or(i64::MAX)));
    store.rotate_gateway(id, &auth::hash_token(&token), grace_until, now)?;
    audit_cli(
        &store,
        config,
        "update",
        "gateway rotate",
        format!("gateway_id={id} grace_s={}", grace.as_secs()),
    )?;
    Ok(token)
}
