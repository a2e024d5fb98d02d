"""SIDs hashed at rest: every ``sid`` column holds the session's key, never its SID.

A session's key is ``sha256.`` and the hex SHA-256 of its SID's UTF-8 bytes
(:func:`flask_silo_sql.keys.session_key`). Each live session's row is copied
under its key, its rows in ``silo_namespaces``, ``silo_files``, ``silo_tasks``,
``silo_idempotency_keys`` (and any other ``silo_*`` table with a ``sid``
column) move to it, and the old row goes; ``silo_expired_sids`` is rewritten
in place. Sessions go in batches, paged by primary key, so no statement grows
with the table; the whole upgrade is still one transaction (all or nothing).
A value already a key (it holds a dot, which no SID can) is left alone: an
upgrade run again, or after a downgrade, converts only what is still clear.

Upload directories are not the database's: ``flask silo-db upgrade`` renames
those of the app's file stores on its machine, and every process's file
upkeep renames those left (see ``docs/sids-at-rest.md``).

Downgrade cannot give the SIDs back (the hash is one-way, and nothing kept
them): it restores the schema only, and the rows stay under their keys, which
the previous version cannot reach (its clients start new sessions).

Offline (``--sql``) on PostgreSQL the same is written as set-based SQL with
``sha256()``; SQLite has no SHA-256 in SQL, so there the script converts
nothing (fine for a new database; an existing one needs the live upgrade).

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 2000
PREFIX = "sha256."
PG_KEY = "'sha256.' || encode(sha256(convert_to({column}, 'UTF8')), 'hex')"
COMMENTS = {
    "silo_sessions": (
        "The session's key: sha256. and the hex SHA-256 of the SID the client presents",
        "Session ID the client presents",
    ),
    "silo_expired_sids": (
        "Key of an expired session: sha256. and the hex SHA-256 of its SID",
        "SID of an expired session",
    ),
}


def key_of(sid: str) -> str:
    """The migration's own copy of the key (a migration must not change with the code)."""
    return PREFIX + hashlib.sha256(sid.encode("utf-8", "surrogatepass")).hexdigest()


def is_key(value: str) -> bool:
    return re.fullmatch(r"sha256\.[0-9a-f]{64}", value) is not None


def child_tables(conn: sa.Connection) -> list[str]:
    """Every silo table whose rows belong to a session by its ``sid``."""
    inspector = sa.inspect(conn)
    return sorted(
        name
        for name in inspector.get_table_names()
        if name.startswith("silo_")
        and name not in ("silo_sessions", "silo_expired_sids")
        and any(c["name"] == "sid" for c in inspector.get_columns(name))
    )


def session_columns(conn: sa.Connection) -> list[str]:
    return [c["name"] for c in sa.inspect(conn).get_columns("silo_sessions") if c["name"] != "sid"]


def upgrade() -> None:
    context = op.get_context()
    dialect = context.dialect.name
    if context.as_sql:
        if dialect == "postgresql":
            _upgrade_sql()
        else:  # nothing to convert in a new database; an existing one needs the live upgrade
            op.execute(
                "-- SQLite has no SHA-256 in SQL: this script leaves stored SIDs as they are; "
                "run `flask silo-db upgrade` (without --sql) on a database that holds sessions"
            )
    else:
        conn = op.get_bind()
        _rekey_sessions(conn)
        _rekey_expired(conn)
    if dialect == "postgresql":
        for table, (new, _) in COMMENTS.items():
            op.alter_column(table, "sid", existing_type=sa.String(128), comment=new)


def _rekey_sessions(conn: sa.Connection) -> None:
    children = child_tables(conn)
    columns = ", ".join(session_columns(conn))
    page = sa.text("SELECT sid FROM silo_sessions WHERE sid > :after ORDER BY sid LIMIT :n")
    copy = sa.text(
        f"INSERT INTO silo_sessions (sid, {columns}) SELECT :new, {columns} "
        "FROM silo_sessions WHERE sid = :old"
    )
    moves = [sa.text(f"UPDATE {t} SET sid = :new WHERE sid = :old") for t in children]
    drop = sa.text("DELETE FROM silo_sessions WHERE sid = :old")
    after = ""
    while True:
        sids = [row[0] for row in conn.execute(page, {"after": after, "n": BATCH})]
        if not sids:
            return
        after = sids[-1]
        pairs = [{"old": sid, "new": key_of(sid)} for sid in sids if not is_key(sid)]
        if not pairs:
            continue
        conn.execute(copy, pairs)
        for move in moves:
            conn.execute(move, pairs)
        conn.execute(drop, pairs)


def _rekey_expired(conn: sa.Connection) -> None:
    page = sa.text("SELECT sid FROM silo_expired_sids WHERE sid > :after ORDER BY sid LIMIT :n")
    known = sa.text("SELECT sid FROM silo_expired_sids WHERE sid = :new")
    rename = sa.text("UPDATE silo_expired_sids SET sid = :new WHERE sid = :old")
    drop = sa.text("DELETE FROM silo_expired_sids WHERE sid = :old")
    after = ""
    while True:
        sids = [row[0] for row in conn.execute(page, {"after": after, "n": BATCH})]
        if not sids:
            return
        after = sids[-1]
        pairs = [{"old": sid, "new": key_of(sid)} for sid in sids if not is_key(sid)]
        clash = [p for p in pairs if conn.execute(known, p).first() is not None]
        if clash:  # remembered under its key already: the clear record is redundant
            conn.execute(drop, clash)
        fresh = [p for p in pairs if p not in clash]
        if fresh:
            conn.execute(rename, fresh)


def _upgrade_sql() -> None:
    """PostgreSQL, offline: the same in set-based statements (the tables as of 0008)."""
    clear = "sid NOT LIKE 'sha256.%'"
    key = PG_KEY.format(column="sid")
    op.execute(
        "INSERT INTO silo_sessions (sid, created_at, last_active, expires_at, sweep_after) "
        f"SELECT {key}, created_at, last_active, expires_at, sweep_after FROM silo_sessions "
        f"WHERE {clear}"
    )
    for table in (
        "silo_events",
        "silo_files",
        "silo_idempotency_keys",
        "silo_namespaces",
        "silo_stream_tokens",
        "silo_tasks",
    ):
        op.execute(f"UPDATE {table} SET sid = {key} WHERE {clear}")
    op.execute(f"DELETE FROM silo_sessions WHERE {clear}")
    op.execute(
        f"DELETE FROM silo_expired_sids AS e WHERE {clear} AND EXISTS "
        f"(SELECT 1 FROM silo_expired_sids AS k WHERE k.sid = {PG_KEY.format(column='e.sid')})"
    )
    op.execute(f"UPDATE silo_expired_sids SET sid = {key} WHERE {clear}")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for table, (_, old) in COMMENTS.items():
            op.alter_column(table, "sid", existing_type=sa.String(128), comment=old)
