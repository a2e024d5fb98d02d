"""The parts every file module shares: a file's row, its pieces, its limits, its errors.

:class:`~flask_silo_sql.files.FileStore` puts them together; its backends
(:mod:`.file_backends`), its checks (:mod:`.file_check`), its upkeep
(:mod:`.file_maintenance`) and its serving (:mod:`.file_serving`) take the
store as a :class:`StoreView`, what they need of it, so each of them stands
below the store, never beside it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import io
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import IO, Any, Literal, Protocol

from flask import has_request_context, request
from werkzeug.utils import secure_filename

from .errors import (
    FileStorageError,
    InsufficientStorage,
    InvalidFilename,
    RequestBodyIncomplete,
    SiloError,
)
from .logs import log_failure, silo_logger

logger = silo_logger("flask_silo_sql.files")

TEMP_PREFIX = ".silo-upload-"
"""Names of uploads in progress (files and pending rows); no stored name starts so."""
OLD_PREFIX = TEMP_PREFIX + "old-"
"""A ``local`` version kept aside while an upload that replaces it is not committed."""
RETIRED_PREFIX = TEMP_PREFIX + "retired-"
"""Name of the row of a replaced ``database``/fsspec version, kept for its readers."""
RETIRED_KEEP_S = 3600.0
"""How long a replaced version's bytes stay for the downloads that began before."""
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
        """An upload in progress, or a replaced version kept for its readers (``retired``)."""
        return self.filename.startswith(TEMP_PREFIX)

    @property
    def retired(self) -> bool:
        """A replaced version whose bytes stay until no download can need them."""
        return self.filename.startswith(RETIRED_PREFIX)


def kept_aside(directory: str, row: FileRow) -> str:
    """Where a ``local`` row's bytes are while an upload that replaces them is not
    committed: a link named after the row, so a reader of the row finds them."""
    return os.path.join(directory, f"{OLD_PREFIX}{row.id}-{row.sha256[:16]}")


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
        old = self.row.sid
        moved = os.sep.join(sid if part == old else part for part in self.path.split(os.sep))
        if self.blobs.kind != "local":
            self.blobs.drop_upload(replace(self.row, sid=sid), moved)
            return
        if self._identity is None:
            return
        try:
            st = os.stat(moved)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(moved)
        except FileNotFoundError:
            pass

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

    def interrupted(self, row: FileRow) -> SiloError | None:
        """None while the upload's pending row (``row.id``) is still its session's; else
        why not (its session reset: ``UploadInterrupted``; rotated or expired:
        ``SessionExpired``)."""

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

    def forget_retired(self, before: float) -> list[FileRow]:
        """Delete the rows of versions replaced before *before* (database clock), and their
        chunks; returns what they named (their objects go next)."""


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


class Sink(Protocol):
    """Where an upload's bytes go while they arrive."""

    tmp: str | None
    """A local temporary file holding them too (None: none was needed)."""

    def write(self, chunk: Piece) -> None: ...

    def finish(self) -> None:
        """Every byte is durable where it belongs."""

    def abort(self) -> None:
        """Nothing of it stays (an upload that failed)."""

    def path(self, row: FileRow) -> str:
        """The local path ``save`` returns for the complete *row*."""


class Bytes(Protocol):
    """One store's bytes (see the module docstring)."""

    kind: str
    """``local``, ``database`` or ``fsspec`` (``silo_files.backend``)."""

    def new_location(self, name: str) -> str | None: ...

    def sink(self, row: FileRow, directory: str, tmp_name: str) -> Sink: ...

    def install(self, tmp: str, path: str) -> None:
        """Before the commit: the local temporary file becomes the cached copy at *path*."""

    def drop_upload(self, row: FileRow, path: str) -> None:
        """An upload that is not kept: its cached copy and its object go."""

    def here(self, row: FileRow) -> bool:
        """Whether this machine can read *row*'s bytes."""

    def local_copy(self, row: FileRow) -> str | None: ...

    def open(self, row: FileRow, *, buffered: bool = True) -> IO[bytes]:
        """A stream of *row*'s bytes; unbuffered, one read in whole pieces (a response
        body), so that a backend may hand over what it fetched without a copy."""

    def remove(self, rows: list[FileRow]) -> None:
        """The bytes of rows that were deleted."""

    def remove_session(self, sid: str) -> None: ...

    def remove_all(self) -> None: ...

    def move_session(self, old: str, new: str) -> Callable[[], None]: ...


class StoreView(Protocol):
    """What the file modules below :class:`~flask_silo_sql.files.FileStore` use of it."""

    name: str
    base_dir: str
    host: str
    storage_options: dict[str, Any]

    @property
    def backend(self) -> str: ...

    @property
    def blobs(self) -> Bytes: ...

    @property
    def records(self) -> FileRecords | None: ...


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new file *name* in *directory* (recreated if a sweep removed it meanwhile)."""
    path = os.path.join(directory, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, FILE_MODE), path
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)
        return os.open(path, flags, FILE_MODE), path


def announced_length(data: object) -> int | None:
    """The current request's ``Content-Length`` when *data* is its body. A WSGI server may
    end a body early without an error (gunicorn does when the client goes away), so an
    upload must count what it got against what was announced."""
    if not has_request_context():
        return None
    if data is not request.environ.get("wsgi.input") and data is not request.__dict__.get("stream"):
        return None
    return request.content_length


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
    data: Readable | bytes | bytearray | memoryview,
    expected: int | None = None,
    announced: int | None = None,
) -> Iterator[Piece]:
    """:func:`_pieces` of *data*, counted: a request body that ends before the
    *announced* length (its ``Content-Length``, which some servers end without an
    error when the client goes away) raises :class:`RequestBodyIncomplete`."""
    received = 0
    for piece in _pieces(data, expected):
        received += len(piece)
        yield piece
    if announced is not None and received < announced:
        raise RequestBodyIncomplete(announced, received)


def _pieces(
    data: Readable | bytes | bytearray | memoryview, expected: int | None
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
