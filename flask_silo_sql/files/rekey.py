"""Session directories named by a SID, from before SIDs were hashed at rest, renamed to keys.

The database's rows move to their keys in one migration; the directories are
each machine's own, so each machine renames its own: ``flask silo-db
upgrade`` for the app's file stores where it runs, and every process's file
upkeep (after its sweeps) for what is left. A directory's name is the SID
itself, so renaming needs nothing else and can happen at any time. A key's
directory already there (an upload after the upgrade) gets what it lacks;
what both hold is left in the old directory, for ``fsck`` to show. The
objects of an fsspec store (``<url>/<SID>/...``) move the same way, by
:func:`rekey_objects` (``upgrade``, ``fsck`` and the hourly remote upkeep).
"""

from __future__ import annotations

import contextlib
import os

from ..keys import is_key, session_key
from ..logs import silo_logger
from ..sids import is_valid_sid
from .backends.fsspec import FsspecBytes
from .blobs import Bytes

logger = silo_logger("flask_silo_sql.files")


def rekey_directories(base_dir: str) -> int:
    """Rename every session directory under *base_dir* still named by its SID to its key;
    returns how many were renamed."""
    try:
        entries = list(os.scandir(base_dir))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    renamed = 0
    for entry in entries:
        name = entry.name
        if is_key(name) or not is_valid_sid(name) or not entry.is_dir(follow_symlinks=False):
            continue
        target = os.path.join(base_dir, session_key(name))
        try:
            os.rename(entry.path, target)  # refused when the key's directory has entries
        except OSError:
            _merge(entry.path, target)
        renamed += 1
    if renamed:
        logger.info("renamed %d session directory(ies) under %s to their keys", renamed, base_dir)
    return renamed


def rekey_objects(backend: Bytes) -> int:
    """Move every session prefix of an fsspec store still named by its SID to its key;
    returns how many moved (0 for the other backends)."""
    if not isinstance(backend, FsspecBytes):
        return 0
    moved = 0
    for prefix in backend.sessions():
        if is_key(prefix) or not is_valid_sid(prefix):
            continue
        backend.move_session(prefix, session_key(prefix))
        moved += 1
    if moved:
        logger.info("moved %d session prefix(es) of an fsspec store to their keys", moved)
    return moved


def _merge(source: str, target: str) -> None:
    """Move what *target* lacks from *source*; remove *source* once empty."""
    os.makedirs(target, exist_ok=True)
    for entry in os.scandir(source):
        destination = os.path.join(target, entry.name)
        if not os.path.lexists(destination):
            os.rename(entry.path, destination)
    with contextlib.suppress(OSError):
        os.rmdir(source)
