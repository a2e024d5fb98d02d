"""The views an app registers for its probes and its Prometheus scrape."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flask import Response, jsonify

from ..instruments.seams import METERS
from . import health

if TYPE_CHECKING:
    from ..app_state import SiloApp


def health_view(state: Callable[[], SiloApp]) -> Callable[[], tuple[Response, int]]:
    """Readiness: the :mod:`.health` checks as JSON, ``200`` healthy, ``503`` not."""

    def silo_health() -> tuple[Response, int]:
        answer = health.check(state())
        response = jsonify(answer.to_dict())
        response.headers["Cache-Control"] = "no-store"
        return response, 200 if answer.healthy else 503

    return silo_health


def metrics_view(state: Callable[[], SiloApp]) -> Callable[[], Response]:
    """The app's metrics in Prometheus' text format (``SILO_METRICS`` must be on)."""

    def silo_metrics() -> Response:
        meter = METERS.get(state().store)
        if meter is None:
            raise RuntimeError(
                "silo.metrics_view(): metrics are off for this app: set SILO_METRICS = True "
                "(and install flask-silo-sql[prometheus])"
            )
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(meter.registry), content_type=CONTENT_TYPE_LATEST)

    return silo_metrics
