//! The encrypted store-and-forward buffer (sled + AES-256-GCM from ring).
//!
//! # Layout
//! One sled tree, `buffer`, with two key spaces:
//! - `r` + record id (u64 big-endian): one record per driver output (the
//!   readings of one device from one frame). Value:
//!   `[version=1][key id: 4][reading count: u32 BE][nonce: 12][ciphertext+tag]`.
//!   The plaintext is a protobuf `DeviceData` (device id, serial, readings
//!   with their assigned sequences). The AAD is the record key plus the
//!   header, so a record cannot be moved to another key or have its header
//!   altered without failing authentication.
//! - `m` + name: counters (`m/next_record`, `m/batch_seq`, `m/seq/<device>`,
//!   `m/nonce/<key id>`, `m/dropped_unreported`, `m/gw_event_seq`) and the
//!   buffer's incarnation (`m/incarnation`). Counters carry no patient data
//!   and are not encrypted.
//!
//! # Incarnation
//! A buffer created afresh (its tree is empty: first start, lost or wiped
//! data directory, reinstall) draws a random incarnation in 1..=2^63-1
//! (ring's `SystemRandom`) and stores it, durably, before anything else;
//! it is kept for the buffer's life and travels in every batch
//! (`Batch.incarnation`). All sequences (batch, per device, gateway events)
//! start at 1 in a new buffer, so the hub tells them from an earlier
//! buffer's by the incarnation. A buffer an older agent created (counters
//! but no incarnation) keeps incarnation 0 for its whole life: its
//! sequences continue the ones the hub already has.
//!
//! A second tree, `quarantine`, receives records that fail authentication or
//! decoding under a key the buffer has; they are counted, never retried,
//! never block the rest.
//!
//! # Missing keys
//! A record sealed under a key the keyring does not hold (the key file was
//! lost or replaced) is *locked*: it is not corrupt, so it is neither
//! quarantined nor sent nor counted as pending; it stays in place and is
//! delivered as soon as the buffer is opened with its key again
//! ([`Buffer::locked`]). It still counts towards the bound.
//!
//! # Keys and rotation
//! Records name the key they were sealed with (first 4 bytes of the key's
//! SHA-256). The buffer opens with a [`Keyring`]: the current key seals new
//! records; retired keys only open old ones. `edge-agent rotate-key` makes a
//! new current key and retires the old one; a retired key file is deleted
//! once no stored record needs it ([`Buffer::keys_in_use`]).
//!
//! # Bound and overflow
//! The sum of stored record sizes is kept below `max_bytes`. On disk, sled
//! adds a roughly constant overhead for its log segments (measured: ~7 MiB
//! over 2 MiB of live records, not growing under churn), so the file size is
//! bounded by `max_bytes` + that overhead. When a new record would exceed the
//! bound, the policy decides: `drop-oldest` (default) deletes the oldest
//! records in the same atomic batch that adds the new one, counts the dropped
//! items and keeps the count (durably) until it has been reported to the hub
//! as a BUFFER_OVERFLOW gateway event; `refuse-new` refuses the new record
//! ([`BufferError::Full`]), leaving what is stored untouched.
//!
//! # Nonces
//! The 96-bit GCM nonce is 4 zero bytes then a 64-bit counter per key. The
//! counter is *reserved* in blocks: before any nonce of a block is used, the
//! block's end is written to `m/nonce/<key id>` and flushed to disk. After any
//! crash the agent resumes at the persisted end, which is past every nonce
//! it could have used. Hence a (key, nonce) pair is never used twice, across
//! restarts, kill -9 and power loss (given a disk that honours fsync).
//!
//! # Storage failures
//! A write that fails (disk full, I/O error) is counted
//! ([`Buffer::write_errors_total`]) and makes the buffer *not writable*
//! ([`Buffer::writable`]) until [`Buffer::recover`] succeeds. Measured with
//! sled 0.34 on a full tmpfs: after one ENOSPC every later write fails,
//! even once space is back, while reads still work; dropping the database
//! and opening it again gives a working database holding every record that
//! was accepted. So `recover` reopens the store, recounts it from disk and
//! writes a probe; it is retried (the agent does so every few seconds)
//! until the disk takes writes again. The failure period (first and last
//! time, failed writes, items the agent refused meanwhile) is stored with
//! the probe and kept until reported to the hub as a BUFFER_WRITE_FAILED
//! gateway event ([`Buffer::write_failure_unreported`]). A record whose
//! batch failed is not accepted; the caller keeps it and retries, or
//! counts it with [`Buffer::refuse_io`].
//!
//! # Durability
//! [`Buffer::append`] returns only after `flush_async` has made the records,
//! the per-device sequence counters and the record counter durable in one
//! atomic sled batch. A reading counts as *accepted* then, and survives kill
//! -9 and power loss. Readings still in the driver→writer channel when the
//! process dies were not accepted (the device line is simply read again if
//! it is still in the serial buffer, or lost like any line sent while the
//! agent is down).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use device_drivers::DriverOutput;
use prost::Message;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use shared_protocol::v1::{DeviceData, DeviceInfo};

/// sled page cache of the buffer (bounds the agent's memory with a long
/// backlog; see `docs/agent.md`, Benchmarks).
pub const BUFFER_CACHE_BYTES: u64 = 16 * 1024 * 1024;

const VERSION: u8 = 1;
const HEADER: usize = 1 + 4 + 4 + 12;
/// Stored record size minus its plaintext: header and GCM tag.
const RECORD_OVERHEAD: u64 = HEADER as u64 + 16;
const NONCE_BLOCK: u64 = 1 << 16;

/// A device-clock time further than this from the gateway's receive time is
/// flagged CLOCK_SKEW (the time is kept as the device sent it).
pub const CLOCK_SKEW_LIMIT_US: i64 = 5 * 60 * 1_000_000;

/// Flag readings whose device-clock time disagrees with the gateway receive
/// time by more than [`CLOCK_SKEW_LIMIT_US`].
pub fn flag_clock_skew(readings: &mut [shared_protocol::v1::Reading]) {
    use shared_protocol::v1::{QualityFlag, TimeSource};
    for r in readings {
        let device_clock = matches!(
            TimeSource::try_from(r.time_source),
            Ok(TimeSource::DeviceClockSynced | TimeSource::DeviceClockUnsynced)
        );
        let skewed = r.device_time_us != 0
            && r.gateway_time_us != 0
            && (r.device_time_us - r.gateway_time_us).abs() > CLOCK_SKEW_LIMIT_US;
        let flag = QualityFlag::ClockSkew as i32;
        if device_clock && skewed && !r.flags.contains(&flag) {
            r.flags.push(flag);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("encryption failed")]
    Seal,
    #[error("nonce space exhausted for the current key; rotate the key")]
    NonceExhausted,
    #[error("buffer full ({pending_bytes} of {max_bytes} bytes); overflow policy refuse-new")]
    Full { pending_bytes: u64, max_bytes: u64 },
    #[error("a record of {0} bytes can never fit in the buffer bound")]
    TooLarge(u64),
    #[error("buffer storage is being reopened after a write failure")]
    Unavailable,
    #[error("the system random number generator failed")]
    Random,
}

impl BufferError {
    /// A storage failure (disk full, I/O error): the buffer is not writable
    /// until [`Buffer::recover`] reopens it.
    pub fn is_storage(&self) -> bool {
        matches!(self, BufferError::Storage(_) | BufferError::Unavailable)
    }
}

/// What to do when a new record would exceed the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Delete the oldest records to make room; count and report them.
    #[default]
    DropOldest,
    /// Refuse the new record; keep what is stored.
    RefuseNew,
}

/// Bound of the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Maximum sum of stored record sizes, bytes.
    pub max_bytes: u64,
    pub overflow: OverflowPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1 << 30,
            overflow: OverflowPolicy::DropOldest,
        }
    }
}

/// The keys the buffer may use: the current one seals, all of them open.
#[derive(Debug, Clone)]
pub struct Keyring {
    pub current: [u8; 32],
    pub retired: Vec<[u8; 32]>,
}

impl Keyring {
    pub fn single(key: [u8; 32]) -> Self {
        Keyring {
            current: key,
            retired: Vec::new(),
        }
    }
}

/// The 4-byte id a record carries for the key that sealed it.
pub fn key_id(key: &[u8; 32]) -> [u8; 4] {
    let d = digest::digest(&digest::SHA256, key);
    let mut id = [0u8; 4];
    id.copy_from_slice(&d.as_ref()[..4]);
    id
}

/// Readings + waveforms + technical readings in a record (each one item
/// with its own sequence number and its own count in the hub's ack).
pub fn items(d: &DeviceData) -> usize {
    d.readings.len() + d.waveforms.len() + d.technical.len()
}

/// Items in one driver output (as [`items`] counts them once stored).
pub fn items_of(o: &DriverOutput) -> usize {
    o.readings.len() + o.waveforms.len() + o.technical.len()
}

/// A decrypted record waiting to be sent.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub key: sled::IVec,
    pub data: DeviceData,
    /// Stored size, bytes.
    pub size: u64,
}

impl StoredRecord {
    /// The record's id (its position in arrival order).
    pub fn id(&self) -> u64 {
        record_id(&self.key).unwrap_or(0)
    }
}

#[derive(Debug, Default)]
struct NonceState {
    next: u64,
    reserved_end: u64,
}

/// The open sled database and its trees (replaced when the buffer reopens
/// after a write failure).
#[derive(Debug, Clone)]
struct Store {
    db: sled::Db,
    tree: sled::Tree,
    quarantine: sled::Tree,
}

impl Store {
    fn open(dir: &Path) -> Result<Self, sled::Error> {
        let db = sled::Config::new()
            .path(dir.join("buffer.sled"))
            .mode(sled::Mode::HighThroughput)
            // sled's page cache defaults to 1 GiB, which a long backlog
            // fills (≈ 750 MB RSS with a 24 h backlog of 16 devices); the
            // buffer reads records once, oldest first, so a small cache
            // costs little.
            .cache_capacity(BUFFER_CACHE_BYTES)
            .open()?;
        let tree = db.open_tree("buffer")?;
        let quarantine = db.open_tree("quarantine")?;
        Ok(Store {
            db,
            tree,
            quarantine,
        })
    }
}

/// A period during which the buffer could not write (see the module docs,
/// "Storage failures").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WriteFailure {
    /// When the first write failed and when writing worked again, UTC µs
    /// (`until_us` is 0 while it still fails).
    pub since_us: i64,
    pub until_us: i64,
    /// Failed writes.
    pub errors: u64,
    /// Items the agent refused meanwhile (see [`Buffer::refuse_io`]).
    pub refused: u64,
}

impl WriteFailure {
    fn encode(&self) -> [u8; 32] {
        let mut v = [0u8; 32];
        v[..8].copy_from_slice(&self.since_us.to_be_bytes());
        v[8..16].copy_from_slice(&self.until_us.to_be_bytes());
        v[16..24].copy_from_slice(&self.errors.to_be_bytes());
        v[24..].copy_from_slice(&self.refused.to_be_bytes());
        v
    }
    fn decode(v: &[u8]) -> Option<Self> {
        let f = |i: usize| <[u8; 8]>::try_from(v.get(i..i + 8)?).ok();
        (v.len() == 32).then_some(())?;
        Some(WriteFailure {
            since_us: i64::from_be_bytes(f(0)?),
            until_us: i64::from_be_bytes(f(8)?),
            errors: u64::from_be_bytes(f(16)?),
            refused: u64::from_be_bytes(f(24)?),
        })
    }
}

fn now_us() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// The buffer. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Buffer {
    dir: PathBuf,
    /// None only while [`Buffer::recover`] reopens it (or failed to).
    store: RwLock<Option<Store>>,
    sealer: LessSafeKey,
    key_id: [u8; 4],
    openers: HashMap<[u8; 4], LessSafeKey>,
    limits: Limits,
    nonce: Mutex<NonceState>,
    /// Writer-side state (sequence caches), one writer at a time.
    write: tokio::sync::Mutex<HashMap<String, u64>>,
    pending_readings: AtomicU64,
    pending_records: AtomicU64,
    pending_bytes: AtomicU64,
    quarantined: AtomicU64,
    dropped_total: AtomicU64,
    refused_total: AtomicU64,
    /// Records (and their items) sealed under a key not in the keyring.
    locked_records: AtomicU64,
    locked_items: AtomicU64,
    /// Ids of the missing keys found at open.
    missing_keys: Vec<[u8; 4]>,
    /// Storage failures: failed writes, items refused because of them,
    /// and the failure in progress (None while writes work).
    write_errors: AtomicU64,
    refused_io: AtomicU64,
    failing: Mutex<Option<(WriteFailure, String)>>,
    /// See the module docs (0: a buffer created by an agent without
    /// incarnations).
    incarnation: u64,
}

/// The incarnation of the buffer in `tree`: the stored one; else, for an
/// empty tree (a buffer created afresh), a new random one, stored and
/// flushed; else (a buffer an older agent created) 0.
fn incarnation_of(tree: &sled::Tree) -> Result<u64, BufferError> {
    let k = meta_key("incarnation");
    if let Some(v) = tree.get(&k)? {
        return Ok(<[u8; 8]>::try_from(v.as_ref()).map_or(0, u64::from_be_bytes));
    }
    if !tree.is_empty() {
        return Ok(0);
    }
    let rng = SystemRandom::new();
    let incarnation = loop {
        let mut b = [0u8; 8];
        rng.fill(&mut b).map_err(|_| BufferError::Random)?;
        // 1..=2^63-1: the hub stores it in a signed 64-bit column.
        let v = u64::from_be_bytes(b) & (i64::MAX as u64);
        if v != 0 {
            break v;
        }
    };
    tree.insert(k, &incarnation.to_be_bytes())?;
    tree.flush()?;
    Ok(incarnation)
}

/// Records sealed under keys the buffer does not have (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Locked {
    pub records: u64,
    pub items: u64,
    /// Ids of the missing keys (first 4 bytes of each key's SHA-256).
    pub key_ids: Vec<[u8; 4]>,
}

fn header_key_id(v: &[u8]) -> Option<[u8; 4]> {
    (v.len() >= 5).then(|| <[u8; 4]>::try_from(&v[1..5]).expect("4 bytes"))
}

fn record_key(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'r';
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn record_id(key: &[u8]) -> Option<u64> {
    (key.len() == 9 && key[0] == b'r')
        .then(|| u64::from_be_bytes(key[1..].try_into().expect("8 bytes")))
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut k = b"m/".to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn get_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, sled::Error> {
    Ok(tree
        .get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

fn header_count(v: &[u8]) -> u64 {
    if v.len() >= HEADER {
        u64::from(u32::from_be_bytes(v[5..9].try_into().expect("4 bytes")))
    } else {
        0
    }
}

fn aead_key(key: &[u8; 32]) -> Result<LessSafeKey, BufferError> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&aead::AES_256_GCM, key).map_err(|_| BufferError::Seal)?,
    ))
}

impl Buffer {
    /// Open (or create) the buffer in `dir` with one key and default limits.
    pub fn open(dir: &Path, key: &[u8; 32]) -> Result<Self, BufferError> {
        Self::open_with(dir, &Keyring::single(*key), Limits::default())
    }

    /// Open (or create) the buffer in `dir`.
    pub fn open_with(dir: &Path, keys: &Keyring, limits: Limits) -> Result<Self, BufferError> {
        let store = Store::open(dir)?;
        let incarnation = incarnation_of(&store.tree)?;
        let mut openers = HashMap::new();
        for k in keys.retired.iter().chain(std::iter::once(&keys.current)) {
            openers.insert(key_id(k), aead_key(k)?);
        }
        let quarantined = AtomicU64::new(store.quarantine.len() as u64);
        let buf = Buffer {
            dir: dir.to_path_buf(),
            store: RwLock::new(Some(store)),
            sealer: aead_key(&keys.current)?,
            key_id: key_id(&keys.current),
            openers,
            limits,
            nonce: Mutex::new(NonceState::default()),
            write: tokio::sync::Mutex::new(HashMap::new()),
            pending_readings: AtomicU64::new(0),
            pending_records: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            quarantined,
            dropped_total: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            locked_records: AtomicU64::new(0),
            locked_items: AtomicU64::new(0),
            missing_keys: Vec::new(),
            write_errors: AtomicU64::new(0),
            refused_io: AtomicU64::new(0),
            failing: Mutex::new(None),
            incarnation,
        };
        let mut buf = buf;
        let missing = buf.load_counts()?;
        buf.missing_keys = missing;
        Ok(buf)
    }

    /// The open store, or [`BufferError::Unavailable`] while it is being
    /// reopened.
    fn s(&self) -> Result<Store, BufferError> {
        self.store
            .read()
            .expect("store lock")
            .clone()
            .ok_or(BufferError::Unavailable)
    }

    /// Note a failed write: the buffer is failing until [`recover`](Self::recover).
    fn note<T>(&self, r: Result<T, sled::Error>) -> Result<T, BufferError> {
        r.map_err(|e| {
            self.write_errors.fetch_add(1, Ordering::Relaxed);
            let mut f = self.failing.lock().expect("failing lock");
            match f.as_mut() {
                Some((w, last)) => {
                    w.errors += 1;
                    *last = e.to_string();
                }
                None => {
                    tracing::error!(error = %e, "buffer write failed; the buffer is not writable until its storage recovers");
                    *f = Some((
                        WriteFailure {
                            since_us: now_us(),
                            errors: 1,
                            ..Default::default()
                        },
                        e.to_string(),
                    ));
                }
            }
            BufferError::Storage(e)
        })
    }

    /// Resume the nonce counter and count what is stored (at open and
    /// reopen); returns the ids of keys the records need but the keyring
    /// lacks.
    fn load_counts(&self) -> Result<Vec<[u8; 4]>, BufferError> {
        let s = self.s()?;
        // Resume the nonce counter past everything reserved before (and
        // past anything used in this process).
        {
            let mut n = self.nonce.lock().expect("nonce lock");
            n.next = get_u64(&s.tree, &self.nonce_meta_key())?.max(n.next);
            n.reserved_end = n.next;
        }
        // Count what is pending from the headers alone (no decryption);
        // records under a key this keyring lacks are locked, not pending.
        let (mut recs, mut readings, mut bytes) = (0u64, 0u64, 0u64);
        let (mut locked_recs, mut locked_items) = (0u64, 0u64);
        let mut missing = std::collections::BTreeSet::new();
        for item in s.tree.scan_prefix(b"r") {
            let (_, v) = item?;
            bytes += v.len() as u64;
            match header_key_id(&v) {
                Some(kid) if !self.openers.contains_key(&kid) => {
                    locked_recs += 1;
                    locked_items += header_count(&v);
                    missing.insert(kid);
                }
                _ => {
                    recs += 1;
                    readings += header_count(&v);
                }
            }
        }
        self.locked_records.store(locked_recs, Ordering::Relaxed);
        self.locked_items.store(locked_items, Ordering::Relaxed);
        self.pending_records.store(recs, Ordering::Relaxed);
        self.pending_readings.store(readings, Ordering::Relaxed);
        self.pending_bytes.store(bytes, Ordering::Relaxed);
        self.quarantined
            .store(s.quarantine.len() as u64, Ordering::Relaxed);
        Ok(missing.into_iter().collect())
    }

    /// Whether writes work (false from a failed write until
    /// [`recover`](Self::recover) succeeds).
    pub fn writable(&self) -> bool {
        self.failing.lock().expect("failing lock").is_none()
    }

    /// The failure in progress and its last error, if writes fail.
    pub fn write_failure(&self) -> Option<(WriteFailure, String)> {
        self.failing.lock().expect("failing lock").clone()
    }

    /// Failed buffer writes since start.
    pub fn write_errors_total(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// Items refused because the buffer could not write, since start.
    pub fn refused_io_total(&self) -> u64 {
        self.refused_io.load(Ordering::Relaxed)
    }

    /// Count `n` items the agent gave up on because the buffer could not
    /// write (held too long or too many while it failed).
    pub fn refuse_io(&self, n: u64) {
        self.refused_io.fetch_add(n, Ordering::Relaxed);
        if let Some((w, _)) = self.failing.lock().expect("failing lock").as_mut() {
            w.refused += n;
        }
    }

    /// After a failed write, reopen the store and check that it writes
    /// again (sled 0.34 keeps failing every write after an I/O error such
    /// as ENOSPC, even once space is back; a reopened database works and
    /// has every record that was accepted). Blocking (up to ~2 s waiting
    /// for the old database's file lock); call it from a blocking thread.
    /// Returns whether the buffer is writable. On success the failure is
    /// stored for the hub (see [`write_failure_unreported`](Self::write_failure_unreported)).
    pub fn recover(&self) -> Result<bool, BufferError> {
        if self.writable() {
            return Ok(true);
        }
        // Close the failed database: every handle must go before sled's
        // file lock is released.
        drop(self.store.write().expect("store lock").take());
        let mut store = None;
        let mut last = None;
        for _ in 0..100 {
            match Store::open(&self.dir) {
                Ok(s) => {
                    store = Some(s);
                    break;
                }
                Err(e) => {
                    let lock = matches!(&e, sled::Error::Io(io) if io.to_string().contains("lock"));
                    last = Some(e);
                    if !lock {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        let Some(store) = store else {
            let e = last.expect("an error when not opened");
            tracing::warn!(error = %e, "reopening the buffer failed; retrying later");
            return self.note(Err(e));
        };
        *self.store.write().expect("store lock") = Some(store.clone());
        // Sequences and counts come from disk again.
        self.write.try_lock().map(|mut m| m.clear()).ok();
        self.load_counts()?;
        // Does it write? Store the failure for the hub in the same write.
        let Some((mut failure, _)) = self.write_failure() else {
            return Ok(true);
        };
        failure.until_us = now_us();
        let k = meta_key("write_failure");
        let mut report = failure.clone();
        if let Some(prev) = store.tree.get(&k)?.and_then(|v| WriteFailure::decode(&v)) {
            report.since_us = prev.since_us;
            report.errors += prev.errors;
            report.refused += prev.refused;
        }
        self.note(store.tree.insert(&k, &report.encode()))?;
        self.note(store.tree.flush())?;
        // Failures noted while probing belong to this period too.
        let mut f = self.failing.lock().expect("failing lock");
        let (now, _) = f.take().expect("still failing");
        tracing::warn!(
            failed_for_s = (failure.until_us - failure.since_us) / 1_000_000,
            write_errors = now.errors,
            refused = now.refused,
            pending_items = self.pending_readings(),
            "buffer storage recovered; writing again"
        );
        Ok(true)
    }

    /// A storage failure the buffer recovered from, not yet reported to the
    /// hub (periods since the last report merged).
    pub fn write_failure_unreported(&self) -> Result<Option<WriteFailure>, BufferError> {
        Ok(self
            .s()?
            .tree
            .get(meta_key("write_failure"))?
            .and_then(|v| WriteFailure::decode(&v)))
    }

    /// The failure `reported` has reached the hub: forget it (unless
    /// another one was merged into it meanwhile).
    pub async fn mark_write_failure_reported(
        &self,
        reported: &WriteFailure,
    ) -> Result<(), BufferError> {
        let s = self.s()?;
        let _w = self.write.lock().await;
        let _ = self.note(s.tree.compare_and_swap(
            meta_key("write_failure"),
            Some(&reported.encode()[..]),
            None::<&[u8]>,
        ))?;
        self.note(s.tree.flush_async().await)?;
        Ok(())
    }

    fn nonce_meta_key(&self) -> Vec<u8> {
        meta_key(&format!("nonce/{}", hex::encode(self.key_id)))
    }

    /// Take the next nonce, reserving (durably) a new block when needed.
    fn next_nonce(&self, tree: &sled::Tree) -> Result<[u8; 12], BufferError> {
        let mut n = self.nonce.lock().expect("nonce lock");
        if n.next >= n.reserved_end {
            let end = n
                .next
                .checked_add(NONCE_BLOCK)
                .ok_or(BufferError::NonceExhausted)?;
            self.note(tree.insert(self.nonce_meta_key(), &end.to_be_bytes()))?;
            self.note(tree.flush())?;
            n.reserved_end = end;
        }
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.next.to_be_bytes());
        n.next += 1;
        Ok(nonce)
    }

    fn seal(
        &self,
        tree: &sled::Tree,
        key: &[u8; 9],
        count: u32,
        plaintext: Vec<u8>,
    ) -> Result<Vec<u8>, BufferError> {
        let nonce = self.next_nonce(tree)?;
        let mut header = Vec::with_capacity(HEADER);
        header.push(VERSION);
        header.extend_from_slice(&self.key_id);
        header.extend_from_slice(&count.to_be_bytes());
        header.extend_from_slice(&nonce);
        let mut aad = key.to_vec();
        aad.extend_from_slice(&header[..9]);
        let mut in_out = plaintext;
        self.sealer
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut in_out,
            )
            .map_err(|_| BufferError::Seal)?;
        header.extend_from_slice(&in_out);
        Ok(header)
    }

    fn open_record(&self, key: &[u8], value: &[u8]) -> Result<DeviceData, &'static str> {
        if value.len() < HEADER + aead::AES_256_GCM.tag_len() {
            return Err("record too short");
        }
        if value[0] != VERSION {
            return Err("unknown record version");
        }
        let kid: [u8; 4] = value[1..5].try_into().expect("4 bytes");
        let opener = self
            .openers
            .get(&kid)
            .ok_or("record sealed under a key this buffer does not have")?;
        let nonce: [u8; 12] = value[9..21].try_into().expect("12 bytes");
        let mut aad = key.to_vec();
        aad.extend_from_slice(&value[..9]);
        let mut ct = value[HEADER..].to_vec();
        let plain = opener
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut ct,
            )
            .map_err(|_| "authentication failed")?;
        DeviceData::decode(&*plain).map_err(|_| "plaintext is not a DeviceData")
    }

    /// Durably accept driver outputs: assign each item its per-device
    /// sequence, encrypt, make room per the overflow policy, write
    /// atomically, flush. Returns the number of items accepted.
    pub async fn append(&self, outputs: Vec<DriverOutput>) -> Result<usize, BufferError> {
        let mut seqs = self.write.lock().await;
        let st = self.s()?;
        let mut batch = sled::Batch::default();
        let mut next_record = get_u64(&st.tree, &meta_key("next_record"))?;
        let mut touched: HashMap<String, u64> = HashMap::new();
        let (mut n_items, mut n_records, mut n_bytes) = (0usize, 0u64, 0u64);
        for out in outputs {
            if out.is_empty() {
                continue;
            }
            let seq = match touched
                .get(&out.device_id)
                .or_else(|| seqs.get(&out.device_id))
            {
                Some(s) => *s,
                None => get_u64(&st.tree, &meta_key(&format!("seq/{}", out.device_id)))?,
            };
            let mut last = seq;
            let mut next = || {
                last += 1;
                last
            };
            let mut readings = out.readings;
            flag_clock_skew(&mut readings);
            readings.iter_mut().for_each(|r| r.sequence = next());
            let mut waveforms = out.waveforms;
            waveforms.iter_mut().for_each(|w| w.sequence = next());
            let mut technical = out.technical;
            technical.iter_mut().for_each(|t| t.sequence = next());
            touched.insert(out.device_id.clone(), last);
            let data = DeviceData {
                device: Some(DeviceInfo {
                    device_id: out.device_id,
                    serial_number: out.serial_number.unwrap_or_default(),
                    ..Default::default()
                }),
                readings,
                waveforms,
                technical,
            };
            let count = items(&data) as u32;
            let key = record_key(next_record);
            next_record += 1;
            let sealed = self.seal(&st.tree, &key, count, data.encode_to_vec())?;
            n_bytes += sealed.len() as u64;
            batch.insert(&key[..], sealed);
            n_items += count as usize;
            n_records += 1;
        }
        if n_records == 0 {
            return Ok(0);
        }
        // Room, per the policy. Eviction happens in the same atomic batch.
        let (mut ev_records, mut ev_items, mut ev_bytes) = (0u64, 0u64, 0u64);
        let (mut ev_locked_records, mut ev_locked_items) = (0u64, 0u64);
        let pending = self.pending_bytes.load(Ordering::Relaxed);
        if n_bytes > self.limits.max_bytes {
            self.refused_total
                .fetch_add(n_items as u64, Ordering::Relaxed);
            return Err(BufferError::TooLarge(n_bytes));
        }
        if pending + n_bytes > self.limits.max_bytes {
            match self.limits.overflow {
                OverflowPolicy::RefuseNew => {
                    self.refused_total
                        .fetch_add(n_items as u64, Ordering::Relaxed);
                    return Err(BufferError::Full {
                        pending_bytes: pending,
                        max_bytes: self.limits.max_bytes,
                    });
                }
                OverflowPolicy::DropOldest => {
                    let need = pending + n_bytes - self.limits.max_bytes;
                    for item in st.tree.scan_prefix(b"r") {
                        if ev_bytes >= need {
                            break;
                        }
                        let (k, v) = item?;
                        batch.remove(k);
                        if header_key_id(&v).is_some_and(|kid| !self.openers.contains_key(&kid)) {
                            ev_locked_records += 1;
                            ev_locked_items += header_count(&v);
                        }
                        ev_records += 1;
                        ev_items += header_count(&v);
                        ev_bytes += v.len() as u64;
                    }
                    let unreported = get_u64(&st.tree, &meta_key("dropped_unreported"))? + ev_items;
                    batch.insert(meta_key("dropped_unreported"), &unreported.to_be_bytes());
                }
            }
        }
        for (dev, last) in &touched {
            batch.insert(meta_key(&format!("seq/{dev}")), &last.to_be_bytes());
        }
        batch.insert(meta_key("next_record"), &next_record.to_be_bytes());
        self.note(st.tree.apply_batch(batch))?;
        self.note(st.tree.flush_async().await)?;
        seqs.extend(touched);
        if ev_records > 0 {
            tracing::warn!(
                records = ev_records,
                items = ev_items,
                bytes = ev_bytes,
                "buffer full: oldest records dropped"
            );
            self.dropped_total.fetch_add(ev_items, Ordering::Relaxed);
        }
        self.locked_records
            .fetch_sub(ev_locked_records, Ordering::Relaxed);
        self.locked_items
            .fetch_sub(ev_locked_items, Ordering::Relaxed);
        self.pending_records.fetch_add(n_records, Ordering::Relaxed);
        self.pending_records
            .fetch_sub(ev_records - ev_locked_records, Ordering::Relaxed);
        self.pending_readings
            .fetch_add(n_items as u64, Ordering::Relaxed);
        self.pending_readings
            .fetch_sub(ev_items - ev_locked_items, Ordering::Relaxed);
        self.pending_bytes.fetch_add(n_bytes, Ordering::Relaxed);
        self.pending_bytes.fetch_sub(ev_bytes, Ordering::Relaxed);
        Ok(n_items)
    }

    /// The oldest records, up to about `max_readings` items (at least one
    /// record). Records that fail to decrypt or decode are quarantined.
    pub fn oldest(&self, max_readings: usize) -> Result<Vec<StoredRecord>, BufferError> {
        self.oldest_in(0, u64::MAX, max_readings)
    }

    /// Like [`oldest`](Self::oldest), restricted to record ids in
    /// `from..until` (live-first delivery reads the live and the backlog
    /// ranges separately).
    pub fn oldest_in(
        &self,
        from: u64,
        until: u64,
        max_readings: usize,
    ) -> Result<Vec<StoredRecord>, BufferError> {
        self.oldest_within(from, until, max_readings, u64::MAX)
    }

    /// Like [`oldest_in`](Self::oldest_in), also stopping before the record
    /// that would take the records' plaintext (encoded `DeviceData`) above
    /// `max_plain_bytes` (at least one record), so a batch with a byte limit
    /// decrypts little more than it sends.
    pub fn oldest_within(
        &self,
        from: u64,
        until: u64,
        max_readings: usize,
        max_plain_bytes: u64,
    ) -> Result<Vec<StoredRecord>, BufferError> {
        let mut out = Vec::new();
        let mut readings = 0usize;
        let mut plain = 0u64;
        let st = self.s()?;
        for item in st.tree.range(record_key(from)..record_key(until)) {
            let (k, v) = item?;
            if header_key_id(&v).is_some_and(|kid| !self.openers.contains_key(&kid)) {
                // Locked (its key is missing): kept in place, not sent.
                continue;
            }
            match self.open_record(&k, &v) {
                Ok(data) => {
                    let n = items(&data);
                    let len = data.encoded_len() as u64;
                    if !out.is_empty()
                        && (readings + n > max_readings || plain + len > max_plain_bytes)
                    {
                        break;
                    }
                    readings += n;
                    plain += len;
                    out.push(StoredRecord {
                        key: k,
                        data,
                        size: v.len() as u64,
                    });
                    if readings >= max_readings {
                        break;
                    }
                }
                Err(reason) => self.quarantine_record(&k, &v, reason)?,
            }
        }
        Ok(out)
    }

    /// Age of the oldest waiting item, from its gateway receive time (None
    /// when empty or unreadable).
    pub fn oldest_age_us(&self) -> Option<i64> {
        let rec = self.oldest(1).ok()?.into_iter().next()?;
        let d = &rec.data;
        let t = d
            .readings
            .iter()
            .map(|r| r.gateway_time_us)
            .chain(d.technical.iter().map(|t| t.time_us))
            .chain(d.waveforms.iter().map(|w| w.start_time_us))
            .filter(|t| *t > 0)
            .min()?;
        let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
        Some((now - t).max(0))
    }

    /// Items stored in records with ids in `from..until`, counted from the
    /// plaintext headers (no decryption), stopping once `cap` is reached.
    pub fn items_in(&self, from: u64, until: u64, cap: usize) -> Result<usize, BufferError> {
        Ok(self.waiting_in(from, until, cap, u64::MAX)?.0)
    }

    /// Items and plaintext bytes (encoded `DeviceData`, from the stored
    /// sizes) in records with ids in `from..until`, from the headers (no
    /// decryption), stopping once either cap is reached.
    pub fn waiting_in(
        &self,
        from: u64,
        until: u64,
        cap_items: usize,
        cap_bytes: u64,
    ) -> Result<(usize, u64), BufferError> {
        let (mut n, mut bytes) = (0usize, 0u64);
        for item in self.s()?.tree.range(record_key(from)..record_key(until)) {
            let (_, v) = item?;
            if header_key_id(&v).is_some_and(|kid| !self.openers.contains_key(&kid)) {
                continue;
            }
            n += header_count(&v) as usize;
            bytes += (v.len() as u64).saturating_sub(RECORD_OVERHEAD);
            if n >= cap_items || bytes >= cap_bytes {
                break;
            }
        }
        Ok((n, bytes))
    }

    /// The id the next appended record will get (records below it exist or
    /// existed).
    pub fn next_record_id(&self) -> Result<u64, BufferError> {
        Ok(get_u64(&self.s()?.tree, &meta_key("next_record"))?)
    }

    fn quarantine_record(&self, k: &[u8], v: &[u8], reason: &str) -> Result<(), BufferError> {
        tracing::error!(reason, record = %hex::encode(k), "buffer record quarantined");
        let st = self.s()?;
        self.note(st.quarantine.insert(k, v))?;
        if self.note(st.tree.remove(k))?.is_some() {
            self.pending_records.fetch_sub(1, Ordering::Relaxed);
            self.pending_readings
                .fetch_sub(header_count(v), Ordering::Relaxed);
            self.pending_bytes
                .fetch_sub(v.len() as u64, Ordering::Relaxed);
        }
        self.quarantined.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Delete delivered records (after the hub's ack) and flush. Records
    /// already gone (dropped by the overflow policy meanwhile) are skipped.
    pub async fn remove(&self, records: &[StoredRecord]) -> Result<(), BufferError> {
        let _w = self.write.lock().await;
        let st = self.s()?;
        let mut batch = sled::Batch::default();
        let (mut recs, mut readings, mut bytes, mut evicted) = (0u64, 0u64, 0u64, 0u64);
        for r in records {
            if st.tree.contains_key(&r.key)? {
                batch.remove(r.key.clone());
                recs += 1;
                readings += items(&r.data) as u64;
                bytes += r.size;
            } else {
                // Dropped by the overflow policy while in flight, yet
                // delivered: not lost, so not to be reported as dropped.
                evicted += items(&r.data) as u64;
            }
        }
        if evicted > 0 {
            let k = meta_key("dropped_unreported");
            let left = get_u64(&st.tree, &k)?.saturating_sub(evicted);
            batch.insert(k, &left.to_be_bytes());
            let _ = self
                .dropped_total
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                    Some(d.saturating_sub(evicted))
                });
        }
        self.note(st.tree.apply_batch(batch))?;
        self.note(st.tree.flush_async().await)?;
        self.pending_records.fetch_sub(recs, Ordering::Relaxed);
        self.pending_readings.fetch_sub(readings, Ordering::Relaxed);
        self.pending_bytes.fetch_sub(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The buffer's incarnation (`Batch.incarnation`; 0 for a buffer an
    /// agent without incarnations created).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Allocate the next batch sequence durably: never reused, even after a
    /// crash (a re-sent record travels in a new batch; the hub de-duplicates
    /// readings by identity).
    pub async fn next_batch_sequence(&self) -> Result<u64, BufferError> {
        let st = self.s()?;
        let k = meta_key("batch_seq");
        let next = get_u64(&st.tree, &k)? + 1;
        self.note(st.tree.insert(k, &next.to_be_bytes()))?;
        self.note(st.tree.flush_async().await)?;
        Ok(next)
    }

    /// Items dropped by the overflow policy and not yet reported to the hub.
    pub fn dropped_unreported(&self) -> Result<u64, BufferError> {
        Ok(get_u64(&self.s()?.tree, &meta_key("dropped_unreported"))?)
    }

    /// Record that `n` dropped items have been reported (after the hub's
    /// ack of the batch that carried the report); returns a fresh event
    /// sequence for the next report.
    pub async fn mark_dropped_reported(&self, n: u64) -> Result<(), BufferError> {
        let _w = self.write.lock().await;
        let st = self.s()?;
        let k = meta_key("dropped_unreported");
        let left = get_u64(&st.tree, &k)?.saturating_sub(n);
        self.note(st.tree.insert(k, &left.to_be_bytes()))?;
        self.note(st.tree.flush_async().await)?;
        Ok(())
    }

    /// A gateway-event sequence number, durably allocated (never reused).
    pub async fn next_gateway_event_sequence(&self) -> Result<u64, BufferError> {
        let _w = self.write.lock().await;
        let st = self.s()?;
        let k = meta_key("gw_event_seq");
        let next = get_u64(&st.tree, &k)? + 1;
        self.note(st.tree.insert(k, &next.to_be_bytes()))?;
        self.note(st.tree.flush_async().await)?;
        Ok(next)
    }

    /// Ids of the keys that stored records (including quarantined ones)
    /// were sealed with; a retired key not in this set can be deleted.
    pub fn keys_in_use(&self) -> Result<std::collections::HashSet<[u8; 4]>, BufferError> {
        let mut ids = std::collections::HashSet::new();
        let st = self.s()?;
        for tree in [&st.tree, &st.quarantine] {
            for item in tree.scan_prefix(b"r") {
                let (_, v) = item?;
                if v.len() >= 5 {
                    ids.insert(<[u8; 4]>::try_from(&v[1..5]).expect("4 bytes"));
                }
            }
        }
        Ok(ids)
    }

    pub fn pending_readings(&self) -> u64 {
        self.pending_readings.load(Ordering::Relaxed)
    }
    pub fn pending_records(&self) -> u64 {
        self.pending_records.load(Ordering::Relaxed)
    }
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes.load(Ordering::Relaxed)
    }
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }
    /// Records kept for a missing key (see the module docs).
    pub fn locked(&self) -> Locked {
        Locked {
            records: self.locked_records.load(Ordering::Relaxed),
            items: self.locked_items.load(Ordering::Relaxed),
            key_ids: self.missing_keys.clone(),
        }
    }
    /// Items dropped by `drop-oldest` since this process started.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }
    /// Items refused by `refuse-new` (or too large) since this process started.
    pub fn refused_total(&self) -> u64 {
        self.refused_total.load(Ordering::Relaxed)
    }
    /// Bytes sled occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, BufferError> {
        Ok(self.s()?.db.size_on_disk()?)
    }
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Flush everything (used at shutdown).
    pub async fn flush(&self) -> Result<(), BufferError> {
        let st = self.s()?;
        self.note(st.db.flush_async().await)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_protocol::v1::{Reading, reading::Value};

    /// Reopen in the same process: sled's flusher thread may still hold the
    /// file lock for a moment after the previous handle is dropped (a real
    /// restart is a new process, where the lock dies with the old one).
    fn open_retry(dir: &Path, key: &[u8; 32]) -> Result<Buffer, BufferError> {
        for _ in 0..100 {
            match Buffer::open(dir, key) {
                Err(BufferError::Storage(sled::Error::Io(e))) if e.to_string().contains("lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
        Buffer::open(dir, key)
    }

    fn open_retry_with(dir: &Path, keys: &Keyring, limits: Limits) -> Buffer {
        for _ in 0..100 {
            match Buffer::open_with(dir, keys, limits) {
                Err(BufferError::Storage(sled::Error::Io(e))) if e.to_string().contains("lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other.unwrap(),
            }
        }
        Buffer::open_with(dir, keys, limits).unwrap()
    }

    fn out(dev: &str, values: &[f64]) -> DriverOutput {
        DriverOutput {
            device_id: dev.into(),
            serial_number: Some("SN-PLAINTEXT-42".into()),
            waveforms: vec![],
            technical: vec![],
            readings: values
                .iter()
                .map(|v| Reading {
                    mdc_code: 150_456,
                    vendor_label: "SPO2".into(),
                    value: Some(Value::Numeric(*v)),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn append_assigns_sequences_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = [9u8; 32];
        {
            let b = open_retry(dir.path(), &key).unwrap();
            assert_eq!(
                b.append(vec![out("a", &[1.0, 2.0]), out("b", &[3.0])])
                    .await
                    .unwrap(),
                3
            );
            assert_eq!(b.append(vec![out("a", &[4.0])]).await.unwrap(), 1);
            assert_eq!(b.pending_readings(), 4);
        }
        let b = open_retry(dir.path(), &key).unwrap();
        assert_eq!((b.pending_records(), b.pending_readings()), (3, 4));
        let recs = b.oldest(100).unwrap();
        let seqs: Vec<(String, u64)> = recs
            .iter()
            .flat_map(|r| {
                let d = r.data.device.as_ref().unwrap().device_id.clone();
                r.data.readings.iter().map(move |x| (d.clone(), x.sequence))
            })
            .collect();
        assert_eq!(
            seqs,
            vec![
                ("a".into(), 1),
                ("a".into(), 2),
                ("b".into(), 1),
                ("a".into(), 3)
            ]
        );
        // Sequences continue after reopen, never restart.
        b.append(vec![out("a", &[5.0])]).await.unwrap();
        let last = b.oldest(100).unwrap().pop().unwrap();
        assert_eq!(last.data.readings[0].sequence, 4);
    }

    #[tokio::test]
    async fn a_fresh_buffer_draws_an_incarnation_kept_across_reopen_and_an_old_one_stays_0() {
        let dir = tempfile::tempdir().unwrap();
        let key = [7u8; 32];
        let first = {
            let b = Buffer::open(dir.path(), &key).unwrap();
            assert!(b.incarnation() > 0 && b.incarnation() <= i64::MAX as u64);
            b.append(vec![out("mon", &[1.0])]).await.unwrap();
            b.flush().await.unwrap();
            b.incarnation()
        };
        let b = open_retry(dir.path(), &key).unwrap();
        assert_eq!(b.incarnation(), first, "kept for the buffer's life");
        drop(b);
        // Wiped: a new buffer, a new incarnation.
        let wiped = tempfile::tempdir().unwrap();
        let b = Buffer::open(wiped.path(), &key).unwrap();
        assert_ne!(b.incarnation(), first);
        drop(b);
        // A buffer an older agent wrote (counters, no incarnation): 0.
        let old = tempfile::tempdir().unwrap();
        {
            let db = sled::open(old.path().join("buffer.sled")).unwrap();
            let t = db.open_tree("buffer").unwrap();
            t.insert(meta_key("batch_seq"), &5u64.to_be_bytes())
                .unwrap();
            t.flush().unwrap();
        }
        let b = open_retry(old.path(), &key).unwrap();
        assert_eq!(b.incarnation(), 0);
        assert_eq!(b.next_batch_sequence().await.unwrap(), 6);
    }

    #[tokio::test]
    async fn waveforms_and_technical_readings_share_the_device_sequence() {
        use shared_protocol::v1::{TechnicalReading, Waveform};
        let dir = tempfile::tempdir().unwrap();
        let b = open_retry(dir.path(), &[2u8; 32]).unwrap();
        let mut o = out("n", &[97.0]);
        o.waveforms.push(Waveform {
            samples: vec![1, 2, 3],
            ..Default::default()
        });
        o.technical.push(TechnicalReading {
            kind: 1,
            ..Default::default()
        });
        assert_eq!(b.append(vec![o]).await.unwrap(), 3);
        assert_eq!(b.pending_readings(), 3);
        let rec = b.oldest(10).unwrap().pop().unwrap();
        assert_eq!(rec.data.readings[0].sequence, 1);
        assert_eq!(rec.data.waveforms[0].sequence, 2);
        assert_eq!(rec.data.technical[0].sequence, 3);
        b.remove(&[rec]).await.unwrap();
        assert_eq!(b.pending_readings(), 0);
    }

    #[test]
    fn device_clock_skew_is_flagged_not_corrected() {
        use shared_protocol::v1::{QualityFlag, TimeSource};
        let mk = |dt: i64, src: TimeSource| Reading {
            device_time_us: dt,
            gateway_time_us: 1_000_000_000_000,
            time_source: src as i32,
            ..Default::default()
        };
        let mut rs = vec![
            mk(
                1_000_000_000_000 - CLOCK_SKEW_LIMIT_US - 1,
                TimeSource::DeviceClockUnsynced,
            ),
            mk(
                1_000_000_000_000 + CLOCK_SKEW_LIMIT_US,
                TimeSource::DeviceClockUnsynced,
            ),
            mk(
                1_000_000_000_000 + 3_600_000_000,
                TimeSource::DeviceClockSynced,
            ),
            mk(
                1_000_000_000_000 - 3_600_000_000,
                TimeSource::GatewayReceive,
            ),
        ];
        flag_clock_skew(&mut rs);
        let skew = QualityFlag::ClockSkew as i32;
        assert_eq!(
            rs.iter()
                .map(|r| r.flags.contains(&skew))
                .collect::<Vec<_>>(),
            vec![true, false, true, false]
        );
        assert_eq!(
            rs[0].device_time_us,
            1_000_000_000_000 - CLOCK_SKEW_LIMIT_US - 1,
            "time kept"
        );
        flag_clock_skew(&mut rs);
        assert_eq!(
            rs[0].flags.iter().filter(|f| **f == skew).count(),
            1,
            "flagged once"
        );
    }

    #[tokio::test]
    async fn items_are_counted_from_headers_within_a_range() {
        let dir = tempfile::tempdir().unwrap();
        let b = open_retry(dir.path(), &[1u8; 32]).unwrap();
        for i in 0..4 {
            b.append(vec![out("a", &[f64::from(i), 0.0])])
                .await
                .unwrap();
        }
        assert_eq!(b.items_in(0, u64::MAX, 100).unwrap(), 8);
        assert_eq!(b.items_in(2, u64::MAX, 100).unwrap(), 4, "records 2 and 3");
        assert_eq!(b.items_in(0, 1, 100).unwrap(), 2);
        assert_eq!(
            b.items_in(0, u64::MAX, 3).unwrap(),
            4,
            "stops at the first record reaching the cap"
        );
    }

    #[tokio::test]
    async fn oldest_respects_the_limit_and_remove_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let b = open_retry(dir.path(), &[1u8; 32]).unwrap();
        for i in 0..10 {
            b.append(vec![out("a", &[f64::from(i), 0.0, 1.0])])
                .await
                .unwrap();
        }
        let first = b.oldest(7).unwrap();
        assert_eq!(first.len(), 2, "whole records, not more than the limit");
        b.remove(&first).await.unwrap();
        assert_eq!(b.pending_readings(), 24);
        let next = b.oldest(1).unwrap();
        assert_eq!(next.len(), 1, "at least one record even over the limit");
        assert_eq!(next[0].data.readings[0].value, Some(Value::Numeric(2.0)));
    }

    #[tokio::test]
    async fn nothing_is_stored_in_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = open_retry(dir.path(), &[3u8; 32]).unwrap();
            for _ in 0..50 {
                b.append(vec![out("bed-7-monitor", &[97.25])])
                    .await
                    .unwrap();
            }
            b.flush().await.unwrap();
        }
        let needles: [&[u8]; 3] = [b"SN-PLAINTEXT-42", b"SPO2", &97.25f64.to_le_bytes()];
        for entry in walk(dir.path()) {
            let bytes = std::fs::read(&entry).unwrap();
            for n in needles {
                assert!(
                    !bytes.windows(n.len()).any(|w| w == n),
                    "plaintext {:?} found in {}",
                    String::from_utf8_lossy(n),
                    entry.display()
                );
            }
        }
    }

    fn walk(p: &Path) -> Vec<std::path::PathBuf> {
        let mut v = vec![];
        for e in std::fs::read_dir(p).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                v.extend(walk(&path))
            } else {
                v.push(path)
            }
        }
        v
    }

    #[tokio::test]
    async fn tampered_and_foreign_key_records_are_quarantined_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = open_retry(dir.path(), &[5u8; 32]).unwrap();
            b.append(vec![out("a", &[1.0])]).await.unwrap();
            b.append(vec![out("a", &[2.0])]).await.unwrap();
            b.append(vec![out("a", &[3.0])]).await.unwrap();
            // Flip one ciphertext byte of the first record.
            let k = record_key(0);
            let t = b.s().unwrap().tree;
            let mut v = t.get(k).unwrap().unwrap().to_vec();
            let last = v.len() - 1;
            v[last] ^= 1;
            t.insert(k, v).unwrap();
            b.flush().await.unwrap();
        }
        let b = open_retry(dir.path(), &[5u8; 32]).unwrap();
        let recs = b.oldest(10).unwrap();
        assert_eq!(recs.len(), 2, "the intact records are still delivered");
        assert_eq!(b.quarantined(), 1);
        assert_eq!(b.pending_readings(), 2);
        drop(b);
    }

    #[tokio::test]
    async fn records_under_a_missing_key_are_kept_locked_and_delivered_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let old = [5u8; 32];
        {
            let b = open_retry(dir.path(), &old).unwrap();
            b.append(vec![out("a", &[1.0, 2.0])]).await.unwrap();
            b.append(vec![out("a", &[3.0])]).await.unwrap();
            b.flush().await.unwrap();
        }
        // The key is lost: a new one. Nothing quarantined, nothing sent, counted.
        {
            let b = open_retry(dir.path(), &[6u8; 32]).unwrap();
            assert_eq!(
                b.locked(),
                Locked {
                    records: 2,
                    items: 3,
                    key_ids: vec![key_id(&old)]
                }
            );
            assert_eq!((b.pending_records(), b.pending_readings()), (0, 0));
            assert!(b.oldest(10).unwrap().is_empty());
            assert_eq!(b.items_in(0, u64::MAX, 100).unwrap(), 0);
            b.append(vec![out("a", &[4.0])]).await.unwrap();
            let recs = b.oldest(10).unwrap();
            assert_eq!(recs.len(), 1, "new records flow past the locked ones");
            b.remove(&recs).await.unwrap();
            assert_eq!(b.quarantined(), 0);
            b.flush().await.unwrap();
        }
        // The old key is back (retired beside the new one): delivered.
        let ring = Keyring {
            current: [6u8; 32],
            retired: vec![old],
        };
        let b = open_retry_with(dir.path(), &ring, Limits::default());
        assert_eq!(b.locked(), Locked::default());
        let recs = b.oldest(10).unwrap();
        let values: Vec<_> = recs
            .iter()
            .flat_map(|r| r.data.readings.iter().map(|x| x.value.clone()))
            .collect();
        assert_eq!(
            values,
            [1.0, 2.0, 3.0].map(|v| Some(Value::Numeric(v))).to_vec()
        );
        assert_eq!(b.quarantined(), 0);
    }

    #[tokio::test]
    async fn nonces_never_repeat_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let b = open_retry(dir.path(), &[8u8; 32]).unwrap();
            for _ in 0..5 {
                b.append(vec![out("a", &[1.0])]).await.unwrap();
            }
            for item in b.s().unwrap().tree.scan_prefix(b"r") {
                let (_, v) = item.unwrap();
                seen.insert(v[9..21].to_vec());
            }
            let recs = b.oldest(100).unwrap();
            b.remove(&recs).await.unwrap();
            // Simulate a crash: drop without a clean shutdown.
        }
        assert_eq!(seen.len(), 15, "15 records, 15 distinct nonces");
    }

    fn limits(max_bytes: u64, overflow: OverflowPolicy) -> Limits {
        Limits {
            max_bytes,
            overflow,
        }
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_bound_and_counts_what_it_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::single([4u8; 32]);
        let b = Buffer::open_with(dir.path(), &keys, limits(4_000, OverflowPolicy::DropOldest))
            .unwrap();
        for i in 0..200 {
            b.append(vec![out("a", &[f64::from(i)])]).await.unwrap();
            assert!(b.pending_bytes() <= 4_000, "bound holds after every append");
        }
        let kept = b.pending_readings();
        assert!(kept > 10 && kept < 200, "{kept}");
        assert_eq!(b.dropped_total(), 200 - kept);
        assert_eq!(b.dropped_unreported().unwrap(), 200 - kept);
        // The newest survive, oldest first; sequences show what was dropped.
        let recs = b.oldest(1000).unwrap();
        let first = recs[0].data.readings[0].sequence;
        assert_eq!(first, 200 - kept + 1);
        assert_eq!(recs.last().unwrap().data.readings[0].sequence, 200);
        // The unreported count survives a restart and is cleared once reported.
        drop((recs, b));
        let b = open_retry_with(dir.path(), &keys, limits(4_000, OverflowPolicy::DropOldest));
        assert_eq!(b.dropped_unreported().unwrap(), 200 - kept);
        assert_eq!(b.pending_readings(), kept, "counts rebuilt from disk");
        b.mark_dropped_reported(200 - kept).await.unwrap();
        assert_eq!(b.dropped_unreported().unwrap(), 0);
    }

    #[tokio::test]
    async fn refuse_new_keeps_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::single([4u8; 32]);
        let b =
            Buffer::open_with(dir.path(), &keys, limits(1_000, OverflowPolicy::RefuseNew)).unwrap();
        let mut accepted = 0;
        let mut refused = 0;
        for i in 0..50 {
            match b.append(vec![out("a", &[f64::from(i)])]).await {
                Ok(n) => accepted += n,
                Err(BufferError::Full { .. }) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(accepted > 0 && refused > 0);
        assert_eq!(b.refused_total(), refused as u64);
        assert_eq!(b.dropped_total(), 0);
        let recs = b.oldest(1000).unwrap();
        // The first ones are kept, in order, with contiguous sequences.
        let seqs: Vec<u64> = recs.iter().map(|r| r.data.readings[0].sequence).collect();
        assert_eq!(seqs, (1..=accepted as u64).collect::<Vec<_>>());
        assert!(matches!(
            b.append(vec![out("a", &vec![1.0; 500])]).await,
            Err(BufferError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn the_bound_holds_on_disk_under_churn() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::single([4u8; 32]);
        let max = 2 << 20; // 2 MiB of records
        let b =
            Buffer::open_with(dir.path(), &keys, limits(max, OverflowPolicy::DropOldest)).unwrap();
        let mut sizes = vec![];
        for round in 0..6 {
            for i in 0..2_000 {
                b.append(vec![out("a", &[f64::from(i); 40])]).await.unwrap();
            }
            b.flush().await.unwrap();
            if round >= 2 {
                sizes.push(b.size_on_disk().unwrap());
            }
        }
        assert!(b.pending_bytes() <= max);
        // sled's segment overhead is a constant, not a multiple of what was written
        // (12 000 records, ~8 MiB written through a 2 MiB bound).
        let limit = max + 16 * (1 << 20);
        assert!(
            sizes.iter().all(|s| *s <= limit),
            "on-disk sizes {sizes:?} exceed {limit}"
        );
    }

    #[tokio::test]
    async fn rotated_keys_open_old_records_and_seal_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let old = [1u8; 32];
        let new = [2u8; 32];
        {
            let b =
                Buffer::open_with(dir.path(), &Keyring::single(old), Limits::default()).unwrap();
            b.append(vec![out("a", &[1.0])]).await.unwrap();
        }
        let ring = Keyring {
            current: new,
            retired: vec![old],
        };
        let b = open_retry_with(dir.path(), &ring, Limits::default());
        b.append(vec![out("a", &[2.0])]).await.unwrap();
        assert_eq!(
            b.keys_in_use().unwrap(),
            [key_id(&old), key_id(&new)].into_iter().collect()
        );
        let recs = b.oldest(10).unwrap();
        assert_eq!(recs.len(), 2, "old record opened with the retired key");
        // Once the old data is delivered, the old key is no longer needed.
        b.remove(&recs[..1]).await.unwrap();
        assert_eq!(
            b.keys_in_use().unwrap(),
            [key_id(&new)].into_iter().collect()
        );
        // Without the retired key the old record would be quarantined, not lost silently.
        assert_eq!(b.quarantined(), 0);
    }

    #[tokio::test]
    async fn batch_sequences_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = {
            let b = open_retry(dir.path(), &[1u8; 32]).unwrap();
            b.next_batch_sequence().await.unwrap();
            b.next_batch_sequence().await.unwrap()
        };
        let b = open_retry(dir.path(), &[1u8; 32]).unwrap();
        assert_eq!(a, 2);
        assert_eq!(b.next_batch_sequence().await.unwrap(), 3);
    }

    /// A small tmpfs mounted for a test, unmounted on drop.
    pub(crate) struct Tmpfs(pub tempfile::TempDir);

    impl Tmpfs {
        /// Mount one of `size` (e.g. "12m"); None (with the reason printed)
        /// only when not root, where mounting cannot work.
        pub(crate) fn mount(size: &str) -> Option<Tmpfs> {
            let dir = tempfile::tempdir().unwrap();
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status();
            match st {
                Ok(s) if s.success() => Some(Tmpfs(dir)),
                other => {
                    let root = std::fs::read_to_string("/proc/self/status")
                        .map(|s| {
                            s.lines().any(|l| {
                                l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")
                            })
                        })
                        .unwrap_or(false);
                    assert!(!root, "mounting a tmpfs failed as root: {other:?}");
                    eprintln!("SKIPPED: not root, cannot mount a tmpfs ({other:?})");
                    None
                }
            }
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    #[tokio::test]
    async fn a_full_disk_is_survived_by_reopening_the_store() {
        let Some(fs) = Tmpfs::mount("12m") else {
            return;
        };
        let filler = fs.0.path().join("filler");
        std::fs::write(&filler, vec![0u8; 3 << 20]).unwrap();
        let data = fs.0.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let b = Buffer::open(&data, &[1u8; 32]).unwrap();
        let big = |i: usize| {
            let mut o = out("a", &[i as f64; 20]);
            o.readings
                .iter_mut()
                .for_each(|r| r.vendor_label = "x".repeat(100));
            o
        };
        let mut accepted = 0u64;
        let err = loop {
            match b.append(vec![big(accepted as usize)]).await {
                Ok(n) => accepted += n as u64,
                Err(e) => break e,
            }
            assert!(accepted < 1_000_000, "the disk never filled");
        };
        assert!(err.is_storage(), "{err}");
        assert!(!b.writable());
        assert_eq!(b.write_errors_total(), 1);
        // Still full: writes fail, reads work; recovering does not pretend.
        assert!(b.append(vec![big(0)]).await.unwrap_err().is_storage());
        assert_eq!(b.oldest(1).unwrap().len(), 1, "reads still work");
        assert!(b.recover().is_err());
        assert!(!b.writable());
        assert_eq!(b.pending_readings(), accepted, "counts kept meanwhile");
        b.refuse_io(7);
        // Space returns: the same sled database would still fail (measured);
        // recover reopens it and writes again, with nothing accepted lost.
        std::fs::remove_file(&filler).unwrap();
        assert!(b.recover().unwrap());
        assert!(b.writable());
        assert_eq!(b.pending_readings(), accepted);
        assert_eq!(b.append(vec![big(1)]).await.unwrap(), 20);
        let recs = b.oldest(usize::MAX).unwrap();
        assert_eq!(
            recs.iter().map(|r| items(&r.data) as u64).sum::<u64>(),
            accepted + 20
        );
        let seqs: Vec<u64> = recs.iter().map(|r| r.data.readings[0].sequence).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 20),
            "sequences continue"
        );
        // The failure is kept for the hub until reported.
        let f = b.write_failure_unreported().unwrap().unwrap();
        assert!(
            f.errors >= 3 && f.refused == 7 && f.until_us >= f.since_us,
            "{f:?}"
        );
        b.mark_write_failure_reported(&f).await.unwrap();
        assert_eq!(b.write_failure_unreported().unwrap(), None);
        assert_eq!(b.refused_io_total(), 7);
    }
}
