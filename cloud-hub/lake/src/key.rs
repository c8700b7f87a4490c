//! The lake key, the keyed pseudonym and the per-patient date shift (pure
//! except [`LakeKey::load`] and [`keygen`]).
//!
//! - **Pseudonym**: `hex(HMAC-SHA256(lake key, subject key))`, where the
//!   subject key is the hub's `HMAC-SHA256(subject salt, system ‖ 0x00 ‖
//!   value)` (`hub_domain::privacy`). The same patient has the same
//!   pseudonym in every file and every export; without the lake key (kept
//!   outside the lake, in a 0600 file) it cannot be reversed or recomputed
//!   from an identifier.
//! - **Date shift**: with `date_shift_max_days = N > 0`, every time of a
//!   patient in silver and gold is moved by the same whole number of days
//!   `d` in `[-N, N]`, `d ≠ 0`, derived from the pseudonym under the lake key
//!   (`HMAC-SHA256(lake key, "vigil-lake-date-shift" ‖ 0x00 ‖ pseudonym)`,
//!   first 8 bytes big-endian modulo 2N, mapped onto the non-zero days).
//!   Intervals within a patient's record are kept; the calendar date is not.

use std::io::Write;
use std::path::{Path, PathBuf};

use hub_domain::privacy::SubjectKey;
use ring::hmac;

/// Microseconds in a day.
pub const DAY_US: i64 = 86_400_000_000;
/// Length of the lake key in bytes (64 hex characters in its file).
pub const KEY_LEN: usize = 32;

/// What is wrong with a lake key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{setting}: cannot read {path}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{setting}: {path} can be read by group or others; make it private (chmod 600 {path})")]
    Permissions {
        setting: &'static str,
        path: PathBuf,
    },
    #[error("{setting}: {path} must hold 64 hex characters (32 bytes; `cloud-hub lake keygen`)")]
    Format {
        setting: &'static str,
        path: PathBuf,
    },
    #[error("cannot write the lake key to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The secret the pseudonyms and date shifts are keyed with.
#[derive(Clone)]
pub struct LakeKey {
    key: hmac::Key,
    id: String,
}

impl std::fmt::Debug for LakeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LakeKey({})", self.id)
    }
}

impl LakeKey {
    pub fn new(secret: &[u8; KEY_LEN]) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&key, b"vigil-lake-key-id");
        Self {
            key,
            id: hex::encode(&tag.as_ref()[..8]),
        }
    }

    /// A public fingerprint of the key (recorded in the lake's state, so
    /// that an export under another key is refused: its pseudonyms would
    /// not link to the earlier files).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads the key from `path` (64 hex characters; surrounding
    /// whitespace ignored), refusing a file that group or others can read.
    /// `setting` names the config field in errors.
    pub fn load(path: &Path, setting: &'static str) -> Result<Self, KeyError> {
        let text = read_private(path, setting)?;
        let format = || KeyError::Format {
            setting,
            path: path.to_owned(),
        };
        let bytes = hex::decode(text.trim_ascii()).map_err(|_| format())?;
        let secret: [u8; KEY_LEN] = bytes.try_into().map_err(|_| format())?;
        Ok(Self::new(&secret))
    }

    /// The patient's pseudonym: `hex(HMAC-SHA256(lake key, subject key))`.
    pub fn pseudonym(&self, subject: &SubjectKey) -> String {
        hex::encode(hmac::sign(&self.key, &subject.0).as_ref())
    }

    /// The patient's date shift in whole days (see the module docs): 0 when
    /// `max_days` is 0, else in `[-max_days, -1] ∪ [1, max_days]`.
    pub fn date_shift_days(&self, pseudonym: &str, max_days: u16) -> i64 {
        if max_days == 0 {
            return 0;
        }
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"vigil-lake-date-shift\x00");
        ctx.update(pseudonym.as_bytes());
        let tag = ctx.sign();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        let n = i64::from(max_days);
        // 2N non-zero days: 0..N-1 → -N..-1, N..2N-1 → 1..N.
        let r = i64::try_from(u64::from_be_bytes(first) % (2 * n as u64)).unwrap_or(0);
        if r < n { r - n } else { r - n + 1 }
    }
}

/// The contents of a secret file (a key, a SAS token), refused when group
/// or others can read it. `setting` names the config field in errors.
pub fn read_private(path: &Path, setting: &'static str) -> Result<Vec<u8>, KeyError> {
    let read = |source| KeyError::Read {
        setting,
        path: path.to_owned(),
        source,
    };
    if vigil_io::private_fs::shared_with_others(path).map_err(read)? {
        return Err(KeyError::Permissions {
            setting,
            path: path.to_owned(),
        });
    }
    std::fs::read(path).map_err(read)
}

/// Writes a new random lake key to `out` (created, mode 0600; must not
/// exist): 32 random bytes as 64 hex characters and a newline. Returns the
/// key's id.
pub fn keygen(out: &Path) -> Result<String, KeyError> {
    let write = |source| KeyError::Write {
        path: out.to_owned(),
        source,
    };
    let mut secret = [0u8; KEY_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| write(std::io::Error::other("the system random generator failed")))?;
    let mut f = vigil_io::private_fs::create_new(out).map_err(write)?;
    f.write_all(format!("{}\n", hex::encode(secret)).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(write)?;
    Ok(LakeKey::new(&secret).id().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_keyed_and_distinct() {
        let k = LakeKey::new(&[1; KEY_LEN]);
        let a = SubjectKey([5; 32]);
        let b = SubjectKey([6; 32]);
        assert_eq!(k.pseudonym(&a), k.pseudonym(&a));
        assert_eq!(k.pseudonym(&a).len(), 64);
        assert_ne!(k.pseudonym(&a), k.pseudonym(&b));
        // Another key, another pseudonym for the same patient.
        assert_ne!(k.pseudonym(&a), LakeKey::new(&[2; KEY_LEN]).pseudonym(&a));
        // The documented construction.
        let expected = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &[1; KEY_LEN]), &[5; 32]);
        assert_eq!(k.pseudonym(&a), hex::encode(expected.as_ref()));
    }

    #[test]
    fn date_shifts_are_whole_nonzero_days_within_the_range_and_stable() {
        let k = LakeKey::new(&[3; KEY_LEN]);
        assert_eq!(k.date_shift_days("p", 0), 0);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..2000 {
            let p = format!("patient-{i}");
            let d = k.date_shift_days(&p, 30);
            assert!((-30..=30).contains(&d) && d != 0, "{d}");
            assert_eq!(d, k.date_shift_days(&p, 30));
            seen.insert(d);
        }
        // Every day of the range is used (2000 draws over 60 values).
        assert_eq!(seen.len(), 60);
        let d = k.date_shift_days("x", 1);
        assert!(d == 1 || d == -1);
    }

    #[test]
    fn key_files_must_be_private_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lake.key");
        let id = keygen(&path).unwrap();
        let k = LakeKey::load(&path, "lake.pseudonym_key_file").unwrap();
        assert_eq!(k.id(), id);
        // keygen never overwrites.
        assert!(matches!(keygen(&path), Err(KeyError::Write { .. })));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = LakeKey::load(&path, "lake.pseudonym_key_file").unwrap_err();
        assert!(matches!(e, KeyError::Permissions { .. }));
        assert!(e.to_string().contains("lake.pseudonym_key_file"), "{e}");
        let bad = dir.path().join("bad.key");
        let mut f = vigil_io::private_fs::create_new(&bad).unwrap();
        f.write_all(b"not hex\n").unwrap();
        assert!(matches!(
            LakeKey::load(&bad, "lake.pseudonym_key_file"),
            Err(KeyError::Format { .. })
        ));
    }
}
