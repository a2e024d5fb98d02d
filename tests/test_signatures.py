"""Drop-in signatures: every public callable of flask-silo 0.1.6 takes the same arguments here.

For each name flask-silo exports, and each public method and property of
each exported class, the positional parameters of ours are flask-silo's, with
the same names, kinds and defaults, in the same order; anything we add is
keyword-only with a default. So ``t.log(message="hi")`` and every other call
written for flask-silo keeps working after the import changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import flask_silo
import pytest

import flask_silo_sql

EXPORTED = [name for name in flask_silo.__all__ if name != "__version__"]


def public_members(cls: type) -> Iterator[tuple[str, Any]]:
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        yield name, member


def callables() -> Iterator[tuple[str, Any, Any]]:
    """``(qualified name, theirs, ours)`` for every public callable flask-silo defines."""
    for name in EXPORTED:
        theirs = getattr(flask_silo, name)
        ours = getattr(flask_silo_sql, name)
        if not inspect.isclass(theirs):
            yield name, theirs, ours
            continue
        for member_name, member in public_members(theirs):
            qualified = f"{name}.{member_name}"
            mine = inspect.getattr_static(ours, member_name, None)
            wrapped = isinstance(member, (property, staticmethod, classmethod))
            if wrapped or callable(member):
                yield qualified, member, mine


def signature_of(obj: Any) -> inspect.Signature:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return inspect.signature(obj)


CASES = list(callables())


def test_every_exported_name_exists() -> None:
    assert [n for n in EXPORTED if not hasattr(flask_silo_sql, n)] == []


@pytest.mark.parametrize(("name", "theirs", "ours"), CASES, ids=[c[0] for c in CASES])
def test_same_parameters_additions_keyword_only(name: str, theirs: Any, ours: Any) -> None:
    assert ours is not None, f"{name} is missing"
    if isinstance(theirs, property):
        assert isinstance(ours, property), f"{name} is not a property here"
        return
    if inspect.isclass(theirs):
        theirs, ours = theirs.__init__, ours.__init__
    expected = list(signature_of(theirs).parameters.values())
    actual = list(signature_of(ours).parameters.values())
    positional = [p for p in actual if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    wanted = [p for p in expected if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.kind, p.default) for p in positional] == [
        (p.name, p.kind, p.default) for p in wanted
    ], name
    mine = {p.name: p for p in actual}
    for param in expected:
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            assert param.name in mine, f"{name}: keyword {param.name!r} is missing"
            assert mine[param.name].default == param.default, (name, param.name)
    theirs_names = {p.name for p in expected}
    for param in actual:
        if param.name not in theirs_names:
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, (name, param.name)
            assert param.default is not inspect.Parameter.empty, (name, param.name)
