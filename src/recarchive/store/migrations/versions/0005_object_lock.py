"""The Object Lock of each archived recording's objects, and its legal hold.

* ``archive_ledger.lock_mode``: the retention mode the MP3 and sidecar were written with
  (``GOVERNANCE`` or ``COMPLIANCE``; NULL: none).
* ``archive_ledger.retain_until``: ``createdAt`` + ``RECARCHIVE_S3_RETENTION_DAYS``, kept also
  when it had passed at the write (then ``lock_mode`` is NULL: written without retention).
* ``archive_ledger.legal_hold`` / ``legal_hold_at``: the S3 legal hold ``recarchive hold`` set
  or cleared, and when.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from recarchive.store.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("archive_ledger", sa.Column("lock_mode", sa.String(16)))
    op.add_column("archive_ledger", sa.Column("retain_until", UTCDateTime()))
    op.add_column(
        "archive_ledger",
        sa.Column("legal_hold", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("archive_ledger", sa.Column("legal_hold_at", UTCDateTime()))


def downgrade() -> None:
    with op.batch_alter_table("archive_ledger") as batch:
        for name in ("legal_hold_at", "legal_hold", "retain_until", "lock_mode"):
            batch.drop_column(name)
