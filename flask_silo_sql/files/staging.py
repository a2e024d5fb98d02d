"""An upload whose bytes are complete, awaiting the commit that writes its row."""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import replace

from ..logs import log_failure, silo_logger
from .blobs import Bytes
from .limits import OLD_PREFIX
from .rows import FileRow, Reservation, kept_aside

logger = silo_logger("flask_silo_sql.files")


class StagedUpload:
    """An upload whose bytes are complete, awaiting its row (written with the commit).

    Its backend decides what :meth:`install` does before the commit (``local``:
    move the bytes under their name, keeping the version they replace aside),
    what :meth:`keep` does after it (let that version go, or delete the objects
    of the rows it replaced) and what :meth:`discard` undoes when the request
    fails.
    """

    __slots__ = ("_backup", "_identity", "blobs", "path", "replaced", "reservation", "row", "tmp")

    def __init__(
        self, backend: Bytes, row: FileRow, reservation: Reservation, tmp: str | None, path: str
    ) -> None:
        self.blobs = backend
        self.row = row
        self.reservation = reservation
        self.tmp = tmp
        """The local temporary file holding the bytes (None: they are elsewhere already)."""
        self.path = path
        """The local path :meth:`FileStore.save` returns (the file, or its cached copy)."""
        self.replaced: list[FileRow] = []
        """Rows the commit removed (their bytes go in :meth:`keep`)."""
        self._backup: str | None = None
        self._identity: tuple[int, int] | None = None

    @property
    def directory(self) -> str | None:
        """The directory whose lock the commit holds (``local``), else None."""
        return os.path.dirname(self.path) if self.blobs.kind == "local" else None

    @property
    def replaces_early(self) -> bool:
        """Whether the bytes under the file's name change at :meth:`install` (``local``),
        rather than only its row with the commit."""
        return self.blobs.kind == "local"

    def install(self, current: FileRow | None = None) -> None:
        """Before the commit (``local``: holding :func:`directory_lock`). The bytes of the
        *current* row, replaced under the name, stay whole at :func:`kept_aside` until
        the commit swaps the rows (an earlier upload in flight may have put them there)."""
        if self.blobs.kind != "local":
            if self.tmp is not None:
                self.blobs.install(self.tmp, self.path)
                self.tmp = None
            return
        if self.tmp is None:
            return
        directory = os.path.dirname(self.path)
        if current is not None:
            backup = kept_aside(directory, current)
            if not os.path.lexists(backup):
                with contextlib.suppress(FileNotFoundError):
                    os.link(self.path, backup)  # the row's version stays whole for its readers
            if os.path.lexists(backup):
                self._backup = backup
        elif os.path.lexists(self.path):  # bytes without a row: kept only to come back
            backup = os.path.join(directory, OLD_PREFIX + secrets.token_hex(8))
            with contextlib.suppress(FileNotFoundError):
                os.link(self.path, backup)
                self._backup = backup
        os.replace(self.tmp, self.path)
        self.tmp = None
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def still_mine(self) -> bool:
        """Whether the bytes under the name are this upload's (only ``local`` can lose them
        to a later upload before the commit)."""
        if self.blobs.kind != "local":
            return True
        if self._identity is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def moved_to(self, sid: str) -> None:
        """Its session moved to *sid* (a rotation) before the upload was kept: its bytes
        went along (directory, objects), and are removed there if still its own."""
        moved = self._moved(self.path, sid)
        if self.blobs.kind != "local":
            self.blobs.drop_upload(replace(self.row, sid=sid), moved)
            return
        if self.tmp is not None:  # not installed yet: its temporary file went along
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._moved(self.tmp, sid))
        if self._identity is None:
            return
        try:
            st = os.stat(moved)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(moved)
        except FileNotFoundError:
            pass

    def _moved(self, path: str, sid: str) -> str:
        """*path* in the directory of session *sid* instead of this upload's own."""
        return os.sep.join(sid if part == self.row.sid else part for part in path.split(os.sep))

    def keep(self) -> None:
        """The row is committed: the replaced version's bytes go (a reader that opened
        them keeps its descriptor; ``database``/fsspec: the row was retired instead)."""
        if self._backup is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._backup)
            self._backup = None
        replaced, self.replaced = self.replaced, []
        if replaced:
            self.blobs.remove(replaced)

    def superseded(self) -> None:
        """Not kept because a later upload's bytes took the name: what was kept aside
        stays for that upload (the committed row's readers find it there)."""
        self._backup = None
        self.replaced = []

    def discard(self) -> None:
        """Undo the upload: the previous version back (``local``), nothing of it left over."""
        try:
            if self.tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tmp)
                self.tmp = None
            if self.blobs.kind != "local":
                self.blobs.drop_upload(self.row, self.path)
            elif self.still_mine():
                if self._backup is not None:
                    os.replace(self._backup, self.path)  # the row's version, under its name
                    self._backup = None
                else:
                    os.unlink(self.path)
            else:
                self._backup = None  # a later upload holds the name and relies on it
        except Exception as exc:
            log_failure(
                logger, "could not undo an upload that was not kept", exc=exc, sid=self.row.sid
            )
        finally:
            self._identity = None
            self.replaced = []
            self.keep()
