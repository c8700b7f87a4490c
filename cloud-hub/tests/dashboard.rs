//! The dashboard's gateway view (`GET /api/v1/gateways`) over a real
//! store: counts per gateway and device in the last 24 h. (The assets and
//! their headers: the unit tests of `hub_transport::dashboard`.)

use cloud_hub::dashboard::gateways;
use cloud_hub::store::{Store, now_us};
use serde_json::json;
use shared_protocol::catalogue::codes;
use shared_protocol::v1::{
    Batch, DeviceData, DeviceInfo, Reading, TechnicalKind, TechnicalReading, reading,
};

/// The view's window (24 h).
const WINDOW_US: i64 = 24 * 3600 * 1_000_000;

#[test]
fn gateways_view_counts_batches_duplicates_rejections_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("hub.sqlite")).unwrap();
    store.add_gateway("gw-1", "h1").unwrap();
    store.add_gateway("gw-idle", "h2").unwrap();
    let now = now_us();
    let reading = |seq, code| Reading {
        mdc_code: code,
        value: Some(reading::Value::Numeric(97.0)),
        ucum_unit: "%".into(),
        device_time_us: now - 5_000_000,
        validity: 1,
        sequence: seq,
        ..Default::default()
    };
    let batch = |seq, readings, technical, events| Batch {
        gateway_id: "gw-1".into(),
        sequence: seq,
        created_time_us: now - 1_000_000,
        agent_version: "9.9.9".into(),
        devices: vec![DeviceData {
            device: Some(DeviceInfo {
                device_id: "ox-1".into(),
                ..Default::default()
            }),
            readings,
            waveforms: vec![],
            technical,
        }],
        gateway_events: events,
        ..Default::default()
    };
    let assoc = Default::default();
    store
        .ingest(
            "gw-1",
            &batch(
                1,
                vec![
                    reading(1, codes::PULS_OXIM_SAT_O2),
                    reading(2, codes::PULS_OXIM_SAT_O2),
                ],
                vec![TechnicalReading {
                    kind: TechnicalKind::Connected as i32,
                    time_us: now - 6_000_000,
                    detail: String::new(),
                    sequence: 3,
                }],
                vec![],
            ),
            &assoc,
            now,
            now,
        )
        .unwrap();
    // Batch 2 re-sends reading 2 (a duplicate), brings an unknown
    // metric (rejected) and a buffer overflow event.
    store
        .ingest(
            "gw-1",
            &batch(
                2,
                vec![reading(2, codes::PULS_OXIM_SAT_O2), reading(4, 999_999)],
                vec![],
                vec![TechnicalReading {
                    kind: TechnicalKind::BufferOverflow as i32,
                    time_us: now - 2_000_000,
                    detail: "dropped 12 oldest readings".into(),
                    sequence: 1,
                }],
            ),
            &assoc,
            now + 1,
            now + 1,
        )
        .unwrap();
    let g = gateways(&store, now + 3_000_000).unwrap();
    assert_eq!(g.len(), 2);
    let gw = &g[0];
    assert_eq!(gw["id"], "gw-1");
    assert_eq!(gw["last_batch"]["sequence"], 2);
    assert_eq!(gw["last_batch"]["agent_version"], "9.9.9");
    assert_eq!(gw["last_seen_age_s"], 2);
    assert_eq!(
        gw["last_24h"],
        json!({ "batches": 2, "accepted": 3, "duplicates": 1, "rejected": 1 })
    );
    assert_eq!(gw["rejected_total"], 1);
    assert_eq!(gw["buffer_overflows"]["count"], 1);
    assert_eq!(
        gw["buffer_overflows"]["last"]["detail"],
        "dropped 12 oldest readings"
    );
    let dev = &gw["devices"][0];
    assert_eq!(dev["id"], "ox-1");
    assert_eq!(dev["last_reading"]["age_s"], 8);
    assert_eq!(dev["last_link_event"]["kind"], "connected");
    assert_eq!(dev["rejected_total"], 1);
    let idle = &g[1];
    assert_eq!(idle["id"], "gw-idle");
    assert!(idle["last_seen"].is_null() && idle["last_batch"].is_null());
    assert_eq!(idle["devices"], json!([]));
    // Batches older than the window are not counted, but still name
    // the last batch.
    let later = gateways(&store, now + WINDOW_US + 10_000_000).unwrap();
    assert_eq!(later[0]["last_24h"]["batches"], 0);
    assert_eq!(later[0]["last_batch"]["sequence"], 2);
}
