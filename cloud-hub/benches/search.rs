//! FHIR search latency at scale: one patient's last 24 h of one vital,
//! newest first, first page of 100 with the total, rendered as FHIR (what
//! `GET /fhir/Observation?patient=…&code=…&date=ge…&_sort=-date` does
//! minus HTTP). The store is filled with N synthetic observations
//! directly in SQL (100 patients × 4 vitals spread evenly over 3 days;
//! every row a real compact row with a protobuf payload), then 300
//! queries over random patients/vitals are timed: p50/p99/max.
//!
//! Run: `cargo bench -p cloud-hub --bench search -- --observations 20000000`
//! (default 20 M; `--quick` = 200 k). The database is built in a
//! temporary directory (about 6 GB at 20 M rows) and removed afterwards.

use std::time::Instant;

use cloud_hub::fhir::parse_search;
use cloud_hub::fhir::render::render_observation;
use cloud_hub::store::Store;
use prost::Message;
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Reading, reading};

const PATIENTS: i64 = 100;
const T_END: i64 = 1_795_514_400_000_000; // 2026-11-24T02:40:00Z
const SPAN_US: i64 = 3 * 24 * 3_600_000_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let n: i64 = args
        .iter()
        .position(|a| a == "--observations")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 200_000 } else { 20_000_000 });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.sqlite");
    let store = Store::open(&path).unwrap();
    let metrics = [
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
    // Fill: row i → patient i % 100, metric (i / 100) % 4, time evenly
    // spread so that each (patient, metric) series covers the 3 days.
    let t = Instant::now();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "synchronous", "OFF").unwrap();
        conn.pragma_update(None, "cache_size", -262_144).unwrap();
        conn.execute(
            "INSERT INTO devices (gateway_id, device_id, protocol, manufacturer, model,
                 serial_number, location, first_seen_us, last_seen_us, fhir_id)
             SELECT 'gw-bench', 'dev-' || value, 'masimo-ascii1', 'Masimo', 'Radical-7', '', '', 0, 0,
                    'dev' || value FROM generate_series(0, 99)",
            [],
        )
        .or_else(|_| {
            // Older SQLite without generate_series.
            for d in 0..100 {
                conn.execute(
                    "INSERT INTO devices (gateway_id, device_id, protocol, manufacturer, model,
                         serial_number, location, first_seen_us, last_seen_us, fhir_id)
                     VALUES ('gw-bench', ?1, 'masimo-ascii1', 'Masimo', 'Radical-7', '', '', 0, 0, ?2)",
                    rusqlite::params![format!("dev-{d}"), format!("dev{d}")],
                )?;
            }
            Ok::<usize, rusqlite::Error>(100)
        })
        .unwrap();
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
            for (k, (mdc, loinc, unit, ucum)) in metrics.iter().enumerate() {
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
                     SELECT printf('%032x', i), 'gw-bench', 'dev-' || (i % 100), i, 'p-' || (i % 100),
                            ?3, ?4, ?5 - ?6 + (i * ?6 / ?7), 'final', 97.0, i / 1000, ?5, '', 'reading',
                            'vital-signs', ?8, 'config'
                       FROM s WHERE (i / 100) % 4 = ?9",
                    rusqlite::params![start, end, loinc, mdc, T_END, SPAN_US, n, payload, k as i64],
                )
                .unwrap();
            }
            tx.commit().unwrap();
            start = end;
        }
        for (_, sql) in &indexes {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch("ANALYZE").unwrap();
    }
    let fill_s = t.elapsed().as_secs_f64();
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);

    let mut lat = Vec::new();
    let mut returned = 0usize;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let queries = if quick { 50 } else { 300 };
    let since = cloud_hub::fhir::format_instant(T_END - 24 * 3_600_000_000);
    for _ in 0..queries {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let p = rng % PATIENTS as u64;
        let (_, loinc, _, _) = metrics[(rng >> 32) as usize % metrics.len()];
        let t = Instant::now();
        let s = parse_search(&[
            ("patient".into(), format!("p-{p}")),
            ("code".into(), format!("http://loinc.org|{loinc}")),
            ("date".into(), format!("ge{since}")),
            ("_sort".into(), "-date".into()),
            ("_count".into(), "100".into()),
        ])
        .unwrap();
        let (total, rows) = store.search(&s).unwrap();
        let rendered: Vec<_> = rows
            .iter()
            .map(|r| render_observation(r).unwrap())
            .collect();
        let body = serde_json::to_vec(&rendered).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(total > 0 && !body.is_empty());
        returned = returned.max(total as usize);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    println!(
        "FHIR search (1 patient, 1 vital, last 24 h, page of 100 + total, rendered) over {n} observations \
         ({:.1} GB; filled in {fill_s:.0} s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {queries} queries; \
         up to {returned} matches per query",
        size as f64 / 1e9,
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1]
    );
}
