//! Ingest, pure: per-reading validation ([`validate_reading`] and friends)
//! and the [`plan`] of a whole batch (every row to store, computed once for
//! both storage backends), with its [`outcome`] once the backend reports
//! which rows were new.

mod plan;

pub use plan::{
    DeviceUpsert, EventRow, INCARNATION_EVENT_KIND, IngestOutcome, IngestPlan, ObsRow, PanelLink,
    RejectedRow, attribution_queries, incarnation_event, names_patients, outcome, plan,
};

use shared_protocol::v1::{
    Batch, Reading, RejectReason, TechnicalKind, TechnicalReading, Waveform, reading,
};
use shared_protocol::{CATALOGUE, EPOCH_2000_US, Metric};

/// How far ahead of the hub clock a time may be before it is impossible.
pub const MAX_FUTURE_US: i64 = 24 * 3600 * 1_000_000;

/// Why a reading or waveform was refused, with a detail that never holds
/// patient data or values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RejectReason,
    pub detail: String,
}

fn refuse(reason: RejectReason, detail: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        detail: detail.into(),
    }
}

fn check_time(t: i64, now_us: i64, what: &str) -> Result<(), Refusal> {
    if t < EPOCH_2000_US {
        return Err(refuse(
            RejectReason::ImpossibleTime,
            format!("{what} is before 2000-01-01 (device clock not set?)"),
        ));
    }
    if t > now_us.saturating_add(MAX_FUTURE_US) {
        return Err(refuse(
            RejectReason::ImpossibleTime,
            format!("{what} is more than 24 h ahead of the hub clock"),
        ));
    }
    Ok(())
}

/// The largest sequence (batch, reading, waveform, technical reading) or
/// incarnation the hub stores: both backends keep them in signed 64-bit
/// columns, and a larger `u64` would wrap to a negative number (2^64-1 to
/// -1), into the space of blood-pressure panel rows. It is refused instead.
pub const MAX_SEQUENCE: u64 = i64::MAX as u64;

/// A batch the hub refuses as a whole (HTTP 400): a field of its identity
/// cannot be stored without wrapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "batch `{field}` {value} is above {MAX_SEQUENCE} (2^63-1), the largest the hub stores; \
     it is refused rather than wrapped"
)]
pub struct BatchRefused {
    /// `sequence` or `incarnation`.
    pub field: &'static str,
    pub value: u64,
}

/// A batch's identity as stored: (incarnation, sequence), both in
/// `0..=MAX_SEQUENCE`.
pub fn check_batch(batch: &Batch) -> Result<(i64, i64), BatchRefused> {
    let stored =
        |field, value: u64| i64::try_from(value).map_err(|_| BatchRefused { field, value });
    Ok((
        stored("incarnation", batch.incarnation)?,
        stored("sequence", batch.sequence)?,
    ))
}

/// A reading's, waveform's or technical reading's sequence as stored, or a
/// MALFORMED refusal for one above [`MAX_SEQUENCE`].
pub fn stored_sequence(sequence: u64) -> Result<i64, Refusal> {
    i64::try_from(sequence).map_err(|_| {
        refuse(
            RejectReason::Malformed,
            format!(
                "sequence {sequence} is above {MAX_SEQUENCE} (2^63-1), the largest the hub stores"
            ),
        )
    })
}

/// Validates a reading against the catalogue and the hub clock; returns the
/// metric in the reading's unit (see `Metric::in_unit`: an alternative unit
/// brings its own LOINC code and possible range) when it may be stored.
/// Units are never converted.
pub fn validate_reading(r: &Reading, now_us: i64) -> Result<Metric, Refusal> {
    let metric = CATALOGUE.by_mdc(r.mdc_code).ok_or_else(|| {
        refuse(
            RejectReason::UnknownMetric,
            format!("MDC code {} is not in the hub's catalogue", r.mdc_code),
        )
    })?;
    check_time(r.effective_time_us(), now_us, "effective time")?;
    if r.subject
        .as_ref()
        .is_some_and(|s| has_nul(&s.system) || has_nul(&s.value))
    {
        return Err(refuse(
            RejectReason::Malformed,
            "patient identifier holds a NUL character",
        ));
    }
    let numeric = matches!(&r.value, Some(reading::Value::Numeric(_)));
    if let Some(reading::Value::Numeric(v)) = &r.value {
        if !v.is_finite() {
            return Err(refuse(
                RejectReason::Malformed,
                "numeric value is NaN or infinite",
            ));
        }
        if r.mdc_unit == 0 && r.ucum_unit.is_empty() {
            return Err(refuse(
                RejectReason::Malformed,
                "numeric value without a unit",
            ));
        }
    }
    match metric.in_unit(r.mdc_unit, &r.ucum_unit) {
        Some(variant) => Ok(variant),
        // A reading without a number may come without a unit.
        None if !numeric && r.mdc_unit == 0 && r.ucum_unit.is_empty() => Ok(*metric),
        None => {
            let accepted: Vec<String> = metric
                .variants()
                .map(|v| format!("{} ({})", v.unit.ucum, v.unit.mdc_name))
                .collect();
            Err(refuse(
                RejectReason::Malformed,
                format!(
                    "unit (MDC {}, UCUM `{}`) is not one {} is reported in: {}; units are not converted",
                    r.mdc_unit,
                    r.ucum_unit,
                    metric.mdc_name,
                    accepted.join(", ")
                ),
            ))
        }
    }
}

/// Validates a waveform (its metric code is not checked: waveform codes are
/// outside the vital-signs catalogue).
pub fn validate_waveform(w: &Waveform, now_us: i64) -> Result<(), Refusal> {
    check_time(w.start_time_us, now_us, "start time")?;
    if !w.scale.is_finite() || !w.offset.is_finite() {
        return Err(refuse(
            RejectReason::Malformed,
            "scale or offset is NaN or infinite",
        ));
    }
    if w.sample_period_us == 0 && !w.samples.is_empty() {
        return Err(refuse(RejectReason::Malformed, "sample period is 0"));
    }
    Ok(())
}

/// Validates a technical reading (a device link event).
pub fn validate_technical(t: &TechnicalReading, now_us: i64) -> Result<(), Refusal> {
    check_time(t.time_us, now_us, "event time")?;
    if has_nul(&t.detail) {
        return Err(refuse(
            RejectReason::Malformed,
            "event detail holds a NUL character",
        ));
    }
    match TechnicalKind::try_from(t.kind) {
        Ok(TechnicalKind::Unspecified) | Err(_) => Err(refuse(
            RejectReason::Malformed,
            format!("technical reading kind {} is not known", t.kind),
        )),
        Ok(_) => Ok(()),
    }
}

/// Whether gateway text holds a NUL character: a valid protobuf string
/// (UTF-8), but one PostgreSQL cannot store in `text` (SQLite can). Such
/// input is refused on both backends alike, never left to fail the batch's
/// transaction over and over.
pub fn has_nul(s: &str) -> bool {
    s.contains('\0')
}

/// Stable name of a technical reading kind, for storage and APIs.
pub fn technical_kind_name(kind: i32) -> &'static str {
    match TechnicalKind::try_from(kind) {
        Ok(TechnicalKind::Connected) => "connected",
        Ok(TechnicalKind::Disconnected) => "disconnected",
        Ok(TechnicalKind::Silent) => "silent",
        Ok(TechnicalKind::DeviceRefused) => "device-refused",
        Ok(TechnicalKind::BufferOverflow) => "buffer-overflow",
        Ok(TechnicalKind::BufferKeyLost) => "buffer-key-lost",
        Ok(TechnicalKind::BufferWriteFailed) => "buffer-write-failed",
        _ => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_protocol::catalogue::{codes, units};

    const NOW: i64 = 1_714_557_600_000_000; // 2024-05-01T10:00:00Z

    #[test]
    fn gateway_event_kinds_have_their_own_names() {
        let name = |k: TechnicalKind| technical_kind_name(k as i32);
        assert_eq!(name(TechnicalKind::BufferOverflow), "buffer-overflow");
        assert_eq!(name(TechnicalKind::BufferKeyLost), "buffer-key-lost");
        assert_eq!(
            name(TechnicalKind::BufferWriteFailed),
            "buffer-write-failed"
        );
        assert_eq!(technical_kind_name(99), "unspecified");
    }

    fn ok_reading() -> Reading {
        Reading {
            mdc_code: codes::PULS_OXIM_SAT_O2,
            value: Some(reading::Value::Numeric(97.0)),
            mdc_unit: units::PERCENT.mdc,
            ucum_unit: "%".into(),
            device_time_us: NOW - 1_000_000,
            validity: 1,
            sequence: 1,
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_good_reading() {
        assert_eq!(
            validate_reading(&ok_reading(), NOW).unwrap().mdc,
            codes::PULS_OXIM_SAT_O2
        );
    }

    #[test]
    fn refusals() {
        let reason = |r: Reading| validate_reading(&r, NOW).unwrap_err().reason;
        assert_eq!(
            reason(Reading {
                mdc_code: 1,
                ..ok_reading()
            }),
            RejectReason::UnknownMetric
        );
        assert_eq!(
            reason(Reading {
                device_time_us: EPOCH_2000_US - 1,
                ..ok_reading()
            }),
            RejectReason::ImpossibleTime
        );
        assert_eq!(
            reason(Reading {
                device_time_us: NOW + MAX_FUTURE_US + 1,
                ..ok_reading()
            }),
            RejectReason::ImpossibleTime
        );
        assert_eq!(
            reason(Reading {
                device_time_us: 0,
                gateway_time_us: 0,
                ..ok_reading()
            }),
            RejectReason::ImpossibleTime
        );
        assert_eq!(
            reason(Reading {
                value: Some(reading::Value::Numeric(f64::NAN)),
                ..ok_reading()
            }),
            RejectReason::Malformed
        );
        assert_eq!(
            reason(Reading {
                value: Some(reading::Value::Numeric(f64::INFINITY)),
                ..ok_reading()
            }),
            RejectReason::Malformed
        );
        assert_eq!(
            reason(Reading {
                ucum_unit: "/min".into(),
                ..ok_reading()
            }),
            RejectReason::Malformed
        );
        assert_eq!(
            reason(Reading {
                mdc_unit: units::MMHG.mdc,
                ..ok_reading()
            }),
            RejectReason::Malformed
        );
        assert_eq!(
            reason(Reading {
                mdc_unit: 0,
                ucum_unit: String::new(),
                ..ok_reading()
            }),
            RejectReason::Malformed
        );
        // Out of the possible range is not a refusal: it is stored and flagged.
        assert!(
            validate_reading(
                &Reading {
                    value: Some(reading::Value::Numeric(500.0)),
                    ..ok_reading()
                },
                NOW
            )
            .is_ok()
        );
    }

    #[test]
    fn sequences_above_i64_max_are_refused_not_wrapped() {
        assert_eq!(stored_sequence(MAX_SEQUENCE), Ok(i64::MAX));
        assert_eq!(stored_sequence(0), Ok(0));
        let f = stored_sequence(u64::MAX).unwrap_err();
        assert_eq!(f.reason, RejectReason::Malformed);
        assert!(f.detail.contains("18446744073709551615"), "{}", f.detail);
        let b = |sequence, incarnation| Batch {
            sequence,
            incarnation,
            ..Default::default()
        };
        assert_eq!(check_batch(&b(7, 0)), Ok((0, 7)));
        assert_eq!(check_batch(&b(MAX_SEQUENCE, 9)), Ok((9, i64::MAX)));
        let e = check_batch(&b(u64::MAX, 1)).unwrap_err();
        assert_eq!(e.field, "sequence");
        assert!(
            e.to_string().contains("`sequence` 18446744073709551615"),
            "{e}"
        );
        assert_eq!(
            check_batch(&b(1, MAX_SEQUENCE + 1)).unwrap_err().field,
            "incarnation"
        );
    }

    #[test]
    fn waveform_times_are_checked() {
        let w = Waveform {
            start_time_us: NOW,
            sample_period_us: 1000,
            scale: 1.0,
            ..Default::default()
        };
        assert!(validate_waveform(&w, NOW).is_ok());
        let w = Waveform {
            start_time_us: 5,
            ..w
        };
        assert_eq!(
            validate_waveform(&w, NOW).unwrap_err().reason,
            RejectReason::ImpossibleTime
        );
    }
}
