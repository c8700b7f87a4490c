//! The S/5 driver against `device-sim datex` over a socat PTY pair: the
//! driver requests displayed values, the simulator answers as the monitor;
//! values, units, invalid markers and the end of the link are checked.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_drivers::datex::{Datex, DatexOptions, SERIAL};
use device_drivers::{DriverOutput, DriverStats, RunOptions, run_serial};
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{QualityFlag, TechnicalKind, Validity, reading::Value};
use vigil_e2e::{Proc, PtyPair, test_dir};

/// Parse `record n=0 time=… hr=72 …` into a map.
fn parse_echo(line: &str) -> HashMap<String, i64> {
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

async fn recv(
    rx: &mut tokio::sync::mpsc::Receiver<DriverOutput>,
    within: Duration,
) -> DriverOutput {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("driver output in time")
        .expect("driver running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datex_pty_values_invalid_markers_and_disconnect() {
    let (_dir_guard, dir) = test_dir("datex-pty");
    let pty = PtyPair::new(&dir, "serial").unwrap();

    let mut sim = Proc::guard(
        Command::new(env!("CARGO_BIN_EXE_device-sim"))
            .args(["datex", "--port"])
            .arg(&pty.device)
            .args([
                "--scenario",
                "stable",
                "--interval-ms",
                "200",
                "--seed",
                "5",
                "--echo",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    let stdout = sim.child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Let the simulator open its end before the driver sends its request
    // (the driver re-requests anyway if the first one is lost).
    std::thread::sleep(Duration::from_millis(300));

    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let stats = Arc::new(DriverStats::default());
    let proto = Datex::new(DatexOptions {
        interval_s: 5,
        dri_levels: vec![9],
        clock_offset_minutes: 0,
    })
    .unwrap();
    let opts = RunOptions {
        silence: Duration::from_secs(1),
        ..RunOptions::default()
    };
    let driver = tokio::spawn(run_serial(
        proto,
        "s5-1".into(),
        pty.host.display().to_string(),
        SERIAL,
        opts,
        stats.clone(),
        tx,
        shutdown,
    ));

    let first = recv(&mut rx, Duration::from_secs(15)).await;
    assert_eq!(
        first.technical[0].kind,
        TechnicalKind::Connected as i32,
        "{first:?}"
    );

    // Eight records: compare each with what the simulator says it sent.
    let mut saw_invalid_spo2 = false;
    let mut saw_not_updated_et = false;
    for k in 0..8 {
        let out = recv(&mut rx, Duration::from_secs(10)).await;
        let line = line_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("simulator echo");
        let sent = parse_echo(&line);
        assert_eq!(sent["n"], k, "{line}");
        let by_label = |l: &str| {
            out.readings
                .iter()
                .find(|r| r.vendor_label == l)
                .unwrap_or_else(|| panic!("no {l}: {out:?}"))
        };
        let check =
            |label: &str, mdc: u32, unit: shared_protocol::catalogue::Unit, key: &str, div: f64| {
                let r = by_label(label);
                assert_eq!(r.mdc_code, mdc, "{label}");
                assert_eq!(r.mdc_unit, unit.mdc, "{label}");
                assert_eq!(r.ucum_unit, unit.ucum, "{label}");
                assert_eq!(r.device_time_us, sent["time"] * 1_000_000, "{label}");
                let raw = sent[key];
                if raw <= -32001 {
                    assert_eq!(r.value, None, "{label}");
                    assert_eq!(r.validity, Validity::Invalid as i32, "{label}");
                    assert!(r.flags.contains(&(QualityFlag::ValueMissing as i32)));
                    true
                } else {
                    assert_eq!(r.value, Some(Value::Numeric(raw as f64 / div)), "{label}");
                    assert_eq!(r.validity, Validity::Valid as i32, "{label}");
                    false
                }
            };
        check(
            "ECG HR",
            codes::ECG_HEART_RATE,
            units::BEAT_PER_MIN,
            "hr",
            1.0,
        );
        check(
            "NIBP SYS",
            codes::PRESS_BLD_NONINV_SYS,
            units::MMHG,
            "sys",
            100.0,
        );
        check(
            "NIBP DIA",
            codes::PRESS_BLD_NONINV_DIA,
            units::MMHG,
            "dia",
            100.0,
        );
        check(
            "NIBP MEAN",
            codes::PRESS_BLD_NONINV_MEAN,
            units::MMHG,
            "mean",
            100.0,
        );
        check("T1 ESO", codes::TEMP_BODY, units::DEGC, "t1", 100.0);
        saw_invalid_spo2 |= check(
            "SpO2",
            codes::PULS_OXIM_SAT_O2,
            units::PERCENT,
            "spo2",
            100.0,
        );
        check(
            "SpO2 PR",
            codes::PULS_OXIM_PULS_RATE,
            units::BEAT_PER_MIN,
            "pr",
            1.0,
        );
        saw_not_updated_et |= check(
            "CO2 ET",
            codes::CONC_AWAY_CO2_ET,
            units::PERCENT,
            "et",
            100.0,
        );
        check("CO2 RR", codes::RESP_RATE, units::RESP_PER_MIN, "rr", 1.0);
        // The skin temperature (T2) is not a body temperature.
        assert!(
            out.readings
                .iter()
                .all(|r| !r.vendor_label.starts_with("T2"))
        );
        assert_eq!(out.readings.len(), 9);
    }
    assert!(saw_invalid_spo2, "SpO2 DATA_INVALID marker seen");
    assert!(saw_not_updated_et, "EtCO2 DATA_NOT_UPDATED marker seen");

    // Pull the plug: the simulator goes away; a technical reading follows.
    drop(sim);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no SILENT/DISCONNECTED reading");
        let out = recv(&mut rx, Duration::from_secs(30)).await;
        if let Some(t) = out.technical.first() {
            assert!(
                t.kind == TechnicalKind::Silent as i32
                    || t.kind == TechnicalKind::Disconnected as i32,
                "{t:?}"
            );
            break;
        }
    }
    let snap = stats.snapshot();
    assert!(snap.frames_ok >= 8);
    stop.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    let _ = std::fs::remove_dir_all(&dir);
}
