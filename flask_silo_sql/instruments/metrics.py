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

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

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
    """The counters of one app's store (its database gauges are :mod:`.gauges`')."""

    def __init__(self, registry: CollectorRegistry) -> None:
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
