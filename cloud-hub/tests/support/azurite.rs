//! Azurite (the Azure Storage emulator, npm `azurite@3.35.0`, installed by
//! scripts/setup.sh) started on a free loopback port, and the lake venv's
//! independent reader (`tests/py/lake_read.py`: pyarrow, azure-storage-blob).
//! Shared by the lake tests and `benches/lake.rs`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The well-known Azurite development account.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn cache_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vigil")
}

/// The lake venv's Python (pyarrow, azure-storage-blob).
pub fn lake_python() -> PathBuf {
    let py = std::env::var_os("VIGIL_LAKE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("lake-venv"))
        .join("bin/python");
    assert!(
        py.exists(),
        "pyarrow is not installed at {}: run scripts/setup.sh",
        py.display()
    );
    py
}

pub fn lake_read(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/lake_read.py");
    let out = Command::new(lake_python())
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lake_read.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Azurite's blob service on a free loopback port, stopped on drop.
pub struct Azurite {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Azurite {
    pub fn start() -> Self {
        let bin = std::env::var_os("VIGIL_AZURITE_BLOB")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_dir().join("azurite/node_modules/.bin/azurite-blob"));
        assert!(
            bin.exists(),
            "azurite-blob not found at {}: run scripts/setup.sh (npm install azurite@3.35.0)",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--disableTelemetry"])
            .args(["--skipApiVersionCheck", "--loose", "--silent"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let a = Self {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return a;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("azurite did not listen on 127.0.0.1:{port} within 30 s");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }

    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};\
             BlobEndpoint={};",
            self.endpoint()
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
