"""FileStore: one directory per session under a base directory.

Same API as flask-silo 0.1.6, without its path flaws: a SID must be a valid
SID before it names a directory, file names go through werkzeug's
``secure_filename`` (so ``../../x`` or ``/etc/passwd`` stay inside the
session's directory), and files are written to a temporary name and renamed
into place, so a partial file is never visible under its final name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import BinaryIO

from werkzeug.utils import secure_filename

from .sids import is_valid_sid

logger = logging.getLogger("flask_silo_sql.files")

TEMP_PREFIX = ".silo-upload-"
CHUNK = 64 * 1024


def safe_filename(filename: str) -> str:
    """A name that cannot leave its directory (ValueError if nothing is left)."""
    name = secure_filename(filename)
    if not name or name.startswith(TEMP_PREFIX):
        raise ValueError(f"invalid file name {filename!r}")
    return name


class FileStore:
    """Per-session file directories under *base_dir*."""

    __slots__ = ("auto_create", "base_dir")

    def __init__(self, base_dir: str, *, auto_create: bool = True) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.auto_create = auto_create
        if auto_create:
            os.makedirs(self.base_dir, exist_ok=True)

    def _dir(self, sid: str) -> str:
        if not is_valid_sid(sid):
            raise ValueError(f"invalid session id {sid[:40]!r}")
        return os.path.join(self.base_dir, sid)

    def session_dir(self, sid: str) -> str:
        """The directory of session *sid* (created when ``auto_create``)."""
        path = self._dir(sid)
        if self.auto_create:
            os.makedirs(path, exist_ok=True)
        return path

    def save(self, sid: str, filename: str, data: BinaryIO | bytes) -> str:
        """Store *data* as *filename* (sanitised) in the session's directory.

        Returns the absolute path of the stored file.
        """
        directory = self.session_dir(sid)
        path = os.path.join(directory, safe_filename(filename))
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    out.write(data)
                else:
                    while chunk := data.read(CHUNK):
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def get_path(self, sid: str, filename: str) -> str | None:
        """The path of a stored file, or None."""
        try:
            path = os.path.join(self._dir(sid), safe_filename(filename))
        except ValueError:
            return None
        return path if os.path.isfile(path) else None

    def list_files(self, sid: str) -> list[str]:
        """Names of the files stored for *sid*."""
        try:
            directory = self._dir(sid)
        except ValueError:
            return []
        if not os.path.isdir(directory):
            return []
        return sorted(n for n in os.listdir(directory) if not n.startswith(TEMP_PREFIX))

    def cleanup(self, sid: str) -> None:
        """Remove the session's directory and everything in it."""
        try:
            directory = self._dir(sid)
        except ValueError:
            return
        if os.path.isdir(directory):
            shutil.rmtree(directory, ignore_errors=True)

    def cleanup_all(self) -> None:
        """Remove every session directory."""
        if os.path.isdir(self.base_dir):
            for name in os.listdir(self.base_dir):
                path = os.path.join(self.base_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)

    @property
    def total_size_bytes(self) -> int:
        """Bytes used by every stored file."""
        total = 0
        for dirpath, _, filenames in os.walk(self.base_dir):
            for name in filenames:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, name))
        return total
