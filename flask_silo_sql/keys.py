"""Session keys: how a session is named at rest, by a one-way hash of its SID.

A SID is a bearer credential. Every table row and every file path names a
session by its *key* instead: ``sha256.`` and the hex SHA-256 of the SID's
UTF-8 bytes. Whoever reads a dump, a replica or the uploads folder holds
keys, and a key is not a SID: presented by a client it fails the SID check
(a key has a dot, which no SID may hold) and a fresh session is issued.

:func:`session_key` is the one seam where a SID becomes the key: every
entry point that takes a SID (the store, the file stores, the request)
calls it first, and everything below works on keys only. It leaves a key as
it is, so a key read back from a table (``all_sids``, ``on_expire``) can be
passed again. The hash is unkeyed on purpose (see ``docs/sids-at-rest.md``):
no secret to rotate or lose, the same key in every app sharing a database,
and an operator computes it with ``sha256sum`` or PostgreSQL's ``sha256()``.
"""

from __future__ import annotations

import hashlib
import re

KEY_PREFIX = "sha256."
KEY_PATTERN = re.compile(r"sha256\.[0-9a-f]{64}")


class SessionKey(str):
    """A session's key as silo hands it out (:func:`session_key`, ``all_sids``,
    ``on_expire``...): a ``str`` marked as a key.

    The bare :class:`~flask_silo_sql.sql.SQLStorage` interface hashes every
    value that is not one (its SIDs may come straight from a client, whatever
    their form), so the keys silo hands out can be handed back to it.
    """

    __slots__ = ()


def hashed(sid: str) -> SessionKey:
    """The key of *sid*, always hashed (a value from a client, whatever its form)."""
    digest = hashlib.sha256(sid.encode("utf-8", "surrogatepass")).hexdigest()
    return SessionKey(KEY_PREFIX + digest)


def is_key(value: str) -> bool:
    """Whether *value* is a session key (never a valid SID: keys hold a dot)."""
    return KEY_PATTERN.fullmatch(value) is not None


def session_key(sid: str) -> SessionKey:
    """The key *sid* is stored under; a key is returned as it is."""
    if isinstance(sid, SessionKey):
        return sid
    return SessionKey(sid) if is_key(sid) else hashed(sid)


def client_key(sid: str) -> SessionKey:
    """The key of a value that may come from a client: hashed unless it is a
    :class:`SessionKey` silo handed out (never looked up as a key because of its form)."""
    return sid if isinstance(sid, SessionKey) else hashed(sid)
