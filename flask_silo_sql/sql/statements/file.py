"""The statements on ``silo_files`` and ``silo_file_chunks`` (``Statements.files``),
compiled once per engine, beside the row code that runs them (:mod:`.file_rows`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
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
from sqlalchemy.sql import ColumnElement

from ...files.limits import RETIRED_PREFIX, TEMP_PREFIX
from ..executor import Prepared
from ..models import expired_sids, file_chunks, files, sessions
from .kit import Kit, ts


class FileStatements:
    """The compiled statements on ``silo_files`` and ``silo_file_chunks`` for one engine
    (``Statements.files``). A row whose filename starts with :data:`TEMP_PREFIX` is an
    upload in progress: it reserves the bytes received so far against the session's
    quota (and owns the chunks of the database backend) until the request's commit
    renames it."""

    def __init__(self, kit: Kit) -> None:
        self._kit = kit
        self._in_list = kit.in_list
        self._postgresql = kit.postgresql
        self._insert = kit.insert
        self._sid = kit.sid
        self._store = bindparam("store", type_=String(255))
        self._filename = bindparam("filename", type_=String(255))
        self._file_id = bindparam("id", type_=BigInteger())
        self._now = kit.now
        self._committed = ~files.c.filename.startswith(TEMP_PREFIX, autoescape=True)
        self._pending = files.c.filename.startswith(TEMP_PREFIX, autoescape=True)
        self._row_columns = (
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
        self._uploads()
        self._replacing()
        self._by_id()
        self._chunks()
        self._reading()
        self._forgetting()

    def _prepare(self, name: str, statement: Any, *, binary: bool = False) -> Prepared:
        return self._kit.prepare(name, statement, binary=binary)

    def _quota_room(self) -> tuple[Any, Any, Any]:
        """``(needed, room, reserve)``. Quotas: the bytes of the session's other files in
        this store (the version an upload replaces excluded), read in the statement that
        reserves, so two uploads never both take the last bytes (PostgreSQL: under the
        session row's lock, taken first; SQLite: one writer at a time)."""
        other = files.alias("other")
        others = (
            select(func.coalesce(func.sum(other.c.size_bytes), 0))
            .where(
                other.c.store == self._store,
                other.c.sid == self._sid,
                other.c.filename != self._filename,
                ~other.c.filename.startswith(RETIRED_PREFIX, autoescape=True),
                other.c.id != bindparam("self_id", type_=BigInteger()),
            )
            .scalar_subquery()
        )
        room = bindparam("quota", type_=BigInteger()) - others
        target = bindparam("target", type_=BigInteger())
        needed = bindparam("needed", type_=BigInteger())
        return needed, room, case((target <= room, target), else_=room)

    def _uploads(self) -> None:
        """An upload's pending row: begun, reserving as it grows, alive, stale."""
        sid, store, file_id, prepare = self._sid, self._store, self._file_id, self._prepare
        needed, room, reserve = self._quota_room()
        self.lock_session_row = (
            prepare(
                "lock_session_row",
                select(literal(1)).where(sessions.c.sid == sid).with_for_update(),
            )
            if self._postgresql
            else None
        )
        begin_values = {
            "sid": sid,
            "store": store,
            "filename": bindparam("pending_name", type_=String(255)),
            "size_bytes": reserve,
            "sha256": literal("", String(64)),
            "content_type": cast(null(), String(255)),
            "created_at": self._now,
            "backend": bindparam("backend", type_=String(16)),
            "host": bindparam("host", type_=String(255)),
            "location": bindparam("location", type_=String(1024)),
        }
        self.begin_upload = prepare(
            "begin_upload",
            self._insert(files)
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
            .values(size_bytes=reserve, created_at=self._now)
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
                self._pending,
                files.c.created_at < ts("stale_before"),
            ),
        )

    def _replacing(self) -> None:
        """The commit of an upload: its row renamed, the version it replaces deleted or
        retired."""
        prepare, file_id = self._prepare, self._file_id
        # Still the session's: a rotation that moved its pending row meanwhile took the
        # directory, not bytes written after it into a directory made anew.
        self.finish_upload = prepare(
            "finish_upload",
            update(files)
            .where(files.c.id == file_id, files.c.sid == self._sid)
            .values(
                filename=self._filename,
                size_bytes=bindparam("size_bytes", type_=BigInteger()),
                sha256=bindparam("sha256", type_=String(64)),
                content_type=bindparam("content_type", type_=String(255)),
                created_at=self._now,
            ),
        )
        same_name = and_(
            files.c.store == self._store,
            files.c.sid == self._sid,
            files.c.filename == self._filename,
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
            .values(filename=bindparam("retired_name", type_=String(255)), created_at=self._now),
        )

    def _by_id(self) -> None:
        """One row by its id: read, or deleted (its chunks first)."""
        prepare, file_id = self._prepare, self._file_id
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
        self.file_by_id = prepare(
            "file_by_id", select(*self._row_columns).where(files.c.id == file_id)
        )

    def _chunks(self) -> None:
        """The chunks of the database backend."""
        prepare, file_id = self._prepare, self._file_id
        seq = bindparam("seq", type_=Integer())
        self.put_chunk = prepare(
            "put_chunk",
            self._insert(file_chunks).values(
                file_id=file_id, seq=seq, data=bindparam("data", type_=LargeBinary())
            ),
        )
        # A chunk's commit need not wait for its WAL flush: the file's row, committed
        # synchronously after every chunk, flushes the WAL up to itself, chunks included.
        self.chunk_commit_async = (
            prepare("chunk_commit_async", text("SET LOCAL synchronous_commit TO OFF"))
            if self._postgresql
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

    def _reading(self) -> None:
        """Rows read: a session's, a store's, their sizes, which sessions still live."""
        prepare, store, sid, in_list = self._prepare, self._store, self._sid, self._in_list
        columns, committed = self._row_columns, self._committed
        of_session = (files.c.store == store, files.c.sid == sid)
        self.file_names = prepare(
            "file_names",
            select(files.c.filename).where(*of_session, committed).order_by(files.c.filename),
        )
        self.file_row = prepare(
            "file_row", select(*columns).where(*of_session, files.c.filename == self._filename)
        )
        self.session_file_rows = prepare(
            "session_file_rows",
            select(*columns).where(*of_session, committed).order_by(files.c.filename),
        )
        self.session_pending_rows = prepare(
            "session_pending_rows",
            select(*columns).where(
                *of_session,
                self._pending,
                ~files.c.filename.startswith(RETIRED_PREFIX, autoescape=True),
            ),
        )
        total = func.coalesce(func.sum(files.c.size_bytes), 0)
        self.store_bytes = prepare("store_bytes", select(total).where(files.c.store == store))
        self.all_file_bytes = prepare("all_file_bytes", select(total))
        self.store_file_rows = prepare(
            "store_file_rows",
            select(*columns).where(files.c.store == store).order_by(files.c.id),
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

    def _forgotten(self, name: str, *where: ColumnElement[bool]) -> tuple[Prepared, Prepared]:
        """Rows deleted (their chunks first), returning what they named."""
        return (
            self._prepare(
                f"{name}_chunks",
                delete(file_chunks).where(
                    file_chunks.c.file_id.in_(select(files.c.id).where(*where))
                ),
            ),
            self._prepare(
                name,
                delete(files)
                .where(*where)
                .returning(files.c.sid, files.c.filename, files.c.backend, files.c.location),
            ),
        )

    def _forgetting(self) -> None:
        """A file, a session's files, retired versions, a store's files: forgotten."""
        store, sid = self._store, self._sid
        self.forget_file = self._forgotten(
            "forget_file",
            files.c.store == store,
            files.c.sid == sid,
            files.c.filename == self._filename,
        )
        self.forget_session_files = self._forgotten(
            "forget_session_files", files.c.store == store, files.c.sid == sid
        )
        self.forget_retired = self._forgotten(
            "forget_retired",
            files.c.store == store,
            files.c.filename.startswith(RETIRED_PREFIX, autoescape=True),
            files.c.created_at < ts("before"),
        )
        self.forget_store_files = self._forgotten("forget_store_files", files.c.store == store)
