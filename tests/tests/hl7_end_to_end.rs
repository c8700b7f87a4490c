//! HL7 v2 over MLLP, end to end, against independent implementations:
//! messages built by the Python hl7apy library and sent by a few lines of
//! Python socket code (tests/py/hl7_interop.py), and `device-sim hl7`, to
//! the real `edge-agent` (kind `hl7-mllp`) → the real `cloud-hub` → FHIR.
//!
//! Checks: well-formed ORU^R01 → ACK AA and the values in the hub with
//! their LOINC/MDC codes, UCUM units and the PID-3 identifier as subject
//! (the device has no static association); refused content → AE, wrong
//! messages → AR, and nothing of them in the hub; no patient name, birth
//! date or address anywhere in the agent's data dir or its log.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vigil_e2e::*;

const GATEWAY: &str = "gw-hl7";
const DEVICE: &str = "hl7-1";
const PID_SYSTEM: &str = "urn:vigil:e2e:pid";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn observations(base: &str, patient: &str) -> Vec<Value> {
    let (status, b) = get_json(&format!(
        "{base}/fhir/Observation?patient={patient}&_count=100"
    ))
    .expect("FHIR search");
    assert_eq!(status, 200, "{b}");
    b["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e["resource"].clone())
        .collect()
}

/// Values in a set of Observations: a BP panel counts its components.
fn value_count(obs: &[Value]) -> usize {
    obs.iter()
        .map(|o| o["component"].as_array().map_or(1, Vec::len))
        .sum()
}

fn mdc_of(o: &Value) -> String {
    o["code"]["coding"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["system"] == "urn:iso:std:iso:11073:10101")
        .unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string()
}

fn has_coding(o: &Value, system: &str, code: &str) -> bool {
    o["code"]["coding"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["system"] == system && c["code"] == code)
}

const LOINC: &str = "http://loinc.org";

#[test]
fn hl7_oru_from_independent_senders_to_fhir_with_acks_and_no_phi_at_the_edge() {
    hl7_to_fhir(Backend::Sqlite)
}

/// The same senders and checks with the hub on PostgreSQL.
#[test]
fn hl7_oru_from_independent_senders_to_fhir_with_acks_and_no_phi_at_the_edge_on_postgres() {
    hl7_to_fhir(Backend::postgres())
}

fn hl7_to_fhir(backend: Backend) {
    let (_guard, dir) = test_dir(&format!("hl7-e2e-{}", backend.name()));
    let d = dir.as_path();

    // Hub without an association for the HL7 device: PID-3 decides.
    let hub_cfg = write_hub_config_on(&backend, d, "127.0.0.1:0", &[]).unwrap();
    let token = add_gateway(&hub_cfg, GATEWAY).unwrap();
    let hub = start_hub(d, &hub_cfg).unwrap();
    let base = hub.base_url.clone();

    let port = free_port();
    let agent_toml = format!(
        "gateway_id = \"{GATEWAY}\"\ndata_dir = \"agent-data\"\n\n[uplink]\nurl = \"{base}/api/v1/ingest\"\n\
token_file = \"gateway.token\"\nbatch_max_wait_ms = 200\nmax_backoff_ms = 500\n\n\
[[device]]\nkind = \"hl7-mllp\"\nid = \"{DEVICE}\"\nlisten = \"127.0.0.1:{port}\"\nlocation = \"ICU-9/hl7\"\n\
[device.options]\npatient_id_system = \"{PID_SYSTEM}\"\n"
    );
    write_private(&d.join("gateway.token"), &token).unwrap();
    let agent_cfg = d.join("agent.toml");
    std::fs::write(&agent_cfg, agent_toml).unwrap();
    let mut agent = start_agent(d, &agent_cfg, "agent.log").unwrap();
    wait_for(Duration::from_secs(30), "the agent's MLLP listener", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .unwrap();

    // 1. hl7apy messages through an independent MLLP client.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/hl7_interop.py");
    let out_json = d.join("interop.json");
    let out = Command::new("python3")
        .arg(script)
        .args(["--port", &port.to_string(), "--out"])
        .arg(&out_json)
        .output()
        .expect("python3 is required for the HL7 interop test (scripts/setup.sh installs hl7apy)");
    assert!(
        out.status.code() != Some(3),
        "hl7apy is missing: run scripts/setup.sh ({})",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "hl7_interop.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&out_json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 7);
    for r in results {
        assert_eq!(r["ack"], r["expect"], "{r}");
        assert_eq!(r["echoed"], r["control_id"], "MSA-2 echoes MSH-10: {r}");
        // Every refusal says why (ERR segment).
        assert_eq!(r["ack_has_err"], r["expect"] != "AA", "{r}");
    }

    // 2. device-sim hl7: a mix of good, AE- and AR-worthy messages, then
    // stable ones. It fails itself when an ACK differs from its plan.
    let sim = |scenario: &str, count: &str| {
        let out = Command::new(bin("device-sim"))
            .args([
                "hl7",
                "--to",
                &format!("127.0.0.1:{port}"),
                "--scenario",
                scenario,
            ])
            .args(["--count", count, "--interval-ms", "0", "--echo"])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "device-sim hl7 {scenario}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let echo = sim("malformed", "12");
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for line in echo.lines() {
        let ack = line.rsplit("ack=").next().unwrap().to_string();
        *codes.entry(ack).or_default() += 1;
    }
    assert_eq!(echo.lines().count(), 12, "{echo}");
    for c in ["AA", "AE", "AR"] {
        assert!(codes.get(c).copied().unwrap_or(0) > 0, "{codes:?}");
    }
    let aa_malformed = codes["AA"];
    sim("stable", "3");

    // The accepted values reach the hub, with codes, units and subject.
    let want: BTreeMap<String, f64> = results[0]["values"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    let obs = wait_for(Duration::from_secs(30), "PY-MRN-501 in the hub", || {
        let o = observations(&base, "PY-MRN-501");
        (o.len() >= want.len()).then_some(o)
    })
    .unwrap();
    assert_eq!(obs.len(), want.len());
    for o in &obs {
        let mdc = mdc_of(o);
        assert_eq!(
            o["valueQuantity"]["value"].as_f64(),
            Some(
                *want
                    .get(&mdc)
                    .unwrap_or_else(|| panic!("unexpected {mdc}: {o} (want {want:?})"))
            ),
            "{o}"
        );
        assert_eq!(o["valueQuantity"]["system"], "http://unitsofmeasure.org");
        assert_eq!(
            o["subject"],
            serde_json::json!({
                "reference": "Patient/PY-MRN-501",
                // PID-3's assigning authority PYHOSP, as the hub's default
                // `[identifiers]` maps it to a URI.
                "identifier": { "system": "urn:vigil:authority:PYHOSP", "value": "PY-MRN-501" }
            })
        );
        let (loinc, ucum) = match mdc.as_str() {
            "150456" => ("59408-5", "%"),
            "147842" => ("8867-4", "/min"),
            "150021" => ("8480-6", "mm[Hg]"),
            "150364" => ("8310-5", "Cel"),
            other => panic!("unexpected metric {other}"),
        };
        assert!(has_coding(o, LOINC, loinc), "{o}");
        assert_eq!(o["valueQuantity"]["code"], ucum, "{o}");
        // The sender flagged only the systolic (OBX-8 "H"); the hub shows the
        // device's flag and invents none for the others.
        let flag = o["interpretation"][0]["coding"][0]["code"].as_str();
        assert_eq!(flag, (mdc == "150021").then_some("H"), "{o}");
    }
    // The second patient: no assigning authority → patient_id_system; the
    // SpO2 the device could not obtain is there without a value.
    let obs = wait_for(Duration::from_secs(30), "PY-MRN-502 in the hub", || {
        let o = observations(&base, "PY-MRN-502");
        (o.len() >= 2).then_some(o)
    })
    .unwrap();
    assert_eq!(obs.len(), 2);
    for o in &obs {
        assert_eq!(o["subject"]["identifier"]["system"], PID_SYSTEM);
        match mdc_of(o).as_str() {
            "151562" => assert_eq!(o["valueQuantity"]["value"].as_f64(), Some(16.0)),
            "150456" => {
                assert!(o.get("valueQuantity").is_none(), "{o}");
                assert!(o.get("dataAbsentReason").is_some(), "{o}");
            }
            other => panic!("unexpected metric {other}"),
        }
    }
    // device-sim patients: 6 vitals per AA message (3 stable + the good
    // ones of the malformed run), patients in turn; systolic and diastolic
    // of one message are one BP panel with two components.
    let sim_total: usize = ["SIM-MRN-1001", "SIM-MRN-1002", "SIM-MRN-1003"]
        .iter()
        .map(|p| observations(&base, p).len())
        .sum();
    let expected_sim = (aa_malformed + 3) * 6;
    let sim_total = wait_for(Duration::from_secs(30), "device-sim readings", || {
        let n: usize = ["SIM-MRN-1001", "SIM-MRN-1002", "SIM-MRN-1003"]
            .iter()
            .map(|p| value_count(&observations(&base, p)))
            .sum();
        (n >= expected_sim).then_some(n)
    })
    .unwrap_or(sim_total);
    assert_eq!(sim_total, expected_sim);
    // The simulated monitor flags every value against its alarm limits
    // (OBX-8 "N" for these stable vitals): each value carries it, panel
    // components included.
    for o in observations(&base, "SIM-MRN-1001") {
        let flags: Vec<&Value> = match o["component"].as_array() {
            Some(parts) => parts.iter().map(|c| &c["interpretation"]).collect(),
            None => vec![&o["interpretation"]],
        };
        for f in flags {
            assert_eq!(f[0]["coding"][0]["code"], "N", "{o}");
        }
    }

    // Nothing of the refused or rejected messages was stored.
    for p in ["PY-MRN-503", "PY-MRN-504", "PY-MRN-505", "PY-MRN-506"] {
        assert!(observations(&base, p).is_empty(), "{p} has observations");
    }
    let db = backend.store(d);
    let count = |sql: &str| -> i64 { db.rows(sql)[0][0].parse().unwrap() };
    let rejected = count("SELECT COUNT(*) FROM rejected_readings");
    assert_eq!(rejected, 0, "the agent forwards only what it accepted");
    let total = count(&format!(
        "SELECT COUNT(*) FROM observations WHERE device_id = '{DEVICE}' AND kind = 'reading'"
    ));
    assert_eq!(total as usize, want.len() + 2 + expected_sim);

    // No PHI at the edge: not in the buffer files, not in the log.
    assert!(
        agent.terminate(Duration::from_secs(20)),
        "agent stops cleanly"
    );
    let mut phi: Vec<String> = report["phi"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    phi.extend(
        [
            "Quixadaphant",
            "Alonsa",
            "Bovarynth",
            "Kareninova",
            "19470312",
            "19811105",
            "Nowhere Lane",
        ]
        .map(String::from),
    );
    let files = files_below(&d.join("agent-data"));
    assert!(!files.is_empty());
    for f in files.iter().chain([&d.join("agent.log")]) {
        let bytes = std::fs::read(f).unwrap();
        for needle in &phi {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} found in {}",
                f.display()
            );
        }
    }
    // The log carries no identifiers either.
    let log = std::fs::read_to_string(d.join("agent.log")).unwrap();
    assert!(
        !log.contains("PY-MRN") && !log.contains("SIM-MRN"),
        "identifier in the agent log"
    );
    assert!(log.contains("HL7 MLLP listener ready"), "{log}");
    drop(hub);
}
