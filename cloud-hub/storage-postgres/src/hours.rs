//! Search totals per patient, code and hour on PostgreSQL
//! (`observation_hours`, migration 16), as on SQLite (`hub_sqlite`
//! `hours.rs`; the arithmetic is `hub_storage::hours`): for each patient,
//! MDC code, LOINC code and UTC hour of effective time, how many stored
//! rows a search lists (rows that are not parts of a panel). A search's
//! total adds a row per whole hour of its range and counts in the index
//! only its partial first and last hours (issue 18: the count was the
//! server's costliest statement under the FHIR load bench, about 180 µs
//! for a day of one vital).
//!
//! The invariant every search relies on: for every (patient, MDC, LOINC,
//! hour), `n` is the number of stored rows with those values, `panel_id`
//! NULL. Ingest adds the counts of its new rows ([`record`]) before it
//! marks a batch's panel parts; every later `UPDATE` or `DELETE` of
//! `observations` (panel parts, re-attribution, erasure, retention) moves
//! or removes counts through the migration's statement triggers, which
//! read the statement's changed rows once (transition tables) and delete
//! a count that reaches 0.

use deadpool_postgres::GenericClient;

use crate::DbError;

/// SQL: the UTC hour (floor, also before 1970) of expression `$us`.
macro_rules! hour_of_sql {
    ($us:literal) => {
        $crate::minutes::floor_div_sql!($us, "3600000000")
    };
}
pub(crate) use hour_of_sql;

/// Adds the new rows of a batch: `(patient, MDC code, LOINC code,
/// effective_us)` each, for the rows stored with a patient; one statement,
/// keys in order (two transactions lock the hours they share in one
/// order).
pub(crate) async fn record<'a>(
    c: &impl GenericClient,
    rows: impl Iterator<Item = (&'a str, u32, &'a str, i64)>,
) -> Result<(), DbError> {
    let counts = hub_storage::hours::counts(rows);
    if counts.is_empty() {
        return Ok(());
    }
    let len = counts.len();
    let (mut patient, mut mdc, mut loinc, mut hour, mut n) = (
        Vec::with_capacity(len),
        Vec::with_capacity(len),
        Vec::with_capacity(len),
        Vec::with_capacity(len),
        Vec::with_capacity(len),
    );
    for ((p, m, l, h), k) in counts {
        patient.push(p);
        mdc.push(i64::from(m));
        loinc.push(l);
        hour.push(h);
        n.push(k);
    }
    let st = c
        .prepare_cached(
            "INSERT INTO observation_hours AS h (patient_id, mdc_code, loinc, hour, n)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[])
             ON CONFLICT (patient_id, mdc_code, loinc, hour) DO UPDATE SET n = h.n + excluded.n",
        )
        .await?;
    c.execute(&st, &[&patient, &mdc, &loinc, &hour, &n]).await?;
    Ok(())
}

/// The count of a search through the hours: `patient` and `codes` are the
/// search's patient and code conditions written over alias `h` with the
/// search's own placeholders, `filter` its `WHERE` clause over
/// `observations o`, and `first`, `end`, `head`, `tail` the placeholders
/// of the span's bounds (`hub_storage::hours::HourSpan`; `head` and `tail`
/// only when the span has that partial hour).
pub(crate) fn count_sql(
    patient: &str,
    codes: &str,
    filter: &str,
    (first, end): (&str, &str),
    head: Option<&str>,
    tail: Option<&str>,
) -> String {
    let mut sql = format!(
        "SELECT (SELECT COALESCE(SUM(h.n), 0)::bigint FROM observation_hours h
                  WHERE {patient} AND {codes} AND h.hour >= {first} AND h.hour < {end})"
    );
    if let Some(p) = head {
        sql.push_str(&format!(
            " + (SELECT COUNT(*) FROM observations o {filter} AND o.effective_us < {p})"
        ));
    }
    if let Some(p) = tail {
        sql.push_str(&format!(
            " + (SELECT COUNT(*) FROM observations o {filter} AND o.effective_us >= {p})"
        ));
    }
    sql
}

/// The statements of the triggers (migration 16) that apply a statement's
/// changed rows to the hours: `old_rows` leave their hours, `new_rows`
/// join theirs, nets of 0 are skipped, keys go in order, and a count that
/// reaches 0 is deleted (no hour outlives its rows, an erased patient's id
/// included).
macro_rules! hours_triggers {
    () => {
        concat!(
            "CREATE FUNCTION observation_hours_apply() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF TG_OP = 'UPDATE' THEN
    INSERT INTO observation_hours AS h (patient_id, mdc_code, loinc, hour, n)
    SELECT patient_id, mdc_code, loinc, hour, SUM(d)::bigint FROM (
        SELECT patient_id, mdc_code, loinc, ",
            $crate::hours::hour_of_sql!("effective_us"),
            " AS hour, -1 AS d
          FROM old_rows WHERE panel_id IS NULL AND patient_id IS NOT NULL
        UNION ALL
        SELECT patient_id, mdc_code, loinc, ",
            $crate::hours::hour_of_sql!("effective_us"),
            ", 1
          FROM new_rows WHERE panel_id IS NULL AND patient_id IS NOT NULL) c
     GROUP BY 1, 2, 3, 4 HAVING SUM(d) <> 0 ORDER BY 1, 2, 3, 4
    ON CONFLICT (patient_id, mdc_code, loinc, hour) DO UPDATE SET n = h.n + excluded.n;
  ELSE
    INSERT INTO observation_hours AS h (patient_id, mdc_code, loinc, hour, n)
    SELECT patient_id, mdc_code, loinc, ",
            $crate::hours::hour_of_sql!("effective_us"),
            ", -COUNT(*)
      FROM old_rows WHERE panel_id IS NULL AND patient_id IS NOT NULL
     GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (patient_id, mdc_code, loinc, hour) DO UPDATE SET n = h.n + excluded.n;
  END IF;
  DELETE FROM observation_hours h
   USING (SELECT DISTINCT patient_id, mdc_code, loinc, ",
            $crate::hours::hour_of_sql!("effective_us"),
            " AS hour
            FROM old_rows WHERE panel_id IS NULL AND patient_id IS NOT NULL) o
   WHERE h.patient_id = o.patient_id AND h.mdc_code = o.mdc_code AND h.loinc = o.loinc
     AND h.hour = o.hour AND h.n = 0;
  RETURN NULL;
END
$f$;
CREATE TRIGGER observation_hours_update AFTER UPDATE ON observations
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION observation_hours_apply();
CREATE TRIGGER observation_hours_delete AFTER DELETE ON observations
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION observation_hours_apply();
"
        )
    };
}
pub(crate) use hours_triggers;
