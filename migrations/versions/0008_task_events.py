"""Live tasks: the events table, event-stream tokens, and a cancel request on task rows.

``silo_events`` holds each session's events (task progress, completion, failure,
cancellation, and what views publish), written in the transaction of the change they
tell of, with an ID that grows in commit order; a stream replays from it by
``Last-Event-ID``. ``silo_stream_tokens`` binds a short-lived stream token to its
session, so no SID goes into a URL. ``silo_tasks.cancel_requested_at`` records a
cancel asked for while a run runs, so any process can cancel it. New tables and a
nullable column: no table is rebuilt, and ``--sql`` needs no live database.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def ts(name: str, comment: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, comment=comment)


def owner(table: str) -> sa.Column[object]:
    return sa.Column(
        "sid",
        sa.String(128),
        sa.ForeignKey(
            "silo_sessions.sid", ondelete="CASCADE", name=f"fk_{table}_sid_silo_sessions"
        ),
        nullable=False,
        comment="Owning session",
    )


def upgrade() -> None:
    op.add_column(
        "silo_tasks",
        ts(
            "cancel_requested_at",
            "When a cancel of the running run was asked for (it stops at its next write)",
            nullable=True,
        ),
    )
    op.create_table(
        "silo_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
            comment="Event ID: increasing in commit order, never reused (the stream's id:)",
        ),
        owner("silo_events"),
        sa.Column(
            "task_id", sa.String(32), nullable=True, comment="The task it is about, if any"
        ),
        sa.Column(
            "kind",
            sa.String(32),
            nullable=False,
            comment="progress, complete, failed, cancelled, cancelling, queued, reset, or the "
            "name given to silo.publish()",
        ),
        sa.Column("data", sa.Text(), nullable=False, comment="The event's data, as JSON text"),
        ts("created_at", "When it was written"),
        sa.PrimaryKeyConstraint("id", name="pk_silo_events"),
        comment="One row per event of a session, written with the change it tells of; pruned "
        "after SILO_EVENT_RETENTION",
        sqlite_autoincrement=True,
    )
    op.create_index("ix_silo_events_sid_id", "silo_events", ["sid", "id"])
    op.create_index("ix_silo_events_created_at", "silo_events", ["created_at"])
    op.create_table(
        "silo_stream_tokens",
        sa.Column(
            "token_hash",
            sa.String(64),
            nullable=False,
            comment="Hex SHA-256 of the stream token's random part (the token is never stored)",
        ),
        owner("silo_stream_tokens"),
        ts("expires_at", "When the token stops opening"),
        sa.PrimaryKeyConstraint("token_hash", name="pk_silo_stream_tokens"),
        comment="One row per event-stream token: which session a token opens a stream of",
    )
    op.create_index("ix_silo_stream_tokens_expires_at", "silo_stream_tokens", ["expires_at"])
    op.create_index("ix_silo_stream_tokens_sid", "silo_stream_tokens", ["sid"])


def downgrade() -> None:
    op.drop_index("ix_silo_stream_tokens_sid", table_name="silo_stream_tokens")
    op.drop_index("ix_silo_stream_tokens_expires_at", table_name="silo_stream_tokens")
    op.drop_table("silo_stream_tokens")
    op.drop_index("ix_silo_events_created_at", table_name="silo_events")
    op.drop_index("ix_silo_events_sid_id", table_name="silo_events")
    op.drop_table("silo_events")
    if op.get_context().dialect.name == "postgresql":
        op.drop_column("silo_tasks", "cancel_requested_at")
    else:  # SQLite >= 3.35 drops a column in place (no table rebuild)
        op.execute("ALTER TABLE silo_tasks DROP COLUMN cancel_requested_at")
