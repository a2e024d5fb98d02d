"""What the file modules are given: the store's rows (:class:`FileRecords`) and the store
itself (:class:`StoreView`), so each of them stands below
:class:`~flask_silo_sql.files.FileStore`, never beside it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..errors import SiloError
from .blobs import Bytes
from .body import Piece
from .rows import FileRow, Reservation

if TYPE_CHECKING:
    from .staging import StagedUpload


Backend = Literal["local", "database"] | str
"""``"local"``, ``"database"``, or an fsspec URL."""


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


class StoreView(Protocol):
    """What the file modules below :class:`~flask_silo_sql.files.FileStore` use of it."""

    name: str
    base_dir: str
    host: str
    storage_options: dict[str, Any]
    max_file_bytes: int | None
    max_session_bytes: int | None
    min_free_bytes: int | None

    def session_dir(self, sid: str) -> str: ...

    def drop_bytes(self, rows: list[FileRow]) -> None:
        """The bytes of rows just deleted (their chunks went with them)."""

    @property
    def backend(self) -> str: ...

    @property
    def blobs(self) -> Bytes: ...

    @property
    def records(self) -> FileRecords:
        """The store's rows (a store without rows raises the error that says so)."""
