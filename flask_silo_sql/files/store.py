"""FileStore: per-session files, on this machine's disk, in the database or in an fsspec URL.

Same API as flask-silo 0.1.6 (``save``, ``get_path``, ``list_files``,
``cleanup``, ``cleanup_all``, ``total_size_bytes``, ``session_dir``), without
its path flaws: a SID must be a valid SID before it names anything, and then it is
never a path: a session's directory is named by its key (``docs/sids-at-rest.md``), file
names go through werkzeug's ``secure_filename`` (so ``../../x`` or
``/etc/passwd`` stay inside the session's directory), and bytes are written
under a temporary name, so a partial file is never visible under its name.

Where the bytes live is the store's *backend* (:mod:`flask_silo_sql.files.backends`):
``local`` (``<base_dir>/<key>/<name>`` on the machine that received the
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
takes the version it replaces out of sight, in one transaction: readers see
the old version whole until then, and a download reads the version it began
to its end (see ``docs/file-versions.md``). A request that fails or answers
an error keeps nothing (for ``local``, the previous version comes back).
Reads (``list_files``, ``get_path``, ``open``, ``send``) answer from the
rows, and this request's uploads. The store checks SIDs and names, then hands
each operation to its catalog: :mod:`.recorded` (its rows), or, for a store
without rows (a ``FileStore`` of its own, a storage without tables),
:mod:`.unrecorded` (its disk alone, flask-silo's way).

File operations never let an ``OSError`` reach the application: it becomes a
:class:`~flask_silo_sql.errors.SiloError` with a JSON answer (``507`` when
the disk is full), logged without the SID its path carries.
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from ..errors import FileNotStored
from ..instruments.seams import traced_save, traced_send
from ..keys import is_key, session_key
from ..logs import log_failure, silo_logger
from ..sids import is_valid_sid
from .backends import make_bytes
from .blobs import Bytes
from .body import Readable
from .catalog import Catalog, FileKeeping, RecordsProvider
from .check import FsckReport
from .failures import file_errors
from .limits import safe_filename
from .locks import make_directory
from .records import Backend, FileRecords
from .rekey import rekey_directories, rekey_objects
from .rows import FileRow, StoredFile
from .serving import send as send_file
from .settings import FileSettings, this_host
from .unrecorded import UNRECORDED, DiskOnly

if TYPE_CHECKING:
    from flask import Response


logger = silo_logger("flask_silo_sql.files")

S = TypeVar("S")
P = ParamSpec("P")
R = TypeVar("R")


def _unrecorded() -> FileKeeping:
    """The keeping of a ``FileStore`` of its own: no rows, its disk alone."""
    return UNRECORDED


def _key(sid: str) -> str:
    """The key of a valid SID (a key as it is); anything else as it is, for ``_dir`` to refuse."""
    return session_key(sid) if is_key(sid) or is_valid_sid(sid) else sid


def keyed(method: Callable[Concatenate[S, str, P], R]) -> Callable[Concatenate[S, str, P], R]:
    """The method gets the session's key where its caller passed the SID."""

    def with_key(self: S, sid: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return method(self, _key(sid), *args, **kwargs)

    # Named and documented as the method, but no ``__wrapped__``: that marks what the
    # instruments wrap.
    for name in ("__module__", "__name__", "__qualname__", "__doc__", "__annotations__"):
        setattr(with_key, name, getattr(method, name))
    setattr(with_key, "__signature__", inspect.signature(method))  # noqa: B010
    return with_key


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
        self._records: RecordsProvider = records or _unrecorded
        self._backend: Backend = backend or "local"
        self._blobs: Bytes | None = None
        if auto_create:
            os.makedirs(self.base_dir, exist_ok=True)

    def configure(self, settings: FileSettings) -> None:
        """Take *settings* (its limits, its backend, this machine's name)."""
        self.max_file_bytes = settings.max_file_bytes
        self.max_session_bytes = settings.max_session_bytes
        self.min_free_bytes = settings.min_free_bytes
        self.backend = settings.backend
        self.storage_options = dict(settings.storage_options)
        self.host = settings.host or this_host()

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
            found = self._blobs = make_bytes(self)
        return found

    @property
    def records(self) -> FileRecords:
        """Where this store's rows are kept (a store without rows raises the error that
        says so)."""
        return self._catalog().records

    def _catalog(self) -> Catalog:
        """How this store knows its files: from its rows, or, without rows, its disk."""
        return self._records().catalog(self)

    def _dir(self, key: str) -> str:
        if not is_key(key):
            raise ValueError("invalid session id")
        return os.path.join(self.base_dir, key)

    @keyed
    def session_dir(self, sid: str) -> str:
        """The directory of session *sid* (created when ``auto_create``): its files for the
        ``local`` backend, this machine's cached copies for the others."""
        path = self._dir(sid)
        if self.auto_create:
            with file_errors(self.name, sid, "create a session directory"):
                make_directory(path)
        return path

    def _named(self, sid: str, filename: str) -> str:
        """*filename* made safe, once *sid* is a valid key (else ValueError)."""
        name = safe_filename(filename)
        self._dir(sid)
        return name

    # -- storing ---------------------------------------------------------------------------

    @traced_save
    @keyed
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
        byte is read. The request's own body, read whole, must hold its
        ``Content-Length``: a body that ends before (a client that went away,
        which some servers end without an error) raises
        :class:`RequestBodyIncomplete` (``400``); a view that read part of the
        body first passes what is left as *size*. Raises
        :class:`InvalidFilename` (a ValueError, ``400``) for a name with nothing
        safe left or too long, :class:`FileTooLarge` (``413``) past a byte
        limit, :class:`InsufficientStorage` (``507``) below the free-space floor
        or on a full disk; nothing is kept then.
        """
        name = self._named(sid, filename)
        return self._catalog().save(sid, name, data, content_type=content_type, size=size)

    # -- reading ---------------------------------------------------------------------------

    @keyed
    def get_path(self, sid: str, filename: str) -> str | None:
        """A local path to the stored file, or None (no such file, or a ``local`` file of
        another host). For ``database`` and fsspec backends: a copy in this machine's
        cache, fetched when absent and checked against the row's SHA-256."""
        try:
            name = self._named(sid, filename)
        except ValueError:
            return None
        return self._catalog().path(sid, name)

    @keyed
    def open(self, sid: str, filename: str) -> IO[bytes]:
        """A readable binary stream of the stored file, from whichever backend holds it.

        Raises :class:`FileNotStored` (a ``FileNotFoundError``, ``404``) when there is no
        such file, :class:`FileElsewhere` (``409``) for a ``local`` file of another host.
        """
        try:
            name = self._named(sid, filename)
        except ValueError:
            raise FileNotStored(filename) from None
        return self._catalog().open(sid, name, filename)

    @keyed
    def stat(self, sid: str, filename: str) -> StoredFile | None:
        """What is known of a stored file (size, hash, where it is), or None."""
        try:
            name = self._named(sid, filename)
        except ValueError:
            return None
        return self._catalog().stat(sid, name)

    @traced_send
    @keyed
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
        try:
            name = self._named(sid, filename)
        except ValueError:
            raise FileNotStored(filename) from None
        info, stream = self._catalog().opened(sid, name, filename, buffered=False)
        return send_file(info, stream, as_attachment=as_attachment, download_name=download_name)

    @overload
    def list_files(self, sid: str) -> list[str]: ...

    @overload
    def list_files(self, sid: str, *, details: Literal[False]) -> list[str]: ...

    @overload
    def list_files(self, sid: str, *, details: Literal[True]) -> list[StoredFile]: ...

    def list_files(self, sid: str, *, details: bool = False) -> list[str] | list[StoredFile]:
        """Names of the files stored for *sid*, wherever they are; with *details*, a
        :class:`StoredFile` for each (its size, hash and where it is)."""
        sid = _key(sid)
        try:
            self._dir(sid)
        except ValueError:
            return []
        catalog = self._catalog()
        return catalog.details(sid) if details else catalog.names(sid)

    @property
    def total_size_bytes(self) -> int:
        """Bytes used by every stored file (on every machine)."""
        return self._catalog().total_bytes()

    # -- removing --------------------------------------------------------------------------

    def drop_bytes(self, rows: list[FileRow]) -> None:
        """The bytes of rows just deleted (fsspec objects; chunks went with their rows)."""
        try:
            self.blobs.remove(rows)
        except Exception as exc:
            log_failure(logger, "could not remove the bytes of forgotten files", exc=exc, sid=None)

    def move_session(self, old: str, new: str) -> Callable[[], None]:
        """Move session *old*'s files to *new* (a SID rotation); returns the undo."""
        old, new = _key(old), _key(new)
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

    @keyed
    def cleanup(self, sid: str, *, rows: bool = True) -> None:
        """Remove the session's files: rows first (unless *rows* is False: they went with
        their session), then their bytes (fsspec objects, cached copies) and, for an
        expired session, its directory here.

        With *rows* (a reset: the session lives on) only the bytes of the rows it
        forgot go (``local``: under the directory's lock, which an upload holds while
        it moves its bytes in and writes its row, so one committed meanwhile keeps
        both). An upload under way keeps its bytes: its pending row went with the
        others, so it finds itself interrupted at its commit (``409``) and removes
        them itself.
        """
        try:
            directory = self._dir(sid)
        except ValueError:
            return
        # Rows gone with their session leave the disk's part, as a store without rows has.
        catalog = self._catalog() if rows else DiskOnly(self)
        catalog.cleanup(sid, directory)

    def cleanup_all(self) -> None:
        """Remove every session's files (rows, bytes, directories here)."""
        self._catalog().forget_all()
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
        rekey_directories(self.base_dir)  # directories from before SIDs were hashed at rest
        return self._catalog().maintain(grace=grace)

    def check(self, *, fix: bool = False, grace: float = 600.0, verify: bool = True) -> FsckReport:
        """:func:`fsck` of this store."""
        # Directories still named by a SID get their keys' names first (else their rows
        # would count as without bytes).
        rekey_directories(self.base_dir)
        rekey_objects(self.blobs)
        return self._catalog().check(fix=fix, grace=grace, verify=verify)


def fsck(
    files: FileStore, *, fix: bool = False, grace: float = 600.0, verify: bool = True
) -> FsckReport:
    """Compare a file store's bytes with its rows (see :mod:`flask_silo_sql.files.check`),
    once the directories still named by a SID have their keys' names (else their rows
    would count as without bytes)."""
    return files.check(fix=fix, grace=grace, verify=verify)
