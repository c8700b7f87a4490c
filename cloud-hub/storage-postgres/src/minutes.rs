//! Device minutes on PostgreSQL (`observation_minutes`, migration 15), as
//! on SQLite (`hub_sqlite` `minutes.rs`): for each device, buffer
//! incarnation, UTC minute of effective time and sign of sequence, the
//! span of sequences its stored rows hold. They stand in for the per-row
//! index by device and time: a device's rows of a time window are the rows
//! within its minutes' spans, found through the identity key, and each
//! batch updates a few minute rows instead of adding an index entry per
//! reading.
//!
//! The invariant readers rely on: each stored row lies within the span of
//! the minute row of its (gateway, device, incarnation, minute of
//! `effective_us`, sign of sequence). Ingest widens the span in the
//! batch's transaction; a hub older than migration 15 cannot store rows
//! once it ran (they lack the `layout` column, `hub_layout` since
//! migration 16), so every stored row is
//! recorded. A reader joins each row to its own minute row only (the
//! minute of its effective time and the sign of its sequence), so a row is
//! listed once even when spans of other minutes cover it.

use deadpool_postgres::GenericClient;

use crate::DbError;

/// SQL: expression `$us` divided by the literal `$unit`, rounded down
/// (also below 0): the same integer arithmetic as SQLite's (`%` truncates
/// toward zero).
macro_rules! floor_div_sql {
    ($us:literal, $unit:literal) => {
        concat!(
            "((", $us, " - (((", $us, " % ", $unit, ") + ", $unit, ") % ", $unit, ")) / ", $unit,
            ")"
        )
    };
}
pub(crate) use floor_div_sql;

/// SQL: the minute (floor, also before 1970) of expression `$us`.
macro_rules! minute_of_sql {
    ($us:literal) => {
        $crate::minutes::floor_div_sql!($us, "60000000")
    };
}
pub(crate) use minute_of_sql;

pub(crate) use hub_storage::minutes::{minute_of, minutes_of};

/// SQL: `columns` (of `o`) of the observations of device (`g`, `d`) with
/// effective times in [`lo`, `hi`), whose minutes are `lo_min` to `hi_min`
/// ([`minutes_of`]), that also meet `also` (a condition on `o`); the
/// arguments are placeholders. Each minute row's rows are a scan of the
/// identity key over its span (`OFFSET 0` keeps the lateral subquery a
/// parameterized scan: the planner would otherwise walk the device's whole
/// history in the identity key, filtering on time).
pub(crate) fn window_rows(
    columns: &str,
    (g, d): (&str, &str),
    (lo, hi): (&str, &str),
    (lo_min, hi_min): (&str, &str),
    also: &str,
) -> String {
    format!(
        "SELECT {columns} FROM observation_minutes m CROSS JOIN LATERAL
           (SELECT o.* FROM observations o
             WHERE {OWN_MINUTE} AND o.effective_us >= {lo} AND o.effective_us < {hi}
             OFFSET 0) o
          WHERE m.gateway_id = {g} AND m.device_id = {d} AND m.minute BETWEEN {lo_min} AND {hi_min}
            AND {also}"
    )
}

/// SQL condition: observation `o` is within the span of minute row `m`,
/// its own minute's.
pub(crate) const OWN_MINUTE: &str = concat!(
    "o.gateway_id = m.gateway_id AND o.device_id = m.device_id
     AND o.incarnation = m.incarnation AND o.sequence BETWEEN m.first_seq AND m.last_seq
     AND ",
    minute_of_sql!("o.effective_us"),
    " = m.minute AND (o.sequence < 0) = m.negative"
);

/// Records the new rows of a batch of gateway `gateway`, incarnation
/// `incarnation`: `(device, sequence, effective_us)` each; one statement,
/// keys in order (two transactions lock shared minute rows in one order).
pub(crate) async fn record<'a>(
    c: &impl GenericClient,
    gateway: &str,
    incarnation: i64,
    rows: impl Iterator<Item = (&'a str, i64, i64)>,
) -> Result<(), DbError> {
    let spans = hub_storage::minutes::spans(rows);
    if spans.is_empty() {
        return Ok(());
    }
    let (mut devices, mut minutes, mut negatives, mut firsts, mut lasts) =
        (vec![], vec![], vec![], vec![], vec![]);
    for ((device, minute, negative), (first, last)) in spans {
        devices.push(device);
        minutes.push(minute);
        negatives.push(negative);
        firsts.push(first);
        lasts.push(last);
    }
    let st = c
        .prepare_cached(
            "INSERT INTO observation_minutes AS m (gateway_id, device_id, minute, incarnation,
                 negative, first_seq, last_seq)
             SELECT $1, d, minute, $2, negative, f, l
               FROM unnest($3::text[], $4::bigint[], $5::bool[], $6::bigint[], $7::bigint[])
                    AS u(d, minute, negative, f, l)
             ON CONFLICT (gateway_id, device_id, minute, incarnation, negative)
             DO UPDATE SET first_seq = LEAST(m.first_seq, excluded.first_seq),
                 last_seq = GREATEST(m.last_seq, excluded.last_seq)",
        )
        .await?;
    c.execute(
        &st,
        &[
            &gateway,
            &incarnation,
            &devices,
            &minutes,
            &negatives,
            &firsts,
            &lasts,
        ],
    )
    .await?;
    Ok(())
}

/// Deletes the minute rows before minute of `cut` that no stored row is
/// left in, gateway by gateway under the gateway's ingest lock (so a batch
/// storing a late reading into such a minute either commits first, and its
/// row keeps the minute, or recreates the minute row after).
pub(crate) async fn forget_empty_before(
    c: &mut deadpool_postgres::Object,
    cut: i64,
) -> Result<u64, DbError> {
    let cut_min = minute_of(cut);
    let gateways: Vec<String> = c
        .query(
            "SELECT DISTINCT gateway_id FROM observation_minutes WHERE minute < $1",
            &[&cut_min],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut n = 0;
    for g in gateways {
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(1, hashtext($1))", &[&g])
            .await?;
        n += tx
            .execute(
                &format!(
                    "DELETE FROM observation_minutes m WHERE m.gateway_id = $1 AND m.minute < $2
                       AND NOT EXISTS (SELECT 1 FROM observations o WHERE {OWN_MINUTE})"
                ),
                &[&g, &cut_min],
            )
            .await?;
        tx.commit().await?;
    }
    Ok(n)
}
