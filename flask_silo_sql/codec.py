"""Namespace state as JSON text: encoding, the checks every database needs, task references.

Durable state is JSON. :func:`serialise` turns one namespace into compact
JSON text, or raises :class:`~flask_silo_sql.errors.StateNotSerializable`
naming the namespace and key, or :class:`~flask_silo_sql.errors.StateTooLarge`.
The rules are the strictest of SQLite's and PostgreSQL's, so state that works
on one works on the other. A :class:`~flask_silo_sql.tasks.BackgroundTask`
inside state is written as a reference to its row (``{"__silo_task__": id}``)
and turned back into a task object when the namespace is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from .errors import StateNotSerializable, StateTooLarge
from .tasks import TASK_MARKER, BackgroundTask

MAX_NESTING = 512
"""How deeply state may nest lists and objects.

Far enough below Python's recursion limit that state written in one call
stack can always be decoded again in a deeper one (the JSON decoder recurses).
"""

UNSERIALISABLE = "\x00"
"""A baseline no JSON text equals: a namespace whose default is not JSON is always written."""


def dumps(value: Any) -> str:
    """Compact JSON without NaN/Infinity (PostgreSQL's JSONB refuses them)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


class UnlinkedTask(TypeError):
    """A BackgroundTask in state that has no row yet (the caller links it, then retries)."""


def _default(obj: Any) -> Any:
    if isinstance(obj, BackgroundTask):
        reference = obj.reference()
        if reference is None:
            raise UnlinkedTask(obj.name)
        return reference
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def encode(value: Any) -> str:
    """Compact JSON; a linked BackgroundTask becomes a reference to its row."""
    return json.dumps(
        value, default=_default, separators=(",", ":"), allow_nan=False, ensure_ascii=False
    )


_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _storable(text: str) -> str:
    """*text*, if every database can store it (ValueError otherwise).

    PostgreSQL's JSONB refuses NUL characters in strings, and a lone surrogate
    is not UTF-8: both are refused on every database.
    """
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        raise ValueError("a string holds a NUL character (\\u0000), which cannot be stored")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate, which is not valid UTF-8") from None
    return text


def _nesting_ok(text: str, value: Any) -> str:
    """*text* (the JSON of *value*), unless it nests deeper than MAX_NESTING (ValueError)."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return text  # it cannot be that deep
    pending = [(value, 1)] if isinstance(value, (dict, list, tuple)) else []
    while pending:
        item, depth = pending.pop()
        if depth > MAX_NESTING:
            raise ValueError(f"state nests deeper than {MAX_NESTING} levels")
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list, tuple)):
                pending.append((child, depth + 1))
    return text


def serialise(namespace: str, value: Any, max_bytes: int | None = None) -> str:
    """JSON text of a namespace, or an error naming the namespace and key.

    Raises :class:`UnlinkedTask` for a task without a row (link it, then call
    again), :class:`StateNotSerializable` and :class:`StateTooLarge`.
    """
    try:
        text = _nesting_ok(_storable(encode(value)), value)
    except UnlinkedTask:
        raise
    except TypeError as exc:
        raise StateNotSerializable(namespace, _offending_key(value), str(exc)) from None
    except (ValueError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else "state nests too deeply"
        key = _offending_key(value)
        raise StateNotSerializable(namespace, key, reason, invalid_value=True) from None
    if TASK_MARKER in text and _holds_task_marker(value):
        # Only the library writes task references: such a dict from a client
        # would be loaded as a task (another session's, given its ID).
        key = next((str(k) for k, v in value.items() if _holds_task_marker(v)), None)
        reason = f"the key {TASK_MARKER!r} is reserved for task references"
        raise StateNotSerializable(namespace, key, reason, invalid_value=True)
    if max_bytes is not None and len(text) > max_bytes // 4:  # cheap pre-check
        size = len(text.encode())
        if size > max_bytes:
            raise StateTooLarge(namespace, size, max_bytes)
    return text


def unchanged(value: Any, baseline: str) -> bool:
    """Whether *value* encodes to *baseline* exactly (then nothing needs writing nor checking)."""
    try:
        return encode(value) == baseline
    except (TypeError, ValueError, RecursionError):
        return False


def _offending_key(value: Any) -> str | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return repr(key)
            try:
                _nesting_ok(_storable(encode(item)), item)
            except UnlinkedTask:
                continue
            except (TypeError, ValueError, RecursionError):
                return str(key)
    return None


def _holds_task_marker(value: Any) -> bool:
    """Whether a plain dict in *value* has the key reserved for task references."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if TASK_MARKER in item:
                return True
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


def baseline_text(value: Any) -> str:
    """The text a namespace is compared against: its JSON, or UNSERIALISABLE."""
    try:
        return encode(value)
    except (TypeError, ValueError, RecursionError):
        return UNSERIALISABLE


# -- tasks inside state ----------------------------------------------------------


def tasks_in(value: Any, path: str = "") -> Iterator[tuple[str, BackgroundTask]]:
    """Every BackgroundTask inside *value*, with its path (``key/0/key``)."""
    if isinstance(value, BackgroundTask):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tasks_in(item, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from tasks_in(item, f"{path}/{index}")


def revive_tasks(value: Any, make: Callable[[str, str], BackgroundTask]) -> Any:
    """Replace task references in loaded JSON by task objects (``make(id, name)``)."""
    if isinstance(value, dict):
        if TASK_MARKER in value:
            return make(str(value[TASK_MARKER]), str(value.get("name", "task")))
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                value[key] = revive_tasks(item, make)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, (dict, list)):
                value[index] = revive_tasks(item, make)
    return value


def task_id_for(sid: str, namespace: str, path: str) -> str:
    """A stable row ID for the task at *path*: a factory makes the same task each load."""
    return hashlib.sha256(f"{sid}\0{namespace}\0{path}".encode()).hexdigest()[:32]


def merge_keys(current: Any, base: Any, mine: Any) -> Any:
    """Apply the top-level keys *mine* changed relative to *base* onto *current*."""
    if not (isinstance(current, dict) and isinstance(base, dict) and isinstance(mine, dict)):
        return mine
    merged = dict(current)
    for key, value in mine.items():
        if key not in base or base[key] != value:
            merged[key] = value
    for key in base:
        if key not in mine:
            merged.pop(key, None)
    return merged
