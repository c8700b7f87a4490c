//! Sans-IO codec for the GE Datex-Ohmeda S/5 "Computer Interface" (Datex
//! Record Interface, DRI) on the monitor's serial port.
//!
//! # Sources
//!
//! The S/5 Computer Interface Specification (Datex-Ohmeda / GE, document
//! "S/5 Computer Interface Specification", sections "Asynchronous interface"
//! and "Datex Record Interface") is not publicly downloadable. The facts used
//! here were taken from public re-statements of it, read for facts only:
//! - VSCapture (xeonfusion, LGPL), `DSerialPort.cs` / `DataConstants.cs`:
//!   serial settings (19200, 8, even, 1, RTS/CTS), frame characters
//!   (0x7E flag, 0x7D control + bit-5 complement), checksum (sum of the
//!   unescaped bytes between the flags, excluding the checksum byte itself,
//!   modulo 256), the 49-byte physiological-data request, DRI levels, the
//!   stop request (same request with interval 0), validity macros.
//! - public header transcriptions of `datex_hdr`, `dri_phdb`, `basic_phdb`
//!   and the group structures (`group_hdr` = `dword status; word label`),
//!   with the size comments 40 (header), 270 (basic class) and the per-group
//!   sizes used for the offsets below; a public measure table giving, per
//!   field, the unit and scaling (e.g. `co2.et` in 0.01 %, `nibp.sys` in
//!   0.01 mmHg, `ecg.hr` in 1/min, `t.temp` in 0.01 °C), status bit 0
//!   "module exists" and bit 1 "measurement active" of every group.
//!
//! # Frame (asynchronous interface)
//!
//! ```text
//! 0x7E | escaped( record bytes | checksum ) | 0x7E
//! ```
//! Inside the flags, 0x7E and 0x7D are sent as 0x7D followed by the byte
//! with bit 5 complemented (0x7E → 7D 5E, 0x7D → 7D 5D); the checksum is the
//! 8-bit sum of the unescaped record bytes. It is escaped like any other
//! byte (the receiver unescapes everything between the flags).
//!
//! # Record
//!
//! A record is a 40-byte `datex_hdr` followed by up to 8 sub-records whose
//! (offset, type) descriptors are in the header; offsets are relative to the
//! first byte after the header; the list ends at type 0xFF.
//!
//! ```text
//! off len field
//!  0   2  r_len       i16 LE, whole record length incl. header
//!  2   1  r_nbr
//!  3   1  dri_level
//!  4   2  plug_id
//!  6   4  r_time      u32 LE, Unix time (monitor clock)
//! 10   1  n_subnet / reserved
//! 11   1  reserved
//! 12   2  reserved
//! 14   2  r_maintype  i16 LE (0 = physiological data, 1 = waveforms, 4 = alarms)
//! 16  24  sr_desc[8]  each: i16 LE offset, u8 type
//! ```
//!
//! # Decoder contract
//!
//! `decode(&mut BytesMut) -> Result<Option<DatexRecord>, DatexError>`:
//! `Ok(None)` = need more bytes. Bytes before a start flag are dropped and
//! reported ([`DatexError::Garbage`]); a frame longer than [`MAX_RAW_FRAME`]
//! is dropped ([`DatexError::Oversized`]); a frame with a bad escape or
//! checksum, or whose record does not parse, is dropped and reported. Every
//! error is recoverable: the closing flag is kept as the next possible start
//! flag, so decoding resynchronises on the next frame.

use bytes::{Buf, BytesMut};

/// Frame start/end flag (`FRAMECHAR`).
pub const FLAG: u8 = 0x7E;
/// Escape character (`CTRLCHAR`); the next byte has bit 5 complemented.
pub const ESCAPE: u8 = 0x7D;
/// Bit complemented in an escaped byte.
pub const ESCAPE_XOR: u8 = 0x20;

/// Length of `datex_hdr`.
pub const HEADER_LEN: usize = 40;
/// Largest record accepted: the 40-byte header plus the 1450-byte data area
/// of `datex_record` (VSCapture sizes its record buffer 1490 bytes).
pub const MAX_RECORD: usize = 1490;
/// Largest escaped frame accepted, flags included: every byte of the
/// largest record and its checksum escaped, plus two flags.
pub const MAX_RAW_FRAME: usize = 2 * (MAX_RECORD + 1) + 2;

/// `r_maintype` of physiological data records (`DRI_MT_PHDB`).
pub const DRI_MT_PHDB: i16 = 0;
/// `r_maintype` of waveform records (`DRI_MT_WAVE`).
pub const DRI_MT_WAVE: i16 = 1;
/// `r_maintype` of alarm records (`DRI_MT_ALARM`).
pub const DRI_MT_ALARM: i16 = 4;
/// Sub-record type ending the descriptor list (`DRI_EOL_SUBR_LIST`).
pub const DRI_EOL_SUBR_LIST: u8 = 0xFF;
/// Physiological sub-record type: displayed values (`DRI_PH_DISPL`).
pub const DRI_PH_DISPL: u8 = 1;
/// Physiological sub-record type: 10 s trend (`DRI_PH_10S_TREND`).
pub const DRI_PH_10S_TREND: u8 = 2;
/// Physiological sub-record type: 60 s trend (`DRI_PH_60S_TREND`).
pub const DRI_PH_60S_TREND: u8 = 3;
/// Class bit field: request the basic class (`DRI_PHDBCL_REQ_BASIC_MASK`,
/// the absence of the "deny basic" bit 0x0001).
pub const DRI_PHDBCL_REQ_BASIC_MASK: u32 = 0x0000;
/// Length of the physiological-data request record (header + `dri_phdb_req`).
pub const PHDB_REQUEST_LEN: usize = 49;

/// DRI interface levels (`r_dri_level`), from VSCapture's constants.
pub const DRI_LEVEL_2001: u8 = 0x07;
pub const DRI_LEVEL_2003: u8 = 0x08;
pub const DRI_LEVEL_2005: u8 = 0x09;

/// Size of the basic physiological class (`basic_phdb`).
pub const BASIC_LEN: usize = 270;
/// Size of a `dri_phdb` sub-record holding one class (the C declaration is a
/// union): time (4) + class (270) + marker (1) + reserved (1) +
/// cl_drilvl_subt (2).
pub const PHDB_UNION_LEN: usize = 4 + BASIC_LEN + 4;
/// Size of a `dri_phdb` laid out with all four classes one after the other
/// (as VSCapture's 1088-byte structure reads it). Which layout a monitor
/// sends could not be confirmed from public sources: both are accepted.
pub const PHDB_FULL_LEN: usize = 4 + 4 * BASIC_LEN + 4;

/// Reserved values: anything at or below this is a status, not a number
/// (`DATA_INVALID_LIMIT`).
pub const DATA_INVALID_LIMIT: i16 = -32001;
pub const DATA_INVALID: i16 = -32767;
pub const DATA_NOT_UPDATED: i16 = -32766;
pub const DATA_DISCONT: i16 = -32765;
pub const DATA_UNDER_RANGE: i16 = -32764;
pub const DATA_OVER_RANGE: i16 = -32763;
pub const DATA_NOT_CALIBRATED: i16 = -32762;

/// One sub-record descriptor of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SrDesc {
    pub offset: i16,
    pub sr_type: u8,
}

/// `datex_hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DatexHeader {
    pub r_len: i16,
    pub r_nbr: u8,
    pub dri_level: u8,
    pub plug_id: u16,
    /// Unix time by the monitor's clock.
    pub r_time: u32,
    pub reserved1: u8,
    pub reserved2: u8,
    pub reserved3: u16,
    pub maintype: i16,
    pub sr: [SrDesc; 8],
}

impl DatexHeader {
    pub fn parse(b: &[u8]) -> Option<DatexHeader> {
        if b.len() < HEADER_LEN {
            return None;
        }
        let mut sr = [SrDesc::default(); 8];
        for (i, d) in sr.iter_mut().enumerate() {
            let o = 16 + 3 * i;
            *d = SrDesc {
                offset: i16::from_le_bytes([b[o], b[o + 1]]),
                sr_type: b[o + 2],
            };
        }
        Some(DatexHeader {
            r_len: i16::from_le_bytes([b[0], b[1]]),
            r_nbr: b[2],
            dri_level: b[3],
            plug_id: u16::from_le_bytes([b[4], b[5]]),
            r_time: u32::from_le_bytes([b[6], b[7], b[8], b[9]]),
            reserved1: b[10],
            reserved2: b[11],
            reserved3: u16::from_le_bytes([b[12], b[13]]),
            maintype: i16::from_le_bytes([b[14], b[15]]),
            sr,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&self.r_len.to_le_bytes());
        b[2] = self.r_nbr;
        b[3] = self.dri_level;
        b[4..6].copy_from_slice(&self.plug_id.to_le_bytes());
        b[6..10].copy_from_slice(&self.r_time.to_le_bytes());
        b[10] = self.reserved1;
        b[11] = self.reserved2;
        b[12..14].copy_from_slice(&self.reserved3.to_le_bytes());
        b[14..16].copy_from_slice(&self.maintype.to_le_bytes());
        for (i, d) in self.sr.iter().enumerate() {
            let o = 16 + 3 * i;
            b[o..o + 2].copy_from_slice(&d.offset.to_le_bytes());
            b[o + 2] = d.sr_type;
        }
        b
    }

    /// The descriptors before the end-of-list marker.
    pub fn subrecords(&self) -> impl Iterator<Item = SrDesc> + '_ {
        self.sr
            .iter()
            .copied()
            .take_while(|d| d.sr_type != DRI_EOL_SUBR_LIST)
    }
}

/// One record: the header and the bytes after it (`r_len - 40` bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatexRecord {
    pub header: DatexHeader,
    pub data: Vec<u8>,
}

impl DatexRecord {
    /// Parse an unescaped record (without checksum).
    pub fn parse(b: &[u8]) -> Result<DatexRecord, &'static str> {
        let header = DatexHeader::parse(b).ok_or("record shorter than its 40-byte header")?;
        let len = usize::try_from(header.r_len).map_err(|_| "negative r_len")?;
        if len < HEADER_LEN {
            return Err("r_len shorter than the header");
        }
        if len > b.len() {
            return Err("r_len longer than the frame");
        }
        Ok(DatexRecord {
            header,
            data: b[HEADER_LEN..len].to_vec(),
        })
    }

    /// Serialise (header with its `r_len` as given, then the data).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.header.encode().to_vec();
        v.extend_from_slice(&self.data);
        v
    }

    /// The bytes of each sub-record named by the header: from its offset to
    /// the next descriptor's offset (or the end of the record).
    pub fn subrecord_bytes(&self) -> Vec<(u8, Result<&[u8], &'static str>)> {
        let descs: Vec<SrDesc> = self.header.subrecords().collect();
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let start = usize::try_from(d.offset).map_err(|_| "negative sub-record offset");
                let end = descs.get(i + 1).map_or(Ok(self.data.len()), |n| {
                    usize::try_from(n.offset).map_err(|_| "negative sub-record offset")
                });
                let bytes = match (start, end) {
                    (Ok(s), Ok(e)) if s <= e && e <= self.data.len() => Ok(&self.data[s..e]),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                    _ => Err("sub-record outside the record"),
                };
                (d.sr_type, bytes)
            })
            .collect()
    }
}

/// The 8-bit checksum: sum of the unescaped bytes modulo 256.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

fn push_escaped(out: &mut Vec<u8>, b: u8) {
    if b == FLAG || b == ESCAPE {
        out.push(ESCAPE);
        out.push(b ^ ESCAPE_XOR);
    } else {
        out.push(b);
    }
}

/// Frame a record for the wire: flag, escaped record and checksum, flag.
pub fn frame(record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.len() + 8);
    out.push(FLAG);
    for &b in record {
        push_escaped(&mut out, b);
    }
    push_escaped(&mut out, checksum(record));
    out.push(FLAG);
    out
}

/// Build the 49-byte physiological-data transmission request
/// (`datex_hdr` with maintype `DRI_MT_PHDB`, one sub-record of type 0 at
/// offset 0, then `dri_phdb_req { byte phdb_rcrd_type; short tx_ival;
/// dword phdb_class_bf; short reserved; }`). `interval_s == 0` stops the
/// transmission (VSCapture's StopTransfer).
pub fn phdb_request(dri_level: u8, record_type: u8, interval_s: i16, class_bf: u32) -> Vec<u8> {
    let mut sr = [SrDesc::default(); 8];
    sr[0] = SrDesc {
        offset: 0,
        sr_type: 0,
    };
    sr[1] = SrDesc {
        offset: 0,
        sr_type: DRI_EOL_SUBR_LIST,
    };
    let hdr = DatexHeader {
        r_len: PHDB_REQUEST_LEN as i16,
        dri_level,
        maintype: DRI_MT_PHDB,
        sr,
        ..DatexHeader::default()
    };
    let mut v = hdr.encode().to_vec();
    v.push(record_type);
    v.extend_from_slice(&interval_s.to_le_bytes());
    v.extend_from_slice(&class_bf.to_le_bytes());
    v.extend_from_slice(&0i16.to_le_bytes());
    v
}

/// Why input was dropped. All variants are recoverable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatexError {
    #[error("{dropped} bytes outside any frame")]
    Garbage { dropped: usize },
    #[error("frame longer than {MAX_RAW_FRAME} bytes; dropped {dropped} bytes")]
    Oversized { dropped: usize },
    #[error("bad escape sequence; dropped {dropped} bytes")]
    BadEscape { dropped: usize },
    #[error(
        "checksum mismatch (got {got:#04x}, computed {computed:#04x}); dropped {dropped} bytes"
    )]
    BadChecksum {
        got: u8,
        computed: u8,
        dropped: usize,
    },
    #[error("bad record ({reason}); dropped {dropped} bytes")]
    BadRecord {
        reason: &'static str,
        dropped: usize,
    },
}

impl DatexError {
    pub fn dropped(&self) -> usize {
        match self {
            DatexError::Garbage { dropped }
            | DatexError::Oversized { dropped }
            | DatexError::BadEscape { dropped }
            | DatexError::BadChecksum { dropped, .. }
            | DatexError::BadRecord { dropped, .. } => *dropped,
        }
    }

    /// Every error is recoverable: the stream resynchronises on the next flag.
    pub fn is_recoverable(&self) -> bool {
        true
    }
}

/// Frame decoder (stateless between calls: the buffer holds the state).
#[derive(Debug, Default)]
pub struct DatexDecoder;

impl DatexDecoder {
    pub fn new() -> Self {
        DatexDecoder
    }

    /// Decode one record. See the module docs for the contract.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<DatexRecord>, DatexError> {
        loop {
            let Some(start) = buf.iter().position(|&b| b == FLAG) else {
                if buf.is_empty() {
                    return Ok(None);
                }
                let dropped = buf.len();
                buf.clear();
                return Err(DatexError::Garbage { dropped });
            };
            if start > 0 {
                buf.advance(start);
                return Err(DatexError::Garbage { dropped: start });
            }
            let Some(end) = buf[1..].iter().position(|&b| b == FLAG).map(|p| p + 1) else {
                if buf.len() > MAX_RAW_FRAME {
                    let dropped = buf.len();
                    buf.clear();
                    return Err(DatexError::Oversized { dropped });
                }
                return Ok(None);
            };
            if end == 1 {
                // Two flags in a row: the end of one frame and the start of
                // the next (or an idle flag). Nothing to decode.
                buf.advance(1);
                continue;
            }
            // The start flag and the body; the closing flag stays as the
            // possible start of the next frame.
            let raw = buf.split_to(end);
            let dropped = raw.len();
            if dropped > MAX_RAW_FRAME {
                return Err(DatexError::Oversized { dropped });
            }
            let body = unescape(&raw[1..]).ok_or(DatexError::BadEscape { dropped })?;
            let Some((&got, record)) = body.split_last() else {
                return Err(DatexError::BadRecord {
                    reason: "empty frame",
                    dropped,
                });
            };
            let computed = checksum(record);
            if got != computed {
                return Err(DatexError::BadChecksum {
                    got,
                    computed,
                    dropped,
                });
            }
            if record.len() > MAX_RECORD {
                return Err(DatexError::Oversized { dropped });
            }
            return DatexRecord::parse(record)
                .map(Some)
                .map_err(|reason| DatexError::BadRecord { reason, dropped });
        }
    }
}

fn unescape(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    let mut it = b.iter();
    while let Some(&c) = it.next() {
        if c == ESCAPE {
            let &n = it.next()?;
            out.push(n ^ ESCAPE_XOR);
        } else {
            out.push(c);
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Physiological data (basic class).

/// `group_hdr`: status bits and label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupHdr {
    pub status: u32,
    pub label: u16,
}

impl GroupHdr {
    /// Status bit 0: the measurement module exists.
    pub const EXISTS: u32 = 1 << 0;
    /// Status bit 1: the measurement is active.
    pub const ACTIVE: u32 = 1 << 1;

    pub fn exists(self) -> bool {
        self.status & Self::EXISTS != 0
    }
    pub fn active(self) -> bool {
        self.status & Self::ACTIVE != 0
    }
    pub fn bit(self, n: u32) -> bool {
        n < 32 && self.status & (1 << n) != 0
    }
}

/// A group: header and its `N` int16 fields, in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group<const N: usize> {
    pub hdr: GroupHdr,
    pub v: [i16; N],
}

impl<const N: usize> Default for Group<N> {
    fn default() -> Self {
        Group {
            hdr: GroupHdr::default(),
            v: [0; N],
        }
    }
}

impl<const N: usize> Group<N> {
    /// Encoded size: 6-byte header + N × 2.
    pub const LEN: usize = 6 + 2 * N;

    fn parse(b: &[u8]) -> Self {
        let mut v = [0i16; N];
        for (i, x) in v.iter_mut().enumerate() {
            *x = i16::from_le_bytes([b[6 + 2 * i], b[7 + 2 * i]]);
        }
        Group {
            hdr: GroupHdr {
                status: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                label: u16::from_le_bytes([b[4], b[5]]),
            },
            v,
        }
    }

    fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.hdr.status.to_le_bytes());
        out[4..6].copy_from_slice(&self.hdr.label.to_le_bytes());
        for (i, x) in self.v.iter().enumerate() {
            out[6 + 2 * i..8 + 2 * i].copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Offsets of the groups inside `basic_phdb` (sizes: ecg 16, p 14 each,
/// nibp 14, t 8 each, SpO2 14, co2 14, …), per the public transcriptions of
/// the specification's structure declarations.
pub mod offsets {
    pub const ECG: usize = 0;
    pub const P: [usize; 4] = [16, 30, 44, 58];
    pub const NIBP: usize = 72;
    pub const T: [usize; 4] = [86, 94, 102, 110];
    pub const SPO2: usize = 118;
    pub const CO2: usize = 132;
    /// o2, n2o, aa, flow_vol, co_wedge, nmt, ecg_extra, svo2, p5, p6 and 2
    /// reserved bytes follow up to 270; not decoded here.
    pub const END_DECODED: usize = 146;
}

/// The groups of the basic class this driver decodes. Field order as in
/// the specification's structures:
/// - `ecg`: hr, st1, st2, st3, imp_rr
/// - `p[i]`: sys, dia, mean, hr
/// - `nibp`: sys, dia, mean, hr
/// - `t[i]`: temp
/// - `spo2`: SpO2, pr, ir_amp, SvO2
/// - `co2`: et, fi, rr, amb_press
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BasicPhdb {
    pub ecg: Group<5>,
    pub p: [Group<4>; 4],
    pub nibp: Group<4>,
    pub t: [Group<1>; 4],
    pub spo2: Group<4>,
    pub co2: Group<4>,
}

impl BasicPhdb {
    /// Parse the first 270 bytes of `b` (`None` when shorter).
    pub fn parse(b: &[u8]) -> Option<BasicPhdb> {
        if b.len() < BASIC_LEN {
            return None;
        }
        Some(BasicPhdb {
            ecg: Group::parse(&b[offsets::ECG..]),
            p: offsets::P.map(|o| Group::parse(&b[o..])),
            nibp: Group::parse(&b[offsets::NIBP..]),
            t: offsets::T.map(|o| Group::parse(&b[o..])),
            spo2: Group::parse(&b[offsets::SPO2..]),
            co2: Group::parse(&b[offsets::CO2..]),
        })
    }

    /// Encode into 270 bytes (groups not modelled here are zero).
    pub fn encode(&self) -> [u8; BASIC_LEN] {
        let mut b = [0u8; BASIC_LEN];
        self.ecg.encode(&mut b[offsets::ECG..]);
        for (g, o) in self.p.iter().zip(offsets::P) {
            g.encode(&mut b[o..]);
        }
        self.nibp.encode(&mut b[offsets::NIBP..]);
        for (g, o) in self.t.iter().zip(offsets::T) {
            g.encode(&mut b[o..]);
        }
        self.spo2.encode(&mut b[offsets::SPO2..]);
        self.co2.encode(&mut b[offsets::CO2..]);
        b
    }
}

/// One `dri_phdb` sub-record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phdb {
    /// Unix time by the monitor's clock.
    pub time: u32,
    /// The basic class, when this sub-record carries it.
    pub basic: Option<BasicPhdb>,
    pub marker: u8,
    pub cl_drilvl_subt: u16,
}

impl Phdb {
    /// Class number in bits 8–11 of `cl_drilvl_subt` (0 = basic).
    pub fn class(&self) -> u8 {
        ((self.cl_drilvl_subt >> 8) & 0x0F) as u8
    }

    /// Parse a sub-record in either layout (see [`PHDB_UNION_LEN`] and
    /// [`PHDB_FULL_LEN`]).
    pub fn parse(b: &[u8]) -> Result<Phdb, &'static str> {
        let tail = if b.len() >= PHDB_FULL_LEN {
            PHDB_FULL_LEN - 4
        } else if b.len() >= PHDB_UNION_LEN {
            PHDB_UNION_LEN - 4
        } else {
            return Err("physiological sub-record too short");
        };
        let time = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let marker = b[tail];
        let cl_drilvl_subt = u16::from_le_bytes([b[tail + 2], b[tail + 3]]);
        let class = ((cl_drilvl_subt >> 8) & 0x0F) as u8;
        // In the full layout the basic class is always first; in the union
        // layout the class bits say what the union holds.
        let basic = if tail == PHDB_FULL_LEN - 4 || class == 0 {
            BasicPhdb::parse(&b[4..])
        } else {
            None
        };
        Ok(Phdb {
            time,
            basic,
            marker,
            cl_drilvl_subt,
        })
    }

    /// Encode in the union layout (278 bytes).
    pub fn encode_union(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(PHDB_UNION_LEN);
        v.extend_from_slice(&self.time.to_le_bytes());
        v.extend_from_slice(&self.basic.unwrap_or_default().encode());
        v.push(self.marker);
        v.push(0);
        v.extend_from_slice(&self.cl_drilvl_subt.to_le_bytes());
        v
    }
}

/// A field value: a number (raw int16, to be scaled), or one of the
/// reserved status values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawValue {
    Value(i16),
    Invalid,
    NotUpdated,
    Discontinuity,
    UnderRange,
    OverRange,
    NotCalibrated,
    /// Another reserved value (≤ `DATA_INVALID_LIMIT`) without a known
    /// meaning.
    OtherReserved(i16),
}

impl RawValue {
    pub fn classify(v: i16) -> RawValue {
        match v {
            DATA_INVALID => RawValue::Invalid,
            DATA_NOT_UPDATED => RawValue::NotUpdated,
            DATA_DISCONT => RawValue::Discontinuity,
            DATA_UNDER_RANGE => RawValue::UnderRange,
            DATA_OVER_RANGE => RawValue::OverRange,
            DATA_NOT_CALIBRATED => RawValue::NotCalibrated,
            v if v <= DATA_INVALID_LIMIT => RawValue::OtherReserved(v),
            v => RawValue::Value(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> (Vec<DatexRecord>, Vec<DatexError>) {
        let mut dec = DatexDecoder::new();
        let mut buf = BytesMut::from(input);
        let (mut recs, mut errs) = (vec![], vec![]);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(r)) => recs.push(r),
                Ok(None) => break,
                Err(e) => errs.push(e),
            }
        }
        (recs, errs)
    }

    /// The request for displayed values every 10 s, basic + ext1..3 classes,
    /// as given in the specification's appendix example (quoted in a public
    /// re-statement): `7e 31 00 [level] 00 … 00 ff 00 … 00 01 0a 00 0e 00
    /// 00 00 00 00 [chk] 7e`.
    #[test]
    fn request_matches_the_appendix_layout() {
        let req = phdb_request(DRI_LEVEL_2005, DRI_PH_DISPL, 10, 0x0E);
        #[rustfmt::skip]
        let expected: [u8; 49] = [
            0x31, 0x00,             // r_len = 49
            0x00,                   // r_nbr
            0x09,                   // dri_level = DRI_LEVEL_2005
            0x00, 0x00,             // plug_id
            0x00, 0x00, 0x00, 0x00, // r_time
            0x00, 0x00, 0x00, 0x00, // reserved
            0x00, 0x00,             // r_maintype = DRI_MT_PHDB
            0x00, 0x00, 0x00,       // sr_desc[0]: offset 0, type 0 (request)
            0x00, 0x00, 0xFF,       // sr_desc[1]: end of list
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // sr_desc[2..8]
            0x01,                   // phdb_rcrd_type = DRI_PH_DISPL
            0x0A, 0x00,             // tx_ival = 10 s
            0x0E, 0x00, 0x00, 0x00, // phdb_class_bf = EXT1|EXT2|EXT3 (basic not denied)
            0x00, 0x00,             // reserved
        ];
        assert_eq!(req, expected);
        let f = frame(&req);
        assert_eq!(f[0], FLAG);
        assert_eq!(*f.last().unwrap(), FLAG);
        // No byte needs escaping here: 49 bytes + checksum + 2 flags.
        assert_eq!(f.len(), 52);
        assert_eq!(f[50], checksum(&req));
        // The request decodes as a record with a 9-byte data part.
        let (recs, errs) = decode_all(&f);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(recs[0].header.r_len, 49);
        assert_eq!(recs[0].data, vec![0x01, 0x0A, 0x00, 0x0E, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn flag_and_escape_bytes_are_escaped_including_the_checksum() {
        // Record bytes that contain 0x7E and 0x7D.
        let mut rec = phdb_request(0x7D, DRI_PH_DISPL, 0x7E, 0);
        // Make the checksum itself 0x7E by adjusting a reserved byte.
        let c = checksum(&rec);
        rec[47] = rec[47].wrapping_add(0x7E_u8.wrapping_sub(c));
        assert_eq!(checksum(&rec), 0x7E);
        let f = frame(&rec);
        // Only the two flags are raw 0x7E.
        assert_eq!(f.iter().filter(|&&b| b == FLAG).count(), 2);
        assert!(f.windows(2).any(|w| w == [0x7D, 0x5E]));
        assert!(f.windows(2).any(|w| w == [0x7D, 0x5D]));
        let (recs, errs) = decode_all(&f);
        assert!(errs.is_empty());
        assert_eq!(recs[0].encode(), rec);
    }

    #[test]
    fn garbage_bad_checksum_and_back_to_back_frames_resync() {
        let good = frame(&phdb_request(9, 1, 10, 0));
        let mut bad = good.clone();
        bad[30] ^= 0x01; // corrupt a body byte
        let mut input = b"\x00\x11junk".to_vec(); // 6 bytes of line noise
        input.extend_from_slice(&bad);
        input.extend_from_slice(&good);
        input.extend_from_slice(&good);
        let (recs, errs) = decode_all(&input);
        assert_eq!(recs.len(), 2);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0], DatexError::Garbage { dropped: 6 });
        assert!(matches!(
            errs[1],
            DatexError::BadChecksum { dropped: 51, .. }
        ));
    }

    #[test]
    fn partial_frame_waits_and_oversized_is_dropped() {
        let good = frame(&phdb_request(9, 1, 10, 0));
        let mut dec = DatexDecoder::new();
        let mut buf = BytesMut::from(&good[..20]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&good[20..]);
        assert!(dec.decode(&mut buf).unwrap().is_some());

        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[FLAG]);
        buf.extend_from_slice(&vec![0x55; MAX_RAW_FRAME + 10]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(DatexError::Oversized { .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn short_or_inconsistent_records_are_refused() {
        let (_, errs) = decode_all(&frame(&[1, 2, 3]));
        assert!(matches!(errs[0], DatexError::BadRecord { .. }));
        let mut rec = phdb_request(9, 1, 10, 0);
        rec[0] = 200; // r_len longer than the frame
        let (_, errs) = decode_all(&frame(&rec));
        assert!(matches!(errs[0], DatexError::BadRecord { .. }));
        // Escape right before the closing flag.
        let (_, errs) = decode_all(&[FLAG, 1, 2, ESCAPE, FLAG]);
        assert!(matches!(errs[0], DatexError::BadEscape { dropped: 4 }));
    }

    #[test]
    fn reserved_values_are_classified() {
        assert_eq!(RawValue::classify(-32767), RawValue::Invalid);
        assert_eq!(RawValue::classify(-32766), RawValue::NotUpdated);
        assert_eq!(RawValue::classify(-32765), RawValue::Discontinuity);
        assert_eq!(RawValue::classify(-32764), RawValue::UnderRange);
        assert_eq!(RawValue::classify(-32763), RawValue::OverRange);
        assert_eq!(RawValue::classify(-32762), RawValue::NotCalibrated);
        assert_eq!(RawValue::classify(-32001), RawValue::OtherReserved(-32001));
        assert_eq!(RawValue::classify(-32768), RawValue::OtherReserved(-32768));
        assert_eq!(RawValue::classify(-32000), RawValue::Value(-32000));
        assert_eq!(RawValue::classify(9700), RawValue::Value(9700));
    }

    #[test]
    fn phdb_layouts_both_parse() {
        let mut basic = BasicPhdb::default();
        basic.ecg.v[0] = 72;
        basic.spo2.hdr.status = 3;
        basic.spo2.v[0] = 9800;
        let p = Phdb {
            time: 1_700_000_000,
            basic: Some(basic),
            marker: 0,
            cl_drilvl_subt: u16::from(DRI_PH_DISPL),
        };
        let union = p.encode_union();
        assert_eq!(union.len(), PHDB_UNION_LEN);
        assert_eq!(Phdb::parse(&union).unwrap(), p);
        // Full layout: basic, then three zeroed classes, marker, reserved, cl.
        let mut full = union[..4 + BASIC_LEN].to_vec();
        full.extend_from_slice(&[0u8; 3 * BASIC_LEN]);
        full.extend_from_slice(&union[4 + BASIC_LEN..]);
        assert_eq!(full.len(), PHDB_FULL_LEN);
        assert_eq!(Phdb::parse(&full).unwrap(), p);
        // A union sub-record of another class carries no basic data.
        let mut ext1 = union.clone();
        ext1[PHDB_UNION_LEN - 1] = 0x01; // class 1 in bits 8-11
        assert_eq!(Phdb::parse(&ext1).unwrap().basic, None);
        assert!(Phdb::parse(&union[..100]).is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_group<const N: usize>() -> impl Strategy<Value = Group<N>> {
            (
                any::<u32>(),
                any::<u16>(),
                proptest::array::uniform::<_, N>(any::<i16>()),
            )
                .prop_map(|(status, label, v)| Group {
                    hdr: GroupHdr { status, label },
                    v,
                })
        }

        fn arb_basic() -> impl Strategy<Value = BasicPhdb> {
            (
                arb_group::<5>(),
                proptest::array::uniform4(arb_group::<4>()),
                arb_group::<4>(),
                proptest::array::uniform4(arb_group::<1>()),
                arb_group::<4>(),
                arb_group::<4>(),
            )
                .prop_map(|(ecg, p, nibp, t, spo2, co2)| BasicPhdb {
                    ecg,
                    p,
                    nibp,
                    t,
                    spo2,
                    co2,
                })
        }

        proptest! {
            #[test]
            fn record_round_trips_through_framing(
                basic in arb_basic(),
                time in any::<u32>(),
                r_time in any::<u32>(),
                nbr in any::<u8>(),
                level in any::<u8>(),
            ) {
                let p = Phdb { time, basic: Some(basic), marker: 0, cl_drilvl_subt: 1 };
                let data = p.encode_union();
                let mut sr = [SrDesc::default(); 8];
                sr[0] = SrDesc { offset: 0, sr_type: DRI_PH_DISPL };
                sr[1] = SrDesc { offset: 0, sr_type: DRI_EOL_SUBR_LIST };
                let rec = DatexRecord {
                    header: DatexHeader {
                        r_len: (HEADER_LEN + data.len()) as i16,
                        r_nbr: nbr, dri_level: level, r_time, maintype: DRI_MT_PHDB, sr,
                        ..DatexHeader::default()
                    },
                    data,
                };
                let (recs, errs) = decode_all(&frame(&rec.encode()));
                prop_assert!(errs.is_empty());
                prop_assert_eq!(&recs[0], &rec);
                let subs = recs[0].subrecord_bytes();
                prop_assert_eq!(subs.len(), 1);
                let parsed = Phdb::parse(subs[0].1.unwrap()).unwrap();
                prop_assert_eq!(parsed, p);
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_drops_are_bounded(
                chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..400), 0..8),
                flaggy in any::<bool>(),
            ) {
                let mut dec = DatexDecoder::new();
                let mut buf = BytesMut::new();
                let (mut total, mut dropped) = (0usize, 0usize);
                for mut c in chunks {
                    if flaggy {
                        // Bias towards the special bytes.
                        for (i, b) in c.iter_mut().enumerate() {
                            if i % 7 == 0 { *b = FLAG } else if i % 11 == 0 { *b = ESCAPE }
                        }
                    }
                    total += c.len();
                    buf.extend_from_slice(&c);
                    loop {
                        match dec.decode(&mut buf) {
                            Ok(Some(r)) => { let _ = r.subrecord_bytes(); }
                            Ok(None) => break,
                            Err(e) => { prop_assert!(e.dropped() > 0); dropped += e.dropped(); }
                        }
                    }
                    prop_assert!(buf.len() <= MAX_RAW_FRAME);
                }
                prop_assert!(dropped + buf.len() <= total);
            }

            #[test]
            fn any_subrecord_bytes_parse_without_panic(b in proptest::collection::vec(any::<u8>(), 0..1200)) {
                let _ = Phdb::parse(&b);
                let _ = DatexRecord::parse(&b).map(|r| r.subrecord_bytes().len());
            }
        }
    }
}
