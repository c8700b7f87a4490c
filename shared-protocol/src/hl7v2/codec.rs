//! Sans-IO HL7 v2 over MLLP: the MLLP framer, the HL7 v2 message parser
//! (encoding characters, escapes, segments) and the ACK encoder.
//!
//! # MLLP (HL7 v2 Implementation Guide, appendix C "Lower Layer Protocols",
//! section C.4 "Minimal Lower Layer Protocol", release 2)
//!
//! ```text
//! <SB> message <EB><CR>      SB = 0x0B, EB = 0x1C, CR = 0x0D
//! ```
//!
//! The message itself never contains SB or EB. [`MllpDecoder::decode`]
//! follows the project's decoder contract (`Ok(None)` = need more bytes):
//! bytes before a start block are junk, dropped and reported
//! ([`MllpError::Junk`]); a start block inside an unfinished message
//! means the previous one was truncated ([`MllpError::Truncated`]); a
//! message longer than the cap is dropped up to its end block
//! ([`MllpError::Oversized`], carrying the message's first bytes so the
//! caller can still name its control id in a reject). All MLLP errors are
//! recoverable.
//!
//! # HL7 v2 encoding (HL7 v2.5 chapter 2, section 2.5 "Message
//! construction rules" and 2.7 "Use of escape sequences in text fields")
//!
//! Segments end with CR. `MSH` is followed by the field separator (MSH-1)
//! and the encoding characters (MSH-2: component, repetition, escape,
//! subcomponent, in that order). Every other field is split by those
//! characters; escape sequences `\F\ \S\ \T\ \R\ \E\` stand for the
//! delimiters themselves and are decoded only after splitting.

use bytes::{Buf, BytesMut};

/// MLLP start block.
pub const SB: u8 = 0x0B;
/// MLLP end block (followed by [`CR`]).
pub const EB: u8 = 0x1C;
/// Segment terminator, and the byte after the end block.
pub const CR: u8 = 0x0D;

/// Default cap on one message's size (between SB and EB).
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;
/// How many leading bytes of an oversized message are kept (to find its
/// MSH-10 control id for the reject).
pub const OVERSIZED_HEAD: usize = 1024;

/// Why MLLP input was dropped. All recoverable: the decoder has resynced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MllpError {
    #[error("{dropped} bytes outside an MLLP block dropped")]
    Junk { dropped: usize },
    #[error("MLLP block without end block (a new start block came first); {dropped} bytes dropped")]
    Truncated { dropped: usize },
    #[error("MLLP message larger than {max} bytes; {dropped} bytes dropped so far")]
    Oversized {
        max: usize,
        dropped: usize,
        /// The first bytes of the message (at most [`OVERSIZED_HEAD`]).
        head: Vec<u8>,
    },
}

impl MllpError {
    pub fn dropped(&self) -> usize {
        match self {
            MllpError::Junk { dropped }
            | MllpError::Truncated { dropped }
            | MllpError::Oversized { dropped, .. } => *dropped,
        }
    }

    /// Every MLLP error is recoverable: the stream resyncs at the next SB.
    pub fn is_recoverable(&self) -> bool {
        true
    }
}

/// Stateful MLLP de-framer.
#[derive(Debug)]
pub struct MllpDecoder {
    max_message: usize,
    /// Dropping the rest of an oversized message until its end block.
    skipping: bool,
    /// Bytes of `buf` (after SB) already searched for EB.
    scanned: usize,
}

impl Default for MllpDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_MESSAGE)
    }
}

impl MllpDecoder {
    /// A decoder refusing messages longer than `max_message` bytes (min 16).
    pub fn new(max_message: usize) -> Self {
        MllpDecoder {
            max_message: max_message.max(16),
            skipping: false,
            scanned: 0,
        }
    }

    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Decode one message (the bytes between SB and EB CR) from `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<u8>>, MllpError> {
        if self.skipping {
            // Inside an oversized message: drop to its end (EB CR, or a new SB).
            let mut i = 0;
            while i < buf.len() {
                match buf[i] {
                    SB => {
                        self.skipping = false;
                        buf.advance(i);
                        return self.decode(buf);
                    }
                    EB if buf.get(i + 1) == Some(&CR) => {
                        self.skipping = false;
                        buf.advance(i + 2);
                        return self.decode(buf);
                    }
                    EB if i + 1 == buf.len() => break, // CR may follow
                    _ => i += 1,
                }
            }
            buf.advance(i);
            return Ok(None);
        }
        if buf.is_empty() {
            return Ok(None);
        }
        if buf[0] != SB {
            let dropped = buf.iter().position(|&b| b == SB).unwrap_or(buf.len());
            buf.advance(dropped);
            self.scanned = 0;
            return Err(MllpError::Junk { dropped });
        }
        let start = 1 + self.scanned;
        let mut i = start;
        while i < buf.len() {
            match buf[i] {
                SB => {
                    // The block in progress never ended: drop it, resync here.
                    buf.advance(i);
                    self.scanned = 0;
                    return Err(MllpError::Truncated { dropped: i });
                }
                EB => match buf.get(i + 1) {
                    Some(&CR) => {
                        let frame = buf.split_to(i + 2);
                        self.scanned = 0;
                        let body = &frame[1..i];
                        if body.len() > self.max_message {
                            return Err(MllpError::Oversized {
                                max: self.max_message,
                                dropped: frame.len(),
                                head: body[..OVERSIZED_HEAD.min(body.len())].to_vec(),
                            });
                        }
                        return Ok(Some(body.to_vec()));
                    }
                    None => break, // wait for the byte after EB
                    Some(_) => {
                        // EB not followed by CR: corrupt block; drop through it.
                        buf.advance(i + 1);
                        self.scanned = 0;
                        return Err(MllpError::Truncated { dropped: i + 1 });
                    }
                },
                _ => i += 1,
            }
        }
        self.scanned = i - 1;
        if buf.len() - 1 > self.max_message + 1 {
            let head = buf[1..(1 + OVERSIZED_HEAD).min(buf.len())].to_vec();
            let dropped = buf.len();
            buf.clear();
            self.scanned = 0;
            self.skipping = true;
            return Err(MllpError::Oversized {
                max: self.max_message,
                dropped,
                head,
            });
        }
        Ok(None)
    }
}

/// Wrap a message in an MLLP block.
pub fn mllp_encode(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 3);
    out.push(SB);
    out.extend_from_slice(message);
    out.extend_from_slice(&[EB, CR]);
    out
}

/// The five delimiters of a message (MSH-1, MSH-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delimiters {
    pub field: u8,
    pub component: u8,
    pub repetition: u8,
    pub escape: u8,
    pub subcomponent: u8,
}

impl Default for Delimiters {
    /// `|^~\&`, the HL7-recommended values.
    fn default() -> Self {
        Delimiters {
            field: b'|',
            component: b'^',
            repetition: b'~',
            escape: b'\\',
            subcomponent: b'&',
        }
    }
}

impl Delimiters {
    /// MSH-2 as written.
    pub fn encoding_characters(&self) -> String {
        String::from_utf8_lossy(&[
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
        ])
        .into_owned()
    }

    /// Escape text so it survives as one (sub)component (chapter 2.7).
    pub fn escape(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            let code = match u8::try_from(c) {
                Ok(b) if b == self.field => Some('F'),
                Ok(b) if b == self.component => Some('S'),
                Ok(b) if b == self.subcomponent => Some('T'),
                Ok(b) if b == self.repetition => Some('R'),
                Ok(b) if b == self.escape => Some('E'),
                _ => None,
            };
            match code {
                Some(k) => {
                    out.push(self.escape as char);
                    out.push(k);
                    out.push(self.escape as char);
                }
                // CR/LF would end the segment; the ACK text never needs them.
                None if c == '\r' || c == '\n' => out.push(' '),
                None => out.push(c),
            }
        }
        out
    }

    /// Decode escape sequences of one (already split) component.
    /// `\F\ \S\ \T\ \R\ \E\` become the delimiters; `\Xhh…\` hex data is
    /// decoded; `\H\ \N\` (highlighting) are dropped; `\.br\` is a line
    /// break; anything else (including an unterminated escape) stays as
    /// written.
    pub fn unescape(&self, raw: &str) -> String {
        let esc = self.escape as char;
        if !raw.contains(esc) {
            return raw.to_string();
        }
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(p) = rest.find(esc) {
            out.push_str(&rest[..p]);
            let after = &rest[p + 1..];
            let Some(end) = after.find(esc) else {
                out.push_str(&rest[p..]);
                return out;
            };
            let seq = &after[..end];
            match seq {
                "F" => out.push(self.field as char),
                "S" => out.push(self.component as char),
                "T" => out.push(self.subcomponent as char),
                "R" => out.push(self.repetition as char),
                "E" => out.push(esc),
                "H" | "N" => {}
                ".br" => out.push('\n'),
                s if s.len() > 1
                    && s.starts_with('X')
                    && s.len() % 2 == 1
                    && s[1..].bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    let bytes: Vec<u8> = (1..s.len())
                        .step_by(2)
                        .filter_map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
                        .collect();
                    out.push_str(&String::from_utf8_lossy(&bytes));
                }
                _ => {
                    out.push(esc);
                    out.push_str(seq);
                    out.push(esc);
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// Why a message could not be parsed as HL7 v2 (leads to an AR).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message does not start with an MSH segment")]
    NoMsh,
    #[error("MSH-1/MSH-2 encoding characters are missing or invalid")]
    BadEncodingCharacters,
    #[error("segment {index} has an invalid segment id")]
    BadSegmentId { index: usize },
    #[error("message is not text (NUL or other control bytes)")]
    NotText,
}

/// One segment, fields kept as written (escaped). `field(n)` is HL7's
/// field n (for MSH, field 1 is the field separator and 2 the encoding
/// characters, as in the standard's numbering).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub id: String,
    fields: Vec<String>,
}

impl Segment {
    /// Raw (escaped) field `n`, "" when absent.
    pub fn field(&self, n: usize) -> &str {
        self.fields.get(n).map(String::as_str).unwrap_or("")
    }

    /// Number of the last field present.
    pub fn field_count(&self) -> usize {
        self.fields.len().saturating_sub(1)
    }
}

/// A parsed HL7 v2 message: delimiters and segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub delimiters: Delimiters,
    pub segments: Vec<Segment>,
}

impl Message {
    /// Split a message into segments and fields (no semantics).
    ///
    /// Segments are separated by CR (chapter 2.5.1); LF and CR LF are
    /// accepted too (common in files and some interfaces), empty segments
    /// are skipped. Bytes that are not UTF-8 are replaced (U+FFFD), since
    /// MSH-18 character sets are not interpreted.
    pub fn parse(bytes: &[u8]) -> Result<Message, ParseError> {
        if bytes
            .iter()
            .any(|&b| b < 0x20 && !matches!(b, b'\r' | b'\n' | b'\t'))
        {
            return Err(ParseError::NotText);
        }
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_start_matches(['\r', '\n']);
        if !text.starts_with("MSH") {
            return Err(ParseError::NoMsh);
        }
        let b = text.as_bytes();
        if b.len() < 8 {
            return Err(ParseError::BadEncodingCharacters);
        }
        let d = Delimiters {
            field: b[3],
            component: b[4],
            repetition: b[5],
            escape: b[6],
            subcomponent: b[7],
        };
        let all = [d.field, d.component, d.repetition, d.escape, d.subcomponent];
        let distinct = all.iter().enumerate().all(|(i, x)| !all[..i].contains(x));
        if !distinct
            || all
                .iter()
                .any(|c| c.is_ascii_alphanumeric() || !c.is_ascii_graphic())
        {
            return Err(ParseError::BadEncodingCharacters);
        }
        let field_sep = d.field as char;
        let mut segments = Vec::new();
        for (index, seg) in text
            .split(['\r', '\n'])
            .filter(|s| !s.trim().is_empty())
            .enumerate()
        {
            let mut parts = seg.split(field_sep);
            let id = parts.next().unwrap_or_default().to_string();
            if id.len() != 3
                || !id
                    .bytes()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
                || (index == 0) != (id == "MSH")
            {
                return Err(ParseError::BadSegmentId { index: index + 1 });
            }
            let mut fields = vec![id.clone()];
            if id == "MSH" {
                fields.push(field_sep.to_string());
            }
            fields.extend(parts.map(str::to_string));
            if id == "MSH" && fields.get(2).map(|f| f.len()) < Some(4) {
                return Err(ParseError::BadEncodingCharacters);
            }
            segments.push(Segment { id, fields });
        }
        Ok(Message {
            delimiters: d,
            segments,
        })
    }

    pub fn msh(&self) -> &Segment {
        &self.segments[0]
    }

    /// Repetitions of a raw field.
    pub fn repetitions<'a>(&self, raw_field: &'a str) -> Vec<&'a str> {
        if raw_field.is_empty() {
            return vec![];
        }
        raw_field
            .split(self.delimiters.repetition as char)
            .collect()
    }

    /// Component `c` (1-based) of a raw field repetition, unescaped ("" when
    /// absent). Subcomponents are kept (with their separator) — use
    /// [`Self::subcomponent`] to split them.
    pub fn component(&self, raw_rep: &str, c: usize) -> String {
        let comp = raw_rep
            .split(self.delimiters.component as char)
            .nth(c.saturating_sub(1))
            .unwrap_or("");
        // Unescape per subcomponent so an escaped `&` is not confused with a
        // separator, then join back with the separator.
        comp.split(self.delimiters.subcomponent as char)
            .map(|s| self.delimiters.unescape(s))
            .collect::<Vec<_>>()
            .join(&(self.delimiters.subcomponent as char).to_string())
    }

    /// Subcomponent `s` (1-based) of component `c` of a raw repetition.
    pub fn subcomponent(&self, raw_rep: &str, c: usize, s: usize) -> String {
        let comp = raw_rep
            .split(self.delimiters.component as char)
            .nth(c.saturating_sub(1))
            .unwrap_or("");
        let sub = comp
            .split(self.delimiters.subcomponent as char)
            .nth(s.saturating_sub(1))
            .unwrap_or("");
        self.delimiters.unescape(sub)
    }

    /// Component `c` of the first repetition of field `f` of `seg`.
    pub fn get(&self, seg: &Segment, f: usize, c: usize) -> String {
        let raw = seg.field(f);
        let first = raw.split(self.delimiters.repetition as char).next();
        self.component(first.unwrap_or(""), c)
    }
}

/// MSA-1 acknowledgment code (HL7 table 0008, original mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// Application Accept: processed (durably buffered).
    Accept,
    /// Application Error: well-formed but refused; nothing was stored.
    Error,
    /// Application Reject: wrong message type/version, or unparseable.
    Reject,
}

impl AckCode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::Accept => "AA",
            AckCode::Error => "AE",
            AckCode::Reject => "AR",
        }
    }
}

/// One error for the ERR segment: location, HL7 error code (table 0357)
/// and a text that never holds patient data or values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    /// ERR-2 error location, e.g. `OBX^3^6` (segment id, sequence, field).
    pub location: String,
    /// HL7 table 0357 code, e.g. 103 "table value not found".
    pub code: u16,
    pub text: String,
}

/// HL7 table 0357 text for the codes used here.
pub fn error_code_text(code: u16) -> &'static str {
    match code {
        0 => "Message accepted",
        100 => "Segment sequence error",
        101 => "Required field missing",
        102 => "Data type error",
        103 => "Table value not found",
        200 => "Unsupported message type",
        201 => "Unsupported event code",
        203 => "Unsupported version id",
        206 => "Application record locked",
        207 => "Application internal error",
        _ => "Error",
    }
}

/// What the ACK is about: the original message's header fields (raw, as
/// written, in the original's delimiters) needed to answer it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckTarget {
    pub delimiters: Delimiters,
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
    /// MSH-10 (raw).
    pub control_id: String,
    /// MSH-11 processing id (raw), echoed.
    pub processing_id: String,
    /// MSH-12 version (raw), echoed.
    pub version: String,
    /// MSH-9.2 trigger event, echoed in the ACK's MSH-9.
    pub trigger: String,
}

impl AckTarget {
    /// Header fields of a parsed message.
    pub fn of(msg: &Message) -> AckTarget {
        let msh = msg.msh();
        AckTarget {
            delimiters: msg.delimiters,
            sending_application: msh.field(3).to_string(),
            sending_facility: msh.field(4).to_string(),
            receiving_application: msh.field(5).to_string(),
            receiving_facility: msh.field(6).to_string(),
            control_id: msh.field(10).to_string(),
            processing_id: msh.field(11).to_string(),
            version: msh.field(12).to_string(),
            trigger: msg.get(msh, 9, 2),
        }
    }

    /// Best effort for bytes that did not parse: split the first line on
    /// `|` to find MSH-10 etc. (may leave everything empty).
    pub fn best_effort(bytes: &[u8]) -> AckTarget {
        let end = bytes
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(bytes.len());
        let line = String::from_utf8_lossy(&bytes[..end]);
        if line.starts_with("MSH") && line.len() >= 8 {
            let mut fixed = line.into_owned();
            // Keep only what is printable ASCII: this is echoed back.
            fixed.retain(|c| c.is_ascii_graphic() || c == ' ');
            let line = format!("{fixed}\r");
            if let Ok(m) = Message::parse(line.as_bytes()) {
                return AckTarget::of(&m);
            }
        }
        AckTarget::default()
    }
}

/// Build an ACK (original acknowledgment mode) for `target`:
/// `MSH` with sender and receiver swapped, `MSA` with the code, the
/// original MSH-10 and a short text (MSA-3), and one `ERR` per error
/// (v2.5 layout: ERR-2 location, ERR-3 code, ERR-4 severity E, ERR-8 text).
///
/// `timestamp` is MSH-7 (`YYYYMMDDHHMMSS+ZZZZ`), `control_id` the ACK's own
/// MSH-10. Segments end with CR; the result is not MLLP-framed.
pub fn build_ack(
    target: &AckTarget,
    code: AckCode,
    errors: &[AckError],
    timestamp: &str,
    control_id: &str,
) -> Vec<u8> {
    let d = &target.delimiters;
    let f = d.field as char;
    let c = d.component as char;
    let version = if target.version.is_empty() {
        "2.5".to_string()
    } else {
        target.version.clone()
    };
    let processing = if target.processing_id.is_empty() {
        "P".to_string()
    } else {
        target.processing_id.clone()
    };
    let trigger = if target.trigger.is_empty() {
        "R01".to_string()
    } else {
        d.escape(&target.trigger)
    };
    let mut out = String::new();
    out.push_str(&format!(
        "MSH{f}{enc}{f}{ra}{f}{rf}{f}{sa}{f}{sf}{f}{ts}{f}{f}ACK{c}{trigger}{c}ACK{f}{cid}{f}{processing}{f}{version}\r",
        enc = d.encoding_characters(),
        ra = target.receiving_application,
        rf = target.receiving_facility,
        sa = target.sending_application,
        sf = target.sending_facility,
        ts = d.escape(timestamp),
        cid = d.escape(control_id),
    ));
    let text: String = errors
        .first()
        .map(|e| e.text.chars().take(80).collect())
        .unwrap_or_default();
    // MSA-2 echoes the control id, escaped like every other field: a `~` or
    // `^` in it must not turn into a separator on the sender's side.
    out.push_str(&format!(
        "MSA{f}{}{f}{}",
        code.as_str(),
        d.escape(&target.control_id)
    ));
    if !text.is_empty() {
        out.push_str(&format!("{f}{}", d.escape(&text)));
    }
    out.push('\r');
    for e in errors {
        let loc: Vec<String> = e.location.split('^').map(|p| d.escape(p)).collect();
        out.push_str(&format!(
            "ERR{f}{f}{loc}{f}{code}{c}{name}{c}HL70357{f}E{f}{f}{f}{f}{text}\r",
            loc = loc.join(&c.to_string()),
            code = e.code,
            name = d.escape(error_code_text(e.code)),
            text = d.escape(&e.text),
        ));
    }
    out.into_bytes()
}

/// MSA-1 and MSA-2 of an ACK message (for senders and tests).
pub fn parse_ack(bytes: &[u8]) -> Option<(String, String)> {
    let m = Message::parse(bytes).ok()?;
    let msa = m.segments.iter().find(|s| s.id == "MSA")?;
    Some((m.get(msa, 1, 1), m.get(msa, 2, 1)))
}
