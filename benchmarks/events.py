"""Live tasks: latency from the commit of ``task.update()`` to a stream's receipt, and the
queries idle streams cost.

``--streams`` sessions (200) each open one event stream on ``gunicorn -w 4 -k gthread``
serving ``tests/apps/events_app.py``; this process (another process of the same app, on
the same database) runs one plain task per session whose target calls ``task.update()``
``--updates`` times, a random 0.2 to 1 s apart, putting the time just before the call in
the update's message, and notes when the call returned (with no coalescing, its write is
committed then). A stream's reader notes when the event arrives. Reported as p50, p95 and
p99 over every update, per database: from the commit (the call's return) to the receipt,
and from the call (the write included) to the receipt. Then the same updates again, seen
by clients that poll ``GET /api/status`` every 300 ms (the data processor page's
fallback) instead of streaming: from the call to the first poll that shows it.

**Idle**: the same streams stay open with nothing happening for ``--idle`` seconds; on
PostgreSQL the database's committed transactions over that time (``pg_stat_database``;
every statement of a reader is one) give the query rate, against the target of one
query per process per poll interval (``SILO_STREAM_POLL_INTERVAL``). The count includes
the server's own background transactions (autovacuum after the writes), so it is an upper
bound; ``tests/test_events.py`` counts a reader's statements at the executor seam.

Targets (from the issue): p95 <= 100 ms on PostgreSQL, <= 250 ms on SQLite. PostgreSQL
is a private server started for the run (``tests/pgserver.py``), or the one named by
``SILO_TEST_PG_URL``. Run: ``python benchmarks/events.py [--streams N] [--updates N]
[--idle S] [--only sqlite|postgresql]``; needs ``pip install -e ".[postgres,dev]"``.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# benchmarks/requests.py would shadow the requests package when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]

import requests  # noqa: E402

APPS = REPO / "tests" / "apps"
WORKERS = 4
THREADS = 128
TARGETS = {"postgresql": 0.100, "sqlite": 0.250}
POLL_S = 0.3
"""The data processor page's polling interval."""
SECRET = "benchmark-secret"  # noqa: S105 (signs this run's stream tokens only)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def served(env: dict[str, str], log: Path) -> Iterator[str]:
    port = 20000 + random.randrange(20000)
    full = {**os.environ, **env, "PYTHONPATH": f"{REPO}{os.pathsep}{APPS}"}
    cmd = [
        sys.executable, "-m", "gunicorn", "--chdir", str(APPS), "-w", str(WORKERS),
        "-k", "gthread", "--threads", str(THREADS), "-b", f"127.0.0.1:{port}",
        "--graceful-timeout", "2", "--log-level", "warning", "events_app:app",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=full, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"gunicorn did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Reader(threading.Thread):
    """One EventSource: notes each progress event's arrival against the time it carries."""

    def __init__(self, base: str, sid: str) -> None:
        super().__init__(daemon=True)
        reply = requests.post(base + "/api/token", headers={"X-Session-ID": sid}, timeout=30)
        token = reply.json()
        self.response = requests.get(
            f"{base}/events?token={token['token']}&last_event_id={token['last_event_id']}",
            stream=True,
            timeout=120,
        )
        assert self.response.status_code == 200, self.response.text
        self.latencies: list[float] = []
        """From just before the update() call (its write included)."""
        self.arrivals: dict[str, float] = {}
        """Each update's arrival, by its message."""

    def run(self) -> None:
        try:
            kind = ""
            for line in self.response.iter_lines(decode_unicode=True):
                if line and line.startswith("event: "):
                    kind = line[7:]
                elif line and line.startswith("data: ") and kind == "progress":
                    arrived = time.time()
                    message = json.loads(line[6:]).get("message", "")
                    if message.startswith("t="):
                        self.latencies.append(arrived - float(message[2:]))
                        self.arrivals[message] = arrived
        except (requests.RequestException, AttributeError, ValueError):
            pass  # closed by the benchmark


class Poller(threading.Thread):
    """A client without EventSource: ``GET /api/status`` every ``POLL_S`` (the example's)."""

    def __init__(self, base: str, sid: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url = base + "/api/status"
        self.headers = {"X-Session-ID": sid}
        self.stop = stop
        self.arrivals: dict[str, float] = {}
        self.requests = 0

    def run(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            try:
                message = session.get(self.url, headers=self.headers, timeout=30).json()
                self.requests += 1
            except (requests.RequestException, ValueError):
                continue
            text = message.get("task", {}).get("message", "")
            if text.startswith("t=") and text not in self.arrivals:
                self.arrivals[text] = time.time()
            self.stop.wait(POLL_S)


def updates(app_module: Any, sids: list[str], count: int) -> tuple[dict[str, float], int]:
    """One task per session, each calling update() *count* times, 0.2 to 1 s apart; when
    each update() returned (its write committed: no coalescing), by its message; and how
    many tasks could not be started (the database too busy)."""
    silo = app_module.silo
    committed: dict[str, float] = {}
    lock = threading.Lock()
    running = [0]
    starting = [True]
    finished = threading.Event()

    def one_less() -> None:
        with lock:
            running[0] -= 1
            if running[0] == 0 and not starting[0]:
                finished.set()

    def work(task: Any) -> None:
        try:
            for step in range(count):
                time.sleep(random.uniform(0.2, 1.0))
                message = f"t={time.time():.6f}"
                task.update(progress=step, message=message)
                committed[message] = time.time()
        finally:
            one_less()

    failed = 0
    for n, sid in enumerate(sids):
        with lock:
            running[0] += 1
        try:
            with silo.session(sid) as state:
                state["job"]["task"].start(work)
        except Exception as exc:
            failed += 1
            print(f"  could not start a task: {exc}", file=sys.stderr, flush=True)
            one_less()
        if n % 50 == 49:
            print(f"  {n + 1} tasks started", file=sys.stderr, flush=True)
    with lock:
        starting[0] = False
        if running[0] == 0:
            finished.set()
    finished.wait(timeout=count * 2 + 120)
    return committed, failed


def pg_commits(url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT xact_commit FROM pg_stat_database"
                        " WHERE datname = current_database()"
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


def run(
    name: str, url: str, streams: int, count: int, idle: float, tmp: Path, polling: bool
) -> dict[str, Any]:
    from sqlalchemy import create_engine

    from flask_silo_sql import schema

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    schema.upgrade(engine)
    engine.dispose()
    poll = 1.0 if name == "postgresql" else 0.1
    env = {
        "SILO_DATABASE_URI": url,
        "SECRET_KEY": SECRET,
        "SILO_TASK_FLUSH_INTERVAL": "0",
        "SILO_TASK_RUNNER": '"worker"',
        "SILO_STREAMS_PER_PROCESS": str(THREADS - 4),
        "SILO_STREAM_HEARTBEAT": "15",
    }
    os.environ.update(env)
    sys.path[:0] = [str(REPO), str(APPS)]
    app_module = importlib.import_module("events_app")
    sids = [f"bench-events-{name}-{i:05d}-session" for i in range(streams)]
    with served(env, tmp / f"gunicorn-{name}.log") as base:
        readers = []
        for n, sid in enumerate(sids):
            readers.append(Reader(base, sid))
            if n % 50 == 49:
                print(f"  {n + 1} streams open", file=sys.stderr, flush=True)
        for reader in readers:
            reader.start()
        time.sleep(1.0)
        started = time.monotonic()
        committed, failed = updates(app_module, sids, count)
        busy = time.monotonic() - started
        time.sleep(2.0)  # the last events arrive, the tasks' final writes are made
        latencies = [x for r in readers for x in r.latencies]
        after = [
            arrived - committed[m] for r in readers for m, arrived in r.arrivals.items()
            if m in committed
        ]
        result: dict[str, Any] = {
            "name": name,
            "streams": streams,
            "updates": streams * count,
            "received": len(latencies),
            "p50_ms": 1000 * percentile(latencies, 0.50),
            "p95_ms": 1000 * percentile(latencies, 0.95),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "mean_ms": 1000 * statistics.fmean(latencies),
            "after_p50_ms": 1000 * percentile(after, 0.50),
            "after_p95_ms": 1000 * percentile(after, 0.95),
            "after_p99_ms": 1000 * percentile(after, 0.99),
            "seconds": busy,
            "failed_starts": failed,
        }
        if name == "postgresql" and idle > 0:
            time.sleep(3.0)  # nothing left in flight
            first = pg_commits(url)
            time.sleep(idle)
            last = pg_commits(url)
            per_process = (last - first - 1) / idle / WORKERS
            result["idle_queries_per_process_per_s"] = per_process
            result["idle_target_per_process_per_s"] = 1 / poll
        if polling:  # the same updates, seen by clients polling /api/status instead
            stop = threading.Event()
            pollers = [Poller(base, sid, stop) for sid in sids]
            for poller in pollers:
                poller.start()
            time.sleep(1.0)
            started = time.monotonic()
            committed, poll_failed = updates(app_module, sids, count)
            seconds = time.monotonic() - started
            time.sleep(2.0)
            stop.set()
            seen = [
                arrived - float(m[2:]) for p in pollers for m, arrived in p.arrivals.items()
                if m in committed
            ]
            result["poll_seen"] = len(seen)
            result["poll_failed_starts"] = poll_failed
            result["poll_p50_ms"] = 1000 * percentile(seen, 0.50)
            result["poll_p95_ms"] = 1000 * percentile(seen, 0.95)
            result["poll_p99_ms"] = 1000 * percentile(seen, 0.99)
            result["poll_requests_per_s"] = sum(p.requests for p in pollers) / (seconds + 3.0)
        # (The readers end with the server: closing a response another thread reads blocks.)
    app_module.silo.stop()
    sys.modules.pop("events_app", None)
    return result


def main(argv: list[str] | None = None) -> int:
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: every thread's stack
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--only", choices=("sqlite", "postgresql"), action="append")
    parser.add_argument("--no-polling", action="store_true", help="skip the polling baseline")
    args = parser.parse_args(argv)
    names = args.only or ["sqlite", "postgresql"]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for name in names:
            server = None
            if name == "sqlite":
                url = f"sqlite:///{tmp / 'events.db'}"
            else:
                sys.path.insert(0, str(REPO / "tests"))
                pgserver = importlib.import_module("pgserver")
                external = os.environ.get("SILO_TEST_PG_URL")
                server = (
                    pgserver.ExternalPg(external) if external else pgserver.PgServer(fsync=True)
                )
                url = server.create_database()
            try:
                results.append(
                    run(name, url, args.streams, args.updates, args.idle, tmp, not args.no_polling)
                )
            finally:
                if server is not None:
                    server.destroy()
    for r in results:
        verdict = "met" if r["after_p95_ms"] / 1000 <= TARGETS[r["name"]] else "MISSED"
        print(
            f"{r['name']:>10}: {r['streams']} streams, {r['failed_starts']} tasks not started, "
            f"{r['received']}/{r['updates']} updates received"
        )
        print(
            f"{'':>10}  commit (update() returned) -> receipt: p50 {r['after_p50_ms']:.0f} ms, "
            f"p95 {r['after_p95_ms']:.0f} ms, p99 {r['after_p99_ms']:.0f} ms (target p95 <= "
            f"{TARGETS[r['name']] * 1000:.0f} ms: {verdict})"
        )
        print(
            f"{'':>10}  update() called -> receipt (its write included): p50 "
            f"{r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms"
        )
        if "poll_p95_ms" in r:
            print(
                f"{'':>10}  polling GET /api/status every {POLL_S * 1000:.0f} ms instead: "
                f"{r['poll_seen']} seen, {r['poll_failed_starts']} tasks not started; "
                f"p50 {r['poll_p50_ms']:.0f} ms, p95 "
                f"{r['poll_p95_ms']:.0f} ms, p99 {r['poll_p99_ms']:.0f} ms, "
                f"{r['poll_requests_per_s']:.0f} requests/s"
            )
        if "idle_queries_per_process_per_s" in r:
            print(
                f"{'':>10}  idle: {r['idle_queries_per_process_per_s']:.2f} queries per "
                f"process per second (target <= {r['idle_target_per_process_per_s']:.2f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
