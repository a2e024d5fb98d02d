"""OpenTelemetry's SQLAlchemy instrumentation on one engine, spans kept in memory.

A host that traces its database sees silo's statements through
``opentelemetry-instrumentation-sqlalchemy``; the tests check what it sees.
That package's ``SQLAlchemyInstrumentor().instrument(engine=...)`` is no use
here: it also wraps ``create_engine`` and ``Engine.connect`` for the whole
process, works once per process (a second call only logs a warning),
refuses SQLAlchemy versions outside its declared range, and its
``uninstrument()`` detaches every engine. So this attaches the package's own
``EngineTracer`` (the listeners ``instrument()`` would register) to one engine,
with a private tracer provider that exports finished spans to memory, and
detaches exactly those listeners again.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.instrumentation.sqlalchemy.version import __version__
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Engine, event

INSTRUMENTATION = "opentelemetry.instrumentation.sqlalchemy"
STATEMENT_ATTRIBUTES = ("db.statement", "db.query.text")  # old and new semantic conventions


class EngineSpans:
    """Trace the SQL statements of *engine* while attached (a context manager)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self._listeners: list[tuple[Any, str, Any]] = []

    @property
    def attached(self) -> bool:
        return bool(self._listeners)

    def attach(self) -> None:
        """Register OpenTelemetry's listeners on the engine (no-op when attached)."""
        if self._listeners:
            return
        registry: list[tuple[Any, str, Any]] = EngineTracer._remove_event_listener_params
        known = {id(entry) for entry in registry}
        EngineTracer(  # type: ignore[no-untyped-call]  # the package has no annotations
            self.provider.get_tracer(INSTRUMENTATION, __version__),
            self.engine,
            NoOpMeterProvider()
            .get_meter(INSTRUMENTATION)
            .create_up_down_counter("db.client.connections.usage"),
        )
        self._listeners = [entry for entry in registry if id(entry) not in known]

    def detach(self) -> None:
        """Remove exactly the listeners :meth:`attach` registered; spans are kept."""
        registry: list[tuple[Any, str, Any]] = EngineTracer._remove_event_listener_params
        for entry in self._listeners:
            _target, identifier, listener = entry
            event.remove(self.engine, identifier, listener)
            if entry in registry:
                registry.remove(entry)
        self._listeners = []

    def spans(self) -> list[ReadableSpan]:
        """The finished spans, oldest first."""
        return list(self.exporter.get_finished_spans())

    def names(self) -> list[str]:
        """Span names: the statement's first word and the database (``SELECT silo``)."""
        return [span.name for span in self.spans()]

    def statements(self) -> list[str]:
        """The SQL text of each traced statement, oldest first."""
        found = []
        for span in self.spans():
            attributes = span.attributes or {}
            for key in STATEMENT_ATTRIBUTES:
                if key in attributes:
                    found.append(str(attributes[key]))
                    break
        return found

    def clear(self) -> None:
        """Forget the spans finished so far."""
        self.exporter.clear()

    def __enter__(self) -> EngineSpans:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.detach()
