//! Observation ids without a per-row index (schema v23). A reading's id is
//! its device part (16 hex characters hashed from gateway, device and
//! buffer incarnation: `hub_domain::fhir::ObservationIds`) followed by its
//! sequence in 16 hex characters, so the identity key (gateway, device,
//! incarnation, sequence) finds it once the device part is known.
//! `observation_id_devices` maps each device part to its devices (one row
//! per gateway, device and incarnation, written as their first rows are
//! stored), and only the rows whose id does not end in their own sequence
//! (blood-pressure panels, readings stored under the first id scheme) keep
//! an index entry (`observations_id`, partial). Ingest adds three index
//! entries per reading instead of four (issue 18: on one machine the ingest
//! bench went from 89 % to 101–104 % of the raw insert limit).
//!
//! A read by id goes both ways and keeps the row whose stored id is the one
//! asked for: a device part shared by two devices (a 64-bit hash collision)
//! finds both, and the stored id tells them apart.

use hub_domain::fhir::ObservationIds;
use rusqlite::{Connection, Transaction, params};

/// The condition of the partial index `observations_id` on table alias
/// `x`: the rows whose id does not end in their own sequence. SQLite uses
/// the index only for a query that states this condition.
macro_rules! id_keyed {
    ($x:literal) => {
        concat!(
            "substr(",
            $x,
            ".id, 17) <> printf('%016x', ",
            $x,
            ".sequence)"
        )
    };
}
#[cfg(test)]
pub(crate) use id_keyed;

/// SQL: the rowid of the observation with id `?3`, whose device part is
/// `?1` and sequence `?2` when the id has that form (both NULL otherwise):
/// through `observation_id_devices` and the identity key, or through the
/// index of the rows whose id is not their sequence. The caller keeps only
/// the row whose `id` is `?3`.
pub(crate) const ROWID_OF: &str = concat!(
    "SELECT x.rowid FROM observation_id_devices h
       JOIN observations x ON x.gateway_id = h.gateway_id AND x.device_id = h.device_id
        AND x.incarnation = h.incarnation AND x.sequence = ?2
      WHERE h.device_part = ?1
     UNION ALL
     SELECT x.rowid FROM observations x WHERE x.id = ?3 AND ",
    id_keyed!("x")
);

/// Records the device parts of the devices of gateway `gateway`,
/// incarnation `incarnation` that a batch stored new rows of.
pub(crate) fn record<'a>(
    tx: &Transaction<'_>,
    gateway: &str,
    incarnation: i64,
    devices: impl Iterator<Item = &'a str>,
) -> rusqlite::Result<()> {
    let devices: std::collections::BTreeSet<&str> = devices.collect();
    if devices.is_empty() {
        return Ok(());
    }
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO observation_id_devices (device_part, gateway_id, device_id,
             incarnation) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for device in devices {
        let part = ObservationIds::new(gateway, device, incarnation as u64);
        insert.execute(params![part.device_part(), gateway, device, incarnation])?;
    }
    Ok(())
}

/// Records the device parts of every device with stored rows (migration
/// v23, and a bulk load that writes `observations` directly): from the
/// device minutes, which hold each (gateway, device, incarnation).
pub fn fill(c: &Connection) -> rusqlite::Result<()> {
    let devices: Vec<(String, String, i64)> = c
        .prepare(
            "SELECT DISTINCT gateway_id, device_id, incarnation FROM observation_minutes
              WHERE NOT EXISTS (SELECT 1 FROM observation_id_devices h
                 WHERE h.gateway_id = observation_minutes.gateway_id
                   AND h.device_id = observation_minutes.device_id
                   AND h.incarnation = observation_minutes.incarnation)",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut insert = c.prepare(
        "INSERT OR IGNORE INTO observation_id_devices (device_part, gateway_id, device_id,
             incarnation) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (g, d, inc) in devices {
        let part = ObservationIds::new(&g, &d, inc as u64);
        insert.execute(params![part.device_part(), g, d, inc])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The partial index's condition holds for exactly the rows whose id
    /// is not a reading id of their own sequence: a panel's hashed id, an
    /// id of the first scheme; not a reading's id (negative sequences
    /// print as their 64-bit pattern).
    #[test]
    fn only_rows_whose_id_is_not_their_sequence_are_indexed() {
        let c = Connection::open_in_memory().unwrap();
        let ids = ObservationIds::new("g", "d", 0);
        let keyed = |id: &str, seq: i64| -> bool {
            c.query_row(
                concat!(
                    "SELECT ",
                    id_keyed!("x"),
                    " FROM (SELECT ?1 AS id, ?2 AS sequence) x"
                ),
                params![id, seq],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert!(!keyed(&ids.id(5), 5));
        assert!(!keyed(&ids.id(0), 0));
        assert!(!keyed(&ids.id(i64::MAX as u64), i64::MAX));
        assert!(keyed(&ids.id(5), 6));
        // An id of the first scheme (a hash of gateway, device and
        // sequence), and a panel's.
        assert!(keyed("5f2c1e0d9b8a7f6e5d4c3b2a19081726", 5));
        assert!(keyed("00112233445566778899aabbccddeeff", -3));
        assert!(!keyed("0011223344556677fffffffffffffffd", -3));
    }
}
