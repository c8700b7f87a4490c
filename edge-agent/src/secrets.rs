//! Secret files: the buffer key and the gateway token. Both must be readable
//! by the owner only (mode 0600 or stricter); the agent refuses files that
//! group or others can read, and creates the key with mode 0600.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
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
            let mut f = vigil_io::private_fs::create_new(path).map_err(io(path))?;
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

/// Name prefix of retired keys, next to the current key file:
/// `<key file>.retired-<key id hex>`.
fn retired_prefix(path: &Path) -> String {
    format!(
        "{}.retired-",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    )
}

fn retired_files(path: &Path) -> Result<Vec<PathBuf>, SecretError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let prefix = retired_prefix(path);
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir)(e)),
    };
    for e in rd {
        let e = e.map_err(io(dir))?;
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The current key (created if missing) and every retired key kept beside
/// it (each 0600-checked).
pub fn load_keyring(path: &Path) -> Result<crate::buffer::Keyring, SecretError> {
    let current = load_or_create_key(path)?;
    let mut retired = Vec::new();
    for f in retired_files(path)? {
        retired.push(parse_key(&f, &read_private(&f)?)?);
    }
    Ok(crate::buffer::Keyring { current, retired })
}

/// Make a new current key and retire the old one (kept until no buffered
/// record needs it). Crash-safe: the new key is written and synced before
/// the renames; a crash between them leaves the old key retired and a new
/// one is created on the next start, so no record becomes unreadable.
/// Returns (old key id, new key id). Restart the agent to use the new key.
pub fn rotate_key(path: &Path) -> Result<([u8; 4], [u8; 4]), SecretError> {
    let old = parse_key(path, &read_private(path)?)?;
    let mut new = [0u8; 32];
    SystemRandom::new()
        .fill(&mut new)
        .map_err(|_| SecretError::Random)?;
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = vigil_io::private_fs::create_new(&tmp).map_err(io(&tmp))?;
    f.write_all(&new).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    let old_id = crate::buffer::key_id(&old);
    let retired = path.with_file_name(format!("{}{}", retired_prefix(path), hex::encode(old_id)));
    std::fs::rename(path, &retired).map_err(io(path))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok((old_id, crate::buffer::key_id(&new)))
}

/// Delete retired keys no stored record needs any more; returns the files
/// deleted.
pub fn prune_retired(
    path: &Path,
    in_use: &std::collections::HashSet<[u8; 4]>,
) -> Result<Vec<PathBuf>, SecretError> {
    let mut deleted = Vec::new();
    for f in retired_files(path)? {
        let key = parse_key(&f, &read_private(&f)?)?;
        if !in_use.contains(&crate::buffer::key_id(&key)) {
            std::fs::remove_file(&f).map_err(io(&f))?;
            deleted.push(f);
        }
    }
    Ok(deleted)
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
    fn rotation_retires_the_old_key_and_pruning_deletes_it_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("buffer.key");
        let k1 = load_or_create_key(&p).unwrap();
        let (old_id, new_id) = rotate_key(&p).unwrap();
        assert_eq!(old_id, crate::buffer::key_id(&k1));
        let ring = load_keyring(&p).unwrap();
        assert_eq!(crate::buffer::key_id(&ring.current), new_id);
        assert_eq!(ring.retired, vec![k1]);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Still needed: kept. No longer needed: deleted.
        let in_use: std::collections::HashSet<_> = [old_id].into_iter().collect();
        assert!(prune_retired(&p, &in_use).unwrap().is_empty());
        assert_eq!(prune_retired(&p, &Default::default()).unwrap().len(), 1);
        assert!(load_keyring(&p).unwrap().retired.is_empty());
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
