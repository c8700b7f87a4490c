//! `edge-agent provision`: set a gateway up from a one-time enrolment token.
//!
//! 1. Checks the gateway id and the hub URL (https, or http to loopback).
//! 2. If `<out>/agent.toml` and `<out>/gateway.token` already exist for the
//!    same gateway, stops: re-running is safe and changes nothing.
//! 3. Creates `<out>` (0700) and the buffer key `<out>/data/buffer.key` (0600).
//! 4. Exchanges the enrolment token for the gateway's bearer token at the
//!    hub (`POST /api/v1/enroll`, JSON; see ARCHITECTURE.md).
//! 5. Writes `<out>/gateway.token` (0600) and `<out>/agent.toml` (0600), and
//!    loads the config back through the same validation as `edge-agent run`.
//!
//! Devices are then added to `agent.toml` by the biomedical engineer
//! (`docs/protocols.md`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{AgentConfig, ConfigError, is_valid_id, validate_hub_url};

/// Where the hub exchanges enrolment tokens.
pub const ENROLL_PATH: &str = "/api/v1/enroll";

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("--gateway-id must be 1-64 characters of A-Z a-z 0-9 . _ -")]
    GatewayId,
    #[error("--enrollment-token is not a Vigil enrolment token (vge_...)")]
    TokenFormat,
    #[error("--hub: {0}")]
    HubUrl(String),
    #[error("{path} already holds a configuration for gateway {existing:?}, not {wanted:?}")]
    OtherGateway {
        path: PathBuf,
        existing: String,
        wanted: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    #[error(transparent)]
    Tls(#[from] crate::uplink::UplinkError),
    #[error("cannot reach the hub: {0}")]
    Transport(String),
    #[error("the hub refused the enrolment (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the written configuration does not load: {0}")]
    Config(#[from] ConfigError),
}

/// Inputs of `edge-agent provision`.
#[derive(Debug, Clone)]
pub struct ProvisionArgs {
    /// Base URL of the hub, e.g. `https://hub.example.org`.
    pub hub: String,
    pub enrollment_token: String,
    pub gateway_id: String,
    pub out: PathBuf,
    /// PEM CA bundle to trust for the hub (a hospital's private CA).
    pub ca_file: Option<PathBuf>,
}

/// What provisioning did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Provisioned { config: PathBuf },
    AlreadyProvisioned { config: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Write a file with mode 0600, atomically (temp file + rename).
fn write_private(path: &Path, contents: &[u8]) -> Result<(), ProvisionError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = vigil_io::private_fs::create_new(&tmp).map_err(io(&tmp))?;
    f.write_all(contents).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn config_text(a: &ProvisionArgs, ingest_url: &str) -> String {
    let ca = a
        .ca_file
        .as_ref()
        .map(|p| format!("ca_file = {:?}\n", p.display().to_string()))
        .unwrap_or_default();
    format!(
        "# Written by `edge-agent provision` for gateway {id}. Add [[device]] tables\n\
         # (docs/protocols.md); see edge-agent/agent.example.toml for every key.\n\
         gateway_id = \"{id}\"\n\
         data_dir = \"data\"\n\n\
         [status]\n\
         listen = \"127.0.0.1:9464\"\n\n\
         [uplink]\n\
         url = \"{ingest_url}\"\n\
         token_file = \"gateway.token\"\n\
         {ca}",
        id = a.gateway_id,
    )
}

/// Run the provisioning steps (module docs).
pub async fn provision(a: &ProvisionArgs) -> Result<Outcome, ProvisionError> {
    if !is_valid_id(&a.gateway_id) {
        return Err(ProvisionError::GatewayId);
    }
    let hex = a.enrollment_token.strip_prefix("vge_").unwrap_or("");
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ProvisionError::TokenFormat);
    }
    let base = a.hub.trim_end_matches('/');
    let ingest_url = format!("{base}{}", shared_protocol::INGEST_PATH);
    validate_hub_url(&ingest_url).map_err(|e| ProvisionError::HubUrl(e.to_string()))?;

    let config = a.out.join("agent.toml");
    let token_file = a.out.join("gateway.token");
    if config.exists() && token_file.exists() {
        let existing = AgentConfig::load(&config)?;
        if existing.gateway_id != a.gateway_id {
            return Err(ProvisionError::OtherGateway {
                path: config,
                existing: existing.gateway_id,
                wanted: a.gateway_id.clone(),
            });
        }
        return Ok(Outcome::AlreadyProvisioned { config });
    }
    vigil_io::private_fs::create_dir_all(&a.out).map_err(io(&a.out))?;
    crate::secrets::load_or_create_key(&a.out.join("data").join("buffer.key"))?;

    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(crate::uplink::tls_config(a.ca_file.as_deref())?)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| ProvisionError::Transport(e.to_string()))?;
    let resp = client
        .post(format!("{base}{ENROLL_PATH}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(
            serde_json::json!({ "gateway_id": a.gateway_id, "enrollment_token": a.enrollment_token })
                .to_string(),
        )
        .send()
        .await
        .map_err(|e| ProvisionError::Transport(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .bytes()
        .await
        .map_err(|e| ProvisionError::Transport(e.to_string()))?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != 201 {
        return Err(ProvisionError::Refused {
            status,
            message: text.chars().take(300).collect(),
        });
    }
    // {"gateway_id": "...", "token": "vgt_..."}
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let token = answer["token"]
        .as_str()
        .filter(|t| t.starts_with("vgt_"))
        .ok_or_else(|| ProvisionError::Refused {
            status,
            message: "no token in the hub's answer".into(),
        })?
        .to_string();
    write_private(&config, config_text(a, &ingest_url).as_bytes())?;
    write_private(&token_file, format!("{token}\n").as_bytes())?;
    AgentConfig::load(&config)?;
    crate::secrets::load_token(Some(&token_file), None)?;
    Ok(Outcome::Provisioned { config })
}
