//! Datex S/5 DRI frame decoder and record mapping: arbitrary bytes, fed in
//! arbitrary chunks, must never panic, never hold more than MAX_RAW_FRAME
//! bytes, and every error must report the bytes it dropped.
#![no_main]
use bytes::BytesMut;
use device_drivers::datex::codec::{DatexDecoder, MAX_RAW_FRAME};
use device_drivers::datex::record_to_readings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut dec = DatexDecoder::new();
    let mut buf = BytesMut::new();
    for chunk in data.chunks(split) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(rec)) => {
                    let _ = record_to_readings(&rec, 0, 0);
                }
                Ok(None) => break,
                Err(e) => assert!(e.dropped() > 0 && e.is_recoverable()),
            }
        }
        assert!(buf.len() <= MAX_RAW_FRAME);
    }
});
