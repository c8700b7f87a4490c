//! Batch ingest on PostgreSQL: validation and row building as for SQLite,
//! then, in one transaction, the observation rows are bulk-loaded with
//! `COPY … FROM STDIN (FORMAT binary)` into a temporary staging table and
//! moved with one `INSERT … SELECT … ON CONFLICT DO NOTHING` that also
//! attributes each row (subject, else bed stay, else config map, else
//! none) and reports how many were new (accepted) vs already stored
//! (duplicates) for the `BatchAck`.

use std::collections::BTreeMap;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;
use prost::Message;
use shared_protocol::v1::{
    Batch, BatchAck, DeviceData, Reading, RejectReason, Rejection, Validity,
};

use super::{ASSOC_LOCK, PgStore};
use hub_domain::fhir::observation_id;
use hub_domain::fhir::render::{
    BP_PANEL_LOINC, BpKey, RowKind, bp_family_of, bp_key, device_resource_id, panel_id,
};
use hub_domain::ingest::{
    Refusal, technical_kind_name, validate_reading, validate_technical, validate_waveform,
};
use hub_storage::{Associations, IngestReport};

use crate::DbError;

/// One observation row to stage.
struct Staged {
    id: String,
    device_id: String,
    sequence: i64,
    loinc: String,
    mdc_code: i64,
    effective_us: i64,
    status: &'static str,
    value: Option<f64>,
    kind: &'static str,
    category: String,
    payload: Vec<u8>,
    subject_value: Option<String>,
    subject_system: Option<String>,
    config_patient: Option<String>,
    /// Counts in the ack (readings and waveforms; not panel rows).
    counted: bool,
    out_of_range: bool,
}

struct Rejected {
    device_id: String,
    sequence: i64,
    kind: &'static str,
    reason: &'static str,
    detail: String,
    raw: Vec<u8>,
}

struct Event {
    device_id: String,
    sequence: i64,
    kind: String,
    time_us: i64,
    detail: String,
    counted: bool,
}

struct Panel {
    device_id: String,
    effective_us: i64,
    id: String,
    members: Vec<i64>,
}

/// Per connection, once; `client_min_messages` keeps the server's "already
/// exists" notice out of the logs on every later batch.
const STAGE_TABLE: &str = "SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS vigil_obs_stage (
    ord bigint NOT NULL, id text NOT NULL, device_id text NOT NULL, sequence bigint NOT NULL,
    loinc text NOT NULL, mdc_code bigint NOT NULL, effective_us bigint NOT NULL,
    status text NOT NULL, value double precision, kind text NOT NULL, category text NOT NULL,
    payload bytea NOT NULL, subject_value text, subject_system text, config_patient text,
    counted boolean NOT NULL, out_of_range boolean NOT NULL
) ON COMMIT DELETE ROWS";

const STAGE_COPY: &str = "COPY vigil_obs_stage (ord, id, device_id, sequence, loinc, mdc_code,
    effective_us, status, value, kind, category, payload, subject_value, subject_system,
    config_patient, counted, out_of_range) FROM STDIN (FORMAT binary)";

const STAGE_TYPES: &[Type] = &[
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::FLOAT8,
    Type::TEXT,
    Type::TEXT,
    Type::BYTEA,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::BOOL,
    Type::BOOL,
];

/// Moves the staged rows; the first of rows sharing a reading identity
/// wins, as does a row already stored under that identity (also under
/// another effective time, i.e. in another partition).
const STAGE_INSERT: &str = "WITH src AS (
    SELECT DISTINCT ON (device_id, sequence) * FROM vigil_obs_stage ORDER BY device_id, sequence, ord
), ins AS (
    INSERT INTO observations (id, gateway_id, device_id, sequence, patient_id, patient_system,
        attribution, loinc, mdc_code, effective_us, status, value, batch_sequence, received_us,
        resource, kind, category, payload)
    SELECT s.id, $1, s.device_id, s.sequence,
        COALESCE(s.subject_value, st.patient_value, s.config_patient),
        CASE WHEN s.subject_value IS NOT NULL THEN s.subject_system
             WHEN st.patient_value IS NOT NULL THEN st.patient_system END,
        CASE WHEN s.subject_value IS NOT NULL THEN 'subject'
             WHEN st.patient_value IS NOT NULL THEN 'stay'
             WHEN s.config_patient IS NOT NULL THEN 'config'
             ELSE 'unattributed' END,
        s.loinc, s.mdc_code, s.effective_us, s.status, s.value, $2, $3, '', s.kind, s.category,
        s.payload
      FROM src s
      LEFT JOIN LATERAL (
        SELECT ps.patient_system, ps.patient_value
          FROM device_placements p JOIN patient_stays ps ON ps.bed_id = p.bed_id
         WHERE s.subject_value IS NULL AND p.gateway_id = $1 AND p.device_id = s.device_id
           AND p.from_us <= s.effective_us
           AND COALESCE(p.to_us, 9223372036854775807) > s.effective_us
           AND ps.from_us <= s.effective_us
           AND COALESCE(ps.to_us, 9223372036854775807) > s.effective_us
         LIMIT 1) st ON true
     WHERE NOT EXISTS (SELECT 1 FROM observations o
                        WHERE o.gateway_id = $1 AND o.device_id = s.device_id
                          AND o.sequence = s.sequence)
     ORDER BY s.ord
    ON CONFLICT DO NOTHING
    RETURNING id
)
SELECT COUNT(*) FILTER (WHERE s.counted), COUNT(*) FILTER (WHERE s.out_of_range)
  FROM ins JOIN src s ON s.id = ins.id";

impl PgStore {
    /// Stores a batch of an authenticated gateway in one transaction; the
    /// same contract as the SQLite store's `ingest`.
    pub(crate) fn db_ingest(
        &self,
        gateway_id: &str,
        batch: &Batch,
        associations: &Associations,
        received_us: i64,
        now_us: i64,
    ) -> Result<IngestReport, DbError> {
        let batch_seq = batch.sequence as i64;
        let mut ack = BatchAck {
            sequence: batch.sequence,
            ..Default::default()
        };
        let mut reasons = Vec::new();
        let mut rejected: Vec<Rejected> = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        let mut devices = Vec::new();
        let mut staged: Vec<Staged> = Vec::new();
        let mut panels: Vec<Panel> = Vec::new();
        let mut reject =
            |device_id: &str, seq: u64, kind: &'static str, raw: Vec<u8>, f: Refusal| {
                reasons.push(f.reason);
                ack.rejected += 1;
                rejected.push(Rejected {
                    device_id: device_id.to_owned(),
                    sequence: seq as i64,
                    kind,
                    reason: f.reason.as_str_name(),
                    detail: f.detail.clone(),
                    raw,
                });
                ack.rejections.push(Rejection {
                    device_id: device_id.to_owned(),
                    sequence: seq,
                    reason: f.reason as i32,
                    detail: f.detail,
                });
            };
        for e in &batch.gateway_events {
            if validate_technical(e, now_us).is_ok() {
                events.push(Event {
                    device_id: String::new(),
                    sequence: e.sequence as i64,
                    kind: technical_kind_name(e.kind).to_owned(),
                    time_us: e.time_us,
                    detail: e.detail.clone(),
                    counted: false,
                });
            }
        }
        for data in &batch.devices {
            let info = data.device.clone().unwrap_or_default();
            if info.device_id.is_empty() {
                let f = || Refusal {
                    reason: RejectReason::MissingDevice,
                    detail: "device entry has no device_id".into(),
                };
                for r in &data.readings {
                    reject("", r.sequence, "reading", r.encode_to_vec(), f());
                }
                for w in &data.waveforms {
                    reject("", w.sequence, "waveform", w.encode_to_vec(), f());
                }
                for t in &data.technical {
                    reject("", t.sequence, "technical", t.encode_to_vec(), f());
                }
                continue;
            }
            let device_id = info.device_id.clone();
            let config_patient = associations
                .get(&(gateway_id.to_owned(), device_id.clone()))
                .cloned();
            let mut bp_parts: BTreeMap<BpKey, Vec<&Reading>> = BTreeMap::new();
            for r in &data.readings {
                let metric = match validate_reading(r, now_us) {
                    Ok(m) => m,
                    Err(f) => {
                        reject(&device_id, r.sequence, "reading", r.encode_to_vec(), f);
                        continue;
                    }
                };
                let cols = hub_domain::fhir::columns(r, &metric);
                let effective_us = r.effective_time_us();
                let subject = r.subject.as_ref().filter(|s| !s.value.trim().is_empty());
                staged.push(Staged {
                    id: observation_id(gateway_id, &device_id, r.sequence),
                    device_id: device_id.clone(),
                    sequence: r.sequence as i64,
                    loinc: metric.loinc.to_owned(),
                    mdc_code: i64::from(metric.mdc),
                    effective_us,
                    status: cols.status,
                    value: cols.value,
                    kind: RowKind::Reading.as_str(),
                    category: hub_domain::fhir::category(&metric).0.to_owned(),
                    payload: r.encode_to_vec(),
                    subject_value: subject.map(|s| s.value.clone()),
                    subject_system: subject
                        .filter(|s| !s.system.is_empty())
                        .map(|s| s.system.clone()),
                    config_patient: config_patient.clone(),
                    counted: true,
                    out_of_range: cols.out_of_range,
                });
                if let Some(f) = bp_family_of(r.mdc_code) {
                    bp_parts
                        .entry(bp_key(f, effective_us, r))
                        .or_default()
                        .push(r);
                }
            }
            for ((panel_mdc, effective_us, _), parts) in &bp_parts {
                let Some(family) = hub_domain::fhir::render::bp_family(*panel_mdc) else {
                    continue;
                };
                let part = |mdc: u32| parts.iter().find(|r| r.mdc_code == mdc).copied();
                let (Some(sys), Some(_)) = (part(family.systolic), part(family.diastolic)) else {
                    continue;
                };
                let members: Vec<Reading> = [family.systolic, family.diastolic, family.mean]
                    .into_iter()
                    .filter_map(part)
                    .cloned()
                    .collect();
                let pid = panel_id(gateway_id, &device_id, sys.sequence);
                let status = if members
                    .iter()
                    .all(|m| matches!(m.validity(), Validity::Valid | Validity::Invalid))
                {
                    "final"
                } else {
                    "preliminary"
                };
                panels.push(Panel {
                    device_id: device_id.clone(),
                    effective_us: *effective_us,
                    id: pid.clone(),
                    members: members.iter().map(|m| m.sequence as i64).collect(),
                });
                staged.push(Staged {
                    id: pid,
                    device_id: device_id.clone(),
                    // Readings own the non-negative sequences; a panel row
                    // takes -(systolic sequence + 1), as in SQLite.
                    sequence: -(sys.sequence as i64) - 1,
                    loinc: BP_PANEL_LOINC.to_owned(),
                    mdc_code: i64::from(family.mdc),
                    effective_us: *effective_us,
                    status,
                    value: None,
                    kind: RowKind::BpPanel.as_str(),
                    category: "vital-signs".to_owned(),
                    payload: DeviceData {
                        readings: members,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    subject_value: None,
                    subject_system: None,
                    config_patient: config_patient.clone(),
                    counted: false,
                    out_of_range: false,
                });
            }
            for w in &data.waveforms {
                if let Err(f) = validate_waveform(w, now_us) {
                    reject(&device_id, w.sequence, "waveform", w.encode_to_vec(), f);
                    continue;
                }
                staged.push(Staged {
                    id: observation_id(gateway_id, &device_id, w.sequence),
                    device_id: device_id.clone(),
                    sequence: w.sequence as i64,
                    loinc: String::new(),
                    mdc_code: i64::from(w.mdc_code),
                    effective_us: w.start_time_us,
                    status: if matches!(w.validity(), Validity::Valid | Validity::Invalid) {
                        "final"
                    } else {
                        "preliminary"
                    },
                    value: None,
                    kind: RowKind::Waveform.as_str(),
                    category: String::new(),
                    payload: w.encode_to_vec(),
                    subject_value: None,
                    subject_system: None,
                    config_patient: config_patient.clone(),
                    counted: true,
                    out_of_range: false,
                });
            }
            for t in &data.technical {
                if let Err(f) = validate_technical(t, now_us) {
                    reject(&device_id, t.sequence, "technical", t.encode_to_vec(), f);
                    continue;
                }
                events.push(Event {
                    device_id: device_id.clone(),
                    sequence: t.sequence as i64,
                    kind: technical_kind_name(t.kind).to_owned(),
                    time_us: t.time_us,
                    detail: t.detail.clone(),
                    counted: true,
                });
            }
            devices.push(info);
        }

        // DDL outside the ingest transaction.
        self.ensure_partitions(staged.iter().map(|s| s.effective_us))?;

        let mut c = self.conn()?;
        let mut tx = c.transaction()?;
        // Association changes wait for ingests (and vice versa); one
        // gateway's batches are serialized.
        tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&ASSOC_LOCK])?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(1, hashtext($1))",
            &[&gateway_id],
        )?;
        if let Some(row) = tx.query_opt(
            "SELECT ack FROM batches WHERE gateway_id = $1 AND sequence = $2",
            &[&gateway_id, &batch_seq],
        )? {
            let bytes: Vec<u8> = row.get(0);
            let mut ack = BatchAck::decode(bytes.as_slice())?;
            ack.duplicate_batch = true;
            return Ok(IngestReport {
                ack,
                rejected_reasons: Vec::new(),
                out_of_range: 0,
                live: Vec::new(),
            });
        }
        let mut accepted = 0u32;
        let mut duplicates = 0u32;
        if !rejected.is_empty() {
            let st = tx.prepare(
                "INSERT INTO rejected_readings (gateway_id, device_id, batch_sequence, sequence,
                     kind, reason, detail, raw, received_us)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )?;
            for r in &rejected {
                tx.execute(
                    &st,
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
                )?;
            }
        }
        if !devices.is_empty() {
            let st = tx.prepare(
                "INSERT INTO devices (gateway_id, device_id, protocol, manufacturer, model,
                     serial_number, location, first_seen_us, last_seen_us, fhir_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)
                 ON CONFLICT (gateway_id, device_id) DO UPDATE SET fhir_id = excluded.fhir_id,
                     protocol = excluded.protocol, manufacturer = excluded.manufacturer,
                     model = excluded.model, serial_number = excluded.serial_number,
                     location = excluded.location, last_seen_us = excluded.last_seen_us",
            )?;
            for info in &devices {
                tx.execute(
                    &st,
                    &[
                        &gateway_id,
                        &info.device_id,
                        &info.protocol,
                        &info.manufacturer,
                        &info.model,
                        &info.serial_number,
                        &info.location,
                        &received_us,
                        &device_resource_id(gateway_id, &info.device_id),
                    ],
                )?;
            }
        }
        if !events.is_empty() {
            let st = tx.prepare(
                "INSERT INTO device_events (gateway_id, device_id, sequence, kind, time_us,
                     detail, batch_sequence, received_us)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            )?;
            for e in &events {
                let n = tx.execute(
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
                    ],
                )?;
                if e.counted {
                    if n == 0 {
                        duplicates += 1;
                    } else {
                        accepted += 1;
                    }
                }
            }
        }
        let mut out_of_range = 0u32;
        if !staged.is_empty() {
            tx.batch_execute(STAGE_TABLE)?;
            let mut w = BinaryCopyInWriter::new(tx.copy_in(STAGE_COPY)?, STAGE_TYPES);
            for (ord, s) in staged.iter().enumerate() {
                w.write(&[
                    &(ord as i64),
                    &s.id,
                    &s.device_id,
                    &s.sequence,
                    &s.loinc,
                    &s.mdc_code,
                    &s.effective_us,
                    &s.status,
                    &s.value,
                    &s.kind,
                    &s.category,
                    &s.payload,
                    &s.subject_value,
                    &s.subject_system,
                    &s.config_patient,
                    &s.counted,
                    &s.out_of_range,
                ])?;
            }
            w.finish()?;
            let row = tx.query_one(STAGE_INSERT, &[&gateway_id, &batch_seq, &received_us])?;
            let inserted: i64 = row.get(0);
            let oor: i64 = row.get(1);
            let counted = staged.iter().filter(|s| s.counted).count() as i64;
            accepted += inserted as u32;
            duplicates += (counted - inserted).max(0) as u32;
            out_of_range = oor as u32;
            if !panels.is_empty() {
                let st = tx.prepare(
                    "UPDATE observations SET panel_id = $5
                      WHERE gateway_id = $1 AND device_id = $2 AND effective_us = $3
                        AND sequence = ANY($4) AND panel_id IS NULL",
                )?;
                for p in &panels {
                    tx.execute(
                        &st,
                        &[
                            &gateway_id,
                            &p.device_id,
                            &p.effective_us,
                            &p.members,
                            &p.id,
                        ],
                    )?;
                }
            }
        }
        ack.accepted = accepted;
        ack.duplicates = duplicates;
        tx.execute(
            "INSERT INTO batches (gateway_id, sequence, received_us, created_us, agent_version, ack)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &gateway_id,
                &batch_seq,
                &received_us,
                &batch.created_time_us,
                &batch.agent_version,
                &ack.encode_to_vec(),
            ],
        )?;
        tx.commit()?;
        Ok(IngestReport {
            ack,
            rejected_reasons: reasons,
            out_of_range,
            // Alerts run on the SQLite store only (see `alerts`).
            live: Vec::new(),
        })
    }
}
