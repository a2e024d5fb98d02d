"""Sessions and namespaces in SQL: each operation written once, on an executor.

Reads run outside any transaction (one statement each). A write is one
transaction that first locks the session row (``UPDATE silo_sessions``: on
PostgreSQL the row lock, which the sweep's ``SKIP LOCKED`` passes by; on
SQLite the database write lock), then writes each changed namespace only if
its version is still the one that was read. A write of a session whose
``last_active`` is fresh (so not due for expiry) skips the lock: a single
namespace is then one statement. The guards:

* the session row is gone: it was expired (or destroyed) meanwhile, and the
  write raises :class:`~flask_silo_sql.errors.SessionExpired` instead of
  bringing it back;
* a namespace's version moved: another request wrote it since this one read
  it, and the write raises :class:`~flask_silo_sql.errors.StateConflict`
  instead of overwriting that change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import SessionExpired, StateConflict
from .executor import Executor
from .statements import Statements


@dataclass(slots=True)
class Head:
    """A session row: when it was created and last active (Unix seconds)."""

    created_at: float
    last_active: float


@dataclass(slots=True)
class Stored:
    """A namespace row as read: its data, its JSON text (when the driver gave text), its version."""

    data: Any
    text: str | None
    version: int


@dataclass(slots=True)
class Write:
    """One namespace to write: its JSON text, and the version read (None: no row was read).

    *sealed*: what is stored instead of the text, for an encrypted namespace.
    """

    name: str
    text: str
    expected: int | None
    sealed: str | None = None

    @property
    def stored(self) -> str:
        """The value the ``data`` column gets."""
        return self.text if self.sealed is None else self.sealed


def probe(ex: Executor, st: Statements, sid: str) -> tuple[Head | None, float | None]:
    """The session's row (or None) and, when its SID is remembered as expired, when."""
    v = st.values
    created, last, expired_at = ex.run(st.probe, {"sid": sid}).first()
    head = None if created is None else Head(v.unix(created), v.unix(last))
    return head, v.maybe_unix(expired_at)


def load_one(
    ex: Executor, st: Statements, sid: str, name: str
) -> tuple[Head, Stored | None] | None:
    """The session's row and one namespace, in one statement; None without a session."""
    row = ex.run(st.load_one, {"sid": sid, "name": name}).first()
    if row is None:
        return None
    v = st.values
    created, last, data, version = row
    stored = None
    if version is not None:
        value, text = v.json(data)
        stored = Stored(value, text, version)
    return Head(v.unix(created), v.unix(last)), stored


def load_all(ex: Executor, st: Statements, sid: str) -> tuple[Head, dict[str, Stored]] | None:
    """The session's row and every namespace, in one statement; None without a session."""
    rows = ex.run(st.load_all, {"sid": sid}).rows
    if not rows:
        return None
    v = st.values
    found: dict[str, Stored] = {}
    for _, _, name, data, version in rows:
        if name is not None:
            value, text = v.json(data)
            found[name] = Stored(value, text, version)
    created, last = rows[0][0], rows[0][1]
    return Head(v.unix(created), v.unix(last)), found


def load_namespace(ex: Executor, st: Statements, sid: str, name: str) -> Stored | None:
    """One namespace of a session already read."""
    row = ex.run(st.load_namespace, {"sid": sid, "name": name}).first()
    if row is None:
        return None
    value, text = st.values.json(row[0])
    return Stored(value, text, row[1])


def _times(st: Statements, times: Times) -> dict[str, Any]:
    v = st.values
    return {"now": v.time(times.now), "expires": v.time(times.expiry())}


@dataclass(slots=True)
class Times:
    """The times a write records: now, when the session expires unless touched again,
    and since when the unit has been working (a SID expired after that is not revived).

    With an absolute lifetime (*max_age*), the expiry written is never past the
    session's end (*ends*: its ``created_at`` + *max_age*, when known), so the
    sweep's bound, at most ``expires_at``, finds it by then.
    """

    now: float
    expires: float
    since: float
    max_age: float | None = None
    ends: float | None = None

    def expiry(self) -> float:
        """``expires_at`` to write: the idle expiry, or the session's end if sooner."""
        return self.expires if self.ends is None else min(self.expires, self.ends)

    def ended(self, created_at: float) -> bool:
        """Whether a session created at *created_at* is past its absolute lifetime."""
        return self.max_age is not None and created_at + self.max_age <= self.now

    def of(self, created_at: float) -> Times:
        """These times for a session created at *created_at* (its end known)."""
        ends = None if self.max_age is None else created_at + self.max_age
        return replace(self, ends=ends)


def hold(ex: Executor, st: Statements, sid: str, times: Times) -> float | None:
    """In the open transaction: lock the session's row (and touch it); its ``created_at``,
    or None when it has no row.

    The one lock every operation of a session that must not interleave with
    another takes first: a request's commit (and with it a task's start or an
    upload's row), a start outside a request, a reset, a rotation. On
    PostgreSQL it is the row lock (the sweep's ``SKIP LOCKED`` passes such a
    session by); on SQLite the database's write lock.
    """
    touched = ex.run(st.touch, {"sid": sid, **_times(st, times)}).first()
    if touched is None:
        return None
    created_at = st.values.unix(touched[0])
    if times.ends is None and times.max_age is not None:
        known = times.of(created_at)
        if known.expiry() < times.expires:  # its end comes first: the bound goes no further
            ex.run(st.touch, {"sid": sid, **_times(st, known)})
    return created_at


def lock(
    ex: Executor, st: Statements, sid: str, times: Times, *, existed: bool | None
) -> tuple[bool, float]:
    """In the open transaction: lock the session's row, creating it when missing.

    Returns whether it was created (its expired mark is then cleared) and its
    ``created_at``. The session was expired meanwhile, and
    :class:`SessionExpired` is raised with nothing created, when it was known
    to exist (*existed*) and is gone, or when its SID was recorded as expired
    since ``times.since``.
    """
    values = {"sid": sid, **_times(st, times)}
    created_at = hold(ex, st, sid, times)
    if created_at is not None:
        return False, created_at
    if existed:
        raise SessionExpired(sid)
    if times.max_age is not None:  # a new session ends max_age from now
        values = {"sid": sid, **_times(st, times.of(times.now))}
    if ex.run(st.create, {**values, "since": st.values.time(times.since)}).rowcount == 1:
        ex.run(st.clear_expired, {"sid": sid})
        return True, times.now
    touched = ex.run(st.touch, values).first()
    if touched is not None:  # created by another request meanwhile
        return False, st.values.unix(touched[0])
    raise SessionExpired(sid)


def write_namespaces(
    ex: Executor, st: Statements, sid: str, writes: Sequence[Write], now: float
) -> list[int]:
    """Write namespaces of an existing session under the version guard.

    In the open transaction, or each on its own (a single write of a session
    whose ``last_active`` is fresh, hence not due for expiry, needs no lock).
    """
    stamp = st.values.time(now)
    versions: list[int] = []
    for w in writes:
        values: dict[str, Any] = {"sid": sid, "name": w.name, "data": w.stored, "now": stamp}
        if w.expected is None:
            written = ex.run(st.insert_namespace, values).rowcount == 1
            versions.append(1)
        else:
            values["expected"] = w.expected
            written = ex.run(st.update_namespace, values).rowcount == 1
            versions.append(w.expected + 1)
        if not written:
            if ex.run(st.has_session, {"sid": sid}).first() is None:
                raise SessionExpired(sid)
            raise StateConflict(sid, w.name)
    return versions


def touch_stale(ex: Executor, st: Statements, sid: str, times: Times, stale_before: float) -> bool:
    """Refresh ``last_active`` if older than *stale_before*; whether a row was touched."""
    values = {"sid": sid, "stale_before": st.values.time(stale_before), **_times(st, times)}
    return bool(ex.run(st.touch_stale, values).rowcount == 1)


def replace_namespaces(
    ex: Executor, st: Statements, sid: str, fresh: dict[str, str], now: float
) -> None:
    """In the open transaction: every namespace of *sid* becomes *fresh* (others dropped).

    Versions are bumped, never restarted, so a request that read the old
    state cannot overwrite the new.
    """
    v = st.values
    ex.run(st.delete_namespaces_except, {"sid": sid, "names": v.sids(list(fresh))})
    stamp = v.time(now)
    for name, text in fresh.items():
        ex.run(st.upsert_namespace, {"sid": sid, "name": name, "data": text, "now": stamp})


def end(ex: Executor, st: Statements, sid: str, times: Times, *, record: bool) -> bool:
    """In the open transaction: delete session *sid* if past its absolute lifetime, with
    what it owns; whether it was. *record*: its SID is remembered as expired, as the
    sweep's are (a data endpoint then answers ``410``).
    """
    if times.max_age is None:
        return False
    v = st.values
    born_before = {"sid": sid, "born_before": v.time(times.now - times.max_age)}
    if ex.run(st.end_session, born_before).first() is None:
        return False
    gone = {"sids": v.sids([sid])}
    if st.foreign_keys is not None and not ex.run(st.foreign_keys, {}).scalar():
        for statement in st.delete_children:  # a host's SQLite engine may not cascade
            ex.run(statement, gone)
    if record:
        ex.run(st.mark_expired, {"sid": sid, "now": v.time(times.now)})
    return True


def renew(ex: Executor, st: Statements, sid: str, times: Times) -> None:
    """In the open transaction, *sid* locked: its absolute lifetime starts again now."""
    ex.run(st.renew_session, {"sid": sid, "now": st.values.time(times.now)})
    hold(ex, st, sid, times)


def delete_sessions(ex: Executor, st: Statements, sids: list[str]) -> None:
    """Delete sessions and what they own, without remembering them as expired.

    Child rows go explicitly: a host's SQLite engine may not enforce foreign keys.
    """
    values = {"sids": st.values.sids(sids)}
    with ex.transaction():
        for statement in st.delete_children:
            ex.run(statement, values)
        ex.run(st.delete_sessions, values)


def move(ex: Executor, st: Statements, old: str, new: str, now: float) -> None:
    """In the open transaction, *old* locked: everything of *old* becomes *new*'s.

    The session row is copied, its namespaces, tasks and files move over, the
    old row goes and its SID is remembered as expired (a request still using
    it gets ``410`` on a data endpoint and a fresh session elsewhere).
    """
    ex.run(st.copy_session, {"sid": old, "new_sid": new})
    for statement in st.move_children:
        ex.run(statement, {"sid": old, "new_sid": new})
    ex.run(st.delete_sessions, {"sids": st.values.sids([old])})
    ex.run(st.mark_expired, {"sid": old, "now": st.values.time(now)})
