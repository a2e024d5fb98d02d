"""FileStore: per-session files, on this machine's disk, in the database or in an fsspec URL.

Same API as flask-silo 0.1.6 (``save``, ``get_path``, ``list_files``,
``cleanup``, ``cleanup_all``, ``total_size_bytes``, ``session_dir``), without
its path flaws: a SID must be a valid SID before it names a directory, file
names go through werkzeug's ``secure_filename`` (so ``../../x`` or
``/etc/passwd`` stay inside the session's directory), and bytes are written
under a temporary name, so a partial file is never visible under its name.

Where the bytes live is the store's *backend* (:mod:`flask_silo_sql.file_backends`):
``local`` (``<base_dir>/<sid>/<name>`` on the machine that received the
upload), ``database`` (chunks in ``silo_file_chunks``) or an fsspec URL
(``s3://bucket/prefix``, ``file:///mnt/shared``); for the last two
``base_dir`` is this machine's cache of verified copies, so ``get_path``
answers a local path on every machine.

A file store registered with :meth:`Silo.add_file_store
<flask_silo_sql.Silo.add_file_store>` records every file in ``silo_files``
through its backend's :class:`FileRecords`. An upload first gets a *pending*
row, which creates the session if needed and reserves the bytes received so
far against the session's quota, in SQL, as they arrive (so concurrent
uploads cannot all take the last bytes); the bytes stream in without any lock
held; the request's commit turns the pending row into the file's row and
drops the version it replaces, in its transaction. A request that fails or
answers an error keeps nothing (for ``local``, the previous version comes
back). Reads (``list_files``, ``get_path``, ``open``, ``send``) answer from
the rows, and this request's uploads.

File operations never let an ``OSError`` reach the application: it becomes a
:class:`~flask_silo_sql.errors.SiloError` with a JSON answer (``507`` when
the disk is full), logged without the SID its path carries.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import io
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol, overload

from werkzeug.utils import secure_filename

from .errors import (
    FileElsewhere,
    FileNotStored,
    FileStorageError,
    FileTooLarge,
    InsufficientStorage,
    InvalidFilename,
    SiloError,
)
from .file_digest import StreamDigest
from .logs import log_failure
from .sids import is_valid_sid

if TYPE_CHECKING:
    from flask import Response

    from .file_backends import Bytes
    from .file_check import FsckReport

logger = logging.getLogger("flask_silo_sql.files")

TEMP_PREFIX = ".silo-upload-"
"""Names of uploads in progress (files and pending rows); no stored name starts so."""
OLD_PREFIX = TEMP_PREFIX + "old-"
"""A replaced ``local`` version kept aside until its request ends."""
FILE_MODE = 0o600
"""Mode of stored files: readable by the application's user only."""
CHUNK = 1024 * 1024
"""Bytes read from a stream at a time, and the size of a ``database`` chunk."""
Piece = bytes | bytearray | memoryview
"""A piece of a file on its way: a view of a buffer that is filled again later."""
FREE_SPACE_STEP = 8 * 1024 * 1024
"""Bytes an upload receives between two checks of the free-space floor."""
HEARTBEAT_S = 60.0
"""An upload in progress refreshes its pending row at least this often."""
STALE_UPLOAD_S = 3600.0
"""A pending row not refreshed for this long belongs to an upload that died."""
MAX_FILENAME_BYTES = 255
"""The longest name a file system (and ``silo_files.filename``) takes."""
UNLIMITED = 2**62
"""A quota that is no quota (bound instead of None, so one statement serves both)."""
Backend = Literal["local", "database"] | str
"""``"local"``, ``"database"``, or an fsspec URL."""


def safe_filename(filename: str) -> str:
    """A name that cannot leave its directory.

    Raises :class:`InvalidFilename` (a ValueError) if nothing safe is left or
    the name is too long to store.
    """
    name = secure_filename(filename)
    if not name or name.startswith(TEMP_PREFIX):
        raise InvalidFilename(filename)
    if len(name.encode()) > MAX_FILENAME_BYTES:
        raise InvalidFilename(filename, f"longer than {MAX_FILENAME_BYTES} bytes")
    return name


def this_host() -> str:
    """This machine's name, as ``local`` rows record it (``SILO_FILE_HOST`` overrides)."""
    return socket.gethostname()


@dataclass(slots=True)
class FileRow:
    """A row of ``silo_files``: a stored file, or (``pending``) an upload in progress."""

    sid: str
    filename: str
    size_bytes: int
    sha256: str
    content_type: str | None = None
    id: int | None = None
    created_at: float | None = None
    backend: str = "local"
    host: str | None = None
    location: str | None = None
    seen: Any = None
    """``created_at`` exactly as the driver returned it (to delete only an unchanged row)."""

    @property
    def pending(self) -> bool:
        return self.filename.startswith(TEMP_PREFIX)


@dataclass(frozen=True, slots=True)
class StoredFile:
    """What :meth:`FileStore.list_files` (``details=True``) and :meth:`FileStore.stat` say
    about a stored file, including where it is."""

    name: str
    size_bytes: int
    sha256: str
    content_type: str | None
    created_at: dt.datetime | None
    backend: str
    """``local``, ``database`` or ``fsspec``."""
    host: str | None
    """``local``: the machine whose disk holds the bytes (None: unknown, taken as this one)."""
    here: bool
    """Whether this machine can read it (always, except a ``local`` file of another host)."""


@dataclass(slots=True)
class Reservation:
    """An upload's pending row: its id and the bytes it has reserved so far."""

    id: int
    reserved: int
    stale: list[FileRow] = field(default_factory=list)
    """Pending rows of dead uploads of the session, removed when this one began."""


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
        """Whether the previous version's row goes at :meth:`install` (``local``: the bytes
        under the name change there), rather than with the commit."""
        return self.blobs.kind == "local"

    def install(self) -> None:
        """Before the commit (``local``: holding :func:`directory_lock`)."""
        if self.blobs.kind != "local":
            if self.tmp is not None:
                self.blobs.install(self.tmp, self.path)
                self.tmp = None
            return
        if self.tmp is None:
            return
        if os.path.lexists(self.path):
            backup = os.path.join(os.path.dirname(self.path), OLD_PREFIX + secrets.token_hex(8))
            with contextlib.suppress(FileNotFoundError):
                os.link(self.path, backup)  # the old version stays whole under another name
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

    def keep(self) -> None:
        """The row is committed: let the replaced version go."""
        if self._backup is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._backup)
            self._backup = None
        replaced, self.replaced = self.replaced, []
        if replaced:
            self.blobs.remove(replaced)

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
                    os.replace(self._backup, self.path)
                    self._backup = None
                else:
                    os.unlink(self.path)
        except Exception as exc:
            log_failure(
                logger, "could not undo an upload that was not kept", exc=exc, sid=self.row.sid
            )
        finally:
            self._identity = None
            self.replaced = []
            self.keep()


@contextmanager
def directory_lock(directory: str) -> Iterator[None]:
    """Hold the session directory's lock (``flock`` on the directory itself): one upload
    at a time moves in and writes its row. A directory removed meanwhile (its session
    expired) has nothing left to guard."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class FileRecords(Protocol):
    """Where a file store keeps its rows (a backend with SQL tables has them)."""

    database_dir: str | None
    """The directory of an SQLite database (its disk is watched by the free-space floor)."""

    def now(self) -> float:
        """The database's clock (Unix seconds)."""

    def begin(
        self, row: FileRow, *, pending_name: str, reserve: int, quota: int | None
    ) -> Reservation:
        """An upload of ``row.filename`` starts: its session is created if missing
        (``SessionExpired`` if it expired while the request ran), dead uploads of the
        session are forgotten, and a pending row named *pending_name* reserving
        *reserve* bytes is written (``FileTooLarge`` when they do not fit the quota)."""

    def reserve(
        self, upload: Reservation, row: FileRow, *, needed: int, target: int, quota: int | None
    ) -> None:
        """Reserve at least *needed* bytes, up to *target* (``FileTooLarge`` past the quota;
        ``SessionExpired`` when the session went meanwhile)."""

    def put_chunk(self, row: FileRow, file_id: int, seq: int, data: Piece) -> None: ...

    def read_chunk(self, file_id: int, seq: int, sha256: str) -> bytes | None:
        """Chunk *seq* of file *file_id*, if that row still holds the bytes of *sha256*."""

    def chunk_sizes(self, file_id: int) -> list[tuple[int, int]]: ...

    def stage(self, upload: StagedUpload) -> None:
        """Put *upload* in place (now) with its row (inside a request: with its commit;
        a request that fails keeps nothing)."""

    def release(self, row: FileRow, file_id: int) -> None:
        """Forget an upload that will not be kept (its pending row, its chunks)."""

    def staged(self, sid: str) -> list[StagedUpload]:
        """Uploads this context's request saved and has not committed yet."""

    def names(self, sid: str) -> list[str]: ...

    def row(self, sid: str, filename: str) -> FileRow | None:
        """The file's committed row, if any."""

    def session_rows(self, sid: str) -> list[FileRow]: ...

    def pending_rows(self, sid: str) -> list[FileRow]:
        """The session's uploads in progress (their pending rows)."""

    def row_by_id(self, file_id: int) -> FileRow | None: ...

    def total_bytes(self) -> int: ...

    def forget(self, sid: str | None = None, filename: str | None = None) -> list[FileRow]:
        """Delete rows (and their chunks); returns what they named."""

    def forget_id(self, file_id: int, *, seen: Any = None) -> FileRow | None:
        """Delete one row (only if its ``created_at`` is still *seen*, when given)."""

    def rows(self) -> list[FileRow]:
        """Every row of the store, pending ones included."""

    def live(self, sids: list[str]) -> tuple[set[str], set[str]]:
        """Of *sids*: those with a session, and those remembered as expired."""

    def rows_of(self, sids: list[str]) -> list[tuple[str, str, str]]:
        """``(sid, filename, sha256)`` of the stored files of *sids*."""

    def orphan_chunks(self) -> list[int]:
        """File ids that chunks name without a row (a host engine that does not cascade)."""


RecordsProvider = Callable[[], "FileRecords | None"]


class Readable(Protocol):
    """What ``save`` reads from: any binary stream (a file, a request body, a socket)."""

    def read(self, size: int = ..., /) -> bytes | None: ...


def file_errors(
    store: str, sid: str | None, action: str
) -> contextlib.AbstractContextManager[None]:
    """Turn an ``OSError`` of a file operation into a :class:`SiloError` (logged, SID kept out)."""
    return _file_errors(store, sid, action)


@contextmanager
def _file_errors(store: str, sid: str | None, action: str) -> Iterator[None]:
    try:
        yield
    except SiloError:
        raise
    except OSError as exc:
        raise storage_error(exc, store, sid, action) from None


def storage_error(exc: BaseException, store: str, sid: str | None, action: str) -> SiloError:
    """The :class:`SiloError` a failed file operation answers with (it is logged here)."""
    log_failure(logger, "file store %r could not %s", store, action, exc=exc, sid=sid)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(store)
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    return FileStorageError(store, action, reason, remote=not isinstance(exc, OSError))


class FileStore:
    """Per-session files of one store (see the module docstring)."""

    __slots__ = (
        "_backend",
        "_blobs",
        "_records",
        "auto_create",
        "base_dir",
        "host",
        "max_file_bytes",
        "max_session_bytes",
        "min_free_bytes",
        "name",
        "storage_options",
    )

    def __init__(
        self,
        base_dir: str,
        *,
        auto_create: bool = True,
        name: str | None = None,
        records: RecordsProvider | None = None,
        backend: Backend | None = None,
        storage_options: dict[str, Any] | None = None,
        host: str | None = None,
        max_file_bytes: int | None = None,
        max_session_bytes: int | None = None,
        min_free_bytes: int | None = None,
    ) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.auto_create = auto_create
        self.name = name or os.path.basename(self.base_dir)
        self.max_file_bytes = max_file_bytes
        self.max_session_bytes = max_session_bytes
        self.min_free_bytes = min_free_bytes
        """Uploads are refused (``507``) while the disk has less free space than this."""
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.host = host or this_host()
        self._records = records
        self._backend: Backend = backend or "local"
        self._blobs: Bytes | None = None
        if auto_create:
            os.makedirs(self.base_dir, exist_ok=True)

    # -- where the bytes are ---------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """``"local"``, ``"database"`` or the fsspec URL the bytes go to."""
        return self._backend

    @backend.setter
    def backend(self, value: Backend) -> None:
        self._backend = value or "local"
        self._blobs = None

    @property
    def blobs(self) -> Bytes:
        """The backend object (made on first use)."""
        found = self._blobs
        if found is None:
            from .file_backends import make_bytes

            found = self._blobs = make_bytes(self)
        return found

    @property
    def records(self) -> FileRecords | None:
        """Where this store's rows are kept, if anywhere (None: files on disk only)."""
        return self._records() if self._records is not None else None

    def _needs_records(self) -> FileRecords | None:
        records = self.records
        if records is None and self.blobs.kind != "local":
            raise SiloError(
                f"file store {self.name!r}: the {self.blobs.kind} backend needs SQL storage"
            )
        return records

    def _dir(self, sid: str) -> str:
        if not is_valid_sid(sid):
            raise ValueError("invalid session id")
        return os.path.join(self.base_dir, sid)

    def session_dir(self, sid: str) -> str:
        """The directory of session *sid* (created when ``auto_create``): its files for the
        ``local`` backend, this machine's cached copies for the others."""
        path = self._dir(sid)
        if self.auto_create:
            with file_errors(self.name, sid, "create a session directory"):
                os.makedirs(path, exist_ok=True)
        return path

    # -- storing ---------------------------------------------------------------------------

    def save(
        self,
        sid: str,
        filename: str,
        data: Readable | bytes,
        *,
        content_type: str | None = None,
        size: int | None = None,
    ) -> str:
        """Store *data* (bytes or a binary stream, read in chunks) as *filename* (sanitised).

        Returns a local path to the stored file (for ``database`` and fsspec
        backends, this machine's cached copy). *size*, when known (else taken
        from the stream where it says, like a request body's
        ``Content-Length``), is reserved against the session's quota before a
        byte is read. Raises :class:`InvalidFilename` (a ValueError, ``400``)
        for a name with nothing safe left or too long, :class:`FileTooLarge`
        (``413``) past a byte limit, :class:`InsufficientStorage` (``507``)
        below the free-space floor or on a full disk; nothing is kept then.
        """
        name = safe_filename(filename)
        self._dir(sid)  # a valid SID, or ValueError
        records = self._needs_records()
        declared = size if size is not None else declared_size(data)
        limit = self.max_file_bytes
        if declared is not None and limit is not None and declared > limit:
            raise FileTooLarge(name, declared, limit)
        self._check_free_space(self.base_dir, records, sid)  # a refusal creates no directory
        directory = self.session_dir(sid)
        if records is None:
            return self._save_unrecorded(sid, name, directory, data)
        backend = self.blobs
        row = FileRow(
            sid,
            name,
            0,
            "",
            content_type,
            backend=backend.kind,
            host=self.host if backend.kind == "local" else None,
            location=backend.new_location(name),
        )
        pending = TEMP_PREFIX + secrets.token_hex(8)
        reservation = records.begin(
            row, pending_name=pending, reserve=declared or 0, quota=self.max_session_bytes
        )
        if reservation.stale:
            self._forgotten(reservation.stale)
        row.id = reservation.id
        try:
            upload = self._receive(records, row, reservation, directory, pending, data)
        except BaseException:
            with contextlib.suppress(Exception):
                records.release(row, reservation.id)
            raise
        with file_errors(self.name, sid, "store a file"):
            records.stage(upload)
        return upload.path

    def _receive(
        self,
        records: FileRecords,
        row: FileRow,
        reservation: Reservation,
        directory: str,
        pending: str,
        data: Readable | bytes,
    ) -> StagedUpload:
        """Stream *data* to the backend (and a local temporary file), reserving as it comes.

        Past what was reserved, each chunk reserves what it adds (with a quota),
        so concurrent uploads of unknown size never take more than is left.
        """
        sid, name = row.sid, row.filename
        limit = self.max_file_bytes
        quota = self.max_session_bytes
        digest = StreamDigest()  # hashed beside the writes
        size = 0
        checked = 0
        beat = time.monotonic()
        with file_errors(self.name, sid, "store a file"):
            sink = self.blobs.sink(row, directory, pending)
        try:
            chunks = _chunks(data, declared_size(data))
            while True:
                chunk = next(chunks, None)  # the client's own errors pass as they are
                if chunk is None:
                    break
                size += len(chunk)
                if limit is not None and size > limit:
                    raise FileTooLarge(name, size, limit)
                if size - checked >= FREE_SPACE_STEP:
                    self._check_free_space(directory, records, sid)
                    checked = size
                over = quota is not None and size > reservation.reserved
                if over or time.monotonic() - beat > HEARTBEAT_S:
                    target = max(size, reservation.reserved + CHUNK)  # ahead, by the chunk
                    records.reserve(reservation, row, needed=size, target=target, quota=quota)
                    beat = time.monotonic()
                digest.update(chunk)
                with file_errors(self.name, sid, "store a file"):
                    sink.write(chunk)
            with file_errors(self.name, sid, "store a file"):
                sink.finish()
        except BaseException:
            try:
                sink.abort()
            except Exception as again:
                log_failure(logger, "could not remove a partial upload", exc=again, sid=sid)
            raise
        row.size_bytes = size
        row.sha256 = digest.hexdigest()
        return StagedUpload(self.blobs, row, reservation, sink.tmp, sink.path(row))

    def _save_unrecorded(self, sid: str, name: str, directory: str, data: Readable | bytes) -> str:
        """flask-silo's behaviour, for a store without rows: the file on disk, nothing else."""
        limit = self.max_file_bytes
        path = os.path.join(directory, name)
        with file_errors(self.name, sid, "store a file"):
            fd, tmp = _create_temp(directory, TEMP_PREFIX + secrets.token_hex(8))
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                chunks = _chunks(data, declared_size(data))
                while True:
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise FileTooLarge(name, size, limit)
                    with file_errors(self.name, sid, "store a file"):
                        out.write(chunk)
                with file_errors(self.name, sid, "store a file"):
                    out.flush()
                    os.fsync(out.fileno())
            with file_errors(self.name, sid, "store a file"):
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def _check_free_space(self, directory: str, records: FileRecords | None, sid: str) -> None:
        """``507`` while the disk holding *directory* (and an SQLite database the bytes go
        to) has less free space than :attr:`min_free_bytes`: the database keeps room."""
        floor = self.min_free_bytes
        if not floor:
            return
        places = [directory]
        if records is not None and records.database_dir and self.blobs.kind == "database":
            places.append(records.database_dir)
        for place in places:
            try:
                free = shutil.disk_usage(place).free
            except OSError:
                continue
            if free < floor:
                logger.warning(
                    "file store %r refused an upload: %d bytes free, the floor is %d",
                    self.name,
                    free,
                    floor,
                )
                raise InsufficientStorage(self.name)

    # -- reading ---------------------------------------------------------------------------

    def _staged(self, records: FileRecords | None, sid: str, name: str) -> StagedUpload | None:
        if records is None:
            return None
        for upload in records.staged(sid):
            if upload.row.filename == name:
                return upload
        return None

    def _lookup(self, sid: str, filename: str) -> tuple[FileRecords | None, str, FileRow | None]:
        """``(records, name, row)``; the row is this request's upload if it saved one."""
        name = safe_filename(filename)
        self._dir(sid)
        records = self._needs_records()
        if records is None:
            return None, name, None
        staged = self._staged(records, sid, name)
        if staged is not None:
            return records, name, staged.row
        return records, name, records.row(sid, name)

    def get_path(self, sid: str, filename: str) -> str | None:
        """A local path to the stored file, or None (no such file, or a ``local`` file of
        another host). For ``database`` and fsspec backends: a copy in this machine's
        cache, fetched when absent and checked against the row's SHA-256."""
        try:
            records, name, row = self._lookup(sid, filename)
        except ValueError:
            return None
        if records is None:
            path = os.path.join(self._dir(sid), name)
            return path if os.path.isfile(path) else None
        if row is None:
            return None
        staged = self._staged(records, sid, name)
        if staged is not None:
            return staged.path
        if not self.blobs.here(row):
            return None
        with file_errors(self.name, sid, "read a file"):
            return self.blobs.local_copy(row)

    def open(self, sid: str, filename: str) -> IO[bytes]:
        """A readable binary stream of the stored file, from whichever backend holds it.

        Raises :class:`FileNotStored` (a ``FileNotFoundError``, ``404``) when there is no
        such file, :class:`FileElsewhere` (``409``) for a ``local`` file of another host.
        """
        try:
            records, name, row = self._lookup(sid, filename)
        except ValueError:
            raise FileNotStored(filename) from None
        if records is None:
            path = os.path.join(self._dir(sid), name)
            try:
                return open(path, "rb")
            except FileNotFoundError:
                raise FileNotStored(name) from None
            except OSError as exc:
                raise storage_error(exc, self.name, sid, "read a file") from None
        staged = self._staged(records, sid, name)
        with file_errors(self.name, sid, "read a file"):
            if staged is not None:
                return open(staged.path, "rb")
            if row is None:
                raise FileNotStored(name)
            if not self.blobs.here(row):
                raise FileElsewhere(name, row.host)
            return self.blobs.open(row)

    def stat(self, sid: str, filename: str) -> StoredFile | None:
        """What is known of a stored file (size, hash, where it is), or None."""
        try:
            records, name, row = self._lookup(sid, filename)
        except ValueError:
            return None
        if records is None:
            path = os.path.join(self._dir(sid), name)
            if not os.path.isfile(path):
                return None
            return StoredFile(name, os.path.getsize(path), "", None, None, "local", None, True)
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
            self.blobs.here(row),
        )

    def send(
        self,
        sid: str,
        filename: str,
        *,
        as_attachment: bool = False,
        download_name: str | None = None,
    ) -> Response:
        """A Flask response streaming the file from its backend: ``ETag`` (its SHA-256),
        ``Last-Modified``, ``304`` to a matching conditional request, ``206`` to a single
        ``Range`` (``416`` when unsatisfiable), a safe ``Content-Disposition``."""
        from .file_serving import send

        return send(self, sid, filename, as_attachment=as_attachment, download_name=download_name)

    @overload
    def list_files(self, sid: str) -> list[str]: ...

    @overload
    def list_files(self, sid: str, *, details: Literal[False]) -> list[str]: ...

    @overload
    def list_files(self, sid: str, *, details: Literal[True]) -> list[StoredFile]: ...

    def list_files(self, sid: str, *, details: bool = False) -> list[str] | list[StoredFile]:
        """Names of the files stored for *sid*, wherever they are; with *details*, a
        :class:`StoredFile` for each (its size, hash and where it is)."""
        try:
            directory = self._dir(sid)
        except ValueError:
            return []
        records = self._needs_records()
        if records is not None:
            rows = {row.filename: row for row in records.session_rows(sid)}
            for upload in records.staged(sid):
                rows[upload.row.filename] = upload.row
            if details:
                return [self._describe(rows[name]) for name in sorted(rows)]
            return sorted(rows)
        if not os.path.isdir(directory):
            return []
        names = sorted(n for n in os.listdir(directory) if not n.startswith(TEMP_PREFIX))
        if details:
            return [found for n in names if (found := self.stat(sid, n)) is not None]
        return names

    @property
    def total_size_bytes(self) -> int:
        """Bytes used by every stored file (on every machine)."""
        records = self.records
        if records is not None:
            return records.total_bytes()
        total = 0
        for dirpath, _, filenames in os.walk(self.base_dir):
            for name in filenames:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, name))
        return total

    # -- removing --------------------------------------------------------------------------

    def _forgotten(self, rows: list[FileRow]) -> None:
        """The bytes of rows just deleted (fsspec objects; chunks went with their rows)."""
        try:
            self.blobs.remove(rows)
        except Exception as exc:
            log_failure(logger, "could not remove the bytes of forgotten files", exc=exc, sid=None)

    def move_session(self, old: str, new: str) -> Callable[[], None]:
        """Move session *old*'s files to *new* (a SID rotation); returns the undo."""
        source, target = self._dir(old), self._dir(new)
        undo_bytes = self.blobs.move_session(old, new) if self.blobs.kind != "local" else None
        if not os.path.isdir(source):
            return undo_bytes or (lambda: None)
        try:
            os.rename(source, target)  # a directory already at *target* refuses: nothing lost
        except BaseException:
            if undo_bytes is not None:
                undo_bytes()
            raise

        def undo() -> None:
            os.rename(target, source)
            if undo_bytes is not None:
                undo_bytes()

        return undo

    def cleanup(self, sid: str, *, rows: bool = True) -> None:
        """Remove the session's files: rows first (unless *rows* is False: they went with
        their session), then its bytes (fsspec objects) and its directory here."""
        try:
            directory = self._dir(sid)
        except ValueError:
            return
        records = self.records
        if records is not None and rows:
            self._forgotten(records.forget(sid))
        if self.blobs.kind != "local":
            self.blobs.remove_session(sid)
        if os.path.isdir(directory):
            shutil.rmtree(directory, ignore_errors=True)

    def cleanup_all(self) -> None:
        """Remove every session's files (rows, bytes, directories here)."""
        records = self.records
        if records is not None:
            self._forgotten(records.forget())
        if self.blobs.kind != "local":
            self.blobs.remove_all()
        if os.path.isdir(self.base_dir):
            for name in os.listdir(self.base_dir):
                path = os.path.join(self.base_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)

    def maintain(self, *, grace: float = 300.0) -> int:
        """Remove what this machine keeps of sessions that no longer exist (``local``
        directories and cached copies; for fsspec, the objects of sessions whose removal
        failed before), and cached copies no row names. Run after each sweep; returns
        how many session directories went."""
        from .file_maintenance import maintain

        return maintain(self, grace=grace)

    def check(self, *, fix: bool = False, grace: float = 600.0, verify: bool = True) -> FsckReport:
        """:func:`fsck` of this store."""
        return fsck(self, fix=fix, grace=grace, verify=verify)


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new file *name* in *directory* (recreated if a sweep removed it meanwhile)."""
    path = os.path.join(directory, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, FILE_MODE), path
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)
        return os.open(path, flags, FILE_MODE), path


def declared_size(data: Any) -> int | None:
    """How many bytes *data* says it holds, if it says: its length, what is left of a
    seekable file, a request body's ``Content-Length`` (werkzeug's ``LimitedStream``)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data)
    limit = getattr(data, "limit", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        return max(0, limit - int(getattr(data, "_pos", 0) or 0))
    try:
        if data.seekable():
            here = data.tell()
            end = data.seek(0, os.SEEK_END)
            data.seek(here)
            return max(0, int(end) - int(here))
    except (AttributeError, OSError, ValueError):
        pass
    return None


def _defined_by(kind: type, name: str) -> type | None:
    return next((klass for klass in kind.__mro__ if name in vars(klass)), None)


_RAW_READ = _defined_by(io.RawIOBase, "read")
"""io's own ``read`` of raw streams, made of their ``readinto``."""


def _fills_in_place(data: object) -> bool:
    """Whether *data*'s ``readinto`` gives what its ``read`` gives: both come from one
    class (files, ``BytesIO``), or its ``read`` is io's own, made of its ``readinto``
    (werkzeug's request stream). A stream that defines only ``read`` is read with it."""
    kind = type(data)
    filler = _defined_by(kind, "readinto")
    reader = _defined_by(kind, "read")
    return filler not in (None, _RAW_READ) and reader in (filler, _RAW_READ)


def _chunks(
    data: Readable | bytes | bytearray | memoryview, expected: int | None = None
) -> Iterator[Piece]:
    """*data* in pieces of :data:`CHUNK` bytes (the last one shorter), none of them
    copied twice. A piece stays as it is until the piece after the next one is asked
    for (the hash of one may run while the next is read), then its buffer is filled
    again: fresh memory costs a page fault every 4 KiB, the reuse none. A stream that
    can ``readinto`` fills each piece in place; while
    *expected* (the size *data* declared) is not reached, a fill asks for no more
    than is left, so that a request body (werkzeug's ``LimitedStream``) fills the
    piece itself instead of a buffer of its own copied over."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        whole = memoryview(data)
        for start in range(0, len(whole), CHUNK):
            yield whole[start : start + CHUNK]
        return
    readinto = getattr(data, "readinto", None) if _fills_in_place(data) else None
    if readinto is None:
        while True:
            chunk = data.read(CHUNK)
            if not chunk:
                return
            yield bytes(chunk)
    left = expected or 0
    pair = (bytearray(CHUNK), bytearray(CHUNK))
    turn = 0
    while True:
        piece = pair[turn]  # the other one may still be hashed
        turn ^= 1
        filled = 0
        view = memoryview(piece)
        while filled < CHUNK:
            end = min(CHUNK, filled + left) if left > 0 else CHUNK
            got = readinto(view[filled:end])
            if not got:
                break
            filled += got
            left -= got
        if filled == CHUNK:
            yield piece
            continue
        if filled:
            yield view[:filled]  # the last piece
        return


def fsck(
    files: FileStore, *, fix: bool = False, grace: float = 600.0, verify: bool = True
) -> FsckReport:
    """Compare a file store's bytes with its rows (see :mod:`flask_silo_sql.file_check`)."""
    from .file_check import fsck as check

    return check(files, fix=fix, grace=grace, verify=verify)
