//! Memory of the release agent with 16 simulated devices delivering to a
//! real hub: 8 Masimo oximeters on socat PTY pairs (1 line/s, 3 readings),
//! 4 Modbus TCP ventilators (`maps/sim-ventilator.toml`, polled every
//! second) and 4 HL7 v2 senders on the agent's MLLP listeners (1 ORU/s),
//! all `device-sim`. After a warm-up, VmRSS is sampled every second; the
//! steady RSS is the median sample, the peak is VmHWM at the end. Repeated
//! runs give median (min–max).
//!
//! Run: `cargo build --release -p cloud-hub -p firmware-shims && cargo bench -p edge-agent --bench agent_rss`
//! (`-- --quick`: one short run, for smoke tests). Needs `socat`.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const MASIMO: usize = 8;
const MODBUS: usize = 4;
const HL7: usize = 4;

struct Run {
    steady_kib: f64,
    peak_kib: f64,
    delivered: f64,
    secs: f64,
}

fn pty_pair(dir: &Path, i: usize) -> Proc {
    let dev = dir.join(format!("dev{i}"));
    let host = dir.join(format!("host{i}"));
    let p = Proc(
        Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", dev.display()))
            .arg(format!("pty,raw,echo=0,link={}", host.display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (apt-get install socat)"),
    );
    wait_for(Duration::from_secs(10), "PTY links", || {
        (dev.exists() && host.exists()).then_some(())
    });
    p
}

fn one_run(warmup: Duration, sample: Duration) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut procs: Vec<Proc> = Vec::new();
    let hub = start_hub(d, "gw-bench");
    let sim = sibling_bin("device-sim");
    let map = Path::new(env!("CARGO_MANIFEST_DIR")).join("maps/sim-ventilator.toml");

    let mut devices = String::new();
    for i in 0..MASIMO {
        procs.push(pty_pair(d, i));
        procs.push(Proc(
            Command::new(&sim)
                .args(["masimo", "--scenario", "stable", "--port"])
                .arg(d.join(format!("dev{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        devices.push_str(&format!(
            "[[device]]\nkind = \"masimo-serial\"\nid = \"masimo-{i}\"\nport = \"{}\"\n\n",
            d.join(format!("host{i}")).display()
        ));
    }
    for i in 0..MODBUS {
        let (p, line) = spawn_reporting(
            Command::new(&sim)
                .args(["modbus", "--listen", "127.0.0.1:0", "--map"])
                .arg(&map)
                .stderr(Stdio::null()),
        );
        procs.push(p);
        let addr = line.strip_prefix("listening ").unwrap().trim().to_string();
        devices.push_str(&format!(
            "[[device]]\nkind = \"modbus-tcp\"\nid = \"vent-{i}\"\naddress = \"{addr}\"\n\
             [device.options]\nmap = \"{}\"\nunit_id = 1\n\n",
            map.display()
        ));
    }
    let mut hl7_ports = Vec::new();
    for i in 0..HL7 {
        let port = free_port();
        hl7_ports.push(port);
        devices.push_str(&format!(
            "[[device]]\nkind = \"hl7-mllp\"\nid = \"hl7-{i}\"\nlisten = \"127.0.0.1:{port}\"\n\n"
        ));
    }
    let status = format!("127.0.0.1:{}", free_port());
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "gateway_id = \"gw-bench\"\ndata_dir = \"agent-data\"\n[status]\nlisten = \"{status}\"\n\
             [uplink]\nurl = \"{}\"\ntoken_file = \"{}\"\n\n{devices}",
            hub.ingest_url,
            hub.token_file.display()
        ),
    )
    .unwrap();
    let agent = Proc(
        Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();
    wait_for(Duration::from_secs(30), "agent status endpoint", || {
        http_get(&status, "/metrics")
    });
    for port in &hl7_ports {
        procs.push(Proc(
            Command::new(&sim)
                .args(["hl7", "--count", "1000000", "--interval-ms", "1000", "--to"])
                .arg(format!("127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }
    let acked = || {
        http_get(&status, "/metrics")
            .and_then(|t| metric(&t, "vigil_agent_uplink_items_total{outcome=\"accepted\"}"))
            .unwrap_or(0.0)
    };
    std::thread::sleep(warmup);
    let (a0, t0) = (acked(), Instant::now());
    let mut samples = Vec::new();
    while t0.elapsed() < sample {
        std::thread::sleep(Duration::from_secs(1));
        samples.push(rss_kib(pid).expect("agent alive").0 as f64);
    }
    let delivered = acked() - a0;
    let secs = t0.elapsed().as_secs_f64();
    let (_, peak) = rss_kib(pid).unwrap();
    // Every device must have contributed (a dead simulator would flatter
    // the figure).
    let text = http_get(&status, "/metrics").unwrap();
    for id in (0..MASIMO)
        .map(|i| format!("masimo-{i}"))
        .chain((0..MODBUS).map(|i| format!("vent-{i}")))
    {
        let ok = metric(
            &text,
            &format!("vigil_agent_device_frames_total{{device=\"{id}\",outcome=\"ok\"}}"),
        )
        .unwrap_or(0.0);
        assert!(ok > 0.0, "{id} delivered no frames; see {}", d.display());
    }
    drop(agent);
    drop(procs);
    drop(hub);
    Run {
        steady_kib: stats(samples).0,
        peak_kib: peak as f64,
        delivered,
        secs,
    }
}

fn main() {
    let quick = quick();
    let (runs, warmup, sample) = if quick {
        (1, Duration::from_secs(3), Duration::from_secs(5))
    } else {
        (3, Duration::from_secs(30), Duration::from_secs(60))
    };
    println!(
        "agent RSS, {} devices ({MASIMO} masimo-serial via socat PTY, {MODBUS} modbus-tcp, {HL7} hl7-mllp), \
         release build, warm-up {warmup:?}, sampling {sample:?}, {runs} run(s)",
        MASIMO + MODBUS + HL7
    );
    let mut steady = Vec::new();
    let mut peak = Vec::new();
    for r in 0..runs {
        let run = one_run(warmup, sample);
        println!(
            "run {}: steady RSS {:.1} MiB, peak (VmHWM) {:.1} MiB, {:.0} readings/s delivered",
            r + 1,
            run.steady_kib / 1024.0,
            run.peak_kib / 1024.0,
            run.delivered / run.secs
        );
        steady.push(run.steady_kib / 1024.0);
        peak.push(run.peak_kib / 1024.0);
    }
    let (sm, s0, s1) = stats(steady);
    let (pm, p0, p1) = stats(peak);
    println!("steady RSS: median {sm:.1} MiB (min {s0:.1}, max {s1:.1})");
    println!("peak RSS:   median {pm:.1} MiB (min {p0:.1}, max {p1:.1})");
}
