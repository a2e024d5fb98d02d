"""A failed file operation as the :class:`~flask_silo_sql.errors.SiloError` it answers with."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import FileStorageError, InsufficientStorage, SiloError
from ..logs import log_failure, silo_logger

logger = silo_logger("flask_silo_sql.files")


def file_errors(
    store: str, sid: str | None, action: str
) -> contextlib.AbstractContextManager[None]:
    """Turn an ``OSError`` of a file operation into a :class:`SiloError` (logged, SID kept out)."""
    return _file_errors(store, sid, action)


@contextmanager
def _file_errors(store: str, sid: str | None, action: str) -> Iterator[None]:
    try:
        yield
    except SiloError:
        raise
    except OSError as exc:
        raise storage_error(exc, store, sid, action) from None


def storage_error(exc: BaseException, store: str, sid: str | None, action: str) -> SiloError:
    """The :class:`SiloError` a failed file operation answers with (it is logged here)."""
    log_failure(logger, "file store %r could not %s", store, action, exc=exc, sid=sid)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(store)
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    return FileStorageError(store, action, reason, remote=not isinstance(exc, OSError))
