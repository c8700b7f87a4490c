//! Score history through the hub: readings ingested over HTTP move NEWS2
//! from low to high and `GET …/scores/history` shows each total in order
//! with its band; a stale or missing input is a NULL total naming it; an
//! unchanged score is not stored again within the minute; bad queries are
//! 400 naming the field. (Roles: the authorisation matrix in access.rs.)

use crate::common;

use common::*;
use serde_json::{Value, json};
use shared_protocol::catalogue::{Unit, codes, units};
use shared_protocol::v1::{Reading, reading};

const ADMIN: &str = "history-admin-token-0123456789abcdef01234";
const S: i64 = 1_000_000;

async fn hub() -> TestHub {
    let data = tempfile::tempdir().unwrap();
    let mut hub = start_with_admin(data.path(), ADMIN, "[alerts]\ntick_ms = 100\n").await;
    hub.dir = data;
    hub
}

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

/// RR, SpO2, systolic 120, pulse and (when `temp_at` is given) 37 °C at
/// that time; the others at `t`.
fn vitals(
    seq: u64,
    t: i64,
    rr: f64,
    spo2_v: f64,
    pulse_v: f64,
    temp_at: Option<i64>,
) -> Vec<Reading> {
    let mut v = vec![
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
    ];
    if let Some(tt) = temp_at {
        v.push(numeric(seq + 4, codes::TEMP_BODY, units::DEGC, 37.0, tt));
    }
    v
}

async fn history(hub: &TestHub, query: &str) -> Vec<Value> {
    let (status, body) = call(
        hub,
        "GET",
        &format!("/api/v1/patients/{PATIENT}/scores/history{query}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["truncated"], false);
    body["points"].as_array().unwrap().clone()
}

async fn manual_inputs(hub: &TestHub) {
    let (status, body) = call(
        hub,
        "PUT",
        &format!("/api/v1/patients/{PATIENT}/manual-inputs"),
        Some(json!({ "consciousness": "alert", "supplemental_oxygen": false })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

fn rows_in_db(hub: &TestHub, kind: &str) -> i64 {
    hub.db()
        .query_row(
            "SELECT COUNT(*) FROM score_history WHERE patient_id = ?1 AND kind = ?2",
            [PATIENT, kind],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test]
async fn news2_from_low_to_high_is_charted_in_order_with_its_bands() {
    let hub = hub().await;
    // First reading: the patient is known, NEWS2 not computable yet.
    hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, now_us())]))
        .await;
    manual_inputs(&hub).await;
    let t = now_us();
    // RR 16, SpO2 97, SBP 120, pulse 80, 37 °C, alert, air: NEWS2 0.
    hub.ingest(&batch(2, DEVICE, vitals(10, t, 16.0, 97.0, 80.0, Some(t))))
        .await;
    // The same result again (new readings): not stored again this minute.
    hub.ingest(&batch(
        3,
        DEVICE,
        vitals(20, t + S, 16.0, 97.0, 80.0, Some(t + S)),
    ))
    .await;
    hub.ingest(&batch(
        4,
        DEVICE,
        vitals(30, t + 2 * S, 16.0, 97.0, 80.0, Some(t + 2 * S)),
    ))
    .await;
    // RR 26 (3): NEWS2 3, a 3 in one parameter.
    hub.ingest(&batch(
        5,
        DEVICE,
        vitals(40, t + 3 * S, 26.0, 97.0, 80.0, Some(t + 3 * S)),
    ))
    .await;
    // RR 26 (3), SpO2 91 (3), pulse 131 (3): NEWS2 9, high.
    hub.ingest(&batch(
        6,
        DEVICE,
        vitals(50, t + 4 * S, 26.0, 91.0, 131.0, Some(t + 4 * S)),
    ))
    .await;

    let points = history(&hub, "").await;
    let totals: Vec<Value> = points.iter().map(|p| p["total"].clone()).collect();
    assert_eq!(
        totals,
        vec![Value::Null, Value::Null, json!(0), json!(3), json!(9)],
        "{points:?}"
    );
    let bands: Vec<Value> = points.iter().map(|p| p["band"].clone()).collect();
    assert_eq!(
        bands,
        vec![
            Value::Null,
            Value::Null,
            json!("low"),
            json!("low-medium"),
            json!("high")
        ]
    );
    // The first: everything but SpO2 was missing (no manual inputs yet).
    assert_eq!(
        points[0]["missing"],
        json!([
            "consciousness",
            "pulse",
            "respiration_rate",
            "supplemental_oxygen",
            "systolic_bp",
            "temperature"
        ])
    );
    // The bedside entry was scored at once (no batch needed): still not
    // computable, but consciousness and oxygen are no longer missing.
    assert_eq!(
        points[1]["missing"],
        json!(["pulse", "respiration_rate", "systolic_bp", "temperature"])
    );
    assert_eq!(points[4]["missing"], json!([]));
    assert_eq!(points[4]["components"]["spo2"], 3);
    assert_eq!(points[4]["components"]["pulse"], 3);
    // Oldest first, strictly.
    let times: Vec<&str> = points.iter().map(|p| p["time"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted);
    // Exactly the five rows in the store: the two unchanged evaluations
    // wrote nothing.
    assert_eq!(rows_in_db(&hub, "news2"), 5);
    // qSOFA and MEWS from the same evaluations.
    let q = history(&hub, "?kind=qsofa").await;
    assert_eq!(q.last().unwrap()["total"], 1);
    assert_eq!(q.last().unwrap()["band"], "negative");
    let m = history(&hub, "?kind=mews").await;
    assert!(m.last().unwrap()["total"].as_i64().unwrap() >= 3, "{m:?}");

    // A window before the first row is empty; one ending now has them all.
    let old = history(&hub, "?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z").await;
    assert!(old.is_empty());

    // New confusion entered at the bedside (3 points): the history has the
    // new total at once, without waiting for the next batch.
    let (status, body) = call(
        &hub,
        "PUT",
        &format!("/api/v1/patients/{PATIENT}/manual-inputs"),
        Some(json!({ "consciousness": "new_confusion" })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let points = history(&hub, "").await;
    assert_eq!(points.last().unwrap()["total"], 12, "{points:?}");
    assert_eq!(points.last().unwrap()["components"]["consciousness"], 3);
    hub.stop().await;
}

#[tokio::test]
async fn a_stale_input_makes_a_null_total_that_names_it() {
    let hub = hub().await;
    let t = now_us();
    // Temperature 20 min old (freshness window 15 min), the rest fresh.
    hub.ingest(&batch(
        1,
        DEVICE,
        vitals(1, t, 16.0, 97.0, 80.0, Some(t - 1200 * S)),
    ))
    .await;
    manual_inputs(&hub).await;
    hub.ingest(&batch(2, DEVICE, vitals(10, t + S, 16.0, 97.0, 80.0, None)))
        .await;
    // A fresh temperature: NEWS2 computable.
    let t2 = now_us();
    hub.ingest(&batch(
        3,
        DEVICE,
        vitals(20, t2, 16.0, 97.0, 80.0, Some(t2)),
    ))
    .await;
    let points = history(&hub, "?kind=news2").await;
    assert_eq!(points.len(), 3, "{points:?}");
    assert_eq!(points[0]["total"], Value::Null);
    assert_eq!(
        points[0]["missing"],
        json!(["consciousness", "supplemental_oxygen", "temperature"])
    );
    assert_eq!(points[0]["stale"], json!(["temperature"]));
    assert_eq!(points[1]["total"], Value::Null);
    assert_eq!(points[1]["band"], Value::Null);
    assert_eq!(points[1]["components"], Value::Null);
    assert_eq!(points[1]["missing"], json!(["temperature"]));
    assert_eq!(points[1]["stale"], json!(["temperature"]));
    assert_eq!(points[2]["total"], 0);
    assert_eq!(points[2]["missing"], json!([]));
    hub.stop().await;
}

#[tokio::test]
async fn bad_queries_name_the_field() {
    let hub = hub().await;
    let path = format!("/api/v1/patients/{PATIENT}/scores/history");
    for (query, field) in [
        ("?kind=sofa", "kind"),
        ("?from=yesterday", "from"),
        ("?to=2026-13-01T00:00:00Z", "to"),
        ("?from=2026-11-24T10:00:00Z&to=2026-11-24T09:00:00Z", "from"),
        ("?from=2026-11-01T00:00:00Z&to=2026-11-24T00:00:00Z", "from"),
    ] {
        let (status, body) = call(&hub, "GET", &format!("{path}{query}"), None).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
    // Without credentials: 401.
    let (status, _) = call_json(&hub, None, "GET", &path, None).await;
    assert_eq!(status, 401);
    hub.stop().await;
}

/// Score history and alerts are separate after-ingest consumers: with the
/// alert engine off the history is still written, and `[scores] history =
/// false` writes none while the alerts keep running.
#[tokio::test]
async fn score_history_and_alerts_are_switched_on_their_own() {
    async fn with(extra: &str) -> TestHub {
        let data = tempfile::tempdir().unwrap();
        let mut hub = start_with_admin(data.path(), ADMIN, extra).await;
        hub.dir = data;
        hub
    }
    async fn feed(hub: &TestHub) {
        hub.ingest(&batch(1, DEVICE, vec![spo2(1, 97.0, now_us())]))
            .await;
        manual_inputs(hub).await;
        let t = now_us();
        // RR 26 (NEWS2 3 in one parameter): also an alert with alerts on.
        hub.ingest(&batch(2, DEVICE, vitals(10, t, 26.0, 97.0, 80.0, Some(t))))
            .await;
    }
    let alerts_off = with("[alerts]\nenabled = false\n").await;
    feed(&alerts_off).await;
    assert!(
        rows_in_db(&alerts_off, "news2") >= 1,
        "history without alerts"
    );
    let (status, _) = call(&alerts_off, "GET", "/api/v1/alerts", None).await;
    assert_ne!(status, 200, "the alert engine is off");
    alerts_off.stop().await;

    let history_off = with("[alerts]\ntick_ms = 100\n\n[scores]\nhistory = false\n").await;
    feed(&history_off).await;
    assert_eq!(rows_in_db(&history_off, "news2"), 0, "history switched off");
    let (status, body) = call(&history_off, "GET", "/api/v1/alerts", None).await;
    assert_eq!(status, 200, "{body}");
    // The NEWS2 alert comes from the scores computed after ingest, which
    // run for the alerts even with the history off.
    assert!(
        body["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["code"] == "news2-single-parameter-3")),
        "alerts still raised: {body}"
    );
    history_off.stop().await;
}

mod write_rule {
    //! The history's write rule and window over a real store.
    use cloud_hub::early_warning::{Input, InputValue, Parameter, ScoreReport, Source};
    use cloud_hub::score_history::{Kind, Point, history, record};
    use cloud_hub::scores::{self, Consciousness, News2Input, Spo2Scale};
    use cloud_hub::store::Store;

    use super::S;

    const T0: i64 = 1_795_514_400_000_000;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("h.sqlite")).unwrap();
        (dir, s)
    }

    fn report(at: i64, rr: Option<f64>) -> ScoreReport {
        let mut r = ScoreReport {
            patient: "p-1".into(),
            computed_at_us: at,
            freshness_s: 900,
            used: vec![],
            stale: vec![],
            missing: vec![],
            withheld: vec![],
            news2: None,
            qsofa: None,
            mews: None,
        };
        match rr {
            Some(rr) => {
                r.news2 = Some(scores::news2(&News2Input {
                    respiration_rate: rr,
                    spo2: 97.0,
                    spo2_scale: Spo2Scale::Scale1,
                    on_oxygen: false,
                    systolic_bp: 120.0,
                    pulse: 80.0,
                    consciousness: Consciousness::Alert,
                    temperature_c: 37.0,
                }));
                r.qsofa = Some(scores::qsofa(rr, 120.0, false));
                r.mews = Some(scores::mews(120.0, 80.0, rr, 37.0, Consciousness::Alert));
            }
            None => {
                // Respiration rate stale: none of the three scores.
                r.stale.push(Input {
                    parameter: Parameter::RespirationRate,
                    value: InputValue::Number(18.0),
                    effective_us: Some(at - 3600 * S),
                    source: Source::Observation("1".into()),
                });
                r.missing.push(Parameter::Consciousness);
            }
        }
        r
    }

    fn news2_rows(s: &Store) -> Vec<Point> {
        history(s, "p-1", Kind::News2, 0, i64::MAX).unwrap().0
    }

    #[test]
    fn unchanged_results_are_stored_at_most_once_a_minute() {
        let (_d, s) = store();
        assert_eq!(record(&s, &report(T0, Some(16.0))).unwrap(), 3);
        // Same result 1 s and 59 s later: nothing written.
        assert_eq!(record(&s, &report(T0 + S, Some(16.0))).unwrap(), 0);
        assert_eq!(record(&s, &report(T0 + 59 * S, Some(16.0))).unwrap(), 0);
        // A minute after the last row: written again.
        assert_eq!(record(&s, &report(T0 + 60 * S, Some(16.0))).unwrap(), 3);
        // A change is written at once (NEWS2 RR 26 → 3; qSOFA RR ≥ 22; MEWS).
        assert_eq!(record(&s, &report(T0 + 61 * S, Some(26.0))).unwrap(), 3);
        let rows = news2_rows(&s);
        let times: Vec<i64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(times, vec![T0, T0 + 60 * S, T0 + 61 * S]);
        assert_eq!(rows[0].1.total, Some(0));
        assert_eq!(rows[0].1.band.as_deref(), Some("low"));
        assert_eq!(rows[2].1.total, Some(3));
        assert_eq!(rows[2].1.band.as_deref(), Some("low-medium"));
        assert_eq!(
            rows[2].1.components.as_ref().unwrap()["respiration_rate"],
            3
        );
        let q = history(&s, "p-1", Kind::Qsofa, 0, i64::MAX).unwrap().0;
        assert_eq!(q.last().unwrap().1.total, Some(1));
        assert_eq!(q.last().unwrap().1.band.as_deref(), Some("negative"));
    }

    #[test]
    fn a_score_that_cannot_be_computed_is_null_with_its_missing_inputs() {
        let (_d, s) = store();
        record(&s, &report(T0, Some(16.0))).unwrap();
        record(&s, &report(T0 + S, None)).unwrap();
        // Unchanged (still not computable) 10 s later: nothing new.
        assert_eq!(record(&s, &report(T0 + 11 * S, None)).unwrap(), 0);
        let rows = news2_rows(&s);
        assert_eq!(rows.len(), 2);
        let e = &rows[1].1;
        assert_eq!(e.total, None);
        assert_eq!(e.band, None);
        assert_eq!(e.components, None);
        assert_eq!(e.missing, vec!["consciousness", "respiration_rate"]);
        assert_eq!(e.stale, vec!["respiration_rate"]);
        // MEWS needs both too; qSOFA lists only its own inputs.
        let m = history(&s, "p-1", Kind::Mews, 0, i64::MAX).unwrap().0;
        assert_eq!(m[1].1.total, None);
        assert_eq!(m[1].1.missing, vec!["consciousness", "respiration_rate"]);
    }

    #[test]
    fn history_is_windowed_oldest_first_and_per_patient() {
        let (_d, s) = store();
        for i in 0..5 {
            record(&s, &report(T0 + i * 60 * S, Some(16.0 + i as f64))).unwrap();
        }
        let mut other = report(T0, Some(30.0));
        other.patient = "p-2".into();
        record(&s, &other).unwrap();
        let (rows, truncated) = history(&s, "p-1", Kind::News2, T0 + 60 * S, T0 + 240 * S).unwrap();
        assert!(!truncated);
        let times: Vec<i64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(times, vec![T0 + 60 * S, T0 + 120 * S, T0 + 180 * S]);
        assert_eq!(
            history(&s, "p-2", Kind::News2, 0, i64::MAX)
                .unwrap()
                .0
                .len(),
            1
        );
        assert!(Kind::parse("sofa").is_none());
        // Retention purges rows by evaluation time, like the observations.
        let purged = s.purge_before(T0 + 120 * S).unwrap();
        assert_eq!(purged.scores, 2 * 3 + 3);
        let left: Vec<i64> = news2_rows(&s).iter().map(|r| r.0).collect();
        assert_eq!(left, vec![T0 + 120 * S, T0 + 180 * S, T0 + 240 * S]);
        assert_eq!(Kind::parse("mews"), Some(Kind::Mews));
    }
}
