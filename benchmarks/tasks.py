"""Durable tasks: throughput with 4 worker processes, and enqueue-to-start latency.

Configurations, each with trivial tasks (the function only returns) from
``benchmarks/tasks_apps.py``:

* ``silo-sqlite``: flask_silo_sql on an SQLite file, ``SILO_TASK_RUNNER = "worker"``,
  ``flask silo-db worker`` processes (polling);
* ``silo-pg``: the same on PostgreSQL (LISTEN/NOTIFY plus polling);
* ``procrastinate-pg``: procrastinate 3 on the same PostgreSQL server, its own workers
  (LISTEN/NOTIFY), in its own database.

PostgreSQL is a private server started for the run with ``fsync=on``
(``tests/pgserver.py``), or the server named by ``SILO_TEST_PG_URL``.

**Throughput**: ``--tasks`` tasks are queued with no worker running (silo: one
session each, started through the app.s ``POST /api/start`` in this process;
procrastinate: ``defer``), then ``--workers`` worker processes are started
(concurrency 1 each) and the tasks run. Throughput is tasks divided by the time
from the first task's start to the last task's end, both read from the
database (silo: ``silo_tasks.started_at`` / ``finished_at``; procrastinate: its
``procrastinate_events``), so process start-up is not counted.

**Recovery** (flask_silo_sql only): two workers with ``SILO_TASK_HEARTBEAT_TIMEOUT
= 2``; a long run is claimed by one of them, which is then killed (``SIGKILL``);
the time from the kill to the start of the run's next attempt in the other
worker (from ``silo_tasks.started_at``), over ``--recovery-rounds`` rounds.

**Latency**: with the workers running and idle, ``--latency-tasks`` tasks are
queued one at a time, ``--gap`` seconds apart; a task's latency is its start
(from the database, as above) minus the moment its enqueue was called in this
process (both on this machine's clock: the database server is local). The
moment of the call, not of its return: a worker woken by the enqueue's commit
often starts the task before the call has returned (silo's enqueue is a whole
request: the start counts its handling too).

Targets (from the issue): silo's throughput on PostgreSQL at least
procrastinate's; p99 enqueue-to-start at most 100 ms on PostgreSQL and 1 s on
SQLite; recovery within the heartbeat timeout + 1 s. Exit status 0 whatever
the verdicts (a report), 1 when a configuration lost a task or did not start.

Run: ``python benchmarks/tasks.py [--tasks N] [--latency-tasks N] [--gap S]
[--workers W] [--only NAME ...]``. Needs ``pip install -e ".[postgres,dev,bench]"``
(procrastinate 3 is in the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, create_engine, text

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("silo-sqlite", "silo-pg", "procrastinate-pg")
LATENCY_TARGETS = {"silo-pg": 0.100, "silo-sqlite": 1.0}
RECOVERY_TIMEOUT_S = 2.0


class PgServerLike(Protocol):
    def create_database(self, name: str | None = None) -> str: ...

    def destroy(self) -> None: ...


@dataclass
class Result:
    name: str
    throughput: float = 0.0
    latencies: list[float] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)
    lost: int = 0

    def p(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_postgresql() -> PgServerLike:
    sys.path.insert(0, str(REPO / "tests"))
    pgserver = importlib.import_module("pgserver")
    external = os.environ.get("SILO_TEST_PG_URL")
    server: PgServerLike = (
        pgserver.ExternalPg(external) if external else pgserver.PgServer(fsync=True)
    )
    return server


def libpq(url: str) -> str:
    """A SQLAlchemy psycopg URL as libpq takes it."""
    return "postgresql://" + url.split("://", 1)[1]


def _env(**values: str) -> dict[str, str]:
    env = {**os.environ, **values}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("FLASK_APP", None)
    return env


@contextmanager
def processes(commands: list[list[str]], env: dict[str, str], logs: Path) -> Iterator[None]:
    procs = []
    for index, command in enumerate(commands):
        with open(logs / f"worker-{index}-{time.monotonic_ns()}.log", "wb") as out:
            procs.append(
                subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            )
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until(what: str, probe: Callable[[], bool], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- flask_silo_sql ------------------------------------------------------------------


class Silo:
    def __init__(self, url: str, logs: Path) -> None:
        self.url = url
        self.logs = logs
        self.engine: Engine = create_engine(url)
        os.environ["SILO_DATABASE_URI"] = url
        sys.path.insert(0, str(REPO))
        from flask_silo_sql import schema
        from flask_silo_sql.sql.engine import make_engine

        migrate = make_engine(url)
        schema.upgrade(migrate)
        migrate.dispose()
        module = importlib.import_module("benchmarks.tasks_apps")
        module = importlib.reload(module)  # this configuration's database
        self.client = module.silo_app.test_client()
        self.app_module = module

    def enqueue(self) -> tuple[str, float]:
        at = time.time()
        response = self.client.post("/api/start")
        if response.status_code != 200:
            raise RuntimeError(f"start answered {response.status_code}: {response.text}")
        return response.headers["X-Session-ID"], at

    def workers(self, count: int) -> list[list[str]]:
        command = [
            sys.executable, "-m", "flask", "--app", "benchmarks.tasks_apps:silo_app",
            "silo-db", "worker", "--concurrency", "1", "--grace", "5",
        ]  # fmt: skip
        return [command] * count

    def env(self) -> dict[str, str]:
        return _env(SILO_DATABASE_URI=self.url)

    def completed(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM silo_tasks WHERE status = 'complete'")
                ).scalar_one()
            )

    def idle(self, count: int) -> bool:
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM silo_workers")).scalar_one()) >= (
                count
            )

    def span(self) -> float:
        with self.engine.connect() as conn:
            first, last = conn.execute(
                text("SELECT min(started_at), max(finished_at) FROM silo_tasks")
            ).one()
        return _seconds(last) - _seconds(first)

    def starts(self) -> dict[str, float]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT sid, started_at FROM silo_tasks"))
            return {str(r[0]): _seconds(r[1]) for r in rows}

    def reset(self) -> None:
        with self.engine.begin() as conn:
            for table in ("silo_tasks", "silo_namespaces", "silo_sessions"):
                conn.execute(text(f"DELETE FROM {table}"))

    def holder(self) -> tuple[int, int] | None:
        """(attempt, pid) of the one running run, once claimed."""
        with self.engine.connect() as conn:
            row = conn.execute(
                text("SELECT attempt, worker FROM silo_tasks WHERE status = 'running'")
            ).first()
        if row is None or row[1] is None:
            return None
        return int(row[0]), int(str(row[1]).split(":")[1])

    def started(self) -> float:
        with self.engine.connect() as conn:
            return _seconds(conn.execute(text("SELECT started_at FROM silo_tasks")).scalar_one())

    def close(self) -> None:
        self.app_module.silo.stop()
        self.engine.dispose()


def _seconds(value: Any) -> float:
    import datetime as dt

    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value).replace(tzinfo=dt.timezone.utc)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return float(value.timestamp())


# -- procrastinate ---------------------------------------------------------------------


class Procrastinate:
    def __init__(self, url: str, logs: Path) -> None:
        self.dsn = libpq(url)
        self.logs = logs
        self.engine = create_engine(url)
        os.environ["PROCRASTINATE_DSN"] = self.dsn
        module = importlib.reload(importlib.import_module("benchmarks.tasks_apps"))
        self.app = module.proc_app
        self.app.open()
        self.app.schema_manager.apply_schema()
        self.task = self.app.tasks["trivial"]

    def enqueue(self) -> tuple[str, float]:
        at = time.time()
        job = self.task.defer()
        return str(job), at

    def workers(self, count: int) -> list[list[str]]:
        command = [
            sys.executable, "-m", "procrastinate", "--app", "benchmarks.tasks_apps.proc_app",
            "worker", "--concurrency", "1",
        ]  # fmt: skip
        return [command] * count

    def env(self) -> dict[str, str]:
        return _env(PROCRASTINATE_DSN=self.dsn)

    def completed(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
                ).scalar_one()
            )

    def idle(self, count: int) -> bool:
        with self.engine.connect() as conn:
            return (
                int(conn.execute(text("SELECT count(*) FROM procrastinate_workers")).scalar_one())
                >= count
            )

    def span(self) -> float:
        with self.engine.connect() as conn:
            first = conn.execute(
                text("SELECT min(at) FROM procrastinate_events WHERE type = 'started'")
            ).scalar_one()
            last = conn.execute(
                text("SELECT max(at) FROM procrastinate_events WHERE type = 'succeeded'")
            ).scalar_one()
        return _seconds(last) - _seconds(first)

    def starts(self) -> dict[str, float]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT job_id, at FROM procrastinate_events WHERE type = 'started'")
            )
            return {str(r[0]): _seconds(r[1]) for r in rows}

    def reset(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM procrastinate_events"))
            conn.execute(text("DELETE FROM procrastinate_jobs"))

    def close(self) -> None:
        self.app.close()
        self.engine.dispose()


# -- the run ------------------------------------------------------------------------------


def measure(
    name: str, system: Silo | Procrastinate, args: argparse.Namespace, logs: Path
) -> Result:
    result = Result(name)
    for _ in range(args.tasks):
        system.enqueue()
    started = time.monotonic()
    with processes(system.workers(args.workers), system.env(), logs):
        wait_until(f"{name}: every task", lambda: system.completed() >= args.tasks)
        result.throughput = args.tasks / system.span()
        wall = time.monotonic() - started
        system.reset()
        wait_until(f"{name}: idle workers", lambda: system.idle(args.workers), 60)
        time.sleep(1.0)  # let the workers settle into their wait
        enqueued = []
        calls = []
        for _ in range(args.latency_tasks):
            called = time.perf_counter()
            enqueued.append(system.enqueue())
            calls.append(time.perf_counter() - called)
            time.sleep(args.gap)
        wait_until(f"{name}: latency tasks", lambda: system.completed() >= args.latency_tasks)
        starts = system.starts()
    if isinstance(system, Silo) and args.recovery_rounds:
        result.recoveries = recovery(system, args.recovery_rounds, logs)
    result.lost = sum(1 for key, _ in enqueued if key not in starts)
    result.latencies = [max(0.0, starts[key] - at) for key, at in enqueued if key in starts]
    print(
        f"{name}: {result.throughput:.0f} tasks/s ({args.tasks} tasks, {wall:.1f} s with start-up),"
        f" latency p50 {result.p(0.5) * 1000:.1f} ms p99 {result.p(0.99) * 1000:.1f} ms"
        f" (the enqueue call itself: median {statistics.median(calls) * 1000:.1f} ms)",
        flush=True,
    )
    return result


def recovery(system: Silo, rounds: int, logs: Path) -> list[float]:
    """Seconds from the SIGKILL of a run's worker to its next attempt's start."""
    env = {**system.env(), "SILO_TASK_HEARTBEAT_TIMEOUT": str(RECOVERY_TIMEOUT_S)}
    times = []
    for _ in range(rounds):
        system.reset()
        with processes(system.workers(2), env, logs):
            wait_until("two idle workers", lambda: system.idle(2), 60)
            response = system.client.post("/api/start-sleepy")
            assert response.status_code == 200, response.text
            wait_until("the claim", lambda: system.holder() is not None, 60)
            held = system.holder()
            assert held is not None
            os.kill(held[1], signal.SIGKILL)
            killed = time.time()
            wait_until("the next attempt", lambda: (system.holder() or (0, 0))[0] == 2, 60)
            times.append(system.started() - killed)
    system.reset()
    return times


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--latency-tasks", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--recovery-rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=CONFIGS, default=list(CONFIGS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" load average {load}"
    )
    results: list[Result] = []
    failed = False
    pg = start_postgresql() if any(c.endswith("-pg") for c in args.only) else None
    with tempfile.TemporaryDirectory(prefix="silo-tasks-bench-") as tmp:
        logs = Path(tmp)
        try:
            for name in args.only:
                system: Silo | Procrastinate
                if name == "silo-sqlite":
                    system = Silo(f"sqlite:///{logs / 'silo.db'}", logs)
                elif name == "silo-pg":
                    assert pg is not None
                    system = Silo(pg.create_database(), logs)
                else:
                    assert pg is not None
                    system = Procrastinate(pg.create_database(), logs)
                try:
                    results.append(measure(name, system, args, logs))
                except Exception as exc:
                    print(f"{name}: FAILED: {exc}")
                    for log in sorted(logs.glob("worker-*.log"))[-2:]:
                        print(log.read_text(errors="replace")[-3000:])
                    failed = True
                finally:
                    system.close()
        finally:
            if pg is not None:
                pg.destroy()
    print()
    print(
        f"| configuration | tasks/s ({args.workers} workers) | enqueue-to-start p50 | p99 |"
        f" recovery after SIGKILL (timeout {RECOVERY_TIMEOUT_S:g} s): median, max |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        recovered = (
            f"{statistics.median(r.recoveries):.2f} s, {max(r.recoveries):.2f} s"
            if r.recoveries
            else "n/a"
        )
        print(
            f"| {r.name} | {r.throughput:.0f} | {r.p(0.5) * 1000:.1f} ms |"
            f" {r.p(0.99) * 1000:.1f} ms | {recovered} |"
        )
        failed = failed or r.lost > 0
    by_name = {r.name: r for r in results}
    print()
    print("load average at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    if "silo-pg" in by_name and "procrastinate-pg" in by_name:
        ratio = by_name["silo-pg"].throughput / by_name["procrastinate-pg"].throughput
        print(f"throughput silo-pg / procrastinate-pg: {ratio:.2f} (target >= 1.0)")
    for name, target in LATENCY_TARGETS.items():
        if name in by_name:
            p99 = by_name[name].p(0.99)
            verdict = "met" if p99 <= target else "NOT met"
            print(f"{name} p99 {p99 * 1000:.1f} ms (target <= {target * 1000:.0f} ms): {verdict}")
        if name in by_name and by_name[name].recoveries:
            worst = max(by_name[name].recoveries)
            bound = RECOVERY_TIMEOUT_S + 1
            verdict = "met" if worst <= bound else "NOT met"
            print(f"{name} recovery max {worst:.2f} s (target <= {bound:g} s): {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
