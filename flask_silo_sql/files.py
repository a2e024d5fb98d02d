"""FileStore: one directory per session under a base directory.

Same API as flask-silo 0.1.6, without its path flaws: a SID must be a valid
SID before it names a directory, file names go through werkzeug's
``secure_filename`` (so ``../../x`` or ``/etc/passwd`` stay inside the
session's directory), and files are written to a temporary name, synced and
renamed into place, so a partial file is never visible under its final name.

A file store registered with :meth:`Silo.add_file_store
<flask_silo_sql.Silo.add_file_store>` also records every file in
``silo_files`` (size, SHA-256, content type, time), written after the rename,
so a row never points at a missing or partial file; ``list_files``,
``get_path`` and ``total_size_bytes`` answer from that table. Optional
per-file and per-session byte limits raise :class:`FileTooLarge`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from werkzeug.utils import secure_filename

from .errors import FileTooLarge, InvalidFilename, SessionExpired
from .sids import is_valid_sid
from .sql_storage import FileRecord

if TYPE_CHECKING:
    from .sql_storage import SQLStorage
    from .store import SessionStore

logger = logging.getLogger("flask_silo_sql.files")

TEMP_PREFIX = ".silo-upload-"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
"""Mode of stored files: what ``open()`` would give under the process umask."""
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


class FileStore:
    """Per-session file directories under *base_dir*."""

    __slots__ = ("_store", "auto_create", "base_dir", "max_file_bytes", "max_session_bytes", "name")

    def __init__(
        self,
        base_dir: str,
        *,
        auto_create: bool = True,
        name: str | None = None,
        store: SessionStore | None = None,
        max_file_bytes: int | None = None,
        max_session_bytes: int | None = None,
    ) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.auto_create = auto_create
        self.name = name or os.path.basename(self.base_dir)
        self.max_file_bytes = max_file_bytes
        self.max_session_bytes = max_session_bytes
        self._store = store
        if auto_create:
            os.makedirs(self.base_dir, exist_ok=True)

    @property
    def records(self) -> SQLStorage | None:
        """The SQL storage recording this store's files, if any."""
        return self._store.sql if self._store is not None else None

    def _dir(self, sid: str) -> str:
        if not is_valid_sid(sid):
            raise ValueError(f"invalid session id {sid[:40]!r}")
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
        past a byte limit.
        """
        name = safe_filename(filename)
        records = self.records
        limit = self.max_file_bytes
        if records is not None and self.max_session_bytes is not None:
            used = records.file_bytes(self.name, sid, excluding=name)
            room = self.max_session_bytes - used
            limit = room if limit is None else min(limit, room)
        directory = self.session_dir(sid)
        path = os.path.join(directory, name)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; others (a web server) may read
            with os.fdopen(fd, "wb") as out:
                for chunk in _chunks(data):
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise FileTooLarge(name, size, self._limit_hit(limit))
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if records is not None and os.path.lexists(path):
                # The old version's row goes first: a crash before the new row is
                # written leaves an unrecorded file, never a row describing another.
                records.forget_files(self.name, sid, name)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if records is not None:
            record = FileRecord(
                sid, self.name, name, size, digest.hexdigest(), content_type, time.time()
            )
            try:
                recorded = records.record_file(record)
                if not recorded and self._store is not None:
                    self._store.ensure(sid)
                    recorded = records.record_file(record)
                if not recorded:
                    raise SessionExpired(sid)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # no file without its row
                raise
        return path

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
        if records is not None and not records.has_file(self.name, sid, name):
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
            return records.file_names(self.name, sid)
        if not os.path.isdir(directory):
            return []
        return sorted(n for n in os.listdir(directory) if not n.startswith(TEMP_PREFIX))

    def cleanup(self, sid: str, *, rows: bool = True) -> None:
        """Remove the session's files: rows first (unless *rows* is False), then the directory."""
        try:
            directory = self._dir(sid)
        except ValueError:
            return
        records = self.records
        if records is not None and rows:
            records.forget_files(self.name, sid)
        if os.path.isdir(directory):
            shutil.rmtree(directory, ignore_errors=True)

    def cleanup_all(self) -> None:
        """Remove every session directory."""
        records = self.records
        if records is not None:
            records.forget_files(self.name)
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
            return records.file_bytes(self.name)
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
    recorded = {(sid, name) for sid, name, _ in records.file_rows(files.name)}
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
            records.forget_files(files.name, sid, name)
        report.fixed = True
    return report
