//! The HTTP(S) server: one [`AppState`] with a sub-state per concern, one
//! router per concern merged in [`router`] under the access and audit
//! layers, TLS, and [`serve`] until the hub's cancellation token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::blocking;
use crate::store::Store;
use crate::{SharedMetrics, TransportError};

/// Default limit for an ingest body (4 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// How long in-flight requests get after shutdown is requested (TLS server;
/// the plaintext server waits for them without a limit).
const GRACE_PERIOD: Duration = Duration::from_secs(10);

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on, e.g. `127.0.0.1:8080`.
    pub bind: String,
    /// Ingest bodies larger than this get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Allow plaintext HTTP on a non-loopback address (e.g. behind a
    /// TLS-terminating ingress).
    #[serde(default)]
    pub allow_plaintext: bool,
    /// `[server.tls]`: serve HTTPS.
    pub tls: Option<TlsConfig>,
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key; must not be group/world readable.
    pub key_file: PathBuf,
    /// PEM CA bundle for client certificates (mutual TLS): clients that
    /// present a certificate must present one issued by these CAs.
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: `required` (default; connections without a
    /// valid client certificate are refused in the TLS handshake) or
    /// `optional` (clients may connect without one).
    pub client_auth: Option<ClientAuth>,
}

/// `server.tls.client_auth`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Optional,
    Required,
}

/// The state of every route: one sub-state per concern, each handed to
/// that concern's router (built by the composition root).
#[derive(Debug, Clone)]
pub struct AppState {
    /// `/healthz`, `/readyz`, `/metrics`.
    pub ops: OpsState,
    /// `POST /api/v1/ingest`, `POST /api/v1/enroll`.
    pub ingest: crate::ingest_api::IngestState,
    /// `/fhir/…`.
    pub fhir: crate::fhir_api::FhirState,
    /// The access layer (every routed request) and the session routes.
    pub access: crate::access::AccessState,
    /// The audit layer (every audited request).
    pub audit: crate::audit::AuditState,
    /// Beds, placements, stays, occupancy.
    pub association: crate::association_api::ApiState,
    /// Early-warning scores and manual inputs.
    pub scores: crate::early_warning::ScoresState,
    /// The score history.
    pub score_history: crate::score_history::HistoryState,
    /// Chart series.
    pub trends: crate::trends::TrendsState,
    /// The ward overview.
    pub ward: crate::ward::WardState,
    /// The alerts API and its live stream.
    pub alerts: crate::alerts::api::AlertsState,
    /// The dashboard's files and its gateway view.
    pub dashboard: crate::dashboard::DashState,
    /// Subject access, erasure, legal holds.
    pub privacy: crate::privacy::PrivacyState,
}

/// Every route of the hub: the routers of the concerns merged, under the
/// access layer (who may do what: `crate::access::POLICY`, before every
/// handler) and, outermost, the audit layer (every audited request, FHIR
/// and `/api/v1` except ingest, is recorded in the hash-chained audit log
/// after it is answered, with the principal the access layer found, so
/// refusals are recorded too).
pub fn router(state: AppState) -> Router {
    let AppState {
        ops,
        ingest,
        fhir,
        access,
        audit,
        association,
        scores,
        score_history,
        trends,
        ward,
        alerts,
        dashboard,
        privacy,
    } = state;
    Router::new()
        .merge(ops_router(ops))
        .merge(crate::ingest_api::router(ingest))
        .merge(crate::fhir_api::router(fhir))
        .merge(crate::association_api::router(association))
        .merge(crate::early_warning::router(scores))
        .merge(crate::alerts::api::router(alerts))
        .merge(crate::trends::router(trends))
        .merge(crate::score_history::router(score_history))
        .merge(crate::ward::router(ward))
        .merge(crate::dashboard::routes(dashboard))
        .merge(crate::privacy::router(privacy))
        .merge(crate::access::routes(access.clone()))
        .layer(axum::middleware::from_fn_with_state(
            access,
            crate::access::middleware,
        ))
        .layer(axum::middleware::from_fn_with_state(
            audit,
            crate::audit::middleware,
        ))
        .layer(axum::middleware::map_response(no_store))
}

/// `Cache-Control: no-store` on every response that does not set its own
/// (the dashboard's static files say `no-cache`): FHIR resources, the
/// clinical API, errors and sessions may carry patient data, which no
/// browser or proxy cache may keep.
async fn no_store(mut resp: axum::response::Response) -> axum::response::Response {
    resp.headers_mut()
        .entry(axum::http::header::CACHE_CONTROL)
        .or_insert(axum::http::HeaderValue::from_static("no-store"));
    resp
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops
/// accepting and lets in-flight requests finish (TLS: for at most
/// `GRACE_PERIOD`, 10 s). With `tls`, HTTPS (rustls, ring).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> Result<(), TransportError> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, tls = tls.is_some(), "hub serving");
    match tls {
        None => {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await?;
        }
        Some(tls) => {
            let handle = axum_server::Handle::<SocketAddr>::new();
            let h = handle.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                h.graceful_shutdown(Some(GRACE_PERIOD));
            });
            let config = axum_server::tls_rustls::RustlsConfig::from_config(tls);
            axum_server::tls_rustls::from_tcp_rustls(listener.into_std()?, config)?
                .handle(handle)
                .serve(app.into_make_service_with_connect_info::<SocketAddr>())
                .await?;
        }
    }
    Ok(())
}

/// The HTTPS server configuration of `[server.tls]` (certificate, key and,
/// with `client_ca_file`, mutual TLS; ALPN h2 and http/1.1).
pub fn load_tls(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    use vigil_io::tls::{self as io_tls, ClientAuth as IoClientAuth, Identity, PemFile};
    let tls_err = |e: io_tls::TlsError| TransportError::Tls(e.to_string());
    let identity = Identity::load(
        PemFile::new("server.tls.cert_file", &tls.cert_file),
        PemFile::new("server.tls.key_file", &tls.key_file),
    )
    .map_err(tls_err)?;
    // Mutual TLS against `server.tls.client_ca_file`; `optional` also
    // admits clients without a certificate.
    let auth = match &tls.client_ca_file {
        None => IoClientAuth::None,
        Some(path) => {
            let ca = PemFile::new("server.tls.client_ca_file", path);
            match tls.client_auth.unwrap_or(ClientAuth::Required) {
                ClientAuth::Required => IoClientAuth::Required(ca),
                ClientAuth::Optional => IoClientAuth::Optional(ca),
            }
        }
    };
    let mut config = io_tls::server_config(identity, auth).map_err(tls_err)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------
// Operations

/// State of the operations routes (health, readiness, metrics).
#[derive(Debug, Clone)]
pub struct OpsState {
    store: Store,
    metrics: SharedMetrics,
}

impl OpsState {
    pub fn new(store: Store, metrics: SharedMetrics) -> Self {
        Self { store, metrics }
    }
}

/// `/healthz`, `/readyz` (the database answers) and `/metrics`.
fn ops_router<S: Clone + Send + Sync + 'static>(state: OpsState) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(st): State<OpsState>) -> Response {
    let store = st.store.clone();
    match blocking(move || store.ping()).await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

async fn metrics(State(st): State<OpsState>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        Metrics::render(&st.metrics),
    )
        .into_response()
}
