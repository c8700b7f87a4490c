//! A throwaway Tansu 0.6.0 broker (Kafka protocol, pure Rust; installed by
//! `scripts/setup.sh` with its `dynostore` and `libsql` storage engines) on
//! a free loopback port, for the hub's Kafka / Event Hubs source tests.
//! Stopped on drop. `Storage::Sqlite` keeps topics and records in a file in
//! the test's directory, so the broker can be restarted without losing
//! them; `Storage::Memory` loses everything when it stops.
//!
//! Binary: `$VIGIL_TANSU`, else `~/.cargo/bin/tansu`, else `PATH`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// Where the broker keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `memory://`: gone when the broker stops.
    Memory,
    /// `sqlite://tansu.db` in the broker's directory: survives restarts.
    Sqlite,
}

#[derive(Debug)]
pub struct Tansu {
    dir: PathBuf,
    storage: Storage,
    pub port: u16,
    child: Option<Child>,
}

/// The tansu binary; panics naming the setup script when it is missing.
pub fn bin() -> PathBuf {
    let bin = std::env::var_os("VIGIL_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var("HOME").unwrap_or_default();
            let cargo_bin = Path::new(&home).join(".cargo/bin/tansu");
            if cargo_bin.exists() {
                cargo_bin
            } else {
                PathBuf::from("tansu")
            }
        });
    let version = Command::new(&bin).arg("--version").output();
    assert!(
        version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("0.6.0")),
        "tansu 0.6.0 not found: run scripts/setup.sh \
         (cargo install tansu --version 0.6.0 --locked --features dynostore,libsql)"
    );
    bin
}

impl Tansu {
    /// Starts a broker keeping its files (log, database) in `dir`.
    pub fn start(dir: &Path, storage: Storage) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut t = Tansu {
            dir: dir.to_owned(),
            storage,
            port,
            child: None,
        };
        t.spawn();
        t
    }

    /// `host:port` for a Kafka client.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .unwrap();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let engine = match self.storage {
            Storage::Memory => "memory://tansu/",
            Storage::Sqlite => "sqlite://tansu.db",
        };
        let child = Command::new(bin())
            .current_dir(&self.dir)
            .arg("broker")
            .arg("--listener-url")
            .arg(&url)
            .arg("--advertised-listener-url")
            .arg(&url)
            .arg("--storage-engine")
            .arg(engine)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "tansu did not listen on {}: {}",
            self.port,
            std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
        );
    }

    /// Stops the broker (SIGKILL: nothing it acknowledged may depend on a
    /// clean shutdown), waits `down`, starts it again on the same port and
    /// storage.
    pub fn restart(&mut self, down: Duration) {
        self.kill();
        std::thread::sleep(down);
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}
