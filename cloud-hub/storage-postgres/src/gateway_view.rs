//! `GatewayViewStore` on PostgreSQL: the dashboard's per-gateway and
//! per-device figures, with the SQLite store's semantics, from three
//! set-based queries (lateral joins instead of one query per gateway and
//! device) sent together and answered from one read-only snapshot.

use std::collections::HashMap;

use hub_storage::{
    BatchCounts, DeviceActivity, GatewayActivity, GatewayViewStore, LastBatch, StoreError,
};
use tokio_postgres::IsolationLevel;

use crate::{DbError, PgStore};

/// Every gateway with its newest batch (by arrival, then sequence:
/// sequences of different buffer incarnations do not compare; none when
/// `$1`, the batches read, is 0), rejection count, buffer overflows (count
/// and newest) and newest buffer-incarnation event.
const GATEWAYS: &str = "SELECT g.id, g.created_us, g.revoked_us,
        (SELECT COUNT(*) FROM rejected_readings r WHERE r.gateway_id = g.id),
        o.n, o.time_us, o.detail, i.time_us, i.detail,
        b.sequence, b.received_us, b.created_us, b.agent_version
   FROM gateways g
   LEFT JOIN LATERAL (
        SELECT COUNT(*) OVER () AS n, e.time_us, e.detail FROM device_events e
         WHERE e.gateway_id = g.id AND e.device_id = '' AND e.kind = 'buffer-overflow'
         ORDER BY e.time_us DESC LIMIT 1) o ON true
   LEFT JOIN LATERAL (
        SELECT e.time_us, e.detail FROM device_events e
         WHERE e.gateway_id = g.id AND e.device_id = '' AND e.kind = 'buffer-incarnation'
         ORDER BY e.time_us DESC LIMIT 1) i ON true
   LEFT JOIN LATERAL (
        SELECT b.sequence, b.received_us, b.created_us, b.agent_version FROM batches b
         WHERE b.gateway_id = g.id
         ORDER BY b.received_us DESC, b.sequence DESC LIMIT LEAST($1::bigint, 1)) b ON true
  ORDER BY g.id";

/// The window: among each gateway's newest `$1` batches, those received at
/// or after `$2` (SQLite walks the newest down to the first one before
/// `$2`; as the order is by arrival first, these are the same rows).
const WINDOW: &str = "SELECT g.id, b.ack
   FROM gateways g
   CROSS JOIN LATERAL (
        SELECT b.ack FROM batches b WHERE b.gateway_id = g.id AND b.received_us >= $2
         ORDER BY b.received_us DESC, b.sequence DESC LIMIT $1) b";

/// Every device with its newest reading (highest sequence; panels have
/// negative ones), newest link event and rejection count.
const DEVICES: &str = "SELECT d.gateway_id, d.device_id, d.protocol, d.manufacturer, d.model,
        d.location, d.first_seen_us, d.last_seen_us, r.effective_us, r.received_us,
        e.kind, e.time_us, e.detail,
        (SELECT COUNT(*) FROM rejected_readings x
          WHERE x.gateway_id = d.gateway_id AND x.device_id = d.device_id)
   FROM devices d
   LEFT JOIN LATERAL (
        SELECT o.effective_us, o.received_us FROM observations o
         WHERE o.gateway_id = d.gateway_id AND o.device_id = d.device_id
         ORDER BY o.sequence DESC LIMIT 1) r ON true
   LEFT JOIN LATERAL (
        SELECT ev.kind, ev.time_us, ev.detail FROM device_events ev
         WHERE ev.gateway_id = d.gateway_id AND ev.device_id = d.device_id
         ORDER BY ev.time_us DESC LIMIT 1) e ON true
  ORDER BY d.gateway_id, d.device_id";

impl PgStore {
    async fn db_gateway_activity(
        &self,
        since_us: i64,
        max_batches: u32,
    ) -> Result<Vec<GatewayActivity>, DbError> {
        let mut c = self.conn().await?;
        let tx = c
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let limit = i64::from(max_batches);
        let (gateways, window, devices) = futures_util::try_join!(
            async { tx.query(GATEWAYS, &[&limit]).await },
            async { tx.query(WINDOW, &[&limit, &since_us]).await },
            tx.query(DEVICES, &[]),
        )?;
        tx.commit().await?;

        let mut windows: HashMap<&str, BatchCounts> = HashMap::new();
        for r in &window {
            windows.entry(r.get(0)).or_default().add(r.get(1));
        }
        let mut by_gateway: HashMap<String, Vec<DeviceActivity>> = HashMap::new();
        for r in &devices {
            let last_reading = r
                .get::<_, Option<i64>>(8)
                .map(|effective| (effective, r.get(9)));
            let last_link_event = r
                .get::<_, Option<String>>(10)
                .map(|kind| (kind, r.get(11), r.get(12)));
            by_gateway
                .entry(r.get(0))
                .or_default()
                .push(DeviceActivity {
                    id: r.get(1),
                    protocol: r.get(2),
                    manufacturer: r.get(3),
                    model: r.get(4),
                    location: r.get(5),
                    first_seen_us: r.get(6),
                    last_seen_us: r.get(7),
                    last_reading,
                    last_link_event,
                    rejected_total: r.get::<_, i64>(13).max(0) as u64,
                });
        }
        Ok(gateways
            .iter()
            .map(|r| {
                let id: String = r.get(0);
                let overflows: Option<i64> = r.get(4);
                let last_overflow = r
                    .get::<_, Option<i64>>(5)
                    .map(|t| (t, r.get::<_, String>(6)));
                let last_incarnation = r
                    .get::<_, Option<i64>>(7)
                    .map(|t| (t, r.get::<_, String>(8)));
                GatewayActivity {
                    created_us: r.get(1),
                    revoked_us: r.get(2),
                    last_batch: r.get::<_, Option<i64>>(9).map(|sequence| LastBatch {
                        sequence,
                        received_us: r.get(10),
                        created_us: r.get(11),
                        agent_version: r.get(12),
                    }),
                    window: windows.get(id.as_str()).copied().unwrap_or_default(),
                    rejected_total: r.get::<_, i64>(3).max(0) as u64,
                    overflows: overflows.unwrap_or(0).max(0) as u64,
                    last_overflow,
                    last_incarnation,
                    devices: by_gateway.remove(&id).unwrap_or_default(),
                    id,
                }
            })
            .collect())
    }
}

impl GatewayViewStore for PgStore {
    fn gateway_activity(
        &self,
        since_us: i64,
        max_batches: u32,
    ) -> Result<Vec<GatewayActivity>, StoreError> {
        self.run(self.db_gateway_activity(since_us, max_batches))
    }
}
