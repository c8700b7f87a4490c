//! Device minutes (`observation_minutes`, schema v22): for each device,
//! buffer incarnation and UTC minute of effective time, the span of
//! sequences its stored rows hold. It stands in for three per-row time
//! indexes (by time, by device and time, by code and time): a device's
//! rows of a time window are the rows within its minutes' spans, found
//! through the identity key (gateway, device, incarnation, sequence), and
//! each batch updates a few minute rows instead of adding three index
//! entries per reading (issue 18: on one machine the ingest bench went
//! from 55–72 % to 86–88 % of the raw insert limit).
//!
//! The invariant every reader relies on: each stored row lies within the
//! span of the minute row of its (gateway, device, incarnation, minute of
//! `effective_us`, sign of sequence). Ingest widens the span with every new
//! row (a late reading widens an old minute), rows never change those
//! columns, and a deleted row at most leaves a span wider than needed: the
//! readers always also filter on `effective_us`, so a wider span costs
//! reads, never results. Panel rows (negative sequences) have spans of
//! their own (`negative` = 1): one span over both would cover every
//! reading of the device below the newest.

use rusqlite::{Transaction, params};

pub(crate) use hub_storage::minutes::{minute_of, minutes_of};

/// Records the new rows of a batch of gateway `gateway`, incarnation
/// `incarnation`: `(device, sequence, effective_us)` each.
pub(crate) fn record<'a>(
    tx: &Transaction<'_>,
    gateway: &str,
    incarnation: i64,
    rows: impl Iterator<Item = (&'a str, i64, i64)>,
) -> rusqlite::Result<()> {
    let spans = hub_storage::minutes::spans(rows);
    let mut upsert = tx.prepare_cached(
        "INSERT INTO observation_minutes (gateway_id, device_id, minute, incarnation, negative,
             first_seq, last_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT DO UPDATE SET first_seq = MIN(first_seq, excluded.first_seq),
             last_seq = MAX(last_seq, excluded.last_seq)",
    )?;
    for ((device, minute, negative), (first, last)) in spans {
        upsert.execute(params![
            gateway,
            device,
            minute,
            incarnation,
            negative,
            first,
            last
        ])?;
    }
    Ok(())
}

/// SQL: the rowids of the observations within the spans of the minute rows
/// `m` selected by `minute_filter` (which may join more tables before `m`
/// through `from`), filtered by `row_filter` on `x`. Every placeholder is
/// the caller's. A row within two minutes' spans is listed twice; callers
/// use the list with `rowid IN (...)`.
pub(crate) fn rowids(from: &str, minute_filter: &str, row_filter: &str) -> String {
    format!(
        "SELECT x.rowid FROM {from}observation_minutes m
           JOIN observations x ON x.gateway_id = m.gateway_id AND x.device_id = m.device_id
            AND x.incarnation = m.incarnation AND x.sequence BETWEEN m.first_seq AND m.last_seq
          WHERE {minute_filter} AND {row_filter}"
    )
}

/// SQL: the rowids of device (`g`, `d`)'s observations with effective
/// times in [`lo`, `hi`), whose minutes are `lo_min` to `hi_min`
/// ([`minutes_of`]); the arguments are placeholders.
pub(crate) fn device_window(
    g: &str,
    d: &str,
    lo: &str,
    hi: &str,
    lo_min: &str,
    hi_min: &str,
) -> String {
    rowids(
        "",
        &format!(
            "m.gateway_id = {g} AND m.device_id = {d} AND m.minute BETWEEN {lo_min} AND {hi_min}"
        ),
        &format!("x.effective_us >= {lo} AND x.effective_us < {hi}"),
    )
}

/// Minute rows a purge transaction works through.
const PURGE_MINUTES: i64 = 64;

/// Deletes the observations with effective times before `cut` that also
/// meet `also` (a condition on the row's columns, e.g. that its patient is
/// under no legal hold): minute row by minute row, oldest first,
/// [`PURGE_MINUTES`] of them a transaction (so ingest waits for one chunk at
/// most), each through the identity key; then the minute rows left without
/// rows. Returns the number of rows deleted.
pub(crate) fn purge_before(
    c: &rusqlite::Connection,
    cut: i64,
    also: &str,
) -> rusqlite::Result<u64> {
    let last = minute_of(cut);
    // The last minute row done; gateway ids are never empty, so the start
    // key sorts before every row.
    let mut after: (i64, String, String, i64, bool) =
        (i64::MIN, String::new(), String::new(), i64::MIN, false);
    let mut total = 0u64;
    loop {
        let tx = c.unchecked_transaction()?;
        let spans: Vec<(i64, String, String, i64, bool, i64, i64)> = tx
            .prepare_cached(
                "SELECT minute, gateway_id, device_id, incarnation, negative, first_seq, last_seq
                   FROM observation_minutes
                  WHERE minute <= ?1
                    AND (minute, gateway_id, device_id, incarnation, negative)
                        > (?3, ?4, ?5, ?6, ?7)
                  ORDER BY minute, gateway_id, device_id, incarnation, negative LIMIT ?2",
            )?
            .query_map(
                params![
                    last,
                    PURGE_MINUTES,
                    after.0,
                    after.1,
                    after.2,
                    after.3,
                    after.4
                ],
                |r| <(i64, String, String, i64, bool, i64, i64)>::try_from(r),
            )?
            .collect::<rusqlite::Result<_>>()?;
        let Some(end) = spans.last() else {
            break;
        };
        after = (end.0, end.1.clone(), end.2.clone(), end.3, end.4);
        {
            let mut delete = tx.prepare_cached(&format!(
                "DELETE FROM observations WHERE gateway_id = ?1 AND device_id = ?2
                   AND incarnation = ?3 AND sequence BETWEEN ?4 AND ?5 AND effective_us < ?6
                   AND {also}"
            ))?;
            for (_, g, d, i, _, first, last_seq) in &spans {
                total += delete.execute(params![g, d, i, first, last_seq, cut])? as u64;
            }
        }
        tx.commit()?;
    }
    forget_empty(c, last)?;
    Ok(total)
}

/// Deletes the minute rows before minute `before` whose spans hold no row
/// any more (after a purge).
pub(crate) fn forget_empty(c: &rusqlite::Connection, before: i64) -> rusqlite::Result<usize> {
    c.execute(
        "DELETE FROM observation_minutes AS m WHERE m.minute < ?1 AND NOT EXISTS
           (SELECT 1 FROM observations x WHERE x.gateway_id = m.gateway_id
               AND x.device_id = m.device_id AND x.incarnation = m.incarnation
               AND x.sequence BETWEEN m.first_seq AND m.last_seq)",
        [before],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migration_fills_each_rows_minute_span() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE observations (gateway_id TEXT, device_id TEXT, incarnation INTEGER,
                 sequence INTEGER, effective_us INTEGER);",
        )
        .unwrap();
        // (device, sequence, effective_us): minute edges, before 1970, a
        // panel row (negative sequence) and a late reading.
        let rows: &[(&str, i64, i64)] = &[
            ("d", 1, 0),
            ("d", 2, 59_999_999),
            ("d", 3, 60_000_000),
            ("d", -4, 60_000_001),
            ("d", 9, 1),
            ("d", 5, -1),
            ("d", 6, -60_000_001),
            ("e", 7, 1_795_514_400_123_456),
        ];
        for (d, seq, at) in rows {
            c.execute(
                "INSERT INTO observations VALUES ('g', ?1, 0, ?2, ?3)",
                params![d, seq, at],
            )
            .unwrap();
        }
        c.execute_batch(crate::schema::SCHEMA_V22).unwrap();
        let spans: Vec<(String, i64, bool, i64, i64)> = c
            .prepare(
                "SELECT device_id, minute, negative, first_seq, last_seq FROM observation_minutes
                  ORDER BY device_id, minute, negative",
            )
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let m = |us| minute_of(us);
        assert_eq!(
            spans,
            vec![
                ("d".into(), m(-60_000_001), false, 6, 6),
                ("d".into(), m(-1), false, 5, 5),
                ("d".into(), 0, false, 1, 9),
                ("d".into(), 1, false, 3, 3),
                ("d".into(), 1, true, -4, -4),
                ("e".into(), m(1_795_514_400_123_456), false, 7, 7),
            ]
        );
        assert_eq!(m(-60_000_001), -2);
    }
}
