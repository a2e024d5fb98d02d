"""How a file store knows its files: a :class:`Catalog`, from its rows
(:class:`~flask_silo_sql.files.recorded.Recorded`) or from its disk alone
(:class:`~flask_silo_sql.files.unrecorded.DiskOnly`), made by what the backend gives
(:class:`FileKeeping`). A backend without tables says so once, by the catalog it makes."""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Protocol

from .body import Readable
from .check import FsckReport
from .records import FileRecords, StoreView
from .rows import StoredFile


class CatalogStore(StoreView, Protocol):
    """What a catalog uses of its :class:`~flask_silo_sql.files.FileStore`."""

    def stat(self, sid: str, filename: str) -> StoredFile | None: ...

    def open(self, sid: str, filename: str) -> IO[bytes]: ...


class Catalog(Protocol):
    """What a file store knows of its files, and how it keeps them: from its rows
    (:class:`~flask_silo_sql.files.recorded.Recorded`), or, for a store without rows,
    from its disk alone (:class:`~flask_silo_sql.files.unrecorded.DiskOnly`).

    :class:`~flask_silo_sql.files.FileStore` checks the SID and the name, then hands
    each operation to its catalog: *sid* is a session's key, *name* a safe file name.
    """

    @property
    def records(self) -> FileRecords:
        """The store's rows (a store without rows raises the error that says so)."""

    def save(
        self,
        sid: str,
        name: str,
        data: Readable | bytes,
        *,
        content_type: str | None,
        size: int | None,
    ) -> str: ...

    def path(self, sid: str, name: str) -> str | None: ...

    def open(self, sid: str, name: str, filename: str) -> IO[bytes]:
        """The file's bytes (*filename*: as the caller named it, for the errors)."""

    def stat(self, sid: str, name: str) -> StoredFile | None: ...

    def opened(
        self, sid: str, name: str, filename: str, *, buffered: bool
    ) -> tuple[StoredFile, IO[bytes]]:
        """The file's description and a stream of the same version's bytes."""

    def names(self, sid: str) -> list[str]: ...

    def details(self, sid: str) -> list[StoredFile]: ...

    def total_bytes(self) -> int: ...

    def cleanup(self, sid: str, directory: str) -> None:
        """Remove the session's files (see :meth:`FileStore.cleanup`)."""

    def forget_all(self) -> None:
        """Forget every row of the store (and the bytes that go with them)."""

    def maintain(self, *, grace: float) -> int:
        """See :meth:`FileStore.maintain`."""

    def check(self, *, fix: bool, grace: float, verify: bool) -> FsckReport:
        """See :func:`~flask_silo_sql.files.check.fsck`."""


class FileKeeping(Protocol):
    """What a backend gives a file store to know its files by: its rows (SQL storage),
    or :data:`~flask_silo_sql.files.unrecorded.UNRECORDED` (no tables: the disk alone,
    flask-silo's way). It says which once, by the catalog it makes."""

    def catalog(self, store: CatalogStore) -> Catalog:
        """How *store* knows its files (made for each operation: cheap, and the
        storage may change until the app is set up)."""


RecordsProvider = Callable[[], FileKeeping]


