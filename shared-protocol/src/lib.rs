//! Vigil's wire protocol (v1) and metric catalogue.
//!
//! This crate is shared by `edge-agent` and `cloud-hub`. It does no I/O: it
//! holds the prost types generated from `proto/vigil/v1/vigil.proto`, the
//! metric catalogue that maps IEEE 11073-10101 codes to LOINC and UCUM, the
//! generic HL7 v2 codec (`hl7v2`: MLLP framing, parsing, escaping, times,
//! ACKs) and small pure helpers. How the schema may evolve: `EVOLUTION.md`.

pub mod catalogue;
pub mod hl7v2;

/// Generated protobuf types for `vigil.v1`.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/vigil.v1.rs"));
}

pub use catalogue::{CATALOGUE, Metric, MetricCatalogue, Unit};

/// HTTP content type of a protobuf-encoded [`v1::Batch`] / [`v1::BatchAck`].
pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";

/// Path of the hub's ingest endpoint.
pub const INGEST_PATH: &str = "/api/v1/ingest";

/// Microseconds since the Unix epoch of 2000-01-01T00:00:00Z. Times before
/// this are treated as impossible for a reading (device clock not set).
pub const EPOCH_2000_US: i64 = 946_684_800_000_000;

impl v1::Reading {
    /// The time the value applies to: the device time when present, else the
    /// gateway receive time.
    pub fn effective_time_us(&self) -> i64 {
        if self.device_time_us != 0 {
            self.device_time_us
        } else {
            self.gateway_time_us
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::{self, reading::Value};
    use proptest::prelude::*;
    use prost::Message;

    fn arb_reading() -> impl Strategy<Value = v1::Reading> {
        (
            any::<u32>(),
            "[A-Z0-9]{0,8}",
            prop_oneof![
                any::<f64>().prop_map(|v| Some(Value::Numeric(v))),
                "[ -~]{0,16}".prop_map(|s| Some(Value::Text(s))),
                Just(None),
            ],
            any::<i64>(),
            any::<i64>(),
            0i32..4,
            proptest::collection::vec(0i32..11, 0..4),
            any::<u64>(),
            0i32..10,
        )
            .prop_map(
                |(mdc, label, value, dt, gt, validity, flags, seq, interpretation)| v1::Reading {
                    mdc_code: mdc,
                    vendor_label: label,
                    value,
                    mdc_unit: 262_688,
                    ucum_unit: "%".into(),
                    device_time_us: dt,
                    time_source: 2,
                    gateway_time_us: gt,
                    validity,
                    flags,
                    sequence: seq,
                    subject: None,
                    interpretation,
                },
            )
    }

    proptest! {
        #[test]
        fn batch_round_trips(readings in proptest::collection::vec(arb_reading(), 0..20), seq in any::<u64>()) {
            let batch = v1::Batch {
                gateway_id: "gw-1".into(),
                sequence: seq,
                created_time_us: 1,
                devices: vec![v1::DeviceData {
                    device: Some(v1::DeviceInfo { device_id: "dev".into(), ..Default::default() }),
                    readings,
                    waveforms: vec![],
                    technical: vec![],
                }],
                agent_version: "test".into(),
                gateway_events: vec![],
                traceparent: String::new(),
                incarnation: 0,
            };
            let bytes = batch.encode_to_vec();
            let back = v1::Batch::decode(bytes.as_slice()).unwrap();
            // NaN != NaN, so compare encodings rather than values.
            prop_assert_eq!(back.encode_to_vec(), bytes);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = v1::Batch::decode(bytes.as_slice());
        }
    }

    #[test]
    fn effective_time_prefers_device_time() {
        let mut r = v1::Reading {
            device_time_us: 5,
            gateway_time_us: 9,
            ..Default::default()
        };
        assert_eq!(r.effective_time_us(), 5);
        r.device_time_us = 0;
        assert_eq!(r.effective_time_us(), 9);
    }

    /// Field numbers are the wire contract (EVOLUTION.md). This vector pins
    /// the encoding of a Reading: if it changes, a field was renumbered or
    /// retyped, which breaks every deployed gateway.
    #[test]
    fn reading_wire_encoding_is_pinned() {
        let r = v1::Reading {
            mdc_code: 150_456, // MDC_PULS_OXIM_SAT_O2
            value: Some(Value::Numeric(98.0)),
            mdc_unit: 262_688, // MDC_DIM_PERCENT
            ucum_unit: "%".into(),
            validity: v1::Validity::Valid as i32,
            sequence: 7,
            ..Default::default()
        };
        let expected: &[u8] = &[
            0x08, 0xB8, 0x97, 0x09, // field 1 varint: 150456
            0x19, 0, 0, 0, 0, 0, 0x80, 0x58, 0x40, // field 3 double: 98.0 (LE)
            0x30, 0xA0, 0x84, 0x10, // field 6 varint: 262688
            0x3A, 0x01, b'%', // field 7 string "%"
            0x58, 0x01, // field 11 enum: VALIDITY_VALID
            0x68, 0x07, // field 13 varint: 7
        ];
        assert_eq!(r.encode_to_vec(), expected);
    }

    /// `Reading.subject` (field 14, message `Identifier`) is pinned too.
    #[test]
    fn reading_subject_encoding_is_pinned() {
        let r = v1::Reading {
            subject: Some(v1::Identifier {
                system: "H".into(),
                value: "7".into(),
            }),
            ..Default::default()
        };
        let expected: &[u8] = &[
            0x72, 0x06, // field 14, length-delimited, 6 bytes
            0x0A, 0x01, b'H', // Identifier field 1 string "H"
            0x12, 0x01, b'7', // Identifier field 2 string "7"
        ];
        assert_eq!(r.encode_to_vec(), expected);
        let back = v1::Reading::decode(expected).unwrap();
        assert_eq!(back.subject.unwrap().value, "7");
        // An old reading (no field 14) decodes with no subject.
        assert!(
            v1::Reading::decode(&[0x68, 0x07][..])
                .unwrap()
                .subject
                .is_none()
        );
    }

    /// `Batch.traceparent` (field 7, string) is pinned too.
    #[test]
    fn batch_traceparent_encoding_is_pinned() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let b = v1::Batch {
            traceparent: tp.into(),
            ..Default::default()
        };
        // field 7, length-delimited (7 << 3 | 2 = 0x3A), 55 bytes
        let mut expected = vec![0x3A, 55];
        expected.extend_from_slice(tp.as_bytes());
        assert_eq!(b.encode_to_vec(), expected);
        assert_eq!(
            v1::Batch::decode(expected.as_slice()).unwrap().traceparent,
            tp
        );
        // An older sender's batch (no field 7) decodes with no trace context.
        let old = v1::Batch::decode(&[0x10, 0x09][..]).unwrap();
        assert_eq!((old.sequence, old.traceparent.as_str()), (9, ""));
    }

    /// `Batch.incarnation` (field 8, uint64 varint) is pinned too.
    #[test]
    fn batch_incarnation_encoding_is_pinned() {
        let b = v1::Batch {
            incarnation: 300,
            ..Default::default()
        };
        // field 8, varint (8 << 3 | 0 = 0x40), 300 = 0xAC 0x02
        let expected = vec![0x40, 0xAC, 0x02];
        assert_eq!(b.encode_to_vec(), expected);
        assert_eq!(
            v1::Batch::decode(expected.as_slice()).unwrap().incarnation,
            300
        );
        // An older sender's batch (no field 8) is incarnation 0 (legacy).
        let old = v1::Batch::decode(&[0x10, 0x09][..]).unwrap();
        assert_eq!((old.sequence, old.incarnation), (9, 0));
    }

    #[test]
    fn reading_interpretation_encoding_is_pinned() {
        let r = v1::Reading {
            interpretation: v1::Interpretation::CriticalHigh as i32,
            ..Default::default()
        };
        // field 15, varint (15 << 3 | 0 = 0x78), value 5 = CRITICAL_HIGH
        let expected: &[u8] = &[0x78, 0x05];
        assert_eq!(r.encode_to_vec(), expected);
        assert_eq!(
            v1::Reading::decode(expected).unwrap().interpretation(),
            v1::Interpretation::CriticalHigh
        );
        // An older reading (no field 15): the device said nothing.
        assert_eq!(
            v1::Reading::decode(&[0x68, 0x07][..])
                .unwrap()
                .interpretation(),
            v1::Interpretation::Unspecified
        );
        // A value from a newer sender is kept raw and read as unspecified.
        let newer = v1::Reading::decode(&[0x78, 0x63][..]).unwrap();
        assert_eq!(newer.interpretation, 99);
        assert_eq!(newer.interpretation(), v1::Interpretation::Unspecified);
    }

    /// Gateway event kinds 6 and 7 (BUFFER_KEY_LOST, BUFFER_WRITE_FAILED)
    /// are pinned; an older receiver keeps them raw as unspecified.
    #[test]
    fn gateway_event_kinds_are_pinned() {
        for (kind, n) in [
            (v1::TechnicalKind::BufferOverflow, 5u8),
            (v1::TechnicalKind::BufferKeyLost, 6),
            (v1::TechnicalKind::BufferWriteFailed, 7),
        ] {
            let t = v1::TechnicalReading {
                kind: kind as i32,
                ..Default::default()
            };
            // field 1, varint (1 << 3 | 0 = 0x08)
            assert_eq!(t.encode_to_vec(), [0x08, n]);
            assert_eq!(
                v1::TechnicalReading::decode(&[0x08, n][..]).unwrap().kind(),
                kind
            );
        }
        let newer = v1::TechnicalReading::decode(&[0x08, 0x63][..]).unwrap();
        assert_eq!(newer.kind(), v1::TechnicalKind::Unspecified);
    }
}
