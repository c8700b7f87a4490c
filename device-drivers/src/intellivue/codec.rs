//! Sans-IO codec for the Philips IntelliVue Data Export protocol.
//!
//! Reference: Philips "Data Export Interface Programming Guide, IntelliVue
//! X2, MP Series & MX Series" (4535 642 59271), chapter 4 "Definition of the
//! Transport Protocols" (§"Transport Protocols for the MIB/RS232 Interface":
//! Framing, Header Information, Frame Check Sequence Field, Transparency,
//! Frame Abort) and chapter 5 "Definition of the Data Export Protocol"
//! (session/presentation headers, ROSE/CMIP "Remote Operation" headers,
//! Association, MDS Create Event, Extended Poll, attribute types).
//!
//! Two layers, both pure functions over bytes:
//!
//! 1. **Framing** ([`Framing`]): how one Data Export message travels.
//!    - [`SerialFraming`] (MIB/RS232): `BOF 0xC0 | hdr | user data | FCS | EOF
//!      0xC1`, hdr = protocol id `0x11`, message type `0x01`, u16 BE length of
//!      the user data; FCS = RFC 1662 16-bit FCS over hdr + user data (before
//!      transparency), sent least-significant byte first; inside the frame the
//!      bytes 0xC0, 0xC1 and 0x7D are sent as `0x7D, byte ^ 0x20`.
//!    - [`RawFraming`] (LAN/UDP, where one datagram is one message and no
//!      serial frame is used): messages are self-delimiting (session SPDU
//!      length indicator, or the ROapdus length), so a byte stream of
//!      unframed messages can be split without any extra framing.
//! 2. **Messages** ([`parse_message`], `encode_*`): session SPDUs for
//!    association/release/abort and data messages (SPpdu + ROapdus + ROIV /
//!    RORS / ROER / ROLRS) with the event report and extended poll contents.
//!
//! [`IntellivueDecoder`] combines both behind the project's one contract,
//! `decode(&mut BytesMut) -> Result<Option<Message>, IntellivueError>`:
//! `Ok(None)` = need more bytes; every error has consumed the offending bytes
//! (reported by [`IntellivueError::dropped`]) and is recoverable.
//!
//! Facts not confirmed against the Guide's text (taken from the brief and
//! from public re-implementations read for facts only) are marked
//! "UNCONFIRMED" where they are used.

use bytes::{Buf, BufMut, Bytes, BytesMut};

// ---------------------------------------------------------------------------
// Framing (Guide §4 "Transport Protocols for the MIB/RS232 Interface")
// ---------------------------------------------------------------------------

/// Beginning of frame.
pub const BOF: u8 = 0xC0;
/// End of frame.
pub const EOF: u8 = 0xC1;
/// Control escape (transparency).
pub const ESC: u8 = 0x7D;
/// An escaped byte is sent XOR this value.
pub const ESC_XOR: u8 = 0x20;
/// Header `protocol_id`: Data Export protocol.
pub const PROTOCOL_ID: u8 = 0x11;
/// Header `msg_type`: data (the only type used by Data Export).
pub const MSG_TYPE: u8 = 0x01;
/// Largest user-data length accepted, in bytes. The Guide limits a message
/// to the negotiated MTU (well below 2 KiB on MIB); 16 KiB leaves room for
/// large linked poll results while bounding memory.
pub const MAX_USER_DATA: usize = 16 * 1024;
/// Largest frame on the wire (every byte escaped, plus BOF/EOF).
pub const MAX_WIRE_FRAME: usize = 2 * (4 + MAX_USER_DATA + 2) + 2;

/// The RFC 1662 (PPP in HDLC-like framing, Appendix C.2) 16-bit FCS:
/// CRC-16 reflected polynomial 0x8408, initial value 0xFFFF, ones'
/// complement of the result. (Also known as CRC-16/X-25; check value over
/// `"123456789"` = 0x906E.)
pub fn fcs16(data: &[u8]) -> u16 {
    let mut fcs: u16 = 0xFFFF;
    for &b in data {
        fcs ^= u16::from(b);
        for _ in 0..8 {
            fcs = if fcs & 1 != 0 {
                (fcs >> 1) ^ 0x8408
            } else {
                fcs >> 1
            };
        }
    }
    !fcs
}

/// Why bytes were dropped. Every variant is recoverable: the bytes have been
/// consumed and decoding resumes at the next frame start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntellivueError {
    #[error("bytes outside a frame; dropped {dropped}")]
    Garbage { dropped: usize },
    #[error("frame longer than the size cap; dropped {dropped} bytes")]
    Oversized { dropped: usize },
    #[error("frame aborted or restarted before its end; dropped {dropped} bytes")]
    Aborted { dropped: usize },
    #[error("bad frame ({reason}); dropped {dropped} bytes")]
    BadFrame {
        reason: &'static str,
        dropped: usize,
    },
    #[error("frame check sequence mismatch; dropped {dropped} bytes")]
    BadFcs { dropped: usize },
    #[error("malformed message ({reason}); dropped {dropped} bytes")]
    BadMessage {
        reason: &'static str,
        dropped: usize,
    },
}

impl IntellivueError {
    /// Bytes discarded because of this error.
    pub fn dropped(&self) -> usize {
        match self {
            IntellivueError::Garbage { dropped }
            | IntellivueError::Oversized { dropped }
            | IntellivueError::Aborted { dropped }
            | IntellivueError::BadFrame { dropped, .. }
            | IntellivueError::BadFcs { dropped }
            | IntellivueError::BadMessage { dropped, .. } => *dropped,
        }
    }

    /// All decode errors are recoverable (resync at the next frame).
    pub fn is_recoverable(&self) -> bool {
        true
    }
}

/// How Data Export messages are delimited on a transport. Sans-IO.
pub trait Framing: Send + Sync {
    /// Take the next message's bytes (without framing) out of `buf`.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, IntellivueError>;
    /// Append `msg` framed for this transport to `out`.
    fn encode(&self, msg: &[u8], out: &mut BytesMut);
}

/// MIB/RS232 framing: BOF, header, user data, FCS, EOF with transparency.
#[derive(Debug, Default, Clone, Copy)]
pub struct SerialFraming;

/// Frame one message for the MIB/RS232 interface.
pub fn encode_serial_frame(user_data: &[u8], out: &mut BytesMut) {
    let len = u16::try_from(user_data.len()).unwrap_or(u16::MAX);
    let mut raw = Vec::with_capacity(user_data.len() + 6);
    raw.extend_from_slice(&[PROTOCOL_ID, MSG_TYPE]);
    raw.extend_from_slice(&len.to_be_bytes());
    raw.extend_from_slice(user_data);
    let fcs = fcs16(&raw);
    // FCS is sent least-significant byte first (RFC 1662 §C.2).
    raw.extend_from_slice(&fcs.to_le_bytes());
    out.reserve(raw.len() * 2 + 2);
    out.put_u8(BOF);
    for b in raw {
        if matches!(b, BOF | EOF | ESC) {
            out.put_u8(ESC);
            out.put_u8(b ^ ESC_XOR);
        } else {
            out.put_u8(b);
        }
    }
    out.put_u8(EOF);
}

/// Check and strip one frame's content (the bytes between BOF and EOF).
fn unframe(escaped: &[u8], dropped: usize) -> Result<Bytes, IntellivueError> {
    let mut raw = Vec::with_capacity(escaped.len());
    let mut it = escaped.iter();
    while let Some(&b) = it.next() {
        if b == ESC {
            match it.next() {
                Some(&e) if matches!(e ^ ESC_XOR, BOF | EOF | ESC) => raw.push(e ^ ESC_XOR),
                _ => {
                    return Err(IntellivueError::BadFrame {
                        reason: "invalid escape sequence",
                        dropped,
                    });
                }
            }
        } else {
            raw.push(b);
        }
    }
    if raw.len() < 6 {
        return Err(IntellivueError::BadFrame {
            reason: "shorter than header + FCS",
            dropped,
        });
    }
    if raw[0] != PROTOCOL_ID || raw[1] != MSG_TYPE {
        return Err(IntellivueError::BadFrame {
            reason: "unknown protocol id or message type",
            dropped,
        });
    }
    let len = usize::from(u16::from_be_bytes([raw[2], raw[3]]));
    if len != raw.len() - 6 {
        return Err(IntellivueError::BadFrame {
            reason: "length field does not match the frame",
            dropped,
        });
    }
    let body_end = raw.len() - 2;
    let fcs = u16::from_le_bytes([raw[body_end], raw[body_end + 1]]);
    if fcs16(&raw[..body_end]) != fcs {
        return Err(IntellivueError::BadFcs { dropped });
    }
    Ok(Bytes::copy_from_slice(&raw[4..body_end]))
}

impl Framing for SerialFraming {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, IntellivueError> {
        match buf.iter().position(|&b| b == BOF) {
            None => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let dropped = buf.len();
                buf.clear();
                return Err(IntellivueError::Garbage { dropped });
            }
            Some(0) => {}
            Some(i) => {
                buf.advance(i);
                return Err(IntellivueError::Garbage { dropped: i });
            }
        }
        // buf[0] == BOF. The frame ends at EOF; a BOF before it means the
        // sender abandoned the frame and started a new one.
        match buf[1..].iter().position(|&b| b == EOF || b == BOF) {
            None => {
                if buf.len() > MAX_WIRE_FRAME {
                    let dropped = buf.len();
                    buf.clear();
                    Err(IntellivueError::Oversized { dropped })
                } else {
                    Ok(None)
                }
            }
            Some(p) => {
                let end = p + 1;
                if buf[end] == BOF {
                    buf.advance(end);
                    return Err(IntellivueError::Aborted { dropped: end });
                }
                let frame = buf.split_to(end + 1);
                if frame.len() > MAX_WIRE_FRAME {
                    return Err(IntellivueError::Oversized {
                        dropped: frame.len(),
                    });
                }
                unframe(&frame[1..end], frame.len()).map(Some)
            }
        }
    }

    fn encode(&self, msg: &[u8], out: &mut BytesMut) {
        encode_serial_frame(msg, out);
    }
}

/// LAN framing: none. Each message is self-delimiting (session SPDU: type +
/// length indicator; data message: SPpdu + ROapdus whose `length` covers the
/// rest), so a stream of unframed messages is split by reading headers.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawFraming;

/// Total length of the unframed message at the start of `b`, if its header
/// is complete. `Err` when the first bytes cannot start a message.
pub fn raw_message_len(b: &[u8]) -> Result<Option<usize>, &'static str> {
    let Some(&first) = b.first() else {
        return Ok(None);
    };
    if is_spdu_type(first) {
        let Some(&li) = b.get(1) else {
            return Ok(None);
        };
        if li != 0xFF {
            return Ok(Some(2 + usize::from(li)));
        }
        if b.len() < 4 {
            return Ok(None);
        }
        return Ok(Some(4 + usize::from(u16::from_be_bytes([b[2], b[3]]))));
    }
    if first == (SESSION_ID_DATA >> 8) as u8 {
        if b.len() < 8 {
            if b.len() >= 2 && b[1] != (SESSION_ID_DATA & 0xFF) as u8 {
                return Err("not a data message");
            }
            return Ok(None);
        }
        if u16::from_be_bytes([b[0], b[1]]) != SESSION_ID_DATA {
            return Err("not a data message");
        }
        return Ok(Some(8 + usize::from(u16::from_be_bytes([b[6], b[7]]))));
    }
    Err("not a message start")
}

impl Framing for RawFraming {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, IntellivueError> {
        match raw_message_len(buf) {
            Ok(None) => Ok(None),
            Ok(Some(n)) if n > MAX_USER_DATA => {
                // Resync by dropping the header byte only: the length is
                // implausible, so this was not a message start.
                buf.advance(1);
                Err(IntellivueError::Oversized { dropped: 1 })
            }
            Ok(Some(n)) if buf.len() < n => Ok(None),
            Ok(Some(n)) => Ok(Some(buf.split_to(n).freeze())),
            Err(_) => {
                buf.advance(1);
                Err(IntellivueError::Garbage { dropped: 1 })
            }
        }
    }

    fn encode(&self, msg: &[u8], out: &mut BytesMut) {
        out.extend_from_slice(msg);
    }
}

// ---------------------------------------------------------------------------
// Message layer (Guide §5)
// ---------------------------------------------------------------------------

/// Session SPDU types (Guide §5 "Session/Presentation Header").
pub const SPDU_CN: u8 = 0x0D; // Association Request
pub const SPDU_AC: u8 = 0x0E; // Association Result (accept)
pub const SPDU_RF: u8 = 0x0C; // Association Refuse
pub const SPDU_FN: u8 = 0x09; // Release Request
pub const SPDU_DN: u8 = 0x0A; // Release Result
pub const SPDU_AB: u8 = 0x19; // Abort

fn is_spdu_type(b: u8) -> bool {
    matches!(b, SPDU_CN | SPDU_AC | SPDU_RF | SPDU_FN | SPDU_DN | SPDU_AB)
}

/// SPpdu `session_id` of every data message, and its `p_context_id`.
pub const SESSION_ID_DATA: u16 = 0xE100;
pub const P_CONTEXT_ID: u16 = 2;

/// ROapdus `ro_type`.
pub const ROIV_APDU: u16 = 1;
pub const RORS_APDU: u16 = 2;
pub const ROER_APDU: u16 = 3;
pub const ROLRS_APDU: u16 = 5;

/// CMIP command types.
pub const CMD_EVENT_REPORT: u16 = 0;
pub const CMD_CONFIRMED_EVENT_REPORT: u16 = 1;
pub const CMD_GET: u16 = 3;
pub const CMD_CONFIRMED_ACTION: u16 = 7;

/// Linked result states (RolrsId.state).
pub const RORLS_FIRST: u8 = 1;
pub const RORLS_NOT_FIRST_NOT_LAST: u8 = 2;
pub const RORLS_LAST: u8 = 3;

/// Object classes, partitions, events, actions, attributes (nomenclature,
/// Guide §"Attribute Data Types and Constants").
pub const NOM_MOC_VMS_MDS: u16 = 0x0021;
pub const NOM_MOC_VMO_METRIC_NU: u16 = 0x0006;
pub const NOM_PART_OBJ: u16 = 1;
pub const NOM_NOTI_MDS_CREAT: u16 = 0x0D06;
pub const NOM_ACT_POLL_MDIB_DATA_EXT: u16 = 0xF13B;
pub const NOM_ATTR_NU_VAL_OBS: u16 = 0x0950;
pub const NOM_ATTR_NU_CMPD_VAL_OBS: u16 = 0x094B;
pub const NOM_POLL_PROFILE_SUPPORT: u16 = 0x0001;
pub const NOM_ATTR_POLL_PROFILE_EXT: u16 = 0xF001;

/// A decoded Data Export message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Session SPDU (association control). `body` is everything after the
    /// length indicator (session data, presentation header, user info).
    Session { spdu: u8, body: Bytes },
    /// A data message (SPpdu + ROapdus + remote operation header).
    Data(DataApdu),
}

/// The remote operation kind of a data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoKind {
    /// ROIV: an invocation (request or event report).
    Invoke,
    /// RORS: the (single) result.
    Result,
    /// ROLRS: one part of a linked (multi-part) result.
    LinkedResult { state: u8, count: u8 },
    /// ROER: an error answer.
    Error { error_value: u16 },
}

/// A data message: its remote operation header and body (the CMIP argument
/// or result, e.g. EventReportArgument or ActionResult).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataApdu {
    pub kind: RoKind,
    pub invoke_id: u16,
    /// CMIP command type (0 for ROER, which has none).
    pub command_type: u16,
    pub body: Bytes,
}

/// Big-endian cursor over a message; every read is bounds-checked.
#[derive(Debug)]
pub struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Rd { b }
    }
    pub fn remaining(&self) -> usize {
        self.b.len()
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.b.len() < n {
            return Err("truncated");
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    pub fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, &'static str> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, &'static str> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
}

/// Parse one unframed message.
pub fn parse_message(b: &[u8]) -> Result<Message, &'static str> {
    let mut r = Rd::new(b);
    let first = r.u8()?;
    if is_spdu_type(first) {
        let li = r.u8()?;
        let len = if li == 0xFF {
            usize::from(r.u16()?)
        } else {
            usize::from(li)
        };
        if r.remaining() != len {
            return Err("session length indicator does not match");
        }
        return Ok(Message::Session {
            spdu: first,
            body: Bytes::copy_from_slice(r.take(len)?),
        });
    }
    let mut r = Rd::new(b);
    if r.u16()? != SESSION_ID_DATA {
        return Err("unknown session id");
    }
    let _p_context_id = r.u16()?;
    let ro_type = r.u16()?;
    let ro_len = usize::from(r.u16()?);
    if r.remaining() != ro_len {
        return Err("ROapdus length does not match");
    }
    let (kind, invoke_id, command_type, len) = match ro_type {
        ROIV_APDU | RORS_APDU => {
            let invoke_id = r.u16()?;
            let cmd = r.u16()?;
            let len = r.u16()?;
            let kind = if ro_type == ROIV_APDU {
                RoKind::Invoke
            } else {
                RoKind::Result
            };
            (kind, invoke_id, cmd, len)
        }
        ROLRS_APDU => {
            let state = r.u8()?;
            let count = r.u8()?;
            let invoke_id = r.u16()?;
            let cmd = r.u16()?;
            let len = r.u16()?;
            (RoKind::LinkedResult { state, count }, invoke_id, cmd, len)
        }
        ROER_APDU => {
            let invoke_id = r.u16()?;
            let error_value = r.u16()?;
            let len = r.u16()?;
            (RoKind::Error { error_value }, invoke_id, 0, len)
        }
        _ => return Err("unknown remote operation type"),
    };
    if r.remaining() != usize::from(len) {
        return Err("remote operation length does not match");
    }
    Ok(Message::Data(DataApdu {
        kind,
        invoke_id,
        command_type,
        body: Bytes::copy_from_slice(r.take(usize::from(len))?),
    }))
}

/// Framing + message parsing behind the project's decoder contract.
#[derive(Debug, Default)]
pub struct IntellivueDecoder<F> {
    framing: F,
}

impl<F: Framing> IntellivueDecoder<F> {
    pub fn new(framing: F) -> Self {
        IntellivueDecoder { framing }
    }

    /// Decode the next message from `buf` (`Ok(None)` = need more bytes).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, IntellivueError> {
        match self.framing.decode(buf)? {
            None => Ok(None),
            Some(msg) => {
                parse_message(&msg)
                    .map(Some)
                    .map_err(|reason| IntellivueError::BadMessage {
                        reason,
                        // The frame is consumed; count its content at least.
                        dropped: msg.len().max(1),
                    })
            }
        }
    }

    pub fn framing(&self) -> &F {
        &self.framing
    }
}

/// ManagedObjectId: object class + global handle (context id, handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ManagedObjectId {
    pub class: u16,
    pub context_id: u16,
    pub handle: u16,
}

impl ManagedObjectId {
    /// The MDS object every client addresses (context 0, handle 0).
    pub const MDS: ManagedObjectId = ManagedObjectId {
        class: NOM_MOC_VMS_MDS,
        context_id: 0,
        handle: 0,
    };

    fn read(r: &mut Rd<'_>) -> Result<Self, &'static str> {
        Ok(ManagedObjectId {
            class: r.u16()?,
            context_id: r.u16()?,
            handle: r.u16()?,
        })
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.class.to_be_bytes());
        out.extend_from_slice(&self.context_id.to_be_bytes());
        out.extend_from_slice(&self.handle.to_be_bytes());
    }
}

/// EventReportArgument (body of an ROIV CMD_[CONFIRMED_]EVENT_REPORT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventReport {
    pub managed_object: ManagedObjectId,
    /// RelativeTime (1/8 ms ticks) of the event.
    pub event_time: u32,
    pub event_type: u16,
    pub info: Bytes,
}

pub fn parse_event_report(body: &[u8]) -> Result<EventReport, &'static str> {
    let mut r = Rd::new(body);
    let managed_object = ManagedObjectId::read(&mut r)?;
    let event_time = r.u32()?;
    let event_type = r.u16()?;
    let len = usize::from(r.u16()?);
    let info = Bytes::copy_from_slice(r.take(len)?);
    Ok(EventReport {
        managed_object,
        event_time,
        event_type,
        info,
    })
}

/// Wrap a remote-operation body into a full data message (SPpdu, ROapdus,
/// RO header).
fn data_message(ro_type: u16, invoke_id: u16, command_type: u16, body: &[u8]) -> Vec<u8> {
    let body_len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut m = Vec::with_capacity(body.len() + 14);
    m.extend_from_slice(&SESSION_ID_DATA.to_be_bytes());
    m.extend_from_slice(&P_CONTEXT_ID.to_be_bytes());
    m.extend_from_slice(&ro_type.to_be_bytes());
    m.extend_from_slice(&body_len.saturating_add(6).to_be_bytes());
    m.extend_from_slice(&invoke_id.to_be_bytes());
    m.extend_from_slice(&command_type.to_be_bytes());
    m.extend_from_slice(&body_len.to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// EventReportResult answering a confirmed event report (for the MDS
/// Create Event: "MDS Create Event Result", Guide §5). Echoes the managed
/// object, time and event type; no result info.
pub fn encode_event_report_result(invoke_id: u16, ev: &EventReport) -> Vec<u8> {
    let mut body = Vec::with_capacity(14);
    ev.managed_object.put(&mut body);
    body.extend_from_slice(&ev.event_time.to_be_bytes());
    body.extend_from_slice(&ev.event_type.to_be_bytes());
    body.extend_from_slice(&0u16.to_be_bytes());
    data_message(RORS_APDU, invoke_id, CMD_CONFIRMED_EVENT_REPORT, &body)
}

/// Extended Poll Data Request (Guide §5 "Poll Data Request Extended"):
/// ROIV CMD_CONFIRMED_ACTION on the MDS, action NOM_ACT_POLL_MDIB_DATA_EXT,
/// PollMdibDataReqExt { poll_number, polled_obj_type = {NOM_PART_OBJ,
/// NOM_MOC_VMO_METRIC_NU}, polled_attr_grp = 0 (all), poll_ext_attr = empty
/// list }. With an empty attribute list the monitor answers with one
/// snapshot (UNCONFIRMED: the Guide's continuous-poll variant adds
/// NOM_ATTR_TIME_PD_POLL; not used here).
pub fn encode_poll_request(invoke_id: u16, poll_number: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(24);
    ManagedObjectId::MDS.put(&mut body);
    body.extend_from_slice(&0u32.to_be_bytes()); // scope
    body.extend_from_slice(&NOM_ACT_POLL_MDIB_DATA_EXT.to_be_bytes());
    body.extend_from_slice(&12u16.to_be_bytes()); // length of the request below
    body.extend_from_slice(&poll_number.to_be_bytes());
    body.extend_from_slice(&NOM_PART_OBJ.to_be_bytes());
    body.extend_from_slice(&NOM_MOC_VMO_METRIC_NU.to_be_bytes());
    body.extend_from_slice(&0u16.to_be_bytes()); // polled_attr_grp
    body.extend_from_slice(&0u16.to_be_bytes()); // attribute list count
    body.extend_from_slice(&0u16.to_be_bytes()); // attribute list length
    data_message(ROIV_APDU, invoke_id, CMD_CONFIRMED_ACTION, &body)
}

/// A parsed Extended Poll Data Request (used by tests and the simulator's
/// round-trip checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollRequest {
    pub poll_number: u16,
    pub partition: u16,
    pub code: u16,
    pub attr_group: u16,
}

pub fn parse_poll_request(body: &[u8]) -> Result<PollRequest, &'static str> {
    let mut r = Rd::new(body);
    let _mo = ManagedObjectId::read(&mut r)?;
    let _scope = r.u32()?;
    if r.u16()? != NOM_ACT_POLL_MDIB_DATA_EXT {
        return Err("not an extended poll");
    }
    let len = usize::from(r.u16()?);
    let mut r = Rd::new(r.take(len)?);
    Ok(PollRequest {
        poll_number: r.u16()?,
        partition: r.u16()?,
        code: r.u16()?,
        attr_group: r.u16()?,
    })
}

/// Append a length-indicator as used by session SPDUs: one byte below 255,
/// else 0xFF and a u16 (Guide §5 "Session/Presentation Header").
pub fn put_li(out: &mut Vec<u8>, len: usize) {
    if len < 255 {
        out.push(len as u8);
    } else {
        out.push(0xFF);
        out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    }
}

/// ASN.1 BER definite length (short form below 128, else 0x81/0x82).
fn put_asn_len(out: &mut Vec<u8>, len: usize) {
    if len < 128 {
        out.push(len as u8);
    } else if len < 256 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.push(0x82);
        out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    }
}

/// Session data of an Association Request (Guide §5 "Association Request
/// Message": SessionData = PIs 0x05 and 0x14 with fixed contents).
const ASSOC_SESSION_DATA: [u8; 14] = [
    0x05, 0x08, 0x13, 0x01, 0x00, 0x16, 0x01, 0x02, 0x80, 0x00, // PI 0x05
    0x14, 0x02, 0x00, 0x02, // PI 0x14
];

/// The fixed ASN.1 presentation header of the Association Request, as given
/// in the Guide's "Association Request Message" (AARQ with the Data Export
/// application context and abstract syntax OIDs 1.2.840.10004.2.1...).
/// UNCONFIRMED byte-for-byte against the Guide's text: transcribed from the
/// layout published by public re-implementations (MD PnP OpenICE), read for
/// facts only.
const AARQ_PRESENTATION_HEADER: &[u8] = &[
    0x31, 0x80, 0xA0, 0x80, 0x80, 0x01, 0x01, 0x00, 0x00, 0xA2, 0x80, 0xA0, 0x03, 0x00, 0x00, 0x01,
    0xA4, 0x80, 0x30, 0x80, 0x02, 0x01, 0x01, 0x06, 0x04, 0x52, 0x01, 0x00, 0x01, 0x30, 0x80, 0x06,
    0x02, 0x51, 0x01, 0x00, 0x00, 0x00, 0x00, 0x30, 0x80, 0x02, 0x01, 0x02, 0x06, 0x0C, 0x2A, 0x86,
    0x48, 0xCE, 0x14, 0x02, 0x01, 0x00, 0x00, 0x00, 0x01, 0x01, 0x30, 0x80, 0x06, 0x0C, 0x2A, 0x86,
    0x48, 0xCE, 0x14, 0x02, 0x01, 0x00, 0x00, 0x00, 0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x61, 0x80, 0x30, 0x80, 0x02, 0x01, 0x01, 0xA0, 0x80, 0x60, 0x80, 0xA1, 0x80, 0x06, 0x0C, 0x2A,
    0x86, 0x48, 0xCE, 0x14, 0x02, 0x01, 0x00, 0x00, 0x00, 0x03, 0x01, 0x00, 0x00, 0xBE, 0x80, 0x28,
    0x80, 0x06, 0x0C, 0x2A, 0x86, 0x48, 0xCE, 0x14, 0x02, 0x01, 0x00, 0x00, 0x00, 0x01, 0x01, 0x02,
    0x01, 0x02, 0x81,
];

/// Presentation trailer of the Association Request: 16 zero bytes closing
/// the indefinite-length ASN.1 constructs.
const AARQ_PRESENTATION_TRAILER: [u8; 16] = [0; 16];

/// MDSEUserInfoStd of the client (Guide §5 "MDSEUserInfoStd"):
/// protocol_version MDDL_VERSION1, nomenclature_version NOMEN_VERSION,
/// functional_units 0, system_type SYST_CLIENT, startup_mode COLD_START,
/// option_list empty, supported_aprofiles = { NOM_POLL_PROFILE_SUPPORT:
/// PollProfileSupport { POLL_PROFILE_REV_0, min_poll_period, max_mtu_rx,
/// max_mtu_tx, max_bw_tx = unlimited, options P_OPT_DYN_CREATE_OBJECTS |
/// P_OPT_DYN_DELETE_OBJECTS, optional_packages = { NOM_ATTR_POLL_PROFILE_EXT:
/// PollProfileExt { POLL_EXT_PERIOD_NU_1SEC | POLL_EXT_PERIOD_RTSA, {} } } } }.
fn client_user_info(min_poll_period_ticks: u32) -> Vec<u8> {
    let mut ext = Vec::new(); // PollProfileExt
    ext.extend_from_slice(&0x8800_0000u32.to_be_bytes());
    ext.extend_from_slice(&[0, 0, 0, 0]); // ext_attr: count 0, length 0
    let mut opt = Vec::new(); // optional_packages AttributeList
    opt.extend_from_slice(&1u16.to_be_bytes());
    opt.extend_from_slice(&((4 + ext.len()) as u16).to_be_bytes());
    opt.extend_from_slice(&NOM_ATTR_POLL_PROFILE_EXT.to_be_bytes());
    opt.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    opt.extend_from_slice(&ext);
    let mut pps = Vec::new(); // PollProfileSupport
    pps.extend_from_slice(&0x8000_0000u32.to_be_bytes()); // POLL_PROFILE_REV_0
    pps.extend_from_slice(&min_poll_period_ticks.to_be_bytes());
    pps.extend_from_slice(&1000u32.to_be_bytes()); // max_mtu_rx
    pps.extend_from_slice(&1000u32.to_be_bytes()); // max_mtu_tx
    pps.extend_from_slice(&0xFFFF_FFFFu32.to_be_bytes()); // max_bw_tx
    pps.extend_from_slice(&0x6000_0000u32.to_be_bytes()); // options
    pps.extend_from_slice(&opt);
    let mut ui = Vec::new();
    ui.extend_from_slice(&0x8000_0000u32.to_be_bytes()); // MDDL_VERSION1
    ui.extend_from_slice(&0x4000_0000u32.to_be_bytes()); // NOMEN_VERSION
    ui.extend_from_slice(&0u32.to_be_bytes()); // functional_units
    ui.extend_from_slice(&0x8000_0000u32.to_be_bytes()); // SYST_CLIENT
    ui.extend_from_slice(&0x8000_0000u32.to_be_bytes()); // COLD_START
    ui.extend_from_slice(&[0, 0, 0, 0]); // option_list: empty
    ui.extend_from_slice(&1u16.to_be_bytes()); // supported_aprofiles: 1 AVA
    ui.extend_from_slice(&((4 + pps.len()) as u16).to_be_bytes());
    ui.extend_from_slice(&NOM_POLL_PROFILE_SUPPORT.to_be_bytes());
    ui.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    ui.extend_from_slice(&pps);
    ui
}

/// Association Request (Guide §5 "Association Request Message"):
/// SessionHeader (CN_SPDU_SI, LI), SessionData, PresentationHeader (0xC1,
/// LI, fixed AARQ bytes), user data (ASN.1 length + MDSEUserInfoStd),
/// PresentationTrailer. `min_poll_period_ticks` is a RelativeTime (1/8 ms).
pub fn encode_association_request(min_poll_period_ticks: u32) -> Vec<u8> {
    let ui = client_user_info(min_poll_period_ticks);
    let mut pres = Vec::new();
    // The header ends with the user-information tag; the BER length and the
    // MDSEUserInfoStd follow.
    pres.extend_from_slice(AARQ_PRESENTATION_HEADER);
    put_asn_len(&mut pres, ui.len());
    pres.extend_from_slice(&ui);
    pres.extend_from_slice(&AARQ_PRESENTATION_TRAILER);
    let mut body = Vec::new();
    body.extend_from_slice(&ASSOC_SESSION_DATA);
    body.push(0xC1);
    put_li(&mut body, pres.len());
    body.extend_from_slice(&pres);
    let mut m = vec![SPDU_CN];
    put_li(&mut m, body.len());
    m.extend_from_slice(&body);
    m
}

/// Release Request (Guide §5 "Association Release Request"): FN_SPDU with
/// the fixed presentation part (RLRQ) and trailer.
pub fn encode_release_request() -> Vec<u8> {
    release(SPDU_FN, 0x62)
}

/// Release Result (answer to a release the monitor initiated): DN_SPDU
/// with RLRE (UNCONFIRMED: RLRE tag 0x63 by analogy with ACSE).
pub fn encode_release_result() -> Vec<u8> {
    release(SPDU_DN, 0x63)
}

fn release(spdu: u8, tag: u8) -> Vec<u8> {
    let pres: [u8; 22] = [
        0x61, 0x80, 0x30, 0x80, 0x02, 0x01, 0x01, 0xA0, 0x80, tag, 0x80, 0x80, 0x01, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    let mut m = vec![spdu, (pres.len() + 2) as u8, 0xC1, pres.len() as u8];
    m.extend_from_slice(&pres);
    m
}

// ---------------------------------------------------------------------------
// Poll results (Guide §5 "Poll Data Result Extended", "Attribute Types")
// ---------------------------------------------------------------------------

/// AbsoluteTime: 8 BCD bytes (century, year, month, day, hour, minute,
/// second, sec_fractions). All 0xFF = not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AbsoluteTime(pub [u8; 8]);

impl AbsoluteTime {
    /// The device clock time (no zone), or `None` when not set or not
    /// valid BCD / not a calendar time.
    pub fn to_datetime(self) -> Option<time::PrimitiveDateTime> {
        let bcd = |b: u8| -> Option<u8> {
            let (h, l) = (b >> 4, b & 0x0F);
            (h <= 9 && l <= 9).then_some(h * 10 + l)
        };
        let [c, y, mo, d, h, mi, s, f] = self.0;
        let year = i32::from(bcd(c)?) * 100 + i32::from(bcd(y)?);
        let month = time::Month::try_from(bcd(mo)?).ok()?;
        let date = time::Date::from_calendar_date(year, month, bcd(d)?).ok()?;
        // sec_fractions: hundredths of a second (BCD).
        let t =
            time::Time::from_hms_milli(bcd(h)?, bcd(mi)?, bcd(s)?, u16::from(bcd(f)?) * 10).ok()?;
        Some(time::PrimitiveDateTime::new(date, t))
    }
}

/// FLOAT-Type: 8-bit signed exponent, 24-bit signed mantissa, value =
/// mantissa × 10^exponent, with reserved special values (Guide §5
/// "FLOAT-Type").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FloatType(pub u32);

/// What a FLOAT-Type carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FloatValue {
    Number(f64),
    /// Not a Number (0x007FFFFF): no valid value.
    NaN,
    /// Not at this Resolution (0x00800000).
    NRes,
    /// +Infinity (0x007FFFFE).
    PosInf,
    /// -Infinity (0x00800002).
    NegInf,
}

impl FloatType {
    pub const NAN: u32 = 0x007F_FFFF;
    pub const NRES: u32 = 0x0080_0000;
    pub const POS_INF: u32 = 0x007F_FFFE;
    pub const NEG_INF: u32 = 0x0080_0002;

    pub fn from_parts(exponent: i8, mantissa: i32) -> Self {
        FloatType((u32::from(exponent as u8) << 24) | (mantissa as u32 & 0x00FF_FFFF))
    }
    pub fn exponent(self) -> i8 {
        (self.0 >> 24) as u8 as i8
    }
    pub fn mantissa(self) -> i32 {
        // Sign-extend 24 bits.
        ((self.0 << 8) as i32) >> 8
    }

    /// Special values are matched on the mantissa with exponent 0, as the
    /// Guide lists them (0x007FFFFF etc.).
    pub fn value(self) -> FloatValue {
        match self.0 {
            Self::NAN => FloatValue::NaN,
            Self::NRES => FloatValue::NRes,
            Self::POS_INF => FloatValue::PosInf,
            Self::NEG_INF => FloatValue::NegInf,
            _ => FloatValue::Number(
                f64::from(self.mantissa()) * 10f64.powi(i32::from(self.exponent())),
            ),
        }
    }
}

/// NuObsValue: one numeric observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NuObsValue {
    /// Physiological id: MDC term code, partition 2 (SCADA).
    pub physio_id: u16,
    /// MeasurementState bits (see [`state`]).
    pub state: u16,
    /// Unit: MDC term code, partition 4 (DIM).
    pub unit_code: u16,
    pub value: FloatType,
}

/// MeasurementState bits (Guide §5 "MeasurementState"; bit 0 = MSB).
pub mod state {
    pub const INVALID: u16 = 0x8000;
    pub const QUESTIONABLE: u16 = 0x4000;
    pub const UNAVAILABLE: u16 = 0x2000;
    pub const CALIBRATION_ONGOING: u16 = 0x1000;
    pub const TEST_DATA: u16 = 0x0800;
    pub const DEMO_DATA: u16 = 0x0400;
    pub const VALIDATED_DATA: u16 = 0x0080;
    pub const EARLY_INDICATION: u16 = 0x0040;
    pub const MSMT_ONGOING: u16 = 0x0020;
    pub const MSMT_STATE_IN_ALARM: u16 = 0x0002;
    pub const MSMT_STATE_AL_INHIBITED: u16 = 0x0001;
    /// Bits the mapping interprets.
    pub const KNOWN: u16 = INVALID
        | QUESTIONABLE
        | UNAVAILABLE
        | CALIBRATION_ONGOING
        | TEST_DATA
        | DEMO_DATA
        | VALIDATED_DATA
        | EARLY_INDICATION
        | MSMT_ONGOING
        | MSMT_STATE_IN_ALARM
        | MSMT_STATE_AL_INHIBITED;
}

impl NuObsValue {
    const LEN: usize = 10;

    fn read(r: &mut Rd<'_>) -> Result<Self, &'static str> {
        Ok(NuObsValue {
            physio_id: r.u16()?,
            state: r.u16()?,
            unit_code: r.u16()?,
            value: FloatType(r.u32()?),
        })
    }

    pub fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.physio_id.to_be_bytes());
        out.extend_from_slice(&self.state.to_be_bytes());
        out.extend_from_slice(&self.unit_code.to_be_bytes());
        out.extend_from_slice(&self.value.0.to_be_bytes());
    }
}

/// One polled object (ObservationPoll) with the numeric values found in its
/// attributes (simple and compound numeric observed values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservationPoll {
    pub handle: u16,
    pub values: Vec<NuObsValue>,
}

/// PollMdibDataReplyExt (body of the ActionResult of an extended poll).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollReply {
    pub poll_number: u16,
    pub sequence_no: u16,
    /// RelativeTime (1/8 ms ticks) of the poll.
    pub rel_time_stamp: u32,
    pub abs_time_stamp: AbsoluteTime,
    pub partition: u16,
    pub code: u16,
    pub attr_group: u16,
    /// (context id, observations) per SingleContextPoll.
    pub contexts: Vec<(u16, Vec<ObservationPoll>)>,
}

/// Upper bound on list entries parsed from one message (hostile counts).
const MAX_LIST: usize = 4096;

fn read_attributes(r: &mut Rd<'_>, values: &mut Vec<NuObsValue>) -> Result<(), &'static str> {
    let count = usize::from(r.u16()?);
    let len = usize::from(r.u16()?);
    let mut a = Rd::new(r.take(len)?);
    for _ in 0..count.min(MAX_LIST) {
        let id = a.u16()?;
        let alen = usize::from(a.u16()?);
        let mut v = Rd::new(a.take(alen)?);
        match id {
            NOM_ATTR_NU_VAL_OBS => values.push(NuObsValue::read(&mut v)?),
            NOM_ATTR_NU_CMPD_VAL_OBS => {
                let n = usize::from(v.u16()?);
                let l = usize::from(v.u16()?);
                let mut c = Rd::new(v.take(l)?);
                if n.saturating_mul(NuObsValue::LEN) > l {
                    return Err("compound value count exceeds its length");
                }
                for _ in 0..n {
                    values.push(NuObsValue::read(&mut c)?);
                }
            }
            _ => {} // other attributes (labels, time stamps...) skipped
        }
    }
    Ok(())
}

/// Parse the ActionResult body of an extended poll result (RORS or ROLRS,
/// CMD_CONFIRMED_ACTION): ManagedObjectId, action_type, length,
/// PollMdibDataReplyExt.
pub fn parse_poll_reply(body: &[u8]) -> Result<PollReply, &'static str> {
    let mut r = Rd::new(body);
    let _mo = ManagedObjectId::read(&mut r)?;
    if r.u16()? != NOM_ACT_POLL_MDIB_DATA_EXT {
        return Err("not an extended poll result");
    }
    let len = usize::from(r.u16()?);
    let mut r = Rd::new(r.take(len)?);
    let poll_number = r.u16()?;
    let sequence_no = r.u16()?;
    let rel_time_stamp = r.u32()?;
    let mut abs = [0u8; 8];
    abs.copy_from_slice(r.take(8)?);
    let partition = r.u16()?;
    let code = r.u16()?;
    let attr_group = r.u16()?;
    let ctx_count = usize::from(r.u16()?);
    let ctx_len = usize::from(r.u16()?);
    let mut cr = Rd::new(r.take(ctx_len)?);
    let mut contexts = Vec::new();
    for _ in 0..ctx_count.min(MAX_LIST) {
        let context_id = cr.u16()?;
        let n = usize::from(cr.u16()?);
        let l = usize::from(cr.u16()?);
        let mut or = Rd::new(cr.take(l)?);
        let mut obs = Vec::new();
        for _ in 0..n.min(MAX_LIST) {
            let handle = or.u16()?;
            let mut values = Vec::new();
            read_attributes(&mut or, &mut values)?;
            obs.push(ObservationPoll { handle, values });
        }
        contexts.push((context_id, obs));
    }
    Ok(PollReply {
        poll_number,
        sequence_no,
        rel_time_stamp,
        abs_time_stamp: AbsoluteTime(abs),
        partition,
        code,
        attr_group,
        contexts,
    })
}

/// Encode a poll reply body (the inverse of [`parse_poll_reply`]; each
/// observation's values go into one NOM_ATTR_NU_CMPD_VAL_OBS when there are
/// several, else one NOM_ATTR_NU_VAL_OBS). For round-trip tests.
pub fn encode_poll_reply_body(p: &PollReply) -> Vec<u8> {
    let mut ctxs = Vec::new();
    for (context_id, obs) in &p.contexts {
        let mut ol = Vec::new();
        for o in obs {
            ol.extend_from_slice(&o.handle.to_be_bytes());
            let mut attrs = Vec::new();
            let count: u16 = if o.values.is_empty() { 0 } else { 1 };
            if o.values.len() == 1 {
                attrs.extend_from_slice(&NOM_ATTR_NU_VAL_OBS.to_be_bytes());
                attrs.extend_from_slice(&10u16.to_be_bytes());
                o.values[0].put(&mut attrs);
            } else if o.values.len() > 1 {
                let l = o.values.len() * NuObsValue::LEN;
                attrs.extend_from_slice(&NOM_ATTR_NU_CMPD_VAL_OBS.to_be_bytes());
                attrs.extend_from_slice(&((l + 4) as u16).to_be_bytes());
                attrs.extend_from_slice(&(o.values.len() as u16).to_be_bytes());
                attrs.extend_from_slice(&(l as u16).to_be_bytes());
                for v in &o.values {
                    v.put(&mut attrs);
                }
            }
            ol.extend_from_slice(&count.to_be_bytes());
            ol.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
            ol.extend_from_slice(&attrs);
        }
        ctxs.extend_from_slice(&context_id.to_be_bytes());
        ctxs.extend_from_slice(&(obs.len() as u16).to_be_bytes());
        ctxs.extend_from_slice(&(ol.len() as u16).to_be_bytes());
        ctxs.extend_from_slice(&ol);
    }
    let mut reply = Vec::new();
    reply.extend_from_slice(&p.poll_number.to_be_bytes());
    reply.extend_from_slice(&p.sequence_no.to_be_bytes());
    reply.extend_from_slice(&p.rel_time_stamp.to_be_bytes());
    reply.extend_from_slice(&p.abs_time_stamp.0);
    reply.extend_from_slice(&p.partition.to_be_bytes());
    reply.extend_from_slice(&p.code.to_be_bytes());
    reply.extend_from_slice(&p.attr_group.to_be_bytes());
    reply.extend_from_slice(&(p.contexts.len() as u16).to_be_bytes());
    reply.extend_from_slice(&(ctxs.len() as u16).to_be_bytes());
    reply.extend_from_slice(&ctxs);
    let mut body = Vec::new();
    ManagedObjectId::MDS.put(&mut body);
    body.extend_from_slice(&NOM_ACT_POLL_MDIB_DATA_EXT.to_be_bytes());
    body.extend_from_slice(&(reply.len() as u16).to_be_bytes());
    body.extend_from_slice(&reply);
    body
}

/// A full RORS poll result message around [`encode_poll_reply_body`].
pub fn encode_poll_result(invoke_id: u16, p: &PollReply) -> Vec<u8> {
    data_message(
        RORS_APDU,
        invoke_id,
        CMD_CONFIRMED_ACTION,
        &encode_poll_reply_body(p),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fcs_matches_the_rfc1662_check_value() {
        // CRC-16/X-25 catalogue check value (RFC 1662 FCS, complemented).
        assert_eq!(fcs16(b"123456789"), 0x906E);
        // RFC 1662 §C.2: appending the FCS (LSB first) to the data and
        // running the un-complemented CRC yields the "good FCS" 0xF0B8, i.e.
        // the complemented value 0x0F47.
        let mut d = b"123456789".to_vec();
        d.extend_from_slice(&0x906Eu16.to_le_bytes());
        assert_eq!(fcs16(&d), !0xF0B8u16);
    }

    /// Vector: Data Export Interface Programming Guide §4 "Framing",
    /// "Header Information", "Frame Check Sequence Field", "Transparency".
    /// User data `E1 00 C0 7D C1` (made up to exercise every escape).
    #[test]
    fn serial_frame_vector_with_escapes() {
        let mut out = BytesMut::new();
        encode_serial_frame(&[0xE1, 0x00, 0xC0, 0x7D, 0xC1], &mut out);
        let raw = [0x11, 0x01, 0x00, 0x05, 0xE1, 0x00, 0xC0, 0x7D, 0xC1];
        let fcs = fcs16(&raw).to_le_bytes();
        let mut expect = vec![
            0xC0, // BOF
            0x11, // protocol_id: Data Export
            0x01, // msg_type
            0x00, 0x05, // length of user data, big endian
            0xE1, 0x00, // user data, plain
            0x7D, 0xE0, // 0xC0 escaped
            0x7D, 0x5D, // 0x7D escaped
            0x7D, 0xE1, // 0xC1 escaped
        ];
        for b in fcs {
            // FCS, least-significant byte first, escaped like any byte.
            if matches!(b, 0xC0 | 0xC1 | 0x7D) {
                expect.extend_from_slice(&[0x7D, b ^ 0x20]);
            } else {
                expect.push(b);
            }
        }
        expect.push(0xC1); // EOF
        assert_eq!(&out[..], &expect[..]);
        let mut f = SerialFraming;
        let got = f.decode(&mut out).unwrap().unwrap();
        assert_eq!(&got[..], &[0xE1, 0x00, 0xC0, 0x7D, 0xC1]);
        assert!(out.is_empty());
    }

    #[test]
    fn serial_decoder_resyncs_and_reports_dropped_bytes() {
        let mut buf = BytesMut::from(&b"xyz"[..]);
        let mut good = BytesMut::new();
        encode_serial_frame(&encode_release_request(), &mut good);
        // Corrupt copy: flip a byte in the user data.
        let mut bad = good.clone();
        bad[8] ^= 0x01;
        buf.extend_from_slice(&bad);
        buf.extend_from_slice(&good);
        let mut d = IntellivueDecoder::new(SerialFraming);
        assert_eq!(
            d.decode(&mut buf),
            Err(IntellivueError::Garbage { dropped: 3 })
        );
        assert_eq!(
            d.decode(&mut buf),
            Err(IntellivueError::BadFcs { dropped: bad.len() })
        );
        let m = d.decode(&mut buf).unwrap().unwrap();
        assert!(matches!(m, Message::Session { spdu: SPDU_FN, .. }));
        assert_eq!(d.decode(&mut buf), Ok(None));
    }

    #[test]
    fn partial_frame_waits_and_restarted_frame_is_dropped() {
        let mut good = BytesMut::new();
        encode_serial_frame(&encode_release_request(), &mut good);
        let mut d = IntellivueDecoder::new(SerialFraming);
        let mut buf = BytesMut::from(&good[..10]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        // The sender restarts: a new BOF before the EOF.
        buf.extend_from_slice(&good);
        assert_eq!(
            d.decode(&mut buf),
            Err(IntellivueError::Aborted { dropped: 10 })
        );
        assert!(d.decode(&mut buf).unwrap().is_some());
    }

    #[test]
    fn oversized_frame_is_dropped() {
        let mut buf = BytesMut::new();
        buf.put_u8(BOF);
        buf.extend_from_slice(&vec![0u8; MAX_WIRE_FRAME + 10]);
        let mut f = SerialFraming;
        assert!(matches!(
            f.decode(&mut buf),
            Err(IntellivueError::Oversized { .. })
        ));
        assert!(buf.is_empty());
    }

    /// Vector: Guide §5 "Association Release Request" — the fixed message
    /// `09 18 C1 16 61 80 30 80 02 01 01 A0 80 62 80 80 01 00 00 00 00 00
    /// 00 00 00 00`.
    #[test]
    fn release_request_vector() {
        assert_eq!(
            encode_release_request(),
            vec![
                0x09, 0x18, // FN_SPDU, LI = 24
                0xC1, 0x16, // presentation header, LI = 22
                0x61, 0x80, 0x30, 0x80, 0x02, 0x01, 0x01, 0xA0, 0x80, 0x62, 0x80, 0x80, 0x01, 0x00,
                0x00, 0x00, 0x00, 0x00, // RLRQ
                0x00, 0x00, 0x00, 0x00, // trailer
            ]
        );
    }

    #[test]
    fn association_request_is_a_well_formed_cn_spdu() {
        let m = encode_association_request(8000);
        assert_eq!(m[0], SPDU_CN);
        assert_eq!(raw_message_len(&m), Ok(Some(m.len())));
        match parse_message(&m).unwrap() {
            Message::Session { spdu, body } => {
                assert_eq!(spdu, SPDU_CN);
                assert_eq!(&body[..14], &ASSOC_SESSION_DATA);
                assert_eq!(body[14], 0xC1);
            }
            other => panic!("{other:?}"),
        }
    }

    /// Vector: Guide §5 "Poll Data Request Extended" layout.
    #[test]
    fn poll_request_vector() {
        assert_eq!(
            encode_poll_request(0x0102, 7),
            vec![
                0xE1, 0x00, 0x00, 0x02, // SPpdu: session_id, p_context_id
                0x00, 0x01, 0x00, 0x20, // ROapdus: ROIV_APDU, length 32
                0x01, 0x02, 0x00, 0x07, 0x00,
                0x1A, // ROIVapdu: invoke 0x0102, CMD_CONFIRMED_ACTION, 26
                0x00, 0x21, 0x00, 0x00, 0x00, 0x00, // managed object: NOM_MOC_VMS_MDS, 0, 0
                0x00, 0x00, 0x00, 0x00, // scope
                0xF1, 0x3B, 0x00, 0x0C, // NOM_ACT_POLL_MDIB_DATA_EXT, length 12
                0x00, 0x07, // poll_number
                0x00, 0x01, 0x00, 0x06, // NOM_PART_OBJ, NOM_MOC_VMO_METRIC_NU
                0x00, 0x00, // polled_attr_grp: all
                0x00, 0x00, 0x00, 0x00, // poll_ext_attr: empty
            ]
        );
    }

    /// Vector: Guide §5 "MDS Create Event Result".
    #[test]
    fn mds_create_result_vector() {
        let ev = EventReport {
            managed_object: ManagedObjectId::MDS,
            event_time: 0x0048_4700,
            event_type: NOM_NOTI_MDS_CREAT,
            info: Bytes::new(),
        };
        assert_eq!(
            encode_event_report_result(1, &ev),
            vec![
                0xE1, 0x00, 0x00, 0x02, // SPpdu
                0x00, 0x02, 0x00, 0x14, // ROapdus: RORS_APDU, length 20
                0x00, 0x01, 0x00, 0x01, 0x00,
                0x0E, // invoke 1, CMD_CONFIRMED_EVENT_REPORT, 14
                0x00, 0x21, 0x00, 0x00, 0x00, 0x00, // NOM_MOC_VMS_MDS, 0, 0
                0x00, 0x48, 0x47, 0x00, // current_time (echoed)
                0x0D, 0x06, 0x00, 0x00, // NOM_NOTI_MDS_CREAT, length 0
            ]
        );
    }

    /// Vector: Guide §5 "FLOAT-Type" special values and examples.
    #[test]
    fn float_type_values() {
        assert_eq!(FloatType(0x007F_FFFF).value(), FloatValue::NaN);
        assert_eq!(FloatType(0x0080_0000).value(), FloatValue::NRes);
        assert_eq!(FloatType(0x007F_FFFE).value(), FloatValue::PosInf);
        assert_eq!(FloatType(0x0080_0002).value(), FloatValue::NegInf);
        // 0xFF000175: exponent -1, mantissa 373 -> 37.3
        assert_eq!(
            FloatType(0xFF00_0175).value(),
            FloatValue::Number(37.300000000000004)
        );
        assert_eq!(FloatType(0x0000_0048).value(), FloatValue::Number(72.0));
        // Negative mantissa: 0x00FFFFFF = -1
        assert_eq!(FloatType(0x00FF_FFFF).value(), FloatValue::Number(-1.0));
    }

    #[test]
    fn abs_time_bcd() {
        let t = AbsoluteTime([0x20, 0x26, 0x11, 0x24, 0x10, 0x00, 0x05, 0x50]);
        let dt = t.to_datetime().unwrap();
        assert_eq!(dt.to_string(), "2026-11-24 10:00:05.5");
        assert_eq!(AbsoluteTime([0xFF; 8]).to_datetime(), None);
    }

    #[test]
    fn raw_framing_splits_unframed_messages() {
        let mut buf = BytesMut::new();
        let a = encode_release_request();
        let b = encode_poll_request(1, 1);
        buf.extend_from_slice(&a);
        buf.extend_from_slice(&b);
        buf.extend_from_slice(&b[..5]);
        let mut d = IntellivueDecoder::new(RawFraming);
        assert!(matches!(
            d.decode(&mut buf),
            Ok(Some(Message::Session { .. }))
        ));
        assert!(matches!(d.decode(&mut buf), Ok(Some(Message::Data(_)))));
        assert_eq!(d.decode(&mut buf), Ok(None));
    }

    fn arb_value() -> impl Strategy<Value = NuObsValue> {
        (any::<u16>(), any::<u16>(), any::<u16>(), any::<u32>()).prop_map(|(p, s, u, v)| {
            NuObsValue {
                physio_id: p,
                state: s,
                unit_code: u,
                value: FloatType(v),
            }
        })
    }

    fn arb_reply() -> impl Strategy<Value = PollReply> {
        let obs = (any::<u16>(), proptest::collection::vec(arb_value(), 0..4))
            .prop_map(|(handle, values)| ObservationPoll { handle, values });
        let ctx = (any::<u16>(), proptest::collection::vec(obs, 0..4));
        (
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            any::<[u8; 8]>(),
            proptest::collection::vec(ctx, 0..3),
        )
            .prop_map(|(pn, sn, rel, abs, contexts)| PollReply {
                poll_number: pn,
                sequence_no: sn,
                rel_time_stamp: rel,
                abs_time_stamp: AbsoluteTime(abs),
                partition: NOM_PART_OBJ,
                code: NOM_MOC_VMO_METRIC_NU,
                attr_group: 0,
                contexts,
            })
    }

    proptest! {
        #[test]
        fn serial_frame_round_trip(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = BytesMut::new();
            encode_serial_frame(&data, &mut buf);
            let mut f = SerialFraming;
            let got = f.decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(&got[..], &data[..]);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn poll_result_round_trip_through_both_framings(
            reply in arb_reply(), invoke in any::<u16>(), serial in any::<bool>()
        ) {
            let msg = encode_poll_result(invoke, &reply);
            let mut buf = BytesMut::new();
            let m = if serial {
                SerialFraming.encode(&msg, &mut buf);
                IntellivueDecoder::new(SerialFraming).decode(&mut buf)
            } else {
                RawFraming.encode(&msg, &mut buf);
                IntellivueDecoder::new(RawFraming).decode(&mut buf)
            };
            let Ok(Some(Message::Data(d))) = m else { panic!("{m:?}") };
            prop_assert_eq!(d.kind, RoKind::Result);
            prop_assert_eq!(d.invoke_id, invoke);
            prop_assert_eq!(d.command_type, CMD_CONFIRMED_ACTION);
            prop_assert_eq!(parse_poll_reply(&d.body).unwrap(), reply);
        }

        #[test]
        fn poll_request_round_trip(invoke in any::<u16>(), pn in any::<u16>()) {
            let m = parse_message(&encode_poll_request(invoke, pn)).unwrap();
            let Message::Data(d) = m else { panic!() };
            prop_assert_eq!(d.invoke_id, invoke);
            let p = parse_poll_request(&d.body).unwrap();
            prop_assert_eq!(p.poll_number, pn);
            prop_assert_eq!(p.code, NOM_MOC_VMO_METRIC_NU);
        }

        #[test]
        fn float_parts_round_trip(e in any::<i8>(), m in -0x80_0000i32..0x80_0000) {
            let f = FloatType::from_parts(e, m);
            prop_assert_eq!(f.exponent(), e);
            prop_assert_eq!(f.mantissa(), m);
        }

        #[test]
        fn decoders_never_panic(
            data in proptest::collection::vec(any::<u8>(), 0..2048),
            split in 1usize..64,
        ) {
            let mut s = IntellivueDecoder::new(SerialFraming);
            let mut r = IntellivueDecoder::new(RawFraming);
            let (mut bs, mut br) = (BytesMut::new(), BytesMut::new());
            for chunk in data.chunks(split) {
                bs.extend_from_slice(chunk);
                br.extend_from_slice(chunk);
                loop {
                    match s.decode(&mut bs) {
                        Ok(Some(Message::Data(d))) => { let _ = parse_poll_reply(&d.body); let _ = parse_event_report(&d.body); }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => prop_assert!(e.dropped() > 0),
                    }
                }
                loop {
                    match r.decode(&mut br) {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => prop_assert!(e.dropped() > 0),
                    }
                }
                prop_assert!(bs.len() <= MAX_WIRE_FRAME + 64);
                prop_assert!(br.len() <= MAX_USER_DATA + 64);
            }
            let _ = parse_poll_reply(&data);
            let _ = parse_poll_request(&data);
            let _ = parse_event_report(&data);
        }
    }
}
