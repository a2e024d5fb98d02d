"""Prometheus metrics of one app, on ``prometheus-client`` (the ``prometheus`` extra).

Enabled by ``SILO_METRICS``: ``True`` registers them in a registry of their own
(exposed by :meth:`Silo.metrics_view() <flask_silo_sql.Silo.metrics_view>`), a
``CollectorRegistry`` (``prometheus_client.REGISTRY`` for the host's default)
registers them there. Counters move with the work (a request's outcome, a
sweep, a task attempt); what needs a query (sessions live, the queue, live
workers, file bytes) is read when Prometheus scrapes, one cheap query each, so
a request pays for none of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..logs import silo_logger

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from ..store import SessionStore

logger = silo_logger("flask_silo_sql")

OUTCOME_OK = "ok"


def outcome(status: int) -> str:
    """The ``outcome`` label of a response: ``ok`` below 400, else its status code."""
    return OUTCOME_OK if status < 400 else str(status)


def registry_for(setting: Any) -> CollectorRegistry | None:
    """The registry ``SILO_METRICS`` asks for (None: metrics are off)."""
    if setting is False or setting is None:
        return None
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise RuntimeError(
            "SILO_METRICS is set but prometheus-client is not installed: "
            "pip install 'flask-silo-sql[prometheus]', or set SILO_METRICS = False"
        ) from None
    if setting is True:
        return CollectorRegistry(auto_describe=True)
    if isinstance(setting, CollectorRegistry):
        return setting
    raise TypeError(
        f"SILO_METRICS must be True, False or a prometheus_client.CollectorRegistry, "
        f"not {setting!r}"
    )


class Metrics:
    """The counters of one app's store, and the collector of its database gauges."""

    def __init__(self, registry: CollectorRegistry, store: SessionStore) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        self.requests = Counter(
            "silo_requests",
            "API requests answered, by outcome (ok, or the error status code)",
            ["outcome"],
            registry=registry,
        )
        self.sweeps = Counter("silo_sweeps", "Expiry sweeps run", registry=registry)
        self.sweep_seconds = Histogram(
            "silo_sweep_duration_seconds",
            "How long an expiry sweep took",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.sweep_expired = Counter(
            "silo_sweep_expired_sessions", "Sessions expired by sweeps", registry=registry
        )
        self.sweep_last = Gauge(
            "silo_sweep_last_success_timestamp_seconds",
            "Unix time the last expiry sweep of this process ended",
            registry=registry,
        )
        self.attempts = Counter(
            "silo_task_attempts", "Task attempts started, by task", ["task"], registry=registry
        )
        self.retries = Counter(
            "silo_task_retries",
            "Task attempts that failed and left the run to retry, by task",
            ["task"],
            registry=registry,
        )
        self.failures = Counter(
            "silo_task_failures",
            "Task runs failed for good (no retry left), by task",
            ["task"],
            registry=registry,
        )
        registry.register(DatabaseGauges(store))


class DatabaseGauges:
    """Gauges read from the database when Prometheus scrapes (a custom collector)."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        try:
            numbers = read(self.store)
        except Exception as exc:  # the scrape still answers: silo_database_up says why
            logger.warning("metrics: cannot read the silo database: %s", type(exc).__name__)
            numbers = None
        return list(self._families(numbers))

    @staticmethod
    def _families(numbers: dict[str, Any] | None) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "silo_database_up", "1 when the scrape could read the silo database, else 0"
        )
        up.add_metric([], 0 if numbers is None else 1)
        yield up
        plain = (
            ("silo_sessions_live", "Live sessions", "sessions"),
            ("silo_task_queue_depth", "Durable runs queued, waiting for a worker", "queued"),
            (
                "silo_task_oldest_queued_age_seconds",
                "Age of the oldest queued run that may start (0: none)",
                "oldest_queued_age",
            ),
            ("silo_file_stored_bytes", "Bytes of every stored file", "file_bytes"),
        )
        for name, doc, key in plain:
            family = GaugeMetricFamily(name, doc)
            if numbers is not None:
                family.add_metric([], numbers[key])
            yield family
        workers = GaugeMetricFamily(
            "silo_task_workers_live",
            "Processes running tasks with a recent heartbeat, by kind (worker, web)",
            labels=["kind"],
        )
        if numbers is not None:
            for kind, count in sorted(numbers["workers"].items()):
                workers.add_metric([kind], count)
        yield workers


def read(store: SessionStore) -> dict[str, Any]:
    """The database gauges: one query each (the ones ``flask silo-db stats`` runs)."""
    from ..sql import SQLStorage

    storage = store.storage
    if not isinstance(storage, SQLStorage):
        raise TypeError("database gauges need SQL storage")
    st = storage.statements
    v = st.values
    now = store.now()  # the store's clock (the database's unless one is injected)
    with storage.connector.executor() as ex:
        sessions = int(ex.run(st.count_rows["silo_sessions"], {}).scalar())
        by_status = {row[0]: int(row[1]) for row in ex.run(st.task_counts, {}).rows}
        file_bytes = int(ex.run(st.files.all_file_bytes, {}).scalar() or 0)
        stale_before = {"stale_before": v.time(now - store.heartbeat_timeout)}
        live = ex.run(st.live_workers, stale_before).rows
        oldest = ex.run(st.oldest_queued, {}).scalar() if by_status.get("queued") else None
    workers: dict[str, int] = {"worker": 0, "web": 0}
    for row in live:
        workers[row[3]] = workers.get(row[3], 0) + 1
    age = 0.0 if oldest is None else max(0.0, now - v.unix(oldest))
    return {
        "sessions": sessions,
        "queued": by_status.get("queued", 0),
        "oldest_queued_age": age,
        "file_bytes": file_bytes,
        "workers": workers,
    }
