//! Masimo Radical-7 in "ASCII 1" serial mode, as the device sends it: one
//! CR LF line per interval at 9600 8N1, unsolicited.
//!
//! Written independently of the agent's parser (device-drivers) so that tests
//! check two implementations of the manual against each other, not one
//! against itself.

use std::time::Duration;

use time::OffsetDateTime;

/// Physiological scenario played by the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Healthy adult at rest: SpO2 96-99 %, pulse 68-80 /min, PI 3-4 %.
    Stable,
    /// Repeating 120 s desaturation episode: SpO2 falls from ~97 % to ~84 %
    /// over 30 s, holds, and recovers; pulse rises as SpO2 falls; PI drops.
    Desaturation,
    /// Stable, but the sensor comes off for 10 s in every 60 s: values are
    /// dashes and EXC carries "sensor off" (0x000020).
    SensorOff,
}

/// One simulated sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub spo2: Option<u32>,
    pub bpm: Option<u32>,
    /// Perfusion index in hundredths of a percent.
    pub pi_centi: Option<u32>,
    pub exc: u32,
}

/// Deterministic pseudo-random noise (SplitMix64), so runs are repeatable
/// for a given seed.
#[derive(Debug, Clone)]
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Self {
        Noise(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform integer in [-amp, amp].
    pub fn jitter(&mut self, amp: i64) -> i64 {
        (self.next_u64() % (2 * amp as u64 + 1)) as i64 - amp
    }
}

fn around(base: i64, noise: &mut Noise, amp: i64) -> u32 {
    (base + noise.jitter(amp)).max(0) as u32
}

/// The sample at scenario second `t`.
pub fn sample(scenario: Scenario, t: u64, noise: &mut Noise) -> Sample {
    match scenario {
        Scenario::Stable => Sample {
            spo2: Some(around(97, noise, 1).min(100)),
            bpm: Some(around(74, noise, 4)),
            pi_centi: Some(around(350, noise, 40)),
            exc: 0,
        },
        Scenario::Desaturation => {
            let phase = (t % 120) as i64;
            // SpO2 in tenths of a percent, piecewise linear.
            let spo2_tenths = match phase {
                0..20 => 970,
                20..50 => 970 - (phase - 20) * 130 / 30,
                50..80 => 840,
                80..110 => 840 + (phase - 80) * 130 / 30,
                _ => 970,
            };
            let drop = 970 - spo2_tenths; // 0..130
            Sample {
                spo2: Some(around((spo2_tenths + 5) / 10, noise, 1).min(100)),
                bpm: Some(around(75 + drop * 30 / 130, noise, 2)),
                pi_centi: Some(around(350 - drop * 230 / 130, noise, 20)),
                exc: 0,
            }
        }
        Scenario::SensorOff => {
            if t % 60 >= 50 {
                Sample {
                    spo2: None,
                    bpm: None,
                    pi_centi: None,
                    exc: 0x00_0020,
                }
            } else {
                sample(Scenario::Stable, t, noise)
            }
        }
    }
}

/// Render a line exactly as the device does (fixed widths, zero padding,
/// dashes for no value, CR LF).
pub fn render(time: OffsetDateTime, serial: &str, s: &Sample) -> String {
    let spo2 = s.spo2.map_or("---".to_string(), |v| format!("{v:03}"));
    let bpm = s.bpm.map_or("---".to_string(), |v| format!("{v:03}"));
    let pi = s.pi_centi.map_or("--.--".to_string(), |v| {
        format!("{:02}.{:02}", v / 100, v % 100)
    });
    format!(
        "{:02}/{:02}/{:02} {:02}:{:02}:{:02} SN={serial} SPO2={spo2}% BPM={bpm} PI={pi}% \
SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC={:06X}\r\n",
        u8::from(time.month()),
        time.day(),
        time.year() % 100,
        time.hour(),
        time.minute(),
        time.second(),
        s.exc,
    )
}

/// Options of `device-sim masimo`.
#[derive(Debug, Clone, clap::Args)]
pub struct MasimoArgs {
    /// Serial port to write to (e.g. one end of a socat PTY pair).
    #[arg(long)]
    pub port: String,
    #[arg(long, value_enum, default_value = "stable")]
    pub scenario: Scenario,
    /// Time between lines. The real device sends one per second; tests may
    /// go faster (the device clock in each line still reads real time).
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Stop after this many lines (default: run until killed).
    #[arg(long)]
    pub count: Option<u64>,
    /// Serial number the device reports.
    #[arg(long, default_value = "0000056661")]
    pub serial: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Device clock offset from UTC in minutes (the device has no zone).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub clock_offset_minutes: i32,
    /// Also print every line written to stdout (for tests and the bench).
    #[arg(long)]
    pub echo: bool,
    /// Insert a line of line noise after every N good lines (bench testing
    /// of the agent's resync); 0 = never.
    #[arg(long, default_value_t = 0)]
    pub garbage_every: u64,
}

pub async fn run(args: MasimoArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::io::AsyncWriteExt;

    let mut port = device_drivers::masimo::SERIAL
        .open(&args.port)
        .with_context(|| format!("opening serial port {}", args.port))?;
    let offset = time::UtcOffset::from_whole_seconds(args.clock_offset_minutes * 60)
        .context("--clock-offset-minutes out of range")?;
    let mut noise = Noise::new(args.seed);
    let mut ticker = tokio::time::interval(Duration::from_millis(args.interval_ms.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = std::time::Instant::now();
    let mut written = 0u64;
    let mut stdout = tokio::io::stdout();
    while args.count.is_none_or(|c| written < c) {
        ticker.tick().await;
        // Scenario time advances one second per line, like the device.
        let s = sample(args.scenario, written, &mut noise);
        let now = OffsetDateTime::now_utc().to_offset(offset);
        let line = render(now, &args.serial, &s);
        port.write_all(line.as_bytes())
            .await
            .context("writing to serial port")?;
        written += 1;
        if args.echo {
            stdout.write_all(line.as_bytes()).await?;
            stdout.flush().await?;
        }
        if args.garbage_every > 0 && written % args.garbage_every == 0 {
            port.write_all(b"\x13\xfe#noise%%\r\n").await?;
        }
    }
    port.flush().await?;
    tracing::info!(
        lines = written,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "masimo sim done"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use device_drivers::masimo::{Field, MasimoDecoder};
    use time::macros::datetime;

    #[test]
    fn renders_the_manual_layout() {
        let s = Sample {
            spo2: Some(98),
            bpm: Some(97),
            pi_centi: Some(360),
            exc: 0x800,
        };
        let line = render(datetime!(2016-02-22 22:47:45 UTC), "0000056661", &s);
        assert_eq!(
            line,
            "02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% \
SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800\r\n"
        );
    }

    /// Cross-check: every line of every scenario parses with the agent's
    /// independent decoder, with the same values.
    #[test]
    fn agent_decoder_reads_every_scenario() {
        for scenario in [
            Scenario::Stable,
            Scenario::Desaturation,
            Scenario::SensorOff,
        ] {
            let mut noise = Noise::new(7);
            let mut dec = MasimoDecoder::new();
            for t in 0..240 {
                let s = sample(scenario, t, &mut noise);
                let line = render(
                    OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000),
                    "1",
                    &s,
                );
                let mut buf = BytesMut::from(line.as_bytes());
                let f = dec.decode(&mut buf).unwrap().unwrap();
                match s.spo2 {
                    Some(v) => assert_eq!(f.spo2, Field::Value(f64::from(v))),
                    None => assert_eq!(f.spo2, Field::NoValue),
                }
                match s.pi_centi {
                    Some(v) => assert_eq!(f.perfusion_index, Field::Value(f64::from(v) / 100.0)),
                    None => assert_eq!(f.perfusion_index, Field::NoValue),
                }
                assert_eq!(f.exceptions.0, s.exc);
            }
        }
    }

    #[test]
    fn desaturation_reaches_hypoxaemia_and_recovers() {
        let mut noise = Noise::new(1);
        let spo2: Vec<u32> = (0..120)
            .map(|t| sample(Scenario::Desaturation, t, &mut noise).spo2.unwrap())
            .collect();
        assert!(spo2[..20].iter().all(|&v| v >= 95));
        assert!(spo2[55..75].iter().all(|&v| v <= 86), "{:?}", &spo2[55..75]);
        assert!(spo2[112..].iter().all(|&v| v >= 95));
    }
}
