//! `cloud-hub backup` (online, while the hub serves) and `cloud-hub
//! restore` (checked, refuses to replace without --force).

use crate::common;

use std::path::Path;
use std::process::Command;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_cloud-hub");

fn cli(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("VIGIL_HUB_SQLITE_PATH")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_for(dir: &Path, db: &Path) -> std::path::PathBuf {
    let p = dir.join("cli.toml");
    std::fs::write(
        &p,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[storage]\nsqlite_path = \"{}\"\n",
            db.display()
        ),
    )
    .unwrap();
    p
}

fn observations(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM observations", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn online_backup_then_restore() {
    let hub = TestHub::start().await;
    let db = hub.dir.path().join("hub.sqlite");
    let cfg = config_for(hub.dir.path(), &db);
    let ack = hub
        .ingest(&batch(
            1,
            DEVICE,
            vec![spo2(1, 97.0, T0), spo2(2, 98.0, T0 + MINUTE)],
        ))
        .await;
    assert_eq!(ack.accepted, 2);

    // The audit log (in its own file beside the database) so far: the
    // hub's own start at least.
    let audited = audit_entries(&cloud_hub::store::audit_path(&db));
    assert!(audited > 0);

    // Online: the hub keeps serving (and ingesting) around the backup.
    let out_dir = tempfile::tempdir().unwrap();
    let backup = out_dir.path().join("b1.sqlite");
    let (ok, err) = cli(&cfg, &["backup", "--out", backup.to_str().unwrap()]);
    assert!(ok, "{err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the backup holds patient identifiers");
    }
    let ack = hub
        .ingest(&batch(2, DEVICE, vec![spo2(3, 96.0, T0 + 2 * MINUTE)]))
        .await;
    assert_eq!(ack.accepted, 1);
    assert_eq!(observations(&db), 3);
    // Never over an existing file.
    let (ok, err) = cli(&cfg, &["backup", "--out", backup.to_str().unwrap()]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let token = hub.token.clone();
    hub.stop().await;

    // Restore into a new database: the state at backup time.
    let dir2 = tempfile::tempdir().unwrap();
    let db2 = dir2.path().join("restored.sqlite");
    let cfg2 = config_for(dir2.path(), &db2);
    let (ok, err) = cli(&cfg2, &["restore", "--from", backup.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(observations(&db2), 2);
    // The restored database opens and answers FHIR searches, with the
    // gateway (and its token) it had.
    let store = cloud_hub::store::Store::open(&db2).unwrap();
    let all = cloud_hub::fhir::parse_search(&[]).unwrap();
    let (total, rows) = store.search(&all).unwrap();
    assert_eq!(total, 2);
    let first = cloud_hub::fhir::render::render_observation(&rows[0]).unwrap();
    assert_eq!(first["valueQuantity"]["value"], 97.0);
    assert_eq!(
        store
            .authenticate(&cloud_hub::auth::hash_token(&token))
            .unwrap()
            .as_deref(),
        Some(GATEWAY)
    );
    // With the audit log of the backup, moved into the restored
    // database's own audit file.
    assert_eq!(store.audit_entries(0).unwrap().len() as i64, audited);
    assert_eq!(audit_entries(&cloud_hub::store::audit_path(&db2)), audited);
}

fn audit_entries(audit_file: &Path) -> i64 {
    rusqlite::Connection::open(audit_file)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn restore_checks_before_replacing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.sqlite");
    let cfg = config_for(dir.path(), &db);
    // A real database to back up, with an audit entry.
    let entry = |i: i64| cloud_hub::audit::Entry {
        time_us: T0 + i,
        actor: "cli".into(),
        action: "read".into(),
        resource: "/fhir/Observation".into(),
        patient: None,
        patients: Vec::new(),
        outcome: 200,
        detail: String::new(),
    };
    let store = cloud_hub::store::Store::open(&db).unwrap();
    store.append_audit(&entry(1), None).unwrap();
    drop(store);
    let good = dir.path().join("good.sqlite");
    let (ok, err) = cli(&cfg, &["backup", "--out", good.to_str().unwrap()]);
    assert!(ok, "{err}");
    // An entry after the backup.
    let store = cloud_hub::store::Store::open(&db).unwrap();
    store.append_audit(&entry(2), None).unwrap();
    drop(store);
    // Replacing needs --force.
    let (ok, err) = cli(&cfg, &["restore", "--from", good.to_str().unwrap()]);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, err) = cli(
        &cfg,
        &["restore", "--from", good.to_str().unwrap(), "--force"],
    );
    assert!(ok, "{err}");
    // The database and its audit log are the backup's: the later entry is
    // gone with the replaced audit file, not mixed into the restored chain.
    let store = cloud_hub::store::Store::open(&db).unwrap();
    let seqs: Vec<i64> = store
        .audit_entries(0)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [1]);
    drop(store);

    // Not SQLite.
    let junk = dir.path().join("junk.sqlite");
    std::fs::write(&junk, b"this is not a database, just bytes".repeat(200)).unwrap();
    let (ok, err) = cli(
        &cfg,
        &["restore", "--from", junk.to_str().unwrap(), "--force"],
    );
    assert!(!ok && err.contains("not a usable backup"), "{err}");
    // SQLite, but not Vigil's.
    let other = dir.path().join("other.sqlite");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
        .unwrap();
    let (ok, err) = cli(
        &cfg,
        &["restore", "--from", other.to_str().unwrap(), "--force"],
    );
    assert!(!ok && err.contains("no Vigil schema"), "{err}");
    // From a newer build.
    let newer = dir.path().join("newer.sqlite");
    std::fs::copy(&good, &newer).unwrap();
    rusqlite::Connection::open(&newer)
        .unwrap()
        .execute(
            "INSERT INTO schema_migrations (version, applied_us) VALUES (999, 0)",
            [],
        )
        .unwrap();
    let (ok, err) = cli(
        &cfg,
        &["restore", "--from", newer.to_str().unwrap(), "--force"],
    );
    assert!(!ok && err.contains("newer"), "{err}");
    // Nothing above touched the database: it still opens.
    cloud_hub::store::Store::open(&db).unwrap();
}
