"""A unit of work on one SQL session: what a request (or a script's transaction) does.

Reads are lazy and cost what they touch: the first namespace a unit reads
comes with the session's row in one ``SELECT``; another namespace is one more;
the whole session is one ``SELECT`` of every row. Each namespace keeps the JSON
text and version it was read at (a :class:`Slot`), so :meth:`SQLUnit.commit`
writes only the namespaces whose JSON changed, each under its version guard.

Everything a unit does goes through the connection of its context (a request
holds one from its first statement to its end), and its writes and task rows
are one transaction at commit. Uploads and task starts are staged: an
upload's bytes are in place already (see :mod:`flask_silo_sql.files`), its
row is written with the commit; a task's row is written with the commit and
its thread starts after it. A request that fails keeps neither: the upload's
previous version comes back, the thread never starts. In locking mode the
transaction is opened, with the session row locked, at the first read and
held until the commit.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..codec import (
    UNSERIALISABLE,
    UnlinkedTask,
    baseline_text,
    encode,
    merge_keys,
    revive_tasks,
    serialise,
    task_id_for,
    tasks_in,
)
from ..errors import NamespaceError, SessionBusy, StateConflict
from ..files import FileRow, StagedUpload, directory_lock
from ..tasks import TASK_MARKER, BackgroundTask, TaskState
from . import sessions as ops
from . import task_rows
from .executor import Executor

if TYPE_CHECKING:
    from .backend import SQLBackend
    from .file_rows import SQLFileRecords

logger = logging.getLogger("flask_silo_sql")

META = "_meta"


class Slot:
    """One namespace as a unit read it: the object handed out, its text and version then."""

    __slots__ = ("lock", "name", "text", "value", "version")

    def __init__(self, name: str, value: Any, text: str, version: int | None) -> None:
        self.name = name
        self.value = value
        self.text = text
        """The JSON text the namespace had when read (or last written): the baseline."""
        self.version = version
        """The row's version then; None when it has no row (factory default)."""
        self.lock = threading.Lock()  # a task thread may save this namespace too


class Session(dict[str, Any]):
    """A session's namespaces as a unit loaded them (plus ``_meta``)."""

    __slots__ = ("unit",)

    def __init__(self, unit: SQLUnit) -> None:
        super().__init__()
        self.unit = unit


@dataclass(slots=True)
class _Upload:
    records: SQLFileRecords
    upload: StagedUpload
    replaced: FileRow | None

    def discard(self) -> None:
        self.upload.discard()
        if self.replaced is not None:
            self.records.restore(self.replaced, self.upload.path)


@dataclass(slots=True)
class _Claim:
    home: task_rows.SQLTaskHome
    state: TaskState
    name: str
    on_commit: Callable[[], None]


class SQLUnit:
    """A unit of work on session *sid* (see the module docstring)."""

    def __init__(self, backend: SQLBackend, sid: str, *, locking: bool = False) -> None:
        self.sid = sid
        self._b = backend
        self._slots: dict[str, Slot] = {}
        self._view: Session | None = None
        self._existed: bool | None = None  # unknown until something is read
        self._created_at = 0.0
        self._last_active = 0.0
        self._since = backend.now()
        self._locking = locking
        self._locked = False
        self._joined = False  # locked inside a transaction its context had open
        self._created = False  # created by lock(), reported at commit
        self._token: Any = None  # a connection this unit holds for its context
        self._files: list[_Upload] = []
        self._claims: list[_Claim] = []
        self._closed = False

    # -- reading ---------------------------------------------------------------

    @property
    def locked(self) -> bool:
        return self._locked

    @property
    def loaded(self) -> bool:
        return bool(self._slots) or self._existed is not None

    def expired(self) -> bool:
        with self._b.connector.executor() as ex:
            head, expired_at = ops.probe(ex, self._b.st, self.sid)
        if head is not None:
            self._know(head)
            return False
        self._existed = False
        return expired_at is not None

    def _know(self, head: ops.Head) -> None:
        self._existed = True
        self._created_at, self._last_active = head.created_at, head.last_active

    def namespace(self, name: str) -> dict[str, Any]:
        slot = self._slots.get(name)
        if slot is not None:
            value: dict[str, Any] = slot.value
            return value
        if name not in self._b.policy.factories:
            raise NamespaceError(name)
        if self._locking and not self._locked:
            self.lock()
        stored: ops.Stored | None = None
        if self._existed is not False:
            with self._b.connector.executor() as ex:
                if self._existed:
                    stored = ops.load_namespace(ex, self._b.st, self.sid, name)
                else:
                    found = ops.load_one(ex, self._b.st, self.sid, name)
                    if found is None:
                        self._existed = False
                    else:
                        self._know(found[0])
                        stored = found[1]
        slot = self._slot(name, stored)
        if self._view is not None:
            self._view[name] = slot.value
        return slot.value  # type: ignore[no-any-return]

    def session(self) -> Session:
        if self._view is not None:
            return self._view
        if self._locking and not self._locked:
            self.lock()
        factories = self._b.policy.factories
        found: dict[str, ops.Stored] = {}
        if self._existed is not False and any(n not in self._slots for n in factories):
            with self._b.connector.executor() as ex:
                loaded = ops.load_all(ex, self._b.st, self.sid)
            if loaded is None:
                self._existed = False
            else:
                self._know(loaded[0])
                found = loaded[1]
        for name in factories:
            if name not in self._slots:
                self._slot(name, found.get(name))
        view = Session(self)
        for name, slot in self._slots.items():
            view[name] = slot.value
        if not self._existed:
            self._created_at = self._last_active = self._since
        view[META] = {
            "created_at": self._created_at,
            "last_active": self._last_active,
            "sid": self.sid,
        }
        self._view = view
        return view

    def fresh(self, name: str) -> Slot:
        """A slot holding the factory's default state of *name* (its tasks linked)."""
        value = self._b.policy.factories[name]()
        slot = Slot(name, value, UNSERIALISABLE, None)
        self._link_tasks(slot, value)
        slot.text = baseline_text(value)
        return slot

    def _slot(self, name: str, stored: ops.Stored | None) -> Slot:
        """A slot for *name*: the stored row (tasks revived), or the factory's default."""
        if stored is None:
            slot = self.fresh(name)
        else:
            value = stored.data
            text = stored.text if stored.text is not None else encode(value)
            slot = Slot(name, value, text, stored.version)
            if TASK_MARKER in text:
                slot.value = value = revive_tasks(value, self._task_maker(slot))
                slot.text = encode(value)
        self._slots[name] = slot
        return slot

    def _task_maker(self, slot: Slot) -> Callable[[str, str], BackgroundTask]:
        def make(task_id: str, name: str) -> BackgroundTask:
            return BackgroundTask.linked(name, self._b.task_home(self.sid, task_id, slot))

        return make

    def _link_tasks(self, slot: Slot, value: Any) -> None:
        """Give every unlinked BackgroundTask in *value* its row in ``silo_tasks``."""
        for path, task in tasks_in(value):
            if task.task_id is None:
                task_id = task_id_for(self.sid, slot.name, path)
                task.link(self._b.task_home(self.sid, task_id, slot))

    def lock(self) -> None:
        """Open the unit's transaction with the session row locked (created if missing).

        The unit holds its context's connection until it is closed; inside a
        transaction already open there (a request in locking mode), it joins it.
        """
        if self._locked:
            return
        b = self._b
        if not b.connector.holding:
            self._token = b.connector.hold()
        times = b.times(b.now(), since=self._since)
        with b.connector.executor() as ex:
            self._joined = ex.in_transaction
            if not self._joined:
                ex.begin()
            try:
                created, created_at = ops.lock(ex, b.st, self.sid, times, existed=self._existed)
            except BaseException:
                if not self._joined:
                    ex.rollback()
                raise
        self._locked = True
        self._created = created
        self._existed = True
        self._created_at, self._last_active = created_at, times.now

    # -- staging ---------------------------------------------------------------

    def stage_file(
        self, records: SQLFileRecords, upload: StagedUpload, replaced: FileRow | None
    ) -> None:
        """An upload in place whose row is written with the unit's commit."""
        self._files.append(_Upload(records, upload, replaced))

    def pending_files(self, records: SQLFileRecords) -> list[str]:
        return [f.upload.row.filename for f in self._files if f.records is records]

    def stage_claim(
        self,
        home: task_rows.SQLTaskHome,
        state: TaskState,
        name: str,
        on_commit: Callable[[], None],
    ) -> None:
        self._claims.append(_Claim(home, state, name, on_commit))

    # -- writing ---------------------------------------------------------------

    def _changes(self) -> list[ops.Write]:
        """The namespaces whose JSON differs from what was read (every one checked first)."""
        writes: list[ops.Write] = []
        policy = self._b.policy
        items = (
            [(n, v) for n, v in self._view.items() if n != META]
            if self._view is not None
            else [(n, s.value) for n, s in self._slots.items()]
        )
        for name, value in items:
            slot = self._slots.get(name)
            if slot is None:  # a key the application added to the session itself
                slot = self._slots[name] = Slot(name, value, UNSERIALISABLE, None)
            slot.value = value
            with slot.lock:
                text = self._serialise(slot, value, policy.max_state_bytes)
                if text != slot.text:
                    writes.append(ops.Write(name, text, slot.version))
        return writes

    def _serialise(self, slot: Slot, value: Any, max_bytes: int | None) -> str:
        try:
            return serialise(slot.name, value, max_bytes)
        except UnlinkedTask:  # a handler put a new BackgroundTask in the namespace
            self._link_tasks(slot, value)
            return serialise(slot.name, value, max_bytes)

    def commit(self, *, state: bool = True, files: bool = True) -> None:
        """Write the changes and task rows and refresh ``last_active`` in one transaction,
        then move the staged uploads in with their rows. Raises (with nothing written)
        what :func:`codec.serialise` or a guard raises."""
        if files:
            staged, self._files = self._files, []
        else:  # an error answer keeps no upload
            staged = []
            self._discard_files()
        if not state:  # a failed request: nothing saved, last_active left as it was
            self._claims = []
            return
        try:
            writes = self._changes()  # may link tasks, staging their claims
        except BaseException:
            self._claims = []
            _discard(staged)
            raise
        claims, self._claims = self._claims, []
        b = self._b
        now = b.now()
        times = b.times(now, since=self._since)
        if not (writes or staged or claims or self._locked):
            self._touch(times)
            return
        created = False
        touched = True
        try:
            with b.connector.executor() as ex, _locked_directories(staged):
                if self._locked:
                    created, self._created = self._created, False
                    versions = self._write(ex, writes, claims, staged, now)
                    self._locked = False
                    if not self._joined:
                        ex.commit()
                elif self._needs_lock(now, bool(staged), claims):
                    with ex.transaction():
                        created, _ = ops.lock(ex, b.st, self.sid, times, existed=self._existed)
                        versions = self._write(ex, writes, claims, staged, now)
                else:
                    touched = False
                    if len(writes) == 1:  # one statement: no transaction round trips
                        versions = ops.write_namespaces(ex, b.st, self.sid, writes, now)
                    else:
                        with ex.transaction():
                            versions = ops.write_namespaces(ex, b.st, self.sid, writes, now)
        except BaseException:
            _discard(staged)
            raise
        self._existed = True
        if touched:
            self._last_active = now
        for write, version in zip(writes, versions, strict=True):
            slot = self._slots[write.name]
            slot.text, slot.version = write.text, version
        for f in staged:
            f.upload.keep()
        if created:
            b.policy.created(self.sid)
        for claim in claims:
            claim.on_commit()

    def _needs_lock(self, now: float, uploads: bool, claims: list[_Claim]) -> bool:
        """Whether the commit locks (touches or creates) the session row first.

        Only a session read as existing, whose ``last_active`` is fresh (so it
        cannot be due for expiry), with nothing but namespaces to write, skips it.
        """
        if self._existed is not True or uploads or claims:
            return True
        return self._last_active <= now - self._b.touch_interval

    def _write(
        self,
        ex: Executor,
        writes: list[ops.Write],
        claims: list[_Claim],
        staged: list[_Upload],
        now: float,
    ) -> list[int]:
        """In the open transaction, the session locked: namespaces, task rows, file rows."""
        b = self._b
        versions = ops.write_namespaces(ex, b.st, self.sid, writes, now)
        for claim in claims:
            task_rows.claim(ex, b.st, claim.home, claim.state, claim.name, now)
        for f in staged:
            f.records.write(ex, f.upload, now)
        return versions

    def _discard_files(self) -> None:
        files, self._files = self._files, []
        _discard(files)

    def touch(self) -> None:
        """Create the session if it is new, refresh a stale ``last_active``; write no state."""
        self._touch(self._b.times(self._b.now(), since=self._since))

    def _touch(self, times: ops.Times) -> None:
        """Nothing to write: refresh a stale ``last_active``, or create a session read as new."""
        b = self._b
        stale_before = times.now - b.touch_interval
        if self._existed is None:  # no state read: one statement at most
            with b.connector.executor() as ex:
                created = ops.touch_or_create(ex, b.st, self.sid, times, stale_before)
            self._existed = True
            if created:
                b.policy.created(self.sid)
            return
        if self._existed is False:  # a new session whose state was read: it is used now
            with b.connector.executor() as ex, ex.transaction():
                created, _ = ops.lock(ex, b.st, self.sid, times, existed=False)
            self._existed = True
            self._last_active = times.now
            if created:
                b.policy.created(self.sid)
            return
        if self._last_active <= stale_before:
            with b.connector.executor() as ex:
                ops.touch_stale(ex, b.st, self.sid, times, stale_before)
            self._last_active = times.now

    def rollback(self) -> None:
        self._discard_files()
        self._claims = []
        if self._locked:
            self._locked = False
            if not self._joined:
                with self._b.connector.executor() as ex:
                    ex.rollback()

    def reset(self) -> None:
        """Fresh factory state for the session (SessionBusy while it is busy)."""
        self._b.reset(self.sid)
        self._slots.clear()
        self._view = None
        if self._existed is not None and not self._locked:
            self._existed = None  # read the session's row again with the next namespace

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.rollback()
        finally:
            token, self._token = self._token, None
            if token is not None:
                self._b.connector.release(token)
            self._b.unbind(self)


def _discard(files: list[_Upload]) -> None:
    for f in reversed(files):
        f.discard()


@contextmanager
def _locked_directories(files: list[_Upload]) -> Iterator[None]:
    """The directory locks of the uploads, taken in one order (before the session's)."""
    with ExitStack() as stack:
        for directory in sorted({f.upload.directory for f in files}):
            stack.enter_context(directory_lock(directory))
        yield


def save_merged(backend: SQLBackend, sid: str, slot: Slot) -> None:
    """Save one namespace from a task thread, merging by top-level key.

    The keys this copy changed since it was read (or last saved) are applied
    to the namespace as stored now, so changes made meanwhile by requests to
    other keys survive. Retries on a concurrent write.
    """
    policy = backend.policy
    with slot.lock:
        try:
            text = serialise(slot.name, slot.value, policy.max_state_bytes)
        except UnlinkedTask:
            return
        if text == slot.text:
            return
        mine = json.loads(text)
        base = json.loads(slot.text) if slot.text != UNSERIALISABLE else None
        for _attempt in range(20):
            with backend.connector.executor() as ex, ex.transaction():
                current = ops.load_namespace(ex, backend.st, sid, slot.name)
                if current is None:
                    write = ops.Write(slot.name, text, None)
                else:
                    write = ops.Write(
                        slot.name, encode(merge_keys(current.data, base, mine)), current.version
                    )
                try:
                    versions = _write_one(ex, backend, sid, write)
                except StateConflict:
                    continue
            slot.text, slot.version = text, versions[0]
            return
        raise StateConflict(sid, slot.name)


def _write_one(ex: Executor, backend: SQLBackend, sid: str, write: ops.Write) -> list[int]:
    return ops.write_namespaces(ex, backend.st, sid, [write], backend.now())


def busy_session(backend: SQLBackend, sid: str) -> Session | None:
    """The session as a busy check sees it (every namespace, tasks as objects), or None."""
    unit = SQLUnit(backend, sid)
    view = unit.session()
    return view if unit._existed else None


def refuse_if_busy(backend: SQLBackend, sid: str, ex: Executor) -> None:
    """SessionBusy when a task of *sid* runs with a fresh heartbeat."""
    if task_rows.running_in_session(ex, backend.st, sid, backend.now(), backend.policy):
        raise SessionBusy(sid)
