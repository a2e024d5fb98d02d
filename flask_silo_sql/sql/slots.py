"""A namespace as it was read (a :class:`Slot`), and saving one from a task thread.

A unit keeps, for each namespace it read, the object it handed out and the
JSON text and version the row had then: the baseline its commit compares
with. A task that sits in the namespace keeps the same slot after the request
ends, so the task's thread can save what it changed (:func:`merge_write`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..codec import (
    UNSERIALISABLE,
    UnlinkedTask,
    encode,
    merge_keys,
    revive_tasks,
    serialise,
)
from ..tasks import TASK_MARKER
from . import sessions as ops
from .context import Context
from .executor import Executor

if TYPE_CHECKING:
    from ..tasks import BackgroundTask

MERGE_ATTEMPTS = 20
"""How often a task thread's save retries when requests keep changing the namespace."""


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


def merge_write(ctx: Context, ex: Executor, sid: str, slot: Slot, text: str, now: float) -> int:
    """In the open transaction: write *text* (the slot's new JSON) merged by top-level key.

    The keys this copy changed since it was read (or last saved) are applied
    to the namespace as stored now, so changes made meanwhile by requests to
    other keys survive. Returns the new version; raises
    :class:`~flask_silo_sql.errors.StateConflict` when another writer got there
    first (the caller rolls back and tries again), never writing over its change.
    """
    mine = json.loads(text)
    base = json.loads(slot.text) if slot.text != UNSERIALISABLE else None
    current = ctx.opened(sid, slot.name, ops.load_namespace(ex, ctx.st, sid, slot.name))
    if current is None:
        write = ctx.write(slot.name, text, None)
    else:
        merged = encode(merge_keys(current.data, base, mine))
        write = ctx.write(slot.name, merged, current.version)
    return ops.write_namespaces(ex, ctx.st, sid, [write], now)[0]


def pending_text(ctx: Context, slot: Slot) -> str | None:
    """The slot's JSON when it changed since it was read or saved, else None.

    A namespace that cannot be stored (not JSON, too large) raises, as a request's would.
    """
    try:
        text = serialise(slot.name, slot.value, ctx.policy.max_state_bytes)
    except UnlinkedTask:
        return None
    return None if text == slot.text else text


def catch_up(
    ctx: Context,
    ex: Executor,
    sid: str,
    slot: Slot,
    make: Callable[[str, str], BackgroundTask],
) -> None:
    """Bring a reader's copy of a namespace up to its stored row, keeping the keys it changed.

    A run's end commits its namespace and its row together, but a request reads the
    namespace first and the run's row later: seen finished, the run's last writes
    (``state["result"]``) must be in the reader's copy too. Keys the reader changed
    stay its own (its commit merges them as before); *make* revives task references.
    """
    with slot.lock:
        value = slot.value
        if not isinstance(value, dict) or slot.text == UNSERIALISABLE:
            return
        current = ops.load_namespace(ex, ctx.st, sid, slot.name)
        if current is None or current.version == slot.version:
            return
        stored = current.data
        if not isinstance(stored, dict):
            return
        base = json.loads(slot.text)
        if not isinstance(base, dict):
            return
        text = current.text if current.text is not None else encode(stored)
        if TASK_MARKER in text:
            stored = revive_tasks(stored, make)
            text = encode(stored)
        mine = {key: item for key, item in value.items() if _changed(key, item, base)}
        gone = [key for key in base if key not in value]
        merged = {key: item for key, item in stored.items() if key not in gone}
        merged.update(mine)
        value.clear()
        value.update(merged)
        slot.text, slot.version = text, current.version


def _changed(key: str, item: Any, base: dict[str, Any]) -> bool:
    """Whether a reader changed *key* of its copy since it read it (*base*: as read)."""
    if key not in base:
        return True
    try:
        return bool(json.loads(encode(item)) != base[key])
    except (TypeError, ValueError, RecursionError, UnlinkedTask):
        return True
