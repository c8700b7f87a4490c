//! MLLP framer: arbitrary bytes, fed in arbitrary chunks, must never panic;
//! frames never exceed the cap or contain SB/EB; the buffer never holds
//! more than the cap plus one read; every error reports dropped bytes and
//! is recoverable.
#![no_main]
use bytes::BytesMut;
use device_drivers::hl7::codec::{EB, MllpDecoder, SB};
use libfuzzer_sys::fuzz_target;

const CAP: usize = 256;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut dec = MllpDecoder::new(CAP);
    let mut buf = BytesMut::new();
    for chunk in data.chunks(split) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(m)) => {
                    assert!(m.len() <= CAP);
                    assert!(!m.contains(&SB) && !m.contains(&EB));
                }
                Ok(None) => break,
                Err(e) => assert!(e.dropped() > 0 && e.is_recoverable()),
            }
        }
        assert!(buf.len() <= CAP + 3 + split);
    }
});
