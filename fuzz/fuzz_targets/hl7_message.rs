//! HL7 v2 message parser and ORU^R01 interpretation: arbitrary bytes (and
//! the same bytes behind a valid MSH) must never panic; the ACK built for
//! any outcome is an MSH/MSA message without MLLP block characters, and a
//! non-reject names the message's control id; an accepted message's
//! readings never carry a non-finite value.
#![no_main]
use device_drivers::hl7::codec::{EB, SB};
use device_drivers::hl7::{AckCode, Hl7Options, Outcome, ack_for, parse_ack, process};
use libfuzzer_sys::fuzz_target;
use shared_protocol::v1::reading::Value;

const NOW: i64 = 1_714_564_800_000_000;

fn check(bytes: &[u8]) {
    let p = process(bytes, &Hl7Options::default(), NOW);
    let ack = ack_for(&p, true, time::OffsetDateTime::UNIX_EPOCH, "F");
    assert!(!ack.contains(&SB) && !ack.contains(&EB));
    assert!(ack.starts_with(b"MSH"));
    if p.code() != AckCode::Reject {
        let (_, id) = parse_ack(&ack).expect("ACK parses");
        assert_eq!(id, p.target.control_id);
    }
    if let Outcome::Accept { readings, .. } = &p.outcome {
        for r in readings {
            if let Some(Value::Numeric(v)) = r.value {
                assert!(v.is_finite());
                assert!(r.mdc_unit != 0 && !r.ucum_unit.is_empty());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut m = b"MSH|^~\\&|S|F|R|F|20240501120000+0000||ORU^R01|C1|P|2.6\rPID|||1^^^A^MR\rOBR|1|||x|||20240501115900\r".to_vec();
    m.extend_from_slice(data);
    check(&m);
});
