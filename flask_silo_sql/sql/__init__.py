"""The SQL backend: sessions, namespaces, expired SIDs, files and tasks in SQL tables.

One concept per module: :mod:`.engine` (URLs and connection settings),
:mod:`.models` (the tables), :mod:`.schema` (Alembic; the migrations are the
project's top-level ``migrations/``, ``flask_silo_sql/migrations`` when installed),
:mod:`.kit` (what statements are built from), :mod:`.statements` (the aggregate of
every feature's statements, compiled once),
:mod:`.executor` (how they reach the database, one connection per request),
:mod:`.clock` (the database's clock), :mod:`.sessions` (load and guarded
write), :mod:`.unit` (a request's unit of work), :mod:`.sweep` (expiry),
:mod:`.task_rows`, :mod:`.file_rows`, and :mod:`.backend` behind the
:class:`SQLStorage` façade (:mod:`.storage`).
"""

from .storage import SQLStorage

__all__ = ["SQLStorage"]
