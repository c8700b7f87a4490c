//! The forwarder's batches against a minimal loopback hub (axum) that
//! decodes each `Batch`, records what it got and answers a matching
//! `BatchAck`: batches stay within `uplink.batch_max_bytes`, a record
//! larger than the limit is sent alone, and every reading arrives once;
//! with `uplink.compression = "zstd"` bodies are zstd with
//! `Content-Encoding: zstd`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use device_drivers::DriverOutput;
use edge_agent::buffer::Buffer;
use edge_agent::config::AgentConfig;
use edge_agent::uplink::{AnyUplink, Uplink};
use prost::Message;
use shared_protocol::v1::{Batch, BatchAck, Reading, reading};
use tokio::sync::watch;

/// What the fake hub received: one entry per request.
#[derive(Debug, Clone)]
struct Received {
    /// Size of the (decompressed) protobuf.
    body_len: usize,
    /// Size on the wire.
    wire_len: usize,
    encoding: Option<String>,
    batch: Batch,
}

type Log = Arc<Mutex<Vec<Received>>>;

async fn ingest(log: Log, headers: HeaderMap, wire: Bytes) -> (StatusCode, Vec<u8>) {
    let encoding = headers
        .get("content-encoding")
        .map(|v| v.to_str().unwrap().to_string());
    let body = match encoding.as_deref() {
        None => wire.to_vec(),
        Some("zstd") => zstd::decode_all(wire.as_ref()).expect("valid zstd"),
        Some(other) => panic!("unexpected Content-Encoding {other}"),
    };
    let batch = Batch::decode(body.as_ref()).expect("a protobuf Batch");
    let items: usize = batch
        .devices
        .iter()
        .map(|d| d.readings.len() + d.waveforms.len() + d.technical.len())
        .sum();
    let ack = BatchAck {
        sequence: batch.sequence,
        accepted: items as u32,
        ..Default::default()
    };
    log.lock().unwrap().push(Received {
        body_len: body.len(),
        wire_len: wire.len(),
        encoding,
        batch,
    });
    (StatusCode::OK, ack.encode_to_vec())
}

async fn fake_hub() -> (String, Log) {
    let log: Log = Arc::default();
    let l = log.clone();
    let app = axum::Router::new().route(
        "/api/v1/ingest",
        post(move |h: HeaderMap, b: Bytes| ingest(l.clone(), h, b)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v1/ingest", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, log)
}

fn reading(label_len: usize, i: u64) -> Reading {
    Reading {
        mdc_code: 150_456,
        vendor_label: "L".repeat(label_len),
        value: Some(reading::Value::Numeric(90.0 + (i % 10) as f64)),
        ucum_unit: "%".into(),
        gateway_time_us: 1_795_514_400_000_000 + i as i64,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_respect_the_byte_limit_and_an_oversized_record_goes_alone() {
    const MAX: usize = 4096;
    let dir = tempfile::tempdir().unwrap();
    let (url, log) = fake_hub().await;
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "gateway_id = \"gw-bytes\"\ndata_dir = \"data\"\n[uplink]\nurl = \"{url}\"\n\
             batch_max_readings = 10000\nbatch_max_bytes = {MAX}\nbatch_max_wait_ms = 50\n\
             backlog_rate_per_s = 1000000\nmax_backoff_ms = 300\n"
        ),
    )
    .unwrap();
    let cfg = AgentConfig::load(&path).unwrap();

    // A backlog: 3 devices, records of 1-3 readings of varying size, and in
    // the middle one record (~9 KB) larger than the limit.
    let keys = edge_agent::secrets::load_keyring(&cfg.key_path()).unwrap();
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    let mut total = 0u64;
    {
        let buffer = Buffer::open_with(&cfg.data_dir, &keys, cfg.buffer.limits()).unwrap();
        let outputs: Vec<DriverOutput> = (0..400u64)
            .map(|i| {
                let n = if i == 200 { 3 } else { 1 + i % 3 };
                let len = if i == 200 {
                    3000
                } else {
                    (i * 53 % 120) as usize
                };
                total += n;
                DriverOutput {
                    device_id: format!("dev-{}", i % 3),
                    readings: (0..n).map(|k| reading(len, i * 10 + k)).collect(),
                    ..Default::default()
                }
            })
            .collect();
        buffer.append(outputs).await.unwrap();
        buffer.flush().await.unwrap();
    }

    let up = Uplink::new(&url, "vgt_test", None, Duration::from_secs(5)).unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(edge_agent::run_with_uplink(cfg, AnyUplink::Https(up), rx));
    let count = |log: &Log| -> u64 {
        log.lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.batch.devices.iter())
            .map(|d| d.readings.len() as u64)
            .sum()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count(&log) < total && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent may have stopped by itself (an error): its result, not
    // the closed channel, says why.
    let _ = stop.send(true);
    task.await.unwrap().unwrap();

    let got = log.lock().unwrap().clone();
    assert!(
        got.iter()
            .all(|r| r.encoding.is_none() && r.wire_len == r.body_len)
    );
    // Every reading once, per device in sequence order.
    let mut per_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &got {
        for d in &r.batch.devices {
            let id = d.device.as_ref().unwrap().device_id.clone();
            per_device
                .entry(id)
                .or_default()
                .extend(d.readings.iter().map(|x| x.sequence));
        }
    }
    let n: usize = per_device.values().map(Vec::len).sum();
    assert_eq!(n as u64, total, "every reading delivered exactly once");
    for (dev, seqs) in &per_device {
        let expect: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, &expect, "{dev}: contiguous, in order, no duplicates");
    }
    // Within the limit, except the one batch holding only the big record.
    let over: Vec<&Received> = got.iter().filter(|r| r.body_len > MAX).collect();
    assert_eq!(over.len(), 1, "exactly one oversized batch");
    let big = &over[0].batch;
    assert_eq!(big.devices.len(), 1);
    assert_eq!(big.devices[0].readings.len(), 3);
    assert!(
        big.devices[0]
            .readings
            .iter()
            .all(|r| r.vendor_label.len() == 3000)
    );
    // Batches are filled, not sent one record at a time: the backlog's
    // ~40 KB of readings take a handful of 4 KiB batches.
    let bytes: usize = got.iter().map(|r| r.body_len).sum();
    assert!(
        got.len() <= bytes / (MAX / 2) + 2,
        "{} batches for {bytes} bytes",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_compression_sends_smaller_bodies_with_content_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let (url, log) = fake_hub().await;
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "gateway_id = \"gw-zstd\"\ndata_dir = \"data\"\n[uplink]\nurl = \"{url}\"\n\
             compression = \"zstd\"\nbatch_max_readings = 100\nbatch_max_wait_ms = 50\n\
             backlog_rate_per_s = 1000000\nmax_backoff_ms = 300\n"
        ),
    )
    .unwrap();
    let cfg = AgentConfig::load(&path).unwrap();
    let keys = edge_agent::secrets::load_keyring(&cfg.key_path()).unwrap();
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    {
        let buffer = Buffer::open_with(&cfg.data_dir, &keys, cfg.buffer.limits()).unwrap();
        let outputs: Vec<DriverOutput> = (0..500u64)
            .map(|i| DriverOutput {
                device_id: "masimo-1".into(),
                readings: vec![reading(4, i)],
                ..Default::default()
            })
            .collect();
        buffer.append(outputs).await.unwrap();
    }
    let token = "vgt_test";
    let up = edge_agent::uplink::Uplink::from_config(&cfg.uplink, token).unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(edge_agent::run_with_uplink(cfg, AnyUplink::Https(up), rx));
    let count = |log: &Log| -> usize {
        log.lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.batch.devices.iter())
            .map(|d| d.readings.len())
            .sum()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count(&log) < 500 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent may have stopped by itself (an error): its result, not
    // the closed channel, says why.
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
    let got = log.lock().unwrap().clone();
    assert_eq!(count(&log), 500);
    assert!(got.len() >= 5, "batches of at most 100 readings");
    for r in &got {
        assert_eq!(r.encoding.as_deref(), Some("zstd"));
        assert!(
            r.wire_len * 2 < r.body_len,
            "compressed {} vs {}",
            r.wire_len,
            r.body_len
        );
    }
}

/// A hub that already holds batches 1..=3 of this gateway from an earlier
/// buffer (and ignores incarnations) answers them with `duplicate_batch`
/// and the earlier batches' acks, whose counts here agree with the new
/// batches. That ack acknowledges none of the new readings: the agent
/// counts it (`vigil_agent_uplink_ack_mismatches_total`), keeps the records
/// and sends them under new batch sequences; every reading arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_batch_answer_to_a_first_send_deletes_nothing_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let stored: Arc<Mutex<Vec<u64>>> = Arc::default();
    let s = stored.clone();
    let app = axum::Router::new().route(
        "/api/v1/ingest",
        post(move |b: Bytes| {
            let s = s.clone();
            async move {
                let batch = Batch::decode(b.as_ref()).unwrap();
                assert_ne!(batch.incarnation, 0, "a fresh buffer has an incarnation");
                let items: usize = batch.devices.iter().map(|d| d.readings.len()).sum();
                let ack = BatchAck {
                    sequence: batch.sequence,
                    accepted: items as u32,
                    duplicate_batch: batch.sequence <= 3,
                    ..Default::default()
                };
                if batch.sequence > 3 {
                    s.lock().unwrap().extend(
                        batch
                            .devices
                            .iter()
                            .flat_map(|d| d.readings.iter().map(|r| r.sequence)),
                    );
                }
                (StatusCode::OK, ack.encode_to_vec())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v1/ingest", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let status_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "gateway_id = \"gw-mismatch\"\ndata_dir = \"data\"\n\
             [status]\nlisten = \"127.0.0.1:{status_port}\"\n\
             [uplink]\nurl = \"{url}\"\nbatch_max_readings = 10\nbatch_max_wait_ms = 50\n\
             backlog_rate_per_s = 1000000\nmax_backoff_ms = 100\n"
        ),
    )
    .unwrap();
    let cfg = AgentConfig::load(&path).unwrap();
    let keys = edge_agent::secrets::load_keyring(&cfg.key_path()).unwrap();
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    {
        let buffer = Buffer::open_with(&cfg.data_dir, &keys, cfg.buffer.limits()).unwrap();
        let outputs: Vec<DriverOutput> = (0..30u64)
            .map(|i| DriverOutput {
                device_id: "mon".into(),
                readings: vec![reading(4, i)],
                ..Default::default()
            })
            .collect();
        buffer.append(outputs).await.unwrap();
        buffer.flush().await.unwrap();
    }
    let up = Uplink::new(&url, "vgt_test", None, Duration::from_secs(5)).unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(edge_agent::run_with_uplink(cfg, AnyUplink::Https(up), rx));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stored.lock().unwrap().len() < 30 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", status_port)).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text
    })
    .await
    .unwrap();
    // The agent may have stopped by itself (an error): its result, not
    // the closed channel, says why.
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
    let mut got = stored.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, (1..=30).collect::<Vec<u64>>(), "every reading, once");
    let mismatches: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vigil_agent_uplink_ack_mismatches_total "))
        .expect("the counter is served")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(mismatches, 3.0, "one per colliding batch sequence");
}

/// Sends one HL7 ORU^R01 (one SpO2 value) over MLLP on `s` and reads its ACK.
async fn send_oru(s: &mut tokio::net::TcpStream, i: u32) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = "20261206120000";
    let msg = [
        format!("MSH|^~\\&|TEST|ICU|VIGIL|HOSP|{t}||ORU^R01^ORU_R01|AB{i:06}|P|2.6|||NE|AL"),
        format!("PID|1||AB-{i}^^^VIGILTEST^MR"),
        format!("OBR|1|AB{i:06}^TEST||182777000^monitoring of patient^SCT|||{t}"),
        format!(
            "OBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.1.1.1|{}|262688^MDC_DIM_PERCENT^MDC|||||F|||{t}",
            90 + i % 10
        ),
    ]
    .join("\r");
    let mut frame = vec![0x0b];
    frame.extend_from_slice(msg.as_bytes());
    frame.extend_from_slice(&[0x1c, 0x0d]);
    s.write_all(&frame).await.unwrap();
    let mut ack = Vec::new();
    let mut buf = [0u8; 512];
    while !ack.ends_with(&[0x1c, 0x0d]) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the agent closed without an ACK");
        ack.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&ack).contains("|AA|"), "accepted");
}

/// Adaptive batching with the default pacing: at a low load each reading
/// leaves in a batch of its own as soon as it is there (no batch in flight,
/// nothing waits for a batch to fill); under load, while a batch is in
/// flight (the hub takes 100 ms per batch) the next accumulates, so a burst
/// of 300 readings takes a few dozen batches, not 300. (`batch_max_wait_ms`
/// is 10 minutes here: a forwarder that waited for batches to fill would
/// deliver nothing within the test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_go_at_once_when_idle_and_grow_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let log: Log = Arc::default();
    let l = log.clone();
    let app = axum::Router::new().route(
        "/api/v1/ingest",
        post(move |h: HeaderMap, b: Bytes| {
            let l = l.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                ingest(l, h, b).await
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v1/ingest", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mllp = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "gateway_id = \"gw-adaptive\"\ndata_dir = \"data\"\n[uplink]\nurl = \"{url}\"\n\
             batch_max_wait_ms = 600000\nmax_backoff_ms = 300\n\n[[device]]\nkind = \"hl7-mllp\"\nid = \"hl7-1\"\nlisten = \"{mllp}\"\n"
        ),
    )
    .unwrap();
    let cfg = AgentConfig::load(&path).unwrap();
    let up = Uplink::new(&url, "vgt_test", None, Duration::from_secs(5)).unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(edge_agent::run_with_uplink(cfg, AnyUplink::Https(up), rx));
    let mut conn = None;
    for _ in 0..100 {
        if let Ok(c) = tokio::net::TcpStream::connect(mllp).await {
            conn = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = conn.expect("the agent's MLLP listener");
    // Readings per request, in order.
    let per_request = |log: &Log| -> Vec<usize> {
        log.lock()
            .unwrap()
            .iter()
            .map(|r| r.batch.devices.iter().map(|d| d.readings.len()).sum())
            .filter(|&n| n > 0)
            .collect()
    };
    let wait_total = async |n: usize| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while per_request(&log).iter().sum::<usize>() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} readings delivered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    // Low load: one reading every 400 ms (longer than the pacing and a
    // round trip): each goes alone.
    for i in 0..4 {
        send_oru(&mut conn, i).await;
        wait_total(i as usize + 1).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(per_request(&log), vec![1, 1, 1, 1]);

    // A burst of 300: the readings pile up behind the batch in flight.
    for i in 4..304 {
        send_oru(&mut conn, i).await;
    }
    wait_total(304).await;
    let burst = &per_request(&log)[4..];
    assert_eq!(burst.iter().sum::<usize>(), 300);
    assert!(
        burst.len() * 5 <= 300,
        "300 readings in {} batches: {burst:?}",
        burst.len()
    );
    // The agent may have stopped by itself (an error): its result, not
    // the closed channel, says why.
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
}
