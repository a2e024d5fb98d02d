"""One fan-out per process: committed events to this process's open streams.

While a process holds open streams, one thread reads every session's new events
(one query, whatever the number of streams) and hands each to the streams of its
session. It reads every ``poll_interval`` seconds; on PostgreSQL a listener thread
on a connection of its own (out of the pool) ``LISTEN``\\ s to ``silo_events`` and
wakes it as soon as an event commits (the payload is only the event's ID). The
listener heals itself: after an error it reconnects, and the poll goes on
meanwhile, so nothing is lost when notifications do not arrive (a database restart,
PgBouncer in transaction mode). With no stream open, the process runs no query
and holds no connection. Event IDs grow in commit order (see
:mod:`flask_silo_sql.sql.statements.events`), so a cursor over them misses nothing.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..logs import silo_logger
from ..sql import event_rows
from ..sql.context import Context
from ..sql.event_rows import Event
from ..sql.statements.events import LISTEN

logger = silo_logger("flask_silo_sql.events")

LISTEN_RETRY_S = 2.0
"""Seconds between two attempts to (re)open the notification connection."""


class Subscriber:
    """One open stream's inbox: the events of its session, in ID order."""

    __slots__ = ("inbox", "sid")

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.inbox: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def get(self, timeout: float) -> Event | None:
        try:
            return self.inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None


class Hub:
    """The fan-out of one storage in one process (see the module docstring)."""

    def __init__(self, ctx: Context, poll_interval: float) -> None:
        self.ctx = ctx
        self.poll_interval = poll_interval
        self._subs: dict[str, set[Subscriber]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cursor: int | None = None
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self.polls = 0
        """Reads made so far (every session's new events, one query each)."""
        self.notified = 0
        """Notifications received so far (PostgreSQL)."""

    @property
    def listening(self) -> bool:
        return self.ctx.connector.engine.dialect.name == "postgresql"

    def subscribe(self, sid: str) -> Subscriber:
        """A stream of *sid* opens: it gets every event committed after this call returns
        (it replays the ones before by itself)."""
        sub = Subscriber(sid)
        with self._lock:
            if self._cursor is None:  # the first stream: start from the newest event
                self._cursor = event_rows.last_id(self.ctx)
            self._subs.setdefault(sid, set()).add(sub)
            thread = self._thread
            if thread is None or not thread.is_alive() or self._stop.is_set():
                # (a reader told to stop, as the last stream closed, ends by itself)
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._loop, args=(self._stop,), name="flask-silo-events", daemon=True
                )
                self._thread.start()
                if self.listening:
                    self._listener = threading.Thread(
                        target=self._listen,
                        args=(self._stop,),
                        name="flask-silo-events-listen",
                        daemon=True,
                    )
                    self._listener.start()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            subs = self._subs.get(sub.sid)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.sid]
            if not self._subs:  # no stream left: no query, no connection
                self._cursor = None
                self._stop.set()
                self._wake.set()

    def poke(self) -> None:
        """Look for new events now (a notification came)."""
        self._wake.set()

    def _loop(self, stop: threading.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                self.poll()
                if failing:
                    logger.info("event stream: the database answers again")
                failing = False
            except Exception as exc:
                if not failing:
                    logger.warning("event stream: cannot read events now (%s)", exc)
                failing = True
            self._wake.wait(timeout=self.poll_interval)
            self._wake.clear()

    def poll(self) -> int:
        """Read the events committed since the last read and hand them out; how many."""
        with self._lock:
            cursor = self._cursor
        if cursor is None:
            return 0
        handed = 0
        while True:
            events = event_rows.every_after(self.ctx, cursor)
            self.polls += 1
            with self._lock:
                if self._cursor is None:
                    return handed
                for event in events:
                    for sub in self._subs.get(event.sid, ()):
                        sub.inbox.put(event)
                    cursor = event.id
                self._cursor = cursor
            handed += len(events)
            if len(events) < event_rows.EVENT_BATCH:
                return handed

    def _listen(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._listen_once(stop)
            except Exception as exc:
                if not stop.is_set():
                    logger.info("event notifications interrupted (%s); polling meanwhile", exc)
            self.poke()  # whatever was announced meanwhile: look now
            stop.wait(LISTEN_RETRY_S)

    def _listen_once(self, stop: threading.Event) -> None:
        raw = self.ctx.connector.engine.raw_connection()
        raw.detach()  # never back into the pool: it stays in LISTEN
        conn: Any = raw.dbapi_connection
        try:
            conn.autocommit = True
            conn.execute(LISTEN)
            self.poke()
            while not stop.is_set():
                for _note in conn.notifies(timeout=1.0, stop_after=1):
                    self.notified += 1
                    self.poke()
        finally:
            conn.close()


class _Hubs:
    """This process's hubs, one per storage (new ones after a fork)."""

    def __init__(self) -> None:
        self._hubs: dict[int, Hub] = {}
        self._lock = threading.Lock()

    def forget(self) -> None:
        self._hubs = {}
        self._lock = threading.Lock()

    def of(self, ctx: Context, poll_interval: Callable[[], float]) -> Hub:
        with self._lock:
            hub = self._hubs.get(id(ctx))
            if hub is None or hub.ctx is not ctx:
                hub = self._hubs[id(ctx)] = Hub(ctx, poll_interval())
            return hub


HUBS = _Hubs()
os.register_at_fork(after_in_child=HUBS.forget)
