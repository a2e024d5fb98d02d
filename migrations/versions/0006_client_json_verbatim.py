"""Clients' JSON kept as sent on PostgreSQL: ``json`` instead of ``jsonb``.

``jsonb`` keeps numbers as decimals and gives back its own text, so a float
written with an exponent came back as an integer (``1e20`` as
``100000000000000000000``) and ``[1e300, ...]`` grew about 40-fold, past the
namespace's own size limit. ``json`` keeps the text verbatim, as SQLite always did. The state of
namespaces (``silo_namespaces.data``) and the arguments and checkpoints of
tasks (``silo_tasks.args``, ``silo_tasks.checkpoint``) change type; task logs,
written by the library, stay ``jsonb``. The change rewrites those two tables
(``ALTER COLUMN ... TYPE``, an exclusive lock for the length of the copy);
values already stored keep the text ``jsonb`` gave them (what it lost cannot
be recovered). The body of a stored idempotent response may now be NULL (a
response too large to keep), which its comment says. Nothing changes on
SQLite, where JSON is text already and comments are not stored.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("silo_namespaces", "data"),
    ("silo_tasks", "args"),
    ("silo_tasks", "checkpoint"),
)
BODY = "silo_idempotency_keys.body"
BODY_COMMENT = (
    "Body of the stored response, as sent; NULL with a status: the response was larger than "
    "SILO_IDEMPOTENCY_MAX_RESPONSE_BYTES and not kept (a retry is answered 409)"
)
OLD_BODY_COMMENT = "Body of the stored response, as sent"


def _retype(kind: str) -> None:
    tables: dict[str, list[str]] = {}
    for table, column in COLUMNS:
        tables.setdefault(table, []).append(column)
    for table, columns in tables.items():  # one rewrite per table
        changes = ", ".join(
            f"ALTER COLUMN {column} TYPE {kind} USING {column}::{kind}" for column in columns
        )
        op.execute(f"ALTER TABLE {table} {changes}")


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    _retype("json")
    op.execute(f"COMMENT ON COLUMN {BODY} IS '{BODY_COMMENT}'")


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    _retype("jsonb")
    op.execute(f"COMMENT ON COLUMN {BODY} IS '{OLD_BODY_COMMENT}'")
