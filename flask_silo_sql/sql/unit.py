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
held until the commit; on SQLite, whose one write lock would hold every
other session too, a request holds its session's own lock instead (see
:mod:`.session_locks`) and writes in a short transaction at the commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, cast

from ..codec import (
    UNSERIALISABLE,
    UnlinkedTask,
    baseline_text,
    encode,
    revive_tasks,
    serialise,
    task_id_for,
    tasks_in,
    unchanged,
)
from ..errors import NamespaceError, SessionBusy
from ..files.locks import directory_lock
from ..instruments.seams import traced_commit
from ..logs import silo_logger
from ..sids import tag
from ..tasks import TASK_MARKER, BackgroundTask
from . import event_rows, session_locks, task_rows
from . import sessions as ops
from .context import Context, Staged
from .executor import Executor
from .file_rows import StagedFile
from .slots import Slot

logger = silo_logger("flask_silo_sql")

META = "_meta"


class Session(dict[str, Any]):
    """A session's namespaces as a unit loaded them (plus ``_meta``)."""

    __slots__ = ("unit",)

    def __init__(self, unit: SQLUnit) -> None:
        super().__init__()
        self.unit = unit


class SQLUnit:
    """A unit of work on session *sid* (see the module docstring)."""

    def __init__(
        self,
        ctx: Context,
        sid: str,
        *,
        locking: bool = False,
        issued: bool = False,
        session_lock: bool = False,
    ) -> None:
        self.sid = sid
        self.issued = issued
        """The SID was made for this request (so it has no session and no expired mark)."""
        self._ctx = ctx
        self._slots: dict[str, Slot] = {}
        self._view: Session | None = None
        self._existed: bool | None = None  # unknown until something is read
        self._created_at = 0.0
        self._last_active = 0.0
        self._born: float | None = None  # the row's created_at, once this unit has read it
        # The session's last_active as this unit's own probe left it (a touch that read
        # no state): a streamed response commits twice, and need not probe twice.
        self._probed_active: float | None = None
        # When the unit began, by the store's clock: read lazily (a request that asks
        # nothing of the database sends nothing), carried back by the monotonic clock.
        clock = ctx.policy.clock
        self._began_at = clock() if clock is not None else None
        self._began = time.monotonic()
        self._locking = locking
        self._locked = False
        self._joined = False  # locked inside a transaction its context had open
        self._created = False  # created by lock(), reported at commit
        self._ended = False  # lock() ended the session's lifetime: reported at commit
        # SQLite: lock() holds the session's own lock instead of the database's (a request)
        self._session_lock = session_lock and ctx.disk is not None
        self._held: session_locks.SessionLock | None = None
        self._token: Any = None  # a connection this unit holds for its context
        self._staged: list[Staged] = []
        self._closed = False

    # -- reading ---------------------------------------------------------------

    @property
    def _since(self) -> float:
        """When the unit began: a SID expired after that was expired while it worked."""
        if self._began_at is None:
            self._began_at = self._ctx.now() - (time.monotonic() - self._began)
        return self._began_at

    @property
    def since(self) -> float:
        """When the unit began (an upload it makes must not revive a SID expired after)."""
        return self._since

    @property
    def locked(self) -> bool:
        return self._locked

    @property
    def loaded(self) -> bool:
        return bool(self._slots) or self._view is not None

    def expired(self) -> bool:
        with self._ctx.connector.executor() as ex:
            head, expired_at = ops.probe(ex, self._ctx.st, self.sid)
        if head is not None:
            return not self._know(head)  # past its absolute lifetime: ended now, as expired
        self._existed = False
        return expired_at is not None

    def saw_session(self) -> None:
        """The session's row was seen in this request (an idempotency key was claimed
        under it): if it is gone at the commit, the session expired meanwhile, and the
        commit says so rather than create it again."""
        if self._existed is None:
            self._existed = True

    def _know(self, head: ops.Head) -> bool:
        """Take in the session's row; False when the session was past its absolute
        lifetime (``SILO_SESSION_MAX_AGE``): it is ended now, as the sweep expires one."""
        b = self._ctx
        if b.policy.session_max_age is not None:
            times = b.times(b.now())
            if times.ended(head.created_at):
                self._end(times)
                return False
        self._existed = True
        self._created_at, self._last_active = head.created_at, head.last_active
        self._born = head.created_at
        return True

    def _end(self, times: ops.Times) -> None:
        """End the session (past its lifetime): deleted, its SID recorded as expired,
        ``on_expire`` after the commit. This unit then starts afresh under the SID."""
        b = self._ctx
        with b.connector.transaction() as ex:
            ended = ops.end(ex, b.st, self.sid, times, record=True)
        self._existed = False
        self._born = None
        self._began_at = times.now  # (a fresh session may start under it: not a revival)
        if ended:
            logger.info("session %s reached its absolute lifetime", tag(self.sid))
            b.connector.after_commit(lambda: b.policy.expired(self.sid))

    def namespace(self, name: str) -> dict[str, Any]:
        slot = self._slots.get(name)
        if slot is not None:
            value: dict[str, Any] = slot.value
            return value
        if name not in self._ctx.policy.factories:
            raise NamespaceError(name)
        if self._locking and not self._locked:
            self.lock()
        stored: ops.Stored | None = None
        if self._existed is not False:
            found: tuple[ops.Head, ops.Stored | None] | None = None
            with self._ctx.connector.executor() as ex:
                if self._existed:
                    stored = ops.load_namespace(ex, self._ctx.st, self.sid, name)
                else:
                    found = ops.load_one(ex, self._ctx.st, self.sid, name)
                    if found is None:
                        self._existed = False
            if found is not None and self._know(found[0]):
                stored = found[1]
        slot = self._slot(name, stored)
        if self._view is not None:
            self._view[name] = slot.value
        return slot.value  # type: ignore[no-any-return]

    def slot(self, name: str) -> Slot:
        """The slot of a namespace this unit read (KeyError before)."""
        return self._slots[name]

    def session(self) -> Session:
        if self._view is not None:
            return self._view
        if self._locking and not self._locked:
            self.lock()
        factories = self._ctx.policy.factories
        found: dict[str, ops.Stored] = {}
        if self._existed is not False and any(n not in self._slots for n in factories):
            with self._ctx.connector.executor() as ex:
                loaded = ops.load_all(ex, self._ctx.st, self.sid)
            if loaded is None:
                self._existed = False
            elif self._know(loaded[0]):
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
        value = self._ctx.policy.factories[name]()
        slot = Slot(name, value, UNSERIALISABLE, None)
        self._link_tasks(slot, value)
        slot.text = baseline_text(value)
        return slot

    def _slot(self, name: str, stored: ops.Stored | None) -> Slot:
        """A slot for *name*: the stored row (opened, tasks revived), or the factory's
        default."""
        stored = self._ctx.opened(self.sid, name, stored)
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
            return BackgroundTask.linked(
                name, task_rows.SQLTaskHome(self._ctx, self.sid, task_id, slot)
            )

        return make

    def _link_tasks(self, slot: Slot, value: Any) -> None:
        """Give every unlinked BackgroundTask in *value* its row in ``silo_tasks``."""
        for path, task in tasks_in(value):
            if task.task_id is None:
                task_id = task_id_for(self.sid, slot.name, path)
                task.link(task_rows.SQLTaskHome(self._ctx, self.sid, task_id, slot))

    def lock(self) -> None:
        """Open the unit's transaction with the session row locked (created if missing).

        The unit holds its context's connection until it is closed; inside a
        transaction already open there (a request in locking mode), it joins it.
        """
        if self._locked:
            return
        b = self._ctx
        if not b.connector.holding:
            self._token = b.connector.hold()
        times = b.times(b.now(), since=self._since)
        with b.connector.executor() as ex:
            self._joined = ex.in_transaction
            if self._session_lock and not self._joined and b.disk is not None:
                self._lock_session(ex, b.disk.database, times)
                return
            if not self._joined:
                ex.begin()
            try:
                created, created_at = self._lock_row(ex, times)
            except BaseException:
                if not self._joined:
                    ex.rollback()
                raise
        self._locked = True
        self._created = created
        self._existed = True
        self._created_at, self._last_active = created_at, times.now
        self._born = created_at

    def _lock_session(self, ex: Executor, database: str, times: ops.Times) -> None:
        """SQLite: hold the session's own lock (see :mod:`.session_locks`), then touch or
        create its row in a short transaction; the database stays free for others."""
        b = self._ctx
        self._held = session_locks.acquire(database, self.sid, b.connector.timeout or 5.0)
        try:
            with ex.transaction():
                created, created_at = self._lock_row(ex, times)
        except BaseException:
            self._release_session()
            raise
        self._locked = True
        self._existed = True
        self._created_at, self._last_active = created_at, times.now
        self._born = created_at
        ended, self._ended = self._ended, False
        if ended:
            b.policy.expired(self.sid)  # committed already
        if created:
            b.policy.created(self.sid)

    def _lock_row(self, ex: Executor, times: ops.Times) -> tuple[bool, float]:
        """In the open transaction: :func:`~.sessions.lock`; a session found past its
        absolute lifetime (not read yet by this unit) is ended and started afresh."""
        b = self._ctx
        created, created_at = ops.lock(ex, b.st, self.sid, times, existed=self._existed)
        if created or self._existed or not times.ended(created_at):
            return created, created_at
        ops.end(ex, b.st, self.sid, times, record=False)  # this request starts it again
        self._ended = True
        logger.info("session %s reached its absolute lifetime", tag(self.sid))
        fresh = ops.Times(times.now, times.expires, times.now, times.max_age)
        return ops.lock(ex, b.st, self.sid, fresh, existed=False)

    def _release_session(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._locked = False
            held.release()

    # -- staging ---------------------------------------------------------------

    def stage(self, item: Staged) -> None:
        """A write (a task's claim, an upload's row) to make with the unit's commit."""
        self._staged.append(item)

    def staged(self) -> list[Staged]:
        return list(self._staged)

    # -- writing ---------------------------------------------------------------

    def _changes(self) -> list[ops.Write]:
        """The namespaces whose JSON differs from what was read (every one checked first)."""
        writes: list[ops.Write] = []
        policy = self._ctx.policy
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
                if unchanged(value, slot.text):  # most reads: one encode, no checks
                    continue
                text = self._serialise(slot, value, policy.max_state_bytes)
                if text != slot.text:
                    writes.append(self._ctx.write(name, text, slot.version))
        return writes

    def _serialise(self, slot: Slot, value: Any, max_bytes: int | None) -> str:
        try:
            return serialise(slot.name, value, max_bytes)
        except UnlinkedTask:  # a handler put a new BackgroundTask in the namespace
            self._link_tasks(slot, value)
            return serialise(slot.name, value, max_bytes)

    @traced_commit
    def commit(self, *, state: bool = True, files: bool = True) -> None:
        """Write the changes, task rows and file rows and refresh ``last_active``, in one
        transaction. *state* False (a failed request) writes nothing; *files* False (an
        error answer) keeps no upload. Raises (with nothing written) what
        :func:`~flask_silo_sql.codec.serialise` or a guard raises."""
        if not files:
            self._discard(lambda item: isinstance(item, StagedFile))
        if not state:
            self._discard(lambda item: True)
            return
        try:
            writes = self._changes()  # may link tasks, staging their claims
        except BaseException:
            self._discard(lambda item: True)
            raise
        b = self._ctx
        if writes and b.disk is not None:
            try:
                b.check_disk(sum(len(w.text) - self._stored_length(w.name) for w in writes))
            except BaseException:
                self._discard(lambda item: True)
                raise
        staged, self._staged = self._staged, []
        now = b.now()
        times = b.times(now, since=self._since, created_at=self._created_at_known)
        if self._held is not None:  # touched at lock(): only writes are left to make
            try:
                if writes or staged:
                    self._commit_writes(writes, staged, now, times)
            finally:
                self._release_session()
            return
        if not (writes or staged or self._locked):
            self._touch(times)
            return
        self._commit_writes(writes, staged, now, times)

    def _commit_writes(
        self, writes: list[ops.Write], staged: list[Staged], now: float, times: ops.Times
    ) -> None:
        b = self._ctx
        created = ended = False
        touched = True
        try:
            with b.connector.executor() as ex, _locked_directories(staged):
                if self._locked and self._held is None:
                    created, self._created = self._created, False
                    ended, self._ended = self._ended, False
                    versions = self._write(ex, writes, staged, now)
                    self._locked = False
                    if not self._joined:
                        ex.commit()
                elif self._held is not None or self._needs_lock(now, staged):
                    with ex.transaction():
                        created, _ = ops.lock(ex, b.st, self.sid, times, existed=self._existed)
                        versions = self._write(ex, writes, staged, now)
                else:
                    touched = False
                    if len(writes) == 1 and not staged:  # one statement: no transaction
                        versions = ops.write_namespaces(ex, b.st, self.sid, writes, now)
                    elif (v := _written_together(ex, writes, staged, self.sid, now)) is not None:
                        versions = [v]
                    else:
                        with ex.transaction():
                            versions = self._write(ex, writes, staged, now)
        except BaseException:
            _discard(staged)
            raise
        self._existed = True
        if touched:
            self._last_active = now
        for write, version in zip(writes, versions, strict=True):
            slot = self._slots[write.name]
            slot.text, slot.version = write.text, version
        after = b.connector.after_commit  # (atomic mode: once the host's COMMIT is done)
        if ended:
            after(lambda: b.policy.expired(self.sid))
        if created:
            after(lambda: b.policy.created(self.sid))
        for item in staged:
            after(item.committed)

    def _stored_length(self, name: str) -> int:
        """The length of *name*'s JSON as read (0 for a namespace not stored yet)."""
        slot = self._slots.get(name)
        return 0 if slot is None or slot.version is None else len(slot.text)

    def _needs_lock(self, now: float, staged: list[Staged]) -> bool:
        """Whether the commit locks (touches or creates) the session row first.

        Only a session read as existing, whose ``last_active`` is fresh (so it
        cannot be due for expiry), with nothing to write but namespaces and
        writes that guard themselves (a stored response), skips it.
        """
        if self._existed is not True or any(item.locks_session for item in staged):
            return True
        return self._last_active <= now - self._ctx.touch_interval

    def _write(
        self, ex: Executor, writes: list[ops.Write], staged: list[Staged], now: float
    ) -> list[int]:
        """In the open transaction, the session locked: namespaces, then what was staged."""
        versions = ops.write_namespaces(ex, self._ctx.st, self.sid, writes, now)
        for item in staged:
            item.write(ex, now)
        return versions

    def _discard(self, which: Callable[[Staged], bool]) -> None:
        dropped = [item for item in self._staged if which(item)]
        self._staged = [item for item in self._staged if not which(item)]
        _discard(dropped)

    @property
    def _created_at_known(self) -> float | None:
        """The session's ``created_at``, when this unit read its row."""
        return self._born if self._existed else None

    def touch(self) -> None:
        """Create the session if it is new, refresh a stale ``last_active``; write no state."""
        self._touch(
            self._ctx.times(self._ctx.now(), since=self._since, created_at=self._created_at_known)
        )

    def _touch(self, times: ops.Times) -> None:
        """Nothing to write: refresh a stale ``last_active``, or create a session read as new.

        A request that read no state stores nothing for a SID without a session
        (it becomes one on first real use); an existing one is touched.
        """
        b = self._ctx
        stale_before = times.now - b.touch_interval
        if self._existed is None:  # no state read: one SELECT, which creates nothing
            if self.issued:
                return  # a SID made for this request has no session yet
            if self._probed_active is not None and self._probed_active > stale_before:
                return  # this unit found it live and fresh already (a streamed response)
            self._probed_active = None
            ended = False
            with b.connector.executor() as ex:
                head, expired_at = ops.probe(ex, b.st, self.sid)
                if head is not None and times.ended(head.created_at):
                    with ex.transaction():  # past its lifetime: ended; the client starts over
                        ended = ops.end(ex, b.st, self.sid, times, record=False)
                elif head is not None:
                    self._probed_active = head.last_active
                    if head.last_active <= stale_before:
                        ops.touch_stale(ex, b.st, self.sid, times.of(head.created_at), stale_before)
                        self._probed_active = times.now
                elif expired_at is not None:  # an expired client starts over: no 410 now
                    ex.run(b.st.clear_expired, {"sid": self.sid})
            if ended:
                logger.info("session %s reached its absolute lifetime", tag(self.sid))
                b.connector.after_commit(lambda: b.policy.expired(self.sid))
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
        self._discard(lambda item: True)
        self._ended = False
        self._release_session()
        if self._locked:
            self._locked = False
            if not self._joined:
                with self._ctx.connector.executor() as ex:
                    ex.rollback()

    def reset(self) -> None:
        """Fresh factory state for the session (SessionBusy while it is busy)."""
        reset(self._ctx, self.sid)
        self._slots.clear()
        self._view = None
        self._probed_active = None
        if self._existed is not None and not self._locked:
            self._existed = None  # read the session's row again with the next namespace

    def close(self) -> None:
        """Release what the unit holds. A unit may be used again after it (a streamed
        response's generator reads and saves after its request's first teardown), so
        closing again releases what that use took."""
        try:
            self.rollback()
        finally:
            token, self._token = self._token, None
            if token is not None:
                self._ctx.connector.release(token)
            if not self._closed:
                self._closed = True
                self._ctx.unbind(self)


def _written_together(
    ex: Executor, writes: list[ops.Write], staged: list[Staged], sid: str, now: float
) -> int | None:
    """One namespace and one staged write in one statement, where the item can (see
    :class:`WritesWithNamespace`): the namespace's new version, or None."""
    if len(writes) != 1 or len(staged) != 1:
        return None
    # getattr, not isinstance: a runtime protocol check costs more than the statement saved
    write_with = getattr(staged[0], "write_with", None)
    return None if write_with is None else cast(int | None, write_with(ex, writes[0], sid, now))


def _discard(staged: list[Staged]) -> None:
    for item in reversed(staged):
        item.discard()


def _locked_directories(staged: list[Staged]) -> AbstractContextManager[None]:
    """The directory locks of staged uploads, taken in one order (before the session's)."""
    if not staged:
        return nullcontext()
    return _locking(staged)


@contextmanager
def _locking(staged: list[Staged]) -> Iterator[None]:
    with ExitStack() as stack:
        for directory in sorted({s.directory for s in staged if s.directory is not None}):
            stack.enter_context(directory_lock(directory))
        yield


def busy_session(ctx: Context, sid: str) -> Session | None:
    """The session as a busy check sees it (every namespace, tasks as objects), or None."""
    unit = SQLUnit(ctx, sid)
    view = unit.session()
    return view if unit._existed else None


def reset(ctx: Context, sid: str) -> None:
    """Every namespace of *sid* back to its factory's state, its tasks forgotten.

    Refused (:class:`SessionBusy`) while a task runs or the busy check vetoes.
    One transaction that locks the session's row first (:func:`~.sessions.hold`)
    and checks its tasks under that lock: a start of the session's task runs
    wholly before it (then the reset is refused) or wholly after (against the
    fresh state). In a request, it runs on the request's connection (and, in
    locking mode, inside its transaction).
    """
    policy = ctx.policy
    scratch = SQLUnit(ctx, sid)
    fresh = {
        name: ctx.stored_text(
            name, serialise(name, scratch.fresh(name).value, policy.max_state_bytes)
        )
        for name in policy.factories
    }
    token = None if ctx.connector.holding else ctx.connector.hold()
    try:
        with ctx.connector.transaction() as ex:
            now = ctx.now()
            if ops.hold(ex, ctx.st, sid, ctx.times(now)) is None:
                return  # no such session: nothing to reset
            if task_rows.running_in_session(ex, ctx.st, sid, now, policy):
                raise SessionBusy(sid)
            if policy.has_busy_check:  # read on this connection, under the lock
                current = busy_session(ctx, sid)
                if current is not None and policy.vetoes(sid, current):
                    raise SessionBusy(sid)
            ex.run(ctx.st.delete_session_tasks, {"sid": sid})
            ex.run(ctx.st.events.delete_session, {"sid": sid})
            ops.replace_namespaces(ex, ctx.st, sid, fresh, now)
            event_rows.write(ex, ctx, sid, "reset", {}, now=now)  # open streams resync
    finally:
        if token is not None:
            ctx.connector.release(token)


def rotate(
    ctx: Context,
    old: str,
    new: str,
    before_commit: Callable[[], Callable[[], None]],
    *,
    renew: bool = False,
) -> bool:
    """Give session *old* the SID *new*, in one transaction; False when *old* has no session.

    The session is locked and read first; a namespace still at its factory's
    default that holds a task is written out, so that its task keeps its row
    (task IDs come from the SID they were made under). *before_commit* runs
    inside the transaction (the file stores move their directories) and
    returns how to undo that if the commit fails. *renew*: the session's
    absolute lifetime starts again now (else the new SID keeps its ``created_at``).
    """
    unit = SQLUnit(ctx, old, locking=True)
    try:
        unit.session()  # locks *old* (creating nothing: see below) and reads it
        if unit._created:
            unit.rollback()
            return False
        with ctx.connector.executor() as ex:
            writes = [
                ctx.write(slot.name, encode(slot.value), None)
                for slot in unit._slots.values()
                if slot.version is None and any(tasks_in(slot.value))
            ]
            ops.write_namespaces(ex, ctx.st, old, writes, ctx.now())
            now = ctx.now()
            ops.move(ex, ctx.st, old, new, now)
            if renew:
                ops.renew(ex, ctx.st, new, ctx.times(now, created_at=now))
            undo = before_commit()
            try:
                unit._locked = False
                if not unit._joined:
                    ex.commit()
            except BaseException:
                undo()
                raise
        return True
    finally:
        unit.close()
