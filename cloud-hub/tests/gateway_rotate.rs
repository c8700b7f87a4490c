//! `cloud-hub gateway rotate <id> [--grace-secs N]`: a new token printed
//! once; the old one stops working at once, or after the grace period
//! during which both work. Run against a serving hub on the same database.

use crate::common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{DEVICE, GATEWAY, TestHub, batch, now_us, spo2};
use prost::Message;
use shared_protocol::CONTENT_TYPE_PROTOBUF;

const BIN: &str = env!("CARGO_BIN_EXE_cloud-hub");

/// A config file for the CLI naming the test hub's database.
fn cli_config(hub: &TestHub) -> PathBuf {
    let path = hub.dir.path().join("cli.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[storage]\nsqlite_path = \"{}\"\n",
            hub.config.storage.sqlite_path.display()
        ),
    )
    .unwrap();
    path
}

fn cli(hub: &TestHub, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--config")
        .arg(cli_config(hub))
        .args(args)
        .env_remove("VIGIL_HUB_BIND")
        .env_remove("VIGIL_HUB_SQLITE_PATH")
        .output()
        .unwrap()
}

fn rotate(hub: &TestHub, args: &[&str]) -> String {
    let mut all = vec!["gateway", "rotate", GATEWAY];
    all.extend_from_slice(args);
    let out = cli(hub, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the token on stdout: {stdout:?}");
    assert!(lines[0].starts_with("vgt_") && lines[0].len() == 68);
    lines[0].to_owned()
}

/// HTTP status of an ingest with `token`.
async fn status(hub: &TestHub, token: &str, seq: u64) -> u16 {
    let b = batch(seq, DEVICE, vec![spo2(seq, 97.0, now_us() - 1_000_000)]);
    hub.post_raw(Some(token), CONTENT_TYPE_PROTOBUF, b.encode_to_vec())
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn rotate_without_grace_stops_the_old_token_at_once() {
    let hub = TestHub::start().await;
    let old = hub.token.clone();
    assert_eq!(status(&hub, &old, 1).await, 200);
    let new = rotate(&hub, &[]);
    assert_ne!(new, old);
    assert_eq!(status(&hub, &old, 2).await, 401);
    assert_eq!(status(&hub, &new, 2).await, 200);
    // Only the hash is stored.
    let stored: Vec<String> = hub
        .db()
        .prepare("SELECT token_sha256 FROM gateways")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(stored, vec![cloud_hub::auth::hash_token(&new)]);
    hub.stop().await;
}

#[tokio::test]
async fn rotate_with_grace_accepts_both_tokens_until_it_ends() {
    let hub = TestHub::start().await;
    let old = hub.token.clone();
    let rotated = Instant::now();
    let new = rotate(&hub, &["--grace-secs", "4"]);
    assert_eq!(status(&hub, &old, 1).await, 200, "old token within grace");
    assert_eq!(status(&hub, &new, 2).await, 200);
    let wait = Duration::from_millis(4_300).saturating_sub(rotated.elapsed());
    tokio::time::sleep(wait).await;
    assert_eq!(status(&hub, &old, 3).await, 401, "old token after grace");
    assert_eq!(status(&hub, &new, 3).await, 200);
    hub.stop().await;
}

#[tokio::test]
async fn rotate_refuses_unknown_revoked_and_unbounded_grace() {
    let hub = TestHub::start().await;
    let out = cli(&hub, &["gateway", "rotate", "nope"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    let out = cli(
        &hub,
        &["gateway", "rotate", GATEWAY, "--grace-secs", "604801"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("longer than the maximum"));
    assert_eq!(status(&hub, &hub.token, 1).await, 200, "token unchanged");

    cloud_hub::gateway_revoke(&hub.config, GATEWAY).unwrap();
    let out = cli(&hub, &["gateway", "rotate", GATEWAY]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
    hub.stop().await;
}
