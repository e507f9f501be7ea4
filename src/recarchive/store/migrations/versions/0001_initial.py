"""Initial schema: recordings, recording_parties, archive_ledger, runs, export_partitions.

Revision ID: 0001
Revises:
Create Date: 2025-07-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from recarchive.store.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recordings",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("workspace_id", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("source_id", sa.Text, nullable=False),
        sa.Column("channel_id", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("direction", sa.Text),
        sa.Column("origin", sa.Text, nullable=False),
        sa.Column("duration", sa.Float(53)),
        sa.Column("stereo", sa.Boolean, nullable=False),
        sa.Column("format", sa.Text, nullable=False),
        sa.Column("transcription", sa.Boolean, nullable=False),
        sa.Column("conference_id", sa.Text),
        sa.Column("url", sa.Text),
        sa.Column("room_info_url", sa.Text),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("ended_at", UTCDateTime),
        sa.Column("started_at", UTCDateTime),
        sa.Column("created_month", sa.String(7), nullable=False),
        sa.Column("fetched_at", UTCDateTime, nullable=False),
        sa.Column("raw_json", sa.Text, nullable=False),
    )
    op.create_index("ix_recordings_created_month_id", "recordings", ["created_month", "id"])
    op.create_index("ix_recordings_created_at", "recordings", ["created_at"])
    op.create_table(
        "recording_parties",
        sa.Column("recording_id", sa.String(36), primary_key=True),
        sa.Column("role", sa.String(16), primary_key=True),
        sa.Column("contact_id", sa.Text),
        sa.Column("contact_identifier_key", sa.Text),
        sa.Column("contact_identifier_value", sa.Text),
        sa.Column("number_type", sa.Text),
        sa.Column("number", sa.Text),
        sa.Column("number_anonymous", sa.Boolean),
        sa.Column("number_caller_id_name", sa.Text),
        sa.Column("number_identity", sa.Text),
        sa.Column("number_country_iso_code", sa.Text),
        sa.ForeignKeyConstraint(
            ["recording_id"],
            ["recordings.id"],
            ondelete="CASCADE",
            name="fk_recording_parties_recording",
        ),
    )
    op.create_table(
        "archive_ledger",
        sa.Column("recording_id", sa.String(36), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.Column("next_attempt_at", UTCDateTime),
        sa.Column("s3_bucket", sa.Text),
        sa.Column("s3_key", sa.Text),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("sha256", sa.String(64)),
        sa.Column("archived_at", UTCDateTime),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", UTCDateTime),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index(
        "ix_archive_ledger_state_next_attempt", "archive_ledger", ["state", "next_attempt_at"]
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("requested", sa.Integer, nullable=False, server_default="0"),
        sa.Column("archived", sa.Integer, nullable=False, server_default="0"),
        sa.Column("already_archived", sa.Integer, nullable=False, server_default="0"),
        sa.Column("metadata_only", sa.Integer, nullable=False, server_default="0"),
        sa.Column("missing", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("busy", sa.Integer, nullable=False, server_default="0"),
        sa.Column("bytes_uploaded", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "export_partitions",
        sa.Column("created_month", sa.String(7), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("exported_version", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("changed_at", UTCDateTime, nullable=False),
        sa.Column("exported_at", UTCDateTime),
    )


def downgrade() -> None:
    op.drop_table("export_partitions")
    op.drop_table("runs")
    op.drop_index("ix_archive_ledger_state_next_attempt", table_name="archive_ledger")
    op.drop_table("archive_ledger")
    op.drop_table("recording_parties")
    op.drop_index("ix_recordings_created_at", table_name="recordings")
    op.drop_index("ix_recordings_created_month_id", table_name="recordings")
    op.drop_table("recordings")
