//! Sans-IO codec for Nonin OEM pulse oximeter modules (OEM III and
//! relatives: Xpod, WristOx2 3150 serial profile), serial **Data Format 7**.
//!
//! # Sources
//!
//! Nonin's "OEM III Module Specification and Technical Information" and the
//! Xpod / WristOx2 3150 "OEM Specification and Technical Information"
//! documents (section "Serial Data Format #7") describe this format. The
//! documents themselves were not available here; the facts below come from
//! public restatements of them, read for facts only:
//! - an R processing script for Data Format 7 recordings that restates the
//!   specification's byte table (frame layout, status bits with their
//!   names SNSD/ARTF/OOT/SNSA/RPRF/GPRF/SYNC, the per-frame meaning of byte
//!   4, the STAT2 byte, the PR/SpO2 bit layouts, the missing-data values
//!   PR = 511 and SpO2 = 127, the checksum, 25 frames per packet and 3
//!   packets per second);
//! - the Apache-2.0 Pufferfish ventilator firmware (pez-globo), `Nonin/Types.h`
//!   and its OEM III packet parser: the same status masks (0x40 SNSD, 0x20
//!   ARTF, 0x10 OOT, 0x08 SNSA, 0x04 RPRF, 0x02 GPRF, both = yellow) and
//!   frame indices (HR MSB/LSB frames 1–2, SpO2 3, REV 4, SpO2-D 9, SpO2 Fast
//!   10, SpO2 B-B 11, E-HR 14–15, E-SpO2 16, E-SpO2-D 17, HR-D 20–21, E-HR-D
//!   22–23); it lists frame 8 as reserved on the OEM III (STAT2 is
//!   documented for the 3150/Xpod);
//! - a public Nonin WristOx2 driver (Java) giving the same frame table for
//!   the 3150's 5-byte formats and the missing-data check (127 / 511);
//! - the Onyx II 9560 manual's status-byte description (SNSA "device is
//!   providing unusable data", SYNC "= 1 on frame 1, 0 on frames 2–25",
//!   perfusion bits set for 12 frames (160 ms) per pulse).
//!
//! # Frame (Data Format 7)
//!
//! ```text
//! byte 1  STATUS   bit 7 always 1
//!                  bit 6 SNSD  sensor disconnected / inoperable
//!                  bit 5 ARTF  artifact (per pulse)
//!                  bit 4 OOT   out of track (no consecutive good pulses)
//!                  bit 3 SNSA  sensor alarm: unusable data
//!                  bit 2 RPRF  red perfusion   } both set: yellow
//!                  bit 1 GPRF  green perfusion }
//!                  bit 0 SYNC  1 on frame 1 of the packet, else 0
//! byte 2  PLETH MSB
//! byte 3  PLETH LSB   (16-bit pleth sample, 75 samples/s)
//! byte 4  DATA        0..=127; meaning by frame position (see below)
//! byte 5  CHK         (byte1 + byte2 + byte3 + byte4) mod 256
//! ```
//!
//! A packet is 25 frames (frame 1 has SYNC); 75 frames/s, 3 packets/s.
//!
//! Byte 4 by frame (1-based): 1 HR MSB, 2 HR LSB, 3 SpO2, 4 SREV (firmware
//! revision), 5–7 reserved, 8 STAT2 (3150/Xpod; reserved on the OEM III),
//! 9 SpO2-D, 10 SpO2 Fast, 11 SpO2 B-B, 12–13 reserved, 14 E-HR MSB,
//! 15 E-HR LSB, 16 E-SpO2, 17 E-SpO2-D, 18–19 reserved, 20 HR-D MSB,
//! 21 HR-D LSB, 22 E-HR-D MSB, 23 E-HR-D LSB, 24–25 reserved.
//! Heart rates are 9 bits: MSB byte bits 1–0 = HR bits 8–7, LSB byte bits
//! 6–0 = HR bits 6–0. SpO2 values are 7 bits. Missing data: HR 511, SpO2
//! 127. "E-" values are 8-beat averages, the others 4-beat; "-D" values are
//! formatted for display; Fast is the non-slew-limited 4-beat average and
//! B-B the unaveraged beat-to-beat value.
//!
//! # Decoder contract
//!
//! `decode(&mut BytesMut) -> Result<Option<NoninPacket>, NoninError>`:
//! `Ok(None)` = need more bytes. A packet is returned only when 25 valid
//! frames (bit 7 of byte 1 set, bit 7 of byte 4 clear, checksum right) with
//! SYNC on the first and only the first are in the buffer. On an invalid
//! frame the decoder slides one byte; valid frames seen while looking for a
//! SYNC frame are dropped whole; a packet interrupted by an invalid frame or
//! an early SYNC frame is dropped. Every error reports the bytes dropped and
//! is recoverable. After `Ok(None)` the buffer holds less than one packet
//! ([`PACKET_LEN`] bytes).

use bytes::{Buf, BytesMut};

/// Bytes per frame.
pub const FRAME_LEN: usize = 5;
/// Frames per packet.
pub const FRAMES_PER_PACKET: usize = 25;
/// Bytes per packet.
pub const PACKET_LEN: usize = FRAME_LEN * FRAMES_PER_PACKET;
/// Frames per second (one pleth sample each).
pub const FRAMES_PER_SECOND: u32 = 75;
/// Time between frames (pleth samples), µs: 1/75 s rounded down.
pub const FRAME_PERIOD_US: u32 = 13_333;
/// Duration of one packet, µs (25 × [`FRAME_PERIOD_US`]).
pub const PACKET_DURATION_US: i64 = FRAME_PERIOD_US as i64 * FRAMES_PER_PACKET as i64;

/// Missing-data indicator of the heart-rate values (all nine bits set).
pub const HR_MISSING: u16 = 511;
/// Missing-data indicator of the SpO2 values (all seven bits set).
pub const SPO2_MISSING: u8 = 127;

/// Status byte bits.
pub mod status {
    /// Always set: marks byte 1 of a frame.
    pub const ALWAYS: u8 = 0x80;
    /// SNSD: sensor disconnected from the oximeter, or inoperable.
    pub const SNSD: u8 = 0x40;
    /// ARTF: artifact detected for this pulse.
    pub const ARTF: u8 = 0x20;
    /// OOT: out of track, an absence of consecutive good pulse signals.
    pub const OOT: u8 = 0x10;
    /// SNSA: sensor alarm, the device is providing unusable data.
    pub const SNSA: u8 = 0x08;
    /// RPRF: red perfusion (low/no pulse signal); with GPRF: yellow.
    pub const RPRF: u8 = 0x04;
    /// GPRF: green perfusion (high signal quality); with RPRF: yellow.
    pub const GPRF: u8 = 0x02;
    /// SYNC: set on frame 1 of a packet only.
    pub const SYNC: u8 = 0x01;
}

/// 0-based frame index of each byte-4 value in the packet.
pub mod slot {
    pub const HR_MSB: usize = 0;
    pub const HR_LSB: usize = 1;
    pub const SPO2: usize = 2;
    pub const SREV: usize = 3;
    pub const STAT2: usize = 7;
    pub const SPO2_D: usize = 8;
    pub const SPO2_FAST: usize = 9;
    pub const SPO2_BB: usize = 10;
    pub const E_HR_MSB: usize = 13;
    pub const E_HR_LSB: usize = 14;
    pub const E_SPO2: usize = 15;
    pub const E_SPO2_D: usize = 16;
    pub const HR_D_MSB: usize = 19;
    pub const HR_D_LSB: usize = 20;
    pub const E_HR_D_MSB: usize = 21;
    pub const E_HR_D_LSB: usize = 22;
}

/// Perfusion indication of a frame (status bits 2 and 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perfusion {
    /// Neither bit: no indication (outside a pulse).
    None,
    /// GPRF: high signal quality.
    Green,
    /// RPRF + GPRF: low/marginal signal quality.
    Yellow,
    /// RPRF: low/no pulse signal.
    Red,
}

/// One 5-byte frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoninFrame {
    pub status: u8,
    pub pleth: u16,
    /// Byte 4 (0..=127).
    pub data: u8,
}

impl NoninFrame {
    pub fn sync(&self) -> bool {
        self.status & status::SYNC != 0
    }
    pub fn sensor_disconnect(&self) -> bool {
        self.status & status::SNSD != 0
    }
    pub fn artifact(&self) -> bool {
        self.status & status::ARTF != 0
    }
    pub fn out_of_track(&self) -> bool {
        self.status & status::OOT != 0
    }
    pub fn sensor_alarm(&self) -> bool {
        self.status & status::SNSA != 0
    }
    pub fn perfusion(&self) -> Perfusion {
        match (
            self.status & status::RPRF != 0,
            self.status & status::GPRF != 0,
        ) {
            (false, false) => Perfusion::None,
            (false, true) => Perfusion::Green,
            (true, true) => Perfusion::Yellow,
            (true, false) => Perfusion::Red,
        }
    }

    /// The frame on the wire, checksum included.
    pub fn encode(&self) -> [u8; FRAME_LEN] {
        let [msb, lsb] = self.pleth.to_be_bytes();
        let b = [self.status, msb, lsb, self.data];
        [b[0], b[1], b[2], b[3], checksum(&b)]
    }

    /// Check and parse 5 bytes.
    pub fn parse(b: &[u8; FRAME_LEN]) -> Result<NoninFrame, FrameFault> {
        if b[0] & status::ALWAYS == 0 {
            return Err(FrameFault::NoStatusBit);
        }
        let computed = checksum(&b[..4]);
        if computed != b[4] {
            return Err(FrameFault::Checksum {
                got: b[4],
                computed,
            });
        }
        if b[3] & 0x80 != 0 {
            return Err(FrameFault::DataBit7);
        }
        Ok(NoninFrame {
            status: b[0],
            pleth: u16::from_be_bytes([b[1], b[2]]),
            data: b[3],
        })
    }
}

/// The checksum: sum of the bytes modulo 256.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

/// A 9-bit heart rate from its MSB (bits 8–7 in bits 1–0) and LSB (bits
/// 6–0) bytes.
pub fn hr9(msb: u8, lsb: u8) -> u16 {
    (u16::from(msb & 0x03) << 7) | u16::from(lsb & 0x7F)
}

/// Split a 9-bit heart rate into its MSB and LSB bytes (inverse of [`hr9`]).
pub fn hr9_bytes(hr: u16) -> (u8, u8) {
    (((hr >> 7) & 0x03) as u8, (hr & 0x7F) as u8)
}

/// The values a packet's byte-4 slots carry (raw: missing-data indicators
/// included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PacketValues {
    /// HR: 4-beat average pulse rate, standard mode.
    pub hr: u16,
    /// SpO2: 4-beat average, standard mode.
    pub spo2: u8,
    /// SREV: oximeter firmware revision.
    pub srev: u8,
    /// STAT2 (3150/Xpod; reserved, usually 0, on the OEM III).
    pub stat2: u8,
    pub spo2_d: u8,
    pub spo2_fast: u8,
    pub spo2_bb: u8,
    /// E-HR: 8-beat extended average.
    pub e_hr: u16,
    /// E-SpO2: 8-beat extended average.
    pub e_spo2: u8,
    pub e_spo2_d: u8,
    pub hr_d: u16,
    pub e_hr_d: u16,
}

impl PacketValues {
    /// Byte 4 of each of the 25 frames (reserved slots 0).
    pub fn data_bytes(&self) -> [u8; FRAMES_PER_PACKET] {
        let mut d = [0u8; FRAMES_PER_PACKET];
        let mut hr = |m: usize, l: usize, v: u16| {
            let (a, b) = hr9_bytes(v);
            d[m] = a;
            d[l] = b;
        };
        hr(slot::HR_MSB, slot::HR_LSB, self.hr);
        hr(slot::E_HR_MSB, slot::E_HR_LSB, self.e_hr);
        hr(slot::HR_D_MSB, slot::HR_D_LSB, self.hr_d);
        hr(slot::E_HR_D_MSB, slot::E_HR_D_LSB, self.e_hr_d);
        d[slot::SPO2] = self.spo2 & 0x7F;
        d[slot::SREV] = self.srev & 0x7F;
        d[slot::STAT2] = self.stat2 & 0x7F;
        d[slot::SPO2_D] = self.spo2_d & 0x7F;
        d[slot::SPO2_FAST] = self.spo2_fast & 0x7F;
        d[slot::SPO2_BB] = self.spo2_bb & 0x7F;
        d[slot::E_SPO2] = self.e_spo2 & 0x7F;
        d[slot::E_SPO2_D] = self.e_spo2_d & 0x7F;
        d
    }
}

/// One 25-frame packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoninPacket {
    pub frames: [NoninFrame; FRAMES_PER_PACKET],
}

impl NoninPacket {
    /// Build a packet from 25 status bytes, pleth samples and values (SYNC is
    /// set on frame 1 and cleared elsewhere, bit 7 always set).
    pub fn build(
        statuses: &[u8; FRAMES_PER_PACKET],
        pleth: &[u16; FRAMES_PER_PACKET],
        values: &PacketValues,
    ) -> NoninPacket {
        let data = values.data_bytes();
        let frames = std::array::from_fn(|i| {
            let sync = if i == 0 { status::SYNC } else { 0 };
            NoninFrame {
                status: (statuses[i] & !status::SYNC) | status::ALWAYS | sync,
                pleth: pleth[i],
                data: data[i],
            }
        });
        NoninPacket { frames }
    }

    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut out = [0u8; PACKET_LEN];
        for (i, f) in self.frames.iter().enumerate() {
            out[i * FRAME_LEN..(i + 1) * FRAME_LEN].copy_from_slice(&f.encode());
        }
        out
    }

    fn d(&self, i: usize) -> u8 {
        self.frames[i].data
    }

    /// The byte-4 values of this packet.
    pub fn values(&self) -> PacketValues {
        PacketValues {
            hr: hr9(self.d(slot::HR_MSB), self.d(slot::HR_LSB)),
            spo2: self.d(slot::SPO2),
            srev: self.d(slot::SREV),
            stat2: self.d(slot::STAT2),
            spo2_d: self.d(slot::SPO2_D),
            spo2_fast: self.d(slot::SPO2_FAST),
            spo2_bb: self.d(slot::SPO2_BB),
            e_hr: hr9(self.d(slot::E_HR_MSB), self.d(slot::E_HR_LSB)),
            e_spo2: self.d(slot::E_SPO2),
            e_spo2_d: self.d(slot::E_SPO2_D),
            hr_d: hr9(self.d(slot::HR_D_MSB), self.d(slot::HR_D_LSB)),
            e_hr_d: hr9(self.d(slot::E_HR_D_MSB), self.d(slot::E_HR_D_LSB)),
        }
    }

    /// The 25 pleth samples.
    pub fn pleth(&self) -> [u16; FRAMES_PER_PACKET] {
        self.frames.map(|f| f.pleth)
    }

    /// OR of the status bytes of all frames (SYNC and bit 7 removed): a
    /// condition reported on any frame of the packet.
    pub fn status_any(&self) -> u8 {
        self.frames.iter().fold(0, |a, f| a | f.status) & !(status::ALWAYS | status::SYNC)
    }

    /// Whether any frame reports red (low/no signal) perfusion. Yellow
    /// (both bits) is not red.
    pub fn red_perfusion(&self) -> bool {
        self.frames.iter().any(|f| f.perfusion() == Perfusion::Red)
    }
}

/// Why a 5-byte candidate is not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFault {
    /// Byte 1 does not have bit 7 set.
    NoStatusBit,
    /// The check byte does not match.
    Checksum { got: u8, computed: u8 },
    /// Byte 4 has bit 7 set (it is always 0..=127).
    DataBit7,
    /// A valid frame without SYNC while looking for the start of a packet.
    NotPacketStart,
    /// A SYNC frame before the packet had 25 frames.
    EarlySync,
}

impl std::fmt::Display for FrameFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameFault::NoStatusBit => f.write_str("status byte without bit 7"),
            FrameFault::Checksum { got, computed } => {
                write!(
                    f,
                    "checksum mismatch (got {got:#04x}, computed {computed:#04x})"
                )
            }
            FrameFault::DataBit7 => f.write_str("data byte above 127"),
            FrameFault::NotPacketStart => f.write_str("frame without SYNC outside a packet"),
            FrameFault::EarlySync => f.write_str("SYNC frame inside a packet"),
        }
    }
}

/// Why input was dropped. All variants are recoverable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoninError {
    /// Bytes skipped while looking for the SYNC frame of a packet; `first`
    /// is why the first skipped position was refused.
    #[error("{dropped} bytes skipped looking for a packet start (first: {first})")]
    Resync { first: FrameFault, dropped: usize },
    /// A packet broken off after `frames` valid frames.
    #[error("packet broken after {frames} frames ({fault}); dropped {dropped} bytes")]
    BrokenPacket {
        frames: usize,
        fault: FrameFault,
        dropped: usize,
    },
}

impl NoninError {
    pub fn dropped(&self) -> usize {
        match self {
            NoninError::Resync { dropped, .. } | NoninError::BrokenPacket { dropped, .. } => {
                *dropped
            }
        }
    }

    /// Every error is recoverable: decoding resumes at the next SYNC frame.
    pub fn is_recoverable(&self) -> bool {
        true
    }
}

fn frame_at(buf: &[u8], i: usize) -> Option<Result<NoninFrame, FrameFault>> {
    let b: &[u8; FRAME_LEN] = buf
        .get(i * FRAME_LEN..(i + 1) * FRAME_LEN)?
        .try_into()
        .ok()?;
    Some(NoninFrame::parse(b))
}

/// Packet decoder (stateless between calls: the buffer holds the state).
#[derive(Debug, Default)]
pub struct NoninDecoder;

impl NoninDecoder {
    pub fn new() -> Self {
        NoninDecoder
    }

    /// Decode one packet. See the module docs for the contract.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<NoninPacket>, NoninError> {
        // Find a SYNC frame at the front, sliding over anything else.
        let mut dropped = 0usize;
        let mut first = None;
        loop {
            let fault = match frame_at(buf, 0) {
                None => {
                    return match first {
                        Some(first) => Err(NoninError::Resync { first, dropped }),
                        None => Ok(None),
                    };
                }
                Some(Ok(f)) if f.sync() => break,
                Some(Ok(_)) => FrameFault::NotPacketStart,
                Some(Err(e)) => e,
            };
            // A valid frame out of place is skipped whole (the stream is
            // aligned); an invalid one by one byte.
            let n = if fault == FrameFault::NotPacketStart {
                FRAME_LEN
            } else {
                1
            };
            buf.advance(n);
            dropped += n;
            first.get_or_insert(fault);
        }
        if let Some(first) = first {
            // Report the skipped bytes now; the SYNC frame stays for the
            // next call.
            return Err(NoninError::Resync { first, dropped });
        }
        // A SYNC frame is at the front: check the other 24.
        let mut frames = [NoninFrame {
            status: 0,
            pleth: 0,
            data: 0,
        }; FRAMES_PER_PACKET];
        for (i, slot) in frames.iter_mut().enumerate() {
            let fault = match frame_at(buf, i) {
                None => return Ok(None),
                Some(Ok(f)) if i > 0 && f.sync() => FrameFault::EarlySync,
                Some(Ok(f)) => {
                    *slot = f;
                    continue;
                }
                Some(Err(e)) => e,
            };
            // Drop the good frames before the fault; for an invalid frame
            // also its first byte (the new SYNC frame of an early SYNC
            // stays).
            let n = i * FRAME_LEN + usize::from(fault != FrameFault::EarlySync);
            buf.advance(n);
            return Err(NoninError::BrokenPacket {
                frames: i,
                fault,
                dropped: n,
            });
        }
        buf.advance(PACKET_LEN);
        Ok(Some(NoninPacket { frames }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> (Vec<NoninPacket>, Vec<NoninError>, usize) {
        let mut dec = NoninDecoder::new();
        let mut buf = BytesMut::from(input);
        let (mut ps, mut es) = (vec![], vec![]);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(p)) => ps.push(p),
                Ok(None) => break,
                Err(e) => es.push(e),
            }
        }
        (ps, es, buf.len())
    }

    /// Frame 1 of a packet: SpO2 97 %, HR 72/min, green perfusion, pleth
    /// 0x8000, per the Data Format 7 byte table (Nonin OEM III / 3150
    /// specification, "Serial Data Format #7", as restated publicly).
    #[test]
    fn frame_vector_matches_the_byte_table() {
        #[rustfmt::skip]
        let bytes: [u8; 5] = [
            0x83,       // status: bit 7 | GPRF (bit 1) | SYNC (bit 0)
            0x80, 0x00, // pleth MSB, LSB = 32768
            0x00,       // byte 4 of frame 1: HR MSB (HR bits 8-7 = 0)
            0x03,       // checksum: 0x83 + 0x80 + 0x00 + 0x00 = 0x103 mod 256
        ];
        let f = NoninFrame::parse(&bytes).unwrap();
        assert!(f.sync());
        assert_eq!(f.perfusion(), Perfusion::Green);
        assert_eq!(f.pleth, 32768);
        assert_eq!(f.encode(), bytes);
        // Bit 7 missing, checksum off, data byte > 127.
        assert_eq!(
            NoninFrame::parse(&[0x03, 0x80, 0, 0, 0x83]),
            Err(FrameFault::NoStatusBit)
        );
        assert!(matches!(
            NoninFrame::parse(&[0x83, 0x80, 0, 0, 0x04]),
            Err(FrameFault::Checksum {
                got: 4,
                computed: 3
            })
        ));
        assert_eq!(
            NoninFrame::parse(&[0x83, 0x80, 0, 0x80, 0x83]),
            Err(FrameFault::DataBit7)
        );
    }

    #[test]
    fn status_bits_and_perfusion_colours() {
        let f = |s: u8| NoninFrame {
            status: s,
            pleth: 0,
            data: 0,
        };
        assert!(f(0xC0).sensor_disconnect());
        assert!(f(0xA0).artifact());
        assert!(f(0x90).out_of_track());
        assert!(f(0x88).sensor_alarm());
        assert_eq!(f(0x84).perfusion(), Perfusion::Red);
        assert_eq!(f(0x86).perfusion(), Perfusion::Yellow);
        assert_eq!(f(0x82).perfusion(), Perfusion::Green);
        assert_eq!(f(0x80).perfusion(), Perfusion::None);
    }

    #[test]
    fn heart_rate_is_nine_bits() {
        // HR 300 = 0b1_0010_1100: MSB byte 0b10, LSB byte 0b010_1100.
        assert_eq!(hr9_bytes(300), (0x02, 0x2C));
        assert_eq!(hr9(0x02, 0x2C), 300);
        assert_eq!(hr9_bytes(HR_MISSING), (0x03, 0x7F));
        assert_eq!(hr9(0x03, 0x7F), 511);
        // Reserved bits of the MSB byte are ignored.
        assert_eq!(hr9(0x7C | 0x01, 0x48), 128 + 72);
    }

    fn packet(values: &PacketValues) -> NoninPacket {
        let mut statuses = [0x80u8; 25];
        for s in statuses.iter_mut().take(12) {
            *s |= status::GPRF;
        }
        let pleth = std::array::from_fn(|i| 30_000 + 100 * i as u16);
        NoninPacket::build(&statuses, &pleth, values)
    }

    fn vals() -> PacketValues {
        PacketValues {
            hr: 72,
            spo2: 97,
            srev: 0x30,
            spo2_d: 97,
            spo2_fast: 96,
            spo2_bb: 95,
            e_hr: 73,
            e_spo2: 98,
            e_spo2_d: 98,
            hr_d: 72,
            e_hr_d: 73,
            ..Default::default()
        }
    }

    /// The byte-4 slots of a packet, per the frame table in the module docs.
    #[test]
    fn packet_slots_follow_the_frame_table() {
        let p = packet(&vals());
        let bytes = p.encode();
        let d = |frame: usize| bytes[(frame - 1) * 5 + 3];
        assert_eq!(d(1), 0); // HR MSB
        assert_eq!(d(2), 72); // HR LSB
        assert_eq!(d(3), 97); // SpO2
        assert_eq!(d(4), 0x30); // SREV
        assert_eq!(d(9), 97); // SpO2-D
        assert_eq!(d(10), 96); // SpO2 Fast
        assert_eq!(d(11), 95); // SpO2 B-B
        assert_eq!(d(15), 73); // E-HR LSB
        assert_eq!(d(16), 98); // E-SpO2
        assert_eq!(d(17), 98); // E-SpO2-D
        assert_eq!(d(21), 72); // HR-D LSB
        assert_eq!(d(23), 73); // E-HR-D LSB
        // SYNC only on frame 1.
        assert_eq!(bytes[0] & 1, 1);
        assert!((1..25).all(|i| bytes[i * 5] & 1 == 0));
        let (ps, es, rest) = decode_all(&bytes);
        assert!(es.is_empty());
        assert_eq!(rest, 0);
        assert_eq!(ps[0], p);
        assert_eq!(ps[0].values(), vals());
    }

    #[test]
    fn mid_packet_start_is_skipped_and_resyncs() {
        let p = packet(&vals()).encode();
        // Join mid-packet at byte 2 of frame 20, then two whole packets.
        let mut input = p[97..].to_vec();
        input.extend_from_slice(&p);
        input.extend_from_slice(&p);
        let (ps, es, rest) = decode_all(&input);
        assert_eq!(ps.len(), 2);
        assert_eq!(rest, 0);
        assert_eq!(es.len(), 1, "{es:?}");
        // 3 bytes of frame 20 one at a time, then frames 21-25 whole.
        assert_eq!(es[0].dropped(), 28);
    }

    #[test]
    fn corrupted_and_short_packets_are_dropped_and_counted() {
        let good = packet(&vals()).encode();
        let mut bad = good;
        bad[5 * 10 + 2] ^= 0x10; // pleth LSB of frame 11: checksum fails
        let mut short = good[..5 * 7].to_vec(); // 7 frames, then a new packet
        short.extend_from_slice(&good);
        let mut input = bad.to_vec();
        input.extend_from_slice(&short);
        let (ps, es, rest) = decode_all(&input);
        assert_eq!(ps.len(), 1);
        assert_eq!(rest, 0);
        let total: usize = es.iter().map(|e| e.dropped()).sum();
        assert_eq!(total, PACKET_LEN + 35, "{es:?}");
        assert!(matches!(
            es[0],
            NoninError::BrokenPacket {
                frames: 10,
                dropped: 51,
                ..
            }
        ));
        assert!(es.iter().any(|e| matches!(
            e,
            NoninError::BrokenPacket {
                frames: 7,
                fault: FrameFault::EarlySync,
                dropped: 35
            }
        )));
    }

    #[test]
    fn partial_packet_waits() {
        let p = packet(&vals()).encode();
        let mut dec = NoninDecoder::new();
        let mut buf = BytesMut::from(&p[..60]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(buf.len(), 60);
        buf.extend_from_slice(&p[60..]);
        assert!(dec.decode(&mut buf).unwrap().is_some());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_values() -> impl Strategy<Value = PacketValues> {
            (
                proptest::array::uniform4(0u16..512),
                proptest::array::uniform8(0u8..128),
            )
                .prop_map(|(h, s)| PacketValues {
                    hr: h[0],
                    e_hr: h[1],
                    hr_d: h[2],
                    e_hr_d: h[3],
                    spo2: s[0],
                    srev: s[1],
                    stat2: s[2],
                    spo2_d: s[3],
                    spo2_fast: s[4],
                    spo2_bb: s[5],
                    e_spo2: s[6],
                    e_spo2_d: s[7],
                })
        }

        proptest! {
            #[test]
            fn packets_round_trip(
                values in arb_values(),
                statuses in proptest::array::uniform25(any::<u8>()),
                pleth in proptest::array::uniform25(any::<u16>()),
                split in 1usize..130,
            ) {
                let p = NoninPacket::build(&statuses, &pleth, &values);
                let bytes = p.encode();
                let mut dec = NoninDecoder::new();
                let mut buf = BytesMut::new();
                let mut got = vec![];
                for chunk in bytes.chunks(split) {
                    buf.extend_from_slice(chunk);
                    while let Some(x) = dec.decode(&mut buf).unwrap() {
                        got.push(x);
                    }
                }
                prop_assert_eq!(got.len(), 1);
                prop_assert_eq!(got[0], p);
                prop_assert_eq!(got[0].values(), values);
                prop_assert_eq!(got[0].pleth(), pleth);
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_drops_are_bounded(
                chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
                framey in any::<bool>(),
            ) {
                let mut dec = NoninDecoder::new();
                let mut buf = BytesMut::new();
                let (mut total, mut dropped, mut packets) = (0usize, 0usize, 0usize);
                for mut c in chunks {
                    if framey {
                        // Make many 5-byte windows look like frames.
                        for w in c.chunks_mut(5) {
                            if w.len() == 5 {
                                w[0] |= 0x80;
                                w[3] &= 0x7F;
                                w[4] = checksum(&w[..4]);
                            }
                        }
                    }
                    total += c.len();
                    buf.extend_from_slice(&c);
                    loop {
                        match dec.decode(&mut buf) {
                            Ok(Some(p)) => { packets += 1; let _ = p.values(); }
                            Ok(None) => break,
                            Err(e) => {
                                prop_assert!(e.dropped() > 0 && e.is_recoverable());
                                dropped += e.dropped();
                            }
                        }
                    }
                    prop_assert!(buf.len() < PACKET_LEN);
                }
                prop_assert_eq!(dropped + packets * PACKET_LEN + buf.len(), total);
            }
        }
    }
}
