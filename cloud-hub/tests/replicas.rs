//! Two real `cloud-hub serve` processes (replicas) on one throwaway
//! PostgreSQL, as AKS runs them: an alert raised by a batch one replica
//! stored reaches an SSE client of the other within 1 s, an acknowledge on
//! one is seen on the other, and each alert is raised and escalated once
//! (a condition's delay counts across replicas), and a patient's limits
//! set through one are in force on the other;
//! login lockouts and sessions hold across replicas and a restart; kill -9
//! of one replica while a client posts to it loses nothing (the client
//! re-sends its un-acked batch to the other, and the search totals count
//! each reading once); the audit chain verifies
//! after both served requests concurrently.

use crate::common;
use crate::pg_server::PgServer;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use prost::Message;
use serde_json::{Value, json};
use shared_protocol::v1::{BatchAck, TechnicalKind, TechnicalReading};
use shared_protocol::{CONTENT_TYPE_PROTOBUF, INGEST_PATH};

const BIN: &str = env!("CARGO_BIN_EXE_cloud-hub");
const ADMIN: &str = "replicas-admin-token-0123456789abcdef0123";
const S: i64 = 1_000_000;

/// The replicas' shared config (one file, one database, one audit key)
/// in `data`.
fn shared_config(data: &Path, server: &PgServer, alerts: &str) -> (PathBuf, cloud_hub::Config) {
    let key = data.join("audit.key");
    if !key.exists() {
        cloud_hub::audit::keygen(&key).unwrap();
    }
    let audit = format!(
        "[audit]\nkey_file = \"{}\"\ncheckpoint_interval_s = 1\n",
        key.display()
    );
    let text = admin_config_text(
        data,
        ADMIN,
        &format!("[alerts]\ntick_ms = 100\n{alerts}\n{audit}"),
    )
    .on_postgres(&server.url(), 4);
    let path = data.join("hub.toml");
    std::fs::write(&path, &text).unwrap();
    let config = cloud_hub::Config::parse(&text).unwrap();
    config.validate().unwrap();
    (path, config)
}

/// One `cloud-hub serve` process; killed (SIGKILL) when dropped.
struct Replica {
    child: Child,
    base: String,
}

impl Replica {
    fn start(config: &Path, name: &str) -> Self {
        let log = std::fs::File::create(config.with_file_name(format!("{name}.log"))).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("replica {name} did not start; see {name}.log"));
        let base = line.strip_prefix("listening on ").unwrap().to_owned();
        Self { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One value of a query on the shared database.
async fn sql_i64(server: &PgServer, sql: &str) -> i64 {
    let (url, sql) = (server.url(), sql.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.query_one(sql.as_str(), &[]).unwrap().get(0)
    })
    .await
    .unwrap()
}

async fn post_batch(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    b: &shared_protocol::v1::Batch,
) -> reqwest::Result<BatchAck> {
    let resp = client
        .post(format!("{base}{INGEST_PATH}"))
        .bearer_auth(token)
        .header("content-type", CONTENT_TYPE_PROTOBUF)
        .body(b.encode_to_vec())
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .error_for_status()?;
    Ok(BatchAck::decode(resp.bytes().await?).unwrap())
}

async fn call(r: &Replica, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client()
        .request(method.parse().unwrap(), r.url(path))
        .bearer_auth(ADMIN);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The next `alert` event of an SSE stream, within `within`.
async fn next_event(resp: &mut reqwest::Response, buf: &mut String, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            if frame.lines().any(|l| l == "event: alert") {
                let data: String = frame
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                return serde_json::from_str(&data).unwrap();
            }
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, resp.chunk())
            .await
            .expect("an SSE event in time")
            .unwrap()
            .expect("stream open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

fn disconnected(seq: u64, t: i64) -> shared_protocol::v1::Batch {
    let mut b = batch(seq, DEVICE, vec![]);
    b.devices[0].technical.push(TechnicalReading {
        kind: TechnicalKind::Disconnected as i32,
        time_us: t,
        ..Default::default()
    });
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_raised_through_one_replica_is_streamed_by_the_other_and_stored_once() {
    let server = PgServer::start();
    let data = tempfile::tempdir().unwrap();
    let (path, config) = shared_config(data.path(), &server, "escalate_after_s = 2");
    let token = cloud_hub::gateway_add(&config, GATEWAY).unwrap();
    let a = Replica::start(&path, "a");
    let b = Replica::start(&path, "b");
    let http = client();

    let mut stream = http
        .get(b.url("/api/v1/alerts/stream"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut buf = String::new();

    // SpO2 90 % for 12 s: the condition's start stored through B, its
    // delay reached through A: both low-SpO2 alerts raised there.
    let t = now_us();
    post_batch(
        &http,
        &b.base,
        &token,
        &batch(1, DEVICE, vec![spo2(1, 90.0, t - 12 * S)]),
    )
    .await
    .unwrap();
    post_batch(
        &http,
        &a.base,
        &token,
        &batch(2, DEVICE, vec![spo2(2, 90.0, t)]),
    )
    .await
    .unwrap();
    let stored = Instant::now();
    let mut raised = vec![];
    for _ in 0..2 {
        let e = next_event(&mut stream, &mut buf, Duration::from_secs(1)).await;
        assert_eq!(e["transition"], "raised", "{e}");
        raised.push(e["alert"].clone());
    }
    assert!(
        stored.elapsed() < Duration::from_secs(1),
        "seen on B after {:?}",
        stored.elapsed()
    );
    let high = raised
        .iter()
        .find(|x| x["code"] == "spo2-low-high")
        .expect("spo2-low-high streamed by B");
    let high_id = high["id"].as_i64().unwrap();

    // The same device lost, reported in a batch to A and one to B: one
    // alert (B evaluates against what A stored).
    post_batch(&http, &a.base, &token, &disconnected(3, now_us()))
        .await
        .unwrap();
    let e = next_event(&mut stream, &mut buf, Duration::from_secs(1)).await;
    assert_eq!(
        (e["transition"].as_str(), e["alert"]["code"].as_str()),
        (Some("raised"), Some("device-disconnected")),
        "{e}"
    );
    post_batch(&http, &b.base, &token, &disconnected(4, now_us()))
        .await
        .unwrap();

    // Acknowledged on A, seen on B.
    let (status, body) = call(
        &a,
        "POST",
        &format!("/api/v1/alerts/{high_id}/acknowledge"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let acked = Instant::now();
    let e = next_event(&mut stream, &mut buf, Duration::from_secs(1)).await;
    assert_eq!(
        (e["transition"].as_str(), e["alert"]["id"].as_i64()),
        (Some("acknowledged"), Some(high_id)),
        "{e}"
    );
    assert!(acked.elapsed() < Duration::from_secs(1));
    // Acknowledging again through B: already acknowledged there too.
    let (status, _) = call(
        &b,
        "POST",
        &format!("/api/v1/alerts/{high_id}/acknowledge"),
        None,
    )
    .await;
    assert_eq!(status, 409);

    // Both replicas' clocks run; each unacknowledged alert escalates once.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let count = |sql: &'static str| sql_i64(&server, sql);
    assert_eq!(
        count("SELECT count(*) FROM alerts WHERE code = 'spo2-low-high'").await,
        1
    );
    assert_eq!(
        count("SELECT count(*) FROM alerts WHERE code = 'spo2-low-medium'").await,
        1
    );
    assert_eq!(
        count("SELECT count(*) FROM alerts WHERE code = 'device-disconnected'").await,
        1
    );
    assert_eq!(count("SELECT count(*) FROM alerts").await, 3);
    assert_eq!(
        count("SELECT count(*) FROM alert_events WHERE transition = 'raised'").await,
        3
    );
    // Escalated once each: the two still unacknowledged.
    assert_eq!(
        count(
            "SELECT count(*) FROM alert_events WHERE transition = 'escalated'
             GROUP BY alert_id HAVING count(*) > 1 UNION ALL SELECT 0 LIMIT 1"
        )
        .await,
        0
    );
    assert_eq!(
        count("SELECT count(DISTINCT alert_id) FROM alert_events WHERE transition = 'escalated'")
            .await,
        2
    );
    // B's stream showed both escalations.
    let mut escalated = vec![];
    while escalated.len() < 2 {
        let e = next_event(&mut stream, &mut buf, Duration::from_secs(2)).await;
        if e["transition"] == "escalated" {
            escalated.push(e["alert"]["id"].as_i64().unwrap());
        }
    }
    assert!(!escalated.contains(&high_id));

    // A patient's own limits set through A are in force on B after its
    // next evaluation (its clock ticks every 100 ms).
    let (status, body) = call(
        &a,
        "PUT",
        &format!("/api/v1/patients/{PATIENT}/alert-rules"),
        Some(json!([{ "id": "spo2-low-high", "limit": 85 }])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, rules) = call(
        &b,
        "GET",
        &format!("/api/v1/patients/{PATIENT}/alert-rules"),
        None,
    )
    .await;
    let high = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "spo2-low-high")
        .unwrap()
        .clone();
    assert_eq!(high["limit"], 85.0, "{rules}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockouts_and_sessions_hold_across_replicas_and_a_restart() {
    let server = PgServer::start();
    let data = tempfile::tempdir().unwrap();
    let (path, config) = shared_config(data.path(), &server, "");
    use cloud_hub::access::Role;
    cloud_hub::user_add(&config, "nurse", Role::Clinician, "correct horse battery").unwrap();
    cloud_hub::user_add(&config, "doctor", Role::Clinician, "staple battery horse").unwrap();
    let a = Replica::start(&path, "a");
    let mut b = Replica::start(&path, "b");
    let http = client();
    let login = async |r: &Replica, user: &str, pw: &str| {
        http.post(r.url("/api/v1/session"))
            .header("content-type", "application/json")
            .body(json!({ "username": user, "password": pw }).to_string())
            .send()
            .await
            .unwrap()
    };

    // A session created on A works on B.
    let resp = login(&a, "doctor", "staple battery horse").await;
    assert_eq!(resp.status(), 200);
    let cookie = resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let who = http
        .get(b.url("/api/v1/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(who.status(), 200);
    let me: Value = serde_json::from_str(&who.text().await.unwrap()).unwrap();
    assert_eq!(me["user"], "doctor");

    // Five wrong passwords, alternating replicas: locked out on both.
    for i in 0..5 {
        let r = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            login(r, "nurse", "wrong").await.status(),
            401,
            "attempt {i}"
        );
    }
    for r in [&a, &b] {
        let resp = login(r, "nurse", "correct horse battery").await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "300");
    }
    // And after restarting B.
    b.kill9();
    drop(b);
    let b = Replica::start(&path, "b2");
    assert_eq!(
        login(&b, "nurse", "correct horse battery").await.status(),
        429
    );
    // Others are not affected; the session still works on the new B.
    assert_eq!(
        login(&b, "doctor", "staple battery horse").await.status(),
        200
    );
    let who = http
        .get(b.url("/api/v1/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(who.status(), 200);
    // Random names store nothing per name.
    let before = sql_i64(&server, "SELECT count(*) FROM login_throttle").await;
    for i in 0..20 {
        login(&a, &format!("nobody-{i}"), "x").await;
    }
    assert_eq!(
        sql_i64(&server, "SELECT count(*) FROM login_throttle").await,
        before
    );
    assert_eq!(
        sql_i64(
            &server,
            "SELECT count(*) FROM login_throttle WHERE key LIKE '%nobody%'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_replica_during_ingest_loses_nothing_and_the_audit_chain_verifies() {
    let server = PgServer::start();
    let data = tempfile::tempdir().unwrap();
    let (path, config) = shared_config(data.path(), &server, "");
    let token = cloud_hub::gateway_add(&config, GATEWAY).unwrap();
    let mut a = Replica::start(&path, "a");
    let b = Replica::start(&path, "b");
    let http = client();

    // Audited reads on both replicas at once, while the client ingests.
    let readers: Vec<_> = [a.base.clone(), b.base.clone()]
        .into_iter()
        .map(|base| {
            let http = http.clone();
            tokio::spawn(async move {
                for _ in 0..40 {
                    let _ = http
                        .get(format!(
                            "{base}/fhir/Observation?patient={PATIENT}&_count=1"
                        ))
                        .bearer_auth(ADMIN)
                        .send()
                        .await;
                }
            })
        })
        .collect();

    // 60 batches of 20 readings; A is killed while the 21st is on its way.
    // A batch whose ack did not come is sent again, to B.
    const BATCHES: u64 = 60;
    const PER: u64 = 20;
    let t0 = now_us() - 3_600 * S;
    let mut on_b = false;
    let mut resent = 0;
    for seq in 1..=BATCHES {
        let readings = (0..PER)
            .map(|i| {
                let n = (seq - 1) * PER + i;
                spo2(n + 1, 97.0, t0 + n as i64 * S)
            })
            .collect();
        let bt = batch(seq, DEVICE, readings);
        let sent = if seq == 21 {
            let send = {
                let (http, base, token, bt) =
                    (http.clone(), a.base.clone(), token.clone(), bt.clone());
                tokio::spawn(async move { post_batch(&http, &base, &token, &bt).await })
            };
            tokio::time::sleep(Duration::from_millis(3)).await;
            a.kill9();
            on_b = true;
            send.await.unwrap()
        } else {
            post_batch(&http, if on_b { &b.base } else { &a.base }, &token, &bt).await
        };
        match sent {
            Ok(ack) => assert!(ack.accepted as u64 == PER && !ack.duplicate_batch),
            Err(_) => {
                // No ack: fail over and send it again (a duplicate when
                // A stored it before dying).
                resent += 1;
                let ack = post_batch(&http, &b.base, &token, &bt).await.unwrap();
                assert!(ack.accepted as u64 == PER || ack.duplicate_batch);
            }
        }
    }
    assert!(on_b);
    eprintln!("batches re-sent after the kill: {resent}");
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(
        sql_i64(&server, "SELECT count(*) FROM observations").await,
        (BATCHES * PER) as i64
    );
    // Both replicas' batches, the killed one's included, are in the
    // search totals once each.
    assert_eq!(
        sql_i64(&server, "SELECT sum(n)::bigint FROM observation_hours").await,
        (BATCHES * PER) as i64
    );
    let url = server.url();
    tokio::task::spawn_blocking(move || {
        crate::storage_suite::postgres_search_totals_are_exact(&url)
    })
    .await
    .unwrap();
    drop(b);

    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .args(["audit", "verify"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Keyed by both replicas (each its own `hub start` and checkpoints).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keyed (HMAC-SHA256) throughout"), "{err}");
    assert!(
        sql_i64(&server, "SELECT count(*) FROM audit_log").await >= 40,
        "the concurrent reads were audited"
    );
}

/// Erasure through one replica holds on the other: the patient is gone
/// through both, and a late batch sent to the other replica is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_erased_through_one_replica_stays_erased_through_the_other() {
    let server = PgServer::start();
    let data = tempfile::tempdir().unwrap();
    let (path, config) = shared_config(data.path(), &server, "");
    let token = cloud_hub::gateway_add(&config, GATEWAY).unwrap();
    let a = Replica::start(&path, "a");
    let b = Replica::start(&path, "b");
    let http = client();
    let t = now_us();
    let ack = post_batch(
        &http,
        &a.base,
        &token,
        &batch(
            1,
            DEVICE,
            vec![spo2(1, 97.0, t - 60 * S), spo2(2, 96.0, t - 30 * S)],
        ),
    )
    .await
    .unwrap();
    assert_eq!(ack.accepted, 2);
    let (status, body) = call(
        &b,
        "POST",
        &format!("/api/v1/patients/{PATIENT}/erase"),
        Some(json!({ "reason": "request 12" })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["removed"]["observations"], 2);
    // A late reading from inside the erased span, through the other replica.
    let late = post_batch(
        &http,
        &a.base,
        &token,
        &batch(2, DEVICE, vec![spo2(3, 95.0, t - 45 * S)]),
    )
    .await
    .unwrap();
    assert_eq!((late.accepted, late.rejected), (0, 0));
    for r in [&a, &b] {
        let (status, bundle) = call(
            r,
            "GET",
            &format!("/fhir/Observation?patient={PATIENT}"),
            None,
        )
        .await;
        assert_eq!(
            (status, bundle["total"].as_u64()),
            (200, Some(0)),
            "{bundle}"
        );
        let (status, _) = call(
            r,
            "GET",
            &format!("/api/v1/patients/{PATIENT}/$everything"),
            None,
        )
        .await;
        assert_eq!(status, 404);
    }
    assert_eq!(
        sql_i64(&server, "SELECT COUNT(*) FROM observations").await,
        0
    );
    assert_eq!(sql_i64(&server, "SELECT COUNT(*) FROM erasures").await, 1);
}
