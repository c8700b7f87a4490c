//! Device twin reported properties and the `flush` direct method, against
//! a throwaway Mosquitto set up like IoT Hub. The test plays IoT Hub's
//! service side with its own MQTT client: it reads the device's twin
//! patches and answers them (`$iothub/twin/res/{status}/?$rid=..&$version=..`),
//! invokes direct methods (`$iothub/methods/POST/{name}/?$rid=..`) and reads
//! the answers and the device-to-cloud events. A Masimo oximeter is played
//! over a socat PTY pair.

mod iothub_common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use edge_agent::config::AgentConfig;
use edge_agent::iothub::{self, IotHubUplink};
use edge_agent::uplink::AnyUplink;
use iothub_common::*;
use prost::Message;
use rumqttc::QoS;
use serde_json::Value;
use shared_protocol::v1::Batch;
use tokio::sync::watch;

const DEVICE: &str = "dev-1";
const CLOCK: u64 = 3_000_000_000;
const TTL: u64 = 3600;

fn fixed_clock() -> u64 {
    CLOCK
}

fn twin_rid(topic: &str) -> String {
    topic
        .split("$rid=")
        .nth(1)
        .expect("patch topic carries $rid")
        .split('&')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_reports_and_flush_method_against_mosquitto() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("edge_agent=info")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d);
    let key = b"vigil-test-device-key-32-bytes!!";
    write_private(&d.join("sas.key"), BASE64.encode(key).as_bytes());

    // The device may publish events, twin patches and method answers, and
    // read twin answers and method calls; the "cloud" user the reverse.
    let user = iothub::username(HOST, DEVICE);
    let token = iothub::sas_token(&iothub::resource_uri(HOST, DEVICE), key, CLOCK + TTL, None);
    let acl = format!(
        "user {user}\ntopic write devices/{DEVICE}/messages/events/#\ntopic write $iothub/twin/PATCH/#\n\
         topic read $iothub/twin/res/#\ntopic read $iothub/methods/POST/#\ntopic write $iothub/methods/res/#\n\n\
         user cloud\ntopic read devices/#\ntopic readwrite $iothub/#\n"
    );
    let broker = Broker::start(
        d,
        &[(user.clone(), token), ("cloud".into(), "cloud-pw".into())],
        &acl,
    );
    let (cloud, mut rx, cloud_task) = cloud_client(
        broker.port,
        &d.join("ca.pem"),
        "cloud",
        "cloud-pw",
        &[
            "$iothub/twin/PATCH/#",
            "$iothub/methods/res/#",
            &format!("devices/{DEVICE}/messages/events/#"),
        ],
    );
    // Let the cloud client subscribe before the device connects.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pty = Pty::new(d);
    // Batches wait 10 minutes: without `flush`, nothing is sent.
    let text = format!(
        r#"
gateway_id = "gw-twin"
data_dir = "data"
[uplink]
kind = "iothub-mqtt"
batch_max_readings = 5000
batch_min_interval_ms = 600000
batch_max_wait_ms = 600000
request_timeout_ms = 3000
max_backoff_ms = 500
[uplink.iothub]
host = "{HOST}"
device_id = "{DEVICE}"
port = {port}
sas_key_file = "sas.key"
ca_file = "ca.pem"
twin_min_interval_ms = 300
twin_refresh_s = 1
[[device]]
kind = "masimo-serial"
id = "spo2.bed-7"
port = "{tty}"
silence_timeout_ms = 1500
"#,
        port = broker.port,
        tty = pty.agent.display()
    );
    std::fs::write(d.join("agent.toml"), text).unwrap();
    let cfg = AgentConfig::load(&d.join("agent.toml")).unwrap();
    let up = IotHubUplink::new(
        cfg.uplink.iothub.as_ref().unwrap(),
        cfg.uplink.request_timeout(),
    )
    .unwrap()
    .with_clock(fixed_clock);
    let stats = up.stats();
    let (stop, stop_rx) = watch::channel(false);
    let agent = tokio::spawn(edge_agent::run_with_uplink(
        cfg,
        AnyUplink::IotHub(Box::new(up)),
        stop_rx,
    ));

    let mut other = Vec::new();
    // 1. On connect: the full report, before any device data. The first
    //    patch is refused (400): counted, and sent again.
    let first = wait_for(
        &mut rx,
        20,
        "the first twin patch",
        |m| {
            m.topic
                .starts_with("$iothub/twin/PATCH/properties/reported/?$rid=")
        },
        &mut other,
    )
    .await;
    let v: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(v["agentVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["uplink"], "iothub-mqtt");
    // `.` is not allowed in twin property names.
    let dev = &v["devices"]["spo2_bed-7"];
    assert_eq!(dev["id"], "spo2.bed-7");
    assert_eq!(dev["kind"], "masimo-serial");
    assert!(dev["readings"].is_u64(), "{v}");
    for k in ["records", "items", "oldestAgeSeconds"] {
        assert!(v["buffer"][k].is_u64(), "buffer.{k}: {v}");
    }
    cloud
        .publish(
            format!("$iothub/twin/res/400/?$rid={}", twin_rid(&first.topic)),
            QoS::AtMostOnce,
            false,
            "{}",
        )
        .await
        .unwrap();

    // 2. The oximeter starts: the twin follows its state and counts.
    let mut sim = std::fs::OpenOptions::new()
        .write(true)
        .open(&pty.sim)
        .unwrap();
    let lines = 8u32;
    for i in 0..lines {
        sim.write_all(masimo_line(i).as_bytes()).unwrap();
        sim.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut version = 1;
    let connected = loop {
        let m = wait_for(
            &mut rx,
            20,
            "a twin patch with the device connected and all readings",
            |m| m.topic.starts_with("$iothub/twin/PATCH/"),
            &mut other,
        )
        .await;
        version += 1;
        cloud
            .publish(
                format!(
                    "$iothub/twin/res/204/?$rid={}&$version={version}",
                    twin_rid(&m.topic)
                ),
                QoS::AtMostOnce,
                false,
                "",
            )
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        let dev = &v["devices"]["spo2_bed-7"];
        if dev["state"] == "connected" && dev["readings"] == u64::from(lines) * 3 {
            break v;
        }
    };
    assert!(
        connected["devices"]["spo2_bed-7"]["lastReadingTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{connected}"
    );
    assert!(connected["buffer"]["items"].as_u64().unwrap() >= u64::from(lines) * 3);
    assert!(stats.twin_reports_failed.load(Ordering::Relaxed) >= 1);
    assert!(stats.twin_reports_accepted.load(Ordering::Relaxed) >= 1);
    // Nothing was sent: batches are paced 10 minutes apart, from the start.
    assert!(
        !other.iter().any(|m| m.topic.starts_with("devices/")),
        "no events before flush"
    );

    // 3. Malformed and unknown methods.
    cloud
        .publish("$iothub/methods/POST/flush/", QoS::AtMostOnce, false, "{}")
        .await
        .unwrap();
    cloud
        .publish(
            "$iothub/methods/POST/reboot/?$rid=r-1",
            QoS::AtMostOnce,
            false,
            "{}",
        )
        .await
        .unwrap();
    let res = wait_for(
        &mut rx,
        10,
        "the answer to an unknown method",
        |m| m.topic.starts_with("$iothub/methods/res/"),
        &mut other,
    )
    .await;
    assert_eq!(res.topic, "$iothub/methods/res/404/?$rid=r-1");
    assert_eq!(stats.methods_malformed.load(Ordering::Relaxed), 1);
    assert_eq!(stats.methods_unknown.load(Ordering::Relaxed), 1);
    assert!(!other.iter().any(|m| m.topic.starts_with("devices/")));

    // 4. `flush`: answered 200 with what waits, then the events arrive.
    cloud
        .publish(
            "$iothub/methods/POST/flush/?$rid=f-7",
            QoS::AtMostOnce,
            false,
            "{}",
        )
        .await
        .unwrap();
    let res = wait_for(
        &mut rx,
        10,
        "the answer to flush",
        |m| m.topic.starts_with("$iothub/methods/res/"),
        &mut other,
    )
    .await;
    assert_eq!(res.topic, "$iothub/methods/res/200/?$rid=f-7");
    let body: Value = serde_json::from_slice(&res.payload).unwrap();
    assert_eq!(body["flushRequested"], true);
    let pending = body["pendingItems"].as_u64().unwrap();
    assert!(pending >= u64::from(lines) * 3, "{body}");
    let mut readings = 0u64;
    let mut items = 0u64;
    let mut others = Vec::new();
    while items < pending {
        let m = wait_for(
            &mut rx,
            15,
            "the flushed events",
            |m| {
                m.topic
                    .starts_with(&format!("devices/{DEVICE}/messages/events/"))
            },
            &mut others,
        )
        .await;
        let b = Batch::decode(m.payload.as_ref()).unwrap();
        for dd in &b.devices {
            readings += dd.readings.len() as u64;
            items += (dd.readings.len() + dd.technical.len() + dd.waveforms.len()) as u64;
        }
    }
    assert_eq!(readings, u64::from(lines) * 3);
    assert_eq!(stats.flushes_requested.load(Ordering::Relaxed), 1);

    // 5. The oximeter goes quiet: the twin says so.
    loop {
        let m = wait_for(
            &mut rx,
            20,
            "a twin patch with the device silent",
            |m| m.topic.starts_with("$iothub/twin/PATCH/"),
            &mut others,
        )
        .await;
        version += 1;
        cloud
            .publish(
                format!(
                    "$iothub/twin/res/204/?$rid={}&$version={version}",
                    twin_rid(&m.topic)
                ),
                QoS::AtMostOnce,
                false,
                "",
            )
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        if v["devices"]["spo2_bed-7"]["state"] == "silent" {
            break;
        }
    }

    stop.send(true).unwrap();
    agent.await.unwrap().unwrap();
    cloud_task.abort();
    drop(broker);
}
