//! Search totals per patient, code and hour (`observation_hours`, schema
//! v24): for each patient, MDC code, LOINC code and UTC hour of effective
//! time, how many stored rows a search lists (rows that are not parts of a
//! panel). A search's total (`Bundle.total`) over a range of hours then
//! adds a row per whole hour and counts in the index only the rows of its
//! partial first and last hours, instead of counting every matching index
//! entry: a day of one vital at one reading a minute is about 1 440 entries
//! to count, against 24 hour rows (issue 18: the count was 12 % of the
//! hub's CPU under the FHIR load bench).
//!
//! The invariant every search relies on: for every (patient, MDC, LOINC,
//! hour), `n` is the number of stored rows with those values, `panel_id`
//! NULL. Ingest adds the counts of its new rows ([`record`]); the schema's
//! triggers move a row's count when a change to the row moves it (panel
//! membership, re-attribution) and take it away when the row is deleted
//! (erasure, retention), deleting a count that reaches 0. Ingest records
//! its new rows before it marks a batch's panel parts, so that the trigger
//! finds each part counted when it takes it out.

use rusqlite::types::Value as SqlValue;
use rusqlite::{Transaction, params};

use hub_domain::fhir::ObservationSearch;
use hub_storage::hours::{counts, span};

/// Adds the new rows of a batch: `(patient, MDC code, LOINC code,
/// effective_us)` each, for the rows stored with a patient (a row without
/// one is in no patient's search), before the batch's panel updates.
pub(crate) fn record<'a>(
    tx: &Transaction<'_>,
    rows: impl Iterator<Item = (&'a str, u32, &'a str, i64)>,
) -> rusqlite::Result<()> {
    let counts = counts(rows);
    if counts.is_empty() {
        return Ok(());
    }
    let mut upsert = tx.prepare_cached(
        "INSERT INTO observation_hours (patient_id, mdc_code, loinc, hour, n)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (patient_id, mdc_code, loinc, hour) DO UPDATE SET n = n + excluded.n",
    )?;
    for ((patient, mdc, loinc, hour), n) in counts {
        upsert.execute(params![patient, mdc, loinc, hour, n])?;
    }
    Ok(())
}

/// The statement that counts search `s`'s matches through the hours, with
/// its arguments, when its filters allow ([`span`]; its date range is
/// [`lo`, `hi`)). `filter` is the search's `WHERE` clause over
/// `observations o` (dates included) and `args` its arguments. `None`:
/// count the index entries.
///
/// The whole hours come from `observation_hours` under the same patient and
/// code conditions; the rows before the first whole hour and from the end
/// of the last one are counted in the index by `filter` and one more bound.
pub(crate) fn count(
    s: &ObservationSearch,
    lo: Option<i64>,
    hi: Option<i64>,
    filter: &str,
    args: &[SqlValue],
) -> Option<(String, Vec<SqlValue>)> {
    let (codes, span) = span(s, lo, hi)?;
    let placeholders = vec!["?"; s.patients.len()].join(", ");
    let mut out: Vec<SqlValue> = s.patients.iter().cloned().map(SqlValue::Text).collect();
    let codes = crate::code_clause("h", codes, &mut out);
    let mut sql = format!(
        "SELECT (SELECT COALESCE(SUM(h.n), 0) FROM observation_hours h
                  WHERE h.patient_id IN ({placeholders}) AND {codes} AND h.hour >= ? AND h.hour < ?)"
    );
    out.push(SqlValue::Integer(span.first));
    out.push(SqlValue::Integer(span.end));
    // The partial hours: before the first whole hour, from the end of the
    // last (each within the range `filter` already bounds).
    if let Some(edge) = span.head_before {
        sql.push_str(&format!(
            " + (SELECT COUNT(*) FROM observations o {filter} AND o.effective_us < ?)"
        ));
        out.extend_from_slice(args);
        out.push(SqlValue::Integer(edge));
    }
    if let Some(edge) = span.tail_from {
        sql.push_str(&format!(
            " + (SELECT COUNT(*) FROM observations o {filter} AND o.effective_us >= ?)"
        ));
        out.extend_from_slice(args);
        out.push(SqlValue::Integer(edge));
    }
    Some((sql, out))
}
