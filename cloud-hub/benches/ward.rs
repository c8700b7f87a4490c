//! Ward overview latency: one ward of 40 occupied beds, each patient with
//! 24 h of the five NEWS2 vitals at one value per minute (288 000 readings
//! in all, ingested through the store with bed stays), manual ACVPU and
//! oxygen; then 300 overviews (every bed's latest vitals with age and
//! stale marker, NEWS2, open alerts; what `GET /api/v1/wards/{ward}/overview`
//! does minus HTTP) are timed: p50/p99/max.
//!
//! Then alert evaluation: the time of one evaluation as every batch and
//! clock tick runs it (`AlertStore::evaluate_alerts`: the transaction, on
//! PostgreSQL its advisory lock, the open alerts, the tracked state and the
//! overrides read, the engine, the writes): a batch's (one SpO2 value per
//! bed's monitor, each its own evaluation) and the clock's (all devices);
//! p50/p99 over the runs.
//!
//! Run: `cargo bench -p cloud-hub --bench ward` (`-- --quick`: 10 beds,
//! 2 h, 50 overviews; `-- --postgres` for the PostgreSQL backend: a
//! throwaway server with the server's default, durable commit settings, on
//! a free loopback port, as the ingest bench; `--analyze` runs `ANALYZE`
//! after the fill, as autovacuum would some time later; `--restore-drill`
//! then times the documented backup and restore: `pg_dump -Fc`,
//! `pg_restore` into a new database, the hub's store opened on it).

#[path = "../tests/support/pg_server.rs"]
mod pg_server;

use std::collections::HashMap;
use std::time::Instant;

use cloud_hub::alerts::{AlertService, AlertsConfig, BatchEvents, LiveValue};
use cloud_hub::pg::PgConfig;

use cloud_hub::association::{Bed, PatientId};
use cloud_hub::early_warning::{ManualInputs, ScoresConfig, record_manual};
use cloud_hub::store::{Store, now_us};
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Batch, DeviceData, DeviceInfo, Reading, reading};

const S: i64 = 1_000_000;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let postgres = std::env::args().any(|a| a == "--postgres");
    let (beds, hours, runs) = if quick { (10, 2, 50) } else { (40, 24, 300) };
    let dir = tempfile::tempdir().unwrap();
    let server = postgres.then(|| pg_server::PgServer::start_with(""));
    let store = match &server {
        Some(s) => Store::open_postgres(&PgConfig::new(s.url())).unwrap(),
        None => Store::open(&dir.path().join("hub.sqlite")).unwrap(),
    };
    let backend = if postgres { "PostgreSQL" } else { "SQLite" };
    store.add_gateway("gw-bench", &"0".repeat(64)).unwrap();
    let assoc = HashMap::new();
    let now = now_us();
    let start = now - hours * 3600 * S;
    for b in 0..beds {
        let bed = format!("icu-{b:02}");
        store
            .create_bed(&Bed {
                id: bed.clone(),
                ward: "ICU".into(),
                label: format!("Bed {b}"),
            })
            .unwrap();
        store
            .place_device("gw-bench", &format!("mon-{b}"), &bed, start - S, &assoc)
            .unwrap();
        let p = PatientId {
            system: "urn:bench".into(),
            value: format!("p-{b}"),
        };
        store.admit(&p, &bed, start - S, None, &assoc).unwrap();
    }
    let t = Instant::now();
    let metrics = [
        (codes::RESP_RATE, units::RESP_PER_MIN, 16.0),
        (codes::PULS_OXIM_SAT_O2, units::PERCENT, 96.0),
        (codes::PRESS_BLD_NONINV_SYS, units::MMHG, 120.0),
        (codes::PULS_OXIM_PULS_RATE, units::BEAT_PER_MIN, 75.0),
        (codes::TEMP_BODY, units::DEGC, 37.0),
    ];
    let minutes = hours * 60;
    let mut seq = 0u64;
    for b in 0..beds {
        // One batch per device per hour.
        for h in 0..hours {
            seq += 1;
            let readings: Vec<Reading> = (0..60)
                .flat_map(|m| {
                    let minute = h * 60 + m;
                    metrics
                        .iter()
                        .enumerate()
                        .map(move |(k, (mdc, unit, v))| Reading {
                            mdc_code: *mdc,
                            value: Some(reading::Value::Numeric(v + (minute % 3) as f64)),
                            mdc_unit: unit.mdc,
                            ucum_unit: unit.ucum.into(),
                            device_time_us: start + minute * 60 * S,
                            gateway_time_us: start + minute * 60 * S,
                            time_source: 1,
                            validity: 1,
                            sequence: (minute * 5 + k as i64) as u64,
                            ..Default::default()
                        })
                })
                .collect();
            let batch = Batch {
                gateway_id: "gw-bench".into(),
                sequence: seq,
                devices: vec![DeviceData {
                    device: Some(DeviceInfo {
                        device_id: format!("mon-{b}"),
                        protocol: "bench".into(),
                        ..Default::default()
                    }),
                    readings,
                    ..Default::default()
                }],
                ..Default::default()
            };
            let r = store.ingest("gw-bench", &batch, &assoc, now, now).unwrap();
            assert_eq!(r.ack.accepted, 300);
        }
        record_manual(
            &store,
            &format!("p-{b}"),
            &ManualInputs {
                consciousness: Some(cloud_hub::scores::Consciousness::Alert),
                supplemental_oxygen: Some(false),
                spo2_scale: None,
                effective_us: now - 60 * S,
            },
        )
        .unwrap();
    }
    let fill_s = t.elapsed().as_secs_f64();
    // Storage per reading (database sizing): the observations with their
    // indexes (PostgreSQL: every monthly partition) and the chart buckets.
    let readings = (beds * minutes * 5) as f64;
    let bytes = match &server {
        Some(s) => {
            let mut c = postgres::Client::connect(&s.url(), postgres::NoTls).unwrap();
            c.batch_execute("CHECKPOINT").unwrap();
            if std::env::args().any(|a| a == "--analyze") {
                // What autovacuum does some time after a fill: statistics
                // of the new rows for the planner.
                c.batch_execute("ANALYZE").unwrap();
            }
            c.query_one(
                "SELECT ((SELECT COALESCE(SUM(pg_total_relation_size(inhrelid)), 0)
                            FROM pg_inherits WHERE inhparent = 'observations'::regclass)
                       + pg_total_relation_size('vital_rollups'))::bigint",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0) as f64
        }
        None => {
            let c = rusqlite::Connection::open(dir.path().join("hub.sqlite")).unwrap();
            c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
            std::fs::metadata(dir.path().join("hub.sqlite"))
                .unwrap()
                .len() as f64
        }
    };
    println!(
        "{backend}: {:.0} bytes per reading stored ({})",
        bytes / readings,
        if postgres {
            "observations with their indexes and the chart buckets"
        } else {
            "the whole database file"
        }
    );
    let cfg = ScoresConfig::default();
    let mut lat = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let v = cloud_hub::ward::overview(&store, None, &cfg, "ICU", now_us()).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(v.len(), beds as usize);
        assert!(v.iter().all(|b| b["vitals"].as_array().unwrap().len() == 5));
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{backend}: ward overview ({beds} occupied beds, {} readings over {hours} h, filled in {fill_s:.0} s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {runs} overviews",
        beds * minutes * 5,
        p(0.5),
        p(0.99),
        lat[lat.len() - 1]
    );

    // Alert evaluation.
    let alerts = AlertService::start(&store, &AlertsConfig::default())
        .unwrap()
        .unwrap();
    let mut batch_ms = Vec::new();
    let mut tick_ms = Vec::new();
    for r in 0..runs {
        let now = now_us();
        for b in 0..beds {
            let live = [LiveValue {
                patient: Some(PatientId {
                    system: "urn:bench".into(),
                    value: format!("p-{b}"),
                }),
                device_id: format!("mon-{b}"),
                parameter: cloud_hub::early_warning::Parameter::Spo2,
                value: Some(96.0 + (r % 2) as f64),
                flags: vec![],
                time_us: now,
            }];
            let t = Instant::now();
            alerts
                .on_batch("gw-bench", &BatchEvents::default(), &live, now)
                .unwrap();
            batch_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let t = Instant::now();
        alerts.tick(now).unwrap();
        tick_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    for v in [&mut batch_ms, &mut tick_ms] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    let q = |v: &[f64], q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{backend}: alert evaluation of a batch: p50 {:.2} ms, p99 {:.2} ms over {} ({beds} devices); of the clock: p50 {:.2} ms, p99 {:.2} ms over {runs}",
        q(&batch_ms, 0.5),
        q(&batch_ms, 0.99),
        batch_ms.len(),
        q(&tick_ms, 0.5),
        q(&tick_ms, 0.99),
    );
    drop(alerts);
    drop(store);
    if let Some(server) = &server
        && std::env::args().any(|a| a == "--restore-drill")
    {
        restore_drill(server, beds, &cfg);
    }
    drop(server);
}

/// The PostgreSQL backup and restore of docs/operations.md, timed on the
/// filled ward: `pg_dump -Fc` of the live database, `pg_restore` into a new
/// database, the hub's store opened on it (its migration check), the first
/// ward overview from it.
fn restore_drill(server: &pg_server::PgServer, beds: i64, cfg: &ScoresConfig) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vigil.dump");
    let file_s = file.to_str().unwrap();
    let rows: i64 = server
        .run_tool(
            "psql",
            &[
                "-d",
                "postgres",
                "-XAtc",
                "SELECT count(*) FROM observations",
            ],
        )
        .trim()
        .parse()
        .unwrap();
    let db_bytes: f64 = server
        .run_tool(
            "psql",
            &[
                "-d",
                "postgres",
                "-XAtc",
                "SELECT pg_database_size('postgres')",
            ],
        )
        .trim()
        .parse()
        .unwrap();
    let t = Instant::now();
    server.run_tool("pg_dump", &["-Fc", "-d", "postgres", "-f", file_s]);
    let dump_s = t.elapsed().as_secs_f64();
    let dump_bytes = std::fs::metadata(&file).unwrap().len() as f64;
    let t = Instant::now();
    server.run_tool(
        "psql",
        &["-d", "postgres", "-c", "CREATE DATABASE vigil_drill"],
    );
    server.run_tool("pg_restore", &["-j", "2", "-d", "vigil_drill", file_s]);
    let restore_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let store = Store::open_postgres(&PgConfig::new(server.url_of("vigil_drill"))).unwrap();
    let v = cloud_hub::ward::overview(&store, None, cfg, "ICU", now_us()).unwrap();
    let open_s = t.elapsed().as_secs_f64();
    assert_eq!(v.len(), beds as usize, "the restored ward");
    const MIB: f64 = 1024.0 * 1024.0;
    println!(
        "PostgreSQL restore drill ({rows} observation rows, database {:.0} MiB): pg_dump -Fc {dump_s:.1} s ({:.0} MiB, {:.0} rows/s); CREATE DATABASE + pg_restore -j 2 {restore_s:.1} s ({:.0} rows/s); hub store opened + first ward overview {open_s:.2} s",
        db_bytes / MIB,
        dump_bytes / MIB,
        rows as f64 / dump_s,
        rows as f64 / restore_s,
    );
}
