//! The HTTPS uplink with the real binaries, rcgen-made CAs and certificates:
//! - mutual TLS (`[server.tls] client_auth = "required"`): the hub refuses an
//!   agent without a client certificate and one whose certificate another CA
//!   issued (nothing arrives; the agent keeps its readings), and accepts the
//!   agent once it presents a certificate from the configured CA, with zstd
//!   compression on (`uplink.compression = "zstd"`): the kept readings and
//!   the new ones reach the hub;
//! - CA pinning: an agent whose `uplink.ca_file` is CA A refuses a hub
//!   whose certificate CA B issued, and delivers once it trusts B.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vigil_e2e::*;

const GATEWAY: &str = "gw-tls";
const DEVICE: &str = "masimo-1";
const PATIENT: &str = "p-tls";

struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("Vigil test {name}"));
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Ca { params, key }
    }

    /// Writes `{file}.crt` and `{file}.key` (0600).
    fn issue(&self, dir: &Path, file: &str, names: &[&str], client: bool) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
        write_private(&dir.join(format!("{file}.key")), &key.serialize_pem()).unwrap();
    }
}

struct Rig {
    _guard: Option<tempfile::TempDir>,
    dir: std::path::PathBuf,
    hub: Hub,
    _pty: PtyPair,
    _sim: Proc,
}

/// A TLS hub (`tls` is the `[server.tls]` body) and a Masimo simulator.
fn rig(name: &str, setup: impl FnOnce(&Path), tls: &str) -> Rig {
    let (guard, dir) = test_dir(name);
    let d = dir.as_path();
    setup(d);
    let hub_cfg = write_hub_config(d, "127.0.0.1:0", &[(GATEWAY, DEVICE, PATIENT)]).unwrap();
    let mut text = std::fs::read_to_string(&hub_cfg).unwrap();
    text.push_str(&format!("\n[server.tls]\n{tls}\n"));
    std::fs::write(&hub_cfg, text).unwrap();
    let token = add_gateway(&hub_cfg, GATEWAY).unwrap();
    write_private(&d.join("gateway.token"), &token).unwrap();
    let hub = start_hub(d, &hub_cfg).unwrap();
    assert!(hub.base_url.starts_with("https://"), "{}", hub.base_url);
    let pty = PtyPair::new(d, "masimo").unwrap();
    let sim = Proc::spawn(
        "device-sim",
        Command::new(bin("device-sim"))
            .args(["masimo", "--scenario", "stable", "--interval-ms", "100"])
            .arg("--port")
            .arg(&pty.device)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    Rig {
        _guard: guard,
        dir,
        hub,
        _pty: pty,
        _sim: sim,
    }
}

impl Rig {
    /// Start an agent with `uplink_extra` in `[uplink]`; its log is
    /// `{log}.log`.
    fn agent(&self, uplink_extra: &str, log: &str) -> Proc {
        let cfg = self.dir.join(format!("{log}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "gateway_id = \"{GATEWAY}\"\ndata_dir = \"agent-data\"\n[uplink]\n\
                 url = \"{}/api/v1/ingest\"\ntoken_file = \"gateway.token\"\n\
                 batch_max_wait_ms = 100\nmax_backoff_ms = 300\nrequest_timeout_ms = 2000\n\
                 shutdown_drain_ms = 500\n\
                 {uplink_extra}\n\n[[device]]\nkind = \"masimo-serial\"\nid = \"{DEVICE}\"\nport = \"{}\"\n",
                self.hub.base_url,
                self._pty.host.display()
            ),
        )
        .unwrap();
        start_agent(&self.dir, &cfg, &format!("{log}.log")).unwrap()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Readings of the device stored at the hub (read from its database, so
    /// no TLS client is needed).
    fn stored(&self) -> u64 {
        let db = rusqlite::Connection::open(self.dir.join("hub.sqlite")).unwrap();
        db.query_row(
            "SELECT COUNT(*) FROM observations WHERE device_id = ?1",
            [DEVICE],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
    }

    /// Run an agent that the TLS handshake must refuse: its log shows
    /// failed sends mentioning `why`, and nothing reaches the hub.
    fn refused(&self, uplink_extra: &str, log: &str, why: &str) {
        let mut agent = self.agent(uplink_extra, log);
        wait_for(Duration::from_secs(20), "refused sends", || {
            let l = self.log(log);
            (l.contains("send failed") && l.contains(why)).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", self.log(log)));
        assert!(agent.terminate(Duration::from_secs(10)));
        assert_eq!(self.stored(), 0, "nothing may reach the hub");
    }
}

#[test]
fn mutual_tls_admits_only_agents_with_a_certificate_of_the_client_ca_and_zstd_reaches_the_hub() {
    let rig = rig(
        "mtls",
        |d| {
            let server = Ca::new(d, "server-ca");
            server.issue(d, "hub", &["localhost", "127.0.0.1"], false);
            let agents = Ca::new(d, "agents-ca");
            agents.issue(d, "agent", &["gw-tls"], true);
            let other = Ca::new(d, "other-ca");
            other.issue(d, "stranger", &["gw-tls"], true);
        },
        "cert_file = \"hub.crt\"\nkey_file = \"hub.key\"\n\
         client_ca_file = \"agents-ca.pem\"\nclient_auth = \"required\"",
    );
    // No client certificate: the handshake fails (the hub asks for one).
    rig.refused(
        "ca_file = \"server-ca.pem\"",
        "agent-nocert",
        "CertificateRequired",
    );
    // A certificate from another CA: refused too.
    rig.refused(
        "ca_file = \"server-ca.pem\"\nclient_cert_file = \"stranger.crt\"\nclient_key_file = \"stranger.key\"",
        "agent-stranger",
        "UnknownCA",
    );
    // The agent's own certificate, zstd on: the buffered readings and the
    // new ones arrive.
    let mut agent = rig.agent(
        "ca_file = \"server-ca.pem\"\nclient_cert_file = \"agent.crt\"\nclient_key_file = \"agent.key\"\n\
         compression = \"zstd\"",
        "agent-good",
    );
    let n = wait_for(Duration::from_secs(30), "readings at the hub", || {
        let n = rig.stored();
        (n >= 60).then_some(n)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}; agent log:\n{}\nhub log:\n{}",
            rig.log("agent-good"),
            rig.log("hub")
        )
    });
    assert!(agent.terminate(Duration::from_secs(10)));
    assert!(n >= 60);
    assert!(
        !rig.log("agent-good").contains("send failed"),
        "{}",
        rig.log("agent-good")
    );
}

#[test]
fn an_agent_pinned_to_one_ca_refuses_a_hub_certified_by_another() {
    let rig = rig(
        "pinning",
        |d| {
            let _a = Ca::new(d, "ca-a");
            let b = Ca::new(d, "ca-b");
            b.issue(d, "hub", &["localhost", "127.0.0.1"], false);
        },
        "cert_file = \"hub.crt\"\nkey_file = \"hub.key\"",
    );
    // Pinned to CA A: the hub's certificate (CA B) is not trusted.
    rig.refused(
        "ca_file = \"ca-a.pem\"",
        "agent-pinned-a",
        "invalid peer certificate: UnknownIssuer",
    );
    // Trusting CA B, the same agent delivers what it kept and what is new.
    let mut agent = rig.agent("ca_file = \"ca-b.pem\"", "agent-b");
    wait_for(Duration::from_secs(30), "readings at the hub", || {
        (rig.stored() >= 60).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", rig.log("agent-b")));
    assert!(agent.terminate(Duration::from_secs(10)));
}
