//! Modbus interop, both directions, against an independent implementation
//! (pymodbus 3.16.1, installed by scripts/setup.sh), plus RTU over a PTY:
//! (a) the Vigil driver reads a pymodbus TCP server holding known registers
//!     (f32 in CDAB order, an invalid sentinel) and the readings match;
//!     asked for a unit the server does not serve, it counts exceptions;
//! (b) a pymodbus client reads the `device-sim modbus` TCP server and gets
//!     the registers the simulator says it serves, and pymodbus's own float
//!     decoding gives the simulator's values;
//! (c) the driver reads `device-sim modbus --port` over a socat PTY pair
//!     (RTU framing, CRC), sensor-off sentinels become invalid readings, and
//!     a slave that stops answering is reported SILENT.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_drivers::modbus::{Framing, Modbus, ModbusOptions, SERIAL};
use device_drivers::{DriverOutput, DriverStats, RunOptions, run_link, run_serial};
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{QualityFlag, Reading, TechnicalKind, Validity, reading::Value};
use vigil_e2e::{Proc, PtyPair, test_dir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn map(name: &str) -> PathBuf {
    repo().join("edge-agent/maps").join(name)
}

fn py(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// python3 with pymodbus 3.16.1, or a clear failure.
fn require_pymodbus() {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import sys, pymodbus; sys.exit(pymodbus.__version__ != '3.16.1')",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with pymodbus 3.16.1 is required for the Modbus interop tests: run scripts/setup.sh"
    );
}

/// A free loopback port (pick and release).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Lines of a child's stdout, on a channel.
fn lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn line_with(rx: &std::sync::mpsc::Receiver<String>, prefix: &str) -> String {
    let t0 = Instant::now();
    loop {
        let left = Duration::from_secs(15).saturating_sub(t0.elapsed());
        let l = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line starting with {prefix:?}"));
        if l.starts_with(prefix) {
            return l;
        }
    }
}

/// `step n=0 RR=16 VT=none … | holding=0:16,1:450 input=…` → (values by
/// label, registers by table).
type Step = (
    HashMap<String, Option<f64>>,
    HashMap<String, Vec<(u16, u16)>>,
);
fn parse_step(line: &str) -> Step {
    let (vals, regs) = line.split_once(" | ").unwrap_or((line, ""));
    let values = vals
        .split_whitespace()
        .skip(2)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse::<f64>().ok()))
        .collect();
    let tables = regs
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(t, list)| {
            let items = list
                .split(',')
                .map(|av| {
                    let (a, v) = av.split_once(':').unwrap();
                    (a.parse().unwrap(), v.parse().unwrap())
                })
                .collect();
            (t.to_string(), items)
        })
        .collect();
    (values, tables)
}

struct Driver {
    rx: tokio::sync::mpsc::Receiver<DriverOutput>,
    stats: Arc<DriverStats>,
    _stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn options(map_file: &str, unit_id: u8) -> ModbusOptions {
    ModbusOptions {
        unit_id,
        map: Some(map(map_file)),
        poll_interval_ms: 200,
        response_timeout_ms: 300,
        ..ModbusOptions::default()
    }
}

fn tcp_driver(addr: String, opts: ModbusOptions) -> Driver {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let stats = Arc::new(DriverStats::default());
    let proto = Modbus::new(Framing::Tcp, opts).unwrap();
    let a = addr.clone();
    let connect = move || tokio::net::TcpStream::connect(a.clone());
    let task = tokio::spawn(run_link(
        proto,
        "mb-1".into(),
        addr,
        connect,
        RunOptions {
            silence: Duration::from_millis(1500),
            ..RunOptions::default()
        },
        stats.clone(),
        tx,
        shutdown,
    ));
    Driver {
        rx,
        stats,
        _stop: stop,
        task,
    }
}

/// Collect output until `done` says so (or fail after `within`).
async fn collect(
    d: &mut Driver,
    within: Duration,
    mut done: impl FnMut(&[DriverOutput]) -> bool,
) -> Vec<DriverOutput> {
    let mut outs = vec![];
    let t0 = Instant::now();
    while !done(&outs) {
        let left = within.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, d.rx.recv()).await {
            Ok(Some(o)) => outs.push(o),
            _ => panic!("driver output in time; got {outs:#?}"),
        }
    }
    outs
}

fn readings(outs: &[DriverOutput]) -> Vec<&Reading> {
    outs.iter().flat_map(|o| &o.readings).collect()
}

fn technical(outs: &[DriverOutput]) -> Vec<i32> {
    outs.iter()
        .flat_map(|o| &o.technical)
        .map(|t| t.kind)
        .collect()
}

fn by_label<'a>(rs: &[&'a Reading], label: &str) -> Vec<&'a Reading> {
    rs.iter()
        .copied()
        .filter(|r| r.vendor_label == label)
        .collect()
}

fn num(r: &Reading) -> Option<f64> {
    match r.value {
        Some(Value::Numeric(v)) => Some(v),
        _ => None,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9 * b.abs().max(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vigil_driver_reads_a_pymodbus_tcp_server() {
    require_pymodbus();
    let port = free_port();
    let mut server = Proc::guard(
        Command::new("python3")
            .arg(py("modbus_server.py"))
            .args([port.to_string(), "3".into()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let out = lines(&mut server.child);
    line_with(&out, "ready");
    let addr = format!("127.0.0.1:{port}");

    let mut d = tcp_driver(addr.clone(), options("sim-ventilator.toml", 3));
    let outs = collect(&mut d, Duration::from_secs(15), |o| {
        let rs = readings(o);
        ["RR", "VT", "PIP", "PEEP", "FiO2", "Pmean"]
            .iter()
            .all(|l| !by_label(&rs, l).is_empty())
    })
    .await;
    assert_eq!(technical(&outs)[0], TechnicalKind::Connected as i32);
    let rs = readings(&outs);
    let check = |label: &str, mdc: u32, unit: shared_protocol::catalogue::Unit, v: f64| {
        let r = by_label(&rs, label)[0];
        assert_eq!(r.mdc_code, mdc, "{label}");
        assert_eq!((r.mdc_unit, r.ucum_unit.as_str()), (unit.mdc, unit.ucum));
        assert_eq!(r.validity, Validity::Valid as i32, "{label}");
        let got = num(r).unwrap();
        assert!(close(got, v), "{label}: {got} != {v}");
    };
    check("RR", codes::RESP_RATE, units::RESP_PER_MIN, 16.0);
    check("VT", codes::VENT_VOL_TIDAL, units::MILLI_L, 450.0);
    // f32 in CDAB order, as pymodbus's word_order="little" encodes it.
    check("PIP", codes::VENT_PRESS_AWAY_MAX, units::HECTO_PA, 22.5);
    check("FiO2", codes::CONC_AWAY_O2_INSP, units::PERCENT, 40.5);
    check("Pmean", codes::VENT_PRESS_AWAY_MEAN, units::HECTO_PA, 11.25);
    // 0x7FFF is the map's sentinel: no value, INVALID + VALUE_MISSING.
    let peep = by_label(&rs, "PEEP")[0];
    assert_eq!(peep.value, None);
    assert_eq!(peep.validity, Validity::Invalid as i32);
    assert_eq!(peep.flags, [QualityFlag::ValueMissing as i32]);
    assert_eq!(peep.mdc_code, codes::VENT_PRESS_AWAY_END_EXP_POS);
    d.task.abort();

    // The same server asked for unit 1 (not served): pymodbus answers with
    // an exception; the driver counts them and makes up nothing.
    let mut d = tcp_driver(addr, options("sim-ventilator.toml", 1));
    let t0 = Instant::now();
    while d.stats.snapshot().exceptions < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "exceptions counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut got = vec![];
    while let Ok(o) = d.rx.try_recv() {
        got.push(o);
    }
    assert!(readings(&got).is_empty(), "{got:?}");
    d.task.abort();
}

#[test]
fn pymodbus_client_reads_the_device_sim_tcp_server() {
    require_pymodbus();
    for (map_file, table, count, floats) in [
        (
            "sim-ventilator.toml",
            "holding",
            10,
            vec![("2", "little", "PIP"), ("8", "big", "Pmean")],
        ),
        ("sim-multiparameter.toml", "input", 34, vec![]),
    ] {
        let mut sim = Proc::guard(
            Command::new(env!("CARGO_BIN_EXE_device-sim"))
                .args(["modbus", "--listen", "127.0.0.1:0", "--unit-id", "2"])
                .arg("--map")
                .arg(map(map_file))
                .args(["--step-ms", "600000", "--echo"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let out = lines(&mut sim.child);
        let listening = line_with(&out, "listening ");
        let addr: std::net::SocketAddr = listening["listening ".len()..].parse().unwrap();
        assert_ne!(addr.port(), 0);
        let (values, tables) = parse_step(&line_with(&out, "step n=0"));
        let served = &tables[table];

        let mut cmd = Command::new("python3");
        cmd.arg(py("modbus_client.py")).args([
            "127.0.0.1".to_string(),
            addr.port().to_string(),
            "2".into(),
            table.into(),
            "0".into(),
            count.to_string(),
        ]);
        for (a, order, _) in &floats {
            cmd.args(["f32", a, order]);
        }
        let o = cmd.output().expect("python3");
        assert!(
            o.status.success(),
            "pymodbus client: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = String::from_utf8(o.stdout).unwrap();
        let mut fields = text.split_whitespace();
        let regs: HashMap<u16, u16> = fields.next().unwrap()["regs=".len()..]
            .split(',')
            .map(|av| {
                let (a, v) = av.split_once(':').unwrap();
                (a.parse().unwrap(), v.parse().unwrap())
            })
            .collect();
        // Every register the simulator says it serves, pymodbus read.
        for (a, v) in served {
            assert_eq!(regs.get(a), Some(v), "{map_file} {table} {a}");
        }
        // pymodbus's own float decoding agrees with the simulator's values.
        for (f, (a, _, label)) in fields.zip(&floats) {
            let (k, v) = f.split_once('=').unwrap();
            assert_eq!(k, format!("f32@{a}"));
            let v: f64 = v.parse().unwrap();
            assert_eq!(Some(v), values[*label], "{label}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vigil_driver_reads_device_sim_rtu_over_a_pty_and_reports_silence() {
    let (_dir_guard, dir) = test_dir("modbus-rtu");
    let pty = PtyPair::new(&dir, "modbus").unwrap();

    // Steps of 500 ms, sensor off in the last 3 of every 6; silent after 5 s.
    let mut sim = Proc::guard(
        Command::new(env!("CARGO_BIN_EXE_device-sim"))
            .args(["modbus", "--port"])
            .arg(&pty.device)
            .args(["--unit-id", "5", "--scenario", "sensor-off"])
            .arg("--map")
            .arg(map("sim-multiparameter.toml"))
            .args(["--step-ms", "500", "--go-silent-after-s", "5", "--echo"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = lines(&mut sim.child);
    let (on, _) = parse_step(&line_with(&out, "step n=0"));

    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let stats = Arc::new(DriverStats::default());
    let proto = Modbus::new(Framing::Rtu, options("sim-multiparameter.toml", 5)).unwrap();
    let task = tokio::spawn(run_serial(
        proto,
        "mp-1".into(),
        pty.host.display().to_string(),
        SERIAL,
        RunOptions {
            silence: Duration::from_millis(1500),
            ..RunOptions::default()
        },
        stats.clone(),
        tx,
        shutdown,
    ));
    let mut d = Driver {
        rx,
        stats,
        _stop: stop,
        task,
    };
    let outs = collect(&mut d, Duration::from_secs(20), |o| {
        technical(o).contains(&(TechnicalKind::Silent as i32))
    })
    .await;
    let tech = technical(&outs);
    assert_eq!(tech[0], TechnicalKind::Connected as i32);
    let rs = readings(&outs);
    // Every numeric reading is the simulator's "on" value for its point;
    // sensor-off readings carry no value.
    for label in [
        "HR",
        "SpO2",
        "PR",
        "NIBP_SYS",
        "NIBP_DIA",
        "NIBP_MEAN",
        "TEMP",
        "WEIGHT",
    ] {
        let want = on[label].unwrap();
        let got = by_label(&rs, label);
        assert!(!got.is_empty(), "{label} read");
        for r in &got {
            match num(r) {
                Some(v) => assert!(close(v, want), "{label}: {v} != {want}"),
                None => {
                    assert!(matches!(label, "HR" | "SpO2" | "PR"), "{label} {r:?}");
                    assert_eq!(r.validity, Validity::Invalid as i32);
                    assert_eq!(r.flags, [QualityFlag::ValueMissing as i32]);
                }
            }
        }
    }
    let spo2 = by_label(&rs, "SpO2");
    assert!(spo2.iter().any(|r| num(r).is_some()), "valid SpO2 seen");
    assert!(
        spo2.iter().any(|r| r.value.is_none()),
        "sensor-off SpO2 seen"
    );
    let r = spo2[0];
    assert_eq!(r.mdc_code, codes::PULS_OXIM_SAT_O2);
    assert_eq!(r.mdc_unit, units::PERCENT.mdc);
    let t = by_label(&rs, "TEMP")[0];
    assert_eq!(
        (t.mdc_code, t.ucum_unit.as_str()),
        (codes::TEMP_BODY, "Cel")
    );
    let snap = d.stats.snapshot();
    assert!(snap.frames_ok >= 5, "{snap:?}");
    assert!(snap.timeouts >= 1, "{snap:?}");
    d.task.abort();
    drop(sim);
    let _ = std::fs::remove_dir_all(&dir);
}
