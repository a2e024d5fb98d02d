"""Per-session files: :class:`FileStore` and what it tells of a file (:class:`StoredFile`).

One module per concept: ``store`` (the API), ``recorded`` (a store that knows its
files from its rows) and ``unrecorded`` (one without rows: its disk alone),
``receive`` (an upload on its way in), ``body`` (its size and pieces), ``staging``
(awaiting the commit), ``rows``, ``records`` (what the store is given: rows, bytes),
``limits``, ``locks``, ``failures``, ``backends/`` (``local``, ``database``, fsspec,
the cache), ``serving`` (ETag, Range, 304), ``check`` (fsck), ``upkeep``, ``digest``,
``settings`` (:class:`FileSettings`).
"""

from __future__ import annotations

from .check import FsckReport
from .records import Backend, FileRecords
from .rows import FileRow, StoredFile
from .settings import FileSettings
from .store import FileStore, fsck

__all__ = [
    "Backend",
    "FileRecords",
    "FileRow",
    "FileSettings",
    "FileStore",
    "FsckReport",
    "StoredFile",
    "fsck",
]
