//! Nonin OEM pulse oximeter module, serial Data Format 7, as the module
//! plays it: 9600 8N1, an unsolicited stream of 5-byte frames (status,
//! pleth MSB, pleth LSB, data byte, checksum), 25 frames per packet, 75
//! frames per second. Nothing is read from the host.
//!
//! Frames are composed here from this file's own reading of the format (see
//! `device_drivers::nonin::codec` for the sources); nothing is shared with
//! the driver, so the PTY test checks two readings against each other.

use std::time::Duration;

use crate::masimo::Noise;

/// Status byte: bit 7 always set, bit 6 sensor disconnect, bit 5 artifact,
/// bit 4 out of track, bit 3 sensor alarm, bit 2 red / bit 1 green
/// perfusion, bit 0 first frame of a packet.
const ST_ALWAYS: u8 = 0x80;
const ST_SNSD: u8 = 0x40;
const ST_GPRF: u8 = 0x02;
const ST_SYNC: u8 = 0x01;
/// Missing-data values.
const HR_NONE: u16 = 511;
const SPO2_NONE: u8 = 127;
/// Firmware revision reported in frame 4 (any 7-bit value).
const SREV: u8 = 0x2A;
/// 1/75 s.
const FRAME_PERIOD: Duration = Duration::from_micros(13_333);

/// Scenario played by the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Resting adult: SpO2 ~97 %, pulse ~72/min, green perfusion on each
    /// pulse.
    Stable,
    /// Stable values, but in every 12 packets (4 s) the last 6 have the
    /// sensor disconnected: SNSD set on every frame, SpO2 127 and pulse rate
    /// 511 (missing data), flat pleth.
    SensorOff,
}

/// What one packet carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketPlan {
    pub spo2: u8,
    pub hr: u16,
    pub sensor_off: bool,
    /// Status byte of each frame (SYNC included).
    pub status: [u8; 25],
    pub pleth: [u16; 25],
}

/// The state carried from packet to packet: pulse phase (frames since the
/// last beat).
#[derive(Debug, Default)]
pub struct Pulse {
    since_beat: f64,
}

/// A pleth shape over one beat: fast rise, slower fall, in 16-bit units.
fn pleth_shape(phase: f64) -> u16 {
    let y = if phase < 0.15 {
        phase / 0.15
    } else {
        (1.0 - (phase - 0.15) / 0.85).powi(2)
    };
    (20_000.0 + 25_000.0 * y) as u16
}

/// Plan packet `n`.
pub fn plan(scenario: Scenario, n: u64, noise: &mut Noise, pulse: &mut Pulse) -> PacketPlan {
    let off = scenario == Scenario::SensorOff && n % 12 >= 6;
    let hr_now = (72 + noise.jitter(3)) as u16;
    let spo2_now = (97 + noise.jitter(1)) as u8;
    let frames_per_beat = 75.0 * 60.0 / f64::from(hr_now);
    let mut status = [ST_ALWAYS; 25];
    let mut pleth = [0u16; 25];
    for i in 0..25 {
        if off {
            status[i] |= ST_SNSD;
            pleth[i] = 0;
        } else {
            let phase = pulse.since_beat / frames_per_beat;
            pleth[i] = pleth_shape(phase.min(1.0)) + noise.jitter(50).unsigned_abs() as u16;
            // Perfusion is shown for 12 frames (160 ms) from each beat.
            if pulse.since_beat < 12.0 {
                status[i] |= ST_GPRF;
            }
            pulse.since_beat += 1.0;
            if pulse.since_beat >= frames_per_beat {
                pulse.since_beat -= frames_per_beat;
            }
        }
    }
    status[0] |= ST_SYNC;
    PacketPlan {
        spo2: if off { SPO2_NONE } else { spo2_now },
        hr: if off { HR_NONE } else { hr_now },
        sensor_off: off,
        status,
        pleth,
    }
}

/// Byte 4 of frame `i` (0-based): 0 HR bits 8-7, 1 HR bits 6-0, 2 SpO2,
/// 3 firmware revision, 8 SpO2-D, 9 SpO2 fast, 10 SpO2 beat-to-beat,
/// 13/14 extended (8-beat) HR, 15 E-SpO2, 16 E-SpO2-D, 19/20 HR-D,
/// 21/22 E-HR-D; all others reserved (0). The simulator sends the same
/// value in every variant.
fn data_byte(i: usize, p: &PacketPlan) -> u8 {
    let hr_hi = ((p.hr >> 7) & 0x03) as u8;
    let hr_lo = (p.hr & 0x7F) as u8;
    match i {
        0 | 13 | 19 | 21 => hr_hi,
        1 | 14 | 20 | 22 => hr_lo,
        2 | 8 | 9 | 10 | 15 | 16 => p.spo2 & 0x7F,
        3 => SREV,
        _ => 0,
    }
}

/// The 125 bytes of a packet.
pub fn packet_bytes(p: &PacketPlan) -> Vec<u8> {
    let mut out = Vec::with_capacity(125);
    for i in 0..25 {
        let frame = [
            p.status[i],
            (p.pleth[i] >> 8) as u8,
            (p.pleth[i] & 0xFF) as u8,
            data_byte(i, p),
        ];
        let chk = frame.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        out.extend_from_slice(&frame);
        out.push(chk);
    }
    out
}

/// One `--echo` line.
pub fn echo_line(n: u64, p: &PacketPlan) -> String {
    let pleth: Vec<String> = p.pleth.iter().map(|s| s.to_string()).collect();
    format!(
        "packet n={n} spo2={} hr={} sensor_off={} pleth={}\n",
        p.spo2,
        p.hr,
        u8::from(p.sensor_off),
        pleth.join(",")
    )
}

/// Options of `device-sim nonin`.
#[derive(Debug, Clone, clap::Args)]
pub struct NoninArgs {
    /// Serial port to use (e.g. one end of a socat PTY pair).
    #[arg(long)]
    pub port: String,
    #[arg(long, value_enum, default_value = "stable")]
    pub scenario: Scenario,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Exit after sending this many packets (25 frames each, 3 per second).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop sending anything this many seconds after start, as if the cable
    /// were pulled (the process keeps the port open).
    #[arg(long)]
    pub go_silent_after_s: Option<f64>,
    /// Print one line per packet sent: `packet n=… spo2=… hr=… sensor_off=0|1
    /// pleth=s1,…,s25` (the raw values encoded, missing data as 127 / 511).
    #[arg(long)]
    pub echo: bool,
}

pub async fn run(args: NoninArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::io::AsyncWriteExt;

    // Data Format 7: 9600 baud, 8 data bits, no parity, 1 stop bit.
    let mut port = device_drivers::nonin::SERIAL
        .open(&args.port)
        .with_context(|| format!("opening serial port {}", args.port))?;
    let start = tokio::time::Instant::now();
    let silent_at = args
        .go_silent_after_s
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let mut noise = Noise::new(args.seed);
    let mut pulse = Pulse::default();
    let mut stdout = tokio::io::stdout();
    let mut ticker = tokio::time::interval(FRAME_PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    tracing::info!(port = %args.port, scenario = ?args.scenario, "nonin sim streaming");
    let mut n = 0u64;
    loop {
        if args.count.is_some_and(|c| n >= c) {
            tracing::info!(packets = n, "nonin sim done");
            port.flush().await?;
            return Ok(());
        }
        let p = plan(args.scenario, n, &mut noise, &mut pulse);
        let bytes = packet_bytes(&p);
        for frame in bytes.chunks(5) {
            ticker.tick().await;
            if silent_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
                tracing::info!("going silent");
                std::future::pending::<()>().await;
            }
            port.write_all(frame).await.context("writing serial port")?;
        }
        if args.echo {
            stdout.write_all(echo_line(n, &p).as_bytes()).await?;
            stdout.flush().await?;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use device_drivers::nonin::codec::{HR_MISSING, NoninDecoder, SPO2_MISSING};

    /// Cross-check: the driver's decoder reads every simulated packet with
    /// the values and samples the simulator planned.
    #[test]
    fn driver_decoder_reads_the_simulated_packets() {
        for scenario in [Scenario::Stable, Scenario::SensorOff] {
            let (mut noise, mut pulse) = (Noise::new(7), Pulse::default());
            let mut dec = NoninDecoder::new();
            for n in 0..40 {
                let p = plan(scenario, n, &mut noise, &mut pulse);
                let mut buf = BytesMut::from(&packet_bytes(&p)[..]);
                let got = dec.decode(&mut buf).unwrap().unwrap();
                assert!(buf.is_empty());
                let v = got.values();
                assert_eq!((v.spo2, v.hr), (p.spo2, p.hr));
                assert_eq!((v.e_spo2, v.e_hr), (p.spo2, p.hr));
                assert_eq!(v.srev, SREV);
                assert_eq!(got.pleth(), p.pleth);
                assert_eq!(got.frames[0].sensor_disconnect(), p.sensor_off);
                if p.sensor_off {
                    assert_eq!((v.spo2, v.hr), (SPO2_MISSING, HR_MISSING));
                }
            }
        }
    }

    #[test]
    fn sensor_off_period_and_perfusion_pulses() {
        let (mut noise, mut pulse) = (Noise::new(1), Pulse::default());
        let plans: Vec<PacketPlan> = (0..24)
            .map(|n| plan(Scenario::SensorOff, n, &mut noise, &mut pulse))
            .collect();
        let off: Vec<bool> = plans.iter().map(|p| p.sensor_off).collect();
        assert_eq!(off.iter().filter(|&&o| o).count(), 12);
        assert!(!off[5] && off[6] && off[11] && !off[12]);
        // Green perfusion is shown on some frames of an "on" packet.
        assert!(plans[0].status.iter().any(|s| s & ST_GPRF != 0));
        assert!(plans[6].status.iter().all(|s| s & ST_SNSD != 0));
    }
}
