//! `[ingest] rate_limit_batches_per_s` / `burst`: a token bucket per
//! authenticated gateway. Over the limit: 429 with an integer `Retry-After`
//! (what the agent waits), counted in /metrics; after waiting that long the
//! batch is accepted. Other gateways are not affected.

use crate::common;

use common::{DEVICE, TestHub, batch, now_us, spo2};
use prost::Message;
use shared_protocol::CONTENT_TYPE_PROTOBUF;
use shared_protocol::v1::BatchAck;

async fn metrics(hub: &TestHub) -> String {
    hub.metrics().await
}

#[tokio::test]
async fn over_the_limit_gets_429_with_retry_after_then_is_accepted() {
    let hub = TestHub::start_with("[ingest]\nrate_limit_batches_per_s = 1.0\nburst = 2\n").await;
    let t = now_us() - 1_000_000;
    let body = |seq: u64| batch(seq, DEVICE, vec![spo2(seq, 97.0, t)]).encode_to_vec();

    // The burst passes.
    for seq in 1..=2 {
        let r = hub
            .post_raw(Some(&hub.token), CONTENT_TYPE_PROTOBUF, body(seq))
            .await;
        assert_eq!(r.status(), 200, "batch {seq}");
    }
    // The next one is over the limit.
    let r = hub
        .post_raw(Some(&hub.token), CONTENT_TYPE_PROTOBUF, body(3))
        .await;
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is an integer number of seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let text = metrics(&hub).await;
    assert!(
        text.contains("vigil_hub_ingest_errors_total{kind=\"rate_limited\"} 1"),
        "{text}"
    );

    // Another gateway has its own bucket.
    let other = cloud_hub::gateway_add(&hub.config, "gw-2").unwrap();
    let mut b = batch(1, DEVICE, vec![spo2(1, 97.0, t)]);
    b.gateway_id = "gw-2".into();
    let r = hub
        .post_raw(Some(&other), CONTENT_TYPE_PROTOBUF, b.encode_to_vec())
        .await;
    assert_eq!(r.status(), 200);

    // After waiting as told, the refused batch is accepted and stored.
    tokio::time::sleep(std::time::Duration::from_secs(retry_after)).await;
    let r = hub
        .post_raw(Some(&hub.token), CONTENT_TYPE_PROTOBUF, body(3))
        .await;
    assert_eq!(r.status(), 200);
    let ack = BatchAck::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        (ack.sequence, ack.accepted, ack.duplicate_batch),
        (3, 1, false)
    );
    hub.stop().await;
}

#[tokio::test]
async fn without_a_limit_bursts_pass() {
    let hub = TestHub::start().await;
    let t = now_us() - 1_000_000;
    for seq in 1..=20 {
        let ack = hub
            .ingest(&batch(seq, DEVICE, vec![spo2(seq, 97.0, t)]))
            .await;
        assert_eq!(ack.accepted, 1);
    }
    let text = metrics(&hub).await;
    assert!(
        text.contains("vigil_hub_ingest_errors_total{kind=\"rate_limited\"} 0"),
        "{text}"
    );
    hub.stop().await;
}
