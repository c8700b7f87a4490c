//! Dräger MEDIBUS decoder: arbitrary bytes, fed in arbitrary chunks, must
//! never panic, must never hold more than two bounded partial messages, and
//! every discarded byte must be reported. Data responses are also run
//! through the record and device-id parsers.
#![no_main]
use bytes::BytesMut;
use device_drivers::medibus::codec::{
    Frame, MAX_FRAME, MedibusDecoder, parse_device_id, parse_measured,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut dec = MedibusDecoder::new();
    let mut buf = BytesMut::new();
    let (mut dropped, mut framed) = (0usize, 0usize);
    for chunk in data.chunks(split) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(Frame::Response { data, .. })) => {
                    framed += data.len() + 5;
                    let _ = parse_measured(&data);
                    let _ = parse_device_id(&data);
                }
                Ok(Some(Frame::Command { args, .. })) => framed += args.len() + 5,
                Ok(None) => break,
                Err(e) => {
                    assert!(e.dropped() > 0 && e.is_recoverable());
                    dropped += e.dropped();
                }
            }
        }
        assert!(buf.is_empty());
        assert!(dec.pending_len() <= 2 * (MAX_FRAME + 1));
    }
    assert!(dropped + framed + dec.pending_len() <= data.len());
    let _ = dec.decode_eof(&mut buf);
});
