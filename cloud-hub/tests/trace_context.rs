//! `Batch.traceparent` at the hub's ingest: a malformed value never fails
//! the batch; it is ignored and counted in
//! `vigil_hub_trace_context_invalid_total`. A valid or absent one is not
//! counted. (The parent/child link itself is checked with a collector in
//! tests/tests/otel_traces.rs.)

use crate::common;

use common::{TestHub, batch, now_us, spo2};

async fn invalid_count(hub: &TestHub) -> u64 {
    let text = hub.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix("vigil_hub_trace_context_invalid_total "))
        .unwrap_or_else(|| panic!("no trace context counter in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_malformed_traceparent_is_ignored_and_counted() {
    let hub = TestHub::start().await;
    let t = now_us() - 60_000_000;
    let cases = [
        ("", 0),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", 0),
        ("00-abc-def-01", 1),
        ("not a traceparent \u{1F600}", 2),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", 3),
    ];
    for (i, (tp, counted)) in cases.into_iter().enumerate() {
        let seq = i as u64 + 1;
        let mut b = batch(seq, "dev-trace", vec![spo2(seq, 97.0, t + seq as i64)]);
        b.traceparent = tp.into();
        let ack = hub.ingest(&b).await;
        assert_eq!(
            (ack.sequence, ack.accepted, ack.rejected),
            (seq, 1, 0),
            "{tp:?}"
        );
        assert_eq!(invalid_count(&hub).await, counted, "{tp:?}");
    }
    hub.stop().await;
}
