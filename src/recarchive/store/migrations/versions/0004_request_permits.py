"""One API rate limit for every process that shares the ledger database.

* ``request_permits``: per shared limit, when its next request permit is free (seconds since
  the epoch, the database's clock); see :mod:`recarchive.store.permits`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_permits",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("next_free", sa.Float(53), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("request_permits")
