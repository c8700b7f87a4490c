//! `cargo xtask bench [--quick] [--observations N] [--only NAME,…] [--out DIR]`:
//! one command for the whole benchmark report. Builds the release
//! binaries the benches drive, runs every bench (`cargo bench -p … --bench
//! …`), keeps what each prints (each bench reports medians with min/max
//! itself), checks the edge and hub issues' targets against the numbers
//! and writes `BENCHMARKS.md` and `benchmarks.json`.
//!
//! Full mode writes them at the repository root. `--quick` runs every
//! bench in its smoke mode (small inputs, one run, dev profile) and writes to
//! `target/bench-report/`: it checks the harness end to end (CI runs it),
//! its figures mean nothing and no target is judged, but it fails when a
//! bench fails or prints no readable figure.
//!
//! (`cargo xtask` is an alias in `.cargo/config.toml` for
//! `cargo run -p vigil-e2e --bin xtask --`.)

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

struct Bench {
    name: &'static str,
    package: &'static str,
    bench: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
}

struct Outcome {
    lines: Vec<String>,
    ok: bool,
    seconds: f64,
    command: String,
}

/// A target of the edge/hub issues, judged on a bench's output.
struct Target {
    what: &'static str,
    bench: &'static str,
    /// The number is the first one after this text on a line holding it.
    after: &'static str,
    /// Met when `ok(value)`.
    ok: fn(f64) -> bool,
    goal: &'static str,
}

use vigil_e2e::repo_root as root;

fn benches(observations: u64) -> Vec<Bench> {
    let b = |name, package, bench, args: &[&str]| Bench {
        name,
        package,
        bench,
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![],
    };
    let mut search = b(
        "hub FHIR search and 24 h trend query at size",
        "cloud-hub",
        "search",
        &[],
    );
    search.args = vec!["--observations".into(), observations.to_string()];
    let mut e2e_fast = b(
        "end-to-end latency, no batch pacing",
        "edge-agent",
        "e2e_latency",
        &[],
    );
    e2e_fast.env = vec![("VIGIL_BENCH_MIN_INTERVAL_MS", "0".into())];
    vec![
        b("edge encrypted buffer", "edge-agent", "buffer", &[]),
        b("edge agent RSS, 16 devices", "edge-agent", "agent_rss", &[]),
        b("edge drain of a 24 h backlog", "edge-agent", "drain", &[]),
        b("hub ingest, SQLite", "cloud-hub", "ingest", &[]),
        b(
            "hub ingest, PostgreSQL",
            "cloud-hub",
            "ingest",
            &["--postgres"],
        ),
        b(
            "end-to-end latency, agent defaults",
            "edge-agent",
            "e2e_latency",
            &[],
        ),
        e2e_fast,
        b("hub ward overview, 40 beds", "cloud-hub", "ward", &[]),
        b(
            "hub lake backfill to Azurite, 1 M readings",
            "cloud-hub",
            "lake",
            &[],
        ),
        b("hub FHIR API under wrk", "cloud-hub", "fhir_load", &[]),
        b(
            "hub FHIR API under wrk, PostgreSQL",
            "cloud-hub",
            "fhir_load",
            &["--postgres"],
        ),
        search,
    ]
}

/// A figure the issues ask for without a numeric target: reported in
/// the table beside the targets, never judged.
struct Figure {
    what: &'static str,
    bench: &'static str,
    /// The line holding this text …
    line: &'static str,
    /// … and the number after this text on it.
    after: &'static str,
    unit: &'static str,
}

fn figures() -> Vec<Figure> {
    let f = |what, bench, line, after, unit| Figure {
        what,
        bench,
        line,
        after,
        unit,
    };
    vec![
        f(
            "hub ingest, PostgreSQL",
            "hub ingest, PostgreSQL",
            "median",
            "median",
            "readings/s",
        ),
        f(
            "raw SQLite insert limit (same run as the SQLite ingest)",
            "hub ingest, SQLite",
            "raw limit",
            "median",
            "rows/s",
        ),
        f(
            "raw PostgreSQL COPY limit (same run as the PostgreSQL ingest)",
            "hub ingest, PostgreSQL",
            "raw limit",
            "median",
            "rows/s",
        ),
        f(
            "lake backfill to Azurite (bronze, silver, gold; 1 M readings)",
            "hub lake backfill to Azurite, 1 M readings",
            "backfill of",
            "median",
            "readings/s",
        ),
        f(
            "ward overview p99 (40 beds)",
            "hub ward overview, 40 beds",
            "ward overview",
            "p99",
            "ms",
        ),
        f(
            "/healthz ceiling (same hub and wrk as the SQLite FHIR mix)",
            "hub FHIR API under wrk",
            "/healthz ceiling",
            "median",
            "requests/s",
        ),
        f(
            "FHIR mix as a share of the /healthz ceiling, SQLite",
            "hub FHIR API under wrk",
            "/healthz ceiling",
            "the mix is",
            "%",
        ),
        f(
            "/healthz ceiling (same hub and wrk as the PostgreSQL FHIR mix)",
            "hub FHIR API under wrk, PostgreSQL",
            "/healthz ceiling",
            "median",
            "requests/s",
        ),
        f(
            "FHIR search p99 (1 patient, 1 vital, 24 h) at the stated size",
            "hub FHIR search and 24 h trend query at size",
            "FHIR search",
            "p99",
            "ms",
        ),
        f(
            "24 h trend query p99 (hourly points) at the stated size",
            "hub FHIR search and 24 h trend query at size",
            "24 h trend query (hourly",
            "p99",
            "ms",
        ),
        f(
            "24 h trend query p99 (1-min points) at the stated size",
            "hub FHIR search and 24 h trend query at size",
            "24 h trend query (1-min",
            "p99",
            "ms",
        ),
        f(
            "store size of the search and trend figures",
            "hub FHIR search and 24 h trend query at size",
            "FHIR search",
            "over",
            "observations",
        ),
    ]
}

fn targets() -> Vec<Target> {
    vec![
        Target {
            what: "encrypted buffer append",
            bench: "edge encrypted buffer",
            after: "encrypted buffer append: median",
            ok: |v| v >= 200_000.0,
            goal: "≥ 200 000 readings/s",
        },
        Target {
            what: "buffer vs raw sled + AES-GCM",
            bench: "edge encrypted buffer",
            after: "ratio:",
            ok: |v| v >= 50.0,
            goal: "≥ 50 % of the raw limit",
        },
        Target {
            what: "agent RSS with 16 devices",
            bench: "edge agent RSS, 16 devices",
            after: "steady RSS: median",
            ok: |v| v < 30.0,
            goal: "< 30 MB",
        },
        Target {
            what: "24 h backlog drain",
            bench: "edge drain of a 24 h backlog",
            after: "real-time multiple: median",
            ok: |v| v >= 100.0,
            goal: "≥ 100× real time",
        },
        Target {
            what: "hub ingest, embedded store",
            bench: "hub ingest, SQLite",
            after: "median",
            ok: |v| v >= 250_000.0,
            goal: "≥ 250 000 readings/s",
        },
        Target {
            what: "hub ingest vs the raw SQLite insert, same run",
            bench: "hub ingest, SQLite",
            after: "ratio:",
            ok: |v| v >= 90.0,
            goal: "≥ 90 % of the raw limit",
        },
        Target {
            what: "hub ingest vs a raw PostgreSQL COPY, same run",
            bench: "hub ingest, PostgreSQL",
            after: "ratio:",
            ok: |v| v >= 80.0,
            goal: "≥ 80 % of the raw limit",
        },
        Target {
            what: "FHIR API mix, SQLite (wrk, audit on)",
            bench: "hub FHIR API under wrk",
            after: "median",
            ok: |v| v >= 15_000.0,
            goal: "≥ 15 000 requests/s",
        },
        Target {
            what: "FHIR API mix p99, SQLite",
            bench: "hub FHIR API under wrk",
            after: "p99",
            ok: |v| v < 20.0,
            goal: "p99 < 20 ms",
        },
        Target {
            what: "FHIR API mix, PostgreSQL (wrk, audit on)",
            bench: "hub FHIR API under wrk, PostgreSQL",
            after: "median",
            ok: |v| v >= 8_000.0,
            goal: "≥ 8 000 requests/s",
        },
        Target {
            what: "FHIR API mix p99, PostgreSQL",
            bench: "hub FHIR API under wrk, PostgreSQL",
            after: "p99",
            ok: |v| v < 20.0,
            goal: "p99 < 20 ms",
        },
        Target {
            what: "end-to-end latency p99 (agent defaults: adaptive batching)",
            bench: "end-to-end latency, agent defaults",
            after: "p99",
            ok: |v| v <= 250.0,
            goal: "p99 ≤ 250 ms",
        },
        Target {
            what: "end-to-end latency p99 (no batch pacing)",
            bench: "end-to-end latency, no batch pacing",
            after: "p99",
            ok: |v| v <= 250.0,
            goal: "p99 ≤ 250 ms",
        },
    ]
}

/// The "measured" cell of every row of a report's Targets table, by its
/// first cell (target or figure name).
fn previous_figures(md: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let Some(start) = md.find("## Targets") else {
        return out;
    };
    for line in md[start..].lines().skip(1) {
        if line.starts_with("## ") {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 5
            && !cells[1].is_empty()
            && cells[1] != "target"
            && !cells[1].starts_with("---")
        {
            out.insert(cells[1].to_owned(), cells[3].to_owned());
        }
    }
    out
}

/// The first number after `after` on the first line containing it.
fn number_after(lines: &[String], after: &str) -> Option<f64> {
    number_in(lines, after, after)
}

/// The first number after `after` on the first line containing `line`.
fn number_in(lines: &[String], line: &str, after: &str) -> Option<f64> {
    let line = lines.iter().find(|l| l.contains(line))?;
    let rest = &line[line.find(after)? + after.len()..];
    let start = rest.find(|c: char| c.is_ascii_digit())?;
    let num: String = rest[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok()
}

/// Full mode measures release builds. Quick mode checks the harness only,
/// so it uses the dev profile, whose binaries and dependencies the test
/// suite has already built (in CI that saves a whole release build).
fn profile(quick: bool) -> &'static str {
    if quick { "dev" } else { "release" }
}

fn run(b: &Bench, quick: bool) -> Result<Outcome> {
    let mut args: Vec<String> = vec![
        "bench".into(),
        "-q".into(),
        "--profile".into(),
        profile(quick).into(),
        "-p".into(),
        b.package.into(),
        "--bench".into(),
        b.bench.into(),
        "--".into(),
    ];
    if quick {
        args.push("--quick".into());
    }
    // In quick mode the search bench uses its own small size.
    if !(quick && b.bench == "search") {
        args.extend(b.args.iter().cloned());
    }
    let env_text: String = b.env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    let command = format!("{env_text}cargo {}", args.join(" "));
    eprintln!("== {}: {command}", b.name);
    let t = Instant::now();
    let out = Command::new(env!("CARGO"))
        .args(&args)
        .envs(b.env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {command}"))?;
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    for l in &lines {
        eprintln!("   {l}");
    }
    Ok(Outcome {
        lines,
        ok: out.status.success(),
        seconds: t.elapsed().as_secs_f64(),
        command,
    })
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let sh = |c: &str, a: &[&str]| {
        Command::new(c)
            .args(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kib as f64 / 1_048_576.0 * 10.0).round() / 10.0,
        "kernel": sh("uname", &["-sr"]),
        "rustc": sh("rustc", &["-V"]),
        "git": sh("git", &["-C", root().to_str().unwrap_or("."), "rev-parse", "--short", "HEAD"]),
        "date": sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "load_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').next().unwrap_or_default(),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("bench") {
        bail!("usage: cargo xtask bench [--quick] [--observations N] [--only NAME,…] [--out DIR]");
    }
    let flag = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
    };
    let quick = args.iter().any(|a| a == "--quick");
    let observations: u64 = match flag("--observations") {
        Some(v) => v.parse().context("--observations must be a number")?,
        None => 20_000_000,
    };
    let only: Option<Vec<String>> =
        flag("--only").map(|v| v.split(',').map(String::from).collect());
    let out_dir = match flag("--out") {
        Some(d) => PathBuf::from(d),
        None if quick => root().join("target/bench-report"),
        None => root(),
    };
    std::fs::create_dir_all(&out_dir)?;
    let machine = machine();
    eprintln!(
        "== building the binaries the benches drive (profile {})",
        profile(quick)
    );
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "--profile",
            profile(quick),
            "-p",
            "cloud-hub",
            "-p",
            "edge-agent",
            "-p",
            "firmware-shims",
        ])
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("build of the benches' binaries failed");
    }
    let mut results = Vec::new();
    for b in benches(observations) {
        if let Some(o) = &only {
            if !o
                .iter()
                .any(|n| b.bench == n || b.name.contains(n.as_str()))
            {
                continue;
            }
        }
        let o = run(&b, quick)?;
        results.push((b, o));
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, o)| !o.ok)
        .map(|(b, _)| b.name)
        .collect();

    // Targets: judged in full mode only.
    let mut judged = Vec::new();
    for t in targets() {
        let Some((_, o)) = results.iter().find(|(b, _)| b.name == t.bench) else {
            continue;
        };
        let value = number_after(&o.lines, t.after);
        let verdict = match (quick, value) {
            (true, _) => "not judged (--quick)",
            (false, None) => "no figure (the bench failed or printed none)",
            (false, Some(v)) if (t.ok)(v) => "met",
            (false, Some(_)) => "NOT MET",
        };
        judged.push((t, value, verdict));
    }
    let mut reported = Vec::new();
    for f in figures() {
        let Some((_, o)) = results.iter().find(|(b, _)| b.name == f.bench) else {
            continue;
        };
        let value = number_in(&o.lines, f.line, f.after);
        reported.push((f, value));
    }

    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str(&format!(
        "Written by `cargo xtask bench{}` (tests/src/bin/xtask.rs) on {} at git {}: {} ({} cores, {} GiB), {}, {}; load average at start {}. Each bench reports medians with min/max over its own repeated runs; the lines below are what it printed.{}\n\n",
        if quick { " --quick" } else { "" },
        machine["date"].as_str().unwrap_or_default(),
        machine["git"].as_str().unwrap_or_default(),
        machine["cpu"].as_str().unwrap_or_default(),
        machine["cores"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or_default(),
        machine["rustc"].as_str().unwrap_or_default(),
        machine["load_at_start"].as_str().unwrap_or_default(),
        if quick { " **Quick mode: smoke sizes, one run, unoptimised (dev) builds; the figures mean nothing.**" } else { "" },
    ));
    // The figures of the BENCHMARKS.md this report replaces, beside the new ones.
    let previous = previous_figures(
        &std::fs::read_to_string(root().join("BENCHMARKS.md")).unwrap_or_default(),
    );
    let before = |what: &str| previous.get(what).map_or("—".to_owned(), String::clone);
    md.push_str("## Targets\n\n| target | goal | measured | verdict | previous BENCHMARKS.md |\n|---|---|---|---|---|\n");
    for (t, v, verdict) in &judged {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            t.what,
            t.goal,
            v.map_or("—".into(), |v| format!("{v}")),
            verdict,
            before(t.what),
        ));
    }
    for (f, v) in &reported {
        md.push_str(&format!(
            "| {} | — (figure without a target) | {} | reported | {} |\n",
            f.what,
            v.map_or("— (the bench failed or printed none)".into(), |v| format!(
                "{v} {}",
                f.unit
            )),
            before(f.what),
        ));
    }
    md.push_str("\n## Results\n\n");
    for (b, o) in &results {
        md.push_str(&format!(
            "### {}\n\n`{}` — {} in {:.0} s\n\n```\n{}\n```\n\n",
            b.name,
            o.command,
            if o.ok { "ok" } else { "FAILED" },
            o.seconds,
            o.lines.join("\n")
        ));
    }
    let json = json!({
        "mode": if quick { "quick" } else { "full" },
        "machine": machine,
        "benches": results.iter().map(|(b, o)| json!({
            "name": b.name, "package": b.package, "bench": b.bench, "command": o.command,
            "ok": o.ok, "seconds": o.seconds, "lines": o.lines,
        })).collect::<Vec<_>>(),
        "targets": judged.iter().map(|(t, v, verdict)| json!({
            "target": t.what, "goal": t.goal, "measured": v, "verdict": verdict,
        })).collect::<Vec<_>>(),
        "figures": reported.iter().map(|(f, v)| json!({
            "figure": f.what, "measured": v, "unit": f.unit,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(out_dir.join("BENCHMARKS.md"), md)?;
    std::fs::write(
        out_dir.join("benchmarks.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    eprintln!(
        "== wrote {} and {}",
        out_dir.join("BENCHMARKS.md").display(),
        out_dir.join("benchmarks.json").display()
    );
    if !failed.is_empty() {
        bail!("benches failed: {}", failed.join(", "));
    }
    // A bench that ran but printed no readable figure is a broken harness
    // (also in --quick, where CI relies on this check).
    let unread: Vec<&str> = judged
        .iter()
        .filter(|(_, v, _)| v.is_none())
        .map(|(t, _, _)| t.what)
        .chain(
            reported
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(f, _)| f.what),
        )
        .collect();
    if !unread.is_empty() {
        bail!("no figure could be read for: {}", unread.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_report_s_figures_are_read_from_its_targets_table() {
        let md = "# Benchmarks\n\n## Targets\n\n| target | goal | measured | verdict |\n|---|---|---|---|\n\
                  | hub ingest, embedded store | ≥ 250 000 readings/s | 41233 | NOT MET |\n\
                  | hub ingest, PostgreSQL | — (figure without a target) | 17710 readings/s | reported |\n\
                  \n## Results\n\n| not | a | target | row |\n";
        let p = previous_figures(md);
        assert_eq!(p["hub ingest, embedded store"], "41233");
        assert_eq!(p["hub ingest, PostgreSQL"], "17710 readings/s");
        assert_eq!(p.len(), 2);
        assert!(previous_figures("no report").is_empty());
    }

    #[test]
    fn numbers_are_read_after_their_label() {
        let lines = vec![
            "encrypted buffer append: median 221390 readings/s (min 1, max 2)".to_owned(),
            "ratio: 62 % of the raw limit".into(),
            "end-to-end latency … (batch_max_wait_ms = 100, 200 readings): p50 107 ms, p99 123 ms"
                .into(),
        ];
        assert_eq!(number_after(&lines, "append: median"), Some(221_390.0));
        assert_eq!(number_after(&lines, "ratio:"), Some(62.0));
        assert_eq!(number_after(&lines, "p99"), Some(123.0));
        assert_eq!(number_after(&lines, "nothing"), None);
        let search = vec![
            "FHIR search (…) over 20000000 observations (7.4 GB; filled in 263 s): p50 3.50 ms, p99 6.13 ms".to_owned(),
            "24 h trend query (hourly points, the default for 24 h; …) over 20000000 observations (7.4 GB): p50 0.20 ms, p99 0.41 ms".into(),
            "24 h trend query (1-min points; …) over 20000000 observations (7.4 GB): p50 2.00 ms, p99 3.10 ms".into(),
        ];
        assert_eq!(number_in(&search, "FHIR search", "p99"), Some(6.13));
        assert_eq!(
            number_in(&search, "24 h trend query (hourly", "p99"),
            Some(0.41)
        );
        assert_eq!(
            number_in(&search, "24 h trend query (1-min", "p99"),
            Some(3.1)
        );
        assert_eq!(
            number_in(&search, "FHIR search", "over"),
            Some(20_000_000.0)
        );
        assert_eq!(number_in(&search, "no such line", "p99"), None);
    }
}
