"""The Flask side of live tasks: stream tokens, the stream view, publishing, cancel answers.

``Silo.stream_token``, ``Silo.stream``, ``Silo.publish`` and ``Silo.cancel_response``
delegate here; what they stand on is :mod:`flask_silo_sql.events` (the per-process
fan-out, the stream, the tokens) and :mod:`flask_silo_sql.sql.event_rows` (the rows).
"""

from __future__ import annotations

import hmac
from typing import Any

from flask import Flask, Response, current_app, jsonify, request

from .app_state import SiloApp, current_request
from .errors import SessionExpired
from .events import HUBS, StreamDenied, StreamSettings, mint, open_stream, parse_last_id
from .events import session_of as token_session
from .keys import session_key
from .sql import event_rows
from .sql.backend import SQLBackend
from .sql.context import Context
from .sql.executor import Executor
from .tasks import BackgroundTask

CANCEL_ANSWERS = {
    "cancelled": (200, "the task was waiting to run: it never will"),
    "cancelling": (202, "the task is running: it stops at its next progress report"),
    "finished": (200, "the task had finished already: nothing was cancelled"),
    "idle": (200, "the task has not been started: nothing to cancel"),
}
"""What :func:`cancel_response` answers for each outcome of ``task.cancel()``."""


def context_of(state: SiloApp) -> Context:
    """The SQL storage's context (live tasks need SQL storage)."""
    backend = state.store.backend
    if not isinstance(backend, SQLBackend):
        raise RuntimeError(
            "live tasks (silo.stream, silo.publish, stream tokens) need SQL storage: "
            "use SQLStorage (the default) rather than an in-memory storage"
        )
    return backend.ctx


def secret_keys(app: Flask) -> list[str | bytes]:
    """The app's keys for stream tokens: ``SECRET_KEY_FALLBACKS`` first, the current last."""
    return [*(app.config.get("SECRET_KEY_FALLBACKS") or ()), app.secret_key or ""]


def stream_token(state: SiloApp) -> dict[str, Any]:
    """A token that opens the current session's stream, and the newest event's ID."""
    ctx = context_of(state)
    key = current_request().key  # the session's key: no SID is stored, not even in a token's row
    ttl = state.settings.stream_token_ttl
    token = mint(ctx, secret_keys(current_app), key, ttl)
    return {"token": token, "expires_in": ttl, "last_event_id": event_rows.last_id(ctx, key)}


def denied(exc: StreamDenied) -> Response:
    response = jsonify(error=exc.slug, message=exc.message)
    response.status_code = exc.status
    response.headers["Cache-Control"] = "no-store"
    return response


def stream(state: SiloApp, header: str) -> Response:
    """The ``text/event-stream`` response for the session the request's token opens."""
    ctx = context_of(state)
    settings = state.settings
    try:
        sid = token_session(
            ctx, secret_keys(current_app), request.args.get("token", ""), settings.stream_token_ttl
        )
        claimed = request.headers.get(header)
        if claimed and not hmac.compare_digest(session_key(claimed).encode(), sid.encode()):
            raise StreamDenied(
                403,
                "stream_token_other_session",
                "this stream token belongs to another session than the one this request names",
            )
        last = request.headers.get("Last-Event-ID")
        after = parse_last_id(last if last else request.args.get("last_event_id"))
        interval = settings.stream_poll_interval
        if interval is None:
            interval = 1.0 if ctx.connector.engine.dialect.name == "postgresql" else 0.1
        hub = HUBS.of(ctx, lambda: float(interval))
        limits = StreamSettings(
            heartbeat=settings.stream_heartbeat,
            max_age=settings.stream_max_age,
            per_session=settings.streams_per_session,
            per_process=settings.streams_per_process,
        )
        return open_stream(ctx, hub, sid, after, limits)
    except StreamDenied as exc:
        return denied(exc)


class StagedEvent:
    """An event published in a request: written with the request's commit."""

    directory: str | None = None
    locks_session = True

    def __init__(self, ctx: Context, sid: str, kind: str, data: Any) -> None:
        self.ctx = ctx
        self.sid = sid
        self.kind = kind
        self.data = data

    def write(self, ex: Executor, now: float) -> None:
        event_rows.write(ex, self.ctx, self.sid, self.kind, self.data, now=now)

    def committed(self) -> None:
        """Written: the streams have it."""

    def discard(self) -> None:
        """The request failed: it was never published."""


def check_kind(kind: str) -> None:
    if not kind or len(kind) > 32 or not all(c.isalnum() or c in "-_." for c in kind):
        raise ValueError(
            f"an event's kind is 1 to 32 letters, digits, '-', '_' or '.', not {kind!r}"
        )


def publish(state: SiloApp, kind: str, data: Any, sid: str | None) -> None:
    """An app event for the current request's session (with its commit), or for *sid* now."""
    check_kind(kind)
    ctx = context_of(state)
    payload = {} if data is None else data
    if sid is None:
        request_state = current_request()
        unit: Any = request_state.unit
        unit.stage(StagedEvent(ctx, request_state.key, kind, payload))
        return
    sid = session_key(sid)
    with ctx.connector.transaction() as ex:
        if ex.run(ctx.st.has_session, {"sid": sid}).first() is None:
            raise SessionExpired(sid)
        event_rows.write(ex, ctx, sid, kind, payload)


def cancel_response(task: BackgroundTask) -> tuple[Response, int]:
    """``task.cancel()``, answered as JSON: ``outcome``, what it means, the task's state."""
    outcome = task.cancel()
    status, message = CANCEL_ANSWERS[outcome]
    body = {"outcome": outcome, "message": message, "state": task.state.to_dict()}
    return jsonify(body), status
