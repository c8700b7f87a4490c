//! Masimo ASCII 1 line decoder: arbitrary bytes, fed in arbitrary chunks,
//! must never panic, must never hold more than MAX_LINE bytes, and every
//! dropped byte must be reported.
#![no_main]
use bytes::BytesMut;
use device_drivers::masimo::codec::{MAX_LINE, MasimoDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut dec = MasimoDecoder::new();
    let mut buf = BytesMut::new();
    for chunk in data.chunks(split) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => assert!(e.dropped() > 0 && e.is_recoverable()),
            }
        }
        assert!(buf.len() <= MAX_LINE);
    }
    let _ = dec.decode_eof(&mut buf);
});
