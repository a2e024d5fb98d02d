"""Idempotent requests: the key, the request's fingerprint, the stored response.

A client that retries a request with the same ``Idempotency-Key`` gets the
first request's response instead of running the view again. The key is
scoped to the session, the method, the route and, optionally, a principal the
application names; its record holds a fingerprint of the request (a retry
must be the same request) and, once the view has answered, the response. What
keeps the records is a backend's :class:`IdempotencyRecords` (the SQL
backend's ``silo_idempotency_keys``): the claim is made before the view runs,
the response is stored by the request's own commit, so that the state change
and the stored response exist together or not at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Protocol

from .errors import IdempotencyKeyInvalid, RequestBodyIncomplete

DEFAULT_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
DEFAULT_TTL_S = 86400.0
DEFAULT_LEASE_S = 60.0
"""How long a claim holds its key while the view runs; a retry after it runs the view again."""
DEFAULT_MAX_KEYS = 1000
"""Keys a session may hold at once: each stores a response for its TTL, so a client that
sends a new key with every request could otherwise grow the table without bound."""
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
"""Largest response body kept for replays (``SILO_IDEMPOTENCY_MAX_RESPONSE_BYTES``): each key
keeps its response for its TTL, so a view that answers megabytes would otherwise keep
gigabytes per session. A larger response is sent, its changes saved, and the key completed
without it: a retry is answered ``409``
(:class:`~flask_silo_sql.errors.IdempotentResponseNotKept`)."""
SPOOL_MEMORY_BYTES = 1024 * 1024
"""A request body up to this size is kept in memory while it is hashed; a larger one on disk."""
CHUNK = 64 * 1024

# RFC 8941 sf-string: printable ASCII, with \" and \\ escaped.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
# A plain token: RFC 9110 tchar, plus the ":" and "/" of RFC 8941's sf-token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z:/]+")
_ESCAPE = re.compile(r"\\([\"\\])")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers that concern one connection (RFC 9110 section 7.6.1): never stored."""


def parse_key(header: str, values: list[str]) -> str | None:
    """The key of the request's *header* lines: None when absent.

    One line, holding an RFC 8941 string (``"..."``) or a plain token, of 1 to
    255 characters once unquoted; anything else raises
    :class:`~flask_silo_sql.errors.IdempotencyKeyInvalid` (``400``).
    """
    if not values:
        return None
    if len(values) > 1:
        raise IdempotencyKeyInvalid(header, "the header was sent more than once")
    raw = values[0].strip(" \t")
    if len(raw) > 2 * MAX_KEY_LENGTH + 2:
        raise IdempotencyKeyInvalid(header, "it is too long")
    quoted = _SF_STRING.fullmatch(raw)
    if quoted is not None:
        key = _ESCAPE.sub(r"\1", quoted.group(1))
    elif _TOKEN.fullmatch(raw):
        key = raw
    else:
        raise IdempotencyKeyInvalid(header, "it is neither a quoted string nor a token")
    if not key:
        raise IdempotencyKeyInvalid(header, "it is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid(header, f"it has {len(key)} characters")
    return key


def key_hash(method: str, route: str, principal: str | None, key: str) -> str:
    """The key's scope within its session: hex SHA-256 of method, route, principal, key."""
    scope = json.dumps([method, route, principal, key], separators=(",", ":"))
    return hashlib.sha256(scope.encode()).hexdigest()


def fingerprint(
    method: str,
    path: bytes,
    query: bytes,
    content_type: str | None,
    body: IO[bytes] | None,
    length: int | None = None,
) -> tuple[str, IO[bytes] | None]:
    """Hex SHA-256 of the request, and its body spooled for the view to read.

    *path* is the raw path, as it came (two paths that decode alike, ``%FE`` and
    ``%FF`` in ``request.path``, are different requests).

    *body* is read in chunks, each hashed and written to a spooled file (in
    memory up to :data:`SPOOL_MEMORY_BYTES`, then on disk), so an upload is
    never held whole in memory; the spool is returned at its start. Each field
    is length-prefixed, so no two requests share a fingerprint by moving bytes
    from one field to the next. A *body* that ends before its *length* (the
    Content-Length; a WSGI server may end the stream of a client that went away
    without an error) raises :class:`~flask_silo_sql.errors.RequestBodyIncomplete`.
    """
    digest = hashlib.sha256()
    for part in (method.encode(), path, query, (content_type or "").encode("latin-1")):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    if body is None:
        return digest.hexdigest(), None
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115
    try:
        received = 0
        while chunk := body.read(CHUNK):
            digest.update(chunk)
            spool.write(chunk)
            received += len(chunk)
        if length is not None and received < length:
            raise RequestBodyIncomplete(length, received)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return digest.hexdigest(), spool


NOT_STORED = frozenset({"set-cookie"})
"""Headers a replay must not repeat: a cookie is a credential of its moment (a login,
a CSRF token) that a retry made later must not set again, nor may it rest in a table."""


def storable_headers(headers: Iterable[tuple[str, str]], sid_header: str) -> list[tuple[str, str]]:
    """The headers of a response to store: all but hop-by-hop ones, ``Set-Cookie``
    and the SID header."""
    pairs = list(headers)
    dropped = set(HOP_BY_HOP) | NOT_STORED | {sid_header.lower()}
    for name, value in pairs:
        if name.lower() == "connection":  # it names more headers of this connection
            dropped.update(v.strip().lower() for v in value.split(","))
    return [(name, value) for name, value in pairs if name.lower() not in dropped]


@dataclass(slots=True)
class StoredResponse:
    """What a replay answers: the first response's status, headers and body.

    A *body* of None: the response was too large to keep (only its status was stored).
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None

    @property
    def kept(self) -> bool:
        return self.body is not None

    def headers_json(self) -> str:
        return json.dumps([[name, value] for name, value in self.headers])

    @staticmethod
    def parse_headers(text: str) -> list[tuple[str, str]]:
        return [(str(name), str(value)) for name, value in json.loads(text)]


@dataclass(slots=True)
class KeyRequest:
    """A request's key, in its scope, with what its record needs."""

    header: str
    """The header the key came in (named in error messages)."""
    sid: str
    key_hash: str
    key: str
    method: str
    route: str
    fingerprint: str
    ttl: float
    lease: float
    max_keys: int | None = None
    """How many keys the session may hold (``SILO_IDEMPOTENCY_MAX_KEYS``; None: any)."""
    max_response_bytes: int | None = None
    """Largest response body kept (``SILO_IDEMPOTENCY_MAX_RESPONSE_BYTES``; None: any)."""


@dataclass(slots=True)
class Claim:
    """This request holds the key (its *token* is in the record) and runs the view."""

    request: KeyRequest
    token: str
    completed: bool = False
    """The response was committed with the request's changes."""
    response: StoredResponse | None = None
    """The view's response, once it answered (stored with the request's commit)."""


@dataclass(slots=True)
class Found:
    """The key's record, held by another request (or by this one earlier)."""

    fingerprint: str
    token: str
    response: StoredResponse | None
    """The stored response; None while the request holding the claim is in flight."""
    lease_left: float
    """Seconds until the claim's lease ends (0 or less: its request is presumed dead)."""


class IdempotencyRecords(Protocol):
    """Where a backend keeps idempotency keys (one with SQL tables has them)."""

    def claim(self, request: KeyRequest) -> Claim | Found:
        """Claim the key atomically, or return its record (creating the session first
        when it has no row yet, so that the record has its owner)."""

    def take_over(self, request: KeyRequest, found: Found) -> Claim | None:
        """Claim a key whose lease ran out (its request died); None if another did first."""

    def read(self, request: KeyRequest) -> Found | None: ...

    def complete(self, claim: Claim, response: StoredResponse) -> None:
        """Store *response* in the key's record with the current request's commit."""

    def release(self, claim: Claim) -> None:
        """Forget the claim (the view failed): a retry runs the view again."""
