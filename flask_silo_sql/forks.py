"""Fork hooks on an object that holds locks or threads, held weakly.

A process forked while another thread holds one of the object's locks would
inherit it held, and wait on it for ever: *before* takes it (no fork mid-way),
*in_parent* gives it back, *in_child* makes the child's own. The hooks keep no
object alive: once it is gone, they do nothing.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def at_fork(
    owner: T,
    *,
    before: Callable[[T], object],
    in_parent: Callable[[T], object],
    in_child: Callable[[T], object],
) -> None:
    """Call *before*, *in_parent* and *in_child* with *owner* around each fork, while it lives."""
    this = weakref.ref(owner)

    def on(method: Callable[[T], object]) -> Callable[[], None]:
        def hook() -> None:
            found = this()
            if found is not None:
                method(found)

        return hook

    os.register_at_fork(
        before=on(before), after_in_parent=on(in_parent), after_in_child=on(in_child)
    )
