"""What metrics and spans cost a request: the same app with and without them.

Four apps on one database (SQLite, and PostgreSQL with ``--postgresql``), a client each,
the counter endpoints of :mod:`benchmarks.requests` (a write: ``POST`` that
increments the client's counter; a read: ``GET`` that returns it):

* **plain**: ``SILO_METRICS = False`` and no OpenTelemetry SDK configured
  (``opentelemetry-api`` is installed: silo checks, finds spans would go
  nowhere, and starts none);
* **metrics**: ``SILO_METRICS = True``, no SDK;
* **metrics+spans**: and silo's spans recorded by an opentelemetry-sdk
  ``TracerProvider`` that exports every finished span to memory at once
  (cleared after every round): every request traced;
* **metrics+spans 10%**: the same provider sampling one trace in ten
  (``ParentBased(TraceIdRatioBased(0.1))``), as production tracing usually does.

Without ``opentelemetry-api`` and ``prometheus-client`` installed the hooks are
not even wrapped, so a request costs no more than **plain**.

Rounds interleave the apps; each round's ratio to plain is taken,
and the median of those ratios is reported (the machine is shared: the figures
are indicative). Target: each <= 1.05 x plain; a span recorded by the SDK costs
more than that on a sub-millisecond request, so the fully traced row is reported against
it but is not expected to meet it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from flask import Flask
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

import flask_silo_sql
from benchmarks.requests import add_counter_routes, client_ops, start_postgresql, timed
from flask_silo_sql.instruments import spans
from flask_silo_sql.sql import schema

SID = "bench-instruments-client-0001"
TARGET = 1.05


def app_ops(url: str, sid: str, *, observed: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    storage = flask_silo_sql.SQLStorage(url)
    schema.upgrade(storage.engine)
    app = Flask(f"bench_{sid}")
    app.config["SILO_METRICS"] = observed
    silo = flask_silo_sql.Silo(app, storage=storage, auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})
    add_counter_routes(app, lambda: silo.state("counter"))
    write, read, _value = client_ops(app, sid)
    return write, read


def providers() -> tuple[dict[str, TracerProvider | None], InMemorySpanExporter]:
    """Where each configuration's spans go (None: nowhere, no SDK)."""
    exporter = InMemorySpanExporter()
    every = TracerProvider()
    every.add_span_processor(SimpleSpanProcessor(exporter))
    tenth = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
    tenth.add_span_processor(SimpleSpanProcessor(exporter))
    return {"metrics": None, "metrics+spans": every, "metrics+spans 10%": tenth}, exporter


def measure(url: str, iterations: int, rounds: int) -> dict[str, float]:
    """Median per-round ratio to plain, by configuration and kind (write, read).

    Every app on the same database (a client of its own each), so no app is
    favoured by its file or its server-side caches.
    """
    sinks, exporter = providers()
    plain = app_ops(url, f"{SID}-plain", observed=False)
    observed = {
        name: app_ops(url, f"{SID}-{index}", observed=True) for index, name in enumerate(sinks)
    }
    for ops in (plain, *observed.values()):
        for _ in range(max(30, iterations // 5)):
            ops[0]()
            ops[1]()
    ratios: dict[str, list[float]] = {}
    for _ in range(rounds):
        for index, kind in enumerate(("write", "read")):
            spans.set_tracer_provider(None)
            base = timed(plain[index], iterations)
            for name, provider in sinks.items():
                spans.set_tracer_provider(provider)
                cost = timed(observed[name][index], iterations)
                spans.set_tracer_provider(None)
                ratios.setdefault(f"{name:<18} {kind}", []).append(cost / base)
            if not exporter.get_finished_spans():
                raise RuntimeError("the observed apps recorded no span")
            exporter.clear()
    return {key: statistics.median(values) for key, values in ratios.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=200, help="requests per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--postgresql", action="store_true", help="also on PostgreSQL")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = measure(
            f"sqlite:///{Path(tmp) / 'bench.db'}", args.iterations, args.rounds
        )
    if args.postgresql:
        server = start_postgresql()
        try:
            results["postgresql"] = measure(server.create_database(), args.iterations, args.rounds)
        finally:
            server.destroy()
    failed = False
    print("median per-round ratio to plain (indicative: a shared machine)")
    for db, by_kind in results.items():
        for key, ratio in by_kind.items():
            verdict = "ok" if ratio <= TARGET else f"OVER {TARGET:.2f}"
            failed |= ratio > TARGET
            print(f"  {db:<11} {key}  {ratio:.3f}  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
