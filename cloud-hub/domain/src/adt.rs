//! HL7 v2 ADT interpretation, sans-IO: one message's bytes → one patient
//! movement ([`AdtEvent`]) or a reason to refuse it. The MLLP listener
//! (`adt_listener`) applies the event to the association store and answers
//! the ACK.
//!
//! # Messages (HL7 v2.5 chapter 3, "Patient Administration")
//! | trigger | meaning (§) | structure | used here |
//! | --- | --- | --- | --- |
//! | A01 | admit/visit notification (3.3.1) | MSH EVN PID [PD1] … PV1 … | admit to PV1-3 |
//! | A02 | transfer a patient (3.3.2) | MSH EVN PID [PD1] PV1 … | transfer to PV1-3 |
//! | A03 | discharge/end visit (3.3.3) | MSH EVN PID [PD1] PV1 … | discharge |
//! | A08 | update patient information (3.3.8) | as A01 | identifier or location update |
//!
//! Fields read (nothing else is ever copied out of the message):
//! - MSH-7 message time, MSH-9 message type (`ADT^Axx`), MSH-10 control id,
//!   MSH-12 version (2.3 … 2.9).
//! - EVN-6 event occurred, else EVN-2 recorded date/time, else MSH-7: the
//!   **event time** (HL7 DTM; a time without zone is taken at
//!   `utc_offset_minutes`).
//! - PID-3 patient identifier list: one identifier, the first of type `MR`,
//!   else `PI`, else the first with a value; its value (CX.1) and its
//!   assigning authority (CX.4, an HD) mapped to a system URI by
//!   `[identifiers]` ([`crate::identifiers`]); without an authority, the
//!   sending facility's (MSH-4) configured URI, else the configured
//!   `patient_id_system` (mapped the same way). **Names (PID-5), birth
//!   date, address and every other PID field are never read**: the hub
//!   stores identifiers only.
//! - MSH-4 sending facility (HD namespace id, universal id): only to look
//!   up `[identifiers.facilities]`.
//! - PV1-3 assigned patient location (PL: point of care ^ room ^ bed ^
//!   facility): mapped to a bed id by the `bed_id` template, default
//!   `{poc}-{room}-{bed}` (e.g. `ICU3^07^B` → bed `ICU3-07-B`); placeholders
//!   `{poc}` (PL.1), `{room}` (PL.2), `{bed}` (PL.3), `{facility}` (PL.4).
//! - PV1-19 visit number (CX.1): ties an A08 identifier change to the stay.
//!
//! # ACK (MSA-1)
//! - **AR** (reject): not HL7 v2, not ADT, a trigger other than the four
//!   above, unsupported version, no control id, or a required part missing
//!   or unreadable: EVN/MSH time, PID-3, PV1-3 for A01/A02. Nothing is
//!   changed.
//! - **AE** (error): well-formed, but the location does not map to a known
//!   bed (code 103), the event time is impossible (before 2000 or more than
//!   24 h ahead), or it conflicts with the recorded stays (code 207), or the
//!   store failed (code 207, resend later). Nothing is changed.
//! - **AA**: applied (or already recorded exactly so).
//!
//! Error texts name fields, never values or identifiers.

use shared_protocol::EPOCH_2000_US;
use shared_protocol::hl7v2::{
    AckCode, AckError, AckTarget, Message, Segment, build_ack, format_ts, parse_time,
    version_supported,
};
use time::{OffsetDateTime, UtcOffset};

use crate::association::{PatientId, is_valid_key};
use crate::identifiers::IdentifierSystems;

/// Default PV1-3 → bed id template.
pub const DEFAULT_BED_TEMPLATE: &str = "{poc}-{room}-{bed}";

/// How far ahead of the hub clock an event time may be.
const MAX_FUTURE_US: i64 = 24 * 3600 * 1_000_000;

/// Interpretation options (from `[adt]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdtOptions {
    /// `Identifier.system` when PID-3 has no assigning authority and the
    /// sending facility (MSH-4) has no `[identifiers.facilities]` entry
    /// (mapped like an authority).
    pub patient_id_system: Option<String>,
    /// Assigning authority / sending facility → system URI (`[identifiers]`).
    pub identifiers: IdentifierSystems,
    /// Offset from UTC (minutes) of HL7 times without a zone.
    pub utc_offset_minutes: i32,
    /// PV1-3 → bed id template.
    pub bed_template: String,
}

impl Default for AdtOptions {
    fn default() -> Self {
        Self {
            patient_id_system: None,
            identifiers: IdentifierSystems::default(),
            utc_offset_minutes: 0,
            bed_template: DEFAULT_BED_TEMPLATE.into(),
        }
    }
}

/// Checks a bed id template: known placeholders only, at least one.
pub fn check_bed_template(t: &str) -> Result<(), String> {
    let mut rest = t;
    let mut found = 0;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err("has an unclosed `{`".into());
        };
        let name = &rest[open + 1..open + close];
        if !matches!(name, "poc" | "room" | "bed" | "facility") {
            return Err(format!(
                "unknown placeholder `{{{name}}}` (use {{poc}}, {{room}}, {{bed}}, {{facility}})"
            ));
        }
        found += 1;
        rest = &rest[open + close + 1..];
    }
    if found == 0 {
        return Err("must contain at least one placeholder".into());
    }
    Ok(())
}

/// The entry of `allowed` (`[adt] allowed_sending_facilities`) that the
/// raw MSH-4 sending facility (an HD, components separated by `component`)
/// matches: the whole field, its namespace id (HD.1) or its universal id
/// (HD.2). None: the facility is not allowed (or absent).
pub fn allowed_facility<'a>(msh4: &str, component: u8, allowed: &'a [String]) -> Option<&'a str> {
    let msh4 = msh4.trim();
    if msh4.is_empty() {
        return None;
    }
    let mut parts = msh4.split(char::from(component));
    let namespace = parts.next().unwrap_or_default();
    let universal = parts.next().unwrap_or_default();
    allowed
        .iter()
        .find(|a| {
            !a.is_empty()
                && (a.as_str() == msh4 || a.as_str() == namespace || a.as_str() == universal)
        })
        .map(String::as_str)
}

/// A patient movement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdtEvent {
    /// A01: admit to `bed` at `at`.
    Admit {
        patient: PatientId,
        bed: String,
        at: i64,
        visit: Option<String>,
    },
    /// A02: transfer to `bed` at `at`.
    Transfer {
        patient: PatientId,
        bed: String,
        at: i64,
        visit: Option<String>,
    },
    /// A03: discharge at `at`.
    Discharge {
        patient: PatientId,
        at: i64,
        visit: Option<String>,
    },
    /// A08: the patient's identifier (for `visit`) and/or location at `at`.
    Update {
        patient: PatientId,
        bed: Option<String>,
        at: i64,
        visit: Option<String>,
    },
}

impl AdtEvent {
    /// The trigger event code (for logs and counters).
    pub fn trigger(&self) -> &'static str {
        match self {
            AdtEvent::Admit { .. } => "A01",
            AdtEvent::Transfer { .. } => "A02",
            AdtEvent::Discharge { .. } => "A03",
            AdtEvent::Update { .. } => "A08",
        }
    }
}

/// The result of interpreting one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreted {
    /// Header fields to answer with.
    pub target: AckTarget,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Apply this event, then answer AA (or AE when applying fails).
    Event(AdtEvent),
    /// AE: well-formed, refused.
    Error(AckError),
    /// AR: not an acceptable message.
    Reject(AckError),
}

impl Interpreted {
    /// The ACK code before applying (AA for an event).
    pub fn code(&self) -> AckCode {
        match self.outcome {
            Outcome::Event(_) => AckCode::Accept,
            Outcome::Error(_) => AckCode::Error,
            Outcome::Reject(_) => AckCode::Reject,
        }
    }
}

/// An ACK error (text without values or identifiers).
pub fn ack_error(location: &str, code: u16, text: impl Into<String>) -> AckError {
    AckError {
        location: location.into(),
        code,
        text: text.into(),
    }
}

/// Build the ACK for `target` (MSH-7 = `now`, MSH-10 = `control_id`).
pub fn ack(
    target: &AckTarget,
    code: AckCode,
    error: Option<&AckError>,
    now: OffsetDateTime,
    control_id: &str,
) -> Vec<u8> {
    let errors = error.map(std::slice::from_ref).unwrap_or_default();
    build_ack(target, code, errors, &format_ts(now), control_id)
}

/// Parse and interpret one message (the bytes of one MLLP block). `now_us`
/// is the hub clock (UTC µs), the reference for impossible times.
pub fn interpret(bytes: &[u8], opts: &AdtOptions, now_us: i64) -> Interpreted {
    let msg = match Message::parse(bytes) {
        Ok(m) => m,
        Err(e) => {
            return Interpreted {
                target: AckTarget::best_effort(bytes),
                outcome: Outcome::Reject(ack_error("MSH", 102, e.to_string())),
            };
        }
    };
    let target = AckTarget::of(&msg);
    let outcome = match read_event(&msg, opts, now_us) {
        Ok(ev) => Outcome::Event(ev),
        Err(Refusal::Reject(e)) => Outcome::Reject(e),
        Err(Refusal::Error(e)) => Outcome::Error(e),
    };
    Interpreted { target, outcome }
}

enum Refusal {
    Reject(AckError),
    Error(AckError),
}

fn reject(location: &str, code: u16, text: &str) -> Refusal {
    Refusal::Reject(ack_error(location, code, text))
}

fn refuse(location: &str, code: u16, text: &str) -> Refusal {
    Refusal::Error(ack_error(location, code, text))
}

fn segment<'a>(msg: &'a Message, id: &str) -> Option<&'a Segment> {
    msg.segments.iter().find(|s| s.id == id)
}

fn read_event(msg: &Message, opts: &AdtOptions, now_us: i64) -> Result<AdtEvent, Refusal> {
    let msh = msg.msh();
    if msh.field(10).is_empty() {
        return Err(reject(
            "MSH^1^10",
            101,
            "MSH-10 message control id is missing",
        ));
    }
    if msg.get(msh, 9, 1) != "ADT" {
        return Err(reject(
            "MSH^1^9",
            200,
            "only ADT messages (A01, A02, A03, A08) are accepted",
        ));
    }
    let trigger = msg.get(msh, 9, 2);
    if !matches!(trigger.as_str(), "A01" | "A02" | "A03" | "A08") {
        return Err(reject(
            "MSH^1^9",
            201,
            "only ADT A01, A02, A03 and A08 are accepted",
        ));
    }
    if !version_supported(&msg.get(msh, 12, 1)) {
        return Err(reject(
            "MSH^1^12",
            203,
            "unsupported HL7 version (2.3 to 2.9 are accepted)",
        ));
    }
    let at = event_time(msg, opts)?;
    if at < EPOCH_2000_US || at > now_us.saturating_add(MAX_FUTURE_US) {
        return Err(refuse(
            "EVN",
            102,
            "event time is before 2000 or more than 24 h ahead of the hub clock",
        ));
    }
    let pid = segment(msg, "PID").ok_or_else(|| reject("PID", 100, "PID segment is missing"))?;
    let patient = patient_identifier(msg, pid, opts).ok_or_else(|| {
        reject(
            "PID^1^3",
            101,
            "PID-3 patient identifier is missing or too long",
        )
    })?;
    let pv1 = segment(msg, "PV1");
    let visit = pv1
        .map(|s| msg.get(s, 19, 1).trim().to_string())
        .filter(|v| !v.is_empty() && v.len() <= 64 && !v.chars().any(char::is_control));
    let location = pv1.map(|s| s.field(3)).filter(|f| !f.is_empty());
    let bed = |required: bool| -> Result<Option<String>, Refusal> {
        match (pv1, location) {
            (Some(pv1), Some(_)) => bed_id(msg, pv1, opts).map(Some),
            _ if required => Err(reject(
                "PV1^1^3",
                101,
                "PV1-3 assigned patient location is missing",
            )),
            _ => Ok(None),
        }
    };
    Ok(match trigger.as_str() {
        "A01" => AdtEvent::Admit {
            patient,
            bed: bed(true)?.unwrap_or_default(),
            at,
            visit,
        },
        "A02" => AdtEvent::Transfer {
            patient,
            bed: bed(true)?.unwrap_or_default(),
            at,
            visit,
        },
        "A03" => AdtEvent::Discharge { patient, at, visit },
        _ => AdtEvent::Update {
            patient,
            bed: bed(false)?,
            at,
            visit,
        },
    })
}

/// EVN-6, else EVN-2, else MSH-7.
fn event_time(msg: &Message, opts: &AdtOptions) -> Result<i64, Refusal> {
    let offset =
        UtcOffset::from_whole_seconds(opts.utc_offset_minutes * 60).unwrap_or(UtcOffset::UTC);
    let evn = segment(msg, "EVN");
    let candidates = [
        (evn, 6, "EVN^1^6"),
        (evn, 2, "EVN^1^2"),
        (Some(msg.msh()), 7, "MSH^1^7"),
    ];
    for (seg, field, location) in candidates {
        let Some(seg) = seg else { continue };
        let text = msg.get(seg, field, 1);
        if text.trim().is_empty() {
            continue;
        }
        return parse_time(&text, offset)
            .map(|t| t.utc_us)
            .map_err(|why| reject(location, 102, &format!("event time unreadable: {why}")));
    }
    Err(reject(
        "EVN^1^2",
        101,
        "no event time (EVN-6, EVN-2 or MSH-7)",
    ))
}

/// PID-3 → one identifier: the first of type MR, else PI, else the first
/// with a value. Only CX.1, CX.4 and CX.5 are read.
fn patient_identifier(msg: &Message, pid: &Segment, opts: &AdtOptions) -> Option<PatientId> {
    let mut ids: Vec<(String, String, String)> = vec![];
    for rep in msg.repetitions(pid.field(3)) {
        let value = msg.component(rep, 1).trim().to_string();
        if value.is_empty() {
            continue;
        }
        // CX.4 as an HD: namespace id & universal id & universal id type.
        let (ns, uid, kind) = (
            msg.subcomponent(rep, 4, 1),
            msg.subcomponent(rep, 4, 2),
            msg.subcomponent(rep, 4, 3),
        );
        let authority = if uid.trim().is_empty() {
            ns.trim().to_string()
        } else {
            format!("{}&{}&{}", ns.trim(), uid.trim(), kind.trim())
        };
        ids.push((value, authority, msg.component(rep, 5)));
    }
    let pick = ids
        .iter()
        .find(|i| i.2 == "MR")
        .or_else(|| ids.iter().find(|i| i.2 == "PI"))
        .or_else(|| ids.first())?;
    // MSH-4 sending facility (HD: namespace id ^ universal id).
    let msh = msg.msh();
    let facility = (msg.get(msh, 4, 1), msg.get(msh, 4, 2));
    let system = opts.identifiers.patient_system(
        &pick.1,
        (&facility.0, &facility.1),
        opts.patient_id_system.as_deref(),
    );
    let p = PatientId {
        system,
        value: pick.0.clone(),
    };
    p.validate().ok().map(|_| p)
}

/// PV1-3 → bed id by the template.
fn bed_id(msg: &Message, pv1: &Segment, opts: &AdtOptions) -> Result<String, Refusal> {
    let raw = pv1.field(3);
    let first = msg.repetitions(raw).first().copied().unwrap_or("");
    let part = |name: &str| -> String {
        match name {
            "poc" => msg.component(first, 1),
            "room" => msg.component(first, 2),
            "bed" => msg.component(first, 3),
            _ => msg.subcomponent(first, 4, 1),
        }
        .trim()
        .to_string()
    };
    let mut out = String::new();
    let mut rest = opts.bed_template.as_str();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        let value = part(name);
        if value.is_empty() {
            return Err(refuse(
                "PV1^1^3",
                103,
                &format!("PV1-3 has no {name} component, so it names no bed"),
            ));
        }
        out.push_str(&value);
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    if !is_valid_key(&out) {
        return Err(refuse(
            "PV1^1^3",
            103,
            "PV1-3 does not map to a bed id (A-Z a-z 0-9 . _ -, at most 64)",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_protocol::hl7v2::parse_ack;

    /// 2024-05-01T12:00:00Z.
    const NOW: i64 = 1_714_564_800_000_000;

    fn msg(lines: &[&str]) -> Vec<u8> {
        let mut s = lines.join("\r");
        s.push('\r');
        s.into_bytes()
    }

    fn event(bytes: &[u8]) -> AdtEvent {
        match interpret(bytes, &AdtOptions::default(), NOW).outcome {
            Outcome::Event(e) => e,
            other => panic!("{other:?}"),
        }
    }

    fn refused(bytes: &[u8]) -> (AckCode, AckError) {
        let i = interpret(bytes, &AdtOptions::default(), NOW);
        match i.outcome {
            Outcome::Error(e) => (AckCode::Error, e),
            Outcome::Reject(e) => (AckCode::Reject, e),
            Outcome::Event(e) => panic!("accepted: {e:?}"),
        }
    }

    /// ADT^A01 laid out as HL7 v2.5 chapter 3 (3.3.1, message structure
    /// ADT_A01): MSH, EVN, PID, PV1.
    const A01: &[&str] = &[
        // MSH-3/4 sender ADT1 at GOOD HEALTH HOSPITAL, MSH-5/6 receiver,
        // MSH-7 message time, MSH-9 ADT^A01^ADT_A01, MSH-10 control id,
        // MSH-11 P(roduction), MSH-12 version 2.5.
        "MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|VIGIL|ICU|20240501113000+0000||ADT^A01^ADT_A01|MSG00001|P|2.5",
        // EVN-1 A01, EVN-2 recorded 11:25, EVN-5 operator, EVN-6 occurred 11:20.
        "EVN|A01|20240501112500+0000|||OP1|20240501112000+0000",
        // PID-3: MR identifier PATID1234 (assigning authority CX.4) and a
        // social security number (type SS); PID-5 name and PID-7 birth date
        // must never be read.
        "PID|1||PATID1234^^^GOOD HEALTH HOSPITAL^MR~123456789^^^USSSA^SS||EVERYMAN^ADAM^A^III||19610615|M",
        // PV1-2 I(npatient), PV1-3 ICU3^07^B^GHH (point of care ^ room ^
        // bed ^ facility), PV1-7 attending doctor, PV1-10 service,
        // PV1-14 admit source, PV1-15 ambulatory status, PV1-19 visit V1001.
        "PV1|1|I|ICU3^07^B^GHH||||004777^ATTEND^AARON^A|||SUR||||ADM|A0||||V1001",
    ];

    #[test]
    fn a01_admits_the_mr_identifier_to_the_mapped_bed_at_evn_6() {
        let e = event(&msg(A01));
        assert_eq!(
            e,
            AdtEvent::Admit {
                patient: PatientId {
                    system: "urn:vigil:authority:GOOD%20HEALTH%20HOSPITAL".into(),
                    value: "PATID1234".into(),
                },
                bed: "ICU3-07-B".into(),
                // EVN-6 event occurred (11:20), not EVN-2 recorded (11:25).
                at: 1_714_562_400_000_000,
                visit: Some("V1001".into()),
            }
        );
        // Nothing of PID-5 or PID-7 is in the event.
        let text = format!("{e:?}");
        assert!(!text.contains("EVERYMAN") && !text.contains("1961"));
    }

    #[test]
    fn the_system_is_the_authority_or_facility_mapped_to_a_uri() {
        let system = |pid3: &str, opts: &AdtOptions| {
            let mut m = A01.to_vec();
            let pid = format!("PID|1||{pid3}||EVERYMAN^ADAM");
            m[2] = &pid;
            match interpret(&msg(&m), opts, NOW).outcome {
                Outcome::Event(AdtEvent::Admit { patient, .. }) => patient.system,
                other => panic!("{other:?}"),
            }
        };
        let mut opts = AdtOptions::default();
        assert_eq!(system("P1^^^HOSP^MR", &opts), "urn:vigil:authority:HOSP");
        assert_eq!(
            system("P1^^^HOSP&2.16.840.1.113883.19&ISO^MR", &opts),
            "urn:oid:2.16.840.1.113883.19"
        );
        assert_eq!(system("P1^^^&1.2.3&ISO^MR", &opts), "urn:oid:1.2.3");
        // No authority, no facility entry, no default: no system.
        assert_eq!(system("P1^^^^MR", &opts), "");
        opts.patient_id_system = Some("LOCAL".into());
        assert_eq!(system("P1^^^^MR", &opts), "urn:vigil:authority:LOCAL");
        // MSH-4 GOOD HEALTH HOSPITAL has an entry: it wins over the default.
        opts.identifiers
            .facilities
            .insert("GOOD HEALTH HOSPITAL".into(), "urn:oid:1.2.3.4".into());
        assert_eq!(system("P1^^^^MR", &opts), "urn:oid:1.2.3.4");
        opts.identifiers
            .authorities
            .insert("HOSP".into(), "https://hosp.example/mrn".into());
        assert_eq!(system("P1^^^HOSP^MR", &opts), "https://hosp.example/mrn");
    }

    #[test]
    fn event_time_falls_back_to_evn_2_then_msh_7_and_uses_the_offset() {
        let mut m = A01.to_vec();
        m[1] = "EVN|A01|20240501112500+0000";
        let AdtEvent::Admit { at, .. } = event(&msg(&m)) else {
            panic!()
        };
        assert_eq!(at, 1_714_562_700_000_000);
        m[1] = "EVN|A01";
        let AdtEvent::Admit { at, .. } = event(&msg(&m)) else {
            panic!()
        };
        assert_eq!(at, 1_714_563_000_000_000, "MSH-7");
        // Without a zone: the configured offset (+02:00).
        m[1] = "EVN|A01|202405011325";
        let opts = AdtOptions {
            utc_offset_minutes: 120,
            ..Default::default()
        };
        let Outcome::Event(AdtEvent::Admit { at, .. }) = interpret(&msg(&m), &opts, NOW).outcome
        else {
            panic!()
        };
        assert_eq!(at, 1_714_562_700_000_000);
    }

    #[test]
    fn a02_a03_a08_map_to_transfer_discharge_update() {
        let mut m = A01.to_vec();
        m[0] = "MSH|^~\\&|ADT1|GHH|VIGIL|ICU|20240501113000+0000||ADT^A02^ADT_A02|MSG2|P|2.5";
        m[3] = "PV1|1|I|ICU3^08^A|||ICU3^07^B";
        assert!(matches!(
            event(&msg(&m)),
            AdtEvent::Transfer { bed, visit: None, .. } if bed == "ICU3-08-A"
        ));
        m[0] = "MSH|^~\\&|ADT1|GHH|VIGIL|ICU|20240501113000+0000||ADT^A03^ADT_A03|MSG3|P|2.5";
        m[3] = "PV1|1|I";
        assert!(matches!(event(&msg(&m)), AdtEvent::Discharge { .. }));
        m[0] = "MSH|^~\\&|ADT1|GHH|VIGIL|ICU|20240501113000+0000||ADT^A08^ADT_A01|MSG4|P|2.5";
        assert!(matches!(
            event(&msg(&m)),
            AdtEvent::Update { bed: None, .. }
        ));
        m[3] = "PV1|1|I|ICU3^09^C";
        assert!(matches!(
            event(&msg(&m)),
            AdtEvent::Update { bed: Some(b), .. } if b == "ICU3-09-C"
        ));
    }

    #[test]
    fn malformed_or_unsupported_messages_are_rejected_ar() {
        let with = |i: usize, line: &'static str| {
            let mut m = A01.to_vec();
            m[i] = line;
            msg(&m)
        };
        let cases: Vec<(Vec<u8>, &str, u16)> = vec![
            (b"garbage".to_vec(), "MSH", 102),
            (
                with(0, "MSH|^~\\&|A|B|C|D|20240501113000||ORU^R01|X|P|2.5"),
                "MSH^1^9",
                200,
            ),
            (
                with(0, "MSH|^~\\&|A|B|C|D|20240501113000||ADT^A04|X|P|2.5"),
                "MSH^1^9",
                201,
            ),
            (
                with(0, "MSH|^~\\&|A|B|C|D|20240501113000||ADT^A01|X|P|3.0"),
                "MSH^1^12",
                203,
            ),
            (
                with(0, "MSH|^~\\&|A|B|C|D|20240501113000||ADT^A01||P|2.5"),
                "MSH^1^10",
                101,
            ),
            (with(2, "PID|1||^^^GHH^MR"), "PID^1^3", 101),
            (with(3, "PV1|1|I"), "PV1^1^3", 101),
            (with(1, "EVN|A01|2024-05-01"), "EVN^1^2", 102),
        ];
        for (m, location, code) in cases {
            let (ack_code, e) = refused(&m);
            assert_eq!(
                (ack_code, e.location.as_str(), e.code),
                (AckCode::Reject, location, code),
                "{}",
                String::from_utf8_lossy(&m)
            );
        }
        let mut m = A01.to_vec();
        m.remove(2);
        assert_eq!(refused(&msg(&m)).1.location, "PID");
    }

    #[test]
    fn unmappable_locations_and_impossible_times_are_errors_ae() {
        let mut m = A01.to_vec();
        m[3] = "PV1|1|I|ICU3^^B";
        let (code, e) = refused(&msg(&m));
        assert_eq!(
            (code, e.code, e.location.as_str()),
            (AckCode::Error, 103, "PV1^1^3")
        );
        m[3] = "PV1|1|I|ICU 3^07^B";
        assert_eq!(refused(&msg(&m)).0, AckCode::Error);
        m[3] = A01[3];
        m[1] = "EVN|A01|20990501112500+0000";
        assert_eq!(refused(&msg(&m)).0, AckCode::Error);
    }

    #[test]
    fn bed_templates_are_checked_and_applied() {
        assert!(check_bed_template("{poc}-{room}-{bed}").is_ok());
        assert!(check_bed_template("{facility}.{bed}").is_ok());
        assert!(check_bed_template("fixed").is_err());
        assert!(check_bed_template("{ward}").unwrap_err().contains("ward"));
        assert!(check_bed_template("{bed").is_err());
        let opts = AdtOptions {
            bed_template: "{facility}.{bed}".into(),
            ..Default::default()
        };
        let Outcome::Event(AdtEvent::Admit { bed, .. }) = interpret(&msg(A01), &opts, NOW).outcome
        else {
            panic!()
        };
        assert_eq!(bed, "GHH.B");
    }

    proptest::proptest! {
        /// Any bytes, or the A01 with one byte changed: interpreting never
        /// panics, an event names a valid bed and a non-empty identifier,
        /// and the ACK for any outcome parses back with the control id.
        #[test]
        fn interpreting_never_panics(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            pos in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
        ) {
            let _ = interpret(&junk, &AdtOptions::default(), NOW);
            let mut m = msg(A01);
            let i = pos.index(m.len());
            m[i] = byte;
            let it = interpret(&m, &AdtOptions::default(), NOW);
            if let Outcome::Event(AdtEvent::Admit { patient, bed, .. }) = &it.outcome {
                proptest::prop_assert!(!patient.value.is_empty() && is_valid_key(bed));
            }
            let a = ack(&it.target, it.code(), None, OffsetDateTime::UNIX_EPOCH, "A");
            proptest::prop_assert!(!a.contains(&0x0B) && !a.contains(&0x1C));
            if it.code() != AckCode::Reject {
                proptest::prop_assert_eq!(parse_ack(&a).map(|x| x.1), Some(it.target.control_id.clone()));
            }
        }
    }

    #[test]
    fn the_ack_echoes_the_control_id_and_swaps_applications() {
        let i = interpret(&msg(A01), &AdtOptions::default(), NOW);
        let a = ack(
            &i.target,
            AckCode::Accept,
            None,
            OffsetDateTime::UNIX_EPOCH,
            "ACK1",
        );
        let text = String::from_utf8(a.clone()).unwrap();
        assert!(
            text.starts_with("MSH|^~\\&|VIGIL|ICU|ADT1|GOOD HEALTH HOSPITAL|19700101000000+0000||ACK^A01^ACK|ACK1|P|2.5\r"),
            "{text}"
        );
        assert_eq!(parse_ack(&a), Some(("AA".into(), "MSG00001".into())));
        assert!(!text.contains("EVERYMAN"));
    }

    #[test]
    fn sending_facilities_match_the_field_or_one_of_its_identifiers() {
        let allowed = vec!["GHH".to_owned(), "1.2.3.4".to_owned()];
        assert_eq!(allowed_facility("GHH", b'^', &allowed), Some("GHH"));
        assert_eq!(
            allowed_facility("GHH^2.16.1^ISO", b'^', &allowed),
            Some("GHH")
        );
        assert_eq!(
            allowed_facility("X^1.2.3.4^ISO", b'^', &allowed),
            Some("1.2.3.4")
        );
        assert_eq!(allowed_facility("EVIL", b'^', &allowed), None);
        assert_eq!(allowed_facility("GHHX^9", b'^', &allowed), None);
        assert_eq!(allowed_facility("", b'^', &allowed), None);
        assert_eq!(allowed_facility("^^ISO", b'^', &allowed), None);
        assert_eq!(allowed_facility("GHH", b'^', &[]), None);
    }
}
