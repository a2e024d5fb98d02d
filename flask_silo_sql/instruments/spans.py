"""OpenTelemetry spans around silo's units of work, on ``opentelemetry-api`` alone.

Without the package nothing here runs: :func:`traced` returns the function it
decorates unchanged. With it, spans go to the process's tracer provider (the
host's SDK set-up decides whether they are recorded and where they go). A span
names a session only by its log tag (:func:`~flask_silo_sql.sids.tag`), never
by its SID, and carries no key, state or SQL parameter. An exception's text can
hold a SID (an ``OSError`` names a path), so a failed span records the
exception's class only.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import trace as _trace
except ImportError:  # the otel extra is not installed
    _trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

INSTRUMENTATION = "flask_silo_sql"
AVAILABLE = _trace is not None
"""Whether ``opentelemetry-api`` is installed (then silo emits spans)."""

Attributes = Mapping[str, "str | bool | int | float"]

_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def set_tracer_provider(provider: TracerProvider | None) -> None:
    """Send silo's spans to *provider* (None: the process's global provider)."""
    global _provider, _tracer
    _provider = provider
    _tracer = None


def tracer() -> Tracer:
    """Silo's tracer (the global provider's unless one was set)."""
    global _tracer
    if _tracer is None:
        _tracer = _trace.get_tracer(INSTRUMENTATION, _version(), tracer_provider=_provider)
    return _tracer


def _version() -> str | None:
    """The installed package's version (read from its metadata: this module sits below
    the package's ``__init__``)."""
    try:
        return importlib.metadata.version("flask-silo-sql")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return None


def on() -> bool:
    """Whether spans go anywhere: a provider was set here, or the process set an SDK's.

    With ``opentelemetry-api`` alone (no SDK configured) every span would be a
    no-op: silo then starts none, and a request pays this check. It reads the
    API's global (``get_tracer_provider()`` looks at the environment on every
    call while none is set: a cost per request); the first call does call it,
    so a provider named by ``OTEL_PYTHON_TRACER_PROVIDER`` is loaded and set.
    """
    if _trace is None:
        return False
    if _provider is not None:
        return True
    provider = getattr(_trace, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is None:
        return False
    if provider is _UNKNOWN:  # another API version: ask it
        provider = _trace.get_tracer_provider()
    return not isinstance(provider, (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider))


def wanted() -> bool:
    """Whether a span started here would be recorded: spans are :func:`on`, and the
    current span, if any, is recorded. Under a parent the sampler dropped (a trace
    sampled out), the child is dropped too, so it is not started at all: on a
    sub-millisecond request the SDK's sampling of a child costs several percent."""
    if not on():
        return False
    current = _trace.get_current_span()
    return current is _trace.INVALID_SPAN or current.is_recording()


_UNKNOWN = object()
if _trace is not None:
    _trace.get_tracer_provider()  # loads one the environment names


def start(name: str, attributes: Attributes) -> Span:
    """A span that the caller ends (it spans hooks, not a block)."""
    return tracer().start_span(name, attributes=dict(attributes))


@contextmanager
def span(name: str, attributes: Attributes) -> Iterator[Span]:
    """A span around a block, current inside it; an exception marks it failed."""
    current = tracer().start_span(name, attributes=dict(attributes))
    token = activate(current)
    try:
        yield current
    except BaseException as exc:
        failed(current, exc)
        raise
    finally:
        deactivate(token)
        current.end()


def failed(current: Span, exc: BaseException) -> None:
    """Mark *current* failed by *exc*'s class (its text may name a SID)."""
    kind = type(exc).__qualname__
    current.set_attribute("error.type", kind)
    current.set_status(_trace.Status(_trace.StatusCode.ERROR, kind))


def activate(current: Span) -> Any:
    """Make *current* the parent of spans started after (a token for :func:`deactivate`)."""
    from opentelemetry import context

    return context.attach(_trace.set_span_in_context(current))


def deactivate(token: Any) -> None:
    from opentelemetry import context

    context.detach(token)
