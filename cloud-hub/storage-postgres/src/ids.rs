//! Observation ids without a per-row index (migration 15), as on SQLite
//! (`hub_sqlite::ids`): a reading's id is its device part (16 hex
//! characters hashed from gateway, device and buffer incarnation) followed
//! by its sequence in 16 hex characters (`ObservationIds`), so
//! `observation_id_devices` and the identity key find it; only the rows
//! whose id does not end in their own sequence (panels, first-scheme ids)
//! keep an index entry (`observations_id_keyed`, partial). A read by id
//! keeps the row whose stored id is the one asked for (a device part two
//! devices share finds both).

use deadpool_postgres::GenericClient;
use hub_domain::fhir::ObservationIds;

use crate::DbError;

/// The condition of the partial index `observations_id_keyed` (migration
/// 15): the rows whose id does not end in their own sequence. One literal
/// for the index and the query, which the server matches to use the index.
macro_rules! id_keyed {
    () => {
        "substr(id, 17) <> lpad(to_hex(sequence), 16, '0')"
    };
}
pub(crate) use id_keyed;

/// SQL: the observation rows (alias `o`, with `devices d` outer-joined)
/// with id `$3`, whose device part is `$1` and sequence `$2` when the id
/// has that form (both NULL otherwise), as `columns`: through
/// `observation_id_devices` and the identity key, or through the partial
/// index of the rows whose id is not their sequence.
pub(crate) fn rows_of(columns: &str) -> String {
    format!(
        "SELECT {columns} FROM observation_id_devices h
           JOIN observations o ON o.gateway_id = h.gateway_id AND o.device_id = h.device_id
            AND o.incarnation = h.incarnation AND o.sequence = $2
           LEFT JOIN devices d ON d.gateway_id = o.gateway_id AND d.device_id = o.device_id
          WHERE h.device_part = $1 AND o.id = $3
         UNION ALL
         SELECT {columns} FROM observations o
           LEFT JOIN devices d ON d.gateway_id = o.gateway_id AND d.device_id = o.device_id
          WHERE o.id = $3 AND {}",
        id_keyed!()
    )
}

/// Records the device parts of the devices of gateway `gateway`,
/// incarnation `incarnation` that a batch stored new rows of (one
/// statement).
pub(crate) async fn record<'a>(
    c: &impl GenericClient,
    gateway: &str,
    incarnation: i64,
    devices: impl Iterator<Item = &'a str>,
) -> Result<(), DbError> {
    let devices: Vec<&str> = devices
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if devices.is_empty() {
        return Ok(());
    }
    let parts: Vec<String> = devices
        .iter()
        .map(|d| {
            ObservationIds::new(gateway, d, incarnation as u64)
                .device_part()
                .to_owned()
        })
        .collect();
    let st = c
        .prepare_cached(
            "INSERT INTO observation_id_devices (device_part, gateway_id, device_id, incarnation)
             SELECT p, $2, d, $4 FROM unnest($1::text[], $3::text[]) AS u(p, d)
             ON CONFLICT DO NOTHING",
        )
        .await?;
    c.execute(&st, &[&parts, &gateway, &devices, &incarnation])
        .await?;
    Ok(())
}

/// Records the device parts of every device with stored rows (migration
/// 15): from the device minutes, which hold each (gateway, device,
/// incarnation).
pub(crate) async fn fill(c: &impl GenericClient) -> Result<(), DbError> {
    let missing = c
        .query(
            "SELECT DISTINCT m.gateway_id, m.device_id, m.incarnation FROM observation_minutes m
              WHERE NOT EXISTS (SELECT 1 FROM observation_id_devices h
                                 WHERE h.gateway_id = m.gateway_id AND h.device_id = m.device_id
                                   AND h.incarnation = m.incarnation)",
            &[],
        )
        .await?;
    let (mut parts, mut gateways, mut devices, mut incarnations) = (vec![], vec![], vec![], vec![]);
    for r in &missing {
        let (g, d, inc): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        parts.push(
            ObservationIds::new(&g, &d, inc as u64)
                .device_part()
                .to_owned(),
        );
        gateways.push(g);
        devices.push(d);
        incarnations.push(inc);
    }
    c.execute(
        "INSERT INTO observation_id_devices (device_part, gateway_id, device_id, incarnation)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
         ON CONFLICT DO NOTHING",
        &[&parts, &gateways, &devices, &incarnations],
    )
    .await?;
    Ok(())
}
