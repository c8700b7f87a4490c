//! FHIR search and trend latency at scale. The store is filled with N
//! synthetic observations directly in SQL, with the chart rollups ingest
//! would have written for them (100 patients × 4 vitals spread evenly
//! over 3 days; every row a real compact row with a protobuf payload;
//! `support/mod.rs`). Then, each over random patients/vitals, timed
//! p50/p99/max:
//! - FHIR search: one patient's last 24 h of one vital, newest first,
//!   first page of 100 with the total, rendered as FHIR (what
//!   `GET /fhir/Observation?patient=…&code=…&date=ge…&_sort=-date` does
//!   minus HTTP), 300 queries;
//! - 24 h trend query: one patient's series of one vital over 24 h with
//!   its trend slope, as JSON (what `GET /api/v1/patients/{id}/series`
//!   does minus HTTP), at the default resolution for 24 h (hourly) and at
//!   1-minute points, 300 queries each.
//!
//! Run: `cargo bench -p cloud-hub --bench search -- --observations 20000000`
//! (default 20 M; `--quick` = 200 k). The database is built in a
//! temporary directory (about 7.5 GB at 20 M rows) and removed afterwards.

mod support;

use std::time::Instant;

use cloud_hub::fhir::parse_search;
use cloud_hub::fhir::render::render_observation;
use support::{HOUR_US, METRICS, PATIENTS, Rng, T_END, pct};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = support::observations_arg(if quick { 200_000 } else { 20_000_000 });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.sqlite");
    let filled = support::fill(&path, n);
    let (store, fill_s, size) = (filled.store, filled.seconds, filled.bytes);
    let metrics = METRICS;

    let mut lat = Vec::new();
    let mut returned = 0usize;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let queries = if quick { 50 } else { 300 };
    let since = cloud_hub::fhir::format_instant(T_END - 24 * 3_600_000_000);
    for _ in 0..queries {
        let r = rng.next();
        let p = r % PATIENTS as u64;
        let (_, loinc, _, _) = metrics[(r >> 32) as usize % metrics.len()];
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
    println!(
        "FHIR search (1 patient, 1 vital, last 24 h, page of 100 + total, rendered) over {n} observations \
         ({:.1} GB; filled in {fill_s:.0} s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {queries} queries; \
         up to {returned} matches per query",
        size as f64 / 1e9,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat[lat.len() - 1]
    );

    // 24 h trend queries: the series endpoint's work minus HTTP.
    let to = T_END;
    let from = T_END - 24 * HOUR_US;
    for (label, resolution) in [
        ("hourly points, the default for 24 h", 3600),
        ("1-min points", 60),
    ] {
        let mut lat = Vec::new();
        let mut points_max = 0;
        for _ in 0..queries {
            let r = rng.next();
            let p = format!("p-{}", r % PATIENTS as u64);
            let (mdc, _, _, _) = metrics[(r >> 32) as usize % metrics.len()];
            let t = Instant::now();
            let points = cloud_hub::trends::series(&store, &p, mdc, resolution, from, to).unwrap();
            let slope = cloud_hub::trends::slope_per_hour(&points);
            let body = serde_json::to_vec(&serde_json::json!({
                "patient": p,
                "points": points.iter().map(|p| serde_json::json!({
                    "start": cloud_hub::fhir::format_instant(p.start_us), "count": p.count,
                    "min": p.min, "max": p.max, "mean": p.mean,
                })).collect::<Vec<_>>(),
                "trend": { "per_hour": slope, "points": points.len() },
            }))
            .unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            assert!(!points.is_empty() && !body.is_empty());
            points_max = points_max.max(points.len());
        }
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "24 h trend query ({label}; series + trend as JSON) over {n} observations \
             ({:.1} GB): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {queries} queries; \
             up to {points_max} points per query",
            size as f64 / 1e9,
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            lat[lat.len() - 1]
        );
    }
}
