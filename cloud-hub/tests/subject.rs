//! `Reading.subject` (patient identifier from the source message, e.g. HL7
//! PID-3) is the Observation's subject; it wins over the hub's own
//! association (bed stays, then the static config map): the source knew the
//! patient.

use crate::common;

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
async fn reading_subject_is_the_patient_even_when_a_static_association_exists() {
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
            // The source's assigning authority, as a URI ([identifiers]).
            "identifier": { "system": "urn:vigil:authority:GOODHEALTH", "value": "MRN-777" }
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
    let id = cloud_hub::fhir::observation_id(GATEWAY, "hl7-1", 3);
    let (status, res) = hub.get_json(&format!("/fhir/Observation/{id}")).await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(
        res["subject"],
        serde_json::json!({ "identifier": { "system": "urn:oid:1.2.3", "value": "12 34/5" } })
    );

    // DEVICE has a static association (PATIENT): the reading's own subject
    // wins over it; a reading without one falls back to it.
    let ack = hub
        .ingest(&batch(
            2,
            DEVICE,
            vec![
                with_subject(spo2(1, 95.0, T0), "GOODHEALTH", "MRN-777"),
                spo2(2, 94.0, T0),
            ],
        ))
        .await;
    assert_eq!(ack.accepted, 2);
    let (_, bundle) = hub
        .get_json(&format!("/fhir/Observation?patient={PATIENT}"))
        .await;
    assert_eq!(bundle["total"], 1, "{bundle}");
    assert_eq!(
        bundle["entry"][0]["resource"]["subject"],
        serde_json::json!({ "reference": format!("Patient/{PATIENT}") })
    );
    let (_, bundle) = hub.get_json("/fhir/Observation?patient=MRN-777").await;
    assert_eq!(bundle["total"], 2, "{bundle}");
    hub.stop().await;
}
