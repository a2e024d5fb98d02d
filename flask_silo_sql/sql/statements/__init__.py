"""Every statement the SQL backend runs, built with SQLAlchemy Core and compiled once.

One module per feature, each a small class that builds that feature's statements from a
:class:`~.kit.Kit` (one engine's dialect): :mod:`.session` (sessions and namespaces),
:mod:`.sweep` (expiry), :mod:`.task` (task rows), :mod:`.queue` (claims of durable runs
and the processes that make them), :mod:`.keys` (idempotency keys). :class:`Statements` is
the aggregate a store compiles once per engine; its statements are its attributes
(``st.touch``), so the row code (``sql/sessions.py``, ``sql/task_rows.py``, ...) names a
statement, never its group. The statements sit apart from the row code, which reaches
them through :class:`~flask_silo_sql.sql.context.Context`: beside it, they would close
an import circle (row code -> context -> statements -> row code). Each statement is a
:class:`~flask_silo_sql.sql.executor.Prepared`, which either executor sends as it is;
:class:`~.kit.Values` converts what goes in and comes out.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    Integer,
    LargeBinary,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    null,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.sql import ColumnElement

from ..executor import Prepared
from ..models import expired_sids, file_chunks, files, namespaces, sessions, tasks, workers
from .keys import KeyStatements
from .kit import Kit, Values, ts
from .queue import QueueStatements
from .session import CHILD_TABLES, SessionStatements
from .sweep import SweepStatements
from .task import NOTIFY_CHANNEL, WAITING, TaskStatements, live_task

__all__ = [
    "CHILD_TABLES",
    "NOTIFY_CHANNEL",
    "PENDING_PREFIX",
    "RETIRED_PREFIX",
    "WAITING",
    "Statements",
    "Values",
    "live_task",
]

PENDING_PREFIX = ".silo-upload-"
"""``silo_files.filename`` of an upload in progress (no stored name can start so)."""
RETIRED_PREFIX = PENDING_PREFIX + "retired-"
"""A replaced version kept for the downloads that began before: in no listing, no quota."""


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
        self._files(kit)

    def _files(self, k: Kit) -> None:
        """Files: their rows, chunks, reads and forgetting."""
        prepare = k.prepare
        insert = k.insert
        in_list = k.in_list
        sid = k.sid
        now = k.now
        postgresql = k.postgresql
        # -- file rows ------------------------------------------------------------
        # A row whose filename starts with PENDING_PREFIX is an upload in progress:
        # it reserves the bytes received so far against the session's quota (and owns
        # the chunks of the database backend) until the request's commit renames it.
        store = bindparam("store", type_=String(255))
        filename = bindparam("filename", type_=String(255))
        file_id = bindparam("id", type_=BigInteger())
        committed = ~files.c.filename.startswith(PENDING_PREFIX, autoescape=True)
        pending = files.c.filename.startswith(PENDING_PREFIX, autoescape=True)
        row_columns = (
            files.c.id,
            files.c.sid,
            files.c.filename,
            files.c.size_bytes,
            files.c.sha256,
            files.c.content_type,
            files.c.created_at,
            files.c.backend,
            files.c.host,
            files.c.location,
        )
        file_values = {
            "sid": sid,
            "store": store,
            "filename": filename,
            "size_bytes": bindparam("size_bytes", type_=BigInteger()),
            "sha256": bindparam("sha256", type_=String(64)),
            "content_type": bindparam("content_type", type_=String(255)),
            "created_at": now,
            "backend": bindparam("backend", type_=String(16)),
            "host": bindparam("host", type_=String(255)),
            "location": bindparam("location", type_=String(1024)),
        }
        file_row = insert(files).from_select(
            list(file_values),
            select(*file_values.values()).where(exists().where(sessions.c.sid == sid)),
        )
        self.upsert_file = prepare(
            "upsert_file",
            file_row.on_conflict_do_update(
                index_elements=[files.c.sid, files.c.store, files.c.filename],
                set_={
                    c: getattr(file_row.excluded, c)
                    for c in (
                        "size_bytes",
                        "sha256",
                        "content_type",
                        "created_at",
                        "backend",
                        "host",
                        "location",
                    )
                },
            ),
        )

        # Quotas: the bytes of the session's other files in this store (the version
        # an upload replaces excluded), read in the statement that reserves, so two
        # uploads never both take the last bytes (PostgreSQL: under the session row's
        # lock, taken first; SQLite: one writer at a time).
        other = files.alias("other")
        quota = bindparam("quota", type_=BigInteger())
        others = (
            select(func.coalesce(func.sum(other.c.size_bytes), 0))
            .where(
                other.c.store == store,
                other.c.sid == sid,
                other.c.filename != filename,
                ~other.c.filename.startswith(RETIRED_PREFIX, autoescape=True),
                other.c.id != bindparam("self_id", type_=BigInteger()),
            )
            .scalar_subquery()
        )
        room = quota - others
        target = bindparam("target", type_=BigInteger())
        needed = bindparam("needed", type_=BigInteger())
        reserve = case((target <= room, target), else_=room)
        self.lock_session_row = (
            prepare(
                "lock_session_row",
                select(literal(1)).where(sessions.c.sid == sid).with_for_update(),
            )
            if postgresql
            else None
        )
        begin_values = {
            **file_values,
            "filename": bindparam("pending_name", type_=String(255)),
            "size_bytes": reserve,
            "sha256": literal("", String(64)),
            "content_type": cast(null(), String(255)),
        }
        self.begin_upload = prepare(
            "begin_upload",
            insert(files)
            .from_select(
                list(begin_values),
                select(*begin_values.values()).where(
                    exists().where(sessions.c.sid == sid), needed <= room
                ),
            )
            .returning(files.c.id, files.c.size_bytes),
        )
        self.reserve_upload = prepare(
            "reserve_upload",
            update(files)
            .where(files.c.id == file_id, needed <= room)
            .values(size_bytes=reserve, created_at=now)
            .returning(files.c.size_bytes),
        )
        self.upload_alive = prepare(
            "upload_alive", select(files.c.sid).where(files.c.id == file_id)
        )
        self.stale_uploads = prepare(
            "stale_uploads",
            select(
                files.c.id, files.c.filename, files.c.backend, files.c.host, files.c.location
            ).where(
                files.c.store == store,
                files.c.sid == sid,
                pending,
                files.c.created_at < ts("stale_before"),
            ),
        )
        self.finish_upload = prepare(
            "finish_upload",
            update(files)
            .where(files.c.id == file_id)
            .values(
                filename=filename,
                size_bytes=bindparam("size_bytes", type_=BigInteger()),
                sha256=bindparam("sha256", type_=String(64)),
                content_type=bindparam("content_type", type_=String(255)),
                created_at=now,
            ),
        )
        same_name = and_(
            files.c.store == store,
            files.c.sid == sid,
            files.c.filename == filename,
            files.c.id != file_id,
        )
        self.delete_replaced_chunks = prepare(
            "delete_replaced_chunks",
            delete(file_chunks).where(
                file_chunks.c.file_id.in_(select(files.c.id).where(same_name))
            ),
        )
        self.delete_replaced = prepare(
            "delete_replaced",
            delete(files).where(same_name).returning(files.c.backend, files.c.location),
        )
        # A replaced database/fsspec version leaves sight but keeps its id, hash, chunks
        # and object, for the downloads that began before (forget_retired removes it).
        self.retire_replaced = prepare(
            "retire_replaced",
            update(files)
            .where(same_name)
            .values(filename=bindparam("retired_name", type_=String(255)), created_at=now),
        )
        self.delete_file_chunks = prepare(
            "delete_file_chunks", delete(file_chunks).where(file_chunks.c.file_id == file_id)
        )
        self.delete_file_id = prepare(
            "delete_file_id",
            delete(files).where(files.c.id == file_id).returning(files.c.backend, files.c.location),
        )
        seen: Any = bindparam("seen")  # a created_at exactly as the driver returned it
        self.delete_file_id_unchanged = prepare(
            "delete_file_id_unchanged",
            delete(files)
            .where(files.c.id == file_id, files.c.created_at == seen)
            .returning(files.c.backend, files.c.location),
        )
        self.file_by_id = prepare("file_by_id", select(*row_columns).where(files.c.id == file_id))
        self.session_pending_rows = prepare(
            "session_pending_rows",
            select(*row_columns).where(
                files.c.store == store,
                files.c.sid == sid,
                pending,
                ~files.c.filename.startswith(RETIRED_PREFIX, autoescape=True),
            ),
        )

        # -- chunks of the database backend -----------------------------------------------
        seq = bindparam("seq", type_=Integer())
        self.put_chunk = prepare(
            "put_chunk",
            insert(file_chunks).values(
                file_id=file_id, seq=seq, data=bindparam("data", type_=LargeBinary())
            ),
        )
        # A chunk's commit need not wait for its WAL flush: the file's row, committed
        # synchronously after every chunk, flushes the WAL up to itself, chunks included.
        self.chunk_commit_async = (
            prepare("chunk_commit_async", text("SET LOCAL synchronous_commit TO OFF"))
            if postgresql
            else None
        )
        # A chunk of the version read: SQLite may give a new row the id of a row just
        # deleted, so the id alone could name another version of the file.
        self.read_chunk = prepare(
            "read_chunk",
            select(file_chunks.c.data)
            .join(files, files.c.id == file_chunks.c.file_id)
            .where(
                file_chunks.c.file_id == file_id,
                file_chunks.c.seq == seq,
                files.c.sha256 == bindparam("sha256", type_=String(64)),
            ),
            binary=True,
        )
        self.chunk_sizes = prepare(
            "chunk_sizes",
            select(file_chunks.c.seq, func.length(file_chunks.c.data))
            .where(file_chunks.c.file_id == file_id)
            .order_by(file_chunks.c.seq),
        )
        self.orphan_chunks = prepare(
            "orphan_chunks",
            select(file_chunks.c.file_id)
            .where(~exists().where(files.c.id == file_chunks.c.file_id))
            .distinct(),
        )

        # -- reading rows -----------------------------------------------------------------
        self.file_names = prepare(
            "file_names",
            select(files.c.filename)
            .where(files.c.store == store, files.c.sid == sid, committed)
            .order_by(files.c.filename),
        )
        self.file_row = prepare(
            "file_row",
            select(*row_columns).where(
                files.c.store == store, files.c.sid == sid, files.c.filename == filename
            ),
        )
        self.session_file_rows = prepare(
            "session_file_rows",
            select(*row_columns)
            .where(files.c.store == store, files.c.sid == sid, committed)
            .order_by(files.c.filename),
        )
        total = func.coalesce(func.sum(files.c.size_bytes), 0)
        self.store_bytes = prepare("store_bytes", select(total).where(files.c.store == store))
        self.all_file_bytes = prepare("all_file_bytes", select(total))
        self.store_file_rows = prepare(
            "store_file_rows",
            select(*row_columns).where(files.c.store == store).order_by(files.c.id),
        )
        self.rows_of_sessions = prepare(
            "rows_of_sessions",
            select(files.c.sid, files.c.filename, files.c.sha256).where(
                files.c.store == store, in_list(files.c.sid, "sids"), committed
            ),
        )
        self.live_sessions = prepare(
            "live_sessions", select(sessions.c.sid).where(in_list(sessions.c.sid, "sids"))
        )
        self.expired_among = prepare(
            "expired_among", select(expired_sids.c.sid).where(in_list(expired_sids.c.sid, "sids"))
        )

        # -- forgetting rows (their chunks first) ------------------------------------------
        def forgetting(name: str, *where: ColumnElement[bool]) -> tuple[Prepared, Prepared]:
            return (
                prepare(
                    f"{name}_chunks",
                    delete(file_chunks).where(
                        file_chunks.c.file_id.in_(select(files.c.id).where(*where))
                    ),
                ),
                prepare(
                    name,
                    delete(files)
                    .where(*where)
                    .returning(files.c.sid, files.c.filename, files.c.backend, files.c.location),
                ),
            )

        self.forget_file = forgetting(
            "forget_file", files.c.store == store, files.c.sid == sid, files.c.filename == filename
        )
        self.forget_session_files = forgetting(
            "forget_session_files", files.c.store == store, files.c.sid == sid
        )
        self.forget_retired = forgetting(
            "forget_retired",
            files.c.store == store,
            files.c.filename.startswith(RETIRED_PREFIX, autoescape=True),
            files.c.created_at < ts("before"),
        )
        self.forget_store_files = forgetting("forget_store_files", files.c.store == store)
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
