//! Loading what a device's readings are attributed to at ingest (the bed
//! stays overlapping its placements); the rule itself is
//! `hub_domain::association::DeviceAttribution::of`.

use hub_domain::association::DeviceAttribution;
use hub_storage::Associations;
use rusqlite::{Transaction, params};

use crate::DbError;

/// Loads what covers `[min_us, max_us]` for device `(g, d)`.
pub(crate) fn load(
    tx: &Transaction<'_>,
    gateway_id: &str,
    device_id: &str,
    min_us: i64,
    max_us: i64,
    fallback: &Associations,
) -> Result<DeviceAttribution, DbError> {
    let mut st = tx.prepare_cached(
            "SELECT MAX(p.from_us, s.from_us),
                    MIN(COALESCE(p.to_us, 9223372036854775807), COALESCE(s.to_us, 9223372036854775807)),
                    s.patient_value, s.patient_system
               FROM device_placements p JOIN patient_stays s ON s.bed_id = p.bed_id
              WHERE p.gateway_id = ?1 AND p.device_id = ?2
                AND p.from_us <= ?4 AND COALESCE(p.to_us, 9223372036854775807) > ?3
                AND s.from_us <= ?4 AND COALESCE(s.to_us, 9223372036854775807) > ?3
                AND MAX(p.from_us, s.from_us)
                    < MIN(COALESCE(p.to_us, 9223372036854775807), COALESCE(s.to_us, 9223372036854775807))",
        )?;
    let spans = st
        .query_map(params![gateway_id, device_id, min_us, max_us], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DeviceAttribution {
        spans,
        fallback: fallback
            .get(&(gateway_id.to_owned(), device_id.to_owned()))
            .cloned(),
        ..Default::default()
    })
}
