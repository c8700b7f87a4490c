//! The AKS deployment of cloud-hub (deploy/aks/): the kustomize base renders, every built-in
//! Kubernetes resource validates strictly against the Kubernetes JSON schemas offline
//! (`kubernetes-validate`, installed by scripts/setup.sh), the CRD resources are checked here
//! structurally, the pieces reference each other consistently, and the hub config in the
//! ConfigMap is loaded by the real `cloud-hub` binary.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

use vigil_e2e::{read_repo as read, repo_root as root};

const BASE: &str = "deploy/aks/base";
/// The AKS Kubernetes minor version the manifests are validated against.
const K8S_VERSION: &str = "1.31";
/// Custom resources: no schema in the Kubernetes set; checked structurally below.
const CRD_KINDS: [&str; 3] = ["PrometheusRule", "SecretProviderClass", "ServiceMonitor"];

fn venv() -> PathBuf {
    std::env::var_os("VIGIL_K8S_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/vigil/k8s-venv")
        })
}

/// The base rendered to one YAML stream: `kubectl kustomize` when kubectl is installed, else
/// the listed resources and the generated ConfigMap put together here.
fn render() -> String {
    if let Ok(out) = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root().join(BASE))
        .output()
    {
        assert!(
            out.status.success(),
            "kubectl kustomize: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return String::from_utf8(out.stdout).unwrap();
    }
    eprintln!("kubectl not installed: rendering the base's resources without kustomize");
    let k = read(&format!("{BASE}/kustomization.yaml"));
    let mut docs = Vec::new();
    let mut in_resources = false;
    for line in k.lines() {
        if line.starts_with("resources:") {
            in_resources = true;
        } else if in_resources {
            match line.trim().strip_prefix("- ") {
                Some(f) if line.starts_with("  ") => docs.push(read(&format!("{BASE}/{f}"))),
                _ => in_resources = false,
            }
        }
    }
    let hub: String = read(&format!("{BASE}/hub.toml"))
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    docs.push(format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cloud-hub-config\n  namespace: vigil\ndata:\n  hub.toml: |\n{hub}"
    ));
    docs.join("\n---\n")
}

/// The rendered stream as JSON objects (PyYAML from the validator's virtualenv).
fn as_json(yaml_file: &Path) -> Vec<Value> {
    let out = Command::new(venv().join("bin/python"))
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(yaml_file)
        .output()
        .expect("the k8s virtualenv's python (scripts/setup.sh creates it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn validate(file: &Path) -> (bool, String) {
    let bin = venv().join("bin/kubernetes-validate");
    let out = Command::new(&bin)
        .args(["--strict", "-k", K8S_VERSION])
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} not runnable ({e}): run scripts/setup.sh (installs kubernetes-validate)",
                bin.display()
            )
        });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn rendered() -> (tempfile::TempDir, PathBuf, Vec<Value>) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("rendered.yaml");
    std::fs::write(&file, render()).unwrap();
    let docs = as_json(&file);
    (tmp, file, docs)
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let mut it = docs.iter().filter(|d| d["kind"] == kind);
    let d = it.next().unwrap_or_else(|| panic!("no {kind}"));
    assert!(it.next().is_none(), "one {kind}");
    d
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let (tmp, file, docs) = rendered();
    let (ok, report) = validate(&file);
    assert!(ok, "kubernetes-validate --strict:\n{report}");
    // Exactly the CRD kinds are left without a schema; every other resource passed.
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in &kinds {
        let lower = kind.to_lowercase();
        if CRD_KINDS.contains(kind) {
            assert!(
                report.contains(&format!("Couldn't find schema for kind {kind}")),
                "{report}"
            );
        } else {
            assert!(
                report.contains(&format!("passed for resource {lower}/")),
                "{kind} not validated:\n{report}"
            );
        }
    }
    for want in [
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ]
    .iter()
    .chain(CRD_KINDS.iter())
    {
        assert!(kinds.contains(want), "{want} missing");
    }

    // The validator does reject what Kubernetes would: a misspelt field and a wrong type.
    let bad = tmp.path().join("bad.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &bad,
        text.replace(
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesytem: true",
        ),
    )
    .unwrap();
    let (ok, report) = validate(&bad);
    assert!(!ok && report.contains("readOnlyRootFilesytem"), "{report}");
    std::fs::write(&bad, text.replace("minReplicas: 2", "minReplicas: two")).unwrap();
    assert!(!validate(&bad).0);
}

#[test]
fn the_pieces_reference_each_other() {
    let (_tmp, _file, docs) = rendered();
    let dep = find(&docs, "Deployment");
    let pod = &dep["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    let spec = &pod["spec"];
    let c = &spec["containers"][0];

    // Security: non-root, read-only root, writable /tmp from an emptyDir.
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    let mount = |path: &str| -> &str {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("a volume at {path}"))["name"]
            .as_str()
            .unwrap()
    };
    let volume = |name: &str| -> &Value {
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
    };
    assert!(volume(mount("/tmp")).get("emptyDir").is_some());
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());

    // Probes: /readyz for readiness, /healthz for liveness, on the port the hub binds.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let hub: toml::Value = toml::from_str(&read(&format!("{BASE}/hub.toml"))).unwrap();
    let bind_port: u64 = hub["server"]["bind"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    let port = &c["ports"][0];
    assert_eq!(port["containerPort"].as_u64(), Some(bind_port));
    let port_name = port["name"].as_str().unwrap();
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], port_name);

    // Config: the ConfigMap's hub.toml at the path the args name.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let cfg_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let (dir, file) = cfg_path.rsplit_once('/').unwrap();
    let cm_name = volume(mount(dir))["configMap"]["name"].as_str().unwrap();
    let cm = find(&docs, "ConfigMap");
    assert_eq!(cm["metadata"]["name"], cm_name);
    assert_eq!(
        cm["data"][file].as_str().map(str::trim),
        Some(read(&format!("{BASE}/hub.toml")).trim())
    );
    assert_eq!(args.last(), Some(&"serve"));

    // Secrets: the env's Secret is synced by the SecretProviderClass the CSI volume names.
    let spc = find(&docs, "SecretProviderClass");
    assert_eq!(spc["spec"]["provider"], "azure");
    let csi = &volume(mount("/mnt/secrets-store"))["csi"];
    assert_eq!(csi["driver"], "secrets-store.csi.k8s.io");
    assert_eq!(
        csi["volumeAttributes"]["secretProviderClass"],
        spc["metadata"]["name"]
    );
    let synced = spc["spec"]["secretObjects"].as_array().unwrap();
    let hub_src = {
        // The hub's crates: cloud-hub/src and each layer's src (domain, storage, transport, ...).
        let mut s = String::new();
        for p in vigil_e2e::files_below(&root().join("cloud-hub")) {
            let in_src = p.components().any(|c| c.as_os_str() == "src");
            if in_src && p.extension().is_some_and(|e| e == "rs") {
                s.push_str(&std::fs::read_to_string(p).unwrap());
            }
        }
        s
    };
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(
            hub_src.contains(&format!("\"{name}\"")) || name == "RUST_LOG",
            "env {name} is not read by cloud-hub"
        );
        if let Some(r) = e["valueFrom"].get("secretKeyRef") {
            let s = synced
                .iter()
                .find(|s| s["secretName"] == r["name"])
                .expect("secret synced from Key Vault");
            assert!(
                s["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|d| d["key"] == r["key"])
            );
        }
    }
    for secret in ["VIGIL_HUB_PG_PASSWORD", "VIGIL_HUB_AUDIT_KEY"] {
        assert!(
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == secret && e["valueFrom"].get("secretKeyRef").is_some()),
            "{secret} from a Secret synced from Key Vault"
        );
    }

    // Service, Ingress (TLS from Key Vault), ServiceMonitor, HPA, PDB, NetworkPolicy.
    let svc = find(&docs, "Service");
    let selects = |sel: &Value| {
        sel.as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(selects(&svc["spec"]["selector"]));
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], port_name);
    let ing = find(&docs, "Ingress");
    let tls_secret = &ing["spec"]["tls"][0]["secretName"];
    assert!(
        synced
            .iter()
            .any(|s| &s["secretName"] == tls_secret && s["type"] == "kubernetes.io/tls")
    );
    let paths: Vec<&str> = ing["spec"]["rules"][0]["http"]["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["backend"]["service"]["name"], svc["metadata"]["name"]);
            p["path"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        paths,
        ["/api/", "/fhir/"],
        "/metrics stays inside the cluster"
    );
    let sm = find(&docs, "ServiceMonitor");
    assert!(
        sm["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| svc["metadata"]["labels"].get(k) == Some(v))
    );
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        svc["spec"]["ports"][0]["name"]
    );
    let hpa = find(&docs, "HorizontalPodAutoscaler");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        dep["metadata"]["name"]
    );
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    assert!(selects(
        &find(&docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    ));
    let np = find(&docs, "NetworkPolicy");
    assert!(selects(&np["spec"]["podSelector"]["matchLabels"]));
    assert_eq!(
        np["spec"]["ingress"][0]["ports"][0]["port"].as_u64(),
        Some(bind_port)
    );

    // Image: the hub's Dockerfile runs the real binary as the Deployment's user.
    let df = read("deploy/aks/Dockerfile");
    assert!(df.contains("cargo build --locked --release -p cloud-hub --bin cloud-hub"));
    let uid = spec["securityContext"]["runAsUser"].as_u64().unwrap();
    assert!(df.contains(&format!("USER {uid}:")));
    assert!(df.contains(&format!("EXPOSE {bind_port}")));
}

#[test]
fn the_configmap_hub_config_is_accepted_by_cloud_hub() {
    // With the PostgreSQL backend `backup` stops right after loading and validating the config
    // (before any connection), so its message proves the config passed.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("hub.toml");
    std::fs::write(&cfg, read(&format!("{BASE}/hub.toml"))).unwrap();
    let run = |cfg: &Path| {
        Command::new(vigil_e2e::bin("cloud-hub"))
            .arg("--config")
            .arg(cfg)
            .args(["backup", "--out"])
            .arg(tmp.path().join("b.sqlite"))
            .env("VIGIL_HUB_PG_PASSWORD", "from-key-vault")
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let out = run(&cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("backup and restore are for the SQLite backend"),
        "{stderr}"
    );
    // And the same check refuses a config the hub would refuse (plaintext to a remote server).
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        read(&format!("{BASE}/hub.toml")).replace("?sslmode=require", ""),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&run(&bad).stderr).to_string();
    assert!(stderr.contains("storage.postgres"), "{stderr}");
    assert!(!stderr.contains("backup and restore are for the SQLite backend"));
}
