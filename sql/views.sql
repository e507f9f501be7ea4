-- Analyst views over the recarchive SQL tables (SQLite and PostgreSQL; plain SQL only).
-- Not created by the application: apply this file to a database that has the schema, e.g.
--   sqlite3 recarchive-data/archive.db < sql/views.sql
--   psql "$DATABASE_URL" -f sql/views.sql
-- The Parquet dataset (recarchive query) has the same columns as recordings_flat.

DROP VIEW IF EXISTS recordings_flat;
DROP VIEW IF EXISTS ledger_state_counts;
DROP VIEW IF EXISTS recordings_per_month;
DROP VIEW IF EXISTS failed_recordings;

-- One row per recording: the payload columns, both parties, the media location and state.
CREATE VIEW recordings_flat AS
SELECT
    r.id, r.workspace_id, r.source, r.source_id, r.channel_id, r.status, r.direction,
    r.origin, r.duration, r.stereo, r.format, r.transcription, r.conference_id, r.url,
    r.room_info_url, r.created_at, r.updated_at, r.ended_at, r.started_at, r.created_month,
    r.fetched_at,
    o.contact_id AS originator_contact_id,
    o.contact_identifier_key AS originator_contact_identifier_key,
    o.contact_identifier_value AS originator_contact_identifier_value,
    o.number_type AS originator_number_type,
    o.number AS originator_number,
    o.number_anonymous AS originator_number_anonymous,
    o.number_caller_id_name AS originator_number_caller_id_name,
    o.number_identity AS originator_number_identity,
    o.number_country_iso_code AS originator_number_country_iso_code,
    c.contact_id AS receiver_contact_id,
    c.contact_identifier_key AS receiver_contact_identifier_key,
    c.contact_identifier_value AS receiver_contact_identifier_value,
    c.number_type AS receiver_number_type,
    c.number AS receiver_number,
    c.number_anonymous AS receiver_number_anonymous,
    c.number_caller_id_name AS receiver_number_caller_id_name,
    c.number_identity AS receiver_number_identity,
    c.number_country_iso_code AS receiver_number_country_iso_code,
    CASE WHEN l.state = 'archived' THEN 's3://' || l.s3_bucket || '/' || l.s3_key END
        AS media_s3_uri,
    CASE WHEN l.state = 'archived' THEN l.sha256 END AS media_sha256,
    CASE WHEN l.state = 'archived' THEN l.size_bytes END AS media_size_bytes,
    CASE WHEN l.state = 'archived' THEN l.archived_at END AS archived_at,
    l.state AS ledger_state
FROM recordings r
LEFT JOIN recording_parties o ON o.recording_id = r.id AND o.role = 'originator'
LEFT JOIN recording_parties c ON c.recording_id = r.id AND c.role = 'receiver'
LEFT JOIN archive_ledger l ON l.recording_id = r.id;

-- Ledger rows per state.
CREATE VIEW ledger_state_counts AS
SELECT state, COUNT(*) AS recordings
FROM archive_ledger
GROUP BY state;

-- Recordings, total duration and archived media per created month.
CREATE VIEW recordings_per_month AS
SELECT
    r.created_month,
    COUNT(*) AS recordings,
    SUM(r.duration) AS duration_seconds,
    SUM(CASE WHEN l.state = 'archived' THEN 1 ELSE 0 END) AS archived,
    SUM(CASE WHEN l.state = 'archived' THEN l.size_bytes ELSE 0 END) AS archived_bytes
FROM recordings r
LEFT JOIN archive_ledger l ON l.recording_id = r.id
GROUP BY r.created_month;

-- Failed recordings with why and when they are due again (NULL: only on request).
CREATE VIEW failed_recordings AS
SELECT recording_id, attempts, last_error, next_attempt_at, updated_at
FROM archive_ledger
WHERE state = 'failed';
