//! Foundation slice, end to end: `device-sim masimo` on one end of a socat
//! PTY pair → `edge-agent` on the other → `cloud-hub` on 127.0.0.1 → FHIR
//! search. Along the way: kill -9 of the agent mid-stream, a hub outage
//! during which the agent buffers (and its buffer is checked for plaintext),
//! then a check that every reading the agent accepted is in the hub exactly
//! once, with the values, codes, units and times the device sent.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vigil_e2e::*;

const GATEWAY: &str = "gw-e2e";
const DEVICE: &str = "masimo-1";
const PATIENT: &str = "p-e2e-1";
const SERIAL: &str = "0000056661";
const LINES: usize = 250;

/// One line as the simulator echoed it.
#[derive(Debug, Clone, PartialEq)]
struct SimLine {
    time: String, // RFC 3339 UTC, seconds
    spo2: f64,
    bpm: f64,
    pi: f64,
}

fn parse_sim_line(line: &str) -> SimLine {
    let mut it = line.split_whitespace();
    let date = it.next().unwrap();
    let time = it.next().unwrap();
    let (mo, rest) = date.split_once('/').unwrap();
    let (d, y) = rest.split_once('/').unwrap();
    let mut f = BTreeMap::new();
    for kv in it {
        if let Some((k, v)) = kv.split_once('=') {
            f.insert(k, v.trim_end_matches('%'));
        }
    }
    SimLine {
        time: format!("20{y}-{mo}-{d}T{time}Z"),
        spo2: f["SPO2"].parse().unwrap(),
        bpm: f["BPM"].parse().unwrap(),
        pi: f["PI"].parse().unwrap(),
    }
}

/// What the hub holds for one reading.
#[derive(Debug, Clone)]
struct Stored {
    seq: u64,
    mdc: String,
    value: f64,
    time: String,
    resource: Value,
}

fn search_all(base: &str, query: &str) -> Vec<Value> {
    let mut url = format!("{base}/fhir/Observation?{query}");
    let mut out = vec![];
    loop {
        let (status, bundle) = get_json(&url).expect("FHIR search");
        assert_eq!(status, 200, "{bundle}");
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "searchset");
        for e in bundle["entry"].as_array().cloned().unwrap_or_default() {
            out.push(e["resource"].clone());
        }
        let next = bundle["link"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
            .and_then(|l| l["url"].as_str().map(str::to_string));
        match next {
            Some(n) => url = n,
            None => return out,
        }
    }
}

fn total(base: &str) -> u64 {
    get_json(&format!(
        "{base}/fhir/Observation?patient={PATIENT}&_count=1"
    ))
    .ok()
    .and_then(|(_, b)| b["total"].as_u64())
    .unwrap_or(0)
}

fn stored(resource: &Value) -> Stored {
    let ident = resource["identifier"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|i| i["system"] == format!("urn:vigil:reading:{GATEWAY}:{DEVICE}"))
        })
        .unwrap_or_else(|| panic!("no reading identifier in {resource}"));
    let mdc = resource["code"]["coding"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["system"] == "urn:iso:std:iso:11073:10101")
        .unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string();
    Stored {
        seq: ident["value"].as_str().unwrap().parse().unwrap(),
        mdc,
        value: resource["valueQuantity"]["value"]
            .as_f64()
            .unwrap_or(f64::NAN),
        // The device clock has second resolution.
        time: resource["effectiveDateTime"].as_str().unwrap().to_string(),
        resource: resource.clone(),
    }
}

fn codes_of(r: &Value) -> Vec<(String, String)> {
    r["code"]["coding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["system"].as_str().unwrap().to_string(),
                c["code"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn masimo_serial_to_fhir_survives_agent_kill_and_hub_outage() {
    let (_guard, dir) = test_dir("masimo-e2e");
    let d = dir.as_path();

    // Hub on an ephemeral loopback port, with a gateway and an association.
    let hub_cfg = write_hub_config(d, "127.0.0.1:0", &[(GATEWAY, DEVICE, PATIENT)]).unwrap();
    let token = add_gateway(&hub_cfg, GATEWAY).unwrap();
    assert!(token.len() >= 32, "token looks too short: {}", token.len());
    let mut hub = start_hub(d, &hub_cfg).unwrap();
    let base = hub.base_url.clone();
    let (status, health) = get_json(&format!("{base}/fhir/metadata")).unwrap();
    assert_eq!(
        (status, health["resourceType"].as_str()),
        (200, Some("CapabilityStatement"))
    );

    // Serial link and device.
    let pty = PtyPair::new(d, "masimo").unwrap();
    let sim_out = std::fs::File::create(d.join("sim.out")).unwrap();
    let mut sim = Proc::spawn(
        "device-sim",
        Command::new(bin("device-sim"))
            .args([
                "masimo",
                "--scenario",
                "desaturation",
                "--interval-ms",
                "100",
                "--echo",
            ])
            .args(["--count", &LINES.to_string(), "--serial", SERIAL, "--port"])
            .arg(&pty.device)
            .stdout(sim_out)
            .stderr(Stdio::null()),
    )
    .unwrap();

    // Agent.
    write_private(&d.join("gateway.token"), &token).unwrap();
    let agent_cfg = d.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "gateway_id = \"{GATEWAY}\"\ndata_dir = \"agent-data\"\n\n[uplink]\nurl = \"{base}/api/v1/ingest\"\n\
token_file = \"gateway.token\"\nbatch_max_readings = 60\nbatch_max_wait_ms = 200\nmax_backoff_ms = 500\n\n\
[[device]]\nkind = \"masimo-serial\"\nid = \"{DEVICE}\"\nport = \"{}\"\nlocation = \"ICU-1/bed-1\"\n",
            pty.host.display()
        ),
    )
    .unwrap();
    let mut agent = start_agent(d, &agent_cfg, "agent.log").unwrap();

    // Phase 1: readings flow. Then kill -9 the agent mid-stream.
    wait_for(Duration::from_secs(30), "first readings at the hub", || {
        (total(&base) >= 60).then_some(())
    })
    .unwrap();
    agent.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let mut agent = start_agent(d, &agent_cfg, "agent.log").unwrap();
    let after_restart = total(&base);
    wait_for(
        Duration::from_secs(30),
        "readings after the agent restart",
        || (total(&base) >= after_restart + 30).then_some(()),
    )
    .unwrap();

    // Phase 2: hub outage. The agent keeps accepting into its buffer.
    let port = base.rsplit(':').next().unwrap().to_string();
    hub.proc.kill9();
    std::thread::sleep(Duration::from_secs(2));
    // The buffer on disk holds readings now; none of it may be plaintext.
    let agent_files = files_below(&d.join("agent-data"));
    assert!(
        agent_files
            .iter()
            .any(|p| p.to_string_lossy().contains("buffer.sled"))
    );
    let mut scanned = 0usize;
    for f in &agent_files {
        let bytes = std::fs::read(f).unwrap();
        scanned += bytes.len();
        for needle in [SERIAL.as_bytes(), b"SPO2", b"Radical", b"ICU-1/bed-1"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "plaintext {:?} found in agent buffer file {}",
                String::from_utf8_lossy(needle),
                f.display()
            );
        }
    }
    assert!(scanned > 0);
    // Restart the hub on the same port and database.
    let hub_cfg2 = write_hub_config(
        d,
        &format!("127.0.0.1:{port}"),
        &[(GATEWAY, DEVICE, PATIENT)],
    )
    .unwrap();
    let hub2 = start_hub(d, &hub_cfg2).unwrap();
    assert_eq!(hub2.base_url, base);

    // Phase 3: the device finishes; everything accepted arrives.
    sim.wait_exit(Duration::from_secs(60))
        .expect("simulator finished");
    let sim_lines: Vec<SimLine> = std::fs::read_to_string(d.join("sim.out"))
        .unwrap()
        .lines()
        // The data lines only (a diagnostic line is not a reading; the
        // count below still requires every data line).
        .filter(|l| l.contains("SPO2=") && l.contains("BPM="))
        .map(parse_sim_line)
        .collect();
    assert_eq!(sim_lines.len(), LINES);
    wait_for(Duration::from_secs(30), "all readings at the hub", || {
        (total(&base) >= 3 * (LINES as u64 - 1)).then_some(())
    })
    .unwrap();
    // Let any last batch land, then stop the agent cleanly.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        agent.terminate(Duration::from_secs(10)),
        "agent exits cleanly on SIGTERM"
    );

    let all: Vec<Stored> = search_all(&base, &format!("patient={PATIENT}&_count=500&_sort=date"))
        .iter()
        .map(stored)
        .collect();

    // Exactly once: the device's sequence numbers, shared by readings (FHIR
    // Observations) and technical readings (the hub's device events), are
    // 1..=N with no gap and no repeat.
    let mut by_seq: BTreeMap<u64, Stored> = BTreeMap::new();
    for s in &all {
        assert!(
            by_seq.insert(s.seq, s.clone()).is_none(),
            "reading {} stored twice",
            s.seq
        );
    }
    let db = rusqlite::Connection::open(d.join("hub.sqlite")).unwrap();
    let events: Vec<(u64, String)> = db
        .prepare(
            "SELECT sequence, kind FROM device_events WHERE gateway_id = ?1 AND device_id = ?2",
        )
        .unwrap()
        .query_map([GATEWAY, DEVICE], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let connected = events.iter().filter(|(_, k)| k == "connected").count();
    assert!(
        connected >= 2,
        "a CONNECTED event per agent start: {events:?}"
    );
    let mut seqs: Vec<u64> = by_seq
        .keys()
        .copied()
        .chain(events.iter().map(|e| e.0))
        .collect();
    seqs.sort_unstable();
    let total_items = seqs.len() as u64;
    assert_eq!(
        seqs,
        (1..=total_items).collect::<Vec<_>>(),
        "gap or repeat in sequences"
    );
    let n = by_seq.len() as u64;
    assert_eq!(n % 3, 0, "every line gives SpO2, pulse rate and PI");

    // The stored lines are the device's lines, in order; at most the one
    // line in flight at the kill -9 (read but not yet durable) may be absent.
    let hub_lines: Vec<SimLine> = by_seq
        .values()
        .collect::<Vec<_>>()
        .chunks(3)
        .map(|c| {
            assert_eq!(c[0].mdc, "150456", "SpO2 first in each line");
            assert_eq!(c[1].mdc, "149530", "pulse rate second");
            assert_eq!(c[2].mdc, "150448", "PI third");
            assert!(c.iter().all(|s| s.time == c[0].time));
            SimLine {
                time: c[0].time.clone(),
                spo2: c[0].value,
                bpm: c[1].value,
                pi: c[2].value,
            }
        })
        .collect();
    let mut i = 0;
    let mut skipped = 0;
    for h in &hub_lines {
        while i < sim_lines.len() && sim_lines[i] != *h {
            i += 1;
            skipped += 1;
        }
        assert!(
            i < sim_lines.len(),
            "hub holds a line the device never sent: {h:?}"
        );
        i += 1;
    }
    skipped += sim_lines.len() - i;
    assert!(
        skipped <= 1,
        "{skipped} device lines lost (only the one in flight at kill -9 may be)"
    );
    eprintln!(
        "device lines: {}, stored: {}, lost in flight: {skipped}",
        sim_lines.len(),
        hub_lines.len()
    );

    // One SpO2 Observation in detail: profile, codes, unit, subject, time.
    let spo2 = &by_seq.values().next().unwrap().resource;
    assert_eq!(spo2["resourceType"], "Observation");
    assert_eq!(spo2["status"], "final");
    assert_eq!(spo2["category"][0]["coding"][0]["code"], "vital-signs");
    let codes = codes_of(spo2);
    for want in [
        ("http://loinc.org", "59408-5"),
        ("http://loinc.org", "2708-6"),
        ("urn:iso:std:iso:11073:10101", "150456"),
    ] {
        assert!(
            codes.contains(&(want.0.to_string(), want.1.to_string())),
            "{codes:?} lacks {want:?}"
        );
    }
    let q = &spo2["valueQuantity"];
    assert_eq!(
        (q["system"].as_str(), q["code"].as_str()),
        (Some("http://unitsofmeasure.org"), Some("%"))
    );
    assert_eq!(spo2["subject"]["reference"], format!("Patient/{PATIENT}"));
    assert!(spo2["effectiveDateTime"].as_str().unwrap().ends_with('Z'));

    // Search by the vital-signs heart-rate code finds the pulse-ox rate.
    let hr = search_all(
        &base,
        &format!("patient={PATIENT}&code=http://loinc.org|8867-4&_count=500"),
    );
    assert_eq!(hr.len() as u64, n / 3);
    assert!(codes_of(&hr[0]).contains(&("http://loinc.org".into(), "8889-8".into())));
    assert_eq!(hr[0]["valueQuantity"]["code"], "/min");
    // And a date-bounded search returns a subset consistent with the times.
    let first_time = &hub_lines[0].time;
    let bounded = search_all(
        &base,
        &format!("patient={PATIENT}&code=http://loinc.org|59408-5&date=le{first_time}&_count=500"),
    );
    assert!(!bounded.is_empty() && bounded.len() < hub_lines.len());
    assert!(
        bounded
            .iter()
            .all(|r| r["effectiveDateTime"].as_str().unwrap() <= first_time.as_str())
    );
    drop(hub2);
}

/// docs/first-gateway.md, word for word: its `sh run` blocks and
/// `file=` configs in order, in an empty directory, with the workspace
/// binaries on `PATH`. Only the hub's port 8080 is changed to a free one.
/// It must end with a FHIR searchset holding the patient's Observation.
#[test]
fn first_gateway_doc_gives_an_observation() {
    let (_td, dir) = test_dir("first-gateway");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let blocks = doc_blocks(&read_repo("docs/first-gateway.md"));
    assert!(
        blocks.iter().any(|b| matches!(b, DocBlock::Run(_))),
        "docs/first-gateway.md has no `sh run` blocks"
    );
    let script = doc_script(&blocks).replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    let (status, _out, err) = run_doc_script(&dir, &script, Duration::from_secs(180)).unwrap();
    let logs = ["hub.log", "agent.log", "sim.log"]
        .map(|f| {
            format!(
                "--- {f}\n{}",
                std::fs::read_to_string(dir.join(f)).unwrap_or_default()
            )
        })
        .join("\n");
    assert!(status.success(), "the doc's commands failed: {err}\n{logs}");
    let bundle: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("first.json")).expect("first.json written"),
    )
    .expect("first.json is JSON");
    assert_eq!(bundle["resourceType"], "Bundle", "{bundle}");
    let obs = &bundle["entry"][0]["resource"];
    assert_eq!(obs["resourceType"], "Observation", "{bundle}\n{logs}");
    assert_eq!(obs["subject"]["reference"], "Patient/MRN-0001", "{obs}");
    assert!(
        obs["code"]["coding"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["system"] == "http://loinc.org"),
        "{obs}"
    );
    assert!(obs["valueQuantity"]["value"].is_number(), "{obs}");
}

/// Every block marked runnable (`sh run`, with its `file=` blocks) in
/// README.md and docs/*.md runs as written in an empty directory, so the
/// commands the docs show cannot drift from the binaries.
/// docs/first-gateway.md has its own test above.
#[test]
fn runnable_doc_blocks_run() {
    let mut docs = vec!["README.md".to_owned()];
    let mut names: Vec<String> = std::fs::read_dir(repo_root().join("docs"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".md") && n != "first-gateway.md")
        .collect();
    names.sort();
    docs.extend(names.into_iter().map(|n| format!("docs/{n}")));
    let mut ran = vec![];
    for doc in docs {
        let blocks = doc_blocks(&read_repo(&doc));
        if !blocks.iter().any(|b| matches!(b, DocBlock::Run(_))) {
            continue;
        }
        let (_td, dir) = test_dir("doc-blocks");
        let (status, out, err) =
            run_doc_script(&dir, &doc_script(&blocks), Duration::from_secs(120)).unwrap();
        assert!(
            status.success(),
            "{doc}: a runnable block failed\nstdout:\n{out}\nstderr:\n{err}"
        );
        ran.push(doc);
    }
    // These documents' command blocks are marked runnable; losing the
    // marks would make this test vacuous.
    for doc in ["README.md", "docs/access.md", "docs/hub.md"] {
        assert!(
            ran.contains(&doc.to_owned()),
            "{doc} did not run: ran {ran:?}"
        );
    }
}

/// `edge-agent check-config` fails on a listening port another process
/// holds (a second agent on the host), naming the field, and prints a
/// warning for fields of the other uplink kind.
#[test]
fn check_config_sees_ports_in_use_and_leftover_uplink_fields() {
    let (_td, dir) = test_dir("check-config");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    write_private(&dir.join("gateway.token"), "vgt_x").unwrap();
    let check = |text: &str| {
        std::fs::write(dir.join("agent.toml"), text).unwrap();
        Command::new(bin("edge-agent"))
            .args(["check-config", "--config"])
            .arg(dir.join("agent.toml"))
            .output()
            .unwrap()
    };
    let https = "gateway_id = \"gw-1\"\ndata_dir = \"data\"\n[uplink]\nurl = \"http://127.0.0.1:8080/api/v1/ingest\"\ntoken_file = \"gateway.token\"\n";
    let ok = check(&format!("{https}[status]\nlisten = \"127.0.0.1:0\"\n"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let busy = check(&format!("{https}[status]\nlisten = \"127.0.0.1:{port}\"\n"));
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(!busy.status.success(), "a held port passed");
    assert!(err.contains("status.listen"), "{err}");
    drop(held);

    // IoT Hub with the HTTPS fields left in: valid, with a warning each.
    write_private(&dir.join("device.key"), "c2VjcmV0LWRldmljZS1rZXk=").unwrap();
    let out = check(&format!(
        "{https}kind = \"iothub-mqtt\"\n[uplink.iothub]\nhost = \"h.azure-devices.net\"\ndevice_id = \"gw-1\"\nsas_key_file = \"device.key\"\n"
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("warning: uplink.url") && stdout.contains("warning: uplink.token_file"),
        "{stdout}"
    );
}
