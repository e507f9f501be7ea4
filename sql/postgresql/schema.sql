-- recarchive schema for PostgreSQL (revision 0007; keep in step with
-- src/recarchive/store/tables.py and src/recarchive/store/migrations/, tests/test_schema.py checks it).
--
-- The application creates and upgrades its schema itself with Alembic
-- (`recarchive db upgrade`, also run on every start); this file documents the schema and lets
-- a DBA create it by hand. Timestamps are timestamptz, written in UTC.

-- One row per recording; raw_json holds the redacted payload (unknown fields included).
CREATE TABLE recordings (
    id VARCHAR(36) NOT NULL,
    workspace_id TEXT NOT NULL,
    source TEXT NOT NULL,
    source_id TEXT NOT NULL,
    channel_id TEXT,
    status TEXT NOT NULL,
    direction TEXT,
    origin TEXT NOT NULL,
    duration DOUBLE PRECISION,
    stereo BOOLEAN NOT NULL,
    format TEXT NOT NULL,
    transcription BOOLEAN NOT NULL,
    conference_id TEXT,
    url TEXT,
    room_info_url TEXT,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    ended_at TIMESTAMP WITH TIME ZONE,
    started_at TIMESTAMP WITH TIME ZONE,
    created_month VARCHAR(7) NOT NULL,
    fetched_at TIMESTAMP WITH TIME ZONE NOT NULL,
    raw_json TEXT NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX ix_recordings_created_at ON recordings (created_at);
CREATE INDEX ix_recordings_created_month_id ON recordings (created_month, id);

-- One row per present originator/receiver of a recording.
CREATE TABLE recording_parties (
    recording_id VARCHAR(36) NOT NULL,
    role VARCHAR(16) NOT NULL,
    contact_id TEXT,
    contact_identifier_key TEXT,
    contact_identifier_value TEXT,
    number_type TEXT,
    number TEXT,
    number_anonymous BOOLEAN,
    number_caller_id_name TEXT,
    number_identity TEXT,
    number_country_iso_code TEXT,
    PRIMARY KEY (recording_id, role),
    CONSTRAINT fk_recording_parties_recording FOREIGN KEY(recording_id) REFERENCES recordings (id) ON DELETE CASCADE
);

-- One row per requested recording: state, attempts, media location, lease; and the Object
-- Lock of its objects: lock_mode (NULL: none), retain_until (createdAt + retention days, kept
-- also when it had passed at the write: then lock_mode is NULL), the legal hold and its time.
-- state: pending | metadata_only | archived | missing | failed
CREATE TABLE archive_ledger (
    recording_id VARCHAR(36) NOT NULL,
    state VARCHAR(16) NOT NULL,
    attempts INTEGER DEFAULT 0 NOT NULL,
    last_error TEXT,
    next_attempt_at TIMESTAMP WITH TIME ZONE,
    s3_bucket TEXT,
    s3_key TEXT,
    size_bytes BIGINT,
    sha256 VARCHAR(64),
    archived_at TIMESTAMP WITH TIME ZONE,
    lease_owner TEXT,
    lease_expires_at TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    registered_run INTEGER,
    lock_mode VARCHAR(16),
    retain_until TIMESTAMP WITH TIME ZONE,
    legal_hold BOOLEAN DEFAULT false NOT NULL,
    legal_hold_at TIMESTAMP WITH TIME ZONE,
    PRIMARY KEY (recording_id)
);
CREATE INDEX ix_archive_ledger_state_next_attempt ON archive_ledger (state, next_attempt_at);

-- One row per run with its counts.
CREATE TABLE runs (
    id SERIAL NOT NULL,
    kind VARCHAR(32) NOT NULL,
    status VARCHAR(16) NOT NULL,
    started_at TIMESTAMP WITH TIME ZONE NOT NULL,
    finished_at TIMESTAMP WITH TIME ZONE,
    params TEXT NOT NULL,
    requested INTEGER DEFAULT 0 NOT NULL,
    archived INTEGER DEFAULT 0 NOT NULL,
    already_archived INTEGER DEFAULT 0 NOT NULL,
    metadata_only INTEGER DEFAULT 0 NOT NULL,
    missing INTEGER DEFAULT 0 NOT NULL,
    failed INTEGER DEFAULT 0 NOT NULL,
    busy INTEGER DEFAULT 0 NOT NULL,
    bytes_uploaded BIGINT DEFAULT 0 NOT NULL,
    error TEXT,
    owner VARCHAR(255),
    heartbeat_at TIMESTAMP WITH TIME ZONE,
    erased INTEGER DEFAULT 0 NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX ix_runs_owner ON runs (owner);

-- Parquet partitions (created_month) to export: due while version > exported_version.
CREATE TABLE export_partitions (
    created_month VARCHAR(7) NOT NULL,
    version BIGINT NOT NULL,
    exported_version BIGINT DEFAULT 0 NOT NULL,
    changed_at TIMESTAMP WITH TIME ZONE NOT NULL,
    exported_at TIMESTAMP WITH TIME ZONE,
    PRIMARY KEY (created_month)
);

-- List windows [window_start, window_end) of createdAt listed to the last page.
CREATE TABLE listed_windows (
    window_start TIMESTAMP WITH TIME ZONE NOT NULL,
    window_end TIMESTAMP WITH TIME ZONE NOT NULL,
    listed_at TIMESTAMP WITH TIME ZONE NOT NULL,
    run_id INTEGER,
    recordings INTEGER DEFAULT 0 NOT NULL,
    PRIMARY KEY (window_start, window_end)
);

-- Shared API rate limits: when the next request permit is free (epoch seconds, database clock).
CREATE TABLE request_permits (
    name VARCHAR(255) NOT NULL,
    next_free DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name)
);

-- One row per erasure asked for (recarchive erase): who, when, why, what was deleted.
CREATE TABLE erasures (
    id SERIAL NOT NULL,
    recording_id VARCHAR(36) NOT NULL,
    outcome VARCHAR(16) NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT,
    requested_by VARCHAR(255) NOT NULL,
    owner VARCHAR(255) NOT NULL,
    requested_at TIMESTAMP WITH TIME ZONE NOT NULL,
    finished_at TIMESTAMP WITH TIME ZONE,
    created_month VARCHAR(7),
    s3_versions_deleted INTEGER DEFAULT 0 NOT NULL,
    sql_rows_deleted INTEGER DEFAULT 0 NOT NULL,
    parquet_partitions_rewritten INTEGER DEFAULT 0 NOT NULL,
    parquet_versions_deleted INTEGER DEFAULT 0 NOT NULL,
    at_source BOOLEAN NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX ix_erasures_recording_id ON erasures (recording_id);

-- One row per transcription of an archived recording (or "*": a listing to look at again).
CREATE TABLE transcription_ledger (
    recording_id VARCHAR(36) NOT NULL,
    transcription_id VARCHAR(36) NOT NULL,
    state VARCHAR(16) NOT NULL,
    bird_status VARCHAR(64),
    locale VARCHAR(35),
    attempts INTEGER DEFAULT 0 NOT NULL,
    last_error TEXT,
    next_attempt_at TIMESTAMP WITH TIME ZONE,
    s3_bucket TEXT,
    json_key TEXT,
    json_size BIGINT,
    json_sha256 VARCHAR(64),
    txt_key TEXT,
    txt_size BIGINT,
    txt_sha256 VARCHAR(64),
    archived_at TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (recording_id, transcription_id)
);
CREATE INDEX ix_transcription_ledger_state_next_attempt ON transcription_ledger (state, next_attempt_at);
