"""Transcriptions: their own ledger.

* ``transcription_ledger``: one row per (recording, transcription) recarchive looked at: its
  state (``pending``, ``archived``, ``failed``, ``unavailable``), Bird's status and locale, and
  for each stored format (``.json``, ``.txt``) its key, size and SHA-256.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from recarchive.store.tables import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transcription_ledger",
        sa.Column("recording_id", sa.String(36), primary_key=True),
        sa.Column("transcription_id", sa.String(36), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("bird_status", sa.String(64)),
        sa.Column("locale", sa.String(35)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.Column("next_attempt_at", UTCDateTime()),
        sa.Column("s3_bucket", sa.Text),
        sa.Column("json_key", sa.Text),
        sa.Column("json_size", sa.BigInteger),
        sa.Column("json_sha256", sa.String(64)),
        sa.Column("txt_key", sa.Text),
        sa.Column("txt_size", sa.BigInteger),
        sa.Column("txt_sha256", sa.String(64)),
        sa.Column("archived_at", UTCDateTime()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_index(
        "ix_transcription_ledger_state_next_attempt",
        "transcription_ledger",
        ["state", "next_attempt_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_transcription_ledger_state_next_attempt", table_name="transcription_ledger")
    op.drop_table("transcription_ledger")
