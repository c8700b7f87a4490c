//! `device-sim medibus` on one end of a socat PTY pair, the agent's MEDIBUS
//! driver (`run_serial`) on the other: initialisation, answering the
//! device's own ICC/NOP, codepage 1 values as the simulator sent them,
//! missing values as flagged readings, and silence detection when the
//! simulated cable is pulled.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_drivers::medibus::{Medibus, MedibusOptions, SERIAL};
use device_drivers::{DriverOutput, DriverStats, RunOptions, run_serial};
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{QualityFlag, TechnicalKind, Validity, reading::Value};
use vigil_e2e::{Proc, PtyPair, test_dir};

/// Parse a `DATA D6=  12|88= 500|…` line into code → 4 value characters.
fn parse_data_line(line: &str) -> HashMap<u8, String> {
    line.trim_start_matches("DATA ")
        .split('|')
        .filter(|f| !f.is_empty())
        .map(|f| {
            let (code, value) = f.split_at(2);
            (
                u8::from_str_radix(code, 16).unwrap(),
                value[1..].to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn medibus_sim_to_driver_over_pty() {
    let (_dir_guard, dir) = test_dir("medibus-pty");
    let pty = PtyPair::new(&dir, "medibus").unwrap();
    let (device, host) = (pty.device.clone(), pty.host.clone());

    let mut sim = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args(["medibus", "--port"])
        .arg(&device)
        .args([
            "--scenario",
            "stable",
            "--seed",
            "7",
            "--missing-every",
            "3",
            "--nop-interval-ms",
            "300",
            "--go-silent-after-s",
            "4",
            "--duration-s",
            "30",
            "--echo",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("device-sim");
    let sim_out = BufReader::new(sim.stdout.take().unwrap());
    let _sim = Proc::guard(sim);
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in sim_out.lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }

    let (tx, mut rx) = tokio::sync::mpsc::channel::<DriverOutput>(64);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let proto = Medibus::new(MedibusOptions {
        poll_interval_ms: 250,
        keepalive_ms: 1000,
        response_timeout_ms: 1000,
    })
    .unwrap();
    let driver = tokio::spawn(run_serial(
        proto,
        "vent-1".into(),
        host.display().to_string(),
        SERIAL,
        RunOptions {
            silence: Duration::from_secs(2),
            ..RunOptions::default()
        },
        Arc::new(DriverStats::default()),
        tx,
        shutdown,
    ));

    // Collect until the silence is reported (the sim goes silent at 4 s).
    let mut outputs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut down = None;
    while down.is_none() {
        let out = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("no SILENT/DISCONNECTED technical reading within 20 s")
            .expect("driver channel closed");
        down = out
            .technical
            .iter()
            .find(|t| {
                t.kind == TechnicalKind::Silent as i32
                    || t.kind == TechnicalKind::Disconnected as i32
            })
            .cloned();
        outputs.push(out);
    }
    stop.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;

    // 1. CONNECTED first.
    let first_tech = outputs
        .iter()
        .flat_map(|o| &o.technical)
        .next()
        .expect("a technical reading");
    assert_eq!(first_tech.kind, TechnicalKind::Connected as i32);

    // 2. Each data batch equals the simulator's response, in order.
    let sent: Vec<HashMap<u8, String>> = lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("DATA "))
        .map(|l| parse_data_line(l))
        .collect();
    let batches: Vec<_> = outputs.iter().filter(|o| !o.readings.is_empty()).collect();
    assert!(batches.len() >= 4, "only {} data batches", batches.len());
    assert!(sent.len() >= batches.len());
    let expect = [
        (0xD6u8, codes::RESP_RATE, units::RESP_PER_MIN),
        (0x88, codes::VENT_VOL_TIDAL, units::MILLI_L),
        (0x7D, codes::VENT_PRESS_AWAY_MAX, units::HECTO_PA),
        (0x73, codes::VENT_PRESS_AWAY_MEAN, units::HECTO_PA),
        (0x78, codes::VENT_PRESS_AWAY_END_EXP_POS, units::HECTO_PA),
        (0xF0, codes::CONC_AWAY_O2_INSP, units::PERCENT),
        (0xE6, codes::CONC_AWAY_CO2_ET, units::MMHG),
        (0xEB, codes::PULS_OXIM_SAT_O2, units::PERCENT),
        (0xE1, codes::PULS_OXIM_PULS_RATE, units::BEAT_PER_MIN),
    ];
    let mut missing_seen = 0;
    for (batch, sent) in batches.iter().zip(&sent) {
        assert_eq!(batch.device_id, "vent-1");
        // 0xB9 (minute volume) is sent but not mapped.
        assert_eq!(batch.readings.len(), expect.len());
        for (code, mdc, unit) in expect {
            let r = batch
                .readings
                .iter()
                .find(|r| r.mdc_code == mdc)
                .unwrap_or_else(|| panic!("no reading for {mdc}"));
            assert_eq!((r.mdc_unit, r.ucum_unit.as_str()), (unit.mdc, unit.ucum));
            let raw = sent[&code].trim();
            match raw.parse::<f64>() {
                Ok(v) => {
                    assert_eq!(r.value, Some(Value::Numeric(v)), "{code:02X}");
                    assert_eq!(r.validity, Validity::Valid as i32);
                }
                Err(_) => {
                    missing_seen += 1;
                    assert_eq!(r.value, None, "{code:02X} invented a value");
                    assert_eq!(r.validity, Validity::Invalid as i32);
                    assert_eq!(r.flags, vec![QualityFlag::ValueMissing as i32]);
                }
            }
        }
    }
    assert!(missing_seen > 0, "no missing-value case was exercised");

    // 3. The driver answered the device's own ICC and NOPs.
    let log = lines.lock().unwrap().clone();
    assert!(log.iter().any(|l| l == "ANSWERED ICC"), "{log:?}");
    assert!(log.iter().any(|l| l == "ANSWERED NOP"), "{log:?}");
    assert!(log.iter().any(|l| l == "DEVICE_ID"), "{log:?}");
    assert!(
        !log.iter().any(|l| l == "NAK"),
        "driver sent a bad checksum"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
