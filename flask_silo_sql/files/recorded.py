"""A file store with rows: it knows its files from them (``silo_files``).

The catalog of a store whose backend has SQL tables. Uploads stream in under a
pending row and are staged for the request's commit (:mod:`.receive`); reads
answer from the committed rows, and this request's uploads; removals forget
rows first, then their bytes. See :mod:`flask_silo_sql.files.store` for the
whole story and ``docs/file-versions.md`` for the versions a reader sees.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from typing import IO, TYPE_CHECKING

from ..errors import FileElsewhere, FileNotStored, FileStorageError
from . import receive, upkeep
from .body import Readable
from .check import FsckReport
from .check import fsck as check_rows
from .failures import file_errors
from .locks import directory_lock
from .records import FileRecords
from .rows import FileRow, StoredFile
from .staging import StagedUpload
from .unrecorded import stat_and_open

if TYPE_CHECKING:
    from .catalog import CatalogStore

OPEN_ATTEMPTS = 8
"""Times a download opens a ``local`` file replaced while it was opened, before a 503."""


class Recorded:
    """The catalog of a store with rows (see the module docstring)."""

    __slots__ = ("records", "store")

    def __init__(self, store: CatalogStore, records: FileRecords) -> None:
        self.store = store
        self.records = records

    # -- storing ---------------------------------------------------------------------------

    def save(
        self,
        sid: str,
        name: str,
        data: Readable | bytes,
        *,
        content_type: str | None,
        size: int | None,
    ) -> str:
        return receive.save(
            self.store,
            sid,
            name,
            data,
            records=self.records,
            content_type=content_type,
            size=size,
        )

    # -- reading ---------------------------------------------------------------------------

    def _staged(self, sid: str, name: str) -> StagedUpload | None:
        """This request's upload of *name*, if it saved one (not committed yet)."""
        for upload in self.records.staged(sid):
            if upload.row.filename == name:
                return upload
        return None

    def _row(self, sid: str, name: str) -> FileRow | None:
        """The file's row: this request's upload if it saved one, else the committed row."""
        staged = self._staged(sid, name)
        return staged.row if staged is not None else self.records.row(sid, name)

    def path(self, sid: str, name: str) -> str | None:
        staged = self._staged(sid, name)
        if staged is not None:
            return staged.path
        row = self.records.row(sid, name)
        blobs = self.store.blobs
        if row is None or not blobs.here(row):
            return None
        with file_errors(self.store.name, sid, "read a file"):
            return blobs.local_copy(row)

    def open(self, sid: str, name: str, filename: str) -> IO[bytes]:
        staged = self._staged(sid, name)
        with file_errors(self.store.name, sid, "read a file"):
            if staged is not None:
                return open(staged.path, "rb")
        return self.opened(sid, name, filename, buffered=True)[1]

    def stat(self, sid: str, name: str) -> StoredFile | None:
        row = self._row(sid, name)
        return None if row is None else self._describe(row)

    def _describe(self, row: FileRow) -> StoredFile:
        created = (
            None
            if row.created_at is None
            else dt.datetime.fromtimestamp(row.created_at, dt.timezone.utc)
        )
        return StoredFile(
            row.filename,
            row.size_bytes,
            row.sha256,
            row.content_type,
            created,
            row.backend,
            row.host,
            self.store.blobs.here(row),
        )

    def opened(
        self, sid: str, name: str, filename: str, *, buffered: bool
    ) -> tuple[StoredFile, IO[bytes]]:
        """One lookup of its row gives both (a lookup for each could find a version each,
        and send one's bytes under the other's ``ETag`` and length). A ``local`` file is
        opened by its name, so its row is read again after: a replacement in between is
        opened anew. Raises :class:`FileNotStored` when there is no such file.
        """
        blobs = self.store.blobs
        for _ in range(OPEN_ATTEMPTS):
            row = None if self._staged(sid, name) is not None else self.records.row(sid, name)
            if row is None:  # none for it, or this request's own upload
                return stat_and_open(self.store, sid, filename)
            if not blobs.here(row):
                raise FileElsewhere(name, row.host)
            info = self._describe(row)
            try:
                with file_errors(self.store.name, sid, "read a file"):
                    stream = blobs.open(row, buffered=buffered)
            except FileNotStored:
                if row.backend != "local" or not self._replaced(row):
                    raise
                continue
            if row.backend != "local":
                return info, stream  # opened from the row itself (its id, its location)
            if not self._replaced(row):
                return info, stream
            stream.close()
        raise FileStorageError(
            self.store.name, "read a file", "it was replaced each time it was opened"
        )

    def _replaced(self, row: FileRow) -> bool:
        """Whether *row* is no longer the file's committed row (a ``local`` file is opened
        by its name, so the row is read again once its bytes are open)."""
        again = self.records.row(row.sid, row.filename)
        return again is None or again.sha256 != row.sha256

    def _rows(self, sid: str) -> dict[str, FileRow]:
        rows = {row.filename: row for row in self.records.session_rows(sid)}
        for upload in self.records.staged(sid):
            rows[upload.row.filename] = upload.row
        return rows

    def names(self, sid: str) -> list[str]:
        return sorted(self._rows(sid))

    def details(self, sid: str) -> list[StoredFile]:
        rows = self._rows(sid)
        return [self._describe(rows[name]) for name in sorted(rows)]

    def total_bytes(self) -> int:
        return self.records.total_bytes()

    # -- removing --------------------------------------------------------------------------

    def cleanup(self, sid: str, directory: str) -> None:
        """Rows first, then the bytes of the rows forgotten (``local``: under the
        directory's lock; see :meth:`FileStore.cleanup`)."""
        store = self.store
        local = store.blobs.kind == "local" and os.path.isdir(directory)
        with directory_lock(directory) if local else contextlib.nullcontext() as held:
            forgotten = [row for row in self.records.forget(sid) if not row.pending]
            store.drop_bytes(forgotten)
            if not local:
                return
            for row in forgotten:
                if row.backend == "local" and (row.host is None or row.host == store.host):
                    with contextlib.suppress(FileNotFoundError):
                        # Through the held directory: a rotation that renamed it after
                        # the rows went (its own moved none) took these bytes along.
                        if held is None:
                            os.unlink(os.path.join(directory, row.filename))
                        else:
                            os.unlink(row.filename, dir_fd=held)

    def forget_all(self) -> None:
        self.store.drop_bytes(self.records.forget())

    def maintain(self, *, grace: float) -> int:
        return upkeep.maintain(self.store, self.records, grace=grace)

    def check(self, *, fix: bool, grace: float, verify: bool) -> FsckReport:
        return check_rows(self.store, self.records, fix=fix, grace=grace, verify=verify)
