"""What operators see from outside: spans, metrics and a health check.

Each part is optional and costs nothing when absent: :mod:`.spans` needs
``opentelemetry-api`` (the ``otel`` extra), :mod:`.metrics` needs
``prometheus-client`` (the ``prometheus`` extra) and ``SILO_METRICS``;
:mod:`.health` needs nothing. :mod:`.seams` holds the decorators the store,
the file stores and the tasks wear; :mod:`.hooks` an app's request hooks.
"""
