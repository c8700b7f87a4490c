//! HTTP(S) server: routes, handlers and TLS.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use prost::Message;
use serde_json::{Value as Json, json};
use shared_protocol::v1::Batch;
use shared_protocol::{CONTENT_TYPE_PROTOBUF, INGEST_PATH};

use crate::auth::{bearer_token, hash_token};
use crate::config::{Config, check_plaintext_allowed};
use crate::fhir::render::{ObservationRow, render_device, render_observation};
use crate::fhir::{self, FHIR_JSON};
use crate::metrics::{FhirInteraction, IngestErrorKind, Metrics, Outcome};
use crate::store::{Associations, Store, StoreError, now_us};
use crate::{HubError, SharedMetrics};

/// How long in-flight requests get after shutdown is requested (TLS server;
/// the plaintext server waits for them without a limit).
const GRACE_PERIOD: Duration = Duration::from_secs(10);

/// An opened hub: database open, TLS material loaded, ready to serve.
#[derive(Debug)]
pub struct Hub {
    config: Arc<Config>,
    store: Store,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: SharedMetrics,
    mqtt: Option<crate::mqtt_ingest::MqttIngest>,
}

#[derive(Debug, Clone)]
pub(crate) struct AppState {
    config: Arc<Config>,
    store: Store,
    metrics: SharedMetrics,
    tls: bool,
    started: String,
    limiter: Option<Arc<crate::rate_limit::RateLimiter>>,
    exports: Arc<crate::export::Exports>,
    alerts: Option<Arc<crate::alerts::AlertService>>,
    /// Ingest (HTTP here, MQTT in `mqtt_ingest`): store, count, after-ingest.
    pipeline: crate::pipeline::Pipeline,
}

impl Hub {
    /// Validates the config, opens the database and loads the TLS
    /// certificate and key (if configured). Blocking: call before serving.
    pub fn open(config: Config) -> Result<Self, HubError> {
        config.validate()?;
        let tls = config.server.tls.as_ref().map(load_tls).transpose()?;
        let store = Store::open_config(&config.storage)?;
        let mqtt = config
            .mqtt
            .as_ref()
            .map(|m| crate::mqtt_ingest::MqttIngest::prepare(m, config.server.max_body_bytes))
            .transpose()?;
        Ok(Self {
            config: Arc::new(config),
            store,
            tls,
            metrics: Arc::default(),
            mqtt,
        })
    }

    /// Whether the hub serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The hub's counters (also served at `/metrics`).
    pub fn metrics(&self) -> SharedMetrics {
        self.metrics.clone()
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down
    /// gracefully.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), HubError> {
        let addr = listener.local_addr()?;
        check_plaintext_allowed(&self.config, addr)?;
        let associations: Associations = self
            .config
            .associations
            .iter()
            .map(|a| {
                (
                    (a.gateway_id.clone(), a.device_id.clone()),
                    a.patient_id.clone(),
                )
            })
            .collect();
        let limiter = self
            .config
            .ingest
            .rate_limit()
            .map(|(rate, burst)| Arc::new(crate::rate_limit::RateLimiter::new(rate, burst)));
        // After-ingest consumers (`after_ingest`): the alert engine and the
        // score history, each on its own switch.
        let alerts = {
            let (store, cfg) = (self.store.clone(), self.config.alerts.clone());
            tokio::task::spawn_blocking(move || crate::alerts::AlertService::start(&store, &cfg))
                .await
                .map_err(|e| HubError::Io(std::io::Error::other(e)))?
                .map_err(|e| HubError::Io(std::io::Error::other(e.to_string())))?
        };
        let scores = self.config.scores;
        let state = AppState {
            config: self.config.clone(),
            store: self.store.clone(),
            pipeline: crate::pipeline::Pipeline::new(
                self.store.clone(),
                Arc::new(associations),
                self.metrics.clone(),
                crate::after_ingest::AfterIngest::new(
                    self.store.clone(),
                    alerts.clone(),
                    scores,
                    self.config.alerts.max_value_age_s,
                ),
                self.config.server.max_body_bytes,
            ),
            metrics: self.metrics.clone(),
            tls: self.tls.is_some(),
            started: fhir::format_instant(now_us() / 1_000_000 * 1_000_000),
            limiter,
            exports: Arc::new(crate::export::Exports::new(crate::export::dir_for(
                &self.config.storage.sqlite_path,
            ))),
            alerts,
        };
        // MQTT ingest runs beside the HTTP server and stops with it.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Retention (optional) also stops with the server.
        let retention = self.config.storage.retention_days.map(|days| {
            tokio::spawn(crate::retention::run(
                self.store.clone(),
                days,
                stop_rx.clone(),
            ))
        });
        // The alert clock (stale data, offline gateways, escalation).
        let alert_clock = state
            .alerts
            .clone()
            .map(|a| tokio::spawn(crate::alerts::run_clock(a, stop_rx.clone())));
        let alerts_stop = stop_rx.clone();
        let mqtt = self
            .mqtt
            .map(|m| tokio::spawn(crate::mqtt_ingest::run(m, state.pipeline.clone(), stop_rx)));
        let shutdown = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        // The HL7 ADT listener (optional) runs beside the server and stops
        // with it.
        let (adt_stop, adt_stopped) = tokio::sync::watch::channel(false);
        let adt = match &self.config.adt {
            Some(c) => {
                let l = crate::adt_listener::AdtListener::bind(
                    c,
                    self.store.clone(),
                    state.pipeline.associations().clone(),
                )
                .await?;
                let l = l.with_stats(self.metrics.adt.clone());
                Some(tokio::spawn(l.serve(adt_stopped)))
            }
            None => None,
        };
        let shutdown = async move {
            shutdown.await;
            let _ = adt_stop.send(true);
        };
        // Who may do what: every routed request passes the access policy
        // (crate::access::POLICY) before its handler.
        let admin_sha256 = self
            .config
            .association
            .admin_token_file
            .as_deref()
            .map(crate::association_api::load_admin_token)
            .transpose()
            .map_err(|e| {
                HubError::Config(crate::ConfigError::Invalid {
                    field: "association.admin_token_file".into(),
                    message: e.to_string(),
                })
            })?;
        let access = crate::access::AccessState::new(
            &self.config.auth,
            admin_sha256,
            self.store.clone(),
            self.metrics.clone(),
            self.tls.is_some(),
        )
        .map_err(|e| {
            HubError::Config(crate::ConfigError::Invalid {
                field: "auth.oidc".into(),
                message: e.to_string(),
            })
        })?;
        // The association API (beds, placements, stays).
        let association = crate::association_api::ApiState::new(
            self.store.clone(),
            state.pipeline.associations().clone(),
        );
        let scores = crate::early_warning::router(self.store.clone(), self.config.scores);
        let trends = crate::trends::router(self.store.clone())
            .merge(crate::score_history::router(self.store.clone()));
        let ward =
            crate::ward::router(self.store.clone(), state.alerts.clone(), self.config.scores);
        let alerts = crate::alerts::api::router(state.alerts.clone(), alerts_stop);
        // Every audited request (FHIR, /api/v1 except ingest) is recorded
        // in the hash-chained audit log after it is answered, with the
        // principal the access layer found (the audit layer is outermost,
        // so refusals are recorded too).
        let audit_state = crate::audit::AuditState {
            store: state.store.clone(),
            metrics: state.metrics.clone(),
        };
        let app = router(state)
            .merge(crate::association_api::router(association))
            .merge(scores)
            .merge(alerts)
            .merge(trends)
            .merge(ward)
            .merge(crate::dashboard::routes(self.store.clone()))
            .merge(crate::access::routes(access.clone()))
            .layer(axum::middleware::from_fn_with_state(
                access,
                crate::access::middleware,
            ))
            .layer(axum::middleware::from_fn_with_state(
                audit_state,
                crate::audit::middleware,
            ));
        tracing::info!(%addr, tls = self.tls.is_some(), "hub serving");
        match self.tls {
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await?;
            }
            Some(tls) => {
                let handle = axum_server::Handle::<SocketAddr>::new();
                let h = handle.clone();
                tokio::spawn(async move {
                    shutdown.await;
                    h.graceful_shutdown(Some(GRACE_PERIOD));
                });
                let config = axum_server::tls_rustls::RustlsConfig::from_config(tls);
                axum_server::tls_rustls::from_tcp_rustls(listener.into_std()?, config)?
                    .handle(handle)
                    .serve(app.into_make_service())
                    .await?;
            }
        }
        if let Some(task) = mqtt {
            task.await?;
        }
        if let Some(task) = retention {
            task.await?;
        }
        if let Some(task) = alert_clock {
            task.await?;
        }
        if let Some(task) = adt {
            task.await?;
        }
        tracing::info!("hub stopped");
        Ok(())
    }
}

fn load_tls(tls: &crate::config::TlsConfig) -> Result<Arc<rustls::ServerConfig>, HubError> {
    use vigil_io::tls::{self as io_tls, ClientAuth, Identity, PemFile};
    let tls_err = |e: io_tls::TlsError| HubError::Tls(e.to_string());
    let identity = Identity::load(
        PemFile::new("server.tls.cert_file", &tls.cert_file),
        PemFile::new("server.tls.key_file", &tls.key_file),
    )
    .map_err(tls_err)?;
    // Mutual TLS against `server.tls.client_ca_file`; `optional` also
    // admits clients without a certificate.
    let auth = match &tls.client_ca_file {
        None => ClientAuth::None,
        Some(path) => {
            let ca = PemFile::new("server.tls.client_ca_file", path);
            match tls
                .client_auth
                .unwrap_or(crate::config::ClientAuth::Required)
            {
                crate::config::ClientAuth::Required => ClientAuth::Required(ca),
                crate::config::ClientAuth::Optional => ClientAuth::Optional(ca),
            }
        }
    };
    let mut config = io_tls::server_config(identity, auth).map_err(tls_err)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn router(state: AppState) -> Router {
    let fhir_routes = Router::new()
        .route("/metadata", get(metadata))
        .route("/Observation", get(search))
        .route("/Observation/{id}", get(read))
        .route("/Device", get(search_devices))
        .route("/Device/{id}", get(read_device))
        .route("/Patient/{id}", get(read_patient))
        .route("/Location", get(search_locations))
        .route("/Location/{id}", get(read_location))
        .route("/$export", get(export_system))
        .route("/Patient/$export", get(export_patients))
        .route("/Group/{id}/$export", get(export_group))
        .route(
            "/$export-status/{job}",
            get(export_status).delete(export_cancel),
        )
        .route("/$export-file/{job}/{file}", get(export_file))
        .fallback(fhir_not_found);
    Router::new()
        .route(INGEST_PATH, post(ingest).layer(DefaultBodyLimit::disable()))
        .route(ENROLL_PATH, post(enroll).layer(DefaultBodyLimit::max(4096)))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/fhir", fhir_routes)
        .with_state(state)
}

// ---------------------------------------------------------------------------
// Enrolment

/// Path where a gateway exchanges a one-time enrolment token for its
/// credentials (`edge-agent provision`).
pub const ENROLL_PATH: &str = "/api/v1/enroll";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    gateway_id: String,
    enrollment_token: String,
}

/// `POST /api/v1/enroll` with JSON `{"gateway_id", "enrollment_token"}`:
/// 201 `{"gateway_id", "token"}` (the gateway's bearer token, shown once);
/// 400 malformed request or gateway id; 401 unknown, used or expired
/// enrolment token; 409 gateway id already active.
async fn enroll(State(st): State<AppState>, body: axum::body::Bytes) -> Response {
    let req: EnrollRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("expected JSON {{\"gateway_id\", \"enrollment_token\"}}: {e}"),
            );
        }
    };
    if !crate::auth::is_valid_gateway_id(&req.gateway_id) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "gateway_id must be 1-64 characters of A-Z a-z 0-9 . _ -",
        );
    }
    if !crate::auth::is_enrollment_token(&req.enrollment_token) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "enrollment_token is not a Vigil enrolment token (vge_...)",
        );
    }
    let token = match crate::auth::generate_token() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "enrolment failed");
            return json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
        }
    };
    let (store, enr, id, tok) = (
        st.store.clone(),
        hash_token(&req.enrollment_token),
        req.gateway_id.clone(),
        hash_token(&token),
    );
    match blocking(move || store.enroll(&enr, &id, &tok, now_us())).await {
        Ok(()) => {
            tracing::info!(gateway_id = %req.gateway_id, "gateway enrolled");
            (
                StatusCode::CREATED,
                axum::Json(json!({ "gateway_id": req.gateway_id, "token": token })),
            )
                .into_response()
        }
        Err(HubError::Store(StoreError::EnrollmentRefused)) => {
            tracing::warn!(gateway_id = %req.gateway_id, "enrolment refused");
            json_error(
                StatusCode::UNAUTHORIZED,
                "enrolment token unknown, already used or expired",
            )
        }
        Err(HubError::Store(StoreError::GatewayExists(_))) => json_error(
            StatusCode::CONFLICT,
            "gateway id already enrolled and active (revoke it first to re-enrol)",
        ),
        Err(e) => {
            tracing::error!(error = %e, "enrolment failed");
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

// ---------------------------------------------------------------------------
// Ingest

fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

struct IngestError {
    status: StatusCode,
    kind: Option<IngestErrorKind>,
    message: String,
    /// `Retry-After` seconds (429).
    retry_after: Option<u64>,
}

impl IngestError {
    fn new(status: StatusCode, kind: IngestErrorKind, message: impl Into<String>) -> Self {
        Self {
            status,
            kind: Some(kind),
            message: message.into(),
            retry_after: None,
        }
    }
}

use crate::pipeline::blocking;

async fn ingest(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    match ingest_inner(&st, &headers, body).await {
        Ok(resp) => resp,
        Err(e) => {
            st.metrics.batch(Outcome::Rejected);
            if let Some(kind) = e.kind {
                st.metrics.ingest_error(kind);
            }
            let mut resp = json_error(e.status, &e.message);
            if e.status == StatusCode::UNAUTHORIZED {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            if e.status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
                resp.headers_mut().insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static(crate::encoding::ACCEPTED),
                );
            }
            if let Some(secs) = e.retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            resp
        }
    }
}

/// Whether an error means the database cannot be reached right now (a
/// PostgreSQL connection failure, or the server shutting down / in
/// recovery: SQLSTATE classes 08 and 57), as opposed to a fault.
fn database_unavailable(e: &HubError) -> bool {
    matches!(e, HubError::Store(s) if s.is_transient())
}

async fn ingest_inner(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    use IngestErrorKind as K;
    let internal = |e: HubError| {
        tracing::error!(error = %e, "ingest failed");
        if database_unavailable(&e) {
            // The gateway keeps the batch and retries; tell it when.
            return IngestError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: None,
                message: "database unavailable; retry later".into(),
                retry_after: Some(5),
            };
        }
        IngestError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: None,
            message: "internal error".into(),
            retry_after: None,
        }
    };

    // 1. Authentication.
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or_else(|| {
            IngestError::new(
                StatusCode::UNAUTHORIZED,
                K::Unauthorized,
                "missing or malformed bearer token (Authorization: Bearer vgt_...)",
            )
        })?;
    let hash = hash_token(token);
    let store = st.store.clone();
    let gateway_id = blocking(move || store.authenticate(&hash))
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            tracing::warn!("ingest with unknown or revoked token");
            IngestError::new(
                StatusCode::UNAUTHORIZED,
                K::Unauthorized,
                "unknown or revoked token",
            )
        })?;

    // 1b. Per-gateway rate limit (`[ingest]`).
    if let Some(limiter) = &st.limiter
        && let Err(wait) = limiter.check(&gateway_id, std::time::Instant::now())
    {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let secs = secs.max(1);
        tracing::warn!(gateway_id = %gateway_id, retry_after_s = secs, "ingest rate limit exceeded");
        return Err(IngestError {
            retry_after: Some(secs),
            ..IngestError::new(
                StatusCode::TOO_MANY_REQUESTS,
                K::RateLimited,
                format!("rate limit exceeded; retry after {secs} s"),
            )
        });
    }

    // 2. Content type.
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case(CONTENT_TYPE_PROTOBUF) {
        return Err(IngestError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            K::UnsupportedMediaType,
            format!("Content-Type must be {CONTENT_TYPE_PROTOBUF}"),
        ));
    }

    // Content coding: identity or zstd; anything else is 415.
    let coding = crate::encoding::ContentCoding::parse(
        headers
            .get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("?")),
    )
    .map_err(|e| {
        IngestError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            K::UnsupportedMediaType,
            e.to_string(),
        )
    })?;

    // 3. Body size (as sent, then decompressed: both capped at the limit).
    let max = st.config.server.max_body_bytes;
    let too_large = || {
        IngestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            K::TooLarge,
            format!("body larger than {max} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let bytes = match Limited::new(body, max).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return Err(too_large()),
        Err(_) => {
            return Err(IngestError::new(
                StatusCode::BAD_REQUEST,
                K::Malformed,
                "failed to read the request body",
            ));
        }
    };

    let bytes = if coding == crate::encoding::ContentCoding::Identity {
        bytes
    } else {
        tokio::task::spawn_blocking(move || crate::encoding::decode(coding, bytes, max))
            .await
            .map_err(|e| internal(HubError::Io(std::io::Error::other(e))))?
            .map_err(|e| match e {
                crate::encoding::DecodeError::TooLarge { .. } => {
                    tracing::warn!(gateway_id = %gateway_id, "compressed body expands past the limit");
                    IngestError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        K::TooLarge,
                        format!("decompressed body larger than {max} bytes"),
                    )
                }
                e => IngestError::new(StatusCode::BAD_REQUEST, K::Malformed, e.to_string()),
            })?
    };

    // 4. Decoding.
    let batch = Batch::decode(bytes).map_err(|e| {
        IngestError::new(
            StatusCode::BAD_REQUEST,
            K::Malformed,
            format!("body is not a protobuf vigil.v1.Batch: {e}"),
        )
    })?;

    // 5. Identity.
    if batch.gateway_id != gateway_id {
        tracing::warn!(gateway_id = %gateway_id, "batch gateway_id differs from the token's gateway");
        return Err(IngestError::new(
            StatusCode::FORBIDDEN,
            K::Forbidden,
            "batch.gateway_id does not match the authenticated gateway",
        ));
    }
    // 6. An identity the hub can store: a sequence or incarnation above
    // 2^63-1 is refused, never wrapped.
    if let Err(e) = crate::ingest::check_batch(&batch) {
        tracing::warn!(gateway_id = %gateway_id, field = e.field, "batch refused: {e}");
        return Err(IngestError::new(
            StatusCode::BAD_REQUEST,
            K::Malformed,
            e.to_string(),
        ));
    }

    let ack = st
        .pipeline
        .store_batch(&gateway_id, batch)
        .await
        .map_err(internal)?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(CONTENT_TYPE_PROTOBUF),
        )],
        ack.encode_to_vec(),
    )
        .into_response())
}

// ---------------------------------------------------------------------------
// FHIR

fn fhir_response(status: StatusCode, body: &Json) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        body.to_string(),
    )
        .into_response()
}

fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    fhir_response(status, &fhir::operation_outcome("error", code, diagnostics))
}

fn fhir_internal(e: &HubError) -> Response {
    tracing::error!(error = %e, "FHIR request failed");
    outcome(
        StatusCode::INTERNAL_SERVER_ERROR,
        "exception",
        "internal error",
    )
}

async fn fhir_not_found(uri: Uri) -> Response {
    outcome(
        StatusCode::NOT_FOUND,
        "not-supported",
        &format!("no FHIR endpoint at {}", uri.path()),
    )
}

async fn metadata(State(st): State<AppState>) -> Response {
    st.metrics.fhir(FhirInteraction::Metadata);
    fhir_response(StatusCode::OK, &fhir::capability_statement(&st.started))
}

async fn read(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    st.metrics.fhir(FhirInteraction::Read);
    let not_found = || {
        outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Observation/{id} is not known"),
        )
    };
    if !fhir::is_valid_id(&id) {
        return not_found();
    }
    let store = st.store.clone();
    let lookup = id.clone();
    match blocking(move || store.observation(&lookup)).await {
        Ok(Some(row)) => match render_observation(&row) {
            Ok(resource) => fhir_response(StatusCode::OK, &resource),
            Err(e) => {
                tracing::error!(error = %e, "stored observation cannot be rendered");
                outcome(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    &format!("Observation/{id} is stored but cannot be rendered"),
                )
            }
        },
        Ok(None) => not_found(),
        Err(e) => fhir_internal(&e),
    }
}

async fn read_device(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    st.metrics.fhir(FhirInteraction::Read);
    if !fhir::is_valid_id(&id) {
        return outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Device/{id} is not known"),
        );
    }
    let store = st.store.clone();
    let lookup = id.clone();
    match blocking(move || store.device(&lookup)).await {
        Ok(Some(d)) => fhir_response(StatusCode::OK, &render_device(&d)),
        Ok(None) => outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Device/{id} is not known"),
        ),
        Err(e) => fhir_internal(&e),
    }
}

// ---------------------------------------------------------------------------
// Bulk Data export (see `export`)

async fn export_system(State(st): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    export_kickoff(st, headers, uri, crate::export::Scope::System).await
}

async fn export_patients(State(st): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    export_kickoff(st, headers, uri, crate::export::Scope::AllPatients).await
}

async fn export_group(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let store = st.store.clone();
    let known = blocking(move || Ok::<_, HubError>(store.list_beds().map_err(|e| e.to_string())))
        .await
        .map(|beds| beds.map(|b| b.iter().any(|b| b.ward == id)));
    match known {
        Ok(Ok(true)) => export_kickoff(st, headers, uri, crate::export::Scope::Group(id)).await,
        Ok(Ok(false)) => outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Group/{id}: no ward of that name"),
        ),
        Ok(Err(e)) => outcome(StatusCode::INTERNAL_SERVER_ERROR, "exception", &e),
        Err(e) => fhir_internal(&e),
    }
}

async fn export_kickoff(
    st: AppState,
    headers: HeaderMap,
    uri: Uri,
    scope: crate::export::Scope,
) -> Response {
    let async_requested = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim() == "respond-async"));
    if !async_requested {
        return outcome(
            StatusCode::BAD_REQUEST,
            "required",
            "$export needs the header `Prefer: respond-async`",
        );
    }
    let pairs: Vec<(String, String)> = match serde_urlencoded::from_str(uri.query().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => {
            return outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                &format!("bad query string: {e}"),
            );
        }
    };
    let base = base_url(&st, &headers, &uri);
    let request_url = format!(
        "{base}{}",
        uri.path_and_query()
            .map(|p| p.as_str().trim_start_matches("/fhir"))
            .unwrap_or("")
    );
    let request = match crate::export::parse_request(scope, &pairs, request_url) {
        Ok(r) => r,
        Err(e) => return outcome(StatusCode::BAD_REQUEST, "invalid", &e.0),
    };
    match st.exports.start(st.store.clone(), request) {
        Ok(job) => (
            StatusCode::ACCEPTED,
            [(
                header::CONTENT_LOCATION,
                HeaderValue::from_str(&format!("{base}/$export-status/{job}"))
                    .unwrap_or(HeaderValue::from_static("")),
            )],
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "bulk export could not start");
            outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "the export could not be started",
            )
        }
    }
}

async fn export_status(
    State(st): State<AppState>,
    Path(job): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let Some(j) = st.exports.job(&job) else {
        return outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such export job (finished jobs are forgotten when the hub restarts)",
        );
    };
    let status = j.status.lock().map(|s| s.clone());
    match status {
        Ok(crate::export::JobStatus::Running) => (
            StatusCode::ACCEPTED,
            [
                (
                    header::HeaderName::from_static("x-progress"),
                    HeaderValue::from_str(&crate::export::progress(&j))
                        .unwrap_or(HeaderValue::from_static("in progress")),
                ),
                (header::RETRY_AFTER, HeaderValue::from_static("1")),
            ],
        )
            .into_response(),
        Ok(crate::export::JobStatus::Done(files)) => {
            let base = base_url(&st, &headers, &uri);
            let m = crate::export::manifest(&j, &files, |name| {
                format!("{base}/$export-file/{job}/{name}")
            });
            (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                m.to_string(),
            )
                .into_response()
        }
        Ok(crate::export::JobStatus::Failed(e)) => {
            outcome(StatusCode::INTERNAL_SERVER_ERROR, "exception", &e)
        }
        Err(_) => outcome(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "export state lost",
        ),
    }
}

async fn export_cancel(State(st): State<AppState>, Path(job): Path<String>) -> Response {
    if st.exports.cancel(&job) {
        StatusCode::ACCEPTED.into_response()
    } else {
        outcome(StatusCode::NOT_FOUND, "not-found", "no such export job")
    }
}

async fn export_file(
    State(st): State<AppState>,
    Path((job, file)): Path<(String, String)>,
) -> Response {
    let path = if crate::export::is_file_name(&file) {
        st.exports.file(&job, &file)
    } else {
        None
    };
    let Some(path) = path else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such export file");
    };
    match tokio::fs::File::open(&path).await {
        Ok(f) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/fhir+ndjson"),
            )],
            Body::from_stream(tokio_util::io::ReaderStream::new(f)),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "export file unreadable");
            outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "export file unreadable",
            )
        }
    }
}

async fn read_patient(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    st.metrics.fhir(FhirInteraction::Read);
    let not_found = || {
        outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such Patient is known",
        )
    };
    if !fhir::is_valid_id(&id) {
        return not_found();
    }
    let store = st.store.clone();
    let lookup = id.clone();
    match blocking(move || store.patient(&lookup)).await {
        Ok(Some(system)) => fhir_response(
            StatusCode::OK,
            &fhir::render::render_patient(&id, Some(&system)),
        ),
        Ok(None) => not_found(),
        Err(e) => fhir_internal(&e),
    }
}

async fn locations(st: &AppState) -> Result<Vec<Json>, Response> {
    let store = st.store.clone();
    let beds = blocking(move || Ok::<_, HubError>(store.list_beds().map_err(|e| e.to_string())))
        .await
        .map_err(|e| fhir_internal(&e))?
        .map_err(|e| outcome(StatusCode::INTERNAL_SERVER_ERROR, "exception", &e))?;
    Ok(beds
        .iter()
        .map(|b| fhir::render::render_location(&b.id, &b.ward, &b.label))
        .collect())
}

async fn read_location(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    st.metrics.fhir(FhirInteraction::Read);
    match locations(&st).await {
        Ok(all) => match all.into_iter().find(|l| l["id"] == id.as_str()) {
            Some(l) => fhir_response(StatusCode::OK, &l),
            None => outcome(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("Location/{id} is not known"),
            ),
        },
        Err(resp) => resp,
    }
}

/// A query's pairs and its paging (`_count`, `_offset`).
struct Paging {
    pairs: Vec<(String, String)>,
    count: u32,
    offset: u64,
}

/// The paging of a search on `resource`, or the 400 OperationOutcome
/// naming what is wrong.
fn paging_query(resource: &str, uri: &Uri) -> Result<Paging, Box<Response>> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(uri.query().unwrap_or(""))
        .map_err(|e| {
            Box::new(outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                &format!("bad query string: {e}"),
            ))
        })?;
    let (count, offset) = fhir::parse_paging(resource, &pairs)
        .map_err(|e| Box::new(outcome(StatusCode::BAD_REQUEST, e.code, &e.diagnostics)))?;
    Ok(Paging {
        pairs,
        count,
        offset,
    })
}

async fn search_locations(State(st): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    st.metrics.fhir(FhirInteraction::Search);
    let Paging {
        pairs,
        count,
        offset,
    } = match paging_query("Location", &uri) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    match locations(&st).await {
        Ok(all) => {
            let base = base_url(&st, &headers, &uri);
            let total = all.len() as u64;
            let page: Vec<Json> = all
                .into_iter()
                .skip(usize::try_from(offset).unwrap_or(usize::MAX))
                .take(count as usize)
                .collect();
            let links = page_links(&base, "Location", &pairs, count, offset, total);
            fhir_response(StatusCode::OK, &searchset(&base, total, links, page))
        }
        Err(resp) => resp,
    }
}

async fn search_devices(State(st): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    st.metrics.fhir(FhirInteraction::Search);
    let Paging {
        pairs,
        count,
        offset,
    } = match paging_query("Device", &uri) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let store = st.store.clone();
    let (total, rows) = match blocking(move || store.devices(count, offset)).await {
        Ok(r) => r,
        Err(e) => return fhir_internal(&e),
    };
    let base = base_url(&st, &headers, &uri);
    let resources: Vec<Json> = rows.iter().map(render_device).collect();
    let links = page_links(&base, "Device", &pairs, count, offset, total);
    fhir_response(StatusCode::OK, &searchset(&base, total, links, resources))
}

/// The FHIR base URL: configured, or derived from the request's Host.
/// HTTP/2 carries the host in the `:authority` pseudo-header (the request
/// URI's authority), HTTP/1.1 in `Host`.
fn base_url(st: &AppState, headers: &HeaderMap, uri: &Uri) -> String {
    if let Some(b) = st.config.fhir_base_url() {
        return b;
    }
    let host = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("localhost");
    let scheme = if st.tls { "https" } else { "http" };
    format!("{scheme}://{host}/fhir")
}

async fn search(State(st): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    st.metrics.fhir(FhirInteraction::Search);
    let pairs: Vec<(String, String)> = match serde_urlencoded::from_str(uri.query().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => {
            return outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                &format!("bad query string: {e}"),
            );
        }
    };
    let search = match fhir::parse_search(&pairs) {
        Ok(s) => s,
        Err(e) => return outcome(StatusCode::BAD_REQUEST, e.code, &e.diagnostics),
    };
    let store = st.store.clone();
    let s2 = search.clone();
    let (total, rows) = match blocking(move || store.search(&s2)).await {
        Ok(r) => r,
        Err(e) => return fhir_internal(&e),
    };
    let base = base_url(&st, &headers, &uri);
    let links = page_links(
        &base,
        "Observation",
        &pairs,
        search.count,
        search.offset,
        total,
    );
    let bundle = searchset(&base, total, links, render_rows(&rows));
    tracing::debug!(total, returned = rows.len(), "observation search");
    fhir_response(StatusCode::OK, &bundle)
}

fn page_link(
    base: &str,
    resource: &str,
    pairs: &[(String, String)],
    count: u32,
    offset: u64,
) -> String {
    let mut q: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "_count" | "_offset" | "_format"))
        .cloned()
        .collect();
    q.push(("_count".into(), count.to_string()));
    q.push(("_offset".into(), offset.to_string()));
    let query = serde_urlencoded::to_string(&q).unwrap_or_default();
    format!("{base}/{resource}?{query}")
}

/// `self`, `next` and `previous` links of a page.
fn page_links(
    base: &str,
    resource: &str,
    pairs: &[(String, String)],
    count: u32,
    offset: u64,
    total: u64,
) -> Vec<Json> {
    let mut links = vec![json!({
        "relation": "self",
        "url": page_link(base, resource, pairs, count, offset),
    })];
    let next_offset = offset + u64::from(count);
    if count > 0 && next_offset < total {
        links.push(json!({
            "relation": "next",
            "url": page_link(base, resource, pairs, count, next_offset),
        }));
    }
    if offset > 0 && count > 0 {
        links.push(json!({
            "relation": "previous",
            "url": page_link(base, resource, pairs, count, offset.saturating_sub(u64::from(count))),
        }));
    }
    links
}

/// A searchset Bundle of resources (each with an `id`); OperationOutcome
/// resources are listed with search mode `outcome`.
fn searchset(base: &str, total: u64, links: Vec<Json>, resources: Vec<Json>) -> Json {
    let entries: Vec<Json> = resources
        .into_iter()
        .map(|resource| {
            let ty = resource["resourceType"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if ty == "OperationOutcome" {
                return json!({ "resource": resource, "search": { "mode": "outcome" } });
            }
            let id = resource["id"].as_str().unwrap_or_default().to_owned();
            json!({
                "fullUrl": format!("{base}/{ty}/{id}"),
                "resource": resource,
                "search": { "mode": "match" },
            })
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    })
}

/// Renders a page of Observation rows; a row that cannot be rendered
/// becomes an OperationOutcome entry (and an error log), never a silently
/// shorter page.
fn render_rows(rows: &[ObservationRow]) -> Vec<Json> {
    rows.iter()
        .map(|row| match render_observation(row) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "stored observation cannot be rendered");
                fhir::operation_outcome(
                    "error",
                    "exception",
                    &format!("Observation/{} is stored but cannot be rendered", row.id),
                )
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Operations

async fn readyz(State(st): State<AppState>) -> Response {
    let store = st.store.clone();
    match blocking(move || store.ping()).await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
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
