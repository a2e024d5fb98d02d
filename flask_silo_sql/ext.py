"""The Flask extension: request lifecycle, configuration, errors as JSON.

Only paths under ``api_prefix`` take part. The SID comes from the header, else
the query parameter; a missing, short or malformed one gets a new SID. State
is loaded lazily on SQL storage: a request that never calls :meth:`Silo.state`
costs one statement, one that reads costs one SELECT, and one that changes
state writes only the namespaces whose JSON changed, in one transaction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import AbstractContextManager
from typing import Any

import click
from flask import Flask, Response, current_app, g, jsonify, request

from . import schema
from .cleanup import CleanupDaemon
from .errors import (
    FileTooLarge,
    InvalidFilename,
    NamespaceError,
    SchemaError,
    SessionBusy,
    SessionExpired,
    SiloError,
    StateConflict,
    StateNotSerializable,
    StateTooLarge,
    StorageUnavailable,
)
from .files import FileStore
from .sids import is_signed_sid, is_valid_sid, new_signed_sid
from .sql_storage import SQLStorage
from .storage import SiloStorage
from .store import SessionStore

logger = logging.getLogger("flask_silo_sql")

EXTENSION_KEY = "silo"

CONFIG_DEFAULTS: dict[str, Any] = {
    "SILO_DATABASE_URI": None,
    "SILO_ENGINE_OPTIONS": {},
    "SILO_TOUCH_INTERVAL": None,
    "SILO_MAX_STATE_BYTES": None,
    "SILO_SWEEP_BATCH_SIZE": 500,
    "SILO_TASK_HEARTBEAT_TIMEOUT": 60.0,
    "SILO_TASK_FLUSH_INTERVAL": 0.5,
    "SILO_TASK_MAX_LOGS": 200,
    "SILO_MAX_FILE_BYTES": None,
    "SILO_MAX_SESSION_BYTES": None,
    "SILO_LOCKING": False,
    "SILO_STRICT_SIDS": False,
}
"""Every ``SILO_*`` configuration key and its default (see the README)."""

EXPIRED_MESSAGE = "Your session has expired due to inactivity. Please re-upload your data."


class _RequestState:
    """What the extension knows about the current request."""

    __slots__ = ("gone", "held", "lock", "session", "sid")

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.session: dict[str, Any] | None = None
        self.gone = False
        self.held: SQLStorage | None = None
        """The storage holding a connection for this request."""
        self.lock: AbstractContextManager[dict[str, Any]] | None = None
        """The open locked transaction, in locking mode."""


class LazySession(MutableMapping[str, Any]):
    """``g.silo``: the whole session, loaded from storage on first use."""

    __slots__ = ("_silo",)

    def __init__(self, silo: Silo) -> None:
        self._silo = silo

    def _data(self) -> dict[str, Any]:
        return self._silo.state()

    def __getitem__(self, key: str) -> Any:
        return self._data()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._data()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())

    def __repr__(self) -> str:
        return f"<LazySession {self._data()!r}>"


class Silo:
    """Per-client, durable server-side state for a Flask API.

    Without *storage*, state lives in SQL: ``SILO_DATABASE_URI`` from the app
    config, else the environment, else ``sqlite:///<instance_path>/silo.db``
    (whose schema is migrated automatically at start-up).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        ttl: int = 3600,
        cleanup_interval: int = 60,
        expired_retain: int = 7200,
        header: str = "X-Session-ID",
        query_param: str = "_sid",
        min_sid_length: int = 16,
        data_endpoints: set[str] | None = None,
        auto_cleanup: bool = True,
        api_prefix: str = "/api/",
        storage: SiloStorage | None = None,
    ) -> None:
        self._header = header
        self._query_param = query_param
        self._min_sid_length = min_sid_length
        self._data_endpoints: set[str] = set(data_endpoints or ())
        self._auto_cleanup = auto_cleanup
        self._api_prefix = api_prefix
        self._file_stores: dict[str, FileStore] = {}
        self._needs_default_storage = storage is None
        self._file_limits: tuple[int | None, int | None] = (None, None)
        self._locking = False
        self._sid_keys: list[bytes] = []  # strict SIDs: signing key first, then fallbacks
        self._schema_ok = True
        self.store = SessionStore(
            ttl=ttl,
            cleanup_interval=cleanup_interval,
            expired_retain=expired_retain,
            storage=storage,
        )
        self._daemon = CleanupDaemon(self.store, interval=cleanup_interval)
        self.store.on_expire(self._on_session_expire)
        if app is not None:
            self.init_app(app)

    # -- setup ----------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Attach to *app*: storage, request hooks, error handlers, cleanup daemon."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(f"app.extensions[{EXTENSION_KEY!r}] is already registered")
        for key, value in CONFIG_DEFAULTS.items():
            app.config.setdefault(key, value)
        self._configure_store(app)
        self._prepare_storage(app)

        app.before_request(self._before_request)
        app.after_request(self._after_request)
        app.teardown_request(self._teardown_request)
        self._register_error_handlers(app)
        app.extensions[EXTENSION_KEY] = self
        if self._auto_cleanup:
            self._daemon.start()

    def _configure_store(self, app: Flask) -> None:
        config = app.config
        store = self.store
        if config["SILO_TOUCH_INTERVAL"] is not None:
            store.touch_interval = float(config["SILO_TOUCH_INTERVAL"])
        if config["SILO_MAX_STATE_BYTES"] is not None:
            store.max_state_bytes = int(config["SILO_MAX_STATE_BYTES"])
        store.sweep_batch_size = int(config["SILO_SWEEP_BATCH_SIZE"])
        store.heartbeat_timeout = float(config["SILO_TASK_HEARTBEAT_TIMEOUT"])
        store.task_flush_interval = float(config["SILO_TASK_FLUSH_INTERVAL"])
        store.task_max_logs = int(config["SILO_TASK_MAX_LOGS"])
        self._locking = bool(config["SILO_LOCKING"])
        if config["SILO_STRICT_SIDS"]:
            keys = [app.secret_key, *(config.get("SECRET_KEY_FALLBACKS") or ())]
            if not keys[0]:
                raise RuntimeError("SILO_STRICT_SIDS needs app.secret_key to sign SIDs")
            self._sid_keys = [k.encode() if isinstance(k, str) else bytes(k) for k in keys if k]
        for files in self._file_stores.values():
            if files.max_file_bytes is None:
                files.max_file_bytes = config["SILO_MAX_FILE_BYTES"]
            if files.max_session_bytes is None:
                files.max_session_bytes = config["SILO_MAX_SESSION_BYTES"]
        self._file_limits = (config["SILO_MAX_FILE_BYTES"], config["SILO_MAX_SESSION_BYTES"])

    def _prepare_storage(self, app: Flask) -> None:
        if self._needs_default_storage:
            self._needs_default_storage = False
            uri = app.config["SILO_DATABASE_URI"] or os.environ.get("SILO_DATABASE_URI")
            embedded = not uri
            if embedded:
                os.makedirs(app.instance_path, exist_ok=True)
                uri = "sqlite:///" + os.path.join(app.instance_path, "silo.db")
            storage = SQLStorage(uri, **app.config["SILO_ENGINE_OPTIONS"])
            self.store.storage = storage
            if embedded:
                schema.upgrade(storage.engine)  # the embedded default migrates itself
                return
        sql = self.store.sql
        if sql is None:
            return
        sql.bind_app(app)
        self._schema_ok = False
        try:
            self._verify_schema()
        except SchemaError:
            if click.get_current_context(silent=True) is None:
                raise
            # Under the flask CLI: `flask silo-db upgrade` must still load the app.
            logger.warning("silo schema is not current; run `flask silo-db upgrade`")
        except StorageUnavailable:
            logger.warning("silo database unreachable at start-up; schema checked later")

    def _verify_schema(self) -> None:
        sql = self.store.sql
        assert sql is not None
        with sql._translate_errors():
            schema.check(sql.engine)
        self._schema_ok = True

    def _register_error_handlers(self, app: Flask) -> None:
        existing = app.error_handler_spec.get(None, {}).get(None, {})
        for exc_class in (SiloError,):
            if exc_class not in existing:
                app.register_error_handler(exc_class, self.error_response)

    # -- registration -----------------------------------------------------------

    def register(self, namespace: str, factory: Callable[[], dict[str, Any]]) -> None:
        """Register a namespace and the factory of its default state."""
        self.store.register_namespace(namespace, factory)

    def add_file_store(
        self,
        name: str,
        base_dir: str,
        *,
        max_file_bytes: int | None = None,
        max_session_bytes: int | None = None,
    ) -> FileStore:
        """Add a per-session file store, cleaned when sessions expire or reset.

        Its files are recorded in ``silo_files`` under *name*. Limits default
        to ``SILO_MAX_FILE_BYTES`` / ``SILO_MAX_SESSION_BYTES``.
        """
        default_file, default_session = self._file_limits
        store = FileStore(
            base_dir,
            name=name,
            store=self.store,
            max_file_bytes=max_file_bytes if max_file_bytes is not None else default_file,
            max_session_bytes=(
                max_session_bytes if max_session_bytes is not None else default_session
            ),
        )
        self._file_stores[name] = store
        return store

    @property
    def file_stores(self) -> dict[str, FileStore]:
        """Every registered file store, by name."""
        return dict(self._file_stores)

    def file_store(self, name: str) -> FileStore:
        """The file store registered as *name* (KeyError if none)."""
        return self._file_stores[name]

    def add_data_endpoints(self, *paths: str) -> None:
        """Paths that answer ``410 Gone`` to an expired client instead of starting over."""
        self._data_endpoints.update(paths)

    # -- request lifecycle ------------------------------------------------------

    def _acceptable(self, sid: str) -> bool:
        if not is_valid_sid(sid, self._min_sid_length):
            return False
        return not self._sid_keys or is_signed_sid(sid, self._sid_keys)

    def _extract_sid(self) -> str:
        sid = request.headers.get(self._header, "").strip()
        if not self._acceptable(sid):
            try:
                sid = request.args.get(self._query_param, "").strip()
            except UnicodeDecodeError:  # raw non-UTF-8 bytes in the query string
                sid = ""
            if not self._acceptable(sid):
                sid = self._new_sid()
        return sid

    def _new_sid(self) -> str:
        if self._sid_keys:
            return new_signed_sid(self._sid_keys[0])
        return self.store.generate_sid()

    def _before_request(self) -> Any:
        if not request.path.startswith(self._api_prefix):
            return None
        if self._auto_cleanup and not self._daemon.running:
            self._daemon.start()  # first request in a forked worker
        if not self._schema_ok:
            self._verify_schema()
        sid = self._extract_sid()
        state = _RequestState(sid)
        g._silo_request = state
        g.silo_sid = sid
        g.silo = LazySession(self)
        store = self.store
        data_endpoint = request.path in self._data_endpoints
        sql = store.sql
        if sql is None:
            if data_endpoint and store.is_expired(sid):
                state.gone = True
                return self._gone()
            state.session = store.get(sid)
            return None
        sql.hold()  # one pooled connection serves the whole request
        state.held = sql
        if data_endpoint:
            session = store.open(sid, create=False)
            if session is None and store.is_expired(sid):
                state.gone = True
                return self._gone()
            if self._locking:
                self.state()
            else:
                state.session = session if session is not None else store.open(sid)
        return None

    @staticmethod
    def _gone() -> tuple[Response, int]:
        return jsonify({"error": "session_expired", "message": EXPIRED_MESSAGE}), 410

    def _after_request(self, response: Response) -> Response:
        state: _RequestState | None = g.get("_silo_request")
        if state is None:
            return response
        try:
            if state.lock is not None:
                self._close_lock(state, commit=response.status_code < 500)
            elif state.gone or response.status_code >= 500:
                pass
            elif state.session is not None:
                self.store.save(state.sid, state.session)
            else:
                self.store.touch_or_create(state.sid)
        except SessionExpired:
            logger.info(
                "session %s expired during the request; its changes were dropped", state.sid
            )
        except SiloError as exc:
            response = current_app.make_response(current_app.handle_user_exception(exc))
        response.headers[self._header] = state.sid
        return response

    @staticmethod
    def _close_lock(state: _RequestState, *, commit: bool) -> None:
        lock, state.lock = state.lock, None
        assert lock is not None
        if commit:
            lock.__exit__(None, None, None)  # saves the changes, commits
        else:
            error = RuntimeError("request failed")
            lock.__exit__(RuntimeError, error, None)  # rolls back

    def _teardown_request(self, exc: BaseException | None) -> None:
        state: _RequestState | None = g.get("_silo_request")
        if state is None:
            return
        try:
            if state.lock is not None:
                self._close_lock(state, commit=False)  # after_request never ran
        finally:
            if state.held is not None:
                state.held.release()

    def error_response(self, exc: SiloError) -> tuple[Response, int]:
        """The JSON answer to a silo error (replaceable with ``app.errorhandler``)."""
        body: dict[str, Any]
        if isinstance(exc, StateConflict):
            body, status = {"error": "state_conflict", "namespace": exc.namespace}, 409
        elif isinstance(exc, StateTooLarge):
            body, status = {"error": "state_too_large", "namespace": exc.namespace}, 413
        elif isinstance(exc, FileTooLarge):
            body, status = {"error": "file_too_large", "limit": exc.limit}, 413
        elif isinstance(exc, InvalidFilename):
            body, status = {"error": "invalid_filename"}, 400
        elif isinstance(exc, StorageUnavailable):
            logger.error("%s", exc)
            body = {"error": "storage_unavailable", "message": "Session storage is unavailable."}
            return jsonify(body), 503
        elif isinstance(exc, SessionExpired):
            return self._gone()
        elif isinstance(exc, SessionBusy):
            body, status = {"error": "session_busy"}, 409
        elif isinstance(exc, SchemaError):
            logger.error("%s", exc)
            body = {
                "error": "schema_out_of_date",
                "message": "The session database schema is not current: "
                "run `flask silo-db upgrade`.",
            }
            return jsonify(body), 500
        elif isinstance(exc, StateNotSerializable):
            body = {"error": "state_not_serializable", "namespace": exc.namespace, "key": exc.key}
            if exc.invalid_value:  # JSON data that cannot be stored: the request's data
                status = 422
            else:  # not JSON at all: a bug in the application
                logger.error("%s", exc)
                status = 500
        elif isinstance(exc, NamespaceError):
            logger.error("%s", exc)
            body, status = {"error": "namespace_not_registered", "namespace": exc.namespace}, 500
        else:
            logger.error("%s", exc)
            body, status = {"error": "silo_error"}, 500
        body["message"] = str(exc)
        return jsonify(body), status

    def _on_session_expire(self, sid: str) -> None:
        for store in self._file_stores.values():
            try:
                store.cleanup(sid, rows=False)  # the rows went with the session
            except Exception:
                logger.exception("Error cleaning up file store for session %s", sid)

    # -- request accessors ------------------------------------------------------

    def _request_state(self) -> _RequestState:
        state: _RequestState | None = g.get("_silo_request") if g else None
        if state is None:
            raise RuntimeError("No active session. Are you inside a request context?")
        return state

    def state(self, namespace: str | None = None, *, lock: bool | None = None) -> dict[str, Any]:
        """The current request's session, or one namespace of it.

        With *lock* (default: ``SILO_LOCKING``) the session is loaded in a
        transaction that holds it locked until the response is sent, so
        concurrent requests of the same session run their read-modify-write
        one after another (exact, never a 409). It must be the request's first
        access to state.
        """
        state = self._request_state()
        session = state.session
        locking = self._locking if lock is None else lock
        if session is None:
            if locking:
                state.lock = self.store.transaction(state.sid)
                session = state.lock.__enter__()
            else:
                session = self._open(state.sid)
            state.session = session
        elif lock and state.lock is None:
            raise RuntimeError("state(lock=True) must be the first access to state in a request")
        if namespace:
            if namespace not in session:
                raise NamespaceError(namespace)
            value: dict[str, Any] = session[namespace]
            return value
        return session

    @property
    def sid(self) -> str:
        """The current request's SID."""
        return self._request_state().sid

    def reset_current(self) -> None:
        """Fresh state for the current session, and its files removed."""
        state = self._request_state()
        sid = state.sid
        if state.lock is not None:  # release our lock: the reset writes on its own
            self._close_lock(state, commit=True)
        self.store.reset(sid)
        for store in self._file_stores.values():
            store.cleanup(sid)
        state.session = self._open(sid)

    def _open(self, sid: str) -> dict[str, Any]:
        store = self.store
        if store.sql is None:
            return store.get(sid)
        session = store.open(sid)
        assert session is not None  # open() creates a missing session
        return session

    def session(self, sid: str) -> AbstractContextManager[dict[str, Any]]:
        """Load, change and save session *sid* in one locked transaction.

        For threads, scripts and CLI commands::

            with silo.session(sid) as state:
                state["processing"]["results"] = results
        """
        return self.store.transaction(sid)

    def stop(self) -> None:
        """Stop the cleanup daemon."""
        self._daemon.stop()
