//! Online backup and restore of the embedded (SQLite) store, for the
//! `cloud-hub backup` and `restore` commands (SQLite only: a PostgreSQL
//! deployment uses pg_dump or its platform's backups).
//!
//! `cloud-hub backup --out FILE` copies the live database with SQLite's
//! online backup API while the hub keeps serving (WAL readers do not block
//! it; pages changed during the copy make the copy restart that step), then
//! checks the copy (`PRAGMA integrity_check`) and writes it with 0600
//! permissions: it holds patient identifiers.
//!
//! The audit log lives in a file of its own beside the database
//! (`audit_file`); a backup carries it inside its one file, as the tables
//! it had before, copied from the audit file right after the main copy.
//!
//! `cloud-hub restore --from FILE` first checks the backup (integrity, a
//! Vigil schema, a schema version this build knows), then copies it into
//! the configured database with the same API. Stop the hub first: a
//! running hub would keep serving from its open connection while the file
//! changes underneath it. Restoring over an existing database needs
//! `--force` (it is replaced, not merged); the database's audit file is
//! removed with it, and the next open moves the backup's log into a new
//! one.

use std::path::Path;
use std::time::Duration;

use rusqlite::backup::Backup;
use rusqlite::{Connection, OpenFlags};

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("file: {0}")]
    Io(#[from] std::io::Error),
    #[error("{path} already exists; choose another file")]
    Exists { path: String },
    #[error("the database {path} exists; restoring replaces it: pass --force to do so")]
    WouldReplace { path: String },
    #[error("{path} is not a usable backup: {reason}")]
    NotABackup { path: String, reason: String },
}

/// The highest schema version this build knows.
pub fn supported_version() -> i64 {
    crate::schema_version()
}

/// Copies the database at `db` to `out` (which must not exist) online.
/// Returns the number of pages copied.
pub fn backup(db: &Path, out: &Path) -> Result<u64, BackupError> {
    if out.exists() {
        return Err(BackupError::Exists {
            path: out.display().to_string(),
        });
    }
    let src = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(Duration::from_secs(10))?;
    // Create the file 0600 before SQLite opens it.
    create_private(out)?;
    let mut dst = Connection::open(out)?;
    {
        let b = Backup::new(&src, &mut dst)?;
        b.run_to_completion(1024, Duration::from_millis(5), None)?;
    }
    // The audit log, from its own file, into the backup's one file (the
    // layout a restored database has its log moved out of at open).
    let audit = crate::audit_path(db);
    if audit.exists() && !crate::audit_file::holds_tables(&dst).map_err(db_error)? {
        crate::audit_file::create_tables(&dst).map_err(db_error)?;
        crate::audit_file::copy_tables(&mut dst, &audit).map_err(db_error)?;
    }
    let pages: i64 = dst.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    check(&dst, out)?;
    Ok(pages.max(0) as u64)
}

/// Checks a backup file and copies it over the database at `db`.
pub fn restore(from: &Path, db: &Path, force: bool) -> Result<(), BackupError> {
    let src = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    check(&src, from)?;
    if db.exists() && !force {
        return Err(BackupError::WouldReplace {
            path: db.display().to_string(),
        });
    }
    if !db.exists() {
        create_private(db)?;
    }
    let mut dst = Connection::open(db)?;
    dst.busy_timeout(Duration::from_secs(10))?;
    {
        let b = Backup::new(&src, &mut dst)?;
        b.run_to_completion(1024, Duration::from_millis(5), None)?;
    }
    check(&dst, db)?;
    drop(dst);
    // The database's audit file goes: the backup carries its own log,
    // which the next open moves into a new audit file.
    let audit = crate::audit_path(db);
    for suffix in ["", "-wal", "-shm"] {
        match std::fs::remove_file(crate::side_file(&audit, suffix)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

fn db_error(e: crate::DbError) -> BackupError {
    match e {
        crate::DbError::Sqlite(e) => BackupError::Sqlite(e),
        other => BackupError::Io(std::io::Error::other(other.to_string())),
    }
}

fn create_private(path: &Path) -> Result<(), BackupError> {
    vigil_io::private_fs::create_new(path)?;
    Ok(())
}

/// Integrity, a Vigil schema, and a version this build can serve.
fn check(conn: &Connection, path: &Path) -> Result<(), BackupError> {
    let bad = |reason: String| BackupError::NotABackup {
        path: path.display().to_string(),
        reason,
    };
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| bad(format!("not a readable SQLite database ({e})")))?;
    if integrity != "ok" {
        return Err(bad(format!("integrity check failed: {integrity}")));
    }
    let version: Option<i64> = conn
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
            r.get(0)
        })
        .map_err(|_| bad("no Vigil schema (schema_migrations missing)".into()))?;
    let version = version.ok_or_else(|| bad("empty schema_migrations".into()))?;
    if version > supported_version() {
        return Err(bad(format!(
            "schema version {version} is newer than this build's {}; use a newer cloud-hub",
            supported_version()
        )));
    }
    Ok(())
}
