"""Encrypted namespaces: a namespace's JSON sealed under the app's keys (Fernet).

A namespace registered with ``encrypted=True`` is stored as the JSON object
``{"__silo_sealed__": "<Fernet token>"}``: still JSON, so the ``data`` column
keeps its type and no migration is needed, and an operator sees that the
namespace exists and how large it is, never what it holds. Fernet
(``cryptography``) encrypts (AES-128-CBC) and authenticates (HMAC-SHA256); a
:class:`~cryptography.fernet.MultiFernet` seals under the first key of
``SILO_ENCRYPTION_KEYS`` and opens under any, so keys rotate: put a new key
first, run ``flask silo-db reencrypt``, then retire the old one. A sealed value
that fails authentication (tampered, or sealed under a key no longer listed)
raises :class:`~flask_silo_sql.errors.StateUnreadable`: never read as empty,
never overwritten.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import SiloError, StateUnreadable

if TYPE_CHECKING:
    from cryptography.fernet import Fernet, MultiFernet

SEALED = "__silo_sealed__"
"""The one key of a sealed namespace's stored JSON object."""


def sealed_token(value: Any) -> str | None:
    """The Fernet token of a stored value that is sealed, else None (plain JSON)."""
    if isinstance(value, dict) and len(value) == 1:
        token = value.get(SEALED)
        if isinstance(token, str):
            return token
    return None


class Sealer:
    """Seals and opens namespace JSON under a list of keys, the newest first."""

    def __init__(self, keys: Sequence[str | bytes]) -> None:
        try:
            from cryptography.fernet import Fernet, MultiFernet
        except ImportError:
            raise SiloError(
                "encrypted namespaces need the cryptography package: "
                "pip install 'flask-silo-sql[encryption]'"
            ) from None
        if not keys:
            raise SiloError(
                "encrypted namespaces need SILO_ENCRYPTION_KEYS: a list of Fernet keys, the "
                "newest first (make one with `python -c 'from cryptography.fernet import "
                "Fernet; print(Fernet.generate_key().decode())'`)"
            )
        fernets: list[Fernet] = []
        for index, key in enumerate(keys):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError):
                raise SiloError(
                    f"SILO_ENCRYPTION_KEYS[{index}] is not a Fernet key (32 url-safe "
                    "base64-encoded bytes, as Fernet.generate_key() makes)"
                ) from None
        self._newest: Fernet = fernets[0]
        self._all: MultiFernet = MultiFernet(fernets)

    def seal(self, text: str) -> str:
        """The stored JSON of namespace JSON *text*: sealed under the newest key."""
        token = self._all.encrypt(text.encode()).decode("ascii")
        return json.dumps({SEALED: token}, separators=(",", ":"))

    def open(self, namespace: str, sid: str, token: str) -> str:
        """The JSON text under *token*; :class:`StateUnreadable` if it fails authentication."""
        from cryptography.fernet import InvalidToken

        try:
            return self._all.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            raise StateUnreadable(namespace, sid) from None

    def reseal(self, namespace: str, sid: str, stored: Any) -> str | None:
        """*stored* (a row's value) sealed under the newest key, or None when it is already.

        A plain value (written before the namespace was encrypted) is sealed too.
        """
        token = sealed_token(stored)
        if token is None:
            return self.seal(json.dumps(stored, separators=(",", ":"), ensure_ascii=False))
        from cryptography.fernet import InvalidToken

        try:
            self._newest.decrypt(token.encode("ascii"))
            return None
        except InvalidToken:
            pass
        try:
            fresh = self._all.rotate(token.encode("ascii"))
        except InvalidToken:
            raise StateUnreadable(namespace, sid) from None
        return json.dumps({SEALED: fresh.decode("ascii")}, separators=(",", ":"))
