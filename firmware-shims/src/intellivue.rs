//! Philips IntelliVue MP-series monitor, Data Export over MIB/RS232
//! (115200 8N1), as the monitor plays it: answers the Association Request,
//! sends the MDS Create Event Report, answers Extended Poll Data Requests
//! for numerics, answers a Release Request.
//!
//! Reference: Philips "Data Export Interface Programming Guide, IntelliVue
//! X2, MP Series & MX Series", §3 "Protocol Dialog", §5 message layouts.
//!
//! The serial framing/FCS layer is shared with the driver
//! (`device_drivers::intellivue::codec::SerialFraming`); every message the
//! monitor sends is composed here, byte by byte, from the Guide's layouts,
//! and requests are recognised at their fixed offsets, independently of the
//! driver's message parser.
//!
//! With `--echo`, each value sent is printed to stdout as one line:
//! `VALUE poll=<n> physio=0x4182 state=0x0000 unit=0x0AA0 mantissa=72 exponent=0 special=-`
//! (`special` is `NaN`, `NRes`, `+INF`, `-INF` or `-`).

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use device_drivers::intellivue::codec::{Framing, SerialFraming};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Physiological scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Healthy adult: HR ~72, SpO2 ~97 %, RR ~15, NIBP ~120/80 (93),
    /// Temp ~37.0 °C, etCO2 ~38 mmHg.
    Stable,
    /// Septic deterioration over 120 polls: HR to ~130, SpO2 to ~86 %, RR to
    /// ~30, NIBP falling to ~85/50, Temp to ~38.9 °C, etCO2 to ~28 mmHg.
    Deteriorating,
    /// Stable values with device states: every 3rd poll SpO2 is UNAVAILABLE
    /// (NaN), the pleth pulse is INVALID (value sent, flagged) and Temp is
    /// +INF; every 3rd poll (offset 1) etCO2 is CALIBRATION_ONGOING (NRes).
    Artefacts,
}

// MDC term codes (partition 2) and units (partition 4) sent by the monitor
// (Guide §"Physiological Identifiers", §"Units of Measurement").
const HR: u16 = 0x4182; // NOM_ECG_CARD_BEAT_RATE
const PLETH_PR: u16 = 0x4822; // NOM_PLETH_PULS_RATE
const SPO2: u16 = 0x4BB8; // NOM_PULS_OXIM_SAT_O2
const RESP: u16 = 0x500A; // NOM_RESP_RATE
const NIBP: u16 = 0x4A04; // NOM_PRESS_BLD_NONINV (compound object)
const NIBP_SYS: u16 = 0x4A05;
const NIBP_DIA: u16 = 0x4A06;
const NIBP_MEAN: u16 = 0x4A07;
const TEMP: u16 = 0x4B48; // NOM_TEMP
const ETCO2: u16 = 0x50B0; // NOM_AWAY_CO2_ET
const DIM_BPM: u16 = 0x0AA0;
const DIM_PERCENT: u16 = 0x0220;
const DIM_RESP: u16 = 0x0AE0;
const DIM_MMHG: u16 = 0x0F20;
const DIM_DEGC: u16 = 0x17A0;

// MeasurementState bits (Guide §"MeasurementState").
const ST_INVALID: u16 = 0x8000;
const ST_UNAVAILABLE: u16 = 0x2000;
const ST_CALIBRATION: u16 = 0x1000;

/// One value as sent: a FLOAT-Type either as mantissa × 10^exponent or a
/// reserved special value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Float {
    Num {
        mantissa: i32,
        exponent: i8,
    },
    NaN,
    NRes,
    PosInf,
    /// Part of the FLOAT-Type set; no scenario sends it yet.
    #[allow(dead_code)]
    NegInf,
}

impl Float {
    fn int(v: i64) -> Self {
        Float::Num {
            mantissa: v as i32,
            exponent: 0,
        }
    }
    /// Guide §"FLOAT-Type": exponent in the top byte, 24-bit mantissa;
    /// special values 0x007FFFFF (NaN), 0x00800000 (NRes), 0x007FFFFE
    /// (+INF), 0x00800002 (-INF).
    fn bits(self) -> u32 {
        match self {
            Float::Num { mantissa, exponent } => {
                ((exponent as u8 as u32) << 24) | (mantissa as u32 & 0x00FF_FFFF)
            }
            Float::NaN => 0x007F_FFFF,
            Float::NRes => 0x0080_0000,
            Float::PosInf => 0x007F_FFFE,
            Float::NegInf => 0x0080_0002,
        }
    }
}

/// One numeric observed value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Value {
    pub physio: u16,
    pub state: u16,
    pub unit: u16,
    pub value: Float,
}

/// A polled object: a handle and its values (one = NOM_ATTR_NU_VAL_OBS,
/// several = NOM_ATTR_NU_CMPD_VAL_OBS).
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub handle: u16,
    pub physio: u16,
    pub values: Vec<Value>,
}

/// Deterministic noise (SplitMix64).
#[derive(Debug, Clone)]
pub struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn jitter(&mut self, amp: i64) -> i64 {
        (self.next() % (2 * amp as u64 + 1)) as i64 - amp
    }
}

fn v(physio: u16, unit: u16, value: Float) -> Value {
    Value {
        physio,
        state: 0,
        unit,
        value,
    }
}

/// The objects the monitor reports at poll `t` (0-based).
pub fn sample(scenario: Scenario, t: u64, noise: &mut Noise) -> Vec<Object> {
    // Deterioration progress 0..=120 (0 for the other scenarios).
    let p = if scenario == Scenario::Deteriorating {
        t.min(120) as i64
    } else {
        0
    };
    let lerp = |from: i64, to: i64| from + (to - from) * p / 120;
    let hr = lerp(72, 130) + noise.jitter(2);
    let pr = hr - 1 + noise.jitter(1);
    let spo2 = (lerp(97, 86) + noise.jitter(1)).min(100);
    let rr = lerp(15, 30) + noise.jitter(1);
    let sys = lerp(120, 85) + noise.jitter(3);
    let dia = lerp(80, 50) + noise.jitter(2);
    let mean = (sys + 2 * dia) / 3;
    let temp_tenths = lerp(370, 389) + noise.jitter(1);
    let etco2 = lerp(38, 28) + noise.jitter(1);
    let mut objs = vec![
        Object {
            handle: 1,
            physio: HR,
            values: vec![v(HR, DIM_BPM, Float::int(hr))],
        },
        Object {
            handle: 2,
            physio: PLETH_PR,
            values: vec![v(PLETH_PR, DIM_BPM, Float::int(pr))],
        },
        Object {
            handle: 3,
            physio: SPO2,
            values: vec![v(SPO2, DIM_PERCENT, Float::int(spo2))],
        },
        Object {
            handle: 4,
            physio: RESP,
            values: vec![v(RESP, DIM_RESP, Float::int(rr))],
        },
        Object {
            handle: 5,
            physio: NIBP,
            values: vec![
                v(NIBP_SYS, DIM_MMHG, Float::int(sys)),
                v(NIBP_DIA, DIM_MMHG, Float::int(dia)),
                v(NIBP_MEAN, DIM_MMHG, Float::int(mean)),
            ],
        },
        Object {
            handle: 6,
            physio: TEMP,
            values: vec![v(
                TEMP,
                DIM_DEGC,
                Float::Num {
                    mantissa: temp_tenths as i32,
                    exponent: -1,
                },
            )],
        },
        Object {
            handle: 7,
            physio: ETCO2,
            values: vec![v(ETCO2, DIM_MMHG, Float::int(etco2))],
        },
    ];
    if scenario == Scenario::Artefacts {
        if t % 3 == 2 {
            objs[2].values[0].state = ST_UNAVAILABLE;
            objs[2].values[0].value = Float::NaN;
            objs[1].values[0].state = ST_INVALID;
            objs[5].values[0].value = Float::PosInf;
        } else if t % 3 == 1 {
            objs[6].values[0].state = ST_CALIBRATION;
            objs[6].values[0].value = Float::NRes;
        }
    }
    objs
}

fn be16(out: &mut Vec<u8>, x: u16) {
    out.extend_from_slice(&x.to_be_bytes());
}
fn be32(out: &mut Vec<u8>, x: u32) {
    out.extend_from_slice(&x.to_be_bytes());
}

/// SPpdu (session_id 0xE100, p_context_id 2) + ROapdus + RO header.
fn data_msg(ro_type: u16, invoke_id: u16, cmd: u16, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    be16(&mut m, 0xE100);
    be16(&mut m, 2);
    be16(&mut m, ro_type);
    be16(&mut m, body.len() as u16 + 6);
    be16(&mut m, invoke_id);
    be16(&mut m, cmd);
    be16(&mut m, body.len() as u16);
    m.extend_from_slice(body);
    m
}

/// Association Result (AC_SPDU 0x0E), Guide §5 "Association Response
/// Message": session data, presentation header (AARE), the monitor's
/// MDSEUserInfoStd (system_type SYST_SERVER), presentation trailer. The
/// presentation bytes follow the request's structure; the driver checks the
/// SPDU type only.
fn association_result() -> Vec<u8> {
    let mut ui = Vec::new();
    be32(&mut ui, 0x8000_0000); // MDDL_VERSION1
    be32(&mut ui, 0x4000_0000); // NOMEN_VERSION
    be32(&mut ui, 0); // functional units
    be32(&mut ui, 0x0080_0000); // SYST_SERVER
    be32(&mut ui, 0x2000_0000); // HOT_START
    be32(&mut ui, 0); // option_list: empty
    be32(&mut ui, 0); // supported_aprofiles: empty (simplified)
    let mut pres = vec![
        0x61, 0x80, 0x30, 0x80, 0x02, 0x01, 0x01, 0xA0, 0x80, 0x61, 0x80, 0xA1, 0x80, 0x06, 0x0C,
        0x2A, 0x86, 0x48, 0xCE, 0x14, 0x02, 0x01, 0x00, 0x00, 0x00, 0x03, 0x01, 0x00, 0x00, 0xA2,
        0x03, 0x02, 0x01, 0x00, 0xBE, 0x80, 0x28, 0x80, 0x02, 0x01, 0x02, 0x81,
    ];
    pres.push(ui.len() as u8);
    pres.extend_from_slice(&ui);
    pres.extend_from_slice(&[0; 16]);
    let mut body = vec![
        0x05, 0x08, 0x13, 0x01, 0x00, 0x16, 0x01, 0x02, 0x80, 0x00, 0x14, 0x02, 0x00, 0x02,
    ];
    body.push(0xC1);
    body.push(pres.len() as u8);
    body.extend_from_slice(&pres);
    let mut m = vec![0x0E];
    if body.len() < 255 {
        m.push(body.len() as u8);
    } else {
        m.push(0xFF);
        be16(&mut m, body.len() as u16);
    }
    m.extend_from_slice(&body);
    m
}

/// Release Result (DN_SPDU 0x0A), Guide §5 "Association Release Result".
fn release_result() -> Vec<u8> {
    let mut m = vec![0x0A, 0x18, 0xC1, 0x16];
    m.extend_from_slice(&[
        0x61, 0x80, 0x30, 0x80, 0x02, 0x01, 0x01, 0xA0, 0x80, 0x63, 0x80, 0x80, 0x01, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ]);
    m
}

/// AbsoluteTime: 8 BCD bytes.
fn abs_time(t: OffsetDateTime) -> [u8; 8] {
    let bcd = |x: u32| -> u8 { (((x / 10) % 10) << 4 | (x % 10)) as u8 };
    let y = t.year() as u32;
    [
        bcd(y / 100),
        bcd(y % 100),
        bcd(u8::from(t.month()) as u32),
        bcd(t.day() as u32),
        bcd(t.hour() as u32),
        bcd(t.minute() as u32),
        bcd(t.second() as u32),
        bcd(t.millisecond() as u32 / 10),
    ]
}

/// MDS Create Event Report (ROIV, CMD_CONFIRMED_EVENT_REPORT,
/// NOM_NOTI_MDS_CREAT) with a small MDS attribute list.
fn mds_create_event(rel_time: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    // NOM_ATTR_SYS_TYPE (0x0986): TYPE {NOM_PART_OBJ, NOM_MOC_VMS_MDS_... }
    be16(&mut attrs, 0x0986);
    be16(&mut attrs, 4);
    be16(&mut attrs, 1);
    be16(&mut attrs, 0x1000);
    let mut info = Vec::new();
    be16(&mut info, 0x0021); // NOM_MOC_VMS_MDS
    be16(&mut info, 0);
    be16(&mut info, 0);
    be16(&mut info, 1); // attribute count
    be16(&mut info, attrs.len() as u16);
    info.extend_from_slice(&attrs);
    let mut body = Vec::new();
    be16(&mut body, 0x0021); // managed object: MDS, context 0, handle 0
    be16(&mut body, 0);
    be16(&mut body, 0);
    be32(&mut body, rel_time);
    be16(&mut body, 0x0D06); // NOM_NOTI_MDS_CREAT
    be16(&mut body, info.len() as u16);
    body.extend_from_slice(&info);
    data_msg(1, 1, 1, &body)
}

/// Extended poll result (RORS, CMD_CONFIRMED_ACTION, ActionResult with
/// NOM_ACT_POLL_MDIB_DATA_EXT and PollMdibDataReplyExt).
fn poll_result(
    invoke_id: u16,
    poll_number: u16,
    rel_time: u32,
    abs: [u8; 8],
    objs: &[Object],
) -> Vec<u8> {
    let mut obs = Vec::new();
    for o in objs {
        be16(&mut obs, o.handle);
        let mut attrs = Vec::new();
        if o.values.len() == 1 {
            be16(&mut attrs, 0x0950); // NOM_ATTR_NU_VAL_OBS
            be16(&mut attrs, 10);
        } else {
            be16(&mut attrs, 0x094B); // NOM_ATTR_NU_CMPD_VAL_OBS
            be16(&mut attrs, 4 + 10 * o.values.len() as u16);
            be16(&mut attrs, o.values.len() as u16);
            be16(&mut attrs, 10 * o.values.len() as u16);
        }
        for val in &o.values {
            be16(&mut attrs, val.physio);
            be16(&mut attrs, val.state);
            be16(&mut attrs, val.unit);
            be32(&mut attrs, val.value.bits());
        }
        be16(&mut obs, 1); // one attribute
        be16(&mut obs, attrs.len() as u16);
        obs.extend_from_slice(&attrs);
    }
    let mut ctx = Vec::new();
    be16(&mut ctx, 0); // context id
    be16(&mut ctx, objs.len() as u16);
    be16(&mut ctx, obs.len() as u16);
    ctx.extend_from_slice(&obs);
    let mut reply = Vec::new();
    be16(&mut reply, poll_number);
    be16(&mut reply, 0); // sequence_no
    be32(&mut reply, rel_time);
    reply.extend_from_slice(&abs);
    be16(&mut reply, 1); // NOM_PART_OBJ
    be16(&mut reply, 6); // NOM_MOC_VMO_METRIC_NU
    be16(&mut reply, 0); // polled_attr_grp
    be16(&mut reply, 1); // one SingleContextPoll
    be16(&mut reply, ctx.len() as u16);
    reply.extend_from_slice(&ctx);
    let mut body = Vec::new();
    be16(&mut body, 0x0021);
    be16(&mut body, 0);
    be16(&mut body, 0);
    be16(&mut body, 0xF13B);
    be16(&mut body, reply.len() as u16);
    body.extend_from_slice(&reply);
    data_msg(2, invoke_id, 7, &body)
}

fn echo_line(poll: u16, val: &Value) -> String {
    let (m, e, special) = match val.value {
        Float::Num { mantissa, exponent } => (mantissa, exponent, "-"),
        Float::NaN => (0, 0, "NaN"),
        Float::NRes => (0, 0, "NRes"),
        Float::PosInf => (0, 0, "+INF"),
        Float::NegInf => (0, 0, "-INF"),
    };
    format!(
        "VALUE poll={poll} physio=0x{:04X} state=0x{:04X} unit=0x{:04X} mantissa={m} exponent={e} special={special}\n",
        val.physio, val.state, val.unit
    )
}

/// What a client request is, read at the Guide's fixed offsets.
#[derive(Debug, PartialEq)]
enum Request {
    Associate,
    Release,
    Abort,
    MdsCreateResult,
    Poll { invoke_id: u16, poll_number: u16 },
    Other,
}

fn classify(m: &[u8]) -> Request {
    let u16at = |i: usize| m.get(i..i + 2).map(|s| u16::from_be_bytes([s[0], s[1]]));
    match m.first() {
        Some(0x0D) => return Request::Associate,
        Some(0x09) => return Request::Release,
        Some(0x19) => return Request::Abort,
        _ => {}
    }
    if u16at(0) != Some(0xE100) {
        return Request::Other;
    }
    // ROapdus.ro_type @4, ROIVapdu: invoke_id @8, command_type @10; the
    // ActionArgument starts @14: managed object (6), scope (4), action_type
    // @24, length @26, PollMdibDataReqExt.poll_number @28.
    match (u16at(4), u16at(10)) {
        (Some(1), Some(7)) if u16at(24) == Some(0xF13B) => match (u16at(8), u16at(28)) {
            (Some(invoke_id), Some(poll_number)) => Request::Poll {
                invoke_id,
                poll_number,
            },
            _ => Request::Other,
        },
        (Some(2), Some(1)) => Request::MdsCreateResult,
        _ => Request::Other,
    }
}

/// Options of `device-sim intellivue`.
#[derive(Debug, Clone, clap::Args)]
pub struct IntellivueArgs {
    /// Serial port (e.g. one end of a socat PTY pair).
    #[arg(long)]
    pub port: String,
    #[arg(long, value_enum, default_value = "stable")]
    pub scenario: Scenario,
    /// Exit after answering this many polls (default: run until killed).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop answering anything after this many seconds (simulates a pulled
    /// cable while the port stays open).
    #[arg(long)]
    pub go_silent_after_s: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Monitor clock offset from UTC in minutes (its time stamps carry no
    /// zone).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub clock_offset_minutes: i32,
    /// Print every value sent to stdout (one `VALUE ...` line each).
    #[arg(long)]
    pub echo: bool,
}

pub async fn run(args: IntellivueArgs) -> anyhow::Result<()> {
    let mut port = device_drivers::intellivue::SERIAL
        .open(&args.port)
        .with_context(|| format!("opening serial port {}", args.port))?;
    let offset = time::UtcOffset::from_whole_seconds(args.clock_offset_minutes * 60)
        .context("--clock-offset-minutes out of range")?;
    let start = Instant::now();
    let silent_at = args
        .go_silent_after_s
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let rel_time = || (start.elapsed().as_micros() / 125) as u32; // 1/8 ms ticks
    let mut noise = Noise(args.seed);
    let mut framing = SerialFraming;
    let mut buf = BytesMut::with_capacity(4096);
    let mut stdout = tokio::io::stdout();
    let mut associated = false;
    let mut answered = 0u64;
    loop {
        let n = port.read_buf(&mut buf).await.context("reading port")?;
        if n == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if silent_at.is_some_and(|t| Instant::now() >= t) {
            // Cable "pulled": swallow everything, answer nothing.
            buf.clear();
            continue;
        }
        loop {
            let msg = match framing.decode(&mut buf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "intellivue sim: bad frame from client");
                    continue;
                }
            };
            let mut out = BytesMut::new();
            match classify(&msg) {
                Request::Associate => {
                    framing.encode(&association_result(), &mut out);
                    framing.encode(&mds_create_event(rel_time()), &mut out);
                    associated = true;
                    tracing::info!("intellivue sim: associated");
                }
                Request::Release => {
                    framing.encode(&release_result(), &mut out);
                    associated = false;
                    tracing::info!("intellivue sim: released");
                }
                Request::Abort => associated = false,
                Request::MdsCreateResult => {}
                Request::Poll {
                    invoke_id,
                    poll_number,
                } if associated => {
                    let objs = sample(args.scenario, answered, &mut noise);
                    let now = OffsetDateTime::now_utc().to_offset(offset);
                    framing.encode(
                        &poll_result(invoke_id, poll_number, rel_time(), abs_time(now), &objs),
                        &mut out,
                    );
                    if args.echo {
                        let mut text = String::new();
                        for o in &objs {
                            for val in &o.values {
                                text.push_str(&echo_line(poll_number, val));
                            }
                        }
                        stdout.write_all(text.as_bytes()).await?;
                        stdout.flush().await?;
                    }
                    answered += 1;
                }
                Request::Poll { .. } | Request::Other => {}
            }
            if !out.is_empty() {
                port.write_all(&out).await.context("writing port")?;
                port.flush().await?;
            }
            if args.count.is_some_and(|c| answered >= c) {
                tracing::info!(polls = answered, "intellivue sim done");
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_reads_a_poll_request_at_fixed_offsets() {
        // Guide §5 "Poll Data Request Extended", invoke 0x0102, poll 7.
        let m = [
            0xE1, 0x00, 0x00, 0x02, 0x00, 0x01, 0x00, 0x20, 0x01, 0x02, 0x00, 0x07, 0x00, 0x1A,
            0x00, 0x21, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xF1, 0x3B, 0x00, 0x0C,
            0x00, 0x07, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(
            classify(&m),
            Request::Poll {
                invoke_id: 0x0102,
                poll_number: 7
            }
        );
        assert_eq!(classify(&[0x0D, 0x00]), Request::Associate);
        assert_eq!(classify(&[]), Request::Other);
    }

    #[test]
    fn float_bits() {
        assert_eq!(
            Float::Num {
                mantissa: 373,
                exponent: -1
            }
            .bits(),
            0xFF00_0175
        );
        assert_eq!(Float::NaN.bits(), 0x007F_FFFF);
    }

    /// The value of `physio` in a sample, as a number.
    fn num(s: &[Object], physio: u16) -> f64 {
        let v = s
            .iter()
            .flat_map(|o| &o.values)
            .find(|v| v.physio == physio)
            .unwrap();
        match v.value {
            Float::Num { mantissa, exponent } => f64::from(mantissa) * 10f64.powi(exponent.into()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deteriorating_drifts_from_normal_to_news2_high_and_holds() {
        // The demo's deteriorating patient: every poll moves 1/120 of the
        // way; at the start each vital scores 0 on the NEWS2 chart, at the
        // end RR >= 25, SpO2 <= 91 and systolic <= 90 each score 3 (high).
        let mut n = Noise(7);
        let start = sample(Scenario::Deteriorating, 0, &mut n);
        assert!((12.0..=20.0).contains(&num(&start, RESP)));
        assert!(num(&start, SPO2) >= 96.0);
        assert!((111.0..=219.0).contains(&num(&start, NIBP_SYS)));
        assert!((51.0..=90.0).contains(&num(&start, HR)));
        let mid = sample(Scenario::Deteriorating, 60, &mut n);
        let end = sample(Scenario::Deteriorating, 120, &mut n);
        for (code, rising) in [(RESP, true), (SPO2, false), (NIBP_SYS, false), (HR, true)] {
            let (a, b, c) = (num(&start, code), num(&mid, code), num(&end, code));
            let ordered = if rising {
                a < b && b < c
            } else {
                a > b && b > c
            };
            assert!(ordered, "{code:#x}: {a} {b} {c}");
        }
        assert!(num(&end, RESP) >= 25.0);
        assert!(num(&end, SPO2) <= 91.0);
        assert!(num(&end, NIBP_SYS) <= 90.0);
        assert!(num(&end, TEMP) >= 38.1);
        // Then it holds (within the noise).
        let later = sample(Scenario::Deteriorating, 10_000, &mut n);
        assert!((num(&later, RESP) - 30.0).abs() <= 1.0);
        assert!((num(&later, NIBP_SYS) - 85.0).abs() <= 3.0);
    }

    #[test]
    fn artefacts_scenario_has_device_states() {
        let mut n = Noise(1);
        let s = sample(Scenario::Artefacts, 2, &mut n);
        assert_eq!(s[2].values[0].state, ST_UNAVAILABLE);
        assert_eq!(s[2].values[0].value, Float::NaN);
    }
}
