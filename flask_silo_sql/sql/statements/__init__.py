"""Every statement the SQL backend runs, built with SQLAlchemy Core and compiled once.

One module per feature, each a small class that builds that feature's statements from a
:class:`~.kit.Kit` (one engine's dialect): :mod:`.session` (sessions and namespaces),
:mod:`.sweep` (expiry), :mod:`.task` (task rows), :mod:`.queue` (claims of durable runs
and the processes that make them), :mod:`.keys` (idempotency keys), :mod:`.events`
(session events and stream tokens, reached as ``st.events.<name>``). :class:`Statements` is
the aggregate a store compiles once per engine; its statements are its attributes
(``st.touch``), so the row code (``sql/sessions.py``, ``sql/task_rows.py``, ...) names a
statement, never its group. The statements sit apart from the row code, which reaches
them through :class:`~flask_silo_sql.sql.context.Context`: beside it, they would close
an import circle (row code -> context -> statements -> row code). Each statement is a
:class:`~flask_silo_sql.sql.executor.Prepared`, which either executor sends as it is;
:class:`~.kit.Values` converts what goes in and comes out.
"""

from __future__ import annotations

from sqlalchemy import Engine, String, bindparam, func, select, text
from sqlalchemy.dialects import postgresql as pg

from ..models import (
    expired_sids,
    file_chunks,
    files,
    namespaces,
    sessions,
    tasks,
    workers,
)
from .events import EVENT_CHANNEL, EventStatements
from .file import FileStatements
from .keys import KeyStatements
from .kit import Kit, Values
from .queue import QueueStatements
from .session import CHILD_TABLES, SessionStatements
from .sweep import SweepStatements
from .task import NOTIFY_CHANNEL, TaskStatements, live_task

__all__ = [
    "CHILD_TABLES",
    "EVENT_CHANNEL",
    "NOTIFY_CHANNEL",
    "Statements",
    "Values",
    "live_task",
]



class Statements(
    SessionStatements, SweepStatements, TaskStatements, QueueStatements, KeyStatements
):
    """The compiled statements for one engine (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        kit = Kit(engine)
        self.values = kit.values
        SessionStatements.__init__(self, kit)
        SweepStatements.__init__(self, kit)
        TaskStatements.__init__(self, kit)
        QueueStatements.__init__(self, kit)
        KeyStatements.__init__(self, kit)
        self.files = FileStatements(kit)
        self.events = EventStatements(kit)
        self._counts(kit)

    def _counts(self, k: Kit) -> None:
        """Row counts, and on PostgreSQL each table's size, for ``flask silo-db stats``."""
        prepare = k.prepare
        postgresql = k.postgresql
        self.count_rows = {
            table.name: prepare(f"count_{table.name}", select(func.count()).select_from(table))
            for table in (sessions, namespaces, expired_sids, files, file_chunks, tasks, workers)
        }
        # PostgreSQL: each silo table's size on disk and its dead rows, for operators
        # watching bloat (``flask silo-db stats``). Sizes include TOAST; indexes apart.
        self.table_health = (
            prepare(
                "table_health",
                text(
                    "SELECT s.relname, pg_table_size(s.relid), pg_indexes_size(s.relid),"
                    " s.n_live_tup, s.n_dead_tup, s.n_tup_upd, s.n_tup_hot_upd,"
                    " greatest(s.last_vacuum, s.last_autovacuum)"
                    " FROM pg_stat_user_tables s"
                    " WHERE s.relid IN (SELECT c.oid FROM pg_class c"
                    " WHERE c.relname = ANY(:names) AND pg_table_is_visible(c.oid))"
                    " ORDER BY s.relname"
                ).bindparams(bindparam("names", type_=pg.ARRAY(String()))),
            )
            if postgresql
            else None
        )
