//! Lake backfill throughput: a SQLite store is filled with N readings
//! through the store's ingest (`IngestStore::ingest`, the ingest path
//! without HTTP: 100 devices on one gateway, each associated with its own
//! patient, four vitals, values varying, effective times spread over the
//! 3 days before now, batches of 1 000 readings), then backfilled to
//! Azurite (started on a free loopback port) with `cloud_hub::lake`, once
//! per run into a fresh container. Prints the readings/s of each run and
//! their median, and the files and bytes per layer.
//!
//! Run: `cargo bench -p cloud-hub --bench lake -- --readings 1000000 --runs 3`
//! (defaults; `--quick` = 50 k readings, one run). Needs Azurite and the lake
//! venv (scripts/setup.sh).

#[path = "../tests/support/azurite.rs"]
mod azurite;
mod support;

use std::time::Instant;

use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Batch, Reading, reading};

const DEVICES: u64 = 100;
const PER_BATCH_PER_DEVICE: u64 = 10;
const SPAN_US: i64 = 3 * 24 * 3_600_000_000;

/// (MDC code, MDC unit, UCUM unit, base value, spread).
const VITALS: [(u32, u32, &str, f64, u64); 4] = [
    (codes::PULS_OXIM_SAT_O2, units::PERCENT.mdc, "%", 90.0, 10),
    (
        codes::PULS_OXIM_PULS_RATE,
        units::BEAT_PER_MIN.mdc,
        "/min",
        55.0,
        60,
    ),
    (codes::RESP_RATE, units::RESP_PER_MIN.mdc, "/min", 10.0, 20),
    (codes::TEMP_BODY, units::DEGC.mdc, "Cel", 36.0, 3),
];

fn fill(store: &hub_transport::Store, n: u64, t_end: i64) -> f64 {
    let associations: hub_storage::Associations = (0..DEVICES)
        .map(|d| {
            (
                ("gw-bench".to_owned(), format!("dev-{d}")),
                format!("p-{d}"),
            )
        })
        .collect();
    let started = Instant::now();
    let per_batch = DEVICES * PER_BATCH_PER_DEVICE;
    let mut i = 0u64;
    let mut batch_seq = 0u64;
    while i < n {
        batch_seq += 1;
        let mut devices = support::bench_devices(DEVICES);
        for _ in 0..per_batch.min(n - i) {
            let d = (i % DEVICES) as usize;
            let k = i / DEVICES;
            let (mdc, unit, ucum, base, spread) = VITALS[(k % 4) as usize];
            let t = t_end - SPAN_US + (i as i128 * SPAN_US as i128 / n as i128) as i64;
            devices[d].readings.push(Reading {
                mdc_code: mdc,
                value: Some(reading::Value::Numeric(base + (k % spread) as f64)),
                mdc_unit: unit,
                ucum_unit: ucum.into(),
                device_time_us: t,
                gateway_time_us: t,
                time_source: 1,
                validity: 1,
                sequence: k + 1,
                ..Default::default()
            });
            i += 1;
        }
        let batch = Batch {
            gateway_id: "gw-bench".into(),
            sequence: batch_seq,
            created_time_us: t_end,
            devices,
            agent_version: "bench".into(),
            ..Default::default()
        };
        store
            .ingest("gw-bench", &batch, &associations, t_end, t_end)
            .unwrap();
    }
    started.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = support::u64_arg("--readings", if quick { 50_000 } else { 1_000_000 });
    let runs = support::u64_arg("--runs", if quick { 1 } else { 3 }).max(1);
    let dir = tempfile::tempdir().unwrap();
    let store = cloud_hub::store::Store::open(&dir.path().join("hub.sqlite"))
        .unwrap()
        .handle();
    // Rows are stored "now" minus a minute, past the export's settle time.
    let t_end = cloud_hub::store::now_us() - 120_000_000;
    let fill_s = fill(&store, n, t_end);
    println!(
        "lake bench: {n} readings ingested in {fill_s:.1} s ({:.0} readings/s)",
        n as f64 / fill_s
    );
    let az = azurite::Azurite::start();
    let key = dir.path().join("lake.key");
    hub_lake::keygen(&key).unwrap();
    let access_key = dir.path().join("azure.key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&access_key)
            .unwrap();
        f.write_all(azurite::AZURITE_KEY.as_bytes()).unwrap();
    }
    let mut rates = Vec::new();
    for run in 0..runs {
        let container = format!("lake-run-{run}");
        azurite::lake_read(&["create-container", &az.connection_string(), &container]);
        let config: hub_lake::LakeConfig = toml::from_str(&format!(
            "destination = \"azure\"\npseudonym_key_file = \"{}\"\nsettle_s = 60\n\
             [azure]\naccount = \"{}\"\ncontainer = \"{container}\"\naccess_key_file = \"{}\"\n\
             endpoint = \"{}\"\n",
            key.display(),
            azurite::AZURITE_ACCOUNT,
            access_key.display(),
            az.endpoint()
        ))
        .unwrap();
        config.validate().unwrap();
        let lake = cloud_hub::lake::Lake::open(&config).unwrap();
        let s = lake
            .export(&store, &hub_lake::NoProgress)
            .unwrap()
            .expect("lock");
        assert_eq!(s.readings, n, "{s:?}");
        rates.push(s.readings_per_s());
        println!(
            "lake bench run {}: {} readings, {} silver rows, {} files, {} bytes in {:.1} s: {:.0} readings/s",
            run + 1,
            s.readings,
            s.silver_rows,
            s.files,
            s.bytes,
            s.elapsed_ms as f64 / 1000.0,
            s.readings_per_s()
        );
        if run + 1 == runs {
            for (layer, files, bytes) in hub_lake::layer_sizes(&lake.sink).unwrap() {
                println!(
                    "lake bench layer {layer}: {files} files, {bytes} bytes ({:.1} bytes/reading)",
                    bytes as f64 / n as f64
                );
            }
        }
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "lake bench: backfill of {n} readings to Azurite: median {:.0} readings/s over {runs} runs",
        rates[rates.len() / 2]
    );
}
