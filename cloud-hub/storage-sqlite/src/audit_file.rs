//! The audit log's own database file beside the hub's (`hub.sqlite` →
//! `hub-audit.sqlite`): `audit_log`, `audit_checkpoints` and
//! `audit_purges`, with the same schema and triggers as they had in the
//! main file (migrations v11, v18 and v21, applied here in order and
//! counted in `PRAGMA user_version`).
//!
//! Why a file of its own: every audited API request commits an entry. A
//! SQLite WAL reader drops its whole page cache whenever its database file
//! has had a commit since its last read, so with the log in the main file
//! each request emptied the cache of the readers that serve the FHIR API;
//! and each entry waited behind the ingest transaction holding the one
//! writer. Now audit commits touch neither. Nothing writes the audit
//! tables and the main file in one transaction, so nothing needs atomicity
//! across the two files.
//!
//! A database that still holds the tables in the main file (a build
//! before this one, or a restored backup, which carries the log in its one
//! file) has them moved at open: copied into the audit file (a row already
//! there must be identical, else the open fails rather than mix two
//! chains), committed, then dropped from the main file. An interruption
//! between the two steps is finished by the next open.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OpenFlags};

use crate::DbError;
use crate::checkpoint::Checkpointer;
use crate::schema::{SCHEMA_V11, SCHEMA_V18, SCHEMA_V21};

/// The audit tables' migrations, in order (`PRAGMA user_version` counts
/// those applied).
const MIGRATIONS: [&str; 3] = [SCHEMA_V11, SCHEMA_V18, SCHEMA_V21];

/// The columns each audit table has after [`MIGRATIONS`], in order.
const TABLES: [(&str, &str); 3] = [
    (
        "audit_log",
        "seq, time_us, actor, action, resource, patient_id, outcome, detail, prev_hash, hash, \
         key_id, patients",
    ),
    (
        "audit_checkpoints",
        "seq, mac, entries, time_us, key_id, sig",
    ),
    ("audit_purges", "through, mac, time_us"),
];

/// The audit file of the database at `db`: its name with `-audit` before
/// the extension (`hub.sqlite` → `hub-audit.sqlite`).
pub fn audit_path(db: &Path) -> PathBuf {
    let mut name = db.file_stem().unwrap_or_default().to_owned();
    name.push("-audit");
    if let Some(ext) = db.extension() {
        name.push(".");
        name.push(ext);
    }
    db.with_file_name(name)
}

/// Creates the audit tables (with their triggers) on `conn`'s main
/// database, or brings them up to date.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), DbError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let applied: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for sql in MIGRATIONS.iter().skip(applied.max(0) as usize) {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    tx.commit()?;
    Ok(())
}

/// Creates the audit tables (with their triggers) in `conn`'s main
/// database, leaving its `user_version` alone (a backup file).
pub(crate) fn create_tables(conn: &Connection) -> Result<(), DbError> {
    for sql in MIGRATIONS {
        conn.execute_batch(sql)?;
    }
    Ok(())
}

/// Copies the audit tables of the database at `from` (attached to `conn`)
/// into `conn`'s own, in one transaction. A row whose key is already there
/// must be identical.
pub(crate) fn copy_tables(conn: &mut Connection, from: &Path) -> Result<u64, DbError> {
    conn.execute(
        "ATTACH DATABASE ?1 AS source",
        [from.to_string_lossy().as_ref()],
    )?;
    let copied = (|| {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut copied = 0;
        for (table, cols) in TABLES {
            let key = cols.split(',').next().unwrap_or_default();
            let side = |alias: &str| {
                cols.split(',')
                    .map(|c| format!("{alias}.{}", c.trim()))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let differing: i64 = tx.query_row(
                &format!(
                    "SELECT COUNT(*) FROM source.{table} l JOIN main.{table} m ON m.{key} = l.{key}
                      WHERE ({}) IS NOT ({})",
                    side("l"),
                    side("m")
                ),
                [],
                |r| r.get(0),
            )?;
            if differing > 0 {
                return Err(DbError::Store(hub_storage::StoreError::Corrupt(format!(
                    "{differing} {table} rows of {} differ from the rows with their keys in the \
                     audit file; the audit file belongs to another database: move it away",
                    from.display()
                ))));
            }
            copied += tx.execute(
                &format!(
                    "INSERT OR IGNORE INTO main.{table} ({cols}) SELECT {cols} FROM source.{table}"
                ),
                [],
            )? as u64;
        }
        tx.commit()?;
        Ok(copied)
    })();
    conn.execute("DETACH DATABASE source", [])?;
    copied
}

/// Whether `conn`'s main database holds the audit log table.
pub(crate) fn holds_tables(conn: &Connection) -> Result<bool, DbError> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_log')",
        [],
        |r| r.get(0),
    )?)
}

/// Drops the audit tables from `conn`'s main database (their triggers go
/// with them).
pub(crate) fn drop_tables(conn: &Connection) -> Result<(), DbError> {
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         DROP TABLE IF EXISTS audit_log;
         DROP TABLE IF EXISTS audit_checkpoints;
         DROP TABLE IF EXISTS audit_purges;
         COMMIT;",
    )?;
    Ok(())
}

/// The audit file's connections: the writer (appends, checkpoints,
/// purges; `synchronous = FULL`, so each commit is on stable storage when
/// it returns: an audited response waits for a durable entry) and a
/// reader (verification, exports), so that a long read of the log does
/// not hold up appends; and the file's checkpoint thread.
#[derive(Debug)]
pub(crate) struct AuditDb {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    checkpoints: Checkpointer,
}

impl AuditDb {
    /// Opens (creating if needed) the audit file of the database at `db`,
    /// whose writer is `main`; moves the audit tables out of the main file
    /// when it still holds them.
    pub(crate) fn open(db: &Path, main: &Connection) -> Result<Self, DbError> {
        let path = audit_path(db);
        crate::private_files(&path)?;
        let mut w = Connection::open(&path)?;
        crate::tune(&w)?;
        w.pragma_update(None, "journal_mode", "WAL")?;
        w.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut w)?;
        if holds_tables(main)? {
            let n = copy_tables(&mut w, db)?;
            drop_tables(main)?;
            tracing::info!(
                rows = n,
                audit_file = %path.display(),
                "moved the audit log into its own database file"
            );
        }
        let r = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        crate::tune(&r)?;
        let checkpoints = Checkpointer::start(&path, &w)?;
        Ok(Self {
            writer: Mutex::new(w),
            reader: Mutex::new(r),
            checkpoints,
        })
    }

    /// The writer; a checkpoint follows shortly.
    pub(crate) fn writer(&self) -> Result<MutexGuard<'_, Connection>, DbError> {
        let c = self.writer.lock().map_err(|_| DbError::Poisoned)?;
        self.checkpoints.written();
        Ok(c)
    }

    pub(crate) fn reader(&self) -> Result<MutexGuard<'_, Connection>, DbError> {
        self.reader.lock().map_err(|_| DbError::Poisoned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SqliteStore;
    use hub_storage::AuditStore;

    /// A database of the layout before the audit file: every migration
    /// applied in the main file, with `n` audit entries there.
    fn legacy_db(path: &Path, n: i64) {
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_us INTEGER NOT NULL)",
        )
        .unwrap();
        for (v, sql) in crate::schema::MIGRATIONS {
            c.execute_batch(sql).unwrap();
            c.execute("INSERT INTO schema_migrations VALUES (?1, 0)", [v])
                .unwrap();
        }
        for seq in 1..=n {
            c.execute(
                "INSERT INTO audit_log (seq, time_us, actor, action, resource, patient_id, outcome,
                     detail, prev_hash, hash, key_id, patients)
                 VALUES (?1, ?1, 'actor', 'read', '/fhir/Observation', 'p', 200, '', 'prev',
                     'hash-' || ?1, NULL, '')",
                [seq],
            )
            .unwrap();
        }
    }

    fn main_holds_tables(path: &Path) -> bool {
        holds_tables(&Connection::open(path).unwrap()).unwrap()
    }

    #[test]
    fn a_log_in_the_main_file_is_moved_into_the_audit_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hub.sqlite");
        legacy_db(&db, 3);
        let s = SqliteStore::open(&db).unwrap();
        let seqs: Vec<i64> = s.audit_entries(0).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert!(
            !main_holds_tables(&db),
            "the main file no longer holds the log"
        );
        assert!(audit_path(&db).exists());
        // New entries go to the audit file; a reopen moves nothing again.
        drop(s);
        let s = SqliteStore::open(&db).unwrap();
        assert_eq!(s.audit_entries(0).unwrap().len(), 3);
        assert!(!main_holds_tables(&db));
        // The triggers came along: the log stays append-only.
        let w = s.audit_writer().unwrap();
        assert!(
            w.execute("DELETE FROM audit_log WHERE seq = 2", [])
                .is_err()
        );
        assert!(
            w.execute("UPDATE audit_log SET actor = 'x' WHERE seq = 1", [])
                .is_err()
        );
    }

    /// Two stores on one database (two hub processes) append to one audit
    /// file: the appends serialize on its write lock and the chain stays
    /// one, unbroken.
    #[test]
    fn two_stores_on_one_database_append_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hub.sqlite");
        let stores = [
            SqliteStore::open(&db).unwrap(),
            SqliteStore::open(&db).unwrap(),
        ];
        std::thread::scope(|t| {
            for (n, s) in stores.iter().enumerate() {
                t.spawn(move || {
                    for i in 0..50 {
                        let e = crate::audit::tests::e(100 * n as i64 + i);
                        s.append_audit(&e, None).unwrap();
                    }
                });
            }
        });
        let entries = stores[1].audit_entries(i64::MIN).unwrap();
        let seqs: Vec<i64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
        let v = hub_domain::audit::verify(&entries, &[], None, &[]);
        assert_eq!((v.entries, v.broken), (100, None));
    }

    /// A move interrupted after the copy (the main file still holds the
    /// tables) is finished by the next open, without duplicates; a main
    /// file whose log differs from the audit file's is refused.
    #[test]
    fn an_interrupted_move_is_finished_and_a_foreign_audit_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hub.sqlite");
        legacy_db(&db, 4);
        {
            let mut w = Connection::open(audit_path(&db)).unwrap();
            migrate(&mut w).unwrap();
            assert_eq!(copy_tables(&mut w, &db).unwrap(), 4);
        }
        assert!(main_holds_tables(&db));
        let s = SqliteStore::open(&db).unwrap();
        assert_eq!(s.audit_entries(0).unwrap().len(), 4);
        assert!(!main_holds_tables(&db));
        drop(s);

        let other = dir.path().join("other.sqlite");
        legacy_db(&other, 2);
        Connection::open(&other)
            .unwrap()
            .execute_batch(
                "DROP TRIGGER audit_log_no_update;
                 UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2;",
            )
            .unwrap();
        std::fs::copy(audit_path(&db), audit_path(&other)).unwrap();
        let err = SqliteStore::open(&other).unwrap_err().to_string();
        assert!(
            err.contains("audit file belongs to another database"),
            "{err}"
        );
        assert!(main_holds_tables(&other), "nothing dropped");
    }

    #[test]
    fn the_audit_file_sits_beside_the_database() {
        assert_eq!(
            audit_path(Path::new("/var/lib/vigil/hub.sqlite")),
            Path::new("/var/lib/vigil/hub-audit.sqlite")
        );
        assert_eq!(audit_path(Path::new("hub")), Path::new("hub-audit"));
    }
}
