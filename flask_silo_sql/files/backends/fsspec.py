"""An fsspec URL: one new object per upload (see :mod:`flask_silo_sql.files.backends`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from ...errors import FileNotStored, FileStorageError, SiloError
from ...logs import log_failure, silo_logger
from ..blobs import Sink
from ..body import Piece
from ..failures import storage_error
from ..limits import CHUNK
from ..records import StoreView
from ..rows import FileRow
from .cache import Cache, CachedSink
from .urls import check_backend

logger = silo_logger("flask_silo_sql.files")


@contextmanager
def remote_errors(store: str, sid: str | None, action: str) -> Iterator[None]:
    """Any failure of the remote filesystem as a :class:`SiloError` (``503``, logged)."""
    try:
        yield
    except SiloError:
        raise
    except FileNotFoundError:
        raise
    except Exception as exc:
        error = storage_error(exc, store, sid, action)
        if isinstance(error, FileStorageError):
            error.remote = True
        raise error from None


class RemoteSink(CachedSink):
    """An upload to a new object of an fsspec filesystem (and the local cache)."""

    def __init__(
        self,
        backend: FsspecBytes,
        row: FileRow,
        directory: str,
        tmp_name: str,
        *,
        cached: bool,
    ) -> None:
        self.backend = backend
        self.row = row
        self.key = backend.key(row)
        self.cached = cached
        name = backend.store.name
        with remote_errors(name, row.sid, "store a file"):
            backend.fs.makedirs(self.key.rsplit("/", 1)[0], exist_ok=True)
            self._remote: Any = backend.fs.open(self.key, "wb", block_size=backend.block_size)
        if cached:
            super().__init__(backend.cache, directory, tmp_name)
        else:
            self.cache = backend.cache
            self.tmp = None

    def write(self, chunk: Piece) -> None:
        if self.cached:
            self._local.write(chunk)
        self.send(chunk)

    def send(self, chunk: Piece) -> None:
        # The piece's buffer is filled again later: a filesystem that keeps what it is
        # given (rather than copying it into its own buffer) must be given bytes.
        data = chunk if isinstance(chunk, bytes) else bytes(chunk)
        with remote_errors(self.backend.store.name, self.row.sid, "store a file"):
            self._remote.write(data)

    def finish(self) -> None:
        if self.cached:
            self._local.finish()
        self.flush()

    def flush(self) -> None:
        remote, self._remote = self._remote, None
        if remote is not None:
            with remote_errors(self.backend.store.name, self.row.sid, "store a file"):
                remote.close()

    def abort(self) -> None:
        try:
            self.cancel()
        finally:
            if self.cached:
                self._local.abort()

    def cancel(self) -> None:
        remote, self._remote = self._remote, None
        if remote is not None:
            with contextlib.suppress(Exception):
                if hasattr(remote, "discard"):
                    remote.discard()  # a multipart upload that never completes
                    remote.closed = True  # nothing left to flush when it is collected
                else:
                    remote.close()
        self.backend.delete_keys([self.key], sid=self.row.sid)

    def path(self, row: FileRow) -> str:
        return self.cache.path(row) if self.cached else self.backend.local_key_path(row)


class FsspecBytes:
    """An fsspec URL: one new object per upload (see the module docstring)."""

    kind = "fsspec"
    block_size = 8 * 1024 * 1024

    def __init__(self, store: StoreView, url: str) -> None:
        check_backend(url)
        import fsspec.core

        self.store = store
        self.url = url
        fs, root = fsspec.core.url_to_fs(url, **store.storage_options)
        self.fs: Any = fs
        self.root = str(root).rstrip("/")
        self.cache = Cache(store)
        self.direct = type(fs).__name__ == "LocalFileSystem"
        """A filesystem of this machine (``file://``): its objects are local paths already."""
        self._lock = threading.Lock()
        self.retry: set[str] = set()
        """Session prefixes (``sid``) and keys whose removal failed: retried by ``maintain``."""

    def key(self, row: FileRow) -> str:
        assert row.location is not None
        return f"{self.root}/{row.sid}/{row.location}"

    def session_prefix(self, sid: str) -> str:
        return f"{self.root}/{sid}"

    def local_key_path(self, row: FileRow) -> str:
        return os.path.abspath(self.key(row))

    def new_location(self, name: str) -> str | None:
        return f"{secrets.token_hex(8)}/{name}"

    def sink(self, row: FileRow, directory: str, tmp_name: str) -> Sink:
        return RemoteSink(self, row, directory, tmp_name, cached=not self.direct)

    def install(self, tmp: str, path: str) -> None:
        self.cache.install(tmp, path)

    def drop_upload(self, row: FileRow, path: str) -> None:
        if not self.direct:
            self.cache.drop(row, path)
        self.delete_keys([self.key(row)], sid=row.sid)

    def here(self, row: FileRow) -> bool:
        return True

    def open(self, row: FileRow, *, buffered: bool = True) -> IO[bytes]:
        with remote_errors(self.store.name, row.sid, "read a file"):
            try:
                handle: IO[bytes] = self.fs.open(self.key(row), "rb", block_size=CHUNK)
            except FileNotFoundError:
                raise FileNotStored(row.filename) from None
        return handle

    def local_copy(self, row: FileRow) -> str | None:
        if self.direct:
            path = self.local_key_path(row)
            return path if os.path.isfile(path) else None
        with remote_errors(self.store.name, row.sid, "read a file"):
            try:
                return self.cache.get(row, lambda: self.open(row))
            except FileNotStored:
                return None

    def delete_keys(self, keys: list[str], *, sid: str | None) -> None:
        for key in keys:
            try:
                self.fs.rm(key)
            except FileNotFoundError:
                pass
            except Exception as exc:
                log_failure(logger, "could not remove an object; retried later", exc=exc, sid=sid)
                with self._lock:
                    self.retry.add(key)
        self._forget_empty_dirs(keys)

    def _forget_empty_dirs(self, keys: list[str]) -> None:
        if not self.direct:
            return
        for key in keys:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(os.path.abspath(key)))

    def remove(self, rows: list[FileRow]) -> None:
        keys = [self.key(r) for r in rows if r.backend == "fsspec" and r.location]
        self.delete_keys(keys, sid=None)
        if not self.direct:
            for row in rows:
                if row.sha256 and not row.pending:
                    self.cache.drop(row)

    def remove_session(self, sid: str) -> None:
        prefix = self.session_prefix(sid)
        try:
            if self.fs.exists(prefix):
                self.fs.rm(prefix, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:
            log_failure(
                logger, "could not remove a session's objects; retried later", exc=exc, sid=sid
            )
            with self._lock:
                self.retry.add(prefix)

    def retry_removals(self) -> int:
        """Try again what could not be removed; how many are still left."""
        with self._lock:
            pending, self.retry = sorted(self.retry), set()
        for target in pending:
            try:
                if self.fs.exists(target):
                    self.fs.rm(target, recursive=True)
            except FileNotFoundError:
                pass
            except Exception:
                with self._lock:
                    self.retry.add(target)
        return len(self.retry)

    def remove_all(self) -> None:
        with remote_errors(self.store.name, None, "remove files"):
            try:
                entries = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return
            for entry in entries:
                self.fs.rm(entry, recursive=True)

    def move_session(self, old: str, new: str) -> Callable[[], None]:
        """Every object of *old* under *new*'s prefix (a rotation); returns the undo."""
        source, target = self.session_prefix(old), self.session_prefix(new)
        with remote_errors(self.store.name, old, "move files"):
            moved = self._move(source, target)

        def undo() -> None:
            if moved:
                self._move(target, source)

        return undo

    def _move(self, source: str, target: str) -> bool:
        if self.direct:
            if not os.path.isdir(source):
                return False
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(source, target)
            return True
        try:
            keys = [str(k) for k in self.fs.find(source)]
        except FileNotFoundError:
            return False
        for key in keys:  # object stores copy on the server, key by key
            self.fs.copy(key, target + key[len(source) :])
        if keys:
            self.fs.rm(keys)
        self.fs.invalidate_cache()
        return bool(keys)

    def sessions(self) -> list[str]:
        """The session prefixes under the store's URL."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def objects(self) -> list[dict[str, Any]]:
        """Every object under the store's URL (``name`` relative to it, ``size``, ``mtime``)."""
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return []
        objects = []
        for key, info in found.items():
            if info.get("type") == "directory":
                continue
            relative = str(key)[len(self.root) + 1 :] if str(key).startswith(self.root) else key
            objects.append({"name": relative, "size": info.get("size"), "mtime": mtime(info)})
        return objects


def mtime(info: dict[str, Any]) -> float | None:
    """An object's modification time from fsspec's ``info`` (it varies by filesystem)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    return None
