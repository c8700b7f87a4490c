//! The btleplug driver (cargo feature `ble`): BlueZ over D-Bus on Linux.
//!
//! One session: pick the adapter, scan for the device (by configured
//! address, else by any advertised health service), connect, discover the
//! GATT database, read the serial number (Device Information 0x2A25) and the
//! battery level (0x2A19, logged only), subscribe to every known measurement
//! characteristic that notifies or indicates, then decode each value and
//! emit its readings until the link drops or shutdown. [`run`] wraps
//! sessions like `run_serial` does: CONNECTED once per session,
//! DISCONNECTED once per outage, reconnect with exponential backoff.
//!
//! One D-Bus connection serves the driver for its whole life: the btleplug
//! `Manager` (a BlueZ session on the system bus) and the adapter are made
//! once, on the first attempt that succeeds, and reused by every session,
//! reconnect, refused connect and failed scan. (A new `Manager` per session
//! opened a new system-bus connection each time and never closed the old
//! one, until the bus's per-user limit stopped Bluetooth altogether.)
//!
//! There is no silence limit: spot-check devices (cuffs, scales,
//! thermometers) send a measurement now and then and stay quiet otherwise;
//! a lost link is seen by BlueZ (DeviceDisconnected / `Connected = false`).

use std::sync::Arc;
use std::time::Duration;

use btleplug::api::bleuuid::{BleUuid, uuid_from_u16};
use btleplug::api::{
    Central, CentralEvent, CharPropFlags, Characteristic, Manager as _, Peripheral as _,
    ScanFilter, ValueNotification,
};
use btleplug::platform::{Adapter, Manager, Peripheral};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::gatt::{self, uuids};
use super::{Ble, to_readings, user_id};
use crate::session::now_us;
use crate::{DriverError, DriverOutput, DriverStats, RunOptions, SessionCtx, Shutdown};

/// Device Information Service: Serial Number String.
const SERIAL_NUMBER_STRING: u16 = 0x2A25;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const LINK_CHECK: Duration = Duration::from_secs(2);

fn link(e: impl std::fmt::Display) -> DriverError {
    DriverError::Link(std::io::Error::other(e.to_string()))
}

/// Run the BLE driver for one device until shutdown. `address` is the
/// configured device address (`AA:BB:CC:DD:EE:FF`), or `None` to take the
/// first device advertising one of the health services.
pub async fn run(
    ble: Ble,
    device_id: String,
    address: Option<String>,
    opts: RunOptions,
    stats: Arc<DriverStats>,
    tx: mpsc::Sender<DriverOutput>,
    mut shutdown: Shutdown,
) {
    let target = address
        .clone()
        .unwrap_or_else(|| "any health device".into());
    let mut backoff = Duration::from_millis(250);
    let mut down_reported = false;
    let mut outer = shutdown.clone();
    let mut bluez = BluezLink::default();
    loop {
        if *shutdown.borrow() || tx.is_closed() {
            return;
        }
        let (result, was_connected) = {
            let mut ctx = SessionCtx::new(&device_id, &stats, &tx, &mut shutdown, opts.silence);
            let r = tokio::select! {
                r = session(&ble, &mut bluez, address.as_deref(), &mut ctx) => r,
                _ = outer.changed() => Err(DriverError::Shutdown),
            };
            (
                r.err().unwrap_or(DriverError::Shutdown),
                ctx.was_connected(),
            )
        };
        if was_connected {
            down_reported = false;
            backoff = Duration::from_millis(250);
        }
        stats.connected(false);
        match result {
            DriverError::Shutdown | DriverError::Closed => return,
            e => {
                if matches!(e, DriverError::Link(_) | DriverError::Eof) {
                    stats.link_error();
                }
                tracing::warn!(device_id = %device_id, target = %target, kind = super::KIND, error = %e, "BLE session ended; reconnecting");
                if !down_reported {
                    if let Some(kind) = e.technical_kind() {
                        let mut ctx =
                            SessionCtx::new(&device_id, &stats, &tx, &mut shutdown, opts.silence);
                        if ctx.technical(kind, e.to_string()).await.is_err() {
                            return;
                        }
                        down_reported = true;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = outer.changed() => return,
        }
        backoff = (backoff * 2).min(opts.max_backoff);
    }
}

/// Whether the configured Bluetooth adapter is there; its description.
pub async fn check_adapter(ble: &Ble) -> Result<String, DriverError> {
    let manager = Manager::new().await.map_err(link)?;
    let a = adapter(&manager, ble).await?;
    a.adapter_info().await.map_err(link)
}

/// The driver's BlueZ connection and adapter, made once and kept across
/// sessions (see the module docs).
#[derive(Default)]
struct BluezLink {
    manager: Option<Manager>,
    adapter: Option<Adapter>,
}

impl BluezLink {
    /// The adapter, connecting to the system bus on first use only.
    async fn get(&mut self, ble: &Ble) -> Result<&Adapter, DriverError> {
        if self.manager.is_none() {
            self.manager = Some(Manager::new().await.map_err(link)?);
        }
        if self.adapter.is_none() {
            let manager = self.manager.as_ref().expect("set above");
            self.adapter = Some(adapter(manager, ble).await?);
        }
        Ok(self.adapter.as_ref().expect("set above"))
    }
}

async fn adapter(manager: &Manager, ble: &Ble) -> Result<Adapter, DriverError> {
    let adapters = manager.adapters().await.map_err(link)?;
    match &ble.opts.adapter {
        None => adapters
            .into_iter()
            .next()
            .ok_or_else(|| link("no Bluetooth adapter")),
        Some(name) => {
            for a in adapters {
                let info = a.adapter_info().await.map_err(link)?;
                if info.split_whitespace().next() == Some(name.as_str()) {
                    return Ok(a);
                }
            }
            Err(link(format!("no Bluetooth adapter named {name}")))
        }
    }
}

/// Scan until the wanted device shows up or the scan timeout passes.
async fn find(
    central: &Adapter,
    ble: &Ble,
    address: Option<&str>,
    ctx: &mut SessionCtx<'_>,
) -> Result<Peripheral, DriverError> {
    let health: Vec<_> = uuids::HEALTH_SERVICES
        .iter()
        .map(|u| uuid_from_u16(*u))
        .collect();
    let filter = ScanFilter {
        services: if address.is_some() {
            vec![]
        } else {
            health.clone()
        },
    };
    central.start_scan(filter).await.map_err(link)?;
    let limit = Duration::from_millis(ble.opts.scan_timeout_ms.unwrap_or(10_000));
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        for p in central.peripherals().await.map_err(link)? {
            let Some(props) = p.properties().await.map_err(link)? else {
                continue;
            };
            let hit = match address {
                Some(a) => props.address.to_string().eq_ignore_ascii_case(a),
                None => props.services.iter().any(|s| health.contains(s)),
            };
            if hit {
                let _ = central.stop_scan().await;
                return Ok(p);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = central.stop_scan().await;
            return Err(DriverError::Link(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("device not found within {limit:?} of scanning"),
            )));
        }
        ctx.sleep(Duration::from_millis(250)).await?;
    }
}

fn short(c: &Characteristic) -> Option<u16> {
    c.uuid.to_ble_u16()
}

async fn session(
    ble: &Ble,
    bluez: &mut BluezLink,
    address: Option<&str>,
    ctx: &mut SessionCtx<'_>,
) -> Result<(), DriverError> {
    let central = bluez.get(ble).await?;
    let mut events = central.events().await.map_err(link)?;
    let p = find(central, ble, address, ctx).await?;
    let result = connected_session(ble, &p, &mut events, ctx).await;
    if matches!(result, Err(DriverError::Shutdown)) {
        // Best effort: leave the device free for its next connection.
        let _ = tokio::time::timeout(Duration::from_secs(2), p.disconnect()).await;
    }
    result
}

async fn connected_session(
    ble: &Ble,
    p: &Peripheral,
    events: &mut (impl futures_util::Stream<Item = CentralEvent> + Unpin),
    ctx: &mut SessionCtx<'_>,
) -> Result<(), DriverError> {
    if !p.is_connected().await.map_err(link)? {
        tokio::time::timeout(CONNECT_TIMEOUT, p.connect())
            .await
            .map_err(|_| link("connect timed out"))?
            .map_err(link)?;
    }
    p.discover_services().await.map_err(link)?;
    let chars = p.characteristics();
    for c in &chars {
        match short(c) {
            Some(SERIAL_NUMBER_STRING) if c.properties.contains(CharPropFlags::READ) => {
                if let Ok(v) = p.read(c).await {
                    let sn: String = String::from_utf8_lossy(&v)
                        .trim_matches(|ch: char| ch == '\0' || ch.is_whitespace())
                        .chars()
                        .take(64)
                        .collect();
                    if !sn.is_empty() {
                        ctx.set_serial_number(sn);
                    }
                }
            }
            Some(uuids::BATTERY_LEVEL) if c.properties.contains(CharPropFlags::READ) => {
                // No clinical metric: logged for maintenance only.
                if let Ok(v) = p.read(c).await {
                    if let Some(level) = v.first() {
                        tracing::info!(device_id = %ctx.device_id, battery_percent = level, "BLE battery level");
                    }
                }
            }
            _ => {}
        }
    }
    let measurement: Vec<&Characteristic> = chars
        .iter()
        .filter(|c| short(c).is_some_and(|u| uuids::MEASUREMENTS.contains(&u)))
        .filter(|c| {
            c.properties
                .intersects(CharPropFlags::NOTIFY | CharPropFlags::INDICATE)
        })
        .collect();
    if measurement.is_empty() {
        return Err(DriverError::Refused(
            "no supported health measurement characteristic".into(),
        ));
    }
    let mut notes = p.notifications().await.map_err(link)?;
    for c in &measurement {
        p.subscribe(c).await.map_err(link)?;
    }
    tracing::info!(device_id = %ctx.device_id, address = %p.address(), characteristics = measurement.len(), "BLE device connected and subscribed");
    ctx.connected().await?;
    let id = p.id();
    enum Ev {
        Note(Option<ValueNotification>),
        Central(Option<CentralEvent>),
        Tick(Result<(), DriverError>),
    }
    loop {
        let ev = tokio::select! {
            n = notes.next() => Ev::Note(n),
            e = events.next() => Ev::Central(e),
            r = ctx.sleep(LINK_CHECK) => Ev::Tick(r),
        };
        match ev {
            Ev::Note(Some(n)) => handle(ble, &n, ctx).await?,
            Ev::Note(None) | Ev::Central(None) => return Err(DriverError::Eof),
            Ev::Central(Some(CentralEvent::DeviceDisconnected(d))) if d == id => {
                return Err(DriverError::Eof);
            }
            Ev::Central(Some(_)) => {}
            Ev::Tick(r) => {
                r?;
                if !p.is_connected().await.map_err(link)? {
                    return Err(DriverError::Eof);
                }
            }
        }
    }
}

async fn handle(
    ble: &Ble,
    n: &ValueNotification,
    ctx: &mut SessionCtx<'_>,
) -> Result<(), DriverError> {
    ctx.stats.add_bytes(n.value.len());
    let Some(c) = n.uuid.to_ble_u16() else {
        return Ok(());
    };
    match gatt::decode(c, &n.value) {
        None => Ok(()),
        Some(Err(e)) => {
            ctx.stats.frame_error(n.value.len());
            tracing::warn!(device_id = %ctx.device_id, characteristic = format!("{c:#06x}"), error = %e, "BLE value refused");
            Ok(())
        }
        Some(Ok(m)) => {
            ctx.stats.frame_ok();
            if let (Some(want), Some(got)) = (ble.opts.user_id, user_id(&m)) {
                if got != want {
                    tracing::warn!(device_id = %ctx.device_id, characteristic = format!("{c:#06x}"), "BLE measurement of another user dropped");
                    return Ok(());
                }
            }
            let out = to_readings(&m, ble.clock_offset, now_us());
            if out.unknown_bits {
                ctx.stats.unknown_flags();
            }
            if let Some(note) = out.note {
                tracing::info!(device_id = %ctx.device_id, characteristic = format!("{c:#06x}"), note, "BLE measurement not emitted");
            }
            ctx.emit(out.readings, vec![]).await
        }
    }
}
