//! Harness for Vigil's cross-crate end-to-end tests: starts the real
//! binaries (`cloud-hub`, `edge-agent`, `device-sim`) and socat PTY pairs in
//! a temp dir, all on loopback, and cleans them up on drop.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which
//! the project's test command does); the harness finds them next to the test
//! executable's target directory.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Throwaway PostgreSQL servers (shared with the hub's own tests).
#[path = "../../cloud-hub/tests/support/pg_server.rs"]
pub mod pg_server;

/// Throwaway Tansu (Kafka protocol) brokers (shared with the hub's tests).
#[path = "../../cloud-hub/tests/support/tansu.rs"]
pub mod tansu;

/// Where the hub under test keeps its data.
#[derive(Debug)]
pub enum Store {
    Sqlite(PathBuf),
    /// Read with `psql` (the PostgreSQL client next to the server binaries).
    Pg {
        psql: PathBuf,
        port: u16,
    },
}

impl Store {
    /// Rows of `sql`, every column as text (NULL as "").
    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        match self {
            Store::Sqlite(path) => {
                use rusqlite::types::ValueRef;
                let db = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .unwrap();
                let mut st = db.prepare(sql).unwrap();
                let n = st.column_count();
                st.query_map([], |r| {
                    (0..n)
                        .map(|i| {
                            Ok(match r.get_ref(i)? {
                                ValueRef::Null => String::new(),
                                ValueRef::Integer(v) => v.to_string(),
                                ValueRef::Real(v) => v.to_string(),
                                ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                                ValueRef::Blob(_) => "<blob>".into(),
                            })
                        })
                        .collect()
                })
                .unwrap()
                .map(Result::unwrap)
                .collect()
            }
            Store::Pg { psql, port } => {
                let out = Command::new(psql)
                    .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                    .args(["-U", "postgres", "-d", "postgres", "-X", "-At", "-F", "|"])
                    .args(["-c", sql])
                    .output()
                    .expect("run psql");
                assert!(
                    out.status.success(),
                    "psql {sql}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout)
                    .unwrap()
                    .lines()
                    .map(|l| l.split('|').map(str::to_string).collect())
                    .collect()
            }
        }
    }
}

/// The storage backend a test's hub runs on. End-to-end tests that prove
/// clinical behaviour run once per backend.
#[derive(Debug)]
pub enum Backend {
    /// `hub.sqlite` in the test dir (the default deployment).
    Sqlite,
    /// A throwaway PostgreSQL server of this test (stopped on drop).
    Postgres(pg_server::PgServer),
}

impl Backend {
    /// A PostgreSQL backend on a server of its own (fsync off: the data is
    /// thrown away).
    pub fn postgres() -> Self {
        Backend::Postgres(pg_server::PgServer::start())
    }

    /// The `[storage]` table of a hub config for this backend (and the
    /// `[storage.postgres]` table it needs).
    pub fn storage_toml(&self) -> String {
        match self {
            Backend::Sqlite => "[storage]\nsqlite_path = \"hub.sqlite\"\n\n".into(),
            Backend::Postgres(pg) => format!(
                "[storage]\nsqlite_path = \"hub.sqlite\"\nbackend = \"postgres\"\n\n\
                 [storage.postgres]\nurl = \"{}\"\npool_size = 4\n\n",
                pg.url()
            ),
        }
    }

    /// The hub's store in `dir` (the test dir its config is in), for reading
    /// it directly.
    pub fn store(&self, dir: &Path) -> Store {
        match self {
            Backend::Sqlite => Store::Sqlite(dir.join("hub.sqlite")),
            Backend::Postgres(pg) => Store::Pg {
                psql: pg.psql(),
                port: pg.port,
            },
        }
    }

    /// "sqlite" or "postgres", for test names and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// A temp dir for one test; kept (and its path printed) when
/// `VIGIL_E2E_KEEP` is set, for reading the logs after a failure.
pub fn test_dir(name: &str) -> (Option<tempfile::TempDir>, PathBuf) {
    let td = tempfile::Builder::new()
        .prefix(&format!("vigil-{name}-"))
        .tempdir()
        .expect("temp dir");
    if std::env::var_os("VIGIL_E2E_KEEP").is_some() {
        let p = td.keep();
        eprintln!("test dir kept: {}", p.display());
        (None, p)
    } else {
        let p = td.path().to_owned();
        (Some(td), p)
    }
}

/// Path of a workspace binary in the same target profile as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "binary {} not found: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// A child process killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
}

impl Proc {
    /// Guard an already spawned child.
    pub fn guard(child: Child) -> Self {
        Proc {
            name: "child",
            child,
        }
    }

    pub fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { name, child })
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait up to `timeout` for a clean exit; returns whether it
    /// exited successfully.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        false
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// A small tmpfs mounted at a directory for a test; unmounted (lazily) on
/// drop.
#[derive(Debug)]
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs of `size` (e.g. "24m") at `path` (created). Ok(None),
    /// with the reason printed, only when not root (where mounting cannot
    /// work); a failure as root is an error.
    pub fn mount(path: &Path, size: &str) -> Result<Option<Tmpfs>> {
        std::fs::create_dir_all(path)?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(Some(Tmpfs {
                path: path.to_owned(),
            })),
            other => {
                let why = match &other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                if running_as_root() {
                    anyhow::bail!(
                        "mounting a tmpfs at {} failed as root: {why}",
                        path.display()
                    );
                }
                eprintln!("SKIPPED: not root, cannot mount a tmpfs ({why})");
                Ok(None)
            }
        }
    }

    /// Fill the filesystem: write `name` until the disk is full.
    pub fn fill(&self, name: &str) -> Result<u64> {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path.join(name))?;
        let mut written = 0u64;
        for chunk in [1 << 20, 4096, 64] {
            let buf = vec![0u8; chunk];
            loop {
                match f.write_all(&buf).and_then(|_| f.sync_data()) {
                    Ok(()) => written += chunk as u64,
                    Err(e) if e.raw_os_error() == Some(28) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(written)
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Poll `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Write a secret file with mode 0600.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// A socat PTY pair: bytes written to `device` come out of `host`.
#[derive(Debug)]
pub struct PtyPair {
    pub device: PathBuf,
    pub host: PathBuf,
    _socat: Proc,
}

impl PtyPair {
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let device = dir.join(format!("{name}-device"));
        let host = dir.join(format!("{name}-host"));
        let socat = Proc::spawn(
            "socat",
            Command::new("socat")
                .arg(format!("pty,raw,echo=0,link={}", device.display()))
                .arg(format!("pty,raw,echo=0,link={}", host.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .context("socat is required for serial tests (the project's setup script installs it)")?;
        wait_for(Duration::from_secs(10), "socat PTY links", || {
            (device.exists() && host.exists()).then_some(())
        })?;
        Ok(PtyPair {
            device,
            host,
            _socat: socat,
        })
    }
}

/// A running hub with its config, database and address.
#[derive(Debug)]
pub struct Hub {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub base_url: String,
    pub proc: Proc,
}

/// The administrator bearer token of every hub the harness configures
/// (`[association] admin_token_file`, see [`ADMIN_TOKEN_SECTION`]);
/// [`get_json`] sends it.
pub const HARNESS_ADMIN_TOKEN: &str = "vigil-e2e-harness-admin-token-0123456789abcdef";

/// The config section naming `admin.token` (beside the config file).
pub const ADMIN_TOKEN_SECTION: &str = "[association]\nadmin_token_file = \"admin.token\"\n\n";

/// Writes [`HARNESS_ADMIN_TOKEN`] to `dir/admin.token` (mode 0600), for a
/// config in `dir` holding [`ADMIN_TOKEN_SECTION`].
pub fn write_admin_token(dir: &Path) -> Result<()> {
    write_private(&dir.join("admin.token"), HARNESS_ADMIN_TOKEN)
}

/// Write a hub config binding `bind`, with one static association and the
/// harness's admin token, on SQLite.
pub fn write_hub_config(dir: &Path, bind: &str, assoc: &[(&str, &str, &str)]) -> Result<PathBuf> {
    write_hub_config_on(&Backend::Sqlite, dir, bind, assoc)
}

/// [`write_hub_config`] on the given storage backend.
pub fn write_hub_config_on(
    backend: &Backend,
    dir: &Path,
    bind: &str,
    assoc: &[(&str, &str, &str)],
) -> Result<PathBuf> {
    write_admin_token(dir)?;
    let mut text = format!(
        "[server]\nbind = \"{bind}\"\nmax_body_bytes = 4194304\n\n{}{ADMIN_TOKEN_SECTION}",
        backend.storage_toml()
    );
    for (gw, dev, patient) in assoc {
        text.push_str(&format!(
            "[[associations]]\ngateway_id = \"{gw}\"\ndevice_id = \"{dev}\"\npatient_id = \"{patient}\"\n\n"
        ));
    }
    let path = dir.join("hub.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `cloud-hub gateway add <id>`: returns the token printed on stdout.
pub fn add_gateway(config: &Path, gateway_id: &str) -> Result<String> {
    let out = Command::new(bin("cloud-hub"))
        .args(["gateway", "add", gateway_id, "--config"])
        .arg(config)
        .output()?;
    if !out.status.success() {
        bail!(
            "gateway add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    if token.is_empty() || token.contains('\n') {
        bail!("gateway add printed {token:?}, expected one token line");
    }
    Ok(token)
}

/// Start `cloud-hub serve` and wait for its `listening on URL` line.
pub fn start_hub(dir: &Path, config: &Path) -> Result<Hub> {
    let mut cmd = Command::new(bin("cloud-hub"));
    cmd.args(["serve", "--config"]).arg(config);
    start_hub_cmd(dir, config, cmd)
}

/// [`start_hub`] with the process umask set to `umask` first (through
/// `sh`, which `exec`s the hub: the process is the hub itself).
pub fn start_hub_umask(dir: &Path, config: &Path, umask: &str) -> Result<Hub> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "umask {umask} && exec \"$0\" serve --config \"$1\""
        ))
        .arg(bin("cloud-hub"))
        .arg(config);
    start_hub_cmd(dir, config, cmd)
}

fn start_hub_cmd(dir: &Path, config: &Path, mut cmd: Command) -> Result<Hub> {
    let log = std::fs::File::create(dir.join("hub.log"))?;
    let mut proc = Proc::spawn(
        "cloud-hub",
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log),
    )?;
    let stdout = proc.child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the hub never blocks on a full pipe.
        for _ in lines {}
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
        anyhow::anyhow!(
            "hub did not report its address; see {}",
            dir.join("hub.log").display()
        )
    })?;
    let base_url = line
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first hub line {line:?}"))?
        .to_string();
    Ok(Hub {
        dir: dir.to_owned(),
        config: config.to_owned(),
        base_url,
        proc,
    })
}

/// Blocking HTTP GET with the harness's admin token, returning (status,
/// JSON).
pub fn get_json(url: &str) -> Result<(u16, serde_json::Value)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let resp = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?
            .get(url)
            .bearer_auth(HARNESS_ADMIN_TOKEN)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body = resp.json::<serde_json::Value>().await?;
        Ok((status, body))
    })
}

/// Start an agent with a config written into `dir`.
pub fn start_agent(dir: &Path, config: &Path, log_name: &str) -> Result<Proc> {
    start_agent_env(dir, config, log_name, &[])
}

/// As [`start_agent`], with extra environment variables (e.g. `LD_PRELOAD`
/// of libfaketime for a gateway clock the test moves).
pub fn start_agent_env(
    dir: &Path,
    config: &Path,
    log_name: &str,
    env: &[(&str, &str)],
) -> Result<Proc> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(log_name))?;
    Proc::spawn(
        "edge-agent",
        Command::new(bin("edge-agent"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log),
    )
}

/// Every regular file below `dir`.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_below(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// How a [`TcpProxy`] forwards bytes: a slow or laggy link. Applies to
/// both directions of every connection, from the next chunk on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Shaping {
    /// Bandwidth per connection and direction (chunks of at most 1 KiB are
    /// paced to it); `None`: unlimited.
    pub bytes_per_s: Option<u32>,
    /// Added before each chunk is forwarded.
    pub latency: Duration,
}

/// Copy `from` → `to` under the proxy's current [`Shaping`] until EOF or
/// an error, then half-close `to`.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    shaping: std::sync::Arc<std::sync::Mutex<Shaping>>,
) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let limited = shaping.lock().unwrap().bytes_per_s.is_some();
        let max = if limited { 1024 } else { buf.len() };
        let n = match from.read(&mut buf[..max]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let s = *shaping.lock().unwrap();
        let mut pause = s.latency;
        if let Some(rate) = s.bytes_per_s {
            pause += Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A TCP proxy on loopback that the test controls: forwards connections to
/// `target` while up; [`TcpProxy::cut`] closes every open connection and
/// refuses new ones (a network outage between gateway and hub while both
/// keep running); [`TcpProxy::restore`] lets traffic through again;
/// [`TcpProxy::shape`] makes the link slow (bandwidth, latency).
#[derive(Debug)]
pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    shaping: std::sync::Arc<std::sync::Mutex<Shaping>>,
}

impl TcpProxy {
    pub fn start(target: std::net::SocketAddr) -> Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let shaping = Arc::new(Mutex::new(Shaping::default()));
        let (up2, stop2, conns2) = (up.clone(), stop.clone(), conns.clone());
        let shaping2 = shaping.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    drop(client); // refused while cut
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let pipes = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                );
                let (Ok(c_read), Ok(s_write), Ok(c_write), Ok(s_read)) = pipes else {
                    continue;
                };
                {
                    let mut list = conns2.lock().unwrap();
                    list.push(client);
                    list.push(server);
                }
                let (sh1, sh2) = (shaping2.clone(), shaping2.clone());
                std::thread::spawn(move || pump(c_read, s_write, sh1));
                std::thread::spawn(move || pump(s_read, c_write, sh2));
            }
        });
        Ok(Self {
            addr,
            up,
            stop,
            conns,
            shaping,
        })
    }

    /// Shape the link from now on (`Shaping::default()`: full speed).
    pub fn shape(&self, shaping: Shaping) {
        *self.shaping.lock().unwrap() = shaping;
    }

    /// Cut the link: close every connection, refuse new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Let traffic through again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stop`.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// A metric family: its type and the label names its samples carry.
pub type Family = (String, BTreeSet<String>);

/// The families a Prometheus text exposition declares (`# TYPE`) with the
/// label names seen on their samples.
pub fn served_families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            out.entry(name.to_owned()).or_default().0 = kind.to_owned();
        } else if !l.starts_with('#') && !l.is_empty() {
            let (name, labels) = match l.split_once('{') {
                Some((n, rest)) => (n, rest.split('}').next().unwrap_or_default()),
                None => (l.split(' ').next().unwrap_or_default(), ""),
            };
            let keys = labels
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim().to_owned()));
            out.entry(name.to_owned()).or_default().1.extend(keys);
        }
    }
    out
}

/// The families `docs/metrics.md` documents under `## {section}`: name,
/// type and label names (the first word of each `label` = … entry).
pub fn documented_families(section: &str) -> BTreeMap<String, Family> {
    let doc = read_repo("docs/metrics.md");
    let start = doc
        .find(&format!("## {section}\n"))
        .unwrap_or_else(|| panic!("no section {section} in docs/metrics.md"));
    let body = &doc[start + 4..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    let mut out = BTreeMap::new();
    for row in body.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_owned();
        let kind = cells[2].to_owned();
        let labels: BTreeSet<String> = cells[3]
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .map(String::from)
            .collect();
        out.insert(name, (kind, labels));
    }
    out
}

/// The workspace root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A file of the repository, by path relative to its root.
pub fn read_repo(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// A throwaway CA (`ca.pem`, common name `ca_name`) and a server
/// certificate for `localhost` signed by it (`broker.pem`, key
/// `broker.key` 0600) in `dir`, for a test broker with TLS.
pub fn write_broker_tls(dir: &Path, ca_name: &str) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let srv_key = rcgen::KeyPair::generate().unwrap();
    let srv_cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&srv_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("broker.pem"), srv_cert.pem()).unwrap();
    write_private(&dir.join("broker.key"), &srv_key.serialize_pem()).unwrap();
}

/// A fenced code block of a markdown document that a test runs: a shell
/// block marked `sh run`, or a file to save, marked `<lang> file=NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocBlock {
    Run(String),
    File { name: String, text: String },
}

/// The runnable blocks of a markdown document, in order. Other fenced
/// blocks (plain `sh`, examples, output) are skipped.
pub fn doc_blocks(markdown: &str) -> Vec<DocBlock> {
    let mut out = vec![];
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let words: Vec<&str> = info.split_whitespace().collect();
        let mut body = String::new();
        for l in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        let file = words.iter().find_map(|w| w.strip_prefix("file="));
        match (words.first(), words.get(1), file) {
            (_, _, Some(name)) => out.push(DocBlock::File {
                name: name.to_owned(),
                text: body,
            }),
            (Some(&"sh"), Some(&"run"), None) => out.push(DocBlock::Run(body)),
            _ => {}
        }
    }
    out
}

/// The blocks of a document as one bash script: files written with a
/// quoted heredoc where they appear, commands as written. The script stops
/// at the first failing command and kills its background jobs on exit.
pub fn doc_script(blocks: &[DocBlock]) -> String {
    let mut s = String::from(
        "set -euo pipefail\ntrap 'jobs -p | xargs -r kill 2>/dev/null || true' EXIT\n",
    );
    for b in blocks {
        match b {
            DocBlock::Run(cmds) => s.push_str(cmds),
            DocBlock::File { name, text } => {
                s.push_str(&format!(
                    "cat > '{name}' <<'VIGIL_DOC_EOF'\n{text}VIGIL_DOC_EOF\n"
                ));
            }
        }
    }
    s
}

/// Runs a document's script with bash in `dir`, the workspace binaries
/// first on `PATH`, in its own process group (killed when it outlives
/// `timeout`). Returns the exit status, stdout and stderr.
pub fn run_doc_script(
    dir: &Path,
    script: &str,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String, String)> {
    use std::os::unix::process::CommandExt;
    let bin_dir = bin("cloud-hub").parent().expect("bin dir").to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::fs::write(dir.join("doc-script.sh"), script)?;
    let mut proc = Proc::spawn(
        "bash",
        Command::new("bash")
            .arg("doc-script.sh")
            .current_dir(dir)
            .env("PATH", path)
            .process_group(0)
            .stdout(std::fs::File::create(dir.join("doc-script.out"))?)
            .stderr(std::fs::File::create(dir.join("doc-script.err"))?),
    )?;
    let pgid = proc.child.id();
    let status = proc.wait_exit(timeout);
    // Whatever it started and left behind (or everything, on a timeout).
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let out = std::fs::read_to_string(dir.join("doc-script.out")).unwrap_or_default();
    let err = std::fs::read_to_string(dir.join("doc-script.err")).unwrap_or_default();
    let status = status.with_context(|| format!("timed out after {timeout:?}; stderr:\n{err}"))?;
    Ok((status, out, err))
}

#[cfg(test)]
mod doc_block_tests {
    use super::*;

    #[test]
    fn only_marked_blocks_are_taken_in_order() {
        let md = "x\n```sh\nnot run\n```\n```toml file=a.toml\nk = 1\n```\n```sh run\necho hi\n```\n```json\n{}\n```\n";
        assert_eq!(
            doc_blocks(md),
            vec![
                DocBlock::File {
                    name: "a.toml".into(),
                    text: "k = 1\n".into()
                },
                DocBlock::Run("echo hi\n".into()),
            ]
        );
    }
}
