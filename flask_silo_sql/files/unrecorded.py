"""A file store without rows: its disk is all it knows of its files, flask-silo's way.

A :class:`~flask_silo_sql.files.FileStore` of its own, or one of a storage without
tables (``InMemoryStorage``, a flask-silo one), is given :data:`UNRECORDED`: its
catalog, :class:`DiskOnly`, reads the session's directory, writes each upload there
at once (no request's commit to wait for, no quota, nothing to roll back) and has
nothing to maintain or check. Bytes kept anywhere but this disk (``database``, an
fsspec URL) cannot be found without rows: reading or storing them says so.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, NoReturn

from ..errors import FileNotStored, FileTooLarge, SiloError
from .backends.local import LocalSink
from .body import Piece, Readable
from .failures import file_errors, storage_error
from .limits import TEMP_PREFIX
from .receive import incoming
from .rows import StoredFile

if TYPE_CHECKING:
    from .catalog import CatalogStore
    from .check import FsckReport


class Unrecorded:
    """The file keeping of a storage without tables: every store's catalog is its disk."""

    __slots__ = ()

    def catalog(self, store: CatalogStore) -> DiskOnly:
        return DiskOnly(store)


UNRECORDED = Unrecorded()
"""What a backend without file rows gives its file stores (and a ``FileStore`` of its own)."""


class DiskOnly:
    """The catalog of a store without rows (see the module docstring)."""

    __slots__ = ("store",)

    def __init__(self, store: CatalogStore) -> None:
        self.store = store

    @property
    def records(self) -> NoReturn:
        raise SiloError(
            f"file store {self.store.name!r} has no rows: only a store registered with "
            "Silo.add_file_store on SQL storage (SQLStorage, the default) keeps them"
        )

    def _directory(self, sid: str) -> str:
        """The session's directory: the only place a file can be found without rows."""
        kind = self.store.blobs.kind
        if kind != "local":
            raise SiloError(f"file store {self.store.name!r}: the {kind} backend needs SQL storage")
        return os.path.join(self.store.base_dir, sid)

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
        self._directory(sid)  # bytes that would go elsewhere are refused before any is read
        _, directory, chunks = incoming(self.store, sid, name, data, size=size, database_dir=None)
        return _write(self.store, sid, name, directory, chunks)

    # -- reading ---------------------------------------------------------------------------

    def _file(self, sid: str, name: str) -> str:
        return os.path.join(self._directory(sid), name)

    def path(self, sid: str, name: str) -> str | None:
        path = self._file(sid, name)
        return path if os.path.isfile(path) else None

    def open(self, sid: str, name: str, filename: str) -> IO[bytes]:
        path = self._file(sid, name)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise FileNotStored(name) from None
        except OSError as exc:
            raise storage_error(exc, self.store.name, sid, "read a file") from None

    def stat(self, sid: str, name: str) -> StoredFile | None:
        path = self._file(sid, name)
        if not os.path.isfile(path):
            return None
        return StoredFile(name, os.path.getsize(path), "", None, None, "local", None, True)

    def opened(
        self, sid: str, name: str, filename: str, *, buffered: bool
    ) -> tuple[StoredFile, IO[bytes]]:
        return stat_and_open(self.store, sid, filename)

    def names(self, sid: str) -> list[str]:
        directory = self._directory(sid)
        if not os.path.isdir(directory):
            return []
        return sorted(n for n in os.listdir(directory) if not n.startswith(TEMP_PREFIX))

    def details(self, sid: str) -> list[StoredFile]:
        return [found for n in self.names(sid) if (found := self.store.stat(sid, n)) is not None]

    def total_bytes(self) -> int:
        total = 0
        for dirpath, _, filenames in os.walk(self.store.base_dir):
            for name in filenames:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, name))
        return total

    # -- removing --------------------------------------------------------------------------

    def cleanup(self, sid: str, directory: str) -> None:
        """What this machine (and an fsspec URL) holds of the session goes, whole."""
        blobs = self.store.blobs
        if blobs.kind != "local":
            blobs.remove_session(sid)
        if os.path.isdir(directory):
            shutil.rmtree(directory, ignore_errors=True)

    def forget_all(self) -> None:
        return None  # no rows to forget

    def maintain(self, *, grace: float) -> int:
        return 0  # no rows to tell a gone session's directory from a live one's

    def check(self, *, fix: bool, grace: float, verify: bool) -> FsckReport:
        raise ValueError(f"file store {self.store.name!r} has no SQL storage to check against")


def stat_and_open(store: CatalogStore, sid: str, filename: str) -> tuple[StoredFile, IO[bytes]]:
    """A file as :meth:`FileStore.stat` and :meth:`FileStore.open` find it (no row to
    stream from: a store without rows, or this request's own upload)."""
    info = store.stat(sid, filename)
    if info is None:
        raise FileNotStored(filename)
    return info, store.open(sid, info.name)


def _write(
    store: CatalogStore, sid: str, name: str, directory: str, chunks: Iterator[Piece]
) -> str:
    """The file on disk, nothing else: written to a temporary file, synced, then renamed."""
    limit = store.max_file_bytes
    path = os.path.join(directory, name)
    with file_errors(store.name, sid, "store a file"):
        sink = LocalSink(directory, TEMP_PREFIX + secrets.token_hex(8), lambda _row: path)
    try:
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if limit is not None and size > limit:
                raise FileTooLarge(name, size, limit)
            with file_errors(store.name, sid, "store a file"):
                sink.write(chunk)
        with file_errors(store.name, sid, "store a file"):
            sink.finish()
            os.replace(sink.tmp_path, path)
    except BaseException:
        sink.abort()
        raise
    return path
