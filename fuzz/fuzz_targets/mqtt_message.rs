//! The hub's MQTT ingest decoder on an untrusted topic and payload: the
//! topic parse (`devices/{gateway}/messages/events/{property bag}`, URL
//! encoding, `$.ce`/`$.ct`) and the body decoding (content coding under a
//! size cap, protobuf `Batch`, gateway match). Any input must give a value
//! or a drop reason, never a panic; an accepted batch belongs to the
//! topic's gateway.
#![no_main]
use cloud_hub::mqtt_ingest::{decode_message, parse_topic};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    // Topic length from the first byte; every other input keeps the
    // well-formed prefix so the property bag and the body are reached.
    let n = usize::from(head >> 1).min(rest.len());
    let (topic, payload) = rest.split_at(n);
    let topic = String::from_utf8_lossy(topic);
    let topic = if head & 1 == 1 {
        format!("devices/gw-1/messages/events/{topic}")
    } else {
        topic.into_owned()
    };
    let Ok(info) = parse_topic(&topic) else {
        return;
    };
    if let Ok(batch) = decode_message(&info, bytes::Bytes::copy_from_slice(payload), MAX) {
        assert_eq!(batch.gateway_id, info.gateway_id);
    }
});
