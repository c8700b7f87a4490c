//! A patient's record as FHIR R4 resources, for subject access
//! (`Patient/$everything` semantics): stays as Encounter, score history
//! and manual score inputs as Observation, alerts as Flag. Readings use
//! [`super::render`]; audit entries the transport's AuditEvent.

use serde_json::{Value as Json, json};

use crate::alerts::engine::{Alert, State};
use crate::clock::format_instant;
use crate::score_history::{Kind, Point};

/// Code system of Vigil's own codes (scores, manual inputs).
pub const VIGIL_CODES: &str = "urn:vigil:code";

fn subject(patient: &str) -> Json {
    if super::is_valid_id(patient) {
        json!({ "reference": format!("Patient/{patient}") })
    } else {
        json!({ "identifier": { "value": patient } })
    }
}

/// One stay at a bed as an inpatient Encounter (`finished` once it ended).
pub fn render_stay(
    patient: &str,
    index: usize,
    bed: &str,
    ward: &str,
    from_us: i64,
    to_us: Option<i64>,
    visit: Option<&str>,
) -> Json {
    let mut period = json!({ "start": format_instant(from_us) });
    if let Some(t) = to_us {
        period["end"] = json!(format_instant(t));
    }
    let mut enc = json!({
        "resourceType": "Encounter",
        "id": format!("stay-{index}"),
        "status": if to_us.is_some() { "finished" } else { "in-progress" },
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                   "code": "IMP", "display": "inpatient encounter" },
        "subject": subject(patient),
        "period": period,
        "location": [{
            "location": { "reference": format!("Location/{}", super::render::location_id(bed)),
                          "display": format!("{ward} / {bed}") },
        }],
    });
    if let Some(v) = visit {
        enc["identifier"] = json!([{ "system": "urn:vigil:visit", "value": v }]);
    }
    enc
}

/// A stored score (NEWS2, qSOFA, MEWS) as an Observation: the total (absent
/// with a reason when inputs were missing), the band, the missing inputs.
pub fn render_score(patient: &str, kind: Kind, point: &Point) -> Json {
    let (t, e) = point;
    let mut obs = json!({
        "resourceType": "Observation",
        "id": format!("score-{}-{t}", kind.as_str()),
        "status": "final",
        "category": [{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "survey" }] }],
        "code": { "coding": [{ "system": VIGIL_CODES, "code": kind.as_str() }],
                  "text": format!("{} total score", kind.as_str().to_uppercase()) },
        "subject": subject(patient),
        "effectiveDateTime": format_instant(*t),
    });
    match e.total {
        Some(v) => obs["valueInteger"] = json!(v),
        None => obs["dataAbsentReason"] = super::absent_reason("not-performed", "Not Performed"),
    }
    if let Some(b) = &e.band {
        obs["interpretation"] = json!([{ "text": b }]);
    }
    if !e.missing.is_empty() {
        obs["note"] = json!([{ "text": format!("missing inputs: {}", e.missing.join(", ")) }]);
    }
    obs
}

/// A manual score input (e.g. consciousness) as an Observation.
pub fn render_manual(
    patient: &str,
    index: usize,
    kind: &str,
    value: &str,
    effective_us: i64,
    recorded_us: i64,
) -> Json {
    json!({
        "resourceType": "Observation",
        "id": format!("manual-{index}"),
        "status": "final",
        "category": [{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "survey" }] }],
        "code": { "coding": [{ "system": VIGIL_CODES, "code": format!("manual-{kind}") }],
                  "text": format!("manual input: {kind}") },
        "subject": subject(patient),
        "effectiveDateTime": format_instant(effective_us),
        "issued": format_instant(recorded_us),
        "valueString": value,
    })
}

/// An alert as a Flag: active until resolved, its message as the code.
pub fn render_alert(a: &Alert) -> Json {
    let mut period = json!({ "start": format_instant(a.raised_us) });
    if let Some(t) = a.resolved_us {
        period["end"] = json!(format_instant(t));
    }
    let mut flag = json!({
        "resourceType": "Flag",
        "id": format!("alert-{}", a.id),
        "status": if a.state == State::Resolved { "inactive" } else { "active" },
        "category": [{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/flag-category",
            "code": "clinical" }] }],
        "code": { "coding": [{ "system": VIGIL_CODES, "code": a.code }], "text": a.message },
        "period": period,
        "extension": [{ "url": "urn:vigil:alert-priority", "valueString": a.priority.as_str() }],
    });
    if let Some(p) = &a.patient {
        flag["subject"] = subject(p);
    }
    flag
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score_history::Entry;

    #[test]
    fn a_stay_is_an_encounter_and_a_score_an_observation() {
        let e = render_stay("mrn-1", 0, "b1", "icu", 0, None, Some("v1"));
        assert_eq!(e["status"], "in-progress");
        assert_eq!(e["subject"]["reference"], "Patient/mrn-1");
        assert_eq!(e["identifier"][0]["value"], "v1");
        assert!(e["period"].get("end").is_none());
        let ended = render_stay("mrn-1", 1, "b1", "icu", 0, Some(1_000_000), None);
        assert_eq!(ended["status"], "finished");
        let p = (
            0,
            Entry {
                total: None,
                band: None,
                missing: vec!["spo2".into()],
                stale: vec![],
                components: None,
            },
        );
        let s = render_score("mrn-1", Kind::News2, &p);
        assert!(s.get("valueInteger").is_none());
        assert_eq!(s["dataAbsentReason"]["coding"][0]["code"], "not-performed");
        assert_eq!(s["code"]["coding"][0]["code"], "news2");
    }
}
