//! The Nonin Data Format 7 driver against `device-sim nonin` over a socat
//! PTY pair: the simulator streams packets as the module does; values,
//! units, the pleth waveform, sensor-off packets and the end of the link are
//! checked against what the simulator says it sent.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_drivers::nonin::{Nonin, NoninOptions, SERIAL};
use device_drivers::{DriverOutput, DriverStats, RunOptions, run_serial};
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{QualityFlag, TechnicalKind, TimeSource, Validity, reading::Value};
use vigil_e2e::{Proc, PtyPair, test_dir};

/// One `--echo` line: `packet n=3 spo2=97 hr=72 sensor_off=0 pleth=a,b,…`.
#[derive(Debug)]
struct Sent {
    n: u64,
    spo2: u8,
    hr: u16,
    sensor_off: bool,
    pleth: Vec<i32>,
}

fn parse_echo(line: &str) -> Sent {
    let kv: HashMap<&str, &str> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .collect();
    Sent {
        n: kv["n"].parse().unwrap(),
        spo2: kv["spo2"].parse().unwrap(),
        hr: kv["hr"].parse().unwrap(),
        sensor_off: kv["sensor_off"] == "1",
        pleth: kv["pleth"].split(',').map(|s| s.parse().unwrap()).collect(),
    }
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
async fn nonin_pty_values_pleth_sensor_off_and_silence() {
    let (_dir_guard, dir) = test_dir("nonin-pty");
    let pty = PtyPair::new(&dir, "serial").unwrap();

    // The driver opens its end first, so it sees the stream from the start
    // (it resynchronises anyway when it joins mid-packet).
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let stats = Arc::new(DriverStats::default());
    let proto = Nonin::new(NoninOptions::default()).unwrap();
    let opts = RunOptions {
        silence: Duration::from_secs(1),
        ..RunOptions::default()
    };
    let driver = tokio::spawn(run_serial(
        proto,
        "ox-1".into(),
        pty.host.display().to_string(),
        SERIAL,
        opts,
        stats.clone(),
        tx,
        shutdown,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 18 packets (6 s): 6 on, 6 sensor off, 6 on.
    let mut sim = Proc::guard(
        Command::new(env!("CARGO_BIN_EXE_device-sim"))
            .args(["nonin", "--port"])
            .arg(&pty.device)
            .args([
                "--scenario",
                "sensor-off",
                "--seed",
                "9",
                "--count",
                "18",
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

    let first = recv(&mut rx, Duration::from_secs(15)).await;
    assert_eq!(
        first.technical[0].kind,
        TechnicalKind::Connected as i32,
        "{first:?}"
    );

    // Each packet: match it to the simulator's echo by its pleth samples,
    // then compare values, units, flags and the waveform.
    let mut sent: Vec<Sent> = vec![];
    let mut matched = vec![];
    let (mut on, mut off) = (0, 0);
    while matched.len() < 15 {
        let out = recv(&mut rx, Duration::from_secs(10)).await;
        if !out.technical.is_empty() {
            panic!("unexpected technical reading: {out:?}");
        }
        assert_eq!(out.readings.len(), 2, "{out:?}");
        assert_eq!(out.waveforms.len(), 1, "{out:?}");
        let w = &out.waveforms[0];
        let deadline = Instant::now() + Duration::from_secs(5);
        let s = loop {
            // Flat (sensor-off) pleths repeat: take the first one after
            // the last packet matched.
            let after = matched.last().copied();
            if let Some(s) = sent
                .iter()
                .find(|s| s.pleth == w.samples && after.is_none_or(|l| s.n > l))
            {
                break s;
            }
            let line = line_rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("simulator echo for the packet");
            sent.push(parse_echo(&line));
        };
        assert!(!matched.contains(&s.n), "packet {} twice", s.n);
        matched.push(s.n);

        assert_eq!(w.mdc_code, 150_452);
        assert_eq!(w.samples.len(), 25);
        assert_eq!(w.sample_period_us, 13_333);
        assert_eq!((w.scale, w.offset), (1.0, 0.0));
        assert_eq!(w.mdc_unit, 262_656);
        assert_eq!(w.ucum_unit, "1");
        assert_eq!(w.time_source, TimeSource::GatewayReceive as i32);

        let spo2 = &out.readings[0];
        let pr = &out.readings[1];
        assert_eq!(spo2.mdc_code, codes::PULS_OXIM_SAT_O2);
        assert_eq!(spo2.mdc_unit, units::PERCENT.mdc);
        assert_eq!(spo2.ucum_unit, units::PERCENT.ucum);
        assert_eq!(pr.mdc_code, codes::PULS_OXIM_PULS_RATE);
        assert_eq!(pr.mdc_unit, units::BEAT_PER_MIN.mdc);
        assert_eq!(pr.ucum_unit, units::BEAT_PER_MIN.ucum);
        for r in [spo2, pr] {
            assert_eq!(r.time_source, TimeSource::GatewayReceive as i32);
            assert_eq!(r.device_time_us, r.gateway_time_us);
            assert_eq!(w.start_time_us, r.gateway_time_us - 333_325);
        }
        if s.sensor_off {
            off += 1;
            assert_eq!((s.spo2, s.hr), (127, 511));
            for r in [spo2, pr] {
                assert_eq!(r.value, None, "{r:?}");
                assert_eq!(r.validity, Validity::Invalid as i32);
                assert!(r.flags.contains(&(QualityFlag::SensorOff as i32)));
                assert!(r.flags.contains(&(QualityFlag::ValueMissing as i32)));
            }
            assert_eq!(w.validity, Validity::Invalid as i32);
            assert!(w.flags.contains(&(QualityFlag::SensorOff as i32)));
        } else {
            on += 1;
            assert_eq!(spo2.value, Some(Value::Numeric(f64::from(s.spo2))));
            assert_eq!(pr.value, Some(Value::Numeric(f64::from(s.hr))));
            for r in [spo2, pr] {
                assert_eq!(r.validity, Validity::Valid as i32, "{r:?}");
                assert!(r.flags.is_empty());
            }
            assert_eq!(w.validity, Validity::Valid as i32);
        }
    }
    assert!(on >= 5 && off >= 5, "on {on}, off {off}");
    // Packets arrive in order.
    assert!(matched.windows(2).all(|w| w[0] < w[1]), "{matched:?}");

    // The simulator stops after 18 packets; a technical reading follows.
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
    assert!(snap.frames_ok >= 15, "{snap:?}");
    let _ = sim.child.wait();
    stop.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    let _ = std::fs::remove_dir_all(&dir);
}
