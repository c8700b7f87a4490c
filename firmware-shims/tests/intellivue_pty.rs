//! The IntelliVue Data Export driver against `device-sim intellivue` over a
//! socat PTY pair: association, MDS create, extended polls answered by the
//! simulated monitor; codes, units, values (echoed by the simulator), device
//! states and the silence after the simulated cable pull are checked.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device_drivers::intellivue::{Intellivue, IntellivueOptions, SERIAL};
use device_drivers::{DriverStats, RunOptions, run_serial};
use shared_protocol::catalogue::codes;
use shared_protocol::v1::{QualityFlag, Reading, TechnicalKind, Validity, reading::Value};
use vigil_e2e::{Proc, PtyPair, test_dir};

/// One `VALUE ...` line of the simulator's echo.
#[derive(Debug, Clone)]
struct Sent {
    physio: u16,
    state: u16,
    unit: u16,
    mantissa: i64,
    exponent: i32,
    special: String,
}

fn parse_sent(line: &str) -> Option<Sent> {
    let mut it = line.split_whitespace();
    if it.next()? != "VALUE" {
        return None;
    }
    let kv: std::collections::HashMap<&str, &str> = it.filter_map(|t| t.split_once('=')).collect();
    let hex = |k: &str| u16::from_str_radix(kv[k].trim_start_matches("0x"), 16).unwrap();
    Some(Sent {
        physio: hex("physio"),
        state: hex("state"),
        unit: hex("unit"),
        mantissa: kv["mantissa"].parse().unwrap(),
        exponent: kv["exponent"].parse().unwrap(),
        special: kv["special"].to_string(),
    })
}

/// The catalogue code the driver must use for a physio id the sim sends
/// (IntelliVue nomenclature → Vigil catalogue; see docs/protocols.md).
fn expected_mdc(physio: u16) -> u32 {
    match physio {
        0x4182 => codes::ECG_HEART_RATE,
        0x4822 => codes::PULS_OXIM_PULS_RATE,
        0x4BB8 => codes::PULS_OXIM_SAT_O2,
        0x500A => codes::RESP_RATE,
        0x4A05 => codes::PRESS_BLD_NONINV_SYS,
        0x4A06 => codes::PRESS_BLD_NONINV_DIA,
        0x4A07 => codes::PRESS_BLD_NONINV_MEAN,
        0x4B48 => codes::TEMP_BODY,
        0x50B0 => codes::CONC_AWAY_CO2_ET,
        other => panic!("sim sent unexpected physio 0x{other:04X}"),
    }
}

fn expected_ucum(unit: u16) -> &'static str {
    match unit {
        0x0AA0 | 0x0AE0 => "/min",
        0x0220 => "%",
        0x0F20 => "mm[Hg]",
        0x17A0 => "Cel",
        other => panic!("sim sent unexpected unit 0x{other:04X}"),
    }
}

fn has(r: &Reading, f: QualityFlag) -> bool {
    r.flags.contains(&(f as i32))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intellivue_driver_reads_the_simulated_monitor_over_a_pty() {
    let (_dir_guard, dir) = test_dir("intellivue-pty");
    let pty = PtyPair::new(&dir, "serial").unwrap();
    let mut sim = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args([
            "intellivue",
            "--scenario",
            "artefacts",
            "--seed",
            "7",
            "--echo",
        ])
        .args(["--go-silent-after-s", "6"])
        .arg("--port")
        .arg(&pty.device)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("device-sim");
    let stdout = sim.stdout.take().unwrap();
    let _sim = Proc::guard(sim);
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    {
        let sent = sent.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(s) = parse_sent(&line) {
                    sent.lock().unwrap().push(s);
                }
            }
        });
    }

    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let stats = Arc::new(DriverStats::default());
    let proto = Intellivue::new(IntellivueOptions {
        clock_offset_minutes: 0,
        poll_interval_ms: 500,
    })
    .unwrap();
    let driver = tokio::spawn(run_serial(
        proto,
        "iv-1".into(),
        pty.host.display().to_string(),
        SERIAL,
        RunOptions {
            silence: Duration::from_secs(2),
            max_backoff: Duration::from_secs(1),
            ..RunOptions::default()
        },
        stats.clone(),
        tx,
        shutdown,
    ));

    let mut technical = Vec::new();
    let mut readings: Vec<Reading> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    // Collect until a SILENT/DISCONNECTED technical reading follows data.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let out = tokio::time::timeout(left, rx.recv())
            .await
            .expect("silence reported in time")
            .expect("driver running");
        assert_eq!(out.device_id, "iv-1");
        readings.extend(out.readings);
        let mut down = false;
        for t in out.technical {
            let k = TechnicalKind::try_from(t.kind).unwrap();
            down |= matches!(k, TechnicalKind::Silent | TechnicalKind::Disconnected);
            technical.push(k);
        }
        if down {
            break;
        }
    }
    stop.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;

    assert_eq!(
        technical.first(),
        Some(&TechnicalKind::Connected),
        "{technical:?}"
    );
    assert!(
        matches!(
            technical.last(),
            Some(TechnicalKind::Silent | TechnicalKind::Disconnected)
        ),
        "{technical:?}"
    );
    // 9 values per poll; several polls in 6 s at 500 ms.
    assert!(readings.len() >= 27, "only {} readings", readings.len());
    assert_eq!(readings.len() % 9, 0);

    let sent = sent.lock().unwrap().clone();
    assert!(
        sent.len() >= readings.len(),
        "sim echoed {} values, driver emitted {}",
        sent.len(),
        readings.len()
    );
    let (mut checked_missing, mut checked_flagged_value, mut checked_calib) = (0, 0, 0);
    // The driver emits values in the order the monitor sent them.
    for (r, s) in readings.iter().zip(sent.iter()) {
        assert_eq!(r.mdc_code, expected_mdc(s.physio), "{s:?}");
        assert_eq!(r.mdc_unit, (4 << 16) | u32::from(s.unit));
        assert_eq!(r.ucum_unit, expected_ucum(s.unit));
        match s.special.as_str() {
            "-" => {
                let want = s.mantissa as f64 * 10f64.powi(s.exponent);
                let Some(Value::Numeric(got)) = r.value else {
                    panic!("{s:?} -> {r:?}")
                };
                assert!((got - want).abs() < 1e-9, "{s:?}: {got} != {want}");
                if s.state == 0 {
                    assert_eq!(r.validity, Validity::Valid as i32, "{s:?}");
                } else {
                    // INVALID with a value: kept, flagged invalid.
                    assert_eq!(s.state, 0x8000);
                    assert_eq!(r.validity, Validity::Invalid as i32);
                    checked_flagged_value += 1;
                }
            }
            special => {
                assert_eq!(r.value, None, "{special} must never become a number");
                assert_eq!(r.validity, Validity::Invalid as i32);
                assert!(has(r, QualityFlag::ValueMissing), "{r:?}");
                if s.state == 0x2000 {
                    checked_missing += 1;
                }
                if s.state == 0x1000 {
                    assert!(has(r, QualityFlag::Calibrating));
                    checked_calib += 1;
                }
                if matches!(special, "+INF" | "-INF" | "NRes") {
                    assert!(has(r, QualityFlag::OutOfDeviceRange));
                }
            }
        }
    }
    assert!(checked_missing > 0, "an UNAVAILABLE SpO2 was seen");
    assert!(checked_flagged_value > 0, "an INVALID pulse rate was seen");
    assert!(checked_calib > 0, "a calibrating etCO2 was seen");
    let snap = stats.snapshot();
    assert_eq!(snap.frames_bad, 0, "{snap:?}");
    assert!(snap.frames_ok > 3);
}
