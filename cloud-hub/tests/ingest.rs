//! Ingest endpoint over HTTP: acks, dedup, auth, errors, rejections.

use crate::common;

use common::*;
use prost::Message;
use shared_protocol::v1::{Batch, DeviceData, RejectReason, Waveform, reading};
use shared_protocol::{CONTENT_TYPE_PROTOBUF, EPOCH_2000_US};

#[tokio::test]
async fn batch_ack_and_deduplication() {
    let hub = TestHub::start().await;
    let mut b = batch(
        1,
        DEVICE,
        vec![
            spo2(1, 98.0, T0),
            pulse(2, 72.0, T0),
            spo2(3, 97.0, T0 + MINUTE),
        ],
    );
    b.devices[0].waveforms.push(Waveform {
        mdc_code: 150_452,
        start_time_us: T0,
        sample_period_us: 16_000,
        scale: 1.0,
        samples: vec![1, -2, 3],
        sequence: 4,
        ..Default::default()
    });
    let ack = hub.ingest(&b).await;
    assert_eq!(
        (ack.sequence, ack.accepted, ack.duplicates, ack.rejected),
        (1, 4, 0, 0)
    );
    assert!(!ack.duplicate_batch);

    // Same batch again: the stored ack, flagged.
    let again = hub.ingest(&b).await;
    assert!(again.duplicate_batch);
    assert_eq!((again.accepted, again.duplicates), (4, 0));

    // Same readings under a new batch sequence (agent crash + resend).
    let mut resent = b.clone();
    resent.sequence = 2;
    resent.devices[0]
        .readings
        .push(spo2(5, 96.0, T0 + 2 * MINUTE));
    let ack = hub.ingest(&resent).await;
    assert_eq!((ack.accepted, ack.duplicates, ack.rejected), (1, 4, 0));
    assert!(!ack.duplicate_batch);

    let db = hub.db();
    let n: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM observations WHERE kind = 'reading'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 4);
    let n: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM observations WHERE kind = 'waveform'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
    let n: i64 = db
        .query_row("SELECT COUNT(*) FROM batches", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    let (model, location): (String, String) = db
        .query_row(
            "SELECT model, location FROM devices WHERE device_id = ?1",
            [DEVICE],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (model.as_str(), location.as_str()),
        ("Radical-7", "ICU-3/bed-07")
    );

    let (status, bundle) = hub.get_json("/fhir/Observation?patient=patient-1").await;
    assert_eq!(status, 200);
    // Four readings and the waveform (as SampledData).
    assert_eq!(bundle["total"], 5);
    hub.stop().await;
}

async fn error_of(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json_or_panic().await;
    (status, v["error"].as_str().unwrap().to_owned())
}

trait JsonOrPanic {
    async fn json_or_panic(self) -> serde_json::Value;
}

impl JsonOrPanic for reqwest::Response {
    async fn json_or_panic(self) -> serde_json::Value {
        let text = self.text().await.unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

#[tokio::test]
async fn request_errors_have_the_right_status() {
    let hub = TestHub::start().await;
    let body = batch(1, DEVICE, vec![spo2(1, 98.0, T0)]).encode_to_vec();

    let (s, msg) = error_of(
        hub.post_raw(None, CONTENT_TYPE_PROTOBUF, body.clone())
            .await,
    )
    .await;
    assert_eq!(s, 401);
    assert!(msg.contains("token"), "{msg}");
    let wrong = format!("vgt_{}", "0".repeat(64));
    let (s, _) = error_of(
        hub.post_raw(Some(&wrong), CONTENT_TYPE_PROTOBUF, body.clone())
            .await,
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = error_of(
        hub.post_raw(Some("garbage"), CONTENT_TYPE_PROTOBUF, body.clone())
            .await,
    )
    .await;
    assert_eq!(s, 401);

    // Revoked gateway.
    let token2 = cloud_hub::gateway_add(&hub.config, "gw-2").unwrap();
    cloud_hub::gateway_revoke(&hub.config, "gw-2").unwrap();
    let mut b2 = batch(1, DEVICE, vec![spo2(1, 98.0, T0)]);
    b2.gateway_id = "gw-2".into();
    let (s, _) = error_of(
        hub.post_raw(Some(&token2), CONTENT_TYPE_PROTOBUF, b2.encode_to_vec())
            .await,
    )
    .await;
    assert_eq!(s, 401);

    // A valid token of another gateway than the batch claims.
    let token3 = cloud_hub::gateway_add(&hub.config, "gw-3").unwrap();
    let (s, msg) = error_of(
        hub.post_raw(Some(&token3), CONTENT_TYPE_PROTOBUF, body.clone())
            .await,
    )
    .await;
    assert_eq!(s, 403);
    assert!(msg.contains("gateway_id"), "{msg}");

    let (s, msg) = error_of(
        hub.post_raw(Some(&hub.token), "application/json", body.clone())
            .await,
    )
    .await;
    assert_eq!(s, 415);
    assert!(msg.contains(CONTENT_TYPE_PROTOBUF), "{msg}");

    let (s, msg) = error_of(
        hub.post_raw(Some(&hub.token), CONTENT_TYPE_PROTOBUF, vec![0xff; 16])
            .await,
    )
    .await;
    assert_eq!(s, 400);
    assert!(msg.contains("Batch"), "{msg}");

    // max_body_bytes is 65536 in the test config.
    let (s, _) = error_of(
        hub.post_raw(Some(&hub.token), CONTENT_TYPE_PROTOBUF, vec![0; 70_000])
            .await,
    )
    .await;
    assert_eq!(s, 413);

    // Nothing was stored by any of these.
    let n: i64 = hub
        .db()
        .query_row("SELECT COUNT(*) FROM batches", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);

    let metrics = hub.metrics().await;
    for line in [
        "vigil_hub_ingest_errors_total{kind=\"unauthorized\"} 4",
        "vigil_hub_ingest_errors_total{kind=\"forbidden\"} 1",
        "vigil_hub_ingest_errors_total{kind=\"unsupported_media_type\"} 1",
        "vigil_hub_ingest_errors_total{kind=\"malformed\"} 1",
        "vigil_hub_ingest_errors_total{kind=\"too_large\"} 1",
        "vigil_hub_ingest_batches_total{outcome=\"rejected\"} 8",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    hub.stop().await;
}

#[tokio::test]
async fn invalid_readings_are_rejected_and_kept() {
    let hub = TestHub::start().await;
    let mut unknown = spo2(1, 98.0, T0);
    unknown.mdc_code = 123;
    let nan = spo2(2, f64::NAN, T0);
    let old = spo2(3, 98.0, EPOCH_2000_US - 1);
    let future = spo2(4, 98.0, now_us() + 25 * 3600 * 1_000_000);
    let mut wrong_unit = spo2(5, 98.0, T0);
    wrong_unit.ucum_unit = "/min".into();
    wrong_unit.mdc_unit = 0;
    let good = spo2(6, 98.0, T0);
    let mut b = batch(1, DEVICE, vec![unknown, nan, old, future, wrong_unit, good]);
    b.devices.push(DeviceData {
        device: None,
        readings: vec![spo2(1, 97.0, T0)],
        waveforms: vec![],
        technical: vec![],
    });

    let ack = hub.ingest(&b).await;
    assert_eq!((ack.accepted, ack.duplicates, ack.rejected), (1, 0, 6));
    let reasons: Vec<(u64, RejectReason)> = ack
        .rejections
        .iter()
        .map(|r| (r.sequence, RejectReason::try_from(r.reason).unwrap()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (1, RejectReason::UnknownMetric),
            (2, RejectReason::Malformed),
            (3, RejectReason::ImpossibleTime),
            (4, RejectReason::ImpossibleTime),
            (5, RejectReason::Malformed),
            (1, RejectReason::MissingDevice),
        ]
    );
    assert!(ack.rejections.iter().all(|r| !r.detail.is_empty()));
    assert_eq!(ack.rejections[5].device_id, "");

    let db = hub.db();
    let mut stmt = db
        .prepare("SELECT device_id, sequence, reason, raw FROM rejected_readings ORDER BY id")
        .unwrap();
    let rows: Vec<(String, i64, String, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[0].2, "REJECT_REASON_UNKNOWN_METRIC");
    assert_eq!(rows[5].2, "REJECT_REASON_MISSING_DEVICE");
    // The raw reading is kept and decodes back.
    let raw = shared_protocol::v1::Reading::decode(rows[1].3.as_slice()).unwrap();
    assert!(matches!(raw.value, Some(reading::Value::Numeric(v)) if v.is_nan()));

    let metrics = hub.metrics().await;
    for line in [
        "vigil_hub_readings_rejected_total{reason=\"unknown_metric\"} 1",
        "vigil_hub_readings_rejected_total{reason=\"malformed\"} 2",
        "vigil_hub_readings_rejected_total{reason=\"impossible_time\"} 2",
        "vigil_hub_readings_rejected_total{reason=\"missing_device\"} 1",
        "vigil_hub_ingest_readings_total{outcome=\"accepted\"} 1",
        "vigil_hub_ingest_readings_total{outcome=\"rejected\"} 6",
        "vigil_hub_ingest_batches_total{outcome=\"accepted\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    hub.stop().await;
}

#[tokio::test]
async fn out_of_range_value_is_stored_flagged() {
    let hub = TestHub::start().await;
    let ack = hub
        .ingest(&batch(1, DEVICE, vec![spo2(1, 140.0, T0)]))
        .await;
    assert_eq!((ack.accepted, ack.rejected), (1, 0));
    let id = cloud_hub::fhir::observation_id(GATEWAY, DEVICE, 1);
    let (status, obs) = hub.get_json(&format!("/fhir/Observation/{id}")).await;
    assert_eq!(status, 200);
    assert!(obs.get("valueQuantity").is_none(), "{obs}");
    assert_eq!(obs["dataAbsentReason"]["coding"][0]["code"], "error");
    let quality = obs["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == cloud_hub::fhir::QUALITY_EXT)
        .unwrap();
    let subs = quality["extension"].as_array().unwrap();
    assert!(subs.contains(&serde_json::json!({ "url": "raw-value", "valueDecimal": 140.0 })));
    assert!(subs.contains(&serde_json::json!({ "url": "out-of-range", "valueBoolean": true })));
    let value: Option<f64> = hub
        .db()
        .query_row("SELECT value FROM observations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(value, None);
    hub.stop().await;
}

#[tokio::test]
async fn batch_of_an_unassociated_device_is_stored_without_subject() {
    let hub = TestHub::start().await;
    hub.ingest(&batch(1, "other-dev", vec![spo2(1, 95.0, T0)]))
        .await;
    let id = cloud_hub::fhir::observation_id(GATEWAY, "other-dev", 1);
    let (status, obs) = hub.get_json(&format!("/fhir/Observation/{id}")).await;
    assert_eq!(status, 200);
    assert!(obs.get("subject").is_none());
    assert_eq!(obs["device"]["identifier"]["value"], "other-dev");
    let (_, bundle) = hub.get_json("/fhir/Observation?patient=patient-1").await;
    assert_eq!(bundle["total"], 0);
    let (_, bundle) = hub.get_json("/fhir/Observation?code=59408-5").await;
    assert_eq!(bundle["total"], 1);
    hub.stop().await;
}

#[tokio::test]
async fn empty_batch_is_acked() {
    let hub = TestHub::start().await;
    let b = Batch {
        gateway_id: GATEWAY.into(),
        sequence: 9,
        ..Default::default()
    };
    let ack = hub.ingest(&b).await;
    assert_eq!((ack.sequence, ack.accepted), (9, 0));
    hub.stop().await;
}

#[tokio::test]
async fn technical_readings_are_counted_stored_once_and_validated() {
    use shared_protocol::v1::{TechnicalKind, TechnicalReading};
    let hub = TestHub::start().await;
    let mut b = batch(1, DEVICE, vec![spo2(1, 98.0, T0)]);
    let tech = |seq: u64, kind: TechnicalKind| TechnicalReading {
        kind: kind as i32,
        time_us: T0,
        detail: "no data for 5 s".into(),
        sequence: seq,
    };
    b.devices[0].technical = vec![
        tech(2, TechnicalKind::Connected),
        tech(3, TechnicalKind::Silent),
        tech(4, TechnicalKind::Unspecified),
    ];
    let ack = hub.ingest(&b).await;
    // The reading and two events stored; the unspecified kind refused.
    assert_eq!((ack.accepted, ack.duplicates, ack.rejected), (3, 0, 1));
    assert_eq!(ack.rejections[0].sequence, 4);
    assert_eq!(ack.rejections[0].reason, RejectReason::Malformed as i32);

    let mut resent = b.clone();
    resent.sequence = 2;
    resent.devices[0].technical.truncate(2);
    let ack = hub.ingest(&resent).await;
    assert_eq!((ack.accepted, ack.duplicates, ack.rejected), (0, 3, 0));

    let db = hub.db();
    let kinds: Vec<String> = db
        .prepare("SELECT kind FROM device_events ORDER BY sequence")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(kinds, vec!["connected", "silent"]);
    hub.stop().await;
}

#[tokio::test]
async fn alternative_units_keep_their_unit_and_their_own_loinc() {
    use shared_protocol::catalogue::{codes, units};
    use shared_protocol::v1::Reading;
    let hub = TestHub::start().await;
    let etco2 = |seq: u64, v: f64, unit: shared_protocol::Unit| Reading {
        mdc_code: codes::CONC_AWAY_CO2_ET,
        value: Some(reading::Value::Numeric(v)),
        mdc_unit: unit.mdc,
        ucum_unit: unit.ucum.into(),
        device_time_us: T0,
        validity: 1,
        sequence: seq,
        ..Default::default()
    };
    let b = batch(
        1,
        DEVICE,
        vec![
            etco2(1, 5.1, units::PERCENT),
            etco2(2, 38.0, units::MMHG),
            etco2(3, 5.0, units::DEGC),
        ],
    );
    let ack = hub.ingest(&b).await;
    assert_eq!(
        (ack.accepted, ack.rejected),
        (2, 1),
        "°C is not a unit of EtCO2"
    );
    assert_eq!(ack.rejections[0].sequence, 3);

    let (_, pct) = hub
        .get_json("/fhir/Observation?patient=patient-1&code=http://loinc.org%7C19888-7")
        .await;
    assert_eq!(pct["total"], 1);
    let r = &pct["entry"][0]["resource"];
    assert_eq!(r["code"]["coding"][0]["code"], "19888-7");
    assert_eq!(
        r["valueQuantity"]["value"], 5.1,
        "stored as sent, not converted"
    );
    assert_eq!(r["valueQuantity"]["code"], "%");

    let (_, pp) = hub
        .get_json("/fhir/Observation?patient=patient-1&code=http://loinc.org%7C19891-1")
        .await;
    assert_eq!(pp["total"], 1);
    assert_eq!(
        pp["entry"][0]["resource"]["valueQuantity"]["code"],
        "mm[Hg]"
    );
    // By MDC code, both units.
    let (_, all) = hub
        .get_json("/fhir/Observation?patient=patient-1&code=urn:iso:std:iso:11073:10101%7C151708")
        .await;
    assert_eq!(all["total"], 2);
    hub.stop().await;
}
