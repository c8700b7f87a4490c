//! FHIR rendering cost per Observation, without storage or HTTP: a search
//! page of 50 stored readings (one patient's one vital from one device,
//! shaped like the rows of `support/mod.rs`), written as the API writes a
//! page (`ObservationWriter`) and one row at a time as a read by id does
//! (`write_observation`). Each is timed over 2 000 pages, 7 times; the
//! report is the median microseconds per Observation (min–max).
//!
//! Run: `cargo bench -p cloud-hub --bench render`.

mod support;

use std::time::Instant;

use cloud_hub::fhir::render::{ObservationRow, ObservationWriter, write_observation};
use prost::Message;
use shared_protocol::v1::{Reading, reading};
use support::{METRICS, T_END, observation_id, pct};

const PAGE: i64 = 50;
const PAGES: usize = 2_000;
const RUNS: usize = 7;

fn page() -> Vec<ObservationRow> {
    let (mdc, _, unit, ucum) = METRICS[0];
    (0..PAGE)
        .map(|i| {
            let at = T_END - i * 60_000_000;
            let payload = Reading {
                mdc_code: mdc,
                value: Some(reading::Value::Numeric(95.0 + (i % 5) as f64)),
                mdc_unit: unit,
                ucum_unit: ucum.into(),
                device_time_us: at,
                gateway_time_us: at,
                time_source: 1,
                validity: 1,
                sequence: i as u64,
                ..Default::default()
            }
            .encode_to_vec();
            ObservationRow {
                id: observation_id(i),
                kind: "reading".into(),
                gateway_id: "gw-bench".into(),
                device_id: "dev-68".into(),
                patient_id: Some("p-68".into()),
                patient_system: None,
                received_us: at,
                payload: Some(payload),
                resource: String::new(),
                manufacturer: "Masimo".into(),
                model: "Radical-7".into(),
                serial_number: String::new(),
                version: 1,
                updated_us: at,
            }
        })
        .collect()
}

/// Median, min and max microseconds per Observation of `write_page`.
fn time(rows: &[ObservationRow], mut write_page: impl FnMut(&mut Vec<u8>)) -> [f64; 3] {
    let mut runs = Vec::with_capacity(RUNS);
    let mut out = Vec::with_capacity(128 * 1024);
    for _ in 0..RUNS {
        let start = Instant::now();
        for _ in 0..PAGES {
            out.clear();
            write_page(&mut out);
            std::hint::black_box(&out);
        }
        runs.push(start.elapsed().as_secs_f64() * 1e6 / (PAGES * rows.len()) as f64);
    }
    runs.sort_by(f64::total_cmp);
    [pct(&runs, 0.5), runs[0], runs[RUNS - 1]]
}

fn main() {
    let rows = page();
    let mut bytes = Vec::new();
    ObservationWriter::default()
        .write(&rows[0], &mut bytes)
        .unwrap();
    let paged = time(&rows, |out| {
        let mut w = ObservationWriter::default();
        for row in &rows {
            w.write(row, out).unwrap();
        }
    });
    let single = time(&rows, |out| {
        for row in &rows {
            write_observation(row, out).unwrap();
        }
    });
    println!(
        "FHIR rendering ({PAGE}-row pages × {PAGES}, {RUNS} runs; {} bytes per Observation):",
        bytes.len()
    );
    for (name, [median, min, max]) in [("search page", paged), ("one by one", single)] {
        println!("  {name}: median {median:.3} µs per Observation (min {min:.3}, max {max:.3})");
    }
}
