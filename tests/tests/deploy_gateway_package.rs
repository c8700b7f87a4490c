//! The gateway package without IoT Edge: deploy/systemd/vigil-edge-agent.service and the
//! `[package.metadata.deb]` of edge-agent. The unit is hardened and agrees with the package
//! (binary, config, state dir, user), `systemd-analyze verify` accepts it, and the unit's own
//! command lines run the real agent as an unprivileged user in the dialout group with only the
//! state directory writable.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vigil_e2e::{read_repo as read, repo_root as root};

const UNIT: &str = "deploy/systemd/vigil-edge-agent.service";

/// `Key=value` lines of the unit by key (repeated keys keep every value, in order).
fn unit() -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in read(UNIT).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (k, v) = line.split_once('=').expect("Key=value");
        map.entry(k.to_string()).or_default().push(v.to_string());
    }
    map
}

fn one<'a>(u: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    let v = u.get(key).unwrap_or_else(|| panic!("{key}= missing"));
    assert_eq!(v.len(), 1, "{key}= set once");
    &v[0]
}

/// The unit's Environment= assignments.
fn unit_env(u: &BTreeMap<String, Vec<String>>) -> Vec<(String, String)> {
    u["Environment"]
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn deb_metadata() -> toml::Value {
    let cargo: toml::Value = toml::from_str(&read("edge-agent/Cargo.toml")).unwrap();
    cargo["package"]["metadata"]["deb"].clone()
}

/// The package's config (its source file in the tree).
fn packaged_config() -> toml::Value {
    toml::from_str(&read("deploy/deb/agent.toml")).unwrap()
}

#[test]
fn the_unit_is_hardened_and_matches_the_package() {
    let u = unit();
    for (key, want) in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
        ("DevicePolicy", "closed"),
        ("StateDirectoryMode", "0700"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(&u, key), want, "{key}");
    }
    assert!(
        one(&u, "SupplementaryGroups")
            .split(' ')
            .any(|g| g == "dialout")
    );
    assert!(u["DeviceAllow"].iter().any(|d| d == "char-ttyUSB rw"));
    let user = one(&u, "User");
    assert_ne!(user, "root");

    // The user the package creates is the unit's, and is in dialout.
    let sysusers = read("deploy/deb/vigil-edge-agent.sysusers");
    assert!(
        sysusers
            .lines()
            .any(|l| l.starts_with(&format!("u {user} ")))
    );
    assert!(sysusers.lines().any(|l| l == format!("m {user} dialout")));

    // The state directory is the data dir (env override and packaged config).
    let state = format!("/var/lib/{}", one(&u, "StateDirectory"));
    let env = unit_env(&u);
    assert!(env.contains(&("VIGIL_AGENT_DATA_DIR".into(), state.clone())));
    assert_eq!(packaged_config()["data_dir"].as_str(), Some(state.as_str()));
    // Only variables the agent reads.
    let docs = read("docs/agent.md");
    for (k, _) in &env {
        assert!(
            docs.contains(&format!("`{k}`"))
                || read("edge-agent/src/config.rs").contains(&format!("\"{k}\""))
                || read("edge-agent/src/main.rs").contains(&format!("\"{k}\"")),
            "{k} is not read by the agent"
        );
    }

    // ExecStart runs the packaged binary with the packaged conffile; the stop timeout covers
    // the agent's shutdown drain.
    let deb = deb_metadata();
    let exec: Vec<&str> = one(&u, "ExecStart").split(' ').collect();
    assert_eq!(exec[..3], ["/usr/bin/edge-agent", "run", "--config"]);
    let assets = deb["assets"].as_array().unwrap();
    let dest_of = |src: &str| {
        assets
            .iter()
            .find(|a| a[0].as_str() == Some(src))
            .map(|a| a[1].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("asset {src}"))
    };
    assert_eq!(
        format!("/{}edge-agent", dest_of("target/release/edge-agent")),
        exec[0]
    );
    assert_eq!(format!("/{}", dest_of("../deploy/deb/agent.toml")), exec[3]);
    let conf: Vec<&str> = deb["conf-files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        conf.contains(&exec[3]),
        "the config is a conffile (kept on upgrade)"
    );
    assert_eq!(
        one(&u, "ExecStartPre"),
        format!("/usr/bin/edge-agent check-config --config {}", exec[3])
    );
    let drain_ms = packaged_config()["uplink"]["shutdown_drain_ms"]
        .as_integer()
        .unwrap();
    let stop_s: i64 = one(&u, "TimeoutStopSec").parse().unwrap();
    assert!(
        stop_s * 1000 > drain_ms * 2,
        "TimeoutStopSec {stop_s} s leaves the drain ({drain_ms} ms) time"
    );
    let units = &deb["systemd-units"];
    assert_eq!(units["unit-name"].as_str(), Some("vigil-edge-agent"));
    assert!(
        root()
            .join("edge-agent")
            .join(units["unit-scripts"].as_str().unwrap())
            .join("vigil-edge-agent.service")
            .exists()
    );
    for a in assets {
        let src = a[0].as_str().unwrap();
        if !src.starts_with("target/") {
            assert!(
                root().join("edge-agent").join(src).exists(),
                "asset {src} exists"
            );
        }
    }
}

/// The unit, with its binary path pointed at the built binary, in a temp dir.
fn unit_with_binary(dir: &Path) -> PathBuf {
    let bin = vigil_e2e::bin("edge-agent");
    let text = read(UNIT).replace("/usr/bin/edge-agent", bin.to_str().unwrap());
    let p = dir.join("vigil-edge-agent.service");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze is not installed (Debian package systemd)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = unit_with_binary(tmp.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&p)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings for the dependencies it cannot see here (network-online.target is fine;
    // bluetooth.service may be absent) are not about this unit's own settings.
    let own: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("vigil-edge-agent.service"))
        .collect();
    assert!(
        out.status.success() && own.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    // It does read the settings: a misspelt key is reported.
    let bad = tmp.path().join("vigil-edge-agentx.service");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&p)
            .unwrap()
            .replace("ProtectSystem=", "ProtectSystems="),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("ProtectSystems"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn uid_gid(name: &str) -> (u32, u32) {
    let out = Command::new("id").arg("-u").arg(name).output().unwrap();
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let out = Command::new("id").arg("-g").arg(name).output().unwrap();
    (
        uid,
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
    )
}

#[test]
fn the_unit_commands_run_the_agent_as_an_unprivileged_dialout_user() {
    let is_root = String::from_utf8_lossy(&Command::new("id").arg("-u").output().unwrap().stdout)
        .trim()
        == "0";
    if !is_root || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED: needs root and setpriv (util-linux) to switch to an unprivileged user");
        return;
    }
    let u = unit();
    // `nobody` stands in for the package's system user (created by its postinst).
    let (uid, gid) = uid_gid("nobody");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();

    // The packaged config, with the hub on a closed loopback port and the status on a free one.
    let status = free_port();
    let token = tmp.path().join("gateway.token");
    vigil_e2e::write_private(&token, "vgt_package_test\n").unwrap();
    std::os::unix::fs::chown(&token, Some(uid), Some(gid)).unwrap();
    let config = read("deploy/deb/agent.toml")
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{status}"))
        .replace(
            "https://vigil-hub.example.org/api/v1/ingest",
            &format!("http://127.0.0.1:{}/api/v1/ingest", free_port()),
        )
        .replace("/etc/vigil/gateway.token", token.to_str().unwrap());
    let config_path = tmp.path().join("agent.toml");
    std::fs::write(&config_path, config).unwrap();

    let bin = vigil_e2e::bin("edge-agent");
    let command = |line: &str| {
        let mut args: Vec<String> = line.split(' ').map(String::from).collect();
        assert_eq!(args[0], "/usr/bin/edge-agent");
        args[0] = bin.to_str().unwrap().into();
        let n = args.len();
        args[n - 1] = config_path.to_str().unwrap().into();
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &gid.to_string(),
            "--groups",
            "20",
            "--no-new-privs",
            "--inh-caps=-all",
            "--",
        ])
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("RUST_BACKTRACE", "0");
        for (k, v) in unit_env(&u) {
            c.env(k, v);
        }
        // The unit's StateDirectory, here in the temp dir.
        c.env("VIGIL_AGENT_DATA_DIR", &state);
        c
    };

    let pre = command(one(&u, "ExecStartPre")).output().unwrap();
    assert!(
        pre.status.success(),
        "ExecStartPre: {}",
        String::from_utf8_lossy(&pre.stderr)
    );

    let mut agent = vigil_e2e::Proc::spawn(
        "edge-agent",
        command(one(&u, "ExecStart"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{status}/healthz");
    let (code, _) = vigil_e2e::wait_for(Duration::from_secs(30), "the agent's /healthz", || {
        vigil_e2e::get_json(&url).ok()
    })
    .expect("the agent serves /healthz as the unprivileged user");
    assert_eq!(code, 200);
    // It created its buffer key in the state dir, owned by the service user, private.
    let key = state.join("buffer.key");
    let meta = std::fs::metadata(&key).expect("buffer.key in the state dir");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid);
    assert_eq!(meta.permissions().mode() & 0o077, 0);
    let stop_s: u64 = one(&u, "TimeoutStopSec").parse().unwrap();
    assert!(
        agent.terminate(Duration::from_secs(stop_s)),
        "SIGTERM: a clean exit within TimeoutStopSec"
    );
}
