//! A Kafka record as Azure IoT Hub message routing writes a device's
//! message to an Event Hubs endpoint (read through its Kafka protocol): the
//! message body as the value, no key, `content-type` / `content-encoding`
//! as plain UTF-8 headers, and `iothub-connection-device-id`,
//! `x-opt-partition-key`, `iothub-message-source` and
//! `iothub-enqueuedtime` AMQP-encoded. Shared by the hub's Kafka source
//! tests and the end-to-end fault suite.

#![allow(dead_code)]

use std::collections::BTreeMap;

use hub_domain::stream::headers::{DEVICE_ID, encode_amqp_string, encode_amqp_timestamp};

/// `device`'s message `body` as routed, with its content type and (when
/// the message had one) content encoding.
pub fn routed_record(
    device: &str,
    content_type: &str,
    content_encoding: Option<&str>,
    body: Vec<u8>,
) -> rskafka::record::Record {
    let mut headers = BTreeMap::new();
    headers.insert("content-type".into(), content_type.as_bytes().to_vec());
    if let Some(ce) = content_encoding {
        headers.insert("content-encoding".into(), ce.as_bytes().to_vec());
    }
    headers.insert(DEVICE_ID.into(), encode_amqp_string(device));
    headers.insert("x-opt-partition-key".into(), encode_amqp_string(device));
    headers.insert(
        "iothub-message-source".into(),
        encode_amqp_string("Telemetry"),
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    headers.insert("iothub-enqueuedtime".into(), encode_amqp_timestamp(now_ms));
    rskafka::record::Record {
        key: None,
        value: Some(body),
        headers,
        timestamp: chrono::Utc::now(),
    }
}
