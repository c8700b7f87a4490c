//! HTTPS uplink to the hub: POST a protobuf `Batch`, read a protobuf
//! `BatchAck`. TLS is rustls with the ring provider; roots are the public web
//! roots or a configured CA bundle.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use shared_protocol::CONTENT_TYPE_PROTOBUF;
use shared_protocol::v1::{Batch, BatchAck};

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot reach the hub: {0}")]
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
}

/// rustls client config with the ring provider.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, UplinkError> {
    tls_config_with(ca_file, None)
}

/// A client certificate chain and its private key.
pub type ClientIdentity = (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// rustls client config with the ring provider, optionally presenting a
/// client certificate.
pub fn tls_config_with(
    ca_file: Option<&Path>,
    client: Option<ClientIdentity>,
) -> Result<rustls::ClientConfig, UplinkError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| UplinkError::Tls(format!("{}: {e}", path.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| UplinkError::Tls(format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(UplinkError::Tls(format!(
                    "{}: no certificates",
                    path.display()
                )));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| UplinkError::Tls(format!("{}: {e}", path.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UplinkError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| UplinkError::Tls(format!("client certificate: {e}"))),
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
            AnyUplink::IotHub(u) => u.send(batch).await.map(|()| Delivery::BrokerAck),
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
        let url = reqwest::Url::parse(url).map_err(|e| UplinkError::Tls(e.to_string()))?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(ca_file)?)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("vigil-edge-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(UplinkError::Transport)?;
        Ok(Uplink {
            client,
            url,
            auth: format!("Bearer {token}"),
        })
    }

    /// Send one batch and return the hub's ack.
    pub async fn send(&self, batch: &Batch) -> Result<BatchAck, UplinkError> {
        let resp = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, CONTENT_TYPE_PROTOBUF)
            .header(AUTHORIZATION, &self.auth)
            .body(batch.encode_to_vec())
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
