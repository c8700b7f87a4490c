//! The analytics lake (docs/lake.md), end to end: readings ingested through
//! the real HTTP ingest path, exported with `cloud_hub::lake` to a local
//! directory (SQLite) and to Azurite (PostgreSQL, a container SAS, a date shift), read
//! back with pyarrow (an independent reader) and compared with the FHIR
//! API's values; a re-run adds nothing, an export stopped after its first
//! file resumes without duplicates, an erased patient's rows leave the lake
//! on the next export, and no identifier the hub knows is in any silver or
//! gold file (bytes or values).

use crate::azurite::{AZURITE_ACCOUNT, AZURITE_KEY, Azurite, lake_read};
use crate::common;
use crate::pg_server;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloud_hub::Config;
use common::*;
use hub_domain::score_history::Kind;
use hub_lake::LakeKey;
use serde_json::Value;
use shared_protocol::v1::{Batch, DeviceData, DeviceInfo, Identifier, Reading};

/// Patient 2's identifier (it arrives on its readings, HL7-style).
const MRN: &str = "MRN-LAKE-7781";
const MRN_SYSTEM: &str = "urn:oid:1.2.840.99999.7781";
/// Patient 2's device and an unattributed one.
const SUBJECT_DEVICE: &str = "hl7-dev-lake-b";
const STRAY: &str = "stray-dev-lake-c";
const SERIAL: &str = "SN-LAKE-0042";
const LOCATION: &str = "WARD-LAKE/bed-09";
const VENDOR_LABEL: &str = "vendor text Mr Lake";
const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
const CONTAINER: &str = "vigil-lake";

/// Where a scenario's lake goes.
enum Dest<'a> {
    Local(PathBuf),
    Azure(&'a Azurite),
}

fn private_file(path: &Path, text: &str) {
    let mut f = vigil_io_create(path);
    f.write_all(text.as_bytes()).unwrap();
}

fn vigil_io_create(path: &Path) -> std::fs::File {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap();
    f
}

fn lake_section(dir: &Path, dest: &Dest<'_>, shift_days: u16) -> String {
    let key = dir.join("lake.key");
    hub_lake::keygen(&key).unwrap();
    let common = format!(
        "pseudonym_key_file = \"{}\"\ndate_shift_max_days = {shift_days}\nsettle_s = 0\n",
        key.display()
    );
    match dest {
        Dest::Local(path) => format!(
            "[lake]\ndestination = \"local\"\npath = \"{}\"\n{common}",
            path.display()
        ),
        Dest::Azure(a) => {
            // A container SAS (the bench uses the account key).
            let sas_file = dir.join("lake.sas");
            let token = lake_read(&["sas", AZURITE_ACCOUNT, AZURITE_KEY, CONTAINER]);
            private_file(&sas_file, token.trim());
            format!(
                "[lake]\ndestination = \"azure\"\n{common}[lake.azure]\naccount = \"{AZURITE_ACCOUNT}\"\n\
                 container = \"{CONTAINER}\"\nprefix = \"vigil/lake\"\nsas_file = \"{}\"\n\
                 endpoint = \"{}\"\n",
                sas_file.display(),
                a.endpoint()
            )
        }
    }
}

fn lake_batch(seq: u64, device_id: &str, readings: Vec<Reading>) -> Batch {
    let mut b = batch(seq, device_id, readings);
    b.devices = vec![DeviceData {
        device: Some(DeviceInfo {
            device_id: device_id.into(),
            protocol: "masimo-ascii1".into(),
            manufacturer: "Masimo".into(),
            model: "Radical-7".into(),
            serial_number: SERIAL.into(),
            location: LOCATION.into(),
        }),
        readings: std::mem::take(&mut b.devices[0].readings),
        waveforms: vec![],
        technical: vec![],
    }];
    b
}

fn labelled(mut r: Reading) -> Reading {
    r.vendor_label = VENDOR_LABEL.into();
    r
}

/// Patient 1 (by the config's device association): SpO2 and pulse every
/// 2 minutes from `base`, one impossible and one INVALID value.
fn patient1_readings(first_seq: u64, n: u64, base: i64) -> Vec<Reading> {
    let mut out = Vec::new();
    for i in 0..n {
        let t = base + i as i64 * 2 * MINUTE;
        out.push(labelled(spo2(first_seq + 2 * i, 90.0 + (i % 8) as f64, t)));
        out.push(labelled(pulse(
            first_seq + 2 * i + 1,
            60.0 + (i % 20) as f64,
            t,
        )));
    }
    out
}

/// What pyarrow read: every file with its cells.
struct LakeFiles {
    files: Vec<Value>,
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl LakeFiles {
    fn read(dest: &Dest<'_>) -> Self {
        let (root, tmp) = match dest {
            Dest::Local(p) => (p.clone(), None),
            Dest::Azure(a) => {
                let tmp = tempfile::tempdir().unwrap();
                lake_read(&[
                    "download",
                    &a.connection_string(),
                    CONTAINER,
                    tmp.path().to_str().unwrap(),
                ]);
                (tmp.path().join("vigil/lake"), Some(tmp))
            }
        };
        let doc: Value =
            serde_json::from_str(&lake_read(&["read", root.to_str().unwrap()])).unwrap();
        Self {
            files: doc["files"].as_array().unwrap().clone(),
            root,
            _tmp: tmp,
        }
    }

    fn layer(&self, layer: &str) -> impl Iterator<Item = &Value> {
        self.files
            .iter()
            .filter(move |f| f["layer"].as_str() == Some(layer))
    }

    /// Every row of `layer` as column → cell maps.
    fn rows(&self, layer: &str) -> Vec<BTreeMap<String, Value>> {
        let mut out = Vec::new();
        for f in self.layer(layer) {
            let cols = f["columns"].as_object().unwrap();
            for i in 0..f["rows"].as_u64().unwrap() as usize {
                out.push(
                    cols.iter()
                        .map(|(k, v)| (k.clone(), v[i].clone()))
                        .collect(),
                );
            }
        }
        out
    }
}

/// (effective µs, LOINC, value) of a patient's Observations as the FHIR API
/// serves them.
async fn fhir_values(hub: &TestHub, patient: &str) -> BTreeSet<(i64, String, Option<String>)> {
    let (status, bundle) = hub
        .get_json(&format!("/fhir/Observation?patient={patient}&_count=1000"))
        .await;
    assert_eq!(status, 200, "{bundle}");
    bundle["entry"]
        .as_array()
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let r = &e["resource"];
            let t = time::OffsetDateTime::parse(
                r["effectiveDateTime"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap();
            (
                (t.unix_timestamp_nanos() / 1000) as i64,
                r["code"]["coding"][0]["code"].as_str().unwrap().to_owned(),
                r["valueQuantity"]["value"].as_f64().map(|v| v.to_string()),
            )
        })
        .collect()
}

fn pseudonym(store: &hub_transport::Store, key: &LakeKey, patient: &str) -> String {
    let salt = store.subject_salt().unwrap();
    let system = store.patient(patient).unwrap().unwrap_or_default();
    key.pseudonym(&hub_domain::privacy::subject_key(&salt, &system, patient))
}

/// Every identifier and free text the hub holds for this data set.
fn identifiers() -> Vec<&'static str> {
    vec![
        PATIENT,
        MRN,
        MRN_SYSTEM,
        GATEWAY,
        DEVICE,
        SUBJECT_DEVICE,
        STRAY,
        SERIAL,
        LOCATION,
        "WARD-LAKE",
        VENDOR_LABEL,
    ]
}

/// No identifier in any silver or gold file: neither in its bytes
/// (footer, statistics, dictionary pages) nor in any cell.
fn assert_no_identifiers(lake: &LakeFiles, also: &[String]) {
    let mut scanned = 0;
    for f in lake
        .files
        .iter()
        .filter(|f| f["layer"].as_str().is_some_and(|l| l != "bronze"))
    {
        let path = lake.root.join(f["path"].as_str().unwrap());
        let bytes = std::fs::read(&path).unwrap();
        let cells: Vec<String> = f["columns"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|c| c.as_array().unwrap().iter().map(|v| v.to_string()))
            .collect();
        for id in identifiers()
            .into_iter()
            .map(str::to_owned)
            .chain(also.iter().cloned())
        {
            assert!(
                !bytes.windows(id.len()).any(|w| w == id.as_bytes()),
                "{id} in the bytes of {}",
                path.display()
            );
            assert!(
                !cells.iter().any(|c| c.contains(&id)),
                "{id} in a value of {}",
                path.display()
            );
        }
        scanned += 1;
    }
    assert!(scanned > 0, "no silver or gold file to scan");
}

async fn export(config: &Config) -> hub_lake::Summary {
    let c = config.clone();
    tokio::task::spawn_blocking(move || cloud_hub::lake::export(&c, &hub_lake::NoProgress))
        .await
        .unwrap()
        .unwrap()
        .0
        .expect("the lake lock is free")
}

async fn scenario(hub: TestHub, dest: Dest<'_>, shift_days: u16) {
    let config = hub.config.clone();
    let lake_cfg = config.lake.clone().unwrap();
    let key = LakeKey::load(&lake_cfg.pseudonym_key_file, "lake.pseudonym_key_file").unwrap();
    let base = (now_us() - 3 * HOUR) / HOUR * HOUR;
    // Patient 1: 120 readings, an impossible and an INVALID one, 2 fresh.
    let mut p1 = patient1_readings(1, 60, base);
    p1.push(labelled(spo2(121, 250.0, base + 7 * MINUTE)));
    let mut invalid = labelled(spo2(122, 91.0, base + 9 * MINUTE));
    invalid.validity = 3;
    p1.push(invalid);
    // Fresh values, so that the score history has rows.
    let fresh = now_us() - 30_000_000;
    p1.push(labelled(spo2(123, 96.0, fresh)));
    p1.push(labelled(pulse(124, 72.0, fresh)));
    assert_eq!(hub.ingest(&lake_batch(1, DEVICE, p1)).await.accepted, 124);
    // Patient 2, named by its readings.
    let p2: Vec<Reading> = (1..=21)
        .map(|i| {
            let t = if i == 21 {
                fresh
            } else {
                base + i as i64 * 3 * MINUTE
            };
            let mut r = labelled(spo2(i, 94.0 + (i % 3) as f64, t));
            r.subject = Some(Identifier {
                system: MRN_SYSTEM.into(),
                value: MRN.into(),
            });
            r
        })
        .collect();
    assert_eq!(
        hub.ingest(&lake_batch(2, SUBJECT_DEVICE, p2))
            .await
            .accepted,
        21
    );
    // An unattributed device: bronze only.
    let stray: Vec<Reading> = (1..=5)
        .map(|i| labelled(spo2(i, 97.0, base + i as i64 * MINUTE)))
        .collect();
    assert_eq!(hub.ingest(&lake_batch(3, STRAY, stray)).await.accepted, 5);
    let total = 150u64;

    let first = export(&config).await;
    assert_eq!(first.readings, total, "{first:?}");
    // Silver: the attributed numeric readings (124 + 21).
    assert_eq!(first.silver_rows, 145, "{first:?}");
    assert_eq!(first.not_silver, 5, "{first:?}");
    assert_eq!(first.skipped, 0, "{first:?}");

    let store = cloud_hub::store::Store::open_config(&config.storage)
        .unwrap()
        .handle();
    let pseudo1 = pseudonym(&store, &key, PATIENT);
    let pseudo2 = pseudonym(&store, &key, MRN);
    assert_ne!(pseudo1, pseudo2);

    let lake = LakeFiles::read(&dest);
    for f in &lake.files {
        assert_eq!(f["schema_version"], "1", "{}", f["path"]);
    }
    // Bronze: every reading once, as received.
    let bronze = lake.rows("bronze");
    assert_eq!(bronze.len() as u64, total);
    let ids: BTreeSet<(String, u64)> = bronze
        .iter()
        .map(|r| {
            (
                r["device_id"].as_str().unwrap().to_owned(),
                r["sequence"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ids.len() as u64, total);
    let b2 = bronze
        .iter()
        .find(|r| r["device_id"] == SUBJECT_DEVICE)
        .unwrap();
    assert_eq!(b2["subject_value"], MRN);
    assert_eq!(b2["vendor_label"], VENDOR_LABEL);

    // Silver against the FHIR API, patient by patient: same instants
    // (shifted by one whole number of days when configured), codes, values.
    let silver = lake.rows("silver");
    let mut shifts = HashMap::new();
    for (patient, p) in [(PATIENT, &pseudo1), (MRN, &pseudo2)] {
        let fhir = fhir_values(&hub, patient).await;
        assert!(!fhir.is_empty());
        let rows: Vec<_> = silver.iter().filter(|r| &r["pseudonym"] == p).collect();
        assert_eq!(rows.len(), fhir.len(), "{patient}");
        let fhir_times: BTreeSet<i64> = fhir.iter().map(|f| f.0).collect();
        let silver_times: BTreeSet<i64> = rows
            .iter()
            .map(|r| r["effective_time"].as_i64().unwrap())
            .collect();
        let shift = silver_times.first().unwrap() - fhir_times.first().unwrap();
        assert_eq!(shift % DAY, 0, "{patient}: shift {shift}");
        if shift_days == 0 {
            assert_eq!(shift, 0);
        } else {
            assert!(shift != 0 && shift.abs() <= i64::from(shift_days) * DAY);
        }
        shifts.insert(patient, shift);
        let lake_values: BTreeSet<(i64, String, Option<String>)> = rows
            .iter()
            .map(|r| {
                (
                    r["effective_time"].as_i64().unwrap() - shift,
                    r["loinc"].as_str().unwrap().to_owned(),
                    r["value"].as_f64().map(|v| v.to_string()),
                )
            })
            .collect();
        assert_eq!(lake_values, fhir, "{patient}");

        // Gold: per patient-hour aggregates of the FHIR API's final values.
        let mut expected: BTreeMap<(i64, String), Vec<f64>> = BTreeMap::new();
        for (t, loinc, v) in &fhir {
            if let Some(v) = v {
                expected
                    .entry(((t + shift).div_euclid(HOUR) * HOUR, loinc.clone()))
                    .or_default()
                    .push(v.parse().unwrap());
            }
        }
        let gold: BTreeMap<(i64, String), (i64, f64, f64, f64)> = lake
            .rows("gold/vitals")
            .iter()
            .filter(|r| &r["pseudonym"] == p)
            .map(|r| {
                (
                    (
                        r["hour"].as_i64().unwrap(),
                        r["loinc"].as_str().unwrap().to_owned(),
                    ),
                    (
                        r["count"].as_i64().unwrap(),
                        r["min"].as_f64().unwrap(),
                        r["max"].as_f64().unwrap(),
                        r["mean"].as_f64().unwrap(),
                    ),
                )
            })
            .collect();
        assert_eq!(gold.len(), expected.len(), "{patient}");
        for (k, vals) in &expected {
            let (count, min, max, mean) = gold[k];
            assert_eq!(count as usize, vals.len(), "{patient} {k:?}");
            assert_eq!(min, vals.iter().cloned().fold(f64::INFINITY, f64::min));
            assert_eq!(max, vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max));
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            assert!((mean - m).abs() < 1e-9, "{mean} vs {m}");
        }
        // Gold: the score history, row for row.
        let mut stored = 0;
        for kind in Kind::ALL {
            stored += store
                .score_history(patient, kind, i64::MIN, i64::MAX, 100_000)
                .unwrap()
                .len();
        }
        let scores = lake
            .rows("gold/scores")
            .into_iter()
            .filter(|r| &r["pseudonym"] == p)
            .count();
        assert_eq!(scores, stored, "{patient}");
    }
    assert!(
        lake.rows("gold/scores").len() as u64 == first.scores && first.scores > 0,
        "{first:?}"
    );
    let observation_ids: Vec<String> = bronze
        .iter()
        .map(|r| r["observation_id"].as_str().unwrap().to_owned())
        .collect();
    assert_no_identifiers(&lake, &observation_ids);

    // A re-run finds nothing new and writes nothing.
    let again = export(&config).await;
    assert_eq!(
        (again.readings, again.files, again.scores),
        (0, 0, 0),
        "{again:?}"
    );
    assert_eq!(LakeFiles::read(&dest).rows("bronze").len() as u64, total);

    // An export that stops after its first file, then one that resumes.
    let more = patient1_readings(1001, 15, base + 2 * HOUR);
    assert_eq!(hub.ingest(&lake_batch(4, DEVICE, more)).await.accepted, 30);
    let c = config.clone();
    let failed = tokio::task::spawn_blocking(move || {
        let mut lake = cloud_hub::lake::Lake::open(c.lake.as_ref().unwrap()).unwrap();
        lake.options.fail_after_files = Some(1);
        let store = cloud_hub::store::Store::open_config(&c.storage)
            .unwrap()
            .handle();
        lake.export(&store, &hub_lake::NoProgress)
    })
    .await
    .unwrap();
    assert!(
        matches!(
            failed,
            Err(cloud_hub::HubError::Lake(hub_lake::LakeError::Injected))
        ),
        "{failed:?}"
    );
    let resumed = export(&config).await;
    assert_eq!(resumed.readings, 30, "{resumed:?}");
    let lake = LakeFiles::read(&dest);
    let bronze = lake.rows("bronze");
    assert_eq!(bronze.len() as u64, total + 30);
    let silver = lake.rows("silver");
    let keys: BTreeSet<(String, i64, String)> = silver
        .iter()
        .map(|r| {
            (
                r["pseudonym"].as_str().unwrap().to_owned(),
                r["effective_time"].as_i64().unwrap(),
                r["loinc"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(keys.len(), silver.len(), "duplicate silver rows");
    assert_eq!(silver.len(), 145 + 30);
    assert_eq!(
        silver.iter().filter(|r| r["pseudonym"] == pseudo1).count() as u64,
        fhir_values(&hub, PATIENT).await.len() as u64
    );

    // Erasure: patient 2's rows leave silver and gold, its device's
    // readings in the erased windows leave bronze; patient 1 stays.
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.erase_patient(MRN, now_us()).unwrap())
        .await
        .unwrap();
    let erased = export(&config).await;
    assert_eq!(erased.erasures, 1, "{erased:?}");
    let lake = LakeFiles::read(&dest);
    for layer in ["silver", "gold/vitals", "gold/scores"] {
        assert!(
            !lake.rows(layer).iter().any(|r| r["pseudonym"] == pseudo2),
            "{layer} still holds the erased patient"
        );
    }
    assert_eq!(
        lake.rows("silver")
            .iter()
            .filter(|r| r["pseudonym"] == pseudo1)
            .count(),
        124 + 30
    );
    let bronze = lake.rows("bronze");
    assert!(!bronze.iter().any(|r| r["device_id"] == SUBJECT_DEVICE));
    assert_eq!(bronze.len() as u64, total + 30 - 21);
    let observation_ids: Vec<String> = bronze
        .iter()
        .map(|r| r["observation_id"].as_str().unwrap().to_owned())
        .collect();
    assert_no_identifiers(&lake, &observation_ids);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_export_to_a_directory_from_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let dest = Dest::Local(lake_dir);
    let text = format!(
        "{}\n{}",
        config_text(dir.path(), ""),
        lake_section(dir.path(), &dest, 0)
    );
    let config = Config::parse(&text).unwrap();
    config.validate().unwrap();
    let hub = TestHub::start_config(dir, config, "http").await;
    scenario(hub, dest, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_export_to_azurite_from_postgres_with_a_date_shift() {
    let azurite = Azurite::start();
    lake_read(&["create-container", &azurite.connection_string(), CONTAINER]);
    let server = pg_server::PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let dest = Dest::Azure(&azurite);
    let text = format!(
        "{}\n{}",
        config_text(dir.path(), "").on_postgres(&server.url(), 3),
        lake_section(dir.path(), &dest, 30)
    );
    let config = Config::parse(&text).unwrap();
    config.validate().unwrap();
    let hub = TestHub::start_config(dir, config, "http").await;
    scenario(hub, dest, 30).await;
}

#[test]
fn a_readable_pseudonym_key_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("lake.key");
    hub_lake::keygen(&key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = format!(
        "{}\n[lake]\ndestination = \"local\"\npath = \"{}\"\npseudonym_key_file = \"{}\"\n",
        config_text(dir.path(), ""),
        dir.path().join("lake").display(),
        key.display()
    );
    let config = Config::parse(&text).unwrap();
    let e = cloud_hub::lake::export(&config, &hub_lake::NoProgress).unwrap_err();
    assert!(e.to_string().contains("lake.pseudonym_key_file"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exports_on_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let dest = Dest::Local(lake_dir.clone());
    let text = format!(
        "{}\n{}interval_s = 1\n",
        config_text(dir.path(), ""),
        lake_section(dir.path(), &dest, 0)
    );
    let config = Config::parse(&text).unwrap();
    config.validate().unwrap();
    let hub = TestHub::start_config(dir, config, "http").await;
    let t = now_us() - 60_000_000;
    assert_eq!(
        hub.ingest(&lake_batch(
            1,
            DEVICE,
            vec![spo2(1, 97.0, t), pulse(2, 70.0, t)]
        ))
        .await
        .accepted,
        2
    );
    // The serve loop exports both readings by itself (waiting up to 60 s
    // for a loaded machine; no export command runs here).
    let mut rows = 0;
    for _ in 0..600 {
        if lake_dir.join("_vigil/state.json").exists() {
            rows = LakeFiles::read(&dest).rows("bronze").len();
            if rows == 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows, 2);
    hub.stop().await;
}
