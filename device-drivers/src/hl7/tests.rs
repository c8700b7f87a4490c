//! Test vectors for HL7 v2 over MLLP. Sources cited per test: MLLP = HL7
//! v2 Implementation Guide appendix C.4 ("Minimal Lower Layer Protocol",
//! release 2); HL7 v2.5 chapter 2 (control: 2.5 message construction,
//! 2.7 escape sequences, 2.9 acknowledgment, 2.14/2.15 MSH/MSA/ERR) and
//! chapter 7 (ORU^R01, OBR, OBX); IHE PCD TF-2 (PCD-01 "Communicate PCD
//! Data", device hierarchy in OBX-4, MDC codes in OBX-3/OBX-6).

use super::codec::*;
use super::*;
use proptest::prelude::*;
use shared_protocol::catalogue::{codes, units};

/// 2024-05-01T12:00:00Z in µs: the gateway's "now" in these tests.
const NOW: i64 = 1_714_564_800_000_000;
const SEC: i64 = 1_000_000;

fn opts() -> Hl7Options {
    Hl7Options::default()
}

/// IHE PCD-01 style ORU^R01 (PCD TF-2 §3.1, example layout): a monitor
/// (MDS) with a VMD, SpO2 by MDC code and unit, heart rate by LOINC with a
/// UCUM unit. PID carries a name and birth date that must never leave the
/// parser.
fn pcd01() -> String {
    [
        // MSH-1 `|`, MSH-2 `^~\&`, MSH-3 sending app (EUI-64 of the
        // device gateway), MSH-7 message time with zone, MSH-9
        // ORU^R01^ORU_R01, MSH-10 control id, MSH-11 P, MSH-12 2.6, MSH-15 NE,
        // MSH-16 AL, MSH-21 the PCD-01 profile id.
        "MSH|^~\\&|AcmeMon^ACDE48234567ABCD^EUI-64|ICU|VIGIL|HOSP|20240501115958+0000||ORU^R01^ORU_R01|MSG-0001|P|2.6|||NE|AL|||||IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO",
        // PID-3: two identifiers (CX): HO2009001 type PI, MRN-777 type MR
        // assigned by GOODHEALTH (HD namespace&OID&ISO). PID-5 name, PID-7
        // birth date, PID-8 sex, PID-11 address: PHI to drop.
        "PID|||HO2009001^^^Hospital^PI~MRN-777^^^GOODHEALTH&1.2.3&ISO^MR||Zyzzyva^Quintessa^^^^^L||19610101|F|||1 Secret Lane^^Springfield",
        "PV1||I|ICU^2^1",
        // OBR-4 universal service id, OBR-7 observation time (with zone).
        "OBR|1|AB12345^AcmeMon|CD12345^AcmeMon|182777000^monitoring of patient^SNOMED-CT|||20240501115955+0000",
        // Device hierarchy rows (OBX-4 1.0.0.0 MDS, 1.1.0.0 VMD; MDC
        // partition 1 object codes, no value, OBX-11 X): skipped.
        "OBX|1||69965^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|1.0.0.0|||||||X|||||||0123456789ABCDEF^EUI-64",
        "OBX|2||70675^MDC_DEV_METER_PRESS_BLD_VMD^MDC|1.1.0.0|||||||X",
        // OBX-2 NM, OBX-3 150456 MDC_PULS_OXIM_SAT_O2, OBX-5 97, OBX-6
        // 262688 MDC_DIM_PERCENT, OBX-11 R, OBX-14 observation time.
        "OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.1.1.1|97|262688^MDC_DIM_PERCENT^MDC|||||R|||20240501115950+0000",
        // OBX-3 LOINC 8867-4, OBX-6 UCUM /min, OBX-11 F, no OBX-14 (→ OBR-7).
        "OBX|4|NM|8867-4^Heart rate^LN|1.1.1.2|72|/min^/min^UCUM|||||F",
    ]
    .join("\r")
        + "\r"
}

fn accepted(p: &Processed) -> &Vec<Reading> {
    match &p.outcome {
        Outcome::Accept { readings, .. } => readings,
        other => panic!("expected Accept, got {other:?}"),
    }
}

fn errors(p: &Processed) -> &Vec<AckError> {
    match &p.outcome {
        Outcome::Error(e) => e,
        other => panic!("expected Error (AE), got {other:?}"),
    }
}

fn rejected(p: &Processed) -> &AckError {
    match &p.outcome {
        Outcome::Reject(e) => e,
        other => panic!("expected Reject (AR), got {other:?}"),
    }
}

/// Replace one segment line (by prefix) of the PCD-01 example.
fn with(prefix: &str, line: &str) -> String {
    pcd01()
        .split('\r')
        .map(|l| if l.starts_with(prefix) { line } else { l })
        .collect::<Vec<_>>()
        .join("\r")
}

#[test]
fn delimiters_come_from_msh_1_and_msh_2() {
    // Chapter 2.5.4: any delimiter set declared in MSH-1/MSH-2 is honoured.
    let text = pcd01().replace('|', "#").replace('^', "$");
    let p = process(text.as_bytes(), &opts(), NOW);
    assert_eq!(p.target.delimiters.field, b'#');
    assert_eq!(accepted(&p).len(), 2);
    for bad in ["MSH|^^\\&|", "MSH|^~\\", "MSH|A~\\&|", "MSX|^~\\&|"] {
        assert_eq!(
            process(bad.as_bytes(), &opts(), NOW).code(),
            AckCode::Reject,
            "{bad}"
        );
    }
}

// ---------------------------------------------------------------- ORU^R01

#[test]
fn pcd01_oru_maps_to_readings_with_the_patient_identifier_only() {
    let p = process(pcd01().as_bytes(), &opts(), NOW);
    let Outcome::Accept { readings, skipped } = &p.outcome else {
        panic!("{:?}", p.outcome)
    };
    assert_eq!(*skipped, 2, "MDS and VMD rows are device hierarchy");
    assert_eq!(readings.len(), 2);
    let spo2 = &readings[0];
    assert_eq!(spo2.mdc_code, codes::PULS_OXIM_SAT_O2);
    assert_eq!(spo2.value, Some(Value::Numeric(97.0)));
    assert_eq!(
        (spo2.mdc_unit, spo2.ucum_unit.as_str()),
        (units::PERCENT.mdc, "%")
    );
    assert_eq!(spo2.validity, Validity::Valid as i32);
    // OBX-14 20240501115950+0000.
    assert_eq!(spo2.device_time_us, NOW - 10 * SEC);
    assert_eq!(spo2.time_source, TimeSource::DeviceClockUnsynced as i32);
    assert_eq!(spo2.gateway_time_us, NOW);
    let hr = &readings[1];
    // 8867-4 is ECG heart rate's primary LOINC (pulse rate only lists it
    // as its profile code).
    assert_eq!(hr.mdc_code, codes::ECG_HEART_RATE);
    assert_eq!(
        (hr.mdc_unit, hr.ucum_unit.as_str()),
        (units::BEAT_PER_MIN.mdc, "/min")
    );
    // No OBX-14: OBR-7 20240501115955+0000.
    assert_eq!(hr.device_time_us, NOW - 5 * SEC);
    // PID-3: the MR identifier, its assigning authority's namespace id.
    for r in readings {
        let s = r.subject.as_ref().unwrap();
        assert_eq!(
            (s.system.as_str(), s.value.as_str()),
            ("GOODHEALTH", "MRN-777")
        );
    }
    // Nothing else of PID survives parsing.
    let dump = format!("{p:?}");
    for phi in ["Zyzzyva", "Quintessa", "19610101", "Secret", "Springfield"] {
        assert!(!dump.contains(phi), "{phi} leaked: {dump}");
    }
}

#[test]
fn ack_aa_swaps_sender_and_receiver_and_echoes_the_control_id() {
    let p = process(pcd01().as_bytes(), &opts(), NOW);
    let now = OffsetDateTime::from_unix_timestamp(NOW / SEC).unwrap();
    let ack = String::from_utf8(ack_for(&p, true, now, "ACK-1")).unwrap();
    let segs: Vec<&str> = ack.split('\r').filter(|s| !s.is_empty()).collect();
    // Chapter 2.14.9 MSH: MSH-3/4 of the ACK = MSH-5/6 of the message and
    // vice versa; MSH-9 ACK^<trigger>^ACK; MSH-10 the ACK's own id;
    // MSH-12 the message's version.
    assert_eq!(
        segs[0],
        "MSH|^~\\&|VIGIL|HOSP|AcmeMon^ACDE48234567ABCD^EUI-64|ICU|20240501120000+0000||ACK^R01^ACK|ACK-1|P|2.6"
    );
    // Chapter 2.14.8 MSA: MSA-1 AA, MSA-2 = the message's MSH-10.
    assert_eq!(segs[1], "MSA|AA|MSG-0001");
    assert_eq!(segs.len(), 2);
    assert_eq!(
        parse_ack(ack.as_bytes()),
        Some(("AA".into(), "MSG-0001".into()))
    );
    // Not durably stored → AE "temporarily unable", never AA.
    let ack = String::from_utf8(ack_for(&p, false, now, "ACK-2")).unwrap();
    assert!(ack.contains("MSA|AE|MSG-0001|temporarily unable"), "{ack}");
    assert!(
        ack.contains("\rERR||MSH|206^Application record locked^HL70357|E||||"),
        "{ack}"
    );
}

#[test]
fn refused_content_is_an_ae_and_nothing_of_the_message_is_kept() {
    let cases = [
        // Unknown LOINC code.
        (
            "OBX|4",
            "OBX|4|NM|99999-9^Mystery^LN|1.1.1.2|72|/min^/min^UCUM|||||F",
            "OBX^4^3",
            103,
        ),
        // Unknown coding system.
        (
            "OBX|4",
            "OBX|4|NM|HR^Heart rate^99LOCAL|1.1.1.2|72|/min^/min^UCUM|||||F",
            "OBX^4^3",
            103,
        ),
        // Unit the catalogue does not accept for SpO2.
        (
            "OBX|3",
            "OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|97|mm[Hg]^mm[Hg]^UCUM|||||F",
            "OBX^3^6",
            103,
        ),
        // Numeric value without a unit.
        (
            "OBX|3",
            "OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|97||||||F",
            "OBX^3^6",
            101,
        ),
        // NM that is not a number (HL7 NM has no exponent, no NaN).
        (
            "OBX|3",
            "OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|9e1|%^%^UCUM|||||F",
            "OBX^3^5",
            102,
        ),
        // Deletion of an earlier result.
        (
            "OBX|3",
            "OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|97|%^%^UCUM|||||D",
            "OBX^3^11",
            207,
        ),
        // Unreadable OBX-14.
        (
            "OBX|3",
            "OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|97|%^%^UCUM|||||F|||2024-05-01",
            "OBX^3^14",
            102,
        ),
        // Date only: not precise enough for a vital sign.
        (
            "OBX|3",
            "OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|97|%^%^UCUM|||||F|||20240501",
            "OBX^3^14",
            102,
        ),
        // Before 2000 (device clock not set).
        (
            "OBX|3",
            "OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|97|%^%^UCUM|||||F|||199912312359+0000",
            "OBX^3^14",
            102,
        ),
        // Unreadable OBR-7, needed by the OBX without OBX-14.
        ("OBR|1", "OBR|1|||x|||notatime", "OBR^1^7", 102),
    ];
    for (prefix, line, loc, code) in cases {
        let p = process(with(prefix, line).as_bytes(), &opts(), NOW);
        let e = errors(&p);
        assert_eq!(e.len(), 1, "{line}: {e:?}");
        assert_eq!((e[0].location.as_str(), e[0].code), (loc, code), "{line}");
        // The reason never carries the value.
        assert!(
            !e[0].text.contains("97") && !e[0].text.contains("72"),
            "{:?}",
            e[0]
        );
        let ack = String::from_utf8(ack_for(&p, false, OffsetDateTime::UNIX_EPOCH, "A")).unwrap();
        assert!(ack.contains("MSA|AE|MSG-0001|"), "{ack}");
        assert!(ack.contains(&format!("\rERR||{}|{code}^", loc)), "{ack}");
    }
}

#[test]
fn unobtainable_and_non_numeric_values_become_flagged_readings_without_value() {
    // OBX-11 X (cannot be obtained), I (pending), N (not asked): no value,
    // even when OBX-5 holds one; INVALID + VALUE_MISSING.
    for status in ["X", "I", "N"] {
        let line = format!("OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|97|%^%^UCUM|||||{status}");
        let p = process(with("OBX|3", &line).as_bytes(), &opts(), NOW);
        let r = &accepted(&p)[0];
        assert_eq!(r.value, None, "{status}");
        assert_eq!(r.validity, Validity::Invalid as i32);
        assert_eq!(r.flags, vec![QualityFlag::ValueMissing as i32]);
    }
    // A text value type (ST) for a numeric metric: never a number.
    let p = process(
        with(
            "OBX|3",
            "OBX|3|ST|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|---|%^%^UCUM|||||F",
        )
        .as_bytes(),
        &opts(),
        NOW,
    );
    assert_eq!(accepted(&p)[0].value, None);
    // Preliminary results are questionable; a value with its status kept.
    let p = process(
        with(
            "OBX|3",
            "OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|-0.5|%^%^UCUM|||||P",
        )
        .as_bytes(),
        &opts(),
        NOW,
    );
    let r = &accepted(&p)[0];
    // Never clamped: an impossible value reaches the hub, which flags it.
    assert_eq!(r.value, Some(Value::Numeric(-0.5)));
    assert_eq!(r.validity, Validity::Questionable as i32);
}

#[test]
fn times_without_zone_use_the_configured_offset() {
    let line = "OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|97|%^%^UCUM|||||F|||20240501140000";
    let o = Hl7Options {
        utc_offset_minutes: 120,
        ..opts()
    };
    let p = process(with("OBX|3", line).as_bytes(), &o, NOW);
    // 14:00 at UTC+02:00 = 12:00Z.
    assert_eq!(accepted(&p)[0].device_time_us, NOW);
    // Fractions of a second and a negative zone.
    let t = parse_time("20240501070000.25-0500", UtcOffset::UTC).unwrap();
    assert_eq!(
        t,
        Hl7Time {
            utc_us: NOW + SEC / 4,
            zoned: true
        }
    );
    assert!(!parse_time("202405011200", UtcOffset::UTC).unwrap().zoned);
    // No time anywhere: the gateway receive time.
    let text = with("MSH|", "MSH|^~\\&|A|B|C|D|||ORU^R01|MSG-0001|P|2.5")
        .replace("|||20240501115950+0000", "")
        .replace("|||20240501115955+0000", "");
    let p = process(text.as_bytes(), &opts(), NOW);
    let r = &accepted(&p)[0];
    assert_eq!(
        (r.device_time_us, r.time_source),
        (0, TimeSource::GatewayReceive as i32)
    );
}

#[test]
fn units_may_be_ucum_or_mdc_and_loinc_resolves_by_unit() {
    // Temperature in °F by LOINC 8310-5 and UCUM [degF]: the °F variant.
    let line = "OBX|4|NM|8310-5^Body temperature^LN|1|98.6|[degF]^degF^UCUM|||||F";
    let p = process(with("OBX|4", line).as_bytes(), &opts(), NOW);
    let r = &accepted(&p)[1];
    assert_eq!(
        (r.mdc_code, r.mdc_unit),
        (codes::TEMP_BODY, units::DEGF.mdc)
    );
    // MDC code with the LOINC as the alternate triplet, MDC unit.
    let line = "OBX|4|NM|149530^MDC_PULS_OXIM_PULS_RATE^MDC^8889-8^Heart rate by Pulse oximetry^LN|1|72|264864^MDC_DIM_BEAT_PER_MIN^MDC|||||F";
    let p = process(with("OBX|4", line).as_bytes(), &opts(), NOW);
    assert_eq!(accepted(&p)[1].mdc_code, codes::PULS_OXIM_PULS_RATE);
    // Primary and alternate codes that disagree: AE.
    let line = "OBX|4|NM|149530^MDC_PULS_OXIM_PULS_RATE^MDC^8310-5^Body temperature^LN|1|72|/min^/min^UCUM|||||F";
    assert_eq!(
        errors(&process(with("OBX|4", line).as_bytes(), &opts(), NOW))[0].code,
        103
    );
}

#[test]
fn obx_8_abnormal_flags_become_the_readings_interpretation() {
    // HL7 v2.5 table 0078 (OBX-8, chapter 7.4.2.8): the level flags are
    // carried; the first repetition with one wins; other codes of the table
    // and an empty field leave the interpretation unspecified.
    let cases = [
        ("", Interpretation::Unspecified),
        ("N", Interpretation::Normal),
        ("L", Interpretation::Low),
        ("H", Interpretation::High),
        ("LL", Interpretation::CriticalLow),
        ("HH", Interpretation::CriticalHigh),
        ("A", Interpretation::Abnormal),
        ("AA", Interpretation::CriticalAbnormal),
        ("<", Interpretation::OffScaleLow),
        (">", Interpretation::OffScaleHigh),
        ("S", Interpretation::Unspecified),
        ("U~HH", Interpretation::CriticalHigh),
        ("H~LL", Interpretation::High),
    ];
    for (flag, want) in cases {
        //         OBX-1  2  3 (code)                        4  5   6 (unit)   7  8
        let line = format!("OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1|97|%^%^UCUM||{flag}|||F");
        let p = process(with("OBX|3", &line).as_bytes(), &opts(), NOW);
        let r = &accepted(&p)[0];
        assert_eq!(r.interpretation(), want, "OBX-8 `{flag}`");
        // The value itself is never touched by the flag.
        assert_eq!(r.value, Some(Value::Numeric(97.0)), "OBX-8 `{flag}`");
    }
}

#[test]
fn patient_identifier_falls_back_to_the_configured_system() {
    let o = Hl7Options {
        patient_id_system: Some("urn:oid:1.2.3.4".into()),
        ..opts()
    };
    let p = process(
        with("PID|", "PID|1||4711^^^^PI||Name^Given").as_bytes(),
        &o,
        NOW,
    );
    let s = accepted(&p)[0].subject.clone().unwrap();
    assert_eq!(
        (s.system.as_str(), s.value.as_str()),
        ("urn:oid:1.2.3.4", "4711")
    );
    // No PID at all: no subject (the hub's static association applies).
    let text: String = pcd01()
        .split('\r')
        .filter(|l| !l.starts_with("PID"))
        .collect::<Vec<_>>()
        .join("\r");
    assert!(
        accepted(&process(text.as_bytes(), &o, NOW))[0]
            .subject
            .is_none()
    );
}

#[test]
fn wrong_messages_are_rejected_with_ar() {
    // ADT^A01: not an observation message.
    let adt = with(
        "MSH|",
        "MSH|^~\\&|A|B|C|D|20240501120000||ADT^A01|C-7|P|2.5",
    );
    let p = process(adt.as_bytes(), &opts(), NOW);
    assert_eq!(
        (rejected(&p).code, p.target.control_id.as_str()),
        (200, "C-7")
    );
    let ack = String::from_utf8(ack_for(&p, false, OffsetDateTime::UNIX_EPOCH, "A")).unwrap();
    assert!(ack.contains("\rMSA|AR|C-7|"), "{ack}");
    // ORU^R30, version 2.1, no control id.
    for (msh, code) in [
        ("MSH|^~\\&|A|B|C|D|20240501120000||ORU^R30|C-7|P|2.5", 201),
        ("MSH|^~\\&|A|B|C|D|20240501120000||ORU^R01|C-7|P|2.1", 203),
        ("MSH|^~\\&|A|B|C|D|20240501120000||ORU^R01|C-7|P|3.0", 203),
        ("MSH|^~\\&|A|B|C|D|20240501120000||ORU^R01||P|2.5", 101),
    ] {
        assert_eq!(
            rejected(&process(with("MSH|", msh).as_bytes(), &opts(), NOW)).code,
            code,
            "{msh}"
        );
    }
    // OBX before any OBR: not an ORU^R01 structure.
    let text: String = pcd01()
        .split('\r')
        .filter(|l| !l.starts_with("OBR"))
        .collect::<Vec<_>>()
        .join("\r");
    assert_eq!(rejected(&process(text.as_bytes(), &opts(), NOW)).code, 100);
    // Not HL7 at all, and a bad segment id.
    let p = process(b"GET / HTTP/1.1\r\n", &opts(), NOW);
    assert_eq!(rejected(&p).code, 102);
    assert_eq!(p.target.control_id, "");
    let p = process(with("PV1", "pv1||I").as_bytes(), &opts(), NOW);
    assert_eq!(
        (rejected(&p).code, p.target.control_id.as_str()),
        (102, "MSG-0001")
    );
    let ack = String::from_utf8(ack_for(&p, false, OffsetDateTime::UNIX_EPOCH, "A")).unwrap();
    assert!(ack.contains("\rMSA|AR|MSG-0001|"), "{ack}");
}

#[test]
fn versions_2_3_to_2_9_are_supported() {
    for v in [
        "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.9",
    ] {
        assert!(version_supported(v), "{v}");
    }
    for v in ["", "2", "2.2", "2.10", "3.0", "2.5.", "2.x", "v2.5"] {
        assert!(!version_supported(v), "{v}");
    }
}

#[test]
fn hl7_numbers_are_plain_decimals() {
    assert_eq!(parse_nm("+12.50"), Some(12.5));
    assert_eq!(parse_nm("-.5"), Some(-0.5));
    assert_eq!(parse_nm("7."), Some(7.0));
    for bad in ["", "-", ".", "1e3", "NaN", "inf", "1.2.3", "12 3", "0x10"] {
        assert_eq!(parse_nm(bad), None, "{bad}");
    }
}

#[test]
fn options_are_checked() {
    let parse = |t: &str| -> Result<Hl7Options, String> {
        let o: Hl7Options = toml::from_str(t).map_err(|e| e.to_string())?;
        o.validate().map(|_| o)
    };
    assert_eq!(parse("").unwrap(), Hl7Options::default());
    assert!(
        parse("utc_offset_minutes = 2000")
            .unwrap_err()
            .contains("utc_offset_minutes")
    );
    assert!(
        parse("max_message_bytes = 10")
            .unwrap_err()
            .contains("max_message_bytes")
    );
    assert!(
        parse("tls_cert_file = \"c.pem\"")
            .unwrap_err()
            .contains("together")
    );
    assert!(parse("bogus = 1").unwrap_err().contains("bogus"));
}

// ---------------------------------------------------------------- properties

proptest! {
    /// Any bytes, or a valid message with one byte changed: processing
    /// never panics, and the ACK built for it always parses back with the
    /// message's control id.
    #[test]
    fn processing_never_panics(
        junk in proptest::collection::vec(any::<u8>(), 0..600),
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let _ = process(&junk, &opts(), NOW);
        let mut m = pcd01().into_bytes();
        let i = pos.index(m.len());
        m[i] = byte;
        let p = process(&m, &opts(), NOW);
        let ack = ack_for(&p, true, OffsetDateTime::UNIX_EPOCH, "A");
        prop_assert!(!ack.contains(&SB) && !ack.contains(&EB));
        if p.code() != AckCode::Reject {
            prop_assert_eq!(parse_ack(&ack).map(|a| a.1), Some(p.target.control_id.clone()));
        }
    }
}
