"""What an upload reads: its size where it says, its bytes in pieces, counted."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any, Protocol

from flask import has_request_context, request

from ..errors import RequestBodyIncomplete
from .limits import CHUNK

Piece = bytes | bytearray | memoryview
"""A piece of a file on its way: a view of a buffer that is filled again later."""


class Readable(Protocol):
    """What ``save`` reads from: any binary stream (a file, a request body, a socket)."""

    def read(self, size: int = ..., /) -> bytes | None: ...


def announced_length(data: object) -> int | None:
    """The current request's ``Content-Length`` when *data* is its body. A WSGI server may
    end a body early without an error (gunicorn does when the client goes away), so an
    upload must count what it got against what was announced."""
    if not has_request_context():
        return None
    if data is not request.environ.get("wsgi.input") and data is not request.__dict__.get("stream"):
        return None
    return request.content_length


def declared_size(data: Any) -> int | None:
    """How many bytes *data* says it holds, if it says: its length, what is left of a
    seekable file, a request body's ``Content-Length`` (werkzeug's ``LimitedStream``)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data)
    limit = getattr(data, "limit", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        return max(0, limit - int(getattr(data, "_pos", 0) or 0))
    try:
        if data.seekable():
            here = data.tell()
            end = data.seek(0, os.SEEK_END)
            data.seek(here)
            return max(0, int(end) - int(here))
    except (AttributeError, OSError, ValueError):
        pass
    return None


def _defined_by(kind: type, name: str) -> type | None:
    return next((klass for klass in kind.__mro__ if name in vars(klass)), None)


_RAW_READ = _defined_by(io.RawIOBase, "read")
"""io's own ``read`` of raw streams, made of their ``readinto``."""


def _fills_in_place(data: object) -> bool:
    """Whether *data*'s ``readinto`` gives what its ``read`` gives: both come from one
    class (files, ``BytesIO``), or its ``read`` is io's own, made of its ``readinto``
    (werkzeug's request stream). A stream that defines only ``read`` is read with it."""
    kind = type(data)
    filler = _defined_by(kind, "readinto")
    reader = _defined_by(kind, "read")
    return filler not in (None, _RAW_READ) and reader in (filler, _RAW_READ)


def pieces(
    data: Readable | bytes | bytearray | memoryview,
    expected: int | None = None,
    announced: int | None = None,
) -> Iterator[Piece]:
    """:func:`_split` of *data*, counted: a request body that ends before the
    *announced* length (its ``Content-Length``, which some servers end without an
    error when the client goes away) raises :class:`RequestBodyIncomplete`."""
    received = 0
    for piece in _split(data, expected):
        received += len(piece)
        yield piece
    if announced is not None and received < announced:
        raise RequestBodyIncomplete(announced, received)


def _split(
    data: Readable | bytes | bytearray | memoryview, expected: int | None
) -> Iterator[Piece]:
    """*data* in pieces of :data:`CHUNK` bytes (the last one shorter), none of them
    copied twice. A piece stays as it is until the piece after the next one is asked
    for (the hash of one may run while the next is read), then its buffer is filled
    again: fresh memory costs a page fault every 4 KiB, the reuse none. A stream that
    can ``readinto`` fills each piece in place; while
    *expected* (the size *data* declared) is not reached, a fill asks for no more
    than is left, so that a request body (werkzeug's ``LimitedStream``) fills the
    piece itself instead of a buffer of its own copied over."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        whole = memoryview(data)
        for start in range(0, len(whole), CHUNK):
            yield whole[start : start + CHUNK]
        return
    readinto = getattr(data, "readinto", None) if _fills_in_place(data) else None
    if readinto is None:
        while True:
            chunk = data.read(CHUNK)
            if not chunk:
                return
            yield bytes(chunk)
    left = expected or 0
    pair: list[bytearray | None] = [bytearray(CHUNK), None]  # the second when it is needed
    turn = 0
    while True:
        piece = pair[turn]  # the other one may still be hashed
        if piece is None:  # a file of one piece never zeroes the memory of a second
            piece = pair[turn] = bytearray(CHUNK)
        turn ^= 1
        filled = 0
        view = memoryview(piece)
        while filled < CHUNK:
            end = min(CHUNK, filled + left) if left > 0 else CHUNK
            got = readinto(view[filled:end])
            if not got:
                break
            filled += got
            left -= got
        if filled == CHUNK:
            yield piece
            continue
        if filled:
            yield view[:filled]  # the last piece
        return
