"""Who registered a ledger row, which runs are alive, which list windows were covered.

* ``archive_ledger.registered_run``: the run that registered (or re-registered) the row, so
  ``retry-failed`` takes a ``pending`` row only once no live run still has to reach it.
* ``runs.heartbeat_at``: the database time a running run last proved it is alive, and an
  index on ``runs.owner`` (a lease counts only while its owner's run is alive: looked up per
  leased row).
* ``listed_windows``: each ``[window_start, window_end)`` of the list endpoint that a run
  listed completely, so the nightly run starts where the last complete window ended.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from recarchive.store.tables import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("archive_ledger", sa.Column("registered_run", sa.Integer()))
    op.add_column("runs", sa.Column("heartbeat_at", UTCDateTime()))
    op.create_index("ix_runs_owner", "runs", ["owner"])
    op.create_table(
        "listed_windows",
        sa.Column("window_start", UTCDateTime(), primary_key=True),
        sa.Column("window_end", UTCDateTime(), primary_key=True),
        sa.Column("listed_at", UTCDateTime(), nullable=False),
        sa.Column("run_id", sa.Integer()),
        sa.Column("recordings", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("listed_windows")
    op.drop_index("ix_runs_owner", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("heartbeat_at")
    with op.batch_alter_table("archive_ledger") as batch:
        batch.drop_column("registered_run")
