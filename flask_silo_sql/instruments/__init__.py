"""What operators see from outside: spans, metrics and a health check.

Each part is optional and costs nothing when absent: :mod:`.spans` needs
``opentelemetry-api`` (the ``otel`` extra), :mod:`.metrics` needs
``prometheus-client`` (the ``prometheus`` extra) and ``SILO_METRICS``;
:mod:`.health` needs nothing. :mod:`.hooks` holds the few seams the rest of
the package calls.
"""
