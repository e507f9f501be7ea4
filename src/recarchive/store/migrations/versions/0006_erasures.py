"""Erasure on request: the audit table, and the runs' count of erased recordings skipped.

* ``erasures``: one row per erasure asked for with ``recarchive erase`` (started, done or
  refused): who, when, why, and what was deleted (counts only; no personal data).
* ``runs.erased``: recordings a run skipped because they were erased (the ``erased`` ledger
  state needs no column: ``state`` is a string).

Revision ID: 0006
Revises: 0005 (re-chained onto the Object Lock revision when issue 14's branches met)
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from recarchive.store.tables import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("recording_id", sa.String(36), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("requested_by", sa.String(255), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("requested_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime()),
        sa.Column("created_month", sa.String(7)),
        sa.Column("s3_versions_deleted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("sql_rows_deleted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("parquet_partitions_rewritten", sa.Integer, nullable=False, server_default="0"),
        sa.Column("parquet_versions_deleted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("at_source", sa.Boolean, nullable=False),
    )
    op.create_index("ix_erasures_recording_id", "erasures", ["recording_id"])
    op.add_column("runs", sa.Column("erased", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("erased")
    op.drop_index("ix_erasures_recording_id", table_name="erasures")
    op.drop_table("erasures")
