//! FHIR Bulk Data export (`$export`, FHIR Bulk Data Access IG v2, async
//! request pattern): system (`/fhir/$export`), all patients
//! (`/fhir/Patient/$export`) and group (`/fhir/Group/{ward}/$export`, a
//! group being a ward: the patients who stayed in its beds).
//!
//! Kick-off needs `Prefer: respond-async` and answers 202 with
//! `Content-Location` naming the status URL. The job runs in the
//! background, writing NDJSON files (one resource per line, at most
//! [`LINES_PER_FILE`] per file) under the export directory beside the
//! database. Status: 202 with `X-Progress` while running, 200 with the
//! completion manifest when done, 500 with an OperationOutcome when it
//! failed; `DELETE` cancels and removes the files. Jobs are kept in memory:
//! a hub restart forgets them (their files are removed at start-up).
//!
//! Parameters: `_type` (Observation, Patient, Device, Location),
//! `_since` (an instant: resources stored at or after it; for
//! Observations the hub receive time), `_outputFormat` (only NDJSON).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value as Json, json};

use crate::fhir::render::{
    ObservationRow, render_device, render_location, render_observation, render_patient,
};
use crate::store::{Store, StoreError};

/// Resources per NDJSON file.
pub const LINES_PER_FILE: u64 = 100_000;
/// Rows read per database round trip.
const CHUNK: usize = 2_000;
/// Resource types an export can contain.
pub const TYPES: &[&str] = &["Observation", "Patient", "Device", "Location"];

/// What an export covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    System,
    AllPatients,
    /// A ward: patients who stayed in its beds.
    Group(String),
}

/// A validated kick-off request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub scope: Scope,
    pub types: Vec<&'static str>,
    /// Resources stored at or after this time (UTC µs).
    pub since_us: Option<i64>,
    /// The kick-off URL, echoed in the manifest.
    pub request_url: String,
}

/// A kick-off parameter the server does not accept (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

/// Parses the kick-off parameters.
pub fn parse_request(
    scope: Scope,
    pairs: &[(String, String)],
    request_url: String,
) -> Result<ExportRequest, ParamError> {
    let mut types: Vec<&'static str> = match scope {
        Scope::System => TYPES.to_vec(),
        // Patient-level exports hold patient compartment data (Patient,
        // Observation) and the devices that measured them.
        Scope::AllPatients | Scope::Group(_) => vec!["Patient", "Observation", "Device"],
    };
    let mut since_us = None;
    for (k, v) in pairs {
        match k.as_str() {
            "_type" => {
                let mut chosen = Vec::new();
                for t in v.split(',').map(str::trim) {
                    let known = TYPES.iter().find(|x| **x == t).ok_or_else(|| {
                        ParamError(format!(
                            "_type: `{t}` is not exported (one of {})",
                            TYPES.join(", ")
                        ))
                    })?;
                    if !chosen.contains(known) {
                        chosen.push(*known);
                    }
                }
                types = chosen;
            }
            "_since" => {
                let d = crate::fhir::parse_date_param(v)
                    .map_err(|e| ParamError(format!("_since: {e}")))?;
                since_us = d.bounds().0;
                if since_us.is_none() {
                    return Err(ParamError("_since: must be an instant".into()));
                }
            }
            "_outputFormat" => {
                if !matches!(
                    v.as_str(),
                    "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                ) {
                    return Err(ParamError(format!(
                        "_outputFormat: `{v}` is not supported (only application/fhir+ndjson)"
                    )));
                }
            }
            other => {
                return Err(ParamError(format!(
                    "{other}: not a supported $export parameter"
                )));
            }
        }
    }
    Ok(ExportRequest {
        scope,
        types,
        since_us,
        request_url,
    })
}

/// One output file of a finished export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    pub resource_type: &'static str,
    pub name: String,
    pub count: u64,
    /// The patients whose data the file holds (for the audit entry of its
    /// download).
    pub patients: BTreeSet<String>,
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStatus {
    Running,
    Done(Vec<OutputFile>),
    Failed(String),
}

/// An export job.
#[derive(Debug)]
pub struct Job {
    pub request: ExportRequest,
    /// When the job started (exports retention, `[retention] exports_hours`).
    pub started: std::time::Instant,
    pub transaction_time: String,
    pub dir: PathBuf,
    pub written: AtomicU64,
    pub current: Mutex<&'static str>,
    pub cancelled: AtomicBool,
    pub status: Mutex<JobStatus>,
}

/// The export jobs of a running hub.
#[derive(Debug)]
pub struct Exports {
    root: PathBuf,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

/// Failures of an export job or of its files.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("export file I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Render(#[from] crate::fhir::render::RenderError),
}

fn new_job_id() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random generator works");
    hex::encode(b)
}

impl Exports {
    /// Export files live under `root` (created on demand). Files left by a
    /// previous run are removed: their jobs are gone.
    pub fn new(root: PathBuf) -> Self {
        if root.exists() {
            let _ = std::fs::remove_dir_all(&root);
        }
        Self {
            root,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    /// Starts a job in the background; returns its id.
    pub fn start(&self, store: Store, request: ExportRequest) -> Result<String, ExportError> {
        let id = new_job_id();
        let dir = self.root.join(&id);
        vigil_io::private_fs::create_dir_all(&dir)?;
        let job = Arc::new(Job {
            request,
            started: std::time::Instant::now(),
            transaction_time: crate::fhir::format_instant(crate::store::now_us()),
            dir,
            written: AtomicU64::new(0),
            current: Mutex::new("Patient"),
            cancelled: AtomicBool::new(false),
            status: Mutex::new(JobStatus::Running),
        });
        self.jobs
            .lock()
            .expect("export jobs lock")
            .insert(id.clone(), job.clone());
        let id2 = id.clone();
        tokio::task::spawn_blocking(move || {
            let result = run_job(&store, &job);
            let status = match result {
                Ok(files) => JobStatus::Done(files),
                Err(ExportError::Cancelled) => return,
                Err(e) => {
                    tracing::error!(job = %id2, error = %e, "bulk export failed");
                    JobStatus::Failed(e.to_string())
                }
            };
            *job.status.lock().expect("export status lock") = status;
        });
        Ok(id)
    }

    pub fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().expect("export jobs lock").get(id).cloned()
    }

    /// Exports retention: deletes the jobs (and files) started more than
    /// `max_age` ago, finished or not; returns how many.
    pub fn expire(&self, max_age: std::time::Duration) -> usize {
        let old: Vec<String> = self
            .jobs
            .lock()
            .expect("export jobs lock")
            .iter()
            .filter(|(_, j)| j.started.elapsed() > max_age)
            .map(|(id, _)| id.clone())
            .collect();
        old.iter().filter(|id| self.cancel(id)).count()
    }

    /// Cancels a job and deletes its files; false if unknown.
    pub fn cancel(&self, id: &str) -> bool {
        let job = self.jobs.lock().expect("export jobs lock").remove(id);
        match job {
            Some(job) => {
                job.cancelled.store(true, Ordering::SeqCst);
                let _ = std::fs::remove_dir_all(&job.dir);
                true
            }
            None => false,
        }
    }

    /// The path of an output file of a finished job and the patients whose
    /// data it holds (None if unknown).
    pub fn file(&self, id: &str, name: &str) -> Option<(PathBuf, BTreeSet<String>)> {
        let job = self.job(id)?;
        let JobStatus::Done(files) = &*job.status.lock().expect("export status lock") else {
            return None;
        };
        files
            .iter()
            .find(|f| f.name == name)
            .map(|f| (job.dir.join(&f.name), f.patients.clone()))
    }
}

/// Writes NDJSON lines to numbered files of one resource type.
struct Writer<'a> {
    job: &'a Job,
    ty: &'static str,
    files: Vec<OutputFile>,
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl<'a> Writer<'a> {
    fn new(job: &'a Job, ty: &'static str) -> Self {
        *job.current.lock().expect("export progress lock") = ty;
        Self {
            job,
            ty,
            files: Vec::new(),
            out: None,
        }
    }

    fn line(&mut self, resource: &Json, patient: Option<&str>) -> Result<(), ExportError> {
        if self.job.cancelled.load(Ordering::Relaxed) {
            return Err(ExportError::Cancelled);
        }
        let full = self.files.last().is_none_or(|f| f.count >= LINES_PER_FILE);
        if full {
            if let Some(mut out) = self.out.take() {
                out.flush()?;
            }
            let name = format!("{}-{}.ndjson", self.ty, self.files.len() + 1);
            let f = vigil_io::private_fs::create_file(&self.job.dir.join(&name))?;
            self.out = Some(std::io::BufWriter::new(f));
            self.files.push(OutputFile {
                resource_type: self.ty,
                name,
                count: 0,
                patients: BTreeSet::new(),
            });
        }
        let out = self.out.as_mut().expect("file opened above");
        serde_json::to_writer(&mut *out, resource).map_err(std::io::Error::other)?;
        out.write_all(b"\n")?;
        if let Some(f) = self.files.last_mut() {
            f.count += 1;
            if let Some(p) = patient {
                f.patients.insert(p.to_owned());
            }
        }
        self.job.written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<OutputFile>, ExportError> {
        if let Some(mut out) = self.out.take() {
            out.flush()?;
            out.get_ref().sync_all()?;
        }
        Ok(self.files)
    }
}

fn run_job(store: &Store, job: &Job) -> Result<Vec<OutputFile>, ExportError> {
    let req = &job.request;
    let ward = match &req.scope {
        Scope::Group(ward) => Some(ward.as_str()),
        _ => None,
    };
    // A system export has every row, including unattributed readings.
    let patient_level = req.scope != Scope::System;
    let mut files = Vec::new();
    let mut devices_seen: BTreeSet<(String, String)> = BTreeSet::new();
    // Observations first: the devices of a patient export are those that
    // measured the exported observations.
    let order = ["Observation", "Patient", "Device", "Location"];
    for ty in order.iter().filter(|t| req.types.contains(*t)) {
        let mut w = Writer::new(job, ty);
        match *ty {
            "Observation" => {
                let mut after = 0i64;
                loop {
                    let rows: Vec<(i64, ObservationRow)> = store.export_observations(
                        after,
                        CHUNK,
                        req.since_us,
                        patient_level,
                        ward,
                    )?;
                    let Some((last, _)) = rows.last() else { break };
                    after = *last;
                    for (_, row) in &rows {
                        devices_seen.insert((row.gateway_id.clone(), row.device_id.clone()));
                        w.line(&render_observation(row)?, row.patient_id.as_deref())?;
                    }
                }
            }
            "Patient" => {
                let all = store.export_patients(ward)?;
                for (value, system) in all {
                    if crate::fhir::is_valid_id(&value) {
                        w.line(&render_patient(&value, Some(&system)), Some(&value))?;
                    }
                }
            }
            "Device" => {
                let mut offset = 0u64;
                loop {
                    let (_, page) = store.devices(CHUNK as u32, offset)?;
                    if page.is_empty() {
                        break;
                    }
                    offset += page.len() as u64;
                    for d in page {
                        let in_scope = !patient_level
                            || devices_seen.contains(&(d.gateway_id.clone(), d.device_id.clone()));
                        let fresh = req.since_us.is_none_or(|s| d.last_seen_us >= s);
                        if in_scope && fresh {
                            w.line(&render_device(&d), None)?;
                        }
                    }
                }
            }
            "Location" => {
                let beds = store
                    .list_beds()
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                for b in beds {
                    w.line(&render_location(&b.id, &b.ward, &b.label), None)?;
                }
            }
            _ => {}
        }
        files.extend(w.finish()?);
    }
    Ok(files)
}

/// The completion manifest (Bulk Data IG "Response - Complete Status").
pub fn manifest(job: &Job, files: &[OutputFile], file_url: impl Fn(&str) -> String) -> Json {
    json!({
        "transactionTime": job.transaction_time,
        "request": job.request.request_url,
        "requiresAccessToken": false,
        "output": files.iter().map(|f| json!({
            "type": f.resource_type,
            "url": file_url(&f.name),
            "count": f.count,
        })).collect::<Vec<_>>(),
        "error": [],
    })
}

/// `X-Progress` text of a running job.
pub fn progress(job: &Job) -> String {
    format!(
        "{} resources written; exporting {}",
        job.written.load(Ordering::Relaxed),
        job.current.lock().expect("export progress lock")
    )
}

/// Whether `name` is a file name this module writes (guards the file
/// route against path tricks).
pub fn is_file_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".ndjson") else {
        return false;
    };
    let Some((ty, n)) = stem.split_once('-') else {
        return false;
    };
    TYPES.contains(&ty) && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
}

/// The export directory for a database file.
pub fn dir_for(sqlite_path: &Path) -> PathBuf {
    let mut name = sqlite_path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".exports");
    sqlite_path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn exports_retention_deletes_old_jobs_and_their_files_only() {
        let root = tempfile::tempdir().unwrap();
        let exports = Exports::new(root.path().join("exports"));
        let job = |id: &str, age_s: u64| {
            let dir = exports.root.join(id);
            vigil_io::private_fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("Observation.ndjson"), b"{}\n").unwrap();
            let started = std::time::Instant::now()
                .checked_sub(std::time::Duration::from_secs(age_s))
                .unwrap();
            exports.jobs.lock().unwrap().insert(
                id.to_owned(),
                Arc::new(Job {
                    request: parse_request(Scope::System, &[], "u".into()).unwrap(),
                    started,
                    transaction_time: String::new(),
                    dir,
                    written: AtomicU64::new(0),
                    current: Mutex::new("Patient"),
                    cancelled: AtomicBool::new(false),
                    status: Mutex::new(JobStatus::Done(Vec::new())),
                }),
            );
        };
        job("old", 7200);
        job("new", 60);
        assert_eq!(exports.expire(std::time::Duration::from_secs(3600)), 1);
        assert!(exports.job("old").is_none());
        assert!(!exports.root.join("old").exists());
        assert!(exports.job("new").is_some());
        assert!(exports.root.join("new/Observation.ndjson").exists());
        assert_eq!(exports.expire(std::time::Duration::from_secs(3600)), 0);
    }

    #[test]
    fn kick_off_parameters() {
        let r = parse_request(Scope::System, &[], "u".into()).unwrap();
        assert_eq!(r.types, TYPES);
        let r = parse_request(
            Scope::AllPatients,
            &pairs(&[
                ("_type", "Observation,Patient,Observation"),
                ("_since", "2024-05-01T00:00:00Z"),
            ]),
            "u".into(),
        )
        .unwrap();
        assert_eq!(r.types, vec!["Observation", "Patient"]);
        assert_eq!(r.since_us, Some(1_714_521_600_000_000));
        for bad in [
            ("_type", "MedicationRequest"),
            ("_since", "yesterday"),
            ("_outputFormat", "text/csv"),
            ("_elements", "id"),
        ] {
            assert!(
                parse_request(Scope::System, &pairs(&[bad]), "u".into()).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_our_file_names_are_served() {
        assert!(is_file_name("Observation-1.ndjson"));
        assert!(is_file_name("Device-12.ndjson"));
        for bad in [
            "../x.ndjson",
            "Observation-1.json",
            "Observation-.ndjson",
            "Foo-1.ndjson",
            "Observation-1/../../a.ndjson",
        ] {
            assert!(!is_file_name(bad), "{bad}");
        }
    }
}
