//! Lake backfill throughput: a SQLite store is filled with N readings
//! through the store's ingest (`IngestStore::ingest`, the ingest path
//! without HTTP: 100 devices on one gateway, each associated with its own
//! patient, four vitals, values varying, effective times spread over the
//! 3 days before now, batches of 1 000 readings), then backfilled to
//! Azurite (started on a free loopback port) with `cloud_hub::lake`, once
//! per run into a fresh container. Prints the readings/s of each run and
//! their median, and the files and bytes per layer.
//!
//! After the last run, an independent reader checks the lake: the
//! container is downloaded and read with pyarrow (`tests/py/lake_read.py
//! summary`); per patient pseudonym and LOINC code, silver holds as many
//! values, with the same sum, as the FHIR API renders from the store
//! (`render_observation` of every row a patient search returns); and no
//! text value of silver or gold is, or contains, an identifier the hub
//! holds (patient ids, gateway and device ids, serial numbers).
//!
//! Run: `cargo bench -p cloud-hub --bench lake -- --readings 1000000 --runs 3`
//! (defaults; `--quick` = 50 k readings, one run). Needs Azurite and the lake
//! venv (scripts/setup.sh).

#[path = "../tests/support/azurite.rs"]
mod azurite;
mod support;

use std::collections::BTreeMap;
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
    verify(
        &store,
        &key,
        &az,
        &format!("lake-run-{}", runs - 1),
        dir.path(),
    );
    rates.sort_by(f64::total_cmp);
    println!(
        "lake bench: backfill of {n} readings to Azurite: median {:.0} readings/s over {runs} runs",
        rates[rates.len() / 2]
    );
}

/// Per (patient, first LOINC code): the count and sum of the values the
/// FHIR API renders for the patient's observations.
fn fhir_sums(store: &hub_transport::Store, patient: &str) -> BTreeMap<String, (u64, f64)> {
    use hub_domain::fhir::{ObservationSearch, SortOrder};
    let mut out: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    let mut search = ObservationSearch {
        patients: vec![patient.to_owned()],
        patient_identifiers: Vec::new(),
        codes: Vec::new(),
        dates: Vec::new(),
        categories: Vec::new(),
        devices: Vec::new(),
        count: 1000,
        offset: 0,
        sort: SortOrder::DateAsc,
    };
    loop {
        let (_, rows) = store.search(&search).unwrap();
        for row in &rows {
            let r = hub_domain::fhir::render::render_observation(row).unwrap();
            let loinc = r["code"]["coding"][0]["code"].as_str().unwrap().to_owned();
            let e = out.entry(loinc).or_default();
            e.0 += 1;
            e.1 += r["valueQuantity"]["value"].as_f64().unwrap_or(0.0);
        }
        if rows.len() < 1000 {
            return out;
        }
        search.offset += 1000;
    }
}

/// The independent reader's check of the last run's container (module docs).
fn verify(
    store: &hub_transport::Store,
    key: &std::path::Path,
    az: &azurite::Azurite,
    container: &str,
    dir: &std::path::Path,
) {
    let started = Instant::now();
    let dest = dir.join("download");
    azurite::lake_read(&[
        "download",
        &az.connection_string(),
        container,
        dest.to_str().unwrap(),
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&azurite::lake_read(&["summary", dest.to_str().unwrap()])).unwrap();
    let groups = summary["groups"].as_object().unwrap();
    let key = hub_lake::LakeKey::load(key, "lake.pseudonym_key_file").unwrap();
    let salt = store.subject_salt().unwrap();
    let mut checked = 0u64;
    for d in 0..DEVICES {
        let patient = format!("p-{d}");
        let system = store.patient(&patient).unwrap().unwrap_or_default();
        let pseudonym = key.pseudonym(&hub_domain::privacy::subject_key(&salt, &system, &patient));
        for (loinc, (count, sum)) in fhir_sums(store, &patient) {
            let g = &groups[&format!("{pseudonym}|{loinc}")];
            assert_eq!(g[0].as_u64(), Some(count), "{patient} {loinc}: {g}");
            let lake_sum = g[1].as_f64().unwrap();
            assert!(
                (lake_sum - sum).abs() <= 1e-9 * sum.abs().max(1.0),
                "{patient} {loinc}: lake sum {lake_sum}, FHIR sum {sum}"
            );
            checked += count;
        }
    }
    let texts: Vec<&str> = summary["texts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let mut identifiers = vec!["gw-bench".to_owned()];
    for d in 0..DEVICES {
        identifiers.push(format!("p-{d}"));
        identifiers.push(format!("dev-{d}"));
    }
    for dev in support::bench_devices(DEVICES) {
        let info = dev.device.unwrap();
        if !info.serial_number.is_empty() {
            identifiers.push(info.serial_number);
        }
    }
    for t in &texts {
        for id in &identifiers {
            assert!(
                !(t == id || (id.len() >= 6 && t.contains(id.as_str()))),
                "silver/gold text {t:?} holds the identifier {id:?}"
            );
        }
    }
    println!(
        "lake bench check: pyarrow read {checked} silver values back, equal per patient and \
         LOINC code (count and sum) to what the FHIR API renders; {} distinct text values of \
         silver and gold hold none of {} identifiers ({:.1} s)",
        texts.len(),
        identifiers.len(),
        started.elapsed().as_secs_f64()
    );
}
