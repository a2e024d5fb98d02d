"""Exceptions raised by flask-silo-sql.

Every error derives from :class:`SiloError`, so ``except SiloError`` catches
them all. The first four names are those of flask-silo 0.1.6.
"""

from __future__ import annotations


class SiloError(Exception):
    """Base class for every flask-silo-sql error."""


class SessionExpired(SiloError):
    """A session was expired because it was idle for longer than its TTL."""

    def __init__(self, sid: str, message: str | None = None) -> None:
        self.sid = sid
        super().__init__(message or f"Session '{sid}' has expired due to inactivity.")


class SessionBusy(SiloError):
    """A session is busy (running work) and cannot be reset or expired now."""

    def __init__(self, sid: str, message: str | None = None) -> None:
        self.sid = sid
        super().__init__(message or f"Session '{sid}' has active tasks and cannot be modified.")


class NamespaceError(SiloError):
    """A namespace was used that was never registered."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        super().__init__(f"Namespace '{namespace}' is not registered. Call register() first.")


class StateNotSerializable(SiloError, TypeError):
    """Namespace state holds a value that cannot be stored as JSON.

    Durable state is JSON: the error names the namespace and the top-level key
    whose value failed, and nothing of the session is written. ``invalid_value``
    is True for JSON data that cannot be stored (NaN or Infinity, a NUL
    character, a lone surrogate, nesting too deep, the reserved task key):
    data a client may have sent, answered ``422``; False for a value that is
    not JSON at all (a bug in the application), answered ``500``.
    """

    def __init__(
        self, namespace: str, key: str | None, reason: str, *, invalid_value: bool = False
    ) -> None:
        self.namespace = namespace
        self.key = key
        self.invalid_value = invalid_value
        where = f"key '{key}' of namespace '{namespace}'" if key else f"namespace '{namespace}'"
        super().__init__(f"Cannot store {where} as JSON: {reason}")


class StateTooLarge(SiloError):
    """A namespace's JSON is larger than the configured ``max_state_bytes``."""

    def __init__(self, namespace: str, size: int, limit: int) -> None:
        self.namespace = namespace
        self.size = size
        self.limit = limit
        super().__init__(
            f"Namespace '{namespace}' would take {size} bytes as JSON; the limit is {limit}."
        )


class FileTooLarge(SiloError):
    """A file (or a session's files together) would exceed a configured byte limit."""

    def __init__(self, filename: str, size: int, limit: int) -> None:
        self.filename = filename
        self.size = size
        self.limit = limit
        super().__init__(f"File '{filename}' exceeds the limit of {limit} bytes.")


class InvalidFilename(SiloError, ValueError):
    """A file name with nothing safe left, or too long (answered ``400``)."""

    def __init__(self, filename: str, reason: str = "nothing safe is left of it") -> None:
        self.filename = filename
        super().__init__(f"Invalid file name {filename[:100]!r}: {reason}.")


class StateConflict(SiloError):
    """Another request changed a namespace after this request read it.

    The write is refused instead of silently overwriting the other change.
    """

    def __init__(self, sid: str, namespace: str) -> None:
        self.sid = sid
        self.namespace = namespace
        super().__init__(
            f"Namespace '{namespace}' was changed by another request since it was read; "
            "the change was not saved."
        )


class SchemaError(SiloError):
    """The database schema is missing or not at the revision this version needs."""

    def __init__(self, current: str | None, head: str, url: str) -> None:
        self.current = current
        self.head = head
        state = "has no flask-silo-sql schema" if current is None else f"is at revision {current}"
        super().__init__(
            f"The silo database ({url}) {state}; this version needs revision {head}. "
            "Run `flask silo-db upgrade` to migrate it."
        )


class StorageUnavailable(SiloError):
    """The database could not be reached (answered as 503 by the extension)."""
