//! The Prometheus alert rules (deploy/aks/base/prometheusrule.yaml) and the Grafana dashboard
//! (deploy/grafana/vigil.json) use only metrics that exist: every metric name in their queries is
//! a family the hub serves (checked against a running `cloud-hub`'s /metrics) or one the agent
//! serves (`edge-agent/src/status.rs` METRIC_FAMILIES, which its own test matches against what
//! /metrics serves), and every label value they select on is one the programs emit.

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;

use vigil_e2e::{read_repo as read, repo_root as root};

/// The alert rules as JSON (PyYAML from the k8s virtualenv that scripts/setup.sh creates).
fn rules() -> Value {
    let venv = std::env::var_os("VIGIL_K8S_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/vigil/k8s-venv")
        });
    let out = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(root().join("deploy/aks/base/prometheusrule.yaml"))
        .output()
        .expect("the k8s virtualenv's python (scripts/setup.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (alert name, expr) of every rule.
fn alert_exprs() -> Vec<(String, String)> {
    let r = rules();
    let mut v = Vec::new();
    for g in r["spec"]["groups"].as_array().unwrap() {
        for rule in g["rules"].as_array().unwrap() {
            v.push((
                rule["alert"].as_str().unwrap().to_string(),
                rule["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    v
}

fn dashboard_exprs() -> Vec<String> {
    let d: Value = serde_json::from_str(&read("deploy/grafana/vigil.json")).unwrap();
    let mut v = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        let targets = p["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "panel {} has a query", p["title"]);
        for t in targets {
            v.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    v
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Metric names in a PromQL expression: `vigil_*` identifiers, and any identifier directly
/// followed by a selector `{` or a range `[`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    // Label matchers' contents and strings are not names: blank out "…" first.
    let mut clean = String::new();
    let mut in_str = false;
    for c in expr.chars() {
        if c == '"' {
            in_str = !in_str;
            clean.push(' ');
        } else {
            clean.push(if in_str { ' ' } else { c });
        }
    }
    let chars: Vec<char> = clean.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if is_ident(chars[i]) && (i == 0 || !is_ident(chars[i - 1])) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let tok: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let in_braces = chars[..start].iter().filter(|c| **c == '{').count()
                > chars[..start].iter().filter(|c| **c == '}').count();
            if !in_braces
                && !tok.chars().next().unwrap().is_ascii_digit()
                && (tok.starts_with("vigil_") || matches!(next, Some('{') | Some('[')))
            {
                names.insert(tok);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// `label op "value"` matchers in a PromQL expression: (metric, label, values).
fn matchers(expr: &str) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let metric: String = rest[..open]
            .chars()
            .rev()
            .take_while(|c| is_ident(*c))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let close = rest[open..].find('}').unwrap() + open;
        for m in rest[open + 1..close].split(',') {
            let m = m.trim();
            if m.is_empty() {
                continue;
            }
            let op_at = m.find(['=', '!']).unwrap();
            let label = m[..op_at].trim().to_string();
            let value = m[op_at..]
                .trim_start_matches(['=', '!', '~'])
                .trim()
                .trim_matches('"');
            out.push((
                metric.clone(),
                label,
                value.split('|').map(String::from).collect(),
            ));
        }
        rest = &rest[close + 1..];
    }
    out
}

/// The agent's families (its served list).
fn agent_families() -> BTreeSet<String> {
    let src = read("edge-agent/src/status.rs");
    let start = src
        .find("pub const METRIC_FAMILIES")
        .expect("METRIC_FAMILIES");
    let end = start + src[start..].find("];").unwrap();
    src[start..end]
        .split('"')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

/// What a running hub serves on /metrics.
fn hub_metrics_text() -> String {
    let (_keep, dir) = vigil_e2e::test_dir("deploy_observability");
    let cfg = vigil_e2e::write_hub_config(&dir, "127.0.0.1:0", &[]).unwrap();
    let hub = vigil_e2e::start_hub(&dir, &cfg).unwrap();
    let addr = hub
        .base_url
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    // The body, after the response head.
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The families a running hub serves on /metrics (`# TYPE` lines).
fn hub_served_families() -> BTreeSet<String> {
    vigil_e2e::served_families(&hub_metrics_text())
        .into_keys()
        .collect()
}

/// docs/metrics.md lists exactly the families a running hub serves, with
/// their types and label names (the agent's side is checked in
/// agent_delivery.rs against a running agent with a device).
#[test]
fn the_metrics_reference_matches_what_the_hub_serves() {
    let text = hub_metrics_text();
    let served = vigil_e2e::served_families(&text);
    let documented = vigil_e2e::documented_families("cloud-hub");
    assert!(served.len() >= 18, "{served:?}");
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        documented.keys().collect::<Vec<_>>(),
        "families served vs documented in docs/metrics.md"
    );
    for (name, (kind, labels)) in &served {
        let (dk, dl) = &documented[name];
        assert_eq!(kind, dk, "{name}: type");
        // A labelled family with no series yet (the Kafka partition lag of
        // a hub without `[kafka]`) shows no labels: only its HELP and TYPE.
        let no_series = !text
            .lines()
            .any(|l| !l.starts_with('#') && l.starts_with(name.as_str()));
        if !(labels.is_empty() && no_series) {
            assert_eq!(labels, dl, "{name}: labels");
        }
    }
}

#[test]
fn the_parsers_find_names_and_matchers() {
    let n = metric_names(
        r#"sum(rate(vigil_hub_ingest_errors_total{kind!="rate_limited"}[10m])) / clamp_min(sum(up{job="cloud-hub"}), 1) and on() absent(nope_total[5m]) > vigil_x"#,
    );
    let want: BTreeSet<String> = [
        "vigil_hub_ingest_errors_total",
        "up",
        "nope_total",
        "vigil_x",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(n, want);
    let m = matchers(r#"rate(a_total{kind=~"x|y", outcome="z"}[5m])"#);
    assert_eq!(
        m[0],
        (
            "a_total".into(),
            "kind".into(),
            vec!["x".into(), "y".into()]
        )
    );
    assert_eq!(m[1].2, ["z"]);
}

#[test]
fn every_metric_in_the_rules_and_dashboard_exists_with_its_labels() {
    let hub = hub_served_families();
    assert!(hub.contains("vigil_hub_ingest_readings_total"), "{hub:?}");
    let agent = agent_families();
    let hub_src = read("cloud-hub/transport/src/metrics.rs");
    let agent_src = read("edge-agent/src/status.rs");
    let services: Vec<String> = {
        let svc = read("deploy/aks/base/service.yaml");
        svc.lines()
            .filter_map(|l| l.strip_prefix("  name: "))
            .map(String::from)
            .collect()
    };
    let ops = read("docs/operations.md");

    let mut all: Vec<(String, String)> = alert_exprs();
    all.extend(
        dashboard_exprs()
            .into_iter()
            .map(|e| ("dashboard".into(), e)),
    );
    let mut used = BTreeSet::new();
    for (who, expr) in &all {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{who}: no metric in {expr}");
        for n in &names {
            assert!(
                hub.contains(n) || agent.contains(n) || n == "up",
                "{who}: metric {n} is served by neither the hub nor the agent"
            );
            used.insert(n.clone());
        }
        for (metric, label, values) in matchers(expr) {
            if metric == "up" {
                assert_eq!(label, "job");
                for v in &values {
                    // The hub's job is its Service's name (ServiceMonitor); the gateways' job
                    // is the one docs/operations.md tells the gateway's Prometheus agent to use.
                    assert!(
                        services.contains(v) || ops.contains(&format!("job_name: {v}")),
                        "{who}: job {v}"
                    );
                }
                continue;
            }
            let src = if metric.starts_with("vigil_hub_") {
                &hub_src
            } else {
                &agent_src
            };
            for v in &values {
                assert!(
                    src.contains(&format!("\"{v}\"")),
                    "{who}: {metric}{{{label}=\"{v}\"}}: the value {v} is never emitted"
                );
            }
        }
    }
    // The SLO signals are all watched.
    for family in [
        "vigil_hub_ingest_errors_total",
        "vigil_hub_ingest_readings_total",
        "vigil_agent_uplink_up",
        "vigil_agent_buffer_oldest_age_seconds",
        "vigil_agent_buffer_dropped_total",
    ] {
        assert!(used.contains(family), "{family} not used");
    }
    let alerts: Vec<String> = alert_exprs().into_iter().map(|(a, _)| a).collect();
    for a in [
        "VigilIngestLagHigh",
        "VigilIngestErrorRateHigh",
        "VigilReadingRejectionRateHigh",
        "VigilGatewayOffline",
        "VigilEdgeBacklogOld",
    ] {
        assert!(alerts.contains(&a.to_string()), "alert {a}");
    }
}

#[test]
fn every_alert_has_a_runbook_section() {
    let r = rules();
    let ops = read("docs/operations.md").to_lowercase();
    for g in r["spec"]["groups"].as_array().unwrap() {
        for rule in g["rules"].as_array().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            let runbook = rule["annotations"]["runbook"].as_str().unwrap();
            assert_eq!(
                runbook,
                format!("docs/operations.md#{}", alert.to_lowercase())
            );
            assert!(
                ops.contains(&format!("### {}", alert.to_lowercase())),
                "docs/operations.md has no section for {alert}"
            );
            assert!(rule["labels"]["severity"].is_string());
        }
    }
}
