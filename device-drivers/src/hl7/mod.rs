//! HL7 v2 ORU^R01 observation messages over MLLP (IHE PCD-01 style): the
//! codec ([`codec`]), the interpretation of ORU^R01 into readings
//! ([`process`]) and the ACK rules. The TCP/TLS listener lives in the agent
//! (`edge-agent/src/hl7.rs`); this module does no I/O.
//!
//! # ACK rules (what MSA-1 says)
//! - **AA**: every OBX was accepted, and (said by the caller) durably
//!   buffered.
//! - **AE**: the message is a well-formed ORU^R01 but the agent refuses
//!   some of its content: unknown observation code, unit not accepted for
//!   the metric (or missing for a value), non-numeric NM value, unreadable
//!   or impossible time, OBX-11 status D/W or unknown. **Nothing of the
//!   message is stored** (no partial storage: the sender fixes and resends
//!   the whole message; a partial store would make the resend a duplicate).
//!   The caller also answers AE when the buffer cannot take the message.
//! - **AR**: not an HL7 v2 message, not ORU^R01, unsupported version (only
//!   2.3 … 2.9), no MSH-10 control id, or a structure that cannot be read
//!   (OBX outside an OBR group, bad segment ids, bad encoding characters).
//!
//! # PHI minimisation
//! From PID only PID-3 (patient identifier list) is read, and of each
//! identifier only the value (CX.1), the assigning authority (CX.4) and
//! the identifier type (CX.5). Names, birth date, address, phone and every
//! other PID field are never copied out of the message bytes, which are
//! dropped after processing. Refusal texts name segment numbers and codes,
//! never values or identifiers.

pub mod codec;

use shared_protocol::catalogue::{CATALOGUE, Metric};
use shared_protocol::v1::{
    Identifier, Interpretation, QualityFlag, Reading, TimeSource, Validity, reading::Value,
};
use time::{OffsetDateTime, UtcOffset};

pub use codec::{
    AckCode, AckError, AckTarget, Delimiters, Message, MllpDecoder, MllpError, ParseError,
    build_ack, mllp_encode, parse_ack,
};
/// HL7 times (DTM) moved to `shared_protocol::hl7v2` with the codec;
/// re-exported so `device_drivers::hl7::parse_time` etc. keep working.
pub use shared_protocol::hl7v2::{Hl7Time, format_ts, parse_time, version_supported};

/// Agent-config kind, also carried in `DeviceInfo.protocol`.
pub const KIND: &str = "hl7-mllp";
/// The IANA-registered port for HL7 over MLLP.
pub const DEFAULT_PORT: u16 = 2575;

/// Options of an `hl7-mllp` device (the `[device.options]` table).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hl7Options {
    /// Offset from UTC, minutes, used for HL7 times that carry no zone
    /// (±1080). Times with a zone are converted exactly.
    #[serde(default)]
    pub utc_offset_minutes: i32,
    /// `Identifier.system` used when PID-3 has no assigning authority.
    #[serde(default)]
    pub patient_id_system: Option<String>,
    /// Largest accepted message (bytes between the MLLP blocks).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Most concurrent connections; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Junk (bytes outside MLLP blocks, truncated/oversized messages) a
    /// connection may send before it is closed.
    #[serde(default = "default_max_junk_bytes")]
    pub max_junk_bytes: usize,
    /// PEM certificate chain: serve MLLP over TLS (rustls).
    #[serde(default)]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key for `tls_cert_file` (mode 0600).
    #[serde(default)]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Allow plaintext MLLP on a non-loopback `listen` address.
    #[serde(default)]
    pub allow_plaintext: bool,
}

fn default_max_message_bytes() -> usize {
    codec::DEFAULT_MAX_MESSAGE
}
fn default_max_connections() -> usize {
    64
}
fn default_idle_timeout_s() -> u64 {
    300
}
fn default_max_junk_bytes() -> usize {
    64 * 1024
}

impl Default for Hl7Options {
    fn default() -> Self {
        Hl7Options {
            utc_offset_minutes: 0,
            patient_id_system: None,
            max_message_bytes: default_max_message_bytes(),
            max_connections: default_max_connections(),
            idle_timeout_s: default_idle_timeout_s(),
            max_junk_bytes: default_max_junk_bytes(),
            tls_cert_file: None,
            tls_key_file: None,
            allow_plaintext: false,
        }
    }
}

impl Hl7Options {
    /// Check ranges; the message names the option.
    pub fn validate(&self) -> Result<(), String> {
        if !(-1080..=1080).contains(&self.utc_offset_minutes) {
            return Err("utc_offset_minutes must be between -1080 and 1080".into());
        }
        if !(1024..=64 << 20).contains(&self.max_message_bytes) {
            return Err("max_message_bytes must be between 1024 and 67108864".into());
        }
        if !(1..=4096).contains(&self.max_connections) {
            return Err("max_connections must be between 1 and 4096".into());
        }
        if !(1..=86_400).contains(&self.idle_timeout_s) {
            return Err("idle_timeout_s must be between 1 and 86400".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("tls_cert_file and tls_key_file must be given together".into());
        }
        if self
            .patient_id_system
            .as_deref()
            .is_some_and(|s| s.trim().is_empty() || s.len() > 256)
        {
            return Err("patient_id_system must be 1-256 characters".into());
        }
        Ok(())
    }

    pub fn tls(&self) -> bool {
        self.tls_cert_file.is_some()
    }

    fn offset(&self) -> UtcOffset {
        UtcOffset::from_whole_seconds(self.utc_offset_minutes * 60).unwrap_or(UtcOffset::UTC)
    }
}

/// The result of processing one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// Header fields to answer with.
    pub target: AckTarget,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every OBX accepted: store these (all or nothing), then answer AA.
    Accept {
        readings: Vec<Reading>,
        /// Device-hierarchy OBX rows (MDS/VMD/channel) skipped.
        skipped: usize,
    },
    /// AE: well-formed, content refused; store nothing.
    Error(Vec<AckError>),
    /// AR: not an acceptable message.
    Reject(AckError),
}

impl Processed {
    /// The ACK code this outcome leads to before storage (AA for Accept).
    pub fn code(&self) -> AckCode {
        match self.outcome {
            Outcome::Accept { .. } => AckCode::Accept,
            Outcome::Error(_) => AckCode::Error,
            Outcome::Reject(_) => AckCode::Reject,
        }
    }
}

fn err(location: impl Into<String>, code: u16, text: impl Into<String>) -> AckError {
    AckError {
        location: location.into(),
        code,
        text: text.into(),
    }
}

/// Parse and interpret one message (the bytes of one MLLP block).
/// `now_us` is the gateway time (UTC µs): `gateway_time_us` of the
/// readings, and the reference for "impossible" times.
pub fn process(bytes: &[u8], opts: &Hl7Options, now_us: i64) -> Processed {
    let msg = match Message::parse(bytes) {
        Ok(m) => m,
        Err(e) => {
            return Processed {
                target: AckTarget::best_effort(bytes),
                outcome: Outcome::Reject(err("MSH", 102, e.to_string())),
            };
        }
    };
    let target = AckTarget::of(&msg);
    let outcome = match check_header(&msg) {
        Err(e) => Outcome::Reject(e),
        Ok(()) => interpret(&msg, opts, now_us),
    };
    Processed { target, outcome }
}

fn check_header(msg: &Message) -> Result<(), AckError> {
    let msh = msg.msh();
    if msh.field(10).is_empty() {
        return Err(err("MSH^1^10", 101, "MSH-10 message control id is missing"));
    }
    let code = msg.get(msh, 9, 1);
    let trigger = msg.get(msh, 9, 2);
    if code != "ORU" {
        return Err(err(
            "MSH^1^9",
            200,
            "only ORU^R01 observation messages are accepted",
        ));
    }
    if trigger != "R01" {
        return Err(err(
            "MSH^1^9",
            201,
            "only ORU^R01 observation messages are accepted",
        ));
    }
    let version = msg.get(msh, 12, 1);
    if !version_supported(&version) {
        return Err(err(
            "MSH^1^12",
            203,
            "unsupported HL7 version (2.3 to 2.9 are accepted)",
        ));
    }
    Ok(())
}

/// A coded element (CE/CWE): (code, text, system) triplets, primary and
/// alternate.
fn coded(msg: &Message, raw: &str) -> Vec<(String, String, String)> {
    let mut out = vec![];
    for base in [1, 4] {
        let code = msg.component(raw, base);
        let text = msg.component(raw, base + 1);
        let sys = msg.component(raw, base + 2);
        if !code.is_empty() || !text.is_empty() {
            out.push((code, text, sys));
        }
    }
    out
}

/// Resolve OBX-3 to catalogue metrics (before the unit is known).
fn resolve_code(msg: &Message, raw: &str) -> Result<Vec<Metric>, String> {
    let triplets = coded(msg, raw);
    if triplets.is_empty() {
        return Err("OBX-3 observation identifier is missing".into());
    }
    let mut found: Option<Vec<Metric>> = None;
    let mut unknown = vec![];
    for (code, text, sys) in &triplets {
        let sys_u = sys.to_ascii_uppercase();
        let cands: Vec<Metric> = match sys_u.as_str() {
            "MDC" => {
                let by_code = code.parse::<u32>().ok().and_then(|c| CATALOGUE.by_mdc(c));
                let by_name = || CATALOGUE.all().iter().find(|m| m.mdc_name == text.as_str());
                by_code
                    .or_else(|| code.is_empty().then(by_name).flatten())
                    .map(|m| vec![*m])
                    .unwrap_or_default()
            }
            "LN" | "LOINC" => {
                // Metrics whose primary LOINC is the code first, then those
                // naming it as their profile code.
                let mut v: Vec<Metric> = vec![];
                for primary in [true, false] {
                    for m in CATALOGUE.by_loinc(code) {
                        let base = CATALOGUE.by_mdc(m.mdc).copied();
                        let is_primary = m.loinc == code.as_str();
                        if is_primary == primary
                            && let Some(b) = base
                            && !v.iter().any(|x| x.mdc == b.mdc)
                        {
                            v.push(b);
                        }
                    }
                }
                v
            }
            _ => {
                unknown.push(format!(
                    "OBX-3 coding system `{}` is not supported (LN or MDC)",
                    short(sys)
                ));
                continue;
            }
        };
        if cands.is_empty() {
            unknown.push(format!(
                "observation code `{}^{}` is not in the catalogue",
                short(code),
                short(sys)
            ));
            continue;
        }
        match &found {
            None => found = Some(cands),
            Some(prev) => {
                let common: Vec<Metric> = prev
                    .iter()
                    .filter(|p| cands.iter().any(|c| c.mdc == p.mdc))
                    .copied()
                    .collect();
                if common.is_empty() {
                    return Err("OBX-3 primary and alternate codes name different metrics".into());
                }
                found = Some(common);
            }
        }
    }
    found.ok_or_else(|| unknown.join("; "))
}

/// OBX-6 → (MDC unit code, UCUM code); (0, "") when absent.
fn resolve_unit(msg: &Message, raw: &str) -> Result<(u32, String), String> {
    let mut mdc = 0u32;
    let mut ucum = String::new();
    for (code, text, sys) in coded(msg, raw) {
        match sys.to_ascii_uppercase().as_str() {
            "UCUM" => ucum = code,
            "MDC" => {
                mdc = match code.parse::<u32>() {
                    Ok(c) => c,
                    Err(_) => shared_protocol::catalogue::units::ALL
                        .iter()
                        .find(|u| u.mdc_name == text)
                        .map(|u| u.mdc)
                        .ok_or("OBX-6 MDC unit code is not a number")?,
                }
            }
            // A bare unit without a system is taken as UCUM (HL7's default
            // for OBX-6 in v2.5+ is UCUM, "ISO+" and "ANSI+" are not).
            "" if !code.is_empty() => ucum = code,
            other => {
                return Err(format!(
                    "OBX-6 unit coding system `{}` is not supported (UCUM or MDC)",
                    short(other)
                ));
            }
        }
    }
    Ok((mdc, ucum))
}

fn short(s: &str) -> String {
    s.chars().take(24).collect()
}

/// HL7 NM: optional sign, digits, optional decimal point and digits.
pub fn parse_nm(s: &str) -> Option<f64> {
    let s = s.trim();
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    let mut parts = digits.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next();
    let ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if !ok(int) || !frac.is_none_or(ok) || (int.is_empty() && frac.is_none_or(str::is_empty)) {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// PID-3 → the identifier to carry: the first with type `MR` (medical
/// record number), else `PI` (patient internal), else the first with a
/// value. Only value, assigning authority and type are read.
fn patient_identifier(
    msg: &Message,
    pid: &codec::Segment,
    opts: &Hl7Options,
) -> Option<Identifier> {
    let mut ids: Vec<(String, String, String)> = vec![];
    for rep in msg.repetitions(pid.field(3)) {
        let value = msg.component(rep, 1);
        if value.trim().is_empty() {
            continue;
        }
        // CX.4 is an HD: namespace id & universal id & universal id type.
        let mut authority = msg.subcomponent(rep, 4, 1);
        if authority.is_empty() {
            authority = msg.subcomponent(rep, 4, 2);
        }
        ids.push((value, authority, msg.component(rep, 5)));
    }
    let pick = ids
        .iter()
        .find(|i| i.2 == "MR")
        .or_else(|| ids.iter().find(|i| i.2 == "PI"))
        .or_else(|| ids.first())?;
    let system = if pick.1.is_empty() {
        opts.patient_id_system.clone().unwrap_or_default()
    } else {
        pick.1.clone()
    };
    Some(Identifier {
        system,
        value: pick.0.trim().to_string(),
    })
}

/// How far ahead of the gateway clock a time may be.
const MAX_FUTURE_US: i64 = 24 * 3600 * 1_000_000;

fn interpret(msg: &Message, opts: &Hl7Options, now_us: i64) -> Outcome {
    let offset = opts.offset();
    let msh = msg.msh();
    let mut errors: Vec<AckError> = vec![];
    let mut readings = vec![];
    let mut skipped = 0;

    // Times are parsed here but only refused when an OBX needs them.
    let header_time = |raw: String, loc: String, what: &str| -> Result<Option<Hl7Time>, AckError> {
        if raw.is_empty() {
            return Ok(None);
        }
        parse_time(&raw, offset)
            .map(Some)
            .map_err(|e| err(loc, 102, format!("{what}: {e}")))
    };
    let msh_time = header_time(msg.get(msh, 7, 1), "MSH^1^7".into(), "MSH-7");
    let mut subject: Option<Identifier> = None;
    // None = no OBR yet in this patient group.
    let mut obr_time: Option<Result<Option<Hl7Time>, AckError>> = None;
    let mut counts = std::collections::HashMap::<&str, usize>::new();
    for seg in &msg.segments {
        let nth = {
            let c = counts.entry(seg.id.as_str()).or_default();
            *c += 1;
            *c
        };
        match seg.id.as_str() {
            "PID" => {
                subject = patient_identifier(msg, seg, opts);
                obr_time = None;
            }
            "OBR" => {
                obr_time = Some(header_time(
                    msg.get(seg, 7, 1),
                    format!("OBR^{nth}^7"),
                    "OBR-7",
                ));
            }
            "OBX" => {
                let Some(obr) = &obr_time else {
                    return Outcome::Reject(err(
                        format!("OBX^{nth}"),
                        100,
                        "OBX outside an OBR group (ORU^R01 needs OBR before OBX)",
                    ));
                };
                // OBR-7, else MSH-7 (OBX-14 first, in obx_reading).
                let fallback = match obr {
                    Ok(Some(t)) => Ok(Some(*t)),
                    Ok(None) => msh_time.clone(),
                    Err(e) => Err(e.clone()),
                };
                match obx_reading(msg, seg, nth, fallback, opts, now_us) {
                    Ok(Some(r)) => readings.push(Reading {
                        subject: subject.clone(),
                        ..r
                    }),
                    Ok(None) => skipped += 1,
                    Err(e) => errors.push(e),
                }
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Outcome::Accept { readings, skipped }
    } else {
        Outcome::Error(errors)
    }
}

/// One OBX → a reading, `None` for a device-hierarchy row, or the reason
/// it is refused.
fn obx_reading(
    msg: &Message,
    seg: &codec::Segment,
    nth: usize,
    fallback_time: Result<Option<Hl7Time>, AckError>,
    opts: &Hl7Options,
    now_us: i64,
) -> Result<Option<Reading>, AckError> {
    let at = |f: usize| format!("OBX^{nth}^{f}");
    let value_type = msg.get(seg, 2, 1);
    let raw_value = seg.field(5);
    let status = msg.get(seg, 11, 1);

    // IHE PCD-01 device hierarchy rows (MDS, VMD, channel: MDC object
    // codes, partition 1) carry no value; they describe the device.
    let codes = coded(msg, seg.field(3));
    if raw_value.is_empty()
        && value_type.is_empty()
        && codes.iter().any(|(c, _, s)| {
            s.eq_ignore_ascii_case("MDC") && c.parse::<u32>().is_ok_and(|c| c >> 16 == 1)
        })
    {
        return Ok(None);
    }
    let metrics = resolve_code(msg, seg.field(3)).map_err(|t| err(at(3), 103, t))?;
    let (mdc_unit, ucum) = resolve_unit(msg, seg.field(6)).map_err(|t| err(at(6), 103, t))?;

    // OBX-11 (HL7 table 0085).
    let (has_value, validity) = match status.as_str() {
        // Final, correction, results entered (not verified: what monitors
        // send for live data), or no status given.
        "F" | "C" | "R" | "" => (true, Validity::Valid),
        // Preliminary / partial.
        "P" | "S" => (true, Validity::Questionable),
        // Cannot be obtained, not asked, in process (pending).
        "X" | "N" | "I" => (false, Validity::Invalid),
        "D" | "W" => {
            return Err(err(
                at(11),
                207,
                "OBX-11 D/W (deletion or retraction of an earlier result) is not supported",
            ));
        }
        _ => return Err(err(at(11), 103, "OBX-11 result status is not known")),
    };

    let mut value = None;
    let mut flags = vec![];
    if has_value && !raw_value.is_empty() {
        if value_type == "NM" {
            if msg.repetitions(raw_value).len() > 1 {
                return Err(err(at(5), 102, "OBX-5 holds more than one NM value"));
            }
            let v = parse_nm(&msg.component(raw_value, 1))
                .ok_or_else(|| err(at(5), 102, "OBX-5 is not a number (value type NM)"))?;
            value = Some(Value::Numeric(v));
        } else {
            // A non-numeric value type for a numeric metric: never a number.
            flags.push(QualityFlag::ValueMissing as i32);
        }
    } else {
        flags.push(QualityFlag::ValueMissing as i32);
    }
    let validity = if value.is_some() {
        validity
    } else {
        Validity::Invalid
    };

    // The unit must be one the catalogue accepts for the metric.
    let metric = if mdc_unit == 0 && ucum.is_empty() {
        if value.is_some() {
            return Err(err(
                at(6),
                101,
                "OBX-6 units are missing for a numeric value",
            ));
        }
        metrics[0]
    } else {
        *metrics
            .iter()
            .find_map(|m| m.in_unit(mdc_unit, &ucum).map(|_| m))
            .ok_or_else(|| {
                err(
                    at(6),
                    103,
                    format!(
                        "OBX-6 unit is not one {} is reported in",
                        metrics[0].mdc_name
                    ),
                )
            })?
    };
    let unit = metric.in_unit(mdc_unit, &ucum).map(|v| v.unit);

    // OBX-14, else OBR-7, else MSH-7.
    let raw_time = msg.get(seg, 14, 1);
    let time = if raw_time.is_empty() {
        fallback_time?
    } else {
        Some(
            parse_time(&raw_time, opts.offset())
                .map_err(|e| err(at(14), 102, format!("OBX-14: {e}")))?,
        )
    };
    let (device_time_us, time_source) = match time {
        Some(t) => {
            if t.utc_us < shared_protocol::EPOCH_2000_US
                || t.utc_us > now_us.saturating_add(MAX_FUTURE_US)
            {
                return Err(err(
                    at(14),
                    102,
                    "observation time is before 2000 or more than 24 h ahead",
                ));
            }
            (t.utc_us, TimeSource::DeviceClockUnsynced)
        }
        None => (0, TimeSource::GatewayReceive),
    };
    let label: String = codes
        .first()
        .map(|(c, t, _)| if t.is_empty() { c.clone() } else { t.clone() })
        .unwrap_or_default()
        .chars()
        .take(64)
        .collect();
    Ok(Some(Reading {
        mdc_code: metric.mdc,
        vendor_label: label,
        value,
        mdc_unit: unit.map(|u| u.mdc).unwrap_or(0),
        ucum_unit: unit.map(|u| u.ucum.to_string()).unwrap_or_default(),
        device_time_us,
        time_source: time_source as i32,
        gateway_time_us: now_us,
        validity: validity as i32,
        flags,
        sequence: 0,
        subject: None,
        interpretation: abnormal_flag(msg, seg.field(8)) as i32,
    }))
}

/// OBX-8 abnormal flags (HL7 v2.5 table 0078) → the device's own
/// interpretation: the first repetition with a code this maps. Other codes
/// of the table (susceptibility S/R/I, delta U/D, "better"/"worse", …) say
/// nothing about a vital sign's level and are not carried; an empty field
/// means the sender did not flag the value.
fn abnormal_flag(msg: &Message, raw: &str) -> Interpretation {
    msg.repetitions(raw)
        .into_iter()
        .find_map(|rep| {
            Some(match msg.component(rep, 1).trim() {
                "N" => Interpretation::Normal,
                "L" => Interpretation::Low,
                "H" => Interpretation::High,
                "LL" => Interpretation::CriticalLow,
                "HH" => Interpretation::CriticalHigh,
                "A" => Interpretation::Abnormal,
                "AA" => Interpretation::CriticalAbnormal,
                "<" => Interpretation::OffScaleLow,
                ">" => Interpretation::OffScaleHigh,
                _ => return None,
            })
        })
        .unwrap_or(Interpretation::Unspecified)
}

/// The ACK for a processed message. `stored` says whether the readings of
/// an `Accept` were durably buffered; when false the ACK is AE
/// ("temporarily unable"), never AA.
pub fn ack_for(p: &Processed, stored: bool, now: OffsetDateTime, control_id: &str) -> Vec<u8> {
    let ts = format_ts(now);
    match &p.outcome {
        Outcome::Accept { .. } if stored => {
            build_ack(&p.target, AckCode::Accept, &[], &ts, control_id)
        }
        Outcome::Accept { .. } => build_ack(
            &p.target,
            AckCode::Error,
            &[err(
                "MSH",
                206,
                "temporarily unable to store the message; resend later",
            )],
            &ts,
            control_id,
        ),
        Outcome::Error(errors) => build_ack(&p.target, AckCode::Error, errors, &ts, control_id),
        Outcome::Reject(e) => build_ack(
            &p.target,
            AckCode::Reject,
            std::slice::from_ref(e),
            &ts,
            control_id,
        ),
    }
}

#[cfg(test)]
mod tests;
