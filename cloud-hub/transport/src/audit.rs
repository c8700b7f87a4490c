//! The audit log: every access to patient data and every administrative
//! change through the API (and the CLI's gateway and enrolment commands),
//! with who, when, what and the outcome. Append-only (the database's
//! triggers refuse UPDATE and DELETE) and hash-chained: each entry's SHA-256 covers
//! its fields and the previous entry's hash, so `cloud-hub audit verify`
//! finds an edited, inserted or removed entry. Removing the newest entries
//! leaves a shorter valid chain: checked against an anchor (`--anchor
//! SEQ:HASH`, the head an operator recorded earlier). Exported as FHIR R4
//! AuditEvent (NDJSON) with `cloud-hub audit export`.
//!
//! The audit log holds which patient was accessed (that is its purpose);
//! the service logs and metrics still never do. The chain is
//! `hub_domain::audit`, the persistence the store's `AuditStore` (SQLite
//! and PostgreSQL). See docs/operations.md "Audit log".

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use hub_storage::StoreError;
use ring::digest;
use serde_json::{Value as Json, json};

pub use hub_domain::audit::{Entry, GENESIS, Stored, Verification};

use crate::store::{Store, now_us};

/// Appends an entry to the store's audit log: its seq.
pub fn append(store: &Store, e: &Entry) -> Result<i64, StoreError> {
    store.append_audit(e)
}

/// Recomputes the whole chain (`hub_domain::audit::verify`). `anchor`: a
/// (seq, hash) the chain must still contain (detects removal of the newest
/// entries).
pub fn verify(store: &Store, anchor: Option<(i64, &str)>) -> Result<Verification, StoreError> {
    Ok(hub_domain::audit::verify(
        &store.audit_entries(i64::MIN)?,
        anchor,
    ))
}

/// The entries from `since_seq` on, in order.
pub fn entries(store: &Store, since_seq: i64) -> Result<Vec<Stored>, StoreError> {
    store.audit_entries(since_seq)
}

/// An entry as FHIR R4 AuditEvent.
pub fn audit_event(s: &Stored) -> Json {
    let e = &s.entry;
    let cli = e.actor == "cli";
    let (action, subtype) = match e.action.as_str() {
        "read" => ("R", "read"),
        "create" => ("C", "create"),
        "update" => ("U", "update"),
        "delete" => ("D", "delete"),
        _ => ("E", "operation"),
    };
    let outcome = match e.outcome {
        0..=399 => "0",
        400..=499 => "4",
        _ => "8",
    };
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "id": format!("audit-{}", s.seq),
        "type": if cli {
            json!({ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100",
                    "display": "Application Activity" })
        } else {
            json!({ "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                    "code": "rest", "display": "RESTful Operation" })
        },
        "action": action,
        "recorded": crate::fhir::format_instant(e.time_us),
        "outcome": outcome,
        "outcomeDesc": if cli { "command".to_owned() } else { format!("HTTP {}", e.outcome) },
        "agent": [{
            "who": { "identifier": { "system": "urn:vigil:principal", "value": e.actor } },
            "requestor": true,
        }],
        "source": {
            "observer": { "display": "Vigil cloud-hub" },
            "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                       "code": "4", "display": "Application Server" }],
        },
        "entity": [{ "what": { "display": e.resource } }],
        "extension": [{
            "url": "http://vigil.health/fhir/StructureDefinition/audit-chain",
            "valueString": format!("{}:{}", s.seq, s.hash),
        }],
    });
    if !e.detail.is_empty() {
        ev["entity"][0]["description"] = json!(e.detail);
    }
    if !cli {
        ev["subtype"] =
            json!([{ "system": "http://hl7.org/fhir/restful-interaction", "code": subtype }]);
    }
    if let Some(p) = &e.patient {
        ev["entity"].as_array_mut().expect("array").push(json!({
            "what": { "reference": format!("Patient/{p}") },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                      "code": "1", "display": "Person" },
        }));
    }
    ev
}

// ---- HTTP middleware -------------------------------------------------------

/// Whether a request path is audited: the FHIR API and the `/api/v1`
/// routes, except gateway ingest (device data in, no patient data out;
/// counted by the ingest metrics).
pub fn audited(path: &str) -> bool {
    (path.starts_with("/fhir") || path.starts_with("/api/v1/"))
        && path != "/api/v1/ingest"
        && path != "/api/v1/alerts/stream"
}

/// The patient a request names: `/patients/{id}`, `/Patient/{id}` or a
/// `patient`/`subject` query parameter.
pub fn patient_of(path: &str, query: Option<&str>) -> Option<String> {
    let mut segs = path.split('/');
    while let Some(s) = segs.next() {
        if s == "patients" || s == "Patient" {
            if let Some(id) = segs
                .next()
                .filter(|id| !id.is_empty() && !id.starts_with('$'))
            {
                return Some(id.to_owned());
            }
        }
    }
    let q = query?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        matches!(k, "patient" | "subject")
            .then(|| v.trim_start_matches("Patient/").to_owned())
            .filter(|v| !v.is_empty())
    })
}

/// The principal of a request: a fingerprint of its bearer token (never
/// the token), or `anonymous`.
pub fn actor_of(headers: &axum::http::HeaderMap) -> String {
    fingerprint(headers.get(axum::http::header::AUTHORIZATION))
}

/// `bearer:<16 hex of SHA-256>` of an `Authorization: Bearer` value, or
/// `anonymous`.
fn fingerprint(authorization: Option<&axum::http::HeaderValue>) -> String {
    let token = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token {
        Some(t) if !t.is_empty() => {
            let d = digest::digest(&digest::SHA256, t.as_bytes());
            format!("bearer:{}", &hex::encode(d)[..16])
        }
        _ => "anonymous".into(),
    }
}

fn action_of(method: &axum::http::Method, path: &str) -> &'static str {
    use axum::http::Method;
    if path.ends_with("/acknowledge") || path.contains("/$") {
        return "execute";
    }
    match *method {
        Method::GET | Method::HEAD => "read",
        Method::POST => "create",
        Method::PUT | Method::PATCH => "update",
        Method::DELETE => "delete",
        _ => "execute",
    }
}

/// What the audit middleware needs.
#[derive(Debug, Clone)]
pub struct AuditState {
    pub store: crate::store::Store,
    pub metrics: crate::SharedMetrics,
}

/// Records each audited request after it is answered. A failure to write
/// the audit entry is logged and counted (`vigil_hub_audit_failures_total`
/// via `metrics`), never hidden.
pub(crate) async fn middleware(State(st): State<AuditState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if !audited(&path) {
        return next.run(req).await;
    }
    let query = req.uri().query().map(str::to_owned);
    let time_us = now_us();
    let action = action_of(req.method(), &path);
    let authorization = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .cloned();
    let resp = next.run(req).await;
    // The principal the access layer authenticated (or the login that
    // succeeded); otherwise the token fingerprint or `anonymous`.
    let actor = match resp.extensions().get::<crate::access::Principal>() {
        Some(p) => p.id.clone(),
        None => fingerprint(authorization.as_ref()),
    };
    let entry = Entry {
        time_us,
        actor,
        action: action.into(),
        patient: patient_of(&path, query.as_deref()),
        resource: path,
        outcome: resp.status().as_u16(),
        detail: query.unwrap_or_default(),
    };
    let store = st.store.clone();
    match tokio::task::spawn_blocking(move || append(&store, &entry)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            st.metrics.audit_failure();
            tracing::error!(error = %e, "writing an audit log entry failed");
        }
        Err(e) => {
            st.metrics.audit_failure();
            tracing::error!(error = %e, "the audit log task failed");
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_described_without_secrets() {
        assert_eq!(
            patient_of("/api/v1/patients/MRN-1/scores", None).as_deref(),
            Some("MRN-1")
        );
        assert_eq!(patient_of("/fhir/Patient/p7", None).as_deref(), Some("p7"));
        assert_eq!(
            patient_of("/fhir/Observation", Some("code=1&patient=Patient/p9")).as_deref(),
            Some("p9")
        );
        assert_eq!(patient_of("/fhir/Patient/$export", None), None);
        assert_eq!(patient_of("/fhir/Observation", Some("code=1")), None);
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(actor_of(&h), "anonymous");
        h.insert("authorization", "Bearer s3cret-token".parse().unwrap());
        let a = actor_of(&h);
        assert!(a.starts_with("bearer:") && a.len() == 7 + 16 && !a.contains("s3cret"));
        assert!(audited("/fhir/Observation") && audited("/api/v1/beds"));
        assert!(!audited("/api/v1/ingest") && !audited("/metrics") && !audited("/healthz"));
    }
}
