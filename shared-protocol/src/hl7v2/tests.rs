//! Test vectors for the generic HL7 v2 pieces. Sources cited per test:
//! MLLP = HL7 v2 Implementation Guide appendix C.4 ("Minimal Lower Layer
//! Protocol", release 2); HL7 v2.5 chapter 2 (2.5 message construction,
//! 2.7 escape sequences) and chapter 2A (DTM).

use super::*;
use bytes::BytesMut;
use proptest::prelude::*;
use time::UtcOffset;

// ---------------------------------------------------------------- MLLP

#[test]
fn mllp_frames_messages_and_drops_junk_counted() {
    // Appendix C.4.2: <SB>=0x0B, data, <EB>=0x1C, <CR>=0x0D.
    let wire: &[u8] = &[
        b'x', b'y', // 2 junk bytes before the start block: dropped, counted
        0x0B, // SB
        b'M', b'S', b'H', b'|', b'^', b'~', b'\\', b'&', 0x0D, // "MSH|^~\&" CR
        0x1C, 0x0D, // EB CR
        0x0B, b'M', b'S', // SB + start of a second message (incomplete)
    ];
    let mut d = MllpDecoder::default();
    let mut buf = BytesMut::from(wire);
    assert_eq!(d.decode(&mut buf), Err(MllpError::Junk { dropped: 2 }));
    assert_eq!(d.decode(&mut buf).unwrap().unwrap(), b"MSH|^~\\&\r");
    assert_eq!(d.decode(&mut buf), Ok(None)); // need more bytes
    buf.extend_from_slice(b"H|\r\x1C");
    assert_eq!(d.decode(&mut buf), Ok(None)); // EB seen, CR not yet
    buf.extend_from_slice(b"\r");
    assert_eq!(d.decode(&mut buf).unwrap().unwrap(), b"MSH|\r");
    assert!(buf.is_empty());
}

#[test]
fn mllp_truncated_block_resyncs_at_the_next_start_block() {
    // A sender that died mid-message and reconnected: SB "MSH|^" SB ...
    let wire: &[u8] = &[
        0x0B, b'M', b'S', b'H', b'|', b'^', 0x0B, b'O', b'K', 0x1C, 0x0D,
    ];
    let mut d = MllpDecoder::default();
    let mut buf = BytesMut::from(wire);
    assert_eq!(d.decode(&mut buf), Err(MllpError::Truncated { dropped: 6 }));
    assert_eq!(d.decode(&mut buf).unwrap().unwrap(), b"OK");
    // EB followed by something other than CR: corrupt block, dropped.
    let mut buf = BytesMut::from(&[0x0B, b'A', 0x1C, b'B', 0x0B, b'C', 0x1C, 0x0D][..]);
    assert_eq!(d.decode(&mut buf), Err(MllpError::Truncated { dropped: 3 }));
    assert_eq!(d.decode(&mut buf), Err(MllpError::Junk { dropped: 1 }));
    assert_eq!(d.decode(&mut buf).unwrap().unwrap(), b"C");
}

#[test]
fn mllp_oversized_message_is_dropped_to_its_end_keeping_its_head() {
    let mut d = MllpDecoder::new(32);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[0x0B]);
    buf.extend_from_slice(b"MSH|^~\\&|A|B|C|D|20240501||ORU^R01|CTL-9|P|2.5\r");
    match d.decode(&mut buf) {
        Err(MllpError::Oversized { max: 32, head, .. }) => {
            assert!(head.starts_with(b"MSH|"));
            assert_eq!(AckTarget::best_effort(&head).control_id, "CTL-9");
        }
        other => panic!("{other:?}"),
    }
    // The rest of the oversized message (still arriving) is skipped...
    buf.extend_from_slice(b"PID|||more\rOBX|...\r");
    assert_eq!(d.decode(&mut buf), Ok(None));
    assert!(buf.is_empty());
    // ...up to its end block; the next message decodes normally.
    buf.extend_from_slice(&[b'x', 0x1C, 0x0D, 0x0B, b'o', b'k', 0x1C, 0x0D]);
    assert_eq!(d.decode(&mut buf).unwrap().unwrap(), b"ok");
    // A complete but too-long block in one read is refused too.
    let mut buf = BytesMut::from(&mllp_encode(&[b'a'; 40])[..]);
    assert!(matches!(
        d.decode(&mut buf),
        Err(MllpError::Oversized { dropped: 43, .. })
    ));
    assert!(buf.is_empty());
}

// ---------------------------------------------------------------- HL7 encoding

#[test]
fn escape_sequences_are_decoded_after_splitting() {
    // Chapter 2.7.1: \F\ field, \S\ component, \T\ subcomponent,
    // \R\ repetition, \E\ escape.
    let msg = Message::parse(b"MSH|^~\\&|A\\F\\B|x\\S\\y^two|||\rNTE|1||p\\T\\q&r~s\\R\\t\\E\\u\r")
        .unwrap();
    let msh = msg.msh();
    assert_eq!(msg.get(msh, 3, 1), "A|B");
    assert_eq!(msg.get(msh, 4, 1), "x^y");
    assert_eq!(msg.get(msh, 4, 2), "two");
    let nte = &msg.segments[1];
    let reps = msg.repetitions(nte.field(3));
    assert_eq!(reps.len(), 2);
    assert_eq!(msg.subcomponent(reps[0], 1, 1), "p&q");
    assert_eq!(msg.subcomponent(reps[0], 1, 2), "r");
    assert_eq!(msg.component(reps[1], 1), "s~t\\u");
    // Hex data, highlighting, line breaks, unknown/unterminated escapes.
    let d = Delimiters::default();
    assert_eq!(d.unescape("a\\X41\\b"), "aAb");
    assert_eq!(d.unescape("\\H\\bold\\N\\"), "bold");
    assert_eq!(d.unescape("x\\.br\\y"), "x\ny");
    assert_eq!(d.unescape("\\Zfoo\\"), "\\Zfoo\\");
    assert_eq!(d.unescape("tail\\"), "tail\\");
}

// ---------------------------------------------------------------- properties

proptest! {
    /// MLLP round trip: any message without SB/EB, framed, split into
    /// arbitrary reads, comes out whole and in order.
    #[test]
    fn mllp_round_trips_across_arbitrary_reads(
        msgs in proptest::collection::vec(
            proptest::collection::vec(any::<u8>().prop_filter("no SB/EB", |b| *b != SB && *b != EB), 0..300),
            1..5),
        cuts in proptest::collection::vec(1usize..64, 0..40),
    ) {
        let wire: Vec<u8> = msgs.iter().flat_map(|m| mllp_encode(m)).collect();
        let mut d = MllpDecoder::new(4096);
        let mut buf = BytesMut::new();
        let mut out = vec![];
        let mut pos = 0;
        for c in cuts.iter().chain(std::iter::repeat(&64)) {
            if pos >= wire.len() { break; }
            let end = (pos + c).min(wire.len());
            buf.extend_from_slice(&wire[pos..end]);
            pos = end;
            while let Some(m) = d.decode(&mut buf).unwrap() {
                out.push(m);
            }
        }
        prop_assert_eq!(out, msgs);
        prop_assert!(buf.is_empty());
    }

    /// Hostile bytes never panic the MLLP decoder; every byte is either in
    /// a message (with its 3 framing bytes), dropped (counted), or still
    /// buffered; the buffer never grows past the cap.
    #[test]
    fn mllp_never_panics_and_accounts_for_every_byte(
        bytes in proptest::collection::vec(prop_oneof![Just(SB), Just(EB), Just(CR), any::<u8>()], 0..2000),
        chunk in 1usize..200,
    ) {
        let mut d = MllpDecoder::new(64);
        let mut buf = BytesMut::new();
        let (mut framed, mut dropped) = (0usize, 0usize);
        for part in bytes.chunks(chunk) {
            buf.extend_from_slice(part);
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(m)) => framed += m.len() + 3,
                    Ok(None) => break,
                    Err(e) => { prop_assert!(e.is_recoverable()); dropped += e.dropped(); }
                }
            }
            prop_assert!(buf.len() <= 64 + 3 + chunk);
        }
        // Skipped tails of oversized messages are dropped silently after
        // the first report, so the account is an upper bound check.
        prop_assert!(framed + dropped + buf.len() <= bytes.len());
    }

    /// Escaping then unescaping is the identity (for text without CR/LF).
    #[test]
    fn escape_round_trips(s in "[ -~]{0,64}") {
        let d = Delimiters::default();
        prop_assert_eq!(d.unescape(&d.escape(&s)), s);
    }

}

// ---------------------------------------------------------------- times

#[test]
fn dtm_times_with_and_without_zone() {
    // Chapter 2A.22 DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ].
    let t = parse_time("20240501120000+0200", UtcOffset::UTC).unwrap();
    assert_eq!((t.utc_us, t.zoned), (1_714_557_600_000_000, true));
    let plus1 = UtcOffset::from_whole_seconds(3600).unwrap();
    let t = parse_time("202405011100", plus1).unwrap();
    assert_eq!((t.utc_us, t.zoned), (1_714_557_600_000_000, false));
    let t = parse_time("20240501100000.25-0000", UtcOffset::UTC).unwrap();
    assert_eq!(t.utc_us, 1_714_557_600_250_000);
    for bad in [
        "2024050110",
        "20240501100000.1234567",
        "20241301100000",
        "2024050110000x",
        "20240501100000+2500",
        "202405011000.5",
    ] {
        assert!(parse_time(bad, UtcOffset::UTC).is_err(), "{bad}");
    }
    let ts = format_ts(time::OffsetDateTime::from_unix_timestamp(1_714_557_600).unwrap());
    assert_eq!(ts, "20240501100000+0000");
}
