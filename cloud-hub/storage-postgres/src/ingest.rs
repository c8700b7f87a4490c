//! Batch ingest on PostgreSQL: the plan `hub_domain::ingest::plan` makes
//! (the same rows, attribution and ack as on SQLite; attribution loaded
//! here, per device, inside the transaction), stored in one transaction:
//! the observation rows bulk-loaded with `COPY … FROM STDIN (FORMAT binary)`
//! into a temporary staging table and moved with one `INSERT … SELECT … ON
//! CONFLICT DO NOTHING RETURNING id`, whose ids tell which rows were new.

use std::collections::{HashMap, HashSet};

use futures_util::future::try_join_all;
use hub_domain::association::DeviceAttribution;
use hub_domain::ingest;
use hub_storage::{Associations, IngestReport, NewIncarnation};
use prost::Message;
use shared_protocol::v1::{Batch, BatchAck};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use super::{ASSOC_LOCK, PgStore};
use crate::DbError;
use crate::privacy;

/// The stored reading identities of a gateway's devices within each
/// device's span of sequences (`$2` devices, `$3` lowest, `$4` highest
/// sequence, `$5` incarnation): one index range scan per device (`OFFSET
/// 0` keeps the lateral subquery a parameterized scan of the identity
/// index, whatever the planner believes of the table's size), not a probe
/// per row nor a scan of all of the gateway's rows.
const STORED_IDENTITIES: &str = "SELECT o.device_id, o.sequence
  FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS r(device_id, lo, hi),
       LATERAL (SELECT device_id, sequence FROM observations
                 WHERE gateway_id = $1 AND device_id = r.device_id AND incarnation = $5
                   AND sequence BETWEEN r.lo AND r.hi
                OFFSET 0) o";

/// The new rows of a batch, copied into `table`: `observations` (each row
/// routed to its monthly partition, which exists before the transaction),
/// or the one partition that holds them all (no routing per row).
fn observations_copy(table: &str) -> String {
    format!(
        "COPY {table} (id, gateway_id, device_id, sequence, patient_id, patient_system,
             attribution, loinc, mdc_code, effective_us, status, value, batch_sequence,
             received_us, kind, category, payload, incarnation, hub_layout)
         FROM STDIN (FORMAT binary)"
    )
}

/// The partition that holds every time of `times` when there is one.
fn one_partition(mut times: impl Iterator<Item = i64>) -> Option<String> {
    let first = times.next()?;
    let (start, end, name) = crate::schema::month_of(first);
    let within = |t: i64| (start..end).contains(&t);
    (within(first) && times.all(within)).then_some(name)
}

/// The layout every row is written with (`hub_layout`): the migration
/// that last changed what ingest keeps beside a row. Migration 15 fenced
/// off hubs that do not write the column (they miss the device minutes);
/// migration 16 renamed it, fencing off hubs that write it by its old
/// name, `layout` (they miss the search totals).
const LAYOUT: i16 = 16;

const OBSERVATIONS_TYPES: &[Type] = &[
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::FLOAT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::BYTEA,
    Type::INT8,
    Type::INT2,
];

/// The bed stays overlapping the placements of each device `$2[i]` of
/// gateway `$1` within `[$3[i], $4[i]]`, as `[from, to)` pieces with the
/// patient, each row led by `i` (1-based).
const ATTRIBUTION_SPANS: &str = "SELECT q.i, GREATEST(p.from_us, s.from_us),
        LEAST(COALESCE(p.to_us, 9223372036854775807), COALESCE(s.to_us, 9223372036854775807)),
        s.patient_value, s.patient_system
   FROM unnest($2::text[], $3::bigint[], $4::bigint[]) WITH ORDINALITY AS q(device_id, lo, hi, i)
   JOIN device_placements p ON p.gateway_id = $1 AND p.device_id = q.device_id
    AND p.from_us <= q.hi AND COALESCE(p.to_us, 9223372036854775807) > q.lo
   JOIN patient_stays s ON s.bed_id = p.bed_id
    AND s.from_us <= q.hi AND COALESCE(s.to_us, 9223372036854775807) > q.lo
  WHERE GREATEST(p.from_us, s.from_us)
        < LEAST(COALESCE(p.to_us, 9223372036854775807), COALESCE(s.to_us, 9223372036854775807))";

/// Effective times of the rows a batch can store (valid readings and
/// waveforms): their monthly partitions must exist before the transaction.
fn storable_times(batch: &Batch, now_us: i64) -> Vec<i64> {
    let mut times = Vec::new();
    for d in &batch.devices {
        if d.device.as_ref().is_none_or(|i| i.device_id.is_empty()) {
            continue;
        }
        times.extend(
            d.readings
                .iter()
                .filter(|r| ingest::validate_reading(r, now_us).is_ok())
                .map(|r| r.effective_time_us()),
        );
        times.extend(
            d.waveforms
                .iter()
                .filter(|w| ingest::validate_waveform(w, now_us).is_ok())
                .map(|w| w.start_time_us),
        );
    }
    times
}

impl PgStore {
    /// Stores a batch of an authenticated gateway in one transaction; the
    /// same contract as the SQLite store's `ingest`. Independent statements
    /// (the attribution loads, the device and event upserts) are sent
    /// together: tokio-postgres pipelines them on the connection.
    pub(crate) async fn db_ingest(
        &self,
        gateway_id: &str,
        batch: &Batch,
        associations: &Associations,
        received_us: i64,
        now_us: i64,
        position: Option<&hub_storage::StreamPosition>,
    ) -> Result<IngestReport, DbError> {
        let (incarnation, batch_seq) = ingest::check_batch(batch)?;
        // DDL outside the ingest transaction.
        self.ensure_partitions(storable_times(batch, now_us))
            .await?;

        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        // Association changes wait for ingests (and vice versa); one
        // gateway's batches are serialized. The two locks and the lookup of
        // the batch go out together (pipelined: one round trip) and run in
        // this order.
        let (assoc_lock, gateway_lock, stored_ack) = futures_util::try_join!(
            tx.prepare_cached("SELECT pg_advisory_xact_lock_shared($1)"),
            tx.prepare_cached("SELECT pg_advisory_xact_lock(1, hashtext($1))"),
            tx.prepare_cached(
                "SELECT ack FROM batches
                  WHERE gateway_id = $1 AND incarnation = $2 AND sequence = $3",
            ),
        )?;
        let gateway_arg: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&gateway_id];
        let batch_args: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&gateway_id, &incarnation, &batch_seq];
        let (_, _, stored_ack) = futures_util::try_join!(
            tx.execute(&assoc_lock, &[&ASSOC_LOCK]),
            tx.execute(&gateway_lock, &gateway_arg),
            tx.query_opt(&stored_ack, &batch_args),
        )?;
        if let Some(row) = stored_ack {
            let bytes: Vec<u8> = row.get(0);
            let mut ack = BatchAck::decode(bytes.as_slice())?;
            ack.duplicate_batch = true;
            // A re-sent batch read from a stream still moves its offset.
            if let Some(p) = position {
                crate::stream::write_offset(&tx, p).await?;
                tx.commit().await?;
            }
            return Ok(IngestReport {
                ack,
                rejected_reasons: Vec::new(),
                out_of_range: 0,
                live: Vec::new(),
                new_incarnation: None,
                erased: 0,
            });
        }
        // The first batch of a buffer incarnation this hub has not seen.
        let new_incarnation = if incarnation == 0
            || tx
                .query_opt(
                    "SELECT 1 FROM batches WHERE gateway_id = $1 AND incarnation = $2 LIMIT 1",
                    &[&gateway_id, &incarnation],
                )
                .await?
                .is_some()
        {
            None
        } else {
            let previous = tx
                .query_opt(
                    "SELECT incarnation FROM batches WHERE gateway_id = $1
                      ORDER BY received_us DESC LIMIT 1",
                    &[&gateway_id],
                )
                .await?
                .map(|r| r.get::<_, i64>(0));
            Some(NewIncarnation {
                incarnation,
                previous,
            })
        };
        // What covers each device entry's span, loaded ahead: one
        // statement for all of them, and one for their erased windows, in
        // one round trip; the plan asks for exactly these
        // (`attribution_queries`). Rows carry their query's 1-based index.
        let mut wanted = ingest::attribution_queries(batch);
        // Each once: a row is filed under its query's key.
        wanted.sort_unstable();
        wanted.dedup();
        // (attribution spans, erased windows) per query.
        type Loaded = (Vec<tokio_postgres::Row>, Vec<tokio_postgres::Row>);
        let mut loaded: HashMap<(&str, i64, i64), Loaded> =
            wanted.iter().map(|q| (*q, Loaded::default())).collect();
        if !wanted.is_empty() {
            let (spans, erased) = futures_util::try_join!(
                tx.prepare_cached(ATTRIBUTION_SPANS),
                tx.prepare_cached(privacy::ERASED_WINDOWS),
            )?;
            let devices: Vec<&str> = wanted.iter().map(|q| q.0).collect();
            let los: Vec<i64> = wanted.iter().map(|q| q.1).collect();
            let his: Vec<i64> = wanted.iter().map(|q| q.2).collect();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [&gateway_id, &devices, &los, &his];
            let (spans, erased) =
                futures_util::try_join!(tx.query(&spans, &params), tx.query(&erased, &params))?;
            let query = |r: &tokio_postgres::Row| {
                usize::try_from(r.get::<_, i64>(0) - 1)
                    .ok()
                    .and_then(|i| wanted.get(i))
                    .copied()
            };
            for r in spans {
                if let Some(q) = query(&r) {
                    loaded.entry(q).or_default().0.push(r);
                }
            }
            for r in erased {
                if let Some(q) = query(&r) {
                    loaded.entry(q).or_default().1.push(r);
                }
            }
        }
        // Erased patients: only a batch with readings that name their
        // patient needs them (the HL7 path).
        let subjects = if ingest::names_patients(batch) {
            privacy::erased_subjects(&tx)
                .await?
                .map(std::sync::Arc::new)
        } else {
            None
        };
        let mut plan = ingest::plan(gateway_id, batch, now_us, |device, lo, hi| {
            let (rows, erased) = loaded.get(&(device, lo, hi)).ok_or_else(|| {
                DbError::Pool(format!(
                    "attribution of device `{device}` was not loaded ahead (a bug)"
                ))
            })?;
            Ok::<_, DbError>(DeviceAttribution {
                spans: rows
                    .iter()
                    .map(|r| (r.get(1), r.get(2), r.get(3), r.get(4)))
                    .collect(),
                fallback: associations
                    .get(&(gateway_id.to_owned(), device.to_owned()))
                    .cloned(),
                erased: erased.iter().map(|r| (r.get(1), r.get(2))).collect(),
                erased_subjects: subjects.clone(),
            })
        })?;
        if let Some(n) = &new_incarnation {
            plan.events.push(ingest::incarnation_event(
                n.incarnation,
                n.previous,
                received_us,
            ));
        }
        if !plan.rejected.is_empty() {
            let st = tx
                .prepare_cached(
                    "INSERT INTO rejected_readings (gateway_id, device_id, batch_sequence, sequence,
                         kind, reason, detail, raw, received_us)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .await?;
            let (tx, st) = (&tx, &st);
            try_join_all(plan.rejected.iter().map(|r| async move {
                tx.execute(
                    st,
                    &[
                        &gateway_id,
                        &r.device_id,
                        &batch_seq,
                        &r.sequence,
                        &r.kind,
                        &r.reason,
                        &r.detail,
                        &r.raw,
                        &received_us,
                    ],
                )
                .await
            }))
            .await?;
        }
        if !plan.devices.is_empty() {
            // One statement for all devices. A device listed in several
            // entries is upserted once, with its last entry (the result of
            // upserting each in turn, as on SQLite).
            // A set, not a scan of `last`: a batch may list many entries.
            let mut seen = HashSet::with_capacity(plan.devices.len());
            let last: Vec<&ingest::DeviceUpsert> = plan
                .devices
                .iter()
                .rev()
                .filter(|d| seen.insert(d.info.device_id.as_str()))
                .collect();
            let col = |f: fn(&ingest::DeviceUpsert) -> &str| -> Vec<&str> {
                last.iter().map(|d| f(d)).collect()
            };
            let st = tx
                .prepare_cached(
                    "INSERT INTO devices (gateway_id, device_id, protocol, manufacturer, model,
                         serial_number, location, first_seen_us, last_seen_us, fhir_id)
                     SELECT $1, d.device_id, d.protocol, d.manufacturer, d.model,
                            d.serial_number, d.location, $8, $8, d.fhir_id
                       FROM unnest($2::text[], $3::text[], $4::text[], $5::text[],
                                   $6::text[], $7::text[], $9::text[])
                            AS d(device_id, protocol, manufacturer, model, serial_number,
                                 location, fhir_id)
                     ON CONFLICT (gateway_id, device_id) DO UPDATE SET fhir_id = excluded.fhir_id,
                         protocol = excluded.protocol, manufacturer = excluded.manufacturer,
                         model = excluded.model, serial_number = excluded.serial_number,
                         location = excluded.location, last_seen_us = excluded.last_seen_us",
                )
                .await?;
            tx.execute(
                &st,
                &[
                    &gateway_id,
                    &col(|d| &d.info.device_id),
                    &col(|d| &d.info.protocol),
                    &col(|d| &d.info.manufacturer),
                    &col(|d| &d.info.model),
                    &col(|d| &d.info.serial_number),
                    &col(|d| &d.info.location),
                    &received_us,
                    &col(|d| &d.fhir_id),
                ],
            )
            .await?;
        }
        let mut event_new = Vec::with_capacity(plan.events.len());
        if !plan.events.is_empty() {
            let st = tx
                .prepare_cached(
                    "INSERT INTO device_events (gateway_id, device_id, sequence, kind, time_us,
                         detail, batch_sequence, received_us, incarnation)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                )
                .await?;
            // Sequential: of two events with one identity the first wins.
            for e in &plan.events {
                let n = tx
                    .execute(
                        &st,
                        &[
                            &gateway_id,
                            &e.device_id,
                            &e.sequence,
                            &e.kind,
                            &e.time_us,
                            &e.detail,
                            &batch_seq,
                            &received_us,
                            &incarnation,
                        ],
                    )
                    .await?;
                event_new.push(n > 0);
            }
        }
        let mut row_new = Vec::with_capacity(plan.rows.len());
        if !plan.rows.is_empty() {
            // Which of the batch's reading identities are stored already:
            // one index range scan per device over the batch's span of
            // sequences. The gateway's advisory lock (above) keeps another
            // transaction from storing any of them before this one commits.
            let mut spans: HashMap<&str, (i64, i64)> = HashMap::new();
            for r in &plan.rows {
                let span = spans
                    .entry(r.device_id.as_str())
                    .or_insert((r.sequence, r.sequence));
                span.0 = span.0.min(r.sequence);
                span.1 = span.1.max(r.sequence);
            }
            let devices: Vec<&str> = spans.keys().copied().collect();
            let los: Vec<i64> = devices.iter().map(|d| spans[d].0).collect();
            let his: Vec<i64> = devices.iter().map(|d| spans[d].1).collect();
            let mut stored: HashMap<String, HashSet<i64>> = HashMap::new();
            let stored_identities = tx.prepare_cached(STORED_IDENTITIES).await?;
            for row in tx
                .query(
                    &stored_identities,
                    &[&gateway_id, &devices, &los, &his, &incarnation],
                )
                .await?
            {
                stored.entry(row.get(0)).or_default().insert(row.get(1));
            }
            // New: not stored, and the first occurrence in the batch (a
            // repeated identity is a duplicate, as on SQLite).
            let mut seen = HashSet::new();
            for r in &plan.rows {
                let is_stored = stored
                    .get(r.device_id.as_str())
                    .is_some_and(|seqs| seqs.contains(&r.sequence));
                row_new.push(!is_stored && seen.insert((r.device_id.as_str(), r.sequence)));
            }
            // The new rows straight into their partitions: one binary COPY,
            // no staging table.
            let new_rows = || plan.rows.iter().zip(&row_new).filter(|(_, n)| **n);
            if row_new.iter().any(|n| *n) {
                let table = one_partition(new_rows().map(|(r, _)| r.effective_us))
                    .unwrap_or_else(|| "observations".into());
                let copy = tx.prepare_cached(&observations_copy(&table)).await?;
                let sink = tx.copy_in(&copy).await?;
                let mut w = std::pin::pin!(BinaryCopyInWriter::new(sink, OBSERVATIONS_TYPES));
                for (r, _) in new_rows() {
                    w.as_mut()
                        .write(&[
                            &r.id,
                            &gateway_id,
                            &r.device_id,
                            &r.sequence,
                            &r.patient,
                            &r.patient_system,
                            &r.attribution,
                            &r.loinc,
                            &i64::from(r.mdc_code),
                            &r.effective_us,
                            &r.status,
                            &r.value,
                            &batch_seq,
                            &received_us,
                            &r.kind.as_str(),
                            &r.category,
                            &r.payload,
                            &incarnation,
                            &LAYOUT,
                        ])
                        .await?;
                }
                w.finish().await?;
                // Their device minutes and the device parts of their ids.
                futures_util::try_join!(
                    crate::minutes::record(
                        &tx,
                        gateway_id,
                        incarnation,
                        new_rows().map(|(r, _)| (r.device_id.as_str(), r.sequence, r.effective_us)),
                    ),
                    crate::ids::record(
                        &tx,
                        gateway_id,
                        incarnation,
                        new_rows().map(|(r, _)| r.device_id.as_str()),
                    ),
                    // The search totals of the new rows, before the panel
                    // updates below take the parts out again.
                    crate::hours::record(
                        &tx,
                        new_rows().filter_map(|(r, _)| {
                            Some((r.patient.as_deref()?, r.mdc_code, r.loinc, r.effective_us))
                        }),
                    ),
                )?;
            }
            if !plan.panels.is_empty() {
                let st = tx
                    .prepare_cached(
                        "UPDATE observations SET panel_id = $5
                          WHERE gateway_id = $1 AND device_id = $2 AND effective_us = $3
                            AND incarnation = $6 AND sequence = ANY($4) AND panel_id IS NULL",
                    )
                    .await?;
                let members: Vec<Vec<i64>> = plan
                    .panels
                    .iter()
                    .map(|p| p.members.iter().map(|m| m.0).collect())
                    .collect();
                let (tx, st) = (&tx, &st);
                try_join_all(
                    plan.panels
                        .iter()
                        .zip(&members)
                        .map(|(p, members)| async move {
                            tx.execute(
                                st,
                                &[
                                    &gateway_id,
                                    &p.device_id,
                                    &p.effective_us,
                                    members,
                                    &p.panel_id,
                                    &incarnation,
                                ],
                            )
                            .await
                        }),
                )
                .await?;
            }
        }
        let mut outcome = ingest::outcome(gateway_id, plan, &row_new, &event_new);
        // The chart buckets of the new usable values and the batch's ack,
        // in this transaction (pipelined).
        let insert_batch = tx
            .prepare_cached(
                "INSERT INTO batches (gateway_id, sequence, received_us, created_us, agent_version,
                     ack, incarnation)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await?;
        let ack = outcome.ack.encode_to_vec();
        let rollup = std::mem::take(&mut outcome.rollup);
        let merge = tx.prepare_cached(crate::trends::MERGE).await?;
        futures_util::try_join!(crate::trends::write(&tx, &merge, rollup), async {
            tx.execute(
                &insert_batch,
                &[
                    &gateway_id,
                    &batch_seq,
                    &received_us,
                    &batch.created_time_us,
                    &batch.agent_version,
                    &ack,
                    &incarnation,
                ],
            )
            .await
            .map_err(DbError::from)
        })?;
        if let Some(p) = position {
            crate::stream::write_offset(&tx, p).await?;
        }
        tx.commit().await?;
        Ok(IngestReport {
            ack: outcome.ack,
            rejected_reasons: outcome.reasons,
            out_of_range: outcome.out_of_range,
            live: outcome.live,
            new_incarnation,
            erased: outcome.erased,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::one_partition;

    #[test]
    fn a_batch_within_one_month_copies_into_its_partition() {
        // 2026-11-24T02:40:00Z and the last microsecond of November.
        let t = 1_795_514_400_000_000;
        let end_of_november = 1_796_083_200_000_000 - 1;
        assert_eq!(
            one_partition([t, end_of_november, t].into_iter()).as_deref(),
            Some("observations_y2026m11")
        );
        // Rows of two months go through the parent's routing.
        assert_eq!(one_partition([t, end_of_november + 1].into_iter()), None);
        assert_eq!(one_partition(std::iter::empty()), None);
    }
}
