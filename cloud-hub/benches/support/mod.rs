//! Shared by the store-size benches (`search`, `fhir_load`): a SQLite hub
//! store filled with N synthetic observations directly in SQL, plus the
//! chart rollups (`vital_rollups`) that ingest would have written for them.
//!
//! Layout: 100 patients (`p-0` … `p-99`, each on its own device `dev-K`
//! of gateway `gw-bench`) × 4 vitals, row i → patient i % 100, vital
//! (i / 100) % 4, effective times spread evenly over the 3 days before
//! [`T_END`]; every row a real compact row with a protobuf payload and
//! the id ingest gives sequence i of its device ([`observation_id`]).
#![allow(dead_code)]

use std::path::Path;
use std::time::Instant;

use cloud_hub::store::Store;
use prost::Message;
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Reading, reading};

pub const PATIENTS: i64 = 100;
pub const T_END: i64 = 1_795_514_400_000_000; // 2026-11-24T02:40:00Z
pub const SPAN_US: i64 = 3 * 24 * 3_600_000_000;
pub const HOUR_US: i64 = 3_600_000_000;

/// (MDC code, LOINC, MDC unit, UCUM unit) of the four vitals.
pub const METRICS: [(u32, &str, u32, &str); 4] = [
    (codes::PULS_OXIM_SAT_O2, "59408-5", units::PERCENT.mdc, "%"),
    (
        codes::PULS_OXIM_PULS_RATE,
        "8889-8",
        units::BEAT_PER_MIN.mdc,
        "/min",
    ),
    (codes::RESP_RATE, "9279-1", units::RESP_PER_MIN.mdc, "/min"),
    (codes::TEMP_BODY, "8310-5", units::DEGC.mdc, "Cel"),
];

pub struct Filled {
    pub store: Store,
    pub seconds: f64,
    pub bytes: u64,
}

/// The `--observations N` argument, else `default`.
pub fn observations_arg(default: i64) -> i64 {
    i64::try_from(u64_arg(
        "--observations",
        u64::try_from(default).unwrap_or(0),
    ))
    .unwrap_or(default)
}

/// The value of the `name N` argument, else `default`.
pub fn u64_arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` bench devices `dev-0` … (a Masimo Radical-7 each), no readings yet.
pub fn bench_devices(n: u64) -> Vec<shared_protocol::v1::DeviceData> {
    (0..n)
        .map(|d| shared_protocol::v1::DeviceData {
            device: Some(shared_protocol::v1::DeviceInfo {
                device_id: format!("dev-{d}"),
                protocol: "masimo-ascii1".into(),
                manufacturer: "Masimo".into(),
                model: "Radical-7".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

/// A small xorshift generator (deterministic query choice).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The id of row `i` of the fill: sequence `i` of device `dev-{i % 100}`
/// of gateway `gw-bench`, incarnation 0, as ingest would give it.
pub fn observation_id(i: i64) -> String {
    hub_domain::fhir::observation_id("gw-bench", &format!("dev-{}", i % PATIENTS), i as u64)
}

/// Creates the store at `path` and fills it with `n` observations and
/// their rollups.
pub fn fill(path: &Path, n: i64) -> Filled {
    let store = Store::open(path).unwrap();
    let t = Instant::now();
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    conn.pragma_update(None, "cache_size", -262_144).unwrap();
    for d in 0..PATIENTS {
        conn.execute(
            "INSERT INTO devices (gateway_id, device_id, protocol, manufacturer, model,
                 serial_number, location, first_seen_us, last_seen_us, fhir_id)
             VALUES ('gw-bench', ?1, 'masimo-ascii1', 'Masimo', 'Radical-7', '', '', 0, 0, ?2)",
            rusqlite::params![format!("dev-{d}"), format!("dev{d}")],
        )
        .unwrap();
    }
    // The device part of each device's ids (`hub_sqlite::ids`).
    conn.execute_batch("CREATE TEMP TABLE fill_parts (k INTEGER PRIMARY KEY, part TEXT NOT NULL)")
        .unwrap();
    for d in 0..PATIENTS {
        conn.execute(
            "INSERT INTO fill_parts VALUES (?1, ?2)",
            rusqlite::params![d, &observation_id(d)[..16]],
        )
        .unwrap();
    }
    // Secondary indexes are dropped for the fill and rebuilt after it
    // (sorted builds), as a bulk load would do.
    let indexes: Vec<(String, String)> = conn
        .prepare(
            "SELECT name, sql FROM sqlite_master
              WHERE type = 'index' AND tbl_name = 'observations' AND sql IS NOT NULL",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (name, _) in &indexes {
        conn.execute_batch(&format!("DROP INDEX {name}")).unwrap();
    }
    let chunk = 1_000_000i64;
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        let tx = conn.unchecked_transaction().unwrap();
        for (k, (mdc, loinc, unit, ucum)) in METRICS.iter().enumerate() {
            let payload = Reading {
                mdc_code: *mdc,
                value: Some(reading::Value::Numeric(97.0)),
                mdc_unit: *unit,
                ucum_unit: (*ucum).into(),
                device_time_us: T_END,
                gateway_time_us: T_END,
                time_source: 1,
                validity: 1,
                ..Default::default()
            }
            .encode_to_vec();
            tx.execute(
                "WITH RECURSIVE s(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < ?2)
                 INSERT INTO observations (id, gateway_id, device_id, sequence, patient_id, loinc,
                     mdc_code, effective_us, status, value, batch_sequence, received_us, resource,
                     kind, category, payload, attribution)
                 SELECT (SELECT part FROM fill_parts WHERE k = i % 100) || printf('%016x', i),
                        'gw-bench', 'dev-' || (i % 100), i, 'p-' || (i % 100),
                        ?3, ?4, ?5 - ?6 + (i * ?6 / ?7), 'final', 97.0, i / 1000, ?5, '', 'reading',
                        'vital-signs', ?8, 'config'
                   FROM s WHERE (i / 100) % 4 = ?9",
                rusqlite::params![start, end, loinc, mdc, T_END, SPAN_US, n, payload, k as i64],
            )
            .unwrap();
            // The 1-minute rollups ingest keeps for these rows (same
            // effective times; buckets cut by a chunk boundary are merged).
            tx.execute(
                "WITH RECURSIVE s(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < ?2)
                 INSERT INTO vital_rollups (patient_id, mdc_code, resolution_s, bucket_us,
                     gateway_id, device_id, n, sum, min, max)
                 SELECT 'p-' || (i % 100), ?3, 60,
                        ((?4 - ?5 + (i * ?5 / ?6)) / 60000000) * 60000000 AS b,
                        'gw-bench', 'dev-' || (i % 100), COUNT(*), SUM(97.0), 97.0, 97.0
                   FROM s WHERE (i / 100) % 4 = ?7 GROUP BY i % 100, b
                 ON CONFLICT DO UPDATE SET n = n + excluded.n, sum = sum + excluded.sum",
                rusqlite::params![start, end, mdc, T_END, SPAN_US, n, k as i64],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        start = end;
    }
    // The coarser rollups, from the 1-minute ones (as ingest would sum them).
    for res in cloud_hub::trends::RESOLUTIONS
        .into_iter()
        .filter(|r| *r != 60)
    {
        conn.execute(
            "INSERT INTO vital_rollups (patient_id, mdc_code, resolution_s, bucket_us,
                 gateway_id, device_id, n, sum, min, max)
             SELECT patient_id, mdc_code, ?1, (bucket_us / (?1 * 1000000)) * (?1 * 1000000) AS b,
                    gateway_id, device_id, SUM(n), SUM(sum), MIN(min), MAX(max)
               FROM vital_rollups WHERE resolution_s = 60
              GROUP BY patient_id, mdc_code, b, gateway_id, device_id",
            [res],
        )
        .unwrap();
    }
    // The device minutes ingest keeps for these rows (schema v22).
    conn.execute_batch(hub_sqlite::schema::FILL_OBSERVATION_MINUTES)
        .unwrap();
    // Their id devices (schema v23).
    hub_sqlite::ids::fill(&conn).unwrap();
    // Their search totals per patient, code and hour (schema v24).
    conn.execute_batch(hub_sqlite::schema::FILL_OBSERVATION_HOURS)
        .unwrap();
    for (_, sql) in &indexes {
        conn.execute_batch(sql).unwrap();
    }
    conn.execute_batch("ANALYZE").unwrap();
    drop(conn);
    Filled {
        store,
        seconds: t.elapsed().as_secs_f64(),
        bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
    }
}

/// The `q`-quantile of sorted `v`.
pub fn pct(v: &[f64], q: f64) -> f64 {
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}
