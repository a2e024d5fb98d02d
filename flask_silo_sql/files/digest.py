"""The SHA-256 of a file as it streams, computed beside the I/O that moves its bytes.

Hashing costs about as much as writing the bytes to a local disk, or more.
hashlib releases the GIL while it hashes a large buffer, and so do file writes
and database drivers while they wait, so a piece handed to a helper thread is
hashed while the caller writes (or fetches) the next: a stored file costs its
I/O, not its I/O plus its hash. One piece is in flight per stream, so memory
stays bounded by a piece. A file of one piece gains too: its hash runs while
its bytes are written and synced (``benchmarks/files.py``: a 1 MB upload to
``local`` went from 0.30 to 0.42 of a plain copy's rate). Only small pieces
are hashed at once: handing them to a thread costs more than hashing them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO

BESIDE_BYTES = 64 * 1024
"""Pieces from this size on are hashed in the helper threads."""
HASHER_THREADS = 4
"""Helper threads of a process (shared by its streams; created on first use)."""

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _hasher() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(HASHER_THREADS, thread_name_prefix="silo-hash")
        return _pool


def _forget_pool_in_child() -> None:
    """A forked process (a gunicorn worker) has none of its parent's threads."""
    global _lock, _pool
    _lock = threading.Lock()
    _pool = None


os.register_at_fork(after_in_child=_forget_pool_in_child)


class StreamDigest:
    """SHA-256 of the pieces given to :meth:`update`, in order (a piece must not change
    until the next one is given or the digest is read: its hash may be running)."""

    __slots__ = ("_digest", "_pending")

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._pending: Future[None] | None = None

    def update(self, piece: bytes | bytearray | memoryview, *, last: bool = False) -> None:
        """Hash *piece* after the ones before it; beside the caller, unless it is small
        or the *last* one of a read (the check that follows waits for it at once:
        a helper thread would only add its hand-over)."""
        self.wait()
        if last or len(piece) < BESIDE_BYTES:
            self._digest.update(piece)
        else:
            self._pending = _hasher().submit(self._digest.update, piece)

    def wait(self) -> None:
        """Until every piece given so far is hashed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def hexdigest(self) -> str:
        self.wait()
        return self._digest.hexdigest()


def sha256_of(stream: IO[bytes], piece: int = 1024 * 1024) -> str:
    """The SHA-256 of what is left of *stream*, read a *piece* at a time (a check of
    bytes at rest: nothing to do beside it)."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(piece), b""):
        digest.update(chunk)
    return digest.hexdigest()
