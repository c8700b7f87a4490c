//! Drain rate of a 24 h backlog for 16 devices. The buffer is filled through
//! the agent's own `Buffer` API with what 16 devices produce in 24 h at
//! 1 Hz × 4 metrics (SpO2, pulse rate, perfusion index, respiration rate:
//! one record of 4 readings per device per second, 5 529 600 readings),
//! then the release `edge-agent` binary (no devices) delivers it to a real
//! `cloud-hub` over loopback HTTP until the buffer is empty (read from the
//! agent's `/metrics`). Reported: readings/s and the multiple of real time
//! (24 h of data / drain time), median (min–max) over the runs.
//!
//! The backlog is paced by `uplink.backlog_rate_per_s` (default 10 000/s,
//! which alone allows 10 000 / 64 = 156× real time for this load); the
//! bench lifts it (`backlog_rate_per_s = 1000000`) to measure the pipeline,
//! and keeps every other uplink default (500-reading, 128 KiB batches).
//!
//! Run: `cargo build --release -p cloud-hub && cargo bench -p edge-agent --bench drain`
//! (`-- --quick`: 15 min of backlog, one run, for smoke tests;
//! `VIGIL_BENCH_RUNS=n` sets the number of runs, `VIGIL_BENCH_HOURS=h` the
//! backlog length).

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use device_drivers::DriverOutput;
use edge_agent::buffer::{Buffer, Keyring, Limits};
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Reading, reading::Value};
use support::*;

const DEVICES: u64 = 16;
const METRICS: u64 = 4;

fn reading(
    code: u32,
    unit: &shared_protocol::catalogue::Unit,
    ucum: &str,
    v: f64,
    t_us: i64,
) -> Reading {
    Reading {
        mdc_code: code,
        value: Some(Value::Numeric(v)),
        mdc_unit: unit.mdc,
        ucum_unit: ucum.into(),
        device_time_us: t_us,
        time_source: 2,
        gateway_time_us: t_us + 20_000,
        validity: 1,
        ..Default::default()
    }
}

/// Fill `dir` with `secs` seconds of 16 devices at 1 Hz × 4 metrics ending
/// now; returns (readings, fill seconds).
fn fill(dir: &std::path::Path, key: [u8; 32], secs: u64) -> (u64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let buffer = Buffer::open_with(
        dir,
        &Keyring::single(key),
        Limits {
            max_bytes: 8 << 30,
            ..Limits::default()
        },
    )
    .unwrap();
    let now_us = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
    let start_us = now_us - secs as i64 * 1_000_000;
    let t = Instant::now();
    let mut n = 0u64;
    let mut group = Vec::with_capacity(256);
    for s in 0..secs {
        let t_us = start_us + s as i64 * 1_000_000;
        for d in 0..DEVICES {
            let w = ((s + d * 7) % 10) as f64;
            group.push(DriverOutput {
                device_id: format!("bed-{d:02}"),
                serial_number: Some(format!("SN{d:04}")),
                readings: vec![
                    reading(
                        codes::PULS_OXIM_SAT_O2,
                        &units::PERCENT,
                        "%",
                        94.0 + w / 2.0,
                        t_us,
                    ),
                    reading(
                        codes::PULS_OXIM_PULS_RATE,
                        &units::BEAT_PER_MIN,
                        "/min",
                        70.0 + w,
                        t_us,
                    ),
                    reading(
                        codes::PULS_OXIM_PERF_REL,
                        &units::PERCENT,
                        "%",
                        2.0 + w / 10.0,
                        t_us,
                    ),
                    reading(
                        codes::RESP_RATE,
                        &units::RESP_PER_MIN,
                        "/min",
                        14.0 + w / 5.0,
                        t_us,
                    ),
                ],
                ..Default::default()
            });
            n += METRICS;
            // The agent's writer commits up to 256 driver outputs at once.
            if group.len() == 256 {
                rt.block_on(buffer.append(std::mem::take(&mut group)))
                    .unwrap();
            }
        }
    }
    if !group.is_empty() {
        rt.block_on(buffer.append(group)).unwrap();
    }
    rt.block_on(buffer.flush()).unwrap();
    assert_eq!(buffer.pending_readings(), n);
    (n, t.elapsed().as_secs_f64())
}

struct Run {
    readings: u64,
    fill_s: f64,
    drain_s: f64,
}

fn one_run(secs: u64) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub(d, "gw-drain");
    let data = d.join("agent-data");
    std::fs::create_dir_all(&data).unwrap();
    let key = edge_agent::secrets::load_or_create_key(&data.join("buffer.key")).unwrap();
    let (readings, fill_s) = fill(&data, key, secs);
    let status = format!("127.0.0.1:{}", free_port());
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "gateway_id = \"gw-drain\"\ndata_dir = \"agent-data\"\n[buffer]\nmax_bytes = 8589934592\n\
             [status]\nlisten = \"{status}\"\n[uplink]\nurl = \"{}\"\ntoken_file = \"{}\"\n\
             backlog_rate_per_s = 1000000\n",
            hub.ingest_url,
            hub.token_file.display()
        ),
    )
    .unwrap();
    let t = Instant::now();
    let _agent = Proc(
        Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let acked = wait_for(Duration::from_secs(3 * 3600), "an empty buffer", || {
        let text = http_get(&status, "/metrics")?;
        (metric(&text, "vigil_agent_buffer_items")? == 0.0).then(|| {
            metric(
                &text,
                "vigil_agent_uplink_items_total{outcome=\"accepted\"}",
            )
            .unwrap_or(0.0)
        })
    });
    let drain_s = t.elapsed().as_secs_f64();
    assert_eq!(
        acked as u64,
        readings,
        "every reading accepted by the hub; see {}",
        d.display()
    );
    drop(hub);
    Run {
        readings,
        fill_s,
        drain_s,
    }
}

fn main() {
    let quick = quick();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
    let hours = env("VIGIL_BENCH_HOURS").unwrap_or(if quick { 0.25 } else { 24.0 });
    let runs = env("VIGIL_BENCH_RUNS").unwrap_or(if quick { 1.0 } else { 3.0 }) as usize;
    let secs = (hours * 3600.0) as u64;
    println!(
        "drain of a {hours} h backlog: {DEVICES} devices x 1 Hz x {METRICS} metrics \
         ({} readings/s real time, {} readings), release build, loopback HTTP, {runs} run(s)",
        DEVICES * METRICS,
        secs * DEVICES * METRICS
    );
    let (mut rates, mut multiples) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let run = one_run(secs);
        let rate = run.readings as f64 / run.drain_s;
        let multiple = secs as f64 / run.drain_s;
        println!(
            "run {}: filled in {:.1} s ({:.0} readings/s); drained in {:.1} s: {rate:.0} readings/s = {multiple:.0}x real time",
            r + 1,
            run.fill_s,
            run.readings as f64 / run.fill_s,
            run.drain_s
        );
        rates.push(rate);
        multiples.push(multiple);
    }
    let (rm, r0, r1) = stats(rates);
    let (mm, m0, m1) = stats(multiples);
    println!("drain rate: median {rm:.0} readings/s (min {r0:.0}, max {r1:.0})");
    println!("real-time multiple: median {mm:.0}x (min {m0:.0}x, max {m1:.0}x)");
}
