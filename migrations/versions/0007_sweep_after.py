"""Touches that PostgreSQL can write in place: the sweep's index moves to silo_sessions.sweep_after.

A request that touches its session writes ``last_active`` and ``expires_at``. While
``expires_at`` was indexed, every such write was a new row version with new index
entries (never a HOT update), so ``silo_sessions`` and its indexes grew with traffic,
not with sessions. Now the sweep pages through ``sweep_after``: a lower bound of
``expires_at`` that a touch moves only once it has passed, and that the sweep moves up
to ``expires_at`` for a session it finds still alive. Most touches change no indexed
column, and with room left on each page (``fillfactor``) PostgreSQL updates the row in
place. ``expires_at`` keeps its meaning: when the session expires unless touched again.

Existing rows get ``sweep_after = expires_at``. On PostgreSQL the hot tables get storage
settings: ``fillfactor`` (room for in-place updates) and autovacuum thresholds that
follow the tables' churn rather than their size. A plain ``ADD COLUMN``, ``UPDATE``
and ``CREATE INDEX``: no table is rebuilt, and ``--sql`` needs no live database.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EPOCH = "1970-01-01 00:00:00+00:00"
COMMENT = (
    "When the expiry sweep next looks at the session: at most expires_at, moved up to it "
    "by a touch once passed or by the sweep"
)
STORAGE = {
    "silo_sessions": "fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05, "
    "autovacuum_vacuum_threshold = 200",
    "silo_namespaces": "fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05, "
    "autovacuum_vacuum_threshold = 200",
    "silo_tasks": "fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05, "
    "autovacuum_vacuum_threshold = 200",
    "silo_idempotency_keys": "autovacuum_vacuum_scale_factor = 0.05, "
    "autovacuum_vacuum_threshold = 200",
    "silo_expired_sids": "autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_threshold = 200",
}
RESET = {
    table: "(" + ", ".join(part.split("=")[0].strip() for part in options.split(",")) + ")"
    for table, options in STORAGE.items()
}


def upgrade() -> None:
    op.add_column(
        "silo_sessions",
        sa.Column(
            "sweep_after",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text(f"'{EPOCH}'"),
            comment=COMMENT,
        ),
    )
    op.execute("UPDATE silo_sessions SET sweep_after = expires_at")
    op.create_index("ix_silo_sessions_sweep_after", "silo_sessions", ["sweep_after", "sid"])
    op.drop_index("ix_silo_sessions_expires_at", table_name="silo_sessions")
    if op.get_context().dialect.name == "postgresql":
        for table, options in STORAGE.items():
            op.execute(f"ALTER TABLE {table} SET ({options})")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for table, options in RESET.items():
            op.execute(f"ALTER TABLE {table} RESET {options}")
    op.create_index("ix_silo_sessions_expires_at", "silo_sessions", ["expires_at", "sid"])
    op.drop_index("ix_silo_sessions_sweep_after", table_name="silo_sessions")
    if op.get_context().dialect.name == "postgresql":
        op.drop_column("silo_sessions", "sweep_after")
    else:  # SQLite >= 3.35 drops a column in place (no table rebuild, no cascade)
        op.execute("ALTER TABLE silo_sessions DROP COLUMN sweep_after")
