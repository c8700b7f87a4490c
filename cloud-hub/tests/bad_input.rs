//! Every kind of bad input gets a clear, counted outcome: a malformed
//! protobuf body is refused (400, counted); unknown metrics and impossible
//! times are rejected with their reason in the `BatchAck` (counted by
//! reason, raw reading kept); physically impossible values are stored with
//! the out-of-range quality flag, value withheld (counted). A re-sent batch
//! is answered with the first processing's counts and not counted again.

use crate::common;

use common::{DEVICE, GATEWAY, TestHub, batch, now_us, pulse, spo2};
use prost::Message;
use shared_protocol::v1::RejectReason;
use shared_protocol::{CONTENT_TYPE_PROTOBUF, EPOCH_2000_US};

async fn metrics(hub: &TestHub) -> String {
    hub.metrics().await
}

fn assert_metrics(text: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            text.lines().any(|l| l == *line),
            "missing {line} in\n{text}"
        );
    }
}

#[tokio::test]
async fn each_kind_of_bad_input_has_a_counted_outcome() {
    let hub = TestHub::start().await;
    let t = now_us() - 60_000_000;

    // 1. A truncated protobuf body: 400, counted, nothing stored.
    let whole = batch(1, DEVICE, vec![spo2(1, 97.0, t)]).encode_to_vec();
    let r = hub
        .post_raw(
            Some(&hub.token),
            CONTENT_TYPE_PROTOBUF,
            whole[..whole.len() - 3].to_vec(),
        )
        .await;
    assert_eq!(r.status(), 400);
    let n: i64 = hub
        .db()
        .query_row("SELECT COUNT(*) FROM batches", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);

    // 2-4. One batch: unknown metric, far future, before 2000, impossible
    // values (negative SpO2, SpO2 over 100 %, pulse 1000/min), one good.
    let mut unknown = spo2(1, 97.0, t);
    unknown.mdc_code = 4_242;
    let mut future = spo2(2, 97.0, 0);
    future.device_time_us = now_us() + 48 * 3600 * 1_000_000;
    future.gateway_time_us = future.device_time_us;
    let mut ancient = spo2(3, 97.0, 0);
    ancient.device_time_us = EPOCH_2000_US - 1;
    ancient.gateway_time_us = EPOCH_2000_US - 1;
    let readings = vec![
        unknown,
        future,
        ancient,
        spo2(4, -5.0, t),
        spo2(5, 140.0, t),
        pulse(6, 1000.0, t),
        spo2(7, 97.0, t),
    ];
    let b = batch(2, DEVICE, readings);
    let ack = hub.ingest(&b).await;
    assert_eq!((ack.accepted, ack.duplicates, ack.rejected), (4, 0, 3));
    let reasons: Vec<(u64, RejectReason)> = ack
        .rejections
        .iter()
        .map(|r| (r.sequence, RejectReason::try_from(r.reason).unwrap()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (1, RejectReason::UnknownMetric),
            (2, RejectReason::ImpossibleTime),
            (3, RejectReason::ImpossibleTime),
        ]
    );
    for r in &ack.rejections {
        assert!(!r.detail.is_empty(), "a reason detail for {}", r.sequence);
    }
    // Impossible values are stored flagged, their value withheld.
    for seq in [4, 5, 6] {
        let id = cloud_hub::fhir::observation_id(GATEWAY, DEVICE, seq);
        let (status, obs) = hub.get_json(&format!("/fhir/Observation/{id}")).await;
        assert_eq!(status, 200, "{seq}");
        assert!(obs.get("valueQuantity").is_none(), "{obs}");
        let quality = obs["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["url"] == cloud_hub::fhir::QUALITY_EXT)
            .unwrap_or_else(|| panic!("quality extension on {seq}: {obs}"));
        assert!(
            quality["extension"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!({ "url": "out-of-range", "valueBoolean": true })),
            "{obs}"
        );
    }
    let id = cloud_hub::fhir::observation_id(GATEWAY, DEVICE, 7);
    let (_, good) = hub.get_json(&format!("/fhir/Observation/{id}")).await;
    assert_eq!(good["valueQuantity"]["value"], 97.0);

    let expected = [
        "vigil_hub_ingest_errors_total{kind=\"malformed\"} 1",
        "vigil_hub_readings_rejected_total{reason=\"unknown_metric\"} 1",
        "vigil_hub_readings_rejected_total{reason=\"impossible_time\"} 2",
        "vigil_hub_readings_out_of_range_total 3",
        "vigil_hub_ingest_readings_total{outcome=\"accepted\"} 4",
        "vigil_hub_ingest_readings_total{outcome=\"rejected\"} 3",
        "vigil_hub_ingest_batches_total{outcome=\"accepted\"} 1",
        "vigil_hub_ingest_batches_total{outcome=\"rejected\"} 1",
    ];
    assert_metrics(&metrics(&hub).await, &expected);

    // The same batch again: the first processing's ack, nothing counted twice.
    let again = hub.ingest(&b).await;
    assert!(again.duplicate_batch);
    assert_eq!(
        (again.accepted, again.rejected, again.rejections.len()),
        (4, 3, 3)
    );
    let text = metrics(&hub).await;
    assert_metrics(
        &text,
        &[
            "vigil_hub_readings_out_of_range_total 3",
            "vigil_hub_readings_rejected_total{reason=\"impossible_time\"} 2",
            "vigil_hub_ingest_batches_total{outcome=\"duplicate\"} 1",
        ],
    );
    hub.stop().await;
}
