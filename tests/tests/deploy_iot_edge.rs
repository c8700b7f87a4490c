//! The IoT Edge deployment (deploy/iot-edge/): the manifest template, module.json and the
//! Dockerfiles agree with each other and with what the edge-agent really reads — its binary,
//! its config (checked by the real `edge-agent check-config` in module mode), its data dir,
//! its status port and only environment variables the agent's source or docs name.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

use vigil_e2e::{read_repo as read, repo_root as root};

fn manifest() -> Value {
    serde_json::from_str(&read("deploy/iot-edge/deployment.template.json"))
        .expect("deployment.template.json is JSON")
}

fn module_config() -> toml::Value {
    toml::from_str(&read("deploy/iot-edge/agent.toml")).expect("agent.toml is TOML")
}

/// The Vigil module's createOptions.
fn vigil_module(m: &Value) -> &Value {
    let modules = &m["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"];
    let obj = modules.as_object().expect("$edgeAgent modules");
    assert_eq!(obj.len(), 1, "exactly one custom module (vigil)");
    &modules["vigil"]
}

/// Every Rust source file below `dir`, concatenated.
fn sources_below(dir: &Path) -> String {
    let mut out = String::new();
    for p in vigil_e2e::files_below(dir) {
        if p.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
    out
}

/// The IoT Edge runtime's own variables, as it sets them in a module.
const RUNTIME_ENV: [(&str, &str); 8] = [
    ("IOTEDGE_IOTHUBHOSTNAME", "vigil-test.azure-devices.net"),
    ("IOTEDGE_DEVICEID", "edge-device-1"),
    ("IOTEDGE_MODULEID", "vigil"),
    ("IOTEDGE_GATEWAYHOSTNAME", "edgeHub"),
    (
        "IOTEDGE_WORKLOADURI",
        "unix:///var/run/iotedge/workload.sock",
    ),
    ("IOTEDGE_APIVERSION", "2019-01-30"),
    ("IOTEDGE_MODULEGENERATIONID", "637000000000000000"),
    ("IOTEDGE_AUTHSCHEME", "sasToken"),
];

#[test]
fn manifest_has_the_edge_runtime_structure() {
    let m = manifest();
    let agent = &m["modulesContent"]["$edgeAgent"]["properties.desired"];
    assert_eq!(agent["runtime"]["type"], "docker");
    for sys in ["edgeAgent", "edgeHub"] {
        let img = agent["systemModules"][sys]["settings"]["image"]
            .as_str()
            .unwrap_or_else(|| panic!("systemModules.{sys}.settings.image"));
        assert!(img.starts_with("mcr.microsoft.com/azureiotedge-"), "{img}");
    }
    let v = vigil_module(&m);
    assert_eq!(v["type"], "docker");
    assert_eq!(v["status"], "running");
    assert_eq!(v["restartPolicy"], "always");

    // Routes: the module's output goes upstream, with a store-and-forward TTL.
    let hub = &m["modulesContent"]["$edgeHub"]["properties.desired"];
    let routes = hub["routes"].as_object().expect("$edgeHub routes");
    let upstream: Vec<&str> = routes
        .values()
        .map(|r| r["route"].as_str().or(r.as_str()).expect("route string"))
        .filter(|r| r.contains("INTO $upstream"))
        .collect();
    assert_eq!(
        upstream,
        ["FROM /messages/modules/vigil/* INTO $upstream"],
        "the vigil module's messages (module id = its key in modules) are routed to IoT Hub"
    );
    let ttl = hub["storeAndForwardConfiguration"]["timeToLiveSecs"]
        .as_u64()
        .expect("storeAndForwardConfiguration.timeToLiveSecs");
    assert!(
        ttl >= 24 * 3600,
        "edgeHub keeps messages at least a day offline: {ttl}"
    );
}

#[test]
fn image_dockerfiles_and_binary_agree() {
    let m = manifest();
    let module: Value = serde_json::from_str(&read("deploy/iot-edge/module.json")).unwrap();
    let repo = module["image"]["repository"].as_str().unwrap();
    let version = module["image"]["tag"]["version"].as_str().unwrap();
    let ws: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    assert_eq!(
        Some(version),
        ws["workspace"]["package"]["version"].as_str(),
        "module.json version follows the workspace version"
    );
    let image = vigil_module(&m)["settings"]["image"].as_str().unwrap();
    assert_eq!(image, format!("{repo}:{version}-${{VIGIL_PLATFORM}}"));

    // The module's build context is the repository root, and each platform has its Dockerfile.
    let ctx = root()
        .join("deploy/iot-edge")
        .join(module["image"]["contextPath"].as_str().unwrap());
    assert!(ctx.join("Cargo.toml").exists() && ctx.join("edge-agent").is_dir());
    let platforms = module["image"]["tag"]["platforms"].as_object().unwrap();
    let names: Vec<&str> = platforms.keys().map(String::as_str).collect();
    assert_eq!(names, ["amd64", "arm32v7", "arm64v8"]);
    let opts = &vigil_module(&m)["settings"]["createOptions"];
    let cmd: Vec<&str> = opts["Cmd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(cmd[..2], ["run", "--config"]);
    let config_path = cmd[2];
    for (platform, file) in platforms {
        let df = read(&format!(
            "deploy/iot-edge/{}",
            file.as_str().unwrap().trim_start_matches("./")
        ));
        assert!(
            df.contains("cargo build --locked --release -p edge-agent --bin edge-agent"),
            "{platform}: builds the real binary"
        );
        assert!(df.contains(
            "COPY --from=build /src/target/release/edge-agent /usr/local/bin/edge-agent"
        ));
        assert!(
            df.contains(r#"ENTRYPOINT ["/usr/local/bin/edge-agent"]"#),
            "{platform}"
        );
        assert!(
            df.contains(&format!("COPY deploy/iot-edge/agent.toml {config_path}")),
            "{platform}: the config the manifest names is in the image"
        );
        assert!(
            df.contains("USER vigil") && df.contains("--gid dialout"),
            "{platform}: non-root, in dialout"
        );
        assert_eq!(
            df.matches("\nFROM ").count() + usize::from(df.starts_with("FROM ")),
            2,
            "{platform}: two stages"
        );
        if platform != "amd64" {
            assert!(
                df.contains(&format!("FROM {platform}/rust:")),
                "{platform}: builder for the platform"
            );
            assert!(
                df.contains(&format!("FROM {platform}/debian:")),
                "{platform}: runtime for the platform"
            );
        }
    }
    // The binary the images run is the workspace's edge-agent binary, and `run --config` is its CLI.
    let help = Command::new(vigil_e2e::bin("edge-agent"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config"));
}

#[test]
fn create_options_match_what_the_agent_reads() {
    let m = manifest();
    let opts = &vigil_module(&m)["settings"]["createOptions"];
    let cfg = module_config();
    let host = &opts["HostConfig"];

    // Env: only variables the agent's source or its docs name.
    let src = sources_below(&root().join("edge-agent/src"));
    let docs = read("docs/agent.md");
    let env: Vec<(String, String)> = opts["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .map(|e| {
            let (k, v) = e.as_str().unwrap().split_once('=').expect("NAME=value");
            (k.to_string(), v.to_string())
        })
        .collect();
    assert!(!env.is_empty());
    for (k, _) in &env {
        assert!(
            src.contains(&format!("\"{k}\"")) || docs.contains(&format!("`{k}`")),
            "Env {k} is read by neither edge-agent/src nor documented in docs/agent.md"
        );
        assert!(
            !k.starts_with("IOTEDGE_"),
            "{k} is set by the IoT Edge runtime, not the manifest"
        );
    }

    // Data dir: the env override, the config and the persistent volume are the same path.
    let data_dir = cfg["data_dir"].as_str().unwrap();
    let env_dir = env
        .iter()
        .find(|(k, _)| k == "VIGIL_AGENT_DATA_DIR")
        .map(|(_, v)| v.as_str());
    assert_eq!(env_dir, Some(data_dir));
    let binds: Vec<&str> = host["Binds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    let volume = binds
        .iter()
        .find(|b| b.split(':').nth(1) == Some(data_dir))
        .expect("a volume at the data dir");
    assert!(
        !volume.starts_with('/'),
        "the buffer is on a named volume (survives module re-creation): {volume}"
    );

    // Serial devices: each port of the config is passed through.
    let devices: Vec<&str> = host["Devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["CgroupPermissions"], "rwm");
            d["PathInContainer"].as_str().unwrap()
        })
        .collect();
    let cfg_devices = cfg["device"].as_array().expect("[[device]]");
    let mut has_ble = false;
    for d in cfg_devices {
        if let Some(port) = d.get("port").and_then(|p| p.as_str()) {
            assert!(
                devices.contains(&port),
                "serial port {port} not passed through"
            );
        }
        has_ble |= d["kind"].as_str() == Some("ble");
    }
    assert!(!devices.is_empty());
    assert!(
        host["GroupAdd"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "dialout")
    );
    // BLE: BlueZ on the host through its D-Bus system socket.
    assert!(has_ble);
    assert!(binds.contains(&"/run/dbus/system_bus_socket:/run/dbus/system_bus_socket"));

    // Status endpoint: the port of [status] listen, published on the host's loopback only.
    let listen = cfg["status"]["listen"].as_str().unwrap();
    let port = listen.rsplit_once(':').unwrap().1;
    let key = format!("{port}/tcp");
    assert!(
        opts["ExposedPorts"].get(&key).is_some(),
        "ExposedPorts {key}"
    );
    let pb = &host["PortBindings"][&key][0];
    assert_eq!(
        pb["HostIp"], "127.0.0.1",
        "the status endpoint has no authentication"
    );
    assert_eq!(pb["HostPort"], port);

    assert_eq!(opts["User"], "vigil");
    assert_eq!(host["ReadonlyRootfs"], true);
}

#[test]
fn the_module_config_passes_check_config_in_module_mode() {
    let m = manifest();
    let opts = &vigil_module(&m)["settings"]["createOptions"];
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(vigil_e2e::bin("edge-agent"));
    cmd.args(["check-config", "--config"])
        .arg(root().join("deploy/iot-edge/agent.toml"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_BACKTRACE", "0");
    for e in opts["Env"].as_array().unwrap() {
        let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
        cmd.env(k, v);
    }
    // The data dir of the image is not writable here: the same override, to a temp dir.
    cmd.env("VIGIL_AGENT_DATA_DIR", tmp.path());
    let without_runtime = cmd.output().unwrap();
    assert!(
        !without_runtime.status.success(),
        "outside IoT Edge the module config has no identity"
    );
    assert!(String::from_utf8_lossy(&without_runtime.stderr).contains("uplink.iothub"));
    for (k, v) in RUNTIME_ENV {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check-config: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = module_config()["device"].as_array().unwrap().len();
    assert!(stdout.contains(&format!("with {n} device(s)")), "{stdout}");
}
