"""What metrics and spans cost a request: the same app with and without them.

Two apps on one database each (SQLite, and PostgreSQL with ``--postgresql``),
the counter endpoints of :mod:`benchmarks.requests` (a write: ``POST`` that
increments the client's counter; a read: ``GET`` that returns it):

* **plain**: ``SILO_METRICS = False``; silo's spans go to the process's global
  tracer provider, which no SDK has replaced (``opentelemetry-api`` is
  installed, so its no-op spans are part of this cost);
* **observed**: ``SILO_METRICS = True`` and silo's spans recorded by an
  opentelemetry-sdk ``TracerProvider`` exporting each finished span to memory
  (cleared after every round), a heavier exporter than a batching one.

Without ``opentelemetry-api`` and ``prometheus-client`` installed the hooks are
not even wrapped, so a request costs no more than **plain**.

Rounds interleave the two apps; each round's ratio observed / plain is taken,
and the median of those ratios is reported (the machine is shared: the figures
are indicative). Target: observed <= 1.05 x plain.
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

import flask_silo_sql
from benchmarks.requests import add_counter_routes, client_ops, start_postgresql, timed
from flask_silo_sql.instruments import spans
from flask_silo_sql.sql import schema

SID = "bench-instruments-client-0001"
TARGET = 1.05


def app_ops(url: str, *, observed: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    storage = flask_silo_sql.SQLStorage(url)
    schema.upgrade(storage.engine)
    app = Flask(f"bench_{'observed' if observed else 'plain'}")
    app.config["SILO_METRICS"] = observed
    silo = flask_silo_sql.Silo(app, storage=storage, auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})
    add_counter_routes(app, lambda: silo.state("counter"))
    write, read, _value = client_ops(app, SID)
    return write, read


def measure(url_plain: str, url_observed: str, iterations: int, rounds: int) -> dict[str, float]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    plain = app_ops(url_plain, observed=False)
    observed = app_ops(url_observed, observed=True)

    ratios: dict[str, list[float]] = {"write": [], "read": []}
    for warm in (plain, observed):
        for _ in range(max(30, iterations // 5)):
            warm[0]()
            warm[1]()
    for _ in range(rounds):
        for index, kind in enumerate(("write", "read")):
            spans.set_tracer_provider(None)
            base = timed(plain[index], iterations)
            spans.set_tracer_provider(provider)
            cost = timed(observed[index], iterations)
            spans.set_tracer_provider(None)
            if not exporter.get_finished_spans():
                raise RuntimeError("the observed app recorded no span")
            exporter.clear()
            ratios[kind].append(cost / base)
    return {kind: statistics.median(values) for kind, values in ratios.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=200, help="requests per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--postgresql", action="store_true", help="also on PostgreSQL")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        urls = [f"sqlite:///{Path(tmp) / name}.db" for name in ("plain", "observed")]
        results["sqlite"] = measure(urls[0], urls[1], args.iterations, args.rounds)
    if args.postgresql:
        server = start_postgresql()
        try:
            urls = [server.create_database(), server.create_database()]
            results["postgresql"] = measure(urls[0], urls[1], args.iterations, args.rounds)
        finally:
            server.destroy()
    failed = False
    print("median per-round ratio, observed (metrics + recorded spans) / plain (indicative)")
    for db, by_kind in results.items():
        for kind, ratio in by_kind.items():
            verdict = "ok" if ratio <= TARGET else f"OVER {TARGET:.2f}"
            failed |= ratio > TARGET
            print(f"  {db:<11} {kind:<6} {ratio:.3f}  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
