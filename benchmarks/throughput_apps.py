"""The apps that ``benchmarks/throughput.py`` serves under gunicorn, one per configuration.

``gunicorn benchmarks.throughput_apps:app`` builds the app named by the
``THROUGHPUT_APP`` environment variable:

* ``bare``: plain Flask; the state is a module-level dict in each worker
  (keyed by the ``X-Session-ID`` header), so nothing is shared or durable;
* ``flask_silo_redis``: flask-silo 0.1.6 with its ``RedisStorage`` on the Redis
  server at ``THROUGHPUT_REDIS_URL``;
* ``flask_session``: Flask-Session 0.8, SQLAlchemy backend, on the database at
  ``THROUGHPUT_DATABASE_URL`` (the session ID travels in its cookie);
* ``silo_sql``: flask_silo_sql's ``Silo(app)`` with its default storage, on the
  database in ``SILO_DATABASE_URI`` (migrated beforehand).

Every app has the same two endpoints, with the same handler code:
``POST /api/count`` increments the client's counter and returns it as JSON, and
``GET /api/count/value`` returns it unchanged (used to check the results). ``GET
/health`` answers ``ok`` without touching any session.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, MutableMapping
from typing import Any

from flask import Flask, Response, jsonify, request

HEADER = "X-Session-ID"
COUNT_PATH = "/api/count"
VALUE_PATH = "/api/count/value"
APPS = ("bare", "flask_silo_redis", "flask_session", "silo_sql")

State = Callable[[], MutableMapping[str, Any]]


def add_routes(app: Flask, state: State) -> None:
    """The endpoints, identical in every app; *state* returns the client's state."""

    @app.post(COUNT_PATH)
    def count() -> Response:
        data = state()
        data["n"] = int(data.get("n", 0)) + 1
        return jsonify(n=data["n"])

    @app.get(VALUE_PATH)
    def value() -> Response:
        return jsonify(n=int(state().get("n", 0)))

    @app.get("/health")
    def health() -> str:
        return "ok"


def bare_app() -> Flask:
    app = Flask("throughput_bare")
    states: dict[str, dict[str, Any]] = {}
    add_routes(app, lambda: states.setdefault(request.headers.get(HEADER, ""), {}))
    return app


def flask_silo_redis_app(redis_url: str) -> Flask:
    import redis
    from flask_silo import Silo
    from flask_silo.redis_storage import RedisStorage

    app = Flask("throughput_flask_silo_redis")
    client = redis.Redis.from_url(redis_url)
    silo = Silo(app, storage=RedisStorage(client))
    silo.register("counter", lambda: {"n": 0})
    add_routes(app, lambda: silo.state("counter"))
    return app


def flask_session_app(database_url: str) -> Flask:
    from flask import session
    from flask_session import Session
    from flask_sqlalchemy import SQLAlchemy

    app = Flask("throughput_flask_session")
    db = SQLAlchemy()
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        SESSION_TYPE="sqlalchemy",
        SESSION_SQLALCHEMY=db,
    )
    db.init_app(app)
    Session(app)  # creates its table when missing (done once before the workers start)
    add_routes(app, lambda: session)
    return app


def silo_sql_app() -> Flask:
    from flask_silo_sql import Silo

    app = Flask("throughput_silo_sql")
    choice = os.environ.get("THROUGHPUT_SILO_CONFIG")
    if choice:  # a documented choice, measured beside the default
        app.config.update(json.loads(choice))
    silo = Silo(app)  # default storage: the database in SILO_DATABASE_URI
    silo.register("counter", lambda: {"n": 0})
    add_routes(app, lambda: silo.state("counter"))
    return app


def create_app(name: str | None = None) -> Flask:
    """The app named by *name*, or by ``THROUGHPUT_APP``, set up from the environment."""
    name = name or os.environ.get("THROUGHPUT_APP", "")
    if name == "bare":
        return bare_app()
    if name == "flask_silo_redis":
        return flask_silo_redis_app(os.environ["THROUGHPUT_REDIS_URL"])
    if name == "flask_session":
        return flask_session_app(os.environ["THROUGHPUT_DATABASE_URL"])
    if name == "silo_sql":
        return silo_sql_app()
    raise RuntimeError(f"THROUGHPUT_APP must be one of {', '.join(APPS)}, not {name!r}")


app = create_app() if os.environ.get("THROUGHPUT_APP") else None
