//! Every serial protocol at once, plus a Modbus TCP device: each simulator on its own socat PTY pair (or loopback port),
//! one agent reading all of them, one hub. Each device's readings must reach
//! FHIR with the right codes and units, each device's session must be
//! reported CONNECTED, and a device whose cable is "pulled" (simulator
//! killed) must be reported as a technical reading while the others keep
//! flowing. Also: `edge-agent probe` shows a device's raw bytes and decoded
//! readings.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use vigil_e2e::*;

const GATEWAY: &str = "gw-ward";

/// One simulated device and what the hub must show for it.
struct Dev {
    kind: &'static str,
    id: &'static str,
    sim: &'static str,
    sim_args: &'static [&'static str],
    /// `[device.options]` TOML for the agent.
    options: &'static str,
    /// (MDC code, UCUM unit) pairs that must appear in FHIR.
    expect: &'static [(u32, &'static str)],
}

const DEVICES: &[Dev] = &[
    Dev {
        kind: "masimo-serial",
        id: "masimo-1",
        sim: "masimo",
        sim_args: &["--interval-ms", "250"],
        options: "",
        expect: &[(150_456, "%"), (149_530, "/min"), (150_448, "%")],
    },
    Dev {
        kind: "intellivue-serial",
        id: "intellivue-1",
        sim: "intellivue",
        sim_args: &[],
        options: "poll_interval_ms = 500",
        expect: &[
            (147_842, "/min"),
            (150_456, "%"),
            (151_562, "/min"),
            (150_021, "mm[Hg]"),
            (150_364, "Cel"),
            (151_708, "mm[Hg]"),
        ],
    },
    Dev {
        kind: "datex-s5-serial",
        id: "datex-1",
        sim: "datex",
        sim_args: &["--interval-ms", "500"],
        options: "interval_s = 5",
        // The S/5 reports EtCO2 as a volume fraction (%), kept as such.
        expect: &[
            (147_842, "/min"),
            (150_456, "%"),
            (150_021, "mm[Hg]"),
            (151_708, "%"),
        ],
    },
    Dev {
        kind: "medibus-serial",
        id: "medibus-1",
        sim: "medibus",
        sim_args: &[],
        options: "poll_interval_ms = 500",
        expect: &[(151_562, "/min"), (151_980, "mL"), (152_196, "%")],
    },
    Dev {
        kind: "nonin-serial",
        id: "nonin-1",
        sim: "nonin",
        sim_args: &[],
        options: "",
        expect: &[(150_456, "%"), (149_530, "/min")],
    },
];

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn patient(d: &Dev) -> String {
    format!("p-{}", d.id)
}

fn observed_pairs(base: &str, patient: &str) -> BTreeSet<(u32, String)> {
    let (status, bundle) = get_json(&format!(
        "{base}/fhir/Observation?patient={patient}&_count=1000"
    ))
    .unwrap();
    assert_eq!(status, 200, "{bundle}");
    let mut out = BTreeSet::new();
    for e in bundle["entry"].as_array().cloned().unwrap_or_default() {
        let r = &e["resource"];
        if r.get("valueSampledData").is_some() {
            continue; // waveforms carry MDC codes only
        }
        // A BP panel's values are its components.
        let parts = match r["component"].as_array() {
            Some(c) => c.clone(),
            None => vec![r.clone()],
        };
        for part in &parts {
            let codings = part["code"]["coding"].as_array().unwrap();
            assert_eq!(codings[0]["system"], "http://loinc.org", "LOINC first: {r}");
            let mdc = codings
                .iter()
                .find(|c| c["system"] == "urn:iso:std:iso:11073:10101")
                .and_then(|c| c["code"].as_str())
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("no MDC coding in {r}"));
            if let Some(unit) = part["valueQuantity"]["code"].as_str() {
                assert_eq!(part["valueQuantity"]["system"], "http://unitsofmeasure.org");
                out.insert((mdc, unit.to_string()));
            }
        }
    }
    out
}

fn events(store: &Store, device: &str) -> Vec<String> {
    store
        .rows(&format!(
            "SELECT kind FROM device_events WHERE device_id = '{device}' ORDER BY sequence"
        ))
        .into_iter()
        .map(|mut r| r.remove(0))
        .collect()
}

#[test]
fn every_protocol_through_one_agent_to_fhir() {
    every_protocol_to_fhir(Backend::Sqlite)
}

/// The same devices and checks with the hub on PostgreSQL.
#[test]
fn every_protocol_through_one_agent_to_fhir_on_postgres() {
    every_protocol_to_fhir(Backend::postgres())
}

fn every_protocol_to_fhir(backend: Backend) {
    let (_guard, dir) = test_dir(&format!("all-devices-{}", backend.name()));
    let d = dir.as_path();
    let assoc: Vec<(String, String, String)> = DEVICES
        .iter()
        .map(|dv| (GATEWAY.to_string(), dv.id.to_string(), patient(dv)))
        .chain(std::iter::once((
            GATEWAY.to_string(),
            "modbus-1".to_string(),
            "p-modbus-1".to_string(),
        )))
        .collect();
    let assoc_ref: Vec<(&str, &str, &str)> = assoc
        .iter()
        .map(|(g, dv, p)| (g.as_str(), dv.as_str(), p.as_str()))
        .collect();
    let hub_cfg = write_hub_config_on(&backend, d, "127.0.0.1:0", &assoc_ref).unwrap();
    let token = add_gateway(&hub_cfg, GATEWAY).unwrap();
    let hub = start_hub(d, &hub_cfg).unwrap();
    let base = hub.base_url.clone();

    let mut ptys = Vec::new();
    let mut sims = Vec::new();
    let mut agent_toml = format!(
        "gateway_id = \"{GATEWAY}\"\ndata_dir = \"agent-data\"\n\n[uplink]\nurl = \"{base}/api/v1/ingest\"\n\
token_file = \"gateway.token\"\nbatch_max_wait_ms = 200\nmax_backoff_ms = 500\n"
    );
    for dv in DEVICES {
        let pty = PtyPair::new(d, dv.id).unwrap();
        let log = std::fs::File::create(d.join(format!("{}-sim.log", dv.id))).unwrap();
        sims.push(
            Proc::spawn(
                "device-sim",
                Command::new(bin("device-sim"))
                    .arg(dv.sim)
                    .args(["--scenario", "stable", "--port"])
                    .arg(&pty.device)
                    .args(dv.sim_args)
                    .stdout(Stdio::null())
                    .stderr(log),
            )
            .unwrap(),
        );
        agent_toml.push_str(&format!(
            "\n[[device]]\nkind = \"{}\"\nid = \"{}\"\nport = \"{}\"\nlocation = \"WARD-1/{}\"\nsilence_timeout_ms = 3000\n\
[device.options]\n{}\n",
            dv.kind,
            dv.id,
            pty.host.display(),
            dv.id,
            dv.options
        ));
        ptys.push(pty);
    }
    // A Modbus TCP device: the simulator's server on a loopback port, read
    // through the shipped example register map.
    let map = repo_root().join("edge-agent/maps/sim-multiparameter.toml");
    let mut modbus = Proc::spawn(
        "device-sim",
        Command::new(bin("device-sim"))
            .args([
                "modbus",
                "--scenario",
                "stable",
                "--listen",
                "127.0.0.1:0",
                "--step-ms",
                "300",
                "--map",
            ])
            .arg(&map)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let modbus_addr = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(modbus.child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim()
            .strip_prefix("listening ")
            .expect("device-sim modbus prints its address")
            .to_string()
    };
    agent_toml.push_str(&format!(
        "\n[[device]]\nkind = \"modbus-tcp\"\nid = \"modbus-1\"\naddress = \"{modbus_addr}\"\n\
[device.options]\nmap = \"{}\"\npoll_interval_ms = 300\n",
        map.display()
    ));
    write_private(&d.join("gateway.token"), &token).unwrap();
    let agent_cfg = d.join("agent.toml");
    std::fs::write(&agent_cfg, agent_toml).unwrap();
    let mut agent = start_agent(d, &agent_cfg, "agent.log").unwrap();

    // Every device's expected metrics arrive, with their units.
    for dv in DEVICES {
        let want: BTreeSet<(u32, String)> =
            dv.expect.iter().map(|(c, u)| (*c, u.to_string())).collect();
        let got = wait_for(
            Duration::from_secs(60),
            &format!("{} readings in FHIR", dv.id),
            || {
                let got = observed_pairs(&base, &patient(dv));
                want.is_subset(&got).then_some(got)
            },
        )
        .unwrap_or_else(|e| panic!("{e}; saw {:?}", observed_pairs(&base, &patient(dv))));
        eprintln!("{}: {} metric/unit pairs: {got:?}", dv.id, got.len());
    }
    let want: BTreeSet<(u32, String)> = [(147_842, "/min"), (150_456, "%"), (150_021, "mm[Hg]")]
        .iter()
        .map(|(c, u)| (*c, u.to_string()))
        .collect();
    wait_for(Duration::from_secs(60), "modbus-1 readings in FHIR", || {
        want.is_subset(&observed_pairs(&base, "p-modbus-1"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; saw {:?}", observed_pairs(&base, "p-modbus-1")));
    let db = backend.store(d);
    for dv in DEVICES {
        assert_eq!(
            events(&db, dv.id).first().map(String::as_str),
            Some("connected"),
            "{}",
            dv.id
        );
    }
    // The Nonin pleth arrives as waveforms (25 samples at 75 Hz per
    // packet), served as SampledData Observations.
    let (status, bundle) = get_json(&format!(
        "{base}/fhir/Observation?code=urn:iso:std:iso:11073:10101%7C150452&_count=5"
    ))
    .unwrap();
    assert_eq!(status, 200, "{bundle}");
    let entries = bundle["entry"].as_array().expect("entries");
    assert!(!entries.is_empty(), "pleth waveforms stored: {bundle}");
    let sd = &entries[0]["resource"]["valueSampledData"];
    assert_eq!(sd["period"].as_f64(), Some(13.333), "{sd}");
    assert_eq!(
        sd["data"].as_str().map(|d| d.split(' ').count()),
        Some(25),
        "{sd}"
    );

    // Pull one cable: the device is reported, the others keep flowing.
    sims[0].kill9();
    let pulled = DEVICES[0].id;
    wait_for(
        Duration::from_secs(20),
        "technical reading for the pulled device",
        || {
            events(&db, pulled)
                .iter()
                .any(|k| k == "silent" || k == "disconnected")
                .then_some(())
        },
    )
    .unwrap();
    let other = &DEVICES[1];
    let before = get_json(&format!(
        "{base}/fhir/Observation?patient={}&_count=0",
        patient(other)
    ))
    .unwrap()
    .1["total"]
        .as_u64()
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "other devices still flowing",
        || {
            let now = get_json(&format!(
                "{base}/fhir/Observation?patient={}&_count=0",
                patient(other)
            ))
            .unwrap()
            .1["total"]
                .as_u64()
                .unwrap();
            (now > before).then_some(())
        },
    )
    .unwrap();
    assert!(
        agent.terminate(Duration::from_secs(15)),
        "agent exits cleanly"
    );
    // No device's input was so broken that the hub rejected readings.
    let rejected = db.rows("SELECT device_id, detail FROM rejected_readings");
    assert!(rejected.is_empty(), "hub rejected readings: {rejected:?}");
    drop(hub);
}

#[test]
fn probe_shows_raw_bytes_and_decoded_readings() {
    let (_guard, dir) = test_dir("probe");
    let d = dir.as_path();
    let pty = PtyPair::new(d, "probe").unwrap();
    let _sim = Proc::spawn(
        "device-sim",
        Command::new(bin("device-sim"))
            .args([
                "masimo",
                "--scenario",
                "sensor-off",
                "--interval-ms",
                "100",
                "--port",
            ])
            .arg(&pty.device)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let out = Command::new(bin("edge-agent"))
        .args([
            "probe",
            "--kind",
            "masimo-serial",
            "--seconds",
            "3",
            "--port",
        ])
        .arg(&pty.host)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("probing masimo-serial on"), "{text}");
    assert!(text.contains("9600 8N1"), "serial settings shown: {text}");
    let raw = text
        .lines()
        .filter(|l| l.starts_with("<- dev ") && l.ends_with('|'))
        .count();
    assert!(raw > 5, "raw bytes shown as hex + ASCII: {text}");
    assert!(
        text.contains("technical TECHNICAL_KIND_CONNECTED"),
        "{text}"
    );
    assert!(
        text.contains("reading   SpO2 [SPO2] MDC 150456 = "),
        "decoded readings shown: {text}"
    );
    assert!(text.contains("counters: bytes "), "{text}");
    // A bad kind is refused with the accepted spelling in the message.
    let bad = Command::new(bin("edge-agent"))
        .args([
            "probe",
            "--kind",
            "masimo",
            "--port",
            "/dev/null",
            "--seconds",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--kind"));
}
