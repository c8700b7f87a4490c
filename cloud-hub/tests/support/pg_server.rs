//! A throwaway PostgreSQL server on a free loopback port, for tests and
//! benchmarks of the hub's PostgreSQL backend. Stopped (and its directory
//! removed) on drop.
//!
//! The cluster is made once per machine by `initdb` into a template
//! directory under the temp dir and copied for each server (a copy takes
//! far less than an `initdb`). Binaries: `$VIGIL_PG_BIN`, else
//! `/usr/local/bin`, else the newest `/usr/lib/postgresql/*/bin` (Debian's
//! `postgresql` package), else `PATH`. `initdb` refuses to run as root, so
//! as root the server runs as `nobody` (through `runuser`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug)]
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    as_nobody: bool,
    /// The `postgres` options it was started with (for [`PgServer::restart`]).
    opts: String,
    pub port: u16,
}

fn find_bin() -> PathBuf {
    if let Ok(d) = std::env::var("VIGIL_PG_BIN") {
        return PathBuf::from(d);
    }
    let local = Path::new("/usr/local/bin");
    if local.join("initdb").exists() && local.join("pg_ctl").exists() {
        return local.to_owned();
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    // From PATH.
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .expect("run sh");
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !p.is_empty(),
        "PostgreSQL server binaries (initdb, pg_ctl) not found: run scripts/setup.sh \
         (Debian package `postgresql`) or set VIGIL_PG_BIN"
    );
    Path::new(&p).parent().unwrap().to_owned()
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn run(as_nobody: bool, program: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = if as_nobody {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args).output().expect("run a PostgreSQL program")
}

fn chown_nobody(path: &Path) {
    let st = Command::new("chown")
        .args(["-R", "nobody"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(st.success(), "chown nobody {}", path.display());
}

fn template(bin: &Path, as_nobody: bool) -> PathBuf {
    let version = {
        let out = Command::new(bin.join("pg_ctl"))
            .arg("--version")
            .output()
            .expect("pg_ctl --version");
        String::from_utf8_lossy(&out.stdout)
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
            .collect::<String>()
    };
    let root = std::env::temp_dir().join(format!("vigil-pg-template-{version}"));
    if root.join("data").join("PG_VERSION").exists() {
        return root;
    }
    let tmp = std::env::temp_dir().join(format!(
        "vigil-pg-template-{version}.{}.tmp",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    if as_nobody {
        chown_nobody(&tmp);
    }
    let data = tmp.join("data");
    let out = run(
        as_nobody,
        &bin.join("initdb"),
        &[
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ],
    );
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another process may have won the race; then use theirs.
    if std::fs::rename(&tmp, &root).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    root
}

impl PgServer {
    /// Starts a server for tests (fsync off: a crash loses the throwaway
    /// data anyway); panics with the server's log when it cannot.
    pub fn start() -> Self {
        Self::start_with("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
    }

    /// Starts a server with these extra `postgres` options (`""`: the
    /// defaults, durable commits, for benchmarks).
    pub fn start_with(extra: &str) -> Self {
        let bin = find_bin();
        let as_nobody = is_root();
        let tmpl = template(&bin, as_nobody);
        let dir = tempfile::Builder::new()
            .prefix("vigil-pg-")
            .tempdir()
            .unwrap()
            .keep();
        let st = Command::new("cp")
            .arg("-a")
            .arg(tmpl.join("data"))
            .arg(dir.join("data"))
            .status()
            .expect("cp");
        assert!(st.success(), "copy the template cluster");
        if as_nobody {
            chown_nobody(&dir);
        }
        let data = dir.join("data");
        let log = dir.join("log");
        let mut last = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 {extra}",
                dir.display()
            );
            let out = run(
                as_nobody,
                &bin.join("pg_ctl"),
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-o",
                    &opts,
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            );
            if out.status.success() {
                return Self {
                    dir,
                    bin,
                    as_nobody,
                    opts,
                    port,
                };
            }
            last = std::fs::read_to_string(&log).unwrap_or_default();
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("PostgreSQL did not start: {last}");
    }

    /// Stops the server with pg_ctl `mode` ("fast": a clean shutdown;
    /// "immediate": a crash, recovered from the WAL at the next start),
    /// waits `down`, and starts it again on the same port and data.
    pub fn restart(&self, mode: &str, down: std::time::Duration) {
        let data = self.dir.join("data");
        let pg_ctl = self.bin.join("pg_ctl");
        let data_s = data.to_str().unwrap();
        let out = run(
            self.as_nobody,
            &pg_ctl,
            &["-D", data_s, "-m", mode, "-w", "stop"],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(down);
        let log = self.dir.join("log");
        let out = run(
            self.as_nobody,
            &pg_ctl,
            &[
                "-D",
                data_s,
                "-o",
                &self.opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "PostgreSQL did not restart: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// The `psql` client next to the server binaries, else from `PATH`.
    pub fn psql(&self) -> PathBuf {
        let p = self.bin.join("psql");
        if p.exists() { p } else { PathBuf::from("psql") }
    }

    /// A client tool (`pg_dump`, `pg_restore`, …) next to the server
    /// binaries, else from `PATH`.
    pub fn tool(&self, name: &str) -> PathBuf {
        let p = self.bin.join(name);
        if p.exists() { p } else { PathBuf::from(name) }
    }

    /// Runs `tool` with `args` against this server as `postgres`; panics
    /// with its stderr when it fails.
    pub fn run_tool(&self, name: &str, args: &[&str]) -> String {
        let out = Command::new(self.tool(name))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        assert!(
            out.status.success(),
            "{name} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A connection string for database `db` as superuser `postgres`.
    pub fn url_of(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    /// A connection string for database `postgres` as superuser `postgres`.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = run(
            self.as_nobody,
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
