//! The storage contract, written once as functions over `&Store` and run
//! against both backends: SQLite (a temp file) and PostgreSQL (a throwaway
//! server per test, started from `support/pg_server.rs` on a free loopback
//! port and stopped at the end).

use crate::pg_server;

use cloud_hub::Store;
use cloud_hub::association::{AssocError, Bed, Moved, PatientId, Subject};
use cloud_hub::fhir::render::{RowKind, device_resource_id, metric_of, panel_id};
use cloud_hub::fhir::{observation_id, parse_search};
use cloud_hub::pg::PgConfig;
use cloud_hub::storage::StoreError;
use cloud_hub::store::{Associations, IngestReport};
use prost::Message;
use shared_protocol::catalogue::codes;
use shared_protocol::v1::{
    Batch, DeviceData, DeviceInfo, Identifier, Reading, RejectReason, TechnicalKind,
    TechnicalReading, Waveform, reading,
};

/// 2026-03-01T00:00:00Z, µs.
const T0: i64 = 1_772_323_200_000_000;
const MIN: i64 = 60_000_000;
const G: &str = "gw-1";

fn now() -> i64 {
    cloud_hub::store::now_us()
}

fn numeric(mdc: u32, unit: &str, value: f64, t: i64, seq: u64) -> Reading {
    Reading {
        mdc_code: mdc,
        value: Some(reading::Value::Numeric(value)),
        ucum_unit: unit.into(),
        device_time_us: t,
        validity: 1,
        sequence: seq,
        ..Default::default()
    }
}

fn spo2(t: i64, seq: u64) -> Reading {
    numeric(codes::PULS_OXIM_SAT_O2, "%", 97.0, t, seq)
}

fn hr(t: i64, seq: u64) -> Reading {
    numeric(codes::ECG_HEART_RATE, "/min", 72.0, t, seq)
}

fn entry(device: &str, readings: Vec<Reading>) -> DeviceData {
    DeviceData {
        device: Some(DeviceInfo {
            device_id: device.into(),
            protocol: "test".into(),
            manufacturer: "Acme".into(),
            model: "M1".into(),
            serial_number: format!("SN-{device}"),
            ..Default::default()
        }),
        readings,
        waveforms: vec![],
        technical: vec![],
    }
}

fn batch(seq: u64, devices: Vec<DeviceData>) -> Batch {
    Batch {
        gateway_id: G.into(),
        sequence: seq,
        created_time_us: T0,
        agent_version: "test".into(),
        devices,
        ..Default::default()
    }
}

fn ingest(s: &Store, b: &Batch, assoc: &Associations) -> IngestReport {
    s.ingest(G, b, assoc, now(), now()).unwrap()
}

fn search(s: &Store, q: &[(&str, &str)]) -> (u64, Vec<String>) {
    let (blocking, awaited) = search_both(s, q);
    // The non-blocking search the API awaits (PostgreSQL's) answers the same.
    if let Some(awaited) = awaited {
        assert_eq!(awaited, blocking);
    }
    blocking
}

/// A search run blocking, and as the API awaits it when the store offers
/// that (PostgreSQL): (total, ids) each.
type Found = (u64, Vec<String>);
fn search_both(s: &Store, q: &[(&str, &str)]) -> (Found, Option<Found>) {
    let pairs: Vec<(String, String)> = q
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let q = parse_search(&pairs).unwrap();
    let ids = |(n, rows): (u64, Vec<cloud_hub::fhir::render::ObservationRow>)| -> Found {
        (n, rows.into_iter().map(|r| r.id).collect())
    };
    let blocking = ids(s.search(&q).unwrap());
    let awaited = s.search_future(&q).map(|f| ids(await_read(f).unwrap()));
    (blocking, awaited)
}

/// The read of `patient`'s SpO2 series at `resolution_s` over
/// `[from, to_us)`.
fn spo2_series(
    patient: &str,
    resolution_s: i64,
    from: i64,
    to_us: i64,
) -> cloud_hub::storage::SeriesQuery {
    cloud_hub::storage::SeriesQuery::new(
        patient,
        codes::PULS_OXIM_SAT_O2,
        resolution_s,
        from,
        to_us,
    )
}

/// Awaits a store's non-blocking read on a runtime of the test's own.
fn await_read<T>(f: cloud_hub::storage::ReadFuture<'_, T>) -> Result<T, StoreError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn oid(device: &str, seq: u64) -> String {
    observation_id(G, device, seq)
}

// ---- the suite ----

/// Gateway text with a NUL character (valid protobuf, but not storable in
/// a PostgreSQL `text`) is refused as malformed on both backends; the rest
/// of the batch is stored and acknowledged, so the gateway is not stuck
/// re-sending it.
fn nul_characters_are_refused_and_the_rest_is_stored(s: &Store) {
    let none = Associations::new();
    let mut bad = entry("d-nul", vec![spo2(T0, 1)]);
    bad.device.as_mut().unwrap().model = "M\u{0}1".into();
    let mut subject = spo2(T0, 2);
    subject.subject = Some(shared_protocol::v1::Identifier {
        system: "urn:oid:1.2.3".into(),
        value: "MRN\u{0}".into(),
    });
    let good = entry("d-ok", vec![spo2(T0, 1), subject]);
    let r = ingest(s, &batch(1, vec![bad, good]), &none);
    assert_eq!((r.ack.accepted, r.ack.rejected), (1, 2));
    assert_eq!(search(s, &[]).0, 1);
    // The ack was stored: a re-send is a duplicate batch, not an error.
    let again = batch(1, vec![entry("d-ok", vec![spo2(T0, 1)])]);
    assert!(ingest(s, &again, &none).ack.duplicate_batch);
}

fn ingest_deduplicates_batches_and_readings(s: &Store) {
    let none = Associations::new();
    let r = ingest(
        s,
        &batch(1, vec![entry("d1", vec![spo2(T0, 1), spo2(T0 + MIN, 2)])]),
        &none,
    );
    assert_eq!(
        (
            r.ack.accepted,
            r.ack.duplicates,
            r.ack.rejected,
            r.ack.duplicate_batch
        ),
        (2, 0, 0, false)
    );
    // The same batch again: its stored ack, flagged.
    let again = ingest(s, &batch(1, vec![entry("d1", vec![spo2(T0, 1)])]), &none);
    assert!(again.ack.duplicate_batch);
    assert_eq!((again.ack.accepted, again.ack.sequence), (2, 1));
    // A new batch re-sending reading 2 with a new one; a reading twice in
    // one batch counts once.
    let r = ingest(
        s,
        &batch(
            2,
            vec![entry(
                "d1",
                vec![
                    spo2(T0 + MIN, 2),
                    spo2(T0 + 2 * MIN, 3),
                    spo2(T0 + 2 * MIN, 3),
                ],
            )],
        ),
        &none,
    );
    assert_eq!((r.ack.accepted, r.ack.duplicates), (1, 2));
    // The same sequence under another time is the same reading.
    let r = ingest(
        s,
        &batch(3, vec![entry("d1", vec![spo2(T0 + 40 * 24 * 60 * MIN, 1)])]),
        &none,
    );
    assert_eq!((r.ack.accepted, r.ack.duplicates), (0, 1));
    assert_eq!(search(s, &[]).0, 3);
    // Another device's sequence 1 is another reading.
    let r = ingest(s, &batch(4, vec![entry("d2", vec![spo2(T0, 1)])]), &none);
    assert_eq!(r.ack.accepted, 1);
    assert_eq!(search(s, &[]).0, 4);
}

/// A gateway whose buffer was created afresh (new incarnation) restarts
/// its sequences at 1: its batches and readings are new, the earlier
/// buffer's stay de-duplicated as before, and incarnation 0 keeps today's
/// ids.
fn buffer_incarnations_deduplicate_separately(s: &Store) {
    let none = Associations::new();
    let with = |inc: u64, b: Batch| Batch {
        incarnation: inc,
        ..b
    };
    let r = ingest(
        s,
        &batch(1, vec![entry("d1", vec![spo2(T0, 1), spo2(T0 + MIN, 2)])]),
        &none,
    );
    assert_eq!((r.ack.accepted, r.new_incarnation), (2, None));
    // The wiped gateway's batch 1, readings 1 and 2: new, not duplicates.
    let inc = 0x5eed_u64;
    let fresh = with(
        inc,
        batch(
            1,
            vec![entry(
                "d1",
                vec![spo2(T0 + 5 * MIN, 1), spo2(T0 + 6 * MIN, 2)],
            )],
        ),
    );
    let r = ingest(s, &fresh, &none);
    assert!(!r.ack.duplicate_batch);
    assert_eq!((r.ack.accepted, r.ack.duplicates), (2, 0));
    assert_eq!(
        r.new_incarnation,
        Some(cloud_hub::store::NewIncarnation {
            incarnation: inc as i64,
            previous: Some(0)
        })
    );
    // Re-sent: the same batch of the same incarnation.
    let again = ingest(s, &fresh, &none);
    assert!(again.ack.duplicate_batch);
    assert_eq!((again.ack.accepted, again.new_incarnation), (2, None));
    // Readings re-sent within each incarnation stay duplicates.
    let r = ingest(
        s,
        &with(
            inc,
            batch(
                2,
                vec![entry(
                    "d1",
                    vec![spo2(T0 + 6 * MIN, 2), spo2(T0 + 7 * MIN, 3)],
                )],
            ),
        ),
        &none,
    );
    assert_eq!((r.ack.accepted, r.ack.duplicates), (1, 1));
    let r = ingest(
        s,
        &batch(2, vec![entry("d1", vec![spo2(T0 + MIN, 2)])]),
        &none,
    );
    assert_eq!(
        (r.ack.accepted, r.ack.duplicates, r.ack.duplicate_batch),
        (0, 1, false)
    );
    let (total, ids) = search(s, &[("_count", "100")]);
    assert_eq!(total, 5);
    assert!(ids.contains(&oid("d1", 1)), "incarnation 0 keeps its ids");
    let new_id = cloud_hub::fhir::observation_id_in(G, "d1", inc, 1);
    assert!(ids.contains(&new_id), "{ids:?}");
    let row = s
        .observation(&new_id)
        .unwrap()
        .expect("row of the new buffer");
    let rendered = cloud_hub::fhir::render::render_observation(&row).unwrap();
    assert_eq!(rendered["id"], new_id.as_str());
    // A third buffer names the one of the newest earlier batch (here the
    // legacy batch 2 just above) as the one before it.
    let r = ingest(
        s,
        &with(7, batch(1, vec![entry("d1", vec![spo2(T0 + 9 * MIN, 1)])])),
        &none,
    );
    assert_eq!(r.ack.accepted, 1);
    assert_eq!(r.new_incarnation.unwrap().previous, Some(0));
    let r = ingest(
        s,
        &with(9, batch(1, vec![entry("d1", vec![spo2(T0 + 9 * MIN, 1)])])),
        &none,
    );
    assert_eq!(r.new_incarnation.unwrap().previous, Some(7));
}

/// Sequences are unsigned on the wire and signed 64-bit in storage: one
/// above 2^63-1 is refused with its reason, never stored wrapped.
fn sequences_above_i64_max_are_refused_not_wrapped(s: &Store) {
    let none = Associations::new();
    let mut b = batch(u64::MAX, vec![entry("d1", vec![spo2(T0, 1)])]);
    match s.ingest(G, &b, &none, now(), now()) {
        Err(StoreError::BatchRefused(e)) => {
            assert_eq!(e.field, "sequence");
            assert!(e.to_string().contains("18446744073709551615"), "{e}");
        }
        other => panic!("expected BatchRefused, got {other:?}"),
    }
    b.sequence = 1;
    b.incarnation = 1 << 63;
    match s.ingest(G, &b, &none, now(), now()) {
        Err(StoreError::BatchRefused(e)) => assert_eq!(e.field, "incarnation"),
        other => panic!("expected BatchRefused, got {other:?}"),
    }
    assert_eq!(search(s, &[]).0, 0, "nothing of a refused batch is stored");
    let r = ingest(
        s,
        &batch(
            1,
            vec![entry(
                "d1",
                vec![spo2(T0, u64::MAX), spo2(T0 + MIN, i64::MAX as u64)],
            )],
        ),
        &none,
    );
    assert_eq!((r.ack.accepted, r.ack.rejected), (1, 1));
    assert_eq!(r.rejected_reasons, vec![RejectReason::Malformed]);
    assert_eq!(r.ack.rejections[0].sequence, u64::MAX);
    assert!(r.ack.rejections[0].detail.contains("2^63-1"));
    let (total, ids) = search(s, &[]);
    assert_eq!(total, 1);
    assert_eq!(ids, vec![oid("d1", i64::MAX as u64)]);
}

fn rejections_are_stored_with_reasons(s: &Store) {
    let none = Associations::new();
    let mut unknown = spo2(T0, 2);
    unknown.mdc_code = 1;
    let r = ingest(
        s,
        &batch(
            1,
            vec![
                entry(
                    "d1",
                    vec![spo2(T0, 1), unknown, spo2(946_684_799_000_000, 3)],
                ),
                DeviceData {
                    device: None,
                    readings: vec![spo2(T0, 9)],
                    ..Default::default()
                },
            ],
        ),
        &none,
    );
    assert_eq!((r.ack.accepted, r.ack.rejected), (1, 3));
    let mut reasons: Vec<RejectReason> = r.rejected_reasons.clone();
    reasons.sort_by_key(|x| *x as i32);
    let mut want = vec![
        RejectReason::UnknownMetric,
        RejectReason::ImpossibleTime,
        RejectReason::MissingDevice,
    ];
    want.sort_by_key(|x| *x as i32);
    assert_eq!(reasons, want);
    let seqs: Vec<u64> = r.ack.rejections.iter().map(|x| x.sequence).collect();
    assert_eq!(seqs, vec![2, 3, 9]);
    assert_eq!(
        search(s, &[]).0,
        1,
        "rejected readings are not observations"
    );
    // The re-sent batch reports the stored rejections, not new ones.
    let again = ingest(s, &batch(1, vec![]), &none);
    assert_eq!((again.ack.rejected, again.ack.rejections.len()), (3, 3));
    assert!(again.rejected_reasons.is_empty());
}

fn out_of_range_values_are_counted_once(s: &Store) {
    let none = Associations::new();
    let bad = numeric(codes::PULS_OXIM_SAT_O2, "%", 140.0, T0, 1);
    let r = ingest(
        s,
        &batch(1, vec![entry("d1", vec![bad.clone(), spo2(T0, 2)])]),
        &none,
    );
    assert_eq!((r.ack.accepted, r.out_of_range), (2, 1));
    let r = ingest(s, &batch(2, vec![entry("d1", vec![bad])]), &none);
    assert_eq!((r.ack.duplicates, r.out_of_range), (1, 0));
}

/// Device d1's blood-pressure panel (sequences 10-12) and a heart rate
/// (13), stored with `assoc`.
fn ingest_bp_panel_and_heart_rate(s: &Store, assoc: &Associations) {
    let sys = numeric(codes::PRESS_BLD_NONINV_SYS, "mm[Hg]", 120.0, T0, 10);
    let dia = numeric(codes::PRESS_BLD_NONINV_DIA, "mm[Hg]", 80.0, T0, 11);
    let mean = numeric(codes::PRESS_BLD_NONINV_MEAN, "mm[Hg]", 93.0, T0, 12);
    let r = ingest(
        s,
        &batch(1, vec![entry("d1", vec![sys, dia, mean, hr(T0, 13)])]),
        assoc,
    );
    assert_eq!(r.ack.accepted, 4);
}

fn bp_panel_lists_the_panel_not_its_parts(s: &Store) {
    let none = Associations::new();
    ingest_bp_panel_and_heart_rate(s, &none);
    let (n, ids) = search(s, &[]);
    let pid = panel_id(G, "d1", 10);
    assert_eq!(n, 2, "panel + heart rate: {ids:?}");
    assert!(ids.contains(&pid));
    let panel = s.observation(&pid).unwrap().expect("panel row");
    assert_eq!(panel.kind, RowKind::BpPanel.as_str());
    let members = DeviceData::decode(panel.payload.unwrap().as_slice()).unwrap();
    assert_eq!(members.readings.len(), 3);
    // Parts stay readable by id.
    let part = s.observation(&oid("d1", 11)).unwrap().expect("part row");
    assert_eq!(part.kind, RowKind::Reading.as_str());
    // The panel answers the BP panel code.
    assert_eq!(search(s, &[("code", "85354-9")]).1, vec![pid]);
    // Re-sending the parts in a new batch adds nothing.
    let sys = numeric(codes::PRESS_BLD_NONINV_SYS, "mm[Hg]", 120.0, T0, 10);
    let dia = numeric(codes::PRESS_BLD_NONINV_DIA, "mm[Hg]", 80.0, T0, 11);
    let r = ingest(s, &batch(2, vec![entry("d1", vec![sys, dia])]), &none);
    assert_eq!((r.ack.accepted, r.ack.duplicates), (0, 2));
    assert_eq!(search(s, &[]).0, 2);
}

/// The lake export's reads: reading rows (BP parts included, the panel
/// row not) with their payloads in cursor order, paged and bounded; the
/// score history likewise; the export lock runs the export.
fn lake_reads_page_by_cursor(s: &Store) -> Result<(), StoreError> {
    use cloud_hub::score_history::{Entry, Kind, should_write};
    let assoc = Associations::from([((G.to_owned(), "d1".to_owned()), "p-1".to_owned())]);
    ingest_bp_panel_and_heart_rate(s, &assoc);
    let all = s.lake_readings(0, None, 100)?;
    let ids: Vec<String> = all.iter().map(|r| r.row.id.clone()).collect();
    assert_eq!(
        ids,
        (10..=13).map(|q| oid("d1", q)).collect::<Vec<_>>(),
        "the parts and the reading, in storage order; not the panel"
    );
    assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));
    for r in &all {
        let reading = Reading::decode(r.row.payload.as_deref().unwrap()).unwrap();
        assert_eq!(oid("d1", reading.sequence), r.row.id);
        assert_eq!(r.row.patient_id.as_deref(), Some("p-1"));
    }
    assert_eq!(s.lake_readings_count(0)?, 4);
    assert_eq!(s.lake_readings_count(all[0].cursor)?, 3);
    let first = s.lake_readings(0, None, 2)?;
    let rest = s.lake_readings(first[1].cursor, None, 100)?;
    assert_eq!(first.len() + rest.len(), 4);
    assert_eq!(rest[0].row.id, all[2].row.id);
    let bounded = s.lake_readings(all[0].cursor, Some(all[2].cursor), 100)?;
    assert_eq!(
        bounded.iter().map(|r| r.cursor).collect::<Vec<_>>(),
        vec![all[1].cursor, all[2].cursor]
    );
    let e = Entry {
        total: Some(2),
        band: Some("low".into()),
        missing: vec![],
        stale: vec![],
        components: None,
    };
    let both = [(Kind::News2, e.clone()), (Kind::Mews, e.clone())];
    assert_eq!(s.record_scores("p-1", T0, &both, should_write)?, 2);
    let scores = s.lake_scores(0, None, 100)?;
    assert_eq!(scores.len(), 2);
    assert!(
        scores
            .iter()
            .all(|x| x.patient_id == "p-1" && x.point == (T0, e.clone()))
    );
    let mut kinds: Vec<&str> = scores.iter().map(|x| x.kind.as_str()).collect();
    kinds.sort();
    assert_eq!(kinds, vec!["mews", "news2"]);
    assert_eq!(s.lake_scores(scores[0].cursor, None, 100)?.len(), 1);
    assert_eq!(s.lake_scores(0, Some(scores[0].cursor), 100)?.len(), 1);
    // The export lock: PostgreSQL refuses a second holder (another
    // session) while the first exports; SQLite (one hub) runs both.
    let mut inner = None;
    assert!(s.lake_exclusive(&mut || inner = Some(s.lake_exclusive(&mut || {})))?);
    assert_eq!(inner.unwrap()?, s.backend() == "sqlite");
    let mut ran = false;
    assert!(s.lake_exclusive(&mut || ran = true)?, "released after use");
    assert!(ran);
    Ok(())
}

fn waveforms_and_technical_readings_are_stored(s: &Store) {
    let none = Associations::new();
    let mut e = entry("d1", vec![]);
    e.waveforms.push(Waveform {
        mdc_code: 150_452,
        vendor_label: "PLETH".into(),
        start_time_us: T0,
        sample_period_us: 13_333,
        scale: 0.5,
        ucum_unit: "1".into(),
        samples: vec![1, -2, 300],
        validity: 1,
        sequence: 7,
        ..Default::default()
    });
    e.technical.push(TechnicalReading {
        kind: TechnicalKind::Connected as i32,
        time_us: T0,
        sequence: 8,
        ..Default::default()
    });
    let r = ingest(s, &batch(1, vec![e.clone()]), &none);
    assert_eq!((r.ack.accepted, r.ack.rejected), (2, 0));
    let row = s.observation(&oid("d1", 7)).unwrap().expect("waveform row");
    assert_eq!(row.kind, RowKind::Waveform.as_str());
    let w = Waveform::decode(row.payload.unwrap().as_slice()).unwrap();
    assert_eq!(w.samples, vec![1, -2, 300]);
    let r = ingest(s, &batch(2, vec![e]), &none);
    assert_eq!((r.ack.accepted, r.ack.duplicates), (0, 2));
}

/// A search's total over a range of hours: whole hours, partial first and
/// last hours, one-sided ranges and a range within one hour all count
/// every match once (SQLite adds whole hours from its per-hour totals).
fn search_totals_over_hours_count_every_match(s: &Store) {
    const HOUR: i64 = 60 * MIN;
    let assoc = Associations::from([
        ((G.to_owned(), "d1".to_owned()), "p1".to_owned()),
        ((G.to_owned(), "d2".to_owned()), "p2".to_owned()),
    ]);
    // Over 7 hours from T0 (an hour's start): p1's SpO2 every 7 min 13 s
    // after T0 and its heart rate 30 s later; p2's SpO2 every 14 min.
    let at = |k: i64| T0 + 13_000_000 + k * 7 * MIN;
    let (mut d1, mut d2) = (Vec::new(), Vec::new());
    let mut rows: Vec<(&str, &str, i64)> = Vec::new();
    for k in 0..60 {
        d1.push(spo2(at(k), 2 * k as u64));
        d1.push(hr(at(k) + 30_000_000, 2 * k as u64 + 1));
        rows.push(("p1", "spo2", at(k)));
        rows.push(("p1", "hr", at(k) + 30_000_000));
        if k % 2 == 0 {
            d2.push(spo2(at(k) + MIN, k as u64));
            rows.push(("p2", "spo2", at(k) + MIN));
        }
    }
    let r = ingest(s, &batch(1, vec![entry("d1", d1), entry("d2", d2)]), &assoc);
    assert_eq!(r.ack.accepted as usize, rows.len());
    let spo2_loinc = metric_of(&spo2(T0, 0)).unwrap().loinc;
    let hr_loinc = metric_of(&hr(T0, 0)).unwrap().loinc;
    let both = format!("{spo2_loinc},{hr_loinc}");
    // 2026-03-01T… for T0 + `t` (less than a day).
    let date = |t: i64| {
        let s = (t - T0) / 1_000_000;
        format!(
            "2026-03-01T{:02}:{:02}:{:02}Z",
            s / 3600,
            s / 60 % 60,
            s % 60
        )
    };
    let bounds = [
        None,
        Some(T0),
        Some(T0 + 30 * MIN + 5_000_000),
        Some(T0 + HOUR),
        Some(T0 + 2 * HOUR),
        Some(T0 + 3 * HOUR - 1_000_000),
        Some(T0 + 3 * HOUR + 20 * MIN),
        Some(T0 + 5 * HOUR),
        Some(T0 + 9 * HOUR),
    ];
    let searches: [(&str, &[&str], &str, &[&str]); 4] = [
        ("p1", &["p1"], spo2_loinc, &["spo2"]),
        ("p1,p2", &["p1", "p2"], spo2_loinc, &["spo2"]),
        ("p1", &["p1"], &both, &["spo2", "hr"]),
        ("p2", &["p2"], hr_loinc, &["hr"]),
    ];
    for (patient, patients, code, codes) in searches {
        for lo in bounds {
            for hi in bounds {
                let (lo_q, hi_q) = (
                    lo.map(|t| format!("ge{}", date(t))),
                    hi.map(|t| format!("lt{}", date(t))),
                );
                let mut q = vec![("patient", patient), ("code", code), ("_count", "50")];
                q.extend(lo_q.as_deref().map(|d| ("date", d)));
                q.extend(hi_q.as_deref().map(|d| ("date", d)));
                let expected = rows
                    .iter()
                    .filter(|(p, c, t)| {
                        patients.contains(p)
                            && codes.contains(c)
                            && lo.is_none_or(|lo| *t >= lo)
                            && hi.is_none_or(|hi| *t < hi)
                    })
                    .count() as u64;
                let (total, page) = search(s, &q);
                assert_eq!(total, expected, "{q:?}");
                assert_eq!(page.len() as u64, expected.min(50), "{q:?}");
            }
        }
    }
}

fn search_filters_pages_and_sorts(s: &Store) {
    let mut assoc = Associations::new();
    assoc.insert((G.into(), "d1".into()), "p1".into());
    // d1 (patient p1): SpO2 and HR each minute for 5 minutes; d2 (no
    // patient): SpO2; d3: glucose (laboratory) at T0 + 10 min.
    let mut d1 = Vec::new();
    for i in 0..5u64 {
        d1.push(spo2(T0 + i as i64 * MIN, 2 * i));
        d1.push(hr(T0 + i as i64 * MIN, 2 * i + 1));
    }
    let glu = numeric(
        codes::CONC_GLU_CAPILLARY_WHOLEBLOOD,
        "mg/dL",
        95.0,
        T0 + 10 * MIN,
        1,
    );
    let r = ingest(
        s,
        &batch(
            1,
            vec![
                entry("d1", d1),
                entry("d2", vec![spo2(T0, 1)]),
                entry("d3", vec![glu]),
            ],
        ),
        &assoc,
    );
    assert_eq!(r.ack.accepted, 12);
    assert_eq!(search(s, &[]).0, 12);
    assert_eq!(search(s, &[("patient", "p1")]).0, 10);
    assert_eq!(search(s, &[("patient", "Patient/p1")]).0, 10);
    assert_eq!(search(s, &[("patient", "nobody")]).0, 0);
    let spo2_loinc = metric_of(&spo2(T0, 0)).unwrap().loinc;
    assert_eq!(search(s, &[("code", spo2_loinc)]).0, 6);
    assert_eq!(search(s, &[("patient", "p1"), ("code", spo2_loinc)]).0, 5);
    assert_eq!(search(s, &[("code", "8867-4,41653-7")]).0, 6);
    assert_eq!(search(s, &[("category", "laboratory")]).0, 1);
    assert_eq!(search(s, &[("category", "vital-signs")]).0, 11);
    assert_eq!(
        search(
            s,
            &[
                ("date", "ge2026-03-01T00:02:00Z"),
                ("date", "lt2026-03-01T00:04:00Z")
            ]
        )
        .0,
        4
    );
    assert_eq!(search(s, &[("date", "2026-03-01")]).0, 12);
    assert_eq!(search(s, &[("date", "2026-02")]).0, 0);
    let dev2 = format!("Device/{}", device_resource_id(G, "d2"));
    assert_eq!(search(s, &[("device", &dev2)]).1, vec![oid("d2", 1)]);
    // Paging and sort.
    let (n, page) = search(s, &[("patient", "p1"), ("_count", "3"), ("_sort", "date")]);
    assert_eq!((n, page.len()), (10, 3));
    let first_two = [oid("d1", 0), oid("d1", 1)];
    assert!(first_two.contains(&page[0]) && first_two.contains(&page[1]));
    let (_, page3) = search(
        s,
        &[
            ("patient", "p1"),
            ("_count", "3"),
            ("_offset", "9"),
            ("_sort", "date"),
        ],
    );
    assert_eq!(page3.len(), 1);
    let (_, desc) = search(s, &[("_count", "1"), ("_sort", "-date")]);
    assert_eq!(desc, vec![oid("d3", 1)]);
    // Each row of a page carries its own device's columns (a page of
    // several devices, past an offset).
    let q: Vec<(String, String)> = [("_count", "6"), ("_offset", "6"), ("_sort", "date")]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let (_, rows) = s.search(&parse_search(&q).unwrap()).unwrap();
    assert_eq!(rows.len(), 6);
    let devices: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.device_id.as_str()).collect();
    assert_eq!(devices.len(), 2, "{devices:?}");
    for r in &rows {
        assert_eq!(
            (
                r.manufacturer.as_str(),
                r.model.as_str(),
                r.serial_number.clone()
            ),
            ("Acme", "M1", format!("SN-{}", r.device_id))
        );
    }
    let (n, none) = search(s, &[("_count", "0")]);
    assert_eq!((n, none.len()), (12, 0));
    // Unknown codes match nothing.
    assert_eq!(search(s, &[("code", "http://loinc.org|0000-0")]).0, 0);
}

/// A search's total and page come from one snapshot: while another thread
/// commits batch after batch, every search whose matches fit in one page
/// returns exactly as many rows as its total.
fn a_search_total_agrees_with_its_page_while_ingest_commits(s: &Store) {
    let none = Associations::new();
    let done = std::sync::atomic::AtomicBool::new(false);
    let searches = std::thread::scope(|sc| {
        sc.spawn(|| {
            for n in 0..80u64 {
                let readings = (0..8u64)
                    .map(|i| spo2(T0 + (n * 8 + i) as i64 * MIN, n * 8 + i))
                    .collect();
                ingest(s, &batch(n + 1, vec![entry("d1", readings)]), &none);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut searches = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            // Blocking and awaited (PostgreSQL) alike; the two may see
            // different commits.
            let (blocking, awaited) = search_both(s, &[("_count", "1000")]);
            for (total, rows) in std::iter::once(blocking).chain(awaited) {
                assert_eq!(total, rows.len() as u64, "search {searches}");
            }
            searches += 1;
        }
        searches
    });
    assert!(searches > 0);
    assert_eq!(search(s, &[("_count", "1000")]).0, 640);
}

fn reads_devices_and_patients(s: &Store) {
    let mut assoc = Associations::new();
    assoc.insert((G.into(), "d1".into()), "p1".into());
    ingest(
        s,
        &batch(
            1,
            vec![entry("d1", vec![spo2(T0, 1)]), entry("d2", vec![hr(T0, 1)])],
        ),
        &assoc,
    );
    let row = s.observation(&oid("d1", 1)).unwrap().expect("row");
    assert_eq!(
        (
            row.gateway_id.as_str(),
            row.device_id.as_str(),
            row.patient_id.as_deref()
        ),
        (G, "d1", Some("p1"))
    );
    assert_eq!(
        (row.manufacturer.as_str(), row.serial_number.as_str()),
        ("Acme", "SN-d1")
    );
    assert_eq!(
        Reading::decode(row.payload.unwrap().as_slice()).unwrap(),
        spo2(T0, 1)
    );
    assert!(s.observation("0000").unwrap().is_none());
    // A stored device's sequence that is not stored, in the id's own form.
    assert!(s.observation(&oid("d1", 2)).unwrap().is_none());
    // The non-blocking read the API awaits (PostgreSQL's) answers the same.
    let is_postgres = s.backend() == "postgres";
    assert_eq!(s.observation_future("0000").is_some(), is_postgres);
    for id in [oid("d1", 1), oid("d1", 2), "0000".to_owned()] {
        if let Some(f) = s.observation_future(&id) {
            let blocking = s.observation(&id).unwrap().map(|r| (r.id, r.version));
            let row = await_read(f).unwrap().map(|r| (r.id, r.version));
            assert_eq!(row, blocking, "{id}");
        }
    }
    let d = s
        .device(&device_resource_id(G, "d2"))
        .unwrap()
        .expect("device");
    assert_eq!((d.device_id.as_str(), d.model.as_str()), ("d2", "M1"));
    assert!(s.device("nope").unwrap().is_none());
    let (total, page) = s.devices(1, 1).unwrap();
    assert_eq!(
        (total, page.len(), page[0].device_id.as_str()),
        (2, 1, "d2")
    );
    assert_eq!(s.patient("p1").unwrap(), Some(String::new()));
    assert_eq!(s.patient("p2").unwrap(), None);
    // Export: pages by row order, patient-level only attributed rows.
    let all = s.export_observations(0, 10, None, false, None).unwrap();
    assert_eq!(all.len(), 2);
    let after = s
        .export_observations(all[0].0, 10, None, false, None)
        .unwrap();
    assert_eq!(after.len(), 1);
    let attributed = s.export_observations(0, 10, None, true, None).unwrap();
    assert_eq!(attributed.len(), 1);
    assert!(
        s.export_observations(0, 10, Some(i64::MAX), false, None)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.export_patients(None).unwrap(),
        vec![("p1".into(), String::new())]
    );
}

fn gateways_and_tokens(s: &Store) {
    s.add_gateway("g", "h1").unwrap();
    assert!(matches!(
        s.add_gateway("g", "h2"),
        Err(StoreError::GatewayExists(_))
    ));
    assert_eq!(s.authenticate("h1").unwrap().as_deref(), Some("g"));
    assert!(s.gateway_is_active("g").unwrap());
    s.revoke_gateway("g").unwrap();
    s.revoke_gateway("g").unwrap();
    assert_eq!(s.authenticate("h1").unwrap(), None);
    assert!(!s.gateway_is_active("g").unwrap());
    assert!(s.list_gateways().unwrap()[0].revoked_us.is_some());
    assert!(matches!(
        s.revoke_gateway("nope"),
        Err(StoreError::GatewayNotFound(_))
    ));
    s.add_gateway("g", "h3").unwrap();
    assert_eq!(s.authenticate("h3").unwrap().as_deref(), Some("g"));
    // Rotation with a grace period.
    s.rotate_gateway("g", "h4", Some(5_000), 1_000).unwrap();
    assert_eq!(
        s.authenticate_at("h3", 4_999).unwrap().as_deref(),
        Some("g")
    );
    assert_eq!(
        s.authenticate_at("h4", 4_999).unwrap().as_deref(),
        Some("g")
    );
    assert_eq!(s.authenticate_at("h3", 5_000).unwrap(), None);
    s.rotate_gateway("g", "h5", None, 2_000).unwrap();
    assert_eq!(s.authenticate_at("h4", 2_000).unwrap(), None);
    s.revoke_gateway("g").unwrap();
    assert!(matches!(
        s.rotate_gateway("g", "h6", None, 3_000),
        Err(StoreError::GatewayRevoked(_))
    ));
    s.add_gateway("a", "ha").unwrap();
    let ids: Vec<String> = s
        .list_gateways()
        .unwrap()
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(ids, vec!["a", "g"]);
    s.ping().unwrap();
}

fn enrolment_tokens_are_single_use(s: &Store) {
    s.add_enrollment("tok", 1_000).unwrap();
    assert!(matches!(
        s.enroll("tok", "gw", "g1", 2_000),
        Err(StoreError::EnrollmentRefused)
    ));
    s.add_enrollment("tok2", 10_000).unwrap();
    s.enroll("tok2", "gw", "g1", 2_000).unwrap();
    assert_eq!(s.authenticate("g1").unwrap().as_deref(), Some("gw"));
    assert!(matches!(
        s.enroll("tok2", "gw2", "g2", 2_001),
        Err(StoreError::EnrollmentRefused)
    ));
    s.add_enrollment("tok3", 10_000).unwrap();
    assert!(matches!(
        s.enroll("tok3", "gw", "g3", 2_002),
        Err(StoreError::GatewayExists(_))
    ));
    s.revoke_gateway("gw").unwrap();
    s.enroll("tok3", "gw", "g3", 2_003).unwrap();
    assert_eq!(s.authenticate("g3").unwrap().as_deref(), Some("gw"));
    assert_eq!(s.authenticate("g1").unwrap(), None);
}

fn association_attributes_and_reattributes(s: &Store) {
    let none = Associations::new();
    let p = |v: &str| PatientId {
        system: "urn:mrn".into(),
        value: v.into(),
    };
    for (id, ward) in [("b1", "icu"), ("b2", "icu"), ("b3", "ward-3")] {
        s.create_bed(&Bed {
            id: id.into(),
            ward: ward.into(),
            label: id.to_uppercase(),
        })
        .unwrap();
    }
    assert!(matches!(
        s.create_bed(&Bed {
            id: "b1".into(),
            ward: "icu".into(),
            label: "x".into()
        }),
        Err(AssocError::BedExists(_))
    ));
    assert_eq!(s.list_beds().unwrap().len(), 3);
    // Readings arrive before anything is known: held unattributed.
    ingest(
        s,
        &batch(
            1,
            vec![entry("d1", vec![spo2(T0, 1), spo2(T0 + 10 * MIN, 2)])],
        ),
        &none,
    );
    assert_eq!(s.unattributed_count().unwrap(), 2);
    // Placement, then admission (back-dated): both readings get the patient.
    assert_eq!(
        s.place_device(G, "d1", "b1", T0 - MIN, &none)
            .unwrap()
            .reattributed,
        0
    );
    let c = s
        .admit(&p("mrn-1"), "b1", T0 - MIN, Some("v1"), &none)
        .unwrap();
    assert_eq!(c.reattributed, 2);
    assert_eq!(s.unattributed_count().unwrap(), 0);
    assert_eq!(search(s, &[("patient", "mrn-1")]).0, 2);
    // A new reading is attributed at ingest by the stay.
    ingest(
        s,
        &batch(2, vec![entry("d1", vec![spo2(T0 + 20 * MIN, 3)])]),
        &none,
    );
    let row = s.observation(&oid("d1", 3)).unwrap().unwrap();
    assert_eq!(
        (row.patient_id.as_deref(), row.patient_system.as_deref()),
        (Some("mrn-1"), Some("urn:mrn"))
    );
    // Bed occupied; patient already admitted.
    assert!(matches!(
        s.admit(&p("mrn-2"), "b1", T0, None, &none),
        Err(AssocError::BedOccupied(_))
    ));
    assert!(matches!(
        s.admit(&p("mrn-1"), "b2", T0, None, &none),
        Err(AssocError::AlreadyAdmitted)
    ));
    // A back-dated transfer at T0 + 5 min moves readings 2 and 3 away from
    // b1's device (the device stays at b1).
    let c = s.transfer(&p("mrn-1"), "b2", T0 + 5 * MIN, &none).unwrap();
    assert_eq!(c.reattributed, 2);
    assert_eq!(search(s, &[("patient", "mrn-1")]).0, 1);
    assert_eq!(
        s.bed_of(&p("mrn-1"), T0 + 6 * MIN).unwrap().as_deref(),
        Some("b2")
    );
    assert_eq!(
        s.stay_of_visit("v1", T0 + 6 * MIN).unwrap(),
        Some(p("mrn-1"))
    );
    // Moving the device to b2 at T0 + 5 min brings them back.
    let c = s.place_device(G, "d1", "b2", T0 + 5 * MIN, &none).unwrap();
    assert_eq!(c.reattributed, 2);
    assert_eq!(search(s, &[("patient", "mrn-1")]).0, 3);
    let occ = s.occupancy(T0 + 6 * MIN).unwrap();
    let b2 = occ.iter().find(|o| o.bed.id == "b2").unwrap();
    assert_eq!(b2.patient.as_ref().map(|x| x.value.as_str()), Some("mrn-1"));
    assert_eq!(b2.devices.len(), 1);
    assert!(
        occ.iter()
            .find(|o| o.bed.id == "b1")
            .unwrap()
            .devices
            .is_empty()
    );
    // Identifier change of the visit re-attributes its readings.
    let c = s
        .change_identifier(&p("mrn-1"), &p("mrn-9"), "v1", &none)
        .unwrap();
    assert_eq!(c.reattributed, 3);
    assert_eq!(search(s, &[("patient", "mrn-9")]).0, 3);
    assert_eq!(s.patient("mrn-9").unwrap().as_deref(), Some("urn:mrn"));
    // Discharge at T0 + 15 min: reading 3 (T0 + 20 min) loses its patient.
    let c = s.discharge(&p("mrn-9"), T0 + 15 * MIN, &none).unwrap();
    assert_eq!(c.reattributed, 1);
    assert_eq!(s.unattributed_count().unwrap(), 1);
    // With a config fallback the unattributed reading goes to it.
    let mut fallback = Associations::new();
    fallback.insert((G.into(), "d1".into()), "cfg-patient".into());
    let c = s.remove_device(G, "d1", T0 + 18 * MIN, &fallback).unwrap();
    assert_eq!(c.reattributed, 1);
    assert_eq!(search(s, &[("patient", "cfg-patient")]).0, 1);
    assert!(matches!(
        s.remove_device(G, "d1", T0 + 30 * MIN, &none),
        Err(AssocError::NotPlaced)
    ));
    // A reading's own subject wins and is never re-attributed.
    let mut own = spo2(T0 + 7 * MIN, 4);
    own.subject = Some(Identifier {
        system: "urn:other".into(),
        value: "self-1".into(),
    });
    ingest(s, &batch(3, vec![entry("d1", vec![own])]), &none);
    assert_eq!(search(s, &[("patient", "self-1")]).0, 1);
    s.place_device(G, "d1", "b3", T0, &none).unwrap();
    assert_eq!(search(s, &[("patient", "self-1")]).0, 1);
    // Ward-level export sees the patients of that ward's beds.
    assert_eq!(
        s.export_patients(Some("icu")).unwrap(),
        vec![("mrn-9".into(), "urn:mrn".into())]
    );
}

/// The patient a stored reading is attributed to.
fn who(s: &Store, device: &str, seq: u64) -> Option<String> {
    s.observation(&oid(device, seq))
        .unwrap()
        .unwrap()
        .patient_id
}

fn beds(s: &Store, ids: &[&str]) {
    for id in ids {
        s.create_bed(&Bed {
            id: (*id).into(),
            ward: "icu".into(),
            label: id.to_uppercase(),
        })
        .unwrap();
    }
}

fn mrn(v: &str) -> PatientId {
    PatientId {
        system: "urn:mrn".into(),
        value: v.into(),
    }
}

fn association_intervals_are_half_open_and_merged(s: &Store) {
    let none = Associations::new();
    beds(s, &["b1", "b2", "b3"]);
    s.place_device(G, "d1", "b1", T0, &none).unwrap();
    s.place_device(G, "d2", "b2", T0, &none).unwrap();
    s.admit(&mrn("m1"), "b1", T0, None, &none).unwrap();
    let (t_transfer, t_discharge) = (T0 + 30 * MIN, T0 + 60 * MIN);
    s.transfer(&mrn("m1"), "b2", t_transfer, &none).unwrap();
    s.discharge(&mrn("m1"), t_discharge, &none).unwrap();
    ingest(
        s,
        &batch(
            1,
            vec![
                entry("d1", vec![spo2(t_transfer - 1, 1), spo2(t_transfer, 2)]),
                entry(
                    "d2",
                    vec![
                        spo2(t_transfer - 1, 1),
                        spo2(t_transfer, 2),
                        spo2(t_discharge - 1, 3),
                        spo2(t_discharge, 4),
                    ],
                ),
            ],
        ),
        &none,
    );
    let m1 = Some("m1".to_string());
    assert_eq!(who(s, "d1", 1), m1);
    assert_eq!(
        who(s, "d1", 2),
        None,
        "at the transfer instant: the new bed"
    );
    assert_eq!(who(s, "d2", 1), None);
    assert_eq!(who(s, "d2", 2), m1);
    assert_eq!(who(s, "d2", 3), m1);
    assert_eq!(who(s, "d2", 4), None, "at the discharge instant: nobody");
    // Removing a device at an instant: a reading then is no longer at the bed.
    s.admit(&mrn("m2"), "b1", t_discharge, None, &none).unwrap();
    s.remove_device(G, "d1", t_discharge + MIN, &none).unwrap();
    ingest(
        s,
        &batch(
            2,
            vec![entry(
                "d1",
                vec![spo2(t_discharge + MIN - 1, 3), spo2(t_discharge + MIN, 4)],
            )],
        ),
        &none,
    );
    assert_eq!(who(s, "d1", 3).as_deref(), Some("m2"));
    assert_eq!(who(s, "d1", 4), None);
    // A placement back-dated before the device's next one at the same bed
    // is merged with it: one placement, since the earlier instant.
    s.place_device(G, "d3", "b3", T0 + 10 * MIN, &none).unwrap();
    let c = s.place_device(G, "d3", "b3", T0, &none).unwrap();
    assert_eq!(c.reattributed, 0);
    let since = |at: i64| {
        s.occupancy(at)
            .unwrap()
            .into_iter()
            .find(|o| o.bed.id == "b3")
            .unwrap()
            .devices
            .iter()
            .map(|d| (d.device_id.clone(), d.since_us))
            .collect::<Vec<_>>()
    };
    assert_eq!(since(T0 + 20 * MIN), vec![("d3".to_string(), T0)]);
    // Placing it where it already is changes nothing.
    s.place_device(G, "d3", "b3", T0 + 15 * MIN, &none).unwrap();
    assert_eq!(since(T0 + 20 * MIN), vec![("d3".to_string(), T0)]);
}

fn association_back_dated_changes_move_readings(s: &Store) {
    let none = Associations::new();
    beds(s, &["b1", "b2", "b3"]);
    s.place_device(G, "da", "b1", T0, &none).unwrap();
    s.place_device(G, "db", "b2", T0, &none).unwrap();
    s.place_device(G, "dc", "b3", T0, &none).unwrap();
    s.admit(&mrn("m1"), "b1", T0, Some("v1"), &none).unwrap();
    ingest(
        s,
        &batch(
            1,
            vec![
                entry("da", vec![spo2(T0 + MIN, 1), spo2(T0 + 40 * MIN, 2)]),
                entry("db", vec![spo2(T0 + MIN, 1), spo2(T0 + 40 * MIN, 2)]),
            ],
        ),
        &none,
    );
    // The transfer happened at T0 + 30 min; it is recorded later.
    let c = s.transfer(&mrn("m1"), "b2", T0 + 30 * MIN, &none).unwrap();
    assert_eq!(c.reattributed, 2);
    assert_eq!(who(s, "da", 1).as_deref(), Some("m1"));
    assert_eq!(who(s, "da", 2), None);
    assert_eq!(who(s, "db", 2).as_deref(), Some("m1"));
    // A second patient in the freed bed takes da's later reading.
    s.admit(&mrn("m2"), "b1", T0 + 35 * MIN, None, &none)
        .unwrap();
    assert_eq!(who(s, "da", 2).as_deref(), Some("m2"));
    // Recorded again earlier: the b2 stay starts earlier, merged, same visit.
    let c = s.transfer(&mrn("m1"), "b2", T0 + 20 * MIN, &none).unwrap();
    assert_eq!(c.reattributed, 0);
    assert_eq!(
        s.bed_of(&mrn("m1"), T0 + 25 * MIN).unwrap().as_deref(),
        Some("b2")
    );
    assert_eq!(
        s.stay_of_visit("v1", T0 + 25 * MIN).unwrap(),
        Some(mrn("m1"))
    );
    // Two later transfers, then a discharge before them: the admission ends,
    // later transfers included.
    s.transfer(&mrn("m1"), "b3", T0 + 50 * MIN, &none).unwrap();
    ingest(
        s,
        &batch(2, vec![entry("dc", vec![spo2(T0 + 55 * MIN, 1)])]),
        &none,
    );
    assert_eq!(who(s, "dc", 1).as_deref(), Some("m1"));
    let c = s.discharge(&mrn("m1"), T0 + 5 * MIN, &none).unwrap();
    assert_eq!(c.reattributed, 2, "db #2 and dc #1");
    assert_eq!(who(s, "dc", 1), None);
    assert_eq!(who(s, "db", 2), None);
    assert_eq!(who(s, "da", 1).as_deref(), Some("m1"));
    assert_eq!(s.bed_of(&mrn("m1"), T0 + 25 * MIN).unwrap(), None);
    // Discharged again at the same instant: a repeat.
    assert_eq!(
        s.discharge(&mrn("m1"), T0 + 5 * MIN, &none)
            .unwrap()
            .reattributed,
        0
    );
}

/// A re-attribution reports whose readings moved to whom and how many, and
/// each moved row becomes a new version (FHIR `meta.versionId` and
/// `meta.lastUpdated`), the same by id and by search; unmoved rows keep
/// version 1.
fn reattribution_names_the_patients_and_versions_the_moved_rows(s: &Store) {
    let none = Associations::new();
    let subject = |v: &str| {
        Some(Subject {
            system: Some("urn:mrn".into()),
            value: v.into(),
        })
    };
    beds(s, &["b1", "b2"]);
    s.place_device(G, "da", "b1", T0, &none).unwrap();
    s.admit(&mrn("m1"), "b1", T0, None, &none).unwrap();
    ingest(
        s,
        &batch(
            1,
            vec![entry(
                "da",
                vec![
                    spo2(T0 + MIN, 1),
                    spo2(T0 + 40 * MIN, 2),
                    spo2(T0 + 50 * MIN, 3),
                ],
            )],
        ),
        &none,
    );
    let row = |seq| s.observation(&oid("da", seq)).unwrap().unwrap();
    let stored = row(2);
    assert_eq!((stored.version, stored.updated_us), (1, stored.received_us));
    let o = cloud_hub::fhir::render::render_observation(&stored).unwrap();
    assert_eq!(o["meta"]["versionId"], "1");
    assert_eq!(
        o["meta"]["lastUpdated"],
        cloud_hub::fhir::format_instant(stored.received_us)
    );
    // m1's stay ended 30 minutes in (recorded late): #2 and #3 leave m1.
    let before = now();
    let c = s.discharge(&mrn("m1"), T0 + 30 * MIN, &none).unwrap();
    assert_eq!(c.reattributed, 2);
    assert_eq!(
        c.moved,
        vec![Moved {
            from: subject("m1"),
            to: None,
            readings: 2
        }]
    );
    // m2 was in that bed from then on: both go to m2.
    let c = s
        .admit(&mrn("m2"), "b1", T0 + 30 * MIN, None, &none)
        .unwrap();
    assert_eq!(
        c.moved,
        vec![Moved {
            from: None,
            to: subject("m2"),
            readings: 2
        }]
    );
    // Moved twice: version 3, updated at the move; #1 never moved.
    let moved = row(2);
    assert_eq!(moved.version, 3);
    assert!(moved.updated_us >= before && moved.updated_us > moved.received_us);
    assert_eq!((row(1).version, row(1).updated_us), (1, row(1).received_us));
    let o = cloud_hub::fhir::render::render_observation(&moved).unwrap();
    assert_eq!(o["meta"]["versionId"], "3");
    assert_eq!(
        o["meta"]["lastUpdated"],
        cloud_hub::fhir::format_instant(moved.updated_us)
    );
    assert_eq!(o["subject"]["reference"], "Patient/m2");
    // Search renders the same rows.
    let pairs = vec![("patient".to_owned(), "m2".to_owned())];
    let (n, rows) = s.search(&parse_search(&pairs).unwrap()).unwrap();
    assert_eq!(n, 2);
    for r in rows {
        assert_eq!((r.version, r.updated_us), (3, moved.updated_us), "{}", r.id);
    }
    // A transfer from bed b1 (where da is) moves #3 from m2 to nobody, and
    // a placement of da at b2 (empty) from 45 minutes in changes nothing
    // more for it.
    let c = s.transfer(&mrn("m2"), "b2", T0 + 45 * MIN, &none).unwrap();
    assert_eq!(
        c.moved,
        vec![Moved {
            from: subject("m2"),
            to: None,
            readings: 1
        }]
    );
    assert_eq!(row(3).version, 4);
    assert_eq!(row(2).version, 3);
    let c = s.place_device(G, "da", "b2", T0 + 45 * MIN, &none).unwrap();
    assert_eq!(
        c.moved,
        vec![Moved {
            from: None,
            to: subject("m2"),
            readings: 1
        }]
    );
    assert_eq!(row(3).version, 5);
}

fn association_conflicts_are_refused_and_repeats_are_no_ops(s: &Store) {
    let c = &Associations::new();
    beds(s, &["b1", "b2"]);
    s.admit(&mrn("m1"), "b1", T0, Some("v1"), c).unwrap();
    assert!(matches!(
        s.admit(&mrn("m2"), "b1", T0 + MIN, None, c),
        Err(AssocError::BedOccupied(_))
    ));
    // Back-dated into a bed occupied later: refused too.
    assert!(matches!(
        s.admit(&mrn("m2"), "b1", T0 - MIN, None, c),
        Err(AssocError::BedOccupied(_))
    ));
    assert!(matches!(
        s.admit(&mrn("m1"), "b2", T0 + MIN, None, c),
        Err(AssocError::AlreadyAdmitted)
    ));
    // The same admission again (an ADT resend) is accepted as is.
    s.admit(&mrn("m1"), "b1", T0, Some("v1"), c).unwrap();
    assert!(matches!(
        s.admit(&mrn("m3"), "nope", T0, None, c),
        Err(AssocError::BedNotFound(_))
    ));
    assert!(matches!(
        s.place_device(G, "d1", "nope", T0, c),
        Err(AssocError::BedNotFound(_))
    ));
    assert!(matches!(
        s.transfer(&mrn("m2"), "b2", T0, c),
        Err(AssocError::NotAdmitted)
    ));
    s.admit(&mrn("m2"), "b2", T0, Some("v2"), c).unwrap();
    assert!(matches!(
        s.transfer(&mrn("m1"), "b2", T0 + MIN, c),
        Err(AssocError::BedOccupied(_))
    ));
    // An identifier change onto a patient with overlapping stays.
    assert!(matches!(
        s.change_identifier(&mrn("m1"), &mrn("m2"), "v1", c),
        Err(AssocError::AlreadyAdmitted)
    ));
    assert_eq!(
        s.bed_of(&mrn("m1"), T0 + MIN).unwrap().as_deref(),
        Some("b1")
    );
    assert!(matches!(
        s.discharge(&mrn("m3"), T0, c),
        Err(AssocError::NotAdmitted)
    ));
    assert!(matches!(
        s.remove_device(G, "d1", T0, c),
        Err(AssocError::NotPlaced)
    ));
    // Refused changes leave nothing behind.
    let occ = s.occupancy(T0 + MIN).unwrap();
    let patients: Vec<_> = occ
        .iter()
        .map(|o| {
            (
                o.bed.id.as_str(),
                o.patient.as_ref().map(|p| p.value.as_str()),
            )
        })
        .collect();
    assert_eq!(patients, vec![("b1", Some("m1")), ("b2", Some("m2"))]);
    assert!(occ.iter().all(|o| o.devices.is_empty()));
}

fn retention_purges_what_is_older_than_the_window(s: &Store) {
    let none = Associations::new();
    let day = 86_400_000_000i64;
    let r = ingest(
        s,
        &batch(
            1,
            vec![entry(
                "d1",
                vec![spo2(T0, 1), spo2(T0 + day, 2), spo2(T0 + 10 * day, 3)],
            )],
        ),
        &none,
    );
    assert_eq!(r.ack.accepted, 3);
    use cloud_hub::score_history::{Entry, Kind, should_write};
    let e = Entry {
        total: Some(1),
        band: Some("low".into()),
        missing: vec![],
        stale: vec![],
        components: None,
    };
    for t in [T0, T0 + 10 * day] {
        let e = Entry {
            total: Some(t % 7),
            ..e.clone()
        };
        assert_eq!(
            s.record_scores("p-1", t, &[(Kind::News2, e)], should_write)
                .unwrap(),
            1
        );
    }
    let purged = s.purge_before(T0 + 5 * day).unwrap();
    assert_eq!((purged.observations, purged.scores), (2, 1));
    assert_eq!(
        s.score_history("p-1", Kind::News2, 0, i64::MAX, 10)
            .unwrap()
            .iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        vec![T0 + 10 * day]
    );
    let (n, ids) = search(s, &[]);
    assert_eq!((n, ids), (1, vec![oid("d1", 3)]));
    // Purging again removes nothing more; the batch ack is kept, so a
    // re-sent old batch is answered from it and does not store again.
    assert_eq!(s.purge_before(T0 + 5 * day).unwrap().observations, 0);
    let again = ingest(
        s,
        &batch(1, vec![entry("d1", vec![spo2(T0, 1), spo2(T0 + day, 2)])]),
        &none,
    );
    assert!(again.ack.duplicate_batch);
    assert_eq!(search(s, &[]).0, 1);
}

/// A purge over more minutes than one purge transaction takes (SQLite
/// works through its device minutes in chunks) removes exactly the older
/// readings.
fn retention_purges_across_many_minutes(s: &Store) {
    let readings: Vec<Reading> = (0..200u64)
        .map(|i| spo2(T0 + i as i64 * MIN, i + 1))
        .collect();
    let r = ingest(
        s,
        &batch(1, vec![entry("d1", readings)]),
        &Associations::new(),
    );
    assert_eq!(r.ack.accepted, 200);
    assert_eq!(s.purge_before(T0 + 150 * MIN).unwrap().observations, 150);
    let (n, ids) = search(s, &[("_count", "1")]);
    assert_eq!((n, ids), (50, vec![oid("d1", 151)]));
    assert_eq!(s.purge_before(T0 + 150 * MIN).unwrap().observations, 0);
}

/// Users, API tokens and sessions (`access::accounts`) behave the same on
/// both backends.
fn users_tokens_and_sessions(s: &Store) {
    use cloud_hub::access::Role;
    use cloud_hub::access::accounts as acc;
    let pw = "correct horse battery staple";
    acc::add_user(s, "alice", Role::Clinician, pw, 1).unwrap();
    assert!(matches!(
        acc::add_user(s, "alice", Role::Admin, pw, 2),
        Err(acc::AccountError::Exists(_))
    ));
    assert_eq!(
        acc::check_password(s, "alice", pw).unwrap(),
        Some(Role::Clinician)
    );
    assert_eq!(
        acc::check_password(s, "alice", "wrong password!").unwrap(),
        None
    );
    let (id, csrf) = acc::create_session(s, "alice", 10).unwrap();
    let live = acc::session(s, &id, 20, 1_000_000_000, 1_000_000_000)
        .unwrap()
        .unwrap();
    assert_eq!(
        (live.user.as_str(), live.role, live.csrf),
        ("alice", Role::Clinician, csrf)
    );
    // Idle expiry deletes the session.
    assert!(
        acc::session(s, &id, 2_000_000_000, 1_000_000_000, i64::MAX)
            .unwrap()
            .is_none()
    );
    assert!(
        acc::session(s, &id, 30, i64::MAX, i64::MAX)
            .unwrap()
            .is_none()
    );
    let (id2, _) = acc::create_session(s, "alice", 10).unwrap();
    acc::set_password(s, "alice", "another long password").unwrap();
    assert!(
        acc::session(s, &id2, 20, i64::MAX, i64::MAX)
            .unwrap()
            .is_none()
    );
    assert_eq!(acc::check_password(s, "alice", pw).unwrap(), None);
    acc::disable_user(s, "alice", 30).unwrap();
    acc::disable_user(s, "alice", 40).unwrap();
    assert_eq!(acc::list_users(s).unwrap()[0].disabled_us, Some(30));
    assert!(matches!(
        acc::disable_user(s, "nobody", 1),
        Err(acc::AccountError::NotFound(_))
    ));
    let t = acc::create_token(s, "board", Role::Biomed, 5).unwrap();
    assert_eq!(
        acc::token_principal(s, &t).unwrap(),
        Some(("board".into(), Role::Biomed))
    );
    acc::revoke_token(s, "board", 6).unwrap();
    assert_eq!(acc::token_principal(s, &t).unwrap(), None);
    assert_eq!(acc::list_tokens(s).unwrap()[0].revoked_us, Some(6));
}

// ---- The clinical layer (`ScoreStore`, `AlertStore`, `TrendStore`) ----

fn attributed(patient: &str, devices: &[&str]) -> Associations {
    devices
        .iter()
        .map(|d| ((G.to_owned(), (*d).to_owned()), patient.to_owned()))
        .collect()
}

/// Score inputs: the usable rows of a metric newest first (at most the
/// limit), the newest row whatever its validity, per kind of row; manual
/// inputs by effective time, then the last recorded.
fn score_inputs_are_loaded_as_stored(s: &Store) -> Result<(), StoreError> {
    let assoc = attributed("p-1", &["d1"]);
    let mut questionable = spo2(T0 + 3 * MIN, 4);
    questionable.validity = 2;
    ingest(
        s,
        &batch(
            1,
            vec![entry(
                "d1",
                vec![
                    spo2(T0, 1),
                    spo2(T0 + MIN, 2),
                    spo2(T0 + 2 * MIN, 3),
                    questionable,
                ],
            )],
        ),
        &assoc,
    );
    let c = s.score_readings("p-1", codes::PULS_OXIM_SAT_O2, false, 2)?;
    assert_eq!(c.mdc, codes::PULS_OXIM_SAT_O2);
    let times: Vec<i64> = c.usable.iter().map(|r| r.effective_us).collect();
    assert_eq!(times, vec![T0 + 2 * MIN, T0 + MIN]);
    assert!(
        c.usable
            .iter()
            .all(|r| r.is_usable() && r.payload.is_some())
    );
    assert_eq!(c.usable[0].observation_id, oid("d1", 3));
    let newest = c.newest.expect("newest row");
    assert_eq!(newest.effective_us, T0 + 3 * MIN);
    assert_eq!(newest.observation_id, oid("d1", 4));
    assert!(!newest.is_usable(), "{newest:?}");
    // No panel parts; another patient or metric has nothing.
    let parts = s.score_readings("p-1", codes::PULS_OXIM_SAT_O2, true, 8)?;
    assert!(parts.usable.is_empty() && parts.newest.is_none());
    assert!(
        s.score_readings("p-2", codes::PULS_OXIM_SAT_O2, false, 8)?
            .newest
            .is_none()
    );
    assert!(
        s.score_readings("p-1", codes::RESP_RATE, false, 8)?
            .newest
            .is_none()
    );

    assert!(!s.has_manual_inputs("p-1")?);
    assert_eq!(s.latest_manual("p-1", "consciousness")?, None);
    let voice = [("consciousness", "voice".to_owned())];
    s.record_manual("p-1", &voice, T0 + MIN, T0 + 5 * MIN)?;
    // Recorded later but effective earlier: not the latest.
    let alert = [
        ("consciousness", "alert".to_owned()),
        ("spo2_scale", "2".to_owned()),
    ];
    s.record_manual("p-1", &alert, T0, T0 + 6 * MIN)?;
    assert!(s.has_manual_inputs("p-1")?);
    assert!(!s.has_manual_inputs("p-2")?);
    let latest = s.latest_manual("p-1", "consciousness")?.unwrap();
    assert_eq!(
        (latest.value.as_str(), latest.effective_us),
        ("voice", T0 + MIN)
    );
    assert_eq!(s.latest_manual("p-1", "spo2_scale")?.unwrap().value, "2");
    assert_eq!(s.latest_manual("p-1", "supplemental_oxygen")?, None);
    // Same effective time: the last recorded wins.
    let pain = [("consciousness", "pain".to_owned())];
    s.record_manual("p-1", &pain, T0 + MIN, T0 + 7 * MIN)?;
    assert_eq!(
        s.latest_manual("p-1", "consciousness")?.unwrap().value,
        "pain"
    );
    Ok(())
}

/// Score history: the write rule is applied against the last stored row
/// of each kind; history is windowed, newest first, limited.
fn score_history_rows_follow_the_write_rule(s: &Store) -> Result<(), StoreError> {
    use cloud_hub::score_history::{Entry, HEARTBEAT_US, Kind, should_write};
    let e = |total: Option<i64>| Entry {
        total,
        band: total.map(|_| "low".to_owned()),
        missing: if total.is_none() {
            vec!["consciousness".to_owned()]
        } else {
            vec![]
        },
        stale: vec![],
        components: total.map(|t| serde_json::json!({ "pulse": t })),
    };
    assert_eq!(s.last_score("p-1", Kind::News2)?, None);
    let both = |t| vec![(Kind::News2, e(t)), (Kind::Mews, e(t))];
    assert_eq!(s.record_scores("p-1", T0, &both(Some(1)), should_write)?, 2);
    // Unchanged within the heartbeat: nothing; changed: at once.
    assert_eq!(
        s.record_scores("p-1", T0 + 1, &both(Some(1)), should_write)?,
        0
    );
    assert_eq!(
        s.record_scores("p-1", T0 + 2, &both(None), should_write)?,
        2
    );
    assert_eq!(
        s.record_scores("p-1", T0 + 2 + HEARTBEAT_US, &both(None), should_write)?,
        2
    );
    assert_eq!(
        s.last_score("p-1", Kind::News2)?,
        Some((T0 + 2 + HEARTBEAT_US, e(None)))
    );
    assert_eq!(s.last_score("p-1", Kind::Qsofa)?, None);
    assert_eq!(s.last_score("p-2", Kind::News2)?, None);
    let rows = s.score_history("p-1", Kind::News2, T0, T0 + 2 + HEARTBEAT_US, 10)?;
    assert_eq!(rows, vec![(T0 + 2, e(None)), (T0, e(Some(1)))]);
    let rows = s.score_history("p-1", Kind::Mews, 0, i64::MAX, 1)?;
    assert_eq!(rows, vec![(T0 + 2 + HEARTBEAT_US, e(None))]);
    Ok(())
}

/// Alerts: changes and their transitions in one commit, the open ones and
/// the next id on load, lists newest first, patient rule overrides replaced.
/// Login throttling counters as stored: charged atomically, locked past
/// their max (pair) or only counted (account, source), restarted after the
/// window or the lock, per-user counters only for users, cleared on demand,
/// purged when stale.
fn login_counters_charge_lock_and_restart(s: &Store) -> Result<(), StoreError> {
    use hub_domain::login_throttle::{self as lt, Count};
    assert!(s.insert_user("nurse", "clinician", "hash", 1)?);
    let now = 1_000_000_000_000;
    let counters = lt::counters("nurse", "203.0.113.7");
    let c = |failures, locked_until_us| {
        Some(Count {
            failures,
            locked_until_us,
        })
    };
    for i in 1..=5 {
        assert_eq!(
            s.charge_login(Some("nurse"), &counters, now + i)?,
            vec![c(i as u32, None), c(i as u32, None), c(i as u32, None)],
            "attempt {i}"
        );
    }
    // The sixth locks the pair (only the pair).
    let locked = now + 6 + lt::PAIR_LOCK_US;
    assert_eq!(
        s.charge_login(Some("nurse"), &counters, now + 6)?,
        vec![c(6, Some(locked)), c(6, None), c(6, None)]
    );
    // While locked the pair stays as it is; the others keep counting.
    assert_eq!(
        s.charge_login(Some("nurse"), &counters, now + 7)?,
        vec![c(6, Some(locked)), c(7, None), c(7, None)]
    );
    // Another address: its own pair, the same account.
    let other = lt::counters("nurse", "198.51.100.2");
    assert_eq!(
        s.charge_login(Some("nurse"), &other, now + 8)?,
        vec![c(1, None), c(8, None), c(1, None)]
    );
    // After the lock the pair starts again at 1.
    assert_eq!(
        s.charge_login(Some("nurse"), &counters, locked)?[0],
        c(1, None)
    );
    // After the window every counter starts again.
    let later = locked + lt::PAIR_WINDOW_US;
    assert_eq!(
        s.charge_login(Some("nurse"), &other, later)?,
        vec![c(1, None), c(1, None), c(1, None)]
    );
    // Clearing forgets one counter.
    s.clear_login_counter(&other[0].key)?;
    assert_eq!(
        s.charge_login(Some("nurse"), &other, later + 1)?[0],
        c(1, None)
    );
    assert_eq!(
        s.charge_login(Some("nurse"), &other, later + 2)?[1],
        c(3, None)
    );
    // Names that are not users (or no name) charge only the source.
    let random = lt::counters("nobody", "203.0.113.9");
    assert_eq!(
        s.charge_login(Some("nobody"), &random, later)?,
        vec![None, None, c(1, None)]
    );
    assert_eq!(
        s.charge_login(None, &random, later)?,
        vec![None, None, c(2, None)]
    );
    // A day later every idle counter is purged: they all restart.
    let next_day = later + lt::STALE_US + 10;
    assert_eq!(
        s.charge_login(Some("nurse"), &counters, next_day)?,
        vec![c(1, None), c(1, None), c(1, None)]
    );
    Ok(())
}

/// Concurrent charges of one counter each see their own count: of 40
/// attempts at once, exactly `PAIR_MAX_FAILURES` are let through.
fn concurrent_login_charges_cannot_race_past_the_lock(s: &Store) -> Result<(), StoreError> {
    use hub_domain::login_throttle as lt;
    assert!(s.insert_user("nurse", "clinician", "hash", 1)?);
    let now = 1_000_000_000_000;
    let passed = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|sc| {
        for _ in 0..8 {
            sc.spawn(|| {
                for _ in 0..5 {
                    let counts = s
                        .charge_login(Some("nurse"), &lt::counters("nurse", "203.0.113.7"), now)
                        .unwrap();
                    let counts = [counts[0], counts[1], counts[2]];
                    if let lt::Decision::Check { .. } = lt::decide(&counts, now) {
                        passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(passed.into_inner(), lt::PAIR_MAX_FAILURES);
    Ok(())
}

/// An evaluation sees the open alerts, the next id and the tracked state
/// as stored, and stores its changes and what changed in that state.
fn alert_evaluations_read_and_write_the_stored_state(s: &Store) -> Result<(), StoreError> {
    use cloud_hub::alerts::engine::{Alert, Change, Kind, State, Tracked, Transition};
    use cloud_hub::alerts::rules::Priority;
    use cloud_hub::storage::{AlertFilter, Tracking};
    let mut feed = s.alert_changes();
    let raised = |id: i64| Change {
        transition: Transition::Raised,
        alert: Alert {
            id,
            kind: Kind::Technical,
            code: "device-disconnected".into(),
            priority: Priority::Medium,
            state: State::Active,
            message: "m".into(),
            patient: None,
            gateway_id: Some(G.into()),
            device_id: Some("d1".into()),
            value: None,
            unit: None,
            condition_since_us: 1,
            raised_us: 2,
            acknowledged_us: None,
            acknowledged_by: None,
            escalated_us: None,
            resolved_us: None,
        },
        actor: None,
    };
    let mut tracked = Tracked::default();
    tracked.pending.insert("physiological|p|r".into(), 5);
    tracked
        .devices
        .insert((G.into(), "d1".into()), (7, Some("p".into())));
    tracked.gateways.insert(G.into(), 9);
    let after = tracked.clone();
    let changes = s.evaluate_alerts(10, Tracking::Gateway(G), &mut |ev| {
        assert!(ev.open.is_empty());
        assert_eq!(ev.next_id, 1);
        assert_eq!(ev.tracked, Some(Tracked::default()));
        assert_eq!(ev.overrides, Some(vec![]));
        (vec![raised(ev.next_id)], after.clone())
    })?;
    assert_eq!(changes.len(), 1);
    // The next evaluation starts from what the first stored.
    let mut gone = tracked.clone();
    gone.pending.clear();
    s.evaluate_alerts(11, Tracking::Everything, &mut |ev| {
        assert_eq!(ev.open.len(), 1);
        assert_eq!(ev.next_id, 2);
        assert_eq!(ev.tracked.as_ref(), Some(&tracked));
        (vec![], gone.clone())
    })?;
    s.evaluate_alerts(12, Tracking::Gateway("other"), &mut |ev| {
        // Only that gateway's devices and last batch; every pending condition.
        let t = ev.tracked.unwrap();
        assert!(t.pending.is_empty() && t.devices.is_empty() && t.gateways.is_empty());
        (vec![], Tracked::default())
    })?;
    s.evaluate_alerts(13, Tracking::Nothing, &mut |ev| {
        assert_eq!((ev.tracked, ev.overrides), (None, None));
        (vec![], Tracked::default())
    })?;
    let stored = s.list_alerts(&AlertFilter {
        open: true,
        patient: None,
        limit: 10,
    })?;
    assert_eq!(stored.len(), 1);
    // The change feed delivers the committed change (PostgreSQL: through
    // LISTEN/NOTIFY, so allow it a moment).
    let got = next_change(&mut feed);
    assert_eq!(got.alert.id, 1);
    assert_eq!(got.transition, Transition::Raised);
    Ok(())
}

/// The next change of a feed, waiting up to 5 s.
fn next_change(
    feed: &mut tokio::sync::broadcast::Receiver<cloud_hub::alerts::engine::Change>,
) -> cloud_hub::alerts::engine::Change {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match feed.try_recv() {
            Ok(c) => return c,
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("no change on the feed: {e}"),
        }
    }
}

fn alerts_are_stored_with_their_transitions(s: &Store) -> Result<(), StoreError> {
    use cloud_hub::alerts::engine::{Alert, Change, Kind, State, Transition};
    use cloud_hub::alerts::rules::Priority;
    use cloud_hub::storage::{AlertFilter, StoredOverride};
    let loaded = s.load_alerts()?;
    assert!(loaded.open.is_empty() && loaded.overrides.is_empty());
    assert_eq!(loaded.next_id, 1);
    let alert = |id: i64, patient: Option<&str>| Alert {
        id,
        kind: if patient.is_some() {
            Kind::Physiological
        } else {
            Kind::Technical
        },
        code: format!("code-{id}"),
        priority: Priority::High,
        state: State::Active,
        message: "m".into(),
        patient: patient.map(Into::into),
        gateway_id: Some(G.into()),
        device_id: Some("d1".into()),
        value: patient.map(|_| 35.5),
        unit: patient.map(|_| "%".into()),
        condition_since_us: T0,
        raised_us: T0 + 1,
        acknowledged_us: None,
        acknowledged_by: None,
        escalated_us: None,
        resolved_us: None,
    };
    let change = |transition, alert, actor: Option<&str>| Change {
        transition,
        alert,
        actor: actor.map(Into::into),
    };
    let (a1, a2) = (alert(1, Some("p-1")), alert(2, None));
    s.commit_alerts(
        &[
            change(Transition::Raised, a1.clone(), None),
            change(Transition::Raised, a2.clone(), None),
        ],
        T0 + 1,
    )?;
    let mut acked = a1.clone();
    acked.state = State::Acknowledged;
    acked.acknowledged_us = Some(T0 + 2);
    acked.acknowledged_by = Some("nurse-1".into());
    let mut resolved = a2.clone();
    resolved.state = State::Resolved;
    resolved.resolved_us = Some(T0 + 3);
    s.commit_alerts(
        &[change(
            Transition::Acknowledged,
            acked.clone(),
            Some("nurse-1"),
        )],
        T0 + 2,
    )?;
    s.commit_alerts(
        &[change(Transition::Resolved, resolved.clone(), None)],
        T0 + 3,
    )?;

    let loaded = s.load_alerts()?;
    assert_eq!(loaded.open, vec![acked.clone()]);
    assert_eq!(loaded.next_id, 3);
    let list = |open, patient: Option<&str>, limit| AlertFilter {
        open,
        patient: patient.map(Into::into),
        limit,
    };
    assert_eq!(
        s.list_alerts(&list(false, None, 10))?,
        vec![resolved.clone(), acked.clone()]
    );
    assert_eq!(
        s.list_alerts(&list(false, None, 1))?,
        vec![resolved.clone()]
    );
    assert_eq!(s.list_alerts(&list(true, None, 10))?, vec![acked.clone()]);
    assert_eq!(
        s.list_alerts(&list(false, Some("p-1"), 10))?,
        vec![acked.clone()]
    );
    assert!(s.list_alerts(&list(false, Some("p-2"), 10))?.is_empty());
    let (got, events) = s.alert(1)?.expect("alert 1");
    assert_eq!(got, acked);
    assert_eq!(
        events,
        vec![
            (T0 + 1, "raised".to_owned(), None),
            (
                T0 + 2,
                "acknowledged".to_owned(),
                Some("nurse-1".to_owned())
            ),
        ]
    );
    assert_eq!(s.alert(3)?, None);

    let body = r#"{"id":"spo2-low","threshold":88}"#.to_owned();
    s.set_alert_overrides("p-1", &[("spo2-low".into(), body.clone())], "dr-1", T0)?;
    assert_eq!(
        s.load_alerts()?.overrides,
        vec![StoredOverride {
            patient: "p-1".into(),
            rule_id: "spo2-low".into(),
            body,
        }]
    );
    s.set_alert_overrides("p-1", &[], "dr-1", T0 + 1)?;
    assert!(s.load_alerts()?.overrides.is_empty());
    Ok(())
}

/// Trend series: a patient's buckets of a metric summed over its devices,
/// from the bucket holding `from`, oldest first.
fn trend_series_sum_the_devices_buckets(s: &Store) -> Result<(), StoreError> {
    let assoc = attributed("p-1", &["d1", "d2"]);
    let mut low = spo2(T0 + 30_000_000, 2);
    low.value = Some(reading::Value::Numeric(91.0));
    ingest(
        s,
        &batch(
            1,
            vec![
                entry("d1", vec![spo2(T0, 1), spo2(T0 + 5 * MIN, 3)]),
                entry("d2", vec![low]),
            ],
        ),
        &assoc,
    );
    let from = T0 + 10_000_000;
    let points = s.series(&spo2_series("p-1", 60, from, T0 + 5 * MIN))?;
    assert_eq!(points.len(), 1, "{points:?}");
    let p = &points[0];
    assert_eq!((p.start_us, p.count, p.min, p.max), (T0, 2, 91.0, 97.0));
    assert!((p.mean - 94.0).abs() < 1e-9);
    let five_min = spo2_series("p-1", 300, T0, T0 + 10 * MIN);
    let points = s.series(&five_min)?;
    let counts: Vec<(i64, i64)> = points.iter().map(|p| (p.start_us, p.count)).collect();
    assert_eq!(counts, vec![(T0, 2), (T0 + 5 * MIN, 1)]);
    // The non-blocking read the API awaits (PostgreSQL's) answers the same.
    if let Some(f) = s.series_future(&five_min) {
        let awaited: Vec<(i64, i64)> = await_read(f)?
            .iter()
            .map(|p| (p.start_us, p.count))
            .collect();
        assert_eq!(awaited, counts);
    }
    assert!(
        s.series(&spo2_series("p-2", 60, T0, T0 + 10 * MIN))?
            .is_empty()
    );
    Ok(())
}

/// Chart buckets follow readings that change patient: a back-dated
/// transfer takes a reading out of the first patient's buckets, and an
/// admission puts it into the next patient's.
fn trend_buckets_follow_reattributed_readings(s: &Store) -> Result<(), StoreError> {
    use cloud_hub::trends::Point;
    let none = Associations::new();
    let counts = |patient: &str, res: i64| -> Result<Vec<(i64, i64)>, StoreError> {
        Ok(s.series(&spo2_series(patient, res, T0, T0 + 60 * MIN))?
            .iter()
            .map(|p: &Point| (p.start_us, p.count))
            .collect())
    };
    beds(s, &["b1", "b2"]);
    s.place_device(G, "d1", "b1", T0, &none).unwrap();
    s.admit(&mrn("m1"), "b1", T0, None, &none).unwrap();
    let mut low = spo2(T0 + 40 * MIN, 2);
    low.value = Some(reading::Value::Numeric(90.0));
    ingest(
        s,
        &batch(1, vec![entry("d1", vec![spo2(T0 + MIN, 1), low])]),
        &none,
    );
    assert_eq!(counts("m1", 3600)?, vec![(T0, 2)]);
    assert_eq!(counts("m1", 60)?, vec![(T0 + MIN, 1), (T0 + 40 * MIN, 1)]);
    // Transferred at T0 + 30 min, recorded later: reading 2 leaves m1.
    let c = s.transfer(&mrn("m1"), "b2", T0 + 30 * MIN, &none).unwrap();
    assert_eq!(c.reattributed, 1);
    assert_eq!(counts("m1", 3600)?, vec![(T0, 1)]);
    assert_eq!(counts("m1", 60)?, vec![(T0 + MIN, 1)]);
    let p = &s.series(&spo2_series("m1", 300, T0, T0 + 60 * MIN))?[0];
    assert_eq!((p.min, p.max), (97.0, 97.0));
    // The next patient in b1 takes it.
    s.admit(&mrn("m2"), "b1", T0 + 35 * MIN, None, &none)
        .unwrap();
    assert_eq!(counts("m2", 60)?, vec![(T0 + 40 * MIN, 1)]);
    let p = &s.series(&spo2_series("m2", 3600, T0, T0 + 60 * MIN))?[0];
    assert_eq!((p.count, p.min, p.mean), (1, 90.0, 90.0));
    assert_eq!(counts("m1", 3600)?, vec![(T0, 1)]);
    Ok(())
}

/// A session's last-seen time is refreshed (at most once a minute) and
/// keeps it alive past its first idle limit; logout ends it.
fn sessions_are_refreshed_and_end_on_logout(s: &Store) {
    use cloud_hub::access::Role;
    use cloud_hub::access::accounts as acc;
    acc::add_user(s, "bob", Role::Biomed, "correct horse battery staple", 0).unwrap();
    let idle = 10 * MIN;
    let (id, _) = acc::create_session(s, "bob", 0).unwrap();
    // Within the minute: not written; after it: written.
    acc::session(s, &id, MIN / 2, idle, i64::MAX)
        .unwrap()
        .unwrap();
    let seen = acc::session(s, &id, 2 * MIN, idle, i64::MAX)
        .unwrap()
        .unwrap();
    assert_eq!(seen.last_seen_us, 0);
    let seen = acc::session(s, &id, 11 * MIN, idle, i64::MAX)
        .unwrap()
        .expect("alive: last seen at 2 min");
    assert_eq!(seen.last_seen_us, 2 * MIN);
    acc::end_session(s, &id).unwrap();
    assert!(
        acc::session(s, &id, 11 * MIN, idle, i64::MAX)
            .unwrap()
            .is_none()
    );
    acc::end_session(s, &id).unwrap();
    assert_eq!(acc::list_users(s).unwrap()[0].role, Role::Biomed);
}

// ---- The audit log and the gateways view ----

/// The audit log appends, chains (one chain even under concurrent appends)
/// and reads back every field.
fn audit_log_appends_and_chains(s: &Store) -> Result<(), StoreError> {
    use cloud_hub::audit::{self, Entry, GENESIS};
    let e = |i: i64, patient: Option<&str>| Entry {
        time_us: T0 + i,
        actor: "token:ward-script".into(),
        action: "read".into(),
        resource: "/fhir/Observation".into(),
        patient: patient.map(Into::into),
        patients: Vec::new(),
        outcome: 503,
        detail: format!("patient=p&_count={i}"),
    };
    assert_eq!(s.append_audit(&e(0, Some("p-1")), None)?, 1);
    assert_eq!(s.append_audit(&e(1, None), None)?, 2);
    let all = s.audit_entries(i64::MIN)?;
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].prev_hash, GENESIS);
    assert_eq!(all[1].prev_hash, all[0].hash);
    assert_eq!(
        (all[0].entry.clone(), all[1].entry.clone()),
        (e(0, Some("p-1")), e(1, None))
    );
    std::thread::scope(|sc| {
        for t in 0..2 {
            sc.spawn(move || {
                for i in 0..10 {
                    s.append_audit(&e(100 * (t + 1) + i, None), None).unwrap();
                }
            });
        }
    });
    let v = audit::verify(s, &Default::default(), None, &[])?;
    assert_eq!((v.entries, v.broken), (22, None));
    let since = s.audit_entries(21)?;
    assert_eq!(
        since.iter().map(|x| x.seq).collect::<Vec<_>>(),
        vec![21, 22]
    );
    assert_eq!(v.head, Some((22, since[1].hash.clone())));
    Ok(())
}

/// Group commit: a batch of entries is appended in one transaction, in
/// order, each chained to the one before (keyed), its seqs consecutive even
/// while single appends and other batches run at once; a batch that cannot
/// be chained stores none of its entries.
fn audit_batches_chain_in_order_in_one_transaction(s: &Store) -> Result<(), StoreError> {
    use cloud_hub::audit;
    let none = audit::AuditKeys::default();
    let keys = audit_keys(9);
    let key = keys.current();
    assert_eq!(s.append_audit_batch(&[], key)?, Vec::<i64>::new());
    assert_eq!(audit::append(s, &none, &audit_entry(0))?, 1);
    let batch: Vec<_> = (1..4).map(audit_entry).collect();
    assert_eq!(s.append_audit_batch(&batch, key)?, vec![2, 3, 4]);
    let all = s.audit_entries(i64::MIN)?;
    assert_eq!(
        all.iter().map(|x| x.entry.clone()).collect::<Vec<_>>(),
        (0..4).map(audit_entry).collect::<Vec<_>>()
    );
    for w in all.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
    }
    // Keyed from now on: an unkeyed batch is refused whole.
    let err = s
        .append_audit_batch(&[audit_entry(90), audit_entry(91)], None)
        .unwrap_err();
    assert!(matches!(err, StoreError::Audit(_)), "{err}");
    assert_eq!(s.audit_entries(i64::MIN)?.len(), 4);
    // Batches and single appends from several threads at once.
    let batches: Vec<Vec<i64>> = std::thread::scope(|sc| {
        let singles = sc.spawn(|| {
            for i in 0..10 {
                audit::append(s, &keys, &audit_entry(500 + i)).unwrap();
            }
        });
        let workers: Vec<_> = (0..3i64)
            .map(|t| {
                let keys = &keys;
                sc.spawn(move || {
                    (0..5i64)
                        .map(|b| {
                            let entries: Vec<_> = (0..4)
                                .map(|i| audit_entry(1000 * (t + 1) + 10 * b + i))
                                .collect();
                            s.append_audit_batch(&entries, keys.current()).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        singles.join().unwrap();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    for seqs in &batches {
        assert_eq!(seqs.len(), 4);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    }
    let v = audit::verify(s, &keys, None, &[])?;
    let n = 4 + 10 + 3 * 5 * 4;
    assert_eq!((v.entries, v.broken, v.keyed_from), (n, None, Some(2)));
    // Each batch's entries stored in the order given.
    let all = s.audit_entries(i64::MIN)?;
    for seqs in &batches {
        let got: Vec<i64> = seqs
            .iter()
            .map(|q| all[(*q - 1) as usize].entry.time_us)
            .collect();
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
    }
    Ok(())
}

/// The gateways view: last batch, the window's ack totals, rejections,
/// overflows and per-device figures.
fn gateways_view_sums_the_window(s: &Store) -> Result<(), StoreError> {
    s.add_gateway(G, "h1").unwrap();
    s.add_gateway("gw-idle", "h2").unwrap();
    let none = Associations::new();
    let mut d = entry("d1", vec![spo2(T0, 1), spo2(T0 + MIN, 2)]);
    d.technical.push(TechnicalReading {
        kind: TechnicalKind::Connected as i32,
        time_us: T0 - MIN,
        sequence: 3,
        ..Default::default()
    });
    s.ingest(G, &batch(1, vec![d]), &none, T0 + 2 * MIN, T0 + 2 * MIN)
        .unwrap();
    // A duplicate, an unknown metric (rejected) and a buffer overflow.
    let mut b2 = batch(
        2,
        vec![entry(
            "d1",
            vec![spo2(T0 + MIN, 2), numeric(999_999, "%", 1.0, T0, 4)],
        )],
    );
    b2.gateway_events.push(TechnicalReading {
        kind: TechnicalKind::BufferOverflow as i32,
        time_us: T0 + 2 * MIN,
        detail: "dropped 12 oldest readings".into(),
        sequence: 1,
    });
    s.ingest(G, &b2, &none, T0 + 3 * MIN, T0 + 3 * MIN).unwrap();
    let v = s.gateway_activity(T0, 1_000)?;
    assert_eq!(
        v.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
        vec![G, "gw-idle"]
    );
    let g = &v[0];
    let last = g.last_batch.as_ref().unwrap();
    assert_eq!((last.sequence, last.received_us), (2, T0 + 3 * MIN));
    let w = g.window;
    assert_eq!(
        (w.batches, w.accepted, w.duplicates, w.rejected),
        (2, 3, 1, 1)
    );
    assert_eq!((g.rejected_total, g.overflows), (1, 1));
    assert_eq!(
        g.last_overflow,
        Some((T0 + 2 * MIN, "dropped 12 oldest readings".into()))
    );
    let dev = &g.devices[0];
    assert_eq!(dev.id, "d1");
    assert_eq!(dev.last_reading.map(|r| r.0), Some(T0 + MIN));
    assert_eq!(
        dev.last_link_event.as_ref().map(|e| e.0.as_str()),
        Some("connected")
    );
    assert_eq!(dev.rejected_total, 1);
    let idle = &v[1];
    assert!(idle.last_batch.is_none() && idle.devices.is_empty());
    // The window starts after batch 1: only batch 2 counts; at most one
    // batch read: the newest.
    assert_eq!(
        s.gateway_activity(T0 + 3 * MIN, 1_000)?[0].window.batches,
        1
    );
    assert_eq!(s.gateway_activity(T0, 1)?[0].window.batches, 1);
    // A buffer created afresh: the newest batch and the incarnation event
    // are the new buffer's, though its sequence restarted at 1.
    assert_eq!(g.last_incarnation, None);
    let fresh = Batch {
        incarnation: 42,
        ..batch(1, vec![entry("d1", vec![spo2(T0 + 4 * MIN, 1)])])
    };
    s.ingest(G, &fresh, &none, T0 + 5 * MIN, now())?;
    let g = &s.gateway_activity(T0, 1_000)?[0];
    let last = g.last_batch.as_ref().unwrap();
    assert_eq!((last.sequence, last.received_us), (1, T0 + 5 * MIN));
    let (t, detail) = g.last_incarnation.clone().unwrap();
    assert_eq!(t, T0 + 5 * MIN);
    assert!(
        detail.starts_with("new buffer incarnation 000000000000002a"),
        "{detail}"
    );
    Ok(())
}

fn stored_authority_systems_are_migrated_to_uris_once(s: &Store) -> Result<(), StoreError> {
    let none = Associations::new();
    let systems = cloud_hub::identifiers::IdentifierSystems::default();
    let map = |raw: &str| systems.system_uri(raw);
    // As stored by a build before `[identifiers]`: the HL7 assigning
    // authority as the system, on readings' rows and on a stay; a URI and
    // a reading without a system stay as they are.
    let with = |r: Reading, system: &str, value: &str| Reading {
        subject: Some(Identifier {
            system: system.into(),
            value: value.into(),
        }),
        ..r
    };
    ingest(
        s,
        &batch(
            1,
            vec![entry(
                "d1",
                vec![
                    with(spo2(T0, 1), "HOSP", "MRN-1"),
                    with(hr(T0, 2), "HOSP", "MRN-1"),
                    with(spo2(T0 + MIN, 3), "urn:oid:1.2.3", "MRN-2"),
                    with(spo2(T0 + 2 * MIN, 4), "", "MRN-3"),
                ],
            )],
        ),
        &none,
    );
    beds(s, &["b1"]);
    let hosp = PatientId {
        system: "HOSP".into(),
        value: "MRN-1".into(),
    };
    s.admit(&hosp, "b1", T0, None, &none).unwrap();
    let done = s.migrate_patient_systems(&map).unwrap();
    assert_eq!((done.systems, done.stays, done.observations), (1, 1, 2));
    let uri = PatientId {
        system: "urn:vigil:authority:HOSP".into(),
        value: "MRN-1".into(),
    };
    assert_eq!(s.bed_of(&uri, T0 + MIN).unwrap().as_deref(), Some("b1"));
    assert_eq!(s.bed_of(&hosp, T0 + MIN).unwrap(), None);
    let system_of = |seq: u64| {
        s.observation(&oid("d1", seq))
            .unwrap()
            .unwrap()
            .patient_system
    };
    assert_eq!(system_of(1).as_deref(), Some("urn:vigil:authority:HOSP"));
    assert_eq!(system_of(2).as_deref(), Some("urn:vigil:authority:HOSP"));
    assert_eq!(system_of(3).as_deref(), Some("urn:oid:1.2.3"));
    assert_eq!(system_of(4), None);
    assert_eq!(
        s.patient("MRN-1")?.as_deref(),
        Some("urn:vigil:authority:HOSP")
    );
    // Served with the URI, although the stored payload names `HOSP`.
    let row = s.observation(&oid("d1", 1))?.unwrap();
    let o = cloud_hub::fhir::render::render_observation(&row).unwrap();
    assert_eq!(
        o["subject"]["identifier"]["system"],
        "urn:vigil:authority:HOSP"
    );
    // Idempotent: nothing left to rewrite.
    let again = s.migrate_patient_systems(&map).unwrap();
    assert_eq!((again.systems, again.stays, again.observations), (0, 0, 0));
    Ok(())
}

/// Each case runs on both backends: `sqlite::<case>` on a temp file,
/// `postgres::<case>` on a throwaway server. A case returns `()` or a
/// `Result` (unwrapped).
fn stream_leases_are_exclusive_and_expire(s: &Store) -> Result<(), StoreError> {
    use cloud_hub::stream::lease::Lease;
    let src = "kafka:vigil";
    // a takes partition 0 until 2000; b cannot while it is live.
    assert!(s.claim_lease(src, 0, "a", 1000, 2000)?);
    assert!(!s.claim_lease(src, 0, "b", 1500, 2500)?);
    // a renews; another source's partition 0 is independent.
    assert!(s.claim_lease(src, 0, "a", 1500, 2500)?);
    assert!(s.claim_lease("kafka:other", 0, "b", 1500, 2500)?);
    // Expired at 2500: b takes it over, and a's late renewal fails.
    assert!(s.claim_lease(src, 0, "b", 2500, 3500)?);
    assert!(!s.claim_lease(src, 0, "a", 2600, 3600)?);
    let b_holds = vec![Lease {
        partition: 0,
        owner: "b".into(),
        expires_at_ms: 3500,
    }];
    assert_eq!(s.leases(src)?, b_holds);
    // Only the owner releases.
    s.release_lease(src, 0, "a")?;
    assert_eq!(s.leases(src)?, b_holds);
    s.release_lease(src, 0, "b")?;
    assert!(s.leases(src)?.is_empty());
    assert!(s.claim_lease(src, 0, "a", 2600, 3600)?);
    assert!(s.claim_lease(src, 1, "b", 2600, 3600)?);
    assert_eq!(s.leases(src)?.len(), 2);

    // Replica heartbeats: live until their expiry, forgotten after.
    s.replica_heartbeat(src, "b", 1000, 2000)?;
    s.replica_heartbeat(src, "a", 1000, 3000)?;
    assert_eq!(s.live_replicas(src, 1500)?, vec!["a", "b"]);
    assert_eq!(s.live_replicas(src, 2000)?, vec!["a"]);
    assert!(s.live_replicas("kafka:other", 1500)?.is_empty());
    s.replica_heartbeat(src, "a", 3000, 4000)?;
    assert_eq!(
        s.live_replicas(src, 0)?,
        vec!["a"],
        "b's expired row is gone"
    );
    Ok(())
}

fn stream_offsets_commit_with_the_batch(s: &Store) -> Result<(), StoreError> {
    use cloud_hub::storage::StreamPosition;
    let none = Associations::new();
    let at = |o: i64| StreamPosition {
        source: "kafka:vigil".into(),
        partition: 3,
        next_offset: o,
    };
    let offsets = |s: &Store| s.committed_offsets("kafka:vigil");
    assert!(offsets(s)?.is_empty());
    let b1 = batch(1, vec![entry("d1", vec![spo2(T0, 1)])]);
    let r = s.ingest_at(G, &b1, &none, now(), now(), &at(5))?;
    assert_eq!(r.ack.accepted, 1);
    assert_eq!(offsets(s)?, vec![(3, 5)]);
    // The same batch read again at a later offset: a duplicate, and the
    // offset still advances.
    let r = s.ingest_at(G, &b1, &none, now(), now(), &at(9))?;
    assert!(r.ack.duplicate_batch);
    assert_eq!(offsets(s)?, vec![(3, 9)]);
    // A lower offset stores the batch but never moves the offset back.
    let b2 = batch(2, vec![entry("d1", vec![spo2(T0 + MIN, 2)])]);
    let r = s.ingest_at(G, &b2, &none, now(), now(), &at(7))?;
    assert_eq!(r.ack.accepted, 1);
    assert_eq!(offsets(s)?, vec![(3, 9)]);
    // Offsets alone (past dropped records): forward only.
    s.commit_offset(&at(12))?;
    s.commit_offset(&at(4))?;
    assert_eq!(offsets(s)?, vec![(3, 12)]);
    // A refused batch writes no offset: both or nothing.
    let bad = batch(u64::MAX, vec![entry("d1", vec![spo2(T0, 3)])]);
    assert!(s.ingest_at(G, &bad, &none, now(), now(), &at(20)).is_err());
    assert_eq!(offsets(s)?, vec![(3, 12)]);
    // Other partitions and sources are separate.
    s.commit_offset(&StreamPosition {
        partition: 0,
        ..at(1)
    })?;
    assert_eq!(offsets(s)?, vec![(0, 1), (3, 12)]);
    assert!(s.committed_offsets("kafka:other")?.is_empty());
    assert_eq!(search(s, &[]).0, 2, "each batch's reading stored once");
    Ok(())
}

/// Erasure (issue 20): every row of the patient goes, a tombstone keeps
/// the subject key and device windows (never the identifier), late data
/// for the patient is dropped at ingest, and a legal hold blocks both the
/// erasure and retention.
fn erasure_removes_the_patient_everywhere_and_keeps_late_data_out(
    s: &Store,
) -> Result<(), StoreError> {
    use cloud_hub::storage::{ErasureError, LegalHold, RetentionCutoffs};
    let none = Associations::new();
    let p = |v: &str| PatientId {
        system: "urn:mrn".into(),
        value: v.into(),
    };
    beds(s, &["b1", "b2"]);
    s.place_device(G, "d1", "b1", T0 - MIN, &none).unwrap();
    s.place_device(G, "d2", "b2", T0 - MIN, &none).unwrap();
    s.admit(&p("mrn-1"), "b1", T0 - MIN, Some("v1"), &none)
        .unwrap();
    s.admit(&p("mrn-2"), "b2", T0 - MIN, None, &none).unwrap();
    let r = ingest(
        s,
        &batch(
            1,
            vec![
                entry("d1", vec![spo2(T0, 1), hr(T0 + 10 * MIN, 2)]),
                entry("d2", vec![spo2(T0, 1)]),
            ],
        ),
        &none,
    );
    assert_eq!((r.ack.accepted, r.erased), (3, 0));
    s.record_manual("mrn-1", &[("consciousness", "A".to_string())], T0, T0)?;
    use cloud_hub::score_history::{Entry, Kind, should_write};
    let e = Entry {
        total: Some(1),
        band: Some("low".into()),
        missing: vec![],
        stale: vec![],
        components: None,
    };
    s.record_scores("mrn-1", T0, &[(Kind::News2, e)], should_write)?;
    assert!(matches!(
        s.erase_patient("nobody", T0),
        Err(ErasureError::UnknownPatient(_))
    ));

    // A legal hold blocks erasure and retention of the patient's data.
    let hold = LegalHold {
        patient: "mrn-1".into(),
        reason: "litigation 2026-17".into(),
        set_by: "privacy-officer".into(),
        set_us: T0,
    };
    assert!(s.set_legal_hold("mrn-1", Some(&hold))?);
    assert!(!s.set_legal_hold("nobody", Some(&hold))?);
    assert_eq!(s.legal_holds()?, vec![hold.clone()]);
    assert!(matches!(
        s.erase_patient("mrn-1", T0 + 30 * MIN),
        Err(ErasureError::LegalHold { .. })
    ));
    let purged = s.purge_classes(&RetentionCutoffs {
        readings: Some(T0 + 60 * MIN),
        aggregates: Some(T0 + 60 * MIN),
        alerts: Some(T0 + 60 * MIN),
    })?;
    assert_eq!(
        purged.observations, 1,
        "only mrn-2's reading: mrn-1 is held"
    );
    assert_eq!(search(s, &[("patient", "mrn-1")]).0, 2);
    assert_eq!(s.manual_inputs_of("mrn-1")?.len(), 1);
    assert_eq!(
        s.score_history("mrn-1", Kind::News2, 0, i64::MAX, 10)?
            .len(),
        1
    );
    assert!(s.set_legal_hold("mrn-1", None)?);
    assert!(s.legal_holds()?.is_empty());

    // The subject-access reads see the patient before the erasure.
    let stays = s.stays_of("mrn-1")?;
    assert_eq!(stays.len(), 1);
    assert_eq!(
        (stays[0].bed.as_str(), stays[0].system.as_str()),
        ("b1", "urn:mrn")
    );

    let erased = s.erase_patient("mrn-1", T0 + 30 * MIN).unwrap();
    assert_eq!(erased.counts.observations, 2);
    assert_eq!(
        (
            erased.counts.stays,
            erased.counts.manual_inputs,
            erased.counts.scores
        ),
        (1, 1, 1)
    );
    let salt = s.subject_salt()?;
    assert_eq!(
        erased.subject,
        cloud_hub::privacy::subject_key(&salt, "urn:mrn", "mrn-1")
    );
    assert_eq!(s.subject_salt()?, salt, "the salt never changes");
    // Nothing of the patient is left to read.
    assert_eq!(search(s, &[("patient", "mrn-1")]).0, 0);
    assert_eq!(s.patient("mrn-1")?, None);
    assert!(s.stays_of("mrn-1")?.is_empty());
    assert!(s.manual_inputs_of("mrn-1")?.is_empty());
    assert!(
        s.score_history("mrn-1", Kind::News2, 0, i64::MAX, 10)?
            .is_empty()
    );
    assert!(s.erase_patient("mrn-1", T0 + 31 * MIN).is_err());
    // The tombstone: the subject key and the device window, no identifier.
    let t = s.tombstones_since(0)?;
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].subject, t[0].erased_us),
        (erased.subject, T0 + 30 * MIN)
    );
    assert_eq!(
        t[0].windows,
        vec![cloud_hub::storage::DeviceWindow {
            gateway_id: G.into(),
            device_id: "d1".into(),
            from_us: T0 - MIN,
            to_us: T0 + 30 * MIN,
        }]
    );
    assert!(s.tombstones_since(t[0].id)?.is_empty());

    // Late data: a reading of d1 inside the window, and a reading naming
    // the patient from another device, are dropped; a later reading of d1
    // (the bed is empty now) and mrn-2's data are kept.
    let mut named = spo2(T0 + 5 * MIN, 1);
    named.subject = Some(Identifier {
        system: "urn:mrn".into(),
        value: "mrn-1".into(),
    });
    let late = ingest(
        s,
        &batch(
            2,
            vec![
                entry("d1", vec![spo2(T0 + 5 * MIN, 10), spo2(T0 + 40 * MIN, 11)]),
                entry("oru", vec![named]),
                entry("d2", vec![spo2(T0 + 70 * MIN, 2)]),
            ],
        ),
        &none,
    );
    assert_eq!((late.ack.accepted, late.erased), (2, 2));
    assert!(s.observation(&oid("d1", 10))?.is_none());
    assert!(s.observation(&oid("oru", 1))?.is_none());
    assert_eq!(s.observation(&oid("d1", 11))?.unwrap().patient_id, None);
    assert_eq!(
        s.observation(&oid("d2", 2))?.unwrap().patient_id.as_deref(),
        Some("mrn-2")
    );
    assert_eq!(search(s, &[("patient", "mrn-1")]).0, 0);
    // An ADT replay of the old admission cannot bring the patient back;
    // a new admission after the erasure is new data.
    assert!(matches!(
        s.admit(&p("mrn-1"), "b1", T0, None, &none),
        Err(AssocError::Erased)
    ));
    s.admit(&p("mrn-1"), "b1", T0 + 60 * MIN, None, &none)
        .unwrap();
    Ok(())
}

/// Audit retention: the log is purged only up to a signed checkpoint older
/// than the window, with a keyed purge entry, and still verifies.
fn audit_retention_purges_up_to_a_checkpoint_and_the_chain_still_verifies(
    s: &Store,
) -> Result<(), StoreError> {
    use cloud_hub::audit::CheckpointPolicy;
    let keys = audit_keys(4);
    let key = keys.current().unwrap();
    let day = 86_400_000_000i64;
    let every = CheckpointPolicy {
        every_entries: 1,
        every_us: 1,
    };
    let h = s.handle();
    for i in 0..5 {
        s.append_audit(&audit_entry(i), Some(key))?;
    }
    let first = s.audit_checkpoint(key, every, T0)?.unwrap();
    for i in 5..10 {
        s.append_audit(&audit_entry(i), Some(key))?;
    }
    s.audit_checkpoint(key, every, T0 + 10 * day)?.unwrap();
    // Nothing is older than the window yet.
    assert_eq!(
        cloud_hub::retention::purge_audit(&h, &keys, 30, T0 + day)?,
        0
    );
    // Six days on with a five-day window: up to the first checkpoint.
    let n = cloud_hub::retention::purge_audit(&h, &keys, 5, T0 + 6 * day)?;
    assert_eq!(n, 5);
    let left = s.audit_entries(i64::MIN)?;
    assert_eq!(left.first().map(|e| e.seq), Some(first.seq + 1));
    assert_eq!(
        left.last().unwrap().entry.action,
        cloud_hub::audit::PURGE_ACTION
    );
    let v = cloud_hub::audit::verify(&h, &keys, None, &[])?;
    assert_eq!(v.broken, None);
    assert_eq!((v.entries, v.head.map(|h| h.0)), (6, Some(11)));
    // Again: nothing more (the next checkpoint is not old enough).
    assert_eq!(
        cloud_hub::retention::purge_audit(&h, &keys, 5, T0 + 6 * day)?,
        0
    );
    // Appends go on after the purge entry.
    assert_eq!(s.append_audit(&audit_entry(11), Some(key))?, 12);
    assert_eq!(cloud_hub::audit::verify(&h, &keys, None, &[])?.broken, None);
    Ok(())
}

/// Readings that arrive late and out of sequence order (an agent's
/// backlog, a device re-sending) are found by every search over a time
/// window without a patient (by date, by code and date, by device) and
/// purged by their effective time, like those that came in order.
fn late_readings_are_found_by_every_time_window(s: &Store) {
    let none = Associations::new();
    let (m0, m1, m2) = (T0, T0 + MIN, T0 + 2 * MIN);
    // In order first: minute 2.
    ingest(
        s,
        &batch(
            1,
            vec![
                entry("d1", vec![spo2(m2 + 1_000_000, 10), hr(m2 + 2_000_000, 11)]),
                entry("d2", vec![spo2(m2 + 3_000_000, 1)]),
            ],
        ),
        &none,
    );
    // Then late: older minutes with lower and higher sequences, and minute
    // 2 again below and above what it held.
    ingest(
        s,
        &batch(
            2,
            vec![entry(
                "d1",
                vec![
                    spo2(m0 + 4_000_000, 5),
                    spo2(m1 + 5_000_000, 20),
                    spo2(m2 + 6_000_000, 3),
                    spo2(m2 + 7_000_000, 30),
                ],
            )],
        ),
        &none,
    );
    let minute2 = [
        ("date", "ge2026-03-01T00:02:00Z"),
        ("date", "lt2026-03-01T00:03:00Z"),
    ];
    let (n, ids) = search(s, &minute2);
    assert_eq!(n, 5);
    assert_eq!(
        ids,
        vec![
            oid("d1", 10),
            oid("d1", 11),
            oid("d2", 1),
            oid("d1", 3),
            oid("d1", 30)
        ]
    );
    let spo2_code = [("code", "http://loinc.org|59408-5"), minute2[0], minute2[1]];
    assert_eq!(search(s, &spo2_code).0, 4);
    let d1 = format!("Device/{}", device_resource_id(G, "d1"));
    let (n, ids) = search(s, &[("device", &d1), ("_sort", "-date")]);
    assert_eq!(n, 6);
    assert_eq!(
        ids,
        vec![
            oid("d1", 30),
            oid("d1", 3),
            oid("d1", 11),
            oid("d1", 10),
            oid("d1", 20),
            oid("d1", 5)
        ]
    );
    let (n, ids) = search(s, &[("device", &d1), ("date", "lt2026-03-01T00:02:00Z")]);
    assert_eq!((n, ids), (2, vec![oid("d1", 5), oid("d1", 20)]));
    assert_eq!(search(s, &[("date", "ge2026-03-01T00:01:00Z")]).0, 6);
    // Purged by effective time: the two late readings of minutes 0 and 1.
    assert_eq!(s.purge_before(m1 + 30_000_000).unwrap().observations, 2);
    assert_eq!(search(s, &[]).0, 5);
    assert_eq!(search(s, &[("device", &d1)]).0, 4);
    assert_eq!(s.purge_before(m1 + 30_000_000).unwrap().observations, 0);
}

/// After every suite test on SQLite: the search totals per patient, code
/// and hour (`observation_hours`) are exactly the counts of the stored rows
/// a search lists, whatever the test did to them (ingest, panels,
/// re-attribution, erasure, retention), with no count left at 0 or below.
fn sqlite_search_totals_are_exact(path: &std::path::Path) {
    let c = rusqlite::Connection::open(path).unwrap();
    search_totals_are_exact(
        |sql| {
            let mut st = c.prepare(sql).unwrap();
            st.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
        },
        "(effective_us - (((effective_us % 3600000000) + 3600000000) % 3600000000)) / 3600000000",
    );
}

/// The same check on PostgreSQL (`storage-postgres/src/hours.rs`).
pub(crate) fn postgres_search_totals_are_exact(url: &str) {
    let mut c = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
    search_totals_are_exact(
        |sql| {
            c.query(sql, &[])
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                .collect()
        },
        "floor(effective_us / 3600000000.0)::bigint",
    );
}

/// `observation_hours` against a recount of the stored rows, read by
/// `rows` (patient, MDC, LOINC, hour, count); `hour_of` is the backend's
/// SQL for the hour of `effective_us`, written independently of the
/// store's.
fn search_totals_are_exact(
    mut rows: impl FnMut(&str) -> Vec<(String, i64, String, i64, i64)>,
    hour_of: &str,
) {
    let kept = rows(
        "SELECT patient_id, mdc_code, loinc, hour, n FROM observation_hours
          ORDER BY 1, 2, 3, 4",
    );
    let counted = rows(&format!(
        "SELECT patient_id, mdc_code, loinc, {hour_of}, COUNT(*)
           FROM observations WHERE panel_id IS NULL AND patient_id IS NOT NULL
          GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"
    ));
    assert_eq!(
        kept, counted,
        "observation_hours differs from the stored rows"
    );
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        trait Outcome {
            fn check(self);
        }
        impl Outcome for () {
            fn check(self) {}
        }
        impl Outcome for Result<(), StoreError> {
            fn check(self) {
                self.unwrap()
            }
        }
        mod sqlite {
            use super::Outcome;
            $(
                #[test]
                fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().join("suite.sqlite");
                    let s = cloud_hub::Store::open(&path).unwrap();
                    super::$name(&s).check();
                    drop(s);
                    super::sqlite_search_totals_are_exact(&path);
                }
            )*
        }
        mod postgres {
            use super::Outcome;
            $(
                #[test]
                fn $name() {
                    let server = super::pg_server::PgServer::start();
                    let s = cloud_hub::Store::open_postgres(&super::PgConfig::new(server.url()))
                        .unwrap();
                    super::$name(&s).check();
                    drop(s);
                    super::postgres_search_totals_are_exact(&server.url());
                    drop(server);
                }
            )*
        }
    };
}

suite!(
    retention_purges_across_many_minutes,
    late_readings_are_found_by_every_time_window,
    audit_retention_purges_up_to_a_checkpoint_and_the_chain_still_verifies,
    erasure_removes_the_patient_everywhere_and_keeps_late_data_out,
    audit_batches_chain_in_order_in_one_transaction,
    nul_characters_are_refused_and_the_rest_is_stored,
    ingest_deduplicates_batches_and_readings,
    buffer_incarnations_deduplicate_separately,
    sequences_above_i64_max_are_refused_not_wrapped,
    rejections_are_stored_with_reasons,
    out_of_range_values_are_counted_once,
    bp_panel_lists_the_panel_not_its_parts,
    waveforms_and_technical_readings_are_stored,
    search_filters_pages_and_sorts,
    search_totals_over_hours_count_every_match,
    a_search_total_agrees_with_its_page_while_ingest_commits,
    reads_devices_and_patients,
    gateways_and_tokens,
    enrolment_tokens_are_single_use,
    association_attributes_and_reattributes,
    association_intervals_are_half_open_and_merged,
    association_back_dated_changes_move_readings,
    reattribution_names_the_patients_and_versions_the_moved_rows,
    association_conflicts_are_refused_and_repeats_are_no_ops,
    retention_purges_what_is_older_than_the_window,
    users_tokens_and_sessions,
    sessions_are_refreshed_and_end_on_logout,
    score_inputs_are_loaded_as_stored,
    score_history_rows_follow_the_write_rule,
    lake_reads_page_by_cursor,
    alerts_are_stored_with_their_transitions,
    alert_evaluations_read_and_write_the_stored_state,
    login_counters_charge_lock_and_restart,
    concurrent_login_charges_cannot_race_past_the_lock,
    trend_series_sum_the_devices_buckets,
    trend_buckets_follow_reattributed_readings,
    audit_log_appends_and_chains,
    gateways_view_sums_the_window,
    stored_authority_systems_are_migrated_to_uris_once,
    stream_leases_are_exclusive_and_expire,
    stream_offsets_commit_with_the_batch,
);

// ---- PostgreSQL only ----

/// A search the API awaits and then drops (its client went away) after
/// its statements went out still ends its read-only transaction: on a
/// pool of one connection, the next batch is stored and the next search
/// sees it.
#[test]
fn postgres_a_dropped_search_leaves_no_transaction_open() {
    let server = pg_server::PgServer::start();
    let mut cfg = PgConfig::new(server.url());
    cfg.pool_size = 1;
    let s = Store::open_postgres(&cfg).unwrap();
    let none = Associations::new();
    ingest(&s, &batch(1, vec![entry("d1", vec![spo2(T0, 1)])]), &none);
    // The blocking search prepares the statements, so the awaited one
    // sends its whole pipeline at its first poll.
    assert_eq!(search(&s, &[]).0, 1);
    let pairs = Vec::new();
    let q = parse_search(&pairs).unwrap();
    let mut read = s.search_future(&q).expect("PostgreSQL reads are awaitable");
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(read.as_mut().poll(&mut cx).is_pending());
    drop(read);
    ingest(
        &s,
        &batch(2, vec![entry("d1", vec![spo2(T0 + MIN, 2)])]),
        &none,
    );
    assert_eq!(search(&s, &[]).0, 2);
}

/// The alert change feed survives a server restart: its LISTEN connection
/// is reopened and a change committed meanwhile is delivered.
#[test]
fn postgres_alert_feed_reconnects_and_reads_what_it_missed() {
    use cloud_hub::alerts::engine::{Alert, Change, Kind, State, Transition};
    use cloud_hub::alerts::rules::Priority;
    let server = pg_server::PgServer::start();
    let s = Store::open_postgres(&PgConfig::new(server.url())).unwrap();
    let mut feed = s.alert_changes();
    let raised = |id: i64| Change {
        transition: Transition::Raised,
        alert: Alert {
            id,
            kind: Kind::Technical,
            code: format!("code-{id}"),
            priority: Priority::Medium,
            state: State::Active,
            message: "m".into(),
            patient: None,
            gateway_id: Some(G.into()),
            device_id: None,
            value: None,
            unit: None,
            condition_since_us: 1,
            raised_us: 2,
            acknowledged_us: None,
            acknowledged_by: None,
            escalated_us: None,
            resolved_us: None,
        },
        actor: None,
    };
    s.commit_alerts(&[raised(1)], 10).unwrap();
    assert_eq!(next_change(&mut feed).alert.id, 1);
    // A clean stop ("fast": clients disconnected; the tests' server runs
    // without synchronous commit, so "immediate" could lose the first
    // commit, which a durable server would not).
    server.restart("fast", std::time::Duration::from_millis(300));
    // The pool replaces its dead connections on use: retry for a while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = s.commit_alerts(&[raised(2)], 11) {
        assert!(std::time::Instant::now() < deadline, "{e}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let got = next_change(&mut feed);
    assert_eq!((got.alert.id, got.transition), (2, Transition::Raised));
}

#[test]
fn postgres_partitions_by_month_and_migrates_once() {
    let server = pg_server::PgServer::start();
    let cfg = PgConfig::new(server.url());
    let s = Store::open_postgres(&cfg).unwrap();
    let none = Associations::new();
    // 2026-03-01 and 2026-04-15.
    let april = T0 + 45 * 24 * 60 * MIN;
    let r = ingest(
        &s,
        &batch(1, vec![entry("d1", vec![spo2(T0, 1), spo2(april, 2)])]),
        &none,
    );
    assert_eq!(r.ack.accepted, 2);
    let pg = s.postgres().unwrap();
    assert_eq!(
        pg.partitions().unwrap(),
        vec!["observations_y2026m03", "observations_y2026m04"]
    );
    assert_eq!(search(&s, &[("date", "2026-04")]).0, 1);
    drop(s);
    // Reopening applies nothing again and sees the same data and partitions.
    let s = reopened_postgres(&cfg);
    let r = ingest(
        &s,
        &batch(2, vec![entry("d1", vec![spo2(april, 2), spo2(april, 3)])]),
        &none,
    );
    assert_eq!((r.ack.accepted, r.ack.duplicates), (1, 1));
    assert_eq!(search(&s, &[]).0, 3);
}

/// Migration 3 (buffer incarnations) on a database that holds rows in
/// monthly partitions: they take incarnation 0 and stay de-duplicated; a
/// new incarnation's sequences are new. (Migration 4 is applied after it.)
#[test]
fn postgres_migration_3_keeps_existing_rows_as_incarnation_0() {
    let server = pg_server::PgServer::start();
    let cfg = PgConfig::new(server.url());
    let s = Store::open_postgres(&cfg).unwrap();
    let none = Associations::new();
    let april = T0 + 45 * 24 * 60 * MIN;
    let first = batch(1, vec![entry("d1", vec![spo2(T0, 1), spo2(april, 2)])]);
    assert_eq!(ingest(&s, &first, &none).ack.accepted, 2);
    // Back to migration 2's keys and columns, the rows kept.
    ::postgres::Client::connect(&server.url(), ::postgres::NoTls)
        .unwrap()
        .batch_execute(
            "ALTER TABLE batches DROP CONSTRAINT batches_pkey;
             DROP INDEX batches_received;
             ALTER TABLE batches DROP COLUMN incarnation;
             ALTER TABLE batches ADD PRIMARY KEY (gateway_id, sequence);
             ALTER TABLE observations DROP CONSTRAINT observations_identity;
             ALTER TABLE observations DROP COLUMN incarnation;
             ALTER TABLE observations ADD UNIQUE (gateway_id, device_id, sequence, effective_us);
             ALTER TABLE device_events DROP CONSTRAINT device_events_identity;
             ALTER TABLE device_events DROP COLUMN incarnation;
             ALTER TABLE device_events ADD UNIQUE (gateway_id, device_id, sequence);
             DROP TABLE manual_inputs, score_history, alert_events, alerts,
                 alert_rule_overrides, vital_rollups, audit_log, audit_purges;
             DROP FUNCTION audit_log_append_only();
             DROP TABLE login_throttle, alert_pending, alert_devices, alert_gateways;
             DROP TABLE stream_offsets, stream_leases, stream_replicas;
             DROP INDEX observations_patient_mdc_panel_time;
             CREATE INDEX observations_patient_mdc_time
                 ON observations (patient_id, mdc_code, effective_us);
             DROP TABLE observation_hours;
             DROP FUNCTION observation_hours_apply() CASCADE;
             ALTER TABLE observations RENAME COLUMN hub_layout TO layout;
             DELETE FROM schema_migrations WHERE version >= 3;",
        )
        .unwrap();
    drop(s);
    let s = reopened_postgres(&cfg);
    assert!(ingest(&s, &first, &none).ack.duplicate_batch);
    let r = ingest(
        &s,
        &batch(2, vec![entry("d1", vec![spo2(april, 2)])]),
        &none,
    );
    assert_eq!((r.ack.accepted, r.ack.duplicates), (0, 1));
    let fresh = Batch {
        incarnation: 5,
        ..batch(1, vec![entry("d1", vec![spo2(april, 1), spo2(april, 2)])])
    };
    let r = ingest(&s, &fresh, &none);
    assert!(!r.ack.duplicate_batch);
    assert_eq!((r.ack.accepted, r.ack.duplicates), (2, 0));
    assert_eq!(search(&s, &[]).0, 4);
}

#[test]
fn postgres_config_refuses_a_password_in_the_url_and_plaintext_off_loopback() {
    let err = PgConfig::new("postgresql://vigil:secret@127.0.0.1/vigil")
        .validate()
        .unwrap_err();
    assert_eq!(err.0, "storage.postgres.url");
    assert!(!err.1.contains("secret"), "{}", err.1);
    let err = PgConfig::new("host=db.example.org user=vigil")
        .validate()
        .unwrap_err();
    assert_eq!(err.0, "storage.postgres.url");
    PgConfig::new("host=db.example.org user=vigil sslmode=require")
        .validate()
        .unwrap();
    let mut c = PgConfig::new("host=127.0.0.1 user=vigil");
    c.pool_size = 0;
    assert_eq!(c.validate().unwrap_err().0, "storage.postgres.pool_size");
}

#[test]
fn postgres_unreachable_server_is_an_error_not_a_hang() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Store::open_postgres(&PgConfig::new(format!(
        "host=127.0.0.1 port={port} user=postgres connect_timeout=5"
    )))
    .unwrap_err();
    // Cannot connect: transient (the hub answers 503 and retries), never a hang.
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
}

#[test]
fn postgres_two_hub_instances_store_each_batch_once() {
    let server = pg_server::PgServer::start();
    let cfg = PgConfig::new(server.url());
    let a = Store::open_postgres(&cfg).unwrap();
    let b = Store::open_postgres(&cfg).unwrap();
    let none = Associations::new();
    // Both instances receive the same 40 batches (a gateway retrying
    // against a load balancer), 8 readings each, interleaved.
    let batches: Vec<Batch> = (0..40u64)
        .map(|n| {
            let readings = (0..8u64)
                .map(|i| spo2(T0 + (n * 8 + i) as i64 * MIN, n * 8 + i))
                .collect();
            batch(n + 1, vec![entry("d1", readings)])
        })
        .collect();
    let run = |s: &Store| {
        let mut accepted = 0u32;
        for b in &batches {
            let r = s.ingest(G, b, &none, now(), now()).unwrap();
            if !r.ack.duplicate_batch {
                accepted += r.ack.accepted;
            }
        }
        accepted
    };
    let (x, y) = std::thread::scope(|sc| {
        let ta = sc.spawn(|| run(&a));
        let tb = sc.spawn(|| run(&b));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(x + y, 320, "each reading accepted by exactly one instance");
    assert_eq!(search(&a, &[]).0, 320);
    assert_eq!(search(&b, &[]).0, 320);
}

fn audit_entry(i: i64) -> cloud_hub::audit::Entry {
    cloud_hub::audit::Entry {
        time_us: T0 + i,
        actor: format!("token:hub-{}", i % 3),
        action: "read".into(),
        resource: "/fhir/Observation".into(),
        patient: (i % 2 == 0).then(|| format!("p-{i}")),
        patients: Vec::new(),
        outcome: 200,
        detail: format!("_count={i}"),
    }
}

/// Several hub processes (each its own store and pool) appending from
/// several threads at once: every append gets its own seq and the chain
/// stays one line, verified end to end.
#[test]
fn postgres_audit_appends_from_several_hubs_stay_one_chain() {
    let server = pg_server::PgServer::start();
    let cfg = PgConfig::new(server.url());
    let hubs: Vec<Store> = (0..3)
        .map(|_| Store::open_postgres(&cfg).unwrap())
        .collect();
    const PER_THREAD: i64 = 20;
    // Keyed, with each worker also taking checkpoints as the hubs' tasks
    // do: they never fork the chain, and each is taken once.
    let keys = audit_keys(5);
    let keys = &keys;
    let policy = cloud_hub::audit::CheckpointPolicy {
        every_entries: 7,
        every_us: i64::MAX,
    };
    let mut seqs: Vec<i64> = std::thread::scope(|sc| {
        let workers: Vec<_> = hubs
            .iter()
            .enumerate()
            .flat_map(|(h, s)| (0..2).map(move |t| (h as i64 * 2 + t, s)))
            .map(|(w, s)| {
                sc.spawn(move || {
                    (0..PER_THREAD)
                        .map(|i| {
                            let seq = cloud_hub::audit::append(s, keys, &audit_entry(w * 1000 + i))
                                .unwrap();
                            if i % 3 == 0 {
                                s.audit_checkpoint(keys.current().unwrap(), policy, T0 + i)
                                    .unwrap();
                            }
                            seq
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let n = 6 * PER_THREAD;
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "one seq per append");
    let checkpoints = hubs[0].audit_checkpoints().unwrap();
    assert!(checkpoints.len() >= 2, "{checkpoints:?}");
    assert!(
        checkpoints.windows(2).all(|w| w[1].seq - w[0].seq >= 7),
        "each checkpoint once, by the policy: {checkpoints:?}"
    );
    for s in &hubs {
        let v = cloud_hub::audit::verify(s, keys, None, &[]).unwrap();
        assert_eq!(
            (v.entries, v.broken, v.keyed_from),
            (n as u64, None, Some(1))
        );
        assert_eq!(v.checkpoints, checkpoints.len() as u64);
        assert_eq!(v.head.unwrap().0, n);
    }
    // Every entry stored as appended: each thread's entries, in its order.
    let all = hubs[0].audit_entries(i64::MIN).unwrap();
    for w in 0..6 {
        let mine: Vec<i64> = all
            .iter()
            .filter(|x| x.entry.time_us >= T0 + w * 1000 && x.entry.time_us < T0 + w * 1000 + 1000)
            .map(|x| x.entry.time_us - T0 - w * 1000)
            .collect();
        assert_eq!(mine, (0..PER_THREAD).collect::<Vec<_>>());
    }
}

/// The database itself keeps the audit log append-only: UPDATE, DELETE and
/// TRUNCATE are refused by its trigger (even of no row), whoever connects.
#[test]
fn postgres_audit_log_refuses_update_delete_and_truncate() {
    let server = pg_server::PgServer::start();
    let s = Store::open_postgres(&PgConfig::new(server.url())).unwrap();
    for i in 0..3 {
        s.append_audit(&audit_entry(i), None).unwrap();
    }
    let mut client = ::postgres::Client::connect(&server.url(), ::postgres::NoTls).unwrap();
    for sql in [
        "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2",
        "UPDATE audit_log SET detail = '' WHERE false",
        "DELETE FROM audit_log WHERE seq = 3",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let err = client.batch_execute(sql).expect_err(sql);
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.code().code(), "2F003", "{sql}: {db}");
        assert!(
            db.message().contains("audit_log is append-only"),
            "{sql}: {db}"
        );
    }
    // Appends go on; nothing was changed.
    client
        .batch_execute("SELECT 1")
        .expect("the connection is usable after the refusals");
    assert_eq!(s.append_audit(&audit_entry(3), None).unwrap(), 4);
    let v = cloud_hub::audit::verify(&s, &Default::default(), None, &[]).unwrap();
    assert_eq!((v.entries, v.broken), (4, None));
    let all = s.audit_entries(i64::MIN).unwrap();
    assert_eq!(all[1].entry, audit_entry(1));
}

// ---- The keyed audit chain against an attacker with the database ----

fn audit_keys(b: u8) -> cloud_hub::audit::AuditKeys {
    cloud_hub::audit::AuditKeys::from_keys(vec![cloud_hub::audit::AuditKey::new(&[b; 32]).unwrap()])
}

/// What someone with the database (but not the audit key) does to the log
/// of `s`, by `sql` run as the database's owner with the append-only
/// triggers out of the way, and what `verify` says each time. The log:
/// two entries from before the key (unkeyed), then keyed ones.
fn keyed_audit_chain_catches_database_edits(s: &Store, sql: &dyn Fn(&str)) {
    use cloud_hub::audit::{self, CheckpointPolicy};
    let keys = audit_keys(7);
    let none = cloud_hub::audit::AuditKeys::default();
    let check = |keys: &cloud_hub::audit::AuditKeys, extra: &[audit::Checkpoint]| {
        audit::verify(s, keys, None, extra).unwrap()
    };
    for i in 0..2 {
        audit::append(s, &none, &audit_entry(i)).unwrap();
    }
    for i in 2..6 {
        audit::append(s, &keys, &audit_entry(i)).unwrap();
    }
    // Once keyed, an unkeyed append is refused.
    let err = audit::append(s, &none, &audit_entry(9)).unwrap_err();
    assert!(matches!(err, StoreError::Audit(_)), "{err}");
    let v = check(&keys, &[]);
    assert_eq!(
        (v.entries, v.broken.clone(), v.keyed_from),
        (6, None, Some(3))
    );
    // Without the key the keyed entries cannot be checked: not "intact".
    assert_eq!(check(&none, &[]).broken.map(|b| b.0), Some(3));
    // A checkpoint of the head, taken once.
    let every = CheckpointPolicy {
        every_entries: 1,
        every_us: 0,
    };
    let key = keys.current().unwrap();
    let cp = s.audit_checkpoint(key, every, T0).unwrap().unwrap();
    assert_eq!((cp.seq, cp.entries), (6, 6));
    assert_eq!(s.audit_checkpoint(key, every, T0 + 1).unwrap(), None);
    assert_eq!(s.audit_checkpoints().unwrap(), vec![cp.clone()]);
    assert_eq!(check(&keys, &[]).checkpoints, 1);

    // An edited field: found, naming the entry.
    sql("UPDATE audit_log SET patient_id = 'p-other' WHERE seq = 4");
    let b = check(&keys, &[]).broken.unwrap();
    assert_eq!(b.0, 4, "{b:?}");
    assert!(b.1.contains("MAC"), "{b:?}");
    sql("UPDATE audit_log SET patient_id = NULL WHERE seq = 4");
    assert_eq!(check(&keys, &[]).broken, None);
    // An edited legacy entry with the legacy hashes recomputed: the first
    // keyed entry's MAC covers the last unkeyed link.
    let all = s.audit_entries(i64::MIN).unwrap();
    let mut forged = all[0].entry.clone();
    forged.actor = "anonymous".into();
    let h1 = cloud_hub::audit::chain_hash(cloud_hub::audit::GENESIS, 1, &forged);
    let h2 = cloud_hub::audit::chain_hash(&h1, 2, &all[1].entry);
    sql(&format!(
        "UPDATE audit_log SET actor = 'anonymous', hash = '{h1}' WHERE seq = 1;
         UPDATE audit_log SET prev_hash = '{h1}', hash = '{h2}' WHERE seq = 2;
         UPDATE audit_log SET prev_hash = '{h2}' WHERE seq = 3;"
    ));
    assert_eq!(check(&keys, &[]).broken.map(|b| b.0), Some(3));
    sql(&format!(
        "UPDATE audit_log SET actor = '{}', hash = '{}' WHERE seq = 1;
         UPDATE audit_log SET prev_hash = '{}', hash = '{}' WHERE seq = 2;
         UPDATE audit_log SET prev_hash = '{}' WHERE seq = 3;",
        all[0].entry.actor, all[0].hash, all[0].hash, all[1].hash, all[1].hash
    ));
    assert_eq!(check(&keys, &[]).broken, None);
    // A row inserted after the head with a recomputed unkeyed hash.
    let head = &all[5];
    let fake = audit_entry(42);
    let h7 = cloud_hub::audit::chain_hash(&head.hash, 7, &fake);
    let insert = |key_id: &str, hash: &str| {
        format!(
            "INSERT INTO audit_log (seq, time_us, actor, action, resource, patient_id, outcome,
                 detail, prev_hash, hash, key_id)
             VALUES (7, {}, '{}', 'read', '/fhir/Observation', NULL, 200, '', '{}', '{hash}', {key_id})",
            fake.time_us, fake.actor, head.hash
        )
    };
    sql(&insert("NULL", &h7));
    let b = check(&keys, &[]).broken.unwrap();
    assert!(b.0 == 7 && b.1.contains("unkeyed after keyed"), "{b:?}");
    sql("DELETE FROM audit_log WHERE seq = 7");
    // …and one claiming the key, with a MAC under a guessed key.
    let guess = cloud_hub::audit::AuditKey::new(&[8; 32]).unwrap();
    let mut fake_keyed = fake.clone();
    fake_keyed.patient = None;
    fake_keyed.detail = String::new();
    let mac = cloud_hub::audit::chain_mac(&guess, &head.hash, 7, &fake_keyed);
    sql(&insert(&format!("'{}'", key.id()), &mac));
    let b = check(&keys, &[]).broken.unwrap();
    assert!(b.0 == 7 && b.1.contains("MAC"), "{b:?}");
    sql("DELETE FROM audit_log WHERE seq = 7");
    assert_eq!(check(&keys, &[]).broken, None);

    // New entries after the checkpoint; the newest two removed: the
    // checkpoint still matches (the window between checkpoints), an anchor
    // of the head finds it.
    for i in 6..8 {
        audit::append(s, &keys, &audit_entry(i)).unwrap();
    }
    let head8 = check(&keys, &[]).head.unwrap();
    sql("DELETE FROM audit_log WHERE seq >= 7");
    assert_eq!(check(&keys, &[]).broken, None);
    let v = audit::verify(s, &keys, Some((head8.0, &head8.1)), &[]).unwrap();
    assert_eq!(v.broken.map(|b| b.0), Some(8));
    // Removed below the checkpoint: found.
    sql("DELETE FROM audit_log WHERE seq >= 5");
    let b = check(&keys, &[]).broken.unwrap();
    assert!(b.0 == 6 && b.1.contains("ends at entry 4"), "{b:?}");
    // Emptied, stored checkpoints and all: the checkpoint kept outside the
    // database still finds it.
    sql("DELETE FROM audit_log");
    let b = check(&keys, &[]).broken.unwrap();
    assert!(b.1.contains("empty"), "{b:?}");
    sql("DELETE FROM audit_checkpoints");
    assert_eq!(check(&keys, &[]).broken, None, "nothing left to compare");
    let b = check(&keys, std::slice::from_ref(&cp)).broken.unwrap();
    assert!(b.0 == 6 && b.1.contains("empty"), "{b:?}");
    // A checkpoint forged without the key is refused.
    let mut bad = cp.clone();
    bad.seq = 1;
    assert!(check(&keys, &[bad]).broken.unwrap().1.contains("signature"));
}

#[test]
fn sqlite_keyed_audit_chain_catches_database_edits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("suite.sqlite");
    let s = Store::open(&path).unwrap();
    let c = rusqlite::Connection::open(cloud_hub::store::audit_path(&path)).unwrap();
    // Whoever has the file can drop the triggers.
    c.execute_batch(
        "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete;
         DROP TRIGGER audit_checkpoints_no_delete;",
    )
    .unwrap();
    keyed_audit_chain_catches_database_edits(&s, &|sql| c.execute_batch(sql).unwrap());
}

#[test]
fn postgres_keyed_audit_chain_catches_database_edits() {
    let server = pg_server::PgServer::start();
    let s = Store::open_postgres(&PgConfig::new(server.url())).unwrap();
    let mut c = ::postgres::Client::connect(&server.url(), ::postgres::NoTls).unwrap();
    // A superuser can switch the append-only triggers off.
    c.batch_execute(
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only;
         ALTER TABLE audit_checkpoints DISABLE TRIGGER audit_checkpoints_append_only;",
    )
    .unwrap();
    let c = std::sync::Mutex::new(c);
    keyed_audit_chain_catches_database_edits(&s, &|sql| {
        c.lock().unwrap().batch_execute(sql).unwrap()
    });
}

/// Migration 15 (device minutes, reading ids without a per-row index) on a
/// database that holds rows: they are found by id and by their device's
/// time window (a back-dated admission re-attributes them), and a hub of
/// an earlier version, which does not write `layout`, can no longer store
/// rows that the minutes would miss.
#[test]
fn postgres_migration_15_keeps_earlier_rows_reachable_and_fences_older_hubs() {
    let server = pg_server::PgServer::start();
    let cfg = PgConfig::new(server.url());
    let s = Store::open_postgres(&cfg).unwrap();
    let none = Associations::new();
    let first = batch(
        1,
        vec![
            entry("d1", vec![spo2(T0, 1), spo2(T0 + 10 * MIN, 2)]),
            entry("d2", vec![hr(T0, 1)]),
        ],
    );
    assert_eq!(ingest(&s, &first, &none).ack.accepted, 3);
    // Back to migration 14's layout, the rows kept.
    let mut c = ::postgres::Client::connect(&server.url(), ::postgres::NoTls).unwrap();
    c.batch_execute(
        "DROP TABLE observation_minutes, observation_id_devices, observation_hours;
         DROP FUNCTION observation_hours_apply() CASCADE;
         ALTER TABLE observations DROP COLUMN hub_layout;
         DROP INDEX observations_id_keyed;
         CREATE INDEX observations_id ON observations (id);
         CREATE INDEX observations_device_time ON observations (gateway_id, device_id, effective_us);
         DELETE FROM schema_migrations WHERE version >= 15;",
    )
    .unwrap();
    drop(s);
    let s = reopened_postgres(&cfg);
    for (device, seq) in [("d1", 1), ("d1", 2), ("d2", 1)] {
        let row = s
            .observation(&oid(device, seq))
            .unwrap()
            .expect("row by id");
        assert_eq!(row.id, oid(device, seq));
    }
    assert!(s.observation(&oid("d1", 3)).unwrap().is_none());
    // The device's window: a placement and a back-dated admission move
    // both of d1's readings, and d2's stays unattributed.
    s.create_bed(&Bed {
        id: "b1".into(),
        ward: "icu".into(),
        label: "B1".into(),
    })
    .unwrap();
    s.place_device(G, "d1", "b1", T0 - MIN, &none).unwrap();
    let patient = PatientId {
        system: "urn:mrn".into(),
        value: "mrn-1".into(),
    };
    let c15 = s.admit(&patient, "b1", T0 - MIN, None, &none).unwrap();
    assert_eq!(c15.reattributed, 2);
    assert_eq!(s.unattributed_count().unwrap(), 1);
    // A row written as a hub before migration 15 writes it is refused.
    let refused = c.batch_execute(
        "INSERT INTO observations (id, gateway_id, device_id, sequence, attribution, loinc,
             mdc_code, effective_us, status, batch_sequence, received_us, kind, category)
         SELECT 'x', gateway_id, device_id, 99, attribution, loinc, mdc_code, effective_us,
             status, batch_sequence, received_us, kind, category
           FROM observations LIMIT 1",
    );
    assert!(refused.is_err(), "a row without `layout` was stored");
    // A read by an id that is not a device part and sequence (a panel's, a
    // first-scheme one) is served by the partial id index.
    c.batch_execute("SET enable_seqscan = off").unwrap();
    let plan: Vec<String> = c
        .query(
            "EXPLAIN SELECT id FROM observations
              WHERE id = 'x' AND substr(id, 17) <> lpad(to_hex(sequence), 16, '0')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!plan.concat().contains("Seq Scan"), "{plan:?}");
}

/// Migration 16 (search totals per hour) on a database that holds rows:
/// it counts them, the totals stay exact through later changes and
/// deletes, and a hub of an earlier version, which does not count its
/// rows, can no longer store any.
#[test]
fn postgres_migration_16_counts_the_stored_rows() {
    let server = pg_server::PgServer::start();
    let cfg = PgConfig::new(server.url());
    let s = Store::open_postgres(&cfg).unwrap();
    let assoc = Associations::from([((G.to_owned(), "d1".to_owned()), "p1".to_owned())]);
    let readings: Vec<_> = (0..30).map(|k| spo2(T0 + k * 7 * MIN, k as u64)).collect();
    assert_eq!(
        ingest(&s, &batch(1, vec![entry("d1", readings)]), &assoc)
            .ack
            .accepted,
        30
    );
    // Back to migration 15, the rows kept.
    let mut c = ::postgres::Client::connect(&server.url(), ::postgres::NoTls).unwrap();
    c.batch_execute(
        "DROP TABLE observation_hours;
         DROP FUNCTION observation_hours_apply() CASCADE;
         ALTER TABLE observations RENAME COLUMN hub_layout TO layout;
         DELETE FROM schema_migrations WHERE version >= 16;",
    )
    .unwrap();
    drop(s);
    let s = reopened_postgres(&cfg);
    postgres_search_totals_are_exact(&server.url());
    let total = |s: &Store| {
        search(
            s,
            &[
                ("patient", "p1"),
                ("date", "ge2026-03-01T01:00:00Z"),
                ("code", metric_of(&spo2(T0, 0)).unwrap().loinc),
            ],
        )
        .0
    };
    // 30 readings 7 min apart from T0 (00:00): 21 from 01:00 on (the hours).
    assert_eq!(total(&s), 21);
    // Rows changed and deleted by hand go through the triggers.
    c.batch_execute(
        "UPDATE observations SET patient_id = 'p2' WHERE sequence < 12;
         DELETE FROM observations WHERE sequence >= 28;",
    )
    .unwrap();
    postgres_search_totals_are_exact(&server.url());
    // Readings 9 to 11 moved to p2, 28 and 29 deleted.
    assert_eq!(total(&s), 16);
    // A row written as a hub before migration 16 writes it (`layout`, not
    // counted) is refused.
    let refused = c.batch_execute(
        "INSERT INTO observations (id, gateway_id, device_id, sequence, attribution, loinc,
             mdc_code, effective_us, status, batch_sequence, received_us, kind, category,
             layout, patient_id)
         SELECT 'x', gateway_id, device_id, 99, attribution, loinc, mdc_code, effective_us,
             status, batch_sequence, received_us, kind, category, 15, patient_id
           FROM observations LIMIT 1",
    );
    assert!(
        refused.is_err(),
        "a row of a hub before migration 16 was stored"
    );
    postgres_search_totals_are_exact(&server.url());
}

/// The PostgreSQL store at `cfg` opened again: every migration applied,
/// each once.
fn reopened_postgres(cfg: &PgConfig) -> Store {
    let s = Store::open_postgres(cfg).unwrap();
    assert_eq!(
        s.postgres().unwrap().migrations().unwrap(),
        (1..=16).collect::<Vec<i64>>()
    );
    s
}
