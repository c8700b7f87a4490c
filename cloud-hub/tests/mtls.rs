//! Mutual TLS (`[server.tls] client_ca_file`, `client_auth`): rcgen-made
//! CAs and certificates. Required mode refuses a client without a
//! certificate and one whose certificate another CA issued, and serves one
//! with a certificate from the configured CA; optional mode also serves a
//! client without a certificate but still refuses a foreign one.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

struct Ca {
    pem: String,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { pem, params, key }
    }

    /// (certificate PEM, key PEM) for `name`, for a server or a client.
    fn issue(&self, name: &str, client: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A hub serving HTTPS with a certificate from `server_ca` and client
/// certificates checked against `client_ca` in `mode`.
async fn hub(server_ca: &Ca, client_ca: &Ca, mode: &str) -> TestHub {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = server_ca.issue("localhost", false);
    std::fs::write(dir.path().join("hub.crt"), cert).unwrap();
    write_private(&dir.path().join("hub.key"), &key);
    std::fs::write(dir.path().join("clients-ca.pem"), &client_ca.pem).unwrap();
    let tls = format!(
        "[server.tls]\ncert_file = \"hub.crt\"\nkey_file = \"hub.key\"\n\
         client_ca_file = \"clients-ca.pem\"\nclient_auth = \"{mode}\"\n"
    );
    let mut config = cloud_hub::Config::parse(&config_text(dir.path(), &tls)).unwrap();
    config.resolve_paths(dir.path());
    TestHub::start_config(dir, config, "https").await
}

/// A client trusting `server_ca`, presenting `identity` if given.
fn client(server_ca: &Ca, identity: Option<(String, String)>, hub: &TestHub) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(server_ca.pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let tls = match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .resolve("localhost", hub.addr)
        .build()
        .unwrap()
}

async fn healthz(c: &reqwest::Client, hub: &TestHub) -> Result<u16, reqwest::Error> {
    let url = format!("https://localhost:{}/healthz", hub.addr.port());
    c.get(url).send().await.map(|r| r.status().as_u16())
}

#[tokio::test]
async fn required_client_auth_admits_only_certificates_of_the_client_ca() {
    let server_ca = Ca::new("Vigil test server CA");
    let agents_ca = Ca::new("Vigil test agents CA");
    let other_ca = Ca::new("Someone else's CA");
    let hub = hub(&server_ca, &agents_ca, "required").await;

    let none = client(&server_ca, None, &hub);
    assert!(
        healthz(&none, &hub).await.is_err(),
        "no client certificate: refused"
    );
    let foreign = client(&server_ca, Some(other_ca.issue("gw-1", true)), &hub);
    assert!(
        healthz(&foreign, &hub).await.is_err(),
        "certificate of another CA: refused"
    );
    let good = client(&server_ca, Some(agents_ca.issue("gw-1", true)), &hub);
    assert_eq!(healthz(&good, &hub).await.unwrap(), 200);
    // The agent's request itself goes through (token still required).
    let resp = good
        .post(format!(
            "https://localhost:{}{}",
            hub.addr.port(),
            shared_protocol::INGEST_PATH
        ))
        .header("content-type", shared_protocol::CONTENT_TYPE_PROTOBUF)
        .bearer_auth(&hub.token)
        .body(prost::Message::encode_to_vec(&batch(
            1,
            DEVICE,
            vec![spo2(1, 97.0, T0)],
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    hub.stop().await;
}

#[tokio::test]
async fn optional_client_auth_admits_no_certificate_but_refuses_a_foreign_one() {
    let server_ca = Ca::new("Vigil test server CA");
    let agents_ca = Ca::new("Vigil test agents CA");
    let other_ca = Ca::new("Someone else's CA");
    let hub = hub(&server_ca, &agents_ca, "optional").await;
    let none = client(&server_ca, None, &hub);
    assert_eq!(healthz(&none, &hub).await.unwrap(), 200);
    let good = client(&server_ca, Some(agents_ca.issue("gw-1", true)), &hub);
    assert_eq!(healthz(&good, &hub).await.unwrap(), 200);
    let foreign = client(&server_ca, Some(other_ca.issue("gw-1", true)), &hub);
    assert!(healthz(&foreign, &hub).await.is_err());
    hub.stop().await;
}

#[test]
fn client_auth_needs_a_client_ca_and_a_readable_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let (cert, key) = ca.issue("localhost", false);
    std::fs::write(dir.path().join("hub.crt"), cert).unwrap();
    write_private(&dir.path().join("hub.key"), &key);
    let parse = |tls_extra: &str| {
        let tls =
            format!("[server.tls]\ncert_file = \"hub.crt\"\nkey_file = \"hub.key\"\n{tls_extra}");
        let mut c = cloud_hub::Config::parse(&config_text(dir.path(), &tls)).unwrap();
        c.resolve_paths(dir.path());
        c
    };
    let err = cloud_hub::Hub::open(parse("client_auth = \"required\"\n")).unwrap_err();
    assert!(err.to_string().contains("server.tls.client_auth"), "{err}");
    let err = cloud_hub::Hub::open(parse("client_ca_file = \"missing.pem\"\n")).unwrap_err();
    assert!(
        err.to_string().contains("server.tls.client_ca_file"),
        "{err}"
    );
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let err = cloud_hub::Hub::open(parse("client_ca_file = \"empty.pem\"\n")).unwrap_err();
    assert!(err.to_string().contains("no CA certificate"), "{err}");
    assert!(
        cloud_hub::Config::parse(&config_text(
            dir.path(),
            "[server.tls]\ncert_file = \"a\"\nkey_file = \"b\"\nclient_auth = \"sometimes\"\n"
        ))
        .is_err()
    );
}
