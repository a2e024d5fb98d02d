"""The ``text/event-stream`` response of one session: replay, then live events.

A stream first subscribes to its process's :class:`~.hub.Hub` (so it misses
nothing committed from then on), then replays from the database what came after
the client's ``Last-Event-ID`` (or ``?last_event_id=``), then sends what the hub
hands it, each event once, in ID order (an ID it has sent already is skipped).
A ``Last-Event-ID`` whose event is no longer kept (pruned after the retention, or
gone with a reset) gets a ``resync`` event instead: the client reloads the state,
and the stream goes on from the session's newest event. Between events it sends a
heartbeat comment, so proxies keep it open and a closed client is found out (its
thread freed) within one heartbeat. It holds no pooled connection while it waits.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from flask import Response

from ..sql import event_rows
from ..sql.context import Context
from ..sql.event_rows import Event
from .hub import Hub
from .tokens import StreamDenied

RETRY_MS = 2000
"""The ``retry:`` hint: how long a browser waits before it reconnects."""

HEADERS = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


@dataclass(frozen=True)
class StreamSettings:
    heartbeat: float
    max_age: float
    per_session: int
    per_process: int


class Slots:
    """This process's open streams, counted per session and in all (the limits)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_sid: dict[str, int] = {}
        self._total = 0

    @property
    def total(self) -> int:
        return self._total

    def take(self, sid: str, settings: StreamSettings) -> None:
        with self._lock:
            if self._total >= settings.per_process:
                raise StreamDenied(
                    503,
                    "streams_exhausted",
                    f"this server process holds its most open streams "
                    f"({settings.per_process}); try again shortly",
                )
            if self._by_sid.get(sid, 0) >= settings.per_session:
                raise StreamDenied(
                    429,
                    "too_many_streams",
                    f"this session already has {settings.per_session} open streams: close "
                    "one (another tab?) first",
                )
            self._by_sid[sid] = self._by_sid.get(sid, 0) + 1
            self._total += 1

    def give_back(self, sid: str) -> None:
        with self._lock:
            left = self._by_sid.get(sid, 0) - 1
            if left > 0:
                self._by_sid[sid] = left
            else:
                self._by_sid.pop(sid, None)
            self._total -= 1


SLOTS = Slots()


def frame(event: Event) -> str:
    """One event as the stream sends it (its data is one line of JSON)."""
    return f"id: {event.id}\nevent: {event.kind}\ndata: {event.data}\n\n"


def parse_last_id(value: str | None) -> int | None:
    """A ``Last-Event-ID`` as an event ID (None when absent; 400 when not one)."""
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 19:
        raise StreamDenied(
            400, "bad_last_event_id", "Last-Event-ID must be an event ID this stream sent"
        )
    return int(value)


def open_stream(
    ctx: Context, hub: Hub, sid: str, after: int | None, settings: StreamSettings
) -> Response:
    """The streaming response (the process's slot for it is taken here, 429/503 if none)."""
    SLOTS.take(sid, settings)
    try:
        sub = hub.subscribe(sid)
    except BaseException:
        SLOTS.give_back(sid)
        raise
    try:  # where the stream starts, fixed now: what commits from here on is sent
        resync = after is not None and after > 0 and not event_rows.still_kept(ctx, sid, after)
        start = event_rows.last_id(ctx, sid) if after is None or resync else after
    except BaseException:
        hub.unsubscribe(sub)
        SLOTS.give_back(sid)
        raise
    done = threading.Lock()

    def release() -> None:
        """Once, whichever comes first: the body ends, or the server closes the response."""
        if done.acquire(blocking=False):
            hub.unsubscribe(sub)
            SLOTS.give_back(sid)

    def body() -> Iterator[str]:
        try:
            yield f"retry: {RETRY_MS}\n\n"
            last = start
            if resync:
                reason = "events after the one you last saw are no longer kept: reload the state"
                data = json.dumps({"reason": reason})
                yield f"id: {last}\nevent: resync\ndata: {data}\n\n"
            while True:  # the replay, in batches
                batch = event_rows.session_after(ctx, sid, last)
                for event in batch:
                    yield frame(event)
                    last = event.id
                if len(batch) < event_rows.EVENT_BATCH:
                    break
            end = time.monotonic() + settings.max_age
            while (left := end - time.monotonic()) > 0:
                live = sub.get(min(settings.heartbeat, left))
                if live is None:
                    yield ": heartbeat\n\n"
                elif live.id > last:
                    yield frame(live)
                    last = live.id
        finally:
            release()

    response = Response(body(), mimetype="text/event-stream", headers=HEADERS)
    response.call_on_close(release)
    return response
