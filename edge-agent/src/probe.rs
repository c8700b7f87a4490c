//! `edge-agent probe`: run one protocol on one port and print, live, the raw
//! bytes in both directions and what they decode to. The first
//! troubleshooting step for a biomedical engineer at the bedside.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use device_drivers::{Direction, DriverOutput, DriverStats, RunOptions, SerialOverrides};
use shared_protocol::CATALOGUE;
use shared_protocol::v1::{QualityFlag, Reading, TechnicalKind, Validity, reading::Value};
use tokio::sync::{mpsc, watch};

use crate::config::{DeviceKind, Transport};
use crate::devices::{AnyProtocol, LinkTarget};

/// Options of a probe run.
#[derive(Debug, Clone)]
pub struct ProbeArgs {
    pub kind: DeviceKind,
    /// Serial port path, or `host:port` for network kinds.
    pub port: String,
    pub options: toml::Table,
    pub serial: SerialOverrides,
    /// Stop after this long (None: until Ctrl-C).
    pub duration: Option<Duration>,
    /// Print raw bytes.
    pub raw: bool,
}

/// Hex + printable-ASCII rendering of a chunk, 16 bytes a line.
pub fn hexdump(prefix: &str, data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(16) {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02X}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!("{prefix} {:<47}  |{ascii}|\n", hex.join(" ")));
    }
    out
}

fn validity_name(v: i32) -> &'static str {
    match Validity::try_from(v) {
        Ok(Validity::Valid) => "valid",
        Ok(Validity::Questionable) => "questionable",
        Ok(Validity::Invalid) => "INVALID",
        _ => "unspecified",
    }
}

/// One line describing a reading.
pub fn describe_reading(r: &Reading) -> String {
    let name = CATALOGUE
        .by_mdc(r.mdc_code)
        .map_or("(not in catalogue)", |m| m.display);
    let value = match &r.value {
        Some(Value::Numeric(v)) => format!("{v} {}", r.ucum_unit),
        Some(Value::Text(t)) => format!("{t:?}"),
        Some(Value::Coded(c)) => format!("{}|{}", c.system, c.code),
        None => "(no value)".into(),
    };
    let flags: Vec<String> = r
        .flags
        .iter()
        .map(|f| {
            QualityFlag::try_from(*f)
                .map_or(format!("flag {f}"), |q| q.as_str_name().to_lowercase())
        })
        .collect();
    let time =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.effective_time_us()) * 1000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "?".into());
    format!(
        "reading   {name} [{}] MDC {} = {value}  {}{}  at {time}",
        r.vendor_label,
        r.mdc_code,
        validity_name(r.validity),
        if flags.is_empty() {
            String::new()
        } else {
            format!(" ({})", flags.join(", "))
        }
    )
}

fn describe(out: &DriverOutput) -> String {
    let mut s = String::new();
    for r in &out.readings {
        s.push_str(&describe_reading(r));
        s.push('\n');
    }
    for w in &out.waveforms {
        s.push_str(&format!(
            "waveform  MDC {} [{}] {} samples every {} µs\n",
            w.mdc_code,
            w.vendor_label,
            w.samples.len(),
            w.sample_period_us
        ));
    }
    for t in &out.technical {
        let kind = TechnicalKind::try_from(t.kind).map_or("unknown", |k| k.as_str_name());
        s.push_str(&format!("technical {kind}: {}\n", t.detail));
    }
    s
}

/// Run the probe; returns the device counters at the end.
pub async fn run(
    args: ProbeArgs,
    mut stop: watch::Receiver<bool>,
) -> Result<device_drivers::DriverStatsSnapshot, String> {
    let proto = AnyProtocol::new(args.kind, &args.options)?;
    let target = match args.kind.transport() {
        Transport::Serial => LinkTarget::Serial {
            port: args.port.clone(),
            settings: proto.default_serial().with(&args.serial),
        },
        Transport::Tcp => LinkTarget::Tcp {
            address: args.port.clone(),
        },
        Transport::Udp => LinkTarget::Udp {
            address: args.port.clone(),
        },
        Transport::Ble => {
            return Err("probe does not support ble yet; run the agent (RUST_LOG=debug shows each BLE value)".into());
        }
        Transport::Listener => {
            return Err(format!(
                "{:?} is a listener kind; probe connects to devices (send to the agent instead)",
                args.kind
            ));
        }
    };
    let at = match &target {
        LinkTarget::Serial { port, settings } => format!("{port} at {settings}"),
        LinkTarget::Tcp { address } => format!("tcp {address}"),
        LinkTarget::Udp { address } => format!("udp {address}"),
        LinkTarget::Listen { address } => format!("listen {address}"),
        LinkTarget::Ble { address } => format!("ble {}", address.as_deref().unwrap_or("any")),
    };
    println!("probing {} on {at}; Ctrl-C to stop", proto.kind());
    let mut opts = RunOptions::default();
    if args.raw {
        opts.tap = Some(Arc::new(|dir, bytes: &[u8]| {
            let prefix = match dir {
                Direction::FromDevice => "<- dev",
                Direction::ToDevice => "-> dev",
            };
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(hexdump(prefix, bytes).as_bytes());
        }));
    }
    let stats = Arc::new(DriverStats::default());
    let (tx, mut rx) = mpsc::channel(64);
    let (sd_tx, sd_rx) = watch::channel(false);
    let task = tokio::spawn(proto.run("probe".into(), target, opts, stats.clone(), tx, sd_rx));
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    loop {
        let timeout = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            out = rx.recv() => match out {
                Some(out) => print!("{}", describe(&out)),
                None => break,
            },
            _ = timeout => break,
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = sd_tx.send(true);
    let _ = task.await;
    Ok(stats.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hexdump_shows_hex_and_ascii() {
        let d = hexdump("<-", b"SPO2=098%\r\n");
        let hex = "53 50 4F 32 3D 30 39 38 25 0D 0A";
        assert_eq!(d, format!("<- {hex:<47}  |SPO2=098%..|\n"));
        assert_eq!(
            hexdump("->", &[0u8; 17]).lines().count(),
            2,
            "16 bytes a line"
        );
    }

    #[test]
    fn readings_are_described_with_catalogue_names_and_flags() {
        let r = Reading {
            mdc_code: 150_456,
            vendor_label: "SPO2".into(),
            value: None,
            ucum_unit: "%".into(),
            validity: Validity::Invalid as i32,
            flags: vec![QualityFlag::SensorOff as i32],
            gateway_time_us: 1_795_514_400_000_000,
            ..Default::default()
        };
        let s = describe_reading(&r);
        assert!(
            s.contains("SpO2 [SPO2] MDC 150456 = (no value)  INVALID (quality_flag_sensor_off)"),
            "{s}"
        );
        assert!(s.contains("2026-11-24T10:00:00Z"), "{s}");
    }
}
