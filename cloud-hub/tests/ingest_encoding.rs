//! Ingest bodies with a content coding: zstd accepted (the limit applies to
//! the decompressed size), a zip bomb refused with 413 and counted, unknown
//! codings refused with 415 naming what is accepted.

use crate::common;

use common::*;
use prost::Message;
use shared_protocol::v1::BatchAck;
use shared_protocol::{CONTENT_TYPE_PROTOBUF, INGEST_PATH};

async fn post(hub: &TestHub, encoding: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut req = hub
        .client
        .post(hub.url(INGEST_PATH))
        .header("content-type", CONTENT_TYPE_PROTOBUF)
        .bearer_auth(&hub.token)
        .body(body);
    if let Some(e) = encoding {
        req = req.header("content-encoding", e);
    }
    req.send().await.unwrap()
}

async fn error_count(hub: &TestHub, kind: &str) -> u64 {
    let text = hub.metrics().await;
    let key = format!("vigil_hub_ingest_errors_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn zstd_bodies_are_accepted_and_decompressed_size_is_capped() {
    let hub = TestHub::start().await; // max_body_bytes = 65536
    let readings: Vec<_> = (1..=200)
        .map(|i| spo2(i, 95.0 + (i % 4) as f64, T0 + i as i64 * MINUTE))
        .collect();
    let b = batch(1, DEVICE, readings);
    let plain = b.encode_to_vec();
    let z = zstd::bulk::compress(&plain, 3).unwrap();
    assert!(z.len() < plain.len() / 2, "{} vs {}", z.len(), plain.len());
    let resp = post(&hub, Some("zstd"), z).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let ack = BatchAck::decode(resp.bytes().await.unwrap()).unwrap();
    assert_eq!((ack.sequence, ack.accepted), (1, 200));
    let (_, bundle) = hub
        .get_json(&format!("/fhir/Observation?patient={PATIENT}&_count=0"))
        .await;
    assert_eq!(bundle["total"], 200);

    // Explicit identity is the plain path.
    let b2 = batch(2, DEVICE, vec![spo2(201, 97.0, T0)]);
    let resp = post(&hub, Some("identity"), b2.encode_to_vec()).await;
    assert_eq!(resp.status(), 200);

    // Compressed well under the limit, decompressed just over it: 413.
    let big = vec![7u8; 65_537];
    let resp = post(&hub, Some("zstd"), zstd::bulk::compress(&big, 3).unwrap()).await;
    assert_eq!(resp.status(), 413);
    // Exactly at the limit passes the size check (and is then not a Batch).
    let at = vec![0u8; 65_536];
    let resp = post(&hub, Some("zstd"), zstd::bulk::compress(&at, 3).unwrap()).await;
    assert_eq!(resp.status(), 400);

    // Not zstd at all.
    let resp = post(&hub, Some("zstd"), b"definitely not zstd".to_vec()).await;
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("zstd"));
    hub.stop().await;
}

#[tokio::test]
async fn a_zip_bomb_gets_413_and_is_counted() {
    let hub = TestHub::start().await;
    // 512 MiB of zeros streamed into a frame without a content size.
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..512 {
        std::io::Write::write_all(&mut enc, &chunk).unwrap();
    }
    let bomb = enc.finish().unwrap();
    assert!(bomb.len() < 65_536, "the bomb itself fits the body limit");
    let before = error_count(&hub, "too_large").await;
    let resp = post(&hub, Some("zstd"), bomb).await;
    assert_eq!(resp.status(), 413);
    assert!(resp.text().await.unwrap().contains("decompressed"));
    assert_eq!(error_count(&hub, "too_large").await, before + 1);
    // The hub is unharmed and still ingests.
    let resp = post(
        &hub,
        None,
        batch(1, DEVICE, vec![spo2(1, 97.0, T0)]).encode_to_vec(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    hub.stop().await;
}

#[tokio::test]
async fn unknown_content_codings_get_415_with_accept_encoding() {
    let hub = TestHub::start().await;
    let body = batch(1, DEVICE, vec![spo2(1, 97.0, T0)]).encode_to_vec();
    for coding in ["gzip", "br", "zstd, gzip", "x-custom"] {
        let before = error_count(&hub, "unsupported_media_type").await;
        let resp = post(&hub, Some(coding), body.clone()).await;
        assert_eq!(resp.status(), 415, "{coding}");
        assert_eq!(resp.headers()["accept-encoding"], "zstd, identity");
        assert!(resp.text().await.unwrap().contains("Content-Encoding"));
        assert_eq!(
            error_count(&hub, "unsupported_media_type").await,
            before + 1
        );
    }
    // Nothing of those was stored.
    let (_, bundle) = hub
        .get_json(&format!("/fhir/Observation?patient={PATIENT}&_count=0"))
        .await;
    assert_eq!(bundle["total"], 0);
    hub.stop().await;
}
