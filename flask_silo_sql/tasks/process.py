"""This process in the task tables: its identity, and what it hands back at exit."""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import threading
from collections.abc import Callable

from .log import logger


class _Process:
    """This process's identity in ``silo_tasks.worker`` and ``silo_workers`` (new after a fork)."""

    def __init__(self) -> None:
        self._pid = 0
        self._id = ""
        self._lock = threading.Lock()

    def forget(self) -> None:
        """In a forked child: a new identity (the parent's lock may have been held)."""
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                host = socket.gethostname()[:40]
                self._id = f"{host}:{self._pid}:{secrets.token_hex(4)}"
            return self._id


PROCESS = _Process()
os.register_at_fork(after_in_child=PROCESS.forget)


class _HandBack:
    """At exit, a process hands back the durable runs it holds, so they run elsewhere now."""

    def __init__(self) -> None:
        self._hooks: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        atexit.register(self.run)

    def add(self, key: int, hook: Callable[[], None]) -> None:
        with self._lock:
            self._hooks[key] = hook

    def run(self) -> None:
        with self._lock:
            hooks = list(self._hooks.values())
        for hook in hooks:
            try:
                hook()
            except Exception as exc:  # the database may be gone too: the leases lapse then
                logger.warning("could not hand back durable task runs at exit: %s", exc)


HAND_BACK = _HandBack()
