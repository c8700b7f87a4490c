//! Patients' rights over HTTP (docs/privacy.md), for the `privacy` role
//! (and administrators):
//!
//! - `GET /api/v1/patients/{id}/$everything`: everything the hub holds
//!   about one patient (FHIR `Patient/$everything` semantics) as a
//!   `searchset` Bundle, or NDJSON with `_format=ndjson`: the Patient, its
//!   readings (Observation), stays (Encounter), score history and manual
//!   inputs (Observation), alerts (Flag), and the audit entries of who
//!   read or changed the patient's data (AuditEvent).
//! - `POST /api/v1/patients/{id}/erase` `{"reason": "…"}`: the erasure
//!   (`hub_storage::erase`), audited with its counts and reason.
//! - `PUT`/`DELETE /api/v1/patients/{id}/legal-hold` and
//!   `GET /api/v1/legal-holds`.
//!
//! The audit middleware records every one of these requests with the
//! patient; the erasure and hold changes add an entry with what was done.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json as AxumJson};
use serde::Deserialize;
use serde_json::{Value as Json, json};

pub use hub_domain::privacy::*;
pub use hub_storage::{Erased, ErasureError, LegalHold, RetentionCutoffs};

use hub_domain::fhir::render::{render_observation, render_patient};
use hub_domain::fhir::subject::{render_alert, render_manual, render_score, render_stay};
use hub_domain::fhir::{ObservationSearch, SortOrder};
use hub_domain::score_history::Kind;

use crate::access::Principal;
use crate::audit::{AuditKeys, Entry};
use crate::store::{Store, StoreError, now_us};

/// Observations read per page while assembling a patient's record.
const PAGE: u32 = 1000;

/// The routes' state.
#[derive(Debug, Clone)]
pub struct PrivacyState {
    pub store: Store,
    pub audit_keys: AuditKeys,
}

/// The privacy routes.
pub fn router<S: Clone + Send + Sync + 'static>(state: PrivacyState) -> Router<S> {
    Router::new()
        .route("/api/v1/patients/{id}/$everything", get(everything))
        .route("/api/v1/patients/{id}/erase", post(erase))
        .route(
            "/api/v1/patients/{id}/legal-hold",
            put(set_hold).delete(lift_hold),
        )
        .route("/api/v1/legal-holds", get(list_holds))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, AxumJson(json!({ "error": message.into() }))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "privacy request failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

/// Every resource the hub holds about patient `id`, in a fixed order:
/// Patient, Observations (oldest first), Encounters, scores, manual
/// inputs, Flags, AuditEvents. `None`: the hub holds nothing of them.
pub fn patient_record(store: &Store, id: &str) -> Result<Option<Vec<Json>>, StoreError> {
    let system = store.patient(id)?;
    let stays = store.stays_of(id)?;
    let manual = store.manual_inputs_of(id)?;
    let alerts = store.list_alerts(&hub_storage::AlertFilter {
        open: false,
        patient: Some(id.to_owned()),
        limit: u32::MAX,
    })?;
    let mut scores = Vec::new();
    for kind in Kind::ALL {
        let mut h = store.score_history(id, kind, i64::MIN, i64::MAX, usize::MAX)?;
        h.reverse();
        scores.extend(h.into_iter().map(|p| (kind, p)));
    }
    if system.is_none()
        && stays.is_empty()
        && manual.is_empty()
        && alerts.is_empty()
        && scores.is_empty()
    {
        return Ok(None);
    }
    let system = system.or_else(|| stays.first().map(|s| s.system.clone()));
    let mut out = vec![render_patient(id, system.as_deref())];
    let mut search = ObservationSearch {
        patients: vec![id.to_owned()],
        patient_identifiers: Vec::new(),
        codes: Vec::new(),
        dates: Vec::new(),
        categories: Vec::new(),
        devices: Vec::new(),
        count: PAGE,
        offset: 0,
        sort: SortOrder::DateAsc,
    };
    loop {
        let (_, rows) = store.search(&search)?;
        let n = rows.len();
        for row in &rows {
            out.push(
                render_observation(row)
                    .map_err(|e| StoreError::Corrupt(format!("Observation/{}: {e}", row.id)))?,
            );
        }
        if n < PAGE as usize {
            break;
        }
        search.offset += u64::from(PAGE);
    }
    for (i, s) in stays.iter().enumerate() {
        out.push(render_stay(
            id,
            i,
            &s.bed,
            &s.ward,
            s.from_us,
            s.to_us,
            s.visit.as_deref(),
        ));
    }
    for (kind, p) in &scores {
        out.push(render_score(id, *kind, p));
    }
    for (i, m) in manual.iter().enumerate() {
        out.push(render_manual(
            id,
            i,
            &m.kind,
            &m.value,
            m.effective_us,
            m.recorded_us,
        ));
    }
    for a in &alerts {
        out.push(render_alert(a));
    }
    for e in store.audit_entries_of(id)? {
        out.push(crate::audit::audit_event(&e));
    }
    Ok(Some(out))
}

#[derive(Debug, Deserialize)]
struct EverythingQuery {
    #[serde(rename = "_format")]
    format: Option<String>,
}

async fn everything(
    State(st): State<PrivacyState>,
    Path(id): Path<String>,
    Query(q): Query<EverythingQuery>,
) -> Response {
    let ndjson = match q.format.as_deref() {
        None | Some("json" | "application/fhir+json") => false,
        Some("ndjson" | "application/fhir+ndjson") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("_format `{other}`: use json or ndjson"),
            );
        }
    };
    let store = st.store.clone();
    let lookup = id.clone();
    let record = match tokio::task::spawn_blocking(move || patient_record(&store, &lookup)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    let Some(resources) = record else {
        return error(
            StatusCode::NOT_FOUND,
            format!("patient `{id}` is not known"),
        );
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    let written = if ndjson {
        resources.iter().try_for_each(|r| {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
            Ok::<_, serde_json::Error>(())
        })
    } else {
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": resources.len(),
            "timestamp": hub_domain::clock::format_instant(now_us()),
            "entry": resources.iter().map(|r| json!({
                "fullUrl": format!("urn:vigil:{}/{}", r["resourceType"].as_str().unwrap_or(""),
                                   r["id"].as_str().unwrap_or("")),
                "resource": r,
                "search": { "mode": "match" },
            })).collect::<Vec<_>>(),
        });
        serde_json::to_writer(&mut buf, &bundle)
    };
    if let Err(e) = written {
        return internal(e);
    }
    let ctype = if ndjson {
        "application/fhir+ndjson"
    } else {
        "application/fhir+json"
    };
    crate::audit::with_patients(
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static(ctype))],
            buf,
        )
            .into_response(),
        Some(id),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    reason: String,
}

/// The request's `reason` (1–500 characters), or why not (a 400).
fn reason_of(body: &Bytes) -> Result<String, String> {
    let parsed: ReasonBody = serde_json::from_slice(body)
        .map_err(|e| format!("body: {e} (expected {{\"reason\": \"…\"}})"))?;
    let reason = parsed.reason.trim().to_owned();
    if reason.is_empty() || reason.chars().count() > 500 || reason.chars().any(char::is_control) {
        return Err("reason: must be 1-500 characters without control characters".into());
    }
    Ok(reason)
}

fn actor(p: &Option<Extension<Principal>>) -> String {
    p.as_ref()
        .map_or_else(|| "unknown".to_owned(), |Extension(p)| p.id.clone())
}

/// The audit entry of a completed erasure: who, why, the subject key and
/// the counts; the patient id (the request's own entry names it too).
pub fn erasure_entry(actor: &str, id: &str, reason: &str, e: &Erased, now: i64) -> Entry {
    let c = &e.counts;
    Entry {
        time_us: now,
        actor: actor.to_owned(),
        action: "erase".into(),
        resource: format!("/api/v1/patients/{id}/erase"),
        patient: Some(id.to_owned()),
        patients: Vec::new(),
        outcome: 200,
        detail: format!(
            "reason={reason}; tombstone={}; subject={}; windows={}; observations={}; stays={}; \
             manual_inputs={}; alerts={}; scores={}; chart_buckets={}; rule_overrides={}",
            e.tombstone_id,
            e.subject.to_hex(),
            e.windows.len(),
            c.observations,
            c.stays,
            c.manual_inputs,
            c.alerts,
            c.scores,
            c.chart_buckets,
            c.rule_overrides
        ),
    }
}

async fn erase(
    State(st): State<PrivacyState>,
    Path(id): Path<String>,
    principal: Option<Extension<Principal>>,
    body: Bytes,
) -> Response {
    let reason = match reason_of(&body) {
        Ok(r) => r,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let store = st.store.clone();
    let value = id.clone();
    let now = now_us();
    let done = tokio::task::spawn_blocking(move || store.erase_patient(&value, now)).await;
    let erased = match done {
        Ok(Ok(e)) => e,
        Ok(Err(ErasureError::UnknownPatient(_))) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("patient `{id}` is not known"),
            );
        }
        Ok(Err(e @ ErasureError::LegalHold { .. })) => {
            return error(StatusCode::CONFLICT, e.to_string());
        }
        Ok(Err(ErasureError::Store(e))) => return internal(e),
        Err(e) => return internal(e),
    };
    let entry = erasure_entry(&actor(&principal), &id, &reason, &erased, now);
    if let Err(e) = crate::audit::append_all(&st.store, &st.audit_keys, vec![entry]).await {
        // The erasure is done and cannot be undone: report it, loudly.
        tracing::error!(error = %e, "erasure applied but its audit entry failed");
    }
    tracing::info!(
        tombstone = erased.tombstone_id,
        observations = erased.counts.observations,
        "patient erased"
    );
    let c = &erased.counts;
    AxumJson(json!({
        "erased": true,
        "tombstone": erased.tombstone_id,
        "windows": erased.windows.len(),
        "removed": {
            "observations": c.observations, "stays": c.stays, "manual_inputs": c.manual_inputs,
            "alerts": c.alerts, "scores": c.scores, "chart_buckets": c.chart_buckets,
            "rule_overrides": c.rule_overrides,
        },
    }))
    .into_response()
}

async fn set_hold(
    State(st): State<PrivacyState>,
    Path(id): Path<String>,
    principal: Option<Extension<Principal>>,
    body: Bytes,
) -> Response {
    let reason = match reason_of(&body) {
        Ok(r) => r,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    change_hold(st, id, Some(reason), actor(&principal)).await
}

async fn lift_hold(
    State(st): State<PrivacyState>,
    Path(id): Path<String>,
    principal: Option<Extension<Principal>>,
) -> Response {
    change_hold(st, id, None, actor(&principal)).await
}

async fn change_hold(st: PrivacyState, id: String, reason: Option<String>, by: String) -> Response {
    let now = now_us();
    let hold = reason.as_ref().map(|r| LegalHold {
        patient: id.clone(),
        reason: r.clone(),
        set_by: by.clone(),
        set_us: now,
    });
    let store = st.store.clone();
    let value = id.clone();
    let h = hold.clone();
    let known =
        match tokio::task::spawn_blocking(move || store.set_legal_hold(&value, h.as_ref())).await {
            Ok(Ok(k)) => k,
            Ok(Err(e)) => return internal(e),
            Err(e) => return internal(e),
        };
    if hold.is_some() && !known {
        return error(
            StatusCode::NOT_FOUND,
            format!("patient `{id}` is not known"),
        );
    }
    let entry = Entry {
        time_us: now,
        actor: by,
        action: if hold.is_some() {
            "legal-hold"
        } else {
            "legal-hold-lifted"
        }
        .into(),
        resource: format!("/api/v1/patients/{id}/legal-hold"),
        patient: Some(id.clone()),
        patients: Vec::new(),
        outcome: 200,
        detail: reason.map(|r| format!("reason={r}")).unwrap_or_default(),
    };
    if let Err(e) = crate::audit::append_all(&st.store, &st.audit_keys, vec![entry]).await {
        tracing::error!(error = %e, "legal hold changed but its audit entry failed");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the change is stored but could not be audited",
        );
    }
    AxumJson(json!({ "patient": id, "legal_hold": hold.is_some() })).into_response()
}

async fn list_holds(State(st): State<PrivacyState>) -> Response {
    let store = st.store.clone();
    match tokio::task::spawn_blocking(move || store.legal_holds()).await {
        Ok(Ok(holds)) => {
            let ids: Vec<String> = holds.iter().map(|h| h.patient.clone()).collect();
            let body = AxumJson(json!({
                "legal_holds": holds.iter().map(|h| json!({
                    "patient": h.patient, "reason": h.reason, "set_by": h.set_by,
                    "set": hub_domain::clock::format_instant(h.set_us),
                })).collect::<Vec<_>>(),
            }));
            crate::audit::with_patients(body.into_response(), ids)
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}
