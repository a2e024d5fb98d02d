"""Where a file store's bytes live: this machine's disk, the database, or an fsspec URL.

* :class:`LocalBytes` (``local``, the default): ``<base_dir>/<sid>/<name>`` on
  the machine that received the upload; its rows record that machine
  (``host``), and other machines answer ``None``/``409`` for them.
* :class:`DatabaseBytes` (``database``): the bytes in ``silo_file_chunks``,
  1 MiB per row, written as they arrive (each chunk one short transaction, none
  held open while the client sends; on PostgreSQL its commit does not wait for
  the WAL flush, which the file's row, committed after it, waits for) and
  deleted with their row, so with their session, by the transaction that
  deletes it. They are read by their row's id (and hash), so a download reads
  the version it began.
* :class:`FsspecBytes` (an fsspec URL: ``s3://bucket/prefix``,
  ``file:///mnt/shared/uploads``, any installed protocol): each upload goes to
  a new object, ``<url>/<sid>/<token>/<name>``, which a row names only once
  the request commits (the row is written last), so no object is ever
  overwritten in place.

A replaced ``database`` or fsspec version keeps its chunks or object for an
hour (its row *retired*), so downloads that began before read it to its end;
a replaced ``local`` version is kept aside until the replacement commits,
then read through the descriptors open on it.

For the last two, ``base_dir`` is this machine's :class:`Cache` of verified
copies (``<base_dir>/<sid>/<sha256[:32]>/<name>``, one directory per version),
which ``get_path`` and ``save`` answer with, so code that opens a path keeps
working on any machine. A newer version never removes the copy of another:
the upkeep removes copies no row names once unused for its grace period.
Uploads stream through a local temporary file as well, which becomes the
cached copy on the machine that received them.

Cached copies are not synced to the disk (where the machine says when it
started): the copy is not the file, and a copy that a process wrote is in the
page cache for every process until the machine stops. Only a power cut or a
crash of the machine can lose it, and after one the machine's boot time is
later than the copy's time, so a copy from before the last start is checked
against its row's SHA-256 once before it is used again (and fetched anew if it
does not match).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, cast

from .errors import FileCorrupt, FileNotStored, FileStorageError, SiloError
from .file_digest import StreamDigest, sha256_of
from .file_parts import (
    CHUNK,
    FILE_MODE,
    TEMP_PREFIX,
    Bytes,
    FileRecords,
    FileRow,
    Piece,
    Sink,
    StoreView,
    _create_temp,
    kept_aside,
    storage_error,
)
from .logs import log_failure, silo_logger

logger = silo_logger("flask_silo_sql.files")

COPY_BUFFER = 1024 * 1024
SHA_DIR_LENGTH = 32
"""Hex characters of the SHA-256 that name a cached version's directory."""


def make_bytes(store: StoreView) -> Bytes:
    """The backend object of *store*, from its ``backend`` setting."""
    backend = store.backend
    if backend == "local":
        return LocalBytes(store)
    if backend == "database":
        return DatabaseBytes(store)
    if isinstance(backend, str) and "://" in backend:
        return FsspecBytes(store, backend)
    raise ValueError(
        f"file store {store.name!r}: unknown backend {backend!r} "
        "(use 'local', 'database' or an fsspec URL such as 's3://bucket/prefix')"
    )


def check_backend(backend: str) -> None:
    """Refuse at once a backend that cannot work (an unknown protocol, fsspec missing)."""
    if backend in ("local", "database"):
        return
    if "://" not in backend:
        raise ValueError(
            f"unknown file backend {backend!r}: use 'local', 'database' or an fsspec URL"
        )
    try:
        import fsspec
    except ImportError:
        raise ValueError(
            f"the file backend {backend!r} needs fsspec: pip install 'flask-silo-sql[fsspec]'"
        ) from None
    protocol = backend.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"the file backend {backend!r} cannot be used: {exc}") from None


# -- local temporary files ---------------------------------------------------------------


@functools.cache
def boot_time() -> float | None:
    """When this machine started (Unix time), where it says (Linux), else None."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            found = next((line for line in stat if line.startswith("btime ")), None)
        return float(found.split()[1]) if found else None
    except (OSError, ValueError, IndexError):
        return None


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
        fd, path = _create_temp(directory, tmp_name)
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
    """``local``: the bytes under ``<base_dir>/<sid>/<name>`` of the host that has them."""

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

        Raises :class:`FileNotStored` when neither holds them (the name's bytes changed
        since they were opened, with nothing kept aside: the row was replaced, and the
        caller reads the new one)."""
        path = self._path(row)
        try:
            handle: IO[bytes] | None = open(path, "rb")  # noqa: SIM115 - returned
        except FileNotFoundError:
            handle = None
        try:  # a replacement in flight: the row's version is kept aside (see kept_aside)
            aside: IO[bytes] = open(kept_aside(os.path.dirname(path), row), "rb")  # noqa: SIM115
        except FileNotFoundError:
            pass
        else:
            if handle is not None:
                handle.close()
            return aside
        if handle is None:
            raise FileNotStored(row.filename)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        opened = os.fstat(handle.fileno())
        if now is None or (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            handle.close()  # replaced between the two looks: not surely the row's bytes
            raise FileNotStored(row.filename)
        return handle

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


# -- the cache of the database and fsspec backends -------------------------------------------


class Cache:
    """Verified local copies: ``<base_dir>/<sid>/<sha256[:32]>/<name>``."""

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
        fd, tmp = _create_temp(directory, TEMP_PREFIX + "fetch-" + secrets.token_hex(8))
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


# -- database ----------------------------------------------------------------------------


class ChunkSink(CachedSink):
    """An upload into ``silo_file_chunks``: each full chunk one ``INSERT`` as it comes."""

    def __init__(
        self, records: FileRecords, row: FileRow, cache: Cache, directory: str, tmp_name: str
    ) -> None:
        super().__init__(cache, directory, tmp_name)
        self.records = records
        self.row = row
        self._buffer = bytearray()
        self._seq = 0

    def send(self, chunk: Piece) -> None:
        buffer = self._buffer
        if not buffer and len(chunk) == CHUNK:
            self._put(chunk)  # a whole chunk as it came: no copy
            return
        buffer += chunk
        while len(buffer) >= CHUNK:
            self._put(bytes(buffer[:CHUNK]))
            del buffer[:CHUNK]

    def _put(self, data: Piece) -> None:
        assert self.row.id is not None
        self.records.put_chunk(self.row, self.row.id, self._seq, data)
        self._seq += 1

    def flush(self) -> None:
        if self._buffer:
            self._put(bytes(self._buffer))
            self._buffer.clear()

    def cancel(self) -> None:
        self._buffer.clear()  # the chunks go with the pending row


class ChunkReader(io.RawIOBase):
    """The bytes of a ``database`` file, read one chunk (one ``SELECT``) at a time.

    Seekable, so ranges start at their chunk. Read from its start to its end, it
    checks the bytes against the row's SHA-256 (a mismatch is logged and raised
    at the end). A file replaced while it is read ends the read with an error.
    """

    def __init__(self, store: StoreView, records: FileRecords, row: FileRow) -> None:
        super().__init__()
        assert row.id is not None
        self.store = store
        self.records = records
        self.row = row
        self.file_id = row.id
        self.size = row.size_bytes
        self._pos = 0
        self._chunk_size = CHUNK
        self._seq = -1
        self._data = b""
        self._digest: StreamDigest | None = StreamDigest()
        self._hashed = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            offset += self.size
        self._pos = max(0, offset)
        if self._pos != self._hashed:
            self._digest = None  # not read straight through: nothing to check
        return self._pos

    def _load(self, seq: int) -> None:
        data = self.records.read_chunk(self.file_id, seq, self.row.sha256)
        if data is None:
            raise FileStorageError(
                self.store.name, "read a file", "its bytes changed while they were read"
            )
        if seq == 0 and self.size > len(data):
            self._chunk_size = len(data)
        self._seq, self._data = seq, bytes(data)

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self.size:
            self._check()
            return 0
        seq, offset = divmod(self._pos, self._chunk_size)
        if seq != self._seq:
            if seq > 0 and self._seq < 0 and self._chunk_size == CHUNK:
                self._load(0)  # learn the chunk size the file was written with
                seq, offset = divmod(self._pos, self._chunk_size)
            if seq != self._seq:
                self._load(seq)
        piece = memoryview(self._data)[offset : offset + len(buffer)]  # copied once, below
        if not piece:
            raise FileStorageError(self.store.name, "read a file", "a chunk is missing")
        view = memoryview(buffer)
        view[: len(piece)] = piece
        if self._digest is not None and self._hashed == self._pos:
            self._digest.update(piece)
            self._hashed += len(piece)
        self._pos += len(piece)
        return len(piece)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._pos
        if self._pos >= self.size:
            self._check()
            return b""
        seq, offset = divmod(self._pos, self._chunk_size)
        if offset == 0 and size >= self._chunk_size and seq != self._seq:
            self._load(seq)  # whole chunks: no copy through a buffer
            piece = self._data[: min(size, len(self._data))]
            if self._digest is not None and self._hashed == self._pos:
                self._digest.update(piece)
                self._hashed += len(piece)
            self._pos += len(piece)
            return piece
        buffer = bytearray(min(size, self.size - self._pos))
        got = self.readinto(buffer)
        return bytes(buffer[:got])

    def _check(self) -> None:
        digest, self._digest = self._digest, None
        if digest is None or self._hashed != self.size:
            return
        if digest.hexdigest() != self.row.sha256:
            logger.error(
                "file store %r: the chunks of a file do not match its SHA-256", self.store.name
            )
            raise FileCorrupt(self.row.filename)


class DatabaseBytes:
    """``database``: the bytes in ``silo_file_chunks`` (see the module docstring)."""

    kind = "database"

    def __init__(self, store: StoreView) -> None:
        self.store = store
        self.cache = Cache(store)

    def _records(self) -> FileRecords:
        records = self.store.records
        if records is None:
            raise SiloError(f"file store {self.store.name!r}: the database backend needs SQL")
        return records

    def new_location(self, name: str) -> str | None:
        return None

    def sink(self, row: FileRow, directory: str, tmp_name: str) -> Sink:
        return ChunkSink(self._records(), row, self.cache, directory, tmp_name)

    def install(self, tmp: str, path: str) -> None:
        self.cache.install(tmp, path)

    def drop_upload(self, row: FileRow, path: str) -> None:
        self.cache.drop(row, path)

    def here(self, row: FileRow) -> bool:
        return True

    def open(self, row: FileRow, *, buffered: bool = True) -> IO[bytes]:
        reader = ChunkReader(self.store, self._records(), row)
        if not buffered:  # a whole chunk read is the driver's bytes themselves
            return cast(IO[bytes], reader)
        return io.BufferedReader(reader, CHUNK)

    def local_copy(self, row: FileRow) -> str | None:
        return self.cache.get(row, lambda: self.open(row, buffered=False))

    def remove(self, rows: list[FileRow]) -> None:
        for row in rows:  # the chunks went with their rows; the cached copies go now
            if row.sha256 and not row.pending:
                self.cache.drop(row)

    def remove_session(self, sid: str) -> None:
        return None

    def remove_all(self) -> None:
        return None

    def move_session(self, old: str, new: str) -> Callable[[], None]:
        return lambda: None


# -- fsspec ------------------------------------------------------------------------------------


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
            objects.append({"name": relative, "size": info.get("size"), "mtime": _mtime(info)})
        return objects


def _mtime(info: dict[str, Any]) -> float | None:
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


def copy_stream(source: IO[bytes], target: IO[bytes]) -> int:
    """Copy *source* to *target* in large pieces; how many bytes."""
    total = 0
    for chunk in iter(lambda: source.read(COPY_BUFFER), b""):
        target.write(chunk)
        total += len(chunk)
    return total


__all__ = [
    "FILE_MODE",
    "Bytes",
    "Cache",
    "ChunkReader",
    "DatabaseBytes",
    "FsspecBytes",
    "LocalBytes",
    "check_backend",
    "make_bytes",
    "shutil",
]
