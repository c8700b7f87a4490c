//! End-to-end latency: a bedside device → the agent → the hub → a FHIR
//! search result. The bench plays an HL7 v2 device (ORU^R01 over MLLP to
//! the agent's `hl7-mllp` listener, one message at a time, each for a new
//! patient identifier), then polls `GET /fhir/Observation?patient=…` every
//! 2 ms until the value is there: latency = first found − send time.
//! Release agent and hub on loopback, SQLite hub store.
//!
//! Run: `cargo build --release -p cloud-hub -p firmware-shims && cargo bench -p edge-agent --bench e2e_latency`
//! (`-- --quick`: 20 messages). The agent runs with its default batching
//! (adaptive: at once when no batch is in flight, paced to one batch per
//! `uplink.batch_min_interval_ms` = 100); `VIGIL_BENCH_MIN_INTERVAL_MS` sets
//! that pacing instead. One message every ~50 ms (each waits for its
//! result, then 50 ms): a low load.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn send_oru(addr: &str, i: u32) -> String {
    let now = time::OffsetDateTime::now_utc();
    let t = format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}.{:03}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    );
    let msg = [
        format!("MSH|^~\\&|BENCH|ICU|VIGIL|HOSP|{t}||ORU^R01^ORU_R01|LAT{i:06}|P|2.6|||NE|AL"),
        format!("PID|1||LAT-{i}^^^VIGILBENCH^MR"),
        format!("OBR|1|LAT{i:06}^BENCH||182777000^monitoring of patient^SCT|||{t}"),
        format!("OBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.1.1.1|97|262688^MDC_DIM_PERCENT^MDC|||||F|||{t}"),
    ]
    .join("\r");
    let mut s = TcpStream::connect(addr).expect("agent MLLP listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut frame = vec![0x0b];
    frame.extend_from_slice(msg.as_bytes());
    frame.extend_from_slice(&[0x1c, 0x0d]);
    s.write_all(&frame).unwrap();
    let mut ack = Vec::new();
    let mut buf = [0u8; 512];
    while !ack.ends_with(&[0x1c, 0x0d]) {
        let n = s.read(&mut buf).expect("ACK");
        assert!(n > 0, "agent closed without ACK");
        ack.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&ack).into_owned()
}

fn main() {
    let n: u32 = if quick() { 20 } else { 200 };
    let interval: Option<u64> = std::env::var("VIGIL_BENCH_MIN_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok());
    let (pacing_line, pacing) = match interval {
        Some(ms) => (
            format!("batch_min_interval_ms = {ms}\n"),
            format!("batch_min_interval_ms = {ms}"),
        ),
        None => (String::new(), "agent defaults".to_owned()),
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub(d, "gw-latency");
    let base = hub.ingest_url.trim_end_matches("/api/v1/ingest").to_owned();
    let hub_addr = base.trim_start_matches("http://").to_owned();
    let mllp = format!("127.0.0.1:{}", free_port());
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "gateway_id = \"gw-latency\"\ndata_dir = \"agent-data\"\n[uplink]\nurl = \"{}\"\n\
             token_file = \"{}\"\n{pacing_line}\n[[device]]\nkind = \"hl7-mllp\"\n\
             id = \"hl7-1\"\nlisten = \"{mllp}\"\n",
            hub.ingest_url,
            hub.token_file.display()
        ),
    )
    .unwrap();
    let _agent = Proc(
        Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .current_dir(d)
            .spawn()
            .unwrap(),
    );
    wait_for(Duration::from_secs(20), "agent MLLP listener", || {
        TcpStream::connect(&mllp).ok()
    });
    let mut lat_ms = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        let ack = send_oru(&mllp, i);
        assert!(ack.contains("MSA|AA"), "{ack}");
        let path = format!("/fhir/Observation?patient=LAT-{i}&_count=1");
        loop {
            if let Some(body) = http_get(&hub_addr, &path)
                && body.contains("\"valueQuantity\"")
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "reading {i} never arrived"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        lat_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(50));
    }
    lat_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| lat_ms[((lat_ms.len() as f64 * q) as usize).min(lat_ms.len() - 1)];
    println!(
        "end-to-end latency device → agent → hub → FHIR search ({pacing}, {n} readings): \
         p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(0.5),
        pct(0.99),
        lat_ms[lat_ms.len() - 1]
    );
}
