//! Patient identifier systems as URIs (`[identifiers]`): an HL7 assigning
//! authority stored by an older build is migrated when the hub starts, served
//! as its URI, and the patient is found by either form; new readings are
//! stored with the mapped URI.

use crate::common;
use crate::pg_server;

use cloud_hub::Config;
use cloud_hub::association::{Bed, PatientId};
use common::*;
use shared_protocol::v1::Identifier;

fn naming(
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

/// A database as a build before `[identifiers]` left it: readings and a
/// stay naming the patient by the raw authority `HOSP` (the storage layer
/// stores what it is given; the mapping is the hub's).
fn legacy_database(config: &Config) {
    let store = cloud_hub::Store::open_config(&config.storage).unwrap();
    let none = cloud_hub::store::Associations::new();
    let now = cloud_hub::store::now_us();
    store
        .ingest(
            GATEWAY,
            &batch(
                1,
                "hl7-1",
                vec![
                    naming(spo2(1, 97.0, T0), "HOSP", "MRN-1"),
                    naming(pulse(2, 70.0, T0), "HOSP", "MRN-1"),
                ],
            ),
            &none,
            now,
            now,
        )
        .unwrap();
    store
        .create_bed(&Bed {
            id: "b1".into(),
            ward: "icu".into(),
            label: "B1".into(),
        })
        .unwrap();
    let hosp = PatientId {
        system: "HOSP".into(),
        value: "MRN-1".into(),
    };
    store.admit(&hosp, "b1", T0, None, &none).unwrap();
}

const URI: &str = "urn:vigil:authority:HOSP";

async fn check_migrated_and_found_by_either(hub: &TestHub) {
    for query in [
        "patient:identifier=HOSP%7CMRN-1",
        "subject:identifier=urn:vigil:authority:HOSP%7CMRN-1",
        "patient:identifier=MRN-1",
        "patient=MRN-1",
    ] {
        let (status, bundle) = hub.get_json(&format!("/fhir/Observation?{query}")).await;
        assert_eq!(status, 200, "{query}: {bundle}");
        assert_eq!(bundle["total"], 2, "{query}: {bundle}");
        for e in bundle["entry"].as_array().unwrap() {
            assert_eq!(
                e["resource"]["subject"]["identifier"],
                serde_json::json!({ "system": URI, "value": "MRN-1" }),
                "{query}"
            );
        }
    }
    // Another authority's MRN-1 is another patient.
    for query in [
        "patient:identifier=OTHER%7CMRN-1",
        "patient:identifier=%7CMRN-1",
        "patient:identifier=HOSP%7CMRN-9",
    ] {
        let (status, bundle) = hub.get_json(&format!("/fhir/Observation?{query}")).await;
        assert_eq!(status, 200, "{query}: {bundle}");
        assert_eq!(bundle["total"], 0, "{query}: {bundle}");
    }
    let (status, patient) = hub.get_json("/fhir/Patient/MRN-1").await;
    assert_eq!(status, 200, "{patient}");
    assert_eq!(patient["identifier"][0]["system"], URI, "{patient}");
    let (status, occupancy) = hub.get_json("/api/v1/occupancy").await;
    assert_eq!(status, 200, "{occupancy}");
    assert_eq!(
        occupancy["beds"][0]["patient"]["system"], URI,
        "{occupancy}"
    );
}

/// `config`'s database outlives each hub (the caller keeps its directory).
async fn migration_at_start(config: Config) {
    let c = config.clone();
    tokio::task::spawn_blocking(move || legacy_database(&c))
        .await
        .unwrap();
    let hub = TestHub::start_config(tempfile::tempdir().unwrap(), config.clone(), "http").await;
    check_migrated_and_found_by_either(&hub).await;
    // New readings naming the raw authority are stored with the URI, and
    // the ADT/association inputs map it too.
    let ack = hub
        .ingest(&batch(
            2,
            "hl7-1",
            vec![naming(spo2(3, 96.0, T0 + MINUTE), "HOSP", "MRN-1")],
        ))
        .await;
    assert_eq!(ack.accepted, 1);
    let (_, bundle) = hub
        .get_json("/fhir/Observation?patient:identifier=HOSP%7CMRN-1")
        .await;
    assert_eq!(bundle["total"], 3, "{bundle}");
    let (status, body) = call_json(
        &hub,
        Some(&hub.reader),
        "POST",
        "/api/v1/patients/discharge",
        Some(serde_json::json!({
            "patient": { "system": "HOSP", "value": "MRN-1" },
            "at": "2024-05-01T11:00:00Z",
            "reason": "discharge recorded late",
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    hub.stop().await;
    // The migration was audited once, as the hub itself; a restart finds
    // nothing left to migrate.
    let c = config.clone();
    tokio::task::spawn_blocking(move || cloud_hub::gateway_revoke(&c, GATEWAY))
        .await
        .unwrap()
        .unwrap();
    let hub = TestHub::start_config(tempfile::tempdir().unwrap(), config.clone(), "http").await;
    check_migrated_and_found_by_either_after_discharge(&hub).await;
    hub.stop().await;
    let c = config.clone();
    let entries = tokio::task::spawn_blocking(move || {
        let store = cloud_hub::Store::open_config(&c.storage).unwrap();
        store.audit_entries(0).unwrap()
    })
    .await
    .unwrap();
    let migrations: Vec<_> = entries
        .iter()
        .filter(|e| e.entry.resource == "identifier-systems-migration")
        .collect();
    assert_eq!(migrations.len(), 1, "{migrations:?}");
    assert_eq!(migrations[0].entry.actor, "system");
    assert_eq!(
        migrations[0].entry.detail,
        "systems=1 stays=1 observations=2"
    );
    assert!(!migrations[0].entry.detail.contains("MRN"));
}

async fn check_migrated_and_found_by_either_after_discharge(hub: &TestHub) {
    for query in [
        "patient:identifier=HOSP%7CMRN-1",
        "patient:identifier=urn:vigil:authority:HOSP%7CMRN-1",
    ] {
        let (status, bundle) = hub.get_json(&format!("/fhir/Observation?{query}")).await;
        assert_eq!(status, 200, "{query}: {bundle}");
        assert_eq!(bundle["total"], 3, "{query}: {bundle}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_hub_migrates_authority_systems_at_start_and_finds_either_form() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&config_text(dir.path(), "")).unwrap();
    migration_at_start(config).await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hub_migrates_authority_systems_at_start_and_finds_either_form() {
    let server = pg_server::PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "").on_postgres(&server.url(), 2);
    let config = Config::parse(&text).unwrap();
    migration_at_start(config).await;
    drop(dir);
    drop(server);
}

#[test]
fn identifiers_config_is_validated_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let base = config_text(dir.path(), "");
    for (section, field) in [
        (
            "[identifiers]\nbase_uri = \"vigil\"\n",
            "identifiers.base_uri",
        ),
        (
            "[identifiers.authorities]\nHOSP = \"hosp\"\n",
            "identifiers.authorities.\"HOSP\"",
        ),
        (
            "[identifiers.facilities]\n\"GOOD HEALTH\" = \"not a uri\"\n",
            "identifiers.facilities.\"GOOD HEALTH\"",
        ),
    ] {
        let text = format!("{base}\n{section}");
        let e = Config::parse(&text)
            .and_then(|c| c.validate_fields())
            .unwrap_err();
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    let ok = format!(
        "{base}\n[identifiers]\nbase_uri = \"https://ids.example/authority/\"\n\
         [identifiers.authorities]\nHOSP = \"urn:oid:1.2.3.4\"\n\
         [identifiers.facilities]\nGHH = \"https://ghh.example/mrn\"\n"
    );
    let c = Config::parse(&ok).unwrap();
    c.validate_fields().unwrap();
    let systems = c.identifiers.systems();
    assert_eq!(systems.system_uri("HOSP"), "urn:oid:1.2.3.4");
    assert_eq!(
        systems.system_uri("LAB"),
        "https://ids.example/authority/LAB"
    );
}
