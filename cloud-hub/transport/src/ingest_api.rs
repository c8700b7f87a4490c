//! The gateways' HTTP routes: `POST /api/v1/ingest` (protobuf `Batch` in,
//! `BatchAck` out, once durable; through `pipeline`, shared with MQTT
//! ingest) and `POST /api/v1/enroll` (one-time enrolment token in, the
//! gateway's bearer token out). Gateways authenticate here themselves; the
//! access layer lets these routes through.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use prost::Message;
use serde::Deserialize;
use serde_json::json;
use shared_protocol::v1::Batch;
use shared_protocol::{CONTENT_TYPE_PROTOBUF, INGEST_PATH};

use crate::SharedMetrics;
use crate::TransportError;
use crate::auth::{bearer_token, hash_token};
use crate::config_error::ConfigError;
use crate::metrics::{IngestErrorKind, Outcome};
use crate::pipeline::{Pipeline, blocking};
use crate::rate_limit::RateLimiter;
use crate::store::{Store, StoreError, now_us};

/// `[ingest]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Batches per second each authenticated gateway may post to
    /// `POST /api/v1/ingest` (a token bucket per gateway, in memory, per hub
    /// instance). Over the limit the hub answers 429 with `Retry-After`.
    /// Absent: no limit.
    pub rate_limit_batches_per_s: Option<f64>,
    /// Bucket size: how many batches a gateway may post at once after a
    /// quiet period. Default: the rate rounded up (at least 1).
    pub burst: Option<u32>,
}

impl IngestConfig {
    /// The effective (rate per second, burst) when rate limiting is on.
    pub fn rate_limit(&self) -> Option<(f64, u32)> {
        self.rate_limit_batches_per_s.map(|rate| {
            let burst = self
                .burst
                .unwrap_or_else(|| rate.ceil().clamp(1.0, 1e9) as u32);
            (rate, burst)
        })
    }

    /// Checks the values, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(rate) = self.rate_limit_batches_per_s
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(ConfigError::invalid(
                "ingest.rate_limit_batches_per_s",
                "must be a number greater than 0",
            ));
        }
        if self.burst == Some(0) {
            return Err(ConfigError::invalid("ingest.burst", "must be at least 1"));
        }
        if self.burst.is_some() && self.rate_limit_batches_per_s.is_none() {
            return Err(ConfigError::invalid(
                "ingest.burst",
                "needs ingest.rate_limit_batches_per_s",
            ));
        }
        Ok(())
    }
}

/// State of the ingest and enrolment routes.
#[derive(Debug, Clone)]
pub struct IngestState {
    store: Store,
    metrics: SharedMetrics,
    limiter: Option<Arc<RateLimiter>>,
    /// Ingest (HTTP here, MQTT in `mqtt_ingest`): store, count, after-ingest.
    pipeline: Pipeline,
}

impl IngestState {
    /// The HTTP ingest over `pipeline` (its store, counters and body limit),
    /// rate limited per gateway by `config`.
    pub fn new(pipeline: Pipeline, config: &IngestConfig) -> Self {
        Self {
            store: pipeline.store().clone(),
            metrics: pipeline.metrics().clone(),
            limiter: config
                .rate_limit()
                .map(|(rate, burst)| Arc::new(RateLimiter::new(rate, burst))),
            pipeline,
        }
    }
}

/// The ingest and enrolment routes.
pub fn router<S: Clone + Send + Sync + 'static>(state: IngestState) -> Router<S> {
    Router::new()
        .route(INGEST_PATH, post(ingest).layer(DefaultBodyLimit::disable()))
        .route(ENROLL_PATH, post(enroll).layer(DefaultBodyLimit::max(4096)))
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
async fn enroll(State(st): State<IngestState>, body: axum::body::Bytes) -> Response {
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
        Err(TransportError::Store(StoreError::EnrollmentRefused)) => {
            tracing::warn!(gateway_id = %req.gateway_id, "enrolment refused");
            json_error(
                StatusCode::UNAUTHORIZED,
                "enrolment token unknown, already used or expired",
            )
        }
        Err(TransportError::Store(StoreError::GatewayExists(_))) => json_error(
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

async fn ingest(State(st): State<IngestState>, headers: HeaderMap, body: Body) -> Response {
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

/// Whether an error means the database cannot serve the batch right now
/// (a PostgreSQL connection failure, the server shutting down / in
/// recovery, or a transaction it rolled back to resolve a conflict:
/// SQLSTATE classes 08, 57 and 40), as opposed to a fault.
fn database_unavailable(e: &TransportError) -> bool {
    matches!(e, TransportError::Store(s) if s.is_transient())
}

async fn ingest_inner(
    st: &IngestState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    use IngestErrorKind as K;
    let internal = |e: TransportError| {
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
    let max = st.pipeline.max_body_bytes();
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
            .map_err(|e| internal(TransportError::Io(std::io::Error::other(e))))?
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
