//! Provisioning a gateway from a one-time enrolment token, with the real
//! binaries: `cloud-hub enrollment create` → `edge-agent provision` →
//! files with the right permissions and a config that validates → the agent
//! runs with it and its readings reach the hub. Re-running provision changes
//! nothing; a used or forged enrolment token is refused.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use vigil_e2e::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn provision(hub: &str, token: &str, id: &str, out: &std::path::Path) -> std::process::Output {
    Command::new(bin("edge-agent"))
        .args([
            "provision",
            "--hub",
            hub,
            "--enrollment-token",
            token,
            "--gateway-id",
            id,
            "--out",
        ])
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn a_gateway_is_provisioned_from_an_enrolment_token_and_delivers() {
    let (_guard, dir) = test_dir("provision");
    let d = dir.as_path();
    let hub_cfg = write_hub_config(d, "127.0.0.1:0", &[("gw-new", "masimo-1", "p-prov")]).unwrap();
    let created = Command::new(bin("cloud-hub"))
        .args(["enrollment", "create", "--ttl-hours", "1", "--config"])
        .arg(&hub_cfg)
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let enrol = String::from_utf8(created.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert!(enrol.starts_with("vge_") && enrol.len() == 68, "{enrol}");
    let hub = start_hub(d, &hub_cfg).unwrap();

    let out = d.join("gateway");
    let first = provision(&hub.base_url, &enrol, "gw-new", &out);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("provisioned"));
    assert_eq!(mode(&out), 0o700);
    assert_eq!(mode(&out.join("gateway.token")), 0o600);
    assert_eq!(mode(&out.join("agent.toml")), 0o600);
    assert_eq!(mode(&out.join("data/buffer.key")), 0o600);
    let token = std::fs::read_to_string(out.join("gateway.token")).unwrap();
    assert!(token.trim().starts_with("vgt_"));
    let check = Command::new(bin("edge-agent"))
        .args(["check-config", "--config"])
        .arg(out.join("agent.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Re-running is safe: nothing changes, the hub is not asked again.
    let again = provision(&hub.base_url, &enrol, "gw-new", &out);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("already provisioned"));
    assert_eq!(
        std::fs::read_to_string(out.join("gateway.token")).unwrap(),
        token
    );

    // The enrolment token is spent; a forged one is refused too.
    let reuse = provision(&hub.base_url, &enrol, "gw-other", &d.join("other"));
    assert!(!reuse.status.success());
    assert!(
        String::from_utf8_lossy(&reuse.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&reuse.stderr)
    );
    let forged = provision(
        &hub.base_url,
        &format!("vge_{}", "0".repeat(64)),
        "gw-x",
        &d.join("x"),
    );
    assert!(!forged.status.success());
    let bad_id = provision(&hub.base_url, &enrol, "gw new!", &d.join("y"));
    assert!(String::from_utf8_lossy(&bad_id.stderr).contains("gateway-id"));

    // The provisioned gateway works: add a device, run, readings arrive.
    let pty = PtyPair::new(d, "masimo").unwrap();
    let _sim = Proc::spawn(
        "device-sim",
        Command::new(bin("device-sim"))
            .args(["masimo", "--interval-ms", "100", "--port"])
            .arg(&pty.device)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let cfg = out.join("agent.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replace("listen = \"127.0.0.1:9464\"", "listen = \"127.0.0.1:0\"");
    text.push_str(&format!(
        "\n[[device]]\nkind = \"masimo-serial\"\nid = \"masimo-1\"\nport = \"{}\"\n",
        pty.host.display()
    ));
    std::fs::write(&cfg, text).unwrap();
    let mut agent = start_agent(d, &cfg, "agent.log").unwrap();
    wait_for(
        Duration::from_secs(30),
        "readings of the provisioned gateway",
        || {
            get_json(&format!(
                "{}/fhir/Observation?patient=p-prov&_count=0",
                hub.base_url
            ))
            .ok()
            .and_then(|(_, b)| b["total"].as_u64())
            .filter(|n| *n >= 9)
        },
    )
    .unwrap();
    assert!(agent.terminate(Duration::from_secs(10)));
}
