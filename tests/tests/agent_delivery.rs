//! The agent's delivery promises across hub outages, with the real binaries:
//! - live-first: after an outage, new readings reach the hub before the
//!   backlog has drained; the backlog fills in behind; all exactly once;
//! - overflow: with a tiny buffer and a long outage, the oldest readings are
//!   dropped, counted, and reported to the hub as a BUFFER_OVERFLOW event
//!   whose count matches the readings missing at the hub; with `refuse-new`
//!   through an uplink cut, the loss is exactly the counted refusals.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vigil_e2e::*;

const GATEWAY: &str = "gw-delivery";
const DEVICE: &str = "masimo-1";
const PATIENT: &str = "p-delivery";

struct Rig {
    /// The agent's data directory on a small tmpfs (first: unmounted before
    /// the test directory is removed).
    tmpfs: Option<Tmpfs>,
    _guard: Option<tempfile::TempDir>,
    dir: std::path::PathBuf,
    hub: Hub,
    _pty: PtyPair,
    sim: Proc,
    agent: Proc,
    /// Between agent and hub when the rig was built `via_proxy`.
    proxy: Option<TcpProxy>,
}

/// Hub + Masimo simulator at `interval_ms` + agent with extra config lines.
fn rig(name: &str, interval_ms: u64, lines: u64, backlog_rate: u32, agent_extra: &str) -> Rig {
    rig_with(
        name,
        interval_ms,
        lines,
        backlog_rate,
        agent_extra,
        false,
        None,
    )
}

/// As [`rig`]; with `via_proxy` the agent reaches the hub through a
/// [`TcpProxy`] the test controls; with `data_tmpfs` (a size) the agent's
/// data directory is a tmpfs of that size (None in `Rig::tmpfs` when not
/// root, see [`Tmpfs::mount`]).
fn rig_with(
    name: &str,
    interval_ms: u64,
    lines: u64,
    backlog_rate: u32,
    agent_extra: &str,
    via_proxy: bool,
    data_tmpfs: Option<&str>,
) -> Rig {
    let (guard, dir) = test_dir(name);
    let d = dir.as_path();
    let tmpfs = data_tmpfs.and_then(|size| Tmpfs::mount(&d.join("agent-data"), size).unwrap());
    let hub_cfg = write_hub_config(d, "127.0.0.1:0", &[(GATEWAY, DEVICE, PATIENT)]).unwrap();
    let token = add_gateway(&hub_cfg, GATEWAY).unwrap();
    let hub = start_hub(d, &hub_cfg).unwrap();
    let pty = PtyPair::new(d, "masimo").unwrap();
    let sim = Proc::spawn(
        "device-sim",
        Command::new(bin("device-sim"))
            .args([
                "masimo",
                "--scenario",
                "stable",
                "--interval-ms",
                &interval_ms.to_string(),
            ])
            .args(["--count", &lines.to_string(), "--port"])
            .arg(&pty.device)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    write_private(&d.join("gateway.token"), &token).unwrap();
    let proxy = via_proxy.then(|| {
        let hub_addr: std::net::SocketAddr =
            hub.base_url.trim_start_matches("http://").parse().unwrap();
        TcpProxy::start(hub_addr).unwrap()
    });
    let uplink_base = match &proxy {
        Some(p) => format!("http://{}", p.addr),
        None => hub.base_url.clone(),
    };
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "gateway_id = \"{GATEWAY}\"\ndata_dir = \"agent-data\"\n{agent_extra}\n[uplink]\nurl = \"{}/api/v1/ingest\"\n\
token_file = \"gateway.token\"\nbatch_max_readings = 60\nbatch_max_wait_ms = 100\nmax_backoff_ms = 300\n\
backlog_rate_per_s = {backlog_rate}\n\n[[device]]\nkind = \"masimo-serial\"\nid = \"{DEVICE}\"\nport = \"{}\"\n",
            uplink_base,
            pty.host.display()
        ),
    )
    .unwrap();
    let agent = start_agent(d, &cfg, "agent.log").unwrap();
    Rig {
        tmpfs,
        _guard: guard,
        dir,
        hub,
        _pty: pty,
        sim,
        agent,
        proxy,
    }
}

impl Rig {
    fn total(&self) -> u64 {
        get_json(&format!(
            "{}/fhir/Observation?patient={PATIENT}&_count=0",
            self.hub.base_url
        ))
        .ok()
        .and_then(|(_, b)| b["total"].as_u64())
        .unwrap_or(0)
    }

    /// Kill the hub, wait, start it again on the same port and database.
    fn hub_outage(&mut self, outage: Duration) -> (Instant, Instant) {
        let port = self.hub.base_url.rsplit(':').next().unwrap().to_string();
        self.hub.proc.kill9();
        let down = Instant::now();
        std::thread::sleep(outage);
        let cfg = write_hub_config(
            &self.dir,
            &format!("127.0.0.1:{port}"),
            &[(GATEWAY, DEVICE, PATIENT)],
        )
        .unwrap();
        self.hub = start_hub(&self.dir, &cfg).unwrap();
        (down, Instant::now())
    }

    /// (sequence → (batch sequence, effective µs)) of every stored reading.
    fn stored(&self) -> BTreeMap<u64, (i64, i64)> {
        let db = rusqlite::Connection::open(self.dir.join("hub.sqlite")).unwrap();
        db.prepare(
            "SELECT sequence, batch_sequence, effective_us FROM observations WHERE device_id = ?1",
        )
        .unwrap()
        .query_map([DEVICE], |r| {
            Ok((r.get::<_, i64>(0)? as u64, (r.get(1)?, r.get(2)?)))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    fn events(&self) -> Vec<(String, String, String)> {
        let db = rusqlite::Connection::open(self.dir.join("hub.sqlite")).unwrap();
        db.prepare("SELECT device_id, kind, detail FROM device_events ORDER BY rowid")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

fn now_us() -> i64 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()) as i64
}

#[test]
fn after_an_outage_live_readings_go_first_and_the_backlog_follows() {
    live_first_after(Outage::HubKilled);
}

/// The same through a network cut: the hub keeps running, the TCP proxy
/// between agent and hub drops every connection and refuses new ones for
/// 5 s, then lets traffic through again.
#[test]
fn after_an_uplink_cut_live_readings_go_first_and_the_backlog_follows() {
    live_first_after(Outage::LinkCut);
}

enum Outage {
    HubKilled,
    LinkCut,
}

fn live_first_after(outage: Outage) {
    // 20 lines/s = 60 readings/s live; the ~300-reading backlog drains at
    // 50 readings/s, so it takes ~6 s to fill in behind the live readings.
    let via_proxy = matches!(outage, Outage::LinkCut);
    let name = if via_proxy {
        "live-first-cut"
    } else {
        "live-first"
    };
    let mut rig = rig_with(name, 50, 400, 50, "", via_proxy, None);
    wait_for(Duration::from_secs(30), "first readings", || {
        (rig.total() >= 30).then_some(())
    })
    .unwrap();
    let down_us = now_us();
    match outage {
        Outage::HubKilled => {
            rig.hub_outage(Duration::from_secs(5));
        }
        Outage::LinkCut => {
            let proxy = rig.proxy.as_ref().unwrap();
            proxy.cut();
            std::thread::sleep(Duration::from_secs(5));
            proxy.restore();
        }
    }
    let up_us = now_us();
    rig.sim
        .wait_exit(Duration::from_secs(60))
        .expect("simulator finished");
    wait_for(Duration::from_secs(60), "backlog drained", || {
        std::thread::sleep(Duration::from_millis(300));
        let n = rig.total();
        (n >= 1190 && n == rig.total()).then_some(())
    })
    .unwrap();
    assert!(rig.agent.terminate(Duration::from_secs(10)));

    let stored = rig.stored();
    // Exactly once (technical readings take the remaining sequence numbers).
    let events: Vec<_> = rig.events();
    let n_tech = events.iter().filter(|e| e.0 == DEVICE).count() as u64;
    let max_seq = *stored.keys().max().unwrap();
    assert_eq!(
        stored.len() as u64 + n_tech,
        max_seq,
        "no gap, no duplicate"
    );

    // Backlog: device time well inside the outage. Live: stamped (device
    // clock, whole seconds) at least a second after the hub was back, so
    // stored by the agent after it recovered.
    let backlog: Vec<i64> = stored
        .values()
        .filter(|(_, t)| *t > down_us + 1_000_000 && *t < up_us - 1_000_000)
        .map(|(b, _)| *b)
        .collect();
    let live: Vec<i64> = stored
        .values()
        .filter(|(_, t)| *t > up_us + 2_000_000)
        .map(|(b, _)| *b)
        .collect();
    assert!(
        backlog.len() > 100 && !live.is_empty(),
        "backlog {} live {}",
        backlog.len(),
        live.len()
    );
    let first_live_batch = *live.iter().min().unwrap();
    let last_backlog_batch = *backlog.iter().max().unwrap();
    assert!(
        first_live_batch < last_backlog_batch,
        "live readings reached the hub (batch {first_live_batch}) before the backlog finished (batch {last_backlog_batch})"
    );
}

#[test]
fn a_full_buffer_drops_the_oldest_counts_them_and_tells_the_hub() {
    // 100 lines/s = 300 readings/s into a 64 KiB buffer while the hub is down.
    let mut rig = rig(
        "overflow",
        10,
        1500,
        500,
        "\n[buffer]\nmax_bytes = 65536\noverflow = \"drop-oldest\"\n",
    );
    wait_for(Duration::from_secs(30), "first readings", || {
        (rig.total() >= 30).then_some(())
    })
    .unwrap();
    rig.hub_outage(Duration::from_secs(6));
    rig.sim
        .wait_exit(Duration::from_secs(60))
        .expect("simulator finished");
    let stable = || {
        std::thread::sleep(Duration::from_millis(700));
        let a = rig.total();
        std::thread::sleep(Duration::from_millis(700));
        (a > 0 && a == rig.total()).then_some(a)
    };
    wait_for(Duration::from_secs(60), "delivery settled", stable).unwrap();
    assert!(rig.agent.terminate(Duration::from_secs(10)));

    let events = rig.events();
    let overflow: Vec<&(String, String, String)> =
        events.iter().filter(|e| e.1 == "buffer-overflow").collect();
    assert!(
        !overflow.is_empty(),
        "overflow reported to the hub: {events:?}"
    );
    assert!(
        overflow.iter().all(|e| e.0.is_empty()),
        "gateway-level event"
    );
    let reported: u64 = overflow
        .iter()
        .map(|e| {
            let d = &e.2;
            let n = d
                .split(": ")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .unwrap();
            n.parse::<u64>()
                .unwrap_or_else(|_| panic!("count in {d:?}"))
        })
        .sum();
    // Every sequence is either stored, a technical reading, or counted as dropped.
    let stored = rig.stored();
    let n_tech = events.iter().filter(|e| e.0 == DEVICE).count() as u64;
    let max_seq = *stored.keys().max().unwrap();
    let missing = max_seq - stored.len() as u64 - n_tech;
    assert!(missing > 0, "something was dropped");
    assert_eq!(
        missing, reported,
        "the reported count is exactly what is missing"
    );
    let counter = std::fs::read_to_string(rig.dir.join("agent.log")).unwrap();
    assert!(
        counter.contains("oldest records dropped"),
        "dropping is logged"
    );
}

#[test]
fn status_endpoint_reports_devices_buffer_and_uplink() {
    let mut rig = rig(
        "status",
        100,
        600,
        500,
        "\n[status]\nlisten = \"127.0.0.1:0\"\n",
    );
    wait_for(Duration::from_secs(30), "first readings", || {
        (rig.total() >= 30).then_some(())
    })
    .unwrap();
    let addr = status_addr(&rig.dir);
    let metrics = |addr: &str| -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::get(format!("http://{addr}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    };
    let sample = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in\n{text}"))
    };
    let up = metrics(&addr);
    // docs/metrics.md lists exactly what the agent serves (names, types,
    // label names).
    let served = served_families(&up);
    let documented = documented_families("edge-agent");
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        documented.keys().collect::<Vec<_>>(),
        "families served vs documented in docs/metrics.md"
    );
    for (name, (kind, labels)) in &served {
        assert_eq!(
            &(kind, labels),
            &(&documented[name].0, &documented[name].1),
            "{name}"
        );
    }
    assert!(
        sample(
            &up,
            "vigil_agent_device_frames_total{device=\"masimo-1\",outcome=\"ok\"}"
        ) > 5.0
    );
    assert_eq!(
        sample(&up, "vigil_agent_device_connected{device=\"masimo-1\"}"),
        1.0
    );
    assert_eq!(sample(&up, "vigil_agent_uplink_up"), 1.0);
    assert!(sample(&up, "vigil_agent_uplink_batches_total") > 0.0);
    let (status, health) = get_json(&format!("http://{addr}/healthz")).unwrap();
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));

    // Hub down: the uplink is reported down and the buffer fills.
    rig.hub.proc.kill9();
    let down = wait_for(Duration::from_secs(15), "uplink down and backlog", || {
        let m = metrics(&addr);
        (sample(&m, "vigil_agent_uplink_up") == 0.0 && sample(&m, "vigil_agent_buffer_items") > 0.0)
            .then_some(m)
    })
    .unwrap();
    assert!(sample(&down, "vigil_agent_uplink_send_failures_total") > 0.0);
    assert!(sample(&down, "vigil_agent_buffer_oldest_age_seconds") >= 0.0);
    assert!(rig.agent.terminate(Duration::from_secs(10)));
}

#[test]
fn on_sigterm_the_agent_delivers_what_it_buffered_before_exiting() {
    let (_guard, dir) = test_dir("drain");
    let d = dir.as_path();
    let hub_cfg = write_hub_config(d, "127.0.0.1:0", &[(GATEWAY, DEVICE, PATIENT)]).unwrap();
    let token = add_gateway(&hub_cfg, GATEWAY).unwrap();
    let hub = start_hub(d, &hub_cfg).unwrap();
    let pty = PtyPair::new(d, "masimo").unwrap();
    let mut sim = Proc::spawn(
        "device-sim",
        Command::new(bin("device-sim"))
            .args(["masimo", "--interval-ms", "50", "--count", "40", "--port"])
            .arg(&pty.device)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    write_private(&d.join("gateway.token"), &token).unwrap();
    let cfg = d.join("agent.toml");
    // Batches are paced 60 s apart (the first 60 s after the start): without
    // the drain, what the agent buffered would still be waiting when it
    // exits.
    std::fs::write(
        &cfg,
        format!(
            "gateway_id = \"{GATEWAY}\"\ndata_dir = \"agent-data\"\n[uplink]\nurl = \"{}/api/v1/ingest\"\n\
token_file = \"gateway.token\"\nbatch_max_readings = 10000\nbatch_min_interval_ms = 60000\nbatch_max_wait_ms = 60000\nshutdown_drain_ms = 10000\n\n\
[[device]]\nkind = \"masimo-serial\"\nid = \"{DEVICE}\"\nport = \"{}\"\n",
            hub.base_url,
            pty.host.display()
        ),
    )
    .unwrap();
    let mut agent = start_agent(d, &cfg, "agent.log").unwrap();
    sim.wait_exit(Duration::from_secs(30))
        .expect("simulator finished");
    std::thread::sleep(Duration::from_millis(500));
    let before = get_json(&format!(
        "{}/fhir/Observation?patient={PATIENT}&_count=0",
        hub.base_url
    ))
    .unwrap()
    .1["total"]
        .as_u64()
        .unwrap();
    assert_eq!(before, 0, "nothing sent yet: the batch is still filling");
    assert!(agent.terminate(Duration::from_secs(20)), "clean exit");
    let after = get_json(&format!(
        "{}/fhir/Observation?patient={PATIENT}&_count=0",
        hub.base_url
    ))
    .unwrap()
    .1["total"]
        .as_u64()
        .unwrap();
    assert_eq!(
        after, 120,
        "all 40 lines (3 readings each) delivered during the drain"
    );
    let log = std::fs::read_to_string(d.join("agent.log")).unwrap();
    // The shutdown summary (not the start line, which also prints the
    // pending count) says nothing is left.
    let stopped = log
        .lines()
        .find(|l| l.contains("edge-agent stopped"))
        .unwrap_or_else(|| panic!("no shutdown summary:\n{log}"));
    assert!(
        stopped.contains("pending_readings=0"),
        "nothing left buffered: {stopped}"
    );
}

/// The `refuse-new` policy through an uplink cut (the `TcpProxy` between
/// agent and hub drops and refuses connections for 6 s while the hub
/// keeps running): the full 64 KiB buffer refuses new readings and counts
/// them; what it accepted before reaches the hub exactly once after the
/// link is restored, and the loss is exactly the counted refusals
/// (readings the driver decoded = stored + refused).
#[test]
fn a_full_buffer_refusing_new_readings_loses_exactly_what_it_counts() {
    let mut rig = rig_with(
        "overflow-refuse",
        10,
        1500,
        500,
        "\n[buffer]\nmax_bytes = 65536\noverflow = \"refuse-new\"\n\n[status]\nlisten = \"127.0.0.1:0\"\n",
        true,
        None,
    );
    wait_for(Duration::from_secs(30), "first readings", || {
        (rig.total() >= 30).then_some(())
    })
    .unwrap();
    let log = rig.dir.join("agent.log");
    let addr = wait_for(Duration::from_secs(10), "status address", || {
        let text = std::fs::read_to_string(&log).ok()?;
        let line = text
            .lines()
            .find(|l| l.contains("status endpoint listening"))?;
        Some(
            line.split("addr=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_string(),
        )
    })
    .unwrap();
    let metric = |name: &str| -> f64 { scrape(&addr, name) };
    let proxy = rig.proxy.as_ref().unwrap();
    proxy.cut();
    wait_for(
        Duration::from_secs(30),
        "the buffer full and refusing",
        || (metric("vigil_agent_buffer_refused_total{reason=\"policy\"}") > 0.0).then_some(()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    proxy.restore();
    rig.sim
        .wait_exit(Duration::from_secs(60))
        .expect("simulator finished");
    wait_for(Duration::from_secs(60), "delivery settled", || {
        std::thread::sleep(Duration::from_millis(700));
        let a = rig.total();
        std::thread::sleep(Duration::from_millis(700));
        (a > 0 && a == rig.total() && metric("vigil_agent_buffer_items") == 0.0).then_some(())
    })
    .unwrap();
    let refused = metric("vigil_agent_buffer_refused_total{reason=\"policy\"}");
    let dropped = metric("vigil_agent_buffer_dropped_total");
    let frames = metric(&format!(
        "vigil_agent_device_frames_total{{device=\"{DEVICE}\",outcome=\"ok\"}}"
    ));
    assert!(rig.agent.terminate(Duration::from_secs(10)));

    // Accepted readings: exactly once, no gap (a refused reading never
    // took a sequence number).
    let stored = rig.stored();
    let n_tech = rig.events().iter().filter(|e| e.0 == DEVICE).count() as u64;
    let max_seq = *stored.keys().max().unwrap();
    assert_eq!(
        stored.len() as u64 + n_tech,
        max_seq,
        "no gap, no duplicate"
    );
    // The loss is exactly what was counted as refused; nothing dropped.
    assert!(refused > 0.0, "something was refused");
    assert_eq!(dropped, 0.0, "refuse-new never drops stored readings");
    assert_eq!(
        stored.len() as f64 + refused,
        3.0 * frames,
        "every decoded reading is stored or counted as refused (3 per Masimo line)"
    );
}

/// The agent's status endpoint address (from its log).
fn status_addr(dir: &std::path::Path) -> String {
    let log = dir.join("agent.log");
    wait_for(Duration::from_secs(10), "status address", || {
        let text = std::fs::read_to_string(&log).ok()?;
        let line = text
            .lines()
            .find(|l| l.contains("status endpoint listening"))?;
        Some(
            line.split("addr=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_string(),
        )
    })
    .unwrap()
}

/// One sample's value from the agent's `/metrics` (`name` with its labels).
fn scrape(addr: &str, name: &str) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not served"))
        .trim()
        .parse()
        .unwrap()
}

/// A transient full disk (issue 16): the agent's data directory is a 24 MiB
/// tmpfs that the test fills with a file while the device sends, then frees
/// by deleting it. While writes fail the agent counts them and `/healthz`
/// answers 503 "degraded"; once space is back it recovers by itself (same
/// process, no restart), stores what it held, and reports the failure to
/// the hub as a BUFFER_WRITE_FAILED gateway event. Nothing is lost
/// uncounted: readings the driver decoded = stored at the hub + refused.
#[test]
fn a_disk_that_fills_and_frees_loses_nothing_uncounted_and_needs_no_restart() {
    let mut rig = rig_with(
        "disk-full",
        10,
        2500,
        500,
        "\n[status]\nlisten = \"127.0.0.1:0\"\n",
        false,
        Some("24m"),
    );
    if rig.tmpfs.is_none() {
        return; // not root: Tmpfs::mount printed why
    }
    wait_for(Duration::from_secs(30), "first readings", || {
        (rig.total() >= 30).then_some(())
    })
    .unwrap();
    let addr = status_addr(&rig.dir);
    let healthz = || get_json(&format!("http://{addr}/healthz")).ok();
    assert_eq!(healthz().unwrap().0, 200);
    let pid = rig.agent.child.id();
    rig.tmpfs.as_ref().unwrap().fill("filler").unwrap();
    let (_, degraded) = wait_for(Duration::from_secs(20), "/healthz degraded", || {
        healthz().filter(|(code, _)| *code == 503)
    })
    .unwrap();
    assert_eq!(degraded["status"], "degraded", "{degraded}");
    assert_eq!(degraded["buffer_writable"], false, "{degraded}");
    let reason = degraded["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("No space left on device"), "{degraded}");
    assert!(scrape(&addr, "vigil_agent_buffer_write_errors_total") > 0.0);
    assert_eq!(scrape(&addr, "vigil_agent_buffer_writable"), 0.0);
    // The device keeps sending into a full disk for a while.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(healthz().unwrap().0, 503, "still full, still degraded");
    std::fs::remove_file(rig.tmpfs.as_ref().unwrap().path.join("filler")).unwrap();
    wait_for(Duration::from_secs(30), "/healthz ok again", || {
        healthz().filter(|(code, _)| *code == 200)
    })
    .unwrap();
    assert_eq!(scrape(&addr, "vigil_agent_buffer_writable"), 1.0);
    rig.sim
        .wait_exit(Duration::from_secs(90))
        .expect("simulator finished");
    wait_for(Duration::from_secs(60), "delivery settled", || {
        std::thread::sleep(Duration::from_millis(700));
        let a = rig.total();
        std::thread::sleep(Duration::from_millis(700));
        (a > 0 && a == rig.total() && scrape(&addr, "vigil_agent_buffer_items") == 0.0)
            .then_some(())
    })
    .unwrap();
    let refused_io = scrape(&addr, "vigil_agent_buffer_refused_total{reason=\"io\"}");
    let refused_policy = scrape(&addr, "vigil_agent_buffer_refused_total{reason=\"policy\"}");
    let dropped = scrape(&addr, "vigil_agent_buffer_dropped_total");
    let frames = scrape(
        &addr,
        &format!("vigil_agent_device_frames_total{{device=\"{DEVICE}\",outcome=\"ok\"}}"),
    );
    assert!(
        rig.agent.child.try_wait().unwrap().is_none() && rig.agent.child.id() == pid,
        "the agent recovered without a restart"
    );
    assert!(rig.agent.terminate(Duration::from_secs(10)), "clean stop");

    // Stored exactly once, no gap (a refused reading never took a sequence).
    let stored = rig.stored();
    let events = rig.events();
    let n_tech = events.iter().filter(|e| e.0 == DEVICE).count() as u64;
    let max_seq = *stored.keys().max().unwrap();
    assert_eq!(
        stored.len() as u64 + n_tech,
        max_seq,
        "no gap, no duplicate"
    );
    assert_eq!(dropped + refused_policy, 0.0, "no overflow here");
    assert_eq!(
        stored.len() as f64 + refused_io,
        3.0 * frames,
        "every decoded reading is stored or counted as refused (3 per Masimo line)"
    );
    // The hub heard about it, under its own kind.
    let reported: Vec<_> = events
        .iter()
        .filter(|e| e.0.is_empty() && e.1 == "buffer-write-failed")
        .collect();
    assert!(
        !reported.is_empty(),
        "no BUFFER_WRITE_FAILED event: {events:?}"
    );
    assert!(
        reported[0].2.contains("recovered without restart")
            && reported[0]
                .2
                .contains(&format!("{refused_io} items refused")),
        "{reported:?}"
    );
    let log = std::fs::read_to_string(rig.dir.join("agent.log")).unwrap();
    assert!(log.contains("buffer storage recovered"), "{log}");
}

/// Run `edge-agent run` with extra arguments (stderr appended to `log_name`).
fn start_agent_args(dir: &std::path::Path, log_name: &str, extra: &[&str]) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(log_name))
        .unwrap();
    Proc::spawn(
        "edge-agent",
        Command::new(bin("edge-agent"))
            .args(["run", "--config"])
            .arg(dir.join("agent.toml"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log),
    )
    .unwrap()
}

/// A lost buffer key: the agent refuses to start and names the key; with
/// `--accept-key-loss` it runs, keeps the old records (neither sent nor
/// quarantined) and reports the loss to the hub; once the key is restored
/// (beside the new one as `buffer.key.retired-<id>`) every buffered record
/// reaches the hub: no sequence is missing.
#[test]
fn a_lost_buffer_key_is_refused_then_reported_and_recovered_when_restored() {
    let mut rig = rig_with("keyloss", 50, 100_000, 500, "", true, None);
    wait_for(Duration::from_secs(30), "first readings", || {
        (rig.total() >= 10).then_some(())
    })
    .unwrap();
    // Uplink cut: what the device sends now stays in the buffer.
    rig.proxy.as_ref().unwrap().cut();
    std::thread::sleep(Duration::from_secs(3));
    assert!(rig.agent.terminate(Duration::from_secs(20)));
    let d = rig.dir.clone();
    let key = d.join("agent-data/buffer.key");
    let saved = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();

    // 1. Without the key the agent refuses to start, and says why.
    let mut refused = start_agent_args(&d, "agent-refused.log", &[]);
    let status = refused
        .wait_exit(Duration::from_secs(30))
        .expect("the agent exits instead of running without its key");
    assert!(!status.success());
    let log = std::fs::read_to_string(d.join("agent-refused.log")).unwrap();
    assert!(
        log.contains("--accept-key-loss") && log.contains("buffer key(s) "),
        "{log}"
    );
    let key_id = log
        .split("buffer key(s) ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(key_id.len(), 8, "{log}");

    // 2. Accepted: runs, new readings flow, the loss is reported to the hub.
    rig.proxy.as_ref().unwrap().restore();
    let mut accepted = start_agent_args(&d, "agent-accepted.log", &["--accept-key-loss"]);
    let event = wait_for(Duration::from_secs(60), "key-loss event at the hub", || {
        rig.events().into_iter().find(|e| {
            e.0.is_empty() && e.1 == "buffer-key-lost" && e.2.starts_with("buffer key lost: ")
        })
    })
    .unwrap();
    let locked: u64 = event.2["buffer key lost: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(locked > 0, "{event:?}");
    assert!(event.2.contains(&key_id), "{event:?}");
    assert!(accepted.terminate(Duration::from_secs(20)));
    let before_restore = rig.stored();
    let max_seq = *before_restore.keys().max().unwrap();
    let n_tech = rig.events().iter().filter(|e| e.0 == DEVICE).count() as u64;
    assert!(
        max_seq > before_restore.len() as u64 + n_tech,
        "the locked readings are missing at the hub for now"
    );

    // 3. The key is back: everything buffered arrives.
    let mut restored = d.join("agent-data/buffer.key").into_os_string();
    restored.push(format!(".retired-{key_id}"));
    write_private(
        std::path::Path::new(&restored),
        &String::from_utf8_lossy(&hex_or_raw(&saved)),
    )
    .unwrap();
    let mut agent = start_agent_args(&d, "agent-restored.log", &[]);
    rig.sim.kill9();
    let stable = || {
        std::thread::sleep(Duration::from_millis(700));
        let a = rig.stored().len();
        std::thread::sleep(Duration::from_millis(700));
        (a > 0 && a == rig.stored().len()).then_some(a)
    };
    wait_for(Duration::from_secs(60), "delivery settled", stable).unwrap();
    assert!(agent.terminate(Duration::from_secs(20)));
    let stored = rig.stored();
    let events = rig.events();
    let n_tech = events.iter().filter(|e| e.0 == DEVICE).count() as u64;
    let max_seq = *stored.keys().max().unwrap();
    assert_eq!(
        max_seq,
        stored.len() as u64 + n_tech,
        "every sequence is stored or a technical reading"
    );
    assert!(
        !std::fs::read_to_string(d.join("agent-restored.log"))
            .unwrap()
            .contains("buffer record quarantined")
    );
}

/// The key file as text for `write_private`: 32 raw bytes as hex (the agent
/// reads both forms).
fn hex_or_raw(key: &[u8]) -> Vec<u8> {
    if key.len() == 32 {
        key.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes()
    } else {
        key.to_vec()
    }
}

/// `edge-agent check` authenticates the gateway token with the hub: the
/// right token is OK, a wrong one a FAIL naming HTTP 401 (exit code 1).
#[test]
fn check_authenticates_the_gateway_token_with_the_hub() {
    let (_guard, dir) = test_dir("check-auth");
    let d = dir.as_path();
    let hub_cfg = write_hub_config(d, "127.0.0.1:0", &[(GATEWAY, DEVICE, PATIENT)]).unwrap();
    let token = add_gateway(&hub_cfg, GATEWAY).unwrap();
    let hub = start_hub(d, &hub_cfg).unwrap();
    let check = |tok: &str| {
        write_private(&d.join("gateway.token"), tok).unwrap();
        std::fs::write(
            d.join("agent.toml"),
            format!(
                "gateway_id = \"{GATEWAY}\"\ndata_dir = \"agent-data\"\n[uplink]\nurl = \"{}/api/v1/ingest\"\ntoken_file = \"gateway.token\"\n",
                hub.base_url
            ),
        )
        .unwrap();
        let out = Command::new(bin("edge-agent"))
            .args(["check", "--config"])
            .arg(d.join("agent.toml"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.get(5..39).map(str::trim) == Some("hub"))
            .unwrap_or_else(|| panic!("{text}"))
            .to_string();
        (out.status.success(), line)
    };
    let (ok, line) = check(&token);
    assert!(
        ok && line.starts_with("OK") && line.contains("accepts the gateway token"),
        "{line}"
    );
    let (ok, line) = check("vgt_not-a-token-the-hub-issued");
    assert!(
        !ok && line.starts_with("FAIL") && line.contains("401"),
        "{line}"
    );
}

/// Per buffer incarnation: (incarnation, the device's stored reading
/// sequences, its technical-reading sequences).
type Incarnations = BTreeMap<i64, (Vec<i64>, Vec<i64>)>;

fn by_incarnation(dir: &std::path::Path) -> Incarnations {
    let db = rusqlite::Connection::open(dir.join("hub.sqlite")).unwrap();
    let mut out = Incarnations::new();
    for (table, tech) in [("observations", false), ("device_events", true)] {
        let rows: Vec<(i64, i64)> = db
            .prepare(&format!(
                "SELECT incarnation, sequence FROM {table} WHERE device_id = ?1 AND sequence > 0"
            ))
            .unwrap()
            .query_map([DEVICE], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for (inc, seq) in rows {
            let e = out.entry(inc).or_default();
            if tech { &mut e.1 } else { &mut e.0 }.push(seq);
        }
    }
    out
}

/// The incarnations of the first `n` observation rows stored, with their
/// count.
fn by_incarnation_before(dir: &std::path::Path, n: u64) -> BTreeMap<i64, usize> {
    let db = rusqlite::Connection::open(dir.join("hub.sqlite")).unwrap();
    let mut out = BTreeMap::new();
    let rows: Vec<i64> = db
        .prepare(
            "SELECT incarnation FROM observations WHERE device_id = ?1 AND sequence > 0
             ORDER BY rowid LIMIT ?2",
        )
        .unwrap()
        .query_map(rusqlite::params![DEVICE, n as i64], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for inc in rows {
        *out.entry(inc).or_default() += 1;
    }
    out
}

/// A gateway whose data directory is lost (`re_add`: and whose id is then
/// revoked and added again, the documented replacement) starts a new buffer
/// at sequence 1: every reading of the new buffer reaches the hub (none
/// taken for the old buffer's duplicates), the old ones stay stored once,
/// and the hub records the new incarnation as a gateway event.
fn a_fresh_data_directory_loses_nothing(name: &str, re_add: bool) {
    let mut rig = rig(name, 50, 100_000, 100_000, "");
    wait_for(Duration::from_secs(30), "first readings", || {
        (rig.total() >= 40).then_some(())
    })
    .unwrap();
    // The agent drains on SIGTERM: everything it accepted is at the hub.
    assert!(rig.agent.terminate(Duration::from_secs(20)));
    let total_before = rig.total();
    let d = rig.dir.clone();
    std::fs::remove_dir_all(d.join("agent-data")).unwrap();
    if re_add {
        let cfg = d.join("hub.toml");
        let out = Command::new(bin("cloud-hub"))
            .args(["gateway", "revoke", GATEWAY, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let token = add_gateway(&cfg, GATEWAY).unwrap();
        write_private(&d.join("gateway.token"), &token).unwrap();
    }
    let mut agent = start_agent(&d, &d.join("agent.toml"), "agent-fresh.log").unwrap();
    // Today's hub answered the new buffer's batch 1 with the old batch 1's
    // ack and the agent deleted the readings: nothing new ever arrived.
    wait_for(
        Duration::from_secs(60),
        "readings of the new buffer",
        || (rig.total() >= total_before + 40).then_some(()),
    )
    .unwrap();
    rig.sim.kill9();
    assert!(agent.terminate(Duration::from_secs(20)));
    let before = by_incarnation_before(&d, total_before);
    let after = by_incarnation(&d);
    assert_eq!(
        after.len(),
        2,
        "two buffer incarnations: {:?}",
        after.keys()
    );
    assert_eq!(before.len(), 1, "{before:?}");
    let (old_inc, old_rows) = before.iter().next().unwrap();
    assert_eq!(
        after[old_inc].0.len(),
        *old_rows,
        "the old buffer's rows are unchanged"
    );
    for (inc, (readings, tech)) in &after {
        assert_ne!(*inc, 0, "agents of this build send an incarnation");
        // The device's sequences of a buffer are 1..=max, shared by readings
        // and technical readings: a gap is a lost reading.
        let mut all: Vec<i64> = readings.iter().chain(tech).copied().collect();
        all.sort_unstable();
        let n = all.len() as i64;
        assert_eq!(all, (1..=n).collect::<Vec<_>>(), "incarnation {inc:x}");
    }
    // The hub noted both incarnations as gateway events.
    let events: Vec<_> = rig
        .events()
        .into_iter()
        .filter(|e| e.0.is_empty() && e.1 == "buffer-incarnation")
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events[0].2.starts_with("first buffer incarnation"),
        "{events:?}"
    );
    assert!(
        events[1].2.starts_with("new buffer incarnation"),
        "{events:?}"
    );
    let log = std::fs::read_to_string(d.join("agent-fresh.log")).unwrap();
    assert!(!log.contains("hub ack can never match"), "{log}");
}

#[test]
fn a_wiped_data_directory_loses_none_of_the_new_readings() {
    a_fresh_data_directory_loses_nothing("wiped", false);
}

#[test]
fn a_revoked_and_re_added_gateway_with_a_fresh_data_directory_loses_nothing() {
    a_fresh_data_directory_loses_nothing("readded", true);
}
