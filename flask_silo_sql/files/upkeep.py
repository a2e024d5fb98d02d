"""The upkeep each process runs after a sweep: no machine keeps a gone session's bytes.

A sweep removes the rows of the sessions it expires (and, for the
``database`` backend, their chunks, in the same transaction), and the
sweeping process removes their directory and fsspec objects. Other machines
learn of it here: a ``local`` directory or a cached copy whose session no
longer exists goes (at once when its SID is remembered as expired, else once
nothing in it changed for a grace period, so a directory an upload is about to
use is left alone), as do cached copies that no row names any more (once
unused for the grace period: a request may hold the path it was handed),
temporary files of uploads that died, and replaced versions kept for the
downloads that began before them (an hour after their replacement). For an
fsspec store, removals that failed are retried, and, at most once an hour per
process, objects of sessions that no longer exist are removed from the store
itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

from ..keys import is_key
from ..logs import silo_logger
from .backends.cache import SHA_DIR_LENGTH
from .backends.fsspec import FsspecBytes, mtime
from .limits import OLD_PREFIX, RETIRED_KEEP_S, STALE_UPLOAD_S, TEMP_PREFIX
from .locks import directory_lock
from .records import FileRecords, StoreView
from .rekey import rekey_objects
from .rows import kept_aside

logger = silo_logger("flask_silo_sql.files")

BATCH = 500
REMOTE_EVERY_S = 3600.0
_remote_checked: dict[int, float] = {}


def maintain(files: StoreView, records: FileRecords, *, grace: float = 300.0) -> int:
    """See :meth:`FileStore.maintain` (*records*: its rows); returns how many session
    directories went."""
    backend = files.blobs
    if backend.kind != "local":
        _forget_retired(files, records)
    if isinstance(backend, FsspecBytes):
        backend.retry_removals()
    removed = 0
    base = files.base_dir
    try:
        entries = sorted(os.listdir(base))
    except FileNotFoundError:
        entries = []
    sids = [
        e
        for e in entries
        if is_key(e)
        and os.path.isdir(os.path.join(base, e))
        and not os.path.islink(os.path.join(base, e))
    ]
    now = time.time()
    for start in range(0, len(sids), BATCH):
        batch = sids[start : start + BATCH]
        alive, expired = records.live(batch)
        for sid in batch:
            directory = os.path.join(base, sid)
            if sid in alive:
                _tidy_live(files, records, sid, directory, now)
                continue
            if sid in expired or _newest(directory) < now - grace:
                shutil.rmtree(directory, ignore_errors=True)
                removed += 1
        if backend.kind != "local":
            _prune_cache(files, records, [s for s in batch if s in alive], now, grace)
    if isinstance(backend, FsspecBytes):
        _maintain_remote(files, backend, records, now, grace)
    if removed:
        logger.info(
            "file store %r: removed %d directory(ies) of gone sessions", files.name, removed
        )
    return removed


def _forget_retired(files: StoreView, records: FileRecords) -> None:
    """Replaced versions kept for their readers, once no download can need them: their
    rows and chunks, then their objects."""
    gone = records.forget_retired(records.now() - RETIRED_KEEP_S)
    if gone:
        files.blobs.remove(gone)


def _newest(directory: str) -> float:
    """The latest change in *directory* or the entries in it (and one level below)."""
    newest = 0.0
    with contextlib.suppress(OSError):
        st = os.stat(directory)
        newest = max(st.st_mtime, st.st_ctime)
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                newest = max(newest, info.st_mtime, info.st_ctime)
                if entry.is_dir(follow_symlinks=False):
                    for inner in os.scandir(entry.path):
                        with contextlib.suppress(OSError):
                            deep = inner.stat(follow_symlinks=False)
                            newest = max(newest, deep.st_mtime, deep.st_ctime)
    return newest


def _tidy_live(
    files: StoreView, records: FileRecords, sid: str, directory: str, now: float
) -> None:
    """Temporary files of uploads that died (untouched for an hour) in a live session; a
    version an upload that died had kept aside goes back under its name."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if max(info.st_mtime, info.st_ctime) >= now - STALE_UPLOAD_S:
                    continue
                if entry.name.startswith(OLD_PREFIX):
                    _put_back(files, records, sid, directory, entry.path)
                else:
                    os.unlink(entry.path)


def _put_back(files: StoreView, records: FileRecords, sid: str, directory: str, path: str) -> None:
    """Holding the directory lock, no upload in progress: the kept-aside version of the
    file's current row back under its name (that upload never committed), else gone."""
    with directory_lock(directory):
        alive = records.now() - STALE_UPLOAD_S
        if any((r.created_at or 0.0) >= alive for r in records.pending_rows(sid)):
            return  # an upload in progress may have moved in relying on it
        for row in records.session_rows(sid):
            if row.backend == "local" and kept_aside(directory, row) == path:
                os.replace(path, os.path.join(directory, row.filename))
                return
        os.unlink(path)


def _prune_cache(
    files: StoreView, records: FileRecords, sids: list[str], now: float, grace: float
) -> None:
    """Cached copies that no row names any more (a reset, a replacement elsewhere)."""
    if not sids:
        return
    keep: dict[str, set[tuple[str, str]]] = {sid: set() for sid in sids}
    for sid, name, sha in records.rows_of(sids):
        keep[sid].add((sha[:SHA_DIR_LENGTH], name))
    for sid in sids:
        directory = os.path.join(files.base_dir, sid)
        with contextlib.suppress(OSError):
            for version in os.scandir(directory):
                if version.name.startswith(TEMP_PREFIX) or not version.is_dir(
                    follow_symlinks=False
                ):
                    continue
                for cached in os.scandir(version.path):
                    if (version.name, cached.name) in keep[sid]:
                        continue
                    with contextlib.suppress(OSError):
                        info = cached.stat(follow_symlinks=False)
                        if max(info.st_mtime, info.st_ctime) < now - grace:
                            os.unlink(cached.path)
                with contextlib.suppress(OSError):
                    os.rmdir(version.path)


def _maintain_remote(
    files: StoreView, backend: FsspecBytes, records: FileRecords, now: float, grace: float
) -> None:
    """Objects of sessions that no longer exist, in the store itself (rarely: it lists)."""
    key = id(backend)
    if now - _remote_checked.get(key, 0.0) < REMOTE_EVERY_S:
        return
    _remote_checked[key] = now
    try:
        rekey_objects(backend)  # objects from before SIDs were hashed at rest
        prefixes = [p for p in backend.sessions() if is_key(p)]
        for start in range(0, len(prefixes), BATCH):
            batch = prefixes[start : start + BATCH]
            alive, expired = records.live(batch)
            for sid in batch:
                if sid in alive:
                    continue
                if sid not in expired and not _remote_idle(backend, sid, now - grace):
                    continue
                backend.remove_session(sid)
    except Exception:
        logger.warning("file store %r: could not check its objects; tried again later", files.name)


def _remote_idle(backend: FsspecBytes, sid: str, before: float) -> bool:
    """Whether every object of session *sid* is older than *before*."""
    try:
        found = backend.fs.find(backend.session_prefix(sid), detail=True)
    except FileNotFoundError:
        return True
    for info in found.values():
        modified = mtime(info)
        if modified is None or modified >= before:
            return False
    return True
