//! Vigil cloud hub: authenticates gateways, ingests protobuf batches from
//! edge agents, normalizes readings to FHIR R4 Observations stored in SQLite,
//! and serves a read/search FHIR API.
//!
//! Entry points:
//! - [`run`]: serve on an already bound listener until `shutdown` resolves.
//! - [`Hub::open`] + [`Hub::serve`]: the same in two steps (open the
//!   database and load TLS material first, then serve).
//! - [`gateway_add`], [`gateway_list`], [`gateway_revoke`]: administration
//!   of gateway tokens.

pub mod access;
pub mod after_ingest;
pub use hub_domain::{adt, fhir, ingest, scores};
pub mod adt_listener;
pub mod alerts;
pub mod association;
pub mod association_api;
pub mod audit;
pub mod auth;
pub mod config;
mod config_error;
pub mod dashboard;
pub mod early_warning;
pub mod encoding;
pub mod export;
pub mod metrics;
pub mod mqtt_ingest;
pub mod pipeline;
pub use hub_postgres as pg;
pub use hub_storage as storage;
mod rate_limit;
pub mod retention;
pub mod score_history;
mod server;
pub mod store;
pub mod telemetry;
pub mod trends;
pub mod ward;

use std::future::Future;
use std::sync::Arc;

pub use config::{Config, ConfigError};
pub use server::Hub;
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
    Account(#[from] access::accounts::AccountError),
}

/// Serves the hub on `listener` until `shutdown` resolves, then stops
/// accepting and lets in-flight requests finish.
///
/// Opens (creating if needed) the SQLite database named by the config and,
/// with `[server.tls]`, serves HTTPS with rustls (ring). Refuses plaintext on
/// a non-loopback listener unless `server.allow_plaintext` is set.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HubError> {
    Hub::open(config)?.serve(listener, shutdown).await
}

fn open_store(config: &Config) -> Result<Store, HubError> {
    Ok(Store::open_config(&config.storage)?)
}

/// Records an administrative command in the audit log (actor `cli`).
fn audit_cli(store: &Store, action: &str, command: &str, detail: String) -> Result<(), HubError> {
    audit::append(
        store,
        &audit::Entry {
            time_us: store::now_us(),
            actor: "cli".into(),
            action: action.into(),
            resource: command.into(),
            patient: None,
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
    audit_cli(&store, "create", "gateway add", format!("gateway_id={id}"))?;
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
        "create",
        "enrollment create",
        format!("ttl_s={}", ttl.as_secs()),
    )?;
    Ok(token)
}

/// `cloud-hub audit verify`: recomputes the audit log's hash chain (and
/// checks `anchor`, a `(seq, hash)` recorded earlier).
pub fn audit_verify(
    config: &Config,
    anchor: Option<(i64, &str)>,
) -> Result<audit::Verification, HubError> {
    Ok(audit::verify(&open_store(config)?, anchor)?)
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
        "create",
        "user add",
        format!("user={name} role={role}"),
    )
}

/// `cloud-hub user passwd`: a new password; the user's sessions end.
pub fn user_set_password(config: &Config, name: &str, password: &str) -> Result<(), HubError> {
    let store = open_store(config)?;
    access::accounts::set_password(&store, name, password)?;
    audit_cli(&store, "update", "user passwd", format!("user={name}"))
}

/// `cloud-hub user disable`: no more logins; the user's sessions end.
pub fn user_disable(config: &Config, name: &str) -> Result<(), HubError> {
    let store = open_store(config)?;
    access::accounts::disable_user(&store, name, store::now_us())?;
    audit_cli(&store, "update", "user disable", format!("user={name}"))
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
    audit_cli(&store, "update", "token revoke", format!("token={name}"))
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
        "update",
        "gateway rotate",
        format!("gateway_id={id} grace_s={}", grace.as_secs()),
    )?;
    Ok(token)
}

/// Shared, cheaply clonable handle to the hub's counters.
pub type SharedMetrics = Arc<metrics::Metrics>;
