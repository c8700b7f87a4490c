//! Device Provisioning Service registration over MQTT with a group
//! enrollment's symmetric key, against a throwaway Mosquitto: the test plays
//! DPS (an MQTT client answering the `$dps/registrations/...` topics: 202
//! with `retry-after` and an operationId, one more 202 while "assigning",
//! then 200 "assigned") and then the assigned "hub" (same broker), where the
//! buffered readings must arrive. The broker's password file holds the DPS
//! and IoT Hub tokens computed from the derived device key, so the agent gets
//! in only with exactly the right key derivation and tokens.

mod iothub_common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use device_drivers::DriverOutput;
use edge_agent::buffer::Buffer;
use edge_agent::config::AgentConfig;
use edge_agent::iothub::{self, IotHubUplink, dps};
use edge_agent::uplink::AnyUplink;
use iothub_common::*;
use prost::Message;
use rumqttc::QoS;
use serde_json::{Value, json};
use shared_protocol::v1::{Batch, Reading, reading};
use tokio::sync::watch;
use tokio::time::Instant;

const SCOPE: &str = "0ne00TEST01";
const REG: &str = "vigil-gw-7";
const REG_DISABLED: &str = "vigil-gw-off";
const REG_401: &str = "vigil-gw-401";
const ASSIGNED_DEVICE: &str = "assigned-dev";
const GROUP_KEY: &[u8] = b"group-enrollment-primary-key-64!";
const CLOCK: u64 = 3_200_000_000;
const TTL: u64 = 3600;
const N: u64 = 40;

fn fixed_clock() -> u64 {
    CLOCK
}

fn device_key(reg: &str) -> Vec<u8> {
    dps::derive_device_key(GROUP_KEY, reg)
}

/// What the fake DPS saw.
#[derive(Default)]
struct DpsLog {
    registers: AtomicU32,
    polls: AtomicU32,
    /// When the last 202 was sent and when the next poll came.
    gaps: Mutex<Vec<Duration>>,
}

async fn preload(cfg: &AgentConfig, base: u64) {
    let keys = edge_agent::secrets::load_keyring(&cfg.key_path()).unwrap();
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    let buffer = Buffer::open_with(&cfg.data_dir, &keys, cfg.buffer.limits()).unwrap();
    let outputs: Vec<DriverOutput> = (0..N)
        .map(|i| DriverOutput {
            device_id: "spo2-1".into(),
            readings: vec![Reading {
                mdc_code: 150456,
                value: Some(reading::Value::Numeric(90.0 + ((base + i) % 10) as f64)),
                ucum_unit: "%".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    buffer.append(outputs).await.unwrap();
}

/// Wait until the N readings of one run arrived at the assigned hub.
async fn receive(events: &mut tokio::sync::mpsc::UnboundedReceiver<Msg>) -> BTreeSet<u64> {
    let mut seqs = BTreeSet::new();
    let mut other = Vec::new();
    while seqs.len() < N as usize {
        let m = wait_for(
            events,
            60,
            "events at the assigned hub",
            |m| m.topic.starts_with("devices/"),
            &mut other,
        )
        .await;
        assert_eq!(
            m.topic,
            format!(
                "devices/{ASSIGNED_DEVICE}/messages/events/$.ct=application%2Fx-protobuf&$.ce=identity"
            )
        );
        let b = Batch::decode(m.payload.as_ref()).unwrap();
        assert_eq!(b.gateway_id, "gw-dps");
        for dd in &b.devices {
            for r in &dd.readings {
                seqs.insert(r.sequence);
            }
        }
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_group_enrollment_registration_then_delivery_to_the_assigned_hub() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("edge_agent=info")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d);
    write_private(&d.join("group.key"), BASE64.encode(GROUP_KEY).as_bytes());

    // Users: each registration's DPS identity (token with skn=registration
    // from the derived key), the assigned device at the "hub", the DPS
    // service, and a reader of the hub's events.
    let mut users = Vec::new();
    let mut acl = String::new();
    for reg in [REG, REG_DISABLED, REG_401] {
        let u = dps::username(SCOPE, reg);
        let t = iothub::sas_token(
            &dps::resource_uri(SCOPE, reg),
            &device_key(reg),
            CLOCK + 3600,
            Some("registration"),
        );
        acl.push_str(&format!(
            "user {u}\ntopic read $dps/registrations/res/#\ntopic write $dps/registrations/PUT/#\n\
             topic write $dps/registrations/GET/#\n\n"
        ));
        users.push((u, t));
    }
    let hub_user = iothub::username(HOST, ASSIGNED_DEVICE);
    let hub_token = iothub::sas_token(
        &iothub::resource_uri(HOST, ASSIGNED_DEVICE),
        &device_key(REG),
        CLOCK + TTL,
        None,
    );
    acl.push_str(&format!(
        "user {hub_user}\ntopic write devices/{ASSIGNED_DEVICE}/messages/events/#\ntopic write $iothub/#\n\
         topic read $iothub/#\n\nuser dps\ntopic read $dps/registrations/PUT/#\n\
         topic read $dps/registrations/GET/#\ntopic write $dps/registrations/res/#\n\n\
         user cloud\ntopic read devices/#\n"
    ));
    users.push((hub_user, hub_token));
    users.push(("dps".into(), "dps-pw".into()));
    users.push(("cloud".into(), "cloud-pw".into()));
    let broker = Broker::start(d, &users, &acl);
    let ca = d.join("ca.pem");

    // The DPS responder.
    let (dps_client, mut dps_rx, dps_task) = cloud_client(
        broker.port,
        &ca,
        "dps",
        "dps-pw",
        &["$dps/registrations/PUT/#", "$dps/registrations/GET/#"],
    );
    let log = Arc::new(DpsLog::default());
    let responder = {
        let log = log.clone();
        tokio::spawn(async move {
            // Per operation: how many polls it has seen; when the last 202 went.
            let mut polls: std::collections::HashMap<String, u32> = Default::default();
            let mut last_202 = Instant::now();
            while let Some(m) = dps_rx.recv().await {
                let rid = m
                    .topic
                    .split("$rid=")
                    .nth(1)
                    .unwrap()
                    .split('&')
                    .next()
                    .unwrap()
                    .to_string();
                let (status, retry, body) = if m
                    .topic
                    .starts_with("$dps/registrations/PUT/iotdps-register/")
                {
                    log.registers.fetch_add(1, Ordering::SeqCst);
                    let v: Value = serde_json::from_slice(&m.payload).unwrap();
                    let reg = v["registrationId"].as_str().unwrap().to_string();
                    if reg == REG_401 {
                        (
                            401,
                            None,
                            json!({"errorCode": 401002, "message": "unauthorized"}),
                        )
                    } else {
                        (
                            202,
                            Some(1),
                            json!({"operationId": format!("4.{reg}"), "status": "assigning"}),
                        )
                    }
                } else {
                    log.polls.fetch_add(1, Ordering::SeqCst);
                    log.gaps.lock().unwrap().push(last_202.elapsed());
                    let op = m.topic.split("operationId=").nth(1).unwrap().to_string();
                    let reg = op.trim_start_matches("4.").to_string();
                    let n = polls.entry(op.clone()).or_default();
                    *n += 1;
                    if *n == 1 {
                        (
                            202,
                            Some(1),
                            json!({"operationId": op, "status": "assigning"}),
                        )
                    } else if reg == REG_DISABLED {
                        (
                            200,
                            None,
                            json!({"operationId": op, "status": "disabled",
                                   "registrationState": {"registrationId": reg, "status": "disabled",
                                                         "errorCode": 400209, "errorMessage": "enrollment disabled"}}),
                        )
                    } else {
                        (
                            200,
                            None,
                            json!({"operationId": op, "status": "assigned",
                                   "registrationState": {"registrationId": reg, "assignedHub": HOST,
                                                         "deviceId": ASSIGNED_DEVICE, "status": "assigned"}}),
                        )
                    }
                };
                if status == 202 {
                    last_202 = Instant::now();
                }
                let topic = match retry {
                    Some(s) => {
                        format!("$dps/registrations/res/{status}/?$rid={rid}&retry-after={s}")
                    }
                    None => format!("$dps/registrations/res/{status}/?$rid={rid}"),
                };
                dps_client
                    .publish(topic, QoS::AtLeastOnce, false, body.to_string())
                    .await
                    .unwrap();
            }
        })
    };
    let (_cloud, mut events, cloud_task) = cloud_client(
        broker.port,
        &ca,
        "cloud",
        "cloud-pw",
        &[&format!("devices/{ASSIGNED_DEVICE}/messages/events/#")],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The agent: no hub, no device id, only DPS.
    std::fs::write(
        d.join("agent.toml"),
        format!(
            "gateway_id = \"gw-dps\"\ndata_dir = \"data\"\n[uplink]\nkind = \"iothub-mqtt\"\n\
             batch_max_readings = 15\nbatch_max_wait_ms = 100\nrequest_timeout_ms = 3000\nmax_backoff_ms = 500\n\
             [uplink.iothub]\nport = {port}\nca_file = \"ca.pem\"\n\
             [uplink.iothub.dps]\nid_scope = \"{SCOPE}\"\nregistration_id = \"{REG}\"\nkey_file = \"group.key\"\n\
             group_key = true\nglobal_endpoint = \"{HOST}\"\nport = {port}\n",
            port = broker.port
        ),
    )
    .unwrap();
    let cfg = AgentConfig::load(&d.join("agent.toml")).unwrap();
    let h = cfg.uplink.iothub.clone().unwrap();

    let run = |cfg: AgentConfig| {
        let up = IotHubUplink::with_dps(&h, &cfg.data_dir, cfg.uplink.request_timeout())
            .unwrap()
            .with_clock(fixed_clock);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(edge_agent::run_with_uplink(
            cfg,
            AnyUplink::IotHub(Box::new(up)),
            rx,
        ));
        (stop, task)
    };

    // 1. First start: registration (202 + retry-after, 202, 200 assigned),
    //    then every buffered reading reaches the assigned hub.
    preload(&cfg, 0).await;
    let (stop, task) = run(cfg.clone());
    let first = receive(&mut events).await;
    assert_eq!(first.len(), N as usize);
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(log.registers.load(Ordering::SeqCst), 1);
    assert_eq!(log.polls.load(Ordering::SeqCst), 2);
    // Each poll waited for the retry-after (1 s) of the 202 before it.
    for g in log.gaps.lock().unwrap().iter() {
        assert!(*g >= Duration::from_millis(900), "polled after {g:?}");
    }
    let cached: Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("data").join(dps::CACHE_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(cached["assignedHub"], HOST);
    assert_eq!(cached["deviceId"], ASSIGNED_DEVICE);

    // 2. Restart: the cached assignment is used, DPS is not asked again.
    preload(&cfg, N).await;
    let (stop, task) = run(cfg.clone());
    let second = receive(&mut events).await;
    assert_eq!(second.len(), N as usize);
    assert!(second.first() > first.last(), "new readings after the old");
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        log.registers.load(Ordering::SeqCst),
        1,
        "no re-registration"
    );

    // 3. A stale cached assignment (the device was moved: the hub refuses
    //    it): after a few refusals the agent registers again and delivers.
    std::fs::write(
        d.join("data").join(dps::CACHE_FILE),
        json!({"idScope": SCOPE, "registrationId": REG, "globalEndpoint": HOST,
               "assignedHub": HOST, "deviceId": "moved-away"})
        .to_string(),
    )
    .unwrap();
    preload(&cfg, 2 * N).await;
    let (stop, task) = run(cfg.clone());
    let third = receive(&mut events).await;
    assert_eq!(third.len(), N as usize);
    assert!(third.first() > second.last());
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(log.registers.load(Ordering::SeqCst), 2, "registered again");
    let cached: Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("data").join(dps::CACHE_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(cached["deviceId"], ASSIGNED_DEVICE);

    // 4. Errors are reported clearly.
    let setup = |reg: &str, key: Vec<u8>| dps::DpsSetup {
        id_scope: SCOPE.into(),
        registration_id: reg.into(),
        global_endpoint: HOST.into(),
        port: broker.port,
        device_key: key,
        tls: Arc::new(edge_agent::uplink::tls_config(Some(&ca)).unwrap()),
        timeout: Duration::from_secs(3),
        data_dir: d.join("unused"),
    };
    // The group key used as if it were the device key: CONNACK refused.
    let e = dps::register(&setup(REG, GROUP_KEY.to_vec()), fixed_clock)
        .await
        .unwrap_err();
    assert!(matches!(e, dps::DpsError::Refused(_)), "{e}");
    let e = dps::register(&setup(REG_DISABLED, device_key(REG_DISABLED)), fixed_clock)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, dps::DpsError::Failed { status, .. } if status == "disabled"),
        "{e}"
    );
    assert!(e.to_string().contains("enrollment disabled"), "{e}");
    let e = dps::register(&setup(REG_401, device_key(REG_401)), fixed_clock)
        .await
        .unwrap_err();
    assert!(
        matches!(e, dps::DpsError::Rejected { status: 401, .. }),
        "{e}"
    );

    responder.abort();
    dps_task.abort();
    cloud_task.abort();
    drop(broker);
}

/// libfaketime's thread-safe build (Debian package `faketime`).
fn libfaketime() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .expect(
            "libfaketimeMT.so.1 not found: needs the Debian package `faketime` (scripts/setup.sh)",
        )
}

/// The wall clock `edge-agent check` runs on (libfaketime, frozen; the
/// monotonic clock is left alone), so that the broker's password file can
/// hold the exact SAS tokens the binary computes.
const FROZEN: &str = "2030-01-01 00:00:00";
const FROZEN_S: u64 = 1_893_456_000;

/// Run the real `edge-agent check` binary; (exit ok, the uplink's line).
fn check_bin(config: &std::path::Path, subject: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", FROZEN)
        .env("TZ", "UTC")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .output()
        .expect("run edge-agent check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout
        .lines()
        .find(|l| l.get(5..39).map(str::trim) == Some(subject.trim()))
        .unwrap_or_else(|| {
            panic!(
                "no {subject} line in:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string();
    (out.status.success(), line)
}

/// `edge-agent check` authenticates to IoT Hub and DPS (a Mosquitto with a
/// password file standing in for both): the right device key passes; a
/// wrong key, a device id the hub does not know, an untrusted server
/// certificate and a wrong DPS key each FAIL with the reason and exit 1.
#[test]
fn check_authenticates_to_iot_hub_and_dps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d);
    let other = d.join("other-ca");
    std::fs::create_dir_all(&other).unwrap();
    make_ca(&other);
    let key = b"vigil-check-device-key-32-bytes!";
    let dps_key = b"vigil-check-dps-key-32-bytes!!!!";
    write_private(&d.join("dev.key"), BASE64.encode(key).as_bytes());
    write_private(&d.join("dps.key"), BASE64.encode(dps_key).as_bytes());
    write_private(
        &d.join("wrong.key"),
        BASE64.encode(b"not the device key").as_bytes(),
    );
    let exp = FROZEN_S + TTL;
    let users = vec![
        (
            iothub::username(HOST, "dev-ok"),
            iothub::sas_token(&iothub::resource_uri(HOST, "dev-ok"), key, exp, None),
        ),
        (
            dps::username(SCOPE, "reg-ok"),
            iothub::sas_token(
                &dps::resource_uri(SCOPE, "reg-ok"),
                dps_key,
                exp,
                Some("registration"),
            ),
        ),
    ];
    let broker = Broker::start(d, &users, "");
    let hub = |name: &str, device: &str, keyf: &str, ca: &str| {
        let p = d.join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "gateway_id = \"gw\"\ndata_dir = \"data\"\n[uplink]\nkind = \"iothub-mqtt\"\nrequest_timeout_ms = 3000\n\
                 [uplink.iothub]\nhost = \"{HOST}\"\ndevice_id = \"{device}\"\nport = {port}\nsas_key_file = \"{keyf}\"\n\
                 ca_file = \"{ca}\"\nsas_ttl_s = {TTL}\n",
                port = broker.port
            ),
        )
        .unwrap();
        p
    };
    let dps_cfg = |name: &str, keyf: &str| {
        let p = d.join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "gateway_id = \"gw\"\ndata_dir = \"data\"\n[uplink]\nkind = \"iothub-mqtt\"\nrequest_timeout_ms = 3000\n\
                 [uplink.iothub]\nport = {port}\nca_file = \"ca.pem\"\n\
                 [uplink.iothub.dps]\nid_scope = \"{SCOPE}\"\nregistration_id = \"reg-ok\"\nkey_file = \"{keyf}\"\n\
                 global_endpoint = \"{HOST}\"\nport = {port}\n",
                port = broker.port
            ),
        )
        .unwrap();
        p
    };

    let (ok, line) = check_bin(&hub("good", "dev-ok", "dev.key", "ca.pem"), "IoT Hub ");
    assert!(
        ok && line.starts_with("OK") && line.contains("CONNACK"),
        "{line}"
    );
    let (ok, line) = check_bin(
        &hub("wrong-key", "dev-ok", "wrong.key", "ca.pem"),
        "IoT Hub ",
    );
    assert!(
        !ok && line.starts_with("FAIL") && line.contains("refused"),
        "{line}"
    );
    let (ok, line) = check_bin(
        &hub("wrong-id", "dev-nope", "dev.key", "ca.pem"),
        "IoT Hub ",
    );
    assert!(
        !ok && line.starts_with("FAIL") && line.contains("refused"),
        "{line}"
    );
    let (ok, line) = check_bin(
        &hub("untrusted", "dev-ok", "dev.key", "other-ca/ca.pem"),
        "IoT Hub ",
    );
    assert!(
        !ok && line.starts_with("FAIL") && line.to_lowercase().contains("certificate"),
        "{line}"
    );
    let (ok, line) = check_bin(&dps_cfg("dps-good", "dps.key"), "DPS ");
    assert!(
        ok && line.starts_with("OK") && line.contains("reg-ok"),
        "{line}"
    );
    let (ok, line) = check_bin(&dps_cfg("dps-wrong", "wrong.key"), "DPS ");
    assert!(
        !ok && line.starts_with("FAIL") && line.contains("refused"),
        "{line}"
    );
}
