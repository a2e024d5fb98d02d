"""The session directory's lock: one ``local`` upload at a time moves in and writes its row."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def directory_lock(directory: str) -> Iterator[None]:
    """Hold the session directory's lock (``flock`` on the directory itself): one upload
    at a time moves in and writes its row. A directory removed meanwhile (its session
    expired) has nothing left to guard."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
