"""The disk of an SQLite database: a floor for state writes, a reserve the sweep can free.

A full disk stops SQLite in a way no delete can undo: the WAL holds committed
pages that the checkpoint must copy into the database file, which has to grow
for them, and every new write, a delete included, must first grow the WAL.
So the sweep, ``flask silo-db cleanup`` and a restart all failed with
"database or disk is full" even with every session expired.

Two things keep that from happening. State writes that grow a session stop at
a floor (``SILO_DB_MIN_FREE_BYTES``, answered ``507`` like an upload), counting
the pages SQLite has free inside the file as room, since a write reuses them.
And a reserve file beside the database (:data:`RESERVE_BYTES`) holds space that
only the sweep gives up: when a sweep meets a full disk, it deletes the
reserve, checkpoints the WAL into the room that makes, and sweeps again; the
reserve is laid down again once the disk has room for it. A connection that
opens on a full disk releases it too: in WAL mode even a read needs room.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

from sqlalchemy import Engine

from ..logs import silo_logger

logger = silo_logger("flask_silo_sql")

RESERVE_BYTES = 8 * 1024 * 1024
"""Space held beside an SQLite database for the sweep: more than the WAL grows between two
automatic checkpoints (1,000 pages of 4 KiB), which is what a checkpoint may need."""
RESERVE_WATERMARK = 1024 * 1024 * 1024
"""The reserve is laid once the disk has less than this free (at start, or by a state write
that grows state): a disk with more room needs none, and a test suite's many databases
do not each hold one."""
OPEN_ROOM_BYTES = 1024 * 1024
"""Below this much free space the reserve is released as a connection opens: in WAL mode
even a read must create the WAL index (``-shm``) and the WAL, so on a full disk the
database could not be opened at all ("disk I/O error"), not even to sweep it."""
RESERVE_SUFFIX = ".silo-reserve"
SQLITE_FULL = 13


def database_file(engine: Engine) -> str | None:
    """The file of an SQLite engine's database, or None (PostgreSQL, in memory)."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database)


def make_room_to_open(database: str) -> None:
    """Before a connection to *database* is used: on a full disk, release its reserve."""
    try:
        if shutil.disk_usage(os.path.dirname(database)).free >= OPEN_ROOM_BYTES:
            return
        os.unlink(database + RESERVE_SUFFIX)
    except OSError:
        return
    logger.warning(
        "silo database disk is full: released the %d-byte reserve to open the database",
        RESERVE_BYTES,
    )


def is_disk_full(exc: BaseException) -> bool:
    """Whether *exc* (or the driver's error it carries) is SQLite's "database or disk is full"."""
    seen: set[int] = set()
    current: Any = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "sqlite_errorcode", None) == SQLITE_FULL:
            return True
        if "database or disk is full" in str(current):
            return True
        current = getattr(current, "original", None) or getattr(current, "orig", None)
    return False


class SQLiteDisk:
    """The disk holding one SQLite database file (see the module docstring)."""

    __slots__ = ("database", "directory", "engine", "reserve")

    def __init__(self, engine: Engine, database: str) -> None:
        self.engine = engine
        self.database = database
        self.directory = os.path.dirname(database)
        self.reserve = database + RESERVE_SUFFIX

    def free(self) -> int:
        """Bytes free on the disk (for this process), or a very large number if unknown."""
        try:
            return shutil.disk_usage(self.directory).free
        except OSError:
            return 1 << 62

    def room(self, floor: int) -> bool:
        """Whether a write that grows state may go on: *floor* bytes free, counting the
        database's own free pages (a write reuses them before it grows the file)."""
        free = self.free()
        if free < RESERVE_WATERMARK:
            self.lay_reserve(floor)
        if free >= floor:
            return True
        try:
            with self.engine.connect() as conn:
                pages = conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
                size = conn.exec_driver_sql("PRAGMA page_size").scalar() or 4096
        except Exception:  # a database that cannot answer has no room either
            return False
        return free + int(pages) * int(size) >= floor

    def lay_reserve(self, floor: int = 0) -> bool:
        """Create the reserve file when it is missing and the disk has room for it twice
        over and *floor* besides (it never takes the last room); whether it is there."""
        if os.path.exists(self.reserve):
            return True
        free = self.free()
        if free >= RESERVE_WATERMARK or free < 2 * RESERVE_BYTES + floor:
            return False
        try:
            fd = os.open(self.reserve + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            os.replace(self.reserve + ".tmp", self.reserve)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self.reserve + ".tmp")
            return False
        return True

    def release_reserve(self) -> bool:
        """Delete the reserve (the disk is full) and checkpoint the WAL into the room it
        made; whether there was a reserve to release."""
        try:
            os.unlink(self.reserve)
        except FileNotFoundError:
            return False
        logger.warning(
            "silo database disk is full: released the %d-byte reserve to sweep", RESERVE_BYTES
        )
        self.checkpoint("RESTART")
        return True

    def checkpoint(self, mode: str = "TRUNCATE") -> None:
        """Copy the WAL into the database (``TRUNCATE``: and give its space back)."""
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})")
        except Exception:  # best effort: the next write checkpoints again
            logger.warning("silo database: WAL checkpoint (%s) failed", mode)
