//! Who may do what: roles, the route policy table, and the middleware that
//! authenticates every request to a protected route and authorises it by
//! role. See docs/access.md.
//!
//! Principals: local users with browser sessions (cookie + CSRF token),
//! API bearer tokens (`vgu_…`, `cloud-hub token create`), OIDC/JWT access
//! tokens (Entra ID; [`oidc`]), and the bootstrap admin token
//! (`association.admin_token_file`). Gateways are not principals here: they
//! authenticate on the ingest and enrolment routes themselves and can do
//! nothing else.
//!
//! Deny by default: a routed path missing from [`POLICY`] answers 403 to
//! everyone. The authorisation matrix test walks every entry for every role
//! and for no credentials, and checks that every route the source declares
//! has an entry.

pub mod accounts;
pub mod oidc;
mod session;

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::SharedMetrics;
use crate::config_error::ConfigError;
use crate::metrics::AuthFailure;
use crate::store::{Store, now_us};

pub use session::routes;

/// A person's (or script's) role. Gateways are not a role: they can only
/// ingest, with their own tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads patient data and alerts; acknowledges alerts; enters manual
    /// score inputs; admits, transfers and discharges.
    Clinician,
    /// Biomedical engineer: beds, device placements, gateways and devices
    /// (no patient data).
    Biomed,
    /// Cloud operator: gateway fleet health (no patient data); metrics and
    /// health are open to the cluster anyway.
    Operator,
    /// Everything, including bulk export.
    Admin,
    /// Privacy officer: subject access (a patient's whole record),
    /// erasure and legal holds (docs/privacy.md); no ward views.
    Privacy,
}

impl Role {
    /// Every role, for the matrix test and help texts.
    pub const ALL: [Role; 5] = [
        Role::Clinician,
        Role::Biomed,
        Role::Operator,
        Role::Admin,
        Role::Privacy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Clinician => "clinician",
            Role::Biomed => "biomed",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Privacy => "privacy",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role `{s}`: use clinician, biomed, operator, admin or privacy")
            })
    }
}

/// How a principal authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// Browser session; writes need this CSRF token.
    Session {
        csrf: String,
    },
    ApiToken,
    Oidc,
    AdminToken,
}

/// The authenticated caller of a request, in the request's (and the
/// response's) extensions. `id` names it in the audit log: `user:NAME`,
/// `token:NAME`, `oidc:SUBJECT` or `admin-token`; never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub id: String,
    pub roles: Vec<Role>,
    pub via: Via,
}

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Everyone: health, metrics, the CapabilityStatement, login, the
    /// dashboard's static assets. None of these carries patient data.
    Public,
    /// Gateways only; the handler authenticates them (ingest, enrolment).
    Gateway,
    /// Principals holding one of these roles.
    Roles(&'static [Role]),
}

/// One route's policy: method (`GET` also covers `HEAD`), the path as
/// declared to the router, access.
#[derive(Debug, Clone, Copy)]
pub struct RoutePolicy {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
}

use Role::{Admin, Biomed, Clinician, Operator, Privacy};

/// Patient data: clinicians (and administrators).
const CLINICAL: Access = Access::Roles(&[Clinician, Admin]);
/// Devices, locations and beds: no patient data in themselves.
const EQUIPMENT_READ: Access = Access::Roles(&[Clinician, Biomed, Admin]);
/// Beds and device placements are set up by biomedical engineers.
const EQUIPMENT_WRITE: Access = Access::Roles(&[Biomed, Admin]);
/// Gateway fleet health.
const FLEET: Access = Access::Roles(&[Biomed, Operator, Admin]);
/// Bulk export of every patient's data.
const ADMIN: Access = Access::Roles(&[Admin]);
/// Patients' rights: subject access, erasure, legal holds.
const PRIVACY: Access = Access::Roles(&[Privacy, Admin]);

const fn p(method: &'static str, path: &'static str, access: Access) -> RoutePolicy {
    RoutePolicy {
        method,
        path,
        access,
    }
}

/// Every route of the hub with who may use it.
pub const POLICY: &[RoutePolicy] = &[
    // Operations (no patient data; Kubernetes probes and Prometheus).
    p("GET", "/healthz", Access::Public),
    p("GET", "/readyz", Access::Public),
    p("GET", "/metrics", Access::Public),
    // Gateways.
    p("POST", "/api/v1/ingest", Access::Gateway),
    p("POST", "/api/v1/enroll", Access::Gateway),
    // Sessions (login answers 401 itself; logout needs the CSRF token).
    p("GET", "/api/v1/session", Access::Public),
    p("POST", "/api/v1/session", Access::Public),
    p("DELETE", "/api/v1/session", Access::Public),
    // Dashboard shell and static assets (data comes from the API).
    p("GET", "/", Access::Public),
    p("GET", "/ui/", Access::Public),
    p("GET", "/ui/{asset}", Access::Public),
    // FHIR R4.
    p("GET", "/fhir/metadata", Access::Public),
    p("GET", "/fhir/Observation", CLINICAL),
    p("GET", "/fhir/Observation/{id}", CLINICAL),
    p("GET", "/fhir/Patient/{id}", CLINICAL),
    p("GET", "/fhir/Device", EQUIPMENT_READ),
    p("GET", "/fhir/Device/{id}", EQUIPMENT_READ),
    p("GET", "/fhir/Location", EQUIPMENT_READ),
    p("GET", "/fhir/Location/{id}", EQUIPMENT_READ),
    p("GET", "/fhir/$export", ADMIN),
    p("GET", "/fhir/Patient/$export", ADMIN),
    p("GET", "/fhir/Group/{id}/$export", ADMIN),
    p("GET", "/fhir/$export-status/{job}", ADMIN),
    p("DELETE", "/fhir/$export-status/{job}", ADMIN),
    p("GET", "/fhir/$export-file/{job}/{file}", ADMIN),
    // Beds, placements, stays.
    p("GET", "/api/v1/beds", EQUIPMENT_READ),
    p("POST", "/api/v1/beds", EQUIPMENT_WRITE),
    p("POST", "/api/v1/placements", EQUIPMENT_WRITE),
    p("POST", "/api/v1/placements/end", EQUIPMENT_WRITE),
    p("POST", "/api/v1/patients/admit", CLINICAL),
    p("POST", "/api/v1/patients/transfer", CLINICAL),
    p("POST", "/api/v1/patients/discharge", CLINICAL),
    p("GET", "/api/v1/occupancy", CLINICAL),
    // Scores, trends, ward.
    p("GET", "/api/v1/patients/{id}/scores", CLINICAL),
    p("GET", "/api/v1/patients/{id}/scores/news2", CLINICAL),
    p("PUT", "/api/v1/patients/{id}/manual-inputs", CLINICAL),
    p("GET", "/api/v1/patients/{id}/series", CLINICAL),
    p("GET", "/api/v1/patients/{id}/scores/history", CLINICAL),
    p("GET", "/api/v1/wards/{ward}/overview", CLINICAL),
    // Alerts.
    p("GET", "/api/v1/alerts", CLINICAL),
    p("GET", "/api/v1/alerts/stream", CLINICAL),
    p("GET", "/api/v1/alerts/rules", CLINICAL),
    p("GET", "/api/v1/alerts/{id}", CLINICAL),
    p("POST", "/api/v1/alerts/{id}/acknowledge", CLINICAL),
    p("GET", "/api/v1/patients/{id}/alert-rules", CLINICAL),
    p("PUT", "/api/v1/patients/{id}/alert-rules", CLINICAL),
    // Gateways and devices (biomedical engineers, operators).
    p("GET", "/api/v1/gateways", FLEET),
    // Patients' rights (privacy officers).
    p("GET", "/api/v1/patients/{id}/$everything", PRIVACY),
    p("POST", "/api/v1/patients/{id}/erase", PRIVACY),
    p("PUT", "/api/v1/patients/{id}/legal-hold", PRIVACY),
    p("DELETE", "/api/v1/patients/{id}/legal-hold", PRIVACY),
    p("GET", "/api/v1/legal-holds", PRIVACY),
];

/// The policy of `method` on the routed `path`.
pub fn policy_of(method: &Method, path: &str) -> Option<&'static RoutePolicy> {
    let m = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    POLICY.iter().find(|r| r.method == m && r.path == path)
}

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "vigil_session";
/// Header carrying the session's CSRF token on writes.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// `[auth]`: how people and scripts authenticate (users and API tokens are
/// created with `cloud-hub user` / `cloud-hub token`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// A browser session ends after this many minutes without a request.
    #[serde(default = "default_session_idle_minutes")]
    pub session_idle_minutes: u32,
    /// ... and after this many hours in any case.
    #[serde(default = "default_session_max_hours")]
    pub session_max_hours: u32,
    /// Mark the session cookie `Secure` (default: when the hub serves TLS
    /// itself; set `true` behind a TLS-terminating ingress).
    #[serde(default)]
    pub cookie_secure: Option<bool>,
    /// `[auth.oidc]`: accept access tokens of an OpenID provider (Entra ID).
    #[serde(default)]
    pub oidc: Option<oidc::OidcConfig>,
    /// Password checks (Argon2id, ~19 MiB each) running at once; a login
    /// beyond them is answered 429 with `Retry-After` at once. Default 4.
    #[serde(default = "default_max_concurrent_logins")]
    pub max_concurrent_logins: u32,
    /// Reverse proxies (addresses or CIDR ranges, e.g. the AKS ingress's
    /// pod range) whose `X-Forwarded-For` names the client; login
    /// throttling counts by that client address. Empty (default): the
    /// connecting address is the client.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

fn default_max_concurrent_logins() -> u32 {
    4
}

fn default_session_idle_minutes() -> u32 {
    30
}

fn default_session_max_hours() -> u32 {
    12
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            session_idle_minutes: default_session_idle_minutes(),
            session_max_hours: default_session_max_hours(),
            cookie_secure: None,
            oidc: None,
            max_concurrent_logins: default_max_concurrent_logins(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// Checks the values, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1440).contains(&self.session_idle_minutes) {
            return Err(ConfigError::invalid(
                "auth.session_idle_minutes",
                "must be between 1 and 1440",
            ));
        }
        if !(1..=168).contains(&self.session_max_hours) {
            return Err(ConfigError::invalid(
                "auth.session_max_hours",
                "must be between 1 and 168",
            ));
        }
        if let Some(o) = &self.oidc {
            o.validate()
                .map_err(|(field, message)| ConfigError::invalid(field, message))?;
        }
        if !(1..=64).contains(&self.max_concurrent_logins) {
            return Err(ConfigError::invalid(
                "auth.max_concurrent_logins",
                "must be between 1 and 64",
            ));
        }
        self.proxies()?;
        Ok(())
    }

    /// `trusted_proxies` parsed (a bare address is a /32 or /128).
    fn proxies(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError::invalid(
                            "auth.trusted_proxies",
                            format!("`{p}` is not an IP address or CIDR range"),
                        )
                    })
            })
            .collect()
    }
}

/// State of the access middleware and the session routes.
#[derive(Clone)]
pub struct AccessState {
    store: Store,
    metrics: SharedMetrics,
    admin_sha256: Option<Arc<str>>,
    oidc: Option<Arc<oidc::Validator>>,
    idle_us: i64,
    max_age_us: i64,
    secure_cookie: bool,
    /// Permits for concurrent password checks.
    hashing: Arc<tokio::sync::Semaphore>,
    trusted_proxies: Arc<[ipnet::IpNet]>,
    /// API tokens found active recently (see [`TOKEN_CACHE_TTL`]).
    tokens: Arc<TokenCache>,
}

/// How long an API token found active is trusted without asking the store
/// again: a token revoked with `cloud-hub token revoke` (by any process,
/// on any replica) stops working within this time. Unknown and revoked
/// tokens are never cached (a new token works at once).
pub const TOKEN_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// At most this many cached tokens (expired ones are dropped first).
const TOKEN_CACHE_MAX: usize = 4096;

/// API token lookups of the last [`TOKEN_CACHE_TTL`], keyed by the token's
/// SHA-256 (never the token).
#[derive(Debug, Default)]
struct TokenCache {
    map: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, String, Role)>>,
}

impl TokenCache {
    fn get(&self, hash: &str, now: std::time::Instant) -> Option<(String, Role)> {
        let map = self.map.lock().ok()?;
        let (expires, name, role) = map.get(hash)?;
        (now < *expires).then(|| (name.clone(), *role))
    }

    fn put(&self, hash: String, found: Option<&(String, Role)>, now: std::time::Instant) {
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        let Some((name, role)) = found else {
            map.remove(&hash);
            return;
        };
        if map.len() >= TOKEN_CACHE_MAX {
            map.retain(|_, (expires, _, _)| now < *expires);
            if map.len() >= TOKEN_CACHE_MAX {
                map.clear();
            }
        }
        map.insert(hash, (now + TOKEN_CACHE_TTL, name.clone(), *role));
    }
}

impl std::fmt::Debug for AccessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessState")
            .field("admin_token", &self.admin_sha256.is_some())
            .field("oidc", &self.oidc.is_some())
            .finish_non_exhaustive()
    }
}

/// A refused request: status, counter, message.
#[derive(Debug)]
pub(crate) struct Refusal {
    status: StatusCode,
    reason: AuthFailure,
    message: String,
}

impl Refusal {
    fn unauthenticated(message: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason: AuthFailure::Unauthenticated,
            message: message.into(),
        }
    }

    fn into_response(self, metrics: &SharedMetrics) -> Response {
        self.respond(metrics, false)
    }

    /// The refusal as JSON `{"error"}`, or on the FHIR API as an
    /// OperationOutcome (`security` / `forbidden`) that FHIR clients read.
    fn respond(self, metrics: &SharedMetrics, fhir: bool) -> Response {
        metrics.auth_failure(self.reason);
        let mut resp = if fhir {
            let code = if self.status == StatusCode::UNAUTHORIZED {
                "security"
            } else {
                "forbidden"
            };
            (
                self.status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(crate::fhir::FHIR_JSON),
                )],
                crate::fhir::operation_outcome("error", code, &self.message).to_string(),
            )
                .into_response()
        } else {
            (self.status, axum::Json(json!({ "error": self.message }))).into_response()
        };
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"vigil\""),
            );
        }
        resp
    }
}

impl AccessState {
    /// Loads the admin token and prepares OIDC validation (keys are
    /// fetched on first use).
    pub fn new(
        config: &AuthConfig,
        admin_sha256: Option<String>,
        store: Store,
        metrics: SharedMetrics,
        tls: bool,
    ) -> Result<Self, oidc::OidcError> {
        // Validated with the config; an unparsable entry cannot reach here.
        let proxies = config.proxies().unwrap_or_default();
        Ok(AccessState {
            store,
            metrics,
            admin_sha256: admin_sha256.map(Arc::from),
            oidc: config
                .oidc
                .as_ref()
                .map(oidc::Validator::new)
                .transpose()?
                .map(Arc::new),
            idle_us: i64::from(config.session_idle_minutes) * 60_000_000,
            max_age_us: i64::from(config.session_max_hours) * 3_600_000_000,
            secure_cookie: config.cookie_secure.unwrap_or(tls),
            hashing: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_logins.max(1) as usize,
            )),
            trusted_proxies: proxies.into(),
            tokens: Arc::default(),
        })
    }

    /// Who is calling, or why not.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        method: &Method,
    ) -> Result<Principal, Refusal> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim().to_owned())
                .ok_or_else(|| {
                    Refusal::unauthenticated(
                        "malformed Authorization header: expected `Bearer <token>`",
                    )
                })?;
            return self.bearer(token).await;
        }
        let Some(id) = cookie(headers, SESSION_COOKIE) else {
            return Err(Refusal::unauthenticated(
                "authentication required: log in, or send `Authorization: Bearer <token>`",
            ));
        };
        let (store, now, idle, max) = (self.store.clone(), now_us(), self.idle_us, self.max_age_us);
        let row =
            tokio::task::spawn_blocking(move || accounts::session(&store, &id, now, idle, max))
                .await
                .map_err(|_| Refusal::unauthenticated("session lookup failed"))?
                .map_err(|e| {
                    tracing::error!(error = %e, "session lookup failed");
                    Refusal {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        reason: AuthFailure::Unauthenticated,
                        message: "session store unavailable".into(),
                    }
                })?
                .ok_or_else(|| {
                    Refusal::unauthenticated("session expired or unknown: log in again")
                })?;
        if !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if !sent.is_some_and(|s| same_secret(s, &row.csrf)) {
                return Err(Refusal {
                    status: StatusCode::FORBIDDEN,
                    reason: AuthFailure::Csrf,
                    message: format!(
                        "missing or wrong {CSRF_HEADER} header (from the login response)"
                    ),
                });
            }
        }
        Ok(Principal {
            id: format!("user:{}", row.user),
            roles: vec![row.role],
            via: Via::Session { csrf: row.csrf },
        })
    }

    async fn bearer(&self, token: String) -> Result<Principal, Refusal> {
        let hash = crate::auth::hash_token(&token);
        if let Some(admin) = &self.admin_sha256
            && same_secret(&hash, admin)
        {
            return Ok(Principal {
                id: "admin-token".into(),
                roles: vec![Role::Admin],
                via: Via::AdminToken,
            });
        }
        if token.starts_with(accounts::API_TOKEN_PREFIX) {
            let api_token = |(name, role): (String, Role)| Principal {
                id: format!("token:{name}"),
                roles: vec![role],
                via: Via::ApiToken,
            };
            if let Some(found) = self.tokens.get(&hash, std::time::Instant::now()) {
                return Ok(api_token(found));
            }
            let store = self.store.clone();
            let found =
                tokio::task::spawn_blocking(move || accounts::token_principal(&store, &token))
                    .await
                    .map_err(|_| Refusal::unauthenticated("token lookup failed"))?
                    .map_err(|e| {
                        tracing::error!(error = %e, "token lookup failed");
                        Refusal {
                            status: StatusCode::SERVICE_UNAVAILABLE,
                            reason: AuthFailure::Unauthenticated,
                            message: "token store unavailable".into(),
                        }
                    })?;
            self.tokens
                .put(hash, found.as_ref(), std::time::Instant::now());
            return match found {
                Some(found) => Ok(api_token(found)),
                None => Err(Refusal::unauthenticated("unknown or revoked API token")),
            };
        }
        if token.bytes().filter(|&b| b == b'.').count() == 2 {
            let Some(v) = &self.oidc else {
                return Err(Refusal::unauthenticated(
                    "a JWT was sent but OIDC is not configured ([auth.oidc])",
                ));
            };
            return match v.validate(&token).await {
                Ok(c) => Ok(Principal {
                    id: format!("oidc:{}", c.subject),
                    roles: c.roles,
                    via: Via::Oidc,
                }),
                Err(e) => {
                    tracing::info!(error = %e, "JWT refused");
                    Err(Refusal {
                        status: StatusCode::UNAUTHORIZED,
                        reason: AuthFailure::InvalidJwt,
                        message: format!("invalid access token: {e}"),
                    })
                }
            };
        }
        Err(Refusal::unauthenticated("unknown bearer token"))
    }

    /// The client's address as login throttling counts it: the connecting
    /// address, or, when that is a trusted proxy, the nearest address in
    /// `X-Forwarded-For` that is not one (a client cannot forge what its
    /// own proxy appends). "unknown" without a peer address.
    fn client_source(&self, peer: Option<std::net::IpAddr>, headers: &HeaderMap) -> String {
        let trusted = |ip: &std::net::IpAddr| self.trusted_proxies.iter().any(|n| n.contains(ip));
        let Some(peer) = peer else {
            return "unknown".into();
        };
        if !trusted(&peer) {
            return peer.to_string();
        }
        let mut client = peer;
        for v in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(v) = v.to_str() else {
                return client.to_string();
            };
            for hop in v.rsplit(',') {
                match hop.trim().parse::<std::net::IpAddr>() {
                    Ok(ip) if trusted(&ip) => client = ip,
                    Ok(ip) => return ip.to_string(),
                    // Garbage where an address should be: stop at the
                    // last address known to be good.
                    Err(_) => return client.to_string(),
                }
            }
        }
        client.to_string()
    }
}

/// The connecting peer's address (present when the server was started with
/// connect info, as `serve` does; `None` otherwise, e.g. in router tests).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(PeerAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// Compares two secrets (or their hex digests) without an early exit on the
/// first differing byte: both are hashed first, so timing says nothing
/// about the secret.
fn same_secret(a: &str, b: &str) -> bool {
    use ring::digest::{SHA256, digest};
    let (x, y) = (digest(&SHA256, a.as_bytes()), digest(&SHA256, b.as_bytes()));
    x.as_ref()
        .iter()
        .zip(y.as_ref())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Authenticates and authorises every request to a routed path by
/// [`POLICY`]; the principal goes into the request's and the response's
/// extensions (the audit log records it). Unrouted paths fall through to
/// their 404.
pub async fn middleware(State(st): State<AccessState>, mut req: Request, next: Next) -> Response {
    let Some(path) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
    else {
        return next.run(req).await;
    };
    let fhir = path.starts_with("/fhir/");
    let Some(policy) = policy_of(req.method(), &path) else {
        if path.contains("__private__axum") {
            // A nested router's fallback (the FHIR 404 OperationOutcome).
            return next.run(req).await;
        }
        tracing::error!(method = %req.method(), path, "route without an access policy: refused");
        return Refusal {
            status: StatusCode::FORBIDDEN,
            reason: AuthFailure::Forbidden,
            message: "this route has no access policy".into(),
        }
        .respond(&st.metrics, fhir);
    };
    let Access::Roles(allowed) = policy.access else {
        return next.run(req).await;
    };
    let principal = match st.authenticate(req.headers(), req.method()).await {
        Ok(p) => p,
        Err(r) => return r.respond(&st.metrics, fhir),
    };
    if !principal.roles.iter().any(|r| allowed.contains(r)) {
        let mut resp = Refusal {
            status: StatusCode::FORBIDDEN,
            reason: AuthFailure::Forbidden,
            message: format!(
                "role {} may not {} {}",
                principal
                    .roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                policy.method,
                policy.path
            ),
        }
        .respond(&st.metrics, fhir);
        resp.extensions_mut().insert(principal);
        return resp;
    }
    req.extensions_mut().insert(principal.clone());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(principal);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_print() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().unwrap_err().contains("unknown role"));
    }

    #[test]
    fn the_policy_has_one_entry_per_route_and_no_patient_data_is_public() {
        let mut seen = std::collections::HashSet::new();
        for r in POLICY {
            assert!(
                seen.insert((r.method, r.path)),
                "twice: {} {}",
                r.method,
                r.path
            );
            if r.access == Access::Public {
                assert!(
                    !r.path.contains("Observation") && !r.path.contains("patients"),
                    "{}",
                    r.path
                );
            }
        }
        assert!(policy_of(&Method::HEAD, "/fhir/Observation").is_some());
        assert!(policy_of(&Method::POST, "/fhir/Observation").is_none());
    }

    #[test]
    fn cookies_and_secrets() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; vigil_session=abc ; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        assert!(same_secret("x", "x"));
        assert!(!same_secret("x", "y"));
    }
}
