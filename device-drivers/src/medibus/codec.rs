//! Sans-IO codec for Dräger MEDIBUS / MEDIBUS.X (slow data, ASCII mode).
//!
//! Sources (facts only; see `docs/protocols.md`, section "Dräger Medibus.X"):
//! - Dräger "MEDIBUS Protocol Definition" and "MEDIBUS.X Rules and
//!   Standards for Implementation" (not redistributable; the facts below were
//!   cross-checked against the public LGPL project VSCaptureDrgVent, files
//!   `Class1.cs` (framing, checksum, embedded commands, record widths) and
//!   `Class2.cs` (command codes, codepage 1 data codes and their units), and
//!   against the public header `DragerLibrary_Commands.h` of
//!   Farlandx/iOS_Project-Ventilator (command codes).
//!
//! Message layout (all slow-data bytes are 7-bit ASCII):
//!
//! ```text
//! command : ESC  cmd  [arguments...]  CS1 CS2  CR
//!           0x1B 0x24                 '3' 'F'  0x0D     (request data cp1)
//! response: SOH  cmd  [data.........]  CS1 CS2  CR
//!           0x01 0x24  "D6  12" ...    'x' 'y'  0x0D
//! ```
//!
//! - `cmd` is the command code; a response echoes the code of the command it
//!   answers.
//! - `CS1 CS2` is the checksum: the sum of every byte before it (from the
//!   ESC/SOH up to the last argument/data byte) modulo 256, as two ASCII hex
//!   digits, upper case when we send; either case is accepted on receive.
//! - A command from the other side may be embedded inside a response that is
//!   being transmitted (the peer sends its own ESC…CR in the middle of a
//!   SOH…CR). The decoder yields the embedded command first (when its CR
//!   arrives) and then the response.
//! - Both sides send commands (the device sends ICC and NOP to the client);
//!   each command is answered by a response with the same code.
//! - Bytes with bit 7 set are MEDIBUS.X realtime data (waveforms), which this
//!   driver never enables; if they appear they are treated as corruption.
//!
//! Decoder contract: `decode(&mut BytesMut) -> Result<Option<Frame>, Error>`,
//! `Ok(None)` = need more bytes. The decoder moves bytes out of the buffer
//! into at most two bounded frame buffers ([`MAX_FRAME`] each), so memory is
//! bounded whatever arrives. Every discarded byte is reported in an error;
//! all errors are recoverable (the stream resynchronises on the next ESC/SOH).

use bytes::{Buf, BytesMut};

/// Start of a command.
pub const ESC: u8 = 0x1B;
/// Start of a response.
pub const SOH: u8 = 0x01;
/// End of every message.
pub const CR: u8 = 0x0D;

/// Command codes (MEDIBUS Protocol Definition, command table; confirmed in
/// VSCaptureDrgVent `Class2.cs` and `DragerLibrary_Commands.h`).
pub mod cmd {
    /// No operation (keep-alive).
    pub const NOP: u8 = 0x30;
    /// Initialize communication.
    pub const ICC: u8 = 0x51;
    /// Request device identification.
    pub const DEVICE_ID: u8 = 0x52;
    /// Stop communication.
    pub const STOP: u8 = 0x55;
    /// Request current measured data, codepage 1.
    pub const MEASURED_CP1: u8 = 0x24;
    /// Request current measured data, codepage 2 (not used yet).
    pub const MEASURED_CP2: u8 = 0x2B;
    /// Request current date and time (not used yet).
    pub const DATE_TIME: u8 = 0x28;
    /// Response code used to signal a checksum error in the received command
    /// (as VSCaptureDrgVent sends it; NAK). Not confirmed in a Dräger
    /// document available to us.
    pub const NAK: u8 = 0x15;
}

/// Longest message accepted (start byte to checksum, without CR). A
/// codepage 1 data response carries at most 256 records of 6 bytes.
pub const MAX_FRAME: usize = 2048;

/// Width of one record in a measured-data response: 2 hex digits of data
/// code + 4 characters of value (VSCaptureDrgVent `ParseDataResponseMeasured`
/// steps by 6: `Substring(i, 2)` code, `Substring(i + 2, 4)` value).
pub const RECORD_LEN: usize = 6;

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A request from the peer (`ESC cmd args CS CR`).
    Command { code: u8, args: Vec<u8> },
    /// An answer from the peer (`SOH cmd data CS CR`).
    Response { code: u8, data: Vec<u8> },
}

/// Why bytes were discarded. Every variant is recoverable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MedibusError {
    #[error(
        "checksum mismatch (computed {computed:02X}, received {received:?}); dropped {dropped} bytes"
    )]
    Checksum {
        computed: u8,
        received: [u8; 2],
        dropped: usize,
    },
    #[error("message longer than {MAX_FRAME} bytes; dropped {dropped} bytes")]
    Oversized { dropped: usize },
    #[error("unusable input ({reason}); dropped {dropped} bytes")]
    Garbage {
        reason: &'static str,
        dropped: usize,
    },
}

impl MedibusError {
    /// Bytes discarded because of this error.
    pub fn dropped(&self) -> usize {
        match self {
            MedibusError::Checksum { dropped, .. }
            | MedibusError::Oversized { dropped }
            | MedibusError::Garbage { dropped, .. } => *dropped,
        }
    }

    /// All MEDIBUS decode errors are recoverable: the stream resynchronises
    /// at the next ESC or SOH.
    pub fn is_recoverable(&self) -> bool {
        true
    }
}

/// The MEDIBUS checksum: sum of all bytes modulo 256.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b))
}

fn hex_upper(n: u8) -> [u8; 2] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    [HEX[usize::from(n >> 4)], HEX[usize::from(n & 0x0F)]]
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn encode(start: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(start);
    out.push(code);
    out.extend_from_slice(body);
    let cs = checksum(&out);
    out.extend_from_slice(&hex_upper(cs));
    out.push(CR);
    out
}

/// Encode a command (`ESC code args CS CR`). `args` must be 7-bit ASCII
/// without ESC/SOH/CR (the caller's responsibility; only constants are sent).
pub fn encode_command(code: u8, args: &[u8]) -> Vec<u8> {
    encode(ESC, code, args)
}

/// Encode a response (`SOH code data CS CR`), e.g. the answer to the device's
/// ICC or NOP.
pub fn encode_response(code: u8, data: &[u8]) -> Vec<u8> {
    encode(SOH, code, data)
}

/// Validate a complete message (start byte .. checksum, without CR).
fn finish(frame: &[u8]) -> Result<Frame, MedibusError> {
    let dropped = frame.len() + 1;
    if frame.len() < 4 {
        return Err(MedibusError::Garbage {
            reason: "message shorter than start, code and checksum",
            dropped,
        });
    }
    let (body, cs) = frame.split_at(frame.len() - 2);
    let received = [cs[0], cs[1]];
    let computed = checksum(body);
    match (hex_val(cs[0]), hex_val(cs[1])) {
        (Some(h), Some(l)) if (h << 4 | l) == computed => {}
        _ => {
            return Err(MedibusError::Checksum {
                computed,
                received,
                dropped,
            });
        }
    }
    let code = body[1];
    let payload = body[2..].to_vec();
    Ok(if body[0] == ESC {
        Frame::Command {
            code,
            args: payload,
        }
    } else {
        Frame::Response {
            code,
            data: payload,
        }
    })
}

/// Stateful MEDIBUS decoder (see the module docs).
#[derive(Debug, Default)]
pub struct MedibusDecoder {
    /// Message in progress (starts with ESC or SOH).
    outer: Option<Vec<u8>>,
    /// Command embedded in the response in `outer`.
    nested: Option<Vec<u8>>,
    /// Dropping the rest of an oversized message: bytes dropped so far.
    skipping: Option<usize>,
    /// Bytes seen outside any message, not yet reported.
    junk: usize,
}

impl MedibusDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held inside the decoder (partial messages).
    pub fn pending_len(&self) -> usize {
        self.outer.as_ref().map_or(0, Vec::len) + self.nested.as_ref().map_or(0, Vec::len)
    }

    fn take_junk(&mut self) -> Option<MedibusError> {
        (self.junk > 0).then(|| {
            let dropped = std::mem::take(&mut self.junk);
            MedibusError::Garbage {
                reason: "bytes outside a message",
                dropped,
            }
        })
    }

    /// Drop every message in progress; returns how many bytes that was.
    fn abandon_all(&mut self) -> usize {
        let n = self.pending_len();
        self.outer = None;
        self.nested = None;
        n
    }

    /// Decode one message from `buf`. See the module docs for the contract.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, MedibusError> {
        while buf.has_remaining() {
            let b = buf.get_u8();

            if let Some(skipped) = self.skipping {
                match b {
                    CR => {
                        self.skipping = None;
                        return Err(MedibusError::Oversized {
                            dropped: skipped + 1,
                        });
                    }
                    ESC | SOH => {
                        // The oversized message ended without its CR; a new
                        // one starts here.
                        self.skipping = None;
                        self.outer = Some(vec![b]);
                        return Err(MedibusError::Oversized { dropped: skipped });
                    }
                    _ => {
                        self.skipping = Some(skipped.saturating_add(1));
                        continue;
                    }
                }
            }

            match b {
                ESC => {
                    if let Some(n) = self.nested.take() {
                        // An embedded command restarted before its CR.
                        self.nested = Some(vec![ESC]);
                        return Err(MedibusError::Garbage {
                            reason: "embedded command cut short",
                            dropped: n.len(),
                        });
                    }
                    match &self.outer {
                        Some(o) if o[0] == SOH => self.nested = Some(vec![ESC]),
                        Some(_) => {
                            let dropped = self.abandon_all();
                            self.outer = Some(vec![ESC]);
                            return Err(MedibusError::Garbage {
                                reason: "command cut short",
                                dropped,
                            });
                        }
                        None => {
                            self.outer = Some(vec![ESC]);
                            if let Some(e) = self.take_junk() {
                                return Err(e);
                            }
                        }
                    }
                }
                SOH => {
                    let dropped = self.abandon_all();
                    self.outer = Some(vec![SOH]);
                    if dropped > 0 {
                        return Err(MedibusError::Garbage {
                            reason: "message cut short",
                            dropped: dropped + std::mem::take(&mut self.junk),
                        });
                    }
                    if let Some(e) = self.take_junk() {
                        return Err(e);
                    }
                }
                CR => {
                    if let Some(n) = self.nested.take() {
                        return finish(&n).map(Some);
                    }
                    if let Some(o) = self.outer.take() {
                        return finish(&o).map(Some);
                    }
                    self.junk += 1;
                }
                0x80..=0xFF => {
                    // Realtime data (never enabled) or line noise.
                    if let Some(n) = self.nested.take() {
                        return Err(MedibusError::Garbage {
                            reason: "byte with bit 7 set inside a message",
                            dropped: n.len() + 1,
                        });
                    }
                    if let Some(o) = self.outer.take() {
                        return Err(MedibusError::Garbage {
                            reason: "byte with bit 7 set inside a message",
                            dropped: o.len() + 1,
                        });
                    }
                    self.junk += 1;
                }
                _ => {
                    let target = match (&mut self.nested, &mut self.outer) {
                        (Some(n), _) => Some(n),
                        (None, Some(o)) => Some(o),
                        (None, None) => None,
                    };
                    match target {
                        Some(v) => {
                            v.push(b);
                            if v.len() > MAX_FRAME {
                                let dropped = self.abandon_all();
                                self.skipping = Some(dropped);
                            }
                        }
                        None => self.junk += 1,
                    }
                }
            }
        }
        if let Some(e) = self.take_junk() {
            return Err(e);
        }
        Ok(None)
    }

    /// At end of stream: account for a partial message still held.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, MedibusError> {
        if let Some(f) = self.decode(buf)? {
            return Ok(Some(f));
        }
        let dropped = self.abandon_all() + self.skipping.take().unwrap_or(0);
        if dropped > 0 {
            return Err(MedibusError::Garbage {
                reason: "incomplete message at end of stream",
                dropped,
            });
        }
        Ok(None)
    }
}

/// A value field of a measured-data record.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    /// Blank, dashes or otherwise non-numeric: the device has no value.
    Missing,
}

/// One record of a measured-data response.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Data code (codepage-specific).
    pub code: u8,
    /// The 4 value characters as sent.
    pub raw: [u8; 4],
    pub value: Value,
}

/// Parse the 4-character value field. Numbers may be space padded, carry one
/// decimal point and a leading minus. Anything else (blanks, `----`, `***`)
/// is [`Value::Missing`]: never guessed.
pub fn parse_value(raw: &[u8]) -> Value {
    let Ok(text) = std::str::from_utf8(raw) else {
        return Value::Missing;
    };
    let t = text.trim_matches(' ');
    let digits = t.strip_prefix('-').unwrap_or(t);
    let well_formed = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|&b| b == b'.').count() <= 1
        && digits.bytes().any(|b| b.is_ascii_digit());
    if !well_formed {
        return Value::Missing;
    }
    t.parse::<f64>().map_or(Value::Missing, Value::Number)
}

/// Parse the data of a measured-data response (codepage 1 or 2) into
/// records of [`RECORD_LEN`] bytes.
pub fn parse_measured(data: &[u8]) -> Result<Vec<Record>, &'static str> {
    if data.len() % RECORD_LEN != 0 {
        return Err("data length is not a multiple of the record length");
    }
    data.chunks_exact(RECORD_LEN)
        .map(|rec| {
            let code = match (hex_val(rec[0]), hex_val(rec[1])) {
                (Some(h), Some(l)) => h << 4 | l,
                _ => return Err("data code is not two hex digits"),
            };
            let raw = [rec[2], rec[3], rec[4], rec[5]];
            Ok(Record {
                code,
                raw,
                value: parse_value(&raw),
            })
        })
        .collect()
}

/// Format records as a measured-data response body (used by round-trip
/// tests).
pub fn format_measured(records: &[(u8, [u8; 4])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() * RECORD_LEN);
    for (code, raw) in records {
        out.extend_from_slice(&hex_upper(*code));
        out.extend_from_slice(raw);
    }
    out
}

/// What the device says about itself in the response to "request device
/// identification" (0x52).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceIdentity {
    /// The 4-character device id code.
    pub id: String,
    /// The device name, sent between single quotes.
    pub name: Option<String>,
    /// Whatever follows the name (device revision and `:` MEDIBUS version).
    pub rest: String,
}

/// Parse a device identification response. Layout per VSCaptureDrgVent
/// `SendDeviceID`: 4 characters id, `'name'`, revision, `:` version, e.g.
/// `0161'Evita 4'04.20:06.00`. Only printable ASCII is kept.
pub fn parse_device_id(data: &[u8]) -> Option<DeviceIdentity> {
    let text = std::str::from_utf8(data).ok()?;
    if !text.bytes().all(|b| (0x20..0x7F).contains(&b)) || text.len() < 4 {
        return None;
    }
    let (id, after) = text.split_at(4);
    let mut ident = DeviceIdentity {
        id: id.trim().to_string(),
        ..Default::default()
    };
    match after.strip_prefix('\'').and_then(|s| s.split_once('\'')) {
        Some((name, rest)) => {
            ident.name = Some(name.trim().to_string());
            ident.rest = rest.to_string();
        }
        None => ident.rest = after.to_string(),
    }
    Some(ident)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> (Vec<Frame>, Vec<MedibusError>) {
        let mut dec = MedibusDecoder::new();
        let mut buf = BytesMut::from(input);
        let (mut frames, mut errors) = (vec![], vec![]);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => errors.push(e),
            }
        }
        (frames, errors)
    }

    /// ICC command as the client sends it. MEDIBUS framing (see module
    /// docs): ESC 0x1B + 'Q' 0x51 = 0x6C -> checksum "6C", then CR.
    const ICC_CMD: &[u8] = &[0x1B, 0x51, b'6', b'C', 0x0D];
    /// Request current measured data codepage 1: 0x1B + 0x24 = 0x3F.
    const CP1_CMD: &[u8] = &[0x1B, 0x24, b'3', b'F', 0x0D];
    /// NOP response: SOH 0x01 + '0' 0x30 = 0x31.
    const NOP_RESP: &[u8] = &[0x01, 0x30, b'3', b'1', 0x0D];

    #[test]
    fn encodes_the_documented_bytes() {
        assert_eq!(encode_command(cmd::ICC, b""), ICC_CMD);
        assert_eq!(encode_command(cmd::MEASURED_CP1, b""), CP1_CMD);
        assert_eq!(encode_response(cmd::NOP, b""), NOP_RESP);
        // Stop: 0x1B + 0x55 = 0x70.
        assert_eq!(
            encode_command(cmd::STOP, b""),
            [0x1B, 0x55, b'7', b'0', 0x0D]
        );
    }

    #[test]
    fn decodes_a_data_response() {
        // SOH '$' then records: "D6  12" (RR 12 /min), "88 500" (VT 500 mL),
        // "EB    " (SpO2 blank: no value). Checksum computed over SOH..data.
        let mut body = vec![SOH, 0x24];
        body.extend_from_slice(b"D6  1288 500EB    ");
        let cs = checksum(&body);
        body.extend_from_slice(&hex_upper(cs));
        body.push(CR);
        let (frames, errors) = decode_all(&body);
        assert!(errors.is_empty(), "{errors:?}");
        let Frame::Response { code, data } = &frames[0] else {
            panic!("not a response")
        };
        assert_eq!(*code, 0x24);
        let recs = parse_measured(data).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!((recs[0].code, &recs[0].value), (0xD6, &Value::Number(12.0)));
        assert_eq!(
            (recs[1].code, &recs[1].value),
            (0x88, &Value::Number(500.0))
        );
        assert_eq!((recs[2].code, &recs[2].value), (0xEB, &Value::Missing));
    }

    #[test]
    fn lower_case_checksum_is_accepted() {
        // 0x1B + 0x24 + 'A'(0x41) = 0x80 -> "80"; 0x1B+0x51+ "ab"? use a
        // checksum with letters: ESC 'Q' = 0x6C -> "6c".
        let (frames, errors) = decode_all(&[0x1B, 0x51, b'6', b'c', 0x0D]);
        assert!(errors.is_empty());
        assert_eq!(
            frames,
            vec![Frame::Command {
                code: 0x51,
                args: vec![]
            }]
        );
    }

    #[test]
    fn embedded_command_is_delivered_first() {
        let resp = encode_response(0x24, b"D6  12");
        let (head, tail) = resp.split_at(5);
        let mut input = head.to_vec();
        input.extend_from_slice(&encode_command(cmd::NOP, b""));
        input.extend_from_slice(tail);
        let (frames, errors) = decode_all(&input);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            frames,
            vec![
                Frame::Command {
                    code: cmd::NOP,
                    args: vec![]
                },
                Frame::Response {
                    code: 0x24,
                    data: b"D6  12".to_vec()
                }
            ]
        );
    }

    #[test]
    fn bad_checksum_is_dropped_and_counted() {
        let (frames, errors) =
            decode_all(&[0x1B, 0x51, b'0', b'0', 0x0D, 0x1B, 0x51, b'6', b'C', 0x0D]);
        assert_eq!(frames.len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(matches!(
            errors[0],
            MedibusError::Checksum {
                computed: 0x6C,
                dropped: 5,
                ..
            }
        ));
    }

    #[test]
    fn junk_truncation_and_high_bytes_are_reported() {
        let mut input = b"xyz".to_vec(); // 3 junk bytes
        input.extend_from_slice(&[0x1B, 0x24]); // cut short by the next SOH
        input.extend_from_slice(NOP_RESP);
        input.extend_from_slice(&[0x01, 0x24, 0x90]); // bit-7 byte inside
        input.extend_from_slice(ICC_CMD);
        let (frames, errors) = decode_all(&input);
        assert_eq!(frames.len(), 2, "{errors:?}");
        let dropped: usize = errors.iter().map(MedibusError::dropped).sum();
        assert_eq!(dropped, 3 + 2 + 3);
    }

    #[test]
    fn oversized_message_is_skipped_to_its_end() {
        let mut input = vec![SOH, 0x24];
        input.extend(std::iter::repeat_n(b'1', MAX_FRAME + 10));
        input.push(CR);
        input.extend_from_slice(ICC_CMD);
        let (frames, errors) = decode_all(&input);
        assert_eq!(frames.len(), 1);
        assert_eq!(
            errors,
            vec![MedibusError::Oversized {
                dropped: MAX_FRAME + 13
            }]
        );
    }

    #[test]
    fn values_are_never_guessed() {
        assert_eq!(parse_value(b" 500"), Value::Number(500.0));
        assert_eq!(parse_value(b"12.5"), Value::Number(12.5));
        assert_eq!(parse_value(b"  -2"), Value::Number(-2.0));
        assert_eq!(parse_value(b"0.45"), Value::Number(0.45));
        for raw in [
            b"    ", b"----", b" ---", b"***\0", b"1.2.", b"  . ", b"12 3", b" - 1",
        ] {
            assert_eq!(parse_value(raw), Value::Missing, "{raw:?}");
        }
        assert!(parse_measured(b"D6  1").is_err());
        assert!(parse_measured(b"ZZ  12").is_err());
    }

    #[test]
    fn device_id_is_parsed() {
        let id = parse_device_id(b"0161'Evita 4'04.20:06.00").unwrap();
        assert_eq!(id.id, "0161");
        assert_eq!(id.name.as_deref(), Some("Evita 4"));
        assert_eq!(id.rest, "04.20:06.00");
        assert!(parse_device_id(b"01").is_none());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn ascii_payload() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(
                (0x02u8..0x7F).prop_filter("structural", |b| *b != ESC && *b != CR),
                0..200,
            )
        }

        fn value_field() -> impl Strategy<Value = [u8; 4]> {
            prop_oneof![
                (0u32..10_000).prop_map(|v| {
                    let s = format!("{v:>4}");
                    let b = s.as_bytes();
                    [b[0], b[1], b[2], b[3]]
                }),
                (0u32..1000).prop_map(|v| {
                    let s = format!("{:>4.1}", f64::from(v) / 10.0);
                    let b = s.as_bytes();
                    [b[0], b[1], b[2], b[3]]
                }),
                Just(*b"    "),
                Just(*b"----"),
            ]
        }

        proptest! {
            #[test]
            fn command_and_response_round_trip(
                code in (0x20u8..0x7F).prop_filter("structural", |b| *b != ESC && *b != CR),
                payload in ascii_payload(),
                split in 0usize..400,
                as_command in any::<bool>(),
            ) {
                let bytes = if as_command {
                    encode_command(code, &payload)
                } else {
                    encode_response(code, &payload)
                };
                // Feed in two chunks.
                let split = split.min(bytes.len());
                let mut dec = MedibusDecoder::new();
                let mut buf = BytesMut::from(&bytes[..split]);
                let mut got = None;
                loop {
                    match dec.decode(&mut buf) {
                        Ok(Some(f)) => got = Some(f),
                        Ok(None) => break,
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                buf.extend_from_slice(&bytes[split..]);
                loop {
                    match dec.decode(&mut buf) {
                        Ok(Some(f)) => got = Some(f),
                        Ok(None) => break,
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                let want = if as_command {
                    Frame::Command { code, args: payload }
                } else {
                    Frame::Response { code, data: payload }
                };
                prop_assert_eq!(got, Some(want));
            }

            #[test]
            fn measured_records_round_trip(
                recs in proptest::collection::vec((any::<u8>(), value_field()), 0..60)
            ) {
                let body = format_measured(&recs);
                let parsed = parse_measured(&body).unwrap();
                prop_assert_eq!(parsed.len(), recs.len());
                for (p, (code, raw)) in parsed.iter().zip(&recs) {
                    prop_assert_eq!(p.code, *code);
                    prop_assert_eq!(&p.raw, raw);
                    let text = std::str::from_utf8(raw).unwrap().trim();
                    match text.parse::<f64>() {
                        Ok(v) => prop_assert_eq!(&p.value, &Value::Number(v)),
                        Err(_) => prop_assert_eq!(&p.value, &Value::Missing),
                    }
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_are_accounted(
                chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..8)
            ) {
                let mut dec = MedibusDecoder::new();
                let mut buf = BytesMut::new();
                let mut total_in = 0usize;
                let mut dropped = 0usize;
                let mut framed = 0usize;
                for c in chunks {
                    total_in += c.len();
                    buf.extend_from_slice(&c);
                    loop {
                        match dec.decode(&mut buf) {
                            Ok(Some(f)) => {
                                framed += 5 + match f {
                                    Frame::Command { args, .. } => args.len(),
                                    Frame::Response { data, .. } => data.len(),
                                };
                            }
                            Ok(None) => break,
                            Err(e) => {
                                prop_assert!(e.dropped() > 0 && e.is_recoverable());
                                dropped += e.dropped();
                            }
                        }
                    }
                    prop_assert!(buf.is_empty());
                    prop_assert!(dec.pending_len() <= 2 * (MAX_FRAME + 1));
                }
                prop_assert!(dropped + framed + dec.pending_len() <= total_in);
                let _ = dec.decode_eof(&mut buf);
            }
        }
    }
}
