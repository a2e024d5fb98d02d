"""Mistakes in how an app is set up, refused when they are made, not left to do nothing.

A view decorator of silo written *above* ``@app.route`` wraps a function that
Flask has already registered, so the decorator never runs (an idempotent view
that is not). :func:`wrapping` refuses it when the function is a view of an app
the Silo serves already; :func:`check_views` finds the rest (blueprints, apps
bound later) when an app is bound and before it serves its first request: a
registered view that a silo decorator wrapped, with no registered view built on
the wrapper. :func:`first_request` is that last check, and it marks the app as
serving (after which namespaces can no longer be registered).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from .app_state import SiloApp
from .errors import ViewDecoratorOrder

_WRAPPED: weakref.WeakKeyDictionary[Callable[..., Any], str] = weakref.WeakKeyDictionary()
"""Functions a silo view decorator wrapped, and the decorator's name."""


def _name(view: Callable[..., Any]) -> str:
    return str(getattr(view, "__name__", type(view).__name__))


def wrapping(apps: Iterable[SiloApp], view: Callable[..., Any], decorator: str) -> None:
    """*view* is about to be wrapped by ``@silo.<decorator>``: refuse a registered view."""
    for state in apps:
        if any(registered is view for registered in state.view_functions.values()):
            raise ViewDecoratorOrder(decorator, _name(view))
    with contextlib.suppress(TypeError):  # a callable without weak references: unchecked
        _WRAPPED[view] = decorator


def _unwraps_to(view: Callable[..., Any], original: Callable[..., Any]) -> bool:
    seen = 0
    while view is not None and seen < 50:
        if view is original:
            return True
        view = getattr(view, "__wrapped__", None)  # type: ignore[assignment]
        seen += 1
    return False


def check_views(state: SiloApp) -> None:
    """Refuse a view registered without the silo decorator that wrapped it."""
    views = list(state.view_functions.values())
    for view in views:
        try:
            decorator = _WRAPPED.get(view)
        except TypeError:
            continue
        if decorator is None:
            continue
        if not any(other is not view and _unwraps_to(other, view) for other in views):
            raise ViewDecoratorOrder(decorator, _name(view))


def first_request(state: SiloApp) -> None:
    """Before an app's first request: the views checked, the app marked as serving."""
    if state.served:
        return
    check_views(state)
    state.served = True
