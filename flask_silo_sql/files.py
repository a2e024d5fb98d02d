"""FileStore: one directory per session under a base directory.

Same API as flask-silo 0.1.6, without its path flaws: a SID must be a valid
SID before it names a directory, file names go through werkzeug's
``secure_filename`` (so ``../../x`` or ``/etc/passwd`` stay inside the
session's directory), and files are written to a temporary name, synced and
renamed into place, so a partial file is never visible under its final name.

A file store registered with :meth:`Silo.add_file_store
<flask_silo_sql.Silo.add_file_store>` also records every file in
``silo_files`` (size, SHA-256, content type, time) through its backend's
:class:`FileRecords`. An upload is streamed to a temporary file before any
lock is taken, then moved under its name (so the path ``save`` returns can be
opened at once), the previous version's row removed first and the version
itself kept aside; its row is written with the request's commit. A request
that fails or answers an error puts the previous version back and keeps no
row. Moves and row writes hold the session directory's lock, so a row never
describes other bytes, even after a crash, and of two uploads of one name one
wins whole. ``list_files``, ``get_path`` and ``total_size_bytes`` answer from
the rows (and this request's uploads).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Protocol

from werkzeug.utils import secure_filename

from .errors import FileTooLarge, InvalidFilename
from .logs import log_failure
from .sids import is_valid_sid

logger = logging.getLogger("flask_silo_sql.files")

TEMP_PREFIX = ".silo-upload-"
FILE_MODE = 0o600
"""Mode of stored files: readable by the application's user only."""
CHUNK = 64 * 1024
MAX_FILENAME_BYTES = 255
"""The longest name a file system (and ``silo_files.filename``) takes."""


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


@dataclass(slots=True)
class FileRow:
    """A stored file's row."""

    sid: str
    filename: str
    size_bytes: int
    sha256: str
    content_type: str | None = None


class StagedUpload:
    """An upload on its way in: complete in a temporary file, then in place awaiting its row.

    :meth:`install` puts the bytes under their name, keeping the version they
    replace under another name; :meth:`keep` (the row was committed) lets that
    version go, :meth:`discard` (no row) puts it back, unless another upload
    has replaced the file meanwhile.
    """

    __slots__ = ("_backup", "_identity", "path", "row", "tmp")

    def __init__(self, tmp: str, path: str, row: FileRow) -> None:
        self.tmp = tmp
        self.path = path
        self.row = row
        self._backup: str | None = None
        self._identity: tuple[int, int] | None = None

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path)

    def install(self) -> None:
        """Move the bytes under their name; call it holding :func:`directory_lock`."""
        if os.path.lexists(self.path):
            backup = os.path.join(self.directory, TEMP_PREFIX + "old-" + secrets.token_hex(8))
            with contextlib.suppress(FileNotFoundError):
                os.link(self.path, backup)  # the old version stays whole under another name
                self._backup = backup
        os.replace(self.tmp, self.path)
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def still_mine(self) -> bool:
        """Whether the file under the name is this upload's bytes."""
        if self._identity is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def keep(self) -> None:
        if self._backup is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._backup)
            self._backup = None

    def discard(self) -> None:
        """Undo the upload: the previous version back (or no file), nothing left over."""
        try:
            if self._identity is None:
                with contextlib.suppress(OSError):
                    os.unlink(self.tmp)
            elif self.still_mine():
                if self._backup is not None:
                    os.replace(self._backup, self.path)
                    self._backup = None
                else:
                    os.unlink(self.path)
        except OSError as exc:
            log_failure(
                logger, "could not undo an upload that was not kept", exc=exc, sid=self.row.sid
            )
        finally:
            self._identity = None
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

    def record(self, upload: StagedUpload) -> None:
        """Put *upload* in place (now) with its row (inside a request: with its commit;
        a request that fails keeps nothing)."""

    def names(self, sid: str) -> list[str]: ...

    def row(self, sid: str, filename: str) -> FileRow | None: ...

    def pending(self, sid: str) -> list[str]:
        """Names this context's request saved and has not committed yet."""

    def used_bytes(self, sid: str, *, excluding: str) -> int: ...

    def total_bytes(self) -> int: ...

    def forget(self, sid: str | None = None, filename: str | None = None) -> int: ...

    def rows(self) -> list[FileRow]: ...


RecordsProvider = Callable[[], "FileRecords | None"]


class FileStore:
    """Per-session file directories under *base_dir*."""

    __slots__ = (
        "_records",
        "auto_create",
        "base_dir",
        "max_file_bytes",
        "max_session_bytes",
        "name",
    )

    def __init__(
        self,
        base_dir: str,
        *,
        auto_create: bool = True,
        name: str | None = None,
        records: RecordsProvider | None = None,
        max_file_bytes: int | None = None,
        max_session_bytes: int | None = None,
    ) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.auto_create = auto_create
        self.name = name or os.path.basename(self.base_dir)
        self.max_file_bytes = max_file_bytes
        self.max_session_bytes = max_session_bytes
        self._records = records
        if auto_create:
            os.makedirs(self.base_dir, exist_ok=True)

    @property
    def records(self) -> FileRecords | None:
        """Where this store's rows are kept, if anywhere (None: files on disk only)."""
        return self._records() if self._records is not None else None

    def _dir(self, sid: str) -> str:
        if not is_valid_sid(sid):
            raise ValueError("invalid session id")
        return os.path.join(self.base_dir, sid)

    def session_dir(self, sid: str) -> str:
        """The directory of session *sid* (created when ``auto_create``)."""
        path = self._dir(sid)
        if self.auto_create:
            os.makedirs(path, exist_ok=True)
        return path

    def save(
        self,
        sid: str,
        filename: str,
        data: IO[bytes] | bytes,
        *,
        content_type: str | None = None,
    ) -> str:
        """Store *data* as *filename* (sanitised) in the session's directory.

        Returns the absolute path of the stored file. Raises
        :class:`InvalidFilename` (a ValueError, ``400`` through the extension)
        for a name with nothing safe left or too long, :class:`FileTooLarge`
        past a byte limit; nothing is kept then.
        """
        name = safe_filename(filename)
        records = self.records
        limit = self.max_file_bytes
        if records is not None and self.max_session_bytes is not None:
            room = self.max_session_bytes - records.used_bytes(sid, excluding=name)
            limit = room if limit is None else min(limit, room)
        directory = self.session_dir(sid)
        path = os.path.join(directory, name)
        tmp, size, digest = self._receive(directory, name, data, limit)
        if records is None:
            os.replace(tmp, path)
            return path
        upload = StagedUpload(tmp, path, FileRow(sid, name, size, digest, content_type))
        try:
            records.record(upload)
        except BaseException:
            upload.discard()
            raise
        return path

    def _receive(
        self, directory: str, name: str, data: IO[bytes] | bytes, limit: int | None
    ) -> tuple[str, int, str]:
        """Stream *data* into a synced temporary file: ``(path, size, sha256)``."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as out:
                for chunk in _chunks(data):
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise FileTooLarge(name, size, self._limit_hit(limit))
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp, size, digest.hexdigest()

    def _limit_hit(self, allowed: int) -> int:
        """The configured limit that *allowed* (bytes left for this file) comes from."""
        if self.max_file_bytes is not None and allowed == self.max_file_bytes:
            return self.max_file_bytes
        return self.max_session_bytes if self.max_session_bytes is not None else allowed

    def get_path(self, sid: str, filename: str) -> str | None:
        """The path of a stored file, or None."""
        try:
            name = safe_filename(filename)
            path = os.path.join(self._dir(sid), name)
        except ValueError:
            return None
        records = self.records
        if (
            records is not None
            and name not in records.pending(sid)
            and records.row(sid, name) is None
        ):
            return None
        return path if os.path.isfile(path) else None

    def list_files(self, sid: str) -> list[str]:
        """Names of the files stored for *sid*."""
        try:
            directory = self._dir(sid)
        except ValueError:
            return []
        records = self.records
        if records is not None:
            return sorted({*records.names(sid), *records.pending(sid)})
        if not os.path.isdir(directory):
            return []
        return sorted(n for n in os.listdir(directory) if not n.startswith(TEMP_PREFIX))

    def move_session(self, old: str, new: str) -> Callable[[], None]:
        """Move session *old*'s directory to *new*'s (a SID rotation); returns the undo."""
        source, target = self._dir(old), self._dir(new)
        if not os.path.isdir(source):
            return lambda: None
        os.rename(source, target)  # a directory already at *target* refuses: nothing lost
        return lambda: os.rename(target, source)

    def cleanup(self, sid: str, *, rows: bool = True) -> None:
        """Remove the session's files: rows first (unless *rows* is False), then the directory."""
        try:
            directory = self._dir(sid)
        except ValueError:
            return
        records = self.records
        if records is not None and rows:
            records.forget(sid)
        if os.path.isdir(directory):
            shutil.rmtree(directory, ignore_errors=True)

    def cleanup_all(self) -> None:
        """Remove every session directory."""
        records = self.records
        if records is not None:
            records.forget()
        if os.path.isdir(self.base_dir):
            for name in os.listdir(self.base_dir):
                path = os.path.join(self.base_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)

    @property
    def total_size_bytes(self) -> int:
        """Bytes used by every stored file."""
        records = self.records
        if records is not None:
            return records.total_bytes()
        total = 0
        for dirpath, _, filenames in os.walk(self.base_dir):
            for name in filenames:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, name))
        return total


def _chunks(data: IO[bytes] | bytes | bytearray | memoryview) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data)
        return
    yield from iter(lambda: data.read(CHUNK), b"")


@dataclass
class FsckReport:
    """What :func:`fsck` found (and, with ``fix``, repaired) in one file store."""

    store: str
    unrecorded: list[str] = field(default_factory=list)
    """Files on disk without a row (``sid/filename``)."""
    missing: list[str] = field(default_factory=list)
    """Rows whose file is not on disk (``sid/filename``)."""
    partial: list[str] = field(default_factory=list)
    """Leftover temporary files of interrupted uploads."""
    fixed: bool = False

    @property
    def clean(self) -> bool:
        return not (self.unrecorded or self.missing or self.partial)


def fsck(files: FileStore, *, fix: bool = False) -> FsckReport:
    """Compare a file store's directories with its rows in ``silo_files``.

    With *fix*: files without a row and leftover partial uploads are deleted
    (their session never recorded them, so nothing refers to them), and rows
    without a file are removed.
    """
    records = files.records
    if records is None:
        raise ValueError(f"file store {files.name!r} has no SQL storage to check against")
    report = FsckReport(files.name)
    recorded = {(row.sid, row.filename) for row in records.rows()}
    on_disk: set[tuple[str, str]] = set()
    if os.path.isdir(files.base_dir):
        for sid in sorted(os.listdir(files.base_dir)):
            directory = os.path.join(files.base_dir, sid)
            if not os.path.isdir(directory) or os.path.islink(directory):
                continue
            for name in sorted(os.listdir(directory)):
                if name.startswith(TEMP_PREFIX):
                    report.partial.append(f"{sid}/{name}")
                else:
                    on_disk.add((sid, name))
    report.unrecorded = sorted(f"{s}/{n}" for s, n in on_disk - recorded)
    report.missing = sorted(f"{s}/{n}" for s, n in recorded - on_disk)
    if fix:
        for entry in report.unrecorded + report.partial:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(files.base_dir, entry))
        for entry in report.missing:
            sid, name = entry.split("/", 1)
            records.forget(sid, name)
        report.fixed = True
    return report
