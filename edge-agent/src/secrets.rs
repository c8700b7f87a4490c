//! Secret files: the buffer key and the gateway token. Both must be readable
//! by the owner only (mode 0600 or stricter); the agent refuses files that
//! group or others can read, and creates the key with mode 0600.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "secret file {path} has mode {mode:04o}; group/others must have no access (run: chmod 600 {path})"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path}: expected 32 raw bytes or 64 hex digits")]
    KeyFormat { path: PathBuf },
    #[error("token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("no gateway token: set uplink.token_file, VIGIL_AGENT_TOKEN_FILE or VIGIL_AGENT_TOKEN")]
    NoToken,
    #[error("system random number generator failed")]
    Random,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Read a secret file after checking that only its owner can access it.
pub fn read_private(path: &Path) -> Result<Vec<u8>, SecretError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    std::fs::read(path).map_err(io(path))
}

/// Load the 32-byte buffer key, creating it (mode 0600) when absent.
pub fn load_or_create_key(path: &Path) -> Result<[u8; 32], SecretError> {
    match std::fs::metadata(path) {
        Ok(_) => parse_key(path, &read_private(path)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| SecretError::Random)?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io(path))?;
            }
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io(path))?;
            f.write_all(&key).map_err(io(path))?;
            f.sync_all().map_err(io(path))?;
            tracing::info!(path = %path.display(), "created new buffer key (mode 0600)");
            Ok(key)
        }
        Err(e) => Err(io(path)(e)),
    }
}

fn parse_key(path: &Path, bytes: &[u8]) -> Result<[u8; 32], SecretError> {
    if bytes.len() == 32 {
        let mut k = [0u8; 32];
        k.copy_from_slice(bytes);
        return Ok(k);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| SecretError::KeyFormat {
        path: path.to_owned(),
    })?;
    let v = hex::decode(text.trim()).map_err(|_| SecretError::KeyFormat {
        path: path.to_owned(),
    })?;
    v.try_into().map_err(|_| SecretError::KeyFormat {
        path: path.to_owned(),
    })
}

/// The gateway's bearer token: `VIGIL_AGENT_TOKEN` if set, else the token
/// file (0600).
pub fn load_token(
    token_file: Option<&Path>,
    env_token: Option<String>,
) -> Result<String, SecretError> {
    if let Some(t) = env_token.filter(|t| !t.trim().is_empty()) {
        return Ok(t.trim().to_string());
    }
    let path = token_file.ok_or(SecretError::NoToken)?;
    let bytes = read_private(path)?;
    let token = String::from_utf8_lossy(&bytes).trim().to_string();
    if token.is_empty() {
        return Err(SecretError::EmptyToken {
            path: path.to_owned(),
        });
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/buffer.key");
        let k1 = load_or_create_key(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_key(&p).unwrap(), k1);
        assert_ne!(k1, [0u8; 32]);
    }

    #[test]
    fn readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("buffer.key");
        std::fs::write(&p, [7u8; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_key(&p).unwrap_err();
        assert!(
            matches!(err, SecretError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn hex_keys_are_accepted_and_bad_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_or_create_key(&p).unwrap(), [0xab; 32]);
        std::fs::write(&p, "short").unwrap();
        assert!(matches!(
            load_or_create_key(&p),
            Err(SecretError::KeyFormat { .. })
        ));
    }

    #[test]
    fn token_from_env_wins_then_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "vgt_abc\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_token(Some(&p), Some("env".into())).unwrap(), "env");
        assert_eq!(load_token(Some(&p), None).unwrap(), "vgt_abc");
        assert!(matches!(load_token(None, None), Err(SecretError::NoToken)));
    }
}
