//! IntelliVue Data Export decoders (MIB/RS232 serial framing and the
//! unframed LAN stream): arbitrary bytes, fed in arbitrary chunks, must never
//! panic, must stay within the size caps, and every error must report the
//! bytes it dropped. Decoded data messages go through the event-report and
//! poll-result parsers, and poll results through the reading mapping.
#![no_main]
use bytes::BytesMut;
use device_drivers::intellivue::codec::{
    IntellivueDecoder, MAX_USER_DATA, MAX_WIRE_FRAME, Message, RawFraming, SerialFraming,
    parse_event_report, parse_poll_reply, parse_poll_request,
};
use device_drivers::intellivue::poll_reply_to_readings;
use libfuzzer_sys::fuzz_target;

fn body(m: &Message) {
    if let Message::Data(d) = m {
        let _ = parse_event_report(&d.body);
        let _ = parse_poll_request(&d.body);
        if let Ok(p) = parse_poll_reply(&d.body) {
            let _ = poll_reply_to_readings(&p, time::UtcOffset::UTC, 0);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut serial = IntellivueDecoder::new(SerialFraming);
    let mut raw = IntellivueDecoder::new(RawFraming);
    let (mut bs, mut br) = (BytesMut::new(), BytesMut::new());
    for chunk in data.chunks(split) {
        bs.extend_from_slice(chunk);
        br.extend_from_slice(chunk);
        loop {
            match serial.decode(&mut bs) {
                Ok(Some(m)) => body(&m),
                Ok(None) => break,
                Err(e) => assert!(e.dropped() > 0 && e.is_recoverable()),
            }
        }
        loop {
            match raw.decode(&mut br) {
                Ok(Some(m)) => body(&m),
                Ok(None) => break,
                Err(e) => assert!(e.dropped() > 0 && e.is_recoverable()),
            }
        }
        assert!(bs.len() <= MAX_WIRE_FRAME);
        assert!(br.len() <= MAX_USER_DATA);
    }
    if let Ok(p) = parse_poll_reply(data) {
        let _ = poll_reply_to_readings(&p, time::UtcOffset::UTC, 0);
    }
});
