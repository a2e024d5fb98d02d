"""The configuration reference is complete: every ``SILO_*`` key the package reads is in it."""

from __future__ import annotations

import re
from pathlib import Path

import flask_silo_sql
from flask_silo_sql.ext import CONFIG_DEFAULTS
from flask_silo_sql.settings_table import BY_KEY, SETTINGS

PACKAGE = Path(flask_silo_sql.__file__).resolve().parent
NOT_SETTINGS = {"SILO_TABLES"}  # a Python name (flask_silo_sql.sql.models), not a key


def keys_named_in_package() -> set[str]:
    """Every ``SILO_*`` word of the package's source: keys read, and keys its texts mention."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        found |= set(re.findall(r"\bSILO_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return found - NOT_SETTINGS


def test_every_key_the_package_names_is_documented() -> None:
    named = keys_named_in_package()
    assert "SILO_LOCKING" in named  # the scan sees what the code reads
    assert sorted(named - set(BY_KEY)) == []


def test_the_table_documents_exactly_the_keys_with_defaults() -> None:
    assert len(BY_KEY) == len(SETTINGS), "a key is listed twice"
    assert set(BY_KEY) == set(CONFIG_DEFAULTS)


def test_each_default_matches_its_declared_type() -> None:
    names = {"str": str, "dict": dict, "bool": bool, "int": int, "float": float}
    for setting in SETTINGS:
        default = setting.default
        allowed = [part.strip().split(" ")[0] for part in setting.type.split("|")]
        if default is None:
            assert "None" in allowed, setting.key
        elif isinstance(default, str) and any(a.startswith('"') for a in allowed):
            assert f'"{default}"' in allowed, setting.key
        else:
            assert any(type(default) is names[a] for a in allowed if a in names), (
                f"{setting.key}: {default!r} is not {setting.type}"
            )
        assert setting.doc.strip(), setting.key
