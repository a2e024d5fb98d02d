"""The Flask extension: the request lifecycle, per-app settings, errors as JSON.

Only paths under ``api_prefix`` take part. The SID comes from the header, else
the query parameter; a missing, short or malformed one gets a new SID. Each
API request works through one unit of work of its app's store
(:meth:`SessionStore.request <flask_silo_sql.store.SessionStore.request>`):
state is read when the view asks for it, and written, with the request's
uploads, task starts and (for an idempotent view, see :mod:`.decorators`) its
stored response, by one commit once the response is known.

Each app served keeps its own store, storage and settings in
``app.extensions["silo"]`` (a :class:`SiloApp`); the :class:`Silo` object
holds what the application registered (namespaces, file stores, data
endpoints, callbacks), shared by every app it serves.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar, overload

import click
from flask import Config, Flask, Response, current_app, g, has_app_context, jsonify, request

from . import live
from .app_state import REQUEST_KEY, RequestState, SiloApp, current_request
from .config import CONFIG_DEFAULTS as CONFIG_DEFAULTS
from .config import SiloConfig
from .decorators import IdempotentOptions, idempotent_view, locked_view
from .errors import (
    NamespaceTaken,
    RegisteredTooLate,
    SchemaError,
    SessionExpired,
    SiloError,
    StorageUnavailable,
)
from .files import Backend, FileSettings, FileStore
from .files.backends import check_backend
from .idempotency import (
    DEFAULT_TTL_S,
)
from .logs import log_failure, silo_logger
from .probes import hooks as probes
from .probes.views import health_view, metrics_view
from .sealing import Sealer
from .setup_checks import check_views, first_request
from .sids import tag
from .sql import SQLStorage, schema
from .storage import SiloStorage
from .store import SessionStore, undoable
from .tasks import BackgroundTask, TaskRunner, TaskSpec, mark_registered

if TYPE_CHECKING:
    from sqlalchemy.orm import Session as SASession

    from .sql.host import HostTransaction

F = TypeVar("F", bound=Callable[..., Any])

logger = silo_logger("flask_silo_sql")

EXTENSION_KEY = "silo"


View = TypeVar("View", bound=Callable[..., Any])


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


def _require_keys(store: SessionStore, namespace: str) -> None:
    """An encrypted namespace needs its app's keys: a clear error now, not at a request."""
    if store.sealer is None:
        raise SiloError(
            f"namespace {namespace!r} is registered with encrypted=True, but "
            "SILO_ENCRYPTION_KEYS is not set: give it a list of Fernet keys, the newest "
            "first (make one with `python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())'`)"
        )


def _serving() -> bool:
    """Whether this process may serve requests: any process but a ``flask`` command
    other than ``flask run`` (``flask silo-db upgrade`` claims no task run)."""
    command = click.get_current_context(silent=True)
    return command is None or command.info_name == "run"


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
        self._explicit: dict[str, dict[str, Any]] = {}
        """Per file store: the settings given to add_file_store (the config gives the rest)."""
        self._storage = storage
        self._store_options: dict[str, Any] = {
            "ttl": ttl,
            "cleanup_interval": cleanup_interval,
            "expired_retain": expired_retain,
        }
        self._first = SessionStore(**self._store_options, storage=storage)
        """The store of the first app (and, before any, the registry's home)."""
        self._first_taken = False
        self._apps: list[SiloApp] = []
        self._first.on_expire(self._on_session_expire)
        self._first.registry.on_rotate.append(self._move_files)
        self._first.registry.after_sweep.append(self._maintain_files)
        if app is not None:
            self.init_app(app)

    # -- setup ----------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Serve *app*: its own store and settings, request hooks, errors, cleanup thread.

        One Silo may serve several apps (the factory pattern): each gets its
        own storage (its ``SILO_DATABASE_URI``) and settings, unless a
        ``storage=`` was given to the constructor, which they then share.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"app.extensions[{EXTENSION_KEY!r}] is already registered: "
                "init_app() was called twice for this app, or another extension uses the key"
            )
        for key, value in CONFIG_DEFAULTS.items():
            app.config.setdefault(key, value)
        config = SiloConfig.from_mapping(app.config)
        if self._first_taken:
            store = SessionStore(
                **self._store_options, storage=self._storage, registry=self._first.registry
            )
            store.clock = self._first.clock
        else:
            store = self._first
        if self._storage is None:
            store.storage = self._default_storage(app, config)
        if config.encryption_keys:
            store.sealer = Sealer(config.encryption_keys)
        for name in sorted(store.encrypted):
            _require_keys(store, name)
        state = SiloApp(self, app, store, config)
        self._configure(app, state)
        self._prepare_storage(app, state)
        if store.task_runner == "thread" and isinstance(store.storage, SQLStorage):
            state.runner = TaskRunner.from_config(
                store,
                config,
                kind="web",
                listen=False,  # runs start where they are asked for; hand-backs are polled
            )
        self._first_taken = True
        self._apps.append(state)

        check_views(state)  # a silo decorator above a route decorator: refused now
        app.before_request(functools.partial(first_request, state))
        app.before_request(self._before_request)
        app.after_request(self._after_request)
        app.teardown_request(self._teardown_request)
        if SiloError not in app.error_handler_spec.get(None, {}).get(None, {}):
            app.register_error_handler(SiloError, self.error_response)
        app.extensions[EXTENSION_KEY] = state
        probes.install(app, state, self._api_prefix)  # SILO_METRICS; request spans
        # The claimer of durable runs starts with the process (runs handed back by a
        # deploy's old processes run at once, without waiting for a request), and in
        # each process forked from it (`gunicorn --preload`), holding nothing of the
        # parent's. The cleanup thread starts with a process's first API request: a
        # `--preload` master, which serves none, then holds no connection to share.
        if state.runner is not None and _serving():
            state.runner.start_with_process()

    @staticmethod
    def _default_storage(app: Flask, config: SiloConfig) -> SQLStorage:
        uri = config.database_uri
        if not uri:
            try:
                os.makedirs(app.instance_path, exist_ok=True)
            except OSError as exc:
                raise SiloError(
                    f"Cannot create the instance folder {app.instance_path} for the embedded "
                    f"silo database ({exc.strerror}): create it writable by this process, or "
                    "set SILO_DATABASE_URI."
                ) from None
            uri = "sqlite:///" + os.path.join(app.instance_path, "silo.db")
            app.config["_SILO_EMBEDDED"] = True
        return SQLStorage(
            uri,
            timeout=config.db_timeout,
            prepared_statements=config.prepared_statements,
            **config.engine_options,
        )

    def _configure(self, app: Flask, state: SiloApp) -> None:
        state.store.settings = state.settings
        if not self._first_taken:  # file stores are shared: the first app's settings apply
            for name, files in self._file_stores.items():
                self._apply_file_settings(app.config, name, files)

    def _apply_file_settings(self, config: Config, name: str, files: FileStore) -> None:
        """The configuration's :class:`FileSettings`, overridden by what ``add_file_store``
        was given for *files*."""
        given = self._explicit.get(name, {})
        files.configure(FileSettings.from_config(config).overridden(**given))

    def _prepare_storage(self, app: Flask, state: SiloApp) -> None:
        storage = state.store.storage
        if not isinstance(storage, SQLStorage):
            return
        source = storage.source
        if source is not None:  # a Flask-SQLAlchemy object: its engine needs the app
            with app.app_context():
                storage.attach(source.engine)
        if app.config.pop("_SILO_EMBEDDED", False):
            schema.upgrade(storage.engine)  # the embedded default migrates itself
            return
        state.schema_ok = False
        try:
            self._verify_schema(state)
        except SchemaError:
            if click.get_current_context(silent=True) is None:
                raise
            # Under the flask CLI: `flask silo-db upgrade` must still load the app.
            state.schema_ok = False
        except StorageUnavailable as exc:
            logger.warning("silo database unreachable at start-up (%s); checked again later", exc)

    @staticmethod
    def _verify_schema(state: SiloApp) -> None:
        storage = state.store.storage
        if isinstance(storage, SQLStorage):
            schema.check(storage.engine)
        state.schema_ok = True

    # -- registration -----------------------------------------------------------

    def register(
        self,
        namespace: str,
        factory: Callable[[], dict[str, Any]],
        *,
        replace: bool = False,
        encrypted: bool = False,
    ) -> None:
        """Register a namespace and the factory of its default state.

        A name registered already raises :class:`NamespaceTaken` unless *replace*
        (flask-silo replaced it silently), and so does any registration once an app
        of this Silo has served a request (:class:`RegisteredTooLate`).

        *encrypted*: its JSON is stored sealed (encrypted and authenticated) under
        ``SILO_ENCRYPTION_KEYS``, which each app must then set (:class:`SiloError`
        here, or at ``init_app``, otherwise). See ``docs/security.md``.
        """
        if any(state.served for state in self._apps):
            raise RegisteredTooLate(namespace)
        if not replace and namespace in self._first.registry.factories:
            raise NamespaceTaken(namespace)
        if encrypted:
            for state in self._apps:
                _require_keys(state.store, namespace)
        self._first.register_namespace(namespace, factory, encrypted=encrypted)

    def add_file_store(
        self,
        name: str,
        base_dir: str,
        *,
        backend: Backend | None = None,
        storage_options: dict[str, Any] | None = None,
        host: str | None = None,
        max_file_bytes: int | None = None,
        max_session_bytes: int | None = None,
        min_free_bytes: int | None = None,
    ) -> FileStore:
        """Add a per-session file store, cleaned when sessions expire or reset.

        Its files are recorded in ``silo_files`` under *name*. *backend* says
        where the bytes go: ``"local"`` (under *base_dir*, this machine's disk),
        ``"database"`` (the database's ``silo_file_chunks``) or an fsspec URL
        (``"s3://bucket/prefix"``, with *storage_options* for its filesystem);
        for the last two *base_dir* is this machine's cache. Every setting left
        out comes from the configuration (``SILO_FILE_BACKEND``,
        ``SILO_FILE_STORAGE_OPTIONS``, ``SILO_FILE_HOST``,
        ``SILO_MAX_FILE_BYTES``, ``SILO_MAX_SESSION_BYTES``,
        ``SILO_MIN_FREE_BYTES``).
        """
        if backend is not None:
            check_backend(backend)
        given = {
            "backend": backend,
            "storage_options": storage_options,
            "host": host,
            "max_file_bytes": max_file_bytes,
            "max_session_bytes": max_session_bytes,
            "min_free_bytes": min_free_bytes,
        }
        files = FileStore(
            base_dir, name=name, records=lambda: self.store.backend.file_records(name)
        )
        files.configure(FileSettings().overridden(**given))
        self._explicit[name] = {k: v for k, v in given.items() if v is not None}
        if self._apps:
            self._apply_file_settings(self._apps[0].config, name, files)
        self._file_stores[name] = files
        return files

    def send_file(
        self,
        store: FileStore | str,
        filename: str,
        *,
        as_attachment: bool = False,
        download_name: str | None = None,
    ) -> Response:
        """A response streaming *filename* of the current session from *store* (a file
        store or its name): see :meth:`FileStore.send`."""
        files = self.file_store(store) if isinstance(store, str) else store
        return files.send(
            self.sid, filename, as_attachment=as_attachment, download_name=download_name
        )

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

    # -- per app ------------------------------------------------------------------

    def health_view(self) -> Callable[[], tuple[Response, int]]:
        """A readiness view for probes (register it outside ``api_prefix``): JSON, ``200``
        when the database answers, its schema is current and, with
        ``SILO_TASK_RUNNER = "worker"``, a worker is alive; else ``503`` saying why."""
        return health_view(self._app_state)

    def metrics_view(self) -> Callable[[], Response]:
        """A view answering the app's Prometheus metrics (``SILO_METRICS = True``)."""
        return metrics_view(self._app_state)

    def _app_state(self) -> SiloApp:
        """The current app's state; outside an app context, the only app's."""
        if has_app_context():
            state = current_app.extensions.get(EXTENSION_KEY)
            if isinstance(state, SiloApp) and state.silo is self:
                return state
        if len(self._apps) == 1:
            return self._apps[0]
        if not self._apps:
            raise RuntimeError("this Silo serves no app yet: call silo.init_app(app) first")
        raise RuntimeError(
            "this Silo serves several apps: use it inside an app context "
            "(with app.app_context(): ...), or use app.extensions['silo'].store"
        )

    @property
    def store(self) -> SessionStore:
        """The current app's :class:`SessionStore` (before ``init_app``: the one to come)."""
        if not self._apps:
            return self._first
        return self._app_state().store

    # -- request lifecycle ------------------------------------------------------

    def _extract_sid(self, state: SiloApp) -> tuple[str, bool]:
        """The request's SID, and whether it was issued now (none acceptable was sent)."""
        min_length = self._min_sid_length
        sid = request.headers.get(self._header, "").strip()
        if not state.acceptable(sid, min_length):
            try:
                sid = request.args.get(self._query_param, "").strip() if self._query_param else ""
            except UnicodeDecodeError:  # raw non-UTF-8 bytes in the query string
                sid = ""
            if not state.acceptable(sid, min_length):
                return state.new_sid(), True
        return sid, False

    def _before_request(self) -> None:
        if not request.path.startswith(self._api_prefix):
            return
        state = self._app_state()
        if self._auto_cleanup and not state.daemon.running:
            state.daemon.start()  # this process's first API request
        if state.runner is not None and not state.runner.running:
            state.runner.start()
        if not state.schema_ok:
            self._verify_schema(state)
        sid, issued = self._extract_sid(state)
        unit = state.store.request(sid, locking=state.locking, issued=issued)
        request_state = RequestState(sid, unit, issued=issued)
        storage = state.store.storage
        if isinstance(storage, SQLStorage) and storage.host_sessions is not None:
            # Atomic mode: the request's statements go into the host session's transaction.
            request_state.host = storage.join(storage.host_sessions())
        setattr(g, REQUEST_KEY, request_state)
        g.silo_sid = sid
        g.silo = LazySession(self)
        if not issued and request.path in self._data_endpoints and unit.expired():
            request_state.gone = True
            raise SessionExpired(sid)

    def _after_request(self, response: Response) -> Response:
        state: RequestState | None = g.get(REQUEST_KEY)
        if state is None:
            return response
        status = response.status_code
        passive = status in (404, 405) or request.method == "OPTIONS"
        state.streamed = response.is_streamed and status < 400
        keep = status < 500 and not state.view_failed
        claim = state.claim
        host = state.host
        if host is not None and not host.done:
            # Atomic mode: one outcome for the host's changes and silo's; an idempotent
            # view's commit only with its stored response (5xx is never stored).
            keep = not self._app_state().rolls_back(response) and not state.view_failed
            if claim is not None:
                keep = keep and status < 500 and not host.rolled_back
            if host.failed and not host.rolled_back:
                keep = False  # a flush failed (the app answered its error): nothing commits
        try:
            if state.replayed:
                pass  # a stored response: the request changes nothing
            elif claim is not None and claim.response is not None and keep and not state.gone:
                claim.request.sid = state.key  # (the view may have rotated it)
                if state.records is not None:
                    state.records.complete(claim, claim.response)  # with the commit
                state.unit.commit(state=True, files=status < 400)
            elif passive and not state.unit.loaded:
                pass  # nothing asked of the session: nothing stored, nothing touched
            elif not state.gone:
                saved = keep and not (host is not None and host.rolled_back)
                state.unit.commit(state=saved, files=status < 400 and saved)
            if host is not None and not host.done:
                if keep:
                    host.commit()  # the one COMMIT; the host's own errors surface as they are
                else:
                    host.rollback()
        except SessionExpired as exc:
            if host is not None and not host.done:
                host.rollback()
            logger.info(
                "session %s expired during the request; its changes were dropped", tag(state.sid)
            )
            if status < 400:
                response = current_app.make_response(current_app.handle_user_exception(exc))
        except SiloError as exc:
            if host is not None and not host.done:
                host.rollback()
            response = current_app.make_response(current_app.handle_user_exception(exc))
        headers = response.headers
        headers[self._header] = state.sid
        # A response that carries a SID is that client's alone: no shared cache keeps it.
        if headers.get("Cache-Control") is None:
            headers.add("Cache-Control", "private, no-store")
        vary = headers.get("Vary")
        if vary is None:
            headers.add("Vary", self._header)
        elif self._header.lower() not in vary.lower():
            headers["Vary"] = f"{vary}, {self._header}"
        return response

    def _teardown_request(self, exc: BaseException | None) -> None:
        state: RequestState | None = g.get(REQUEST_KEY)
        if state is None:
            return
        try:
            if state.streamed and not state.gone:
                self._commit_after_stream(state, failed=exc is not None)
        finally:
            host = state.host
            if host is not None and not host.done:  # the response never got to after_request
                host.rollback()
            state.unit.close()
            claim = state.claim
            if host is not None:
                pass  # atomic: the claim was committed or rolled back with the request
            elif claim is not None and not claim.completed and state.records is not None:
                claim.request.sid = state.key
                state.records.release(claim)  # the view failed: a retry runs it again
            if state.spool is not None:
                state.spool.close()

    def _commit_after_stream(self, state: RequestState, *, failed: bool) -> None:
        """The stream has ended (``stream_with_context`` keeps the request until then):
        save what its generator changed. The headers are sent, so a failure is logged.
        In atomic mode the request's transaction committed before the body; what the
        generator changed is one more transaction with the host session."""
        storage = self._app_state().store.storage
        if state.host is None or not isinstance(storage, SQLStorage):
            self._save_streamed(state, failed=failed, again=None)
            return
        token = storage.connector.hold()  # (the request's hold may be released already)
        try:
            again = state.host = storage.join(state.host.session)
            self._save_streamed(state, failed=failed, again=again)
        finally:
            storage.connector.release(token)

    @staticmethod
    def _save_streamed(state: RequestState, *, failed: bool, again: HostTransaction | None) -> None:
        try:
            state.unit.commit(state=not failed)
            if again is not None:
                if failed:
                    again.rollback()
                else:
                    again.commit()
        except SiloError as error:
            if again is not None and not again.done:
                again.rollback()
            logger.error(
                "state changed while streaming the response of session %s was NOT saved: %s",
                tag(state.sid),
                error,
            )
        finally:
            if again is not None and not again.done:
                again.rollback()

    def error_response(self, exc: SiloError) -> tuple[Response, int]:
        """The JSON answer to a silo error (replaceable with ``app.errorhandler``)."""
        status = exc.http_status
        if exc.logged or status >= 500:
            logger.error("%s", exc)
        body = exc.body()
        if isinstance(exc, SessionExpired):  # the app's words (SILO_EXPIRED_MESSAGE)
            body["message"] = self._app_state().settings.expired_message
        response = jsonify(body)
        response.headers.update(exc.headers())
        return response, status

    def _move_files(self, old: str, new: str) -> Callable[[], None]:
        return undoable(
            functools.partial(files.move_session, old, new) for files in self._file_stores.values()
        )

    def _maintain_files(self) -> None:
        """After a sweep: what this machine keeps of sessions gone elsewhere goes too."""
        for files in self._file_stores.values():
            try:
                files.maintain()
            except Exception as exc:
                log_failure(logger, "could not tidy file store %r", files.name, exc=exc, sid=None)

    def _on_session_expire(self, sid: str) -> None:
        for files in self._file_stores.values():
            try:
                files.cleanup(sid, rows=False)  # the rows went with the session
            except Exception as exc:
                log_failure(
                    logger,
                    "could not clean file store %r of session %s",
                    files.name,
                    tag(sid),
                    exc=exc,
                    sid=sid,
                )

    # -- view decorators ---------------------------------------------------------

    @overload
    def idempotent(self, ttl: View) -> View: ...

    @overload
    def idempotent(
        self,
        ttl: float = DEFAULT_TTL_S,
        *,
        required: bool = False,
        wait: float = 0.0,
        scope: Callable[[], object] | None = None,
        lease: float | None = None,
    ) -> Callable[[View], View]: ...

    def idempotent(
        self,
        ttl: float | View = DEFAULT_TTL_S,
        *,
        required: bool = False,
        wait: float = 0.0,
        scope: Callable[[], object] | None = None,
        lease: float | None = None,
    ) -> View | Callable[[View], View]:
        """Run the view once per ``Idempotency-Key``; a retry gets the stored response.

        The key (the ``SILO_IDEMPOTENCY_HEADER`` header, an RFC 8941 string or
        a token of at most 255 characters; malformed: ``400``) is scoped to the
        session, the method, the route and, with *scope*, the principal it
        returns (a user ID). Missing: ``400`` with *required*, else the view
        runs as usual. The first request claims the key before the view runs;
        a duplicate while it is in flight gets ``409`` with ``Retry-After``, or
        waits up to *wait* seconds for its response. The response is stored
        with the request's state changes, in one transaction, and replayed
        byte for byte (``Idempotent-Replayed: true``) for *ttl* seconds; the
        same key with another request (method, path, query, content type,
        body) gets ``422``. A view that raises, answers ``5xx`` or dies frees
        the key (dead: after *lease* seconds, ``SILO_IDEMPOTENCY_LEASE`` by
        default), and saves nothing. Needs SQL storage; streamed responses
        are refused (``ResponseNotStorable``).
        """
        if callable(ttl):  # @silo.idempotent without parentheses
            defaults = IdempotentOptions(DEFAULT_TTL_S, False, 0.0, None, None)
            return idempotent_view(self, ttl, defaults)
        options = IdempotentOptions(ttl, required, wait, scope, lease)

        def decorate(view: View) -> View:
            return idempotent_view(self, view, options)

        return decorate

    def locked(self, view: View) -> View:
        """Run the view with its session locked from its start to its response.

        The decorator form of ``silo.state(ns, lock=True)`` for the whole view:
        concurrent requests of one session through it run one after another.
        Put it below ``@silo.idempotent``, so that a key is claimed before the
        lock is waited for.
        """
        return locked_view(self, view)

    # -- request accessors ------------------------------------------------------

    def state(self, namespace: str | None = None, *, lock: bool | None = None) -> dict[str, Any]:
        """The current request's session, or one namespace of it.

        With *lock* (default: ``SILO_LOCKING``) the session is loaded in a
        transaction that holds it locked until the response is sent, so
        concurrent requests of the same session run their read-modify-write
        one after another (exact, never a 409). It must be the request's first
        access to state.
        """
        unit = current_request().unit
        if lock and not unit.locked:
            if unit.loaded:
                raise RuntimeError(
                    "state(lock=True) must be the first access to state in a request"
                )
            unit.lock()
        if namespace:
            return unit.namespace(namespace)
        return unit.session()

    @property
    def sid(self) -> str:
        """The current request's SID."""
        return current_request().sid

    @property
    def session_key(self) -> str:
        """The current session's key at rest: what its rows and directories are named by,
        and what ``on_create``/``on_expire`` callbacks get (see ``docs/sids-at-rest.md``)."""
        return current_request().key

    def commit(self) -> None:
        """Save the current request's changes now (they are saved at its end anyway).

        For a long streamed response (``stream_with_context``): what the
        generator changed so far is written, under the same version guard; a
        conflict raises (:class:`StateConflict`, ...), which ends the stream.
        Refused (``RuntimeError``) in an ``@silo.idempotent`` view.
        """
        state = current_request()
        if state.claim is not None:
            raise RuntimeError(
                "silo.commit() in an @silo.idempotent view would save its changes without "
                "its response, and a retry after a failure would make them again: they are "
                "saved with the response"
            )
        if state.gone:
            raise SessionExpired(state.sid)
        state.unit.commit()

    def rotate(self, *, renew: bool = False) -> str:
        """Give the current client a new SID, keeping its state (call it after a login).

        What the request changed so far is saved first; then the session, its
        tasks and its files move to the new SID in one transaction, and the
        response carries the new SID. The old SID reaches nothing any more: a
        request still using it is answered as an expired session (``410`` on
        a data endpoint, a fresh session elsewhere). Returns the new SID.

        The session keeps its absolute lifetime (``SILO_SESSION_MAX_AGE``,
        counted from its creation) unless *renew*: ``silo.rotate(renew=True)``
        right after the client authenticated (a login) starts a new one.
        """
        state = current_request()
        app_state = self._app_state()
        if state.gone:
            raise SessionExpired(state.sid)
        state.unit.commit()
        old = state.sid
        new = app_state.new_sid()
        app_state.store.rotate(old, new, renew=renew)
        state.unit.close()
        state.unit = app_state.store.request(new, locking=app_state.locking)
        storage = app_state.store.storage
        if state.host is not None and isinstance(storage, SQLStorage):
            storage.connector.adopt(state.host.executor)  # still the host's transaction
        state.sid = new
        g.silo_sid = new
        return new

    def reset_current(self) -> None:
        """Fresh state for the current session, and its files removed."""
        state = current_request()
        state.unit.reset()
        for files in self._file_stores.values():
            files.cleanup(state.sid)

    def session(
        self, sid: str, *, host: SASession | None = None
    ) -> AbstractContextManager[dict[str, Any]]:
        """Load, change and save session *sid* in one locked transaction.

        For threads, scripts and CLI commands::

            with silo.session(sid) as state:
                state["processing"]["results"] = results

        With *host* (a SQLAlchemy session of the host's, on silo's database) the
        block and that session are one transaction: committed together at the
        end, or both rolled back (see ``docs/atomic.md``).
        """
        return self.store.transaction(sid, host=host)

    def stop(self) -> None:
        """Stop the cleanup threads and the task runners (their runs are handed back)."""
        for state in self._apps:
            state.daemon.stop()
            if state.runner is not None and state.runner.running:
                state.runner.stop()

    # -- live tasks -------------------------------------------------------------------

    def stream_token(self) -> dict[str, Any]:
        """A short-lived token that opens the current session's event stream, for an
        ``EventSource`` (which cannot send the SID header): ``{"token", "expires_in",
        "last_event_id"}``. Answer it from an API view. See :doc:`live-tasks`."""
        return live.stream_token(self._app_state())

    def stream(self) -> Response:
        """The current token's session's events as ``text/event-stream`` (the view's answer).

        The token comes in ``?token=``; ``Last-Event-ID`` (or ``?last_event_id=``)
        replays what the client missed. A bad token answers ``401``/``403`` JSON,
        too many open streams ``429``/``503``. See :doc:`live-tasks`."""
        return live.stream(self._app_state(), self._header)

    def publish(self, kind: str, data: Any = None, *, sid: str | None = None) -> None:
        """Send an event of your own (*kind*, JSON *data*) to the session's streams: the
        current request's session, with the request's commit; or *sid*'s, now."""
        live.publish(self._app_state(), kind, data, sid)

    @staticmethod
    def cancel_response(task: BackgroundTask) -> tuple[Response, int]:
        """``task.cancel()`` answered as JSON (``200``, or ``202`` while it stops)."""
        return live.cancel_response(task)

    # -- durable tasks ---------------------------------------------------------------

    @overload
    def task(self, fn: F, /) -> F: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retries: int | None = None,
        retry_delay: float | None = None,
    ) -> Callable[[F], F]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int | None = None,
        retry_delay: float | None = None,
    ) -> Any:
        """Register a task function by name, so that every process of the app knows it.

        ``BackgroundTask.start(fn, *args)`` with a registered *fn* and JSON
        arguments is a durable run: recorded in its row, run under a lease,
        run again by a live process when its own dies, retried when it raises
        (*retries* times, default ``SILO_TASK_RETRIES``; after *retry_delay*
        seconds, doubling, default ``SILO_TASK_RETRY_DELAY``). The function is
        returned unchanged. *name* defaults to the function's qualified name.
        """

        def register(function: F) -> F:
            if retries is not None and retries < 0:
                raise ValueError("retries must be 0 or more")
            spec = TaskSpec(name or function.__qualname__, function, retries, retry_delay)
            self._first.registry.add_task(spec)
            return mark_registered(function, spec)

        if fn is not None:
            return register(fn)
        return register
