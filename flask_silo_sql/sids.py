"""Session IDs: how they are made and which ones a client may present."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time

from .keys import KEY_PREFIX, session_key

SID_LENGTH = 128
"""Longest SID a client may present (and the tables hold)."""

SID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
"""Characters a SID may hold: URL-safe, header-safe and path-safe (no dots)."""


def new_sid() -> str:
    """A fresh SID: 256 random bits from :mod:`secrets`, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def is_valid_sid(sid: str, min_length: int = 1) -> bool:
    """Whether *sid* may be used: length within bounds and only safe characters."""
    return min_length <= len(sid) <= SID_LENGTH and SID_PATTERN.fullmatch(sid) is not None


SIGNED_TOKEN_LENGTH = 32
ISSUED_LENGTH = 7
"""Base64url of the issue time: 5 bytes of Unix seconds."""
SIGNATURE_LENGTH = 22
SIGNED_SID_LENGTH = SIGNED_TOKEN_LENGTH + ISSUED_LENGTH + SIGNATURE_LENGTH


def _signature(key: bytes, token: str) -> str:
    mac = hmac.new(key, b"flask-silo-sql sid:" + token.encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def new_signed_sid(key: bytes, now: float | None = None) -> str:
    """A SID the server can recognise as its own: 192 random bits, its issue time, an HMAC."""
    issued = int(time.time() if now is None else now).to_bytes(5, "big")
    token = secrets.token_urlsafe(24) + base64.urlsafe_b64encode(issued).rstrip(b"=").decode()
    return token + _signature(key, token)


def issued_at(sid: str) -> float:
    """When a signed SID was issued (Unix seconds; trust it only once the SID verified)."""
    raw = sid[SIGNED_TOKEN_LENGTH : SIGNED_TOKEN_LENGTH + ISSUED_LENGTH] + "="
    return float(int.from_bytes(base64.urlsafe_b64decode(raw), "big"))


def is_signed_sid(
    sid: str, keys: list[bytes], *, now: float | None = None, max_age: float | None = None
) -> bool:
    """Whether *sid* was issued with one of *keys* (the first signs, all verify) and, with
    *max_age*, no longer ago than that."""
    if len(sid) != SIGNED_SID_LENGTH or not SID_PATTERN.fullmatch(sid):
        return False
    token, signature = sid[:-SIGNATURE_LENGTH], sid[-SIGNATURE_LENGTH:]
    if not any(hmac.compare_digest(signature, _signature(key, token)) for key in keys):
        return False
    if max_age is None:
        return True
    age = (time.time() if now is None else now) - issued_at(sid)
    return -60.0 <= age <= max_age  # a minute of leeway for a clock slightly behind


def tag(sid: str) -> str:
    """How logs name a session: the first 8 hex digits of its key (a SID or a key gives the
    same tag), so an operator finds its row (``sid LIKE 'sha256.<tag>%'``), and 32 bits of
    a one-way hash give nobody the SID."""
    key = session_key(sid)
    return key[len(KEY_PREFIX) : len(KEY_PREFIX) + 8]
