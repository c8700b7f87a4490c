//! OIDC access tokens (JWT) for Entra ID and other OpenID providers:
//! signature against the provider's JWKS, issuer, audience, expiry and
//! not-before (60 s leeway), an allowed algorithm (never `none` or HMAC),
//! and the roles from a claim (`roles` by default: Entra ID app roles),
//! optionally renamed by `role_map`.
//!
//! Keys come from `jwks_url` (HTTPS, or HTTP on loopback only) or
//! `jwks_file`; fetched on first use, kept for an hour, and fetched again
//! (at most once a minute) when a token names an unknown key id, so that
//! the provider's key rotation needs no restart (`jwks_min_refetch_s`
//! bounds how often).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::Role;

/// `[auth.oidc]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// Expected `iss`, e.g. `https://login.microsoftonline.com/<tenant>/v2.0`.
    pub issuer: String,
    /// Expected `aud`: the hub's application id URI or client id.
    pub audience: String,
    /// The provider's JWKS document (HTTPS; HTTP only to a loopback address).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Or a JWKS file (for air-gapped sites; reloaded like the URL).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) for `jwks_url`, besides the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Claim holding the roles (a string or an array of strings).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Claim naming the person in the audit log (`sub`; Entra ID: `oid`).
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// Provider role value → Vigil role (e.g. `"Vigil.Clinician" =
    /// "clinician"`). Without it the claim values must be Vigil role names.
    #[serde(default)]
    pub role_map: BTreeMap<String, Role>,
    /// Accepted signature algorithms (RS256, RS384, RS512, PS256, PS384,
    /// PS512, ES256, ES384).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Least seconds between two key fetches caused by unknown key ids
    /// (0-3600), so that made-up key ids cannot flood the provider.
    #[serde(default = "default_refetch")]
    pub jwks_min_refetch_s: u64,
}

fn default_refetch() -> u64 {
    60
}

fn default_roles_claim() -> String {
    "roles".into()
}

fn default_subject_claim() -> String {
    "sub".into()
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}

const ASYMMETRIC: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

impl OidcConfig {
    /// Field checks: (field, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.issuer.trim().is_empty() {
            return Err(("auth.oidc.issuer", "must not be empty".into()));
        }
        if self.audience.trim().is_empty() {
            return Err(("auth.oidc.audience", "must not be empty".into()));
        }
        match (&self.jwks_url, &self.jwks_file) {
            (None, None) | (Some(_), Some(_)) => {
                return Err((
                    "auth.oidc.jwks_url",
                    "set exactly one of jwks_url and jwks_file".into(),
                ));
            }
            (Some(u), None) => check_url(u).map_err(|m| ("auth.oidc.jwks_url", m))?,
            (None, Some(_)) => {}
        }
        if self.jwks_min_refetch_s > 3600 {
            return Err((
                "auth.oidc.jwks_min_refetch_s",
                "must be at most 3600".into(),
            ));
        }
        if self.algorithms.is_empty() {
            return Err(("auth.oidc.algorithms", "must name at least one".into()));
        }
        for a in &self.algorithms {
            parse_alg(a).map_err(|m| ("auth.oidc.algorithms", m))?;
        }
        Ok(())
    }
}

fn parse_alg(a: &str) -> Result<Algorithm, String> {
    let alg: Algorithm = a.parse().map_err(|_| format!("unknown algorithm `{a}`"))?;
    if !ASYMMETRIC.contains(&alg) {
        return Err(format!(
            "`{a}` is not accepted: only asymmetric algorithms (RS*, PS*, ES256, ES384)"
        ));
    }
    Ok(alg)
}

fn check_url(u: &str) -> Result<(), String> {
    if u.starts_with("https://") {
        return Ok(());
    }
    let rest = u
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{u}` must be an https:// URL"))?;
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host
        .rsplit_once(':')
        .map_or(host, |(h, _)| h)
        .trim_matches(['[', ']']);
    if host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    {
        Ok(())
    } else {
        Err(format!(
            "`{u}`: plain http is allowed only to a loopback address"
        ))
    }
}

/// Why a token was refused (the message goes back to the caller).
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("{0}")]
    Token(String),
    #[error("signing keys unavailable: {0}")]
    Keys(String),
    #[error("HTTP client: {0}")]
    Client(String),
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub subject: String,
    pub roles: Vec<Role>,
}

struct Keys {
    set: JwkSet,
    fetched: Instant,
}

/// Validates access tokens against one provider.
pub struct Validator {
    config: OidcConfig,
    algorithms: Vec<Algorithm>,
    client: Option<reqwest::Client>,
    keys: Mutex<Option<Keys>>,
    last_fetch: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

/// How long fetched keys are used before fetching them again.
const KEYS_TTL: Duration = Duration::from_secs(3600);

impl Validator {
    pub fn new(config: &OidcConfig) -> Result<Self, OidcError> {
        config
            .validate()
            .map_err(|(f, m)| OidcError::Client(format!("{f}: {m}")))?;
        let client = match &config.jwks_url {
            Some(_) => Some(http_client(config.ca_file.as_deref())?),
            None => None,
        };
        Ok(Validator {
            algorithms: config
                .algorithms
                .iter()
                .filter_map(|a| parse_alg(a).ok())
                .collect(),
            config: config.clone(),
            client,
            keys: Mutex::new(None),
            last_fetch: Mutex::new(None),
        })
    }

    async fn fetch(&self) -> Result<JwkSet, OidcError> {
        let text = match (&self.client, &self.config.jwks_url, &self.config.jwks_file) {
            (Some(c), Some(url), _) => {
                let resp = c
                    .get(url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .map_err(|e| OidcError::Keys(format!("GET {url}: {e}")))?;
                if !resp.status().is_success() {
                    return Err(OidcError::Keys(format!("GET {url}: {}", resp.status())));
                }
                resp.text()
                    .await
                    .map_err(|e| OidcError::Keys(format!("GET {url}: {e}")))?
            }
            (_, _, Some(path)) => tokio::fs::read_to_string(path)
                .await
                .map_err(|e| OidcError::Keys(format!("{}: {e}", path.display())))?,
            _ => return Err(OidcError::Keys("no key source".into())),
        };
        serde_json::from_str(&text)
            .map_err(|e| OidcError::Keys(format!("not a JWKS document: {e}")))
    }

    /// The key `kid`, fetching the set when it is old or lacks `kid`.
    async fn key(&self, kid: &str) -> Result<jsonwebtoken::jwk::Jwk, OidcError> {
        let mut keys = self.keys.lock().await;
        let fresh = keys
            .as_ref()
            .is_some_and(|k| k.fetched.elapsed() < KEYS_TTL);
        if fresh && let Some(k) = keys.as_ref().and_then(|k| k.set.find(kid)) {
            return Ok(k.clone());
        }
        {
            let mut last = self.last_fetch.lock().await;
            let min = Duration::from_secs(self.config.jwks_min_refetch_s);
            if keys.is_some() && last.is_some_and(|t| t.elapsed() < min) {
                return keys
                    .as_ref()
                    .and_then(|k| k.set.find(kid))
                    .cloned()
                    .ok_or_else(|| OidcError::Token(format!("unknown signing key id `{kid}`")));
            }
            *last = Some(Instant::now());
        }
        match self.fetch().await {
            Ok(set) => {
                *keys = Some(Keys {
                    set,
                    fetched: Instant::now(),
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "fetching the OIDC signing keys failed");
                if keys.is_none() {
                    return Err(e);
                }
            }
        }
        keys.as_ref()
            .and_then(|k| k.set.find(kid))
            .cloned()
            .ok_or_else(|| OidcError::Token(format!("unknown signing key id `{kid}`")))
    }

    /// Checks `token` and returns its subject and Vigil roles.
    pub async fn validate(&self, token: &str) -> Result<Claims, OidcError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| OidcError::Token(format!("header: {e}")))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(OidcError::Token(format!(
                "algorithm {:?} not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| OidcError::Token("no key id (kid) in the header".into()))?;
        let jwk = self.key(&kid).await?;
        if let Some(a) = jwk.common.key_algorithm
            && format!("{a:?}") != format!("{:?}", header.alg)
        {
            return Err(OidcError::Token(format!(
                "key `{kid}` is for {a:?}, the token says {:?}",
                header.alg
            )));
        }
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| OidcError::Token(format!("key `{kid}`: {e}")))?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&[&self.config.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.validate_nbf = true;
        v.leeway = 60;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| OidcError::Token(e.to_string()))?;
        let claims = data.claims;
        let subject = claims
            .get(&self.config.subject_claim)
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OidcError::Token(format!("no `{}` claim", self.config.subject_claim)))?
            .to_owned();
        let values: Vec<&str> = match claims.get(&self.config.roles_claim) {
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => vec![],
        };
        let mut roles: Vec<Role> = values
            .into_iter()
            .filter_map(|v| {
                if self.config.role_map.is_empty() {
                    v.parse().ok()
                } else {
                    self.config.role_map.get(v).copied()
                }
            })
            .collect();
        roles.sort_by_key(|r| r.as_str());
        roles.dedup();
        if roles.is_empty() {
            return Err(OidcError::Token(format!(
                "no Vigil role in the `{}` claim",
                self.config.roles_claim
            )));
        }
        Ok(Claims { subject, roles })
    }
}

fn http_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, OidcError> {
    use vigil_io::tls::{self, PemFile};
    // The public roots, plus `auth.oidc.ca_file` when given (not instead).
    let mut roots = tls::public_roots();
    if let Some(path) = ca_file {
        tls::add_roots(&mut roots, PemFile::new("auth.oidc.ca_file", path))
            .map_err(|e| OidcError::Client(e.to_string()))?;
    }
    let tls = tls::client_config(roots, None).map_err(|e| OidcError::Client(e.to_string()))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .map_err(|e| OidcError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OidcConfig {
        OidcConfig {
            issuer: "https://id.example/".into(),
            audience: "api://vigil".into(),
            jwks_url: Some("https://id.example/keys".into()),
            jwks_file: None,
            ca_file: None,
            roles_claim: default_roles_claim(),
            subject_claim: default_subject_claim(),
            role_map: BTreeMap::new(),
            algorithms: default_algorithms(),
            jwks_min_refetch_s: 60,
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.jwks_url = Some("http://id.example/keys".into());
        assert_eq!(c.validate().unwrap_err().0, "auth.oidc.jwks_url");
        c.jwks_url = Some("http://127.0.0.1:9/keys".into());
        assert!(c.validate().is_ok());
        c.algorithms = vec!["HS256".into()];
        assert_eq!(c.validate().unwrap_err().0, "auth.oidc.algorithms");
        c.algorithms = vec!["none".into()];
        assert_eq!(c.validate().unwrap_err().0, "auth.oidc.algorithms");
        let mut c = cfg();
        c.jwks_file = Some("/k.json".into());
        assert_eq!(c.validate().unwrap_err().0, "auth.oidc.jwks_url");
        let mut c = cfg();
        c.audience = " ".into();
        assert_eq!(c.validate().unwrap_err().0, "auth.oidc.audience");
    }
}
