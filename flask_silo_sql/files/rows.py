"""What a file store knows of a file: its row (:class:`FileRow`), what it tells the
application (:class:`StoredFile`), an upload's :class:`Reservation`."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from typing import Any

from .limits import OLD_PREFIX, RETIRED_PREFIX, TEMP_PREFIX


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
