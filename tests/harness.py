"""The app harness: a Flask app with a ``Silo`` on a test database, its client and clock.

Every test that drives the extension through a real Flask app builds it here::

    def test_count(silo_app: AppFactory) -> None:
        h = silo_app(ttl=600, config={"SILO_MAX_STATE_BYTES": 4096})
        h.silo.register("counter", lambda: {"n": 0})

        @h.app.post("/api/count")
        def count() -> dict[str, int]:
            state = h.silo.state("counter")
            state["n"] += 1
            return {"n": state["n"]}

        assert h.json("POST", "/api/count", ALICE) == {"n": 1}
        assert h.post("/api/count", ALICE).get_json() == {"n": 2}
        h.expire(ALICE)  # the clock moves past the TTL, a sweep expires ALICE
        assert h.store.is_expired(ALICE)

The ``silo_app`` fixture (conftest.py) builds apps on ``silo_url``, so each
test runs on SQLite and on PostgreSQL, and closes them at teardown; several
apps made in one test share that database, as workers do. :class:`Harness`
itself (a context manager) serves other databases, the embedded default
(``url=None``) and module-scoped apps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, overload

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from support import Clock, sql_storage
from werkzeug.test import TestResponse

from flask_silo_sql import SessionStore, Silo, SQLStorage, session_key

HEADER = "X-Session-ID"
"""The SID header of an app that does not choose another (``Silo(header=...)``)."""

H = TypeVar("H", bound="Harness")


def close_silo(silo: Silo) -> None:
    """Stop *silo*'s cleanup threads and dispose of its SQL storage (if it has any)."""
    silo.stop()
    if isinstance(silo.store.storage, SQLStorage):
        silo.store.storage.dispose()


class Harness:
    """A Flask app with a ``Silo`` on a test database, its test client and its clock.

    *url* is where the state lives: a database at the current schema, given as
    ``Silo(app, storage=SQLStorage(url))`` (``via="storage"``) or as the app's
    ``SILO_DATABASE_URI`` (``via="config"``); with ``None`` Silo finds its own
    (``SILO_DATABASE_URI`` in the environment, else the embedded default: an
    SQLite file in *instance_path* that migrates itself). *config* is set on
    the app before ``Silo`` reads it (``SILO_*`` options, ``SECRET_KEY``...);
    *silo_options* go to ``Silo(...)`` (``ttl=``, ``header=``...), with
    ``auto_cleanup=False`` unless told otherwise: tests sweep themselves.

    The store's clock is *clock*, or a new :class:`Clock` at ``T0`` when it is
    None; ``clock=False`` leaves the store on real time. Requests send
    *default_sid* when they name no SID.
    """

    def __init__(
        self,
        url: str | None,
        *,
        via: Literal["storage", "config"] = "storage",
        config: Mapping[str, Any] | None = None,
        clock: Clock | Literal[False] | None = None,
        default_sid: str | None = None,
        import_name: str = __name__,
        instance_path: str | os.PathLike[str] | None = None,
        auto_cleanup: bool = False,
        **silo_options: Any,
    ) -> None:
        self.app = Flask(
            import_name, instance_path=None if instance_path is None else str(instance_path)
        )
        self.app.config.update(config or {})
        storage: SQLStorage | None = None
        if url is not None and via == "config":
            self.app.config["SILO_DATABASE_URI"] = url
        elif url is not None:
            storage = SQLStorage(url)
        try:
            self.silo = Silo(self.app, storage=storage, auto_cleanup=auto_cleanup, **silo_options)
        except BaseException:
            if storage is not None:
                storage.dispose()
            raise
        self._clock: Clock | None = None
        if clock is not False:
            self._clock = Clock() if clock is None else clock
            self.silo.store.clock = self._clock
        self.header: str = silo_options.get("header", HEADER)
        self.default_sid = default_sid
        self.client: FlaskClient = self.app.test_client()
        self.closed = False

    # -- what the app is made of ----------------------------------------------------

    @property
    def store(self) -> SessionStore:
        return self.silo.store

    @property
    def storage(self) -> SQLStorage:
        """The app's SQL storage (asserting it has one)."""
        return sql_storage(self.silo.store)

    @property
    def engine(self) -> Engine:
        return self.storage.engine

    @property
    def clock(self) -> Clock:
        assert self._clock is not None, "this app runs on real time (clock=False)"
        return self._clock

    # -- requests -------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        sid: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> TestResponse:
        """A request through the test client, *sid* (or the default SID) in the SID header."""
        sent = dict(headers or {})
        if sid is None:
            sid = self.default_sid
        if sid is not None:
            sent[self.header] = sid
        return self.client.open(path, method=method, headers=sent, **kwargs)

    def get(self, path: str, sid: str | None = None, **kwargs: Any) -> TestResponse:
        return self.call("GET", path, sid, **kwargs)

    def post(self, path: str, sid: str | None = None, **kwargs: Any) -> TestResponse:
        return self.call("POST", path, sid, **kwargs)

    def put(self, path: str, sid: str | None = None, **kwargs: Any) -> TestResponse:
        return self.call("PUT", path, sid, **kwargs)

    def json(
        self, method: str, path: str, sid: str | None = None, *, status: int = 200, **kwargs: Any
    ) -> Any:
        """The JSON body of a request that must answer *status*."""
        response = self.call(method, path, sid, **kwargs)
        assert response.status_code == status, response.get_data(as_text=True)[:500]
        return response.get_json()

    # -- time -----------------------------------------------------------------------

    def expire(self, sid: str) -> None:
        """Let every session idle past its TTL and run a sweep; *sid* must expire."""
        store = self.silo.store
        self.clock.now += store.ttl + store.touch_interval + 1
        assert session_key(sid) in store.cleanup()

    # -- teardown -------------------------------------------------------------------

    def close(self) -> None:
        """Stop the cleanup daemon and dispose of the storage (once; again is harmless)."""
        if not self.closed:
            self.closed = True
            close_silo(self.silo)

    def __enter__(self: H) -> H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AppFactory:
    """``silo_app(**options)``: harnesses on one database, all closed by :meth:`close`.

    ``silo_app(SubClass, **options)`` makes a module's own kind of app, a
    :class:`Harness` subclass that adds its routes and helpers (its
    ``__init__`` takes the URL and the options). *defaults* are options every
    app gets unless the call names them; ``config`` is merged, not replaced.
    """

    def __init__(self, url: str | None, **defaults: Any) -> None:
        self.url = url
        self.defaults = defaults
        self.made: list[Harness] = []

    @overload
    def __call__(self, /, **options: Any) -> Harness: ...

    @overload
    def __call__(self, kind: type[H], /, **options: Any) -> H: ...

    def __call__(self, kind: type[Harness] = Harness, /, **options: Any) -> Harness:
        merged = {**self.defaults, **options}
        merged["config"] = {**self.defaults.get("config", {}), **options.get("config", {})}
        harness = kind(self.url, **merged)
        self.made.append(harness)
        return harness

    def close(self) -> None:
        for harness in self.made:
            harness.close()
