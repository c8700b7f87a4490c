//! `edge-agent check`: everything a biomedical engineer wants to know before
//! leaving the bedside, in one readable report with an exit code: the config
//! (errors name the field), the secrets' permissions, each device's link
//! (serial port opens with the protocol's settings, TCP device answers a
//! connect, UDP address resolves, listener port is free, Bluetooth adapter
//! present) and the uplink, authenticated: the hub (`/healthz`, then the
//! gateway token on the ingest path, over the configured TLS) or IoT Hub /
//! DPS (an MQTT connection as the configured identity up to its CONNACK).

use std::path::Path;
use std::time::Duration;

use crate::config::{AgentConfig, DeviceConfig, Transport};
use crate::devices::AnyProtocol;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub subject: String,
    pub ok: bool,
    pub detail: String,
}

fn ok(subject: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding {
        subject: subject.into(),
        ok: true,
        detail: detail.into(),
    }
}

fn bad(subject: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding {
        subject: subject.into(),
        ok: false,
        detail: detail.into(),
    }
}

/// Why opening a serial port failed, in the words a biomedical engineer
/// needs.
fn serial_advice(e: &impl std::fmt::Display, port: &str) -> String {
    let text = e.to_string();
    if text.contains("Permission denied") {
        format!("{text}: the agent's user cannot open {port} (add it to the dialout group)")
    } else if text.contains("No such file") || text.contains("not found") {
        format!(
            "{text}: {port} does not exist (is the USB-serial adapter plugged in? try /dev/serial/by-id/)"
        )
    } else {
        text
    }
}

async fn check_device(d: &DeviceConfig) -> Finding {
    let subject = format!("device {} ({})", d.id, serde_kind(d));
    match d.kind.transport() {
        Transport::Serial => {
            let Ok(proto) = AnyProtocol::from_config(d) else {
                return bad(subject, "options do not validate");
            };
            let settings = proto.default_serial().with(&d.serial);
            let port = d.port.clone().unwrap_or_default();
            match settings.open(&port) {
                Ok(_) => ok(subject, format!("{port} opens at {settings}")),
                Err(e) => bad(subject, serial_advice(&e, &port)),
            }
        }
        Transport::Tcp => {
            let addr = d.address.clone().unwrap_or_default();
            match tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect(&addr),
            )
            .await
            {
                Ok(Ok(_)) => ok(subject, format!("{addr} accepts connections")),
                Ok(Err(e)) => bad(subject, format!("{addr}: {e}")),
                Err(_) => bad(subject, format!("{addr}: no answer within 3 s")),
            }
        }
        Transport::Udp => {
            let addr = d.address.clone().unwrap_or_default();
            match tokio::net::lookup_host(&addr).await.map(|mut a| a.next()) {
                Ok(Some(_)) => ok(
                    subject,
                    format!("{addr} resolves (UDP: no handshake to test)"),
                ),
                Ok(None) => bad(subject, format!("{addr}: no address")),
                Err(e) => bad(subject, format!("{addr}: {e}")),
            }
        }
        Transport::Listener => {
            let listen = match crate::hl7::listen_addr(d.listen.as_deref().unwrap_or_default()) {
                Ok(a) => a,
                Err(e) => return bad(subject, e),
            };
            match tokio::net::TcpListener::bind(listen).await {
                Ok(_) => ok(subject, format!("{listen} is free to listen on")),
                Err(e) => bad(
                    subject,
                    format!(
                        "cannot listen on {listen}: {e} (another program, or a running agent?)"
                    ),
                ),
            }
        }
        Transport::Ble => check_ble(d, subject).await,
    }
}

#[cfg(feature = "ble")]
async fn check_ble(d: &DeviceConfig, subject: String) -> Finding {
    match crate::devices::ble_config(d) {
        Err(e) => bad(subject, format!("options: {e}")),
        Ok(ble) => match device_drivers::ble::check_adapter(&ble).await {
            Ok(info) => ok(subject, format!("Bluetooth adapter present: {info}")),
            Err(e) => bad(
                subject,
                format!("{e} (is bluetoothd running and the D-Bus socket reachable?)"),
            ),
        },
    }
}

#[cfg(not(feature = "ble"))]
async fn check_ble(_d: &DeviceConfig, subject: String) -> Finding {
    bad(
        subject,
        "this build has no Bluetooth LE support (feature `ble`)",
    )
}

fn serde_kind(d: &DeviceConfig) -> String {
    AnyProtocol::from_config(d)
        .map(|p| p.kind().to_string())
        .unwrap_or_else(|_| format!("{:?}", d.kind))
}

async fn check_hub(cfg: &AgentConfig) -> Finding {
    let Some(base) = cfg.uplink.url.strip_suffix(shared_protocol::INGEST_PATH) else {
        return ok(
            "hub",
            format!(
                "{} (not the standard ingest path; health not checked)",
                cfg.uplink.url
            ),
        );
    };
    let tls = match crate::uplink::https_tls_config(&cfg.uplink) {
        Ok(t) => t,
        Err(e) => return bad("hub", e.to_string()),
    };
    let client = match reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => return bad("hub", e.to_string()),
    };
    match client.get(format!("{base}/healthz")).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => {
            return bad(
                "hub",
                format!("{base}/healthz answered HTTP {}", r.status().as_u16()),
            );
        }
        Err(e) => return bad("hub", format!("{base}: {e}")),
    }
    // The gateway token, authenticated by the hub: an ingest request whose
    // content type the hub refuses only after authentication (HTTP 415),
    // so nothing is stored; a refused token answers 401.
    let token = match crate::secrets::load_token(
        cfg.uplink.token_file.as_deref(),
        std::env::var("VIGIL_AGENT_TOKEN").ok(),
    ) {
        Ok(t) => t,
        Err(e) => {
            return bad(
                "hub",
                format!("{base} is up; no token to authenticate: {e}"),
            );
        }
    };
    match client
        .post(&cfg.uplink.url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, AUTH_PROBE_CONTENT_TYPE)
        .body(Vec::new())
        .send()
        .await
    {
        Ok(r) if r.status() == reqwest::StatusCode::UNSUPPORTED_MEDIA_TYPE => ok(
            "hub",
            format!("{base} is up and accepts the gateway token (TLS verified)"),
        ),
        Ok(r)
            if r.status() == reqwest::StatusCode::UNAUTHORIZED
                || r.status() == reqwest::StatusCode::FORBIDDEN =>
        {
            let status = r.status().as_u16();
            let msg = r.text().await.unwrap_or_default();
            bad(
                "hub",
                format!(
                    "{base} refused the gateway token (HTTP {status}): {} (re-provision the gateway or fix uplink.token_file)",
                    msg.trim()
                ),
            )
        }
        Ok(r) => bad(
            "hub",
            format!(
                "{} answered HTTP {} to an authentication probe",
                cfg.uplink.url,
                r.status().as_u16()
            ),
        ),
        Err(e) => bad("hub", format!("{}: {e}", cfg.uplink.url)),
    }
}

/// Content type of `check`'s ingest probe: not protobuf, so the hub answers
/// 415 after checking the token and stores nothing.
const AUTH_PROBE_CONTENT_TYPE: &str = "application/x-vigil-auth-check";

/// Run every check. A config that does not load is a single finding.
pub async fn check(config: &Path) -> Vec<Finding> {
    let cfg = match AgentConfig::load(config) {
        Ok(c) => c,
        Err(e) => return vec![bad("config", e.to_string())],
    };
    let mut out = vec![ok(
        "config",
        format!(
            "gateway {} with {} device(s)",
            cfg.gateway_id,
            cfg.devices.len()
        ),
    )];
    // An IoT Edge module (IOTEDGE_* environment): its identity, the
    // workload API and edgeHub are checked instead.
    let module = match cfg.uplink.kind {
        crate::config::UplinkKind::IothubMqtt => cfg.uplink.iot_edge().ok().flatten(),
        _ => None,
    };
    let iothub = match (&cfg.uplink.kind, &cfg.uplink.iothub) {
        (crate::config::UplinkKind::IothubMqtt, Some(h)) if module.is_none() => Some(h.clone()),
        _ => None,
    };
    match &iothub {
        None if module.is_some() => {}
        // IoT Hub: the device key (0600, base64) or client certificate must load.
        Some(h) => {
            match crate::iothub::credentials_check(h, &cfg.data_dir, cfg.uplink.request_timeout()) {
                Ok(what) => out.push(ok("IoT Hub credentials", what)),
                Err(e) => out.push(bad("IoT Hub credentials", e.to_string())),
            }
        }
        None => match crate::secrets::load_token(
            cfg.uplink.token_file.as_deref(),
            std::env::var("VIGIL_AGENT_TOKEN").ok(),
        ) {
            Ok(_) => out.push(ok("gateway token", "present, readable by the owner only")),
            Err(e) => out.push(bad("gateway token", e.to_string())),
        },
    }
    let key = cfg.key_path();
    if key.exists() {
        match crate::secrets::read_private(&key) {
            Ok(_) => out.push(ok("buffer key", format!("{} (mode 0600)", key.display()))),
            Err(e) => out.push(bad("buffer key", e.to_string())),
        }
    } else {
        out.push(ok(
            "buffer key",
            format!("{} will be created (mode 0600) on first run", key.display()),
        ));
    }
    for d in &cfg.devices {
        out.push(check_device(d).await);
    }
    match (&module, &iothub) {
        (Some(env), _) => {
            for (subject, good, detail) in crate::iothub::edge::check(env).await {
                out.push(if good {
                    ok(subject, detail)
                } else {
                    bad(subject, detail)
                });
            }
        }
        (None, Some(h)) => out.push(check_iothub(h, &cfg).await),
        (None, None) => out.push(check_hub(&cfg).await),
    }
    out
}

/// IoT Hub / DPS: connect and authenticate as the configured identity
/// (TLS verified against the configured CA, CONNECT, CONNACK), so a wrong
/// key, device id, certificate or CA is a FAIL with the reason.
async fn check_iothub(h: &crate::config::IotHubConfig, cfg: &AgentConfig) -> Finding {
    // With DPS the hub is not known before registration: check DPS.
    let (subject, addr) = match &h.dps {
        Some(d) => ("DPS", format!("{}:{}", d.global_endpoint, d.port)),
        None => ("IoT Hub", format!("{}:{}", h.host, h.port)),
    };
    match crate::iothub::check_connect(h, &cfg.data_dir, cfg.uplink.request_timeout()).await {
        Ok(what) => ok(subject, what),
        Err(e) => bad(subject, format!("{addr}: {e}")),
    }
}

/// The report as printed, one line per finding.
pub fn render(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(|f| {
            format!(
                "{} {:<34} {}\n",
                if f.ok { "OK  " } else { "FAIL" },
                f.subject,
                f.detail
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn report_names_what_is_wrong_and_what_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let tok = d.join("gateway.token");
        std::fs::write(&tok, "vgt_x\n").unwrap();
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A listener-free port and a TCP device that is not there.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let hub = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hub_addr = hub.local_addr().unwrap();
        tokio::spawn(async move {
            // A minimal hub: answers /healthz.
            let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
            axum::serve(hub, app).await.unwrap();
        });
        std::fs::write(
            d.join("agent.toml"),
            format!(
                "gateway_id = \"gw\"\ndata_dir = \"data\"\n[uplink]\nurl = \"http://{hub_addr}/api/v1/ingest\"\ntoken_file = \"gateway.token\"\n\
                 [[device]]\nkind = \"masimo-serial\"\nid = \"m1\"\nport = \"/dev/vigil-no-such-port\"\n\
                 [[device]]\nkind = \"modbus-tcp\"\nid = \"mb\"\naddress = \"{closed}\"\n[device.options]\n\
                 points = [{{ label = \"HR\", table = \"input\", address = 0, type = \"u16\", unit = \"/min\", mdc = \"MDC_ECG_HEART_RATE\" }}]\n"
            ),
        )
        .unwrap();
        let f = check(&d.join("agent.toml")).await;
        let by = |s: &str| {
            f.iter()
                .find(|x| x.subject.starts_with(s))
                .unwrap_or_else(|| panic!("{s}: {f:?}"))
                .clone()
        };
        assert!(by("config").ok);
        assert!(!by("gateway token").ok && by("gateway token").detail.contains("chmod 600"));
        assert!(
            !by("device m1").ok && by("device m1").detail.contains("does not exist"),
            "{:?}",
            by("device m1")
        );
        assert!(!by("device mb").ok);
        // The hub is up, but without a usable token nothing is authenticated.
        assert!(
            !by("hub").ok && by("hub").detail.contains("no token"),
            "{:?}",
            by("hub")
        );
        let text = render(&f);
        assert!(
            text.lines().any(|l| l.starts_with("FAIL device m1")),
            "{text}"
        );
        // A broken config is one clear finding naming the field.
        std::fs::write(
            d.join("bad.toml"),
            "gateway_id = \"g w\"\ndata_dir = \"x\"\n[uplink]\nurl = \"http://127.0.0.1:1\"\n",
        )
        .unwrap();
        let f = check(&d.join("bad.toml")).await;
        assert_eq!(f.len(), 1);
        assert!(f[0].detail.contains("gateway_id"), "{:?}", f[0]);
    }

    #[tokio::test]
    async fn iothub_uplink_is_checked_by_its_own_credentials_and_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = d.join("device.key");
        std::fs::write(&key, "c2VjcmV0LWRldmljZS1rZXk=\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            d.join("agent.toml"),
            format!(
                "gateway_id = \"gw\"\ndata_dir = \"data\"\n[uplink]\nkind = \"iothub-mqtt\"\n\
                 [uplink.iothub]\nhost = \"127.0.0.1\"\ndevice_id = \"dev-1\"\nport = {closed}\nsas_key_file = \"device.key\"\n"
            ),
        )
        .unwrap();
        let f = check(&d.join("agent.toml")).await;
        let by = |s: &str| {
            f.iter()
                .find(|x| x.subject.starts_with(s))
                .unwrap_or_else(|| panic!("{s}: {f:?}"))
                .clone()
        };
        assert!(by("IoT Hub credentials").ok, "{f:?}");
        assert!(
            f.iter()
                .all(|x| x.subject != "gateway token" && x.subject != "hub"),
            "{f:?}"
        );
        let endpoint = f.iter().find(|x| x.subject == "IoT Hub").unwrap();
        assert!(
            !endpoint.ok && endpoint.detail.contains(&closed.to_string()),
            "{endpoint:?}"
        );
    }
}
