"""The gauges read from the database when Prometheus scrapes, one cheap query each.

A custom collector of ``prometheus-client``: sessions live, the queue and its
oldest run, live workers, file bytes. A request pays for none of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..logs import silo_logger

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from ..store import SessionStore

logger = silo_logger("flask_silo_sql")


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
