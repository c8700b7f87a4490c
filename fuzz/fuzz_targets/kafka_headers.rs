//! The Kafka source's header decoding on untrusted record headers: one
//! AMQP-encoded value (str8/str32 UTF-8, timestamp) and the routing
//! properties read from a list of headers. Any input must give a value or
//! an error, never a panic; a decoded short string re-encodes to the same
//! bytes.
#![no_main]
use cloud_hub::stream::headers::{
    DEVICE_ID, HeaderValue, decode_amqp, encode_amqp_string, routing_properties,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(HeaderValue::Text(s)) = decode_amqp("h", data)
        && data.first() == Some(&0xA1)
    {
        assert_eq!(encode_amqp_string(&s), data);
    }
    // The same bytes as several headers: each split point and name choice
    // comes from the input itself.
    let names = [DEVICE_ID, "content-type", "content-encoding", "iothub-enqueuedtime", "x"];
    let mut headers = Vec::new();
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let n = usize::from(head >> 3).min(tail.len());
        let (value, more) = tail.split_at(n);
        headers.push((names[usize::from(head & 7) % names.len()], value));
        rest = more;
    }
    if let Ok(p) = routing_properties(headers.iter().copied()) {
        assert!(p.device_id.is_none() || headers.iter().any(|(n, _)| *n == DEVICE_ID));
    }
});
