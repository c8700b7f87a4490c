//! Sans-IO parser for the Masimo Radical-7 / Rad-8 / Radical-5 "ASCII 1"
//! serial output.
//!
//! Reference: Masimo Radical-7 Operator's Manual, "Serial Interface
//! Specifications" (ASCII 1 mode), and Rad-8 Operator's Manual §4 "Setup menu
//! level 3" (serial output mode). The device sends one CR LF terminated line
//! per second at 9600 8N1, no flow control, no request needed:
//!
//! ```text
//! 02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800
//! ^date    ^time    ^fields KEY=VALUE separated by single spaces
//! ```
//!
//! - Date is `MM/DD/YY`, time `HH:MM:SS`, from the device's own clock, which
//!   has no time zone (whatever staff set it to).
//! - A value made of dashes (`---`, `--.-`, `+--`) means "no value".
//! - `%` after SpO2/PI/SpCO/SpMet is the unit and is not part of the number.
//! - `ALARM` is 4 hex digits of alarm state, `EXC` 6 hex digits of exception
//!   flags (see [`Exceptions`]).
//!
//! The decoder follows the project's one contract:
//! `decode(&mut BytesMut) -> Result<Option<Frame>, Error>`; `Ok(None)` means
//! "need more bytes". A line longer than [`MAX_LINE`] is dropped (resync at the
//! next line end) and reported as [`MasimoError::Oversized`]; a line that does
//! not parse is consumed and reported as [`MasimoError::Garbage`]. Both are
//! recoverable: the caller counts them and keeps decoding.

use bytes::{Buf, BytesMut};
use time::{Date, Month, PrimitiveDateTime, Time};

/// Longest line accepted, in bytes (a full ASCII 1 line is ~130 bytes; newer
/// firmware adds SpHb/PVI fields). Longer input is treated as corruption.
pub const MAX_LINE: usize = 512;

/// A parsed numeric field: absent from the line, present without a value
/// (dashes), or a number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Field {
    Absent,
    NoValue,
    Value(f64),
}

impl Field {
    pub fn value(self) -> Option<f64> {
        match self {
            Field::Value(v) => Some(v),
            _ => None,
        }
    }
}

/// Exception flags (`EXC=` field, 6 hex digits), per the Radical-7 serial
/// interface appendix's exception table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exceptions(pub u32);

impl Exceptions {
    pub const NO_SENSOR: u32 = 0x00_0001;
    pub const DEFECTIVE_SENSOR: u32 = 0x00_0002;
    pub const LOW_PERFUSION: u32 = 0x00_0004;
    pub const PULSE_SEARCH: u32 = 0x00_0008;
    pub const INTERFERENCE: u32 = 0x00_0010;
    pub const SENSOR_OFF: u32 = 0x00_0020;
    pub const AMBIENT_LIGHT: u32 = 0x00_0040;
    pub const UNRECOGNIZED_SENSOR: u32 = 0x00_0080;
    pub const LOW_SIGNAL_IQ: u32 = 0x00_0400;
    /// Bits that mark the SpO2/PR/PI values as unusable.
    pub const INVALIDATING: u32 =
        Self::NO_SENSOR | Self::DEFECTIVE_SENSOR | Self::SENSOR_OFF | Self::UNRECOGNIZED_SENSOR;
    /// Bits that make the values questionable.
    pub const QUESTIONING: u32 = Self::LOW_PERFUSION
        | Self::PULSE_SEARCH
        | Self::INTERFERENCE
        | Self::AMBIENT_LIGHT
        | Self::LOW_SIGNAL_IQ;
    /// Every bit this parser gives a meaning to. Others (e.g. 0x000800, seen
    /// with normal values in the manual's own example line) are mode bits
    /// that do not qualify the values; they are reported, not interpreted.
    pub const KNOWN: u32 = Self::INVALIDATING | Self::QUESTIONING;

    pub fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    /// Bits set that this parser does not interpret.
    pub fn unknown_bits(self) -> u32 {
        self.0 & !Self::KNOWN
    }
}

/// One decoded ASCII 1 line.
#[derive(Debug, Clone, PartialEq)]
pub struct MasimoFrame {
    /// Device clock time (no zone).
    pub device_time: PrimitiveDateTime,
    /// Serial number, when the line carries one with a value.
    pub serial: Option<String>,
    pub spo2: Field,
    pub pulse_rate: Field,
    pub perfusion_index: Field,
    pub spco: Field,
    pub spmet: Field,
    pub sphb: Field,
    pub pvi: Field,
    pub desat: Field,
    pub alarm: Option<u16>,
    pub exceptions: Exceptions,
    /// Fields this parser does not know, kept verbatim (KEY, VALUE).
    pub other: Vec<(String, String)>,
}

/// Why input was refused. All variants are recoverable: the offending bytes
/// have been consumed and decoding can continue with the next line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MasimoError {
    #[error("line of more than {MAX_LINE} bytes without a line end; dropped {dropped} bytes")]
    Oversized { dropped: usize },
    #[error("unparseable line ({reason}); dropped {dropped} bytes")]
    Garbage {
        reason: &'static str,
        dropped: usize,
    },
}

impl MasimoError {
    /// Bytes discarded because of this error.
    pub fn dropped(&self) -> usize {
        match self {
            MasimoError::Oversized { dropped } | MasimoError::Garbage { dropped, .. } => *dropped,
        }
    }

    /// Every Masimo decode error is recoverable (the stream resynchronises at
    /// the next line end); none means the link is unusable.
    pub fn is_recoverable(&self) -> bool {
        true
    }
}

/// Stateful line decoder. Holds whether it is currently skipping the rest of
/// an oversized line.
#[derive(Debug, Default)]
pub struct MasimoDecoder {
    skipping: bool,
}

impl MasimoDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decode one frame from `buf`. See the module docs for the contract.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<MasimoFrame>, MasimoError> {
        loop {
            let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                if buf.len() > MAX_LINE {
                    let dropped = buf.len();
                    buf.clear();
                    let first = !self.skipping;
                    self.skipping = true;
                    if first {
                        return Err(MasimoError::Oversized { dropped });
                    }
                    // Still inside the same oversized line: already reported.
                    continue;
                }
                return Ok(None);
            };
            let line = buf.split_to(nl + 1);
            if self.skipping {
                self.skipping = false;
                return Err(MasimoError::Oversized {
                    dropped: line.len(),
                });
            }
            let body = trim_line_end(&line);
            if body.is_empty() {
                // Blank lines (a bare CR LF) carry nothing; not an error.
                continue;
            }
            if body.len() > MAX_LINE {
                return Err(MasimoError::Oversized {
                    dropped: line.len(),
                });
            }
            return parse_line(body)
                .map(Some)
                .map_err(|reason| MasimoError::Garbage {
                    reason,
                    dropped: line.len(),
                });
        }
    }

    /// Bytes still buffered when the stream ends are an incomplete line; call
    /// this at EOF to account for them.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<MasimoFrame>, MasimoError> {
        match self.decode(buf)? {
            Some(f) => Ok(Some(f)),
            None if buf.is_empty() => Ok(None),
            None => {
                let dropped = buf.len();
                buf.advance(dropped);
                Err(MasimoError::Garbage {
                    reason: "incomplete line at end of stream",
                    dropped,
                })
            }
        }
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    // Some devices pad lines with spaces or a leading NUL/CR after reconnect.
    let mut start = 0;
    while start < end && matches!(line[start], b'\r' | b'\0' | b' ') {
        start += 1;
    }
    &line[start..end]
}

/// Parse one line (without its line end).
pub fn parse_line(line: &[u8]) -> Result<MasimoFrame, &'static str> {
    let text = std::str::from_utf8(line).map_err(|_| "not ASCII")?;
    if !text.is_ascii() {
        return Err("not ASCII");
    }
    let mut tokens = text.split(' ').filter(|t| !t.is_empty());
    let date = tokens.next().ok_or("missing date")?;
    let time = tokens.next().ok_or("missing time")?;
    let device_time = parse_date_time(date, time)?;

    let mut frame = MasimoFrame {
        device_time,
        serial: None,
        spo2: Field::Absent,
        pulse_rate: Field::Absent,
        perfusion_index: Field::Absent,
        spco: Field::Absent,
        spmet: Field::Absent,
        sphb: Field::Absent,
        pvi: Field::Absent,
        desat: Field::Absent,
        alarm: None,
        exceptions: Exceptions::default(),
        other: Vec::new(),
    };
    let mut fields = 0;
    for tok in tokens {
        let (key, value) = tok.split_once('=').ok_or("field without '='")?;
        fields += 1;
        match key {
            "SN" => {
                frame.serial = (!is_dashes(value)).then(|| value.to_string());
            }
            "SPO2" => frame.spo2 = parse_number(value, true)?,
            "BPM" => frame.pulse_rate = parse_number(value, false)?,
            "PI" => frame.perfusion_index = parse_number(value, true)?,
            "SPCO" => frame.spco = parse_number(value, true)?,
            "SPMET" => frame.spmet = parse_number(value, true)?,
            "SPHB" => frame.sphb = parse_number(value, false)?,
            "PVI" => frame.pvi = parse_number(value, true)?,
            "DESAT" => frame.desat = parse_number(value, false)?,
            "ALARM" => {
                frame.alarm =
                    Some(u16::from_str_radix(value, 16).map_err(|_| "ALARM is not 4 hex digits")?);
                if value.len() != 4 {
                    return Err("ALARM is not 4 hex digits");
                }
            }
            "EXC" => {
                if value.len() != 6 {
                    return Err("EXC is not 6 hex digits");
                }
                frame.exceptions =
                    Exceptions(u32::from_str_radix(value, 16).map_err(|_| "EXC is not hex")?);
            }
            _ => {
                if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err("malformed field name");
                }
                frame.other.push((key.to_string(), value.to_string()));
            }
        }
    }
    if fields == 0 {
        return Err("no fields after the time stamp");
    }
    Ok(frame)
}

fn is_dashes(v: &str) -> bool {
    // "---", "--.-", "+--": no digit at all, and at least one dash.
    v.contains('-') && v.bytes().all(|b| matches!(b, b'-' | b'.' | b'+'))
}

fn parse_number(value: &str, percent_allowed: bool) -> Result<Field, &'static str> {
    let v = if percent_allowed {
        value.strip_suffix('%').unwrap_or(value)
    } else {
        value
    };
    if v.is_empty() {
        return Err("empty value");
    }
    if is_dashes(v) {
        return Ok(Field::NoValue);
    }
    // Digits, at most one '.', optional leading sign (PIDELTA-style fields).
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    if digits.is_empty()
        || digits.bytes().filter(|&b| b == b'.').count() > 1
        || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        || digits.starts_with('.')
        || digits.ends_with('.')
    {
        return Err("malformed number");
    }
    v.parse::<f64>()
        .map(Field::Value)
        .map_err(|_| "malformed number")
}

fn parse_date_time(date: &str, time: &str) -> Result<PrimitiveDateTime, &'static str> {
    let d: Vec<&str> = date.split('/').collect();
    let t: Vec<&str> = time.split(':').collect();
    let two = |s: &str| -> Result<u8, &'static str> {
        if s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().map_err(|_| "bad date/time")
        } else {
            Err("bad date/time")
        }
    };
    if d.len() != 3 || t.len() != 3 {
        return Err("bad date/time");
    }
    let month = Month::try_from(two(d[0])?).map_err(|_| "bad month")?;
    let day = two(d[1])?;
    // Two-digit year: the device family postdates 2000.
    let year = 2000 + i32::from(two(d[2])?);
    let date = Date::from_calendar_date(year, month, day).map_err(|_| "bad date")?;
    let time = Time::from_hms(two(t[0])?, two(t[1])?, two(t[2])?).map_err(|_| "bad time")?;
    Ok(PrimitiveDateTime::new(date, time))
}

/// Format a line exactly as the device does (used by the simulator and by
/// round-trip tests). Values are rendered in the device's fixed widths.
pub fn format_line(f: &MasimoFrame) -> String {
    fn num(field: Field, width: usize, decimals: usize, percent: bool) -> String {
        let s = match field {
            Field::Value(v) => format!("{v:0width$.decimals$}"),
            Field::NoValue | Field::Absent => {
                if decimals > 0 {
                    format!(
                        "{}.{}",
                        "-".repeat(width - decimals - 1),
                        "-".repeat(decimals)
                    )
                } else {
                    "-".repeat(width)
                }
            }
        };
        if percent { s + "%" } else { s }
    }
    let dt = f.device_time;
    let mut line = format!(
        "{:02}/{:02}/{:02} {:02}:{:02}:{:02}",
        u8::from(dt.month()),
        dt.day(),
        dt.year() % 100,
        dt.hour(),
        dt.minute(),
        dt.second()
    );
    let sn = f.serial.clone().unwrap_or_else(|| "----------".into());
    line.push_str(&format!(" SN={sn}"));
    line.push_str(&format!(" SPO2={}", num(f.spo2, 3, 0, true)));
    line.push_str(&format!(" BPM={}", num(f.pulse_rate, 3, 0, false)));
    line.push_str(&format!(" PI={}", num(f.perfusion_index, 5, 2, true)));
    line.push_str(&format!(" SPCO={}", num(f.spco, 4, 1, true)));
    line.push_str(&format!(" SPMET={}", num(f.spmet, 4, 1, true)));
    line.push_str(&format!(" DESAT={}", num(f.desat, 2, 0, false)));
    line.push_str(" PIDELTA=+--");
    line.push_str(&format!(" ALARM={:04X}", f.alarm.unwrap_or(0)));
    line.push_str(&format!(" EXC={:06X}", f.exceptions.0));
    line.push_str("\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// The example line from the Radical-7 manual's ASCII 1 description
    /// (quoted in the Foundation issue).
    const MANUAL_LINE: &[u8] = b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% \
SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800\r\n";

    fn decode_all(input: &[u8]) -> (Vec<MasimoFrame>, Vec<MasimoError>) {
        let mut dec = MasimoDecoder::new();
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

    #[test]
    fn parses_the_manual_example() {
        let (frames, errors) = decode_all(MANUAL_LINE);
        assert!(errors.is_empty(), "{errors:?}");
        let f = &frames[0];
        assert_eq!(f.device_time, datetime!(2016-02-22 22:47:45));
        assert_eq!(f.serial.as_deref(), Some("0000056661"));
        assert_eq!(f.spo2, Field::Value(98.0));
        assert_eq!(f.pulse_rate, Field::Value(97.0));
        assert_eq!(f.perfusion_index, Field::Value(3.6));
        assert_eq!(f.spco, Field::NoValue);
        assert_eq!(f.spmet, Field::NoValue);
        assert_eq!(f.desat, Field::NoValue);
        assert_eq!(f.alarm, Some(0));
        assert_eq!(f.exceptions, Exceptions(0x800));
        assert_eq!(f.exceptions.unknown_bits(), 0x800);
        assert_eq!(f.other, vec![("PIDELTA".to_string(), "+--".to_string())]);
    }

    #[test]
    fn needs_more_bytes_until_line_end() {
        let mut dec = MasimoDecoder::new();
        let mut buf = BytesMut::from(&MANUAL_LINE[..40]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&MANUAL_LINE[40..]);
        assert!(dec.decode(&mut buf).unwrap().is_some());
        assert!(buf.is_empty());
    }

    #[test]
    fn sensor_off_line_has_no_values_and_flags() {
        // No sensor on the patient: dashes for the values, EXC bit 0x20.
        let line = b"11/24/26 10:00:01 SN=0000056661 SPO2=---% BPM=--- PI=--.--% SPCO=--.-% \
SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000020\r\n";
        let (frames, errors) = decode_all(line);
        assert!(errors.is_empty());
        assert_eq!(frames[0].spo2, Field::NoValue);
        assert_eq!(frames[0].pulse_rate, Field::NoValue);
        assert_eq!(frames[0].perfusion_index, Field::NoValue);
        assert!(frames[0].exceptions.has(Exceptions::SENSOR_OFF));
    }

    #[test]
    fn garbage_is_reported_and_skipped() {
        let mut input = Vec::new();
        input.extend_from_slice(b"\x00\xff\xfe noise\r\n");
        input.extend_from_slice(b"13/45/16 22:47:45 SPO2=098%\r\n"); // month 13
        input.extend_from_slice(b"02/22/16 22:47:45 SPO2=09x%\r\n"); // bad number
        input.extend_from_slice(b"02/22/16 22:47:45 EXC=0008\r\n"); // short EXC
        input.extend_from_slice(MANUAL_LINE);
        let (frames, errors) = decode_all(&input);
        assert_eq!(frames.len(), 1, "the good line after the garbage survives");
        assert_eq!(errors.len(), 4);
        assert!(errors.iter().all(MasimoError::is_recoverable));
        let dropped: usize = errors.iter().map(MasimoError::dropped).sum();
        assert_eq!(dropped, input.len() - MANUAL_LINE.len());
    }

    #[test]
    fn oversized_line_is_dropped_and_stream_resyncs() {
        let mut dec = MasimoDecoder::new();
        let mut buf = BytesMut::from(&vec![b'A'; MAX_LINE + 10][..]);
        let err = dec.decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            MasimoError::Oversized {
                dropped: MAX_LINE + 10
            }
        );
        // The rest of the same runaway line, then a good line.
        buf.extend_from_slice(b"AAAA\r\n");
        buf.extend_from_slice(MANUAL_LINE);
        assert_eq!(
            dec.decode(&mut buf),
            Err(MasimoError::Oversized { dropped: 6 })
        );
        assert!(dec.decode(&mut buf).unwrap().is_some());
    }

    #[test]
    fn blank_lines_are_ignored() {
        let mut input = b"\r\n\r\n".to_vec();
        input.extend_from_slice(MANUAL_LINE);
        let (frames, errors) = decode_all(&input);
        assert_eq!((frames.len(), errors.len()), (1, 0));
    }

    #[test]
    fn eof_with_partial_line_is_counted() {
        let mut dec = MasimoDecoder::new();
        let mut buf = BytesMut::from(&b"02/22/16 22:4"[..]);
        assert!(matches!(
            dec.decode_eof(&mut buf),
            Err(MasimoError::Garbage { dropped: 13, .. })
        ));
    }

    #[test]
    fn format_then_parse_round_trips() {
        let f = parse_line(&MANUAL_LINE[..MANUAL_LINE.len() - 2]).unwrap();
        let line = format_line(&f);
        assert_eq!(line.as_bytes(), MANUAL_LINE);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_field(max: f64, decimals: u32) -> impl Strategy<Value = Field> {
            let scale = 10f64.powi(decimals as i32);
            prop_oneof![
                Just(Field::NoValue),
                (0..=(max * scale) as u32).prop_map(move |v| Field::Value(f64::from(v) / scale)),
            ]
        }

        proptest! {
            #[test]
            fn round_trip(
                spo2 in arb_field(100.0, 0),
                bpm in arb_field(300.0, 0),
                pi in arb_field(20.0, 2),
                exc in 0u32..0x1000,
                alarm in any::<u16>(),
                secs in 0i64..(80 * 365 * 86_400),
            ) {
                let base = datetime!(2000-01-01 00:00:00);
                let f = MasimoFrame {
                    device_time: base + time::Duration::seconds(secs),
                    serial: Some("0000056661".into()),
                    spo2, pulse_rate: bpm, perfusion_index: pi,
                    spco: Field::NoValue, spmet: Field::NoValue,
                    sphb: Field::Absent, pvi: Field::Absent,
                    desat: Field::NoValue,
                    alarm: Some(alarm),
                    exceptions: Exceptions(exc),
                    other: vec![("PIDELTA".into(), "+--".into())],
                };
                let line = format_line(&f);
                let (frames, errors) = decode_all(line.as_bytes());
                prop_assert!(errors.is_empty());
                prop_assert_eq!(&frames[0], &f);
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_are_fully_consumed_or_pending(
                chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)
            ) {
                let mut dec = MasimoDecoder::new();
                let mut buf = BytesMut::new();
                let mut total_in = 0usize;
                let mut accounted = 0usize;
                let mut frames = 0usize;
                for c in chunks {
                    total_in += c.len();
                    buf.extend_from_slice(&c);
                    let before = buf.len();
                    loop {
                        match dec.decode(&mut buf) {
                            Ok(Some(_)) => frames += 1,
                            Ok(None) => break,
                            Err(e) => accounted += e.dropped(),
                        }
                    }
                    prop_assert!(buf.len() <= MAX_LINE.max(before));
                }
                // Bytes are either dropped (and reported), pending, or went
                // into frames/blank lines: never more dropped than received.
                prop_assert!(accounted + buf.len() <= total_in);
                let _ = frames;
            }
        }
    }
}
