//! GE Datex-Ohmeda S/5 monitor, "Computer Interface" (Datex Record
//! Interface) on the serial port, as the monitor plays it: 19200 8E1 with
//! RTS/CTS; waits for a physiological-data transmission request, then sends
//! one displayed-values record every requested interval until asked to stop
//! (interval 0).
//!
//! The record layout is composed here from this file's own offset table
//! (the `datex_hdr` and `basic_phdb` declarations as restated publicly, see
//! `device_drivers::datex::codec` for the sources); only the asynchronous
//! framing (flags, escaping, checksum) is shared with the driver's codec.

use std::time::Duration;

use bytes::BytesMut;
use device_drivers::datex::codec::{DatexDecoder, frame};

use crate::masimo::Noise;

/// Reserved values of the interface (`DATA_INVALID`, `DATA_NOT_UPDATED`).
pub const DATA_INVALID: i16 = -32767;
pub const DATA_NOT_UPDATED: i16 = -32766;

/// Group status: bit 0 module exists, bit 1 measurement active.
const EXISTS_ACTIVE: u32 = 0b11;
/// ECG status bits 3-6: heart-rate source, 1 = ECG.
const HR_SOURCE_ECG: u32 = 1 << 3;
/// Temperature labels: 1 = ESO (oesophageal), 7 = SKIN.
const TEMP_LABEL_ESO: u16 = 1;
const TEMP_LABEL_SKIN: u16 = 7;

/// Byte offsets inside the 270-byte basic class: each group is a 6-byte
/// header (u32 status, u16 label) followed by its int16 fields.
mod at {
    pub const ECG: usize = 0; // hr st1 st2 st3 imp_rr
    pub const P1: usize = 16; // sys dia mean hr (p2..p4 follow, 14 bytes each)
    pub const NIBP: usize = 72; // sys dia mean hr
    pub const T1: usize = 86; // temp (t2..t4 follow, 8 bytes each)
    pub const T2: usize = 94;
    pub const SPO2: usize = 118; // SpO2 pr ir_amp SvO2
    pub const CO2: usize = 132; // et fi rr amb_press
}

/// Physiological scenario played by the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Stable adult under anaesthesia: HR ~72, NIBP ~120/80, T ~36.8 °C
    /// (oesophageal), SpO2 ~97 %, EtCO2 ~5.1 %, RR ~12.
    Stable,
    /// Over 60 records: SpO2 falls to ~85 %, HR rises to ~120, NIBP falls to
    /// ~85/50, EtCO2 rises to ~7 %, RR rises to ~28; then holds.
    Deteriorating,
}

/// The values of one record, in the interface's raw units (int16; 0.01
/// scaling where the interface uses it), reserved values included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Values {
    pub hr: i16,
    pub sys: i16,
    pub dia: i16,
    pub mean: i16,
    /// T1 (ESO), 0.01 °C.
    pub t1: i16,
    /// T2 (SKIN), 0.01 °C: not a body temperature.
    pub t2: i16,
    pub spo2: i16,
    pub pr: i16,
    /// EtCO2 in 0.01 % (volume fraction).
    pub et: i16,
    pub rr: i16,
    /// Ambient pressure, 0.1 mmHg.
    pub amb: i16,
}

fn j(noise: &mut Noise, base: i64, amp: i64) -> i16 {
    (base + noise.jitter(amp)) as i16
}

/// The values of record `n`. Every 4th record has the SpO2 probe off
/// (SpO2 and pulse rate `DATA_INVALID`); every 6th has EtCO2
/// `DATA_NOT_UPDATED`.
pub fn values(scenario: Scenario, n: u64, noise: &mut Noise) -> Values {
    // Deterioration progress 0..=60 (per mille of the way).
    let k = match scenario {
        Scenario::Stable => 0,
        Scenario::Deteriorating => n.min(60) as i64,
    };
    let lerp = |a: i64, b: i64| a + (b - a) * k / 60;
    let hr = j(noise, lerp(72, 120), 2);
    let mut v = Values {
        hr,
        sys: j(noise, lerp(120, 85), 2) * 100,
        dia: j(noise, lerp(80, 50), 2) * 100,
        mean: 0,
        t1: j(noise, lerp(3680, 3720), 5),
        t2: j(noise, 3300, 10),
        spo2: j(noise, lerp(97, 85), 1) * 100,
        pr: hr - 1,
        et: j(noise, lerp(510, 700), 10),
        rr: j(noise, lerp(12, 28), 1),
        amb: 7600,
    };
    v.mean = ((i32::from(v.sys) + 2 * i32::from(v.dia)) / 300 * 100) as i16;
    if n % 4 == 3 {
        v.spo2 = DATA_INVALID;
        v.pr = DATA_INVALID;
    }
    if n % 6 == 5 {
        v.et = DATA_NOT_UPDATED;
    }
    v
}

fn put_group(b: &mut [u8], at: usize, status: u32, label: u16, fields: &[i16]) {
    b[at..at + 4].copy_from_slice(&status.to_le_bytes());
    b[at + 4..at + 6].copy_from_slice(&label.to_le_bytes());
    for (i, f) in fields.iter().enumerate() {
        let o = at + 6 + 2 * i;
        b[o..o + 2].copy_from_slice(&f.to_le_bytes());
    }
}

/// One displayed-values record: 40-byte header, then one 278-byte
/// `dri_phdb` sub-record (time, basic class, marker, reserved,
/// cl_drilvl_subt) at offset 0.
pub fn record(time: u32, nbr: u8, dri_level: u8, v: &Values) -> Vec<u8> {
    let mut basic = [0u8; 270];
    put_group(
        &mut basic,
        at::ECG,
        EXISTS_ACTIVE | HR_SOURCE_ECG,
        0x0002, // channel 1 = lead II
        &[v.hr, 0, 0, 0, v.rr],
    );
    // Invasive pressure channel 1: no module (status 0), so not reported.
    put_group(&mut basic, at::P1, 0, 0, &[0, 0, 0, 0]);
    put_group(
        &mut basic,
        at::NIBP,
        EXISTS_ACTIVE,
        3, // adult cuff
        &[v.sys, v.dia, v.mean, v.hr],
    );
    put_group(&mut basic, at::T1, EXISTS_ACTIVE, TEMP_LABEL_ESO, &[v.t1]);
    put_group(&mut basic, at::T2, EXISTS_ACTIVE, TEMP_LABEL_SKIN, &[v.t2]);
    put_group(
        &mut basic,
        at::SPO2,
        EXISTS_ACTIVE,
        0,
        &[v.spo2, v.pr, 0, 0],
    );
    put_group(
        &mut basic,
        at::CO2,
        EXISTS_ACTIVE,
        1, // respiration rate source: CO2
        &[v.et, 0, v.rr, v.amb],
    );

    let mut sub = Vec::with_capacity(278);
    sub.extend_from_slice(&time.to_le_bytes());
    sub.extend_from_slice(&basic);
    sub.push(0); // marker
    sub.push(0); // reserved
    // cl_drilvl_subt: class 0 (basic) in bits 8-11, subtype displayed (1).
    sub.extend_from_slice(&1u16.to_le_bytes());

    let r_len = (40 + sub.len()) as i16;
    let mut rec = Vec::with_capacity(r_len as usize);
    rec.extend_from_slice(&r_len.to_le_bytes()); // r_len
    rec.push(nbr); // r_nbr
    rec.push(dri_level); // dri_level
    rec.extend_from_slice(&0u16.to_le_bytes()); // plug_id
    rec.extend_from_slice(&time.to_le_bytes()); // r_time
    rec.extend_from_slice(&[0, 0, 0, 0]); // reserved
    rec.extend_from_slice(&0i16.to_le_bytes()); // r_maintype = DRI_MT_PHDB
    // sr_desc[0] = (offset 0, type 1 = DRI_PH_DISPL); sr_desc[1] = end.
    rec.extend_from_slice(&[0, 0, 1, 0, 0, 0xFF]);
    rec.extend_from_slice(&[0; 18]); // sr_desc[2..8]
    debug_assert_eq!(rec.len(), 40);
    rec.extend_from_slice(&sub);
    rec
}

/// A transmission request as the monitor reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub dri_level: u8,
    pub record_type: u8,
    pub interval_s: i16,
    pub class_bf: u32,
}

/// Read a physiological-data request out of a deframed record (header
/// bytes 0-39, request sub-record from byte 40).
pub fn parse_request(rec: &[u8]) -> Option<Request> {
    if rec.len() < 49 || i16::from_le_bytes([rec[14], rec[15]]) != 0 {
        return None;
    }
    Some(Request {
        dri_level: rec[3],
        record_type: rec[40],
        interval_s: i16::from_le_bytes([rec[41], rec[42]]),
        class_bf: u32::from_le_bytes([rec[43], rec[44], rec[45], rec[46]]),
    })
}

/// Options of `device-sim datex`.
#[derive(Debug, Clone, clap::Args)]
pub struct DatexArgs {
    /// Serial port to use (e.g. one end of a socat PTY pair).
    #[arg(long)]
    pub port: String,
    #[arg(long, value_enum, default_value = "stable")]
    pub scenario: Scenario,
    /// Send records at this interval instead of the requested one (tests);
    /// the real monitor uses the request's interval in seconds.
    #[arg(long)]
    pub interval_ms: Option<u64>,
    /// Exit after sending this many records.
    #[arg(long)]
    pub count: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stop sending anything this many seconds after start, as if the cable
    /// were pulled (the process keeps the port open).
    #[arg(long)]
    pub go_silent_after_s: Option<f64>,
    /// Print every record's raw values to stdout, one line each.
    #[arg(long)]
    pub echo: bool,
}

pub async fn run(args: DatexArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut port = device_drivers::datex::SERIAL
        .open(&args.port)
        .with_context(|| format!("opening serial port {}", args.port))?;
    let start = tokio::time::Instant::now();
    let silent_at = args
        .go_silent_after_s
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let mut noise = Noise::new(args.seed);
    let mut stdout = tokio::io::stdout();
    let mut dec = DatexDecoder::new();
    let mut rx = BytesMut::with_capacity(1024);
    let mut chunk = [0u8; 512];
    // Streaming state: interval and level from the last request.
    let mut stream: Option<(Duration, u8)> = None;
    let mut next_send = tokio::time::Instant::now();
    let mut sent = 0u64;
    tracing::info!(port = %args.port, "datex sim ready");
    loop {
        let silent = silent_at.is_some_and(|t| tokio::time::Instant::now() >= t);
        let due = stream.filter(|_| !silent).map(|_| next_send);
        tokio::select! {
            r = port.read(&mut chunk) => {
                let n = r.context("reading serial port")?;
                if n == 0 {
                    anyhow::bail!("serial port closed");
                }
                rx.extend_from_slice(&chunk[..n]);
                loop {
                    match dec.decode(&mut rx) {
                        Ok(Some(rec)) => {
                            let Some(req) = parse_request(&rec.encode()) else { continue };
                            if req.record_type != 1 {
                                continue;
                            }
                            if req.interval_s <= 0 {
                                tracing::info!("stop request");
                                stream = None;
                            } else {
                                let iv = args.interval_ms.map_or(
                                    Duration::from_secs(req.interval_s as u64),
                                    Duration::from_millis,
                                );
                                if stream.is_none() {
                                    next_send = tokio::time::Instant::now();
                                }
                                tracing::info!(interval_s = req.interval_s, level = req.dri_level, "displayed values requested");
                                stream = Some((iv, req.dri_level));
                            }
                        }
                        Ok(None) => break,
                        Err(e) => tracing::warn!(error = %e, "bad frame from host"),
                    }
                }
            }
            _ = async { tokio::time::sleep_until(due.unwrap_or(next_send)).await }, if due.is_some() => {
                let Some((iv, level)) = stream else { continue };
                let v = values(args.scenario, sent, &mut noise);
                let time = time::OffsetDateTime::now_utc().unix_timestamp() as u32;
                let rec = record(time, sent as u8, level, &v);
                port.write_all(&frame(&rec)).await.context("writing serial port")?;
                port.flush().await?;
                if args.echo {
                    let line = format!(
                        "record n={sent} time={time} hr={} sys={} dia={} mean={} t1={} t2={} spo2={} pr={} et={} rr={}\n",
                        v.hr, v.sys, v.dia, v.mean, v.t1, v.t2, v.spo2, v.pr, v.et, v.rr
                    );
                    stdout.write_all(line.as_bytes()).await?;
                    stdout.flush().await?;
                }
                sent += 1;
                next_send += iv;
                if args.count.is_some_and(|c| sent >= c) {
                    tracing::info!(records = sent, "datex sim done");
                    return Ok(());
                }
            }
            _ = async {
                match silent_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            }, if !silent && silent_at.is_some() => {
                tracing::info!("going silent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use device_drivers::datex::codec::{Phdb, RawValue, phdb_request};

    /// Cross-check: the driver's independent record parser reads every
    /// record of every scenario with the values the simulator put in.
    #[test]
    fn driver_parser_reads_the_simulated_records() {
        for scenario in [Scenario::Stable, Scenario::Deteriorating] {
            let mut noise = Noise::new(3);
            for n in 0..80 {
                let v = values(scenario, n, &mut noise);
                let bytes = frame(&record(1_700_000_000, n as u8, 9, &v));
                let mut buf = BytesMut::from(&bytes[..]);
                let rec = DatexDecoder::new().decode(&mut buf).unwrap().unwrap();
                let subs = rec.subrecord_bytes();
                assert_eq!(subs.len(), 1);
                assert_eq!(subs[0].0, 1);
                let p = Phdb::parse(subs[0].1.unwrap()).unwrap();
                let b = p.basic.unwrap();
                assert_eq!(p.time, 1_700_000_000);
                assert_eq!(b.ecg.v[0], v.hr);
                assert_eq!(b.nibp.v[..3], [v.sys, v.dia, v.mean]);
                assert_eq!(b.t[0].v[0], v.t1);
                assert_eq!(b.t[1].hdr.label, TEMP_LABEL_SKIN);
                assert_eq!(b.spo2.v[..2], [v.spo2, v.pr]);
                assert_eq!(b.co2.v[0], v.et);
                assert_eq!(b.co2.v[2], v.rr);
                assert!(!b.p[0].hdr.exists());
                if n % 4 == 3 {
                    assert_eq!(RawValue::classify(b.spo2.v[0]), RawValue::Invalid);
                }
            }
        }
    }

    #[test]
    fn reads_the_driver_request() {
        let req = phdb_request(9, 1, 10, 0);
        assert_eq!(
            parse_request(&req),
            Some(Request {
                dri_level: 9,
                record_type: 1,
                interval_s: 10,
                class_bf: 0
            })
        );
    }

    #[test]
    fn deterioration_goes_the_right_way() {
        let mut noise = Noise::new(1);
        let first = values(Scenario::Deteriorating, 0, &mut noise);
        let last = values(Scenario::Deteriorating, 60, &mut noise);
        assert!(first.spo2 >= 9500 && last.spo2 <= 8700);
        assert!(last.hr > first.hr + 30);
        assert!(last.sys < first.sys);
    }
}
