"""What a file store's backend is to the modules above it: its :class:`Bytes`, and the
:class:`Sink` an upload's pieces go to while they arrive."""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Protocol

from .body import Piece
from .rows import FileRow


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
