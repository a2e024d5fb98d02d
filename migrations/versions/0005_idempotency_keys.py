"""Idempotency keys: silo_idempotency_keys, one row per key used in a session.

A request to a view decorated with ``@silo.idempotent`` claims its key here
before the view runs, and its response is stored in the row by the same
transaction as the request's state changes. Rows belong to their session (a
cascading foreign key) and are forgotten by the cleanup sweep through
``expires_at``. A plain ``CREATE TABLE`` and ``CREATE INDEX``: nothing existing
is rebuilt, and ``--sql`` needs no live database.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "silo_idempotency_keys"


def ts(name: str, comment: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, comment=comment)


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column(
            "sid",
            sa.String(128),
            sa.ForeignKey(
                "silo_sessions.sid",
                ondelete="CASCADE",
                name="fk_silo_idempotency_keys_sid_silo_sessions",
            ),
            nullable=False,
            comment="Owning session",
        ),
        sa.Column(
            "key_hash",
            sa.String(64),
            nullable=False,
            comment="Hex SHA-256 of the request method, the route, the principal and the key: "
            "the key's scope within its session",
        ),
        sa.Column(
            "idempotency_key",
            sa.String(255),
            nullable=False,
            comment="The Idempotency-Key header's value as the client sent it (unquoted)",
        ),
        sa.Column("method", sa.String(16), nullable=False, comment="HTTP method of the request"),
        sa.Column(
            "route", sa.Text(), nullable=False, comment="URL rule of the view the key was used on"
        ),
        sa.Column(
            "fingerprint",
            sa.String(64),
            nullable=False,
            comment="Hex SHA-256 of the request: method, path, query string, content type, body",
        ),
        sa.Column(
            "token",
            sa.String(32),
            nullable=False,
            comment="Random token of the request that holds the claim (runs or ran the view)",
        ),
        sa.Column(
            "status",
            sa.Integer(),
            nullable=True,
            comment="HTTP status of the stored response; NULL while the first request is in "
            "flight",
        ),
        sa.Column(
            "headers",
            sa.Text(),
            nullable=True,
            comment="Headers of the stored response: a JSON list of [name, value] pairs "
            "(no hop-by-hop headers, no SID header)",
        ),
        sa.Column(
            "body", sa.LargeBinary(), nullable=True, comment="Body of the stored response, as sent"
        ),
        ts("created_at", "When the key was first claimed"),
        ts(
            "locked_until",
            "While in flight: end of the claim's lease (a retry after it runs the view "
            "again); NULL once the response is stored",
            nullable=True,
        ),
        ts("expires_at", "When the cleanup sweep forgets the key: created_at + the view's ttl"),
        sa.PrimaryKeyConstraint("sid", "key_hash", name="pk_silo_idempotency_keys"),
        comment="One row per Idempotency-Key used in a session: its claim and stored response",
    )
    op.create_index("ix_silo_idempotency_keys_expires_at", TABLE, ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_silo_idempotency_keys_expires_at", table_name=TABLE)
    op.drop_table(TABLE)
