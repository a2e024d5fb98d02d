"""Log lines that name a session without giving it away.

A SID is a bearer credential: whoever reads it from a log can act as that
client. Silo's log lines name a session by :func:`~flask_silo_sql.sids.tag`
(8 hex characters of a keyed hash), and an exception logged with a session at
hand is logged with that SID replaced by its tag wherever the exception's text
carries it (an ``OSError`` names a path, and a session's directory is its
SID). Tracebacks print frames and source lines, never local values.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from .sids import tag

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class Withheld(Exception):
    """Stands in for a logged exception whose text had to be cleaned."""


def scrubbed(exc: BaseException, sid: str | None) -> ExcInfo:
    """*exc* for ``exc_info=``: its traceback, its class, its text with *sid* replaced."""
    text = str(exc)
    if sid and sid in text:
        text = text.replace(sid, f"<session {tag(sid)}>")
    stand_in = Withheld(f"{type(exc).__module__}.{type(exc).__qualname__}: {text}")
    return Withheld, stand_in, exc.__traceback__


def log_failure(
    logger: logging.Logger, message: str, *args: Any, exc: BaseException, sid: str | None
) -> None:
    """``logger.error(message, *args)`` with *exc*'s traceback, *sid* kept out of it."""
    logger.error(message, *args, exc_info=scrubbed(exc, sid))
