//! Nonin Data Format 7 packet decoder and mapping: arbitrary bytes, fed in
//! arbitrary chunks, must never panic, never leave a whole packet's worth of
//! bytes undecoded, account for every byte, and every error must report the
//! bytes it dropped.
#![no_main]
use bytes::BytesMut;
use device_drivers::nonin::codec::{NoninDecoder, PACKET_LEN};
use device_drivers::nonin::{Averaging, packet_to_readings, packet_to_waveform};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut dec = NoninDecoder::new();
    let mut buf = BytesMut::new();
    let (mut dropped, mut packets) = (0usize, 0usize);
    for chunk in data.chunks(split) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(p)) => {
                    packets += 1;
                    for a in [
                        Averaging::FourBeat,
                        Averaging::EightBeat,
                        Averaging::FourBeatDisplay,
                        Averaging::EightBeatDisplay,
                    ] {
                        let (rs, _) = packet_to_readings(&p, a, 0);
                        assert_eq!(rs.len(), 2);
                    }
                    assert_eq!(packet_to_waveform(&p, 0).samples.len(), 25);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(e.dropped() > 0 && e.is_recoverable());
                    dropped += e.dropped();
                }
            }
        }
        assert!(buf.len() < PACKET_LEN);
    }
    assert_eq!(dropped + packets * PACKET_LEN + buf.len(), data.len());
});
