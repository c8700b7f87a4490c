//! IoT Edge module mode: the identity comes from the `IOTEDGE_*`
//! environment, the SAS token's signature from the workload API (here an
//! axum server on a unix socket in a temp dir that signs with a known module
//! key and serves the test CA as trust bundle), and the batches go to
//! "edgeHub" (a throwaway Mosquitto whose password file holds the token
//! computed independently from the same key: the broker accepts the agent
//! only if the workload-signed token is exactly right).

mod iothub_common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use device_drivers::DriverOutput;
use edge_agent::buffer::Buffer;
use edge_agent::config::AgentConfig;
use edge_agent::iothub::{self, IotHubUplink, edge};
use edge_agent::uplink::AnyUplink;
use iothub_common::*;
use prost::Message;
use rumqttc::QoS;
use serde_json::{Value, json};
use shared_protocol::v1::{Batch, Reading, reading};
use tokio::sync::watch;

const HUB: &str = "myhub.azure-devices.net";
const DEVICE: &str = "edge-1";
const MODULE: &str = "vigil";
const GENID: &str = "637933928617587066";
const API: &str = "2019-01-30";
const MODULE_KEY: &[u8] = b"module-primary-key-known-to-test";
const CLOCK: u64 = 3_100_000_000;
const TTL: u64 = 3600;
const N: u64 = 60;

fn fixed_clock() -> u64 {
    CLOCK
}

#[derive(Clone, Default)]
struct Workload {
    /// What the agent asked to have signed (decoded).
    signed: Arc<Mutex<Vec<String>>>,
    ca_pem: String,
}

async fn sign(
    State(w): State<Workload>,
    UrlPath((name, genid)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if name != MODULE || genid != GENID || q.get("api-version").map(String::as_str) != Some(API) {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "unknown module or generation"})),
        );
    }
    if body["keyId"] != "primary" || body["algo"] != "HMACSHA256" {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"message": "bad key id or algorithm"})),
        );
    }
    let Some(data) = body["data"]
        .as_str()
        .and_then(|d| BASE64.decode(d).ok())
        .and_then(|d| String::from_utf8(d).ok())
    else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"message": "data is not base64"})),
        );
    };
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, MODULE_KEY);
    let digest = BASE64.encode(ring::hmac::sign(&k, data.as_bytes()).as_ref());
    w.signed.lock().unwrap().push(data);
    (StatusCode::OK, Json(json!({ "digest": digest })))
}

async fn trust_bundle(
    State(w): State<Workload>,
    Query(q): Query<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    if q.get("api-version").map(String::as_str) != Some(API) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"message": "api-version"})),
        );
    }
    (StatusCode::OK, Json(json!({ "certificate": w.ca_pem })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_authenticates_through_the_workload_api_and_publishes_to_edgehub() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("edge_agent=info")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d);

    // The workload API on a unix socket.
    let sock = d.join("workload.sock");
    let wl = Workload {
        signed: Arc::default(),
        ca_pem: std::fs::read_to_string(d.join("ca.pem")).unwrap(),
    };
    let app = axum::Router::new()
        .route("/modules/{name}/genid/{genid}/sign", post(sign))
        .route("/trust-bundle", get(trust_bundle))
        .with_state(wl.clone());
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });

    // edgeHub: the module's user name and the token from the module key.
    let id = iothub::Identity {
        hub: HUB.into(),
        connect_host: HOST.into(),
        port: 0,
        device_id: DEVICE.into(),
        module_id: Some(MODULE.into()),
    };
    let expected_token = iothub::sas_token(&id.resource_uri(), MODULE_KEY, CLOCK + TTL, None);
    let user = format!("{HUB}/{DEVICE}/{MODULE}/?api-version=2021-04-12");
    let acl = format!(
        "user {user}\ntopic write devices/{DEVICE}/modules/{MODULE}/messages/events/#\n\
         topic write $iothub/twin/PATCH/#\ntopic read $iothub/twin/res/#\ntopic read $iothub/methods/POST/#\n\
         topic write $iothub/methods/res/#\n\nuser cloud\ntopic read devices/#\ntopic readwrite $iothub/#\n"
    );
    let broker = Broker::start(
        d,
        &[
            (user.clone(), expected_token.clone()),
            ("cloud".into(), "cloud-pw".into()),
        ],
        &acl,
    );
    let (cloud, mut rx, cloud_task) = cloud_client(
        broker.port,
        &d.join("ca.pem"),
        "cloud",
        "cloud-pw",
        &["devices/#", "$iothub/twin/PATCH/#"],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The module environment, as the IoT Edge runtime sets it. No
    // [uplink.iothub] table: the identity is the module's.
    let vars: HashMap<&str, String> = HashMap::from([
        (edge::IOTHUBHOSTNAME, HUB.to_string()),
        (edge::DEVICEID, DEVICE.to_string()),
        (edge::MODULEID, MODULE.to_string()),
        (edge::GATEWAYHOSTNAME, HOST.to_string()),
        (edge::WORKLOADURI, format!("unix://{}", sock.display())),
        (edge::APIVERSION, API.to_string()),
        (edge::MODULEGENERATIONID, GENID.to_string()),
        (edge::AUTHSCHEME, "sasToken".to_string()),
    ]);
    std::fs::write(
        d.join("agent.toml"),
        "gateway_id = \"gw-edge\"\ndata_dir = \"data\"\n[uplink]\nkind = \"iothub-mqtt\"\n\
         batch_max_readings = 25\nbatch_max_wait_ms = 100\nrequest_timeout_ms = 3000\nmax_backoff_ms = 500\n",
    )
    .unwrap();
    let cfg = AgentConfig::load_with(&d.join("agent.toml"), |k| vars.get(k).cloned()).unwrap();
    // Without the module environment the same file is refused, naming the table.
    let err = AgentConfig::load_with(&d.join("agent.toml"), |_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("uplink.iothub"), "{err}");
    let mut env = cfg.uplink.iot_edge().unwrap().expect("module mode");
    env.port = broker.port;

    // Readings waiting in the buffer.
    let keys = edge_agent::secrets::load_keyring(&cfg.key_path()).unwrap();
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    {
        let buffer = Buffer::open_with(&cfg.data_dir, &keys, cfg.buffer.limits()).unwrap();
        let outputs: Vec<DriverOutput> = (0..N)
            .map(|i| DriverOutput {
                device_id: "spo2-1".into(),
                readings: vec![Reading {
                    mdc_code: 150456,
                    value: Some(reading::Value::Numeric(90.0 + (i % 10) as f64)),
                    ucum_unit: "%".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        buffer.append(outputs).await.unwrap();
    }

    let up = IotHubUplink::from_iot_edge(&env, None, cfg.uplink.request_timeout())
        .await
        .unwrap()
        .with_clock(fixed_clock);
    assert_eq!(
        up.identity().expect("known").client_id(),
        format!("{DEVICE}/{MODULE}")
    );
    let (stop, stop_rx) = watch::channel(false);
    let agent = tokio::spawn(edge_agent::run_with_uplink(
        cfg.clone(),
        AnyUplink::IotHub(Box::new(up)),
        stop_rx,
    ));

    let mut seqs = std::collections::BTreeSet::new();
    let mut twin_uplink = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seqs.len() < N as usize || twin_uplink.is_none() {
        let m = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out with {} readings; broker log:\n{}",
                    seqs.len(),
                    broker.log()
                )
            })
            .unwrap();
        if m.topic.starts_with("$iothub/twin/PATCH/") {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            twin_uplink = v["uplink"].as_str().map(str::to_string);
            let rid = m.topic.split("$rid=").nth(1).unwrap().to_string();
            cloud
                .publish(
                    format!("$iothub/twin/res/204/?$rid={rid}&$version=2"),
                    QoS::AtMostOnce,
                    false,
                    "",
                )
                .await
                .unwrap();
            continue;
        }
        assert_eq!(
            m.topic,
            format!(
                "devices/{DEVICE}/modules/{MODULE}/messages/events/$.ct=application%2Fx-protobuf&$.ce=identity"
            )
        );
        let b = Batch::decode(m.payload.as_ref()).unwrap();
        assert_eq!(b.gateway_id, "gw-edge");
        for dd in &b.devices {
            for r in &dd.readings {
                seqs.insert(r.sequence);
            }
        }
    }
    assert_eq!(twin_uplink.as_deref(), Some("iotedge-module"));
    // The workload API signed exactly `urlencode(resource) + "\n" + expiry`.
    let signed = wl.signed.lock().unwrap().clone();
    assert!(!signed.is_empty());
    assert_eq!(
        signed[0],
        format!(
            "{}\n{}",
            iothub::url_encode(&format!("{HUB}/devices/{DEVICE}/modules/{MODULE}")),
            CLOCK + TTL
        )
    );
    stop.send(true).unwrap();
    agent.await.unwrap().unwrap();

    // `edge-agent check` in module mode: identity, workload API, edgeHub.
    let findings = edge::check(&env).await;
    assert_eq!(findings.len(), 3, "{findings:?}");
    assert!(findings.iter().all(|f| f.1), "{findings:?}");
    assert!(findings.iter().any(|f| f.0 == "edgeHub"), "{findings:?}");

    // A workload API that is not there: a clear error, no panic.
    let mut gone = env.clone();
    gone.workload_uri = format!("unix://{}", d.join("missing.sock").display());
    let err = IotHubUplink::from_iot_edge(&gone, None, Duration::from_secs(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("workload API") && err.contains("missing.sock"),
        "{err}"
    );
    let findings = edge::check(&gone).await;
    let wl = findings
        .iter()
        .find(|f| f.0 == "IoT Edge workload API")
        .unwrap();
    assert!(!wl.1 && wl.2.contains("missing.sock"), "{findings:?}");

    cloud_task.abort();
    server.abort();
    drop(broker);
}
