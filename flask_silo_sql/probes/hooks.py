"""An app's request hooks: its metrics and its request spans (see :mod:`.seams` for
the decorators on the units of work)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, Response, g, request

from ..instruments import spans
from ..instruments.metrics import Metrics, outcome, registry_for
from ..instruments.seams import METERS
from ..sids import tag
from .gauges import DatabaseGauges

if TYPE_CHECKING:
    from ..app_state import SiloApp

REQUEST_SPAN = "_silo_request_span"


def install(app: Flask, state: SiloApp, api_prefix: str) -> None:
    """Metrics (when ``SILO_METRICS`` asks) and request spans for *app*."""
    registry = registry_for(state.settings.metrics)
    meter = None if registry is None else Metrics(registry)
    if meter is not None and registry is not None:
        registry.register(DatabaseGauges(state.store))
        METERS[state.store] = meter
    if not spans.AVAILABLE and meter is None:
        return

    def begin() -> None:
        if request.path.startswith(api_prefix) and spans.on():
            rule = request.url_rule
            current = spans.start(
                "silo.request",
                {
                    "http.request.method": request.method,
                    "http.route": rule.rule if rule is not None else "",
                },
            )
            setattr(g, REQUEST_SPAN, (current, spans.activate(current)))

    def answered(response: Response) -> Response:
        if request.path.startswith(api_prefix):
            status = response.status_code
            if meter is not None:
                meter.requests.labels(outcome(status)).inc()
            held = g.get(REQUEST_SPAN)
            if held is not None and held[0].is_recording():
                held[0].set_attribute("http.response.status_code", status)
                held[0].set_attribute("silo.outcome", outcome(status))
                sid = g.get("silo_sid")
                if sid:
                    held[0].set_attribute("silo.session", tag(sid))
        return response

    def end(exc: BaseException | None) -> None:
        held = g.pop(REQUEST_SPAN, None)
        if held is not None:
            current, token = held
            if exc is not None:
                spans.failed(current, exc)
            spans.deactivate(token)
            current.end()

    app.before_request_funcs.setdefault(None, []).insert(0, begin)  # before silo's hooks
    # after_request functions run last-registered first: first in the list runs last,
    # after silo's commit has turned a refused write into its error answer.
    app.after_request_funcs.setdefault(None, []).insert(0, answered)
    app.teardown_request(end)
