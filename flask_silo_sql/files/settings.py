"""The settings of a file store, read once from the configuration (``SILO_*`` keys)."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .backends.urls import check_backend
from .records import Backend


def this_host() -> str:
    """This machine's name, as ``local`` rows record it (``SILO_FILE_HOST`` overrides)."""
    return socket.gethostname()


@dataclass(frozen=True, slots=True)
class FileSettings:
    """What :meth:`Silo.add_file_store <flask_silo_sql.Silo.add_file_store>` takes from the
    configuration, each overridden by the argument of the same name."""

    max_file_bytes: int | None = None
    """``SILO_MAX_FILE_BYTES``: the largest file (None: no limit)."""
    max_session_bytes: int | None = None
    """``SILO_MAX_SESSION_BYTES``: a session's quota across its files (None: none)."""
    min_free_bytes: int | None = None
    """``SILO_MIN_FREE_BYTES``: uploads are refused (``507``) below this free space."""
    backend: Backend = "local"
    """``SILO_FILE_BACKEND``: ``"local"``, ``"database"`` or an fsspec URL."""
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    """``SILO_FILE_STORAGE_OPTIONS``: the fsspec filesystem's options."""
    host: str | None = None
    """``SILO_FILE_HOST``: this machine's name in ``local`` rows (None: its host name)."""

    KEYS: ClassVar[dict[str, str]] = {
        "max_file_bytes": "SILO_MAX_FILE_BYTES",
        "max_session_bytes": "SILO_MAX_SESSION_BYTES",
        "min_free_bytes": "SILO_MIN_FREE_BYTES",
        "backend": "SILO_FILE_BACKEND",
        "storage_options": "SILO_FILE_STORAGE_OPTIONS",
        "host": "SILO_FILE_HOST",
    }
    """Each setting and the configuration key it is read from."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FileSettings:
        """The settings *config* holds (absent keys: no limit, ``local``, this host).
        An unusable backend raises ``ValueError`` at once."""

        def size(key: str) -> int | None:
            value = config.get(key)
            return None if value is None else int(value)

        backend = config.get("SILO_FILE_BACKEND") or "local"
        check_backend(backend)
        return cls(
            max_file_bytes=size("SILO_MAX_FILE_BYTES"),
            max_session_bytes=size("SILO_MAX_SESSION_BYTES"),
            min_free_bytes=size("SILO_MIN_FREE_BYTES"),
            backend=backend,
            storage_options=dict(config.get("SILO_FILE_STORAGE_OPTIONS") or {}),
            host=config.get("SILO_FILE_HOST") or None,
        )

    def overridden(self, **given: Any) -> FileSettings:
        """These settings, with each of *given* that is not None instead."""
        unknown = set(given) - set(self.KEYS)
        if unknown:
            raise TypeError(f"not a file setting: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})
