"""``local``: the bytes on the disk of the machine that received them; its temporary files."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import IO

from ...errors import FileNotStored
from ..blobs import Sink
from ..body import Piece
from ..limits import FILE_MODE
from ..locks import make_directory
from ..records import StoreView
from ..rows import FileRow, kept_aside


def create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new file *name* in *directory* (recreated if a sweep removed it meanwhile)."""
    path = os.path.join(directory, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, FILE_MODE), path
    except FileNotFoundError:
        make_directory(directory)
        return os.open(path, flags, FILE_MODE), path


@functools.cache
def boot_time() -> float | None:
    """When this machine started (Unix time), where it says (Linux), else None."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            found = next((line for line in stat if line.startswith("btime ")), None)
        return float(found.split()[1]) if found else None
    except (OSError, ValueError, IndexError):
        return None


OPEN_ATTEMPTS = 4
"""Looks at a name whose bytes an upload replaces meanwhile, each time, before giving up."""


def _still_named(path: str, handle: IO[bytes]) -> bool:
    """Whether *handle* is still the file under *path* (not replaced since it was opened)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


class LocalSink:
    """An upload into a local temporary file (synced at the end, unless *sync* is False)."""

    def __init__(
        self,
        directory: str,
        tmp_name: str,
        final: Callable[[FileRow], str],
        *,
        sync: bool = True,
    ) -> None:
        fd, path = create_temp(directory, tmp_name)
        self.tmp: str | None = path
        self.tmp_path = path
        self._out: IO[bytes] | None = os.fdopen(fd, "wb")
        self._final = final
        self._sync = sync

    def write(self, chunk: Piece) -> None:
        assert self._out is not None
        self._out.write(chunk)

    def finish(self) -> None:
        out, self._out = self._out, None
        if out is None:
            return
        with out:
            out.flush()
            if self._sync:
                os.fsync(out.fileno())

    def abort(self) -> None:
        out, self._out = self._out, None
        try:
            if out is not None:
                with contextlib.suppress(OSError):
                    out.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)

    def path(self, row: FileRow) -> str:
        return self._final(row)


class LocalBytes:
    """``local``: the bytes under ``<base_dir>/<key>/<name>`` of the host that has them."""

    kind = "local"

    def __init__(self, store: StoreView) -> None:
        self.store = store

    def _path(self, row: FileRow) -> str:
        return os.path.join(self.store.base_dir, row.sid, row.filename)

    def new_location(self, name: str) -> str | None:
        return None

    def sink(self, row: FileRow, directory: str, tmp_name: str) -> Sink:
        return LocalSink(directory, tmp_name, self._path)

    def install(self, tmp: str, path: str) -> None:  # pragma: no cover - StagedUpload does it
        os.replace(tmp, path)

    def drop_upload(self, row: FileRow, path: str) -> None:  # pragma: no cover
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def here(self, row: FileRow) -> bool:
        return row.host is None or row.host == self.store.host

    def local_copy(self, row: FileRow) -> str | None:
        path = self._path(row)
        return path if os.path.isfile(path) else None

    def open(self, row: FileRow, *, buffered: bool = True) -> IO[bytes]:
        """*row*'s bytes: under its name, or kept aside while an upload replaces them.

        Raises :class:`FileNotStored` when neither holds them. Bytes under the name
        that an upload replaced between the two looks are not surely the row's: the
        row's own are then kept aside (the upload is not committed) or the row was
        replaced (the caller reads the new one), so it looks again."""
        path = self._path(row)
        aside_path = kept_aside(os.path.dirname(path), row)
        for _ in range(OPEN_ATTEMPTS):
            try:
                handle: IO[bytes] | None = open(path, "rb")  # noqa: SIM115 - returned
            except FileNotFoundError:
                handle = None
            try:  # a replacement in flight: the row's version is kept aside (see kept_aside)
                aside: IO[bytes] = open(aside_path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                pass
            else:
                if handle is not None:
                    handle.close()
                return aside
            if handle is None:
                raise FileNotStored(row.filename)
            if _still_named(path, handle):
                return handle
            handle.close()
        raise FileNotStored(row.filename)

    def remove(self, rows: list[FileRow]) -> None:
        """Temporary files of dead uploads of this host (stored files go with their
        directory or through fsck, which knows the host's disk)."""
        for row in rows:
            if row.pending and row.backend == "local" and self.here(row):
                with contextlib.suppress(OSError):
                    os.unlink(self._path(row))

    def remove_session(self, sid: str) -> None:
        return None

    def remove_all(self) -> None:
        return None

    def move_session(self, old: str, new: str) -> Callable[[], None]:
        return lambda: None
