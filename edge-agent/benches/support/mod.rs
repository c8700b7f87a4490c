//! Shared by the system benchmarks (`agent_rss`, `drain`): the release
//! binaries, a real `cloud-hub` on loopback, child processes killed on drop,
//! Prometheus scraping of the agent's status endpoint, and statistics.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The agent binary cargo built for this bench.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edge-agent"))
}

/// Another workspace binary from the same profile directory (build it
/// first: `cargo build --release -p cloud-hub -p firmware-shims`).
pub fn sibling_bin(name: &str) -> PathBuf {
    let p = agent_bin().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --release -p cloud-hub -p firmware-shims` first",
        p.display()
    );
    p
}

/// `--quick` among the arguments (cargo bench passes its own `--bench`).
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--quick")
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawn `cmd` with stdout piped and return its first stdout line.
pub fn spawn_reporting(cmd: &mut Command) -> (Proc, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("first stdout line");
    (Proc(child), line)
}

pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A running hub: its process, ingest URL and the gateway's token file.
pub struct Hub {
    pub proc: Proc,
    pub ingest_url: String,
    pub token_file: PathBuf,
}

/// Start `cloud-hub serve` on a free loopback port with a fresh database
/// in `dir`, and enrol `gateway`.
pub fn start_hub(dir: &Path, gateway: &str) -> Hub {
    let cfg = dir.join("hub.toml");
    write_private(&dir.join("admin.token"), BENCH_ADMIN_TOKEN);
    std::fs::write(
        &cfg,
        "[server]\nbind = \"127.0.0.1:0\"\n[storage]\nsqlite_path = \"hub.sqlite\"\n\
         [association]\nadmin_token_file = \"admin.token\"\n",
    )
    .unwrap();
    let hub = sibling_bin("cloud-hub");
    let out = Command::new(&hub)
        .args(["gateway", "add", gateway, "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token_file = dir.join("gateway.token");
    write_private(&token_file, String::from_utf8(out.stdout).unwrap().trim());
    let log = std::fs::File::create(dir.join("hub.log")).unwrap();
    let (proc, line) = spawn_reporting(
        Command::new(&hub)
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stderr(log),
    );
    let base = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected hub line {line:?}"))
        .to_string();
    Hub {
        proc,
        ingest_url: format!("{base}/api/v1/ingest"),
        token_file,
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from `addr` (plain HTTP/1.0) and return the body.
/// The hub's administrator bearer token in the benches (a throwaway hub).
pub const BENCH_ADMIN_TOKEN: &str = "vigil-bench-admin-token-0123456789abcdef";

/// GET with the benches' admin token; the body.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {BENCH_ADMIN_TOKEN}\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The value of the first sample of `name` (with its labels, if any) in
/// a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Wait until `f` returns Some, polling every 100 ms.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (median, min, max).
pub fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
