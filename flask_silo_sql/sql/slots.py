"""A namespace as it was read (a :class:`Slot`), and saving one from a task thread.

A unit keeps, for each namespace it read, the object it handed out and the
JSON text and version the row had then: the baseline its commit compares
with. A task that sits in the namespace keeps the same slot after the request
ends, so the task's thread can save what it changed (:func:`merge_write`).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from ..codec import UNSERIALISABLE, UnlinkedTask, encode, merge_keys, serialise
from . import sessions as ops
from .context import Context
from .executor import Executor

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
