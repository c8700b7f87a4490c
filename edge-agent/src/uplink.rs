//! HTTPS uplink to the hub: POST a protobuf `Batch`, read a protobuf
//! `BatchAck`. TLS is rustls with the ring provider; roots are the public web
//! roots, or, when `uplink.ca_file` is set, only that CA bundle (pinning: the
//! public roots are then not trusted). Optionally the agent presents a client
//! certificate (`uplink.client_cert_file` + `client_key_file`, key 0600) and
//! compresses batches with zstd (`Content-Encoding: zstd`).

use std::path::Path;
use std::time::Duration;

use prost::Message;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use shared_protocol::CONTENT_TYPE_PROTOBUF;
use shared_protocol::v1::{Batch, BatchAck};
use vigil_io::tls::{self, PemFile};

use crate::config::{Compression, UplinkConfig};

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot reach the hub: {}", error_chain(.0))]
    Transport(#[source] reqwest::Error),
    #[error("hub refused the gateway's credentials (HTTP {status}): {message}")]
    Unauthorized { status: u16, message: String },
    #[error("hub says the batch is too large (HTTP 413)")]
    TooLarge,
    #[error("hub is busy (HTTP {status})")]
    Busy {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("hub rejected the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("hub answered with an unreadable ack: {0}")]
    BadAck(String),
    #[error("IoT Hub device credentials: {0}")]
    Credentials(String),
    #[error("IoT Hub MQTT: {0}")]
    Mqtt(String),
    #[error(
        "IoT Hub refused the MQTT connection (CONNACK {0}); check the device id and key/certificate"
    )]
    MqttRefused(String),
    #[error("message of {bytes} bytes exceeds IoT Hub's limit of {max} bytes")]
    MessageTooLarge { bytes: usize, max: usize },
    #[error("compressing the batch: {0}")]
    Compress(String),
}

/// An error and its causes, `: `-separated (reqwest's own message leaves
/// out the cause, e.g. which TLS check failed).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cause = c.source();
    }
    s
}

impl UplinkError {
    /// How long the hub asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UplinkError::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Uplink {
    client: reqwest::Client,
    url: reqwest::Url,
    auth: String,
    compression: Compression,
}

/// zstd level for batches: fast, and most of the gain on protobuf readings.
const ZSTD_LEVEL: i32 = 3;

/// The encoded batch, compressed per `c`. zstd makes one frame that records
/// its content size (so the receiver's window need not exceed the batch).
pub fn encode_batch(batch: &Batch, c: Compression) -> Result<Vec<u8>, UplinkError> {
    let plain = batch.encode_to_vec();
    match c {
        Compression::None => Ok(plain),
        Compression::Zstd => zstd::bulk::compress(&plain, ZSTD_LEVEL)
            .map_err(|e| UplinkError::Compress(e.to_string())),
    }
}

/// Load a client certificate chain and its private key (the key file must
/// not be accessible by group or others). Errors name the `[uplink]` key.
pub fn load_client_identity(cert: &Path, key: &Path) -> Result<ClientIdentity, UplinkError> {
    let id = tls::Identity::load(
        PemFile::new("client_cert_file", cert),
        PemFile::new("client_key_file", key),
    )?;
    Ok((id.certs, id.key))
}

/// The TLS client config of the HTTPS uplink per `[uplink]`: `ca_file`
/// (pinned) or the public roots, and the client certificate if configured.
pub fn https_tls_config(u: &UplinkConfig) -> Result<rustls::ClientConfig, UplinkError> {
    let identity = match (&u.client_cert_file, &u.client_key_file) {
        (Some(c), Some(k)) => Some(load_client_identity(c, k)?),
        _ => None,
    };
    tls_config_with(u.ca_file.as_deref(), identity)
}

/// rustls client config with the ring provider.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, UplinkError> {
    tls_config_with(ca_file, None)
}

/// A client certificate chain and its private key.
pub type ClientIdentity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// rustls client config with the ring provider (the common builder of
/// [`vigil_io::tls`]): `ca_file` pinned or the public roots, optionally
/// presenting a client certificate.
pub fn tls_config_with(
    ca_file: Option<&Path>,
    client: Option<ClientIdentity>,
) -> Result<rustls::ClientConfig, UplinkError> {
    let roots = tls::pinned_or_public_roots(ca_file.map(|p| PemFile::new("", p)))?;
    let identity = client.map(|(certs, key)| tls::Identity { certs, key });
    Ok(tls::client_config(roots, identity)?)
}

impl From<tls::TlsError> for UplinkError {
    fn from(e: tls::TlsError) -> Self {
        UplinkError::Tls(e.to_string())
    }
}

/// What a successful send means.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// The hub stored the batch and said so (HTTPS path); the forwarder
    /// checks that the ack matches the batch.
    HubAck(BatchAck),
    /// The message broker (IoT Hub) acknowledged the QoS 1 publish (PUBACK).
    /// No per-reading outcome: the cloud-side consumer de-duplicates by
    /// reading identity.
    BrokerAck,
}

/// The configured uplink.
#[derive(Debug)]
pub enum AnyUplink {
    Https(Uplink),
    IotHub(Box<crate::iothub::IotHubUplink>),
}

impl AnyUplink {
    /// Send one batch; `Ok` only once it is delivered in the uplink's sense.
    pub async fn send(&mut self, batch: &Batch) -> Result<Delivery, UplinkError> {
        match self {
            AnyUplink::Https(u) => u.send(batch).await.map(Delivery::HubAck),
            AnyUplink::IotHub(u) => u.send(batch).await.map(|a| match a {
                Some(ack) => Delivery::HubAck(ack),
                None => Delivery::BrokerAck,
            }),
        }
    }
}

impl Uplink {
    pub fn new(
        url: &str,
        token: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Self, UplinkError> {
        Self::with_tls(url, token, tls_config(ca_file)?, timeout, Compression::None)
    }

    /// The uplink `[uplink]` describes: URL, pinned CA or public roots,
    /// client certificate, timeout and compression.
    pub fn from_config(u: &UplinkConfig, token: &str) -> Result<Self, UplinkError> {
        Self::with_tls(
            &u.url,
            token,
            https_tls_config(u)?,
            u.request_timeout(),
            u.compression,
        )
    }

    /// An uplink with an explicit TLS client config.
    pub fn with_tls(
        url: &str,
        token: &str,
        tls: rustls::ClientConfig,
        timeout: Duration,
        compression: Compression,
    ) -> Result<Self, UplinkError> {
        let url = reqwest::Url::parse(url).map_err(|e| UplinkError::Tls(e.to_string()))?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("vigil-edge-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(UplinkError::Transport)?;
        Ok(Uplink {
            client,
            url,
            auth: format!("Bearer {token}"),
            compression,
        })
    }

    /// Send one batch and return the hub's ack.
    pub async fn send(&self, batch: &Batch) -> Result<BatchAck, UplinkError> {
        let mut req = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, CONTENT_TYPE_PROTOBUF)
            .header(AUTHORIZATION, &self.auth);
        if self.compression == Compression::Zstd {
            req = req.header(CONTENT_ENCODING, "zstd");
        }
        let resp = req
            .body(encode_batch(batch, self.compression)?)
            .send()
            .await
            .map_err(UplinkError::Transport)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp.bytes().await.map_err(UplinkError::Transport)?;
        let message = || String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        match status {
            200 => BatchAck::decode(body.as_ref()).map_err(|e| UplinkError::BadAck(e.to_string())),
            401 | 403 => Err(UplinkError::Unauthorized {
                status,
                message: message(),
            }),
            413 => Err(UplinkError::TooLarge),
            429 | 502..=504 => Err(UplinkError::Busy {
                status,
                retry_after,
            }),
            _ => Err(UplinkError::Rejected {
                status,
                message: message(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn zstd_batches_decode_to_the_same_batch() {
        let b = Batch {
            gateway_id: "gw-1".into(),
            sequence: 7,
            agent_version: "x".repeat(300),
            ..Default::default()
        };
        let plain = encode_batch(&b, Compression::None).unwrap();
        assert_eq!(plain, b.encode_to_vec());
        let z = encode_batch(&b, Compression::Zstd).unwrap();
        assert!(z.len() < plain.len());
        let back = zstd::decode_all(&z[..]).unwrap();
        assert_eq!(Batch::decode(&back[..]).unwrap(), b);
    }

    #[test]
    fn client_key_must_be_private_and_both_files_must_hold_pem() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["gw-1".to_owned()]).unwrap();
        let cert = dir.path().join("a.crt");
        let key = dir.path().join("a.key");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_client_identity(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (chain, _) = load_client_identity(&cert, &key).unwrap();
        assert_eq!(chain.len(), 1);
        let e = load_client_identity(&key, &key).unwrap_err().to_string();
        assert!(e.contains("no certificates"), "{e}");
        // With a pinned CA and the identity, the TLS config builds.
        std::fs::write(dir.path().join("ca.pem"), ck.cert.pem()).unwrap();
        let toml = format!(
            "url = \"https://hub.example.org/api/v1/ingest\"\nca_file = \"{}\"\n\
             client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            dir.path().join("ca.pem").display(),
            cert.display(),
            key.display()
        );
        let u: UplinkConfig = toml::from_str(&toml).unwrap();
        https_tls_config(&u).unwrap();
    }
}
