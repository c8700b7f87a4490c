//! Files and directories only their owner may read: `0600` files in `0700`
//! directories, whatever the process umask (the modes are set explicitly
//! after creation, since a umask can only take bits away and an unusual one
//! can take the owner's own). For the hub's database and its WAL, bulk
//! exports, keys and backups.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a private file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of a private directory.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and every missing ancestor with mode `0700`. A directory
/// that already exists keeps its mode (it is the operator's).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut p = Some(dir);
    while let Some(d) = p {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_owned());
        p = d.parent();
    }
    for d in missing.iter().rev() {
        match DirBuilder::new().mode(DIR_MODE).create(d) {
            Ok(()) => std::fs::set_permissions(d, Permissions::from_mode(DIR_MODE))?,
            // Made meanwhile by someone else: theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates (or truncates) `path` for writing with mode `0600`.
pub fn create_file(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Creates `path` for writing with mode `0600`; fails when it exists
/// (keys, backups, exports: never overwrite one).
pub fn create_new(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Opens `path` for appending, creating it with mode `0600` (an existing
/// file that group or others could read is narrowed to `0600`).
pub fn open_append(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)?;
    if f.metadata()?.permissions().mode() & 0o077 != 0 {
        f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    Ok(f)
}

/// Whether group or others have any access to `path` (a secret file must
/// be its owner's alone).
pub fn shared_with_others(path: &Path) -> io::Result<bool> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o077 != 0)
}

/// Makes sure `path` exists with mode `0600`: creates it empty when
/// missing; narrows the mode of an existing file that group or others may
/// read or write. Returns the mode it had when it was narrowed.
pub fn ensure_file(path: &Path) -> io::Result<Option<u32>> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(f) => {
            f.set_permissions(Permissions::from_mode(FILE_MODE))?;
            Ok(None)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => narrow(path),
        Err(e) => Err(e),
    }
}

/// Narrows an existing file's mode to `0600` when group or others have any
/// access; returns the mode it had. A missing file is left missing.
pub fn narrow(path: &Path) -> io::Result<Option<u32>> {
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, Permissions::from_mode(FILE_MODE))?;
    Ok(Some(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn new_directories_and_files_are_private_and_existing_ones_narrowed() {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), Permissions::from_mode(0o755)).unwrap();
        let deep = t.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&t.path().join(d)), DIR_MODE, "{d}");
        }
        // The existing parent is the operator's: untouched.
        assert_eq!(mode(t.path()), 0o755);
        create_dir_all(&deep).unwrap();

        let f = deep.join("export.ndjson");
        create_file(&f).unwrap();
        assert_eq!(mode(&f), FILE_MODE);

        let key = deep.join("audit.key");
        create_new(&key).unwrap();
        assert_eq!(mode(&key), FILE_MODE);
        assert!(create_new(&key).is_err(), "never overwrites");
        let log = deep.join("checkpoints.jsonl");
        std::fs::write(&log, "").unwrap();
        std::fs::set_permissions(&log, Permissions::from_mode(0o644)).unwrap();
        open_append(&log).unwrap();
        assert_eq!(mode(&log), FILE_MODE);

        let db = deep.join("hub.sqlite");
        assert_eq!(ensure_file(&db).unwrap(), None);
        assert_eq!(mode(&db), FILE_MODE);
        std::fs::set_permissions(&db, Permissions::from_mode(0o644)).unwrap();
        assert_eq!(ensure_file(&db).unwrap(), Some(0o644));
        assert_eq!(mode(&db), FILE_MODE);
        assert_eq!(ensure_file(&db).unwrap(), None, "already private");
        assert_eq!(narrow(&deep.join("missing")).unwrap(), None);
    }
}
