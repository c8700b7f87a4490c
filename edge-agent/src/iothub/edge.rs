//! Running as an Azure IoT Edge module.
//!
//! The IoT Edge runtime starts a module's container with its identity in
//! the environment ([`VARS`]); the module authenticates to edgeHub (the
//! local MQTT broker at `IOTEDGE_GATEWAYHOSTNAME:8883`) with a SAS token
//! whose signature the **workload API** computes with the module's key,
//! which the module never sees:
//! - `POST {workload}/modules/{module}/genid/{generation}/sign?api-version={v}`
//!   with `{"keyId":"primary","algo":"HMACSHA256","data":base64(string to sign)}`
//!   → `{"digest": base64(signature)}`;
//! - `GET {workload}/trust-bundle?api-version={v}` → `{"certificate": PEM}`,
//!   the CAs to trust for edgeHub's TLS certificate.
//!
//! The workload URI is `unix:///var/run/iotedge/workload.sock` (HTTP/1.1
//! over a unix socket; spoken with hyper) or `http://host:port`.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Identity, url_encode};

/// The environment variables the agent reads in module mode.
pub const IOTHUBHOSTNAME: &str = "IOTEDGE_IOTHUBHOSTNAME";
pub const DEVICEID: &str = "IOTEDGE_DEVICEID";
pub const MODULEID: &str = "IOTEDGE_MODULEID";
pub const GATEWAYHOSTNAME: &str = "IOTEDGE_GATEWAYHOSTNAME";
pub const WORKLOADURI: &str = "IOTEDGE_WORKLOADURI";
pub const APIVERSION: &str = "IOTEDGE_APIVERSION";
pub const MODULEGENERATIONID: &str = "IOTEDGE_MODULEGENERATIONID";
pub const AUTHSCHEME: &str = "IOTEDGE_AUTHSCHEME";
/// All of them; any one set means "running as a module".
pub const VARS: [&str; 8] = [
    IOTHUBHOSTNAME,
    DEVICEID,
    MODULEID,
    GATEWAYHOSTNAME,
    WORKLOADURI,
    APIVERSION,
    MODULEGENERATIONID,
    AUTHSCHEME,
];
/// edgeHub's MQTT port.
pub const EDGEHUB_PORT: u16 = 8883;
/// Largest workload API response accepted.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The module's identity from the IoT Edge environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeEnv {
    pub hub: String,
    pub device_id: String,
    pub module_id: String,
    /// edgeHub's host; without it the module talks to IoT Hub directly.
    pub gateway: Option<String>,
    pub workload_uri: String,
    pub api_version: String,
    pub generation_id: String,
    /// edgeHub's port (8883; tests use another).
    pub port: u16,
}

impl EdgeEnv {
    /// Read the module environment: `Ok(None)` when no `IOTEDGE_*` variable
    /// is set; an error naming the variable when the set is incomplete or
    /// asks for something unsupported.
    pub fn from_vars(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<EdgeEnv>, (String, String)> {
        let val = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if VARS.iter().all(|k| val(k).is_none()) {
            return Ok(None);
        }
        let need = |k: &str| {
            val(k).ok_or_else(|| {
                (
                    k.to_string(),
                    "required when running as an IoT Edge module (other IOTEDGE_* variables are set)"
                        .to_string(),
                )
            })
        };
        let scheme = need(AUTHSCHEME)?;
        if scheme != "sasToken" {
            return Err((
                AUTHSCHEME.into(),
                format!("{scheme:?} is not supported (only sasToken)"),
            ));
        }
        let env = EdgeEnv {
            hub: need(IOTHUBHOSTNAME)?,
            device_id: need(DEVICEID)?,
            module_id: need(MODULEID)?,
            gateway: val(GATEWAYHOSTNAME),
            workload_uri: need(WORKLOADURI)?,
            api_version: need(APIVERSION)?,
            generation_id: need(MODULEGENERATIONID)?,
            port: EDGEHUB_PORT,
        };
        Endpoint::parse(&env.workload_uri).map_err(|m| (WORKLOADURI.to_string(), m))?;
        for (k, v) in [
            (DEVICEID, &env.device_id),
            (MODULEID, &env.module_id),
            (MODULEGENERATIONID, &env.generation_id),
        ] {
            if v.contains(['/', '?', '#', '+']) {
                return Err((k.into(), format!("{v:?} contains / ? # or +")));
            }
        }
        Ok(Some(env))
    }

    /// Where and as whom the agent connects.
    pub fn identity(&self) -> Identity {
        Identity {
            hub: self.hub.clone(),
            connect_host: self.gateway.clone().unwrap_or_else(|| self.hub.clone()),
            port: self.port,
            device_id: self.device_id.clone(),
            module_id: Some(self.module_id.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot reach the workload API at {uri}: {message}")]
    Unreachable { uri: String, message: String },
    #[error("workload API {path}: HTTP {status}: {message}")]
    Status {
        path: String,
        status: u16,
        message: String,
    },
    #[error("workload API {path}: unreadable answer: {message}")]
    BadResponse { path: String, message: String },
    #[error("workload API: no answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    fn parse(uri: &str) -> Result<Endpoint, String> {
        if let Some(p) = uri.strip_prefix("unix://") {
            if !p.starts_with('/') {
                return Err(format!("{uri:?}: expected unix:///absolute/path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if let Some(rest) = uri.strip_prefix("http://") {
            let authority = rest.trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') {
                return Err(format!("{uri:?}: expected http://host:port"));
            }
            return Ok(Endpoint::Tcp(authority.to_string()));
        }
        Err(format!("{uri:?}: expected unix:// or http://"))
    }
}

/// A client of the IoT Edge workload API for this module.
#[derive(Debug, Clone)]
pub struct WorkloadClient {
    uri: String,
    endpoint: Endpoint,
    module_id: String,
    generation_id: String,
    api_version: String,
}

#[derive(serde::Serialize)]
struct SignRequest<'a> {
    #[serde(rename = "keyId")]
    key_id: &'a str,
    algo: &'a str,
    data: String,
}

#[derive(serde::Deserialize)]
struct SignResponse {
    digest: String,
}

#[derive(serde::Deserialize)]
struct TrustBundleResponse {
    certificate: String,
}

async fn roundtrip<S>(stream: S, req: Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

impl WorkloadClient {
    pub fn new(env: &EdgeEnv) -> Result<Self, WorkloadError> {
        let endpoint =
            Endpoint::parse(&env.workload_uri).map_err(|message| WorkloadError::Unreachable {
                uri: env.workload_uri.clone(),
                message,
            })?;
        Ok(WorkloadClient {
            uri: env.workload_uri.clone(),
            endpoint,
            module_id: env.module_id.clone(),
            generation_id: env.generation_id.clone(),
            api_version: env.api_version.clone(),
        })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, WorkloadError> {
        let path_q = format!("{path}?api-version={}", url_encode(&self.api_version));
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "localhost".to_string(),
            Endpoint::Tcp(a) => a.clone(),
        };
        let mut b = Request::builder()
            .method(method)
            .uri(&path_q)
            .header(header::HOST, host);
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| WorkloadError::BadResponse {
                path: path.into(),
                message: e.to_string(),
            })?;
        let unreachable = |message: String| WorkloadError::Unreachable {
            uri: self.uri.clone(),
            message,
        };
        let call = async {
            match &self.endpoint {
                Endpoint::Unix(p) => {
                    let s = tokio::net::UnixStream::connect(p)
                        .await
                        .map_err(|e| unreachable(e.to_string()))?;
                    roundtrip(s, req).await.map_err(unreachable)
                }
                Endpoint::Tcp(a) => {
                    let s = tokio::net::TcpStream::connect(a)
                        .await
                        .map_err(|e| unreachable(e.to_string()))?;
                    roundtrip(s, req).await.map_err(unreachable)
                }
            }
        };
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| WorkloadError::Timeout(REQUEST_TIMEOUT))??;
        if !(200..300).contains(&status) {
            return Err(WorkloadError::Status {
                path: path.into(),
                status,
                message: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            });
        }
        Ok(body)
    }

    /// base64(HMAC-SHA256(module key, data)), computed by the workload API.
    pub async fn sign(&self, data: &str) -> Result<String, WorkloadError> {
        let path = format!(
            "/modules/{}/genid/{}/sign",
            url_encode(&self.module_id),
            url_encode(&self.generation_id)
        );
        let body = serde_json::to_vec(&SignRequest {
            key_id: "primary",
            algo: "HMACSHA256",
            data: BASE64.encode(data.as_bytes()),
        })
        .map_err(|e| WorkloadError::BadResponse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let resp = self.request(Method::POST, &path, Some(body)).await?;
        let bad = |message: String| WorkloadError::BadResponse {
            path: path.clone(),
            message,
        };
        let r: SignResponse = serde_json::from_slice(&resp).map_err(|e| bad(e.to_string()))?;
        // The digest goes into the token as is: check it is what it claims.
        match BASE64.decode(r.digest.as_bytes()) {
            Ok(d) if d.len() == 32 => Ok(r.digest),
            _ => Err(bad("digest is not a base64 HMAC-SHA256".into())),
        }
    }

    /// The PEM certificates to trust for edgeHub.
    pub async fn trust_bundle(&self) -> Result<String, WorkloadError> {
        let path = "/trust-bundle";
        let resp = self.request(Method::GET, path, None).await?;
        let bad = |message: String| WorkloadError::BadResponse {
            path: path.into(),
            message,
        };
        let r: TrustBundleResponse =
            serde_json::from_slice(&resp).map_err(|e| bad(e.to_string()))?;
        // PEM text; the API description also allows it base64-encoded.
        if r.certificate.contains("-----BEGIN") {
            return Ok(r.certificate);
        }
        BASE64
            .decode(r.certificate.trim().as_bytes())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| s.contains("-----BEGIN"))
            .ok_or_else(|| bad("certificate is neither PEM nor base64 PEM".into()))
    }
}

/// rustls (ring) client config trusting exactly the given PEM certificates.
pub fn tls_trusting(pem: &str) -> Result<rustls::ClientConfig, String> {
    let roots =
        vigil_io::tls::roots_from_pem("trust bundle", pem.as_bytes()).map_err(|e| e.to_string())?;
    vigil_io::tls::client_config(roots, None).map_err(|e| e.to_string())
}

/// `edge-agent check` in module mode: (subject, ok, detail) for the module
/// identity, the workload API (trust bundle and a signature) and edgeHub's
/// MQTT port.
pub async fn check(env: &EdgeEnv) -> Vec<(String, bool, String)> {
    let id = env.identity();
    let mut out = vec![(
        "IoT Edge module".to_string(),
        true,
        format!(
            "{} at {} via {}:{}",
            id.client_id(),
            env.hub,
            id.connect_host,
            id.port
        ),
    )];
    let workload = match WorkloadClient::new(env) {
        Ok(w) => w,
        Err(e) => {
            out.push(("IoT Edge workload API".into(), false, e.to_string()));
            return out;
        }
    };
    let bundle = workload.trust_bundle().await;
    let signed = workload.sign("vigil edge-agent check").await;
    out.push(match (bundle, signed) {
        (Ok(pem), Ok(_)) => match tls_trusting(&pem) {
            Ok(_) => (
                "IoT Edge workload API".into(),
                true,
                format!("{}: trust bundle loads, signing works", env.workload_uri),
            ),
            Err(e) => ("IoT Edge workload API".into(), false, e),
        },
        (Err(e), _) | (_, Err(e)) => ("IoT Edge workload API".into(), false, e.to_string()),
    });
    let addr = format!("{}:{}", id.connect_host, id.port);
    let hub = match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    {
        Ok(Ok(_)) => (true, format!("{addr} accepts connections")),
        Ok(Err(e)) => (false, format!("{addr}: {e}")),
        Err(_) => (false, format!("{addr}: no answer within 5 s")),
    };
    out.push(("edgeHub".into(), hub.0, hub.1));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<EdgeEnv>, (String, String)> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        EdgeEnv::from_vars(|k| m.get(k).cloned())
    }

    const FULL: [(&str, &str); 8] = [
        (IOTHUBHOSTNAME, "myhub.azure-devices.net"),
        (DEVICEID, "edge-1"),
        (MODULEID, "vigil"),
        (GATEWAYHOSTNAME, "edgehub-host"),
        (WORKLOADURI, "unix:///var/run/iotedge/workload.sock"),
        (APIVERSION, "2019-01-30"),
        (MODULEGENERATIONID, "637933928617587066"),
        (AUTHSCHEME, "sasToken"),
    ];

    #[test]
    fn module_environment_is_read_and_checked_naming_the_variable() {
        assert_eq!(env(&[]).unwrap(), None);
        let e = env(&FULL).unwrap().unwrap();
        let id = e.identity();
        assert_eq!(id.client_id(), "edge-1/vigil");
        assert_eq!(id.connect_host, "edgehub-host");
        assert_eq!(id.port, 8883);
        assert_eq!(
            id.username(),
            "myhub.azure-devices.net/edge-1/vigil/?api-version=2021-04-12"
        );
        assert_eq!(
            id.resource_uri(),
            "myhub.azure-devices.net/devices/edge-1/modules/vigil"
        );
        assert_eq!(
            id.events_topic(),
            "devices/edge-1/modules/vigil/messages/events/$.ct=application%2Fx-protobuf&$.ce=identity"
        );
        let without = |k: &str| {
            let v: Vec<(&str, &str)> = FULL.iter().copied().filter(|(n, _)| *n != k).collect();
            env(&v)
        };
        assert_eq!(
            without(MODULEGENERATIONID).unwrap_err().0,
            MODULEGENERATIONID
        );
        assert_eq!(without(WORKLOADURI).unwrap_err().0, WORKLOADURI);
        // No gateway: straight to the hub.
        let direct = without(GATEWAYHOSTNAME).unwrap().unwrap();
        assert_eq!(direct.identity().connect_host, "myhub.azure-devices.net");
        let mut x509 = FULL;
        x509[7] = (AUTHSCHEME, "x509Cert");
        assert_eq!(env(&x509).unwrap_err().0, AUTHSCHEME);
        let mut bad_uri = FULL;
        bad_uri[4] = (WORKLOADURI, "ftp://x");
        assert_eq!(env(&bad_uri).unwrap_err().0, WORKLOADURI);
    }

    #[test]
    fn workload_uris() {
        assert_eq!(
            Endpoint::parse("unix:///var/run/iotedge/workload.sock"),
            Ok(Endpoint::Unix("/var/run/iotedge/workload.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("http://10.0.0.1:15581/"),
            Ok(Endpoint::Tcp("10.0.0.1:15581".into()))
        );
        assert!(Endpoint::parse("unix://relative").is_err());
        assert!(Endpoint::parse("https://x").is_err());
    }
}
