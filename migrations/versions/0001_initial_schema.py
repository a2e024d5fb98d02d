"""Initial schema: sessions, namespaces, expired SIDs, files and tasks.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SID = sa.String(128)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def ts(name: str, comment: str, *, nullable: bool = False) -> sa.Column[dt.datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, comment=comment)


def owner() -> sa.Column[str]:
    return sa.Column(
        "sid",
        SID,
        sa.ForeignKey("silo_sessions.sid", ondelete="CASCADE"),
        nullable=False,
        comment="Owning session",
    )


def upgrade() -> None:
    op.create_table(
        "silo_sessions",
        sa.Column("sid", SID, nullable=False, comment="Session ID the client presents"),
        ts("created_at", "When the session was created"),
        ts("last_active", "Last request seen (written at most once per touch interval)"),
        sa.PrimaryKeyConstraint("sid", name="pk_silo_sessions"),
        comment="One row per live flask-silo-sql session",
    )
    op.create_index("ix_silo_sessions_last_active", "silo_sessions", ["last_active", "sid"])

    op.create_table(
        "silo_namespaces",
        sa.Column(
            "sid",
            SID,
            sa.ForeignKey(
                "silo_sessions.sid",
                ondelete="CASCADE",
                name="fk_silo_namespaces_sid_silo_sessions",
            ),
            nullable=False,
            comment="Owning session",
        ),
        sa.Column(
            "name", sa.String(255), nullable=False, comment="Namespace name given to register()"
        ),
        sa.Column("data", JSON, nullable=False, comment="The namespace's state as JSON"),
        sa.Column(
            "version",
            sa.Integer(),
            nullable=False,
            comment="Bumped on every write; guards against lost updates",
        ),
        ts("updated_at", "Time of the last write"),
        sa.PrimaryKeyConstraint("sid", "name", name="pk_silo_namespaces"),
        comment="One row per (session, namespace): the state of that namespace",
    )

    op.create_table(
        "silo_expired_sids",
        sa.Column("sid", SID, nullable=False, comment="SID of an expired session"),
        ts("expired_at", "When the session was expired"),
        sa.PrimaryKeyConstraint("sid", name="pk_silo_expired_sids"),
        comment="Expired SIDs remembered for expired_retain seconds, to answer 410 Gone",
    )
    op.create_index("ix_silo_expired_sids_expired_at", "silo_expired_sids", ["expired_at"])

    op.create_table(
        "silo_files",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
            comment="Surrogate key",
        ),
        sa.Column(
            "sid",
            SID,
            sa.ForeignKey(
                "silo_sessions.sid", ondelete="CASCADE", name="fk_silo_files_sid_silo_sessions"
            ),
            nullable=False,
            comment="Owning session",
        ),
        sa.Column(
            "store", sa.String(255), nullable=False, comment="File store name (add_file_store)"
        ),
        sa.Column(
            "filename", sa.String(255), nullable=False, comment="Sanitised file name on disk"
        ),
        sa.Column(
            "size_bytes", sa.BigInteger(), nullable=False, comment="Size of the file in bytes"
        ),
        sa.Column("sha256", sa.String(64), nullable=False, comment="Hex SHA-256 of the content"),
        sa.Column("content_type", sa.String(255), nullable=True, comment="MIME type, when known"),
        ts("created_at", "When the file was stored"),
        sa.PrimaryKeyConstraint("id", name="pk_silo_files"),
        sa.UniqueConstraint("sid", "store", "filename", name="uq_silo_files_sid_store_filename"),
        comment="One row per file kept in a session's directory",
    )

    op.create_table(
        "silo_tasks",
        sa.Column("id", sa.String(32), nullable=False, comment="Task ID (32 hex characters)"),
        sa.Column(
            "sid",
            SID,
            sa.ForeignKey(
                "silo_sessions.sid", ondelete="CASCADE", name="fk_silo_tasks_sid_silo_sessions"
            ),
            nullable=False,
            comment="Owning session",
        ),
        sa.Column(
            "name", sa.String(255), nullable=False, comment="Task name given to BackgroundTask"
        ),
        sa.Column(
            "status", sa.String(16), nullable=False, comment="idle, running, complete or failed"
        ),
        sa.Column("progress", sa.Float(), nullable=False, comment="Percent complete, 0 to 100"),
        sa.Column("message", sa.Text(), nullable=False, comment="Latest status message"),
        sa.Column("logs", JSON, nullable=False, comment="Newest log lines (bounded list)"),
        sa.Column("error", sa.Text(), nullable=True, comment="Error text when failed"),
        ts("started_at", "When the task started", nullable=True),
        ts("finished_at", "When the task ended", nullable=True),
        ts("heartbeat_at", "Last sign of life from the worker running it", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_silo_tasks"),
        comment="One row per background task owned by a session",
    )
    op.create_index("ix_silo_tasks_sid", "silo_tasks", ["sid"])
    op.create_index("ix_silo_tasks_status_heartbeat_at", "silo_tasks", ["status", "heartbeat_at"])


def downgrade() -> None:
    op.drop_table("silo_tasks")
    op.drop_table("silo_files")
    op.drop_index("ix_silo_expired_sids_expired_at", table_name="silo_expired_sids")
    op.drop_table("silo_expired_sids")
    op.drop_table("silo_namespaces")
    op.drop_index("ix_silo_sessions_last_active", table_name="silo_sessions")
    op.drop_table("silo_sessions")
