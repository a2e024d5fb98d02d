"""What an app shows its operators: a health check, its metrics and request spans.

:mod:`.health` answers readiness (``flask silo-db health``, ``silo.health_view()``);
:mod:`.views` serves it and the Prometheus scrape; :mod:`.gauges` reads the database
when Prometheus scrapes; :mod:`.hooks` installs an app's request metrics and spans.
The instruments they feed (spans, counters, the decorators the store, files and tasks
wear) are :mod:`flask_silo_sql.instruments`, below everything here.
"""
