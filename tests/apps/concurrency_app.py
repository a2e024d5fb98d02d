"""A small API run under gunicorn by the concurrency, outage and crash tests.

Configured from the environment:

- ``SILO_DATABASE_URI``: the database (its schema must already be current);
- ``SILO_LOCKING``: ``1`` for locking mode;
- ``SILO_DB_TIMEOUT``: seconds any wait on the database may last (default 5);
- ``SILO_TEST_UPLOAD_DIR``: base directory of the ``uploads`` file store;
- ``SILO_FILE_BACKEND``, ``SILO_FILE_STORAGE_OPTIONS``, ``SILO_MAX_FILE_BYTES``,
  ``SILO_MAX_SESSION_BYTES``, ``SILO_MIN_FREE_BYTES``: as the library reads them (JSON,
  else text);
- ``SILO_TEST_BARRIER_DIR``: where the barrier files of paused requests live;
- ``SILO_IDEMPOTENCY_LEASE``: seconds an idempotent request holds its key (default 60);
- ``SILO_TEST_RUNS_FILE``: a file the idempotent views append a line to each time
  they run (the side effect their key must keep to one).

A request can be paused at a chosen point with ``?pause=<point>&token=<name>``
(or the headers ``X-Test-Pause`` and ``X-Test-Token``, which leave an idempotent
request's fingerprint as its retry's): it writes ``<token>.ready`` (holding the
worker's PID) in the barrier directory, then waits until ``<token>.go`` exists.
The points are ``handler`` (state changed, nothing saved yet), ``mid_save``
(inside the write transaction, after the first namespace row was written and
before the next one), ``before_response`` (inside the write transaction of an
idempotent request: its namespace written, its response not yet stored),
``after_commit`` (state committed, response not yet sent) and
``before_record`` (upload renamed into place, its ``silo_files`` row not yet
written).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, abort, g, has_app_context, jsonify, request

from flask_silo_sql import Silo, SQLStorage

MULTI_NAMESPACES = ("alpha", "beta", "gamma")
BARRIER_TIMEOUT_S = 120.0
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")

app = Flask(__name__)
app.config["SILO_DATABASE_URI"] = os.environ["SILO_DATABASE_URI"]
app.config["SILO_LOCKING"] = os.environ.get("SILO_LOCKING", "") == "1"
app.config["SILO_DB_TIMEOUT"] = float(os.environ.get("SILO_DB_TIMEOUT", "5"))
for _key in (
    "SILO_FILE_BACKEND",
    "SILO_FILE_STORAGE_OPTIONS",
    "SILO_MAX_FILE_BYTES",
    "SILO_MAX_SESSION_BYTES",
    "SILO_MIN_FREE_BYTES",
):
    if _key in os.environ:
        try:
            app.config[_key] = json.loads(os.environ[_key])
        except ValueError:
            app.config[_key] = os.environ[_key]
app.config["SILO_IDEMPOTENCY_LEASE"] = float(os.environ.get("SILO_IDEMPOTENCY_LEASE", "60"))

silo = Silo(app, ttl=3600)
silo.register("counter", lambda: {"value": 0})
for _name in MULTI_NAMESPACES:
    silo.register(_name, lambda: {"value": 0})
uploads = silo.add_file_store(
    "uploads", os.environ.get("SILO_TEST_UPLOAD_DIR") or os.path.join(app.instance_path, "up")
)


# -- barriers -----------------------------------------------------------------


def _barrier_paths() -> tuple[str, str]:
    token = request.args.get("token") or request.headers.get("X-Test-Token", "")
    directory = os.environ.get("SILO_TEST_BARRIER_DIR", "")
    if not directory or not _TOKEN.fullmatch(token):
        abort(400)
    base = os.path.join(directory, token)
    return base + ".ready", base + ".go"


def wait_at_barrier() -> None:
    """Announce this worker's PID, then wait (bounded) for the test's go-ahead."""
    ready, go = _barrier_paths()
    tmp = ready + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(tmp, ready)
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise RuntimeError(f"barrier {go} never opened")
        time.sleep(0.01)


def _pause_at(point: str) -> bool:
    return has_app_context() and g.get("pause_at") == point


def _pause_in_transaction(name: str, sql: str, values: Mapping[str, Any]) -> None:
    """The ``mid_save`` and ``before_record`` pauses, inside the storage's own writes.

    At the storage's statement hook: the seam every statement passes, whichever
    executor sends it, so the path under test is the one users run.
    """
    if _pause_at("mid_save") and name in ("update_namespace", "insert_namespace"):
        g.namespace_writes = g.get("namespace_writes", 0) + 1
        if g.namespace_writes == 2:  # the first namespace is written, uncommitted
            wait_at_barrier()
    elif (_pause_at("before_record") and name == "finish_upload") or (
        _pause_at("before_response") and name.startswith("complete_key")  # an idempotent commit
    ):
        wait_at_barrier()


_storage = silo.store.storage
assert isinstance(_storage, SQLStorage)
_storage.statement_hook = _pause_in_transaction


@app.before_request
def _read_pause() -> None:
    g.pause_at = request.args.get("pause") or request.headers.get("X-Test-Pause")


@app.teardown_request
def _pause_after_commit(exc: BaseException | None) -> None:
    # Teardown runs after the extension's after_request (which committed) and
    # before the WSGI server sends the response.
    if _pause_at("after_commit"):
        wait_at_barrier()


# -- routes -------------------------------------------------------------------


@app.get("/health")
def health() -> str:
    """Outside the API prefix: never touches the database."""
    return "ok"


@app.get("/pid")
def pid() -> str:
    """The PID of the worker answering (outside the API prefix)."""
    return str(os.getpid())


@app.get("/api/ping")
def ping() -> Response:
    """An API request that never reads state."""
    return jsonify(sid=silo.sid)


@app.post("/api/inc")
def inc() -> Response:
    """Read-modify-write of one counter."""
    state = silo.state("counter")
    state["value"] += 1
    return jsonify(value=state["value"])


@app.get("/api/counter")
def counter() -> Response:
    return jsonify(value=silo.state("counter")["value"])


@app.post("/api/multi")
def multi_write() -> Response:
    """Set ``value`` in every namespace of MULTI_NAMESPACES (optionally pausing)."""
    value = int(request.args.get("value", "0"))
    for name in MULTI_NAMESPACES:
        silo.state(name)["value"] = value
    if _pause_at("handler"):
        wait_at_barrier()
    return jsonify(value=value)


@app.get("/api/multi")
def multi_read() -> Response:
    return jsonify({name: silo.state(name)["value"] for name in MULTI_NAMESPACES})


@app.put("/api/upload/<name>")
def upload(name: str) -> tuple[Response, int]:
    """Stream the request body into the ``uploads`` store (``?count=1``: and count the
    upload in the session's state, so the file's row is written with the request's commit)."""
    counted = request.args.get("count") == "1"
    if counted:
        silo.state("counter")["value"] += 1
    path = uploads.save(silo.sid, name, request.stream, content_type=request.content_type)
    return jsonify(path=os.path.basename(path), size=os.path.getsize(path)), 201


@app.get("/api/files/<name>")
def download(name: str) -> Response:
    return silo.send_file(uploads, name)


@app.get("/api/files")
def list_files() -> Response:
    return jsonify(files=uploads.list_files(silo.sid))


@app.post("/api/reset")
def reset_session() -> Response:
    """Fresh state for the session, its files removed."""
    silo.reset_current()
    return jsonify(reset=True)


@app.post("/api/rotate")
def rotate_session() -> Response:
    """A new SID for the session (its state and files move to it)."""
    return jsonify(sid=silo.rotate())


def _idempotent_increment() -> Response:
    """The idempotent views' work: a side effect outside the database, a state change."""
    runs = os.environ.get("SILO_TEST_RUNS_FILE")
    if runs:
        with open(runs, "a") as handle:  # one short O_APPEND write per run
            handle.write(f"{os.getpid()}\n")
    delay = float(request.args.get("delay", "0"))
    if delay:
        time.sleep(min(delay, 5.0))
    state = silo.state("counter")
    state["value"] += 1
    if _pause_at("handler"):
        wait_at_barrier()
    if request.headers.get("X-Test-Fail"):
        raise RuntimeError("the view failed, as asked")
    return jsonify(value=state["value"], run=os.urandom(8).hex(), pid=os.getpid())


@app.post("/api/idem/inc")
@silo.idempotent()
def idempotent_inc() -> Response:
    """Increment the counter once per Idempotency-Key (a duplicate in flight: 409)."""
    return _idempotent_increment()


@app.post("/api/idem/wait")
@silo.idempotent(wait=30)
def idempotent_wait() -> Response:
    """The same, but a duplicate in flight waits for the first one's response."""
    return _idempotent_increment()


@app.post("/api/idem/required")
@silo.idempotent(required=True)
def idempotent_required() -> Response:
    """The same, refusing a request without a key."""
    return _idempotent_increment()
