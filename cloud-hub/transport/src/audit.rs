//! The audit log: every access to patient data and every administrative
//! change through the API (and the CLI's commands), with who, when, what,
//! whose data and the outcome. Append-only (the database's triggers refuse
//! UPDATE and DELETE) and chained: with `[audit] key_file` each entry
//! carries an HMAC-SHA256 under the audit key (never in the database) over
//! its fields and the previous entry's link, so `cloud-hub audit verify`
//! finds an edited or inserted entry even when the rows after it were
//! recomputed by someone without the key. Signed checkpoints of the head
//! (database, `checkpoint_file`, and a log line with target
//! `vigil_audit_checkpoint`), shipped by the operator to immutable storage,
//! find removed entries: `audit verify --checkpoints FILE` fails on an
//! emptied or truncated log. Without a key the chain is unkeyed SHA-256
//! (legacy; `verify` says so). Exported as FHIR R4 AuditEvent (NDJSON) with
//! `cloud-hub audit export`.
//!
//! Fail closed: an audited response leaves the hub only once its entry is
//! written; when that fails the client gets 503 (`Retry-After`) instead and
//! `vigil_hub_audit_failures_total` counts it.
//!
//! The audit log holds which patient was accessed (that is its purpose);
//! the service logs and metrics still never do. The chain is
//! `hub_domain::audit`, the persistence the store's `AuditStore` (SQLite
//! and PostgreSQL). See docs/operations.md "Audit log".

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hub_storage::StoreError;
use ring::digest;
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;

pub use hub_domain::audit::{
    AuditKey, Checkpoint, CheckpointPolicy, Entry, GENESIS, MULTIPLE, PURGE_ACTION, Stored,
    Verification, chain_hash, chain_mac, purge_entry, purge_point,
};

use crate::ConfigError;
use crate::store::{Store, now_us};

/// Environment variable overriding `audit.key_file`.
pub const ENV_AUDIT_KEY_FILE: &str = "VIGIL_HUB_AUDIT_KEY_FILE";
/// Environment variable holding the audit key itself, used when no
/// `audit.key_file` is set (e.g. a Key Vault secret synced into a
/// Kubernetes Secret, as the PostgreSQL password).
pub const ENV_AUDIT_KEY: &str = "VIGIL_HUB_AUDIT_KEY";
/// The log target of checkpoint lines.
pub const CHECKPOINT_TARGET: &str = "vigil_audit_checkpoint";

fn default_every_entries() -> i64 {
    1000
}
fn default_interval_s() -> u64 {
    300
}

/// `[audit]`: the audit key and checkpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The audit key (at least 32 bytes, mode 0600; `cloud-hub audit
    /// keygen`). Without it, the key in `VIGIL_HUB_AUDIT_KEY`; without
    /// either the chain is unkeyed (legacy).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Earlier keys, after a rotation: entries linked with them still
    /// verify.
    #[serde(default)]
    pub retired_key_files: Vec<PathBuf>,
    /// Where checkpoints are appended, one JSON line each (0600). They are
    /// also logged (target `vigil_audit_checkpoint`) and stored.
    #[serde(default)]
    pub checkpoint_file: Option<PathBuf>,
    /// A checkpoint after this many new entries…
    #[serde(default = "default_every_entries")]
    pub checkpoint_every_entries: i64,
    /// …or this long after the last one when there are new entries.
    #[serde(default = "default_interval_s")]
    pub checkpoint_interval_s: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            key_file: None,
            retired_key_files: Vec::new(),
            checkpoint_file: None,
            checkpoint_every_entries: default_every_entries(),
            checkpoint_interval_s: default_interval_s(),
        }
    }
}

impl AuditConfig {
    /// Checks the fields (not the files: [`AuditConfig::keys`] reads them).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.checkpoint_every_entries < 1 {
            return Err(ConfigError::invalid(
                "audit.checkpoint_every_entries",
                "must be at least 1",
            ));
        }
        if !(1..=86_400).contains(&self.checkpoint_interval_s) {
            return Err(ConfigError::invalid(
                "audit.checkpoint_interval_s",
                "must be between 1 and 86400 seconds",
            ));
        }
        Ok(())
    }

    /// Makes relative paths relative to `base_dir`.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        for p in self
            .key_file
            .iter_mut()
            .chain(self.checkpoint_file.iter_mut())
            .chain(self.retired_key_files.iter_mut())
        {
            if p.is_relative() {
                *p = base_dir.join(&*p);
            }
        }
    }

    /// Reads the keys (current first, then the retired ones): the current
    /// one from `key_file`, else from `VIGIL_HUB_AUDIT_KEY`.
    pub fn keys(&self) -> Result<AuditKeys, AuditKeyError> {
        let current = match &self.key_file {
            Some(path) => Some(load_key(path, "audit.key_file")?),
            None => std::env::var(ENV_AUDIT_KEY)
                .ok()
                .filter(|k| !k.trim().is_empty())
                .map(|k| {
                    AuditKey::new(k.trim().as_bytes()).map_err(|source| AuditKeyError::Key {
                        setting: "audit key",
                        path: PathBuf::from(format!("${ENV_AUDIT_KEY}")),
                        source,
                    })
                })
                .transpose()?,
        };
        let Some(current) = current else {
            if self.retired_key_files.is_empty() {
                return Ok(AuditKeys::default());
            }
            return Err(AuditKeyError::NoCurrentKey);
        };
        let mut keys = vec![current];
        for p in &self.retired_key_files {
            keys.push(load_key(p, "audit.retired_key_files")?);
        }
        Ok(AuditKeys {
            keys: Arc::new(keys),
        })
    }

    /// When checkpoints are due.
    pub fn policy(&self) -> CheckpointPolicy {
        CheckpointPolicy {
            every_entries: self.checkpoint_every_entries,
            every_us: i64::try_from(self.checkpoint_interval_s)
                .unwrap_or(i64::MAX / 1_000_000)
                .saturating_mul(1_000_000),
        }
    }
}

/// Why an audit key cannot be used (the messages name the setting and the
/// file, never the key).
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    #[error("{setting} {path}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{setting} {path} is accessible by group or others; chmod 600 it")]
    Permissions {
        setting: &'static str,
        path: PathBuf,
    },
    #[error("{setting} {path}: {source}")]
    Key {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: hub_domain::audit::KeyError,
    },
    #[error("audit.retired_key_files needs a current key (audit.key_file or {ENV_AUDIT_KEY})")]
    NoCurrentKey,
    #[error("audit key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads an audit key file: mode 0600 (not accessible by group or others),
/// its content (surrounding whitespace trimmed) at least 32 bytes.
pub fn load_key(path: &Path, setting: &'static str) -> Result<AuditKey, AuditKeyError> {
    let read = |source| AuditKeyError::Read {
        setting,
        path: path.to_owned(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(AuditKeyError::Permissions {
                setting,
                path: path.to_owned(),
            });
        }
    }
    let bytes = std::fs::read(path).map_err(read)?;
    AuditKey::new(bytes.trim_ascii()).map_err(|source| AuditKeyError::Key {
        setting,
        path: path.to_owned(),
        source,
    })
}

/// Writes a new audit key to `out` (created, mode 0600; must not exist):
/// 32 random bytes as 64 hex characters and a newline. Returns its id.
pub fn keygen(out: &Path) -> Result<String, AuditKeyError> {
    let write = |source| AuditKeyError::Write {
        path: out.to_owned(),
        source,
    };
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| write(std::io::Error::other("the system random generator failed")))?;
    let text = hex::encode(secret);
    let key = AuditKey::new(text.as_bytes()).map_err(|source| AuditKeyError::Key {
        setting: "audit keygen",
        path: out.to_owned(),
        source,
    })?;
    let mut f = vigil_io::private_fs::create_new(out).map_err(write)?;
    f.write_all(format!("{text}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(write)?;
    Ok(key.id().to_owned())
}

/// The audit keys of a hub: the current one (which links new entries and
/// signs checkpoints) first, then retired ones (which only verify). Empty:
/// the log is unkeyed.
#[derive(Debug, Clone, Default)]
pub struct AuditKeys {
    keys: Arc<Vec<AuditKey>>,
}

impl AuditKeys {
    /// Keys from their secrets (tests, tools): the first is current.
    pub fn from_keys(keys: Vec<AuditKey>) -> Self {
        Self {
            keys: Arc::new(keys),
        }
    }

    /// The key new entries are linked with.
    pub fn current(&self) -> Option<&AuditKey> {
        self.keys.first()
    }

    /// Every key, for verification.
    pub fn all(&self) -> &[AuditKey] {
        &self.keys
    }
}

/// Appends an entry to the store's audit log, linked with the current key
/// (if any): its seq.
pub fn append(store: &Store, keys: &AuditKeys, e: &Entry) -> Result<i64, StoreError> {
    store.append_audit(e, keys.current())
}

/// Appends `entries` in order on a blocking thread: the entries written
/// after their change was applied (applied ADT events, re-attributions).
/// The error is the caller's to log and count.
pub async fn append_all(
    store: &Store,
    keys: &AuditKeys,
    entries: Vec<Entry>,
) -> Result<(), String> {
    let (store, keys) = (store.clone(), keys.clone());
    match tokio::task::spawn_blocking(move || {
        entries
            .iter()
            .try_for_each(|e| append(&store, &keys, e).map(drop))
    })
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("the audit task failed: {e}")),
    }
}

/// Recomputes the whole chain (`hub_domain::audit::verify`) with `keys`,
/// against the stored checkpoints and `checkpoints` (read from files kept
/// outside the database). `anchor`: a (seq, link) the chain must still
/// contain.
pub fn verify(
    store: &Store,
    keys: &AuditKeys,
    anchor: Option<(i64, &str)>,
    checkpoints: &[Checkpoint],
) -> Result<Verification, StoreError> {
    let mut all = store.audit_checkpoints()?;
    all.extend_from_slice(checkpoints);
    Ok(hub_domain::audit::verify(
        &store.audit_entries(i64::MIN)?,
        keys.all(),
        anchor,
        &all,
    ))
}

/// Reads checkpoints from text: one per line, either as the hub writes them
/// to `checkpoint_file`, or a JSON log line whose `checkpoint` field (top
/// level or under `fields`) holds one. Blank lines and log lines without a
/// checkpoint are skipped; a malformed checkpoint is an error naming the
/// line.
pub fn parse_checkpoints(text: &str) -> Result<Vec<Checkpoint>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: Json =
            serde_json::from_str(line).map_err(|e| format!("line {}: not JSON: {e}", i + 1))?;
        let inner = v
            .get("checkpoint")
            .or_else(|| v.get("fields").and_then(|f| f.get("checkpoint")));
        let cp = match inner {
            Some(Json::String(s)) => Checkpoint::from_line(s),
            Some(other) => Checkpoint::from_line(&other.to_string()),
            None if v.get("sig").is_some() => Checkpoint::from_line(line),
            None => continue,
        };
        out.push(cp.map_err(|e| format!("line {}: not a checkpoint: {e}", i + 1))?);
    }
    Ok(out)
}

/// Takes a checkpoint when one is due (see [`CheckpointPolicy`]): stored,
/// appended to `file` (created 0600) and logged with target
/// `vigil_audit_checkpoint`. Blocking.
pub fn take_checkpoint(
    store: &Store,
    key: &AuditKey,
    policy: CheckpointPolicy,
    file: Option<&Path>,
) -> Result<Option<Checkpoint>, CheckpointError> {
    let Some(cp) = store.audit_checkpoint(key, policy, now_us())? else {
        return Ok(None);
    };
    let line = cp.to_line();
    tracing::info!(
        target: CHECKPOINT_TARGET,
        seq = cp.seq,
        checkpoint = %line,
        "audit log checkpoint: ship this line to storage the database's administrators cannot change"
    );
    if let Some(path) = file {
        let io = |source| CheckpointError::File {
            path: path.to_owned(),
            source,
        };
        let mut f = vigil_io::private_fs::open_append(path).map_err(io)?;
        f.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| f.sync_data())
            .map_err(io)?;
    }
    Ok(Some(cp))
}

/// Why a checkpoint was not taken or not written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit.checkpoint_file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Takes a checkpoint when `policy` says one is due, on a blocking thread;
/// failures are logged (and retried at the next check).
async fn checkpoint_now(
    store: &Store,
    keys: &AuditKeys,
    file: Option<&Path>,
    policy: CheckpointPolicy,
) {
    let (store, keys, file) = (store.clone(), keys.clone(), file.map(Path::to_owned));
    let r = tokio::task::spawn_blocking(move || match keys.current() {
        Some(key) => take_checkpoint(&store, key, policy, file.as_deref()),
        None => Ok(None),
    })
    .await;
    match r {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "audit checkpoint failed"),
        Err(e) => tracing::error!(error = %e, "audit checkpoint task failed"),
    }
}

/// Takes checkpoints until `shutdown`, checking every few seconds whether
/// one is due. Without a key, nothing.
pub async fn run_checkpoints(
    store: Store,
    keys: AuditKeys,
    config: AuditConfig,
    shutdown: CancellationToken,
) {
    if keys.current().is_none() {
        return;
    }
    let tick = std::time::Duration::from_secs(config.checkpoint_interval_s.clamp(1, 5));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(tick) => {
                checkpoint_now(&store, &keys, config.checkpoint_file.as_deref(), config.policy())
                    .await;
            }
        }
    }
}

/// The checkpoint a stopping hub takes once it has answered its last
/// request: of every entry since the last checkpoint (if any).
pub async fn final_checkpoint(store: &Store, keys: &AuditKeys, config: &AuditConfig) {
    checkpoint_now(
        store,
        keys,
        config.checkpoint_file.as_deref(),
        CheckpointPolicy {
            every_entries: 1,
            every_us: 0,
        },
    )
    .await;
}

/// The entries from `since_seq` on, in order.
pub fn entries(store: &Store, since_seq: i64) -> Result<Vec<Stored>, StoreError> {
    store.audit_entries(since_seq)
}

/// An entry as FHIR R4 AuditEvent.
pub fn audit_event(s: &Stored) -> Json {
    let e = &s.entry;
    let cli = e.actor == "cli";
    let (action, subtype) = match e.action.as_str() {
        "read" => ("R", "read"),
        "create" => ("C", "create"),
        "update" => ("U", "update"),
        "delete" => ("D", "delete"),
        _ => ("E", "operation"),
    };
    let outcome = match e.outcome {
        0..=399 => "0",
        400..=499 => "4",
        _ => "8",
    };
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "id": format!("audit-{}", s.seq),
        "type": if cli {
            json!({ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100",
                    "display": "Application Activity" })
        } else {
            json!({ "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                    "code": "rest", "display": "RESTful Operation" })
        },
        "action": action,
        "recorded": crate::fhir::format_instant(e.time_us),
        "outcome": outcome,
        "outcomeDesc": if cli { "command".to_owned() } else { format!("HTTP {}", e.outcome) },
        "agent": [{
            "who": { "identifier": { "system": "urn:vigil:principal", "value": e.actor } },
            "requestor": true,
        }],
        "source": {
            "observer": { "display": "Vigil cloud-hub" },
            "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                       "code": "4", "display": "Application Server" }],
        },
        "entity": [{ "what": { "display": e.resource } }],
        "extension": [{
            "url": "http://vigil.health/fhir/StructureDefinition/audit-chain",
            "valueString": format!("{}:{}", s.seq, s.hash),
        }],
    });
    if !e.detail.is_empty() {
        ev["entity"][0]["description"] = json!(e.detail);
    }
    if !cli {
        ev["subtype"] =
            json!([{ "system": "http://hl7.org/fhir/restful-interaction", "code": subtype }]);
    }
    let listed: Vec<&String> = if e.patients.is_empty() {
        e.patient.iter().collect()
    } else {
        e.patients.iter().collect()
    };
    for p in listed {
        ev["entity"].as_array_mut().expect("array").push(json!({
            "what": { "reference": format!("Patient/{p}") },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                      "code": "1", "display": "Person" },
        }));
    }
    ev
}

// ---- HTTP middleware -------------------------------------------------------

/// Whether a request path is audited: the FHIR API and the `/api/v1`
/// routes, except gateway ingest (device data in, no patient data out;
/// counted by the ingest metrics).
pub fn audited(path: &str) -> bool {
    (path.starts_with("/fhir") || path.starts_with("/api/v1/"))
        && path != "/api/v1/ingest"
        && path != "/api/v1/alerts/stream"
}

/// The patient a request names: `/patients/{id}`, `/Patient/{id}` or a
/// `patient`/`subject` query parameter.
pub fn patient_of(path: &str, query: Option<&str>) -> Option<String> {
    let mut segs = path.split('/');
    while let Some(s) = segs.next() {
        if s == "patients" || s == "Patient" {
            if let Some(id) = segs
                .next()
                .filter(|id| !id.is_empty() && !id.starts_with('$'))
            {
                return Some(id.to_owned());
            }
        }
    }
    let q = query?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        matches!(k, "patient" | "subject")
            .then(|| v.trim_start_matches("Patient/").to_owned())
            .filter(|v| !v.is_empty())
    })
}

/// The principal of a request: a fingerprint of its bearer token (never
/// the token), or `anonymous`.
pub fn actor_of(headers: &axum::http::HeaderMap) -> String {
    fingerprint(headers.get(axum::http::header::AUTHORIZATION))
}

/// `bearer:<16 hex of SHA-256>` of an `Authorization: Bearer` value, or
/// `anonymous`.
fn fingerprint(authorization: Option<&axum::http::HeaderValue>) -> String {
    let token = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token {
        Some(t) if !t.is_empty() => {
            let d = digest::digest(&digest::SHA256, t.as_bytes());
            format!("bearer:{}", &hex::encode(d)[..16])
        }
        _ => "anonymous".into(),
    }
}

fn action_of(method: &axum::http::Method, path: &str) -> &'static str {
    use axum::http::Method;
    if path.ends_with("/acknowledge") || path.contains("/$") {
        return "execute";
    }
    match *method {
        Method::GET | Method::HEAD => "read",
        Method::POST => "create",
        Method::PUT | Method::PATCH => "update",
        Method::DELETE => "delete",
        _ => "execute",
    }
}

/// The patients whose data a response carries, for its audit entry: a
/// handler whose response names patients that its path and query do not
/// (a read by observation id, a search without `patient`, the ward
/// overview, occupancy, an export file) inserts this as a response
/// extension.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditPatients(pub BTreeSet<String>);

/// `resp` with the patients whose data it carries (see [`AuditPatients`]).
pub fn with_patients<I: IntoIterator<Item = String>>(mut resp: Response, ids: I) -> Response {
    resp.extensions_mut()
        .insert(AuditPatients(ids.into_iter().collect()));
    resp
}

/// What the audit middleware needs.
#[derive(Debug, Clone)]
pub struct AuditState {
    pub store: crate::store::Store,
    pub metrics: crate::SharedMetrics,
    /// The audit keys (empty: unkeyed chain).
    pub keys: AuditKeys,
    /// The group commit of the middleware's entries (started on first use).
    pub writer: GroupCommit,
}

impl AuditState {
    pub fn new(store: crate::store::Store, metrics: crate::SharedMetrics, keys: AuditKeys) -> Self {
        Self {
            store,
            metrics,
            keys,
            writer: GroupCommit::default(),
        }
    }
}

/// The most entries one group commit writes (more wait for the next one).
pub const GROUP_COMMIT_MAX: usize = 256;

type Waiter = tokio::sync::oneshot::Sender<Result<i64, String>>;

/// Group commit of audit entries: one writer task takes every entry queued
/// while the previous commit ran, plus those that requests already running
/// queue while it yields once to the scheduler (up to
/// [`GROUP_COMMIT_MAX`]), and appends them in order in one transaction
/// (`AuditStore::append_audit_batch`: each chained to the one before,
/// keyed as usual), then tells each waiter its seq, or the error that
/// failed the whole group. No timer: the
/// window is the duration of the commit before, so a lone request waits
/// for its own commit only. One commit at a time per hub process; across
/// processes the backend serializes (SQLite's write lock, PostgreSQL's
/// advisory lock). The task ends when the last handle is dropped (after
/// the server stopped and its in-flight requests got their entries).
#[derive(Debug, Clone, Default)]
pub struct GroupCommit {
    queue: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<(Entry, Waiter)>>>,
    commits: Arc<std::sync::atomic::AtomicU64>,
}

impl GroupCommit {
    /// Appends `entry` with the next group commit; returns its seq once the
    /// transaction holding it has committed. The first call starts the
    /// writer task with its `store` and `keys`, which it keeps: one
    /// `GroupCommit` serves one store (as `AuditState` holds it).
    pub async fn append(
        &self,
        store: &Store,
        keys: &AuditKeys,
        entry: Entry,
    ) -> Result<i64, String> {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(run_group_commits(
                store.clone(),
                keys.clone(),
                rx,
                self.commits.clone(),
            ));
            tx
        });
        let (done, wait) = tokio::sync::oneshot::channel();
        queue
            .send((entry, done))
            .map_err(|_| "the audit writer has stopped".to_owned())?;
        wait.await
            .unwrap_or_else(|_| Err("the audit writer has stopped".to_owned()))
    }

    /// Transactions committed so far (each holding one or more entries).
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn run_group_commits(
    store: Store,
    keys: AuditKeys,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Entry, Waiter)>,
    commits: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut group = Vec::with_capacity(GROUP_COMMIT_MAX);
    while rx.recv_many(&mut group, GROUP_COMMIT_MAX).await > 0 {
        // One turn of the scheduler before the group closes: requests
        // already running reach their entries and join this commit
        // instead of paying for the next one. No timer: with nothing else
        // to run, the yield returns at once.
        tokio::task::yield_now().await;
        while group.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(e) => group.push(e),
                Err(_) => break,
            }
        }
        let (entries, waiters): (Vec<Entry>, Vec<Waiter>) = group.drain(..).unzip();
        let (s, k) = (store.clone(), keys.clone());
        let result =
            tokio::task::spawn_blocking(move || s.append_audit_batch(&entries, k.current())).await;
        match result {
            Ok(Ok(seqs)) if seqs.len() == waiters.len() => {
                commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for (w, seq) in waiters.into_iter().zip(seqs) {
                    let _ = w.send(Ok(seq));
                }
            }
            other => {
                let error = match other {
                    Ok(Ok(seqs)) => format!(
                        "the audit store returned {} seqs for {} entries",
                        seqs.len(),
                        waiters.len()
                    ),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                for w in waiters {
                    let _ = w.send(Err(error.clone()));
                }
            }
        }
    }
}

/// The answer when an audited response cannot be audited.
fn audit_unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, HeaderValue::from_static("5"))],
        axum::Json(json!({
            "error": "the audit log cannot be written: the response is withheld (the request \
                      may have been carried out); retry later"
        })),
    )
        .into_response()
}

/// Records each audited request after its handler answered and before the
/// answer leaves the hub, with the patients whose data went out (the
/// handler's [`AuditPatients`], else the patient its path or query names).
/// Fail closed: when the entry cannot be written the response is dropped
/// and the client gets 503 with `Retry-After`; the failure is logged and
/// counted (`vigil_hub_audit_failures_total`).
pub(crate) async fn middleware(State(st): State<AuditState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if !audited(&path) {
        return next.run(req).await;
    }
    let query = req.uri().query().map(str::to_owned);
    let time_us = now_us();
    let action = action_of(req.method(), &path);
    let authorization = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .cloned();
    let resp = next.run(req).await;
    // The principal the access layer authenticated (or the login that
    // succeeded); otherwise the token fingerprint or `anonymous`.
    let actor = match resp.extensions().get::<crate::access::Principal>() {
        Some(p) => p.id.clone(),
        None => fingerprint(authorization.as_ref()),
    };
    let mut entry = Entry {
        time_us,
        actor,
        action: action.into(),
        patient: patient_of(&path, query.as_deref()),
        patients: Vec::new(),
        resource: path,
        outcome: resp.status().as_u16(),
        detail: query.unwrap_or_default(),
    };
    if let Some(AuditPatients(ids)) = resp.extensions().get::<AuditPatients>() {
        entry.set_patients(ids.clone());
    }
    let failed = match st.writer.append(&st.store, &st.keys, entry).await {
        Ok(_) => return resp,
        Err(e) => e,
    };
    st.metrics.audit_failure();
    tracing::error!(
        error = %failed,
        "writing an audit log entry failed: the response is withheld (503)"
    );
    audit_unavailable()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_described_without_secrets() {
        assert_eq!(
            patient_of("/api/v1/patients/MRN-1/scores", None).as_deref(),
            Some("MRN-1")
        );
        assert_eq!(patient_of("/fhir/Patient/p7", None).as_deref(), Some("p7"));
        assert_eq!(
            patient_of("/fhir/Observation", Some("code=1&patient=Patient/p9")).as_deref(),
            Some("p9")
        );
        assert_eq!(patient_of("/fhir/Patient/$export", None), None);
        assert_eq!(patient_of("/fhir/Observation", Some("code=1")), None);
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(actor_of(&h), "anonymous");
        h.insert("authorization", "Bearer s3cret-token".parse().unwrap());
        let a = actor_of(&h);
        assert!(a.starts_with("bearer:") && a.len() == 7 + 16 && !a.contains("s3cret"));
        assert!(audited("/fhir/Observation") && audited("/api/v1/beds"));
        assert!(!audited("/api/v1/ingest") && !audited("/metrics") && !audited("/healthz"));
    }

    /// Checkpoints are read from the hub's checkpoint file and from its JSON
    /// log lines alike; other log lines are skipped, a damaged checkpoint
    /// is an error naming its line.
    #[test]
    fn checkpoints_are_read_from_the_file_and_from_json_log_lines() {
        let key = AuditKey::new(&[3; 32]).unwrap();
        let head = hub_domain::audit::Head {
            seq: 4,
            hash: "ab".repeat(32),
            key_id: Some(key.id().to_owned()),
        };
        let cp = Checkpoint::sign(&key, &head, 1_000);
        let log = json!({
            "timestamp": "2026-12-06T18:00:00Z",
            "level": "INFO",
            "target": CHECKPOINT_TARGET,
            "fields": { "message": "audit log checkpoint", "seq": 4, "checkpoint": cp.to_line() },
        });
        let other = json!({ "level": "INFO", "fields": { "message": "hub serving" } });
        let text = format!("{}\n\n{log}\n{other}\n", cp.to_line());
        assert_eq!(
            parse_checkpoints(&text).unwrap(),
            vec![cp.clone(), cp.clone()]
        );
        let mut bad = cp.to_line();
        bad.truncate(bad.len() - 2);
        let err = parse_checkpoints(&format!("{}\n{bad}\n", cp.to_line())).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        let mut set = Entry {
            time_us: 0,
            actor: "a".into(),
            action: "read".into(),
            resource: "/fhir/Observation".into(),
            patient: None,
            patients: Vec::new(),
            outcome: 200,
            detail: String::new(),
        };
        set.set_patients(["p-2".to_owned(), "p-1".to_owned()].into());
        let ev = audit_event(&Stored {
            seq: 1,
            entry: set,
            prev_hash: GENESIS.into(),
            hash: GENESIS.into(),
            key_id: None,
        });
        assert_eq!(ev["entity"][1]["what"]["reference"], "Patient/p-1");
        assert_eq!(ev["entity"][2]["what"]["reference"], "Patient/p-2");
    }
}
