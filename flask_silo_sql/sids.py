"""Session IDs: how they are made and which ones a client may present."""

from __future__ import annotations

import re
import secrets

from .models import SID_LENGTH

SID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
"""Characters a SID may hold: URL-safe, header-safe and path-safe (no dots)."""


def new_sid() -> str:
    """A fresh SID: 256 random bits from :mod:`secrets`, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def is_valid_sid(sid: str, min_length: int = 1) -> bool:
    """Whether *sid* may be used: length within bounds and only safe characters."""
    return min_length <= len(sid) <= SID_LENGTH and SID_PATTERN.fullmatch(sid) is not None
