//! The hub's whole ingest decoding path on an untrusted body: the
//! `Content-Encoding` (identity or zstd, first input byte) decoded under a
//! size cap, the protobuf `Batch`, the strict `traceparent` parse and the
//! validation of every reading, waveform and technical reading against the
//! catalogue and the clock. Any input must give a value or an error, never
//! a panic, and never more than the cap of decoded bytes.
#![no_main]
use cloud_hub::encoding::{ContentCoding, decode};
use cloud_hub::ingest::{validate_reading, validate_technical, validate_waveform};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use shared_protocol::v1::Batch;

const MAX: usize = 64 * 1024;
const NOW_US: i64 = 1_795_514_400_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let coding = if sel & 1 == 0 {
        ContentCoding::Identity
    } else {
        ContentCoding::Zstd
    };
    let Ok(plain) = decode(coding, bytes::Bytes::copy_from_slice(body), MAX) else {
        return;
    };
    assert!(plain.len() <= MAX, "decoded past the cap");
    let Ok(batch) = Batch::decode(plain) else {
        return;
    };
    let _ = cloud_hub::telemetry::remote_context(&batch.traceparent);
    for d in &batch.devices {
        for r in &d.readings {
            if let Ok(m) = validate_reading(r, NOW_US) {
                assert_eq!(m.mdc, r.mdc_code, "validated against its own metric");
            }
        }
        for w in &d.waveforms {
            let _ = validate_waveform(w, NOW_US);
        }
        for t in &d.technical {
            let _ = validate_technical(t, NOW_US);
        }
    }
});
