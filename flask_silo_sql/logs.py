"""Log lines that name a session without giving it away.

A SID is a bearer credential: whoever reads it from a log can act as that
client. Silo's log lines name a session by :func:`~flask_silo_sql.sids.tag`
(8 hex characters of a keyed hash), and an exception logged with a session at
hand is logged with that SID replaced by its tag wherever the exception's text
carries it (an ``OSError`` names a path, and a session's directory is its
key). Tracebacks print frames and source lines, never local values.

Every line silo logs is escaped here, once: a character that is not printable
(a newline, a carriage return, an escape sequence, a Unicode line separator)
is written as its ``repr`` escape, so a name a client chose can never forge
a log line of its own, whichever message carries it. Silo's loggers are made
by :func:`silo_logger`, which attaches that filter to them (and to no other).
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from .keys import session_key
from .sids import tag

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def escaped(text: str) -> str:
    """*text* with every character that is not printable written as its ``repr`` escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class EscapingFilter(logging.Filter):
    """Escapes a record's message (with its arguments) before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = escaped(message)
        if clean is not message:
            record.msg, record.args = clean, None
        return True


_ESCAPING = EscapingFilter()


def silo_logger(name: str) -> logging.Logger:
    """Silo's logger *name* (``flask_silo_sql...``), every line it writes escaped."""
    logger = logging.getLogger(name)
    if _ESCAPING not in logger.filters:
        logger.addFilter(_ESCAPING)
    return logger


class Withheld(Exception):
    """Stands in for a logged exception whose text had to be cleaned."""


def scrubbed(exc: BaseException, sid: str | None) -> ExcInfo:
    """*exc* for ``exc_info=``: its traceback, its class, its text with *sid* replaced."""
    text = str(exc)
    if sid:
        for name in (sid, session_key(sid)):
            if name in text:
                text = text.replace(name, f"<session {tag(sid)}>")
    stand_in = Withheld(escaped(f"{type(exc).__module__}.{type(exc).__qualname__}: {text}"))
    return Withheld, stand_in, exc.__traceback__


def log_failure(
    logger: logging.Logger, message: str, *args: Any, exc: BaseException, sid: str | None
) -> None:
    """``logger.error(message, *args)`` with *exc*'s traceback, *sid* kept out of it."""
    logger.error(message, *args, exc_info=scrubbed(exc, sid))
