"""``flask silo-db``: thin click wrappers over :mod:`flask_silo_sql.schema` and the store.

Installed as a ``flask.commands`` entry point, so it is available in every
Flask app that uses :class:`~flask_silo_sql.Silo`, with no file in the project.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click
from flask import current_app
from flask.cli import with_appcontext

from .app_state import SiloApp
from .cli_errors import COMMAND_ERRORS, one_line
from .errors import SchemaError, SiloError
from .ext import EXTENSION_KEY, Silo
from .files import fsck as check_files
from .files.rekey import rekey_directories, rekey_objects
from .keys import session_key
from .probes.health import check as check_health
from .sids import tag
from .sql import SQLStorage, schema
from .sql.lookup import find_session
from .sql.reseal import ResealResult, reseal
from .tasks import TaskRunner


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
        found = "has no silo schema" if exc.current is None else f"is at revision {exc.current}"
        raise click.ClickException(
            f"the silo database {found}, this version needs revision {exc.head}: "
            "run `flask silo-db upgrade`"
        ) from None
    return storage


F = TypeVar("F", bound=Callable[..., Any])


def _reported(command: F) -> F:
    """A silo error, a database error (unreachable, a wrong password) or a migration
    error ends the command with one ``Error:`` line, exit status 1."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (SiloError, *COMMAND_ERRORS) as exc:
            cause = getattr(exc, "original", None) or exc  # StorageUnavailable keeps it
            if not isinstance(cause, COMMAND_ERRORS):
                raise click.ClickException(str(exc)) from None
            storage = _silo().store.storage
            url = storage.engine.url if isinstance(storage, SQLStorage) else None
            raise click.ClickException(one_line(cause, url)) from None

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
        for files in cast(Silo, _silo().silo).file_stores.values():
            # Named by SIDs before they were hashed at rest: directories, fsspec objects.
            renamed = rekey_directories(files.base_dir) + rekey_objects(files.blobs)
            if renamed:
                click.echo(f"{files.name}: session directories renamed to their keys", err=True)


@silo_db.command()
@click.argument("revision")
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it.")
@with_appcontext
@_reported
def downgrade(revision: str, sql: bool) -> None:
    """Migrate the silo tables down to REVISION (`base` drops them all).

    With --sql, REVISION is a range FROM:TO (the SQL from one revision down to another).
    """
    if sql and ":" not in revision:
        raise click.ClickException(
            "downgrade --sql prints the SQL between two revisions, so it needs them as "
            f"<from>:<to>, e.g. `flask silo-db downgrade {schema.head()}:{revision} --sql`"
        )
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
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Rows per batch (one short transaction each).",
)
@with_appcontext
@_reported
def reencrypt(batch_size: int) -> None:
    """Seal every encrypted namespace under the newest key of SILO_ENCRYPTION_KEYS.

    In batches, safe while the application runs; rows written before their namespace
    was encrypted are sealed too. Exit status 1 when a row fails authentication (it is
    left as it is). Then the older keys can be retired.
    """
    store = _silo().store
    storage = _migrated()
    names = sorted(store.encrypted)
    if not names:
        click.echo("no encrypted namespaces registered")
        return
    interactive = sys.stderr.isatty()

    def progress(done: ResealResult) -> None:
        if interactive:
            click.echo(f"\rread {done.rows} row(s), resealed {done.resealed}…", nl=False, err=True)

    result = reseal(
        storage.connector,
        storage.statements,
        store.sealer_for,
        names,
        batch_size=batch_size,
        progress=progress,
    )
    if interactive and result.batches:
        click.echo("", err=True)
    click.echo(
        f"resealed {result.resealed} of {result.rows} row(s) of {', '.join(names)} under the "
        f"newest key ({result.batches} batch(es), {result.unreadable} unreadable)"
    )
    if result.unreadable:
        sys.exit(1)


@silo_db.command()
@click.option(
    "--fix", is_flag=True, help="Delete bytes without a row and forget rows without bytes."
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="Seconds an upload that stopped reporting progress still counts as in progress.",
)
@click.option("--no-verify", is_flag=True, help="Compare sizes only, not SHA-256 hashes.")
@with_appcontext
@_reported
def fsck(fix: bool, grace: float, no_verify: bool) -> None:
    """Compare file stores' bytes with silo_files (exit 1 if anything is wrong).

    Safe while the application runs: uploads in progress are left alone.
    """
    _migrated()
    stores = cast(Silo, _silo().silo).file_stores
    if not stores:
        click.echo("no file stores registered")
        return
    dirty = False
    for files in stores.values():
        report = check_files(files, fix=fix, grace=grace, verify=not no_verify)
        for label, entries in (
            ("file without a row", report.unrecorded),
            ("row without a file", report.missing),
            ("partial upload", report.partial),
            ("bytes differ from their row", report.mismatched),
        ):
            for entry in entries:
                click.echo(f"{files.name}: {label}: {entry}")
        if report.elsewhere:
            click.echo(f"{files.name}: {report.elsewhere} file(s) on other hosts, not checked here")
        if report.in_progress:
            click.echo(
                f"{files.name}: {report.in_progress} entry(ies) of uploads in progress left alone"
            )
        if report.retired:
            click.echo(
                f"{files.name}: {report.retired} replaced version(s) kept for downloads "
                "that began before (removed an hour after their replacement)"
            )
        repaired = report.fixed and not report.mismatched
        verdict = "clean" if report.clean else ("repaired" if repaired else "problems found")
        click.echo(f"{files.name}: {verdict}")
        dirty = dirty or (not report.clean and not repaired)
    if dirty:
        sys.exit(1)


@silo_db.command()
@click.argument("sid", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@with_appcontext
@_reported
def find(sid: str | None, as_json: bool) -> None:
    """Find the session of SID: its key (what every table holds), its log tag, and
    whether it is live or remembered as expired.

    Without SID, it is read from the first line of standard input, so it stays out of
    the shell's history and the process list.
    """
    if sid is None:
        sid = sys.stdin.readline().strip()
    if not sid:
        raise click.ClickException("give the SID as an argument or on standard input")
    key = session_key(sid)
    found = find_session(_migrated().engine, key)
    if as_json:
        click.echo(json.dumps({"key": key, "tag": tag(key), **found}, sort_keys=True))
        return
    click.echo(f"key           {key}")
    click.echo(f"tag           {tag(key)}")
    click.echo(f"state         {found['state']}")
    for name in ("created_at", "last_active", "expires_at", "expired_at"):
        if found.get(name) is not None:
            click.echo(f"{name:<14}{found[name]}")
    for name in ("namespaces", "files", "tasks"):
        if name in found:
            click.echo(f"{name:<14}{found[name]}")


@silo_db.command()
@with_appcontext
def health() -> None:
    """Exit with status 0 when this app can serve, 1 when not; one line says why.

    The database answers, its schema is current, and with
    ``SILO_TASK_RUNNER = "worker"`` a ``flask silo-db worker`` is alive.
    """
    answer = check_health(_silo())
    click.echo(answer.reason)
    sys.exit(0 if answer.healthy else 1)


@silo_db.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@with_appcontext
@_reported
def stats(as_json: bool) -> None:
    """Counts of sessions, namespaces, expired SIDs, files, tasks and live task workers.

    On PostgreSQL also each table's size, its indexes' size, and its live and dead rows.
    """
    numbers = _migrated().stats(heartbeat_timeout=_silo().store.heartbeat_timeout)
    if as_json:
        click.echo(json.dumps(numbers, sort_keys=True))
        return
    for key in ("sessions", "namespaces", "expired_sids", "files", "file_bytes"):
        click.echo(f"{key:<14}{numbers[key]}")
    tasks = dict(numbers["tasks"] or {})
    shown = [f"{status}={tasks.pop(status, 0)}" for status in TASK_STATUSES]
    shown += [f"{k}={v}" for k, v in sorted(tasks.items())]
    click.echo("tasks         " + ", ".join(shown))
    workers = numbers["workers"]
    click.echo(f"workers       {len(workers)} live")
    for worker in workers:
        click.echo(
            f"  {worker['id']}  {worker['kind']}  running {worker['running']}"
            f"/{worker['concurrency']}  last seen {worker['heartbeat_age']:.1f} s ago"
        )
    tables = numbers["tables"]
    if tables:  # PostgreSQL: what the tables hold on disk, for watching bloat
        click.echo("tables        size      indexes   live rows   dead rows   HOT updates")
        for name, t in sorted(tables.items()):
            hot = f"{100 * t['hot_updates'] / t['updates']:.0f} %" if t["updates"] else "-"
            click.echo(
                f"  {name:<22}{_size(t['table_bytes']):>8}  {_size(t['index_bytes']):>8}"
                f"  {t['live_rows']:>10}  {t['dead_rows']:>10}   {hot:>6}"
            )


def _size(n: int) -> str:
    """*n* bytes, short (``8.0 kB``, ``1.2 MB``)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TB"


TASK_STATUSES = ("queued", "running", "retrying", "failed", "complete")


@silo_db.command()
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Attempts run at once (default SILO_TASK_CONCURRENCY).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds a stopping worker lets running attempts finish (default SILO_WORKER_GRACE).",
)
@with_appcontext
@_reported
def worker(concurrency: int | None, grace: float | None) -> None:
    """Run durable tasks: queued runs, retries, and runs whose process died.

    Wakes up on LISTEN/NOTIFY on PostgreSQL and polls every SILO_TASK_POLL_INTERVAL
    seconds. SIGTERM (or Ctrl-C) stops claiming, lets running attempts finish within
    the grace period, then hands the rest back so they run elsewhere; a second one
    hands them back at once.
    """
    _migrated()
    state = _silo()
    store = state.store
    if state.runner is not None and state.runner.running:
        state.runner.stop()  # this process is the worker: one claimer
    runner = TaskRunner.from_config(store, state.settings, kind="worker", concurrency=concurrency)
    grace_s = state.settings.worker_grace if grace is None else grace
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        if stopping.is_set():  # a second signal: no more grace
            runner.hurry()
        stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        names = ", ".join(sorted(store.tasks)) or "none registered"
        click.echo(
            f"silo worker {runner.worker_id}: up to {runner.concurrency} at once (tasks: {names})",
            err=True,
        )
        runner.start()
        while not stopping.wait(0.5):
            if not runner.running:
                raise click.ClickException("the task runner stopped unexpectedly")
        runner.stop_claiming()  # a claim committed just now is counted below
        running = runner.active
        if running:
            click.echo(
                f"stopping: {running} attempt(s) running, {grace_s:g} s to finish"
                " (stop again to hand them back now)",
                err=True,
            )
        handed = runner.stop(grace_s)
        click.echo(
            f"silo worker stopped ({runner.claimed} attempt(s) claimed, "
            f"{handed} run(s) handed back)",
            err=True,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
