"""Every ``SILO_*`` configuration key in one table, and :class:`SiloConfig`: one app's values.

:data:`SETTINGS` says, for each key, the values it takes, its default, what it does
(MyST Markdown: the documentation's configuration reference is generated from it) and
how its value is read. :class:`SiloConfig` is read once per app, in ``init_app``, from
``app.config`` (and the environment, for ``SILO_DATABASE_URI``); the store's settings,
the task runner and the CLI take their values from it. A test holds the table to every
``SILO_*`` key the package names, so the reference cannot leave a key out nor describe
one that is gone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import EXPIRED_MESSAGE
from .idempotency import (
    DEFAULT_HEADER,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_KEYS,
    DEFAULT_MAX_RESPONSE_BYTES,
)

RUNNERS = ("thread", "worker")
"""The values of ``SILO_TASK_RUNNER``."""


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """*convert*, with ``None`` kept as ``None``."""
    return lambda value: None if value is None else convert(value)


def _dict(value: Any) -> dict[str, Any]:
    return dict(value or {})


def _as_is(value: Any) -> Any:
    """Read where it is used (the file stores' settings, a callable)."""
    return value


def _keys(value: Any) -> tuple[str, ...]:
    """Keys as given: a list, or one string (comma-separated for several)."""
    if not value:
        return ()
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        return tuple(key.strip() for key in text.split(",") if key.strip())
    return tuple(key.decode() if isinstance(key, bytes) else str(key) for key in value)


def _prepared(value: Any) -> bool | Literal["auto"]:
    if isinstance(value, bool):
        return value
    if value == "auto":
        return "auto"
    raise ValueError(f"SILO_PREPARED_STATEMENTS must be True, False or 'auto', not {value!r}")


def _runner(value: Any) -> str:
    if value not in RUNNERS:
        raise ValueError(f"SILO_TASK_RUNNER must be 'thread' or 'worker', not {value!r}")
    return str(value)


@dataclass(frozen=True)
class Setting:
    """One configuration key: its name, the values it takes, what it does, its default."""

    key: str
    type: str
    doc: str
    env: bool = False
    """Also read from the environment variable of the same name."""
    default: Any = None
    """The value the extension applies when the app does not set the key."""
    convert: Callable[[Any], Any] = _as_is
    """The set value as :class:`SiloConfig` holds it."""

    @property
    def field(self) -> str:
        """Its :class:`SiloConfig` attribute: the key without ``SILO_``, in lower case."""
        return self.key.removeprefix("SILO_").lower()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "SILO_DATABASE_URI",
        "str | None",
        "Database of the default storage (when `storage=` is not given). Unset: the "
        "`SILO_DATABASE_URI` environment variable, else `sqlite:///<instance_path>/silo.db`, "
        "the embedded default, migrated at start-up. `postgresql://` and `postgres://` URLs use "
        "psycopg 3. See [The default database](databases.md#the-default-database).",
        env=True,
        default=None,
        convert=_optional(str),
    ),
    Setting(
        "SILO_DB_TIMEOUT",
        "float (seconds)",
        "How long any wait on the database may last: connecting and pool checkouts (half "
        "each), an SQLite lock, a PostgreSQL statement (a watchdog cuts off a connection whose "
        "server does not answer, even a frozen one). A request then answers `503` within about "
        "this long (at most `max(SILO_DB_TIMEOUT, 2)` s: libpq waits at least 2 s for a "
        "connection). While the database does not answer, a process tries one new connection "
        "at a time and answers other requests `503` at once.",
        default=5.0,
        convert=float,
    ),
    Setting(
        "SILO_ENGINE_OPTIONS",
        "dict",
        'Keyword arguments for `create_engine` of the default storage (`{"pool_size": 20}`). '
        "A `connect_args` dict is merged over silo's own. Silo's engines already get, on "
        "SQLite, `check_same_thread=False` (one shared connection for `:memory:`); on "
        "PostgreSQL, `connect_timeout=5`, `pool_size=10`, `pool_timeout=10`.",
        default={},
        convert=_dict,
    ),
    Setting(
        "SILO_PREPARED_STATEMENTS",
        'bool | "auto"',
        "PostgreSQL: let psycopg prepare silo's statements on each connection (after five "
        "uses), so the server plans each once: requests cost less of the server's time. "
        '`"auto"`: on each connection that reaches the server directly, which silo checks '
        "when it opens one (the server sees the address and port the client dialled), and on "
        "none through a pooler or a proxy. `True`: on every connection; only for a direct "
        "connection silo cannot prove (a Unix socket, a TCP proxy) or PgBouncer 1.21 or later "
        "with `max_prepared_statements` set: an older pooler in transaction mode hands a "
        "prepared statement to another client. See "
        "[Behind PgBouncer](deployment.md#behind-pgbouncer).",
        default="auto",
        convert=_prepared,
    ),
    Setting(
        "SILO_EXPIRED_MESSAGE",
        "str",
        "The `message` of the `410` answer to an expired client on a data endpoint (the "
        '`error` stays `"session_expired"`): your words, in your users\' language. The default '
        "is flask-silo's. See [Expiry](expiry.md) and [Errors](errors.md).",
        default=EXPIRED_MESSAGE,
        convert=str,
    ),
    Setting(
        "SILO_METRICS",
        "bool | CollectorRegistry",
        "Prometheus metrics (needs the `prometheus` extra). `True`: in a registry of the app's "
        "own, answered by `silo.metrics_view()`; a `prometheus_client.CollectorRegistry` "
        "(`prometheus_client.REGISTRY` for the process's default): registered there. `False`: "
        "none, and a request pays nothing. See [Observability](observability.md).",
        default=False,
        convert=_as_is,
    ),
    Setting(
        "SILO_TOUCH_INTERVAL",
        "float (seconds) | None",
        "Seconds between two `last_active` writes of one session. `None`: `min(60, ttl / 20)` "
        "on SQL storage, `0` in memory. See [Expiry](expiry.md).",
        default=None,
        convert=_optional(float),
    ),
    Setting(
        "SILO_MAX_STATE_BYTES",
        "int (bytes) | None",
        "Largest JSON size of one namespace (UTF-8). Larger state is refused with `413` and "
        "not stored, whichever way it is written (a request, a task's thread, "
        "`silo.session()`, a reset). `None`: no limit. Checked on SQL storage.",
        default=1024 * 1024,
        convert=_optional(int),
    ),
    Setting(
        "SILO_SWEEP_BATCH_SIZE",
        "int",
        "Sessions expired per batch (one short transaction each) by a cleanup sweep.",
        default=500,
        convert=int,
    ),
    Setting(
        "SILO_TASK_HEARTBEAT_TIMEOUT",
        "float (seconds)",
        "A running plain task whose heartbeat is older than this is reported and recorded as "
        "failed (worker lost); one with a newer heartbeat keeps its session from expiry. A "
        "durable run's lease lasts this long (renewed every quarter of it); a lapsed one is run "
        "again by a live process.",
        default=60.0,
        convert=float,
    ),
    Setting(
        "SILO_TASK_FLUSH_INTERVAL",
        "float (seconds)",
        "Seconds between two writes of a running task's progress and logs (coalescing). An "
        "update not written at once is written at the latest this long after it, so other "
        "workers see every update within about this long. Completion and failure are written "
        "at once.",
        default=0.5,
        convert=float,
    ),
    Setting(
        "SILO_TASK_MAX_LOGS",
        "int",
        "Log lines a task in a session keeps (the newest).",
        default=200,
        convert=int,
    ),
    Setting(
        "SILO_TASK_RUNNER",
        '"thread" | "worker"',
        'Where durable runs (registered tasks) run: `"thread"`, in the process that started '
        'them, and runs whose process died in any live process of the app; `"worker"`, only '
        "in `flask silo-db worker` processes (`start()` only queues). See "
        "[Where durable runs run](tasks.md#where-durable-runs-run).",
        default="thread",
        convert=_runner,
    ),
    Setting(
        "SILO_TASK_CONCURRENCY",
        "int",
        "Durable runs a process claims at once: a web process's claimer (thread runner), and "
        "`flask silo-db worker` without `--concurrency`.",
        default=4,
        convert=int,
    ),
    Setting(
        "SILO_TASK_POLL_INTERVAL",
        "float (seconds)",
        "Average time between two looks for due runs (queued, retrying, lapsed) by a claimer "
        "(each wait within ±25%). On PostgreSQL a worker also wakes up on `NOTIFY`.",
        default=0.5,
        convert=float,
    ),
    Setting(
        "SILO_TASK_RETRIES",
        "int",
        "Retries of a registered task that does not name its own (`@silo.task(retries=...)`): "
        "attempts = retries + 1.",
        default=3,
        convert=int,
    ),
    Setting(
        "SILO_TASK_RETRY_DELAY",
        "float (seconds)",
        "Seconds before the first retry of a registered task that does not name its own; it "
        "doubles with each attempt (at most 300 s).",
        default=1.0,
        convert=float,
    ),
    Setting(
        "SILO_EVENT_RETENTION",
        "float (seconds)",
        "How long a session's events (task progress, completion, cancellation, "
        "`silo.publish()`) are kept for replay by `Last-Event-ID`; the cleanup sweep prunes "
        "older ones, and a client that reconnects from a pruned event is told to resync. See "
        "[Live tasks](live-tasks.md).",
        default=3600.0,
        convert=float,
    ),
    Setting(
        "SILO_STREAM_TOKEN_TTL",
        "float (seconds)",
        "How long a token from `silo.stream_token()` opens a stream (an open stream outlives "
        "it; a reconnect after it needs a new token).",
        default=300.0,
        convert=float,
    ),
    Setting(
        "SILO_STREAM_HEARTBEAT",
        "float (seconds)",
        "Seconds between two heartbeat comments on an idle stream (proxies keep it open, and "
        "a closed client is found out, its thread freed, within this long).",
        default=15.0,
        convert=float,
    ),
    Setting(
        "SILO_STREAM_POLL_INTERVAL",
        "float (seconds) | None",
        "How often a process that has open streams looks for new events: one query per "
        "process, whatever the number of streams. On PostgreSQL `LISTEN/NOTIFY` delivers "
        "sooner and this is the fallback (PgBouncer in transaction mode); `None`: 0.1 s on "
        "SQLite, 1 s on PostgreSQL.",
        default=None,
        convert=_optional(float),
    ),
    Setting(
        "SILO_STREAM_MAX_AGE",
        "float (seconds)",
        "A stream is closed after this long (the browser reconnects with `Last-Event-ID`), so "
        "a worker's threads turn over.",
        default=600.0,
        convert=float,
    ),
    Setting(
        "SILO_STREAMS_PER_SESSION",
        "int",
        "Streams one session may hold open in one process; one more answers `429 "
        "too_many_streams`.",
        default=4,
        convert=int,
    ),
    Setting(
        "SILO_STREAMS_PER_PROCESS",
        "int",
        "Streams one process holds open at most (each holds a thread under `gthread`, a "
        "greenlet under `gevent`); one more answers `503 streams_exhausted`.",
        default=100,
        convert=int,
    ),
    Setting(
        "SILO_WORKER_GRACE",
        "float (seconds)",
        "Seconds a stopping `flask silo-db worker` (`SIGTERM`) lets its running attempts "
        "finish before it hands them back.",
        default=30.0,
        convert=float,
    ),
    Setting(
        "SILO_MAX_FILE_BYTES",
        "int (bytes) | None",
        "Default `max_file_bytes` of `add_file_store`: the largest single file (`413` past "
        "it). `None`: no limit.",
        default=100 * 1024 * 1024,
        convert=_as_is,
    ),
    Setting(
        "SILO_MAX_SESSION_BYTES",
        "int (bytes) | None",
        "Default `max_session_bytes` of `add_file_store`: the largest total of one session's "
        "files in one store (`413` past it; reserved as an upload streams, so parallel uploads "
        "cannot overshoot it). `None`: no limit.",
        default=1024 * 1024 * 1024,
        convert=_as_is,
    ),
    Setting(
        "SILO_MIN_FREE_BYTES",
        "int (bytes) | None",
        "Default `min_free_bytes`: uploads answer `507` while the disk of `base_dir` (and of "
        "an SQLite database receiving `database` chunks) has less free space. `None` or `0`: "
        "no floor.",
        default=100 * 1024 * 1024,
        convert=_optional(int),
    ),
    Setting(
        "SILO_DB_MIN_FREE_BYTES",
        "int (bytes) | None",
        "SQLite: state writes that grow a session answer `507 insufficient_storage` while the "
        "database's disk has less free space (pages free inside the file count as room). "
        "`None`: half of `SILO_MIN_FREE_BYTES`, so uploads stop first; `0`: no floor. See "
        "[Data edges](data-edges.md).",
        default=None,
        convert=_optional(int),
    ),
    Setting(
        "SILO_FILE_BACKEND",
        "str",
        'Default `backend` of `add_file_store`: `"local"`, `"database"` or an fsspec URL. '
        "See [Choosing a backend](files.md#where-the-bytes-live-choosing-a-backend).",
        default="local",
        convert=_as_is,
    ),
    Setting(
        "SILO_FILE_STORAGE_OPTIONS",
        "dict",
        "Default `storage_options`: keyword arguments of the fsspec filesystem (S3 "
        "credentials, endpoint).",
        default={},
        convert=_as_is,
    ),
    Setting(
        "SILO_FILE_HOST",
        "str | None",
        "The name `local` rows record for this machine. `None`: its host name.",
        default=None,
        convert=_as_is,
    ),
    Setting(
        "SILO_LOCKING",
        "bool",
        "Locking mode for every request: `silo.state()` locks the session until the response "
        "is sent, so concurrent requests of one session apply one after another instead of "
        "answering `409`. Per view: `silo.state(ns, lock=True)` or `@silo.locked`.",
        default=False,
        convert=bool,
    ),
    Setting(
        "SILO_STRICT_SIDS",
        "bool",
        "Accept only SIDs this server issued: new SIDs carry their issue time and an HMAC made "
        "with `app.secret_key` (61 characters); `SECRET_KEY_FALLBACKS` still verify. Needs "
        "`app.secret_key` (`RuntimeError` at `init_app` otherwise). See "
        "[Security](security.md).",
        default=False,
        convert=bool,
    ),
    Setting(
        "SILO_SID_MAX_AGE",
        "int (seconds) | None",
        "With strict SIDs: how long after its issue a SID is accepted; an older one is answered "
        "with a new SID (and a fresh session), however active its session was. `None`: no end.",
        default=30 * 24 * 3600,
        convert=_optional(float),
    ),
    Setting(
        "SILO_SESSION_MAX_AGE",
        "int (seconds) | None",
        "Absolute lifetime of every session, the SIDs clients choose included, besides the "
        "idle TTL: that long after its creation a session ends however active it is (its "
        "state, tasks and files go, its SID is recorded as expired: `410` on a data endpoint, "
        "a fresh session elsewhere). `silo.rotate(renew=True)` after a login starts a new "
        "lifetime; a plain `silo.rotate()` keeps it. `None`: no end. See "
        "[Expiry](expiry.md#absolute-lifetime).",
        default=None,
        convert=_optional(float),
    ),
    Setting(
        "SILO_ENCRYPTION_KEYS",
        "list[str] | str | None",
        "Fernet keys (`cryptography.fernet.Fernet.generate_key()`, newest first) of the "
        "namespaces registered with `encrypted=True`: new writes use the first, reads accept "
        "any. Add a key in front, run `flask silo-db reencrypt`, then retire the old one. A "
        "string is one key; a comma-separated string, several. Needs the `encryption` extra. "
        "See [Security](security.md#encrypted-namespaces).",
        env=True,
        default=None,
        convert=_keys,
    ),
    Setting(
        "SILO_IDEMPOTENCY_HEADER",
        "str",
        "The request header `@silo.idempotent` reads its key from.",
        default=DEFAULT_HEADER,
        convert=str,
    ),
    Setting(
        "SILO_IDEMPOTENCY_LEASE",
        "float (seconds)",
        "How long an idempotent request holds its key while its view runs (by the database's "
        "clock); a request whose worker died frees it after that. Per view: "
        "`@silo.idempotent(lease=...)`. Make it longer than the view's slowest run.",
        default=DEFAULT_LEASE_S,
        convert=float,
    ),
    Setting(
        "SILO_IDEMPOTENCY_MAX_KEYS",
        "int | None",
        "Idempotency keys a session may hold at once (`None`: any number); past it a new key "
        "answers `429 idempotency_keys_exhausted`.",
        default=DEFAULT_MAX_KEYS,
        convert=_optional(int),
    ),
    Setting(
        "SILO_IDEMPOTENCY_MAX_RESPONSE_BYTES",
        "int (bytes) | None",
        "Largest response body an idempotency key keeps (`None`: any size). A larger response "
        "is sent and its changes saved, but the key keeps only its status: a retry answers "
        "`409 idempotent_response_not_kept`. See [Data edges](data-edges.md).",
        default=DEFAULT_MAX_RESPONSE_BYTES,
        convert=_optional(int),
    ),
    Setting(
        "SILO_ATOMIC_ROLLBACK",
        "int | Callable[[Response], bool]",
        "Atomic mode: responses with this status or above (or for which the callable returns "
        "true) roll the request's transaction back, the host's changes with silo's. See "
        "[Atomic mode](atomic.md).",
        default=500,
        convert=_as_is,
    ),
)
"""Every configuration key, in the order the reference lists them."""

BY_KEY: dict[str, Setting] = {setting.key: setting for setting in SETTINGS}

CONFIG_DEFAULTS: dict[str, Any] = {setting.key: setting.default for setting in SETTINGS}
"""Every ``SILO_*`` key and its default (``init_app`` sets them where the app did not)."""


@dataclass(frozen=True)
class SiloConfig:
    """One app's ``SILO_*`` values, read once (see :data:`SETTINGS` for each one)."""

    database_uri: str | None
    db_timeout: float
    engine_options: dict[str, Any]
    prepared_statements: bool | Literal["auto"]
    expired_message: str
    metrics: Any
    touch_interval: float | None
    max_state_bytes: int | None
    sweep_batch_size: int
    task_heartbeat_timeout: float
    task_flush_interval: float
    task_max_logs: int
    task_runner: str
    task_concurrency: int
    task_poll_interval: float
    task_retries: int
    task_retry_delay: float
    event_retention: float
    stream_token_ttl: float
    stream_heartbeat: float
    stream_poll_interval: float | None
    stream_max_age: float
    streams_per_session: int
    streams_per_process: int
    worker_grace: float
    max_file_bytes: Any
    max_session_bytes: Any
    min_free_bytes: int | None
    db_min_free_bytes: int | None
    file_backend: Any
    file_storage_options: Any
    file_host: Any
    locking: bool
    strict_sids: bool
    sid_max_age: float | None
    session_max_age: float | None
    encryption_keys: tuple[str, ...]
    idempotency_header: str
    idempotency_lease: float
    idempotency_max_keys: int | None
    idempotency_max_response_bytes: int | None
    atomic_rollback: Any

    @classmethod
    def from_mapping(
        cls, config: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> SiloConfig:
        """The values of *config* (an ``app.config``), defaults for keys it does not set.

        A key read from the environment too (``SILO_DATABASE_URI``) falls back to
        *environ* (``os.environ`` unless given) when the config leaves it unset.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            value = config.get(setting.key, setting.default)
            if setting.env and not value:
                value = env.get(setting.key) or value
            values[setting.field] = setting.convert(value)
        return cls(**values)


if {f.name for f in dataclasses.fields(SiloConfig)} != {s.field for s in SETTINGS}:
    raise TypeError("SiloConfig must have one attribute per key of SETTINGS")
