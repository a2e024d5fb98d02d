"""The seams the package calls: decorators on its units of work.

A decorator here returns its function unchanged when neither
``opentelemetry-api`` nor ``prometheus-client`` is installed; otherwise its
wrapper checks two module flags and calls straight through while neither
spans nor any app's metrics are on. Metrics belong to a store
(:data:`METERS`): an app with ``SILO_METRICS`` registers its store's there.

The store, the file stores and the tasks import these seams, so this module
imports none of them: what it wraps it takes as it comes (``Any``).
"""

from __future__ import annotations

import functools
import importlib.util
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ..sids import tag
from . import spans

if TYPE_CHECKING:
    from flask import Response

    from .metrics import Metrics

F = TypeVar("F", bound=Callable[..., Any])

METERS: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()
"""Each store whose app has ``SILO_METRICS`` on, and its metrics."""

PROMETHEUS = importlib.util.find_spec("prometheus_client") is not None
WRAP = spans.AVAILABLE or PROMETHEUS
"""Whether the decorators wrap at all (a package to feed is installed)."""


# -- units of work --------------------------------------------------------------------


def _wrap(fn: F, name: str, attributes: Callable[..., dict[str, Any]]) -> F:
    """*fn* inside span *name* (when spans are on)."""

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        if not spans.wanted():
            return fn(*args, **kwargs)
        with spans.span(name, attributes(*args, **kwargs)):
            return fn(*args, **kwargs)

    return cast(F, traced)


def traced_commit(fn: F) -> F:
    """``SQLUnit.commit``: span ``silo.commit``."""
    if not spans.AVAILABLE:
        return fn

    @functools.wraps(fn)
    def commit(unit: Any, *, state: bool = True, files: bool = True) -> None:
        if not spans.wanted():
            return fn(unit, state=state, files=files)  # type: ignore[no-any-return]
        attributes = {"silo.commit.state": state, "silo.commit.files": files}
        with spans.span("silo.commit", attributes) as current:
            if current.is_recording():
                current.set_attribute("silo.session", tag(unit.sid))
            fn(unit, state=state, files=files)
        return None

    return cast(F, commit)


def observed_sweep(fn: F) -> F:
    """``SessionStore.sweep``: span ``silo.sweep``; the sweep metrics."""
    if not WRAP:
        return fn

    @functools.wraps(fn)
    def sweep(store: Any, **kwargs: Any) -> Any:
        metrics = METERS.get(store)
        traced = spans.wanted()
        if not traced and metrics is None:
            return fn(store, **kwargs)
        dry_run = bool(kwargs.get("dry_run"))
        attributes = {"silo.sweep.dry_run": dry_run}
        started = time.perf_counter()
        if traced:
            with spans.span("silo.sweep", attributes) as current:
                result = fn(store, **kwargs)
                current.set_attribute("silo.sweep.expired", len(result.expired))
                current.set_attribute("silo.sweep.batches", result.batches)
                current.set_attribute("silo.sweep.skipped_busy", result.skipped_busy)
                current.set_attribute("silo.sweep.keys_expired", result.keys_expired)
        else:
            result = fn(store, **kwargs)
        if metrics is not None and not dry_run:
            metrics.sweeps.inc()
            metrics.sweep_seconds.observe(time.perf_counter() - started)
            metrics.sweep_expired.inc(len(result.expired))
            metrics.sweep_last.set_to_current_time()
        return result

    return cast(F, sweep)


def observed_attempt(fn: F) -> F:
    """``BackgroundTask._run``: span ``silo.task.attempt``; attempts, retries, failures."""
    if not WRAP:
        return fn

    @functools.wraps(fn)
    def run(task: Any, *args: Any) -> None:
        home = task._home
        ctx = getattr(home, "ctx", None)
        metrics = METERS.get(ctx.policy) if ctx is not None and METERS else None
        traced = spans.wanted()
        if not traced and metrics is None:
            return fn(task, *args)  # type: ignore[no-any-return]
        name = task.name
        if metrics is not None:
            metrics.attempts.labels(name).inc()
        attributes: dict[str, Any] = {"silo.task.name": name, "silo.task.attempt": task.attempt}
        if home is not None:
            attributes["silo.session"] = tag(home.sid)
        if traced:
            with spans.span("silo.task.attempt", attributes) as current:
                fn(task, *args)
                current.set_attribute("silo.task.outcome", _attempt_outcome(task))
        else:
            fn(task, *args)
        if metrics is not None:
            result = _attempt_outcome(task)
            if result == "retrying":
                metrics.retries.labels(name).inc()
            elif result == "failed":
                metrics.failures.labels(name).inc()
        return None

    return cast(F, run)


def _attempt_outcome(task: Any) -> str:
    state = task._state
    if task._lost:
        return "lost"
    if state.waiting == "retrying":
        return "retrying"
    if state.error is not None:
        return "failed"
    return "complete" if state.complete else "stopped"


def traced_save(fn: F) -> F:
    """``FileStore.save``: span ``silo.file.save``."""
    if not spans.AVAILABLE:
        return fn

    def attributes(files: Any, sid: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        found: dict[str, Any] = {"silo.file.store": files.name, "silo.session": tag(sid)}
        size = kwargs.get("size")
        if size is not None:
            found["silo.file.declared_bytes"] = int(size)
        return found

    return _wrap(fn, "silo.file.save", attributes)


def traced_send(fn: F) -> F:
    """``FileStore.send``: span ``silo.file.send`` (opening the file and the response;
    the body streams after it)."""
    if not spans.AVAILABLE:
        return fn

    @functools.wraps(fn)
    def send(files: Any, sid: str, *args: Any, **kwargs: Any) -> Response:
        if not spans.wanted():
            return fn(files, sid, *args, **kwargs)  # type: ignore[no-any-return]
        attributes = {"silo.file.store": files.name, "silo.session": tag(sid)}
        with spans.span("silo.file.send", attributes) as current:
            response: Response = fn(files, sid, *args, **kwargs)
            current.set_attribute("http.response.status_code", response.status_code)
            if response.content_length is not None:
                current.set_attribute("silo.file.bytes", response.content_length)
            return response

    return cast(F, send)
