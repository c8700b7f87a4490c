//! The SQLite schema: ordered migrations, each applied once in one transaction with its
//! version row (`schema_migrations`).

pub const SCHEMA_V1: &str = r#"
CREATE TABLE gateways (
    id            TEXT PRIMARY KEY,
    token_sha256  TEXT NOT NULL UNIQUE,
    created_us    INTEGER NOT NULL,
    revoked_us    INTEGER
);
CREATE TABLE batches (
    gateway_id     TEXT NOT NULL,
    sequence       INTEGER NOT NULL,
    received_us    INTEGER NOT NULL,
    created_us     INTEGER NOT NULL,
    agent_version  TEXT NOT NULL,
    ack            BLOB NOT NULL,
    PRIMARY KEY (gateway_id, sequence)
);
CREATE TABLE devices (
    gateway_id     TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    protocol       TEXT NOT NULL,
    manufacturer   TEXT NOT NULL,
    model          TEXT NOT NULL,
    serial_number  TEXT NOT NULL,
    location       TEXT NOT NULL,
    first_seen_us  INTEGER NOT NULL,
    last_seen_us   INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, device_id)
);
CREATE TABLE observations (
    id            TEXT PRIMARY KEY,
    gateway_id    TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    sequence      INTEGER NOT NULL,
    patient_id    TEXT,
    loinc         TEXT NOT NULL,
    mdc_code      INTEGER NOT NULL,
    effective_us  INTEGER NOT NULL,
    status        TEXT NOT NULL,
    value         REAL,
    batch_sequence INTEGER NOT NULL,
    received_us   INTEGER NOT NULL,
    resource      TEXT NOT NULL,
    UNIQUE (gateway_id, device_id, sequence)
);
CREATE INDEX observations_patient_loinc_time ON observations (patient_id, loinc, effective_us);
CREATE INDEX observations_patient_mdc_time ON observations (patient_id, mdc_code, effective_us);
CREATE INDEX observations_mdc_time ON observations (mdc_code, effective_us);
CREATE INDEX observations_time ON observations (effective_us);
CREATE TABLE waveforms (
    gateway_id        TEXT NOT NULL,
    device_id         TEXT NOT NULL,
    sequence          INTEGER NOT NULL,
    mdc_code          INTEGER NOT NULL,
    vendor_label      TEXT NOT NULL,
    start_us          INTEGER NOT NULL,
    time_source       INTEGER NOT NULL,
    sample_period_us  INTEGER NOT NULL,
    scale             REAL NOT NULL,
    "offset"          REAL NOT NULL,
    mdc_unit          INTEGER NOT NULL,
    ucum_unit         TEXT NOT NULL,
    validity          INTEGER NOT NULL,
    flags             TEXT NOT NULL,
    sample_count      INTEGER NOT NULL,
    samples_i32le     BLOB NOT NULL,
    batch_sequence    INTEGER NOT NULL,
    received_us       INTEGER NOT NULL,
    UNIQUE (gateway_id, device_id, sequence)
);
CREATE TABLE rejected_readings (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway_id      TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    batch_sequence  INTEGER NOT NULL,
    sequence        INTEGER NOT NULL,
    kind            TEXT NOT NULL,
    reason          TEXT NOT NULL,
    detail          TEXT NOT NULL,
    raw             BLOB NOT NULL,
    received_us     INTEGER NOT NULL
);
CREATE INDEX rejected_readings_gateway ON rejected_readings (gateway_id, received_us);
"#;

/// v2: technical readings (device link events) and gateway events.
/// Idempotent: databases created by early builds have the table already.
pub const SCHEMA_V2: &str = r#"
CREATE TABLE IF NOT EXISTS device_events (
    gateway_id      TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    sequence        INTEGER NOT NULL,
    kind            TEXT NOT NULL,
    time_us         INTEGER NOT NULL,
    detail          TEXT NOT NULL,
    batch_sequence  INTEGER NOT NULL,
    received_us     INTEGER NOT NULL,
    UNIQUE (gateway_id, device_id, sequence)
);
CREATE INDEX IF NOT EXISTS device_events_device_time ON device_events (gateway_id, device_id, time_us);
"#;

/// v3: one-time enrolment tokens (stored as SHA-256), exchanged by
/// `POST /api/v1/enroll` for a gateway token.
pub const SCHEMA_V3: &str = r#"
CREATE TABLE enrollment_tokens (
    token_sha256 TEXT PRIMARY KEY,
    created_us   INTEGER NOT NULL,
    expires_us   INTEGER NOT NULL,
    used_us      INTEGER,
    gateway_id   TEXT
);
"#;

/// v4: compact observation rows rendered to FHIR on read. New rows keep the
/// source protobuf in `payload` (a `Reading`; a `DeviceData` holding the
/// members of a blood-pressure panel; or a `Waveform`) and an empty
/// `resource`; rows written before v4 keep their stored JSON. `panel_id`
/// marks a reading that is a component of a panel row (searches list the
/// panel, not its parts; a panel row's `sequence` is -(its systolic
/// reading's sequence + 1), since readings own the non-negative ones).
/// Waveforms become Observations (SampledData) in
/// this table; the v1 `waveforms` table keeps older rows only.
pub const SCHEMA_V4: &str = r#"
ALTER TABLE observations ADD COLUMN kind TEXT NOT NULL DEFAULT 'reading';
ALTER TABLE observations ADD COLUMN category TEXT NOT NULL DEFAULT 'vital-signs';
ALTER TABLE observations ADD COLUMN payload BLOB;
ALTER TABLE observations ADD COLUMN panel_id TEXT;
CREATE INDEX observations_device_time ON observations (gateway_id, device_id, effective_us);
ALTER TABLE devices ADD COLUMN fhir_id TEXT;
CREATE INDEX devices_fhir_id ON devices (fhir_id);
"#;

/// v6: a gateway's previous token (SHA-256) after `gateway rotate
/// --grace-secs`, accepted until `expires_us`.
pub const SCHEMA_V6: &str = r#"
CREATE TABLE IF NOT EXISTS gateway_grace_tokens (
    token_sha256 TEXT PRIMARY KEY,
    gateway_id   TEXT NOT NULL,
    expires_us   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS gateway_grace_tokens_gateway ON gateway_grace_tokens (gateway_id);
"#;

/// v7: search indexes that answer the common query (one patient, one
/// metric, a time range, newest first, panel parts excluded) from the index
/// alone: partial on `panel_id IS NULL`, ordered by (effective time,
/// rowid). Replaces the two v1 patient indexes (the LOINC one was redundant:
/// a LOINC code resolves to MDC codes). Drops v5's index of rows awaiting
/// attribution: rows are now attributed before they are inserted.
pub const SCHEMA_V7: &str = r#"
DROP INDEX IF EXISTS observations_patient_loinc_time;
DROP INDEX IF EXISTS observations_patient_mdc_time;
DROP INDEX IF EXISTS observations_mdc_time;
DROP INDEX IF EXISTS observations_pending;
CREATE INDEX IF NOT EXISTS observations_search ON observations (patient_id, mdc_code, effective_us)
    WHERE panel_id IS NULL;
CREATE INDEX IF NOT EXISTS observations_code_time ON observations (mdc_code, effective_us)
    WHERE panel_id IS NULL;
"#;

/// Schema v5: beds, device placements, patient stays; attribution columns
/// of observations. Appended to the store's ordered migrations.
pub const SCHEMA_V5: &str = r#"
CREATE TABLE beds (
    id          TEXT PRIMARY KEY,
    ward        TEXT NOT NULL,
    label       TEXT NOT NULL,
    created_us  INTEGER NOT NULL
);
CREATE TABLE device_placements (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway_id  TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    bed_id      TEXT NOT NULL REFERENCES beds (id),
    from_us     INTEGER NOT NULL,
    to_us       INTEGER,
    CHECK (to_us IS NULL OR to_us > from_us)
);
CREATE INDEX device_placements_device ON device_placements (gateway_id, device_id, from_us);
CREATE INDEX device_placements_bed ON device_placements (bed_id, from_us);
CREATE TABLE patient_stays (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    patient_system  TEXT NOT NULL,
    patient_value   TEXT NOT NULL,
    bed_id          TEXT NOT NULL REFERENCES beds (id),
    from_us         INTEGER NOT NULL,
    to_us           INTEGER,
    visit           TEXT,
    CHECK (to_us IS NULL OR to_us > from_us)
);
CREATE INDEX patient_stays_patient ON patient_stays (patient_system, patient_value, from_us);
CREATE INDEX patient_stays_bed ON patient_stays (bed_id, from_us);
CREATE INDEX patient_stays_visit ON patient_stays (visit) WHERE visit IS NOT NULL;
ALTER TABLE observations ADD COLUMN patient_system TEXT;
ALTER TABLE observations ADD COLUMN attribution TEXT;
UPDATE observations SET attribution = CASE WHEN patient_id IS NULL THEN 'unattributed' ELSE 'legacy' END;
CREATE INDEX observations_pending ON observations (gateway_id, batch_sequence) WHERE attribution IS NULL;
"#;

/// v8: manual score inputs, and an index of blood-pressure panel parts by
/// patient (the v7 search index leaves panel parts out; the scores read the
/// systolic part of a panel).
pub const SCHEMA_V8: &str = r#"
CREATE TABLE IF NOT EXISTS manual_inputs (
    patient_id    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    value         TEXT NOT NULL,
    effective_us  INTEGER NOT NULL,
    recorded_us   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS manual_inputs_patient ON manual_inputs (patient_id, kind, effective_us);
CREATE INDEX IF NOT EXISTS observations_panel_parts ON observations (patient_id, mdc_code, effective_us)
    WHERE panel_id IS NOT NULL;
"#;

/// v9: alerts, their transitions and per-patient rule overrides.
pub const SCHEMA_V9: &str = r#"
CREATE TABLE IF NOT EXISTS alerts (
    id                  INTEGER PRIMARY KEY,
    kind                TEXT NOT NULL,
    code                TEXT NOT NULL,
    priority            TEXT NOT NULL,
    state               TEXT NOT NULL,
    message             TEXT NOT NULL,
    patient_id          TEXT,
    gateway_id          TEXT,
    device_id           TEXT,
    value               REAL,
    unit                TEXT,
    condition_since_us  INTEGER NOT NULL,
    raised_us           INTEGER NOT NULL,
    acknowledged_us     INTEGER,
    acknowledged_by     TEXT,
    escalated_us        INTEGER,
    resolved_us         INTEGER
);
CREATE INDEX IF NOT EXISTS alerts_open ON alerts (state) WHERE state <> 'resolved';
CREATE INDEX IF NOT EXISTS alerts_patient ON alerts (patient_id, raised_us);
CREATE TABLE IF NOT EXISTS alert_events (
    id          INTEGER PRIMARY KEY,
    alert_id    INTEGER NOT NULL REFERENCES alerts (id),
    time_us     INTEGER NOT NULL,
    transition  TEXT NOT NULL,
    actor       TEXT
);
CREATE INDEX IF NOT EXISTS alert_events_alert ON alert_events (alert_id);
CREATE TABLE IF NOT EXISTS alert_rule_overrides (
    patient_id  TEXT NOT NULL,
    rule_id     TEXT NOT NULL,
    body        TEXT NOT NULL,
    updated_us  INTEGER NOT NULL,
    updated_by  TEXT,
    PRIMARY KEY (patient_id, rule_id)
);
"#;

/// v10: the bucket table.
pub const SCHEMA_V10: &str = r#"
CREATE TABLE IF NOT EXISTS vital_rollups (
    patient_id    TEXT NOT NULL,
    mdc_code      INTEGER NOT NULL,
    resolution_s  INTEGER NOT NULL,
    bucket_us     INTEGER NOT NULL,
    gateway_id    TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    n             INTEGER NOT NULL,
    sum           REAL NOT NULL,
    min           REAL NOT NULL,
    max           REAL NOT NULL,
    PRIMARY KEY (patient_id, mdc_code, resolution_s, bucket_us, gateway_id, device_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vital_rollups_device ON vital_rollups (gateway_id, device_id, bucket_us);
"#;

/// v11: the audit log and the triggers that keep it append-only.
pub const SCHEMA_V11: &str = r#"
CREATE TABLE IF NOT EXISTS audit_log (
    seq         INTEGER PRIMARY KEY,
    time_us     INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    resource    TEXT NOT NULL,
    patient_id  TEXT,
    outcome     INTEGER NOT NULL,
    detail      TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
"#;

/// SQLite schema v12: users, API tokens, sessions.
pub const SCHEMA_V12: &str = r#"
CREATE TABLE IF NOT EXISTS users (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_us    INTEGER NOT NULL,
    disabled_us   INTEGER
);
CREATE TABLE IF NOT EXISTS api_tokens (
    name         TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    role         TEXT NOT NULL,
    created_us   INTEGER NOT NULL,
    revoked_us   INTEGER
);
CREATE TABLE IF NOT EXISTS sessions (
    id_sha256    TEXT PRIMARY KEY,
    user_name    TEXT NOT NULL REFERENCES users (name),
    csrf         TEXT NOT NULL,
    created_us   INTEGER NOT NULL,
    last_seen_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_name);
"#;

/// v13: the score history table.
pub const SCHEMA_V13: &str = r#"
CREATE TABLE IF NOT EXISTS score_history (
    id          INTEGER PRIMARY KEY,
    patient_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    time_us     INTEGER NOT NULL,
    total       INTEGER,
    band        TEXT,
    missing     TEXT NOT NULL,
    stale       TEXT NOT NULL,
    components  TEXT
);
CREATE INDEX IF NOT EXISTS score_history_patient ON score_history (patient_id, kind, time_us);
CREATE INDEX IF NOT EXISTS score_history_time ON score_history (time_us);
"#;

/// v14: buffer incarnations (`Batch.incarnation`). A gateway whose buffer
/// is created afresh restarts its batch, reading and event sequences at 1
/// under a new incarnation, so batches are keyed by (gateway, incarnation,
/// sequence) and readings and events by (gateway, device, incarnation,
/// sequence). SQLite cannot change a table's constraints in place: the
/// three tables are rebuilt (rowids kept: paging and the search indexes use
/// them), every existing row taking incarnation 0 (the agents that sent
/// them had none; their ids do not change). `batches_received` orders a
/// gateway's batches by arrival (sequences of different incarnations do
/// not compare). (`rejected_readings` has no unique key and is unchanged:
/// its `received_us` tells the incarnations' rows apart.)
pub const SCHEMA_V14: &str = r#"
CREATE TABLE batches_v14 (
    gateway_id     TEXT NOT NULL,
    incarnation    INTEGER NOT NULL DEFAULT 0,
    sequence       INTEGER NOT NULL,
    received_us    INTEGER NOT NULL,
    created_us     INTEGER NOT NULL,
    agent_version  TEXT NOT NULL,
    ack            BLOB NOT NULL,
    PRIMARY KEY (gateway_id, incarnation, sequence)
);
INSERT INTO batches_v14 (gateway_id, incarnation, sequence, received_us, created_us,
    agent_version, ack)
  SELECT gateway_id, 0, sequence, received_us, created_us, agent_version, ack FROM batches;
DROP TABLE batches;
ALTER TABLE batches_v14 RENAME TO batches;
CREATE INDEX batches_received ON batches (gateway_id, received_us);

CREATE TABLE observations_v14 (
    id             TEXT PRIMARY KEY,
    gateway_id     TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    incarnation    INTEGER NOT NULL DEFAULT 0,
    sequence       INTEGER NOT NULL,
    patient_id     TEXT,
    loinc          TEXT NOT NULL,
    mdc_code       INTEGER NOT NULL,
    effective_us   INTEGER NOT NULL,
    status         TEXT NOT NULL,
    value          REAL,
    batch_sequence INTEGER NOT NULL,
    received_us    INTEGER NOT NULL,
    resource       TEXT NOT NULL,
    kind           TEXT NOT NULL DEFAULT 'reading',
    category       TEXT NOT NULL DEFAULT 'vital-signs',
    payload        BLOB,
    panel_id       TEXT,
    patient_system TEXT,
    attribution    TEXT,
    UNIQUE (gateway_id, device_id, incarnation, sequence)
);
INSERT INTO observations_v14 (rowid, id, gateway_id, device_id, incarnation, sequence,
    patient_id, loinc, mdc_code, effective_us, status, value, batch_sequence, received_us,
    resource, kind, category, payload, panel_id, patient_system, attribution)
  SELECT rowid, id, gateway_id, device_id, 0, sequence, patient_id, loinc, mdc_code,
    effective_us, status, value, batch_sequence, received_us, resource, kind, category,
    payload, panel_id, patient_system, attribution
  FROM observations;
DROP TABLE observations;
ALTER TABLE observations_v14 RENAME TO observations;
CREATE INDEX observations_time ON observations (effective_us);
CREATE INDEX observations_device_time ON observations (gateway_id, device_id, effective_us);
CREATE INDEX observations_search ON observations (patient_id, mdc_code, effective_us)
    WHERE panel_id IS NULL;
CREATE INDEX observations_code_time ON observations (mdc_code, effective_us)
    WHERE panel_id IS NULL;
CREATE INDEX observations_panel_parts ON observations (patient_id, mdc_code, effective_us)
    WHERE panel_id IS NOT NULL;

CREATE TABLE device_events_v14 (
    gateway_id      TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    incarnation     INTEGER NOT NULL DEFAULT 0,
    sequence        INTEGER NOT NULL,
    kind            TEXT NOT NULL,
    time_us         INTEGER NOT NULL,
    detail          TEXT NOT NULL,
    batch_sequence  INTEGER NOT NULL,
    received_us     INTEGER NOT NULL,
    UNIQUE (gateway_id, device_id, incarnation, sequence)
);
INSERT INTO device_events_v14 (rowid, gateway_id, device_id, incarnation, sequence, kind,
    time_us, detail, batch_sequence, received_us)
  SELECT rowid, gateway_id, device_id, 0, sequence, kind, time_us, detail, batch_sequence,
    received_us
  FROM device_events;
DROP TABLE device_events;
ALTER TABLE device_events_v14 RENAME TO device_events;
CREATE INDEX device_events_device_time ON device_events (gateway_id, device_id, time_us);
"#;

/// v15: failed logins and lockouts per user name, kept across restarts
/// (only existing users'); the alert engine's tracked state (as on
/// PostgreSQL, where several hubs share them).
const SCHEMA_V15: &str = r#"
CREATE TABLE IF NOT EXISTS login_failures (
    user_name       TEXT PRIMARY KEY REFERENCES users (name),
    failures        INTEGER NOT NULL,
    locked_until_us INTEGER
);
-- What the alert engine tracks between inputs, shared by every hub on
-- the database: conditions waiting for their delay, each device's newest
-- value (data stale) and each gateway's last batch (gateway offline).
CREATE TABLE IF NOT EXISTS alert_pending (
    alert_key TEXT PRIMARY KEY,
    since_us  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS alert_devices (
    gateway_id TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    last_us    INTEGER NOT NULL,
    patient_id TEXT,
    PRIMARY KEY (gateway_id, device_id)
);
CREATE TABLE IF NOT EXISTS alert_gateways (
    gateway_id TEXT PRIMARY KEY,
    last_us    INTEGER NOT NULL
);
"#;

/// v16: the Kafka / Event Hubs source (`hub_storage::StreamStore`): each
/// partition's next offset (written in the ingest transaction of the batch
/// read before it), the partition leases replicas share, and the replicas'
/// heartbeats. Idempotent (`IF NOT EXISTS`): tests
/// that roll a database back to an older version re-run it.
pub const SCHEMA_V16: &str = r#"
CREATE TABLE IF NOT EXISTS stream_offsets (
    source        TEXT NOT NULL,
    partition_id  INTEGER NOT NULL,
    next_offset   INTEGER NOT NULL,
    PRIMARY KEY (source, partition_id)
);
CREATE TABLE IF NOT EXISTS stream_leases (
    source         TEXT NOT NULL,
    partition_id   INTEGER NOT NULL,
    owner          TEXT NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (source, partition_id)
);
CREATE TABLE IF NOT EXISTS stream_replicas (
    source         TEXT NOT NULL,
    replica        TEXT NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (source, replica)
);
"#;

/// v18: the keyed audit chain. Each entry's key id (`NULL`: an unkeyed
/// link, as every entry before this version) and patient list (one id per
/// line, for an entry naming several patients); the signed checkpoints of
/// the chain head, append-only like the log. Existing entries keep their
/// unkeyed links and still verify; the first keyed entry's MAC covers them.
pub const SCHEMA_V18: &str = r#"
ALTER TABLE audit_log ADD COLUMN key_id TEXT;
ALTER TABLE audit_log ADD COLUMN patients TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    seq      INTEGER PRIMARY KEY,
    mac      TEXT NOT NULL,
    entries  INTEGER NOT NULL,
    time_us  INTEGER NOT NULL,
    key_id   TEXT NOT NULL,
    sig      TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
"#;

/// v17: login throttling (issue 17): one counter per (account, source)
/// pair, account and source, replacing the per-name lockout of v15.
const SCHEMA_V17: &str = r#"
DROP TABLE IF EXISTS login_failures;
CREATE TABLE IF NOT EXISTS login_throttle (
    key             TEXT PRIMARY KEY,
    failures        INTEGER NOT NULL,
    window_start_us INTEGER NOT NULL,
    locked_until_us INTEGER
);
CREATE INDEX IF NOT EXISTS login_throttle_window ON login_throttle (window_start_us);
"#;

/// v19: re-attribution versions. A stored reading's `version` (FHIR
/// `meta.versionId`, 1 when stored) goes up each time a placement or stay
/// change gives it another patient, and `updated_us` (`meta.lastUpdated`;
/// NULL: `received_us`) is when.
pub const SCHEMA_V19: &str = r#"
ALTER TABLE observations ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE observations ADD COLUMN updated_us INTEGER;
"#;

/// v20: patients' rights (issue 20, `hub_domain::privacy`): the subject
/// salt (created on first use), erasure tombstones (a subject key, never
/// the identifier) with the device windows whose late readings are
/// dropped, and legal holds.
pub const SCHEMA_V20: &str = r#"
CREATE TABLE IF NOT EXISTS privacy_salt (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    salt  BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS erasures (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    subject    TEXT NOT NULL,
    erased_us  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS erased_windows (
    erasure_id  INTEGER NOT NULL REFERENCES erasures (id),
    gateway_id  TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    from_us     INTEGER NOT NULL,
    to_us       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS erased_windows_device ON erased_windows (gateway_id, device_id, from_us);
CREATE TABLE IF NOT EXISTS legal_holds (
    patient_value  TEXT PRIMARY KEY,
    reason         TEXT NOT NULL,
    set_by         TEXT NOT NULL,
    set_us         INTEGER NOT NULL
);
"#;

/// v21: audit retention (docs/privacy.md). A purge removes the entries
/// up to a signed checkpoint (`audit_purges`, append-only, records each);
/// the delete trigger refuses every other delete. Verification starts the
/// chain from that checkpoint and needs the keyed purge entry.
pub const SCHEMA_V21: &str = r#"
CREATE TABLE IF NOT EXISTS audit_purges (
    through  INTEGER PRIMARY KEY,
    mac      TEXT NOT NULL,
    time_us  INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_purges_no_update BEFORE UPDATE ON audit_purges
BEGIN SELECT RAISE(ABORT, 'audit_purges is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_purges_no_delete BEFORE DELETE ON audit_purges
BEGIN SELECT RAISE(ABORT, 'audit_purges is append-only'); END;
DROP TRIGGER IF EXISTS audit_log_no_delete;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
WHEN OLD.seq > COALESCE((SELECT MAX(through) FROM audit_purges), 0)
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
"#;

/// The statement of v22 that fills `observation_minutes` from the stored
/// rows ([`FILL_OBSERVATION_MINUTES`]); a literal, so that the migration is
/// one constant.
macro_rules! fill_observation_minutes {
    () => {
        "INSERT OR IGNORE INTO observation_minutes
  SELECT gateway_id, device_id,
         ((effective_us - (((effective_us % 60000000) + 60000000) % 60000000)) / 60000000),
         incarnation, sequence < 0, MIN(sequence), MAX(sequence)
    FROM observations GROUP BY 1, 2, 3, 4, 5;"
    };
}

/// Fills `observation_minutes` from the stored rows, as migration v22 does
/// (for a bulk load that writes `observations` directly, e.g. the benches').
pub const FILL_OBSERVATION_MINUTES: &str = fill_observation_minutes!();

/// v22 (issue 18): device minutes (`crate::minutes`) instead of three
/// per-row indexes. `observation_minutes` holds, per device, minute of
/// effective time, incarnation and sign of sequence, the span of sequences
/// of its rows (filled from the stored rows here); the indexes by time, by
/// device and time and by code and time go. A device's window, a time
/// window and a search without a patient find their rows through the
/// minutes and the identity key.
pub const SCHEMA_V22: &str = concat!(
    r#"
CREATE TABLE IF NOT EXISTS observation_minutes (
    gateway_id   TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    minute       INTEGER NOT NULL,
    incarnation  INTEGER NOT NULL,
    negative     INTEGER NOT NULL,
    first_seq    INTEGER NOT NULL,
    last_seq     INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, device_id, minute, incarnation, negative)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS observation_minutes_time ON observation_minutes (minute);
"#,
    fill_observation_minutes!(),
    r#"
DROP INDEX IF EXISTS observations_time;
DROP INDEX IF EXISTS observations_device_time;
DROP INDEX IF EXISTS observations_code_time;
"#
);

/// v23 (issue 18): observation ids without a per-row index (`crate::ids`).
/// `observations` is rebuilt (rowids kept) without the primary key on
/// `id`; only the rows whose id does not end in their own sequence keep an
/// index entry; `observation_id_devices` maps a reading id's device part to
/// its devices (filled from the device minutes by `ids::fill` after this
/// statement, in the same transaction).
pub const SCHEMA_V23: &str = r#"
CREATE TABLE observations_v23 (
    id             TEXT NOT NULL,
    gateway_id     TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    incarnation    INTEGER NOT NULL DEFAULT 0,
    sequence       INTEGER NOT NULL,
    patient_id     TEXT,
    loinc          TEXT NOT NULL,
    mdc_code       INTEGER NOT NULL,
    effective_us   INTEGER NOT NULL,
    status         TEXT NOT NULL,
    value          REAL,
    batch_sequence INTEGER NOT NULL,
    received_us    INTEGER NOT NULL,
    resource       TEXT NOT NULL,
    kind           TEXT NOT NULL DEFAULT 'reading',
    category       TEXT NOT NULL DEFAULT 'vital-signs',
    payload        BLOB,
    panel_id       TEXT,
    patient_system TEXT,
    attribution    TEXT,
    version        INTEGER NOT NULL DEFAULT 1,
    updated_us     INTEGER,
    UNIQUE (gateway_id, device_id, incarnation, sequence)
);
INSERT INTO observations_v23 (rowid, id, gateway_id, device_id, incarnation, sequence,
    patient_id, loinc, mdc_code, effective_us, status, value, batch_sequence, received_us,
    resource, kind, category, payload, panel_id, patient_system, attribution, version,
    updated_us)
  SELECT rowid, id, gateway_id, device_id, incarnation, sequence, patient_id, loinc, mdc_code,
    effective_us, status, value, batch_sequence, received_us, resource, kind, category,
    payload, panel_id, patient_system, attribution, version, updated_us
  FROM observations ORDER BY rowid;
DROP TABLE observations;
ALTER TABLE observations_v23 RENAME TO observations;
CREATE INDEX observations_search ON observations (patient_id, mdc_code, effective_us)
    WHERE panel_id IS NULL;
CREATE INDEX observations_panel_parts ON observations (patient_id, mdc_code, effective_us)
    WHERE panel_id IS NOT NULL;
CREATE INDEX observations_id ON observations (id)
    WHERE substr(id, 17) <> printf('%016x', sequence);
CREATE TABLE IF NOT EXISTS observation_id_devices (
    device_part  TEXT NOT NULL,
    gateway_id   TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    incarnation  INTEGER NOT NULL,
    PRIMARY KEY (device_part, gateway_id, device_id, incarnation)
) WITHOUT ROWID;
"#;

/// The UTC hour (µs since the epoch / 3 600 000 000, rounded down) of the
/// SQL expression `$t`, a literal for the statements below.
macro_rules! hour_of {
    ($t:literal) => {
        concat!(
            "((",
            $t,
            " - (((",
            $t,
            " % 3600000000) + 3600000000) % 3600000000)) / 3600000000)"
        )
    };
}

/// The statement that fills `observation_hours` from the stored rows
/// ([`FILL_OBSERVATION_HOURS`]); a literal, so that migration v24 is one
/// constant.
macro_rules! fill_observation_hours {
    () => {
        concat!(
            "DELETE FROM observation_hours;
INSERT INTO observation_hours (patient_id, mdc_code, loinc, hour, n)
  SELECT patient_id, mdc_code, loinc, ",
            hour_of!("effective_us"),
            ", COUNT(*)
    FROM observations WHERE panel_id IS NULL AND patient_id IS NOT NULL
   GROUP BY 1, 2, 3, 4;"
        )
    };
}

/// Rebuilds `observation_hours` from the stored rows, as migration v24
/// does (for a bulk load that writes `observations` directly, e.g. the
/// benches').
pub const FILL_OBSERVATION_HOURS: &str = fill_observation_hours!();

/// The statements of the v24 triggers that take a row out of its hour
/// (`OLD`) and put one in (`NEW`): a count that reaches 0 is deleted, so
/// that no hour outlives the rows it counts (an erased patient's id
/// included).
macro_rules! hour_minus_old {
    () => {
        concat!(
            "INSERT INTO observation_hours (patient_id, mdc_code, loinc, hour, n)
    SELECT OLD.patient_id, OLD.mdc_code, OLD.loinc, ",
            hour_of!("OLD.effective_us"),
            ", -1
     WHERE OLD.panel_id IS NULL AND OLD.patient_id IS NOT NULL
    ON CONFLICT (patient_id, mdc_code, loinc, hour) DO UPDATE SET n = n - 1;
  DELETE FROM observation_hours
   WHERE patient_id = OLD.patient_id AND mdc_code = OLD.mdc_code AND loinc = OLD.loinc
     AND hour = ",
            hour_of!("OLD.effective_us"),
            " AND n = 0;"
        )
    };
}

/// v24 (issue 18): search totals per patient, code and hour
/// (`crate::hours`). `observation_hours` holds, per patient, MDC code,
/// LOINC code and UTC hour of effective time, how many rows a search
/// lists there (not a part of a panel); a search's total adds the whole
/// hours of its range and counts only its partial first and last hours
/// in the index. Ingest adds its new rows' counts
/// (`hours::record`); every change or deletion of a stored row moves its
/// count through the triggers below, so re-attribution, panels, erasure
/// and retention keep the totals exact without code of their own.
pub const SCHEMA_V24: &str = concat!(
    r#"
CREATE TABLE IF NOT EXISTS observation_hours (
    patient_id  TEXT NOT NULL,
    mdc_code    INTEGER NOT NULL,
    loinc       TEXT NOT NULL,
    hour        INTEGER NOT NULL,
    n           INTEGER NOT NULL,
    PRIMARY KEY (patient_id, mdc_code, loinc, hour)
) WITHOUT ROWID;
"#,
    fill_observation_hours!(),
    "
CREATE TRIGGER observation_hours_delete AFTER DELETE ON observations
WHEN OLD.panel_id IS NULL AND OLD.patient_id IS NOT NULL
BEGIN
  ",
    hour_minus_old!(),
    "
END;
CREATE TRIGGER observation_hours_update
AFTER UPDATE OF patient_id, mdc_code, loinc, effective_us, panel_id ON observations
WHEN (OLD.panel_id IS NULL AND OLD.patient_id IS NOT NULL)
  OR (NEW.panel_id IS NULL AND NEW.patient_id IS NOT NULL)
BEGIN
  ",
    hour_minus_old!(),
    "
  INSERT INTO observation_hours (patient_id, mdc_code, loinc, hour, n)
    SELECT NEW.patient_id, NEW.mdc_code, NEW.loinc, ",
    hour_of!("NEW.effective_us"),
    ", 1
     WHERE NEW.panel_id IS NULL AND NEW.patient_id IS NOT NULL
    ON CONFLICT (patient_id, mdc_code, loinc, hour) DO UPDATE SET n = n + 1;
END;
"
);

/// Ordered migrations; each runs once, in one transaction with its version row.
pub const MIGRATIONS: &[(i64, &str)] = &[
    (1, SCHEMA_V1),
    (2, SCHEMA_V2),
    (3, SCHEMA_V3),
    (4, SCHEMA_V4),
    (5, SCHEMA_V5),
    (6, SCHEMA_V6),
    (7, SCHEMA_V7),
    (8, SCHEMA_V8),
    (9, SCHEMA_V9),
    (10, SCHEMA_V10),
    (11, SCHEMA_V11),
    (12, SCHEMA_V12),
    (13, SCHEMA_V13),
    (14, SCHEMA_V14),
    (15, SCHEMA_V15),
    (16, SCHEMA_V16),
    (17, SCHEMA_V17),
    (18, SCHEMA_V18),
    (19, SCHEMA_V19),
    (20, SCHEMA_V20),
    (21, SCHEMA_V21),
    (22, SCHEMA_V22),
    (23, SCHEMA_V23),
    (24, SCHEMA_V24),
];
