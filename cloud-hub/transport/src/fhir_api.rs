//! The FHIR R4 API under `/fhir` (who may call it: `crate::access::POLICY`):
//! `metadata`, Observation/Device/Patient/Location read and search, and
//! the Bulk Data `$export` operations (jobs in `export`).

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use crate::SharedMetrics;
use crate::TransportError;
use crate::fhir::render::{ObservationRow, ObservationWriter, render_device, write_observation};
use crate::fhir::{self, FHIR_JSON};
use crate::metrics::FhirInteraction;
use crate::pipeline::blocking;
use crate::store::{Store, now_us};

/// `[fhir]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirConfig {
    /// Public base URL of the FHIR API (e.g. `https://hub.example.org/fhir`),
    /// used for `fullUrl` and paging links. Derived from the request's
    /// `Host` header when absent.
    pub base_url: Option<String>,
}

impl FhirConfig {
    /// The base URL with any trailing slash removed.
    pub fn base_url(&self) -> Option<String> {
        self.base_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_owned())
    }
}

/// State of the FHIR routes.
#[derive(Debug, Clone)]
pub struct FhirState {
    store: Store,
    metrics: SharedMetrics,
    /// `[fhir] base_url` (no trailing slash), else derived per request.
    base_url: Option<String>,
    /// Whether the hub serves HTTPS (the scheme of a derived base URL).
    tls: bool,
    /// When the hub started (the CapabilityStatement's date).
    started: String,
    exports: Arc<crate::export::Exports>,
    /// `[identifiers]`: `patient:identifier` systems are mapped before the
    /// search, so the HL7 authority and its URI find the same patient.
    identifiers: Arc<hub_domain::identifiers::IdentifierSystems>,
}

impl FhirState {
    /// The bulk export jobs (for exports retention).
    pub fn exports(&self) -> Arc<crate::export::Exports> {
        self.exports.clone()
    }

    /// `exports_dir`: where Bulk Data export jobs write their files.
    pub fn new(
        store: Store,
        metrics: SharedMetrics,
        config: &FhirConfig,
        tls: bool,
        exports_dir: PathBuf,
    ) -> Self {
        Self {
            store,
            metrics,
            base_url: config.base_url(),
            tls,
            started: fhir::format_instant(now_us() / 1_000_000 * 1_000_000),
            exports: Arc::new(crate::export::Exports::new(exports_dir)),
            identifiers: Arc::default(),
        }
    }

    /// Maps the systems of `patient:identifier` searches by `identifiers`.
    pub fn with_identifiers(
        mut self,
        identifiers: Arc<hub_domain::identifiers::IdentifierSystems>,
    ) -> Self {
        self.identifiers = identifiers;
        self
    }
}

/// Resolves `patient:identifier` tokens to the patient ids they name: a
/// known patient whose stored system is the token's system mapped to its
/// URI (any system when the token has none; none for `|value`). Adds them
/// to `search.patients`; false when tokens were given and none names a
/// known patient (the search finds nothing).
fn resolve_identifiers(
    store: &Store,
    identifiers: &hub_domain::identifiers::IdentifierSystems,
    search: &mut fhir::ObservationSearch,
) -> Result<bool, crate::store::StoreError> {
    if search.patient_identifiers.is_empty() {
        return Ok(true);
    }
    for token in std::mem::take(&mut search.patient_identifiers) {
        let Some(stored) = store.patient(&token.value)? else {
            continue;
        };
        let matches = match token.system.as_deref() {
            None => true,
            Some(raw) => identifiers.system_uri(raw) == identifiers.system_uri(&stored),
        };
        if matches && !search.patients.contains(&token.value) {
            search.patients.push(token.value);
        }
    }
    Ok(!search.patients.is_empty())
}

/// The FHIR routes, nested under `/fhir`.
pub fn router<S: Clone + Send + Sync + 'static>(state: FhirState) -> Router<S> {
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
        .fallback(fhir_not_found)
        .with_state(state);
    Router::new().nest("/fhir", fhir_routes)
}

/// `body` serialized straight into the response buffer (no intermediate
/// `String` through `fmt`).
fn fhir_response(status: StatusCode, body: &Json) -> Response {
    let mut buf = Vec::with_capacity(4096);
    if let Err(e) = serde_json::to_writer(&mut buf, body) {
        // A `Value` always serializes; kept as an error, never a panic.
        tracing::error!(error = %e, "FHIR response cannot be serialized");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    fhir_bytes(status, buf)
}

/// A FHIR JSON response of bytes already serialized.
fn fhir_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        body,
    )
        .into_response()
}

/// One stored observation as FHIR JSON bytes.
fn render_bytes(row: &ObservationRow) -> Result<Vec<u8>, crate::fhir::render::RenderError> {
    let mut out = Vec::with_capacity(2048);
    write_observation(row, &mut out)?;
    Ok(out)
}

fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    fhir_response(status, &fhir::operation_outcome("error", code, diagnostics))
}

fn fhir_internal(e: &TransportError) -> Response {
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

async fn metadata(State(st): State<FhirState>) -> Response {
    st.metrics.fhir(FhirInteraction::Metadata);
    fhir_response(StatusCode::OK, &fhir::capability_statement(&st.started))
}

async fn read(State(st): State<FhirState>, Path(id): Path<String>) -> Response {
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
    let future = st.store.observation_future(&id);
    match crate::pipeline::read_future(&st.store, future, move || store.observation(&lookup)).await
    {
        Ok(Some(row)) => match render_bytes(&row) {
            Ok(body) => crate::audit::with_patients(
                fhir_bytes(StatusCode::OK, body),
                row.patient_id.clone(),
            ),
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

async fn read_device(State(st): State<FhirState>, Path(id): Path<String>) -> Response {
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

async fn export_system(State(st): State<FhirState>, headers: HeaderMap, uri: Uri) -> Response {
    export_kickoff(st, headers, uri, crate::export::Scope::System).await
}

async fn export_patients(State(st): State<FhirState>, headers: HeaderMap, uri: Uri) -> Response {
    export_kickoff(st, headers, uri, crate::export::Scope::AllPatients).await
}

async fn export_group(
    State(st): State<FhirState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let store = st.store.clone();
    let known =
        blocking(move || Ok::<_, TransportError>(store.list_beds().map_err(|e| e.to_string())))
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
    st: FhirState,
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
    State(st): State<FhirState>,
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

async fn export_cancel(State(st): State<FhirState>, Path(job): Path<String>) -> Response {
    if st.exports.cancel(&job) {
        StatusCode::ACCEPTED.into_response()
    } else {
        outcome(StatusCode::NOT_FOUND, "not-found", "no such export job")
    }
}

async fn export_file(
    State(st): State<FhirState>,
    Path((job, file)): Path<(String, String)>,
) -> Response {
    let found = if crate::export::is_file_name(&file) {
        st.exports.file(&job, &file)
    } else {
        None
    };
    let Some((path, patients)) = found else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such export file");
    };
    match tokio::fs::File::open(&path).await {
        // The audit entry names the patients whose data the file holds.
        Ok(f) => crate::audit::with_patients(
            (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/fhir+ndjson"),
                )],
                Body::from_stream(tokio_util::io::ReaderStream::new(f)),
            )
                .into_response(),
            patients,
        ),
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

async fn read_patient(State(st): State<FhirState>, Path(id): Path<String>) -> Response {
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

async fn locations(st: &FhirState) -> Result<Vec<Json>, Response> {
    let store = st.store.clone();
    let beds =
        blocking(move || Ok::<_, TransportError>(store.list_beds().map_err(|e| e.to_string())))
            .await
            .map_err(|e| fhir_internal(&e))?
            .map_err(|e| outcome(StatusCode::INTERNAL_SERVER_ERROR, "exception", &e))?;
    Ok(beds
        .iter()
        .map(|b| fhir::render::render_location(&b.id, &b.ward, &b.label))
        .collect())
}

async fn read_location(State(st): State<FhirState>, Path(id): Path<String>) -> Response {
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

async fn search_locations(State(st): State<FhirState>, headers: HeaderMap, uri: Uri) -> Response {
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

async fn search_devices(State(st): State<FhirState>, headers: HeaderMap, uri: Uri) -> Response {
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
fn base_url(st: &FhirState, headers: &HeaderMap, uri: &Uri) -> String {
    if let Some(b) = &st.base_url {
        return b.clone();
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

async fn search(State(st): State<FhirState>, headers: HeaderMap, uri: Uri) -> Response {
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
    let mut s2 = search.clone();
    let identifiers = st.identifiers.clone();
    // A search by patient identifier resolves them first (blocking reads).
    let future = if search.patient_identifiers.is_empty() {
        st.store.search_future(&search)
    } else {
        None
    };
    let (total, rows) = match crate::pipeline::read_future(&st.store, future, move || {
        if !resolve_identifiers(&store, &identifiers, &mut s2)? {
            return Ok::<_, crate::store::StoreError>((0, Vec::new()));
        }
        store.search(&s2)
    })
    .await
    {
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
    let bundle = observation_searchset(&base, total, &links, &rows);
    tracing::debug!(total, returned = rows.len(), "observation search");
    // The audit entry names the patients of the returned page.
    crate::audit::with_patients(
        fhir_bytes(StatusCode::OK, bundle),
        rows.iter().filter_map(|r| r.patient_id.clone()),
    )
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

/// A searchset Bundle of Observation rows, serialized straight into the
/// response buffer: the same document as [`searchset`] over the rendered
/// rows, without building a `Value` per row. A row that cannot be rendered
/// becomes an OperationOutcome entry (and an error log), never a silently
/// shorter page.
fn observation_searchset(
    base: &str,
    total: u64,
    links: &[Json],
    rows: &[ObservationRow],
) -> Vec<u8> {
    // Strings and `Value`s always serialize into a Vec.
    fn put<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
        let _ = serde_json::to_writer(&mut *out, v);
    }
    let mut out = Vec::with_capacity(512 + 2048 * rows.len());
    out.extend_from_slice(b"{\"entry\":[");
    let mut url = String::with_capacity(base.len() + 64);
    let mut writer = ObservationWriter::default();
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let start = out.len();
        url.clear();
        url.push_str(base);
        url.push_str("/Observation/");
        url.push_str(&row.id);
        out.extend_from_slice(b"{\"fullUrl\":");
        put(&mut out, url.as_str());
        out.extend_from_slice(b",\"resource\":");
        match writer.write(row, &mut out) {
            Ok(()) => out.extend_from_slice(b",\"search\":{\"mode\":\"match\"}}"),
            Err(e) => {
                out.truncate(start);
                tracing::error!(error = %e, "stored observation cannot be rendered");
                out.extend_from_slice(b"{\"resource\":");
                put(
                    &mut out,
                    &fhir::operation_outcome(
                        "error",
                        "exception",
                        &format!("Observation/{} is stored but cannot be rendered", row.id),
                    ),
                );
                out.extend_from_slice(b",\"search\":{\"mode\":\"outcome\"}}");
            }
        }
    }
    out.extend_from_slice(b"],\"link\":");
    put(&mut out, links);
    out.extend_from_slice(b",\"resourceType\":\"Bundle\",\"total\":");
    put(&mut out, &total);
    out.extend_from_slice(b",\"type\":\"searchset\"}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use shared_protocol::CATALOGUE;
    use shared_protocol::v1::{Reading, reading};

    fn reading_row(id: &str, patient: Option<&str>) -> ObservationRow {
        let m = &CATALOGUE.all()[0];
        let r = Reading {
            mdc_code: m.mdc,
            mdc_unit: m.unit.mdc,
            ucum_unit: m.unit.ucum.to_owned(),
            device_time_us: 1_764_000_000_000_000,
            validity: 1,
            sequence: 7,
            value: Some(reading::Value::Numeric(m.possible_range.0 + 1.0)),
            ..Default::default()
        };
        ObservationRow {
            id: id.to_owned(),
            kind: "reading".to_owned(),
            gateway_id: "gw-1".to_owned(),
            device_id: "dev-1".to_owned(),
            patient_id: patient.map(str::to_owned),
            patient_system: Some("urn:vigil:mrn".to_owned()),
            received_us: 1_764_000_001_000_000,
            payload: Some(r.encode_to_vec()),
            version: 1,
            ..Default::default()
        }
    }

    /// The directly serialized searchset is the document the `Value` path
    /// builds, byte for byte, with a corrupt row as an OperationOutcome
    /// entry in its place.
    #[test]
    fn observation_bundle_bytes_equal_the_value_bundle() {
        let broken = ObservationRow {
            id: "b".repeat(32),
            kind: "reading".to_owned(),
            payload: Some(vec![0xff, 0xff, 0xff]),
            ..Default::default()
        };
        let rows = vec![
            reading_row(&"a".repeat(32), Some("p-1")),
            broken,
            reading_row(&"c".repeat(32), None),
        ];
        let links =
            vec![json!({ "relation": "self", "url": "http://h/fhir/Observation?_count=3" })];
        let direct = observation_searchset("http://h/fhir", 9, &links, &rows);
        let values: Vec<Json> = rows
            .iter()
            .map(|row| {
                crate::fhir::render::render_observation(row).unwrap_or_else(|_| {
                    fhir::operation_outcome(
                        "error",
                        "exception",
                        &format!("Observation/{} is stored but cannot be rendered", row.id),
                    )
                })
            })
            .collect();
        let want = serde_json::to_vec(&searchset("http://h/fhir", 9, links, values)).unwrap();
        assert_eq!(
            String::from_utf8(direct).unwrap(),
            String::from_utf8(want).unwrap()
        );
        // An empty page still lists no entries as an empty array.
        let empty = observation_searchset("http://h/fhir", 0, &[], &[]);
        let want = serde_json::to_vec(&searchset("http://h/fhir", 0, vec![], vec![])).unwrap();
        assert_eq!(empty, want);
    }
}
