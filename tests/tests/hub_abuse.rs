//! The hub against a hostile network and a hostile insider (issue 17),
//! over the real `cloud-hub` binary on loopback:
//! - a login flood: memory stays bounded, the guesses cannot lock the real
//!   user out, the attacker's own (name, address) pair is locked;
//! - hostile FHIR searches (a date at the end of the range, 1 200 codes)
//!   are 400s naming the problem, and the hub keeps serving;
//! - every response carrying patient data says `Cache-Control: no-store`;
//! - the database, its WAL and bulk-export files are private (0600 in
//!   0700) even under `umask 000`;
//! - forged HL7 ADT messages (from an address the listener does not trust,
//!   or naming a sending facility it does not allow) are answered AR,
//!   counted, and move nobody; a non-loopback ADT listener without mutual
//!   TLS does not start.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use prost::Message;
use serde_json::{Value, json};
use shared_protocol::catalogue::{codes, units};
use shared_protocol::v1::{Batch, DeviceData, DeviceInfo, Reading, reading};
use vigil_e2e::*;

const GATEWAY: &str = "gw-abuse";
const DEVICE: &str = "masimo-abuse";
const PATIENT: &str = "p-abuse";
const PASSWORD: &str = "correct-horse-battery-staple";
/// The attacker's and the real user's addresses, as the trusted proxy
/// (loopback) reports them in `X-Forwarded-For`.
const ATTACKER: &str = "203.0.113.7";
const NURSE_AT: &str = "198.51.100.2";

fn runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// A hub config in `dir` with `extra` TOML appended.
fn hub_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let cfg = write_hub_config(dir, "127.0.0.1:0", &[(GATEWAY, DEVICE, PATIENT)]).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}{extra}")).unwrap();
    cfg
}

fn add_user(config: &Path, name: &str, role: &str) {
    let pw = config.with_file_name(format!("{name}.password"));
    write_private(&pw, PASSWORD).unwrap();
    let out = Command::new(bin("cloud-hub"))
        .arg("--config")
        .arg(config)
        .args(["user", "add", name, "--role", role, "--password-file"])
        .arg(&pw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "user add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Peak resident memory of process `pid` (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .expect("VmHWM in /proc/PID/status")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb / 1024.0
}

fn metric(base: &str, series: &str) -> f64 {
    runtime().block_on(metric_async(base, series))
}

async fn metric_async(base: &str, series: &str) -> f64 {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("{series} not served:\n{text}"))
}

async fn login(base: &str, from: &str, user: &str, password: &str) -> reqwest::Response {
    http()
        .post(format!("{base}/api/v1/session"))
        .header("content-type", "application/json")
        .header("x-forwarded-for", from)
        .body(json!({ "username": user, "password": password }).to_string())
        .send()
        .await
        .unwrap()
}

/// 200 concurrent logins from one address (made-up names and wrong
/// passwords for the real `nurse`): the hub's peak memory stays under
/// 200 MiB (password checks are bounded; the excess is refused at once with
/// `Retry-After`); the attacker's (nurse, address) pair ends up locked,
/// even for the right password; the real nurse, from her own address, still
/// logs in (after at most the step-up delay and a retry on a busy answer).
#[test]
fn a_login_flood_stays_small_and_cannot_lock_the_real_user_out() {
    let (_guard, dir) = test_dir("abuse-login");
    let cfg = hub_config(&dir, "\n[auth]\ntrusted_proxies = [\"127.0.0.1\"]\n");
    add_user(&cfg, "nurse", "clinician");
    let hub = start_hub(&dir, &cfg).unwrap();
    let base = hub.base_url.clone();
    let pid = hub.proc.child.id();
    let before = peak_rss_mib(pid);
    let rt = runtime();
    let statuses: Vec<u16> = rt.block_on(async {
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let base = base.clone();
                tokio::spawn(async move {
                    let user = if i % 2 == 0 {
                        "nurse".to_owned()
                    } else {
                        format!("made-up-{i}")
                    };
                    login(&base, ATTACKER, &user, "guess")
                        .await
                        .status()
                        .as_u16()
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let peak = peak_rss_mib(pid);
    eprintln!("login flood: hub peak RSS {before:.0} → {peak:.0} MiB; statuses {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "only refusals: {statuses:?}"
    );
    assert!(statuses.contains(&429), "the excess is refused at once");
    assert!(
        peak < 200.0,
        "peak RSS {peak:.0} MiB under a 200-login flood"
    );
    assert!(metric(&base, "vigil_hub_login_throttled_total{reason=\"busy\"}") > 0.0);

    rt.block_on(async {
        // The attacker keeps guessing (sequentially, so each guess gets a
        // password check; how many of the flood's did depends on the
        // machine's speed) until its pair is locked: after at most
        // PAIR_MAX_FAILURES (5) checked guesses.
        for _ in 0..30 {
            let r = login(&base, ATTACKER, "nurse", "guess").await;
            let busy = r.status() == 429 && r.headers()["retry-after"] == "1";
            if r.status() == 429 && !busy {
                break;
            }
            assert!(busy || r.status() == 401, "{}", r.status());
        }
        // The attacker's pair is locked, even with the right password.
        let mut locked = None;
        for _ in 0..20 {
            let r = login(&base, ATTACKER, "nurse", PASSWORD).await;
            if r.status() != 429 || r.headers()["retry-after"] != "1" {
                locked = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let r = locked.expect("an answer other than busy");
        assert_eq!(r.status(), 429, "the attacker's pair is locked");
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((250..=300).contains(&retry), "Retry-After {retry}");
        // A distributed guesser (one guess from each of many addresses)
        // takes the account past its free attempts: step-up delays, never
        // a lock. (How many of the flood's guesses were checked rather
        // than refused as busy depends on the machine's speed.)
        for i in 0..20 {
            if metric_async(&base, "vigil_hub_login_throttled_total{reason=\"step_up\"}").await
                > 0.0
            {
                break;
            }
            let r = login(&base, &format!("192.0.2.{}", 10 + i), "nurse", "guess").await;
            assert!(matches!(r.status().as_u16(), 401 | 429), "{}", r.status());
        }
        assert!(
            metric_async(&base, "vigil_hub_login_throttled_total{reason=\"step_up\"}").await > 0.0
        );
        // The real nurse from her own address gets in.
        let t = Instant::now();
        let mut status = 0;
        for _ in 0..20 {
            let r = login(&base, NURSE_AT, "nurse", PASSWORD).await;
            status = r.status().as_u16();
            if status != 429 {
                break;
            }
            let wait: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                wait <= 1,
                "the real nurse is never locked out (Retry-After {wait})"
            );
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
        assert_eq!(status, 200, "the real nurse logs in");
        eprintln!("the real nurse logged in after {:?}", t.elapsed());
    });
    assert!(metric(&base, "vigil_hub_login_throttled_total{reason=\"locked\"}") > 0.0);
    assert!(metric(&base, "vigil_hub_logins_total") >= 1.0);
}

/// One SpO2 reading of `DEVICE`, now, sequence `seq`.
fn batch(seq: u64) -> Vec<u8> {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    Batch {
        gateway_id: GATEWAY.into(),
        sequence: seq,
        devices: vec![DeviceData {
            device: Some(DeviceInfo {
                device_id: DEVICE.into(),
                protocol: "masimo-ascii1".into(),
                ..Default::default()
            }),
            readings: vec![Reading {
                mdc_code: codes::PULS_OXIM_SAT_O2,
                value: Some(reading::Value::Numeric(97.0)),
                mdc_unit: units::PERCENT.mdc,
                ucum_unit: units::PERCENT.ucum.into(),
                device_time_us: t,
                gateway_time_us: t,
                time_source: 1,
                validity: 1,
                sequence: seq,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

async fn ingest_one(base: &str, token: &str, seq: u64) {
    let r = http()
        .post(format!("{base}/api/v1/ingest"))
        .header("content-type", "application/x-protobuf")
        .bearer_auth(token)
        .body(batch(seq))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
}

async fn get(base: &str, path: &str) -> reqwest::Response {
    http()
        .get(format!("{base}{path}"))
        .bearer_auth(HARNESS_ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
}

/// The search that panicked the handler and the one that reached the
/// database's expression limit are 400 OperationOutcomes naming the
/// problem, and the hub keeps serving; every response with patient data
/// (FHIR reads and searches, the clinical API, errors) carries
/// `Cache-Control: no-store`.
#[test]
fn hostile_searches_are_400s_and_patient_data_is_never_cached() {
    let (_guard, dir) = test_dir("abuse-search");
    let cfg = hub_config(&dir, "");
    let token = add_gateway(&cfg, GATEWAY).unwrap();
    let hub = start_hub(&dir, &cfg).unwrap();
    let base = hub.base_url.clone();
    runtime().block_on(async {
        ingest_one(&base, &token, 1).await;
        let r = get(&base, "/fhir/Observation?date=le9999-12-31T23:59:59Z").await;
        assert_eq!(r.status(), 400);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
        assert!(body.to_string().contains("9999-12-31T23:59:59Z"), "{body}");
        let codes = vec!["code=8867-4"; 1200].join("&");
        let r = get(&base, &format!("/fhir/Observation?{codes}")).await;
        assert_eq!(r.status(), 400);
        let body: Value = r.json().await.unwrap();
        assert!(
            body.to_string().contains("at most 32 search parameters"),
            "{body}"
        );
        assert_eq!(get(&base, "/healthz").await.status(), 200, "still serving");

        let search = get(&base, &format!("/fhir/Observation?patient={PATIENT}")).await;
        assert_eq!(search.headers()["cache-control"], "no-store");
        let bundle: Value = search.json().await.unwrap();
        assert_eq!(bundle["total"], 1, "{bundle}");
        let id = bundle["entry"][0]["resource"]["id"].as_str().unwrap();
        for path in [
            format!("/fhir/Observation/{id}"),
            format!("/fhir/Patient/{PATIENT}"),
            "/fhir/Observation?date=le9999-12-31T23:59:59Z".to_owned(),
            "/fhir/Observation/no-such-id".to_owned(),
            "/api/v1/gateways".to_owned(),
            "/api/v1/session".to_owned(),
        ] {
            let r = get(&base, &path).await;
            assert_eq!(
                r.headers()
                    .get("cache-control")
                    .map(|v| v.to_str().unwrap()),
                Some("no-store"),
                "{path}: {}",
                r.status()
            );
        }
    });
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Under `umask 000` the hub creates its database directory 0700, the
/// database and its WAL and shared-memory files 0600, and a bulk export's
/// directories 0700 and files 0600.
#[test]
fn the_database_wal_and_exports_are_private_whatever_the_umask() {
    let (_guard, dir) = test_dir("abuse-modes");
    let cfg = hub_config(&dir, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "sqlite_path = \"hub.sqlite\"",
        "sqlite_path = \"data/hub.sqlite\"",
    );
    std::fs::write(&cfg, text).unwrap();
    let token = add_gateway(&cfg, GATEWAY).unwrap();
    let hub = start_hub_umask(&dir, &cfg, "000").unwrap();
    let base = hub.base_url.clone();
    runtime().block_on(async {
        ingest_one(&base, &token, 1).await;
        let kick = http()
            .get(format!("{base}/fhir/$export"))
            .bearer_auth(HARNESS_ADMIN_TOKEN)
            .header("prefer", "respond-async")
            .header("accept", "application/fhir+json")
            .send()
            .await
            .unwrap();
        assert_eq!(kick.status(), 202, "{:?}", kick.text().await);
        let status_url = kick.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = http()
                .get(&status_url)
                .bearer_auth(HARNESS_ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                break;
            }
            assert_eq!(r.status(), 202);
            assert!(Instant::now() < deadline, "export did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let data = dir.join("data");
    assert_eq!(mode(&data), 0o700, "database directory");
    for f in ["hub.sqlite", "hub.sqlite-wal", "hub.sqlite-shm"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    let exports = data.join("hub.sqlite.exports");
    assert_eq!(mode(&exports), 0o700, "exports directory");
    let mut files = 0;
    for job in std::fs::read_dir(&exports).unwrap() {
        let job = job.unwrap().path();
        assert_eq!(mode(&job), 0o700, "{}", job.display());
        for f in std::fs::read_dir(&job).unwrap() {
            let f = f.unwrap().path();
            assert_eq!(mode(&f), 0o600, "{}", f.display());
            files += 1;
        }
    }
    assert!(files > 0, "the export wrote files");
    drop(hub);
}

// ---------------------------------------------------------------------------
// Patient movements (HL7 ADT).

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An ADT message (HL7 v2.5 ch. 3) from `facility`, MLLP-framed: A01 admit
/// into `ICU3^07^B` at `at` or A03 discharge at `at`.
fn adt(trigger: &str, facility: &str, mrn: &str, at: &str, id: &str) -> Vec<u8> {
    let structure = format!("ADT_{trigger}");
    format!(
        "\x0bMSH|^~\\&|ADT1|{facility}|VIGIL|ICU|{at}||ADT^{trigger}^{structure}|{id}|P|2.5\r\
         EVN|{trigger}|{at}\rPID|1||{mrn}^^^GHH^MR\rPV1|1|I|ICU3^07^B\r\x1c\r"
    )
    .into_bytes()
}

/// Sends one framed message from local address `from` to `port`; the ACK's
/// MSA-1 and its text.
fn send(from: &str, port: u16, msg: &[u8]) -> (String, String) {
    let mut s = connect_from(from, port);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.windows(2).any(|w| w == [0x1c, 0x0d]) {
        let n = s.read(&mut chunk).expect("an ACK within 10 s");
        assert!(n > 0, "closed before the ACK");
        got.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let code = text
        .split('\r')
        .find_map(|seg| seg.strip_prefix("MSA|"))
        .map(|msa| msa[..2].to_owned())
        .expect("MSA");
    (code, text)
}

/// A TCP connection to 127.0.0.1:`port` from the local address `from`
/// (another loopback address is another source).
fn connect_from(from: &str, port: u16) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        sock.connect(([127, 0, 0, 1], port).into()).await.unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s
}

#[test]
fn forged_adt_messages_are_refused_and_move_nobody() {
    let (_keep, dir) = test_dir("hub-abuse-adt");
    let port = free_port();
    let config = write_hub_config(&dir, "127.0.0.1:0", &[]).unwrap();
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(&format!(
        "[adt]\nlisten = \"127.0.0.1:{port}\"\nallow_sources = [\"127.0.0.1\"]\n\
         allowed_sending_facilities = [\"GHH\"]\n"
    ));
    std::fs::write(&config, toml).unwrap();
    let hub = start_hub(&dir, &config).unwrap();
    let base = hub.base_url.clone();
    let (status, body) = runtime().block_on(call(
        &base,
        HARNESS_ADMIN_TOKEN,
        "POST",
        "/api/v1/beds",
        json!({ "id": "ICU3-07-B", "ward": "ICU 3", "label": "Bed B" }),
    ));
    assert_eq!(status, 201, "{body}");
    wait_for(Duration::from_secs(10), "the ADT listener", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .unwrap();
    let patient_at = |at: &str| {
        let (status, body) = get_json(&format!("{base}/api/v1/occupancy?at={at}")).unwrap();
        assert_eq!(status, 200, "{body}");
        body["beds"][0]["patient"]["value"]
            .as_str()
            .map(str::to_owned)
    };

    // The real admission, from the trusted sender.
    let (code, text) = send(
        "127.0.0.1",
        port,
        &adt("A01", "GHH", "MRN-1", "20240501100000+0000", "C1"),
    );
    assert_eq!(code, "AA", "{text}");
    assert_eq!(patient_at("2024-05-01T11:00:00Z").as_deref(), Some("MRN-1"));

    // Forged: a discharge of MRN-1 from another address, and a back-dated
    // admission of another patient naming a facility not allowed (also
    // from the trusted address).
    let (code, text) = send(
        "127.0.0.2",
        port,
        &adt("A03", "GHH", "MRN-1", "20240501100500+0000", "F1"),
    );
    assert_eq!(code, "AR", "{text}");
    assert!(text.contains("untrusted source"), "{text}");
    for from in ["127.0.0.1", "127.0.0.2"] {
        let (code, text) = send(
            from,
            port,
            &adt("A03", "EVIL", "MRN-1", "20240501100500+0000", "F2"),
        );
        assert_eq!(code, "AR", "{from}: {text}");
    }
    let (code, text) = send(
        "127.0.0.1",
        port,
        &adt(
            "A01",
            "EVIL^1.2.3^ISO",
            "MRN-666",
            "20200101000000+0000",
            "F3",
        ),
    );
    assert_eq!(code, "AR", "{text}");
    assert!(text.contains("MSH^1^4"), "{text}");

    // Nobody moved: MRN-1 still in the bed, before and after the forged
    // discharge time; the back-dated admission left no trace.
    assert_eq!(patient_at("2024-05-01T11:00:00Z").as_deref(), Some("MRN-1"));
    assert_eq!(patient_at("2021-01-01T00:00:00Z"), None);
    let metrics = runtime().block_on(async {
        http()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    for line in [
        "vigil_hub_adt_refused_total{reason=\"untrusted_source\"} 2",
        "vigil_hub_adt_refused_total{reason=\"facility\"} 2",
        "vigil_hub_adt_messages_total{ack=\"AA\"} 1",
        "vigil_hub_adt_messages_total{ack=\"AR\"} 4",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    // The hub's log names the refused source, never a patient.
    let log = std::fs::read_to_string(dir.join("hub.log")).unwrap();
    assert!(log.contains("untrusted source"), "{log}");
    assert!(!log.contains("MRN-1") && !log.contains("MRN-666"), "{log}");
    drop(hub);
}

#[test]
fn a_non_loopback_adt_listener_without_mutual_tls_does_not_start() {
    let (_keep, dir) = test_dir("hub-abuse-adt-open");
    let config = write_hub_config(&dir, "127.0.0.1:0", &[]).unwrap();
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(
        "[adt]\nlisten = \"0.0.0.0:0\"\nallow_sources = [\"10.1.2.3\"]\n\
         allowed_sending_facilities = [\"GHH\"]\n",
    );
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(bin("cloud-hub"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the hub started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("adt.allow_sources"), "{err}");
}

// ---------------------------------------------------------------------------
// Re-attribution and the keyed audit log.

/// `cloud-hub ARGS --config CONFIG`: (success, stdout, stderr).
fn hub_cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("cloud-hub"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn call(base: &str, token: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let r = http()
        .request(method.parse().unwrap(), format!("{base}{path}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn rfc3339(us: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Over the real binary with an audit key: a biomedical engineer cannot end
/// a device's placement back in time (403; the readings stay with their
/// patient), a clinician can with a reason (the move is audited, naming
/// the patient); then, with the hub stopped, one audit entry edited in the
/// database (its append-only triggers dropped, as anyone holding the file
/// can) is caught by `cloud-hub audit verify`, which passed before.
#[test]
fn a_biomed_cannot_move_readings_back_in_time_and_an_edited_audit_entry_is_caught() {
    let (_guard, dir) = test_dir("abuse-reattribution");
    let cfg = hub_config(&dir, "\n[audit]\nkey_file = \"audit.key\"\n");
    let key = dir.join("audit.key");
    let (ok, _, err) = hub_cli(&cfg, &["audit", "keygen", "--out", key.to_str().unwrap()]);
    assert!(ok, "keygen: {err}");
    let token = add_gateway(&cfg, GATEWAY).unwrap();
    let (ok, biomed, err) = hub_cli(&cfg, &["token", "create", "bio", "--role", "biomed"]);
    assert!(ok, "{err}");
    let (ok, nurse, err) = hub_cli(
        &cfg,
        &["token", "create", "ward-nurse", "--role", "clinician"],
    );
    assert!(ok, "{err}");
    let (biomed, nurse) = (biomed.trim().to_owned(), nurse.trim().to_owned());
    let hub = start_hub(&dir, &cfg).unwrap();
    let base = hub.base_url.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    const DEV: &str = "mon-7";
    runtime().block_on(async {
        let admin = HARNESS_ADMIN_TOKEN;
        for b in ["b1", "b2"] {
            let (s, body) = call(&base, admin, "POST", "/api/v1/beds", json!({"id": b, "ward": "ICU", "label": b})).await;
            assert_eq!(s, 201, "{body}");
        }
        let half_hour_ago = rfc3339(now - 30 * 60_000_000);
        let (s, body) = call(&base, admin, "POST", "/api/v1/placements",
            json!({"gateway_id": GATEWAY, "device_id": DEV, "bed_id": "b1", "at": half_hour_ago, "reason": "set up late"})).await;
        assert_eq!(s, 200, "{body}");
        let (s, body) = call(&base, admin, "POST", "/api/v1/patients/admit",
            json!({"patient": {"system": "urn:oid:1.2.3.4", "value": "MRN-A"}, "bed_id": "b1", "at": half_hour_ago, "reason": "set up late"})).await;
        assert_eq!(s, 200, "{body}");
        // One reading five minutes ago, at MRN-A's bed.
        let mut b = shared_protocol::v1::Batch::decode(batch(1).as_slice()).unwrap();
        b.devices[0].device.as_mut().unwrap().device_id = DEV.into();
        for r in &mut b.devices[0].readings {
            r.device_time_us = now - 5 * 60_000_000;
            r.gateway_time_us = now - 5 * 60_000_000;
        }
        let r = http()
            .post(format!("{base}/api/v1/ingest"))
            .header("content-type", "application/x-protobuf")
            .bearer_auth(&token)
            .body(b.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let count = async || -> u64 {
            let r = get(&base, "/fhir/Observation?patient:identifier=urn:oid:1.2.3.4%7CMRN-A&_count=0").await;
            r.json::<Value>().await.unwrap()["total"].as_u64().unwrap()
        };
        assert_eq!(count().await, 1);
        let an_hour_ago = rfc3339(now - 60 * 60_000_000);
        let end = json!({"gateway_id": GATEWAY, "device_id": DEV, "at": an_hour_ago, "reason": "cleanup"});
        let (s, body) = call(&base, &biomed, "POST", "/api/v1/placements/end", end.clone()).await;
        assert_eq!(s, 403, "a biomed may not end a placement an hour back: {body}");
        assert_eq!(count().await, 1, "nothing moved");
        // A clinician corrects a stay back in time: only with a reason;
        // the reading leaves MRN-A.
        let discharge = |reason: Option<&str>| {
            let mut b = json!({"patient": {"system": "urn:oid:1.2.3.4", "value": "MRN-A"},
                "at": rfc3339(now - 20 * 60_000_000)});
            if let Some(r) = reason {
                b["reason"] = json!(r);
            }
            b
        };
        let (s, body) = call(&base, &nurse, "POST", "/api/v1/patients/discharge", discharge(None)).await;
        assert_eq!(s, 400, "no reason: {body}");
        assert_eq!(body["field"], "reason", "{body}");
        assert_eq!(count().await, 1);
        let (s, body) = call(&base, &nurse, "POST", "/api/v1/patients/discharge",
            discharge(Some("left the ward before the monitor was moved"))).await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(count().await, 0, "the reading no longer belongs to MRN-A");
    });
    drop(hub);

    let (ok, out, err) = hub_cli(&cfg, &["audit", "verify"]);
    assert!(ok, "verify passes: {out} {err}");
    // The attacker with the database files (the audit log is in its own,
    // beside the database): drop the guards, edit an entry.
    let db = rusqlite::Connection::open(dir.join("hub-audit.sqlite")).unwrap();
    let moves: i64 = db
        .query_row(
            "SELECT count(*) FROM audit_log WHERE actor = 'token:ward-nurse'
                AND detail LIKE '%re-attributed 1 reading%' AND detail LIKE '%reason: left the ward%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        moves >= 1,
        "the clinician's re-attribution is audited with its count and reason"
    );
    let triggers: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for t in &triggers {
        db.execute_batch(&format!("DROP TRIGGER {t}")).unwrap();
    }
    let n = db
        .execute(
            "UPDATE audit_log SET actor = 'user:someone-else'
              WHERE seq = (SELECT max(seq) FROM audit_log WHERE actor = 'token:bio')",
            [],
        )
        .unwrap();
    assert_eq!(n, 1, "the biomed's refused request was audited");
    drop(db);
    let (ok, out, err) = hub_cli(&cfg, &["audit", "verify"]);
    assert!(!ok, "an edited entry must fail verify: {out} {err}");
    assert!(err.contains("TAMPERED"), "{err}");
}
