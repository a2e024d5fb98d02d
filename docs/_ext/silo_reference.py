"""Reference tables generated from the code, so the documentation cannot drift from it.

``silo-settings``
    Every ``SILO_*`` key: :data:`flask_silo_sql.settings_table.SETTINGS` and the defaults the
    extension applies (:data:`flask_silo_sql.ext.CONFIG_DEFAULTS`).
``silo-table NAME``
    One table of :data:`flask_silo_sql.sql.models.metadata`: its columns with their type on
    SQLite and PostgreSQL, nullability, default and comment (the ``COMMENT`` PostgreSQL
    carries); then its keys and indexes. Lines ``column: text`` in the directive's content say
    more about a column than its comment; naming a column the table does not have is an error.
    Every table must be shown once somewhere: a table left out fails the build.
``silo-errors``
    Every error class of :mod:`flask_silo_sql.errors`: status, slug, class, what it means.
``silo-api``
    (reStructuredText) autodoc of every name in ``flask_silo_sql.__all__``.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sqlalchemy import Column, Table
from sqlalchemy.dialects import postgresql, sqlite

logger = logging.getLogger(__name__)


def cell(text: str) -> str:
    """Text for one cell of a Markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def literal(value: Any) -> str:
    """A Python value as code, with its size in words when it is a round number of bytes."""
    shown = f"`{value!r}`".replace("'", '"')
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024 * 1024:
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2)):
            if value % size == 0:
                return f"{shown} ({value // size} {unit})"
    if isinstance(value, int) and not isinstance(value, bool) and value % 86400 == 0 < value:
        return f"{shown} ({value // 86400} days)"
    return shown


class MarkdownDirective(SphinxDirective):
    """A directive whose output is Markdown, parsed where it stands."""

    def markdown(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        lines = StringList(self.markdown(), source=self.get_source_info()[0])
        self.state.nested_parse(lines, self.content_offset, container)
        return container.children


class SettingsDirective(MarkdownDirective):
    """The configuration reference."""

    def markdown(self) -> list[str]:
        from flask_silo_sql.settings_table import SETTINGS

        out = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for setting in SETTINGS:
            doc = setting.doc
            if setting.env:
                doc += " Also read from the environment variable of the same name."
            out.append(
                f"| `{setting.key}` | {cell(setting.type)} "
                f"| {cell(literal(setting.default))} | {cell(doc)} |"
            )
        return out


def type_name(column: Column[Any], dialect: Any) -> str:
    """The column's type as the dialect's DDL spells it."""
    if dialect.name == "postgresql" and column.primary_key and column.autoincrement is True:
        return "BIGSERIAL"
    return str(column.type.compile(dialect=dialect))


def default_of(column: Column[Any]) -> str:
    if column.server_default is None:
        return ""
    return str(getattr(column.server_default, "arg", column.server_default))


class TableDirective(MarkdownDirective):
    """One table of the schema, from the models."""

    required_arguments = 1
    has_content = True

    def markdown(self) -> list[str]:
        from flask_silo_sql.sql.models import metadata

        name = self.arguments[0]
        table: Table | None = metadata.tables.get(name)
        if table is None:
            raise self.error(f"silo-table: no table {name!r} in the models")
        shown = shown_tables(self.env)
        shown.setdefault(self.env.docname, set()).add(name)
        notes: dict[str, str] = {}
        for line in self.content:
            if not line.strip():
                continue
            column, _, text = line.partition(":")
            if column.strip() not in table.c:
                raise self.error(f"silo-table {name}: no column {column.strip()!r}")
            notes[column.strip()] = text.strip()
        out = [
            f"*{cell(table.comment or '')}*",
            "",
            "| column | SQLite | PostgreSQL | null | default | meaning |",
            "|---|---|---|---|---|---|",
        ]
        for column in table.columns:
            meaning = column.comment or ""
            if meaning and meaning[-1] not in ".)":
                meaning += "."
            if column.name in notes:
                meaning = notes[column.name]
            for fk in column.foreign_keys:
                meaning += f" Foreign key to `{fk.target_fullname}`"
                meaning += f", `ON DELETE {fk.ondelete}`." if fk.ondelete else "."
            out.append(
                f"| `{column.name}` | `{type_name(column, sqlite.dialect())}` "
                f"| `{type_name(column, postgresql.dialect())}` "
                f"| {'yes' if column.nullable else 'no'} "
                f"| {cell(f'`{default_of(column)}`') if default_of(column) else ''} "
                f"| {cell(meaning)} |"
            )
        keys = [f"primary key `{table.primary_key.name}` ({self.columns(table.primary_key)})"]
        for constraint in sorted(table.constraints, key=lambda c: str(c.name)):
            if constraint.__class__.__name__ == "UniqueConstraint":
                keys.append(f"unique `{constraint.name}` ({self.columns(constraint)})")
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            keys.append(f"index `{index.name}` ({self.columns(index)})")
        out += ["", "Keys and indexes: " + "; ".join(keys) + "."]
        return out

    @staticmethod
    def columns(thing: Any) -> str:
        return ", ".join(f"`{c.name}`" for c in thing.columns)


class ErrorsDirective(MarkdownDirective):
    """Every error class: status, slug, class and meaning."""

    def markdown(self) -> list[str]:
        import flask_silo_sql
        from flask_silo_sql import errors

        public = set(flask_silo_sql.__all__)
        classes = [
            obj
            for _, obj in inspect.getmembers(errors, inspect.isclass)
            if issubclass(obj, errors.SiloError) and obj.__module__ == errors.__name__
        ]
        classes.sort(key=lambda cls: (cls.status, cls.slug, cls.__name__))
        out = ["| status | class and `error` | raised when |", "|---|---|---|"]
        for cls in classes:
            name = (
                f"{{py:class}}`~flask_silo_sql.{cls.__name__}`"
                if cls.__name__ in public
                else f"`errors.{cls.__name__}`"
            )
            status = f"`{cls.status}`"
            if "http_status" in vars(cls):  # decided per instance: the statuses it returns
                source = inspect.getsource(vars(cls)["http_status"].fget)
                codes = sorted(set(re.findall(r"\b[1-5][0-9][0-9]\b", source)))
                status = " or ".join(f"`{code}`" for code in codes)
            doc = rst_to_md((inspect.getdoc(cls) or "").split("\n\n")[0])
            bases = [b.__name__ for b in cls.__bases__ if not issubclass(b, errors.SiloError)]
            if bases and bases[0] not in doc:
                doc += f" A `{bases[0]}`."
            if extras(cls):
                doc += f" The body adds {', '.join(extras(cls))}."
            out.append(f"| {status} | {name}<br>`{cls.slug}` | {cell(doc)} |")
        return out


def extras(cls: type) -> list[str]:
    """The body fields ``details()`` adds and the headers ``headers()`` sets, from the source."""
    found = []
    for method in ("details", "headers"):
        for klass in cls.__mro__:
            if method in vars(klass):
                source = inspect.getsource(vars(klass)[method])
                found += [f"`{k}`" for k in re.findall(r'"([A-Za-z_-]+)":', source)]
                break
    return found


def rst_to_md(text: str) -> str:
    """The little reStructuredText a docstring's first paragraph uses, as Markdown."""
    text = text.replace("``", "`")
    return re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", text)


FLASK_SILO_NAMES = (
    "Silo",
    "SessionStore",
    "CleanupDaemon",
    "BackgroundTask",
    "TaskState",
    "FileStore",
    "SiloStorage",
    "InMemoryStorage",
    "SiloError",
    "SessionExpired",
    "SessionBusy",
    "NamespaceError",
)
"""What flask-silo 0.1.6 exports (checked against it when it is installed)."""


class NewNamesDirective(MarkdownDirective):
    """The public names flask-silo does not have, each linked to its reference."""

    def markdown(self) -> list[str]:
        import flask_silo_sql

        try:
            import flask_silo
        except ImportError:
            pass
        else:
            theirs = {n for n in getattr(flask_silo, "__all__", ()) if n[0] != "_"}
            if theirs != set(FLASK_SILO_NAMES):
                raise self.error(f"flask-silo exports {sorted(theirs)}")
        missing = set(FLASK_SILO_NAMES) - set(flask_silo_sql.__all__)
        if missing:
            raise self.error(f"flask-silo names not exported: {sorted(missing)}")
        new = [n for n in flask_silo_sql.__all__ if n not in FLASK_SILO_NAMES]
        links = []
        for n in new:
            obj = getattr(flask_silo_sql, n)
            if inspect.ismodule(obj):
                links.append(f"{{py:mod}}`{n} <{obj.__name__}>`")
            elif n[0] != "_":
                links.append(f"{{py:obj}}`~flask_silo_sql.{n}`")
        return [", ".join(links) + "."]


class ApiDirective(SphinxDirective):
    """Autodoc of every public name, in the order of ``__all__`` (reStructuredText pages)."""

    def run(self) -> list[nodes.Node]:
        import flask_silo_sql

        lines: list[str] = []
        for name in flask_silo_sql.__all__:
            obj = getattr(flask_silo_sql, name)
            if name == "__version__":
                lines += [
                    ".. py:data:: __version__",
                    f"   :value: {obj!r}",
                    "",
                    "   The version of the installed package.",
                    "",
                ]
            elif inspect.ismodule(obj):
                # automodule moves the current module: the names after it are ours again
                lines += [f".. automodule:: {obj.__name__}", "   :members:", ""]
                lines += [".. currentmodule:: flask_silo_sql", ""]
            elif inspect.isclass(obj):
                lines += [f".. autoclass:: {name}", "   :members:", "   :show-inheritance:", ""]
            else:
                lines += [f".. autofunction:: {name}", ""]
        container = nodes.container()
        self.state.nested_parse(StringList(lines), self.content_offset, container)
        return container.children


class SignatureDirective(MarkdownDirective):
    """A callable's parameters with their defaults from its signature, and what each does.

    The content has one ``name: text`` line per parameter; a parameter left out, or one the
    callable does not have, is an error, so the table follows the code.
    """

    required_arguments = 1
    has_content = True

    def markdown(self) -> list[str]:
        import importlib

        module, _, name = self.arguments[0].rpartition(".")
        target = getattr(importlib.import_module(module), name)
        parameters = inspect.signature(target).parameters
        notes = {}
        for line in self.content:
            if line.strip():
                key, _, text = line.partition(":")
                notes[key.strip()] = text.strip()
        documented = [p for p in parameters if p not in ("self", "args", "kwargs")]
        if set(notes) != set(documented):
            raise self.error(
                f"{self.arguments[0]}: parameters {sorted(documented)}, described {sorted(notes)}"
            )
        out = ["| parameter | default | meaning |", "|---|---|---|"]
        for key in documented:
            default = parameters[key].default
            shown = "" if default is inspect.Parameter.empty else literal(default)
            out.append(f"| `{key}` | {cell(shown)} | {cell(notes[key])} |")
        return out


def shown_tables(env: Any) -> dict[str, set[str]]:
    """The tables each page shows, kept in the environment (so incremental builds know)."""
    if not hasattr(env, "silo_tables"):
        env.silo_tables = {}
    tables: dict[str, set[str]] = env.silo_tables
    return tables


def forget_page(app: Sphinx, env: Any, docname: str) -> None:
    shown_tables(env).pop(docname, None)


def check_tables_shown(app: Sphinx, env: Any) -> None:
    from flask_silo_sql.sql.models import metadata

    shown = set().union(*shown_tables(env).values())
    missing = sorted(set(metadata.tables) - shown)
    if missing:
        logger.warning("tables missing from the table reference (silo-table): %s", missing)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("silo-settings", SettingsDirective)
    app.add_directive("silo-table", TableDirective)
    app.add_directive("silo-errors", ErrorsDirective)
    app.add_directive("silo-api", ApiDirective)
    app.add_directive("silo-new-names", NewNamesDirective)
    app.add_directive("silo-signature", SignatureDirective)
    app.connect("env-purge-doc", forget_page)
    app.connect("env-updated", check_tables_shown)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}
