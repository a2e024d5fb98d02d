"""``flask silo-db``: thin click wrappers over :mod:`flask_silo_sql.schema` and the store.

Installed as a ``flask.commands`` entry point, so it is available in every
Flask app that uses :class:`~flask_silo_sql.Silo`, with no file in the project.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click
from flask import current_app
from flask.cli import with_appcontext

from .errors import SchemaError, SiloError
from .ext import EXTENSION_KEY, SiloApp
from .files import fsck as check_files
from .sql import SQLStorage, schema


def _silo() -> SiloApp:
    state = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, SiloApp):
        raise click.ClickException("this application does not use flask_silo_sql.Silo")
    return state


def _storage() -> SQLStorage:
    storage = _silo().store.storage
    if not isinstance(storage, SQLStorage):
        raise click.ClickException("this application's Silo does not use SQL storage")
    return storage


def _migrated() -> SQLStorage:
    """The storage, for a command that needs the current schema (one clear line if not)."""
    storage = _storage()
    try:
        schema.check(storage.engine)
    except SchemaError as exc:
        rev = "no silo schema" if exc.current is None else f"the schema is at {exc.current}"
        raise click.ClickException(
            f"the silo database has {rev}, this version needs {exc.head}: "
            "run `flask silo-db upgrade`"
        ) from None
    except SiloError as exc:
        raise click.ClickException(str(exc)) from None
    return storage


F = TypeVar("F", bound=Callable[..., Any])


def _reported(command: F) -> F:
    """A silo error (the database unreachable, say) ends the command with one line, exit 1."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SiloError as exc:
            raise click.ClickException(str(exc)) from None

    return cast(F, run)


@click.group("silo-db")
def silo_db() -> None:
    """flask-silo-sql's tables: migrations, expiry, statistics."""


@silo_db.command()
@click.argument("revision", default="head")
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it.")
@with_appcontext
@_reported
def upgrade(revision: str, sql: bool) -> None:
    """Migrate the silo tables up to REVISION (default: head)."""
    schema.upgrade(_storage().engine, revision, sql=sql)
    if not sql:
        click.echo(f"silo schema at {schema.current(_storage().engine)}", err=True)


@silo_db.command()
@click.argument("revision")
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it.")
@with_appcontext
@_reported
def downgrade(revision: str, sql: bool) -> None:
    """Migrate the silo tables down to REVISION (`base` drops them all)."""
    schema.downgrade(_storage().engine, revision, sql=sql)


@silo_db.command()
@with_appcontext
@_reported
def current() -> None:
    """Show the revision the database is at."""
    click.echo(schema.current(_storage().engine) or "(no silo schema)")


@silo_db.command()
def history() -> None:
    """List the migrations this version ships."""
    schema.history(stdout=sys.stdout)


@silo_db.command()
@click.argument("revision")
@with_appcontext
@_reported
def stamp(revision: str) -> None:
    """Record REVISION as current without running migrations."""
    schema.stamp(_storage().engine, revision)


@silo_db.command()
@with_appcontext
@_reported
def check() -> None:
    """Exit with status 1 unless the schema is at head."""
    engine = _storage().engine
    rev, want = schema.current(engine), schema.head()
    if rev != want:
        click.echo(
            f"silo schema at {rev or 'nothing'}, head is {want}: run `flask silo-db upgrade`"
        )
        sys.exit(1)
    click.echo(f"silo schema is current ({rev})")


@silo_db.command()
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Sessions per batch.")
@click.option("--dry-run", is_flag=True, help="Count what would expire; change nothing.")
@with_appcontext
@_reported
def cleanup(batch_size: int | None, dry_run: bool) -> None:
    """Run one expiry sweep now (for cron): idle sessions, their files, old expired SIDs."""
    store = _silo().store
    _migrated()
    interactive = sys.stderr.isatty()
    verb = "would expire" if dry_run else "expired"

    def progress(count: int) -> None:
        if interactive:
            click.echo(f"\r{verb} {count} session(s)…", nl=False, err=True)

    started = time.perf_counter()
    result = store.sweep(batch_size=batch_size, dry_run=dry_run, progress=progress)
    if interactive and result.batches:
        click.echo("", err=True)
    summary = (
        f"{verb} {len(result.expired)} session(s) in {time.perf_counter() - started:.2f} s "
        f"({result.batches} batch(es), {result.skipped_busy} busy skipped"
    )
    if not dry_run:
        summary += f", {result.pruned} expired SID record(s) pruned"
        summary += f", {result.keys_expired} idempotency key(s) forgotten"
    click.echo(summary + ")")


@silo_db.command()
@click.option("--fix", is_flag=True, help="Delete orphan files and rows without a file.")
@with_appcontext
@_reported
def fsck(fix: bool) -> None:
    """Compare file stores on disk with silo_files (exit 1 if anything is wrong)."""
    _migrated()
    stores = _silo().silo.file_stores
    if not stores:
        click.echo("no file stores registered")
        return
    dirty = False
    for files in stores.values():
        report = check_files(files, fix=fix)
        for label, entries in (
            ("file without a row", report.unrecorded),
            ("row without a file", report.missing),
            ("partial upload", report.partial),
        ):
            for entry in entries:
                click.echo(f"{files.name}: {label}: {entry}")
        verdict = "clean" if report.clean else ("repaired" if fix else "problems found")
        click.echo(f"{files.name}: {verdict}")
        dirty = dirty or (not report.clean and not fix)
    if dirty:
        sys.exit(1)


@silo_db.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@with_appcontext
@_reported
def stats(as_json: bool) -> None:
    """Counts of sessions, namespaces, expired SIDs, files and tasks."""
    numbers = _migrated().stats()
    if as_json:
        click.echo(json.dumps(numbers, sort_keys=True))
        return
    for key in ("sessions", "namespaces", "expired_sids", "files", "file_bytes"):
        click.echo(f"{key:<14}{numbers[key]}")
    tasks = numbers["tasks"] or {}
    click.echo("tasks         " + (", ".join(f"{k}={v}" for k, v in sorted(tasks.items())) or "0"))
