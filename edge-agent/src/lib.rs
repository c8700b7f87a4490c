//! Vigil edge agent: device drivers → encrypted buffer → batches → hub.
//!
//! [`run`] wires the pieces and runs until the shutdown signal:
//! - one task per configured device (from `device-drivers`) producing
//!   [`device_drivers::DriverOutput`]s;
//! - the writer, which durably accepts them into the [`buffer::Buffer`]
//!   (sequence numbers assigned, encrypted, flushed);
//! - the forwarder, which batches the oldest records, sends them to the hub
//!   with retries, and deletes them only once delivered: after the hub's
//!   matching `BatchAck` (HTTPS) or the broker's PUBACK (Azure IoT Hub over
//!   MQTT, see [`iothub`]).

pub mod buffer;
pub mod check;
pub mod config;
pub mod devices;
pub mod hl7;
pub mod iothub;
pub mod probe;
pub mod provision;
pub mod secrets;
pub mod status;
pub mod telemetry;
pub mod uplink;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use device_drivers::{DriverOutput, DriverStats, RunOptions};
use ring::rand::{SecureRandom, SystemRandom};
use shared_protocol::v1::{
    Batch, BatchAck, DeviceData, DeviceInfo, TechnicalKind, TechnicalReading,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::buffer::{Buffer, BufferError, StoredRecord};
use crate::config::AgentConfig;
use crate::devices::{AnyProtocol, LinkTarget};
use crate::uplink::{AnyUplink, Delivery, Uplink, UplinkError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    #[error("status endpoint: {0}")]
    Status(String),
    #[error("invalid device config for {device}: {message}")]
    Device { device: String, message: String },
    #[error(
        "{records} buffered records ({items} readings) are sealed under buffer key(s) {key_ids} that no configured key opens (the key file was lost or replaced). Restore the key: put it back as {key_path} or beside it as {key_path}.retired-<key id>, then start again; the records are sent then. To run without them for now, start with --accept-key-loss (or [buffer] accept_key_loss = true): they stay stored, counted and reported, and are sent once the key is back"
    )]
    KeyLoss {
        records: u64,
        items: u64,
        key_ids: String,
        key_path: String,
    },
}

/// Counters of the forwarding path.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub batches_sent: AtomicU64,
    pub readings_acked: AtomicU64,
    pub readings_duplicate: AtomicU64,
    pub readings_rejected_by_hub: AtomicU64,
    pub send_failures: AtomicU64,
    /// Hub acks that can never match their batch (see `forward_loop`).
    pub ack_mismatches: AtomicU64,
    /// Whether the last send reached the hub.
    pub uplink_up: std::sync::atomic::AtomicBool,
}

/// Run the agent until `shutdown` becomes true (or its sender is dropped).
pub async fn run(cfg: AgentConfig, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
    let uplink = match (&cfg.uplink.kind, &cfg.uplink.iothub) {
        (config::UplinkKind::IothubMqtt, _) => AnyUplink::IotHub(Box::new(
            iothub::uplink_from_config(&cfg)
                .await?
                .with_compression(cfg.uplink.compression),
        )),
        _ => {
            let token = secrets::load_token(
                cfg.uplink.token_file.as_deref(),
                std::env::var("VIGIL_AGENT_TOKEN").ok(),
            )?;
            AnyUplink::Https(Uplink::from_config(&cfg.uplink, &token)?)
        }
    };
    run_with_uplink(cfg, uplink, shutdown).await
}

/// [`run`] with an uplink built by the caller (tests pin the SAS token's
/// clock this way; see [`iothub::IotHubUplink::with_clock`]).
pub async fn run_with_uplink(
    cfg: AgentConfig,
    uplink: AnyUplink,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let keys = secrets::load_keyring(&cfg.key_path())?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| BufferError::Storage(sled::Error::Io(e)))?;
    let buffer = Arc::new(Buffer::open_with(
        &cfg.data_dir,
        &keys,
        cfg.buffer.limits(),
    )?);
    let locked = buffer.locked();
    if locked.records > 0 {
        let key_ids = locked
            .key_ids
            .iter()
            .map(hex::encode)
            .collect::<Vec<_>>()
            .join(", ");
        if !cfg.buffer.accept_key_loss {
            return Err(AgentError::KeyLoss {
                records: locked.records,
                items: locked.items,
                key_ids,
                key_path: cfg.key_path().display().to_string(),
            });
        }
        tracing::error!(
            records = locked.records,
            items = locked.items,
            key_ids = %key_ids,
            "buffer key loss accepted: records under a missing key are kept unsent until the key is restored"
        );
    }
    if !keys.retired.is_empty() {
        for f in secrets::prune_retired(&cfg.key_path(), &buffer.keys_in_use()?)? {
            tracing::info!(file = %f.display(), "retired buffer key no longer needed; deleted");
        }
    }
    tracing::info!(
        gateway_id = %cfg.gateway_id,
        devices = cfg.devices.len(),
        pending_readings = buffer.pending_readings(),
        quarantined = buffer.quarantined(),
        "edge-agent starting"
    );

    // Records with an id below this are backlog: what was stored before this
    // start. Taken before any device task can append, so readings of this run
    // never count as backlog (they wait for a full or aged live batch).
    let startup_backlog_end = if buffer.pending_records() > 0 {
        buffer.next_record_id().unwrap_or(0)
    } else {
        0
    };
    let (tx, rx) = mpsc::channel::<DriverOutput>(1024);
    let notify = Arc::new(Notify::new());
    let mut device_infos = HashMap::new();
    let mut driver_stats = Vec::new();
    let mut drivers = Vec::new();
    for dev in &cfg.devices {
        if dev.kind.transport() == config::Transport::Ble {
            // Bluetooth LE: its own driver (scan, GATT notifications), same channel.
            let stats = Arc::new(DriverStats::default());
            driver_stats.push((dev.id.clone(), stats.clone()));
            let task =
                devices::ble_task(dev, stats, tx.clone(), shutdown.clone()).map_err(|message| {
                    AgentError::Device {
                        device: dev.id.clone(),
                        message,
                    }
                })?;
            device_infos.insert(
                dev.id.clone(),
                DeviceInfo {
                    device_id: dev.id.clone(),
                    protocol: device_drivers::ble::KIND.into(),
                    manufacturer: String::new(),
                    model: dev.model.clone(),
                    serial_number: String::new(),
                    location: dev.location.clone(),
                },
            );
            drivers.push(tokio::spawn(task));
            continue;
        }
        if dev.kind.transport() == config::Transport::Listener {
            // The device connects to us (HL7 over MLLP): a listener task that
            // appends each accepted message itself, then wakes the forwarder.
            let l = hl7::Hl7Listener::bind(dev)
                .await
                .map_err(|message| AgentError::Device {
                    device: dev.id.clone(),
                    message,
                })?;
            device_infos.insert(dev.id.clone(), hl7::Hl7Listener::device_info(dev));
            driver_stats.push((dev.id.clone(), l.stats().device.clone()));
            drivers.push(tokio::spawn(l.serve(
                buffer.clone(),
                notify.clone(),
                shutdown.clone(),
            )));
            continue;
        }
        let stats = Arc::new(DriverStats::default());
        driver_stats.push((dev.id.clone(), stats.clone()));
        let proto = AnyProtocol::from_config(dev).map_err(|message| AgentError::Device {
            device: dev.id.clone(),
            message,
        })?;
        device_infos.insert(
            dev.id.clone(),
            DeviceInfo {
                device_id: dev.id.clone(),
                protocol: proto.kind().into(),
                manufacturer: proto.manufacturer().into(),
                model: dev.model.clone(),
                serial_number: String::new(),
                location: dev.location.clone(),
            },
        );
        let target = LinkTarget::of(dev, &proto);
        let mut opts = RunOptions::default();
        if let Some(ms) = dev.silence_timeout_ms {
            opts.silence = Duration::from_millis(ms);
        }
        drivers.push(tokio::spawn(proto.run(
            dev.id.clone(),
            target,
            opts,
            stats,
            tx.clone(),
            shutdown.clone(),
        )));
    }
    drop(tx);

    // Per-device state and counts for the IoT Hub twin, fed by the writer.
    let activity = Arc::new(iothub::twin::DeviceActivity::default());
    let writer = tokio::spawn(write_loop(
        buffer.clone(),
        rx,
        notify.clone(),
        activity.clone(),
        WRITE_HOLD_MAX,
    ));
    let healer = tokio::spawn(heal_loop(buffer.clone(), notify.clone(), shutdown.clone()));
    let fstats = Arc::new(ForwardStats::default());
    let status_task = match &cfg.status {
        Some(st) => {
            let listener = tokio::net::TcpListener::bind(&st.listen)
                .await
                .map_err(|e| AgentError::Status(format!("status.listen {}: {e}", st.listen)))?;
            let status = Arc::new(status::Status {
                gateway_id: cfg.gateway_id.clone(),
                buffer: buffer.clone(),
                devices: driver_stats.clone(),
                forward: fstats.clone(),
            });
            Some(tokio::spawn(status::serve(
                listener,
                status,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    // The forwarder stops only after the drain below; `shutdown` tells it to
    // stop waiting for full batches.
    let (stop_forwarder, forwarder_stop) = watch::channel(false);
    let mut uplink = uplink;
    // Shutdown, or a `flush` direct method: send without waiting.
    let hurry = iothub::wire(
        &mut uplink,
        &cfg,
        &buffer,
        activity,
        shutdown.clone(),
        forwarder_stop.clone(),
    );
    let forwarder = tokio::spawn(forward_loop(
        buffer.clone(),
        uplink,
        cfg.clone(),
        device_infos,
        notify,
        fstats.clone(),
        ForwardSignals {
            stop: forwarder_stop,
            draining: hurry,
            startup_backlog_end,
        },
    ));

    let _ = shutdown.wait_for(|s| *s).await;
    tracing::info!("edge-agent stopping");
    for d in drivers {
        let _ = d.await;
    }
    // Drivers are gone, so the channel closes and the writer drains it.
    let _ = writer.await;
    let _ = healer.await;
    // Deliver what is buffered, for at most `uplink.shutdown_drain_ms`;
    // whatever is left stays safely in the buffer for the next start.
    let drain_until = Instant::now() + Duration::from_millis(cfg.uplink.shutdown_drain_ms);
    while buffer.pending_readings() > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if buffer.pending_readings() > 0 {
        tracing::warn!(
            pending = buffer.pending_readings(),
            "shutdown drain time over; the rest stays buffered"
        );
    }
    let _ = stop_forwarder.send(true);
    let _ = forwarder.await;
    if let Some(t) = status_task {
        let _ = t.await;
    }
    buffer.flush().await?;
    for (id, s) in driver_stats {
        let s = s.snapshot();
        tracing::info!(device_id = %id, frames_ok = s.frames_ok, frames_bad = s.frames_bad,
            bytes_dropped = s.bytes_dropped, link_errors = s.link_errors, "device counters");
    }
    tracing::info!(
        batches_sent = fstats.batches_sent.load(Ordering::Relaxed),
        readings_acked = fstats.readings_acked.load(Ordering::Relaxed),
        readings_rejected_by_hub = fstats.readings_rejected_by_hub.load(Ordering::Relaxed),
        pending_readings = buffer.pending_readings(),
        "edge-agent stopped"
    );
    Ok(())
}

/// Driver outputs the writer holds in memory while the buffer cannot write
/// (see [`write_loop`]); beyond it, new ones are refused and counted.
pub const WRITE_HOLD_MAX: usize = 4096;

/// Durably accept everything the drivers produce. Groups whatever is queued
/// into one sled batch + flush (up to 256 outputs).
///
/// While the buffer cannot write (disk full, I/O error), the writer keeps
/// draining the drivers' channel, so drivers never block, and holds up to
/// `hold_max` outputs in memory (not accepted yet: a crash loses them, like
/// the channel's content), retrying them in order once [`heal_loop`] has
/// recovered the buffer. Outputs beyond `hold_max`, and whatever is still
/// held when the agent stops while the buffer fails, are refused and counted
/// ([`Buffer::refuse_io`]): never lost uncounted.
async fn write_loop(
    buffer: Arc<Buffer>,
    mut rx: mpsc::Receiver<DriverOutput>,
    notify: Arc<Notify>,
    activity: Arc<iothub::twin::DeviceActivity>,
    hold_max: usize,
) {
    let mut held: std::collections::VecDeque<DriverOutput> = Default::default();
    let mut refusing = 0u64;
    let hold = |held: &mut std::collections::VecDeque<DriverOutput>,
                o: DriverOutput,
                refusing: &mut u64| {
        if held.len() < hold_max {
            held.push_back(o);
        } else {
            let n = buffer::items_of(&o) as u64;
            buffer.refuse_io(n);
            *refusing += n;
        }
    };
    let mut closed = false;
    let mut delay = Duration::from_millis(100);
    loop {
        if held.is_empty() {
            if closed {
                return;
            }
            match rx.recv().await {
                Some(o) => held.push_back(o),
                None => return,
            }
        }
        while !closed {
            match rx.try_recv() {
                Ok(o) => hold(&mut held, o, &mut refusing),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        if refusing > 0 {
            tracing::error!(
                items = refusing,
                refused_io_total = buffer.refused_io_total(),
                "buffer not writable and the writer's hold is full: readings refused"
            );
            refusing = 0;
        }
        let n = held.len().min(256);
        let chunk: Vec<DriverOutput> = held.iter().take(n).cloned().collect();
        match buffer.append(chunk).await {
            Ok(_) => {
                activity.observe(held.make_contiguous()[..n].as_ref());
                held.drain(..n);
                notify.notify_one();
                delay = Duration::from_millis(100);
            }
            Err(e @ (BufferError::Full { .. } | BufferError::TooLarge(_))) => {
                // Overflow policy refuse-new: these readings are not
                // accepted (counted in the buffer's refused total).
                tracing::warn!(error = %e, refused_total = buffer.refused_total(), "readings refused");
                held.drain(..n);
            }
            Err(e) => {
                if closed {
                    // Stopping while the buffer fails: give up, counted.
                    let n: u64 = held.iter().map(|o| buffer::items_of(o) as u64).sum();
                    buffer.refuse_io(n);
                    tracing::error!(error = %e, items = n, "stopping while the buffer cannot write: held readings refused");
                    return;
                }
                tracing::warn!(error = %e, held = held.len(), "buffer write failed; holding the readings and retrying");
                // Wait (draining the channel meanwhile) before retrying.
                let until = Instant::now() + delay;
                delay = (delay * 2).min(Duration::from_secs(2));
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        o = rx.recv(), if !closed => match o {
                            Some(o) => hold(&mut held, o, &mut refusing),
                            None => closed = true,
                        },
                    }
                }
            }
        }
    }
}

/// Recover the buffer after a storage failure: while it is not writable,
/// reopen it (on a blocking thread) every few seconds until it writes again.
async fn heal_loop(buffer: Arc<Buffer>, notify: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if buffer.writable() {
            delay = Duration::from_millis(500);
            continue;
        }
        let b = buffer.clone();
        match tokio::task::spawn_blocking(move || b.recover()).await {
            Ok(Ok(true)) => {
                delay = Duration::from_millis(500);
                // Wake the forwarder: what was stored meanwhile, and the
                // failure report, go out now.
                notify.notify_one();
            }
            Ok(Ok(false)) | Ok(Err(_)) | Err(_) => {
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: SystemRandom,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
            rng: SystemRandom::new(),
        }
    }
    fn reset(&mut self) {
        self.attempt = 0;
    }
    fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt += 1;
        let mut b = [0u8; 4];
        let frac = if self.rng.fill(&mut b).is_ok() {
            f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
        } else {
            1.0
        };
        // Full jitter, but never below half the cap so retries do not hammer.
        cap.mul_f64(0.5 + 0.5 * frac)
    }
}

/// The device entry a batch carries for a stored record's device: the
/// configured info, with the serial number the device reported.
fn device_info(stored: &DeviceInfo, infos: &HashMap<String, DeviceInfo>) -> DeviceInfo {
    let mut info = infos
        .get(&stored.device_id)
        .cloned()
        .unwrap_or_else(|| DeviceInfo {
            device_id: stored.device_id.clone(),
            ..Default::default()
        });
    if !stored.serial_number.is_empty() {
        info.serial_number = stored.serial_number.clone();
    }
    info
}

/// The BUFFER_OVERFLOW gateway event reporting `dropped` items.
fn overflow_event(dropped: u64, max_bytes: u64, sequence: u64, time_us: i64) -> TechnicalReading {
    TechnicalReading {
        kind: TechnicalKind::BufferOverflow as i32,
        time_us,
        detail: format!("buffer full ({max_bytes} bytes): {dropped} oldest items dropped"),
        sequence,
    }
}

/// The BUFFER_KEY_LOST gateway event reporting records kept under a missing
/// buffer key.
fn key_loss_event(locked: &buffer::Locked, sequence: u64, time_us: i64) -> TechnicalReading {
    let ids = locked
        .key_ids
        .iter()
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join(", ");
    TechnicalReading {
        kind: TechnicalKind::BufferKeyLost as i32,
        time_us,
        detail: format!(
            "buffer key lost: {} records ({} items) sealed under key {ids} cannot be opened; kept unsent until the key is restored",
            locked.records, locked.items
        ),
        sequence,
    }
}

/// The BUFFER_WRITE_FAILED gateway event reporting a storage failure the
/// buffer recovered from.
fn write_failure_event(f: &buffer::WriteFailure, sequence: u64, time_us: i64) -> TechnicalReading {
    TechnicalReading {
        kind: TechnicalKind::BufferWriteFailed as i32,
        // When the failure began (the report comes after recovery).
        time_us: if f.since_us != 0 { f.since_us } else { time_us },
        detail: format!(
            "buffer could not write for {} s ({} failed writes; disk full or I/O error); recovered without restart; {} items refused meanwhile, the rest stored late",
            f.until_us.saturating_sub(f.since_us).max(0) / 1_000_000,
            f.errors,
            f.refused
        ),
        sequence,
    }
}

/// How many of `records` (oldest first) one batch takes so that its encoded
/// protobuf size stays within `max_bytes`: records are added until the next
/// one would take the batch above the limit. The first record always goes,
/// so a record larger than the limit is sent alone, never dropped.
///
/// Exact for the devices part (computed with prost's length rules, the
/// way [`build_batch`] groups records per device); the other fields are
/// counted at their largest (sequence and creation time are not known yet)
/// with room for a BUFFER_OVERFLOW and a BUFFER_WRITE_FAILED gateway event
/// (a key-loss report, once per start, may exceed the limit by its size).
fn records_fitting(
    gateway_id: &str,
    records: &[StoredRecord],
    infos: &HashMap<String, DeviceInfo>,
    max_bytes: usize,
) -> usize {
    use prost::Message;
    use prost::encoding::{encoded_len_varint, key_len, message};
    let header = Batch {
        gateway_id: gateway_id.to_string(),
        sequence: u64::MAX,
        incarnation: u64::MAX,
        created_time_us: i64::MIN,
        devices: vec![],
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        gateway_events: vec![
            overflow_event(u64::MAX, u64::MAX, u64::MAX, i64::MIN),
            write_failure_event(
                &buffer::WriteFailure {
                    since_us: i64::MIN,
                    until_us: i64::MAX,
                    errors: u64::MAX,
                    refused: u64::MAX,
                },
                u64::MAX,
                i64::MIN,
            ),
        ],
        // A W3C traceparent is always 55 characters (set when tracing is on).
        traceparent: "0".repeat(55),
    }
    .encoded_len();
    // `Batch.devices` is field 4; a DeviceData entry's length is its info
    // (field 1) plus its items (fields 2-4).
    let entry_len = |content: usize| key_len(4) + encoded_len_varint(content as u64) + content;
    let mut content: HashMap<&str, usize> = HashMap::new();
    let mut total = header;
    for (i, r) in records.iter().enumerate() {
        let d = &r.data;
        let stored = d.device.as_ref();
        let id = stored.map(|s| s.device_id.as_str()).unwrap_or("");
        let items = message::encoded_len_repeated(2, &d.readings)
            + message::encoded_len_repeated(3, &d.waveforms)
            + message::encoded_len_repeated(4, &d.technical);
        let (before, after) = match content.get(id) {
            Some(&c) => (entry_len(c), c + items),
            None => {
                let info = device_info(&stored.cloned().unwrap_or_default(), infos);
                (0, message::encoded_len(1, &info) + items)
            }
        };
        let next = total - before + entry_len(after);
        if i > 0 && next > max_bytes {
            return i;
        }
        total = next;
        content.insert(id, after);
    }
    records.len()
}

fn build_batch(
    gateway_id: &str,
    incarnation: u64,
    sequence: u64,
    records: &[StoredRecord],
    infos: &HashMap<String, DeviceInfo>,
) -> Batch {
    let mut by_device: BTreeMap<String, DeviceData> = BTreeMap::new();
    for r in records {
        let stored = r.data.device.clone().unwrap_or_default();
        let entry = by_device
            .entry(stored.device_id.clone())
            .or_insert_with(|| DeviceData {
                device: Some(device_info(&stored, infos)),
                ..Default::default()
            });
        entry.readings.extend(r.data.readings.iter().cloned());
        entry.waveforms.extend(r.data.waveforms.iter().cloned());
        entry.technical.extend(r.data.technical.iter().cloned());
    }
    Batch {
        gateway_id: gateway_id.to_string(),
        sequence,
        created_time_us: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64,
        devices: by_device.into_values().collect(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        gateway_events: vec![],
        // Set per send by the forwarder when traces are exported.
        traceparent: String::new(),
        incarnation,
    }
}

fn items_in(batch: &Batch) -> u64 {
    batch.devices.iter().map(|d| buffer::items(d) as u64).sum()
}

/// Whether `ack` acknowledges `batch`. `reached_before`: an earlier
/// attempt of this batch may have reached the hub. Batch sequences are
/// never reused within a buffer incarnation, so a `duplicate_batch` answer
/// to a first attempt is the ack of *another* batch the hub holds under
/// this sequence (an earlier buffer of the gateway, sent without an
/// incarnation, or a hub that ignores incarnations): it acknowledges none
/// of these readings, even when its counts happen to agree.
fn ack_matches(batch: &Batch, ack: &BatchAck, reached_before: bool) -> bool {
    ack.sequence == batch.sequence
        && (reached_before || !ack.duplicate_batch)
        && u64::from(ack.accepted) + u64::from(ack.duplicates) + u64::from(ack.rejected)
            == items_in(batch)
}

/// What the forwarder sends next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Records stored since the uplink last recovered: sent first.
    Live,
    /// Records stored before (an outage's backlog): sent oldest first, at
    /// the configured rate, whenever no live records wait.
    Backlog,
}

/// Token bucket limiting the backlog's readings per second.
#[derive(Debug)]
struct Rate {
    per_s: f64,
    tokens: f64,
    at: Instant,
}

impl Rate {
    fn new(per_s: u32) -> Self {
        Rate {
            per_s: f64::from(per_s),
            tokens: f64::from(per_s),
            at: Instant::now(),
        }
    }
    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_s).min(self.per_s);
        self.at = now;
    }
    /// Readings allowed now (at least one once a whole token is there).
    fn available(&mut self) -> usize {
        self.refill();
        self.tokens.floor().max(0.0) as usize
    }
    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
    /// Time until one token is available.
    fn wait(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens).max(0.0)) / self.per_s.max(1.0))
    }
}

/// How the forwarder is told to wind down: `draining` when the agent is
/// shutting down or a `flush` direct method asked for it (send what is
/// buffered without waiting for full batches), `stop` when the drain is over.
#[derive(Debug)]
struct ForwardSignals {
    stop: watch::Receiver<bool>,
    draining: watch::Receiver<bool>,
    /// The first record id of this run (see `run`): below it is backlog.
    startup_backlog_end: u64,
}

async fn forward_loop(
    buffer: Arc<Buffer>,
    mut uplink: AnyUplink,
    cfg: AgentConfig,
    infos: HashMap<String, DeviceInfo>,
    notify: Arc<Notify>,
    stats: Arc<ForwardStats>,
    signals: ForwardSignals,
) {
    let ForwardSignals {
        stop: mut shutdown,
        mut draining,
        startup_backlog_end,
    } = signals;
    let max = cfg.uplink.batch_max_readings;
    let mut limit = max;
    let max_bytes = cfg.uplink.batch_max_bytes;
    let mut backoff = Backoff::new(Duration::from_millis(200), cfg.uplink.max_backoff());
    let mut rate = Rate::new(cfg.uplink.backlog_rate_per_s);
    // Records with an id below this are backlog. What was stored before this
    // start is backlog; after an outage, everything stored before recovery is.
    let mut backlog_end = startup_backlog_end;
    let mut in_outage = false;
    // An accepted key loss, reported (at least once) with the next batch.
    let mut key_loss = Some(buffer.locked()).filter(|l| l.records > 0);
    let mut key_loss_seq = None;
    // When the last batch (either lane) went out, or the forwarder started:
    // live pacing.
    let mut last_send_start = Instant::now();
    'outer: loop {
        if *shutdown.borrow() {
            return;
        }
        if buffer.pending_readings() == 0 {
            tokio::select! {
                _ = notify.notified() => {}
                _ = shutdown.changed() => return,
            }
            continue;
        }
        if !buffer.writable() {
            // Nothing can be sent while the buffer cannot write (a batch
            // needs a durable sequence); the heal loop reopens it.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return,
            }
            continue;
        }
        // What the overflow policy dropped so far, read before this batch's
        // records: a record evicted after this point but delivered in this
        // batch is then never reported as dropped.
        let dropped = buffer.dropped_unreported().unwrap_or(0);
        // Live first: wait for a live batch by count or age.
        // Counted from the records' headers: nothing is decrypted until the
        // batch is taken.
        // A live batch is full by count or by bytes.
        let live_full = |b: &Buffer| {
            let (items, bytes) = b
                .waiting_in(backlog_end, u64::MAX, limit, max_bytes as u64)
                .unwrap_or((0, 0));
            (items > 0, items >= limit || bytes >= max_bytes as u64)
        };
        let (lane, records) = if live_full(&buffer).0 {
            // Adaptive batching: nothing is in flight here (one batch at a
            // time), so live readings go at once, only paced to one batch
            // per `batch_min_interval_ms` since the previous one started;
            // while a batch is in flight new readings accumulate, so batches
            // grow with the load (up to count and bytes) by themselves.
            let now = Instant::now();
            let deadline = (last_send_start + cfg.uplink.batch_min_interval())
                .max(now)
                .min(now + cfg.uplink.batch_max_wait());
            let mut full = live_full(&buffer).1;
            while !full && Instant::now() < deadline && !*draining.borrow() {
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = draining.changed() => {}
                    _ = shutdown.changed() => return,
                }
                full = live_full(&buffer).1;
            }
            (
                Lane::Live,
                buffer.oldest_within(backlog_end, u64::MAX, limit, max_bytes as u64),
            )
        } else {
            // Backlog, at the configured rate; new live data interrupts the wait.
            // While draining for shutdown, the backlog goes at full speed.
            let n = if *draining.borrow() {
                limit
            } else {
                rate.available().min(limit)
            };
            if n == 0 {
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = tokio::time::sleep(rate.wait()) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            (
                Lane::Backlog,
                buffer.oldest_within(0, backlog_end, n, max_bytes as u64),
            )
        };
        let records = match records {
            Ok(r) if r.is_empty() => continue,
            Ok(mut r) => {
                r.truncate(records_fitting(&cfg.gateway_id, &r, &infos, max_bytes));
                r
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the buffer failed");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let sequence = match buffer.next_batch_sequence().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "allocating a batch sequence failed");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let mut batch = build_batch(
            &cfg.gateway_id,
            buffer.incarnation(),
            sequence,
            &records,
            &infos,
        );
        // Report readings the overflow policy dropped (at least once).
        let mut overflow_reported = false;
        if dropped > 0 {
            if let Ok(seq) = buffer.next_gateway_event_sequence().await {
                overflow_reported = true;
                batch.gateway_events.push(overflow_event(
                    dropped,
                    buffer.limits().max_bytes,
                    seq,
                    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64,
                ));
            }
        }
        // Report a storage failure the buffer recovered from (at least once).
        let mut write_failure = buffer.write_failure_unreported().ok().flatten();
        if let Some(f) = &write_failure {
            match buffer.next_gateway_event_sequence().await {
                Ok(seq) => batch.gateway_events.push(write_failure_event(
                    f,
                    seq,
                    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64,
                )),
                Err(_) => write_failure = None,
            }
        }
        if let Some(l) = &key_loss {
            if key_loss_seq.is_none() {
                key_loss_seq = buffer.next_gateway_event_sequence().await.ok();
            }
            if let Some(seq) = key_loss_seq {
                batch.gateway_events.push(key_loss_event(
                    l,
                    seq,
                    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64,
                ));
            }
        }
        let n = items_in(&batch);
        last_send_start = Instant::now();
        // Whether an attempt of this batch may have reached the hub (a
        // failed send may have been stored before its answer was lost).
        let mut reached_before = false;
        loop {
            // A broker's PUBACK (IoT Hub) is delivery of every item sent; the
            // consumer de-duplicates by identity, so it stands for an ack
            // that accepted all of them. The hub's own ack is checked.
            // One trace span per attempt; its traceparent travels in the
            // batch (HTTPS and IoT Hub alike) so the hub's ingest span is
            // its child. Ids and counts only.
            let span = tracing::info_span!(target: telemetry::TRACE_TARGET, "batch_send",
                gateway_id = %cfg.gateway_id, batch_sequence = sequence, items = n,
                lane = ?lane, outcome = tracing::field::Empty);
            batch.traceparent = telemetry::traceparent(&span);
            let sent = uplink
                .send(&batch)
                .instrument(span.clone())
                .await
                .map(|d| match d {
                    Delivery::HubAck(ack) => ack,
                    Delivery::BrokerAck => BatchAck {
                        sequence: batch.sequence,
                        accepted: u32::try_from(n).unwrap_or(u32::MAX),
                        ..Default::default()
                    },
                });
            span.record(
                "outcome",
                match &sent {
                    Ok(ack) if ack_matches(&batch, ack, reached_before) => "delivered",
                    Ok(_) => "ack_mismatch",
                    Err(UplinkError::TooLarge | UplinkError::MessageTooLarge { .. }) => "too_large",
                    Err(_) => "failed",
                },
            );
            drop(span);
            match sent {
                Ok(ack) if ack_matches(&batch, &ack, reached_before) => {
                    if ack.rejected > 0 {
                        tracing::warn!(batch = sequence, rejected = ack.rejected,
                            reasons = ?ack.rejections.iter().map(|r| r.reason).collect::<Vec<_>>(),
                            "hub rejected readings (kept in the hub's rejected store)");
                    }
                    if let Err(e) = buffer.remove(&records).await {
                        // The hub has them; a re-send is de-duplicated there.
                        tracing::error!(error = %e, "deleting delivered records failed");
                    }
                    if overflow_reported {
                        let _ = buffer.mark_dropped_reported(dropped).await;
                    }
                    if let Some(f) = &write_failure {
                        let _ = buffer.mark_write_failure_reported(f).await;
                    }
                    if key_loss_seq.is_some() {
                        key_loss = None;
                        key_loss_seq = None;
                    }
                    if lane == Lane::Backlog {
                        rate.take(n as usize);
                    }
                    if in_outage {
                        // Recovered: what is stored now is backlog; what comes
                        // next is live and goes first.
                        in_outage = false;
                        backlog_end = buffer.next_record_id().unwrap_or(backlog_end);
                        tracing::info!(
                            backlog = buffer.pending_readings(),
                            "uplink recovered; live readings first, backlog behind"
                        );
                    }
                    stats.uplink_up.store(true, Ordering::Relaxed);
                    stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                    stats
                        .readings_acked
                        .fetch_add(u64::from(ack.accepted), Ordering::Relaxed);
                    stats
                        .readings_duplicate
                        .fetch_add(u64::from(ack.duplicates), Ordering::Relaxed);
                    stats
                        .readings_rejected_by_hub
                        .fetch_add(u64::from(ack.rejected), Ordering::Relaxed);
                    tracing::debug!(
                        batch = sequence,
                        lane = ?lane,
                        readings = n,
                        accepted = ack.accepted,
                        duplicates = ack.duplicates,
                        duplicate_batch = ack.duplicate_batch,
                        "batch delivered"
                    );
                    backoff.reset();
                    limit = max;
                    continue 'outer;
                }
                Ok(ack) => {
                    // The hub's answer to this sequence is fixed (it keeps
                    // the ack of the batch it stored under it): re-sending
                    // the same batch can never match. The records stay in
                    // the buffer and go again under a new batch sequence.
                    stats.ack_mismatches.fetch_add(1, Ordering::Relaxed);
                    stats.uplink_up.store(true, Ordering::Relaxed);
                    tracing::error!(
                        batch = sequence,
                        incarnation = format_args!("{:016x}", batch.incarnation),
                        ack_sequence = ack.sequence,
                        duplicate_batch = ack.duplicate_batch,
                        readings = n,
                        accepted = ack.accepted,
                        duplicates = ack.duplicates,
                        rejected = ack.rejected,
                        "hub ack can never match this batch (the hub holds another batch under \
                         this sequence: an earlier buffer of this gateway id, or a hub that \
                         ignores buffer incarnations); records kept, re-sent under a new batch \
                         sequence"
                    );
                    let wait = backoff.next_delay();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return,
                    }
                    continue 'outer;
                }
                Err(UplinkError::TooLarge | UplinkError::MessageTooLarge { .. })
                    if records.len() > 1 =>
                {
                    limit = (limit / 2).max(1);
                    tracing::warn!(
                        batch = sequence,
                        new_limit = limit,
                        "batch too large for the hub; splitting"
                    );
                    continue 'outer;
                }
                Err(e) => {
                    reached_before = true;
                    stats.send_failures.fetch_add(1, Ordering::Relaxed);
                    in_outage = true;
                    stats.uplink_up.store(false, Ordering::Relaxed);
                    tracing::warn!(batch = sequence, error = %e, pending = buffer.pending_readings(), "send failed; will retry");
                    let wait = e.retry_after().unwrap_or_else(|| backoff.next_delay());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return,
                    }
                    continue;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    /// A record of `n` readings for `dev` whose vendor labels make it big.
    fn big_record(dev: &str, id: u64, n: usize, label_len: usize) -> StoredRecord {
        use shared_protocol::v1::Reading;
        StoredRecord {
            key: sled::IVec::from(&id.to_be_bytes()[..]),
            size: 0,
            data: DeviceData {
                device: Some(DeviceInfo {
                    device_id: dev.into(),
                    serial_number: format!("SN-{dev}"),
                    ..Default::default()
                }),
                readings: (0..n)
                    .map(|k| Reading {
                        sequence: id * 10 + k as u64,
                        mdc_code: 150_456,
                        vendor_label: "x".repeat(label_len + k),
                        gateway_time_us: 1_795_514_400_000_000,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn batches_are_cut_before_the_record_that_would_exceed_the_byte_limit() {
        let mut infos = HashMap::new();
        infos.insert(
            "monitor-1".to_string(),
            DeviceInfo {
                device_id: "monitor-1".into(),
                location: "ICU-3/bed-07".into(),
                model: "MX800".into(),
                ..Default::default()
            },
        );
        let records: Vec<StoredRecord> = (0..40u64)
            .map(|i| {
                let dev = ["monitor-1", "oxi-2", "vent-3"][(i % 3) as usize];
                big_record(dev, i, 1 + (i % 4) as usize, 20 + (i * 37 % 200) as usize)
            })
            .collect();
        // The largest the batch can become: sequence and time at their
        // longest encodings, plus overflow and write-failure reports and a
        // traceparent.
        let worst = |n: usize| {
            let mut b = build_batch("gw-1", u64::MAX, u64::MAX, &records[..n], &infos);
            b.created_time_us = i64::MIN;
            b.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into();
            b.gateway_events
                .push(overflow_event(u64::MAX, u64::MAX, u64::MAX, i64::MIN));
            b.gateway_events.push(write_failure_event(
                &buffer::WriteFailure {
                    since_us: i64::MIN,
                    until_us: i64::MAX,
                    errors: u64::MAX,
                    refused: u64::MAX,
                },
                u64::MAX,
                i64::MIN,
            ));
            b.encoded_len()
        };
        let all = worst(records.len());
        let mut cuts = std::collections::BTreeSet::new();
        for max in (200..all + 100).step_by(7) {
            let n = records_fitting("gw-1", &records, &infos, max);
            assert!(n >= 1);
            cuts.insert(n);
            if n > 1 {
                assert!(worst(n) <= max, "max {max}: {n} records are {}", worst(n));
            }
            if n < records.len() {
                assert!(
                    worst(n + 1) > max,
                    "max {max}: one more record ({}) would still fit",
                    worst(n + 1)
                );
            }
            // A real batch (small sequence, current time) is never larger.
            assert!(build_batch("gw-1", 5, 7, &records[..n], &infos).encoded_len() <= worst(n));
        }
        assert!(cuts.len() > 20, "the cut moves with the limit: {cuts:?}");
        assert_eq!(
            records_fitting("gw-1", &records, &infos, all),
            records.len()
        );
        // A record larger than the limit goes alone, not dropped or stuck.
        let huge = vec![
            big_record("oxi-2", 1, 3, 5000),
            big_record("oxi-2", 2, 1, 10),
        ];
        assert_eq!(records_fitting("gw-1", &huge, &infos, 1024), 1);
        assert_eq!(records_fitting("gw-1", &huge[1..], &infos, 1024), 1);
    }

    #[test]
    fn batch_groups_records_per_device_with_config_info() {
        use shared_protocol::v1::Reading;
        let rec = |dev: &str, seq: u64| StoredRecord {
            key: sled::IVec::from(&seq.to_be_bytes()[..]),
            size: 0,
            data: DeviceData {
                device: Some(DeviceInfo {
                    device_id: dev.into(),
                    serial_number: "SN1".into(),
                    ..Default::default()
                }),
                readings: vec![Reading {
                    sequence: seq,
                    ..Default::default()
                }],
                ..Default::default()
            },
        };
        let mut infos = HashMap::new();
        infos.insert(
            "a".to_string(),
            DeviceInfo {
                device_id: "a".into(),
                location: "bed-1".into(),
                ..Default::default()
            },
        );
        let b = build_batch(
            "gw",
            0x1234,
            9,
            &[rec("a", 1), rec("b", 1), rec("a", 2)],
            &infos,
        );
        assert_eq!((b.sequence, b.incarnation), (9, 0x1234));
        assert_eq!(b.devices.len(), 2);
        let a = &b.devices[0];
        assert_eq!(a.device.as_ref().unwrap().location, "bed-1");
        assert_eq!(a.device.as_ref().unwrap().serial_number, "SN1");
        assert_eq!(
            a.readings.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(items_in(&b), 3);
        let ack = BatchAck {
            sequence: 9,
            accepted: 2,
            duplicates: 1,
            ..Default::default()
        };
        assert!(ack_matches(&b, &ack, false));
        assert!(!ack_matches(
            &b,
            &BatchAck {
                sequence: 8,
                accepted: 3,
                ..Default::default()
            },
            false
        ));
        assert!(!ack_matches(
            &b,
            &BatchAck {
                sequence: 9,
                accepted: 2,
                ..Default::default()
            },
            false
        ));
        // A duplicate_batch answer to a first attempt is another batch's
        // ack, even with agreeing counts; after a failed attempt it may be
        // this batch's own.
        let dup = BatchAck {
            duplicate_batch: true,
            ..ack
        };
        assert!(!ack_matches(&b, &dup, false));
        assert!(ack_matches(&b, &dup, true));
    }
}
