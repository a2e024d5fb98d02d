"""Live tasks: session events pushed to the browser, with replay (see docs/live-tasks.md).

:mod:`.hub` (one fan-out per process: a poller, and ``LISTEN`` on PostgreSQL),
:mod:`.stream` (the ``text/event-stream`` response, its limits), :mod:`.tokens` (how
an ``EventSource`` opens its session's stream with no SID in the URL). The rows are
:mod:`flask_silo_sql.sql.event_rows`'s; the Flask side is ``Silo.stream``,
``Silo.stream_token``, ``Silo.publish`` and ``Silo.cancel_response``.
"""

from __future__ import annotations

from .hub import HUBS, Hub
from .stream import SLOTS, StreamSettings, open_stream, parse_last_id
from .tokens import StreamDenied, mint, session_of

__all__ = [
    "HUBS",
    "SLOTS",
    "Hub",
    "StreamDenied",
    "StreamSettings",
    "mint",
    "open_stream",
    "parse_last_id",
    "session_of",
]
