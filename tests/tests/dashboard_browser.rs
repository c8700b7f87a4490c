//! The clinician dashboard in a real headless Chromium (Debian `chromium` +
//! `chromium-driver`, installed by scripts/setup.sh), driven over WebDriver.
//!
//! Real binaries: a hub with a three-bed ward, one agent, three simulated
//! monitors on PTY pairs (IntelliVue stable, IntelliVue deteriorating,
//! Masimo). A clinician logs in through the login form and must see:
//! - the ward view populated with live data: one tile per bed carrying the
//!   patient ids, vital values and NEWS2 totals the hub's ward API reports
//!   (compared exactly while the agent is paused, so both show the same
//!   instant), in the API's risk order; a screenshot PNG that decodes, has a
//!   plausible size and shows the NEWS2 band colour of scored tiles;
//! - a new alert appearing live (no reload; the SSE stream's toast) when a
//!   device goes silent, and the acknowledge flow: the click turns the row
//!   to "acknowledged" and the API agrees, with the clinician as actor.
//!
//! The screenshot is kept in the test dir and copied to
//! /tmp/dashboard-ward.png for review.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use vigil_e2e::*;

const GATEWAY: &str = "gw-ward";
const WARD: &str = "WARD-T";
const PASSWORD: &str = "correct-horse-battery-staple";
/// The admin token when the harness's hub config has none.
const ADMIN_TOKEN: &str = "dashboard-test-admin-token-0123456789abcdef";

/// (bed, device id, agent kind, simulator args, agent options, patient)
type BedSetup = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static str,
    &'static str,
);
const BEDS: &[BedSetup] = &[
    (
        "bed-1",
        "intellivue-1",
        "intellivue-serial",
        &["intellivue", "--scenario", "stable", "--seed", "1"],
        "poll_interval_ms = 500",
        "p-stable",
    ),
    (
        "bed-2",
        "intellivue-2",
        "intellivue-serial",
        &["intellivue", "--scenario", "deteriorating", "--seed", "2"],
        "poll_interval_ms = 500",
        "p-deteriorating",
    ),
    (
        "bed-3",
        "masimo-1",
        "masimo-serial",
        &["masimo", "--scenario", "stable", "--interval-ms", "500"],
        "",
        "p-oximeter",
    ),
];

/// The browser and its driver, found or the test fails naming the setup.
fn browser_binaries() -> (PathBuf, PathBuf) {
    let chromium = std::env::var_os("VIGIL_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let driver = std::env::var_os("VIGIL_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"));
    for (p, pkg) in [(&chromium, "chromium"), (&driver, "chromium-driver")] {
        assert!(
            p.exists(),
            "{} not found: the dashboard browser test needs Debian's `{pkg}` package; run \
             scripts/setup.sh (CI does) or set VIGIL_CHROMIUM / VIGIL_CHROMEDRIVER",
            p.display()
        );
    }
    (chromium, driver)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a free loopback port, killed on drop (the guard).
fn start_chromedriver(dir: &Path, driver: &Path) -> Result<(Proc, String)> {
    let port = free_port();
    let log = std::fs::File::create(dir.join("chromedriver.log"))?;
    let proc = Proc::spawn(
        "chromedriver",
        Command::new(driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(log.try_clone()?)
            .stderr(log),
    )?;
    let url = format!("http://127.0.0.1:{port}");
    wait_for(Duration::from_secs(20), "chromedriver listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })?;
    Ok((proc, url))
}

async fn connect_browser(driver_url: &str, chromium: &Path, profile: &Path) -> Result<Client> {
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(driver_url)
        .await
        .context("starting a Chromium session through chromedriver")
}

/// The hub's JSON API with the harness's admin token (what the browser must agree
/// with).
struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(
            status.is_success() || status.as_u16() == 409,
            "{method} {path}: {status} {text}"
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await
    }
}

/// Polls `script` (a function body returning a value) in the page until
/// `ok` accepts its result.
async fn wait_js(
    c: &Client,
    what: &str,
    timeout: Duration,
    script: &str,
    ok: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < timeout {
        last = c.execute(script, vec![]).await?;
        if ok(&last) {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}; last value: {last}")
}

/// A JS expression: what each tile shows.
const TILES: &str = r#"[...document.querySelectorAll('article.tile')].map((t) => ({
  bed: t.dataset.bed,
  patient: t.dataset.patient,
  band: t.dataset.band,
  news2: t.querySelector('.news2').dataset.news2,
  vitals: Object.fromEntries([...t.querySelectorAll('.vital')]
    .filter((v) => v.dataset.value !== '')
    .map((v) => [v.dataset.parameter, Number(v.dataset.value)])),
}))"#;

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}

/// Counts pixels of colour `rgb` (± 3 per channel) in a decoded RGB(A)
/// screenshot.
fn count_colour(png_bytes: &[u8], rgb: [u8; 3]) -> Result<(u32, u32, usize, usize)> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or(anyhow!("PNG too big"))?];
    let info = reader.next_frame(&mut buf)?;
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => bail!("unexpected PNG colour type {other:?}"),
    };
    let data = &buf[..info.buffer_size()];
    let mut hits = 0;
    let mut distinct = std::collections::HashSet::new();
    for px in data.chunks_exact(channels) {
        if px[..3].iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 3) {
            hits += 1;
        }
        if distinct.len() < 10_000 {
            distinct.insert([px[0], px[1], px[2]]);
        }
    }
    Ok((info.width, info.height, hits, distinct.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_ward_view_live_alert_and_acknowledge_in_chromium() {
    dashboard_in_chromium(Backend::Sqlite).await
}

/// The same clinician session with the hub on PostgreSQL (the production
/// backend): the ward view, the live alert and its acknowledge must not
/// differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_ward_view_live_alert_and_acknowledge_in_chromium_on_postgres() {
    dashboard_in_chromium(Backend::postgres()).await
}

async fn dashboard_in_chromium(backend: Backend) {
    let (chromium, driver) = browser_binaries();
    let (guard, dir) = test_dir(&format!("dashboard-browser-{}", backend.name()));
    let d = dir.as_path();

    // Hub (an admin bearer token sets the ward up), one clinician.
    let hub_cfg = write_hub_config_on(&backend, d, "127.0.0.1:0", &[]).unwrap();
    let text = std::fs::read_to_string(&hub_cfg).unwrap();
    if !text.contains("[association]") {
        std::fs::write(
            &hub_cfg,
            format!("{text}[association]\nadmin_token_file = \"admin.token\"\n"),
        )
        .unwrap();
        write_private(&d.join("admin.token"), ADMIN_TOKEN).unwrap();
    }
    let admin_token = std::fs::read_to_string(d.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    write_private(&d.join("clinician.password"), PASSWORD).unwrap();
    let token = add_gateway(&hub_cfg, GATEWAY).unwrap();
    let out = Command::new(bin("cloud-hub"))
        .args(["--config"])
        .arg(&hub_cfg)
        .args([
            "user",
            "add",
            "dr-jones",
            "--role",
            "clinician",
            "--password-file",
        ])
        .arg(d.join("clinician.password"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "user add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hub = start_hub(d, &hub_cfg).unwrap();
    let base = hub.base_url.clone();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = Api {
        base: base.clone(),
        token: admin_token,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    };

    // The ward: beds, placements, admissions, bedside observations.
    for (bed, dev, _, _, _, patient) in BEDS {
        let n = &bed[4..];
        api.call(
            reqwest::Method::POST,
            "/api/v1/beds",
            Some(json!({ "id": bed, "ward": WARD, "label": format!("Bed {n}") })),
        )
        .await;
        api.call(
            reqwest::Method::POST,
            "/api/v1/placements",
            Some(json!({ "gateway_id": GATEWAY, "device_id": dev, "bed_id": bed })),
        )
        .await;
        api.call(
            reqwest::Method::POST,
            "/api/v1/patients/admit",
            Some(
                json!({ "patient": { "system": "urn:test:mrn", "value": patient }, "bed_id": bed }),
            ),
        )
        .await;
        api.call(
            reqwest::Method::PUT,
            &format!("/api/v1/patients/{patient}/manual-inputs"),
            Some(json!({ "consciousness": "alert", "supplemental_oxygen": false })),
        )
        .await;
    }

    // Devices and the agent.
    let mut ptys = Vec::new();
    let mut sims = Vec::new();
    let mut agent_toml = format!(
        "gateway_id = \"{GATEWAY}\"\ndata_dir = \"agent-data\"\n\n[uplink]\nurl = \"{base}/api/v1/ingest\"\n\
token_file = \"gateway.token\"\nbatch_max_wait_ms = 200\nmax_backoff_ms = 500\n"
    );
    for (bed, dev, kind, sim, opts, _) in BEDS {
        let pty = PtyPair::new(d, dev).unwrap();
        let log = std::fs::File::create(d.join(format!("{dev}-sim.log"))).unwrap();
        sims.push(
            Proc::spawn(
                "device-sim",
                Command::new(bin("device-sim"))
                    .args(*sim)
                    .arg("--port")
                    .arg(&pty.device)
                    .stdout(Stdio::null())
                    .stderr(log),
            )
            .unwrap(),
        );
        agent_toml.push_str(&format!(
            "\n[[device]]\nkind = \"{kind}\"\nid = \"{dev}\"\nport = \"{}\"\nlocation = \"{WARD}/{bed}\"\n\
silence_timeout_ms = 2000\n[device.options]\n{opts}\n",
            pty.host.display()
        ));
        ptys.push(pty);
    }
    write_private(&d.join("gateway.token"), &token).unwrap();
    let agent_cfg = d.join("agent.toml");
    std::fs::write(&agent_cfg, agent_toml).unwrap();
    let agent = start_agent(d, &agent_cfg, "agent.log").unwrap();

    // Data reaches the ward API before the browser looks.
    let start = Instant::now();
    loop {
        let o = api.get(&format!("/api/v1/wards/{WARD}/overview")).await;
        let full = o["beds"].as_array().is_some_and(|b| {
            b.len() == 3
                && b.iter()
                    .all(|b| b["vitals"].as_array().is_some_and(|v| v.len() >= 2))
        });
        if full {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ward API never showed vitals for 3 beds: {o}; see {}",
            d.display()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let (mut chromedriver, driver_url) = start_chromedriver(d, &driver).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let c = connect_browser(&driver_url, &chromium, profile.path())
        .await
        .unwrap();
    let result = browse(&c, &api, &base, d, agent.child.id(), &mut sims).await;
    if result.is_err() {
        // What the page showed, for the failure message's reader.
        if let Ok(png) = c.screenshot().await {
            let _ = std::fs::write(d.join("failure.png"), png);
        }
        if let Ok(src) = c.source().await {
            let _ = std::fs::write(d.join("failure.html"), src);
        }
    }
    let _ = c.close().await;
    chromedriver.terminate(Duration::from_secs(5));
    drop(agent);
    if let Err(e) = result {
        let kept = d.to_path_buf();
        if let Some(g) = guard {
            let _ = g.keep();
        }
        panic!("{e:#}\ntest dir kept: {}", kept.display());
    }
}

async fn browse(
    c: &Client,
    api: &Api,
    base: &str,
    dir: &Path,
    agent_pid: u32,
    sims: &mut [Proc],
) -> Result<()> {
    // `/` redirects to the app, which asks for a login.
    c.goto(&format!("{base}/")).await?;
    let url = c.current_url().await?;
    if !url.path().starts_with("/ui/") {
        bail!("/ did not lead to /ui/: {url}");
    }
    let form = c.wait().for_element(Locator::Css("form#login")).await?;
    // A wrong password is refused on the page.
    form.find(Locator::Css("input[name=username]"))
        .await?
        .send_keys("dr-jones")
        .await?;
    form.find(Locator::Css("input[name=password]"))
        .await?
        .send_keys("not-the-password")
        .await?;
    form.find(Locator::Css("button[type=submit]"))
        .await?
        .click()
        .await?;
    wait_js(
        c,
        "the wrong-password message",
        Duration::from_secs(10),
        "return document.querySelector('#login-error')?.textContent || '';",
        |v| v.as_str().is_some_and(|s| s.contains("Wrong")),
    )
    .await?;
    let pw = c.find(Locator::Css("input[name=password]")).await?;
    pw.clear().await?;
    pw.send_keys(PASSWORD).await?;
    c.find(Locator::Css("form#login button[type=submit]"))
        .await?
        .click()
        .await?;
    // A marker that a reload would wipe: the live alert must arrive without one.
    wait_js(
        c,
        "the ward view with three populated tiles",
        Duration::from_secs(30),
        &format!(
            "const tiles = {TILES}; \
             return tiles.length === 3 && tiles.every((t) => Object.keys(t.vitals).length >= 2) ? tiles : null;"
        ),
        |v| v.is_array(),
    )
    .await?;
    c.execute(
        "window.__vigilNoReload = 'still here'; return true;",
        vec![],
    )
    .await?;
    let who = c.find(Locator::Css("#who")).await?.text().await?;
    if !who.contains("dr-jones") || !who.contains("clinician") {
        bail!("header does not name the clinician: {who:?}");
    }

    // Freeze the data: with the agent paused the hub's answer stops
    // changing, and the page (refreshing every second) must show exactly it.
    signal(agent_pid, "-STOP");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let overview = api.get(&format!("/api/v1/wards/{WARD}/overview")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tiles = c.execute(&format!("return {TILES};"), vec![]).await?;
    let png = c.screenshot().await?;
    signal(agent_pid, "-CONT");
    std::fs::write(dir.join("dashboard-ward.png"), &png)?;
    let _ = std::fs::write("/tmp/dashboard-ward.png", &png);

    let api_beds = overview["beds"].as_array().context("overview beds")?;
    let tiles = tiles.as_array().context("tiles")?;
    if tiles.len() != api_beds.len() || tiles.len() != 3 {
        bail!(
            "{} tiles for {} beds: {tiles:?}",
            tiles.len(),
            api_beds.len()
        );
    }
    let mut scored = 0;
    for (t, b) in tiles.iter().zip(api_beds) {
        // Same order (riskiest first), same bed and patient.
        if t["bed"] != b["bed"]["id"] || t["patient"] != b["patient"]["value"] {
            bail!("tile {t} is not bed {b}");
        }
        let vitals = b["vitals"].as_array().context("vitals")?;
        if vitals.len() < 2 {
            bail!("bed without vitals in the API: {b}");
        }
        for v in vitals {
            let p = v["parameter"].as_str().unwrap();
            let shown = t["vitals"][p].as_f64();
            if shown != v["value"].as_f64() {
                bail!(
                    "{} {p}: page shows {shown:?}, API says {}",
                    t["patient"],
                    v["value"]
                );
            }
        }
        if t["vitals"].as_object().map(|m| m.len()) != Some(vitals.len()) {
            bail!("page shows other vitals than the API: {t} vs {b}");
        }
        match b["news2"]["total"].as_i64() {
            Some(n) => {
                scored += 1;
                if t["news2"].as_str() != Some(&n.to_string()) || t["band"] != b["news2"]["band"] {
                    bail!("NEWS2 on the page {t} differs from the API {b}");
                }
            }
            None => {
                if t["news2"] != "" {
                    bail!("page shows a NEWS2 the API has not: {t}");
                }
            }
        }
    }
    // The two IntelliVue patients have every NEWS2 input.
    if scored < 2 {
        bail!("expected NEWS2 for both IntelliVue patients: {overview}");
    }

    // The screenshot: a real PNG of the window, showing the band colours
    // of the scored tiles (the NEWS2 badge and the tile's left border).
    let bands: Vec<&str> = tiles.iter().filter_map(|t| t["band"].as_str()).collect();
    let colour = |band: &str| match band {
        "low" => Some([0x2e, 0x7d, 0x32]),
        "low-medium" => Some([0xf9, 0xa8, 0x25]),
        "medium" => Some([0xef, 0x6c, 0x00]),
        "high" => Some([0xc6, 0x28, 0x28]),
        _ => None,
    };
    for band in bands.iter().filter_map(|b| colour(b).map(|c| (*b, c))) {
        let (w, h, hits, distinct) = count_colour(&png, band.1)?;
        if w < 800 || h < 600 {
            bail!("screenshot is {w}x{h}");
        }
        if distinct < 50 {
            bail!("screenshot has only {distinct} colours: a blank page?");
        }
        if hits < 500 {
            bail!(
                "screenshot shows {hits} pixels of the {} band colour: tiles not drawn?",
                band.0
            );
        }
    }

    // The patient view charts the stored NEWS2 history (no reload): the
    // hub has stored scored points for a scored patient and the chart
    // draws them.
    let patient = api_beds
        .iter()
        .find(|b| b["news2"]["total"].is_i64())
        .and_then(|b| b["patient"]["value"].as_str())
        .context("a scored patient")?
        .to_owned();
    let hist = api
        .get(&format!(
            "/api/v1/patients/{patient}/scores/history?kind=news2"
        ))
        .await;
    let stored = hist["points"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|x| x["total"].is_i64()).count());
    if stored == 0 {
        bail!("no scored NEWS2 history for {patient}: {hist}");
    }
    c.execute(
        &format!(
            "location.hash = {}; return true;",
            json!(format!("#/patient/{patient}/1h"))
        ),
        vec![],
    )
    .await?;
    wait_js(
        c,
        "the NEWS2 history chart with scored points",
        Duration::from_secs(20),
        "const s = document.querySelector('[data-chart=news2] svg'); \
         return s && +s.dataset.points > 0 ? +s.dataset.points : null;",
        |v| v.is_number(),
    )
    .await?;
    let png = c.screenshot().await?;
    std::fs::write(dir.join("dashboard-patient.png"), &png)?;
    let _ = std::fs::write("/tmp/dashboard-patient.png", &png);

    // Alerts: open the list (no reload), note what is there.
    c.find(Locator::Css("a[data-nav=alerts]"))
        .await?
        .click()
        .await?;
    wait_js(
        c,
        "the alert list",
        Duration::from_secs(10),
        "return document.querySelector('#alert-table, #no-alerts') ? true : null;",
        |v| v == &Value::Bool(true),
    )
    .await?;
    wait_js(
        c,
        "the live alert stream",
        Duration::from_secs(10),
        "return document.querySelector('#live').textContent;",
        |v| v == "live",
    )
    .await?;
    // The Masimo goes silent (simulator killed; the PTY stays open): the
    // agent reports it, the hub raises `device-disconnected`.
    sims[2].kill9(); // BEDS[2]: the Masimo
    let row = wait_js(
        c,
        "a device-disconnected alert row (live, no reload)",
        Duration::from_secs(30),
        "const r = document.querySelector('tr[data-code=\"device-disconnected\"][data-state=active]'); \
         return r ? r.dataset.alertId : null;",
        |v| v.is_string(),
    )
    .await?;
    let id = row.as_str().unwrap().to_string();
    let marker = c
        .execute("return window.__vigilNoReload || null;", vec![])
        .await?;
    if marker != "still here" {
        bail!("the page was reloaded (marker {marker})");
    }
    // The SSE stream announced it (only the stream makes toasts).
    wait_js(
        c,
        "the stream's alert toast",
        Duration::from_secs(10),
        "const t = document.querySelector('#toast'); return t && !t.hidden ? t.textContent : null;",
        |v| v.as_str().is_some_and(|s| s.contains("alert")),
    )
    .await?;
    let before = api.get(&format!("/api/v1/alerts/{id}")).await;
    if before["alert"]["state"] != "active" {
        bail!("alert {id} not active before the click: {before}");
    }

    // Acknowledge on the page.
    c.find(Locator::Css(&format!(
        "tr[data-alert-id=\"{id}\"] button.ack"
    )))
    .await?
    .click()
    .await?;
    wait_js(
        c,
        "the row to show acknowledged",
        Duration::from_secs(10),
        &format!(
            "const r = document.querySelector('tr[data-alert-id=\"{id}\"]'); \
             return r ? r.dataset.state : null;"
        ),
        |v| v == "acknowledged",
    )
    .await?;
    let after = api.get(&format!("/api/v1/alerts/{id}")).await;
    let a = &after["alert"];
    if a["state"] != "acknowledged"
        || !a["acknowledged_by"]
            .as_str()
            .is_some_and(|s| s.contains("dr-jones"))
    {
        bail!("API does not show the acknowledgement by dr-jones: {after}");
    }
    let events: Vec<&str> = after["events"]
        .as_array()
        .map(|e| e.iter().filter_map(|x| x["transition"].as_str()).collect())
        .unwrap_or_default();
    if !events.contains(&"acknowledged") {
        bail!("no acknowledged transition recorded: {after}");
    }
    Ok(())
}
