//! Generic HL7 v2 pieces, sans-IO: MLLP framing ([`MllpDecoder`],
//! [`mllp_encode`]), the message/segment/field parser with escaping
//! ([`Message`], [`Delimiters`]), HL7 times ([`parse_time`], [`format_ts`])
//! original-mode ACKs ([`build_ack`], [`parse_ack`]) and the accepted MSH-12
//! versions ([`version_supported`]).
//!
//! Used by the edge's ORU^R01 driver (`device_drivers::hl7`, which
//! re-exports these under its old paths) and the hub's ADT listener. What a
//! message *means* (ORU observations, ADT events) lives with its user.
//! Nothing here does I/O or keeps message content beyond the call.

pub mod codec;
pub mod dtm;

pub use codec::{
    AckCode, AckError, AckTarget, CR, DEFAULT_MAX_MESSAGE, Delimiters, EB, Message, MllpDecoder,
    MllpError, OVERSIZED_HEAD, ParseError, SB, Segment, build_ack, error_code_text, mllp_encode,
    parse_ack,
};
pub use dtm::{Hl7Time, format_ts, parse_time};

/// Versions accepted in MSH-12 (VID.1): 2.3 to 2.9 with any sub-release.
pub fn version_supported(v: &str) -> bool {
    let mut parts = v.split('.');
    matches!(
        (
            parts.next(),
            parts.next().and_then(|m| m.parse::<u8>().ok())
        ),
        (Some("2"), Some(3..=9))
    ) && parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests;
