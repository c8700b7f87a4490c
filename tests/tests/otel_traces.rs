//! OpenTelemetry traces across agent → hub, with the real binaries: a fake
//! OTLP/HTTP collector (POST /v1/traces, protobuf bodies decoded with
//! `opentelemetry-proto`) receives the spans of a real edge-agent and a real
//! cloud-hub. Each hub `ingest_batch` span must be a child of an agent
//! `batch_send` span (same trace id, parent span id = the agent span's id),
//! carried in `Batch.traceparent`, over the HTTPS uplink and over the IoT
//! Hub uplink (MQTT through a throwaway Mosquitto to the hub's `[mqtt]`
//! ingest). The export delay is set far beyond the test, so the spans arrive
//! only through the flush on shutdown (SIGTERM). No span attribute may carry
//! the patient id.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use vigil_e2e::*;

const GATEWAY: &str = "gw-otel";
const DEVICE: &str = "masimo-otel";
const PATIENT: &str = "p-otel-4711";

#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: BTreeMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Span>>>;

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// The fake collector on 127.0.0.1:0, on its own runtime thread.
fn collector() -> (String, Spans, Arc<Mutex<u64>>) {
    let spans: Spans = Arc::default();
    let refused: Arc<Mutex<u64>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let (s, r) = (spans.clone(), refused.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(
                    move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                        let (s, r) = (s.clone(), r.clone());
                        async move {
                            let ct = headers
                                .get(axum::http::header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            let req = match ExportTraceServiceRequest::decode(body) {
                                Ok(req) if ct == "application/x-protobuf" => req,
                                _ => {
                                    *r.lock().unwrap() += 1;
                                    return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                                }
                            };
                            let mut out = s.lock().unwrap();
                            for rs in req.resource_spans {
                                let service = rs
                                    .resource
                                    .iter()
                                    .flat_map(|r| &r.attributes)
                                    .find(|a| a.key == "service.name")
                                    .map(|a| text(a.value.as_ref().and_then(|v| v.value.as_ref())))
                                    .unwrap_or_default();
                                for ss in rs.scope_spans {
                                    for sp in ss.spans {
                                        out.push(Span {
                                            service: service.clone(),
                                            name: sp.name,
                                            trace_id: sp.trace_id,
                                            span_id: sp.span_id,
                                            parent_span_id: sp.parent_span_id,
                                            attributes: sp
                                                .attributes
                                                .iter()
                                                .map(|a| {
                                                    (
                                                        a.key.clone(),
                                                        text(
                                                            a.value
                                                                .as_ref()
                                                                .and_then(|v| v.value.as_ref()),
                                                        ),
                                                    )
                                                })
                                                .collect(),
                                        });
                                    }
                                }
                            }
                            (
                                axum::http::StatusCode::OK,
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )
                        }
                    },
                ),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    (format!("http://{addr}"), spans, refused)
}

/// The OTEL_* environment of both programs: export to the collector, but
/// only when flushed (the batch delay is longer than the test).
fn otel_env<'a>(endpoint: &'a str, service: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_SERVICE_NAME", service),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    ]
}

/// `cloud-hub serve` with extra environment (as `start_hub`).
fn start_hub_env(dir: &std::path::Path, config: &std::path::Path, env: &[(&str, &str)]) -> Hub {
    use std::io::BufRead;
    let log = std::fs::File::create(dir.join("hub.log")).unwrap();
    let mut proc = Proc::spawn(
        "cloud-hub",
        Command::new(bin("cloud-hub"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log),
    )
    .unwrap();
    let stdout = proc.child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let line = lines.next().unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});
    Hub {
        dir: dir.to_owned(),
        config: config.to_owned(),
        base_url: line.strip_prefix("listening on ").unwrap().to_string(),
        proc,
    }
}

#[test]
fn the_hub_ingest_span_is_a_child_of_the_agent_send_span() {
    traces_across(Uplink::Https);
}

#[test]
fn over_iot_hub_mqtt_the_ingest_span_is_a_child_of_the_send_span() {
    traces_across(Uplink::Mqtt);
}

#[derive(Debug, PartialEq)]
enum Uplink {
    Https,
    /// Agent (`iothub-mqtt`) → Mosquitto (TLS) → hub `[mqtt]` ingest.
    Mqtt,
}

/// A throwaway Mosquitto on a free loopback port with TLS (the agent's IoT
/// Hub uplink always uses TLS) and no authentication; returns its port.
fn mosquitto(dir: &std::path::Path) -> (Proc, u16) {
    write_broker_tls(dir, "Vigil trace-test CA");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!(
            "allow_anonymous true\nuser root\nlistener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            dir.join("ca.pem").display(),
            dir.join("broker.pem").display(),
            dir.join("broker.key").display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
    let proc = Proc::spawn(
        "mosquitto",
        Command::new("mosquitto")
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    )
    .expect("mosquitto (Debian package `mosquitto`; run scripts/setup.sh)");
    wait_for(Duration::from_secs(10), "mosquitto listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()
            .then_some(())
    })
    .unwrap();
    (proc, port)
}

fn traces_across(uplink: Uplink) {
    let (_guard, dir) = test_dir(&format!("otel_traces_{uplink:?}"));
    let d = dir.as_path();
    let (endpoint, spans, refused) = collector();

    let hub_cfg = write_hub_config(d, "127.0.0.1:0", &[(GATEWAY, DEVICE, PATIENT)]).unwrap();
    let token = add_gateway(&hub_cfg, GATEWAY).unwrap();
    let _broker = (uplink == Uplink::Mqtt).then(|| {
        let (proc, port) = mosquitto(d);
        write_private(&d.join("hub-mqtt.pw"), "hub-secret").unwrap();
        // Any key: this broker does not check the SAS token.
        write_private(&d.join("iothub.key"), "dGVzdC1rZXktZm9yLW90ZWwtdGVzdA==").unwrap();
        let mut text = std::fs::read_to_string(&hub_cfg).unwrap();
        text.push_str(&format!(
            "[mqtt]\nhost = \"localhost\"\nport = {port}\nclient_id = \"hub-otel\"\ngroup = \"hubs\"\n\
             username = \"hub\"\npassword_file = \"hub-mqtt.pw\"\n[mqtt.tls]\nca_file = \"ca.pem\"\n"
        ));
        std::fs::write(&hub_cfg, text).unwrap();
        (proc, port)
    });
    let mut hub = start_hub_env(d, &hub_cfg, &otel_env(&endpoint, "hub-under-test"));
    let pty = PtyPair::new(d, "masimo").unwrap();
    let _sim = Proc::spawn(
        "device-sim",
        Command::new(bin("device-sim"))
            .args(["masimo", "--scenario", "stable", "--interval-ms", "50"])
            .args(["--count", "40", "--port"])
            .arg(&pty.device)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    write_private(&d.join("gateway.token"), &token).unwrap();
    // Over MQTT the agent is not told the hub's URL: what the hub stores came
    // through the broker.
    let target = match &_broker {
        None => format!(
            "url = \"{}/api/v1/ingest\"\ntoken_file = \"gateway.token\"\n",
            hub.base_url
        ),
        Some((_, port)) => format!(
            "kind = \"iothub-mqtt\"\n[uplink.iothub]\nhost = \"localhost\"\ndevice_id = \"{GATEWAY}\"\n\
             port = {port}\nsas_key_file = \"iothub.key\"\nca_file = \"ca.pem\"\n"
        ),
    };
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "gateway_id = \"{GATEWAY}\"\ndata_dir = \"agent-data\"\n[uplink]\n\
batch_max_readings = 20\nbatch_max_wait_ms = 100\n{target}\n\
[[device]]\nkind = \"masimo-serial\"\nid = \"{DEVICE}\"\nport = \"{}\"\n",
            pty.host.display()
        ),
    )
    .unwrap();
    let mut agent = start_agent_env(
        d,
        &cfg,
        "agent.log",
        &otel_env(&endpoint, "agent-under-test"),
    )
    .unwrap();

    // Several batches stored at the hub.
    let url = format!(
        "{}/fhir/Observation?patient={PATIENT}&_count=0",
        hub.base_url
    );
    wait_for(Duration::from_secs(60), "observations at the hub", || {
        let n = get_json(&url).ok()?.1["total"].as_u64()?;
        (n >= 40).then_some(n)
    })
    .unwrap();
    assert!(
        spans.lock().unwrap().is_empty(),
        "nothing is exported before the flush (batch delay 600 s)"
    );

    // Spans are flushed on shutdown.
    assert!(agent.terminate(Duration::from_secs(20)), "agent exit");
    // Over MQTT the hub may still be consuming what the broker acked.
    let mut last = u64::MAX;
    wait_for(Duration::from_secs(30), "the hub's count settled", || {
        std::thread::sleep(Duration::from_millis(700));
        let n = get_json(&url).ok()?.1["total"].as_u64()?;
        let settled = n == last;
        last = n;
        settled.then_some(())
    })
    .unwrap();
    assert!(hub.proc.terminate(Duration::from_secs(20)), "hub exit");
    let all = spans.lock().unwrap().clone();
    assert_eq!(*refused.lock().unwrap(), 0, "bad export requests");

    let sends: Vec<&Span> = all
        .iter()
        .filter(|s| s.service == "agent-under-test" && s.name == "batch_send")
        .collect();
    let ingests: Vec<&Span> = all
        .iter()
        .filter(|s| s.service == "hub-under-test" && s.name == "ingest_batch")
        .collect();
    assert!(
        sends.len() >= 2 && ingests.len() >= 2,
        "{} send and {} ingest spans; all: {all:#?}",
        sends.len(),
        ingests.len()
    );
    // Only the trace spans are exported (no log events, no other spans).
    assert_eq!(
        all.len(),
        sends.len() + ingests.len(),
        "unexpected spans: {all:#?}"
    );
    for i in &ingests {
        let parent = sends
            .iter()
            .find(|s| s.span_id == i.parent_span_id)
            .unwrap_or_else(|| panic!("ingest span without its agent parent: {i:#?}\n{sends:#?}"));
        assert_eq!(parent.trace_id, i.trace_id, "same trace");
        assert_eq!(parent.trace_id.len(), 16);
        assert_eq!(parent.span_id.len(), 8);
        // The two describe the same batch.
        assert_eq!(
            parent.attributes.get("batch_sequence"),
            i.attributes.get("batch_sequence")
        );
        assert_eq!(
            i.attributes.get("gateway_id").map(String::as_str),
            Some(GATEWAY)
        );
    }
    // Every delivered send has its ingest span.
    for s in sends
        .iter()
        .filter(|s| s.attributes.get("outcome").map(String::as_str) == Some("delivered"))
    {
        assert!(
            ingests.iter().any(|i| i.parent_span_id == s.span_id),
            "delivered send without an ingest span: {s:#?}"
        );
    }
    // Ids and counts only: never the patient.
    for s in &all {
        for (k, v) in &s.attributes {
            assert!(!v.contains(PATIENT) && !k.contains("patient"), "{k}={v}");
        }
    }
    let accepted: u64 = ingests
        .iter()
        .filter_map(|i| i.attributes.get("accepted")?.parse::<u64>().ok())
        .sum();
    assert!(accepted >= 40, "accepted per ingest spans: {accepted}");
}
