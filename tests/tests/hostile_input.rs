//! The fault suite's hostile input (issue 9), gathered and run against the
//! real binaries (`device-sim` → ports → `edge-agent` → `cloud-hub`) on
//! loopback, one test per class:
//! - malformed, oversized, wrongly typed and replayed ingest batches;
//! - wrong and revoked credentials (a gateway with a wrong token, another
//!   gateway's token, a revoked token; the FHIR API without a token, with
//!   a wrong one and with a gateway's token);
//! - garbage on every kind of device port the agent has: a serial line
//!   (PTY), an HL7 v2 MLLP listener and a Modbus TCP device that answers
//!   noise;
//! - FHIR searches with malformed parameters.
//!
//! Each checks the same four things: a clear error (status and message),
//! counted in the metric `docs/metrics.md` names, nothing accepted before
//! (or alongside) lost or repeated, and the process still serving.
//! The parsers behind them are also fuzzed (`fuzz/`, `scripts/fuzz.sh`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use prost::Message;
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{
    Batch, BatchAck, DeviceData, DeviceInfo, Reading, RejectReason, reading,
};
use vigil_e2e::*;

const GATEWAY: &str = "gw-hostile";
const MASIMO: &str = "masimo-1";
const PATIENT: &str = "p-hostile";

fn runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// POST `body` to the hub's ingest endpoint: (status, body bytes).
fn post_ingest(
    base: &str,
    token: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    runtime().block_on(async {
        let mut req = reqwest::Client::new()
            .post(format!("{base}/api/v1/ingest"))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("the hub answers");
        let status = resp.status().as_u16();
        (status, resp.bytes().await.unwrap().to_vec())
    })
}

/// The hub's (or agent's) Prometheus text.
fn metrics_text(base: &str) -> String {
    runtime().block_on(async {
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
}

/// A sample's value (0 when the sample is not there yet).
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn healthy(base: &str) -> bool {
    runtime().block_on(async {
        reqwest::get(format!("{base}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// A batch of `n` SpO2 readings of `MASIMO` with sequences `first..`.
fn batch(gateway: &str, sequence: u64, first: u64, n: u64) -> Vec<u8> {
    let t = now_us();
    Batch {
        gateway_id: gateway.into(),
        sequence,
        devices: vec![DeviceData {
            device: Some(DeviceInfo {
                device_id: MASIMO.into(),
                protocol: "masimo-ascii1".into(),
                ..Default::default()
            }),
            readings: (first..first + n)
                .map(|s| Reading {
                    mdc_code: codes::PULS_OXIM_SAT_O2,
                    value: Some(reading::Value::Numeric(97.0)),
                    mdc_unit: units::PERCENT.mdc,
                    ucum_unit: units::PERCENT.ucum.into(),
                    device_time_us: t - (first + n - s) as i64 * 1_000_000,
                    gateway_time_us: t,
                    time_source: 1,
                    validity: 1,
                    sequence: s,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

fn error_text(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("a JSON error body, got {:?}", String::from_utf8_lossy(body)));
    v["error"].as_str().unwrap_or_default().to_owned()
}

/// sequence → number of `observations` rows of `device` (readings).
fn stored(dir: &Path, device: &str) -> BTreeMap<u64, u64> {
    let db = rusqlite::Connection::open(dir.join("hub.sqlite")).unwrap();
    db.prepare("SELECT sequence, COUNT(*) FROM observations WHERE device_id = ?1 GROUP BY sequence")
        .unwrap()
        .query_map([device], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Sequences of `device`'s technical readings at the hub.
fn event_sequences(dir: &Path, device: &str) -> Vec<u64> {
    let db = rusqlite::Connection::open(dir.join("hub.sqlite")).unwrap();
    db.prepare("SELECT sequence FROM device_events WHERE device_id = ?1")
        .unwrap()
        .query_map([device], |r| Ok(r.get::<_, i64>(0)? as u64))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Every sequence the agent gave `device` is at the hub exactly once (a
/// reading or a technical reading), no gap; returns the readings.
fn assert_exactly_once(dir: &Path, device: &str) -> usize {
    let readings = stored(dir, device);
    assert!(
        readings.values().all(|&n| n == 1),
        "{device}: a reading stored twice"
    );
    let mut all: Vec<u64> = readings.keys().copied().collect();
    all.extend(event_sequences(dir, device));
    all.sort_unstable();
    let expect: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(all, expect, "{device}: every sequence exactly once, no gap");
    readings.len()
}

/// FHIR search total of the test patient.
fn fhir_total(base: &str) -> u64 {
    let (status, b) = get_json(&format!(
        "{base}/fhir/Observation?patient={PATIENT}&_count=0"
    ))
    .unwrap();
    assert_eq!(status, 200, "{b}");
    b["total"].as_u64().unwrap()
}

/// Hub with `GATEWAY` (and its token) and a body limit of 64 KiB.
fn hub(dir: &Path) -> (Hub, String) {
    let cfg = write_hub_config(dir, "127.0.0.1:0", &[(GATEWAY, MASIMO, PATIENT)]).unwrap();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_body_bytes = 4194304", "max_body_bytes = 65536");
    std::fs::write(&cfg, text).unwrap();
    let token = add_gateway(&cfg, GATEWAY).unwrap();
    (start_hub(dir, &cfg).unwrap(), token)
}

// ---------------------------------------------------------------------------

#[test]
fn hostile_batches_are_refused_counted_and_lose_nothing() {
    let (_guard, dir) = test_dir("hostile-batches");
    let (hub, token) = hub(&dir);
    let base = hub.base_url.as_str();
    let pb = "application/x-protobuf";
    let errors = |kind: &str| {
        sample(
            &metrics_text(base),
            &format!("vigil_hub_ingest_errors_total{{kind=\"{kind}\"}}"),
        )
    };

    // Accepted first: 5 readings.
    let (status, body) = post_ingest(base, Some(&token), pb, batch(GATEWAY, 1, 1, 5));
    assert_eq!(status, 200);
    let first = BatchAck::decode(body.as_slice()).unwrap();
    assert_eq!((first.sequence, first.accepted), (1, 5));

    // Malformed protobuf.
    let (status, body) = post_ingest(
        base,
        Some(&token),
        pb,
        b"\xff\xff\xff\xffnot protobuf".to_vec(),
    );
    assert_eq!(status, 400);
    assert!(!error_text(&body).is_empty(), "the refusal says why");
    assert_eq!(errors("malformed"), 1.0);

    // A batch cut short (truncated in transit).
    let mut cut = batch(GATEWAY, 2, 6, 5);
    cut.truncate(cut.len() - 7);
    let (status, _) = post_ingest(base, Some(&token), pb, cut);
    assert_eq!(status, 400);
    assert_eq!(errors("malformed"), 2.0);

    // Oversized: past max_body_bytes (64 KiB).
    let (status, body) = post_ingest(base, Some(&token), pb, vec![0x0a; 200 * 1024]);
    assert_eq!(status, 413);
    assert!(!error_text(&body).is_empty());
    assert_eq!(errors("too_large"), 1.0);

    // Not protobuf at all.
    let (status, _) = post_ingest(base, Some(&token), "application/json", b"{}".to_vec());
    assert_eq!(status, 415);
    assert_eq!(errors("unsupported_media_type"), 1.0);

    // A sequence past 2^63-1 (the hub stores i64): the batch is refused
    // with the field named, a reading is rejected; nothing wraps negative.
    let (status, body) = post_ingest(base, Some(&token), pb, batch(GATEWAY, u64::MAX, 11, 1));
    assert_eq!(status, 400);
    assert!(
        error_text(&body).contains("`sequence`"),
        "{}",
        error_text(&body)
    );
    assert_eq!(errors("malformed"), 3.0);
    let mut b = Batch::decode(batch(GATEWAY, 4, 11, 1).as_slice()).unwrap();
    b.devices[0].readings[0].sequence = u64::MAX;
    let (status, body) = post_ingest(base, Some(&token), pb, b.encode_to_vec());
    assert_eq!(status, 200);
    let ack = BatchAck::decode(body.as_slice()).unwrap();
    assert_eq!((ack.accepted, ack.rejected), (0, 1), "{ack:?}");
    assert_eq!(ack.rejections[0].reason, RejectReason::Malformed as i32);
    assert!(ack.rejections[0].detail.contains("2^63-1"), "{ack:?}");
    assert_eq!(
        sample(
            &metrics_text(base),
            "vigil_hub_readings_rejected_total{reason=\"malformed\"}"
        ),
        1.0
    );

    // Replayed: the same batch again, then its readings in a new batch.
    let (status, body) = post_ingest(base, Some(&token), pb, batch(GATEWAY, 1, 1, 5));
    assert_eq!(status, 200, "a replayed batch is answered, not refused");
    let ack = BatchAck::decode(body.as_slice()).unwrap();
    assert!(ack.duplicate_batch, "{ack:?}");
    assert_eq!(
        (ack.sequence, ack.accepted, ack.duplicates),
        (first.sequence, first.accepted, first.duplicates),
        "a replayed batch gets its original ack (stored nothing again)"
    );
    let (status, body) = post_ingest(base, Some(&token), pb, batch(GATEWAY, 2, 1, 5));
    assert_eq!(status, 200);
    let ack = BatchAck::decode(body.as_slice()).unwrap();
    assert_eq!((ack.accepted, ack.duplicates), (0, 5), "{ack:?}");
    let m = metrics_text(base);
    assert!(sample(&m, "vigil_hub_ingest_batches_total{outcome=\"duplicate\"}") >= 1.0);
    assert_eq!(
        sample(&m, "vigil_hub_ingest_readings_total{outcome=\"duplicate\"}"),
        5.0,
        "re-sent readings counted as duplicates"
    );

    // Nothing lost or repeated; still serving and still accepting.
    let (status, _) = post_ingest(base, Some(&token), pb, batch(GATEWAY, 3, 6, 5));
    assert_eq!(status, 200);
    assert!(healthy(base));
    let s = stored(&dir, MASIMO);
    assert_eq!(
        s.keys().copied().collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert!(s.values().all(|&n| n == 1));
    assert_eq!(fhir_total(base), 10);
}

// ---------------------------------------------------------------------------

/// Masimo simulator on a PTY, `lines` lines 50 ms apart.
fn masimo_sim(pty: &PtyPair, lines: u32) -> Proc {
    Proc::spawn(
        "device-sim",
        Command::new(bin("device-sim"))
            .args(["masimo", "--scenario", "stable", "--interval-ms", "50"])
            .args(["--count", &lines.to_string(), "--port"])
            .arg(&pty.device)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap()
}

fn agent_toml(base: &str, devices: &str) -> String {
    format!(
        "gateway_id = \"{GATEWAY}\"\ndata_dir = \"agent-data\"\n\n[uplink]\nurl = \"{base}/api/v1/ingest\"\n\
         token_file = \"gateway.token\"\nbatch_max_readings = 60\nbatch_max_wait_ms = 100\nmax_backoff_ms = 300\n\n\
         {devices}"
    )
}

/// Waits until the hub's reading count of `device` is `n` and stays so.
fn wait_readings(dir: &Path, device: &str, n: usize) {
    wait_for(
        Duration::from_secs(60),
        &format!("{n} readings of {device}"),
        || {
            let a = stored(dir, device).len();
            std::thread::sleep(Duration::from_millis(500));
            (a >= n && a == stored(dir, device).len()).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; the hub holds {}", stored(dir, device).len()));
}

#[test]
fn wrong_and_revoked_credentials_are_refused_counted_and_lose_nothing() {
    let (_guard, dir) = test_dir("hostile-credentials");
    let d = dir.as_path();
    let (hub, token) = hub(d);
    let base = hub.base_url.clone();
    let other_token = add_gateway(&hub.config, "gw-other").unwrap();
    let unauthorized = || {
        sample(
            &metrics_text(&base),
            "vigil_hub_ingest_errors_total{kind=\"unauthorized\"}",
        )
    };

    // An agent with a wrong token: refused (401) and counted; it keeps
    // every reading buffered.
    write_private(&d.join("gateway.token"), "vgt_this-is-not-the-token").unwrap();
    let pty = PtyPair::new(d, "masimo").unwrap();
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        agent_toml(
            &base,
            &format!(
                "[[device]]\nkind = \"masimo-serial\"\nid = \"{MASIMO}\"\nport = \"{}\"\n",
                pty.host.display()
            ),
        ),
    )
    .unwrap();
    let mut agent = start_agent(d, &cfg, "agent.log").unwrap();
    let mut sim = masimo_sim(&pty, 30);
    sim.wait_exit(Duration::from_secs(60))
        .expect("simulator finished");
    wait_for(Duration::from_secs(30), "refusals counted", || {
        (unauthorized() >= 2.0).then_some(())
    })
    .unwrap();
    assert!(
        stored(d, MASIMO).is_empty(),
        "nothing stored with a wrong token"
    );
    assert!(
        agent.terminate(Duration::from_secs(15)),
        "agent stops cleanly"
    );

    // The right token: everything the agent buffered arrives, once.
    write_private(&d.join("gateway.token"), &token).unwrap();
    let mut agent = start_agent(d, &cfg, "agent.log").unwrap();
    wait_readings(d, MASIMO, 90);
    assert_eq!(assert_exactly_once(d, MASIMO), 90, "30 lines × 3 readings");
    assert!(agent.terminate(Duration::from_secs(15)));

    // Another gateway's (valid) token for this gateway's batch: 403.
    let (status, body) = post_ingest(
        &base,
        Some(&other_token),
        "application/x-protobuf",
        batch(GATEWAY, 9_000, 9_000, 1),
    );
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(!error_text(&body).is_empty());
    let m = metrics_text(&base);
    assert_eq!(
        sample(&m, "vigil_hub_ingest_errors_total{kind=\"forbidden\"}"),
        1.0
    );

    // Revoked (while the hub runs): the old token is refused at once.
    let before = unauthorized();
    let out = Command::new(bin("cloud-hub"))
        .args(["gateway", "revoke", GATEWAY, "--config"])
        .arg(&hub.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = post_ingest(
        &base,
        Some(&token),
        "application/x-protobuf",
        batch(GATEWAY, 9_001, 9_001, 1),
    );
    assert_eq!(status, 401);
    assert!(
        error_text(&body).contains("revoked"),
        "{}",
        error_text(&body)
    );
    assert_eq!(unauthorized(), before + 1.0);

    // The FHIR API with no token, a wrong one and a gateway's token: 401
    // saying why, counted as authentication failures.
    let auth_failures = || {
        sample(
            &metrics_text(&base),
            "vigil_hub_auth_failures_total{reason=\"unauthenticated\"}",
        )
    };
    let before = auth_failures();
    for bearer in [None, Some("vgu_not-a-token"), Some(token.as_str())] {
        let (status, body) = runtime().block_on(async {
            let mut req =
                reqwest::Client::new().get(format!("{base}/fhir/Observation?patient={PATIENT}"));
            if let Some(t) = bearer {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        });
        assert_eq!(status, 401, "{bearer:?}: {body}");
        // A FHIR client gets an OperationOutcome saying why.
        let oo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome", "{body}");
        assert!(
            !oo["issue"][0]["diagnostics"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "says why: {body}"
        );
    }
    assert_eq!(auth_failures(), before + 3.0);

    // Nothing that was accepted is lost; the hub still serves.
    assert!(healthy(&base));
    assert_eq!(assert_exactly_once(d, MASIMO), 90);
    assert_eq!(fhir_total(&base), 90);
}

// ---------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Deterministic noise (xorshift), with line ends and MLLP/Masimo-like
/// bytes mixed in.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match i % 97 {
                0 => b'\r',
                1 => b'\n',
                2 => 0x0b,
                3 => 0x1c,
                _ => x as u8,
            }
        })
        .collect()
}

/// A Modbus TCP "device" that answers every request with noise.
fn noisy_modbus_server() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for (k, conn) in l.incoming().enumerate() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                let mut seed = k as u64 + 7;
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    seed += 1;
                    if c.write_all(&noise(64, seed)).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `bytes` to the MLLP listener and returns what came back within 2 s.
fn mllp_exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.contains(&0x1c) {
            break;
        }
    }
    out
}

#[test]
fn garbage_on_every_device_port_is_counted_and_the_agent_keeps_delivering() {
    let (_guard, dir) = test_dir("hostile-ports");
    let d = dir.as_path();
    let (hub, token) = hub(d);
    let base = hub.base_url.clone();
    write_private(&d.join("gateway.token"), &token).unwrap();
    let pty = PtyPair::new(d, "masimo").unwrap();
    let mllp_port = free_port();
    let status_port = free_port();
    let modbus = noisy_modbus_server();
    // The simulator's map: the agent polls as for a real device.
    let map = repo_root().join("edge-agent/maps/sim-multiparameter.toml");
    let devices = format!(
        "[status]\nlisten = \"127.0.0.1:{status_port}\"\n\n\
         [[device]]\nkind = \"masimo-serial\"\nid = \"{MASIMO}\"\nport = \"{}\"\n\n\
         [[device]]\nkind = \"hl7-mllp\"\nid = \"hl7-1\"\nlisten = \"127.0.0.1:{mllp_port}\"\n\n\
         [[device]]\nkind = \"modbus-tcp\"\nid = \"modbus-1\"\naddress = \"{modbus}\"\n\
         [device.options]\nmap = \"{}\"\npoll_interval_ms = 200\n",
        pty.host.display(),
        map.display()
    );
    let cfg = d.join("agent.toml");
    std::fs::write(&cfg, agent_toml(&base, &devices)).unwrap();
    let mut agent = start_agent(d, &cfg, "agent.log").unwrap();
    let status = format!("http://127.0.0.1:{status_port}");
    wait_for(Duration::from_secs(30), "the agent's MLLP listener", || {
        std::net::TcpStream::connect(("127.0.0.1", mllp_port)).ok()
    })
    .unwrap();

    // Serial: 64 KiB of noise, then a real Masimo stream on the same line
    // (every one of its lines must arrive).
    {
        let mut port = std::fs::OpenOptions::new()
            .write(true)
            .open(&pty.device)
            .unwrap();
        port.write_all(&noise(64 * 1024, 42)).unwrap();
        // The burst ends; the device's next line starts on a fresh line.
        port.write_all(b"\r\n").unwrap();
        port.flush().unwrap();
    }
    let mut sim = masimo_sim(&pty, 20);

    // HL7 MLLP: unframed noise; a frame that is not HL7 (answered AR);
    // a frame far over the message limit; then real ORU^R01 senders.
    let _ = mllp_exchange(mllp_port, &noise(16 * 1024, 7));
    let mut framed = vec![0x0b];
    framed.extend_from_slice(b"this is not an HL7 message\r");
    framed.extend_from_slice(&[0x1c, b'\r']);
    let ack = String::from_utf8_lossy(&mllp_exchange(mllp_port, &framed)).into_owned();
    assert!(
        ack.contains("MSA|AR"),
        "a non-HL7 frame is refused with AR: {ack:?}"
    );
    let mut huge = vec![0x0b];
    huge.extend(std::iter::repeat_n(b'A', 3 << 20));
    let _ = mllp_exchange(mllp_port, &huge);
    let out = Command::new(bin("device-sim"))
        .args(["hl7", "--to", &format!("127.0.0.1:{mllp_port}")])
        .args([
            "--count",
            "3",
            "--interval-ms",
            "100",
            "--scenario",
            "stable",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "valid ORU^R01 still acknowledged AA after the noise: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    sim.wait_exit(Duration::from_secs(60))
        .expect("simulator finished");
    wait_readings(d, MASIMO, 60);

    // Counted, per device.
    let m = metrics_text(&status);
    let count = |dev: &str, names: &[&str]| -> f64 {
        names
            .iter()
            .map(|n| {
                let name = if n.contains("frames") {
                    format!("vigil_agent_device_frames_total{{device=\"{dev}\",outcome=\"bad\"}}")
                } else {
                    format!("vigil_agent_device_{n}_total{{device=\"{dev}\"}}")
                };
                sample(&m, &name)
            })
            .sum()
    };
    let serial = count(MASIMO, &["bytes_dropped", "frames"]);
    let hl7 = count("hl7-1", &["bytes_dropped", "frames"]);
    let modbus_errors = count(
        "modbus-1",
        &["frames", "link_errors", "timeouts", "exceptions"],
    );
    assert!(serial > 0.0, "serial noise counted:\n{m}");
    assert!(hl7 > 0.0, "MLLP noise counted:\n{m}");
    assert!(modbus_errors > 0.0, "Modbus noise counted:\n{m}");

    // Nothing lost, nothing invented: the Masimo stream exactly once, the
    // HL7 readings stored, no Modbus value from noise; all still running.
    assert_eq!(assert_exactly_once(d, MASIMO), 60, "20 lines × 3 readings");
    assert!(!stored(d, "hl7-1").is_empty(), "the HL7 readings arrived");
    assert!(
        stored(d, "modbus-1").is_empty(),
        "noise never becomes a value"
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent still runs"
    );
    assert!(healthy(&base));
    assert!(agent.terminate(Duration::from_secs(15)));
}

// ---------------------------------------------------------------------------

#[test]
fn malformed_fhir_searches_get_an_operation_outcome_and_change_nothing() {
    let (_guard, dir) = test_dir("hostile-fhir");
    let (hub, token) = hub(&dir);
    let base = hub.base_url.as_str();
    let (status, _) = post_ingest(
        base,
        Some(&token),
        "application/x-protobuf",
        batch(GATEWAY, 1, 1, 5),
    );
    assert_eq!(status, 200);
    let searches = || {
        sample(
            &metrics_text(base),
            "vigil_hub_fhir_requests_total{interaction=\"search\"}",
        )
    };
    let before = searches();
    let long = "x".repeat(8 * 1024);
    let bad = [
        "date=yesterday".to_owned(),
        "date=2026-13-45".into(),
        "date=xx2026-01-01".into(),
        "_count=ten".into(),
        "_count=-1".into(),
        "_offset=-5".into(),
        "_sort=sideways".into(),
        "date=".into(),
        format!("patient={long}"),
        "patient=a&patient=b".into(),
        "patient:exact=a".into(),
        "_lastUpdated=gt2026".into(),
    ];
    for q in &bad {
        let (status, body) = get_json(&format!("{base}/fhir/Observation?{q}"))
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        assert!(
            (400..500).contains(&status),
            "{}: {status}",
            &q[..q.len().min(60)]
        );
        assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
        let diag = body["issue"][0]["diagnostics"].as_str().unwrap_or_default();
        assert!(!diag.is_empty(), "the outcome says what is wrong: {body}");
    }
    assert_eq!(
        searches() - before,
        bad.len() as f64,
        "every request counted (vigil_hub_fhir_requests_total)"
    );
    // Nothing changed; still serving.
    assert!(healthy(base));
    assert_eq!(fhir_total(base), 5);
    assert_eq!(stored(&dir, MASIMO).len(), 5);
}
