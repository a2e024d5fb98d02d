"""File rows in ``silo_files`` and chunks in ``silo_file_chunks``: SQL's
:class:`~flask_silo_sql.files.FileRecords`.

An upload begins with a *pending* row (its name starts with
``.silo-upload-``), written in a short transaction that creates the session if
needed; the row reserves the bytes received so far against the session's
quota, in the statement that checks it (on PostgreSQL under the session row's
lock), so concurrent uploads cannot both take the last bytes. The ``database``
backend's chunks hang off that row. The request's commit, with the session
locked, swaps the rows in one transaction: the pending row becomes the file's
row and the version it replaces leaves sight (a request that fails deletes the
pending row; its chunks cascade). Until that commit, readers see the previous
version whole. For ``database`` and fsspec the replaced row is *retired*
(renamed ``.silo-upload-retired-...``, out of every listing and quota) with
its chunks or object, so a download that began before reads on to its end;
:meth:`SQLFileRecords.forget_retired` removes it an hour later. For
``local``, which moves the bytes under their name before the commit, the
committed row's version is kept aside (a link named after that row, where its
readers look first) until the commit, after which it is unlinked: a reader
that opened it keeps its descriptor.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from ..errors import (
    FileTooLarge,
    SessionExpired,
    SiloError,
    StorageUnavailable,
    UploadInterrupted,
)
from ..files.body import Piece
from ..files.limits import RETIRED_PREFIX, STALE_UPLOAD_S, UNLIMITED
from ..files.locks import directory_lock
from ..files.recorded import Recorded
from ..files.rows import FileRow, Reservation
from ..files.staging import StagedUpload
from ..logs import silo_logger
from . import sessions as ops
from .context import Context
from .executor import Executor

if TYPE_CHECKING:
    from ..files.catalog import CatalogStore

logger = silo_logger("flask_silo_sql.files")


class StagedFile:
    """An upload whose row is written with the request's commit."""

    locks_session = True

    def __init__(self, records: SQLFileRecords, upload: StagedUpload) -> None:
        self.records = records
        self.upload = upload
        self.directory: str | None = upload.directory

    def write(self, ex: Executor, now: float) -> None:
        self.records.finish(ex, self.upload, now)

    def committed(self) -> None:
        self.upload.keep()

    def discard(self) -> None:
        self.records.undo(self.upload)


def _lock(directory: str | None) -> AbstractContextManager[int | None]:
    return directory_lock(directory) if directory is not None else nullcontext()


class SQLFileRecords:
    """The rows of one file store."""

    __slots__ = ("_b", "database_dir", "store")

    def __init__(self, ctx: Context, store: str) -> None:
        self._b = ctx
        self.store = store
        url = ctx.connector.engine.url
        database = url.database if url.get_backend_name() == "sqlite" else None
        self.database_dir: str | None = (
            os.path.dirname(os.path.abspath(database))
            if database and database != ":memory:"
            else None
        )

    def now(self) -> float:
        return self._b.now()

    def catalog(self, store: CatalogStore) -> Recorded:
        """A store with rows knows its files from them."""
        return Recorded(store, self)

    def _key(self, sid: str, filename: str) -> dict[str, Any]:
        return {"store": self.store, "sid": sid, "filename": filename}

    def _row(self, found: Any) -> FileRow:
        file_id, sid, name, size, sha, content_type, created, backend, host, location = found
        return FileRow(
            sid,
            name,
            int(size),
            sha,
            content_type,
            id=int(file_id),
            created_at=self._b.st.values.unix(created),
            backend=backend,
            host=host,
            location=location,
            seen=created,
        )

    # -- an upload -------------------------------------------------------------------------

    def begin(
        self, row: FileRow, *, pending_name: str, reserve: int, quota: int | None
    ) -> Reservation:
        b = self._b
        st = b.st
        v = st.values
        unit = b.current_unit(row.sid)
        since = unit.since if unit is not None else None
        now = b.now()
        with b.connector.transaction() as ex:
            created, _ = ops.lock(ex, st, row.sid, b.times(now, since=since), existed=None)
            stale = self._forget_stale(ex, row.sid, now)
            values = {
                **self._key(row.sid, row.filename),
                "pending_name": pending_name,
                "now": v.time(now),
                "backend": row.backend,
                "host": row.host,
                "location": row.location,
                "needed": reserve,
                "target": reserve,
                "quota": UNLIMITED if quota is None else quota,
                "self_id": -1,
            }
            found = ex.run(st.files.begin_upload, values).first()
        if created:
            b.policy.created(row.sid)
        if found is None:
            raise FileTooLarge(row.filename, reserve, quota if quota is not None else 0)
        return Reservation(int(found[0]), int(found[1]), stale)

    def _forget_stale(self, ex: Executor, sid: str, now: float) -> list[FileRow]:
        """In the open transaction: pending rows of the session's dead uploads go."""
        st = self._b.st
        values = {
            "store": self.store,
            "sid": sid,
            "stale_before": st.values.time(now - STALE_UPLOAD_S),
        }
        rows = ex.run(st.files.stale_uploads, values).rows
        stale = []
        for file_id, name, backend, host, location in rows:
            ex.run(st.files.delete_file_chunks, {"id": file_id})
            ex.run(st.files.delete_file_id, {"id": file_id})
            stale.append(
                FileRow(sid, name, 0, "", id=file_id, backend=backend, host=host, location=location)
            )
        return stale

    def reserve(
        self, upload: Reservation, row: FileRow, *, needed: int, target: int, quota: int | None
    ) -> None:
        b = self._b
        st = b.st
        values = {
            **self._key(row.sid, row.filename),
            "id": upload.id,
            "self_id": upload.id,
            "needed": needed,
            "target": target,
            "quota": UNLIMITED if quota is None else quota,
            "now": st.values.time(b.now()),
        }
        alive: Any = True
        with b.connector.transaction() as ex:
            lock = st.files.lock_session_row if quota is not None else None
            if lock is not None:  # one reservation at a time per session (PostgreSQL; a
                ex.run(lock, {"sid": row.sid})  # gone session has no pending row: see below)
            got = ex.run(st.files.reserve_upload, values).first()
            if got is None:
                alive = ex.run(st.files.upload_alive, {"id": upload.id}).first()
        if got is None:
            if alive is None:
                raise self._gone(row)
            limit = quota if quota is not None else 0
            raise FileTooLarge(row.filename, needed, limit)
        upload.reserved = int(got[0])

    def interrupted(self, row: FileRow) -> SiloError | None:
        if self._holder(row.id) == row.sid:
            return None
        return self._gone(row)

    def _holder(self, file_id: int | None) -> str | None:
        """The SID holding a pending row now (None: it is gone)."""
        b = self._b
        with b.connector.executor() as ex:
            found = ex.run(b.st.files.upload_alive, {"id": file_id}).first()
        return None if found is None else str(found[0])

    def _gone(self, row: FileRow) -> SiloError:
        """The error for an upload whose pending row vanished: its session expired, or the
        row was removed as a dead upload's."""
        b = self._b
        with b.connector.executor() as ex:
            exists = ex.run(b.st.has_session, {"sid": row.sid}).first() is not None
        return UploadInterrupted(row.filename) if exists else SessionExpired(row.sid)

    def put_chunk(self, row: FileRow, file_id: int, seq: int, data: Piece) -> None:
        b = self._b
        st = b.st
        try:
            with b.connector.executor() as ex:
                alone = not ex.in_transaction  # else the request's own (locking mode)
                with ex.transaction():
                    if alone and st.files.chunk_commit_async is not None:
                        ex.run(st.files.chunk_commit_async, {})
                    ex.run(st.files.put_chunk, {"id": file_id, "seq": seq, "data": data})
        except StorageUnavailable:
            with b.connector.executor() as ex:  # the pending row gone (a foreign key failed)?
                alive = ex.run(b.st.files.upload_alive, {"id": file_id}).first()
            if alive is None:
                raise self._gone(row) from None
            raise

    def read_chunk(self, file_id: int, seq: int, sha256: str) -> bytes | None:
        b = self._b
        values = {"id": file_id, "seq": seq, "sha256": sha256}
        with b.connector.executor() as ex:
            found = ex.run(b.st.files.read_chunk, values).first()
        return None if found is None else bytes(found[0])

    def chunk_sizes(self, file_id: int) -> list[tuple[int, int]]:
        b = self._b
        with b.connector.executor() as ex:
            rows = ex.run(b.st.files.chunk_sizes, {"id": file_id}).rows
        return [(int(seq), int(size)) for seq, size in rows]

    def stage(self, upload: StagedUpload) -> None:
        b = self._b
        row = upload.row
        unit = b.current_unit(row.sid)
        try:
            self._install(upload)
        except FileNotFoundError:
            # Its temporary file went with its session's directory (a reset, an expiry).
            self.undo(upload)
            raise self._gone(row) from None
        except BaseException:
            self.undo(upload)
            raise
        if unit is not None:
            unit.stage(StagedFile(self, upload))
            return
        try:  # outside a request: the row now (gone with its session if that went)
            with _lock(upload.directory), b.connector.transaction() as ex:
                if b.st.files.lock_session_row is not None:  # one swap of the name at a time
                    ex.run(b.st.files.lock_session_row, {"sid": row.sid})
                self.finish(ex, upload, b.now())
        except BaseException:
            self.undo(upload)
            raise
        upload.keep()

    def _install(self, upload: StagedUpload) -> None:
        """Before the commit. ``local``, holding the directory lock: the new bytes move in
        under the name, the committed row's version kept aside for its readers (its row
        stays until the commit swaps it)."""
        if not upload.replaces_early:
            upload.install()
            return
        row = upload.row
        directory = upload.directory
        assert directory is not None
        with directory_lock(directory):
            upload.install(self.row(row.sid, row.filename))

    def finish(self, ex: Executor, upload: StagedUpload, now: float) -> None:
        """In the open transaction, the session locked: the upload's row, if its bytes are
        still its own (``local``: else a later upload's row wins, with its bytes), takes
        the place of the version it replaces. That version's row goes (``local``: its
        bytes kept aside go after the commit) or, for ``database`` and fsspec, is retired:
        renamed out of sight with its chunks or object, which downloads that began before
        still read, until :meth:`forget_retired`."""
        st = self._b.st
        row = upload.row
        file_id = upload.reservation.id
        if not upload.still_mine():
            holder = ex.run(st.files.upload_alive, {"id": file_id}).first()
            if holder is not None and holder[0] == row.sid:
                ex.run(st.files.delete_file_chunks, {"id": file_id})
                ex.run(st.files.delete_file_id, {"id": file_id})
                upload.superseded()
                return  # a later upload's bytes hold the name: its row wins
            # Its pending row went (a reset removed the session's files) or moved with its
            # session (a rotation, its bytes with it): the upload was interrupted.
            if holder is not None or ex.run(st.has_session, {"sid": row.sid}).first() is None:
                raise SessionExpired(row.sid)
            raise UploadInterrupted(row.filename)
        key = {**self._key(row.sid, row.filename), "id": file_id}
        if upload.replaces_early:
            ex.run(st.files.delete_replaced_chunks, key)
            replaced = ex.run(st.files.delete_replaced, key).rows
        else:
            retired = {**key, "retired_name": RETIRED_PREFIX + secrets.token_hex(8)}
            ex.run(st.files.retire_replaced, {**retired, "now": st.values.time(now)})
            replaced = []
        values = {
            **key,
            "size_bytes": row.size_bytes,
            "sha256": row.sha256,
            "content_type": row.content_type,
            "now": st.values.time(now),
        }
        if ex.run(st.files.finish_upload, values).rowcount != 1:
            if ex.run(st.has_session, {"sid": row.sid}).first() is None:
                raise SessionExpired(row.sid)
            raise UploadInterrupted(row.filename)
        upload.replaced = [
            FileRow(row.sid, row.filename, 0, "", backend=backend, location=location)
            for backend, location in replaced
        ]

    def undo(self, upload: StagedUpload) -> None:
        """An upload that is not kept: its bytes go (``local``: the version it replaced
        comes back under the name; bytes a rotation took along go there), then its
        pending row."""
        if not upload.still_mine() or upload.blobs.kind != "local":
            with contextlib.suppress(StorageUnavailable):
                holder = self._holder(upload.row.id)
                if holder is not None and holder != upload.row.sid:
                    upload.moved_to(holder)
        upload.discard()
        self.release(upload.row, upload.reservation.id)

    def release(self, row: FileRow, file_id: int) -> None:
        b = self._b
        try:
            with b.connector.executor() as ex, ex.transaction():
                ex.run(b.st.files.delete_file_chunks, {"id": file_id})
                ex.run(b.st.files.delete_file_id, {"id": file_id})
        except StorageUnavailable:
            logger.warning("could not forget an upload that was not kept; a later one will")

    def staged(self, sid: str) -> list[StagedUpload]:
        unit = self._b.current_unit(sid)
        uploads: list[StagedUpload] = []
        for item in unit.staged() if unit is not None else []:
            if isinstance(item, StagedFile) and item.records is self:
                uploads.append(item.upload)
        return uploads

    # -- reading -------------------------------------------------------------------------------

    def names(self, sid: str) -> list[str]:
        b = self._b
        with b.connector.executor() as ex:
            rows = ex.run(b.st.files.file_names, {"store": self.store, "sid": sid}).rows
        return [r[0] for r in rows]

    def row(self, sid: str, filename: str) -> FileRow | None:
        b = self._b
        with b.connector.executor() as ex:
            found = ex.run(b.st.files.file_row, self._key(sid, filename)).first()
        if found is None:
            return None
        row = self._row(found)
        return None if row.pending else row

    def session_rows(self, sid: str) -> list[FileRow]:
        b = self._b
        with b.connector.executor() as ex:
            rows = ex.run(b.st.files.session_file_rows, {"store": self.store, "sid": sid}).rows
        return [self._row(r) for r in rows]

    def pending_rows(self, sid: str) -> list[FileRow]:
        b = self._b
        with b.connector.executor() as ex:
            rows = ex.run(b.st.files.session_pending_rows, {"store": self.store, "sid": sid}).rows
        return [self._row(r) for r in rows]

    def row_by_id(self, file_id: int) -> FileRow | None:
        b = self._b
        with b.connector.executor() as ex:
            found = ex.run(b.st.files.file_by_id, {"id": file_id}).first()
        return None if found is None else self._row(found)

    def total_bytes(self) -> int:
        b = self._b
        with b.connector.executor() as ex:
            return int(ex.run(b.st.files.store_bytes, {"store": self.store}).scalar() or 0)

    def rows(self) -> list[FileRow]:
        b = self._b
        with b.connector.executor() as ex:
            rows = ex.run(b.st.files.store_file_rows, {"store": self.store}).rows
        return [self._row(r) for r in rows]

    def live(self, sids: list[str]) -> tuple[set[str], set[str]]:
        b = self._b
        st = b.st
        values = {"sids": st.values.sids(sids)}
        with b.connector.executor() as ex:
            alive = {r[0] for r in ex.run(st.files.live_sessions, values).rows}
            expired = {r[0] for r in ex.run(st.files.expired_among, values).rows}
        return alive, expired

    def rows_of(self, sids: list[str]) -> list[tuple[str, str, str]]:
        b = self._b
        values = {"store": self.store, "sids": b.st.values.sids(sids)}
        with b.connector.executor() as ex:
            return [(r[0], r[1], r[2]) for r in ex.run(b.st.files.rows_of_sessions, values).rows]

    def orphan_chunks(self) -> list[int]:
        b = self._b
        with b.connector.executor() as ex:
            return [int(r[0]) for r in ex.run(b.st.files.orphan_chunks, {}).rows]

    # -- forgetting ------------------------------------------------------------------------------

    def forget(self, sid: str | None = None, filename: str | None = None) -> list[FileRow]:
        b = self._b
        st = b.st
        if sid is None:
            chunks, rows = st.files.forget_store_files
            values: dict[str, Any] = {"store": self.store}
        elif filename is None:
            chunks, rows = st.files.forget_session_files
            values = {"store": self.store, "sid": sid}
        else:
            chunks, rows = st.files.forget_file
            values = self._key(sid, filename)
        with b.connector.executor() as ex, ex.transaction():
            if sid is not None:  # not while a rotation moves them (its chunks would go)
                ops.hold(ex, st, sid, b.times(b.now()))
            ex.run(chunks, values)
            gone = ex.run(rows, values).rows
        return [
            FileRow(gone_sid, name, 0, "", backend=backend, location=location)
            for gone_sid, name, backend, location in gone
        ]

    def forget_retired(self, before: float) -> list[FileRow]:
        b = self._b
        st = b.st
        chunks, rows = st.files.forget_retired
        values = {"store": self.store, "before": st.values.time(before)}
        with b.connector.executor() as ex, ex.transaction():
            ex.run(chunks, values)
            gone = ex.run(rows, values).rows
        return [
            FileRow(gone_sid, "", 0, "", backend=backend, location=location)
            for gone_sid, _name, backend, location in gone
        ]

    def forget_id(self, file_id: int, *, seen: Any = None) -> FileRow | None:
        b = self._b
        st = b.st
        with b.connector.executor() as ex, ex.transaction():
            if seen is None:
                ex.run(st.files.delete_file_chunks, {"id": file_id})
                gone = ex.run(st.files.delete_file_id, {"id": file_id}).first()
            else:
                gone = ex.run(
                    st.files.delete_file_id_unchanged, {"id": file_id, "seen": seen}
                ).first()
                if gone is not None:
                    ex.run(st.files.delete_file_chunks, {"id": file_id})
        if gone is None:
            return None
        return FileRow("", "", 0, "", id=file_id, backend=gone[0], location=gone[1])
