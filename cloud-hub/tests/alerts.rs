//! The alert engine through the hub: readings ingested over HTTP raise
//! physiological, NEWS2 and technical alerts; the live stream (SSE) shows
//! each change; acknowledgement, escalation and resolution are stored with
//! their transitions; open alerts survive a restart; per-patient limits.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use shared_protocol::catalogue::{Unit, codes, units};
use shared_protocol::v1::{Reading, TechnicalKind, TechnicalReading, reading};

const ADMIN: &str = "alerts-admin-token-0123456789abcdef01234";
const S: i64 = 1_000_000;

/// A hub with the admin token, its data in `data`, alerts checked every
/// 100 ms plus `alerts` lines.
async fn hub_in(data: &std::path::Path, alerts: &str) -> TestHub {
    start_with_admin(data, ADMIN, &format!("[alerts]\ntick_ms = 100\n{alerts}")).await
}

async fn hub(alerts: &str) -> TestHub {
    let data = tempfile::tempdir().unwrap();
    let mut hub = hub_in(data.path(), alerts).await;
    // The hub owns its data directory from here on.
    hub.dir = data;
    hub
}

async fn call(hub: &TestHub, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_json(hub, Some(ADMIN), method, path, body).await
}

async fn open_alerts(hub: &TestHub) -> Vec<Value> {
    let (status, body) = call(hub, "GET", "/api/v1/alerts?open=true", None).await;
    assert_eq!(status, 200, "{body}");
    body["alerts"].as_array().unwrap().clone()
}

fn codes_of(alerts: &[Value]) -> Vec<String> {
    let mut c: Vec<String> = alerts
        .iter()
        .map(|a| a["code"].as_str().unwrap().to_owned())
        .collect();
    c.sort();
    c
}

/// Polls `f` every 100 ms for up to 10 s.
async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
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

/// Reads the SSE stream until `n` `alert` events arrived; returns their
/// JSON data.
async fn sse_events(resp: &mut reqwest::Response, n: usize) -> Vec<Value> {
    let mut buf = String::new();
    let mut out = vec![];
    while out.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(15), resp.chunk())
            .await
            .expect("an SSE event in time")
            .unwrap()
            .expect("stream open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            if frame.lines().any(|l| l == "event: alert") {
                let data: String = frame
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                out.push(serde_json::from_str(&data).unwrap());
            }
        }
    }
    out
}

#[tokio::test]
async fn a_low_spo2_is_raised_after_its_delay_streamed_acknowledged_escalated_and_resolved() {
    let hub = hub("escalate_after_s = 2").await;
    // Without the admin token: 401; the stream too.
    let resp = common::client()
        .get(hub.url("/api/v1/alerts"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let mut stream = hub
        .client
        .get(hub.url("/api/v1/alerts/stream"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");

    let t = now_us();
    // SpO2 90 % (below both default limits, 94 medium and 92 high) for 6 s:
    // shorter than the 10 s delay, nothing yet.
    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 90.0, t - 12 * S)]))
        .await;
    hub.ingest(&batch(2, DEVICE, vec![spo2(2, 90.0, t - 6 * S)]))
        .await;
    assert!(open_alerts(&hub).await.is_empty());
    // An invalid reading does not count either way.
    let mut bad = spo2(3, 70.0, t - 3 * S);
    bad.validity = 3;
    hub.ingest(&batch(3, DEVICE, vec![bad])).await;
    assert!(open_alerts(&hub).await.is_empty());
    // 12 s after the condition began: both raised.
    hub.ingest(&batch(4, DEVICE, vec![spo2(4, 90.0, t)])).await;
    let open = open_alerts(&hub).await;
    assert_eq!(codes_of(&open), ["spo2-low-high", "spo2-low-medium"]);
    let high = open.iter().find(|a| a["code"] == "spo2-low-high").unwrap();
    assert_eq!(high["priority"], "high");
    assert_eq!(high["kind"], "physiological");
    assert_eq!(high["patient"], PATIENT);
    assert_eq!(high["value"], 90.0);
    assert_eq!(high["unit"], "%");
    assert_eq!(high["condition_since_us"], t - 12 * S);
    let high_id = high["id"].as_i64().unwrap();
    let medium_id = open
        .iter()
        .find(|a| a["code"] == "spo2-low-medium")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    // The live stream showed both.
    let ev = sse_events(&mut stream, 2).await;
    assert!(ev.iter().all(|e| e["transition"] == "raised"), "{ev:?}");

    // Acknowledge the high one; twice is a conflict.
    let (status, a) = call(
        &hub,
        "POST",
        &format!("/api/v1/alerts/{high_id}/acknowledge"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["state"], "acknowledged");
    let (status, _) = call(
        &hub,
        "POST",
        &format!("/api/v1/alerts/{high_id}/acknowledge"),
        None,
    )
    .await;
    assert_eq!(status, 409);
    let (status, _) = call(&hub, "POST", "/api/v1/alerts/999999/acknowledge", None).await;
    assert_eq!(status, 409);
    // The unacknowledged one escalates after 2 s; the acknowledged one not.
    eventually("escalation", async || {
        let (_, a) = call(&hub, "GET", &format!("/api/v1/alerts/{medium_id}"), None).await;
        a["alert"].get("escalated_us").map(|_| ())
    })
    .await;
    let (_, a) = call(&hub, "GET", &format!("/api/v1/alerts/{high_id}"), None).await;
    assert!(a["alert"].get("escalated_us").is_none(), "{a}");

    // 92 % is not past the high limit's hysteresis (92 + 1): still open.
    hub.ingest(&batch(5, DEVICE, vec![spo2(5, 92.0, now_us())]))
        .await;
    assert_eq!(open_alerts(&hub).await.len(), 2);
    hub.ingest(&batch(6, DEVICE, vec![spo2(6, 97.0, now_us())]))
        .await;
    assert!(open_alerts(&hub).await.is_empty());
    // The stream showed acknowledged, escalated and both resolutions.
    let ev = sse_events(&mut stream, 4).await;
    let mut seen: Vec<(i64, String)> = ev
        .iter()
        .map(|e| {
            (
                e["alert"]["id"].as_i64().unwrap(),
                e["transition"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    let mut want = vec![
        (high_id, "acknowledged".to_owned()),
        (high_id, "resolved".into()),
        (medium_id, "escalated".into()),
        (medium_id, "resolved".into()),
    ];
    want.sort();
    assert_eq!(seen, want);
    // Every transition is stored with who and when.
    let (_, a) = call(&hub, "GET", &format!("/api/v1/alerts/{high_id}"), None).await;
    let transitions: Vec<(&str, Option<&str>)> = a["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["transition"].as_str().unwrap(), e["actor"].as_str()))
        .collect();
    assert_eq!(
        transitions,
        [
            ("raised", None),
            ("acknowledged", Some("admin-token")),
            ("resolved", None)
        ]
    );
    assert_eq!(a["alert"]["state"], "resolved");
    assert_eq!(a["alert"]["acknowledged_by"], "admin-token");
    // The history keeps resolved alerts.
    let (_, all) = call(&hub, "GET", "/api/v1/alerts", None).await;
    assert_eq!(all["alerts"].as_array().unwrap().len(), 2);
    // The audit log names the patient whose alerts the list and the reads
    // returned (their paths name none).
    let patients: Vec<(String, Option<String>)> = hub
        .db()
        .prepare(
            "SELECT resource, patient_id FROM audit_log
              WHERE resource LIKE '/api/v1/alerts%' AND outcome = 200 ORDER BY seq",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let reads: Vec<_> = patients
        .iter()
        .filter(|(r, _)| r.starts_with("/api/v1/alerts/"))
        .collect();
    assert!(reads.len() >= 3, "{patients:?}");
    for (resource, patient) in reads {
        assert_eq!(patient.as_deref(), Some(PATIENT), "{resource}");
    }
    // The first list was empty (nobody named); the last one held the alerts.
    let lists: Vec<_> = patients
        .iter()
        .filter(|(r, _)| r == "/api/v1/alerts")
        .collect();
    assert_eq!(lists.first().unwrap().1, None);
    assert_eq!(lists.last().unwrap().1.as_deref(), Some(PATIENT));
    hub.stop().await;
}

#[tokio::test]
async fn technical_alerts_from_devices_gateways_and_the_clock() {
    let hub = hub("stale_after_s = 1\ngateway_offline_after_s = 2").await;
    let t = now_us();
    let mut b = batch(1, DEVICE, vec![]);
    b.devices[0].technical.push(TechnicalReading {
        kind: TechnicalKind::Disconnected as i32,
        time_us: t,
        detail: "port vanished".into(),
        sequence: 1,
    });
    b.gateway_events.push(TechnicalReading {
        kind: TechnicalKind::BufferOverflow as i32,
        time_us: t,
        detail: "dropped 12 readings".into(),
        sequence: 1,
    });
    hub.ingest(&b).await;
    let open = open_alerts(&hub).await;
    assert_eq!(
        codes_of(&open),
        ["device-disconnected", "edge-buffer-overflow"]
    );
    assert!(open.iter().all(|a| a["kind"] == "technical"));
    // Reconnected: resolved. The overflow is resolved by acknowledging it.
    let mut b = batch(2, DEVICE, vec![]);
    b.devices[0].technical.push(TechnicalReading {
        kind: TechnicalKind::Connected as i32,
        time_us: now_us(),
        detail: String::new(),
        sequence: 2,
    });
    hub.ingest(&b).await;
    let open = open_alerts(&hub).await;
    assert_eq!(codes_of(&open), ["edge-buffer-overflow"]);
    let id = open[0]["id"].as_i64().unwrap();
    let (status, _) = call(
        &hub,
        "POST",
        &format!("/api/v1/alerts/{id}/acknowledge"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(open_alerts(&hub).await.is_empty());
    // Sensor off on a reading: a technical alert; a valid value clears it.
    let mut off = spo2(3, 0.0, now_us());
    off.value = None;
    off.validity = 3;
    off.flags = vec![2]; // SENSOR_OFF
    hub.ingest(&batch(3, DEVICE, vec![off])).await;
    assert_eq!(codes_of(&open_alerts(&hub).await), ["sensor-off"]);
    hub.ingest(&batch(4, DEVICE, vec![spo2(4, 97.0, now_us())]))
        .await;
    assert!(open_alerts(&hub).await.is_empty());
    // Then silence: data stale after 1 s, gateway offline after 2 s.
    let open = eventually("stale data and an offline gateway", async || {
        let open = open_alerts(&hub).await;
        (open.len() == 2).then_some(open)
    })
    .await;
    assert_eq!(codes_of(&open), ["data-stale", "gateway-offline"]);
    let stale = open.iter().find(|a| a["code"] == "data-stale").unwrap();
    assert_eq!(stale["device_id"], DEVICE);
    assert_eq!(stale["patient"], PATIENT);
    // Data again: both resolved.
    hub.ingest(&batch(5, DEVICE, vec![spo2(5, 97.0, now_us())]))
        .await;
    assert!(open_alerts(&hub).await.is_empty());
    hub.stop().await;
}

#[tokio::test]
async fn news2_bands_raise_score_alerts() {
    let hub = hub("").await;
    // The patient is known from a first reading; then ACVPU and oxygen are
    // entered (NEWS2 needs them; without them no score, no score alert).
    hub.ingest(&batch(100, DEVICE, vec![spo2(100, 97.0, now_us())]))
        .await;
    assert!(open_alerts(&hub).await.is_empty());
    let (status, body) = call(
        &hub,
        "PUT",
        &format!("/api/v1/patients/{PATIENT}/manual-inputs"),
        Some(json!({ "consciousness": "alert", "supplemental_oxygen": false })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let t = now_us();
    // RR 26 (3), SpO2 96 (0), SBP 120 (0), pulse 80 (0), temp 37 (0):
    // NEWS2 3, a 3 in a single parameter.
    let vitals = |seq: u64, rr: f64, spo2_v: f64, pulse_v: f64| {
        vec![
            numeric(seq, codes::RESP_RATE, units::RESP_PER_MIN, rr, t),
            spo2(seq + 1, spo2_v, t),
            numeric(seq + 2, codes::PRESS_BLD_NONINV_SYS, units::MMHG, 120.0, t),
            numeric(
                seq + 3,
                codes::PULS_OXIM_PULS_RATE,
                units::BEAT_PER_MIN,
                pulse_v,
                t,
            ),
            numeric(seq + 4, codes::TEMP_BODY, units::DEGC, 37.0, t),
        ]
    };
    hub.ingest(&batch(1, DEVICE, vitals(1, 26.0, 96.0, 80.0)))
        .await;
    let open = open_alerts(&hub).await;
    let score: Vec<&Value> = open.iter().filter(|a| a["kind"] == "score").collect();
    assert_eq!(score.len(), 1, "{open:?}");
    assert_eq!(score[0]["code"], "news2-single-parameter-3");
    assert_eq!(score[0]["value"], 3.0);
    // RR 26 (3), SpO2 91 (3), pulse 131 (3): NEWS2 9, high.
    hub.ingest(&batch(2, DEVICE, vitals(10, 26.0, 91.0, 131.0)))
        .await;
    let open = open_alerts(&hub).await;
    let score: Vec<&Value> = open.iter().filter(|a| a["kind"] == "score").collect();
    assert_eq!(score.len(), 1, "{open:?}");
    assert_eq!(score[0]["code"], "news2-high");
    assert_eq!(score[0]["priority"], "high");
    assert_eq!(score[0]["value"], 9.0);
    hub.stop().await;
}

#[tokio::test]
async fn open_alerts_survive_a_restart_and_patient_limits_apply() {
    let data = tempfile::tempdir().unwrap();
    let hub = hub_in(data.path(), "").await;
    // A patient's own limits: SpO2 high priority only below 85 %.
    let (status, body) = call(
        &hub,
        "PUT",
        &format!("/api/v1/patients/{PATIENT}/alert-rules"),
        Some(json!([{ "id": "spo2-low-high", "hysteresis": -1 }])),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "[0].rule `spo2-low-high`: hysteresis");
    let (status, body) = call(
        &hub,
        "PUT",
        &format!("/api/v1/patients/{PATIENT}/alert-rules"),
        Some(json!([{ "id": "spo2-low-high", "limit": 85 }])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, rules) = call(
        &hub,
        "GET",
        &format!("/api/v1/patients/{PATIENT}/alert-rules"),
        None,
    )
    .await;
    let high = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "spo2-low-high")
        .unwrap();
    assert_eq!(high["limit"], 85.0);
    let t = now_us();
    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 90.0, t - 10 * S)]))
        .await;
    hub.ingest(&batch(2, DEVICE, vec![spo2(2, 90.0, t)])).await;
    let open = open_alerts(&hub).await;
    assert_eq!(codes_of(&open), ["spo2-low-medium"]);
    let id = open[0]["id"].as_i64().unwrap();
    hub.stop().await;

    // Restarted on the same database: the alert is still open, the
    // patient's limits still apply, and a normal value resolves it. (The
    // test harness enrols its gateway again: revoke it first.)
    rusqlite::Connection::open(data.path().join("hub.sqlite"))
        .unwrap()
        .execute("UPDATE gateways SET revoked_us = 1", [])
        .unwrap();
    let hub = hub_in(data.path(), "").await;
    let open = open_alerts(&hub).await;
    assert_eq!(codes_of(&open), ["spo2-low-medium"]);
    assert_eq!(open[0]["id"].as_i64(), Some(id));
    let t = now_us();
    hub.ingest(&batch(10, DEVICE, vec![spo2(10, 88.0, t - 10 * S)]))
        .await;
    hub.ingest(&batch(11, DEVICE, vec![spo2(11, 88.0, t)]))
        .await;
    assert_eq!(
        codes_of(&open_alerts(&hub).await),
        ["spo2-low-medium"],
        "88 % is above this patient's high limit"
    );
    hub.ingest(&batch(12, DEVICE, vec![spo2(12, 97.0, now_us())]))
        .await;
    assert!(open_alerts(&hub).await.is_empty());
    let (_, a) = call(&hub, "GET", &format!("/api/v1/alerts/{id}"), None).await;
    assert_eq!(a["alert"]["state"], "resolved");
    hub.stop().await;
}
