//! rustls configurations, always with the ring provider (never OpenSSL or
//! aws-lc): the servers' (HTTPS API, MLLP listeners; optional client
//! certificate verification) and the clients' (uplink, IoT Hub, MQTT,
//! PostgreSQL, OTLP export; a pinned CA file or the public webpki roots,
//! optionally a client certificate).
//!
//! PEM files are named in errors by the setting they came from
//! ([`PemFile::setting`], e.g. `server.tls.key_file`) and their path, so a
//! message tells the operator what to fix. Private keys must not be
//! accessible by group or others (unix).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A PEM file and the setting that named it.
#[derive(Debug, Clone, Copy)]
pub struct PemFile<'a> {
    /// The configuration key or variable (`adt.tls_cert_file`), or empty
    /// when there is none to name (errors then show the path alone).
    pub setting: &'a str,
    pub path: &'a Path,
}

impl<'a> PemFile<'a> {
    pub fn new(setting: &'a str, path: &'a Path) -> Self {
        PemFile { setting, path }
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{}{}: {reason}", prefix(.setting), .path.display())]
    File {
        setting: String,
        path: PathBuf,
        reason: String,
    },
    /// A private key file that group or others may access.
    #[error("{}{} is accessible by group or others; chmod 600 it", prefix(.setting), .path.display())]
    KeyExposed { setting: String, path: PathBuf },
    /// PEM text that came from elsewhere than a file (e.g. a trust bundle
    /// fetched over an API).
    #[error("{what}: {reason}")]
    Pem { what: String, reason: String },
    /// rustls refused the protocol versions (not expected with ring).
    #[error("{0}")]
    Protocol(rustls::Error),
    /// The server certificate chain and key do not go together.
    #[error("certificate/key: {0}")]
    CertKey(rustls::Error),
    /// The client certificate chain and key do not go together.
    #[error("client certificate: {0}")]
    ClientCert(rustls::Error),
}

fn prefix(setting: &str) -> String {
    if setting.is_empty() {
        String::new()
    } else {
        format!("{setting} ")
    }
}

fn file_err(f: PemFile<'_>, reason: impl ToString) -> TlsError {
    TlsError::File {
        setting: f.setting.to_owned(),
        path: f.path.to_owned(),
        reason: reason.to_string(),
    }
}

/// The ring crypto provider every configuration here is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain (leaf first); at least one certificate.
pub fn load_certs(f: PemFile<'_>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(f.path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_err(f, e))?;
    if certs.is_empty() {
        return Err(file_err(f, "no certificates found"));
    }
    Ok(certs)
}

/// The CA certificates of a PEM file as trust anchors; at least one.
pub fn load_roots(f: PemFile<'_>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    add_roots(&mut roots, f)?;
    Ok(roots)
}

/// Adds the CA certificates of a PEM file to `roots` (at least one).
pub fn add_roots(roots: &mut RootCertStore, f: PemFile<'_>) -> Result<(), TlsError> {
    let certs = CertificateDer::pem_file_iter(f.path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_err(f, e))?;
    if certs.is_empty() {
        return Err(file_err(f, "no CA certificate found"));
    }
    for c in certs {
        roots.add(c).map_err(|e| file_err(f, e))?;
    }
    Ok(())
}

/// Trust anchors from PEM text (`what` names it in errors); at least one.
pub fn roots_from_pem(what: &str, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let err = |reason: String| TlsError::Pem {
        what: what.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificates".into()));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| err(e.to_string()))?;
    }
    Ok(roots)
}

/// The public web PKI roots (Mozilla's list, compiled in).
pub fn public_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    roots
}

/// The CA file's certificates when one is pinned, else the public roots.
pub fn pinned_or_public_roots(ca: Option<PemFile<'_>>) -> Result<RootCertStore, TlsError> {
    match ca {
        Some(f) => load_roots(f),
        None => Ok(public_roots()),
    }
}

/// A private key (PKCS#8, PKCS#1 or SEC1 PEM). On unix the file must not
/// be accessible by group or others.
pub fn load_private_key(f: PemFile<'_>) -> Result<PrivateKeyDer<'static>, TlsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(f.path).map_err(|e| file_err(f, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(TlsError::KeyExposed {
                setting: f.setting.to_owned(),
                path: f.path.to_owned(),
            });
        }
    }
    PrivateKeyDer::from_pem_file(f.path).map_err(|e| file_err(f, e))
}

/// A certificate chain with its private key (a client's or a server's).
#[derive(Debug)]
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads the chain and the key ([`load_certs`], [`load_private_key`]).
    pub fn load(cert: PemFile<'_>, key: PemFile<'_>) -> Result<Self, TlsError> {
        Ok(Identity {
            certs: load_certs(cert)?,
            key: load_private_key(key)?,
        })
    }
}

/// A client configuration trusting `roots`, presenting `identity` when
/// given (mutual TLS).
pub fn client_config(
    roots: RootCertStore,
    identity: Option<Identity>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => builder
            .with_client_auth_cert(id.certs, id.key)
            .map_err(TlsError::ClientCert),
    }
}

/// Whether a server asks its clients for a certificate.
#[derive(Debug, Clone, Copy)]
pub enum ClientAuth<'a> {
    /// No client certificates.
    None,
    /// Every client must present a certificate issued by a CA of the file.
    Required(PemFile<'a>),
    /// A client may present one (then it must verify); clients without a
    /// certificate are admitted too.
    Optional(PemFile<'a>),
}

/// A server configuration with the chain and key of `identity`.
pub fn server_config(identity: Identity, auth: ClientAuth<'_>) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?;
    let builder = match auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required(ca) | ClientAuth::Optional(ca) => {
            let roots = load_roots(ca)?;
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let v = if matches!(auth, ClientAuth::Optional(_)) {
                v.allow_unauthenticated()
            } else {
                v
            };
            builder.with_client_cert_verifier(v.build().map_err(|e| file_err(ca, e))?)
        }
    };
    builder
        .with_single_cert(identity.certs, identity.key)
        .map_err(TlsError::CertKey)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A throwaway CA, a server certificate for `localhost` and a client
    /// certificate it issued, as PEM files in a temporary directory.
    pub(crate) struct Pki {
        pub dir: tempfile::TempDir,
        pub ca: PathBuf,
        pub cert: PathBuf,
        pub key: PathBuf,
        pub client_cert: PathBuf,
        pub client_key: PathBuf,
    }

    impl Pki {
        pub(crate) fn new() -> Pki {
            use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
            let dir = tempfile::tempdir().unwrap();
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_key = KeyPair::generate().unwrap();
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let leaf = |name: &str| {
                let key = KeyPair::generate().unwrap();
                let cert = CertificateParams::new(vec![name.to_owned()])
                    .unwrap()
                    .signed_by(&key, &issuer)
                    .unwrap();
                (cert.pem(), key.serialize_pem())
            };
            let write = |name: &str, text: &str, mode: u32| {
                let p = dir.path().join(name);
                std::fs::write(&p, text).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
                p
            };
            let (sc, sk) = leaf("localhost");
            let (cc, ck) = leaf("client-1");
            Pki {
                ca: write("ca.pem", &ca_cert.pem(), 0o644),
                cert: write("server.pem", &sc, 0o644),
                key: write("server.key", &sk, 0o600),
                client_cert: write("client.pem", &cc, 0o644),
                client_key: write("client.key", &ck, 0o600),
                dir,
            }
        }

        pub(crate) fn server(&self, auth: ClientAuth<'_>) -> Arc<ServerConfig> {
            let id = Identity::load(
                PemFile::new("cert_file", &self.cert),
                PemFile::new("key_file", &self.key),
            )
            .unwrap();
            Arc::new(server_config(id, auth).unwrap())
        }

        pub(crate) fn client(&self, with_cert: bool) -> Arc<ClientConfig> {
            let roots = load_roots(PemFile::new("ca_file", &self.ca)).unwrap();
            let id = with_cert.then(|| {
                Identity::load(
                    PemFile::new("client_cert_file", &self.client_cert),
                    PemFile::new("client_key_file", &self.client_key),
                )
                .unwrap()
            });
            Arc::new(client_config(roots, id).unwrap())
        }
    }

    #[test]
    fn errors_name_the_setting_and_the_path() {
        let pki = Pki::new();
        let missing = pki.dir.path().join("missing.pem");
        let e = load_certs(PemFile::new("adt.tls_cert_file", &missing)).unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with(&format!("adt.tls_cert_file {}: ", missing.display())),
            "{s}"
        );
        // A key file holds no certificate; a certificate file no key.
        let e = load_certs(PemFile::new("", &pki.key))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!("{}: no certificates found", pki.key.display()),
            "without a setting the path alone"
        );
        let e = load_roots(PemFile::new("ca_file", &pki.key)).unwrap_err();
        assert!(e.to_string().contains("no CA certificate found"), "{e}");
        let e = load_private_key(PemFile::new("k", &pki.cert));
        assert!(e.is_err(), "a world-readable certificate is no key");
        std::fs::set_permissions(&pki.client_key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_private_key(PemFile::new("tls_key_file", &pki.client_key)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "tls_key_file {} is accessible by group or others; chmod 600 it",
                pki.client_key.display()
            )
        );
        let e = roots_from_pem("trust bundle", b"not pem").unwrap_err();
        assert_eq!(e.to_string(), "trust bundle: no certificates");
        let pem = std::fs::read(&pki.ca).unwrap();
        assert_eq!(roots_from_pem("trust bundle", &pem).unwrap().len(), 1);
    }

    #[test]
    fn client_auth_needs_a_ca_file_with_a_certificate() {
        let pki = Pki::new();
        let id =
            || Identity::load(PemFile::new("c", &pki.cert), PemFile::new("k", &pki.key)).unwrap();
        let e = server_config(
            id(),
            ClientAuth::Required(PemFile::new("client_ca_file", &pki.key)),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("client_ca_file ")
                && e.to_string().contains("no CA certificate"),
            "{e}"
        );
        server_config(
            id(),
            ClientAuth::Optional(PemFile::new("client_ca_file", &pki.ca)),
        )
        .unwrap();
        // The client key does not belong to the server certificate.
        let mismatched = Identity {
            certs: load_certs(PemFile::new("c", &pki.cert)).unwrap(),
            key: load_private_key(PemFile::new("k", &pki.client_key)).unwrap(),
        };
        let e = server_config(mismatched, ClientAuth::None).unwrap_err();
        assert!(e.to_string().starts_with("certificate/key: "), "{e}");
        assert!(!public_roots().is_empty());
        assert!(pinned_or_public_roots(None).unwrap().len() > 50);
    }

    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<Option<Vec<CertificateDer<'static>>>, std::io::Error> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        let s = s?;
        c?;
        Ok(s.get_ref().1.peer_certificates().map(|c| c.to_vec()))
    }

    #[tokio::test]
    async fn handshakes_with_and_without_client_certificates() {
        let pki = Pki::new();
        let ca = PemFile::new("client_ca_file", &pki.ca);
        // Plain server TLS.
        let peer = handshake(pki.server(ClientAuth::None), pki.client(false)).await;
        assert_eq!(peer.unwrap(), None);
        // Required: a client certificate is verified and seen; none is refused.
        let peer = handshake(pki.server(ClientAuth::Required(ca)), pki.client(true)).await;
        assert_eq!(peer.unwrap().map(|c| c.len()), Some(1));
        let refused = handshake(pki.server(ClientAuth::Required(ca)), pki.client(false)).await;
        assert!(refused.is_err(), "no client certificate, required");
        // Optional: both kinds of client are admitted.
        let peer = handshake(pki.server(ClientAuth::Optional(ca)), pki.client(false)).await;
        assert_eq!(peer.unwrap(), None);
        let peer = handshake(pki.server(ClientAuth::Optional(ca)), pki.client(true)).await;
        assert!(peer.unwrap().is_some());
        // A client pinning the public roots does not trust the private CA.
        let public = Arc::new(client_config(public_roots(), None).unwrap());
        let e = handshake(pki.server(ClientAuth::None), public).await;
        assert!(e.is_err());
    }
}
