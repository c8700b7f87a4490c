//! Chart aggregates: 1-minute / 5-minute / 1-hour buckets per patient and
//! metric built at ingest from usable values only (invalid and impossible
//! values left out, °F converted to the chart's °C), idempotent under
//! re-sent batches, following re-attribution to another patient, served
//! with a trend slope.

use crate::common;

use common::*;
use serde_json::{Value, json};
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::reading;

const ADMIN: &str = "trends-admin-token-0123456789abcdef012345";
const S: i64 = 1_000_000;
/// 2024-05-01T10:00:00Z = T0 (whole hour).
const FROM: &str = "2024-05-01T10:00:00Z";
const TO: &str = "2024-05-01T11:00:00Z";

async fn hub() -> TestHub {
    let data = tempfile::tempdir().unwrap();
    let mut hub = start_with_admin(data.path(), ADMIN, "").await;
    hub.dir = data;
    hub
}

async fn call(hub: &TestHub, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_json(hub, Some(ADMIN), method, path, body).await
}

async fn series(hub: &TestHub, patient: &str, query: &str) -> Value {
    let (status, body) = call(
        hub,
        "GET",
        &format!("/api/v1/patients/{patient}/series?{query}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn buckets_of_usable_values_follow_their_patient() {
    let hub = hub().await;
    // 10 minutes of SpO2, one value every 10 s: minute m holds 80 + m,
    // 80 + m + 1, … (6 values: mean 82.5 + m, min 80 + m, max 85 + m).
    let mut readings: Vec<_> = (0..60)
        .map(|i| {
            let m = i / 6;
            spo2(
                i as u64 + 1,
                80.0 + m as f64 + (i % 6) as f64,
                T0 + i * 10 * S,
            )
        })
        .collect();
    // Left out: an invalid value and a physically impossible one.
    let mut bad = spo2(100, 20.0, T0 + 5 * S);
    bad.validity = 3;
    readings.push(bad);
    readings.push(spo2(101, 180.0, T0 + 6 * S));
    let b = batch(1, DEVICE, readings);
    hub.ingest(&b).await;
    // A re-sent batch changes nothing.
    assert!(hub.ingest(&b).await.duplicate_batch);
    // Temperature in °F: bucketed in °C.
    let mut f = spo2(200, 0.0, T0 + 30 * S);
    f.mdc_code = codes::TEMP_BODY;
    f.mdc_unit = units::DEGF.mdc;
    f.ucum_unit = "[degF]".into();
    f.value = Some(reading::Value::Numeric(98.6));
    hub.ingest(&batch(2, DEVICE, vec![f])).await;

    let s = series(
        &hub,
        PATIENT,
        &format!("code=59408-5&resolution=60&from={FROM}&to={TO}"),
    )
    .await;
    assert_eq!(s["unit"], "%");
    assert_eq!(s["code"]["mdc"], codes::PULS_OXIM_SAT_O2);
    let pts = s["points"].as_array().unwrap();
    assert_eq!(pts.len(), 10);
    for (m, p) in pts.iter().enumerate() {
        let m = m as f64;
        assert_eq!(p["count"], 6, "{p}");
        assert_eq!(p["min"].as_f64(), Some(80.0 + m), "{p}");
        assert_eq!(p["max"].as_f64(), Some(85.0 + m), "{p}");
        assert_eq!(p["mean"].as_f64(), Some(82.5 + m), "{p}");
    }
    assert_eq!(pts[0]["start"], "2024-05-01T10:00:00Z");
    // Rising by 1 % per minute: 60 per hour.
    let slope = s["trend"]["per_hour"].as_f64().unwrap();
    assert!((slope - 60.0).abs() < 1e-6, "{slope}");
    // The same data at 5 minutes and 1 hour; MDC code works as well.
    let s = series(
        &hub,
        PATIENT,
        &format!("code=150456&resolution=300&from={FROM}&to={TO}"),
    )
    .await;
    let counts: Vec<i64> = s["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, [30, 30]);
    let s = series(
        &hub,
        PATIENT,
        &format!("code=59408-5&resolution=3600&from={FROM}&to={TO}"),
    )
    .await;
    assert_eq!(s["points"][0]["count"], 60);
    assert_eq!(s["points"][0]["min"].as_f64(), Some(80.0));
    assert_eq!(s["points"][0]["max"].as_f64(), Some(94.0));
    let t = series(
        &hub,
        PATIENT,
        &format!("code=8310-5&resolution=60&from={FROM}&to={TO}"),
    )
    .await;
    assert_eq!(t["unit"], "Cel");
    let c = t["points"][0]["mean"].as_f64().unwrap();
    assert!((c - 37.0).abs() < 1e-9, "{c}");

    // The device turns out to have been at a bed where MRN-9 lay from
    // 10:05: those readings move to MRN-9, and so do their buckets.
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/beds",
        Some(json!({ "id": "icu3-07", "ward": "ICU 3", "label": "Bed 7" })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/placements",
        Some(
            json!({ "gateway_id": GATEWAY, "device_id": DEVICE, "bed_id": "icu3-07",
                     "at": "2024-05-01T10:05:00Z", "reason": "set up late" }),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        &hub,
        "POST",
        "/api/v1/patients/admit",
        Some(
            json!({ "patient": { "value": "MRN-9" }, "bed_id": "icu3-07",
                     "at": "2024-05-01T10:05:00Z", "reason": "set up late" }),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reattributed"], 30, "{body}");
    let q = format!("code=59408-5&resolution=60&from={FROM}&to={TO}");
    let mine = series(&hub, PATIENT, &q).await;
    let theirs = series(&hub, "MRN-9", &q).await;
    let starts = |s: &Value| -> Vec<String> {
        s["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["start"].as_str().unwrap()[11..16].to_owned())
            .collect()
    };
    assert_eq!(starts(&mine), ["10:00", "10:01", "10:02", "10:03", "10:04"]);
    assert_eq!(
        starts(&theirs),
        ["10:05", "10:06", "10:07", "10:08", "10:09"]
    );
    assert_eq!(theirs["points"][0]["mean"].as_f64(), Some(87.5));
    let hour = series(
        &hub,
        "MRN-9",
        &format!("code=59408-5&resolution=3600&from={FROM}&to={TO}"),
    )
    .await;
    assert_eq!(hour["points"][0]["count"], 30);

    // Errors name the field.
    for (q, field) in [
        ("resolution=60".to_owned(), "code"),
        ("code=99999-9".into(), "code"),
        (
            format!("code=59408-5&resolution=61&from={FROM}&to={TO}"),
            "resolution",
        ),
        ("code=59408-5&from=yesterday".into(), "from"),
        (format!("code=59408-5&from={TO}&to={FROM}"), "from"),
    ] {
        let (status, body) = call(
            &hub,
            "GET",
            &format!("/api/v1/patients/{PATIENT}/series?{q}"),
            None,
        )
        .await;
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some(field)),
            "{q}: {body}"
        );
    }
    let resp = common::client()
        .get(hub.url(&format!("/api/v1/patients/{PATIENT}/series?code=59408-5")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    hub.stop().await;
}
