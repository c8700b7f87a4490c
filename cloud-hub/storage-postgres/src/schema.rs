//! PostgreSQL schema: ordered migrations, recorded in `schema_migrations`
//! like the SQLite store's. Version 1 holds what SQLite reached in its
//! schema v6 (the two backends number their migrations independently).
//!
//! Layout choices (see `docs/hub.md`, "PostgreSQL and scaling out"):
//! - `observations` is partitioned by range of `effective_us` (µs since the
//!   epoch), one partition per UTC month, created on demand before a batch
//!   is inserted ([`super::PgStore`] keeps the months it has created).
//! - A unique constraint of a partitioned table must include the partition
//!   key, so a reading's identity is `(gateway_id, device_id, incarnation,
//!   sequence, effective_us)` (incarnation since migration 3). That still de-duplicates: a re-sent reading is the same
//!   protobuf, so it has the same effective time and lands in the same
//!   partition, where the key conflicts. Ingest also skips a row whose
//!   `(gateway_id, device_id, sequence)` exists under another time (a probe
//!   of the unique key's prefix in each partition), so the result equals
//!   SQLite's.
//! - Every table written by ingest carries `gateway_id` and every unique
//!   key of those tables includes it: the tables can be distributed (Citus,
//!   Azure Cosmos DB for PostgreSQL) by `gateway_id`, which makes a batch's
//!   transaction single-shard. `beds` and `patient_stays` are small and
//!   become reference tables. The patient is not a distribution column
//!   because it changes (re-attribution, identifier updates) and a
//!   distribution column cannot be updated.

/// v1: the full schema (equivalent of SQLite v6), observations partitioned
/// by month of effective time.
const V1: &str = r#"
CREATE TABLE gateways (
    id            text PRIMARY KEY,
    token_sha256  text NOT NULL UNIQUE,
    created_us    bigint NOT NULL,
    revoked_us    bigint
);
CREATE TABLE gateway_grace_tokens (
    token_sha256 text PRIMARY KEY,
    gateway_id   text NOT NULL,
    expires_us   bigint NOT NULL
);
CREATE INDEX gateway_grace_tokens_gateway ON gateway_grace_tokens (gateway_id);
CREATE TABLE enrollment_tokens (
    token_sha256 text PRIMARY KEY,
    created_us   bigint NOT NULL,
    expires_us   bigint NOT NULL,
    used_us      bigint,
    gateway_id   text
);
CREATE TABLE batches (
    gateway_id     text NOT NULL,
    sequence       bigint NOT NULL,
    received_us    bigint NOT NULL,
    created_us     bigint NOT NULL,
    agent_version  text NOT NULL,
    ack            bytea NOT NULL,
    PRIMARY KEY (gateway_id, sequence)
);
CREATE TABLE devices (
    gateway_id     text NOT NULL,
    device_id      text NOT NULL,
    protocol       text NOT NULL,
    manufacturer   text NOT NULL,
    model          text NOT NULL,
    serial_number  text NOT NULL,
    location       text NOT NULL,
    first_seen_us  bigint NOT NULL,
    last_seen_us   bigint NOT NULL,
    fhir_id        text NOT NULL,
    PRIMARY KEY (gateway_id, device_id)
);
CREATE INDEX devices_fhir_id ON devices (fhir_id);
CREATE TABLE observations (
    rid            bigserial NOT NULL,
    id             text NOT NULL,
    gateway_id     text NOT NULL,
    device_id      text NOT NULL,
    sequence       bigint NOT NULL,
    patient_id     text,
    patient_system text,
    attribution    text NOT NULL,
    loinc          text NOT NULL,
    mdc_code       bigint NOT NULL,
    effective_us   bigint NOT NULL,
    status         text NOT NULL,
    value          double precision,
    batch_sequence bigint NOT NULL,
    received_us    bigint NOT NULL,
    resource       text NOT NULL DEFAULT '',
    kind           text NOT NULL,
    category       text NOT NULL,
    payload        bytea,
    panel_id       text,
    UNIQUE (gateway_id, device_id, sequence, effective_us)
) PARTITION BY RANGE (effective_us);
CREATE INDEX observations_id ON observations (id);
CREATE INDEX observations_rid ON observations (rid);
CREATE INDEX observations_patient_mdc_time ON observations (patient_id, mdc_code, effective_us);
CREATE INDEX observations_mdc_time ON observations (mdc_code, effective_us);
CREATE INDEX observations_time ON observations (effective_us);
CREATE INDEX observations_device_time ON observations (gateway_id, device_id, effective_us);
CREATE INDEX observations_unattributed ON observations (attribution) WHERE attribution = 'unattributed';
CREATE TABLE device_events (
    gateway_id      text NOT NULL,
    device_id       text NOT NULL,
    sequence        bigint NOT NULL,
    kind            text NOT NULL,
    time_us         bigint NOT NULL,
    detail          text NOT NULL,
    batch_sequence  bigint NOT NULL,
    received_us     bigint NOT NULL,
    UNIQUE (gateway_id, device_id, sequence)
);
CREATE INDEX device_events_device_time ON device_events (gateway_id, device_id, time_us);
CREATE TABLE rejected_readings (
    id              bigserial,
    gateway_id      text NOT NULL,
    device_id       text NOT NULL,
    batch_sequence  bigint NOT NULL,
    sequence        bigint NOT NULL,
    kind            text NOT NULL,
    reason          text NOT NULL,
    detail          text NOT NULL,
    raw             bytea NOT NULL,
    received_us     bigint NOT NULL,
    PRIMARY KEY (gateway_id, id)
);
CREATE INDEX rejected_readings_gateway ON rejected_readings (gateway_id, received_us);
CREATE TABLE beds (
    id          text PRIMARY KEY,
    ward        text NOT NULL,
    label       text NOT NULL,
    created_us  bigint NOT NULL
);
CREATE TABLE device_placements (
    id          bigserial,
    gateway_id  text NOT NULL,
    device_id   text NOT NULL,
    bed_id      text NOT NULL REFERENCES beds (id),
    from_us     bigint NOT NULL,
    to_us       bigint,
    CHECK (to_us IS NULL OR to_us > from_us),
    PRIMARY KEY (gateway_id, id)
);
CREATE INDEX device_placements_id ON device_placements (id);
CREATE INDEX device_placements_device ON device_placements (gateway_id, device_id, from_us);
CREATE INDEX device_placements_bed ON device_placements (bed_id, from_us);
CREATE TABLE patient_stays (
    id              bigserial PRIMARY KEY,
    patient_system  text NOT NULL,
    patient_value   text NOT NULL,
    bed_id          text NOT NULL REFERENCES beds (id),
    from_us         bigint NOT NULL,
    to_us           bigint,
    visit           text,
    CHECK (to_us IS NULL OR to_us > from_us)
);
CREATE INDEX patient_stays_patient ON patient_stays (patient_system, patient_value, from_us);
CREATE INDEX patient_stays_value ON patient_stays (patient_value);
CREATE INDEX patient_stays_bed ON patient_stays (bed_id, from_us);
CREATE INDEX patient_stays_visit ON patient_stays (visit) WHERE visit IS NOT NULL;
"#;

/// Ordered migrations; each runs once, in one transaction with its version
/// row.
/// PostgreSQL migration 2: the same tables.
pub const PG_V2: &str = r#"
CREATE TABLE IF NOT EXISTS users (
    name          text PRIMARY KEY,
    role          text NOT NULL,
    password_hash text NOT NULL,
    created_us    bigint NOT NULL,
    disabled_us   bigint
);
CREATE TABLE IF NOT EXISTS api_tokens (
    name         text PRIMARY KEY,
    token_sha256 text NOT NULL UNIQUE,
    role         text NOT NULL,
    created_us   bigint NOT NULL,
    revoked_us   bigint
);
CREATE TABLE IF NOT EXISTS sessions (
    id_sha256    text PRIMARY KEY,
    user_name    text NOT NULL REFERENCES users (name),
    csrf         text NOT NULL,
    created_us   bigint NOT NULL,
    last_seen_us bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_name);
"#;

/// PostgreSQL migration 3: buffer incarnations (`Batch.incarnation`; the
/// SQLite store's v14). Batches are keyed by (gateway, incarnation,
/// sequence), readings by (gateway, device, incarnation, sequence,
/// effective time) and events by (gateway, device, incarnation, sequence).
/// Existing rows take incarnation 0 (a column with a constant default is
/// added without rewriting the table); the new unique indexes are built on
/// every observation partition.
pub const PG_V3: &str = r#"
ALTER TABLE batches ADD COLUMN incarnation bigint NOT NULL DEFAULT 0;
ALTER TABLE batches DROP CONSTRAINT batches_pkey;
ALTER TABLE batches ADD PRIMARY KEY (gateway_id, incarnation, sequence);
CREATE INDEX batches_received ON batches (gateway_id, received_us);
ALTER TABLE observations ADD COLUMN incarnation bigint NOT NULL DEFAULT 0;
ALTER TABLE observations
    DROP CONSTRAINT observations_gateway_id_device_id_sequence_effective_us_key;
ALTER TABLE observations ADD CONSTRAINT observations_identity
    UNIQUE (gateway_id, device_id, incarnation, sequence, effective_us);
ALTER TABLE device_events ADD COLUMN incarnation bigint NOT NULL DEFAULT 0;
ALTER TABLE device_events DROP CONSTRAINT device_events_gateway_id_device_id_sequence_key;
ALTER TABLE device_events ADD CONSTRAINT device_events_identity
    UNIQUE (gateway_id, device_id, incarnation, sequence);
"#;

/// PostgreSQL migration 4: the clinical layer and the audit log (SQLite's
/// v8–v11 and v13, same semantics, PostgreSQL types).
///
/// - `manual_inputs`, `score_history`, `alerts`, `alert_events` and
///   `alert_rule_overrides` are keyed by patient or alert, not written by
///   ingest (reference tables under Citus). `id` sequences order rows that
///   share a time, as SQLite's rowids do.
/// - `vital_rollups` (chart buckets) is written by ingest in the batch's
///   transaction, so its key includes `gateway_id` (co-located with the
///   gateway's observations); the key's order serves a device's rebuild
///   after re-attribution, `vital_rollups_series` a patient's chart.
/// - `audit_log` is append-only by the database itself: a statement
///   trigger refuses every UPDATE, DELETE and TRUNCATE (even of no row)
///   with SQLSTATE 2F003 and the message "audit_log is append-only". Appends
///   are serialized by a transaction advisory lock (see `audit.rs`), and
///   `seq` is the primary key, so the hash chain cannot fork.
pub const PG_V4: &str = r#"
CREATE TABLE manual_inputs (
    id            bigserial PRIMARY KEY,
    patient_id    text NOT NULL,
    kind          text NOT NULL,
    value         text NOT NULL,
    effective_us  bigint NOT NULL,
    recorded_us   bigint NOT NULL
);
CREATE INDEX manual_inputs_patient ON manual_inputs (patient_id, kind, effective_us);

CREATE TABLE score_history (
    id          bigserial PRIMARY KEY,
    patient_id  text NOT NULL,
    kind        text NOT NULL,
    time_us     bigint NOT NULL,
    total       bigint,
    band        text,
    missing     text[] NOT NULL,
    stale       text[] NOT NULL,
    components  jsonb
);
CREATE INDEX score_history_patient ON score_history (patient_id, kind, time_us);
CREATE INDEX score_history_time ON score_history (time_us);

CREATE TABLE alerts (
    id                  bigint PRIMARY KEY,
    kind                text NOT NULL,
    code                text NOT NULL,
    priority            text NOT NULL,
    state               text NOT NULL,
    message             text NOT NULL,
    patient_id          text,
    gateway_id          text,
    device_id           text,
    value               double precision,
    unit                text,
    condition_since_us  bigint NOT NULL,
    raised_us           bigint NOT NULL,
    acknowledged_us     bigint,
    acknowledged_by     text,
    escalated_us        bigint,
    resolved_us         bigint
);
CREATE INDEX alerts_open ON alerts (state) WHERE state <> 'resolved';
CREATE INDEX alerts_patient ON alerts (patient_id, raised_us);
CREATE TABLE alert_events (
    id          bigserial PRIMARY KEY,
    alert_id    bigint NOT NULL REFERENCES alerts (id),
    time_us     bigint NOT NULL,
    transition  text NOT NULL,
    actor       text
);
CREATE INDEX alert_events_alert ON alert_events (alert_id, id);
CREATE TABLE alert_rule_overrides (
    patient_id  text NOT NULL,
    rule_id     text NOT NULL,
    body        text NOT NULL,
    updated_us  bigint NOT NULL,
    updated_by  text,
    PRIMARY KEY (patient_id, rule_id)
);

CREATE TABLE vital_rollups (
    patient_id    text NOT NULL,
    mdc_code      bigint NOT NULL,
    resolution_s  bigint NOT NULL,
    bucket_us     bigint NOT NULL,
    gateway_id    text NOT NULL,
    device_id     text NOT NULL,
    n             bigint NOT NULL,
    sum           double precision NOT NULL,
    min           double precision NOT NULL,
    max           double precision NOT NULL,
    PRIMARY KEY (gateway_id, device_id, bucket_us, resolution_s, mdc_code, patient_id)
);
CREATE INDEX vital_rollups_series ON vital_rollups (patient_id, mdc_code, resolution_s, bucket_us);

CREATE TABLE audit_log (
    seq         bigint PRIMARY KEY,
    time_us     bigint NOT NULL,
    actor       text NOT NULL,
    action      text NOT NULL,
    resource    text NOT NULL,
    patient_id  text,
    outcome     integer NOT NULL,
    detail      text NOT NULL,
    prev_hash   text NOT NULL,
    hash        text NOT NULL
);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = '2F003',
              HINT = 'audit entries are hash-chained and never changed; append a new entry instead';
END
$fn$;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
"#;

/// Migration 5 (several replicas on one database): failed logins and
/// lockouts per user name, shared by every hub and kept across restarts
/// (only existing users'); the alert engine's tracked state.
const PG_V5: &str = r#"
CREATE TABLE login_failures (
    user_name       text PRIMARY KEY REFERENCES users (name),
    failures        integer NOT NULL,
    locked_until_us bigint
);
-- What the alert engine tracks between inputs, shared by every hub on
-- the database: conditions waiting for their delay, each device's newest
-- value (data stale) and each gateway's last batch (gateway offline).
CREATE TABLE alert_pending (
    alert_key text PRIMARY KEY,
    since_us  bigint NOT NULL
);
CREATE TABLE alert_devices (
    gateway_id text NOT NULL,
    device_id  text NOT NULL,
    last_us    bigint NOT NULL,
    patient_id text,
    PRIMARY KEY (gateway_id, device_id)
);
CREATE TABLE alert_gateways (
    gateway_id text PRIMARY KEY,
    last_us    bigint NOT NULL
);
"#;

/// Migration 6: the Kafka / Event Hubs source (`hub_storage::StreamStore`):
/// each partition's next offset (written in the ingest transaction of the
/// batch read before it), the partition leases replicas share, and the
/// replicas' heartbeats.
const PG_V6: &str = r#"
CREATE TABLE stream_offsets (
    source        text NOT NULL,
    partition_id  integer NOT NULL,
    next_offset   bigint NOT NULL,
    PRIMARY KEY (source, partition_id)
);
CREATE TABLE stream_leases (
    source         text NOT NULL,
    partition_id   integer NOT NULL,
    owner          text NOT NULL,
    expires_at_ms  bigint NOT NULL,
    PRIMARY KEY (source, partition_id)
);
CREATE TABLE stream_replicas (
    source         text NOT NULL,
    replica        text NOT NULL,
    expires_at_ms  bigint NOT NULL,
    PRIMARY KEY (source, replica)
);
"#;

/// Migration 7: the score-input index. The early-warning scores ask, per
/// patient and code, for the newest reading that is (or is not) part of a
/// panel, newest first with arrival order breaking ties. With the index on
/// `(patient_id, mdc_code, effective_us)` PostgreSQL read and sorted every
/// row of the patient's code for each of those `LIMIT 1` questions (and
/// every row when none matched, as for panel parts). This index answers them
/// with a backward scan that stops at the first match; it replaces the old
/// one (same leading columns, so searches by patient and code still use it),
/// so ingest maintains no extra index. The panel flag is an integer (0 or 1),
/// not a boolean: PostgreSQL rewrites `NOT (panel_id IS NULL)` to `panel_id
/// IS NOT NULL`, which no longer matches a boolean index expression, so the
/// queries compare the same integer expression. Built on every observation
/// partition.
const PG_V7: &str = r#"
DROP INDEX observations_patient_mdc_time;
CREATE INDEX observations_patient_mdc_panel_time
    ON observations (patient_id, mdc_code, ((panel_id IS NOT NULL)::integer), effective_us, rid);
"#;

/// Migration 8 (issue 17): login throttling: one counter per (account,
/// source) pair, account and source, replacing migration 5's per-name
/// lockout.
const PG_V8: &str = r#"
DROP TABLE login_failures;
CREATE TABLE login_throttle (
    key             text PRIMARY KEY,
    failures        bigint NOT NULL,
    window_start_us bigint NOT NULL,
    locked_until_us bigint
);
CREATE INDEX login_throttle_window ON login_throttle (window_start_us);
"#;

/// Migration 9: the keyed audit chain (SQLite's v18). Each entry's key id
/// (`NULL`: an unkeyed link, as every entry before this migration) and
/// patient list (one id per line, for an entry naming several patients);
/// the signed checkpoints of the chain head, append-only by their own
/// statement trigger like the log. Existing entries keep their unkeyed
/// links and still verify; the first keyed entry's MAC covers them.
/// Idempotent: tests that roll a database back re-run it.
const PG_V9: &str = r#"
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS key_id text;
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS patients text NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    seq      bigint PRIMARY KEY,
    mac      text NOT NULL,
    entries  bigint NOT NULL,
    time_us  bigint NOT NULL,
    key_id   text NOT NULL,
    sig      text NOT NULL
);
CREATE OR REPLACE FUNCTION audit_checkpoints_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'audit_checkpoints is append-only: % refused', TG_OP
        USING ERRCODE = '2F003';
END
$fn$;
DROP TRIGGER IF EXISTS audit_checkpoints_append_only ON audit_checkpoints;
CREATE TRIGGER audit_checkpoints_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoints_append_only();
"#;

/// Migration 10: re-attribution versions. A stored reading's `version`
/// (FHIR `meta.versionId`, 1 when stored) goes up each time a placement or
/// stay change gives it another patient, and `updated_us`
/// (`meta.lastUpdated`; NULL: `received_us`) is when. Added to the
/// partitioned table, so to every partition (a constant default: no
/// rewrite); idempotent, as tests that roll migrations back re-run it.
const PG_V10: &str = r#"
ALTER TABLE observations ADD COLUMN IF NOT EXISTS version integer NOT NULL DEFAULT 1,
                         ADD COLUMN IF NOT EXISTS updated_us bigint;
"#;

/// Migration 11: patients' rights (issue 20, `hub_domain::privacy`): the
/// subject salt (created on first use), erasure tombstones (a subject key,
/// never the identifier) with the device windows whose late readings are
/// dropped, and legal holds. Idempotent.
const PG_V11: &str = r#"
CREATE TABLE IF NOT EXISTS privacy_salt (
    id    integer PRIMARY KEY CHECK (id = 1),
    salt  bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS erasures (
    id         bigserial PRIMARY KEY,
    subject    text NOT NULL,
    erased_us  bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS erased_windows (
    erasure_id  bigint NOT NULL REFERENCES erasures (id),
    gateway_id  text NOT NULL,
    device_id   text NOT NULL,
    from_us     bigint NOT NULL,
    to_us       bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS erased_windows_device ON erased_windows (gateway_id, device_id, from_us);
CREATE TABLE IF NOT EXISTS legal_holds (
    patient_value  text PRIMARY KEY,
    reason         text NOT NULL,
    set_by         text NOT NULL,
    set_us         bigint NOT NULL
);
"#;

/// Migration 12: audit retention (docs/privacy.md). A purge removes the
/// entries up to a signed checkpoint in a transaction that sets
/// `vigil.audit_purge` locally (and records it in `audit_purges`); every
/// other update, delete or truncate is still refused. Verification starts
/// the chain from that checkpoint and needs the keyed purge entry.
const PG_V12: &str = r#"
CREATE TABLE IF NOT EXISTS audit_purges (
    through  bigint PRIMARY KEY,
    mac      text NOT NULL,
    time_us  bigint NOT NULL
);
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_log'
       AND current_setting('vigil.audit_purge', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = '2F003',
              HINT = 'audit entries are hash-chained and never changed; append a new entry instead';
END
$fn$;
DROP TRIGGER IF EXISTS audit_purges_append_only ON audit_purges;
CREATE TRIGGER audit_purges_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_purges
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
"#;

/// Migration 13 (issue 18): the patient/code index of migration 7 also
/// carries `loinc` and `panel_id` (INCLUDE, not keys). A FHIR search by
/// patient and code filters on both; with them in the index its `total`
/// is counted by an index-only scan instead of a visit to every matching
/// row (measured at 1 M observations: 1.5 ms → 0.35 ms for a day of one
/// vital), and its page stops at the page's end. Same keys, so the score
/// queries keep using it; still one index for ingest to maintain.
const PG_V13: &str = r#"
DROP INDEX observations_patient_mdc_panel_time;
CREATE INDEX observations_patient_mdc_panel_time
    ON observations (patient_id, mdc_code, ((panel_id IS NOT NULL)::integer), effective_us, rid)
    INCLUDE (loinc, panel_id);
"#;

/// Migration 14 (issue 18): one block-range (BRIN) index of effective
/// time instead of the B-trees by time and by code and time. Rows arrive
/// about in time order, into monthly partitions, so each range of heap
/// pages covers a short span of time: a window without a patient or
/// device (a search by date, or by code and date; the retention purge)
/// reads the pages of its time ranges and filters the code there. Ingest
/// maintains a summary per 128 pages instead of two index entries per
/// reading (on one machine the ingest bench went from 57 % to 64 % of the
/// raw COPY).
const PG_V14: &str = r#"
DROP INDEX IF EXISTS observations_time;
DROP INDEX IF EXISTS observations_mdc_time;
CREATE INDEX IF NOT EXISTS observations_time_ranges ON observations USING brin (effective_us);
"#;

/// Migration 15 (issue 18): the device minutes (`crate::minutes`) instead
/// of the index by device and time, and reading ids without a per-row
/// index (`crate::ids`; `observation_id_devices` is filled from the
/// minutes by `ids::fill` after this statement, in the same transaction).
/// `layout` fences off hubs of earlier versions: they do not write it, so
/// once this migration ran they cannot store rows that the minutes and the
/// id devices would miss (their batches fail and are sent again to an
/// upgraded hub; nothing acknowledged is lost). Chart buckets leave half
/// of each new page free, so that a batch's merge into a bucket is a
/// heap-only update (no new index entries).)
const PG_V15: &str = concat!(
    r#"
ALTER TABLE observations ADD COLUMN IF NOT EXISTS layout smallint NOT NULL DEFAULT 15;
ALTER TABLE observations ALTER COLUMN layout DROP DEFAULT;
CREATE TABLE IF NOT EXISTS observation_minutes (
    gateway_id   text NOT NULL,
    device_id    text NOT NULL,
    minute       bigint NOT NULL,
    incarnation  bigint NOT NULL,
    negative     boolean NOT NULL,
    first_seq    bigint NOT NULL,
    last_seq     bigint NOT NULL,
    PRIMARY KEY (gateway_id, device_id, minute, incarnation, negative)
);
CREATE INDEX IF NOT EXISTS observation_minutes_time ON observation_minutes (minute);
INSERT INTO observation_minutes
  SELECT gateway_id, device_id, "#,
    crate::minutes::minute_of_sql!("effective_us"),
    r#",
         incarnation, sequence < 0, MIN(sequence), MAX(sequence)
    FROM observations GROUP BY 1, 2, 3, 4, 5
  ON CONFLICT DO NOTHING;
DROP INDEX IF EXISTS observations_device_time;
CREATE TABLE IF NOT EXISTS observation_id_devices (
    device_part  text NOT NULL,
    gateway_id   text NOT NULL,
    device_id    text NOT NULL,
    incarnation  bigint NOT NULL,
    PRIMARY KEY (device_part, gateway_id, device_id, incarnation)
);
DROP INDEX IF EXISTS observations_id;
CREATE INDEX IF NOT EXISTS observations_id_keyed ON observations (id)
    WHERE "#,
    crate::ids::id_keyed!(),
    r#";
ALTER TABLE vital_rollups SET (fillfactor = 50);
"#
);

/// Migration 16 (issue 18): search totals per patient, code and hour
/// (`crate::hours`). `observation_hours` holds, per patient, MDC code,
/// LOINC code and UTC hour of effective time, how many rows a search lists
/// there (not a part of a panel), filled here from the stored rows; a
/// search's total adds the whole hours of its range and counts only its
/// partial first and last hours in the index. Ingest adds its new rows'
/// counts (`hours::record`); the statement triggers below move the counts
/// of every row an `UPDATE` or `DELETE` changes, so re-attribution,
/// panels, erasure and retention keep the totals exact without code of
/// their own. Rows from a hub before this migration (which does not count
/// them) are refused from now on, as migration 15 refused rows without
/// `layout`: the column is renamed `hub_layout`, so such a hub's `COPY`
/// names a column that no longer exists; its batches fail and are sent
/// again to an upgraded hub. The rename waits for inserts in flight, which
/// the fill below then counts. Half of each page of the totals is left
/// free, so that a batch's upsert into an hour is a heap-only update.
const PG_V16: &str = concat!(
    r#"
ALTER TABLE observations RENAME COLUMN layout TO hub_layout;
CREATE TABLE observation_hours (
    patient_id  text NOT NULL,
    mdc_code    bigint NOT NULL,
    loinc       text NOT NULL,
    hour        bigint NOT NULL,
    n           bigint NOT NULL,
    PRIMARY KEY (patient_id, mdc_code, loinc, hour)
) WITH (fillfactor = 50);
INSERT INTO observation_hours (patient_id, mdc_code, loinc, hour, n)
  SELECT patient_id, mdc_code, loinc, "#,
    crate::hours::hour_of_sql!("effective_us"),
    r#", COUNT(*)
    FROM observations WHERE panel_id IS NULL AND patient_id IS NOT NULL
   GROUP BY 1, 2, 3, 4;
"#,
    crate::hours::hours_triggers!()
);

pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (1, V1),
    (2, PG_V2),
    (3, PG_V3),
    (4, PG_V4),
    (5, PG_V5),
    (6, PG_V6),
    (7, PG_V7),
    (8, PG_V8),
    (9, PG_V9),
    (10, PG_V10),
    (11, PG_V11),
    (12, PG_V12),
    (13, PG_V13),
    (14, PG_V14),
    (15, PG_V15),
    (16, PG_V16),
];

/// Observation partitions are UTC months: `[start, end)` in µs of the
/// month holding `t_us`, and the partition's name.
pub(crate) fn month_of(t_us: i64) -> (i64, i64, String) {
    use time::{Month, OffsetDateTime};
    let secs = t_us.div_euclid(1_000_000);
    let dt = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let (y, m) = (dt.year(), dt.month());
    let start = month_start(y, m);
    let (ny, nm) = if m == Month::December {
        (y + 1, Month::January)
    } else {
        (y, m.next())
    };
    let end = month_start(ny, nm);
    let name = format!("observations_y{y:04}m{:02}", u8::from(m));
    (start, end, name)
}

fn month_start(y: i32, m: time::Month) -> i64 {
    time::Date::from_calendar_date(y, m, 1)
        .map(|d| d.midnight().assume_utc().unix_timestamp() * 1_000_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_half_open_utc_ranges() {
        // 2026-01-31T23:59:59.999999Z and 2026-02-01T00:00:00Z.
        let last = 1_769_903_999_999_999;
        let (s, e, n) = month_of(last);
        assert_eq!(n, "observations_y2026m01");
        assert_eq!((s, e), (1_767_225_600_000_000, 1_769_904_000_000_000));
        let (s2, e2, n2) = month_of(e);
        assert_eq!(n2, "observations_y2026m02");
        assert_eq!(s2, e);
        assert!(e2 > s2);
        let (_, e12, n12) = month_of(1_798_761_599_000_000); // 2026-12-31T23:59:59Z
        assert_eq!(n12, "observations_y2026m12");
        assert_eq!(e12, 1_798_761_600_000_000); // 2027-01-01
    }
}
