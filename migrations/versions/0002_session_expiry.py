"""Each session carries its own expiry: silo_sessions.expires_at, indexed for the sweep.

Apps with different TTLs may share one database: the app that touches a
session writes when it expires, and the sweep compares that with the clock
instead of applying its own TTL to every row. Existing sessions get the
default TTL (3600 s) plus the default touch interval (60 s) once; their next
request writes their app's own. A plain ``ADD COLUMN`` with a default on both
databases: no table is rebuilt (on SQLite a rebuild's ``DROP TABLE`` would
cascade to every namespace row), and ``--sql`` needs no live database.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_LIFETIME_S = 3600 + 60
EPOCH = "1970-01-01 00:00:00+00:00"
COMMENT = (
    "When the session expires unless touched again: last_active + its app's TTL + touch interval"
)


def upgrade() -> None:
    op.add_column(
        "silo_sessions",
        sa.Column(
            "expires_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text(f"'{EPOCH}'"),
            comment=COMMENT,
        ),
    )
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "UPDATE silo_sessions SET expires_at = last_active"
            f" + interval '{DEFAULT_LIFETIME_S} seconds'"
        )
    else:  # SQLite keeps UTC as 'YYYY-MM-DD HH:MM:SS.ffffff' text
        op.execute(
            "UPDATE silo_sessions SET expires_at = strftime('%Y-%m-%d %H:%M:%f', last_active,"
            f" '+{DEFAULT_LIFETIME_S} seconds') || '000'"
        )
    op.drop_index("ix_silo_sessions_last_active", table_name="silo_sessions")
    op.create_index("ix_silo_sessions_expires_at", "silo_sessions", ["expires_at", "sid"])


def downgrade() -> None:
    op.drop_index("ix_silo_sessions_expires_at", table_name="silo_sessions")
    op.create_index("ix_silo_sessions_last_active", "silo_sessions", ["last_active", "sid"])
    if op.get_context().dialect.name == "postgresql":
        op.drop_column("silo_sessions", "expires_at")
    else:  # SQLite >= 3.35 drops a column in place (no table rebuild, no cascade)
        op.execute("ALTER TABLE silo_sessions DROP COLUMN expires_at")
