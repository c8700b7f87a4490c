//! The hub's HL7 v2 ADT interpreter: arbitrary bytes (and the same bytes
//! after a valid ADT^A01 header) must never panic; the ACK built for any
//! outcome is an MSH/MSA message without MLLP block characters whose MSA-2
//! is the message's control id (unless rejected before a header was read);
//! an accepted event names a valid bed id and a non-empty identifier.
#![no_main]
use cloud_hub::adt::{AdtEvent, AdtOptions, Outcome, ack, interpret};
use cloud_hub::association::is_valid_key;
use libfuzzer_sys::fuzz_target;
use shared_protocol::hl7v2::{AckCode, EB, SB, parse_ack};

const NOW: i64 = 1_714_564_800_000_000;

fn check(bytes: &[u8]) {
    let i = interpret(bytes, &AdtOptions::default(), NOW);
    let a = ack(&i.target, i.code(), None, time::OffsetDateTime::UNIX_EPOCH, "F");
    assert!(!a.contains(&SB) && !a.contains(&EB));
    assert!(a.starts_with(b"MSH"));
    if i.code() != AckCode::Reject {
        let (_, id) = parse_ack(&a).expect("ACK parses");
        assert_eq!(id, i.target.control_id);
    }
    if let Outcome::Event(ev) = &i.outcome {
        let (patient, bed) = match ev {
            AdtEvent::Admit { patient, bed, .. } | AdtEvent::Transfer { patient, bed, .. } => {
                (patient, Some(bed))
            }
            AdtEvent::Update { patient, bed, .. } => (patient, bed.as_ref()),
            AdtEvent::Discharge { patient, .. } => (patient, None),
        };
        assert!(!patient.value.is_empty());
        if let Some(b) = bed {
            assert!(is_valid_key(b));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut m = b"MSH|^~\\&|S|F|R|F|20240501120000+0000||ADT^A01|C1|P|2.5\rEVN|A01|20240501115900\rPID|||1^^^A^MR\rPV1|1|I|W^1^B\r".to_vec();
    m.extend_from_slice(data);
    check(&m);
});
