//! Early-warning scores from readings stored through ingest, manual inputs,
//! the freshness window, withheld readings, the FHIR rendering and the API
//! errors.

use crate::common;
use crate::pg_server;

use common::*;
use serde_json::{Value, json};
use shared_protocol::catalogue::{Unit, codes, units};
use shared_protocol::v1::{Reading, reading};

const ADMIN: &str = "scores-admin-token-0123456789abcdef0123";

async fn hub(admin: bool, extra: &str) -> TestHub {
    hub_in(tempfile::tempdir().unwrap(), admin, extra).await
}

async fn hub_in(dir: tempfile::TempDir, admin: bool, extra: &str) -> TestHub {
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{ADMIN}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let base = config_text(dir.path(), "");
    let mut text = if extra.contains("[storage.postgres]") {
        // The storage additions go inside [storage], before the associations.
        base.replace("[[associations]]", &format!("{extra}\n[[associations]]"))
    } else {
        format!("{base}\n{extra}\n")
    };
    if admin {
        text.push_str(&format!(
            "[association]\nadmin_token_file = \"{}\"\n",
            token_file.display()
        ));
    }
    let config = cloud_hub::Config::parse(&text).unwrap();
    config.validate().unwrap();
    TestHub::start_config(dir, config, "http").await
}

fn numeric(seq: u64, mdc: u32, unit: Unit, value: f64, t: i64) -> Reading {
    Reading {
        mdc_code: mdc,
        vendor_label: "X".into(),
        mdc_unit: unit.mdc,
        ucum_unit: unit.ucum.into(),
        value: Some(reading::Value::Numeric(value)),
        ..spo2(seq, 0.0, t)
    }
}

fn invalid(mut r: Reading) -> Reading {
    r.validity = 3;
    r
}

async fn get(hub: &TestHub, path: &str, token: Option<&str>) -> (u16, Value) {
    let req = match token {
        Some(t) => hub.client.get(hub.url(path)).bearer_auth(t),
        None => common::client().get(hub.url(path)),
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn put_manual(hub: &TestHub, patient: &str, body: Value) -> (u16, Value) {
    let resp = hub
        .client
        .put(hub.url(&format!("/api/v1/patients/{patient}/manual-inputs")))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn scores(hub: &TestHub) -> Value {
    let (status, body) = get(
        hub,
        &format!("/api/v1/patients/{PATIENT}/scores"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn component<'a>(score: &'a Value, parameter: &str) -> &'a Value {
    score["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["parameter"] == parameter)
        .unwrap_or_else(|| panic!("no {parameter} in {score}"))
}

fn used<'a>(report: &'a Value, parameter: &str) -> Option<&'a Value> {
    report["inputs"]["used"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["parameter"] == parameter)
}

/// Worked example: readings from ingest (blood pressure as a panel,
/// temperature in °F) plus manual ACVPU/oxygen, then changes of the manual
/// inputs change the scores.
#[tokio::test]
async fn scores_from_ingested_readings_and_manual_inputs() {
    let hub = hub(true, "").await;
    let t = now_us() - 2 * MINUTE;
    hub.ingest(&batch(
        1,
        DEVICE,
        vec![
            numeric(1, codes::RESP_RATE, units::RESP_PER_MIN, 22.0, t),
            spo2(2, 95.0, t),
            numeric(3, codes::PRESS_BLD_NONINV_SYS, units::MMHG, 105.0, t),
            numeric(4, codes::PRESS_BLD_NONINV_DIA, units::MMHG, 70.0, t),
            pulse(5, 95.0, t),
            // 101.3 °F = 38.5 °C.
            numeric(6, codes::TEMP_BODY, units::DEGF, 101.3, t),
        ],
    ))
    .await;
    // The blood pressure became a panel; its systolic part is still a row.
    let panels: i64 = hub
        .db()
        .query_row(
            "SELECT COUNT(*) FROM observations WHERE kind = 'bp-panel'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(panels, 1);

    // No manual inputs yet: device inputs used, NEWS2 and MEWS need ACVPU.
    let r = scores(&hub).await;
    assert_eq!(r["news2"], Value::Null, "{r}");
    assert_eq!(r["qsofa"], Value::Null);
    assert_eq!(r["mews"], Value::Null);
    assert_eq!(
        r["inputs"]["missing"],
        json!(["supplemental_oxygen", "consciousness"])
    );
    let sbp = used(&r, "systolic_bp").unwrap();
    assert_eq!(sbp["value"], 105.0);
    assert!(sbp["source"].as_str().unwrap().starts_with("Observation/"));
    let temp = used(&r, "temperature").unwrap()["value"].as_f64().unwrap();
    assert!((temp - 38.5).abs() < 1e-9, "{temp}");
    assert_eq!(used(&r, "temperature").unwrap()["unit"], "Cel");
    assert_eq!(used(&r, "spo2_scale").unwrap()["source"], "default");

    // Alert, on air: RR 22 → 2, SpO2 95 → 1, air 0, SBP 105 → 1, pulse 95
    // → 1, alert 0, 38.5 °C → 1: NEWS2 6 (medium).
    let (status, r) = put_manual(
        &hub,
        PATIENT,
        json!({"consciousness": "alert", "supplemental_oxygen": false}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let n = &r["news2"];
    assert_eq!(n["total"], 6, "{r}");
    assert_eq!(n["band"], "medium");
    assert_eq!(n["single_parameter_3"], false);
    assert_eq!(component(n, "respiration_rate")["score"], 2);
    assert_eq!(component(n, "respiration_rate")["input"]["value"], 22.0);
    assert_eq!(component(n, "spo2")["score"], 1);
    assert_eq!(component(n, "spo2")["scale"], 1);
    assert_eq!(component(n, "supplemental_oxygen")["score"], 0);
    assert_eq!(
        component(n, "supplemental_oxygen")["input"]["source"],
        "manual"
    );
    assert_eq!(component(n, "systolic_bp")["score"], 1);
    assert_eq!(component(n, "pulse")["score"], 1);
    assert_eq!(component(n, "consciousness")["score"], 0);
    assert_eq!(component(n, "temperature")["score"], 1);
    // qSOFA: RR ≥ 22 only → 1, negative. MEWS: SBP 0, HR 0, RR 2, T 2, A 0.
    assert_eq!(r["qsofa"]["score"], 1);
    assert_eq!(r["qsofa"]["positive"], false);
    assert_eq!(r["mews"]["total"], 4);
    assert_eq!(r["inputs"]["missing"], json!([]));
    assert!(r["computed_at"].as_str().unwrap().ends_with('Z'));

    // Responds to voice, on oxygen: +3 and +2 → 11 (high); a single 3.
    let (status, r) = put_manual(
        &hub,
        PATIENT,
        json!({"consciousness": "voice", "supplemental_oxygen": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["news2"]["total"], 11, "{r}");
    assert_eq!(r["news2"]["band"], "high");
    assert_eq!(r["news2"]["single_parameter_3"], true);
    assert_eq!(r["qsofa"]["score"], 2);
    assert_eq!(r["qsofa"]["positive"], true);
    assert_eq!(r["mews"]["total"], 5);

    // SpO2 Scale 2 on oxygen: 95 % scores 2 instead of 1 → 12.
    let (status, r) = put_manual(&hub, PATIENT, json!({"spo2_scale": 2})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["news2"]["total"], 12, "{r}");
    assert_eq!(component(&r["news2"], "spo2")["score"], 2);
    assert_eq!(component(&r["news2"], "spo2")["scale"], 2);

    // An older manual input (by its time) does not override a newer one.
    let old = cloud_hub::fhir::format_instant(now_us() - 10 * MINUTE);
    let (status, r) = put_manual(&hub, PATIENT, json!({"consciousness": "alert", "at": old})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        component(&r["news2"], "consciousness")["input"]["value"],
        "voice"
    );

    // The same NEWS2 as a FHIR Observation, valid R4.
    let resp = hub
        .client
        .get(hub.url(&format!("/api/v1/patients/{PATIENT}/scores/news2")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/fhir+json");
    let obs: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(obs["resourceType"], "Observation");
    assert_eq!(obs["valueInteger"], 12);
    assert_eq!(obs["subject"]["reference"], format!("Patient/{PATIENT}"));
    assert_eq!(obs["component"].as_array().unwrap().len(), 7);
    assert_eq!(obs["derivedFrom"].as_array().unwrap().len(), 5);
    let (ok, report) = validate_fhir(std::slice::from_ref(&obs));
    assert!(ok, "{report}\n{obs:#}");
    hub.stop().await;
}

/// Stale inputs are reported and not scored; invalid or not-final readings
/// are never used, even when newer; metrics never measured are missing.
#[tokio::test]
async fn stale_missing_and_invalid_inputs() {
    let hub = hub(true, "[scores]\nfreshness_s = 600\n").await;
    let now = now_us();
    let mut questionable = pulse(6, 130.0, now - MINUTE);
    questionable.validity = 2;
    hub.ingest(&batch(
        1,
        DEVICE,
        vec![
            // Stale: 20 minutes old with a 10-minute window.
            spo2(1, 97.0, now - 20 * MINUTE),
            // A valid respiration rate, then a newer invalid one: the
            // valid one is used, the invalid one listed as withheld.
            numeric(
                2,
                codes::RESP_RATE,
                units::RESP_PER_MIN,
                18.0,
                now - 5 * MINUTE,
            ),
            invalid(numeric(
                3,
                codes::RESP_RATE,
                units::RESP_PER_MIN,
                40.0,
                now - MINUTE,
            )),
            // Systolic only with an impossible value (withheld by ingest).
            numeric(
                4,
                codes::PRESS_BLD_NONINV_SYS,
                units::MMHG,
                900.0,
                now - MINUTE,
            ),
            // Pulse: only a questionable (preliminary) reading.
            questionable,
        ],
    ))
    .await;
    put_manual(
        &hub,
        PATIENT,
        json!({"consciousness": "alert", "supplemental_oxygen": false}),
    )
    .await;
    let r = scores(&hub).await;
    assert_eq!(r["freshness_s"], 600);
    assert_eq!(r["news2"], Value::Null, "{r}");
    assert_eq!(r["qsofa"], Value::Null);
    assert_eq!(r["mews"], Value::Null);
    assert_eq!(used(&r, "respiration_rate").unwrap()["value"], 18.0);
    let stale = r["inputs"]["stale"].as_array().unwrap();
    assert_eq!(stale.len(), 1, "{r}");
    assert_eq!(stale[0]["parameter"], "spo2");
    assert_eq!(stale[0]["value"], 97.0);
    assert_eq!(
        r["inputs"]["missing"],
        json!(["systolic_bp", "pulse", "temperature"])
    );
    let withheld: Vec<&str> = r["inputs"]["withheld"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["parameter"].as_str().unwrap())
        .collect();
    assert_eq!(
        withheld,
        ["respiration_rate", "systolic_bp", "pulse"],
        "{r}"
    );
    // Unusable readings are named, never their values.
    for w in r["inputs"]["withheld"].as_array().unwrap() {
        assert!(w.get("value").is_none(), "{w}");
    }

    // The NEWS2 Observation cannot be made: 409 naming the inputs.
    let (status, body) = get(
        &hub,
        &format!("/api/v1/patients/{PATIENT}/scores/news2"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 409);
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains("spo2") && msg.contains("pulse"), "{msg}");

    // Fresh valid readings complete the inputs: scored from those only.
    hub.ingest(&batch(
        2,
        DEVICE,
        vec![
            spo2(7, 97.0, now),
            numeric(8, codes::PRESS_BLD_NONINV_SYS, units::MMHG, 120.0, now),
            pulse(9, 70.0, now),
            numeric(10, codes::TEMP_BODY, units::DEGC, 37.0, now),
        ],
    ))
    .await;
    let r = scores(&hub).await;
    assert_eq!(r["news2"]["total"], 0, "{r}");
    assert_eq!(r["news2"]["band"], "low");
    assert_eq!(r["inputs"]["stale"], json!([]));
    // The invalid respiration rate is still newer than the one used.
    assert_eq!(r["inputs"]["withheld"][0]["parameter"], "respiration_rate");
    hub.stop().await;
}

#[tokio::test]
async fn api_errors() {
    let hub = hub(true, "").await;
    let path = format!("/api/v1/patients/{PATIENT}/scores");
    assert_eq!(get(&hub, &path, None).await.0, 401);
    assert_eq!(get(&hub, &path, Some("wrong-token")).await.0, 401);
    // Unknown patient (no readings, stays or manual inputs).
    let (status, body) = get(&hub, "/api/v1/patients/nobody/scores", Some(ADMIN)).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = put_manual(&hub, "nobody", json!({"consciousness": "alert"})).await;
    assert_eq!(status, 404);

    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, now_us())]))
        .await;
    let (status, body) = put_manual(&hub, PATIENT, json!({"consciousness": "drowsy"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "consciousness");
    let (status, body) = put_manual(&hub, PATIENT, json!({"spo2_scale": 3})).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "spo2_scale");
    let (status, body) = put_manual(&hub, PATIENT, json!({})).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "body");
    let (status, body) = put_manual(
        &hub,
        PATIENT,
        json!({"supplemental_oxygen": true, "at": "2099-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "at");
    let resp = common::client()
        .put(hub.url(&format!("/api/v1/patients/{PATIENT}/manual-inputs")))
        .body(json!({"consciousness": "alert"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Nothing was stored by the refused requests.
    let stored: i64 = hub
        .db()
        .query_row("SELECT COUNT(*) FROM manual_inputs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 0);
    hub.stop().await;

    // Without an admin token file that token is unknown: 401.
    let hub = hub_without_admin().await;
    let (status, body) = get(&hub, &path, Some(ADMIN)).await;
    assert_eq!(status, 401, "{body}");
    hub.stop().await;
}

async fn hub_without_admin() -> TestHub {
    hub(false, "").await
}

#[test]
fn freshness_is_validated_in_config() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[scores]\nfreshness_s = 0\n",
        config_text(dir.path(), "")
    );
    let err = cloud_hub::Config::parse(&text)
        .and_then(|c| c.validate().map(|_| c))
        .unwrap_err()
        .to_string();
    assert!(err.contains("scores.freshness_s"), "{err}");
}

/// On PostgreSQL the scores, manual inputs and score history work as on
/// SQLite (the worked example's first steps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_manual_inputs_and_history_on_postgres() {
    let server = pg_server::PgServer::start();
    let extra = format!(
        "backend = \"postgres\"\n[storage.postgres]\nurl = \"{}\"\npool_size = 2\n",
        server.url()
    );
    let hub = hub_in(tempfile::tempdir().unwrap(), true, &extra).await;
    let t = now_us() - 2 * MINUTE;
    hub.ingest(&batch(
        1,
        DEVICE,
        vec![
            numeric(1, codes::RESP_RATE, units::RESP_PER_MIN, 22.0, t),
            spo2(2, 95.0, t),
            numeric(3, codes::PRESS_BLD_NONINV_SYS, units::MMHG, 105.0, t),
            numeric(4, codes::PRESS_BLD_NONINV_DIA, units::MMHG, 70.0, t),
            pulse(5, 95.0, t),
            numeric(6, codes::TEMP_BODY, units::DEGF, 101.3, t),
        ],
    ))
    .await;
    let r = scores(&hub).await;
    assert_eq!(r["news2"], Value::Null, "{r}");
    assert_eq!(
        r["inputs"]["missing"],
        json!(["supplemental_oxygen", "consciousness"])
    );
    // The systolic part of the blood-pressure panel is used.
    assert_eq!(used(&r, "systolic_bp").unwrap()["value"], 105.0);
    let (status, r) = put_manual(
        &hub,
        PATIENT,
        json!({"consciousness": "alert", "supplemental_oxygen": false}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["news2"]["total"], 6, "{r}");
    assert_eq!(r["news2"]["band"], "medium");
    assert_eq!(r["mews"]["total"], 4);
    assert_eq!(
        component(&r["news2"], "supplemental_oxygen")["input"]["source"],
        "manual"
    );
    let (status, r) = put_manual(&hub, PATIENT, json!({"consciousness": "voice"})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["news2"]["total"], 9, "{r}");
    // The history, oldest first: the incomplete score at ingest, then each
    // manual change.
    let (status, h) = get(
        &hub,
        &format!("/api/v1/patients/{PATIENT}/scores/history"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200, "{h}");
    let totals: Vec<Value> = h["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["total"].clone())
        .collect();
    assert_eq!(totals, vec![Value::Null, json!(6), json!(9)], "{h}");
    hub.stop().await;
    drop(server);
}
