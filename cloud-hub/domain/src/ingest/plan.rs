//! The plan of a batch: what a storage backend writes, decided once.
//!
//! [`plan`] validates every entry of a [`Batch`] and turns it into rows:
//! rejected readings (with their reason), device upserts, device and
//! gateway events, observation rows (readings, blood-pressure panels,
//! waveforms) each with its final patient (the attribution rule,
//! [`DeviceAttribution::of`]), and the panel memberships. A backend stores
//! the plan in one transaction (de-duplicating by reading identity) and
//! reports which observation rows and events were new; [`outcome`] then
//! computes the ack counts, the chart buckets of the new usable values and
//! the live values for the alerts. So both backends store exactly the same
//! rows and answer exactly the same ack.

use std::collections::BTreeMap;

use prost::Message;
use shared_protocol::v1::{
    Batch, BatchAck, DeviceData, DeviceInfo, Reading, RejectReason, Rejection, Validity,
};

use super::{
    BatchRefused, Refusal, check_batch, stored_sequence, technical_kind_name, validate_reading,
    validate_technical, validate_waveform,
};
use crate::alerts::{LIVE_WINDOW_US, LiveValue};
use crate::association::{DeviceAttribution, PatientId};
use crate::early_warning::{Parameter, parameter_of};
use crate::fhir::render::{
    BP_PANEL_LOINC, RowKind, bp_family, bp_family_of, bp_key, device_resource_id, panel_id_in,
};
use crate::fhir::{ObservationIds, category, columns};
use crate::trends::{Rollup, chart_value};

/// A refused reading, waveform or technical reading, kept with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedRow {
    pub device_id: String,
    /// The item's sequence; one above `MAX_SEQUENCE` (refused for that) is
    /// kept as `i64::MAX`, never wrapped: `raw` holds the exact value.
    pub sequence: i64,
    /// `reading`, `waveform` or `technical`.
    pub kind: &'static str,
    /// The reason's protobuf name.
    pub reason: &'static str,
    pub detail: String,
    /// The refused item, protobuf-encoded.
    pub raw: Vec<u8>,
}

/// A device event (technical reading) or gateway event (`device_id` empty).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub device_id: String,
    pub sequence: i64,
    pub kind: &'static str,
    pub time_us: i64,
    pub detail: String,
    /// Counts in the ack (device technical readings; not gateway events).
    pub counted: bool,
}

/// One observation row with its attribution.
#[derive(Debug, Clone, PartialEq)]
pub struct ObsRow {
    pub id: String,
    pub device_id: String,
    /// The reading's sequence; a panel row takes -(systolic sequence + 1),
    /// so it never collides with a reading.
    pub sequence: i64,
    pub loinc: &'static str,
    pub mdc_code: u32,
    pub effective_us: i64,
    pub status: &'static str,
    pub value: Option<f64>,
    pub kind: RowKind,
    pub category: &'static str,
    /// The reading or waveform protobuf (a panel: `DeviceData` of its parts).
    pub payload: Vec<u8>,
    pub patient: Option<String>,
    pub patient_system: Option<String>,
    /// `subject`, `stay`, `config` or `unattributed`.
    pub attribution: &'static str,
    /// Counts in the ack (readings and waveforms; not panel rows).
    pub counted: bool,
    pub out_of_range: bool,
    /// The usable value (final, stored) in the metric's chart unit.
    pub chart: Option<f64>,
    /// The score input this reading feeds, when recent enough for alerts.
    pub live: Option<(Parameter, Vec<i32>)>,
}

/// Parts of a blood-pressure panel: their rows point at the panel row.
#[derive(Debug, Clone, PartialEq)]
pub struct PanelLink {
    pub panel_id: String,
    pub device_id: String,
    pub effective_us: i64,
    /// (sequence, observation id) of each part.
    pub members: Vec<(i64, String)>,
}

/// Everything a backend stores for one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestPlan {
    pub batch_sequence: i64,
    /// The batch's buffer incarnation (0: an agent without incarnations).
    pub incarnation: i64,
    /// The ack so far: sequence, rejections (counts follow in [`outcome`]).
    pub ack: BatchAck,
    pub reasons: Vec<RejectReason>,
    pub rejected: Vec<RejectedRow>,
    /// Devices to insert or refresh (entries with a device id).
    pub devices: Vec<DeviceUpsert>,
    pub events: Vec<EventRow>,
    pub rows: Vec<ObsRow>,
    pub panels: Vec<PanelLink>,
    /// Readings and waveforms dropped as an erased patient's data
    /// (`hub_domain::privacy`): neither stored nor counted in the ack.
    pub erased: u32,
}

/// A device as a batch describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceUpsert {
    pub info: DeviceInfo,
    /// Its FHIR Device id.
    pub fhir_id: String,
}

/// What storing a plan did.
#[derive(Debug)]
pub struct IngestOutcome {
    pub ack: BatchAck,
    pub reasons: Vec<RejectReason>,
    pub out_of_range: u32,
    /// New score-input readings for the alerts.
    pub live: Vec<LiveValue>,
    /// Chart buckets of the new usable values.
    pub rollup: Rollup,
    /// Readings dropped as an erased patient's data.
    pub erased: u32,
}

fn rejected_row(
    plan: &mut IngestPlan,
    device_id: &str,
    sequence: u64,
    kind: &'static str,
    raw: Vec<u8>,
    f: Refusal,
) {
    plan.reasons.push(f.reason);
    plan.ack.rejected += 1;
    plan.rejected.push(RejectedRow {
        device_id: device_id.to_owned(),
        sequence: i64::try_from(sequence).unwrap_or(i64::MAX),
        kind,
        reason: f.reason.as_str_name(),
        detail: f.detail.clone(),
        raw,
    });
    plan.ack.rejections.push(Rejection {
        device_id: device_id.to_owned(),
        sequence,
        reason: f.reason as i32,
        detail: f.detail,
    });
}

fn status_of(v: Validity) -> &'static str {
    if matches!(v, Validity::Valid | Validity::Invalid) {
        "final"
    } else {
        "preliminary"
    }
}

/// Plans batch `batch` of gateway `gateway_id` at hub time `now_us` (the
/// "too far in the future" check and the alerts' live window).
/// `attribution(device_id, min_us, max_us)` loads what covers the device's
/// rows in that span (the backend's query); it is called once per device
/// entry that has rows. A batch whose identity cannot be stored
/// ([`check_batch`]) is refused as a whole.
pub fn plan<E: From<BatchRefused>>(
    gateway_id: &str,
    batch: &Batch,
    now_us: i64,
    mut attribution: impl FnMut(&str, i64, i64) -> Result<DeviceAttribution, E>,
) -> Result<IngestPlan, E> {
    let (incarnation, batch_sequence) = check_batch(batch)?;
    let mut plan = IngestPlan {
        batch_sequence,
        incarnation,
        ack: BatchAck {
            sequence: batch.sequence,
            ..Default::default()
        },
        reasons: Vec::new(),
        rejected: Vec::new(),
        devices: Vec::new(),
        events: Vec::new(),
        rows: Vec::new(),
        panels: Vec::new(),
        erased: 0,
    };
    // Gateway-level events: stored once (device_id ""), not counted.
    for e in &batch.gateway_events {
        if let (Ok(()), Ok(sequence)) = (validate_technical(e, now_us), stored_sequence(e.sequence))
        {
            plan.events.push(EventRow {
                device_id: String::new(),
                sequence,
                kind: technical_kind_name(e.kind),
                time_us: e.time_us,
                detail: e.detail.clone(),
                counted: false,
            });
        }
    }
    for data in &batch.devices {
        plan_device(&mut plan, gateway_id, data, now_us, &mut attribution)?;
    }
    Ok(plan)
}

/// Whether a reading of the batch names its patient (its own identifier):
/// the backend then loads the erased patients
/// ([`DeviceAttribution::erased_subjects`]).
pub fn names_patients(batch: &Batch) -> bool {
    batch.devices.iter().any(|d| {
        d.readings.iter().any(|r| {
            r.subject
                .as_ref()
                .is_some_and(|s| !s.value.trim().is_empty())
        })
    })
}

/// The `(device_id, min_us, max_us)` for which [`plan`] calls its
/// `attribution` loader, in call order: one per device entry with a
/// device id and at least one reading or waveform. A backend that loads
/// them ahead (all in one round trip) answers the loader from these.
pub fn attribution_queries(batch: &Batch) -> Vec<(&str, i64, i64)> {
    batch
        .devices
        .iter()
        .filter_map(|d| {
            let id = d.device.as_ref().map(|i| i.device_id.as_str())?;
            if id.is_empty() {
                return None;
            }
            attribution_span(d).map(|(lo, hi)| (id, lo, hi))
        })
        .collect()
}

/// The earliest and latest effective time of a device entry's readings
/// and waveforms (None when it has neither).
fn attribution_span(data: &DeviceData) -> Option<(i64, i64)> {
    let times = data
        .readings
        .iter()
        .map(Reading::effective_time_us)
        .chain(data.waveforms.iter().map(|w| w.start_time_us));
    let (lo, hi) = times.fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)));
    (lo <= hi).then_some((lo, hi))
}

fn plan_device<E>(
    plan: &mut IngestPlan,
    gateway_id: &str,
    data: &DeviceData,
    now_us: i64,
    attribution: &mut impl FnMut(&str, i64, i64) -> Result<DeviceAttribution, E>,
) -> Result<(), E> {
    let info = data.device.clone().unwrap_or_default();
    if info.device_id.is_empty() {
        let f = || Refusal {
            reason: RejectReason::MissingDevice,
            detail: "device entry has no device_id".into(),
        };
        for r in &data.readings {
            rejected_row(plan, "", r.sequence, "reading", r.encode_to_vec(), f());
        }
        for w in &data.waveforms {
            rejected_row(plan, "", w.sequence, "waveform", w.encode_to_vec(), f());
        }
        for t in &data.technical {
            rejected_row(plan, "", t.sequence, "technical", t.encode_to_vec(), f());
        }
        return Ok(());
    }
    let i = &info;
    if [
        &i.device_id,
        &i.protocol,
        &i.manufacturer,
        &i.model,
        &i.serial_number,
        &i.location,
    ]
    .iter()
    .any(|f| super::has_nul(f))
    {
        // Stored as the device id of its rejected rows: without the NUL.
        let shown = i.device_id.replace('\0', "\u{FFFD}");
        let f = || Refusal {
            reason: RejectReason::Malformed,
            detail: "device entry holds a NUL character".into(),
        };
        for r in &data.readings {
            rejected_row(plan, &shown, r.sequence, "reading", r.encode_to_vec(), f());
        }
        for w in &data.waveforms {
            rejected_row(plan, &shown, w.sequence, "waveform", w.encode_to_vec(), f());
        }
        for t in &data.technical {
            rejected_row(
                plan,
                &shown,
                t.sequence,
                "technical",
                t.encode_to_vec(),
                f(),
            );
        }
        return Ok(());
    }
    let device_id = info.device_id.clone();
    plan.devices.push(DeviceUpsert {
        fhir_id: device_resource_id(gateway_id, &device_id),
        info,
    });
    // Who the rows belong to: resolved once for the device over the
    // entry's time span, so each row is written once with its final patient.
    let who = if let Some((lo, hi)) = attribution_span(data) {
        attribution(&device_id, lo, hi)?
    } else {
        DeviceAttribution::default()
    };
    // Blood-pressure parts of this entry, by (panel code, effective time):
    // grouped into panels.
    let mut bp_parts: BTreeMap<_, Vec<&Reading>> = BTreeMap::new();
    let incarnation = batch_incarnation(plan);
    let ids = ObservationIds::new(gateway_id, &device_id, incarnation);
    for r in &data.readings {
        let checked = stored_sequence(r.sequence)
            .and_then(|seq| validate_reading(r, now_us).map(|m| (seq, m)));
        let (sequence, metric) = match checked {
            Ok(m) => m,
            Err(f) => {
                rejected_row(
                    plan,
                    &device_id,
                    r.sequence,
                    "reading",
                    r.encode_to_vec(),
                    f,
                );
                continue;
            }
        };
        let effective_us = r.effective_time_us();
        if who.is_erased(r.subject.as_ref(), effective_us) {
            // An erased patient's data arriving late: never stored.
            plan.erased += 1;
            continue;
        }
        let cols = columns(r, &metric);
        let a = who.of(r.subject.as_ref(), effective_us);
        let chart = cols
            .value
            .filter(|_| cols.status == "final")
            .and_then(|v| chart_value(r, v));
        let live = (effective_us >= now_us - LIVE_WINDOW_US)
            .then(|| parameter_of(r.mdc_code))
            .flatten()
            .map(|p| (p, r.flags.clone()));
        plan.rows.push(ObsRow {
            id: ids.id(r.sequence),
            device_id: device_id.clone(),
            sequence,
            loinc: metric.loinc,
            mdc_code: metric.mdc,
            effective_us,
            status: cols.status,
            value: cols.value,
            kind: RowKind::Reading,
            category: category(&metric).0,
            payload: r.encode_to_vec(),
            patient: a.patient.map(str::to_owned),
            patient_system: a.system.map(str::to_owned),
            attribution: a.how,
            counted: true,
            out_of_range: cols.out_of_range,
            chart,
            live,
        });
        if let Some(f) = bp_family_of(r.mdc_code) {
            bp_parts
                .entry(bp_key(f, effective_us, r))
                .or_default()
                .push(r);
        }
    }
    for ((panel_mdc, effective_us, _), parts) in &bp_parts {
        let Some(family) = bp_family(*panel_mdc) else {
            continue;
        };
        let part = |mdc: u32| parts.iter().find(|r| r.mdc_code == mdc).copied();
        // The profile needs both systolic and diastolic.
        let (Some(sys), Some(_)) = (part(family.systolic), part(family.diastolic)) else {
            continue;
        };
        let members: Vec<Reading> = [family.systolic, family.diastolic, family.mean]
            .into_iter()
            .filter_map(part)
            .cloned()
            .collect();
        let pid = panel_id_in(gateway_id, &device_id, incarnation, sys.sequence);
        let a = who.of(sys.subject.as_ref(), *effective_us);
        // Final only when every part is.
        let status = if members.iter().all(|m| status_of(m.validity()) == "final") {
            "final"
        } else {
            "preliminary"
        };
        plan.panels.push(PanelLink {
            panel_id: pid.clone(),
            device_id: device_id.clone(),
            effective_us: *effective_us,
            members: members
                .iter()
                .map(|m| (m.sequence as i64, ids.id(m.sequence)))
                .collect(),
        });
        plan.rows.push(ObsRow {
            id: pid,
            device_id: device_id.clone(),
            sequence: -(sys.sequence as i64) - 1,
            loinc: BP_PANEL_LOINC,
            mdc_code: family.mdc,
            effective_us: *effective_us,
            status,
            value: None,
            kind: RowKind::BpPanel,
            category: "vital-signs",
            payload: DeviceData {
                readings: members,
                ..Default::default()
            }
            .encode_to_vec(),
            patient: a.patient.map(str::to_owned),
            patient_system: a.system.map(str::to_owned),
            attribution: a.how,
            counted: false,
            out_of_range: false,
            chart: None,
            live: None,
        });
    }
    for w in &data.waveforms {
        let checked =
            stored_sequence(w.sequence).and_then(|seq| validate_waveform(w, now_us).map(|()| seq));
        let sequence = match checked {
            Ok(seq) => seq,
            Err(f) => {
                rejected_row(
                    plan,
                    &device_id,
                    w.sequence,
                    "waveform",
                    w.encode_to_vec(),
                    f,
                );
                continue;
            }
        };
        if who.is_erased(None, w.start_time_us) {
            plan.erased += 1;
            continue;
        }
        let a = who.of(None, w.start_time_us);
        plan.rows.push(ObsRow {
            id: ids.id(w.sequence),
            device_id: device_id.clone(),
            sequence,
            loinc: "",
            mdc_code: w.mdc_code,
            effective_us: w.start_time_us,
            status: status_of(w.validity()),
            value: None,
            kind: RowKind::Waveform,
            category: "",
            payload: w.encode_to_vec(),
            patient: a.patient.map(str::to_owned),
            patient_system: a.system.map(str::to_owned),
            attribution: a.how,
            counted: true,
            out_of_range: false,
            chart: None,
            live: None,
        });
    }
    for t in &data.technical {
        let checked =
            stored_sequence(t.sequence).and_then(|seq| validate_technical(t, now_us).map(|()| seq));
        let sequence = match checked {
            Ok(seq) => seq,
            Err(f) => {
                rejected_row(
                    plan,
                    &device_id,
                    t.sequence,
                    "technical",
                    t.encode_to_vec(),
                    f,
                );
                continue;
            }
        };
        plan.events.push(EventRow {
            device_id: device_id.clone(),
            sequence,
            kind: technical_kind_name(t.kind),
            time_us: t.time_us,
            detail: t.detail.clone(),
            counted: true,
        });
    }
    Ok(())
}

/// The batch's incarnation as the `u64` the ids hash (checked non-negative).
fn batch_incarnation(plan: &IngestPlan) -> u64 {
    u64::try_from(plan.incarnation).unwrap_or(0)
}

/// Kind of the gateway event a hub records when it sees a buffer
/// incarnation of a gateway for the first time.
pub const INCARNATION_EVENT_KIND: &str = "buffer-incarnation";

/// The gateway event (device id "") for the first batch of buffer
/// incarnation `incarnation` (non-zero), received at `received_us`;
/// `previous` is the incarnation of the gateway's newest earlier batch (None:
/// the gateway's first batch). Its sequence is 0, unique per incarnation
/// (the agent's own gateway-event sequences start at 1). Not counted in the
/// ack.
pub fn incarnation_event(incarnation: i64, previous: Option<i64>, received_us: i64) -> EventRow {
    let detail = match previous {
        None => format!("first buffer incarnation {incarnation:016x} of this gateway"),
        Some(0) => format!(
            "new buffer incarnation {incarnation:016x} (before: a buffer without incarnation); \
             the gateway's data directory was created afresh, its sequences restart at 1"
        ),
        Some(p) => format!(
            "new buffer incarnation {incarnation:016x} (before: {p:016x}); the gateway's data \
             directory was created afresh, its sequences restart at 1"
        ),
    };
    EventRow {
        device_id: String::new(),
        sequence: 0,
        kind: INCARNATION_EVENT_KIND,
        time_us: received_us,
        detail,
        counted: false,
    }
}

/// The outcome of a stored plan: `row_new[i]` and `event_new[i]` say
/// whether `plan.rows[i]` / `plan.events[i]` were newly stored (false: a
/// duplicate of a row already stored, or of an earlier row of this batch).
pub fn outcome(
    gateway_id: &str,
    plan: IngestPlan,
    row_new: &[bool],
    event_new: &[bool],
) -> IngestOutcome {
    let mut ack = plan.ack;
    let (mut accepted, mut duplicates, mut out_of_range) = (0u32, 0u32, 0u32);
    let mut rollup = Rollup::default();
    let mut live = Vec::new();
    for (row, &new) in plan.rows.iter().zip(row_new) {
        if !row.counted {
            continue;
        }
        if !new {
            duplicates += 1;
            continue;
        }
        accepted += 1;
        out_of_range += u32::from(row.out_of_range);
        if let (Some(p), Some(v)) = (&row.patient, row.chart) {
            rollup.add(
                p,
                gateway_id,
                &row.device_id,
                row.mdc_code,
                row.effective_us,
                v,
            );
        }
        if let Some((parameter, flags)) = &row.live {
            live.push(LiveValue {
                patient: row.patient.as_ref().map(|p| PatientId {
                    system: row.patient_system.clone().unwrap_or_default(),
                    value: p.clone(),
                }),
                device_id: row.device_id.clone(),
                parameter: *parameter,
                value: row.chart,
                flags: flags.clone(),
                time_us: row.effective_us,
            });
        }
    }
    for (e, &new) in plan.events.iter().zip(event_new) {
        if e.counted {
            if new {
                accepted += 1;
            } else {
                duplicates += 1;
            }
        }
    }
    ack.accepted = accepted;
    ack.duplicates = duplicates;
    IngestOutcome {
        ack,
        reasons: plan.reasons,
        out_of_range,
        live,
        rollup,
        erased: plan.erased,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_protocol::catalogue::codes;
    use shared_protocol::v1::{Identifier, reading};

    const NOW: i64 = 1_800_000_000_000_000;

    fn r(mdc: u32, unit: &str, v: f64, seq: u64) -> Reading {
        Reading {
            mdc_code: mdc,
            value: Some(reading::Value::Numeric(v)),
            ucum_unit: unit.into(),
            device_time_us: NOW - 1_000_000,
            validity: Validity::Valid as i32,
            sequence: seq,
            ..Default::default()
        }
    }

    fn batch(readings: Vec<Reading>) -> Batch {
        Batch {
            gateway_id: "gw".into(),
            sequence: 7,
            devices: vec![DeviceData {
                device: Some(DeviceInfo {
                    device_id: "mon".into(),
                    ..Default::default()
                }),
                readings,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn none(_: &str, _: i64, _: i64) -> Result<DeviceAttribution, BatchRefused> {
        Ok(DeviceAttribution::default())
    }

    #[test]
    fn a_bp_reading_pair_becomes_two_rows_and_a_panel_linked_to_them() {
        let b = batch(vec![
            r(codes::PRESS_BLD_NONINV_SYS, "mm[Hg]", 120.0, 1),
            r(codes::PRESS_BLD_NONINV_DIA, "mm[Hg]", 80.0, 2),
        ]);
        let p = plan("gw", &b, NOW, none).unwrap();
        assert_eq!(p.rows.len(), 3);
        let panel = p.rows.iter().find(|r| r.kind == RowKind::BpPanel).unwrap();
        assert_eq!(panel.sequence, -2, "-(systolic sequence + 1)");
        assert!(!panel.counted);
        assert_eq!(p.panels.len(), 1);
        assert_eq!(p.panels[0].members.len(), 2);
        assert_eq!(p.devices.len(), 1);
    }

    #[test]
    fn the_outcome_counts_new_rows_and_duplicates_and_feeds_trends_only_when_attributed() {
        let mut with_subject = r(codes::PULS_OXIM_SAT_O2, "%", 97.0, 1);
        with_subject.subject = Some(Identifier {
            system: "urn:oid:1.2.3".into(),
            value: "MRN1".into(),
        });
        let b = batch(vec![with_subject, r(codes::PULS_OXIM_SAT_O2, "%", 96.0, 2)]);
        let p = plan("gw", &b, NOW, none).unwrap();
        assert_eq!(p.rows[0].attribution, "subject");
        assert_eq!(p.rows[1].attribution, "unattributed");
        let o = outcome("gw", p.clone(), &[true, false], &[]);
        assert_eq!((o.ack.accepted, o.ack.duplicates), (1, 1));
        assert_eq!(o.live.len(), 1, "only the new row feeds the alerts");
        assert!(
            !o.rollup.is_empty(),
            "the attributed usable value is bucketed"
        );
        let o = outcome("gw", p, &[false, true], &[]);
        assert!(o.rollup.is_empty(), "an unattributed value has no chart");
        assert_eq!(o.live.len(), 1);
    }

    #[test]
    fn an_erased_patients_late_readings_are_dropped_and_counted_not_stored() {
        let salt = [5u8; crate::privacy::KEY_LEN];
        let mut own = r(codes::PULS_OXIM_SAT_O2, "%", 97.0, 1);
        own.subject = Some(Identifier {
            system: "urn:oid:1.2.3".into(),
            value: "MRN1".into(),
        });
        let mut in_window = r(codes::PULS_OXIM_SAT_O2, "%", 96.0, 2);
        in_window.device_time_us = NOW - 2_000_000;
        let kept = r(codes::PULS_OXIM_SAT_O2, "%", 95.0, 3); // NOW - 1 s
        let b = batch(vec![own, in_window, kept]);
        let erased = std::sync::Arc::new(crate::privacy::ErasedSubjects {
            salt,
            erased: vec![(
                crate::privacy::subject_key(&salt, "urn:oid:1.2.3", "MRN1"),
                NOW,
            )],
        });
        let p = plan("gw", &b, NOW, |_, _, _| {
            Ok::<_, BatchRefused>(DeviceAttribution {
                erased: vec![(NOW - 3_000_000, NOW - 1_500_000)],
                erased_subjects: Some(erased.clone()),
                ..Default::default()
            })
        })
        .unwrap();
        assert_eq!(p.erased, 2);
        assert_eq!(p.rows.len(), 1);
        assert_eq!(p.rows[0].sequence, 3);
        let o = outcome("gw", p, &[true], &[]);
        assert_eq!((o.ack.accepted, o.ack.rejected, o.erased), (1, 0, 2));
    }

    #[test]
    fn attribution_queries_are_the_loader_calls_of_the_plan() {
        let mut b = batch(vec![r(codes::PULS_OXIM_SAT_O2, "%", 97.0, 1)]);
        let mut later = r(codes::PULS_OXIM_SAT_O2, "%", 96.0, 2);
        later.device_time_us = NOW - 500_000;
        b.devices[0].readings.push(later);
        // No device id (rejected), no readings (no call), a second entry of the same device.
        b.devices.push(DeviceData {
            readings: vec![r(codes::PULS_OXIM_SAT_O2, "%", 95.0, 3)],
            ..Default::default()
        });
        b.devices.push(DeviceData {
            device: Some(DeviceInfo {
                device_id: "idle".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        b.devices.push(b.devices[0].clone());
        let mut calls = Vec::new();
        plan("gw", &b, NOW, |d, lo, hi| {
            calls.push((d.to_owned(), lo, hi));
            none(d, lo, hi)
        })
        .unwrap();
        let ahead: Vec<(String, i64, i64)> = attribution_queries(&b)
            .into_iter()
            .map(|(d, lo, hi)| (d.to_owned(), lo, hi))
            .collect();
        assert_eq!(ahead, calls);
        assert_eq!(calls[0], ("mon".to_owned(), NOW - 1_000_000, NOW - 500_000));
        assert_eq!(calls.len(), 2);
    }

    #[test]
    fn nul_characters_are_refused_not_left_to_the_store() {
        // A NUL in a device field: the whole entry is rejected, the
        // rejected rows' device id shown without it.
        let mut b = batch(vec![r(codes::PULS_OXIM_SAT_O2, "%", 97.0, 1)]);
        b.devices[0].device.as_mut().unwrap().model = "X\u{0}".into();
        let p = plan("gw", &b, NOW, none).unwrap();
        assert!(p.rows.is_empty() && p.devices.is_empty());
        assert_eq!(p.ack.rejected, 1);
        assert_eq!(p.reasons, vec![RejectReason::Malformed]);
        let mut b = batch(vec![r(codes::PULS_OXIM_SAT_O2, "%", 97.0, 1)]);
        b.devices[0].device.as_mut().unwrap().device_id = "m\u{0}n".into();
        let p = plan("gw", &b, NOW, none).unwrap();
        assert_eq!(p.rejected[0].device_id, "m\u{FFFD}n");
        // In a patient identifier: that reading only.
        let mut bad = r(codes::PULS_OXIM_SAT_O2, "%", 97.0, 2);
        bad.subject = Some(Identifier {
            system: "urn:oid:1.2.3".into(),
            value: "MRN\u{0}1".into(),
        });
        let p = plan(
            "gw",
            &batch(vec![r(codes::PULS_OXIM_SAT_O2, "%", 96.0, 1), bad]),
            NOW,
            none,
        )
        .unwrap();
        assert_eq!((p.rows.len(), p.ack.rejected), (1, 1));
        assert_eq!(p.rejected[0].reason, "REJECT_REASON_MALFORMED");
    }

    #[test]
    fn refused_readings_are_rejected_with_their_reason_and_counted_once() {
        let mut bad = r(codes::PULS_OXIM_SAT_O2, "%", 97.0, 3);
        bad.device_time_us = 1; // before 2000
        let p = plan("gw", &batch(vec![bad]), NOW, none).unwrap();
        assert!(p.rows.is_empty());
        assert_eq!(p.ack.rejected, 1);
        assert_eq!(p.rejected[0].reason, "REJECT_REASON_IMPOSSIBLE_TIME");
        assert_eq!(p.reasons, vec![RejectReason::ImpossibleTime]);
    }

    #[test]
    fn a_new_incarnation_gets_its_own_ids_and_incarnation_zero_keeps_todays() {
        let b = batch(vec![
            r(codes::PRESS_BLD_NONINV_SYS, "mm[Hg]", 120.0, 1),
            r(codes::PRESS_BLD_NONINV_DIA, "mm[Hg]", 80.0, 2),
        ]);
        let legacy = plan("gw", &b, NOW, none).unwrap();
        assert_eq!(legacy.incarnation, 0);
        assert_eq!(
            legacy.rows[0].id,
            crate::fhir::observation_id("gw", "mon", 1)
        );
        assert_eq!(
            legacy.rows[2].id,
            crate::fhir::render::panel_id("gw", "mon", 1)
        );
        let mut b2 = b.clone();
        b2.incarnation = 77;
        let new = plan("gw", &b2, NOW, none).unwrap();
        assert_eq!(new.incarnation, 77);
        for (a, b) in legacy.rows.iter().zip(&new.rows) {
            assert_eq!(a.sequence, b.sequence, "sequences are the agent's");
            assert_ne!(a.id, b.id, "ids differ per incarnation");
        }
        assert_eq!(new.panels[0].members[0].1, new.rows[0].id);
    }

    #[test]
    fn sequences_that_do_not_fit_are_refused_never_wrapped() {
        let mut b = batch(vec![
            r(codes::PULS_OXIM_SAT_O2, "%", 97.0, u64::MAX),
            r(codes::PULS_OXIM_SAT_O2, "%", 96.0, i64::MAX as u64),
        ]);
        b.devices[0].waveforms.push(shared_protocol::v1::Waveform {
            start_time_us: NOW,
            sample_period_us: 1000,
            scale: 1.0,
            sequence: 1 << 63,
            ..Default::default()
        });
        let p = plan("gw", &b, NOW, none).unwrap();
        assert_eq!(p.ack.rejected, 2);
        assert_eq!(p.reasons, vec![RejectReason::Malformed; 2]);
        assert!(p.rejected.iter().all(|r| r.sequence == i64::MAX));
        assert!(p.ack.rejections[0].detail.contains("18446744073709551615"));
        assert_eq!(p.ack.rejections[0].sequence, u64::MAX);
        assert_eq!(p.rows.len(), 1);
        assert_eq!(p.rows[0].sequence, i64::MAX);
        assert!(p.rows.iter().all(|r| r.sequence >= 0));
        // A panel of the largest storable systolic sequence stays negative.
        let b = batch(vec![
            r(
                codes::PRESS_BLD_NONINV_SYS,
                "mm[Hg]",
                120.0,
                i64::MAX as u64,
            ),
            r(
                codes::PRESS_BLD_NONINV_DIA,
                "mm[Hg]",
                80.0,
                i64::MAX as u64 - 1,
            ),
        ]);
        let p = plan("gw", &b, NOW, none).unwrap();
        let panel = p.rows.iter().find(|r| r.kind == RowKind::BpPanel).unwrap();
        assert_eq!(panel.sequence, i64::MIN);
        // A batch whose own sequence does not fit is refused as a whole.
        let mut b = batch(vec![]);
        b.sequence = u64::MAX;
        assert_eq!(plan("gw", &b, NOW, none).unwrap_err().field, "sequence");
    }

    #[test]
    fn an_entry_without_a_device_id_rejects_everything_in_it() {
        let mut b = batch(vec![r(codes::PULS_OXIM_SAT_O2, "%", 97.0, 1)]);
        b.devices[0].device = None;
        let p = plan("gw", &b, NOW, none).unwrap();
        assert_eq!(p.ack.rejected, 1);
        assert!(p.devices.is_empty() && p.rows.is_empty());
    }
}
