"""What a file store names, sizes and keeps for how long: one place for its constants."""

from __future__ import annotations

from werkzeug.utils import secure_filename

from ..errors import InvalidFilename

TEMP_PREFIX = ".silo-upload-"
"""Names of uploads in progress (files and pending rows); no stored name starts so."""
OLD_PREFIX = TEMP_PREFIX + "old-"
"""A ``local`` version kept aside while an upload that replaces it is not committed."""
RETIRED_PREFIX = TEMP_PREFIX + "retired-"
"""Name of the row of a replaced ``database``/fsspec version, kept for its readers."""
RETIRED_KEEP_S = 3600.0
"""How long a replaced version's bytes stay for the downloads that began before."""
FILE_MODE = 0o600
"""Mode of stored files: readable by the application's user only."""
CHUNK = 1024 * 1024
"""Bytes read from a stream at a time, and the size of a ``database`` chunk."""
Piece = bytes | bytearray | memoryview
"""A piece of a file on its way: a view of a buffer that is filled again later."""
FREE_SPACE_STEP = 8 * 1024 * 1024
"""Bytes an upload receives between two checks of the free-space floor."""
HEARTBEAT_S = 60.0
"""An upload in progress refreshes its pending row at least this often."""
STALE_UPLOAD_S = 3600.0
"""A pending row not refreshed for this long belongs to an upload that died."""
MAX_FILENAME_BYTES = 255
"""The longest name a file system (and ``silo_files.filename``) takes."""
UNLIMITED = 2**62
"""A quota that is no quota (bound instead of None, so one statement serves both)."""


def safe_filename(filename: str) -> str:
    """A name that cannot leave its directory.

    Raises :class:`InvalidFilename` (a ValueError) if nothing safe is left or
    the name is too long to store.
    """
    name = secure_filename(filename)
    if not name or name.startswith(TEMP_PREFIX):
        raise InvalidFilename(filename)
    if len(name.encode()) > MAX_FILENAME_BYTES:
        raise InvalidFilename(filename, f"longer than {MAX_FILENAME_BYTES} bytes")
    return name
