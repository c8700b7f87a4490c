//! The real btleplug code path of the BLE driver against a mocked BlueZ on a
//! private D-Bus (no radio needed): discovery by advertised health service,
//! connect (ServicesResolved), GATT discovery, subscription, notifications
//! of Heart Rate and Blood Pressure measurements decoded into readings,
//! CONNECTED / DISCONNECTED once per change, and reconnection after the
//! device drops the link.
//!
//! A second pair checks that the driver keeps one system-bus connection for
//! its life: 50 disconnect/reconnect cycles and 20 refused connects leave
//! the process with one bus connection and a flat file-descriptor count.
//!
//! Needs `dbus-daemon` and Debian's `/usr/bin/python3` with python3-dbus and
//! python3-gi (scripts/setup.sh installs dbus and python3-dbusmock, which
//! bring them); a missing tool fails the test.
//!
//! libdbus reads the bus address from `DBUS_SYSTEM_BUS_ADDRESS`, and the
//! environment of this process cannot be changed without `unsafe`, so the
//! outer test starts the bus and the mock, then re-runs this test binary
//! for the inner test with the variable set. Run alone (without
//! `VIGIL_BLE_INNER`), the inner test returns at once.
#![cfg(feature = "ble")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_drivers::ble::{self, Ble, BleOptions};
use device_drivers::{DriverStats, RunOptions};
use shared_protocol::catalogue::codes;
use shared_protocol::v1::{TechnicalKind, Validity, reading::Value};

const PYTHON: &str = "/usr/bin/python3";
const INNER: &str = "inner_driver_against_mocked_bluez";
const INNER_REUSE: &str = "inner_reconnects_reuse_one_bus_connection";

/// Kills (and reaps) a child process when dropped.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn require_tools() {
    let ok = Command::new("dbus-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "dbus-daemon not found: run scripts/setup.sh (installs dbus)"
    );
    let ok = Command::new(PYTHON)
        .args([
            "-c",
            "import dbus, dbus.service, dbus.mainloop.glib; from gi.repository import GLib",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{PYTHON} cannot import dbus/gi: run scripts/setup.sh (installs python3-dbusmock)"
    );
}

/// Start a private bus; returns the daemon and its address.
fn start_bus(dir: &Path) -> (Guard, String) {
    let sock = dir.join("bus");
    let conf = dir.join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"#,
            sock.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--nopidfile", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start dbus-daemon");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line.trim().to_string();
    assert!(address.starts_with("unix:"), "dbus-daemon said {line:?}");
    (Guard(child), address)
}

fn start_mock(bus: &str, args: &[&str]) -> (Guard, std::sync::mpsc::Receiver<String>) {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-shims/ble/mock_peripheral.py");
    let mut child = Command::new(PYTHON)
        .arg(&script)
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start mock_peripheral.py");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("mock peripheral did not start");
    assert_eq!(first, "READY");
    (Guard(child), rx)
}

/// Start a private bus and the mock with `mock_args`, re-run this binary for
/// the inner test `inner` on that bus; returns the mock's stdout lines after
/// READY. Fails when the inner test does.
fn run_inner(inner: &str, mock_args: &[&str]) -> Vec<String> {
    require_tools();
    let dir = std::env::temp_dir().join(format!(
        "vigil-ble-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let _dir = TempDir(dir.clone());
    let (_bus, address) = start_bus(&dir);
    let (_mock, mock_out) = start_mock(&address, mock_args);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([inner, "--exact", "--nocapture", "--test-threads=1"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
        .env("VIGIL_BLE_INNER", "1")
        .output()
        .expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("INNER-OK"),
        "inner test failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    mock_out.try_iter().collect()
}

#[test]
fn ble_driver_discovers_connects_subscribes_and_reconnects_over_mocked_bluez() {
    let mock_out = run_inner(
        INNER,
        &[
            "--profiles",
            "hr,bp",
            "--interval-ms",
            "150",
            "--drop-after-s",
            "2",
        ],
    );
    assert_eq!(
        mock_out.first().map(String::as_str),
        Some("DROPPED"),
        "the mock dropped the link once"
    );
}

#[test]
fn ble_reconnects_and_refused_connects_reuse_one_bus_connection() {
    let mock_out = run_inner(
        INNER_REUSE,
        &[
            "--profiles",
            "hr",
            "--interval-ms",
            "50",
            "--drop-after-s",
            "0.15",
            "--cycles",
            "50",
            "--refuse",
            "20",
        ],
    );
    // 50 drops, then 20 refusals (a last DROPPED is the driver's
    // disconnect at shutdown).
    let drops = mock_out.iter().take_while(|l| *l == "DROPPED").count();
    let refusals = mock_out.iter().filter(|l| *l == "REFUSED").count();
    assert_eq!((drops, refusals), (50, 20), "{mock_out:?}");
}

/// System-bus connections owned by this process (asked of the bus itself).
fn bus_connections_of_this_process() -> usize {
    let script = "import dbus, sys\n\
        b = dbus.SystemBus()\n\
        d = dbus.Interface(b.get_object('org.freedesktop.DBus', '/org/freedesktop/DBus'), 'org.freedesktop.DBus')\n\
        pid = int(sys.argv[1])\n\
        print(sum(1 for n in d.ListNames() if n.startswith(':') and d.GetConnectionUnixProcessID(n) == pid))\n";
    let out = Command::new(PYTHON)
        .args(["-c", script, &std::process::id().to_string()])
        .output()
        .expect("ask the bus");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_reconnects_reuse_one_bus_connection() {
    if std::env::var_os("VIGIL_BLE_INNER").is_none() {
        return; // run by the outer test only, with the private bus
    }
    let ble = Ble::new(BleOptions {
        scan_timeout_ms: Some(5000),
        ..Default::default()
    })
    .unwrap();
    let stats = Arc::new(DriverStats::default());
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let opts = RunOptions {
        max_backoff: Duration::from_millis(100),
        ..Default::default()
    };
    let task = tokio::spawn(ble::run(
        ble,
        "ble-1".into(),
        None,
        opts,
        stats.clone(),
        tx,
        shutdown,
    ));
    // 50 dropped sessions, then 20 refused connects, then the 51st session.
    let mut connected = 0;
    let mut baseline = None;
    let deadline = Instant::now() + Duration::from_secs(150);
    while connected < 51 && Instant::now() < deadline {
        let Ok(Some(out)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await else {
            continue;
        };
        for t in &out.technical {
            if t.kind == TechnicalKind::Connected as i32 {
                connected += 1;
                if connected == 1 {
                    baseline = Some((bus_connections_of_this_process(), open_fds()));
                }
            }
        }
    }
    assert_eq!(connected, 51, "sessions established");
    let (bus0, fds0) = baseline.unwrap();
    let (bus1, fds1) = (bus_connections_of_this_process(), open_fds());
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("driver stops on shutdown")
        .unwrap();
    assert_eq!(bus0, 1, "one bus connection at the first session");
    assert_eq!(bus1, 1, "still one after 50 reconnects and 20 refusals");
    assert!(
        fds1 <= fds0 + 2,
        "file descriptors grew from {fds0} to {fds1}"
    );
    assert!(stats.snapshot().link_errors >= 70, "{:?}", stats.snapshot());
    println!("INNER-OK bus={bus1} fds={fds0}->{fds1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_driver_against_mocked_bluez() {
    if std::env::var_os("VIGIL_BLE_INNER").is_none() {
        return; // run by the outer test only, with the private bus
    }
    let ble = Ble::new(BleOptions {
        scan_timeout_ms: Some(5000),
        clock_offset_minutes: 60,
        ..Default::default()
    })
    .unwrap();
    let stats = Arc::new(DriverStats::default());
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let opts = RunOptions {
        max_backoff: Duration::from_millis(500),
        ..Default::default()
    };
    // No address: found by its advertised Heart Rate / Blood Pressure service.
    let task = tokio::spawn(ble::run(
        ble,
        "ble-1".into(),
        None,
        opts,
        stats.clone(),
        tx,
        shutdown,
    ));

    let mut technical = Vec::new();
    let (mut hr, mut bp) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(40);
    // Until: connected, readings of both services, the drop, connected again,
    // and readings after the reconnect.
    let mut hr_after_reconnect = 0;
    while Instant::now() < deadline {
        let Ok(Some(out)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await else {
            continue;
        };
        assert_eq!(out.device_id, "ble-1");
        for t in &out.technical {
            technical.push(TechnicalKind::try_from(t.kind).unwrap());
        }
        for r in &out.readings {
            match r.mdc_code {
                c if c == codes::ECG_HEART_RATE => {
                    assert!(matches!(r.value, Some(Value::Numeric(v)) if v == 72.0 || v == 73.0));
                    assert_eq!(r.validity, Validity::Valid as i32);
                    hr += 1;
                    if technical.len() >= 3 {
                        hr_after_reconnect += 1;
                    }
                }
                c if c == codes::PRESS_BLD_NONINV_SYS => {
                    assert_eq!(r.value, Some(Value::Numeric(121.0)));
                    assert_eq!(r.ucum_unit, "mm[Hg]");
                    // Body movement bit → QUESTIONABLE.
                    assert_eq!(r.validity, Validity::Questionable as i32);
                    // 2026-11-24 10:05:30 at UTC+01:00.
                    assert_eq!(r.device_time_us, 1_795_511_130_000_000);
                    bp += 1;
                }
                c if c == codes::PRESS_BLD_NONINV_DIA
                    || c == codes::PRESS_BLD_NONINV_MEAN
                    || c == codes::PULS_RATE_NON_INV => {}
                other => panic!("unexpected metric {other}"),
            }
        }
        if hr_after_reconnect >= 2 && bp > 0 {
            break;
        }
    }
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("driver stops on shutdown")
        .unwrap();
    assert!(
        hr >= 2 && bp >= 1,
        "hr {hr}, bp {bp}, technical {technical:?}"
    );
    assert_eq!(
        &technical[..3],
        &[
            TechnicalKind::Connected,
            TechnicalKind::Disconnected,
            TechnicalKind::Connected
        ],
        "once per change: {technical:?}"
    );
    assert!(
        hr_after_reconnect >= 2,
        "readings after reconnect: {hr_after_reconnect}"
    );
    let s = stats.snapshot();
    assert!(s.frames_ok >= 3 && s.frames_bad == 0, "{s:?}");
    println!("INNER-OK hr={hr} bp={bp} technical={technical:?}");
}
