"""File rows in ``silo_files``: the :class:`~flask_silo_sql.files.FileRecords` of SQL.

Holding the session directory's lock, an upload deletes the previous version's
row, then moves its bytes in (the version they replace is kept aside); its own
row is written with its request's commit (at once outside a request), again
holding the lock, and only while the bytes under the name are still its own.
A crash in between leaves a file without a row (which ``flask silo-db fsck``
reports), never a row describing other bytes; a request that fails puts the
previous version and its row back.
"""

from __future__ import annotations

import contextlib
import logging
import os

from ..errors import SessionExpired, StorageUnavailable
from ..files import FileRow, StagedUpload, directory_lock
from . import sessions as ops
from .context import Context
from .executor import Executor

logger = logging.getLogger("flask_silo_sql.files")


class StagedFile:
    """An upload in place whose row is written with the request's commit."""

    locks_session = True

    def __init__(
        self, records: SQLFileRecords, upload: StagedUpload, replaced: FileRow | None
    ) -> None:
        self.records = records
        self.upload = upload
        self.replaced = replaced
        """The row of the version it replaced (deleted already): put back if not kept."""
        self.directory: str | None = upload.directory

    def write(self, ex: Executor, now: float) -> None:
        self.records.write(ex, self.upload, now)

    def committed(self) -> None:
        self.upload.keep()

    def discard(self) -> None:
        self.upload.discard()
        if self.replaced is not None:
            self.records.restore(self.replaced, self.upload.path)


class SQLFileRecords:
    """The rows of one file store."""

    __slots__ = ("_b", "store")

    def __init__(self, ctx: Context, store: str) -> None:
        self._b = ctx
        self.store = store

    def record(self, upload: StagedUpload) -> None:
        b = self._b
        row = upload.row
        unit = b.current_unit(row.sid)
        if unit is not None:
            with directory_lock(upload.directory):
                old = self._replace(upload)
            unit.stage(StagedFile(self, upload, old))
            return
        now = b.now()
        with b.connector.transaction() as ex:  # the session exists, or is new
            created, _ = ops.lock(ex, b.st, row.sid, b.times(now), existed=None)
        if created:
            b.policy.created(row.sid)
        with directory_lock(upload.directory):
            self._replace(upload)
            try:
                with b.connector.transaction() as ex:
                    self.write(ex, upload, b.now())
            except BaseException:
                upload.discard()
                raise
        upload.keep()

    def _replace(self, upload: StagedUpload) -> FileRow | None:
        """Holding the directory lock: the old version's row goes (committed, unless a
        locking-mode transaction is open), then the new bytes move in. Returns the
        old row, to put back if the upload is not kept."""
        b = self._b
        row = upload.row
        old = self.row(row.sid, row.filename)
        if old is not None:
            with b.connector.executor() as ex:
                ex.run(b.st.forget_file, self._key(row.sid, row.filename))
        upload.install()
        return old

    def _key(self, sid: str, filename: str) -> dict[str, str]:
        return {"store": self.store, "sid": sid, "filename": filename}

    def write(self, ex: Executor, upload: StagedUpload, now: float) -> None:
        """In the open transaction, the session locked: the upload's row, if its bytes
        are still under its name (else a later upload's row wins, with its bytes)."""
        if not upload.still_mine():
            return
        self._upsert(ex, upload.row, now)

    def _upsert(self, ex: Executor, row: FileRow, now: float) -> None:
        st = self._b.st
        values = {
            **self._key(row.sid, row.filename),
            "size_bytes": row.size_bytes,
            "sha256": row.sha256,
            "content_type": row.content_type,
            "now": st.values.time(now),
        }
        if ex.run(st.upsert_file, values).rowcount != 1:
            raise SessionExpired(row.sid)

    def restore(self, old: FileRow, path: str) -> None:
        """Put back the row of the version an upload that was not kept had replaced.

        If that fails (the database is down, the session gone), the version's
        bytes go too: a file without its row is invisible to the app anyway.
        """
        try:
            with self._b.connector.executor() as ex:
                self._upsert(ex, old, self._b.now())
        except (SessionExpired, StorageUnavailable):
            logger.warning("could not put back the row of a replaced file; its bytes go too")
            with contextlib.suppress(OSError):
                os.unlink(path)

    def names(self, sid: str) -> list[str]:
        b = self._b
        with b.connector.executor() as ex:
            rows = ex.run(b.st.file_names, {"store": self.store, "sid": sid}).rows
        return [r[0] for r in rows]

    def row(self, sid: str, filename: str) -> FileRow | None:
        b = self._b
        with b.connector.executor() as ex:
            found = ex.run(
                b.st.file_row, {"store": self.store, "sid": sid, "filename": filename}
            ).first()
        return None if found is None else FileRow(sid, filename, int(found[0]), found[1])

    def pending(self, sid: str) -> list[str]:
        unit = self._b.current_unit(sid)
        names: list[str] = []
        for item in unit.staged() if unit is not None else []:
            if isinstance(item, StagedFile) and item.records is self:
                names.append(item.upload.row.filename)
        return names

    def used_bytes(self, sid: str, *, excluding: str) -> int:
        b = self._b
        with b.connector.executor() as ex:
            total = ex.run(
                b.st.session_bytes, {"store": self.store, "sid": sid, "filename": excluding}
            ).scalar()
        return int(total or 0)

    def total_bytes(self) -> int:
        b = self._b
        with b.connector.executor() as ex:
            return int(ex.run(b.st.store_bytes, {"store": self.store}).scalar() or 0)

    def forget(self, sid: str | None = None, filename: str | None = None) -> int:
        b = self._b
        st = b.st
        with b.connector.executor() as ex:
            if sid is None:
                return ex.run(st.forget_store_files, {"store": self.store}).rowcount
            if filename is None:
                return ex.run(st.forget_session_files, {"store": self.store, "sid": sid}).rowcount
            values = {"store": self.store, "sid": sid, "filename": filename}
            return ex.run(st.forget_file, values).rowcount

    def rows(self) -> list[FileRow]:
        b = self._b
        with b.connector.executor() as ex:
            rows = ex.run(b.st.store_file_rows, {"store": self.store}).rows
        return [FileRow(sid, name, int(size), sha) for sid, name, size, sha in rows]
