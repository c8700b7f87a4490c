//! Hub ingest throughput into the embedded store: readings/s durably
//! committed (each batch one SQLite WAL transaction) and immediately
//! FHIR-queryable (the bench ends with a search that must find them).
//! Batches as agents send them: 16 devices per gateway, 4 metrics at 1 Hz,
//! 64 readings per device per batch (1 024 readings per batch), from 8
//! gateways, every device attributed to a patient (so the chart buckets are
//! maintained too). Medians of 5 runs with min/max.
//!
//! Run: `cargo bench -p cloud-hub --bench ingest` (`-- --quick` for a
//! smoke run with fewer batches; `-- --postgres` for the PostgreSQL
//! backend: a throwaway server per run, started like the tests' with the
//! server's default, durable commit settings (fsync on, synchronous_commit
//! on), on a free loopback port).

#[path = "../tests/support/pg_server.rs"]
mod pg_server;

use std::collections::HashMap;
use std::time::Instant;

use cloud_hub::fhir::parse_search;
use cloud_hub::pg::PgConfig;
use cloud_hub::store::Store;
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Batch, DeviceData, DeviceInfo, Reading, reading};

const GATEWAYS: usize = 8;
const DEVICES: usize = 16;
const PER_DEVICE: usize = 64;
const T0: i64 = 1_795_514_400_000_000;

fn batch(gateway: usize, seq: u64) -> Batch {
    let metrics = [
        (codes::PULS_OXIM_SAT_O2, units::PERCENT.mdc, "%", 97.0),
        (
            codes::PULS_OXIM_PULS_RATE,
            units::BEAT_PER_MIN.mdc,
            "/min",
            72.0,
        ),
        (codes::RESP_RATE, units::RESP_PER_MIN.mdc, "/min", 16.0),
        (codes::TEMP_BODY, units::DEGC.mdc, "Cel", 36.8),
    ];
    let devices = (0..DEVICES)
        .map(|d| DeviceData {
            device: Some(DeviceInfo {
                device_id: format!("dev-{d}"),
                protocol: "masimo-ascii1".into(),
                manufacturer: "Masimo".into(),
                model: "Radical-7".into(),
                serial_number: format!("SN{d}"),
                location: String::new(),
            }),
            readings: (0..PER_DEVICE)
                .map(|i| {
                    let n = seq as usize * PER_DEVICE + i;
                    let (mdc, unit, ucum, v) = metrics[i % metrics.len()];
                    Reading {
                        mdc_code: mdc,
                        vendor_label: String::new(),
                        value: Some(reading::Value::Numeric(v + (n % 3) as f64)),
                        mdc_unit: unit,
                        ucum_unit: ucum.into(),
                        device_time_us: T0 + (n / metrics.len()) as i64 * 1_000_000,
                        gateway_time_us: T0 + (n / metrics.len()) as i64 * 1_000_000 + 500,
                        time_source: 1,
                        validity: 1,
                        sequence: n as u64,
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    Batch {
        gateway_id: format!("gw-{gateway}"),
        sequence: seq,
        created_time_us: T0,
        devices,
        agent_version: "bench".into(),
        gateway_events: vec![],
        traceparent: String::new(),
        incarnation: 0,
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let postgres = std::env::args().any(|a| a == "--postgres");
    let batches_per_gateway: u64 = if quick { 4 } else { 40 };
    let runs = if quick { 1 } else { 5 };
    let batches: Vec<(String, Batch)> = (0..batches_per_gateway)
        .flat_map(|s| (0..GATEWAYS).map(move |g| (format!("gw-{g}"), batch(g, s))))
        .collect();
    let readings = (batches.len() * DEVICES * PER_DEVICE) as f64;
    let mut rates = vec![];
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let server = postgres.then(|| pg_server::PgServer::start_with(""));
        let store = match &server {
            Some(s) => Store::open_postgres(&PgConfig::new(s.url())).unwrap(),
            None => Store::open(&dir.path().join("hub.sqlite")).unwrap(),
        };
        for g in 0..GATEWAYS {
            store
                .add_gateway(&format!("gw-{g}"), &format!("{g:064}"))
                .unwrap();
        }
        // Every device is at a patient (config map): rows are attributed
        // and the chart buckets (`trends`) are maintained, as in a ward.
        let assoc: HashMap<(String, String), String> = (0..GATEWAYS)
            .flat_map(|g| {
                (0..DEVICES).map(move |d| {
                    (
                        (format!("gw-{g}"), format!("dev-{d}")),
                        format!("patient-{g}-{d}"),
                    )
                })
            })
            .collect();
        let now = T0 + 3_600_000_000;
        let t = Instant::now();
        for (gw, b) in &batches {
            let r = store.ingest(gw, b, &assoc, now, now).unwrap();
            assert_eq!(r.ack.accepted as usize, DEVICES * PER_DEVICE);
        }
        let secs = t.elapsed().as_secs_f64();
        rates.push(readings / secs);
        // FHIR-queryable: one device's SpO2 is found by search.
        let s = parse_search(&[
            ("code".into(), "59408-5".into()),
            ("_count".into(), "1".into()),
        ])
        .unwrap();
        let (total, _) = store.search(&s).unwrap();
        assert!(total > 0);
        drop(store);
        drop(server);
    }
    let (med, min, max) = stats(rates);
    println!(
        "hub ingest ({}, {} batches of {} readings, {runs} runs): median {med:.0} readings/s (min {min:.0}, max {max:.0})",
        if postgres { "PostgreSQL" } else { "SQLite" },
        batches.len(),
        DEVICES * PER_DEVICE
    );
}
