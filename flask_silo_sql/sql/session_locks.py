"""Per-session locks for locking mode on SQLite, held outside the database.

SQLite has one write lock for the whole database. Locking mode used to take
it at a request's first read and hold it to the response, so one client's
slow upload made every other client's request wait, then answer ``503``. A
request in locking mode now holds a lock of its own session only: an
``flock`` of a small file beside the database (between processes and between
the threads of one, as each lock is its own open file). Sessions hash into
:data:`BUCKETS` files, so two sessions rarely share one (they would then take
turns, nothing worse). The database's write lock is taken only by the short
transactions that touch the session at the start and write at the commit.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time

from ..errors import SessionBusy

BUCKETS = 4096
LOCKS_SUFFIX = ".silo-locks"
FIRST_POLL_S = 0.001
LAST_POLL_S = 0.02


class SessionLock:
    """One session's lock, held (release it)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # the lock goes with its file


def lock_path(database: str, sid: str) -> str:
    """The file whose lock stands for session *sid* of *database*."""
    bucket = int.from_bytes(hashlib.sha256(sid.encode()).digest()[:4], "big") % BUCKETS
    return os.path.join(database + LOCKS_SUFFIX, f"{bucket:03x}")


def acquire(database: str, sid: str, timeout: float) -> SessionLock:
    """Lock session *sid*, waiting up to *timeout* seconds (then :class:`SessionBusy`)."""
    path = lock_path(database, sid)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    pause = FIRST_POLL_S
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return SessionLock(fd)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise SessionBusy(
                    sid,
                    f"Another request has held this session for more than {timeout:g} s; "
                    "retry when it is done.",
                )
            time.sleep(min(pause, left))
            pause = min(pause * 2, LAST_POLL_S)
    except BaseException:
        os.close(fd)
        raise
