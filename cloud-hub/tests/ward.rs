//! The ward overview: beds of one ward with their patient, latest vitals
//! (age, stale marker), NEWS2 and open alerts, riskiest first.

use crate::common;

use common::*;
use serde_json::{Value, json};
use shared_protocol::catalogue::{Unit, codes, units};
use shared_protocol::v1::{Reading, reading};

const ADMIN: &str = "ward-admin-token-0123456789abcdef01234567";
const S: i64 = 1_000_000;

async fn call(hub: &TestHub, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_json(hub, Some(ADMIN), method, path, body).await
}

fn numeric(seq: u64, mdc: u32, unit: Unit, value: f64, t: i64) -> Reading {
    Reading {
        mdc_code: mdc,
        mdc_unit: unit.mdc,
        ucum_unit: unit.ucum.into(),
        value: Some(reading::Value::Numeric(value)),
        ..spo2(seq, 0.0, t)
    }
}

#[tokio::test]
async fn the_ward_view_shows_each_bed_riskiest_first() {
    let data = tempfile::tempdir().unwrap();
    let hub = start_with_admin(data.path(), ADMIN, "").await;
    let start = "2000-01-01T00:00:00Z";
    for (id, ward, label) in [
        ("icu3-01", "ICU 3", "Bed 1"),
        ("icu3-02", "ICU 3", "Bed 2"),
        ("icu3-03", "ICU 3", "Bed 3"),
        ("wd5-01", "Ward 5", "Bed 1"),
    ] {
        let (s, b) = call(
            &hub,
            "POST",
            "/api/v1/beds",
            Some(json!({ "id": id, "ward": ward, "label": label })),
        )
        .await;
        assert_eq!(s, 201, "{b}");
    }
    for (dev, bed, patient) in [
        ("mon-1", "icu3-01", "MRN-A"),
        ("mon-2", "icu3-02", "MRN-B"),
        ("mon-5", "wd5-01", "MRN-C"),
    ] {
        let (s, b) = call(
            &hub,
            "POST",
            "/api/v1/placements",
            Some(json!({ "gateway_id": GATEWAY, "device_id": dev, "bed_id": bed, "at": start, "reason": "set up late" })),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        let (s, b) = call(
            &hub,
            "POST",
            "/api/v1/patients/admit",
            Some(json!({ "patient": { "value": patient }, "bed_id": bed, "at": start, "reason": "set up late" })),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    let t = now_us();
    // MRN-A (bed 1) is deteriorating; MRN-B (bed 2) is well, with a
    // temperature from 20 minutes ago (stale: freshness 900 s).
    let vitals = |seq: u64, rr: f64, sat: f64, sys: f64, pulse: f64, temp_t: i64| {
        vec![
            numeric(seq, codes::RESP_RATE, units::RESP_PER_MIN, rr, t),
            spo2(seq + 1, sat, t),
            numeric(seq + 2, codes::PRESS_BLD_NONINV_SYS, units::MMHG, sys, t),
            numeric(
                seq + 3,
                codes::PULS_OXIM_PULS_RATE,
                units::BEAT_PER_MIN,
                pulse,
                t,
            ),
            numeric(seq + 4, codes::TEMP_BODY, units::DEGC, 37.0, temp_t),
        ]
    };
    hub.ingest(&batch(
        1,
        "mon-2",
        vitals(1, 16.0, 97.0, 120.0, 72.0, t - 1200 * S),
    ))
    .await;
    hub.ingest(&batch(2, "mon-1", vitals(1, 26.0, 90.0, 95.0, 125.0, t)))
        .await;
    hub.ingest(&batch(3, "mon-5", vitals(1, 16.0, 97.0, 120.0, 72.0, t)))
        .await;
    for p in ["MRN-A", "MRN-B"] {
        let (s, b) = call(
            &hub,
            "PUT",
            &format!("/api/v1/patients/{p}/manual-inputs"),
            Some(json!({ "consciousness": "alert", "supplemental_oxygen": false })),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    // A new value after the manual inputs: the NEWS2 alert is evaluated.
    hub.ingest(&batch(4, "mon-1", vec![spo2(10, 90.0, now_us())]))
        .await;

    let (s, body) = call(&hub, "GET", "/api/v1/wards/ICU%203/overview", None).await;
    assert_eq!(s, 200, "{body}");
    let beds = body["beds"].as_array().unwrap();
    let ids: Vec<&str> = beds
        .iter()
        .map(|b| b["bed"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["icu3-01", "icu3-02", "icu3-03"],
        "riskiest first, other wards left out"
    );
    let a = &beds[0];
    assert_eq!(a["patient"]["value"], "MRN-A");
    // RR 26 (3) + SpO2 90 (3) + SBP 95 (2) + pulse 125 (2) = 10.
    assert_eq!(a["news2"]["total"], 10);
    assert_eq!(a["news2"]["band"], "high");
    assert_eq!(a["alerts"]["highest"], "high");
    assert!(a["alerts"]["open"].as_u64().unwrap() >= 1);
    let params: Vec<&str> = a["vitals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["parameter"].as_str().unwrap())
        .collect();
    assert_eq!(
        params,
        [
            "respiration_rate",
            "spo2",
            "systolic_bp",
            "pulse",
            "temperature"
        ]
    );
    let b = &beds[1];
    assert_eq!(b["patient"]["value"], "MRN-B");
    assert!(
        b.get("news2").is_none(),
        "temperature is stale: no NEWS2 ({b})"
    );
    let temp = b["vitals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["parameter"] == "temperature")
        .unwrap();
    assert_eq!(temp["stale"], true);
    assert!(temp["age_s"].as_i64().unwrap() >= 1200, "{temp}");
    assert_eq!(temp["unit"], "Cel");
    assert_eq!(b["alerts"]["open"], 0);
    let empty = &beds[2];
    assert!(empty.get("patient").is_none(), "{empty}");
    // Without the admin token: 401.
    let resp = common::client()
        .get(hub.url("/api/v1/wards/ICU%203/overview"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // The audit log names the patients the overview and the occupancy showed.
    let (s, body) = call(&hub, "GET", "/api/v1/occupancy", None).await;
    assert_eq!(s, 200, "{body}");
    let audited = |resource: &str| -> (Option<String>, String) {
        hub.db()
            .query_row(
                "SELECT patient_id, patients FROM audit_log WHERE resource = ?1 AND outcome = 200
                 ORDER BY seq DESC LIMIT 1",
                [resource],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    };
    assert_eq!(
        audited("/api/v1/wards/ICU%203/overview"),
        (Some("multiple: 2".into()), "MRN-A\nMRN-B".into())
    );
    assert_eq!(
        audited("/api/v1/occupancy"),
        (Some("multiple: 3".into()), "MRN-A\nMRN-B\nMRN-C".into())
    );
    hub.stop().await;
}
