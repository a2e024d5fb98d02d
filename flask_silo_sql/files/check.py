"""``fsck``: compare a file store's bytes with its rows, and repair what is safe to repair.

It judges against a consistent view, so that running it (``--fix``
included) while uploads go on never deletes a good file nor forgets a good
row. The rows are read once, when the run starts; then:

* bytes changed after the run began, and the bytes of a session with an
  upload in progress (a pending row refreshed within the grace period), are
  left alone and counted, never judged: every upload has its pending row
  before its bytes appear, until its commit turns it into the file's row;
* a row that looks wrong is read again (by id) before it is reported, and a
  repair deletes a row only if it is still the row that was judged (the same
  id and time), a file only holding the session directory's lock, which
  uploads take to move bytes in and write their rows, after checking again;
* a file's size and SHA-256 are checked against its row: a row whose bytes
  differ is reported (and left as it is: which side is right is for a person
  to say).

``local`` stores are checked per host: only this machine's rows and disk; the
rows of other hosts are counted, never touched. ``database`` stores check
their chunks; fsspec stores list the objects under their URL.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, cast

from ..errors import SiloError
from ..keys import is_key
from .backends.database import ChunkReader
from .backends.fsspec import FsspecBytes
from .digest import sha256_of
from .limits import OLD_PREFIX, TEMP_PREFIX
from .locks import directory_lock
from .records import FileRecords, StoreView
from .rows import FileRow, kept_aside

CLOCK_MARGIN_S = 0.02
"""A file's time lags the clock by up to a tick: bytes this close to the start are recent."""


@dataclass
class FsckReport:
    """What :func:`fsck` found (and, with ``fix``, repaired) in one file store."""

    store: str
    unrecorded: list[str] = field(default_factory=list)
    """Bytes without a row (``sid/filename``; a ``database`` store: ``chunks of file N``)."""
    missing: list[str] = field(default_factory=list)
    """Rows whose bytes are not there (``sid/filename``)."""
    partial: list[str] = field(default_factory=list)
    """Leftovers of interrupted uploads: temporary files, versions kept aside, pending rows."""
    mismatched: list[str] = field(default_factory=list)
    """Rows whose bytes differ from them in size or SHA-256 (``sid/filename``)."""
    elsewhere: int = 0
    """Rows of files on other hosts (``local``), not checked here."""
    in_progress: int = 0
    """Entries of uploads in progress, or changed after the run began: not judged."""
    retired: int = 0
    """Replaced versions kept for the downloads that began before (not a problem: the
    upkeep removes them an hour after their replacement)."""
    fixed: bool = False

    @property
    def clean(self) -> bool:
        return not (self.unrecorded or self.missing or self.partial or self.mismatched)


def fsck(
    files: StoreView,
    records: FileRecords,
    *,
    fix: bool = False,
    grace: float = 600.0,
    verify: bool = True,
) -> FsckReport:
    """Compare *files*' bytes with its rows, *records* (see the module docstring).

    *grace*: seconds a pending row stays an upload in progress after its last
    sign of life. *verify*: read every file to check its SHA-256 (else sizes
    only). With *fix*: bytes without a row and leftovers of interrupted
    uploads are deleted, rows without their bytes are forgotten.
    """
    check = _Check(files, records, grace=grace, verify=verify, fix=fix)
    kind = files.blobs.kind
    if kind == "local":
        check.local()
    elif kind == "database":
        check.database()
    else:
        check.fsspec()
    check.report.fixed = fix
    return check.report


def _sha256(stream_path: str) -> str:
    with open(stream_path, "rb") as handle:
        return sha256_of(handle)


class _Check:
    def __init__(
        self, files: StoreView, records: FileRecords, *, grace: float, verify: bool, fix: bool
    ) -> None:
        self.files = files
        self.records = records
        self.verify = verify
        self.fix = fix
        self.grace = grace
        self.report = FsckReport(files.name)
        self.started = time.time() - CLOCK_MARGIN_S
        """This machine's clock at the start (the disk's timestamps are on it)."""
        db_now = records.now()
        self.rows = records.rows()
        self.committed = [r for r in self.rows if not r.pending]
        uploads = [r for r in self.rows if r.pending and not r.retired]
        self.report.retired = sum(1 for r in self.rows if r.retired)
        self.stale = [r for r in uploads if (r.created_at or 0.0) < db_now - grace]
        self.live = [r for r in uploads if (r.created_at or 0.0) >= db_now - grace]
        """Uploads in progress when the run began."""
        self.busy = {r.sid for r in self.live}
        """Sessions with an upload in progress when the run began."""

    # -- local -------------------------------------------------------------------------------

    def _mine(self, row: FileRow) -> bool:
        return row.backend == "local" and (row.host is None or row.host == self.files.host)

    def local(self) -> None:
        report = self.report
        mine = {(r.sid, r.filename): r for r in self.committed if self._mine(r)}
        report.elsewhere = sum(1 for r in self.committed if not self._mine(r))
        busy = {r.sid for r in self.live if self._mine(r)}
        stale = [r for r in self.stale if self._mine(r)]
        seen: set[tuple[str, str]] = set()
        strays: list[tuple[str, str]] = []
        leftovers: list[tuple[str, str]] = []
        for sid, name, directory, path, st in self._session_files():
            # Written after the run began (an upload that began after the rows were
            # read: its pending row is written before its first byte).
            recent = st.st_mtime >= self.started
            key = (sid, name)
            if name.startswith(TEMP_PREFIX):
                if sid in busy or recent:
                    report.in_progress += 1
                else:
                    leftovers.append(key)
                continue
            row = mine.get(key)
            if row is None:
                if sid in busy or recent:
                    report.in_progress += 1
                else:
                    strays.append(key)
                continue
            seen.add(key)
            aside = kept_aside(directory, row)
            with contextlib.suppress(FileNotFoundError):  # its upload may commit meanwhile
                # An upload moved its bytes in and never committed: the row's own are
                # kept aside (its readers read them there; a fix puts them back).
                path, st = aside, os.lstat(aside)
                recent = st.st_mtime >= self.started
            if recent:
                report.in_progress += 1
            elif self._differs_on_disk(path, st, row):
                report.mismatched.append(f"{sid}/{name}")
        gone = self._gone(mine, seen)
        report.unrecorded = [f"{s}/{n}" for s, n in strays]
        report.missing = [f"{r.sid}/{r.filename}" for r in gone]
        leftover_names = {f"{s}/{n}" for s, n in leftovers}
        report.partial = sorted(leftover_names | {f"{r.sid}/{r.filename}" for r in stale})
        if self.fix:
            self._fix_local(strays, leftovers, stale, gone)

    def _session_files(self) -> Iterator[tuple[str, str, str, str, os.stat_result]]:
        """``(sid, name, directory, path, stat)`` of each regular file of a session
        directory here."""
        base = self.files.base_dir
        sids = sorted(os.listdir(base)) if os.path.isdir(base) else []
        for sid in sids:
            directory = os.path.join(base, sid)
            if not is_key(sid) or not os.path.isdir(directory) or os.path.islink(directory):
                continue
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if os.path.isfile(path) and not os.path.islink(path):
                    yield sid, name, directory, path, st

    def _gone(
        self, mine: dict[tuple[str, str], FileRow], seen: set[tuple[str, str]]
    ) -> list[FileRow]:
        """This machine's rows whose file is not on its disk (and still their file's row)."""
        gone: list[FileRow] = []
        for key, row in sorted(mine.items()):
            path = os.path.join(self.files.base_dir, *key)
            if key in seen or os.path.exists(path):
                continue
            if self.records.row_by_id(row.id or 0) is None:
                continue  # replaced or removed meanwhile
            gone.append(row)
        return gone

    def _fix_local(
        self,
        strays: list[tuple[str, str]],
        leftovers: list[tuple[str, str]],
        stale: list[FileRow],
        gone: list[FileRow],
    ) -> None:
        for sid, name in strays:
            self._unlink_unrecorded(sid, name)
        for sid, name in leftovers:
            self._unlink_leftover(sid, name)
        for row in stale:
            if self.records.forget_id(row.id or 0, seen=row.seen) is not None:
                self.files.blobs.remove([row])
        for row in gone:
            if not os.path.exists(os.path.join(self.files.base_dir, row.sid, row.filename)):
                self.records.forget_id(row.id or 0, seen=row.seen)

    def _differs_on_disk(self, path: str, st: os.stat_result, row: FileRow) -> bool:
        """Whether the file's size or SHA-256 differs from its row (read again if so)."""
        try:
            if st.st_size == row.size_bytes and (not self.verify or _sha256(path) == row.sha256):
                return False
        except FileNotFoundError:
            return False  # replaced or removed meanwhile: not this run's to judge
        again = self.records.row_by_id(row.id or 0)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return False
        changed = (now.st_ino, now.st_mtime_ns) != (st.st_ino, st.st_mtime_ns)
        return again is not None and again.sha256 == row.sha256 and not changed

    def _still_unrecorded(self, sid: str, name: str) -> bool:
        """Holding the directory lock: no row names the file now, no upload is in progress."""
        if self.records.row(sid, name) is not None:
            return False
        return not self._upload_in_progress(sid)

    def _unlink_unrecorded(self, sid: str, name: str) -> None:
        self._unlink_unless(sid, name, lambda: not self._still_unrecorded(sid, name))

    def _unlink_leftover(self, sid: str, name: str) -> None:
        # An upload in progress may own it (a version it keeps aside).
        if name.startswith(OLD_PREFIX) and self._put_back(sid, name):
            return
        self._unlink_unless(sid, name, lambda: self._upload_in_progress(sid))

    def _put_back(self, sid: str, name: str) -> bool:
        """A committed row's version kept aside by an upload that died before its commit:
        back under the row's name (holding the directory lock, no upload in progress)."""
        directory = os.path.join(self.files.base_dir, sid)
        with directory_lock(directory):
            if self._upload_in_progress(sid):
                return True
            path = os.path.join(directory, name)
            for row in self.records.session_rows(sid):
                if self._mine(row) and kept_aside(directory, row) == path:
                    with contextlib.suppress(OSError):
                        os.replace(path, os.path.join(directory, row.filename))
                    return True
        return False

    def _unlink_unless(self, sid: str, name: str, keep: Callable[[], bool]) -> None:
        """Holding the directory lock: unlink a file older than this run unless *keep*()."""
        directory = os.path.join(self.files.base_dir, sid)
        with directory_lock(directory):
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
            if st.st_mtime >= self.started or keep():
                return
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _upload_in_progress(self, sid: str) -> bool:
        limit = self.records.now() - self.grace
        return any((r.created_at or 0.0) >= limit for r in self.records.pending_rows(sid))

    # -- database ----------------------------------------------------------------------------

    def database(self) -> None:
        report, records = self.report, self.records
        gone: list[FileRow] = []
        for row in self.committed:
            if row.backend != "database":
                report.elsewhere += 1
                continue
            assert row.id is not None
            sizes = records.chunk_sizes(row.id)
            total = sum(size for _, size in sizes)
            contiguous = [seq for seq, _ in sizes] == list(range(len(sizes)))
            if not sizes and row.size_bytes > 0:
                if records.row_by_id(row.id) is not None:
                    gone.append(row)
                continue
            if total == row.size_bytes and contiguous and not self._chunks_differ(row):
                continue
            again = records.row_by_id(row.id)
            if again is not None and again.sha256 == row.sha256:
                report.mismatched.append(f"{row.sid}/{row.filename}")
        orphans = records.orphan_chunks()
        report.unrecorded = [f"chunks of file {file_id}" for file_id in orphans]
        report.missing = [f"{r.sid}/{r.filename}" for r in gone]
        stale = [r for r in self.stale if r.backend == "database"]
        report.partial = [f"{r.sid}/{r.filename}" for r in stale]
        if not self.fix:
            return
        for file_id in orphans:
            records.forget_id(file_id)
        for row in stale + gone:
            records.forget_id(row.id or 0, seen=row.seen)

    def _chunks_differ(self, row: FileRow) -> bool:
        if not self.verify:
            return False
        try:
            reader = ChunkReader(self.files, self.records, row, verify=False)  # checked here
            found = sha256_of(cast(IO[bytes], reader))
        except SiloError:
            return self.records.row_by_id(row.id or 0) is not None
        return found != row.sha256

    # -- fsspec ------------------------------------------------------------------------------

    def fsspec(self) -> None:
        report, records = self.report, self.records
        backend = self.files.blobs
        assert isinstance(backend, FsspecBytes)
        named = {
            f"{r.sid}/{r.location}": r for r in self.rows if r.backend == "fsspec" and r.location
        }
        report.elsewhere = sum(1 for r in self.committed if r.backend != "fsspec")
        listed: dict[str, dict[str, object]] = {obj["name"]: obj for obj in backend.objects()}
        strays: list[str] = []
        for name, obj in sorted(listed.items()):
            row = named.get(name)
            sid = name.split("/", 1)[0]
            mtime = obj.get("mtime")  # the object store's clock: judged with the grace
            recent = not isinstance(mtime, (int, float)) or mtime >= self.started - self.grace
            if row is None:
                if sid in self.busy or recent:
                    report.in_progress += 1
                else:
                    strays.append(name)
                continue
            if row.pending:
                continue  # judged with the pending rows below
            if obj.get("size") != row.size_bytes or self._object_differs(row):
                again = records.row_by_id(row.id or 0)
                if again is not None and again.sha256 == row.sha256:
                    report.mismatched.append(f"{row.sid}/{row.filename}")
        gone = []
        for key, row in sorted(named.items()):
            if row.pending or key in listed:
                continue
            if backend.fs.exists(backend.key(row)) or records.row_by_id(row.id or 0) is None:
                continue
            gone.append(row)
        stale = [r for r in self.stale if r.backend == "fsspec"]
        report.unrecorded = strays
        report.missing = [f"{r.sid}/{r.filename}" for r in gone]
        report.partial = [f"{r.sid}/{r.filename}" for r in stale]
        if not self.fix:
            return
        if strays:
            now_named = {f"{r.sid}/{r.location}" for r in records.rows() if r.backend == "fsspec"}
            backend.delete_keys(
                [f"{backend.root}/{name}" for name in strays if name not in now_named], sid=None
            )
        for row in stale:
            if records.forget_id(row.id or 0, seen=row.seen) is not None:
                backend.remove([row])
        for row in gone:
            records.forget_id(row.id or 0, seen=row.seen)

    def _object_differs(self, row: FileRow) -> bool:
        if not self.verify:
            return False
        try:
            with self.files.blobs.open(row) as handle:
                found = sha256_of(handle)
        except (SiloError, OSError):
            return True
        return found != row.sha256
