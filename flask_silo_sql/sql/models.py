"""The tables flask-silo-sql keeps, as SQLAlchemy Core metadata.

The migrations (the project's top-level ``migrations/``, see
:func:`.schema.migrations_dir`) are the source of truth for the schema; a test holds
these definitions and the migrations to the same shape on SQLite and PostgreSQL.
Operators query these tables directly, so names are fixed.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

from ..sids import SID_LENGTH

EPOCH = "1970-01-01 00:00:00+00:00"
"""``silo_sessions.expires_at``'s default: a row written without an expiry is due at once."""

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    PostgreSQL stores ``timestamptz``; SQLite stores UTC as ISO-8601 text
    (``YYYY-MM-DD HH:MM:SS.ffffff``), which sorts and compares correctly.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None:
            raise ValueError("naive datetime given; silo timestamps are timezone-aware UTC")
        utc: dt.datetime = value.astimezone(dt.timezone.utc)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


JSONDocument = JSON().with_variant(JSONB(), "postgresql")
"""JSON on SQLite, JSONB on PostgreSQL: for what the library itself writes (task logs)."""

ClientDocument = JSON()
"""JSON on both databases (PostgreSQL's ``json``): for what clients write, kept as sent.

``jsonb`` stores numbers as decimals and gives back its own text: a float
written with an exponent returns as an integer (``1e20`` as
``100000000000000000000``), and ``1e300`` as 301 digits (state grows about
40-fold). ``json`` keeps the text
verbatim, so a float stays a float, the size checked is the size stored,
and ``data->'key'`` / ``data->>'key'`` still work (see docs/data-edges.md).
"""

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def owner_sid(*, primary_key: bool = False) -> Column[str]:
    """The ``sid`` column of a table whose rows belong to a session (deleted with it)."""
    return Column(
        "sid",
        String(SID_LENGTH),
        ForeignKey("silo_sessions.sid", ondelete="CASCADE"),
        primary_key=primary_key,
        nullable=False,
        comment="Owning session",
    )


sessions = Table(
    "silo_sessions",
    metadata,
    Column(
        "sid",
        String(SID_LENGTH),
        primary_key=True,
        comment="The session's key: sha256. and the hex SHA-256 of the SID the client presents",
    ),
    Column("created_at", UTCDateTime(), nullable=False, comment="When the session was created"),
    Column(
        "last_active",
        UTCDateTime(),
        nullable=False,
        comment="Last request seen (written at most once per touch interval)",
    ),
    Column(
        "expires_at",
        UTCDateTime(),
        nullable=False,
        server_default=text(f"'{EPOCH}'"),  # a row written without one is due at once
        comment="When the session expires unless touched again: last_active + its app's TTL "
        "+ touch interval",
    ),
    Column(
        "sweep_after",
        UTCDateTime(),
        nullable=False,
        server_default=text(f"'{EPOCH}'"),  # a row written without one is looked at at once
        comment="When the expiry sweep next looks at the session: at most expires_at, moved "
        "up to it by a touch once passed or by the sweep",
    ),
    # (sweep_after, sid): the expiry sweep pages through due sessions in this order. Not
    # expires_at, which every touch writes: a touch that changes no indexed column is a
    # HOT update on PostgreSQL (in place, no new index entries).
    Index("ix_silo_sessions_sweep_after", "sweep_after", "sid"),
    comment="One row per live flask-silo-sql session",
)

namespaces = Table(
    "silo_namespaces",
    metadata,
    owner_sid(primary_key=True),
    Column("name", String(255), primary_key=True, comment="Namespace name given to register()"),
    Column("data", ClientDocument, nullable=False, comment="The namespace's state as JSON"),
    Column(
        "version",
        Integer,
        nullable=False,
        comment="Bumped on every write; guards against lost updates",
    ),
    Column("updated_at", UTCDateTime(), nullable=False, comment="Time of the last write"),
    comment="One row per (session, namespace): the state of that namespace",
)

expired_sids = Table(
    "silo_expired_sids",
    metadata,
    Column(
        "sid",
        String(SID_LENGTH),
        primary_key=True,
        comment="Key of an expired session: sha256. and the hex SHA-256 of its SID",
    ),
    Column("expired_at", UTCDateTime(), nullable=False, comment="When the session was expired"),
    Index("ix_silo_expired_sids_expired_at", "expired_at"),
    comment="Expired SIDs remembered for expired_retain seconds, to answer 410 Gone",
)

files = Table(
    "silo_files",
    metadata,
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
        comment="Surrogate key",
    ),
    owner_sid(),
    Column("store", String(255), nullable=False, comment="File store name (add_file_store)"),
    Column("filename", String(255), nullable=False, comment="Sanitised file name on disk"),
    Column("size_bytes", BigInteger, nullable=False, comment="Size of the file in bytes"),
    Column("sha256", String(64), nullable=False, comment="Hex SHA-256 of the content"),
    Column("content_type", String(255), nullable=True, comment="MIME type, when known"),
    Column("created_at", UTCDateTime(), nullable=False, comment="When the file was stored"),
    Column(
        "backend",
        String(16),
        nullable=False,
        server_default=text("'local'"),
        comment="Where the bytes are: local (a host's disk), database (silo_file_chunks) "
        "or fsspec (the store's URL)",
    ),
    Column(
        "host",
        String(255),
        nullable=True,
        comment="local backend: the machine whose disk holds the bytes",
    ),
    Column(
        "location",
        String(1024),
        nullable=True,
        comment="fsspec backend: the object's path under <store URL>/<sid>/",
    ),
    UniqueConstraint("sid", "store", "filename", name="uq_silo_files_sid_store_filename"),
    comment="One row per file kept in a session's directory",
)

FILE_ID = BigInteger().with_variant(Integer(), "sqlite")

file_chunks = Table(
    "silo_file_chunks",
    metadata,
    Column(
        "file_id",
        FILE_ID,
        ForeignKey("silo_files.id", ondelete="CASCADE"),
        primary_key=True,
        comment="The file (silo_files.id)",
    ),
    Column("seq", Integer, primary_key=True, comment="Position of the chunk in the file, from 0"),
    Column("data", LargeBinary, nullable=False, comment="The chunk's bytes"),
    comment="The bytes of the files of the database backend, in chunks",
)

tasks = Table(
    "silo_tasks",
    metadata,
    Column("id", String(32), primary_key=True, comment="Task ID (32 hex characters)"),
    owner_sid(),
    Column("name", String(255), nullable=False, comment="Task name given to BackgroundTask"),
    Column(
        "status",
        String(16),
        nullable=False,
        comment="idle, running, complete or failed",
    ),
    Column("progress", Float, nullable=False, comment="Percent complete, 0 to 100"),
    Column("message", Text, nullable=False, comment="Latest status message"),
    Column("logs", JSONDocument, nullable=False, comment="Newest log lines (bounded list)"),
    Column("error", Text, nullable=True, comment="Error text when failed"),
    Column("started_at", UTCDateTime(), nullable=True, comment="When the task started"),
    Column("finished_at", UTCDateTime(), nullable=True, comment="When the task ended"),
    Column(
        "heartbeat_at",
        UTCDateTime(),
        nullable=True,
        comment="Last sign of life from the worker running it",
    ),
    Column(
        "namespace",
        String(255),
        nullable=True,
        comment="Namespace holding the task (durable runs)",
    ),
    Column(
        "target",
        String(255),
        nullable=True,
        comment="Registered task function (durable runs); NULL: a plain run",
    ),
    Column(
        "args",
        ClientDocument,
        nullable=True,
        comment="The registered function's arguments, as JSON",
    ),
    Column(
        "attempt",
        Integer,
        nullable=False,
        server_default=text("0"),
        comment="Attempt number of the current or last attempt",
    ),
    Column(
        "max_attempts",
        Integer,
        nullable=False,
        server_default=text("1"),
        comment="Attempts the run may take (retries + 1)",
    ),
    Column(
        "retry_delay",
        Float,
        nullable=False,
        server_default=text("0"),
        comment="Seconds before the first retry (doubling)",
    ),
    Column(
        "run_after",
        UTCDateTime(),
        nullable=True,
        comment="When a queued or retrying run may start",
    ),
    Column(
        "lease_expires_at",
        UTCDateTime(),
        nullable=True,
        comment="End of the running attempt's lease (renewed by its heartbeat)",
    ),
    Column("worker", String(64), nullable=True, comment="Process holding the lease"),
    Column("checkpoint", ClientDocument, nullable=True, comment="The run's last checkpoint (JSON)"),
    Column(
        "cancel_requested_at",
        UTCDateTime(),
        nullable=True,
        comment="When a cancel of the running run was asked for (it stops at its next write)",
    ),
    Index("ix_silo_tasks_sid", "sid"),
    Index("ix_silo_tasks_status_heartbeat_at", "status", "heartbeat_at"),
    Index("ix_silo_tasks_status_run_after", "status", "run_after"),
    Index("ix_silo_tasks_status_lease_expires_at", "status", "lease_expires_at"),
    Index("ix_silo_tasks_worker", "worker"),
    comment="One row per background task owned by a session",
)

workers = Table(
    "silo_workers",
    metadata,
    Column("id", String(64), primary_key=True, comment="Process ID (host:pid:random)"),
    Column("hostname", String(255), nullable=False, comment="Host it runs on"),
    Column("pid", Integer, nullable=False, comment="Its process ID on that host"),
    Column("kind", String(16), nullable=False, comment="worker or web"),
    Column("concurrency", Integer, nullable=False, comment="Runs it takes at once"),
    Column("started_at", UTCDateTime(), nullable=False, comment="When it started"),
    Column("heartbeat_at", UTCDateTime(), nullable=False, comment="Last sign of life"),
    Index("ix_silo_workers_heartbeat_at", "heartbeat_at"),
    comment="One row per live process that claims durable task runs",
)


idempotency_keys = Table(
    "silo_idempotency_keys",
    metadata,
    owner_sid(primary_key=True),
    Column(
        "key_hash",
        String(64),
        primary_key=True,
        comment="Hex SHA-256 of the request method, the route, the principal and the key: "
        "the key's scope within its session",
    ),
    Column(
        "idempotency_key",
        String(255),
        nullable=False,
        comment="The Idempotency-Key header's value as the client sent it (unquoted)",
    ),
    Column("method", String(16), nullable=False, comment="HTTP method of the request"),
    Column("route", Text, nullable=False, comment="URL rule of the view the key was used on"),
    Column(
        "fingerprint",
        String(64),
        nullable=False,
        comment="Hex SHA-256 of the request: method, path, query string, content type, body",
    ),
    Column(
        "token",
        String(32),
        nullable=False,
        comment="Random token of the request that holds the claim (runs or ran the view)",
    ),
    Column(
        "status",
        Integer,
        nullable=True,
        comment="HTTP status of the stored response; NULL while the first request is in flight",
    ),
    Column(
        "headers",
        Text,
        nullable=True,
        comment="Headers of the stored response: a JSON list of [name, value] pairs "
        "(no hop-by-hop headers, no SID header)",
    ),
    Column(
        "body",
        LargeBinary,
        nullable=True,
        comment="Body of the stored response, as sent; NULL with a status: the response was "
        "larger than SILO_IDEMPOTENCY_MAX_RESPONSE_BYTES and not kept (a retry is answered 409)",
    ),
    Column("created_at", UTCDateTime(), nullable=False, comment="When the key was first claimed"),
    Column(
        "locked_until",
        UTCDateTime(),
        nullable=True,
        comment="While in flight: end of the claim's lease (a retry after it runs the view "
        "again); NULL once the response is stored",
    ),
    Column(
        "expires_at",
        UTCDateTime(),
        nullable=False,
        comment="When the cleanup sweep forgets the key: created_at + the view's ttl",
    ),
    Index("ix_silo_idempotency_keys_expires_at", "expires_at"),
    comment="One row per Idempotency-Key used in a session: its claim and stored response",
)

EVENT_ID = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "silo_events",
    metadata,
    Column(
        "id",
        EVENT_ID,
        primary_key=True,
        autoincrement=True,
        comment="Event ID: increasing in commit order, never reused (the stream's id:)",
    ),
    owner_sid(),
    Column("task_id", String(32), nullable=True, comment="The task it is about, if any"),
    Column(
        "kind",
        String(32),
        nullable=False,
        comment="progress, complete, failed, cancelled, cancelling, queued, reset, or the "
        "name given to silo.publish()",
    ),
    Column("data", Text, nullable=False, comment="The event's data, as JSON text"),
    Column("created_at", UTCDateTime(), nullable=False, comment="When it was written"),
    Index("ix_silo_events_sid_id", "sid", "id"),
    Index("ix_silo_events_created_at", "created_at"),
    comment="One row per event of a session, written with the change it tells of; pruned "
    "after SILO_EVENT_RETENTION",
    sqlite_autoincrement=True,
)

stream_tokens = Table(
    "silo_stream_tokens",
    metadata,
    Column(
        "token_hash",
        String(64),
        primary_key=True,
        comment="Hex SHA-256 of the stream token's random part (the token is never stored)",
    ),
    owner_sid(),
    Column("expires_at", UTCDateTime(), nullable=False, comment="When the token stops opening"),
    Index("ix_silo_stream_tokens_expires_at", "expires_at"),
    Index("ix_silo_stream_tokens_sid", "sid"),
    comment="One row per event-stream token: which session a token opens a stream of",
)

SILO_TABLES = frozenset(metadata.tables)
"""Names of every table flask-silo-sql owns."""

VERSION_TABLE = "silo_alembic_version"
"""Alembic's version table for our migrations (never the host's ``alembic_version``)."""
