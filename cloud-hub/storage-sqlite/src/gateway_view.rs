//! `GatewayViewStore` on SQLite: the dashboard's per-gateway and per-device
//! figures from `gateways`, `batches`, `devices`, `observations`,
//! `device_events` and `rejected_readings`.

use hub_storage::{
    BatchCounts, DeviceActivity, GatewayActivity, GatewayViewStore, LastBatch, StoreError,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{DbError, SqliteStore};

impl SqliteStore {
    fn db_gateway_activity(
        &self,
        since_us: i64,
        max_batches: u32,
    ) -> Result<Vec<GatewayActivity>, DbError> {
        let conn = self.reader()?;
        let list: Vec<(String, i64, Option<i64>)> = conn
            .prepare("SELECT id, created_us, revoked_us FROM gateways ORDER BY id")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(list.len());
        for (id, created_us, revoked_us) in list {
            // Newest first, stopping at the window: by arrival (index
            // `batches_received`; sequences of different buffer
            // incarnations do not compare), then sequence.
            let mut stmt = conn.prepare_cached(
                "SELECT sequence, received_us, created_us, agent_version, ack FROM batches
                 WHERE gateway_id = ?1 ORDER BY received_us DESC, sequence DESC LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![id, max_batches])?;
            let mut last_batch = None;
            let mut window = BatchCounts::default();
            while let Some(r) = rows.next()? {
                let received: i64 = r.get(1)?;
                if last_batch.is_none() {
                    last_batch = Some(LastBatch {
                        sequence: r.get(0)?,
                        received_us: received,
                        created_us: r.get(2)?,
                        agent_version: r.get(3)?,
                    });
                }
                if received < since_us {
                    break;
                }
                window.add(&r.get::<_, Vec<u8>>(4)?);
            }
            drop(rows);
            let rejected_total: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM rejected_readings WHERE gateway_id = ?1")?
                .query_row([&id], |r| r.get(0))?;
            // The count and the newest overflow event in one pass.
            let (overflows, last_overflow): (i64, Option<(i64, String)>) = conn
                .prepare_cached(
                    "SELECT COUNT(*) OVER (), time_us, detail FROM device_events
                     WHERE gateway_id = ?1 AND device_id = '' AND kind = 'buffer-overflow'
                     ORDER BY time_us DESC LIMIT 1",
                )?
                .query_row([&id], |r| Ok((r.get(0)?, Some((r.get(1)?, r.get(2)?)))))
                .optional()?
                .unwrap_or((0, None));
            let last_incarnation: Option<(i64, String)> = conn
                .prepare_cached(
                    "SELECT time_us, detail FROM device_events
                     WHERE gateway_id = ?1 AND device_id = '' AND kind = 'buffer-incarnation'
                     ORDER BY time_us DESC LIMIT 1",
                )?
                .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let devices = devices_of(&conn, &id)?;
            out.push(GatewayActivity {
                id,
                created_us,
                revoked_us,
                last_batch,
                window,
                rejected_total: rejected_total.max(0) as u64,
                overflows: overflows.max(0) as u64,
                last_overflow,
                last_incarnation,
                devices,
            });
        }
        Ok(out)
    }
}

fn devices_of(conn: &Connection, gateway: &str) -> Result<Vec<DeviceActivity>, DbError> {
    type Row = (String, String, String, String, String, i64, i64);
    let devices: Vec<Row> = conn
        .prepare_cached(
            "SELECT device_id, protocol, manufacturer, model, location, first_seen_us, last_seen_us
             FROM devices WHERE gateway_id = ?1 ORDER BY device_id",
        )?
        .query_map([gateway], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(devices.len());
    for (id, protocol, manufacturer, model, location, first_seen_us, last_seen_us) in devices {
        // The newest reading the device sent (highest sequence; panels
        // have negative sequences).
        let last_reading: Option<(i64, i64)> = conn
            .prepare_cached(
                "SELECT effective_us, received_us FROM observations
                 WHERE gateway_id = ?1 AND device_id = ?2 ORDER BY sequence DESC LIMIT 1",
            )?
            .query_row(params![gateway, id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let last_link_event: Option<(String, i64, String)> = conn
            .prepare_cached(
                "SELECT kind, time_us, detail FROM device_events
                 WHERE gateway_id = ?1 AND device_id = ?2 ORDER BY time_us DESC LIMIT 1",
            )?
            .query_row(params![gateway, id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let rejected: i64 = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM rejected_readings WHERE gateway_id = ?1 AND device_id = ?2",
            )?
            .query_row(params![gateway, id], |r| r.get(0))?;
        out.push(DeviceActivity {
            id,
            protocol,
            manufacturer,
            model,
            location,
            first_seen_us,
            last_seen_us,
            last_reading,
            last_link_event,
            rejected_total: rejected.max(0) as u64,
        });
    }
    Ok(out)
}

impl GatewayViewStore for SqliteStore {
    fn gateway_activity(
        &self,
        since_us: i64,
        max_batches: u32,
    ) -> Result<Vec<GatewayActivity>, StoreError> {
        Ok(self.db_gateway_activity(since_us, max_batches)?)
    }
}
