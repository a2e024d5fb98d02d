"""A session's directory, which a rotation may rename at any moment: its lock (one
``local`` upload at a time moves in and writes its row), and making it."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def directory_lock(directory: str) -> Iterator[int | None]:
    """Hold the session directory's lock (``flock`` on the directory itself): one upload
    at a time moves in and writes its row. A directory removed meanwhile (its session
    expired) has nothing left to guard: None.

    Yields the directory's descriptor: it follows the directory when a rotation
    renames it, so a name removed through it (``os.unlink(name, dir_fd=fd)``) goes
    wherever the directory went.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def make_directory(directory: str) -> None:
    """Make *directory* (and its parents) unless it exists. ``os.makedirs`` raises when
    the directory it found was renamed away (a rotation) before it looked again: it is
    then made anew."""
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:
        if os.path.lexists(directory):
            raise  # a file in the way
        os.makedirs(directory, exist_ok=True)
