//! HTTPS serving (rcgen self-signed certificate), the plaintext-off-loopback
//! refusal, and the binary's CLI contract.

use crate::common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn write_cert(dir: &Path, key_mode: u32) -> String {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = ck.cert.pem();
    std::fs::write(dir.join("hub.crt"), &cert_pem).unwrap();
    let key = dir.join("hub.key");
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(key_mode)).unwrap();
    cert_pem
}

const TLS_SECTION: &str = "[server.tls]\ncert_file = \"hub.crt\"\nkey_file = \"hub.key\"\n";

fn tls_config(dir: &Path) -> cloud_hub::Config {
    let mut config = cloud_hub::Config::parse(&config_text(dir, TLS_SECTION)).unwrap();
    config.resolve_paths(dir);
    config
}

#[tokio::test]
async fn serves_https_with_rustls() {
    let dir = tempfile::tempdir().unwrap();
    let cert_pem = write_cert(dir.path(), 0o600);
    let config = tls_config(dir.path());
    let hub = TestHub::start_config(dir, config, "https").await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap()])
        .resolve("localhost", hub.addr)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/healthz", hub.addr.port());
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");

    // Links are https when derived from the request.
    let r = client
        .get(format!(
            "https://localhost:{}/fhir/Observation",
            hub.addr.port()
        ))
        .bearer_auth(&hub.reader)
        .send()
        .await
        .unwrap();
    let b: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert!(
        b["link"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with("https://localhost:"),
        "{b}"
    );

    // A client that does not trust the certificate fails the handshake.
    let untrusting = reqwest::Client::builder()
        .tls_certs_only([])
        .resolve("localhost", hub.addr)
        .build()
        .unwrap();
    assert!(untrusting.get(&url).send().await.is_err());

    // Plain HTTP against the TLS port does not get a response.
    assert!(
        hub.client
            .get(format!("http://{}/healthz", hub.addr))
            .send()
            .await
            .is_err()
    );
    hub.stop().await;
}

#[test]
fn key_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), 0o644);
    let err = cloud_hub::Hub::open(tls_config(dir.path())).unwrap_err();
    assert!(err.to_string().contains("server.tls.key_file"), "{err}");
}

#[tokio::test]
async fn plaintext_on_a_non_loopback_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = cloud_hub::Config::parse(&config_text(dir.path(), "")).unwrap();
    config.apply_overrides(Some("0.0.0.0:8080".into()), None);
    let err = cloud_hub::Hub::open(config.clone()).unwrap_err();
    assert!(err.to_string().contains("server.tls"), "{err}");
    // run() refuses too, before serving anything.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = cloud_hub::run(config.clone(), listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("server.tls"), "{err}");
    // With the explicit opt-in it opens.
    config.server.allow_plaintext = true;
    cloud_hub::Hub::open(config).unwrap();
}

const BIN: &str = env!("CARGO_BIN_EXE_cloud-hub");

fn write_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("hub.toml");
    std::fs::write(
        &path,
        "[server]\nbind = \"127.0.0.1:0\"\n[storage]\nsqlite_path = \"hub.sqlite\"\n",
    )
    .unwrap();
    path
}

fn hub_cmd(config: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config")
        .arg(config)
        .env_remove("VIGIL_HUB_BIND")
        .env_remove("VIGIL_HUB_SQLITE_PATH");
    c
}

#[test]
fn cli_gateway_add_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let out = hub_cmd(&config)
        .args(["gateway", "add", "gw-cli"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout:?}");
    let token = lines[0];
    assert!(token.starts_with("vgt_") && token.len() == 68, "{token}");
    // The relative sqlite_path is relative to the config file.
    assert!(dir.path().join("hub.sqlite").exists());

    let out = hub_cmd(&config)
        .args(["gateway", "add", "gw-cli"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let out = hub_cmd(&config).args(["gateway", "list"]).output().unwrap();
    assert!(out.status.success());
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(
        list.contains("gw-cli") && !list.contains(&token[4..]),
        "{list}"
    );

    let out = hub_cmd(&config)
        .args(["gateway", "revoke", "gw-cli"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = hub_cmd(&config)
        .args(["gateway", "revoke", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let out = hub_cmd(&config)
        .args(["gateway", "add", "bad id"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn cli_serve_prints_the_address_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let mut child = hub_cmd(&config)
        .args(["serve", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let url = line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let r = client().get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn cli_serve_refuses_plaintext_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let out = hub_cmd(&config)
        .env("VIGIL_HUB_BIND", "0.0.0.0:0")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.tls"));
    // Gateway administration is not a serving concern and still works.
    let out = hub_cmd(&config)
        .env("VIGIL_HUB_BIND", "0.0.0.0:0")
        .args(["gateway", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
