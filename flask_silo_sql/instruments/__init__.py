"""The instruments: spans and metrics, and the seams that feed them.

Each part is optional and costs nothing when absent: :mod:`.spans` needs
``opentelemetry-api`` (the ``otel`` extra), :mod:`.metrics` needs
``prometheus-client`` (the ``prometheus`` extra) and ``SILO_METRICS``;
:mod:`.seams` holds the decorators the store, the file stores and the tasks
wear. What an app serves from them (its health check, its scrape, its request
hooks) is :mod:`flask_silo_sql.probes`.
"""
