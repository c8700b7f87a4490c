//! The audit log: every access to patient data and every administrative
//! change through the API (and the CLI's gateway and enrolment commands),
//! with who, when, what and the outcome. Append-only (SQLite triggers
//! refuse UPDATE and DELETE) and hash-chained: each entry's SHA-256 covers
//! its fields and the previous entry's hash, so `cloud-hub audit verify`
//! finds an edited, inserted or removed entry. Removing the newest entries
//! leaves a shorter valid chain: checked against an anchor (`--anchor
//! SEQ:HASH`, the head an operator recorded earlier). Exported as FHIR R4
//! AuditEvent (NDJSON) with `cloud-hub audit export`.
//!
//! The audit log holds which patient was accessed (that is its purpose);
//! the service logs and metrics still never do. SQLite store only in this
//! version. See docs/operations.md "Audit log".

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use ring::digest;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value as Json, json};

use crate::store::{Store, StoreError, now_us};

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry (before it is chained).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub time_us: i64,
    /// `anonymous`, `bearer:<first 16 hex of the token's SHA-256>` or
    /// `cli`.
    pub actor: String,
    /// read, create, update, delete, execute.
    pub action: String,
    /// The request path (no query string) or the CLI command.
    pub resource: String,
    pub patient: Option<String>,
    /// HTTP status (CLI: 0 on success).
    pub outcome: u16,
    /// The query string, or what a CLI command changed (never a secret).
    pub detail: String,
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: i64,
    pub entry: Entry,
    pub prev_hash: String,
    pub hash: String,
}

fn chain_hash(prev: &str, seq: i64, e: &Entry) -> String {
    // Unit-separated fields; a field cannot contain U+001F unnoticed
    // because the separator count would change the digest input.
    let text = format!(
        "{prev}\u{1f}{seq}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
        e.time_us,
        e.actor,
        e.action,
        e.resource,
        e.patient.as_deref().unwrap_or("\u{0}"),
        e.outcome,
        e.detail
    );
    hex::encode(digest::digest(&digest::SHA256, text.as_bytes()))
}

/// Appends an entry on `conn` (in its own transaction); returns its seq.
pub fn append_on(conn: &mut Connection, e: &Entry) -> rusqlite::Result<i64> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let (seq, prev) = tx
        .query_row(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()?
        .map_or((1, GENESIS.to_owned()), |(s, h)| (s + 1, h));
    let hash = chain_hash(&prev, seq, e);
    tx.execute(
        "INSERT INTO audit_log (seq, time_us, actor, action, resource, patient_id, outcome,
             detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            seq, e.time_us, e.actor, e.action, e.resource, e.patient, e.outcome, e.detail, prev,
            hash
        ],
    )?;
    tx.commit()?;
    Ok(seq)
}

/// Appends an entry to the store's audit log (SQLite; a no-op returning
/// `None` on PostgreSQL).
pub fn append(store: &Store, e: &Entry) -> Result<Option<i64>, StoreError> {
    if store.postgres().is_some() {
        return Ok(None);
    }
    let mut conn = store.lock()?;
    Ok(Some(append_on(&mut conn, e)?))
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub entries: u64,
    /// (seq, hash) of the newest entry.
    pub head: Option<(i64, String)>,
    /// The first entry that does not chain, and why.
    pub broken: Option<(i64, String)>,
}

/// Reads all entries in order.
pub fn entries(conn: &Connection, since_seq: i64) -> rusqlite::Result<Vec<Stored>> {
    conn.prepare(
        "SELECT seq, time_us, actor, action, resource, patient_id, outcome, detail, prev_hash, hash
           FROM audit_log WHERE seq >= ?1 ORDER BY seq",
    )?
    .query_map([since_seq], |r| {
        Ok(Stored {
            seq: r.get(0)?,
            entry: Entry {
                time_us: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                resource: r.get(4)?,
                patient: r.get(5)?,
                outcome: r.get(6)?,
                detail: r.get(7)?,
            },
            prev_hash: r.get(8)?,
            hash: r.get(9)?,
        })
    })?
    .collect()
}

/// Recomputes the chain from the first entry. `anchor`: a (seq, hash) the
/// chain must still contain (detects removal of the newest entries).
pub fn verify(conn: &Connection, anchor: Option<(i64, &str)>) -> rusqlite::Result<Verification> {
    let all = entries(conn, i64::MIN)?;
    let mut prev = GENESIS.to_owned();
    let mut broken = None;
    for (expected_seq, s) in (1..).zip(all.iter()) {
        let why = if s.seq != expected_seq {
            Some(format!(
                "sequence jumps from {} to {}",
                expected_seq - 1,
                s.seq
            ))
        } else if s.prev_hash != prev {
            Some("does not link to the entry before it".to_owned())
        } else if chain_hash(&prev, s.seq, &s.entry) != s.hash {
            Some("its content does not match its hash".to_owned())
        } else {
            None
        };
        if let Some(w) = why {
            broken = Some((s.seq, w));
            break;
        }
        prev = s.hash.clone();
    }
    if broken.is_none() {
        if let Some((seq, hash)) = anchor {
            match all.iter().find(|s| s.seq == seq) {
                Some(s) if s.hash == hash => {}
                Some(_) => broken = Some((seq, "differs from the anchor".into())),
                None => {
                    broken = Some((
                        seq,
                        "the anchor entry is missing (entries were removed)".into(),
                    ))
                }
            }
        }
    }
    Ok(Verification {
        entries: all.len() as u64,
        head: all.last().map(|s| (s.seq, s.hash.clone())),
        broken,
    })
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

/// Records each audited request after it is answered. A failure to write
/// the audit entry is logged and counted (`vigil_hub_audit_failures_total`
/// via `metrics`), never hidden.
pub(crate) async fn middleware(
    State(st): State<crate::server::AppState>,
    req: Request,
    next: Next,
) -> Response {
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
    let store = st.store().clone();
    let r = tokio::task::spawn_blocking(move || append(&store, &entry)).await;
    if !matches!(r, Ok(Ok(_))) {
        st.metrics().audit_failure();
        tracing::error!("writing an audit log entry failed");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use hub_sqlite::schema::SCHEMA_V11;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA_V11).unwrap();
        c
    }

    fn e(i: i64) -> Entry {
        Entry {
            time_us: 1_795_514_400_000_000 + i,
            actor: "bearer:0123456789abcdef".into(),
            action: "read".into(),
            resource: "/fhir/Observation".into(),
            patient: Some(format!("p-{i}")),
            outcome: 200,
            detail: "patient=p&_count=10".into(),
        }
    }

    #[test]
    fn the_chain_verifies_and_tampering_is_found() {
        let mut c = db();
        for i in 0..5 {
            assert_eq!(append_on(&mut c, &e(i)).unwrap(), i + 1);
        }
        let v = verify(&c, None).unwrap();
        assert_eq!((v.entries, v.broken.clone()), (5, None));
        let head = v.head.unwrap();
        assert_eq!(head.0, 5);
        // Append-only: the triggers refuse edits and deletions.
        assert!(
            c.execute("UPDATE audit_log SET actor = 'x' WHERE seq = 2", [])
                .is_err()
        );
        assert!(
            c.execute("DELETE FROM audit_log WHERE seq = 5", [])
                .is_err()
        );
        // Someone with the file drops the triggers and edits an entry.
        c.execute_batch("DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete;")
            .unwrap();
        c.execute(
            "UPDATE audit_log SET patient_id = 'p-other' WHERE seq = 3",
            [],
        )
        .unwrap();
        let v = verify(&c, None).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.0), Some(3), "{v:?}");
        assert!(v.broken.unwrap().1.contains("content"));
    }

    #[test]
    fn removed_entries_are_found() {
        let mut c = db();
        for i in 0..5 {
            append_on(&mut c, &e(i)).unwrap();
        }
        let head = verify(&c, None).unwrap().head.unwrap();
        c.execute_batch("DROP TRIGGER audit_log_no_delete;")
            .unwrap();
        // A middle entry: the sequence jumps.
        c.execute("DELETE FROM audit_log WHERE seq = 2", [])
            .unwrap();
        assert_eq!(verify(&c, None).unwrap().broken.map(|b| b.0), Some(3));
        let mut c = db();
        for i in 0..5 {
            append_on(&mut c, &e(i)).unwrap();
        }
        c.execute_batch("DROP TRIGGER audit_log_no_delete;")
            .unwrap();
        // The newest entry: the chain is shorter but valid; the anchor
        // recorded before finds it.
        c.execute("DELETE FROM audit_log WHERE seq = 5", [])
            .unwrap();
        assert_eq!(verify(&c, None).unwrap().broken, None);
        let v = verify(&c, Some((head.0, &head.1))).unwrap();
        assert_eq!(v.broken.map(|b| b.0), Some(5));
        // A valid anchor passes.
        let v4 = verify(&c, None).unwrap().head.unwrap();
        assert_eq!(verify(&c, Some((v4.0, &v4.1))).unwrap().broken, None);
    }

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
