"""Durable tasks: what a registered task's row needs to outlive its worker, and the workers.

``silo_tasks`` gains the registered function's name and its JSON arguments,
the namespace holding the task, the attempt number and how many attempts a
run may take, the retry delay, when a queued or retrying run may be claimed
(``run_after``), the lease of the attempt running it (``lease_expires_at``,
renewed by its process's heartbeat, and ``worker``, that process) and its
last checkpoint. ``silo_workers`` has one row per live process that claims
runs. Plain ``ADD COLUMN`` (with server defaults where NOT NULL), ``CREATE
TABLE`` and ``CREATE INDEX``: no table is rebuilt, and ``--sql`` needs no
live database. Existing rows are plain runs (no ``target``): they keep their
meaning.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")

TASK_COLUMNS = (
    ("namespace", sa.String(255), None, "Namespace holding the task (durable runs)"),
    ("target", sa.String(255), None, "Registered task function (durable runs); NULL: a plain run"),
    ("args", JSON, None, "The registered function's arguments, as JSON"),
    ("attempt", sa.Integer(), "0", "Attempt number of the current or last attempt"),
    ("max_attempts", sa.Integer(), "1", "Attempts the run may take (retries + 1)"),
    ("retry_delay", sa.Float(), "0", "Seconds before the first retry (doubling)"),
    ("run_after", sa.DateTime(timezone=True), None, "When a queued or retrying run may start"),
    (
        "lease_expires_at",
        sa.DateTime(timezone=True),
        None,
        "End of the running attempt's lease (renewed by its heartbeat)",
    ),
    ("worker", sa.String(64), None, "Process holding the lease"),
    ("checkpoint", JSON, None, "The run's last checkpoint (JSON)"),
)


def upgrade() -> None:
    for name, type_, default, comment in TASK_COLUMNS:
        op.add_column(
            "silo_tasks",
            sa.Column(
                name,
                type_,
                nullable=default is None,
                server_default=None if default is None else sa.text(default),
                comment=comment,
            ),
        )
    op.create_index("ix_silo_tasks_status_run_after", "silo_tasks", ["status", "run_after"])
    op.create_index(
        "ix_silo_tasks_status_lease_expires_at", "silo_tasks", ["status", "lease_expires_at"]
    )
    op.create_index("ix_silo_tasks_worker", "silo_tasks", ["worker"])
    op.create_table(
        "silo_workers",
        sa.Column("id", sa.String(64), nullable=False, comment="Process ID (host:pid:random)"),
        sa.Column("hostname", sa.String(255), nullable=False, comment="Host it runs on"),
        sa.Column("pid", sa.Integer(), nullable=False, comment="Its process ID on that host"),
        sa.Column("kind", sa.String(16), nullable=False, comment="worker or web"),
        sa.Column("concurrency", sa.Integer(), nullable=False, comment="Runs it takes at once"),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), nullable=False, comment="When it started"
        ),
        sa.Column(
            "heartbeat_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="Last sign of life",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_silo_workers"),
        comment="One row per live process that claims durable task runs",
    )
    op.create_index("ix_silo_workers_heartbeat_at", "silo_workers", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_silo_workers_heartbeat_at", table_name="silo_workers")
    op.drop_table("silo_workers")
    op.drop_index("ix_silo_tasks_worker", table_name="silo_tasks")
    op.drop_index("ix_silo_tasks_status_lease_expires_at", table_name="silo_tasks")
    op.drop_index("ix_silo_tasks_status_run_after", table_name="silo_tasks")
    postgresql = op.get_context().dialect.name == "postgresql"
    for name, *_ in reversed(TASK_COLUMNS):
        if postgresql:
            op.drop_column("silo_tasks", name)
        else:  # SQLite >= 3.35 drops a column in place (no table rebuild, no cascade)
            op.execute(f"ALTER TABLE silo_tasks DROP COLUMN {name}")
