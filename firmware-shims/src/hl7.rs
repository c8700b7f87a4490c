//! An HL7 v2 sender (a monitor gateway or interface engine) that pushes
//! ORU^R01 observation messages over MLLP to `--to host:port` and waits for
//! each ACK.
//!
//! Messages and framing are composed here from this file's own reading of
//! HL7 v2.6 chapters 2 and 7, IHE PCD-01 and the MLLP release 2 appendix;
//! nothing is shared with the agent's parser, so the end-to-end tests check
//! two readings against each other.
//!
//! The patients carry names, birth dates and addresses, as real messages
//! do: the agent must drop everything of PID but PID-3.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Scenario played by the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Well-formed ORU^R01 for three patients in turn (SpO2, heart rate,
    /// respiratory rate, NIBP, temperature): every message expects AA.
    Stable,
    /// A mix: good messages (AA), content the agent must refuse (unknown
    /// LOINC code, unit not accepted for SpO2, a non-numeric NM value: AE),
    /// and messages it must reject (ADT^A01, HL7 version 2.1: AR).
    Malformed,
}

#[derive(Debug, clap::Args)]
pub struct Hl7Args {
    /// The agent's MLLP listener, host:port.
    #[arg(long)]
    pub to: String,
    /// Number of messages to send.
    #[arg(long, default_value_t = 10)]
    pub count: u32,
    /// Pause between messages.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    #[arg(long, value_enum, default_value = "stable")]
    pub scenario: Scenario,
    /// Print one line per message: `<control id> expected=<code> ack=<code>`.
    #[arg(long)]
    pub echo: bool,
    /// Seconds to wait for each ACK.
    #[arg(long, default_value_t = 10)]
    pub ack_timeout_s: u64,
}

/// A simulated patient: PID-3 identifier plus PHI that must never leave
/// the agent's parser.
#[derive(Debug, Clone, Copy)]
pub struct Patient {
    pub mrn: &'static str,
    pub authority: &'static str,
    pub family: &'static str,
    pub given: &'static str,
    pub birth_date: &'static str,
}

pub const PATIENTS: [Patient; 3] = [
    Patient {
        mrn: "SIM-MRN-1001",
        authority: "VIGILSIM",
        family: "Quixadaphant",
        given: "Alonsa",
        birth_date: "19470312",
    },
    Patient {
        mrn: "SIM-MRN-1002",
        authority: "VIGILSIM",
        family: "Bovarynth",
        given: "Emmeline",
        birth_date: "19811105",
    },
    Patient {
        mrn: "SIM-MRN-1003",
        authority: "VIGILSIM",
        family: "Kareninova",
        given: "Annushka",
        birth_date: "19930720",
    },
];

/// One message to send and the ACK code it should get.
#[derive(Debug, Clone)]
pub struct Planned {
    pub control_id: String,
    pub expect: &'static str,
    pub text: String,
}

/// `YYYYMMDDHHMMSS+0000` of a UTC time.
fn ts(t: time::OffsetDateTime) -> String {
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}+0000",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The vitals of message `i` (deterministic, gently varying).
pub fn vitals(i: u32) -> [f64; 6] {
    let w = f64::from(i % 7);
    [
        96.0 + (w % 3.0),        // SpO2 %
        70.0 + w,                // heart rate /min
        14.0 + (w % 4.0),        // resp rate /min
        118.0 + w,               // NIBP systolic mmHg
        76.0 + (w % 5.0),        // NIBP diastolic mmHg
        36.6 + (w % 3.0) / 10.0, // temperature Cel
    ]
}

/// The simulated monitor's default alarm limits per OBX-3 code, low and
/// high: a value outside them is flagged L or H in OBX-8, inside N.
const ALARM_LIMITS: &[(&str, f64, f64)] = &[
    ("150456", 90.0, 100.0), // SpO2 %
    ("8867-4", 50.0, 120.0), // heart rate /min
    ("9279-1", 8.0, 30.0),   // respiratory rate /min
    ("150021", 90.0, 160.0), // NIBP systolic mmHg
    ("150022", 50.0, 90.0),  // NIBP diastolic mmHg
    ("8310-5", 35.0, 38.5),  // body temperature Cel
];

/// OBX-8 for a value of the code (OBX-3's first component): "" when the
/// monitor has no limits for it.
fn abnormal_flag(code: &str, v: f64) -> &'static str {
    let id = code.split('^').next().unwrap_or_default();
    match ALARM_LIMITS.iter().find(|(c, ..)| *c == id) {
        Some((_, lo, _)) if v < *lo => "L",
        Some((_, _, hi)) if v > *hi => "H",
        Some(_) => "N",
        None => "",
    }
}

/// Message `i` of a scenario, at time `now`.
pub fn plan(scenario: Scenario, i: u32, now: time::OffsetDateTime) -> Planned {
    let p = PATIENTS[(i as usize) % PATIENTS.len()];
    let control_id = format!("SIM{:06}", i + 1);
    let t = ts(now);
    let [spo2, hr, rr, sys, dia, temp] = vitals(i);
    let kind = match scenario {
        Scenario::Stable => 0,
        Scenario::Malformed => i % 6,
    };
    let msh = |typ: &str, version: &str| {
        format!("MSH|^~\\&|SIMMON|ICU-SIM|VIGIL|HOSP|{t}||{typ}|{control_id}|P|{version}|||NE|AL")
    };
    let pid = format!(
        "PID|1||{}^^^{}^MR||{}^{}^^^^^L||{}|U|||1 Nowhere Lane^^Simtown^^00000||555-0100",
        p.mrn, p.authority, p.family, p.given, p.birth_date
    );
    let obr = format!("OBR|1|{control_id}^SIMMON||182777000^monitoring of patient^SCT|||{t}");
    // OBX-2 NM, OBX-3 code, OBX-4 sub-id, OBX-5 value, OBX-6 unit, OBX-8
    // abnormal flag (table 0078: N, or L/H outside the simulated monitor's
    // alarm limits for the code), OBX-11 F, OBX-14 time.
    let obx = |n: u32, code: &str, value: String, unit: &str| {
        let flag = abnormal_flag(code, value.parse().unwrap_or(f64::NAN));
        format!("OBX|{n}|NM|{code}|1.1.1.{n}|{value}|{unit}||{flag}|||F|||{t}")
    };
    let mut segs = vec![msh("ORU^R01^ORU_R01", "2.6"), pid, obr];
    // IHE PCD-01 device hierarchy row (MDS), no value.
    segs.push("OBX|1||69965^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|1.0.0.0|||||||X".into());
    segs.push(obx(
        2,
        "150456^MDC_PULS_OXIM_SAT_O2^MDC",
        format!("{spo2:.0}"),
        "262688^MDC_DIM_PERCENT^MDC",
    ));
    segs.push(obx(
        3,
        "8867-4^Heart rate^LN",
        format!("{hr:.0}"),
        "/min^/min^UCUM",
    ));
    segs.push(obx(
        4,
        "9279-1^Respiratory rate^LN",
        format!("{rr:.0}"),
        "/min^/min^UCUM",
    ));
    segs.push(obx(
        5,
        "150021^MDC_PRESS_BLD_NONINV_SYS^MDC",
        format!("{sys:.0}"),
        "266016^MDC_DIM_MMHG^MDC",
    ));
    segs.push(obx(
        6,
        "150022^MDC_PRESS_BLD_NONINV_DIA^MDC",
        format!("{dia:.0}"),
        "mm[Hg]^mm[Hg]^UCUM",
    ));
    segs.push(obx(
        7,
        "8310-5^Body temperature^LN",
        format!("{temp:.1}"),
        "Cel^Cel^UCUM",
    ));
    let expect = match kind {
        0 | 3 => "AA",
        1 => {
            // An observation code the catalogue does not know.
            segs[5] = obx(
                3,
                "99999-9^Mystery^LN",
                format!("{hr:.0}"),
                "/min^/min^UCUM",
            );
            "AE"
        }
        2 => {
            // SpO2 in mmHg: a unit not accepted for the metric.
            segs[4] = obx(
                2,
                "150456^MDC_PULS_OXIM_SAT_O2^MDC",
                format!("{spo2:.0}"),
                "mm[Hg]^mm[Hg]^UCUM",
            );
            "AE"
        }
        4 => {
            segs[0] = msh("ADT^A01^ADT_A01", "2.6");
            "AR"
        }
        _ => {
            // A value that is not a number (NM), or an unsupported version.
            if i % 12 == 5 {
                segs[0] = msh("ORU^R01", "2.1");
                "AR"
            } else {
                segs[6] = obx(
                    4,
                    "9279-1^Respiratory rate^LN",
                    "fourteen".into(),
                    "/min^/min^UCUM",
                );
                "AE"
            }
        }
    };
    let mut text = segs.join("\r");
    text.push('\r');
    Planned {
        control_id,
        expect,
        text,
    }
}

/// MLLP (release 2): 0x0B, message, 0x1C 0x0D.
fn frame(msg: &[u8]) -> Vec<u8> {
    let mut v = vec![0x0B];
    v.extend_from_slice(msg);
    v.extend_from_slice(&[0x1C, 0x0D]);
    v
}

/// MSA-1 and MSA-2 of an ACK.
pub fn ack_code(ack: &str) -> Option<(String, String)> {
    let msa = ack.split(['\r', '\n']).find(|l| l.starts_with("MSA"))?;
    let sep = msa.chars().nth(3)?;
    let f: Vec<&str> = msa.split(sep).collect();
    Some((f.get(1)?.to_string(), f.get(2).unwrap_or(&"").to_string()))
}

async fn read_ack(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<String> {
    loop {
        if let Some(start) = buf.iter().position(|&b| b == 0x0B)
            && let Some(end) = buf[start..].windows(2).position(|w| w == [0x1C, 0x0D])
        {
            let msg = buf[start + 1..start + end].to_vec();
            buf.drain(..start + end + 2);
            return Ok(String::from_utf8_lossy(&msg).into_owned());
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the ACK");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub async fn run(args: Hl7Args) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(&args.to)
        .await
        .with_context(|| format!("connecting to {}", args.to))?;
    s.set_nodelay(true)?;
    let mut buf = Vec::new();
    let mut mismatches = 0;
    for i in 0..args.count {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
        let p = plan(args.scenario, i, time::OffsetDateTime::now_utc());
        s.write_all(&frame(p.text.as_bytes())).await?;
        let ack = tokio::time::timeout(
            Duration::from_secs(args.ack_timeout_s),
            read_ack(&mut s, &mut buf),
        )
        .await
        .with_context(|| {
            format!(
                "no ACK for {} within {} s",
                p.control_id, args.ack_timeout_s
            )
        })??;
        let (code, echoed) = ack_code(&ack).context("ACK without MSA")?;
        if echoed != p.control_id {
            bail!(
                "ACK names control id {echoed:?}, expected {:?}",
                p.control_id
            );
        }
        if code != p.expect {
            mismatches += 1;
        }
        if args.echo {
            println!("{} expected={} ack={code}", p.control_id, p.expect);
        }
    }
    if mismatches > 0 {
        bail!("{mismatches} ACK(s) differed from the expected code");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two readings of HL7 v2 against each other: the agent's parser
    /// answers every simulated message with the code the simulator expects.
    #[test]
    fn the_agent_parser_agrees_with_the_expected_ack_codes() {
        use device_drivers::hl7::{Hl7Options, Outcome, process};
        let now = time::OffsetDateTime::now_utc();
        let now_us = (now.unix_timestamp_nanos() / 1000) as i64;
        for scenario in [Scenario::Stable, Scenario::Malformed] {
            for i in 0..24 {
                let p = plan(scenario, i, now);
                let got = process(p.text.as_bytes(), &Hl7Options::default(), now_us);
                assert_eq!(
                    got.code().as_str(),
                    p.expect,
                    "{scenario:?} {i}: {:?}",
                    got.outcome
                );
                if let Outcome::Accept { readings, skipped } = got.outcome {
                    assert_eq!((readings.len(), skipped), (6, 1));
                    let dump = format!("{readings:?}");
                    let pat = PATIENTS[i as usize % 3];
                    assert!(dump.contains(pat.mrn));
                    assert!(!dump.contains(pat.family) && !dump.contains(pat.birth_date));
                }
            }
        }
    }

    #[test]
    fn malformed_scenario_mixes_every_ack_code() {
        let now = time::OffsetDateTime::UNIX_EPOCH;
        let codes: Vec<&str> = (0..12)
            .map(|i| plan(Scenario::Malformed, i, now).expect)
            .collect();
        for c in ["AA", "AE", "AR"] {
            assert!(codes.contains(&c), "{codes:?}");
        }
        assert!((0..5).all(|i| plan(Scenario::Stable, i, now).expect == "AA"));
        let m = plan(Scenario::Stable, 0, now).text;
        assert!(m.starts_with("MSH|^~\\&|") && m.contains("\rPID|1||SIM-MRN-1001^^^VIGILSIM^MR|"));
        assert_eq!(
            ack_code("MSH|^~\\&|A\rMSA|AE|SIM000001|text\r"),
            Some(("AE".into(), "SIM000001".into()))
        );
    }
}
