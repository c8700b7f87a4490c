//! Azure IoT Hub Device Provisioning Service (DPS): registration over MQTT
//! with a symmetric key, so a gateway needs only the DPS ID scope, its
//! registration id and a key, and learns its hub and device id.
//!
//! Protocol (DPS "MQTT support"):
//! - CONNECT to `{global_endpoint}:8883` (TLS) with client id =
//!   registration id, user name
//!   `{idScope}/registrations/{registrationId}/api-version=2019-03-31`, and
//!   a SAS token for `{idScope}/registrations/{registrationId}` with
//!   `skn=registration` as password;
//! - subscribe `$dps/registrations/res/#`;
//! - publish `$dps/registrations/PUT/iotdps-register/?$rid={rid}` with
//!   `{"registrationId": "…"}`; the answer comes on
//!   `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`;
//! - on 202 (with an `operationId`), wait `retry-after` seconds and poll
//!   `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}`
//!   until 200 with `status = "assigned"` and `registrationState.assignedHub`
//!   / `deviceId`. `failed`, `disabled`, 401 and other 4xx are errors.
//!
//! Group enrollments: the device key is
//! `base64(HMAC-SHA256(base64decode(group key), registration id))`
//! ([`derive_device_key`]).
//!
//! The assignment is cached in `<data_dir>/dps-assignment.json`, so a
//! restart connects to the assigned hub without registering again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Identity, sas_token};

/// DPS's MQTT API version (user name).
pub const API_VERSION: &str = "2019-03-31";
/// The public global endpoint.
pub const GLOBAL_ENDPOINT: &str = "global.azure-devices-provisioning.net";
const RESPONSE_PREFIX: &str = "$dps/registrations/res/";
/// Wait between status polls when DPS does not say (`retry-after`).
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(3);
/// Longest `retry-after` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// A whole registration (connect, register, polls) must finish within this.
const REGISTRATION_DEADLINE: Duration = Duration::from_secs(120);
/// Lifetime of the registration SAS token.
const TOKEN_TTL_S: u64 = 3600;
/// The cache file in the data directory.
pub const CACHE_FILE: &str = "dps-assignment.json";

/// The device key of a group enrollment member: HMAC-SHA256 keyed with the
/// (decoded) group key over the registration id. Base64 of the result is
/// what the portal and `az iot dps enrollment-group compute-device-key` show.
pub fn derive_device_key(group_key: &[u8], registration_id: &str) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, group_key);
    ring::hmac::sign(&k, registration_id.as_bytes())
        .as_ref()
        .to_vec()
}

pub fn username(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}/api-version={API_VERSION}")
}

pub fn resource_uri(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}")
}

pub fn register_topic(rid: u64) -> String {
    format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}")
}

pub fn status_topic(rid: u64, operation_id: &str) -> String {
    format!(
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation_id}"
    )
}

/// A DPS answer topic: `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpsResponse {
    pub status: u16,
    pub rid: String,
    pub retry_after: Option<Duration>,
}

pub fn parse_response(topic: &str) -> Option<DpsResponse> {
    let rest = topic.strip_prefix(RESPONSE_PREFIX)?;
    let (status, query) = rest.split_once("/?")?;
    let status = status.parse().ok()?;
    let mut rid = None;
    let mut retry_after = None;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("$rid", v)) if !v.is_empty() => rid = Some(v.to_string()),
            Some(("retry-after", v)) => {
                retry_after = v.parse::<u64>().ok().map(Duration::from_secs);
            }
            _ => {}
        }
    }
    Some(DpsResponse {
        status,
        rid: rid?,
        retry_after,
    })
}

/// The body of a DPS answer (RegistrationOperationStatus), the fields used.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationStatus {
    #[serde(default)]
    operation_id: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    registration_state: Option<RegistrationState>,
    /// Error answers (ProvisioningServiceErrorDetails).
    #[serde(default)]
    error_code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegistrationState {
    #[serde(default)]
    assigned_hub: Option<String>,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    error_code: Option<i64>,
    #[serde(default)]
    error_message: Option<String>,
}

/// Where DPS put the device (cached on disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub id_scope: String,
    pub registration_id: String,
    pub global_endpoint: String,
    pub assigned_hub: String,
    pub device_id: String,
}

impl Assignment {
    /// The IoT Hub identity it gives (the hub's MQTT port is 8883).
    pub fn identity(&self, port: u16) -> Identity {
        Identity::device(&self.assigned_hub, &self.device_id, port)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DpsError {
    #[error(
        "DPS refused the connection (CONNACK {0}): check id_scope, registration_id and the key"
    )]
    Refused(String),
    #[error("DPS MQTT: {0}")]
    Mqtt(String),
    #[error("DPS answered {status}: {message}")]
    Rejected { status: u16, message: String },
    #[error("DPS registration {status}: {message}")]
    Failed { status: String, message: String },
    #[error("DPS: unreadable answer: {0}")]
    BadResponse(String),
    #[error("DPS registration not finished within {0:?}")]
    Timeout(Duration),
}

/// What registration needs.
#[derive(Debug, Clone)]
pub struct DpsSetup {
    pub id_scope: String,
    pub registration_id: String,
    pub global_endpoint: String,
    pub port: u16,
    /// The device key (derived already for group enrollments).
    pub device_key: Vec<u8>,
    pub tls: Arc<rustls::ClientConfig>,
    pub timeout: Duration,
    /// The data directory (assignment cache).
    pub data_dir: PathBuf,
}

fn cache_path(dir: &Path) -> PathBuf {
    dir.join(CACHE_FILE)
}

/// The cached assignment, if it is for this scope, registration id and
/// endpoint.
pub fn cached(setup: &DpsSetup) -> Option<Assignment> {
    let text = std::fs::read_to_string(cache_path(&setup.data_dir)).ok()?;
    let a: Assignment = serde_json::from_str(&text).ok()?;
    (a.id_scope == setup.id_scope
        && a.registration_id == setup.registration_id
        && a.global_endpoint == setup.global_endpoint
        && !a.assigned_hub.is_empty()
        && !a.device_id.is_empty())
    .then_some(a)
}

/// Forget the cached assignment (the hub refuses the device): the next
/// [`assignment`] registers again.
pub fn forget(setup: &DpsSetup) {
    match std::fs::remove_file(cache_path(&setup.data_dir)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, "DPS assignment cache not removed"),
    }
}

fn store(setup: &DpsSetup, a: &Assignment) -> std::io::Result<()> {
    std::fs::create_dir_all(&setup.data_dir)?;
    let path = cache_path(&setup.data_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(a).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

/// The cached assignment, else a registration (then cached).
pub async fn assignment(setup: &DpsSetup, clock: fn() -> u64) -> Result<Assignment, DpsError> {
    if let Some(a) = cached(setup) {
        tracing::info!(assigned_hub = %a.assigned_hub, device_id = %a.device_id, "DPS assignment from cache");
        return Ok(a);
    }
    let a = register(setup, clock).await?;
    if let Err(e) = store(setup, &a) {
        tracing::warn!(error = %e, "DPS assignment not cached; the next start registers again");
    }
    tracing::info!(assigned_hub = %a.assigned_hub, device_id = %a.device_id, "DPS registration assigned");
    Ok(a)
}

/// Register with DPS over MQTT (see the module docs).
pub async fn register(setup: &DpsSetup, clock: fn() -> u64) -> Result<Assignment, DpsError> {
    let deadline = Instant::now() + REGISTRATION_DEADLINE;
    let token = sas_token(
        &resource_uri(&setup.id_scope, &setup.registration_id),
        &setup.device_key,
        clock() + TOKEN_TTL_S,
        Some("registration"),
    );
    let mut opts = MqttOptions::new(&setup.registration_id, &setup.global_endpoint, setup.port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_clean_session(true);
    opts.set_credentials(username(&setup.id_scope, &setup.registration_id), token);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        setup.tls.clone(),
    )));
    let (client, mut events) = AsyncClient::new(opts, 16);
    let result = tokio::time::timeout_at(deadline, async {
        // Connected and subscribed.
        let mut subscribed = false;
        client
            .subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
            .await
            .map_err(|e| DpsError::Mqtt(e.to_string()))?;
        while !subscribed {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    if s.return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        return Err(DpsError::Mqtt(
                            "subscription to $dps/registrations/res/# refused".into(),
                        ));
                    }
                    subscribed = true;
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(DpsError::Refused(format!("{code:?}")));
                }
                Err(e) => return Err(DpsError::Mqtt(e.to_string())),
            }
        }
        let body = serde_json::json!({ "registrationId": setup.registration_id }).to_string();
        let mut rid: u64 = 1;
        let mut operation: Option<String> = None;
        client
            .publish(register_topic(rid), QoS::AtLeastOnce, false, body.clone())
            .await
            .map_err(|e| DpsError::Mqtt(e.to_string()))?;
        loop {
            let p = match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => p,
                Ok(_) => continue,
                Err(e) => return Err(DpsError::Mqtt(e.to_string())),
            };
            let Some(r) = parse_response(&p.topic) else {
                tracing::debug!(topic_len = p.topic.len(), "unexpected DPS message ignored");
                continue;
            };
            if r.rid != rid.to_string() {
                continue;
            }
            let st: OperationStatus = if p.payload.is_empty() {
                OperationStatus::default()
            } else {
                serde_json::from_slice(&p.payload)
                    .map_err(|e| DpsError::BadResponse(e.to_string()))?
            };
            let wait = r
                .retry_after
                .unwrap_or(DEFAULT_RETRY_AFTER)
                .min(MAX_RETRY_AFTER);
            match r.status {
                200 | 202 => {
                    let status = st
                        .status
                        .clone()
                        .or_else(|| {
                            st.registration_state
                                .as_ref()
                                .and_then(|r| r.status.clone())
                        })
                        .unwrap_or_default();
                    if r.status == 200 && status == "assigned" {
                        let rs = st.registration_state.unwrap_or_default();
                        return match (rs.assigned_hub, rs.device_id) {
                            (Some(h), Some(d)) if !h.is_empty() && !d.is_empty() => {
                                Ok(Assignment {
                                    id_scope: setup.id_scope.clone(),
                                    registration_id: setup.registration_id.clone(),
                                    global_endpoint: setup.global_endpoint.clone(),
                                    assigned_hub: h,
                                    device_id: d,
                                })
                            }
                            _ => Err(DpsError::BadResponse(
                                "assigned without assignedHub/deviceId".into(),
                            )),
                        };
                    }
                    if matches!(status.as_str(), "failed" | "disabled" | "unassigned")
                        && r.status == 200
                    {
                        let rs = st.registration_state.unwrap_or_default();
                        return Err(DpsError::Failed {
                            status,
                            message: format!(
                                "{} (error code {})",
                                rs.error_message.unwrap_or_default(),
                                rs.error_code.unwrap_or(0)
                            ),
                        });
                    }
                    // Accepted or still assigning: poll after `retry-after`.
                    if let Some(op) = st.operation_id.filter(|o| !o.is_empty()) {
                        operation = Some(op);
                    }
                    let Some(op) = operation.clone() else {
                        return Err(DpsError::BadResponse("202 without an operationId".into()));
                    };
                    if op.contains(['/', '&', '#', '+', '?']) {
                        return Err(DpsError::BadResponse("unusable operationId".into()));
                    }
                    tokio::time::sleep(wait).await;
                    rid += 1;
                    client
                        .publish(status_topic(rid, &op), QoS::AtLeastOnce, false, "")
                        .await
                        .map_err(|e| DpsError::Mqtt(e.to_string()))?;
                }
                429 | 500..=599 => {
                    // Throttled or busy: the same step again after the wait.
                    tokio::time::sleep(wait).await;
                    rid += 1;
                    let (topic, payload) = match &operation {
                        Some(op) => (status_topic(rid, op), String::new()),
                        None => (register_topic(rid), body.clone()),
                    };
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .map_err(|e| DpsError::Mqtt(e.to_string()))?;
                }
                status => {
                    let message = match st.message {
                        Some(m) => format!("{m} (error code {})", st.error_code.unwrap_or(0)),
                        None if status == 401 => {
                            "unauthorized: check id_scope, registration_id and the key".into()
                        }
                        None => "registration refused".into(),
                    };
                    return Err(DpsError::Rejected { status, message });
                }
            }
        }
    })
    .await;
    let _ = client.try_disconnect();
    match result {
        Ok(r) => r,
        Err(_) => Err(DpsError::Timeout(REGISTRATION_DEADLINE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;

    /// The derived key computed independently with Python's standard library:
    /// `base64.b64encode(hmac.new(base64.b64decode(group_key),
    /// registration_id.encode(), hashlib.sha256).digest())`, run here via
    /// `python3 -c` so the value is not copied from this implementation.
    #[test]
    fn group_device_key_matches_an_independent_computation() {
        let group_key = "dGhpcyBpcyBhIHRlc3QgZ3JvdXAga2V5IGZvciB2aWdpbCE=";
        let reg = "vigil-gw-0042";
        let ours = BASE64.encode(derive_device_key(&BASE64.decode(group_key).unwrap(), reg));
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import base64,hashlib,hmac,sys; \
                 print(base64.b64encode(hmac.new(base64.b64decode(sys.argv[1]), sys.argv[2].encode(), hashlib.sha256).digest()).decode())",
            )
            .arg(group_key)
            .arg(reg)
            .output()
            .expect("python3 (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(ours, String::from_utf8(out.stdout).unwrap().trim());
        // And it depends on the registration id.
        assert_ne!(
            derive_device_key(&BASE64.decode(group_key).unwrap(), "other"),
            derive_device_key(&BASE64.decode(group_key).unwrap(), reg)
        );
    }

    #[test]
    fn dps_config_is_validated_naming_the_field() {
        let cfg = |iothub: &str| {
            let text = format!(
                "gateway_id = \"gw\"\ndata_dir = \"d\"\n[uplink]\nkind = \"iothub-mqtt\"\n[uplink.iothub]\n{iothub}"
            );
            toml::from_str::<crate::config::AgentConfig>(&text)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map(|_| c).map_err(|e| e.to_string()))
        };
        let dps = "[uplink.iothub.dps]\nid_scope = \"0ne00ABC123\"\nregistration_id = \"gw-7\"\nkey_file = \"k\"\n";
        let c = cfg(dps).unwrap();
        let d = c.uplink.iothub.unwrap().dps.unwrap();
        assert_eq!(
            (d.global_endpoint.as_str(), d.port, d.group_key),
            (GLOBAL_ENDPOINT, 8883, false)
        );
        let err = |text: String| cfg(&text).unwrap_err();
        let e = err(format!("host = \"h.example\"\n{dps}"));
        assert!(
            e.contains("uplink.iothub.host") && e.contains("not used"),
            "{e}"
        );
        let e = err(format!("sas_key_file = \"k\"\n{dps}"));
        assert!(e.contains("uplink.iothub.sas_key_file"), "{e}");
        let e = err(dps.replace("gw-7", "GW 7"));
        assert!(e.contains("uplink.iothub.dps.registration_id"), "{e}");
        let e = err(dps.replace("0ne00ABC123", "0ne/x"));
        assert!(e.contains("uplink.iothub.dps.id_scope"), "{e}");
        let e = err(format!("{dps}global_endpoint = \"https://x\"\n"));
        assert!(e.contains("uplink.iothub.dps.global_endpoint"), "{e}");
        assert!(err(dps.replace("key_file = \"k\"\n", "")).contains("key_file"));
        // Without DPS the hub and device id are required as before.
        assert!(err(String::new()).contains("uplink.iothub.host"));
    }

    #[test]
    fn check_reports_the_dps_key_and_the_cache() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("dps.key");
        std::fs::write(&key, "Z3JvdXAta2V5LWJ5dGVz\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let h: crate::config::IotHubConfig = toml::from_str(&format!(
            "[dps]\nid_scope = \"0ne00ABC123\"\nregistration_id = \"gw-7\"\nkey_file = {:?}\ngroup_key = true\n",
            key.display().to_string()
        ))
        .unwrap();
        let t = Duration::from_secs(1);
        let what = crate::iothub::credentials_check(&h, dir.path(), t).unwrap();
        assert!(
            what.contains("derived") && what.contains("not registered"),
            "{what}"
        );
        // An unreadable cache does not count.
        std::fs::write(dir.path().join(CACHE_FILE), "{}").unwrap();
        let what = crate::iothub::credentials_check(&h, dir.path(), t).unwrap();
        assert!(what.contains("not registered"), "{what}");
        std::fs::write(
            dir.path().join(CACHE_FILE),
            serde_json::to_vec(&Assignment {
                id_scope: "0ne00ABC123".into(),
                registration_id: "gw-7".into(),
                global_endpoint: GLOBAL_ENDPOINT.into(),
                assigned_hub: "h.azure-devices.net".into(),
                device_id: "gw-7".into(),
            })
            .unwrap(),
        )
        .unwrap();
        let what = crate::iothub::credentials_check(&h, dir.path(), t).unwrap();
        assert!(what.contains("cached"), "{what}");
        // Readable by others: refused, as every secret file.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(crate::iothub::credentials_check(&h, dir.path(), t).is_err());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&key, "not base64!!\n").unwrap();
        let e = crate::iothub::credentials_check(&h, dir.path(), t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("uplink.iothub.dps.key_file"), "{e}");
    }

    #[test]
    fn topics_and_answers() {
        assert_eq!(
            username("0ne00ABC123", "gw-1"),
            "0ne00ABC123/registrations/gw-1/api-version=2019-03-31"
        );
        assert_eq!(
            resource_uri("0ne00ABC123", "gw-1"),
            "0ne00ABC123/registrations/gw-1"
        );
        assert_eq!(
            register_topic(1),
            "$dps/registrations/PUT/iotdps-register/?$rid=1"
        );
        assert_eq!(
            status_topic(2, "4.abc.def"),
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=4.abc.def"
        );
        assert_eq!(
            parse_response("$dps/registrations/res/202/?$rid=1&retry-after=3"),
            Some(DpsResponse {
                status: 202,
                rid: "1".into(),
                retry_after: Some(Duration::from_secs(3))
            })
        );
        assert_eq!(
            parse_response("$dps/registrations/res/200/?$rid=2").map(|r| r.retry_after),
            Some(None)
        );
        assert_eq!(parse_response("$dps/registrations/res/abc/?$rid=2"), None);
        assert_eq!(parse_response("$dps/registrations/res/200/"), None);
        assert_eq!(parse_response("$iothub/twin/res/204/?$rid=1"), None);
    }
}
