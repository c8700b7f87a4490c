//! The AKS deployment of cloud-hub (deploy/aks/), in both variants: the base (HTTPS and MQTT
//! ingest) and the base with the Event Hubs component (deploy/aks/components/eventhubs, rendered
//! through deploy/aks/overlays/eventhubs-example). Each renders, every built-in Kubernetes
//! resource validates strictly against the Kubernetes JSON schemas offline
//! (`kubernetes-validate`, installed by scripts/setup.sh), the CRD resources are checked here
//! structurally, the pieces reference each other consistently, and the hub config in the
//! ConfigMap is loaded by the real `cloud-hub` binary. The Azure side of the Event Hubs variant
//! (deploy/azure/eventhubs.bicep) is parsed with pycep-parser (a Bicep grammar, installed by
//! scripts/setup.sh) and checked for what it declares and for names that match the hub config,
//! the component and the az commands in docs/hub.md; no Bicep compiler runs here unless `bicep`
//! or `az` is installed (then `bicep build` must pass too).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

use vigil_e2e::{read_repo as read, repo_root as root};

const BASE: &str = "deploy/aks/base";
/// The Event Hubs component and the example overlay that adds it to the base.
const COMPONENT: &str = "deploy/aks/components/eventhubs";
const EVENTHUBS: &str = "deploy/aks/overlays/eventhubs-example";
/// The Azure template of the Event Hubs variant.
const BICEP: &str = "deploy/azure/eventhubs.bicep";

/// One deployable variant: the kustomization rendered and the hub.toml its ConfigMap holds.
#[derive(Clone, Copy, Debug)]
struct Variant {
    dir: &'static str,
    hub_toml: &'static str,
}

const VARIANTS: [Variant; 2] = [
    Variant {
        dir: BASE,
        hub_toml: "deploy/aks/base/hub.toml",
    },
    Variant {
        dir: EVENTHUBS,
        hub_toml: "deploy/aks/components/eventhubs/hub.toml",
    },
];
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

/// A variant rendered to one YAML stream: `kubectl kustomize` when kubectl is installed, else
/// put together here (the base's listed resources and generated ConfigMap; for the Event Hubs
/// overlay, the component applied to that: its resources, its JSON 6902 `add` patches, its
/// ConfigMap file merged, the overlay's namespace).
fn render(v: Variant) -> String {
    if let Ok(out) = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root().join(v.dir))
        .output()
    {
        assert!(
            out.status.success(),
            "kubectl kustomize: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return String::from_utf8(out.stdout).unwrap();
    }
    eprintln!(
        "kubectl not installed: rendering {} without kustomize",
        v.dir
    );
    let base = render_base_without_kustomize();
    if v.dir == BASE {
        base
    } else {
        assert_eq!(v.dir, EVENTHUBS);
        render_component_without_kustomize(&base)
    }
}

fn render_base_without_kustomize() -> String {
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

/// What kustomize does with the Event Hubs overlay, for the few operations the component uses
/// (anything else in it fails here, so this cannot silently diverge from kustomize).
fn render_component_without_kustomize(base: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = |rel: &str| -> Vec<Value> {
        let f = tmp.path().join("in.yaml");
        std::fs::write(&f, read(rel)).unwrap();
        as_json(&f)
    };
    let f = tmp.path().join("base.yaml");
    std::fs::write(&f, base).unwrap();
    let mut docs = as_json(&f);
    let overlay = yaml(&format!("{EVENTHUBS}/kustomization.yaml")).remove(0);
    assert_eq!(overlay["components"][0], "../../components/eventhubs");
    let comp = yaml(&format!("{COMPONENT}/kustomization.yaml")).remove(0);
    assert_eq!(comp["kind"], "Component");
    for r in comp["resources"].as_array().unwrap() {
        docs.extend(yaml(&format!("{COMPONENT}/{}", r.as_str().unwrap())));
    }
    for p in comp["patches"].as_array().unwrap() {
        let t = &p["target"];
        let doc = docs
            .iter_mut()
            .find(|d| d["kind"] == t["kind"] && d["metadata"]["name"] == t["name"])
            .expect("patch target");
        let ops = yaml(&format!("{COMPONENT}/{}", p["path"].as_str().unwrap())).remove(0);
        for op in ops.as_array().unwrap() {
            assert_eq!(op["op"], "add", "only `add` is applied here");
            let (parent, last) = op["path"].as_str().unwrap().rsplit_once('/').unwrap();
            let target = doc.pointer_mut(parent).expect("patch path");
            if last == "-" {
                target.as_array_mut().unwrap().push(op["value"].clone());
            } else {
                target
                    .as_object_mut()
                    .unwrap()
                    .insert(last.into(), op["value"].clone());
            }
        }
    }
    for g in comp["configMapGenerator"].as_array().unwrap() {
        assert_eq!(g["behavior"], "merge");
        let cm = docs
            .iter_mut()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == g["name"])
            .expect("the base's ConfigMap");
        for file in g["files"].as_array().unwrap() {
            let file = file.as_str().unwrap();
            cm["data"][file] = Value::String(read(&format!("{COMPONENT}/{file}")));
        }
    }
    for d in &mut docs {
        if d["kind"] != "Namespace" {
            d["metadata"]["namespace"] = overlay["namespace"].clone();
        }
    }
    docs.iter()
        .map(|d| serde_json::to_string_pretty(d).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n")
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

fn rendered(v: Variant) -> (tempfile::TempDir, PathBuf, Vec<Value>) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("rendered.yaml");
    std::fs::write(&file, render(v)).unwrap();
    let docs = as_json(&file);
    (tmp, file, docs)
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let mut it = docs.iter().filter(|d| d["kind"] == kind);
    let d = it.next().unwrap_or_else(|| panic!("no {kind}"));
    assert!(it.next().is_none(), "one {kind}");
    d
}

fn find_named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn hub_toml(v: Variant) -> toml::Value {
    toml::from_str(&read(v.hub_toml)).unwrap()
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    for v in VARIANTS {
        manifests_validate(v);
    }
}

fn manifests_validate(v: Variant) {
    let (tmp, file, docs) = rendered(v);
    let (ok, report) = validate(&file);
    assert!(ok, "{v:?}: kubernetes-validate --strict:\n{report}");
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

    // The validator does reject what Kubernetes would: a misspelt field and a wrong type (in
    // the base's YAML), and a misspelt field in what the Event Hubs component patched in.
    let bad = tmp.path().join("bad.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    if v.dir != BASE {
        assert!(text.contains("fieldPath"));
        std::fs::write(&bad, text.replace("fieldPath", "fieldPth")).unwrap();
        let (ok, report) = validate(&bad);
        assert!(!ok && report.contains("valueFrom.fieldRef"), "{report}");
        return;
    }
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
    for v in VARIANTS {
        pieces_reference_each_other(v);
    }
}

fn pieces_reference_each_other(v: Variant) {
    let (_tmp, _file, docs) = rendered(v);
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
    let hub = hub_toml(v);
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
        Some(read(v.hub_toml).trim())
    );
    assert_eq!(args.last(), Some(&"serve"));

    // Secrets: each env's Secret is synced by a SecretProviderClass that a mounted CSI volume
    // names (a class syncs its Secrets only while a pod mounts it).
    let base_csi = &volume(mount("/mnt/secrets-store"))["csi"];
    assert_eq!(base_csi["driver"], "secrets-store.csi.k8s.io");
    let mut synced: Vec<Value> = Vec::new();
    for m in c["volumeMounts"].as_array().unwrap() {
        let Some(csi) = volume(m["name"].as_str().unwrap()).get("csi") else {
            continue;
        };
        assert_eq!(csi["driver"], "secrets-store.csi.k8s.io");
        let spc = find_named(
            &docs,
            "SecretProviderClass",
            csi["volumeAttributes"]["secretProviderClass"]
                .as_str()
                .unwrap(),
        );
        assert_eq!(spc["spec"]["provider"], "azure");
        synced.extend(spc["spec"]["secretObjects"].as_array().unwrap().clone());
    }
    assert_eq!(
        docs.iter()
            .filter(|d| d["kind"] == "SecretProviderClass")
            .count(),
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| volume(m["name"].as_str().unwrap()).get("csi").is_some())
            .count(),
        "every SecretProviderClass is mounted"
    );
    // Env variables the hub.toml names (kafka.connection_string_env) are read too.
    let named_by_config = hub
        .get("kafka")
        .and_then(|k| k.get("connection_string_env"))
        .and_then(|e| e.as_str());
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
            hub_src.contains(&format!("\"{name}\""))
                || name == "RUST_LOG"
                || named_by_config == Some(name),
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
    for v in VARIANTS {
        configmap_hub_config_is_accepted(v);
    }
}

fn configmap_hub_config_is_accepted(v: Variant) {
    // With the PostgreSQL backend `backup` stops right after loading and validating the config
    // (before any connection), so its message proves the config passed.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("hub.toml");
    std::fs::write(&cfg, read(v.hub_toml)).unwrap();
    let run = |cfg: &Path| {
        Command::new(vigil_e2e::bin("cloud-hub"))
            .arg("--config")
            .arg(cfg)
            .args(["backup", "--out"])
            .arg(tmp.path().join("b.sqlite"))
            .env("VIGIL_HUB_PG_PASSWORD", "from-key-vault")
            .env(
                "VIGIL_HUB_EVENTHUBS_CONNECTION",
                "Endpoint=sb://from-key-vault/",
            )
            .env("VIGIL_HUB_KAFKA_REPLICA_ID", "cloud-hub-5d9f7c-abcde")
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
    std::fs::write(&bad, read(v.hub_toml).replace("?sslmode=require", "")).unwrap();
    let stderr = String::from_utf8_lossy(&run(&bad).stderr).to_string();
    assert!(stderr.contains("storage.postgres"), "{stderr}");
    assert!(!stderr.contains("backup and restore are for the SQLite backend"));
    // The Event Hubs variant's [kafka] section is validated too (a broker without its port).
    if hub_toml(v).get("kafka").is_some() {
        std::fs::write(
            &bad,
            read(v.hub_toml).replace(".windows.net:9093", ".windows.net"),
        )
        .unwrap();
        let stderr = String::from_utf8_lossy(&run(&bad).stderr).to_string();
        assert!(stderr.contains("kafka.brokers"), "{stderr}");
    }
}

fn container(docs: &[Value]) -> &Value {
    &find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn env_names(docs: &[Value]) -> Vec<String> {
    container(docs)["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect()
}

fn egress_ports(docs: &[Value]) -> Vec<u64> {
    find(docs, "NetworkPolicy")["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_array().unwrap().iter())
        .map(|p| p["port"].as_u64().unwrap())
        .collect()
}

/// The broker's port and the topic of the Event Hubs variant's [kafka] section.
fn kafka_broker(hub: &toml::Value) -> (String, u64, String) {
    let k = &hub["kafka"];
    let brokers = k["brokers"].as_array().unwrap();
    assert_eq!(brokers.len(), 1);
    let (host, port) = brokers[0].as_str().unwrap().rsplit_once(':').unwrap();
    (
        host.to_owned(),
        port.parse().unwrap(),
        k["topic"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn the_eventhubs_component_adds_the_source_and_nothing_else() {
    let [base_v, eh_v] = VARIANTS;
    // The component's hub.toml is the base's plus [kafka]; the base has no [kafka], so the
    // base deployment (HTTPS, MQTT) needs no Event Hubs secret.
    let base_toml = read(base_v.hub_toml);
    let eh_toml = read(eh_v.hub_toml);
    assert!(
        eh_toml.starts_with(&base_toml),
        "{COMPONENT}/hub.toml must begin with the base's hub.toml word for word"
    );
    assert!(hub_toml(base_v).get("kafka").is_none());
    let hub = hub_toml(eh_v);
    let k = &hub["kafka"];
    assert!(
        k.get("connection_string_file").is_none() && k.get("connection_string").is_none(),
        "the connection string comes from the environment only"
    );
    let conn_env = k["connection_string_env"].as_str().unwrap();
    let (host, port, _topic) = kafka_broker(&hub);
    assert!(host.ends_with(".servicebus.windows.net"), "{host}");
    assert_eq!(port, 9093, "the Event Hubs Kafka endpoint");
    assert!(
        k.get("tls").is_none(),
        "TLS stays on (the default off loopback)"
    );

    let (_t1, _f1, base) = rendered(base_v);
    let (_t2, _f2, eh) = rendered(eh_v);
    // Exactly two env variables more, the connection string and the replica id.
    let (base_env, eh_env) = (env_names(&base), env_names(&eh));
    assert!(!base_env.iter().any(|e| e == conn_env));
    let added: Vec<&String> = eh_env.iter().filter(|e| !base_env.contains(e)).collect();
    assert_eq!(added, [conn_env, "VIGIL_HUB_KAFKA_REPLICA_ID"]);
    let c = container(&eh);
    let env = |name: &str| -> &Value {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()
    };
    // The connection string: Key Vault object → Secret → env, through the component's class.
    let r = &env(conn_env)["valueFrom"]["secretKeyRef"];
    let spc = find_named(&eh, "SecretProviderClass", "cloud-hub-keyvault-eventhubs");
    let so = &spc["spec"]["secretObjects"][0];
    assert_eq!(so["secretName"], r["name"]);
    assert_eq!(so["data"][0]["key"], r["key"]);
    let objects = spc["spec"]["parameters"]["objects"].as_str().unwrap();
    assert!(objects.contains("objectName: vigil-hub-eventhubs-connection"));
    assert!(objects.contains(&format!(
        "objectAlias: {}",
        so["data"][0]["objectName"].as_str().unwrap()
    )));
    // Same vault, identity and tenant as the base's class.
    let base_spc = find_named(&eh, "SecretProviderClass", "cloud-hub-keyvault");
    for p in ["usePodIdentity", "clientID", "keyvaultName", "tenantId"] {
        assert_eq!(
            spc["spec"]["parameters"][p], base_spc["spec"]["parameters"][p],
            "{p}"
        );
    }
    // The replica id: each pod's own (unique) name, read by the hub from this variable.
    assert_eq!(
        env("VIGIL_HUB_KAFKA_REPLICA_ID")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert!(
        read("cloud-hub/transport/src/kafka_ingest.rs")
            .contains("ENV_KAFKA_REPLICA_ID: &str = \"VIGIL_HUB_KAFKA_REPLICA_ID\"")
    );
    // Out to the Kafka endpoint; the base does not open it.
    assert!(egress_ports(&eh).contains(&port));
    assert!(!egress_ports(&base).contains(&port));
    // Nothing else differs: same kinds plus the one class, same Deployment apart from env,
    // mounts and volumes.
    let kinds = |docs: &[Value]| -> Vec<String> {
        let mut k: Vec<String> = docs
            .iter()
            .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
            .filter(|k| !k.starts_with("\"ConfigMap\""))
            .collect();
        k.sort();
        k
    };
    let mut want = kinds(&base);
    want.push("\"SecretProviderClass\"/\"cloud-hub-keyvault-eventhubs\"".into());
    want.sort();
    assert_eq!(kinds(&eh), want);
    let strip = |docs: &[Value]| -> Value {
        let mut d = find(docs, "Deployment").clone();
        // (Without kubectl the base is rendered without its namespace transformer.)
        d["metadata"]["namespace"] = Value::Null;
        let pod = &mut d["spec"]["template"]["spec"];
        for f in ["env", "volumeMounts"] {
            pod["containers"][0][f] = Value::Null;
        }

        // (The volumes also name the ConfigMap, whose name carries kustomize's content hash.)
        pod["volumes"] = Value::Null;
        d
    };
    assert_eq!(strip(&base), strip(&eh));
}

fn bicep_venv() -> PathBuf {
    std::env::var_os("VIGIL_BICEP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/vigil/bicep-venv")
        })
}

/// A Bicep text parsed by pycep-parser (installed by scripts/setup.sh) into its JSON form
/// (parameters, resources with type, API version and config, outputs), or the parser's error.
fn parse_bicep(text: &str) -> Result<Value, String> {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("t.bicep");
    std::fs::write(&f, text).unwrap();
    let python = bicep_venv().join("bin/python");
    let out = Command::new(&python)
        .args([
            "-c",
            "import sys, json, pathlib; from pycep import BicepParser; \
             print(json.dumps(BicepParser(cache=False).parse(file_path=pathlib.Path(sys.argv[1])), default=str))",
        ])
        .arg(&f)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} not runnable ({e}): run scripts/setup.sh (installs pycep-parser)",
                python.display()
            )
        });
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `param NAME TYPE = DEFAULT` of a Bicep file: the default's text, quotes removed.
fn bicep_param(bicep: &str, name: &str) -> String {
    let line = bicep
        .lines()
        .find(|l| l.starts_with(&format!("param {name} ")))
        .unwrap_or_else(|| panic!("param {name}"));
    let v = line.split_once(" = ").unwrap().1.trim();
    let v = v
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .unwrap_or(v);
    v.replace("\\'", "'")
}

/// The Bicep block of `resource SYMBOL 'TYPE@VERSION' = {` up to its closing `}` at column 0.
fn bicep_resource<'a>(bicep: &'a str, symbol: &str, type_version: &str) -> &'a str {
    let head = format!("resource {symbol} '{type_version}' ");
    let start = bicep
        .find(&head)
        .unwrap_or_else(|| panic!("resource {symbol} of type {type_version}"));
    let end = bicep[start..].find("\n}\n").unwrap();
    &bicep[start..start + end]
}

/// The `sh` block of docs/hub.md that holds the az commands of the Event Hubs set-up.
fn docs_az_commands() -> String {
    let hub = read("docs/hub.md");
    let start = hub
        .find("# Event Hubs set-up with the Azure CLI")
        .expect("the az commands in docs/hub.md");
    let end = hub[start..].find("```").unwrap();
    hub[start..start + end].replace("\\\n", " ")
}

#[test]
fn the_azure_template_matches_the_hub_config_and_the_docs() {
    let bicep = read(BICEP);
    // The template parses (pycep-parser's Bicep grammar), and a broken one does not.
    let parsed = parse_bicep(&bicep).unwrap_or_else(|e| panic!("{BICEP} does not parse:\n{e}"));
    assert!(parse_bicep(&bicep.replace("parent: eventHub\n", "parent eventHub\n")).is_err());
    assert!(parse_bicep(&bicep.replace("resource iotHub", "resourc iotHub")).is_err());
    // Exactly these resources, of these types and API versions.
    let mut declared: Vec<String> = parsed["resources"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(sym, r)| {
            let existing = if r["existing"] == true {
                " existing"
            } else {
                ""
            };
            format!(
                "{sym} {}@{}{existing}",
                r["type"].as_str().unwrap(),
                r["api_version"].as_str().unwrap()
            )
        })
        .collect();
    declared.sort();
    let mut want = vec![
        "namespace Microsoft.EventHub/namespaces@2024-01-01",
        "eventHub Microsoft.EventHub/namespaces/eventhubs@2024-01-01",
        "consumerGroup Microsoft.EventHub/namespaces/eventhubs/consumergroups@2024-01-01",
        "sendRule Microsoft.EventHub/namespaces/eventhubs/authorizationRules@2024-01-01",
        "listenRule Microsoft.EventHub/namespaces/eventhubs/authorizationRules@2024-01-01",
        "keyVault Microsoft.KeyVault/vaults@2023-07-01 existing",
        "connectionSecret Microsoft.KeyVault/vaults/secrets@2023-07-01",
        "iotHub Microsoft.Devices/IotHubs@2023-06-30",
    ];
    want.sort();
    assert_eq!(declared, want);
    let res = |sym: &str| &parsed["resources"][sym]["config"];
    for sym in ["consumerGroup", "sendRule", "listenRule"] {
        assert_eq!(res(sym)["parent"], "eventHub", "{sym}");
    }
    assert_eq!(
        res("sendRule")["properties"]["rights"],
        serde_json::json!(["Send"])
    );
    assert_eq!(
        res("listenRule")["properties"]["rights"],
        serde_json::json!(["Listen"])
    );
    assert_eq!(res("namespace")["sku"]["tier"], "Standard");
    let routing = &res("iotHub")["properties"]["routing"];
    let route = &routing["routes"][0];
    assert_eq!(routing["routes"].as_array().unwrap().len(), 1);
    assert_eq!(route["source"], "DeviceMessages");
    assert_eq!(route["condition"], "routeCondition");
    assert_eq!(route["isEnabled"], true);
    let endpoint = &routing["endpoints"]["eventHubs"][0];
    assert_eq!(
        route["endpointNames"],
        serde_json::json!([endpoint["name"]])
    );
    assert_eq!(
        routing["fallbackRoute"]["endpointNames"],
        serde_json::json!(["events"])
    );
    for p in [
        "namespaceName",
        "eventHubName",
        "partitionCount",
        "keyVaultName",
    ] {
        assert_eq!(
            parsed["parameters"][p]["default"]
                .to_string()
                .trim_matches('"'),
            bicep_param(&bicep, p),
            "{p}"
        );
    }

    let hub = hub_toml(VARIANTS[1]);
    let (host, port, topic) = kafka_broker(&hub);
    let ns = bicep_param(&bicep, "namespaceName");
    assert_eq!(host, format!("{ns}.servicebus.windows.net"));
    assert!(bicep.contains("'${namespace.name}.servicebus.windows.net:9093'"));
    assert_eq!(port, 9093);
    assert_eq!(bicep_param(&bicep, "eventHubName"), topic);

    // The resources, their API versions and what each must say.
    let namespace = bicep_resource(
        &bicep,
        "namespace",
        "Microsoft.EventHub/namespaces@2024-01-01",
    );
    assert!(
        namespace.contains("name: 'Standard'") && namespace.contains("tier: 'Standard'"),
        "the Kafka endpoint needs Standard or above"
    );
    assert!(
        namespace.contains("disableLocalAuth: false"),
        "SASL PLAIN needs SAS keys"
    );
    let eh = bicep_resource(
        &bicep,
        "eventHub",
        "Microsoft.EventHub/namespaces/eventhubs@2024-01-01",
    );
    assert!(eh.contains("partitionCount: partitionCount"));
    assert!(eh.contains("retentionTimeInHours: retentionHours"));
    // At least one partition per replica the HPA may run.
    let max_replicas: i64 = read("deploy/aks/base/hpa.yaml")
        .lines()
        .find_map(|l| l.trim().strip_prefix("maxReplicas: "))
        .unwrap()
        .parse()
        .unwrap();
    let partitions: i64 = bicep_param(&bicep, "partitionCount").parse().unwrap();
    assert!(partitions >= max_replicas, "{partitions} < {max_replicas}");
    let cg = bicep_resource(
        &bicep,
        "consumerGroup",
        "Microsoft.EventHub/namespaces/eventhubs/consumergroups@2024-01-01",
    );
    assert!(cg.contains("parent: eventHub"));
    let group = bicep_param(&bicep, "consumerGroupName");
    let rule = |symbol: &str, name: &str, right: &str| {
        let r = bicep_resource(
            &bicep,
            symbol,
            "Microsoft.EventHub/namespaces/eventhubs/authorizationRules@2024-01-01",
        );
        assert!(
            r.contains("parent: eventHub"),
            "{symbol}: scoped to the event hub"
        );
        assert!(r.contains(&format!("name: '{name}'")), "{symbol}");
        let rights: Vec<&str> = r
            .split_once("rights: [")
            .unwrap()
            .1
            .split_once(']')
            .unwrap()
            .0
            .split_whitespace()
            .collect();
        assert_eq!(rights, [format!("'{right}'")], "{symbol}: {right} only");
    };
    rule("sendRule", "iothub-send", "Send");
    rule("listenRule", "vigil-hub-listen", "Listen");
    // The listen rule's connection string is the Key Vault secret the component syncs.
    let secret = bicep_resource(
        &bicep,
        "connectionSecret",
        "Microsoft.KeyVault/vaults/secrets@2023-07-01",
    );
    assert!(secret.contains("name: 'vigil-hub-eventhubs-connection'"));
    assert!(secret.contains("value: listenRule.listKeys().primaryConnectionString"));
    assert!(bicep.contains("resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' existing"));
    let spc = read(&format!("{COMPONENT}/secretproviderclass.yaml"));
    assert!(spc.contains("objectName: vigil-hub-eventhubs-connection"));
    assert!(spc.contains(&format!(
        "keyvaultName: {} ",
        bicep_param(&bicep, "keyVaultName")
    )));
    // IoT Hub: an Event Hubs endpoint with the send rule, the route of DeviceMessages that
    // selects the agents' batches by their content type, the fallback kept.
    let iot = bicep_resource(&bicep, "iotHub", "Microsoft.Devices/IotHubs@2023-06-30");
    assert!(iot.contains("connectionString: sendRule.listKeys().primaryConnectionString"));
    assert!(iot.contains("source: 'DeviceMessages'"));
    assert!(iot.contains("condition: routeCondition"));
    assert!(iot.contains("isEnabled: true"));
    assert!(iot.contains("endpointNames: [\n            'vigil-batches'"));
    assert!(iot.contains("name: '$fallback'"));
    let condition = bicep_param(&bicep, "routeCondition");
    assert_eq!(condition, "$contentType = 'application/x-protobuf'");
    // ... which is the content type the agent's IoT Hub uplink puts in its topic ($.ct).
    let agent = read("edge-agent/src/iothub.rs");
    assert!(agent.contains("PROPERTY_BAG: &str = \"$.ct=application%2Fx-protobuf&"));
    assert!(agent.contains("PROPERTY_BAG_ZSTD: &str = \"$.ct=application%2Fx-protobuf&"));
    // No secret leaves the deployment as an output.
    for line in bicep.lines().filter(|l| l.starts_with("output ")) {
        assert!(!line.contains("listKeys"), "{line}");
    }

    // The az commands in docs/hub.md create the same things under the same names.
    let az = docs_az_commands();
    for want in [
        format!("az eventhubs namespace create --resource-group $RG --name {ns} --sku Standard"),
        format!(
            "az eventhubs eventhub create --resource-group $RG --namespace-name {ns} --name {topic} --partition-count {partitions} --cleanup-policy Delete --retention-time {}",
            bicep_param(&bicep, "retentionHours")
        ),
        format!(
            "az eventhubs eventhub consumer-group create --resource-group $RG --namespace-name {ns} --eventhub-name {topic} --name {group}"
        ),
        format!(
            "az eventhubs eventhub authorization-rule create --resource-group $RG --namespace-name {ns} --eventhub-name {topic} --name iothub-send --rights Send"
        ),
        format!(
            "az eventhubs eventhub authorization-rule create --resource-group $RG --namespace-name {ns} --eventhub-name {topic} --name vigil-hub-listen --rights Listen"
        ),
        "az keyvault secret set --vault-name $KV --name vigil-hub-eventhubs-connection".into(),
        format!(
            "az iot hub message-route create --hub-name $IOTHUB --route-name {topic} --endpoint-name {topic} --source-type devicemessages --condition \"{}\" --enabled true",
            condition.replace('$', "\\$")
        ),
        format!(
            "az iot hub message-endpoint create eventhub --hub-name $IOTHUB --endpoint-name {topic}"
        ),
    ] {
        let squeezed = az.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            squeezed.contains(&want),
            "docs/hub.md lacks `{want}`:\n{az}"
        );
    }

    // A Bicep compiler, where one is installed, must accept the template.
    let build = |cmd: &mut Command| cmd.output().ok();
    let out = build(
        Command::new("bicep")
            .args(["build", "--stdout"])
            .arg(root().join(BICEP)),
    )
    .or_else(|| {
        build(
            Command::new("az")
                .args(["bicep", "build", "--stdout", "--file"])
                .arg(root().join(BICEP)),
        )
    });
    match out {
        Some(out) => assert!(
            out.status.success(),
            "bicep build: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        None => eprintln!(
            "neither bicep nor az installed: {BICEP} parsed (pycep-parser) and checked structurally, not compiled"
        ),
    }
}
