"""This machine's cache of verified copies of ``database`` and fsspec files.

Cached copies are not synced to the disk (see :mod:`flask_silo_sql.files.backends`)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from typing import IO

from ...errors import FileCorrupt
from ...logs import silo_logger
from ..body import Piece
from ..digest import StreamDigest, sha256_of
from ..limits import TEMP_PREFIX
from ..records import StoreView
from ..rows import FileRow
from .local import LocalSink, boot_time, create_temp

logger = silo_logger("flask_silo_sql.files")


COPY_BUFFER = 1024 * 1024
SHA_DIR_LENGTH = 32
"""Hex characters of the SHA-256 that name a cached version's directory."""


class Cache:
    """Verified local copies: ``<base_dir>/<key>/<sha256[:32]>/<name>``."""

    def __init__(self, store: StoreView) -> None:
        self.store = store
        self.started = boot_time()
        """When this machine started: copies written since need no sync (None: sync them)."""

    def path(self, row: FileRow) -> str:
        return os.path.join(self.store.base_dir, row.sid, row.sha256[:SHA_DIR_LENGTH], row.filename)

    def sink(self, directory: str, tmp_name: str) -> LocalSink:
        """A temporary file that becomes a cached copy."""
        return LocalSink(directory, tmp_name, self.path, sync=self.started is None)

    def _usable(self, path: str, row: FileRow) -> bool:
        """Whether the copy at *path* is *row*'s bytes: its size, and written since this
        machine started (else its hash is checked, and it counts as written now)."""
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return False
        if info.st_size != row.size_bytes:
            return False
        if self.started is None or info.st_mtime >= self.started:
            return True
        with open(path, "rb") as copy:
            found = sha256_of(copy, COPY_BUFFER)
        if found != row.sha256:
            logger.warning(
                "file store %r: a cached copy from before this machine started does not match "
                "its row; fetched again",
                self.store.name,
            )
            return False
        os.utime(path)
        return True

    def install(self, tmp: str, path: str) -> None:
        """*tmp* becomes the copy at *path*. Other cached versions of the name stay: a
        request may have been handed their path; the upkeep removes them once no row
        names them and they went unused for its grace period."""
        for attempt in range(3):  # another thread may remove an empty version directory
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                os.replace(tmp, path)
                break
            except FileNotFoundError:
                if attempt == 2 or not os.path.exists(tmp):
                    raise

    def drop(self, row: FileRow, path: str | None = None) -> None:
        path = path or self.path(row)
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))

    def get(self, row: FileRow, opener: Callable[[], IO[bytes]]) -> str:
        """The cached copy of *row*, fetched through *opener* when absent (or of another
        size), checked against the row's size and SHA-256 before it is used."""
        path = self.path(row)
        if self._usable(path, row):
            with contextlib.suppress(OSError):
                os.utime(path)  # handed out now: the upkeep leaves it for its grace period
            return path
        directory = os.path.join(self.store.base_dir, row.sid)
        fd, tmp = create_temp(directory, TEMP_PREFIX + "fetch-" + secrets.token_hex(8))
        try:
            digest = StreamDigest()
            size = 0
            with os.fdopen(fd, "wb") as out, opener() as source:
                for chunk in iter(lambda: source.read(COPY_BUFFER), b""):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                if self.started is None:
                    os.fsync(out.fileno())
            if size != row.size_bytes or digest.hexdigest() != row.sha256:
                logger.error(
                    "file store %r: the bytes of a file do not match its row (%d bytes, "
                    "%d expected); not used",
                    self.store.name,
                    size,
                    row.size_bytes,
                )
                raise FileCorrupt(row.filename)
            self.install(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return path


class CachedSink:
    """An upload to a remote place, through a local temporary file that becomes its
    cached copy (*remote* may be None: the local copy is all there is to write)."""

    def __init__(self, cache: Cache, directory: str, tmp_name: str) -> None:
        self.cache = cache
        self._local = cache.sink(directory, tmp_name)
        self.tmp: str | None = self._local.tmp

    def write(self, chunk: Piece) -> None:
        self._local.write(chunk)
        self.send(chunk)

    def send(self, chunk: Piece) -> None:
        """Also write *chunk* to the remote place."""

    def finish(self) -> None:
        self._local.finish()
        self.flush()

    def flush(self) -> None:
        """Every byte is in the remote place."""

    def abort(self) -> None:
        try:
            self.cancel()
        finally:
            self._local.abort()

    def cancel(self) -> None:
        """Nothing of the upload stays in the remote place."""

    def path(self, row: FileRow) -> str:
        return self.cache.path(row)
