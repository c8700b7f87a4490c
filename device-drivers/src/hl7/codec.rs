//! Sans-IO HL7 v2 over MLLP: the MLLP framer, the HL7 v2 message parser
//! (encoding characters, escapes, segments) and the ACK encoder.
//!
//! These generic pieces live in [`shared_protocol::hl7v2::codec`] (shared
//! with the hub's ADT listener); this module re-exports them so the
//! `device_drivers::hl7::codec::…` paths keep working.

pub use shared_protocol::hl7v2::codec::*;
