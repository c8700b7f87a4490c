//! `Reading.subject` (patient identifier from the source message, e.g. HL7
//! PID-3): used as the Observation's subject when the device has no static
//! association; a static association wins when there is one.

mod common;

use common::*;
use shared_protocol::v1::Identifier;

fn with_subject(
    mut r: shared_protocol::v1::Reading,
    system: &str,
    value: &str,
) -> shared_protocol::v1::Reading {
    r.subject = Some(Identifier {
        system: system.into(),
        value: value.into(),
    });
    r
}

#[tokio::test]
async fn reading_subject_is_the_patient_unless_a_static_association_exists() {
    let hub = TestHub::start().await;
    // "hl7-1" has no static association: the reading's subject is used.
    let ack = hub
        .ingest(&batch(
            1,
            "hl7-1",
            vec![
                with_subject(spo2(1, 97.0, T0), "GOODHEALTH", "MRN-777"),
                // No system given by the source.
                with_subject(pulse(2, 70.0, T0), "", "MRN-778"),
                // An identifier that is not a FHIR id: identifier only.
                with_subject(spo2(3, 96.0, T0), "urn:oid:1.2.3", "12 34/5"),
            ],
        ))
        .await;
    assert_eq!((ack.accepted, ack.rejected), (3, 0));
    let (status, bundle) = hub.get_json("/fhir/Observation?patient=MRN-777").await;
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(bundle["total"], 1, "{bundle}");
    let obs = &bundle["entry"][0]["resource"];
    assert_eq!(
        obs["subject"],
        serde_json::json!({
            "reference": "Patient/MRN-777",
            "identifier": { "system": "GOODHEALTH", "value": "MRN-777" }
        })
    );
    let (_, bundle) = hub
        .get_json("/fhir/Observation?patient=Patient/MRN-778")
        .await;
    assert_eq!(
        bundle["entry"][0]["resource"]["subject"],
        serde_json::json!({
            "reference": "Patient/MRN-778",
            "identifier": { "value": "MRN-778" }
        })
    );
    let stored: String = hub
        .db()
        .query_row(
            "SELECT resource FROM observations WHERE device_id = 'hl7-1' AND sequence = 3",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let res: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(
        res["subject"],
        serde_json::json!({ "identifier": { "system": "urn:oid:1.2.3", "value": "12 34/5" } })
    );

    // DEVICE has a static association (PATIENT): it wins over the subject.
    let ack = hub
        .ingest(&batch(
            2,
            DEVICE,
            vec![with_subject(spo2(1, 95.0, T0), "GOODHEALTH", "MRN-777")],
        ))
        .await;
    assert_eq!(ack.accepted, 1);
    let (_, bundle) = hub
        .get_json(&format!("/fhir/Observation?patient={PATIENT}"))
        .await;
    assert_eq!(bundle["total"], 1, "{bundle}");
    assert_eq!(
        bundle["entry"][0]["resource"]["subject"],
        serde_json::json!({ "reference": format!("Patient/{PATIENT}") })
    );
    // And MRN-777 still has only its own observation.
    let (_, bundle) = hub.get_json("/fhir/Observation?patient=MRN-777").await;
    assert_eq!(bundle["total"], 1, "{bundle}");
    hub.stop().await;
}
