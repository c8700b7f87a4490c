//! Dräger ventilator speaking MEDIBUS / MEDIBUS.X (slow data, ASCII) on a
//! serial port at 19200 8E1, as the device side.
//!
//! Written independently of the agent's codec (device-drivers) so tests
//! compare two readings of the protocol: framing and checksum are composed
//! here from the rules (`ESC|SOH code data CS CS CR`, CS = sum of all
//! preceding bytes mod 256 as two upper-case hex digits; sources listed in
//! `docs/protocols.md`).
//!
//! Behaviour:
//! - sends its own ICC (`ESC Q`) on start and its own NOP (`ESC 0`) every
//!   `--nop-interval-ms`, and reports on stdout whether the client answered
//!   them;
//! - answers ICC, device identification, NOP, STOP, current measured data
//!   codepage 1 (`ESC $`), anything else with an empty echo, and a command
//!   with a bad checksum with NAK (`SOH 0x15`);
//! - `--go-silent-after-s` stops all output (and input handling) as a pulled
//!   cable would, keeping the port open.
//!
//! With `--echo`, each data response is printed as
//! `DATA <code>=<4 value chars>|...` so tests can check the agent's readings
//! against exactly what was sent.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::masimo::Noise;

const ESC: u8 = 0x1B;
const SOH: u8 = 0x01;
const CR: u8 = 0x0D;
const NAK: u8 = 0x15;

/// Scenario played by the simulated ventilator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Volume-controlled ventilation of a stable adult: RR 12, VT ~500 mL,
    /// PIP ~20 mbar, PEEP 5 mbar, FiO2 40 %, etCO2 ~38 mmHg, SpO2 ~97 %.
    Stable,
    /// Obstruction over 120 s: PIP rises to ~38 mbar, VT falls to ~320 mL,
    /// etCO2 rises to ~60 mmHg, SpO2 falls to ~86 %, pulse rises; then holds.
    Deteriorating,
}

/// Options of `device-sim medibus`.
#[derive(Debug, Clone, clap::Args)]
pub struct MedibusArgs {
    /// Serial port (e.g. one end of a socat PTY pair).
    #[arg(long)]
    pub port: String,
    #[arg(long, value_enum, default_value = "stable")]
    pub scenario: Scenario,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Baud rate (MEDIBUS.X default 19200; older MEDIBUS devices 9600).
    #[arg(long, default_value_t = 19200)]
    pub baud: u32,
    /// Exit after answering this many data requests.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this many seconds.
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Stop sending and answering anything after this many seconds, as if
    /// the cable were pulled (the port stays open).
    #[arg(long)]
    pub go_silent_after_s: Option<f64>,
    /// Every Nth data response has no SpO2/pulse value (blank fields) and a
    /// dashed etCO2 ("----"); 0 = never.
    #[arg(long, default_value_t = 0)]
    pub missing_every: u64,
    /// Interval of the device's own NOP requests to the client.
    #[arg(long, default_value_t = 1500)]
    pub nop_interval_ms: u64,
    /// Print events and every data response to stdout.
    #[arg(long)]
    pub echo: bool,
}

/// Compose one message: start byte, code, body, checksum, CR.
pub fn message(start: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![start, code];
    m.extend_from_slice(body);
    let sum = m.iter().map(|&b| u32::from(b)).sum::<u32>() % 256;
    m.extend_from_slice(format!("{sum:02X}").as_bytes());
    m.push(CR);
    m
}

/// One value field: 4 characters, right-aligned, space padded.
fn field(v: f64, decimals: usize) -> String {
    let s = format!("{v:>4.decimals$}");
    debug_assert_eq!(s.len(), 4, "{s}");
    s
}

/// The codepage 1 records of data response number `k` (one per second).
/// Codes and units per the MEDIBUS.X codepage 1 list: 0xD6 RR 1/min, 0x88
/// VT mL, 0x7D PIP mbar, 0x73 Pmean mbar, 0x78 PEEP mbar, 0xF0 FiO2 %,
/// 0xE6 etCO2 mmHg, 0xEB SpO2 %, 0xE1 pulse 1/min, plus 0xB9 MV L/min,
/// which the agent does not map.
pub fn records(scenario: Scenario, k: u64, missing: bool, noise: &mut Noise) -> Vec<(u8, String)> {
    // Progress of the deterioration, 0..=1 over 120 s.
    let p = match scenario {
        Scenario::Stable => 0.0,
        Scenario::Deteriorating => (k.min(120) as f64) / 120.0,
    };
    let j = |noise: &mut Noise, amp: i64| noise.jitter(amp) as f64;
    let rr = 12.0;
    let vt = (500.0 - 180.0 * p + j(noise, 15)).round();
    let pip = (20.0 + 18.0 * p + j(noise, 1)).round();
    let pmean = 10.0 + 4.0 * p + j(noise, 5) / 10.0;
    let peep = 5.0;
    let fio2 = 40.0;
    let etco2 = (38.0 + 22.0 * p + j(noise, 2)).round();
    let spo2 = (97.0 - 11.0 * p + j(noise, 1)).round().min(100.0);
    let pulse = (72.0 + 38.0 * p + j(noise, 3)).round();
    let mv = rr * vt / 1000.0;
    let blank = "    ".to_string();
    vec![
        (0xD6, field(rr, 0)),
        (0x88, field(vt, 0)),
        (0x7D, field(pip, 0)),
        (0x73, field(pmean, 1)),
        (0x78, field(peep, 0)),
        (0xF0, field(fio2, 0)),
        (
            0xE6,
            if missing {
                "----".into()
            } else {
                field(etco2, 0)
            },
        ),
        (
            0xEB,
            if missing {
                blank.clone()
            } else {
                field(spo2, 0)
            },
        ),
        (0xE1, if missing { blank } else { field(pulse, 0) }),
        (0xB9, field(mv, 1)),
    ]
}

/// Split complete messages (start byte .. checksum, CR removed) off `buf`;
/// bytes before a start byte are discarded. Returns (message, checksum ok).
fn split_messages(buf: &mut Vec<u8>) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    loop {
        let Some(start) = buf.iter().position(|&b| b == ESC || b == SOH) else {
            buf.clear();
            return out;
        };
        buf.drain(..start);
        let Some(end) = buf.iter().position(|&b| b == CR) else {
            if buf.len() > 4096 {
                buf.clear();
            }
            return out;
        };
        let msg: Vec<u8> = buf.drain(..=end).take(end).collect();
        let ok = msg.len() >= 4 && {
            let (body, cs) = msg.split_at(msg.len() - 2);
            let sum = body.iter().map(|&b| u32::from(b)).sum::<u32>() % 256;
            format!("{sum:02X}").eq_ignore_ascii_case(std::str::from_utf8(cs).unwrap_or(""))
        };
        out.push((msg, ok));
    }
}

pub async fn run(args: MedibusArgs) -> anyhow::Result<()> {
    let mut port = device_drivers::medibus::SERIAL
        .with(&device_drivers::SerialOverrides {
            baud_rate: Some(args.baud),
            ..Default::default()
        })
        .open(&args.port)
        .with_context(|| format!("opening serial port {}", args.port))?;
    let mut stdout = tokio::io::stdout();
    let mut say = async |line: String| -> anyhow::Result<()> {
        if args.echo {
            stdout.write_all(line.as_bytes()).await?;
            stdout.write_all(b"\n").await?;
            stdout.flush().await?;
        }
        Ok(())
    };

    let start = Instant::now();
    let mut noise = Noise::new(args.seed);
    let mut answered = 0u64;
    let mut rx = Vec::new();
    let mut tmp = [0u8; 512];
    let nop_every = Duration::from_millis(args.nop_interval_ms.max(100));
    let mut last_nop = Instant::now();
    // The device announces itself with its own ICC.
    port.write_all(&message(ESC, b'Q', b"")).await?;
    let mut active = true;
    let mut silent = false;

    loop {
        let elapsed = start.elapsed().as_secs_f64();
        if args.duration_s.is_some_and(|d| elapsed >= d) {
            break;
        }
        if !silent && args.go_silent_after_s.is_some_and(|s| elapsed >= s) {
            silent = true;
            say("SILENT".into()).await?;
        }
        if silent {
            // Cable pulled: nothing in, nothing out.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if active && last_nop.elapsed() >= nop_every {
            last_nop = Instant::now();
            port.write_all(&message(ESC, b'0', b"")).await?;
        }
        let n = match tokio::time::timeout(Duration::from_millis(50), port.read(&mut tmp)).await {
            Err(_) => continue,
            Ok(r) => r.context("reading serial port")?,
        };
        if n == 0 {
            break;
        }
        rx.extend_from_slice(&tmp[..n]);
        for (msg, ok) in split_messages(&mut rx) {
            let (start_byte, code) = (msg[0], msg.get(1).copied().unwrap_or(0));
            if !ok {
                if start_byte == ESC {
                    port.write_all(&message(SOH, NAK, b"")).await?;
                }
                say("NAK".into()).await?;
                continue;
            }
            if start_byte == SOH {
                // The client's answer to one of our requests.
                match code {
                    b'Q' => say("ANSWERED ICC".into()).await?,
                    b'0' => say("ANSWERED NOP".into()).await?,
                    other => say(format!("ANSWERED {other:02X}")).await?,
                }
                continue;
            }
            match code {
                b'Q' => {
                    active = true;
                    port.write_all(&message(SOH, b'Q', b"")).await?;
                    say("ICC".into()).await?;
                }
                b'R' => {
                    port.write_all(&message(SOH, b'R', b"SIM1'Vigil MEDIBUS sim'01.00:06.00"))
                        .await?;
                    say("DEVICE_ID".into()).await?;
                }
                b'0' => port.write_all(&message(SOH, b'0', b"")).await?,
                b'U' => {
                    port.write_all(&message(SOH, b'U', b"")).await?;
                    active = false;
                    say("STOP".into()).await?;
                }
                b'$' => {
                    let missing =
                        args.missing_every > 0 && (answered + 1) % args.missing_every == 0;
                    let recs = records(args.scenario, answered, missing, &mut noise);
                    let mut body = Vec::new();
                    let mut line = String::from("DATA ");
                    for (code, value) in &recs {
                        body.extend_from_slice(format!("{code:02X}{value}").as_bytes());
                        line.push_str(&format!("{code:02X}={value}|"));
                    }
                    port.write_all(&message(SOH, b'$', &body)).await?;
                    answered += 1;
                    say(line).await?;
                    if args.count.is_some_and(|c| answered >= c) {
                        port.flush().await?;
                        return Ok(());
                    }
                }
                other => port.write_all(&message(SOH, other, b"")).await?,
            }
        }
    }
    port.flush().await?;
    tracing::info!(answered, "medibus sim done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use device_drivers::medibus::{Frame, MedibusDecoder, Value, parse_measured};

    #[test]
    fn composes_the_documented_bytes() {
        // ESC 'Q': 0x1B + 0x51 = 0x6C.
        assert_eq!(message(ESC, b'Q', b""), b"\x1bQ6C\r");
        // SOH '0': 0x01 + 0x30 = 0x31.
        assert_eq!(
            message(SOH, b'0', b""),
            b"\x010".iter().copied().chain(*b"31\r").collect::<Vec<_>>()
        );
    }

    /// Cross-check: every data response of every scenario decodes with the
    /// agent's independent codec to the same values.
    #[test]
    fn agent_codec_reads_every_scenario() {
        for scenario in [Scenario::Stable, Scenario::Deteriorating] {
            let mut noise = Noise::new(3);
            let mut dec = MedibusDecoder::new();
            for k in 0..200 {
                let recs = records(scenario, k, k % 7 == 6, &mut noise);
                let mut body = Vec::new();
                for (code, value) in &recs {
                    body.extend_from_slice(format!("{code:02X}{value}").as_bytes());
                }
                let mut buf = BytesMut::from(&message(SOH, b'$', &body)[..]);
                let Frame::Response { code, data } = dec.decode(&mut buf).unwrap().unwrap() else {
                    panic!("not a response");
                };
                assert_eq!(code, b'$');
                let parsed = parse_measured(&data).unwrap();
                for (p, (code, value)) in parsed.iter().zip(&recs) {
                    assert_eq!(p.code, *code);
                    match value.trim().parse::<f64>() {
                        Ok(v) => assert_eq!(p.value, Value::Number(v)),
                        Err(_) => assert_eq!(p.value, Value::Missing),
                    }
                }
            }
        }
    }

    #[test]
    fn deterioration_is_visible() {
        let mut noise = Noise::new(1);
        let first = records(Scenario::Deteriorating, 0, false, &mut noise);
        let last = records(Scenario::Deteriorating, 120, false, &mut noise);
        let get = |r: &[(u8, String)], c: u8| -> f64 {
            r.iter()
                .find(|(k, _)| *k == c)
                .unwrap()
                .1
                .trim()
                .parse()
                .unwrap()
        };
        assert!(get(&last, 0x7D) > get(&first, 0x7D) + 10.0);
        assert!(get(&last, 0xEB) < 90.0);
    }
}
