"""Stream tokens: how an ``EventSource`` (which cannot send headers) opens its session's
stream without the SID in a URL.

A token is a random value, signed with the app's ``SECRET_KEY`` by itsdangerous (with
its issue time), and bound to its session by a row of ``silo_stream_tokens`` that holds
the value's SHA-256. A forged or altered token fails the signature; an old one, its age
or its row's end; a token of a session that expired or was reset (its row went with it)
opens nothing. What a URL, a proxy's log or a browser's history may keep of a token
lets its reader open that one session's stream for a few minutes at most, never act as
the client.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from ..sql import event_rows
from ..sql.context import Context

SALT = "flask-silo-sql.stream-token"


class StreamDenied(Exception):
    """A stream request the server refuses: its status, slug and message (the JSON answer)."""

    def __init__(self, status: int, slug: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.slug = slug
        self.message = message


def _serializer(keys: Sequence[str | bytes]) -> URLSafeTimedSerializer:
    if not keys or not keys[-1]:
        raise RuntimeError(
            "silo's stream tokens are signed with app.secret_key: set SECRET_KEY (the same "
            "in every process of the app)"
        )
    secrets_ = [k.encode() if isinstance(k, str) else k for k in keys]
    return URLSafeTimedSerializer(secrets_, salt=SALT)


def mint(ctx: Context, keys: Sequence[str | bytes], sid: str, ttl: float) -> str:
    """A new token for *sid*, valid *ttl* seconds (its session is stored if it was not).

    *keys*: the secret keys, the current one last (``SECRET_KEY_FALLBACKS`` first).
    """
    serializer = _serializer(keys)  # (no key: said before anything is written)
    value = secrets.token_urlsafe(24)
    event_rows.add_token(ctx, sid, value, ctx.now() + ttl)
    return str(serializer.dumps(value))


def session_of(ctx: Context, keys: Sequence[str | bytes], token: str, ttl: float) -> str:
    """The session *token* opens (:class:`StreamDenied` with 401 otherwise)."""
    if not token:
        raise StreamDenied(
            401,
            "stream_token_missing",
            "this stream needs ?token=<a token from the app's stream-token endpoint>",
        )
    try:
        value = _serializer(keys).loads(token, max_age=int(ttl) + 1)
    except SignatureExpired:
        raise StreamDenied(
            401, "stream_token_expired", "the stream token expired: ask for a new one"
        ) from None
    except BadSignature:
        raise StreamDenied(
            401, "stream_token_invalid", "the stream token is not one this server issued"
        ) from None
    sid = event_rows.token_session(ctx, str(value))
    if sid is None:
        raise StreamDenied(
            401,
            "stream_token_expired",
            "the stream token no longer opens a stream (it expired, or its session did): "
            "ask for a new one",
        )
    return sid
