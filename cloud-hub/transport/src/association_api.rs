//! The association API (`/api/v1/beds`, `/api/v1/placements…`,
//! `/api/v1/patients/…`, `/api/v1/occupancy`): JSON in, JSON out.
//!
//! Who may call which route is decided before the handlers run, by the
//! access policy (`crate::access::POLICY`): beds and placements are for
//! biomedical engineers, stays and occupancy for clinicians, all for
//! administrators. `association.admin_token_file` (mode 0600, at least 32
//! characters) names the bootstrap admin bearer token.
//!
//! Every change takes an explicit time `at` (RFC 3339, e.g.
//! `2026-11-24T08:30:00Z`; default: now) and answers with how many stored
//! readings it re-attributed. A change dated before
//! `[association] reattribution_window_minutes` (default 15) moves stored
//! readings between patients, a clinical act: it needs the clinician or
//! admin role (403) and a `reason` (400 naming it); see
//! `hub_domain::association::check_reattribution`. Every change that names
//! or moves a patient writes audit entries with the patients, the number of
//! readings moved and the reason. Errors are `{"error": "...", "field": "..."}`
//! (`field` when one field is at fault) with 400 (malformed or invalid
//! field), 401 (no or unknown credentials), 403 (role), 404 (unknown bed) or 409
//! (conflicts with the recorded stays/placements).
//!
//! Logs carry bed, gateway and device ids and counts, never patient
//! identifiers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use axum::Extension;
use hub_domain::association::{
    AuditContext, DEFAULT_REATTRIBUTION_WINDOW_MINUTES, ReattributionRefused, Subject,
    audit_entries, check_reattribution,
};
use hub_domain::clock::format_instant;

use crate::access::{Principal, Role};
use crate::association::{AssocError, Bed, PatientId};
use crate::store::{Associations, Store, now_us};

/// `[association]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssociationConfig {
    /// File (mode 0600) holding the admin bearer token of the association
    /// API. Absent: the API answers 403. Relative paths are relative to the
    /// config file's directory.
    pub admin_token_file: Option<PathBuf>,
    /// How far back (minutes) a placement or stay change may be dated
    /// without being a re-attribution of stored readings: an earlier `at`
    /// needs the clinician or admin role and a `reason`.
    #[serde(default = "default_window")]
    pub reattribution_window_minutes: u32,
}

fn default_window() -> u32 {
    DEFAULT_REATTRIBUTION_WINDOW_MINUTES
}

impl Default for AssociationConfig {
    fn default() -> Self {
        Self {
            admin_token_file: None,
            reattribution_window_minutes: DEFAULT_REATTRIBUTION_WINDOW_MINUTES,
        }
    }
}

/// Longest accepted re-attribution window: one week.
pub const MAX_REATTRIBUTION_WINDOW_MINUTES: u32 = 7 * 24 * 60;

impl AssociationConfig {
    /// Checks the fields; errors name them.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        if self.reattribution_window_minutes > MAX_REATTRIBUTION_WINDOW_MINUTES {
            return Err(crate::ConfigError::invalid(
                "association.reattribution_window_minutes",
                format!("must be between 0 and {MAX_REATTRIBUTION_WINDOW_MINUTES}"),
            ));
        }
        Ok(())
    }
}

/// Shortest accepted admin token.
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;

/// Errors loading the admin token.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("association.admin_token_file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("association.admin_token_file {0} is accessible by group or others; chmod 600 it")]
    Permissions(PathBuf),
    #[error(
        "association.admin_token_file {0}: the token must be at least {MIN_ADMIN_TOKEN_LEN} printable characters"
    )]
    TooShort(PathBuf),
}

/// Read the admin token (checked: mode 0600, length); its SHA-256.
pub fn load_admin_token(path: &Path) -> Result<String, AdminTokenError> {
    let read = |source| AdminTokenError::Read {
        path: path.to_owned(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(AdminTokenError::Permissions(path.to_owned()));
        }
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let token = text.trim();
    if token.len() < MIN_ADMIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AdminTokenError::TooShort(path.to_owned()));
    }
    Ok(crate::auth::hash_token(token))
}

/// State of the association routes.
#[derive(Debug, Clone)]
pub struct ApiState {
    store: Store,
    fallback: Arc<Associations>,
    /// Links re-attribution audit entries (empty: unkeyed log).
    audit_keys: crate::audit::AuditKeys,
    /// `[identifiers]`: a patient's `system` (an HL7 assigning authority,
    /// an OID or a URI) is stored as its URI.
    identifiers: Arc<hub_domain::identifiers::IdentifierSystems>,
    /// `[association] reattribution_window_minutes`, in µs.
    window_us: i64,
    /// Where a failed audit append is counted.
    metrics: Option<crate::SharedMetrics>,
}

impl ApiState {
    pub fn new(store: Store, fallback: Arc<Associations>) -> Self {
        Self {
            store,
            fallback,
            identifiers: Arc::default(),
            window_us: i64::from(DEFAULT_REATTRIBUTION_WINDOW_MINUTES) * 60_000_000,
            metrics: None,
            audit_keys: crate::audit::AuditKeys::default(),
        }
    }

    /// The hub's audit keys, for re-attribution entries.
    pub fn with_audit_keys(mut self, keys: crate::audit::AuditKeys) -> Self {
        self.audit_keys = keys;
        self
    }

    /// Applies `[association]` (the re-attribution window).
    pub fn with_config(mut self, config: &AssociationConfig) -> Self {
        self.window_us = i64::from(config.reattribution_window_minutes) * 60_000_000;
        self
    }

    /// Counts audit append failures into `metrics`
    /// (`vigil_hub_audit_failures_total`).
    pub fn with_metrics(mut self, metrics: crate::SharedMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// May the caller make a change dated `at` (a re-attribution when it is
    /// before the window)? The reason to record. `at_text`: the request's
    /// `at`; without one the change is dated now, never back-dated (even
    /// with a zero window).
    fn authorise(
        &self,
        at: i64,
        at_text: Option<&str>,
        principal: Option<&Principal>,
        reason: Option<&str>,
    ) -> Result<Option<String>, ApiError> {
        let now = if at_text.is_some() { now_us() } else { at };
        let clinical = principal.is_some_and(|p| {
            p.roles
                .iter()
                .any(|r| matches!(r, Role::Clinician | Role::Admin))
        });
        match check_reattribution(at, now, self.window_us, clinical, reason) {
            Ok(r) => Ok(r.map(str::to_owned)),
            Err(e @ ReattributionRefused::Role) => {
                Err(ApiError::new(StatusCode::FORBIDDEN, e.to_string()))
            }
            Err(e) => Err(ApiError::field("reason", e.to_string())),
        }
    }

    /// Writes the change's audit entries (the patients it names and moved,
    /// with counts and the reason). A failure is logged and counted: the
    /// change is committed.
    async fn audit(
        &self,
        principal: Option<&Principal>,
        resource: &str,
        what: String,
        reason: Option<&str>,
        named: &[PatientId],
        change: &crate::association::Change,
    ) {
        let actor = principal.map_or("anonymous", |p| p.id.as_str());
        let named: Vec<Subject> = named
            .iter()
            .map(|p| Subject {
                system: Some(p.system.clone()).filter(|s| !s.is_empty()),
                value: p.value.clone(),
            })
            .collect();
        let ctx = AuditContext {
            time_us: now_us(),
            actor,
            resource,
            outcome: 200,
            what: &what,
            reason,
        };
        let entries = audit_entries(&ctx, &named, change);
        if entries.is_empty() {
            return;
        }
        if let Err(e) = crate::audit::append_all(&self.store, &self.audit_keys, entries).await {
            if let Some(m) = &self.metrics {
                m.audit_failure();
            }
            tracing::error!(error = %e, "writing re-attribution audit entries failed");
        }
    }

    /// Maps patient identifier systems by `identifiers`.
    pub fn with_identifiers(
        mut self,
        identifiers: Arc<hub_domain::identifiers::IdentifierSystems>,
    ) -> Self {
        self.identifiers = identifiers;
        self
    }

    /// `patient` with its system mapped to a URI.
    fn mapped(&self, mut patient: PatientId) -> PatientId {
        patient.system = self.identifiers.system_uri(&patient.system);
        patient
    }
}

/// The association routes, with their state.
pub fn router<S: Clone + Send + Sync + 'static>(state: ApiState) -> Router<S> {
    Router::new()
        .route("/api/v1/beds", post(create_bed).get(list_beds))
        .route("/api/v1/placements", post(place))
        .route("/api/v1/placements/end", post(end_placement))
        .route("/api/v1/patients/admit", post(admit))
        .route("/api/v1/patients/transfer", post(transfer))
        .route("/api/v1/patients/discharge", post(discharge))
        .route("/api/v1/occupancy", get(occupancy))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .with_state(state)
}

/// An API error response.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
        }
    }
    fn field(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.field {
            Some(f) => json!({ "error": self.message, "field": f }),
            None => json!({ "error": self.message }),
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<AssocError> for ApiError {
    fn from(e: AssocError) -> Self {
        let status = match &e {
            AssocError::Invalid { field, message } => {
                return ApiError::field(field, format!("{field} {message}"));
            }
            AssocError::BedNotFound(_) => StatusCode::NOT_FOUND,
            AssocError::BedExists(_)
            | AssocError::BedOccupied(_)
            | AssocError::AlreadyAdmitted
            | AssocError::NotAdmitted
            | AssocError::NotPlaced
            | AssocError::Erased => StatusCode::CONFLICT,
            AssocError::Store(err) => {
                tracing::error!(error = %err, "association change failed");
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
            }
        };
        let field = match &e {
            AssocError::BedNotFound(_) => Some("bed_id"),
            _ => None,
        };
        ApiError {
            status,
            message: e.to_string(),
            field,
        }
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("malformed JSON body: {msg}"),
        )
    })
}

/// How far ahead of the hub clock `at` may be.
const MAX_FUTURE_US: i64 = 24 * 3600 * 1_000_000;

/// Parses `at` (RFC 3339; absent: now); the field name is `at`.
fn parse_at(at: Option<&str>) -> Result<i64, ApiError> {
    let now = now_us();
    let Some(text) = at else { return Ok(now) };
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        ApiError::field(
            "at",
            format!("at must be an RFC 3339 time like 2026-11-24T08:30:00Z: {e}"),
        )
    })?;
    let us = i64::try_from(t.unix_timestamp_nanos() / 1000)
        .map_err(|_| ApiError::field("at", "at is out of range"))?;
    if us < shared_protocol::EPOCH_2000_US {
        return Err(ApiError::field("at", "at must not be before 2000-01-01"));
    }
    if us > now.saturating_add(MAX_FUTURE_US) {
        return Err(ApiError::field(
            "at",
            "at must not be more than 24 h ahead of the hub clock",
        ));
    }
    Ok(us)
}

async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AssocError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "association task failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        })?
        .map_err(ApiError::from)
}

fn changed(c: crate::association::Change) -> Response {
    (
        StatusCode::OK,
        axum::Json(json!({ "reattributed": c.reattributed })),
    )
        .into_response()
}

fn respond(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn create_bed(State(st): State<ApiState>, body: Bytes) -> Response {
    respond(
        async {
            let bed: Bed = parse_body(&body)?;
            let store = st.store.clone();
            let b = bed.clone();
            run(move || store.create_bed(&b)).await?;
            tracing::info!(bed_id = %bed.id, "bed created");
            Ok((StatusCode::CREATED, axum::Json(bed)).into_response())
        }
        .await,
    )
}

async fn list_beds(State(st): State<ApiState>) -> Response {
    respond(
        async {
            let store = st.store.clone();
            let beds = run(move || store.list_beds()).await?;
            Ok(axum::Json(json!({ "beds": beds })).into_response())
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceRequest {
    gateway_id: String,
    device_id: String,
    bed_id: String,
    at: Option<String>,
    /// Why: required for a change dated before the re-attribution window.
    reason: Option<String>,
}

type Caller = Option<Extension<Principal>>;

fn caller(p: &Caller) -> Option<&Principal> {
    p.as_ref().map(|Extension(p)| p)
}

async fn place(State(st): State<ApiState>, principal: Caller, body: Bytes) -> Response {
    respond(
        async {
            let r: PlaceRequest = parse_body(&body)?;
            let at = parse_at(r.at.as_deref())?;
            let reason =
                st.authorise(at, r.at.as_deref(), caller(&principal), r.reason.as_deref())?;
            let (store, fb) = (st.store.clone(), st.fallback.clone());
            let (g, d, b) = (r.gateway_id.clone(), r.device_id.clone(), r.bed_id.clone());
            let c = run(move || store.place_device(&g, &d, &b, at, &fb)).await?;
            tracing::info!(gateway_id = %r.gateway_id, device_id = %r.device_id, bed_id = %r.bed_id,
                reattributed = c.reattributed, "device placed");
            let what = format!(
                "device {}/{} placed at bed {} from {}",
                r.gateway_id,
                r.device_id,
                r.bed_id,
                format_instant(at)
            );
            st.audit(
                caller(&principal),
                "/api/v1/placements",
                what,
                reason.as_deref(),
                &[],
                &c,
            )
            .await;
            Ok(changed(c))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndPlacementRequest {
    gateway_id: String,
    device_id: String,
    at: Option<String>,
    reason: Option<String>,
}

async fn end_placement(State(st): State<ApiState>, principal: Caller, body: Bytes) -> Response {
    respond(
        async {
            let r: EndPlacementRequest = parse_body(&body)?;
            let at = parse_at(r.at.as_deref())?;
            let reason =
                st.authorise(at, r.at.as_deref(), caller(&principal), r.reason.as_deref())?;
            let (store, fb) = (st.store.clone(), st.fallback.clone());
            let (g, d) = (r.gateway_id.clone(), r.device_id.clone());
            let c = run(move || store.remove_device(&g, &d, at, &fb)).await?;
            tracing::info!(gateway_id = %r.gateway_id, device_id = %r.device_id,
                reattributed = c.reattributed, "device placement ended");
            let what = format!(
                "placement of device {}/{} ended at {}",
                r.gateway_id,
                r.device_id,
                format_instant(at)
            );
            st.audit(
                caller(&principal),
                "/api/v1/placements/end",
                what,
                reason.as_deref(),
                &[],
                &c,
            )
            .await;
            Ok(changed(c))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdmitRequest {
    patient: PatientId,
    bed_id: String,
    at: Option<String>,
    /// Encounter/visit number (optional).
    visit: Option<String>,
    reason: Option<String>,
}

async fn admit(State(st): State<ApiState>, principal: Caller, body: Bytes) -> Response {
    respond(
        async {
            let mut r: AdmitRequest = parse_body(&body)?;
            r.patient = st.mapped(r.patient);
            let at = parse_at(r.at.as_deref())?;
            let reason =
                st.authorise(at, r.at.as_deref(), caller(&principal), r.reason.as_deref())?;
            if let Some(v) = &r.visit
                && (v.is_empty() || v.len() > 64 || v.chars().any(char::is_control))
            {
                return Err(ApiError::field(
                    "visit",
                    "visit must be 1-64 characters without control characters",
                ));
            }
            let (store, fb) = (st.store.clone(), st.fallback.clone());
            let (bed, patient) = (r.bed_id.clone(), r.patient.clone());
            let c = run(move || store.admit(&r.patient, &r.bed_id, at, r.visit.as_deref(), &fb))
                .await?;
            tracing::info!(bed_id = %bed, reattributed = c.reattributed, "patient admitted");
            let what = format!("admitted to bed {bed} at {}", format_instant(at));
            st.audit(
                caller(&principal),
                "/api/v1/patients/admit",
                what,
                reason.as_deref(),
                &[patient],
                &c,
            )
            .await;
            Ok(changed(c))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    patient: PatientId,
    bed_id: String,
    at: Option<String>,
    reason: Option<String>,
}

async fn transfer(State(st): State<ApiState>, principal: Caller, body: Bytes) -> Response {
    respond(
        async {
            let mut r: TransferRequest = parse_body(&body)?;
            r.patient = st.mapped(r.patient);
            let at = parse_at(r.at.as_deref())?;
            let reason =
                st.authorise(at, r.at.as_deref(), caller(&principal), r.reason.as_deref())?;
            let (store, fb) = (st.store.clone(), st.fallback.clone());
            let (bed, patient) = (r.bed_id.clone(), r.patient.clone());
            let c = run(move || store.transfer(&r.patient, &r.bed_id, at, &fb)).await?;
            tracing::info!(bed_id = %bed, reattributed = c.reattributed, "patient transferred");
            let what = format!("transferred to bed {bed} at {}", format_instant(at));
            st.audit(
                caller(&principal),
                "/api/v1/patients/transfer",
                what,
                reason.as_deref(),
                &[patient],
                &c,
            )
            .await;
            Ok(changed(c))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DischargeRequest {
    patient: PatientId,
    at: Option<String>,
    reason: Option<String>,
}

async fn discharge(State(st): State<ApiState>, principal: Caller, body: Bytes) -> Response {
    respond(
        async {
            let mut r: DischargeRequest = parse_body(&body)?;
            r.patient = st.mapped(r.patient);
            let at = parse_at(r.at.as_deref())?;
            let reason =
                st.authorise(at, r.at.as_deref(), caller(&principal), r.reason.as_deref())?;
            let (store, fb) = (st.store.clone(), st.fallback.clone());
            let patient = r.patient.clone();
            let c = run(move || store.discharge(&r.patient, at, &fb)).await?;
            tracing::info!(reattributed = c.reattributed, "patient discharged");
            let what = format!("discharged at {}", format_instant(at));
            st.audit(
                caller(&principal),
                "/api/v1/patients/discharge",
                what,
                reason.as_deref(),
                &[patient],
                &c,
            )
            .await;
            Ok(changed(c))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OccupancyQuery {
    at: Option<String>,
}

async fn occupancy(
    State(st): State<ApiState>,
    query: Result<Query<OccupancyQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    respond(
        async {
            let Query(q) = query.map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("bad query string: {e}"))
            })?;
            let at = parse_at(q.at.as_deref())?;
            let store = st.store.clone();
            let beds = run(move || store.occupancy(at)).await?;
            // The audit entry names the patients shown.
            let patients: Vec<String> = beds
                .iter()
                .filter_map(|b| b.patient.as_ref().map(|p| p.value.clone()))
                .collect();
            let beds: Vec<_> = beds
                .into_iter()
                .map(|b| {
                    json!({
                        "id": b.bed.id,
                        "ward": b.bed.ward,
                        "label": b.bed.label,
                        "patient": b.patient.map(|p| json!({
                            "system": p.system,
                            "value": p.value,
                            "since": crate::fhir::format_instant(p.since_us),
                        })),
                        "devices": b.devices.into_iter().map(|d| json!({
                            "gateway_id": d.gateway_id,
                            "device_id": d.device_id,
                            "since": crate::fhir::format_instant(d.since_us),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            Ok(crate::audit::with_patients(
                axum::Json(json!({
                    "at": crate::fhir::format_instant(at),
                    "beds": beds,
                }))
                .into_response(),
                patients,
            ))
        }
        .await,
    )
}
