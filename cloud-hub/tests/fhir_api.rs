//! FHIR REST API over HTTP: read, search, paging, errors, metadata, ops.

use crate::common;

use common::*;
use serde_json::Value;

/// Ingests: patient-1 SpO2 at T0, T0+1m, T0+2m (seq 1..3), pulse at T0+1m
/// (seq 4), and an SpO2 on 2024-05-02 (seq 5).
async fn seeded() -> TestHub {
    let hub = TestHub::start().await;
    let day = 24 * 60 * MINUTE;
    let ack = hub
        .ingest(&batch(
            1,
            DEVICE,
            vec![
                spo2(1, 97.0, T0),
                spo2(2, 98.0, T0 + MINUTE),
                spo2(3, 99.0, T0 + 2 * MINUTE),
                pulse(4, 72.0, T0 + MINUTE),
                spo2(5, 96.0, T0 + day),
            ],
        ))
        .await;
    assert_eq!(ack.accepted, 5);
    hub
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect()
}

fn id(seq: u64) -> String {
    cloud_hub::fhir::observation_id(GATEWAY, DEVICE, seq)
}

fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == relation)
        .map(|l| l["url"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn read_returns_the_observation_or_404() {
    let hub = seeded().await;
    let resp = hub
        .client
        .get(hub.url(&format!("/fhir/Observation/{}", id(1))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/fhir+json");
    let obs: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(obs["resourceType"], "Observation");
    assert_eq!(obs["id"], id(1).as_str());
    assert_eq!(obs["status"], "final");
    assert_eq!(obs["subject"]["reference"], "Patient/patient-1");
    assert_eq!(obs["code"]["coding"][0]["code"], "59408-5");
    assert_eq!(obs["code"]["coding"][1]["code"], "2708-6");
    assert_eq!(obs["code"]["coding"][2]["code"], "150456");
    assert_eq!(obs["valueQuantity"]["value"], 97.0);
    assert_eq!(obs["valueQuantity"]["code"], "%");
    assert_eq!(obs["effectiveDateTime"], "2024-05-01T10:00:00Z");
    assert_eq!(obs["device"]["display"], "Masimo Radical-7 SN 1234");

    let (status, oo) = hub.get_json("/fhir/Observation/0000000000000000").await;
    assert_eq!(status, 404);
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert_eq!(oo["issue"][0]["code"], "not-found");
    let (status, _) = hub.get_json("/fhir/Observation/bad$id").await;
    assert_eq!(status, 404);
    let (status, oo) = hub.get_json("/fhir/Patient/x").await;
    assert_eq!(status, 404);
    assert_eq!(oo["resourceType"], "OperationOutcome");
    hub.stop().await;
}

#[tokio::test]
async fn search_by_patient_and_code() {
    let hub = seeded().await;
    let (status, b) = hub.get_json("/fhir/Observation?patient=patient-1").await;
    assert_eq!(status, 200);
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["type"], "searchset");
    assert_eq!(b["total"], 5);
    let entry = &b["entry"][0];
    assert_eq!(entry["search"]["mode"], "match");
    assert_eq!(
        entry["fullUrl"].as_str().unwrap(),
        format!("{}/fhir/Observation/{}", hub.base, id(1))
    );
    // Default sort: date ascending (ties by id).
    assert_eq!(ids(&b)[0], id(1));
    assert_eq!(ids(&b)[4], id(5));

    let (_, b) = hub
        .get_json("/fhir/Observation?subject=Patient/patient-1&code=http://loinc.org|8889-8")
        .await;
    assert_eq!(ids(&b), vec![id(4)]);
    // Profile code 2708-6 finds SpO2 (primary code 59408-5).
    let (_, b) = hub
        .get_json("/fhir/Observation?code=http%3A%2F%2Floinc.org%7C2708-6")
        .await;
    assert_eq!(b["total"], 4);
    // Profile code 8867-4 finds pulse-oximetry heart rate.
    let (_, b) = hub.get_json("/fhir/Observation?code=8867-4").await;
    assert_eq!(ids(&b), vec![id(4)]);
    let (_, b) = hub
        .get_json("/fhir/Observation?code=urn:iso:std:iso:11073:10101|150456")
        .await;
    assert_eq!(b["total"], 4);
    let (_, b) = hub.get_json("/fhir/Observation?code=8889-8,59408-5").await;
    assert_eq!(b["total"], 5);
    let (_, b) = hub
        .get_json("/fhir/Observation?code=http://loinc.org|8310-5")
        .await;
    assert_eq!(b["total"], 0);
    let (_, b) = hub.get_json("/fhir/Observation?patient=someone-else").await;
    assert_eq!(b["total"], 0);
    assert_eq!(b["entry"], serde_json::json!([]));
    hub.stop().await;
}

#[tokio::test]
async fn search_by_date() {
    let hub = seeded().await;
    let (_, b) = hub
        .get_json("/fhir/Observation?date=2024-05-01&code=59408-5")
        .await;
    assert_eq!(ids(&b), vec![id(1), id(2), id(3)]);
    let (_, b) = hub.get_json("/fhir/Observation?date=ge2024-05-02").await;
    assert_eq!(ids(&b), vec![id(5)]);
    let (_, b) = hub.get_json("/fhir/Observation?date=le2024-05-01").await;
    assert_eq!(b["total"], 4);
    let (_, b) = hub
        .get_json("/fhir/Observation?date=ge2024-05-01T10:01:00Z&date=le2024-05-01T10:01:00Z")
        .await;
    let mut got = ids(&b);
    got.sort();
    let mut want = vec![id(2), id(4)];
    want.sort();
    assert_eq!(got, want);
    // +02:00 offset: 12:01 local = 10:01Z.
    let (_, b) = hub
        .get_json("/fhir/Observation?date=eq2024-05-01T12:01:00%2B02:00&code=59408-5")
        .await;
    assert_eq!(ids(&b), vec![id(2)]);
    let (_, b) = hub
        .get_json("/fhir/Observation?date=gt2024-05-01T10:01:00Z&date=lt2024-05")
        .await;
    assert_eq!(b["total"], 0);
    let (_, b) = hub
        .get_json("/fhir/Observation?date=gt2024-05-01T10:01:00Z&date=lt2024-06")
        .await;
    assert_eq!(ids(&b), vec![id(3), id(5)]);
    let (_, b) = hub.get_json("/fhir/Observation?date=2024").await;
    assert_eq!(b["total"], 5);
    hub.stop().await;
}

#[tokio::test]
async fn paging_and_sorting() {
    let hub = seeded().await;
    let (_, b) = hub
        .get_json("/fhir/Observation?code=59408-5&_count=2")
        .await;
    assert_eq!(b["total"], 4);
    assert_eq!(ids(&b), vec![id(1), id(2)]);
    let next = link(&b, "next").expect("next link");
    assert!(
        next.starts_with(&format!("{}/fhir/Observation?", hub.base)),
        "{next}"
    );
    assert!(link(&b, "self").unwrap().contains("_count=2"));
    // Follow the next links to the end.
    let b2: Value = serde_json::from_str(
        &hub.client
            .get(&next)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ids(&b2), vec![id(3), id(5)]);
    assert!(link(&b2, "next").is_none());

    let (_, b) = hub
        .get_json("/fhir/Observation?code=59408-5&_sort=-date&_count=3")
        .await;
    assert_eq!(ids(&b), vec![id(5), id(3), id(2)]);
    let next = link(&b, "next").unwrap();
    assert!(next.contains("_sort=-date"), "{next}");
    let (_, b) = hub.get_json("/fhir/Observation?_count=0").await;
    assert_eq!(b["total"], 5);
    assert_eq!(ids(&b).len(), 0);
    hub.stop().await;
}

#[tokio::test]
async fn configured_base_url_is_used_for_links() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[fhir]\nbase_url = \"https://hub.example.org/fhir/\"\n",
        config_text(dir.path(), "")
    );
    let config = cloud_hub::Config::parse(&text).unwrap();
    let hub = TestHub::start_config(dir, config, "http").await;
    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, T0)])).await;
    let (_, b) = hub.get_json("/fhir/Observation").await;
    assert_eq!(
        b["entry"][0]["fullUrl"].as_str().unwrap(),
        format!("https://hub.example.org/fhir/Observation/{}", id(1))
    );
    hub.stop().await;
}

#[tokio::test]
async fn malformed_search_parameters_are_400() {
    let hub = seeded().await;
    for (query, param) in [
        ("foo=bar", "foo"),
        ("date=yesterday", "date"),
        ("date=2024-05-01T10:00:00", "date"),
        ("date=ne2024", "date"),
        ("_count=abc", "_count"),
        ("_count=-1", "_count"),
        ("_sort=value", "_sort"),
        ("patient=Patient/a%20b", "patient"),
        ("code=", "code"),
        ("code:text=spo2", "code:text"),
        ("_offset=x", "_offset"),
    ] {
        let (status, oo) = hub.get_json(&format!("/fhir/Observation?{query}")).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(oo["resourceType"], "OperationOutcome", "{query}");
        assert_eq!(oo["issue"][0]["severity"], "error");
        let code = oo["issue"][0]["code"].as_str().unwrap();
        assert!(
            code == "invalid" || code == "not-supported",
            "{query}: {code}"
        );
        let diag = oo["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(diag.contains(param), "{query}: {diag}");
    }
    hub.stop().await;
}

#[tokio::test]
async fn metadata_health_and_metrics() {
    let hub = seeded().await;
    let (status, cs) = hub.get_json("/fhir/metadata").await;
    assert_eq!(status, 200);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["status"], "active");
    assert_eq!(cs["kind"], "instance");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    assert_eq!(cs["format"], serde_json::json!(["json"]));
    let res = &cs["rest"][0]["resource"][0];
    assert_eq!(cs["rest"][0]["mode"], "server");
    assert_eq!(res["type"], "Observation");
    assert_eq!(res["versioning"], "versioned", "meta.versionId is served");
    let params: Vec<&str> = res["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in ["patient", "subject", "code", "date", "_count", "_sort"] {
        assert!(params.contains(&p), "{p}");
    }
    let interactions: Vec<&str> = res["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_str().unwrap())
        .collect();
    assert_eq!(interactions, vec!["read", "search-type"]);

    let r = hub.client.get(hub.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = hub.client.get(hub.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    hub.get_json(&format!("/fhir/Observation/{}", id(1))).await;
    hub.get_json("/fhir/Observation?code=59408-5").await;
    hub.get_json("/fhir/Observation?bogus=1").await;
    hub.ingest(&batch(1, DEVICE, vec![])).await; // duplicate batch

    let r = hub.client.get(hub.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text().await.unwrap();
    for line in [
        "# HELP vigil_hub_ingest_batches_total",
        "# TYPE vigil_hub_ingest_batches_total counter",
        "vigil_hub_ingest_batches_total{outcome=\"accepted\"} 1",
        "vigil_hub_ingest_batches_total{outcome=\"duplicate\"} 1",
        "vigil_hub_ingest_readings_total{outcome=\"accepted\"} 5",
        "vigil_hub_fhir_requests_total{interaction=\"metadata\"} 1",
        "vigil_hub_fhir_requests_total{interaction=\"read\"} 1",
        "vigil_hub_fhir_requests_total{interaction=\"search\"} 2",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(!text.contains(PATIENT) && !text.contains(&hub.token));
    hub.stop().await;
}

#[tokio::test]
async fn readyz_fails_when_the_database_is_gone() {
    let hub = TestHub::start().await;
    let r = hub.client.get(hub.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The readiness query reads the migrations table: make it fail.
    hub.db()
        .execute_batch("DROP TABLE schema_migrations")
        .unwrap();
    let r = hub.client.get(hub.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    hub.stop().await;
}

/// The CapabilityStatement is what clients send by: every search
/// parameter it declares works on its resource type (200 searchset), every
/// type that can be searched pages with `_count` and `_offset`, and an
/// undeclared parameter is refused with an OperationOutcome naming it.
#[tokio::test]
async fn every_capability_statement_search_parameter_works() {
    let hub = seeded().await;
    let (status, cap) = hub.get_json("/fhir/metadata").await;
    assert_eq!(status, 200);
    let sample = |name: &str| -> Option<&str> {
        Some(match name {
            "patient" | "subject" => "Patient/p-fhir-1",
            "code" => "http://loinc.org|59408-5",
            "date" => "ge2020-01-01",
            "category" => "vital-signs",
            "device" => "Device/x",
            "_count" => "1",
            "_offset" => "1",
            "_sort" => "-date",
            _ => return None,
        })
    };
    let mut searched = vec![];
    for r in cap["rest"][0]["resource"].as_array().unwrap() {
        let ty = r["type"].as_str().unwrap();
        let searchable = r["interaction"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["code"] == "search-type");
        if !searchable {
            continue;
        }
        let params: Vec<&str> = r["searchParam"]
            .as_array()
            .map(|ps| ps.iter().map(|p| p["name"].as_str().unwrap()).collect())
            .unwrap_or_default();
        for paging in ["_count", "_offset"] {
            assert!(params.contains(&paging), "{ty} does not declare {paging}");
        }
        for p in &params {
            let v = sample(p).unwrap_or_else(|| panic!("no sample value for {ty} {p}: add one"));
            let (status, body) = hub.get_json(&format!("/fhir/{ty}?{p}={v}")).await;
            assert_eq!(status, 200, "{ty}?{p}={v}: {body}");
            assert_eq!(body["type"], "searchset", "{ty}?{p}={v}: {body}");
        }
        let (status, body) = hub.get_json(&format!("/fhir/{ty}?_undeclared=1")).await;
        assert_eq!(status, 400, "{ty}: {body}");
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert!(
            body["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("_undeclared"),
            "{ty}: {body}"
        );
        searched.push(ty.to_owned());
    }
    assert_eq!(searched, ["Observation", "Device", "Location"]);
    // Paging is real: one Observation per page, the second page differs.
    let (_, p1) = hub.get_json("/fhir/Observation?_count=1").await;
    let (_, p2) = hub.get_json("/fhir/Observation?_count=1&_offset=1").await;
    assert_eq!(ids(&p1).len(), 1);
    assert_eq!(ids(&p2).len(), 1);
    assert_ne!(ids(&p1), ids(&p2));
    hub.stop().await;
}
