"""Throughput under gunicorn: flask_silo_sql against bare Flask, flask-silo+Redis, Flask-Session.

Every configuration serves the same counter endpoint, ``POST /api/count``
(increment a counter in the client's state, answer it as JSON), from
``benchmarks/throughput_apps.py`` under ``gunicorn -w 4`` (sync workers), and
``wrk`` drives it on loopback with 16 connections over 128 client sessions:

* ``bare``: bare Flask, the counter in a module-level dict in each worker (no
  state shared between workers, nothing durable): the floor;
* ``flask-silo-redis``: flask-silo 0.1.6 with its ``RedisStorage`` on a private
  ``redis-server`` with Redis' built-in defaults (RDB snapshots, no AOF);
* ``flask-silo-redis-fsync``: the same with ``appendonly yes`` and
  ``appendfsync always`` (every write flushed to disk before Redis answers);
* ``flask-session-pg``: Flask-Session 0.8, SQLAlchemy backend, on PostgreSQL
  (the session ID in its cookie);
* ``silo-sql-sqlite``: flask_silo_sql, ``Silo(app)`` with ``SILO_DATABASE_URI``
  naming an SQLite file, migrated before the workers start;
* ``silo-sql-pg``: the same on PostgreSQL.

PostgreSQL is a private server started for the run with ``fsync=on`` and
``synchronous_commit=on`` (``tests/pgserver.py``), or the server named by
``SILO_TEST_PG_URL``; each configuration gets its own database. Every silo app
keeps its defaults (``auto_cleanup=True``: a cleanup thread in each worker).

Each wrk connection is one client owning ``sessions / connections`` of the
sessions (``X-Session-ID`` header; for Flask-Session the matching cookie), and
sends its requests one after another, cycling through them, so no session ever
has two requests in flight (as for a real client). wrk runs one thread per
connection, with a Lua script (generated per configuration) that formats the
requests, counts non-2xx answers and prints one machine-readable line: request
count, duration and latency percentiles (p50, p99: wrk's own histogram; the
``--latency`` distribution printed by wrk is parsed too, shown with
``--verbose``). All sessions are created before timing (one request each, then a
``--warmup`` run of wrk), so every configuration is measured in steady state.
Rounds are interleaved across the configurations (the order rotates each round);
the table gives the median rps over rounds with its min-max, and the median p50
and p99 latency. rps counts 2xx answers only. Other load on the machine shows in
how busy the CPUs were just before the start (over one second) and in the
1-minute load average printed with every round (which counts the benchmark's
own processes too); the target ratios are also given round by round (both
configurations measured in the same round), which drift between rounds affects
less.

Correctness, after every round: no non-2xx answer, and on the configurations that
share state between workers, the sum of the 128 counters (read back through
``GET /api/count/value`` once the sum has settled) grew by at least the number
of 2xx answers wrk saw (no lost increment) and by at most that plus the requests
possibly in flight when wrk stopped; on bare Flask, some counter is above zero.

Targets: flask_silo_sql on PostgreSQL serves at least 1.0 x the rps of flask-silo
on Redis (default config), and on SQLite at least 1.2 x (PostgreSQL with
``SILO_PREPARED_STATEMENTS`` and with ``synchronous_commit=off`` are reported beside them,
with no target). The exit status is 0
whatever the verdicts (this is a report), 1 when a configuration answered
wrongly or did not start. wrk, redis-server and gunicorn are not installed by
the benchmark: ``apt-get install wrk redis-server`` and ``pip install -e
".[postgres,dev,bench]" redis``.

``--server-cpus 1`` pins the database servers to CPU 1 and gunicorn and wrk to the
others, as when the database has a machine of its own: the ratios then compare what a
request costs the app's processes, not the database server's share of the same CPUs.

Run: ``python benchmarks/throughput.py [--duration S] [--rounds R] [--connections C]
[--sessions N] [--workers W] [--warmup S] [--only NAME ...] [--verbose]
[--server-cpus LIST]``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
APPS_MODULE = "benchmarks.throughput_apps:app"
HEADER = "X-Session-ID"
COOKIE = "session"  # Flask-Session's default SESSION_COOKIE_NAME
COUNT_PATH = "/api/count"
VALUE_PATH = "/api/count/value"
RESULT_MARK = "THROUGHPUT-RESULT "
SAFE_TOKEN = re.compile(r"[A-Za-z0-9_.\-]+")
INSTALL_HINT = "apt-get install wrk redis-server"

PG_TARGET = 1.0
SQLITE_TARGET = 1.2


class BenchError(RuntimeError):
    """A configuration answered wrongly (or did not start): its numbers would mean nothing."""


class MissingTool(RuntimeError):
    """A program the benchmark needs is not installed."""


class PgServerLike(Protocol):
    """What the benchmark uses of ``tests/pgserver.py``'s servers."""

    def create_database(self, name: str | None = None) -> str: ...

    def destroy(self) -> None: ...


@dataclass(frozen=True)
class Config:
    """One configuration: which app, on what."""

    name: str
    title: str
    app: str
    """``THROUGHPUT_APP`` of :mod:`benchmarks.throughput_apps`."""
    backend: str | None
    """``redis``, ``redis-fsync``, ``postgresql``, ``sqlite`` or None."""
    cookie: bool = False
    """The session ID travels in Flask-Session's cookie rather than the header."""
    shared: bool = True
    """All workers see the same state: the counters can be summed and checked."""


CONFIGS = (
    Config("bare", "bare Flask (dict per worker, not durable)", "bare", None, shared=False),
    Config("flask-silo-redis", "flask-silo 0.1.6 + Redis (default config)",
           "flask_silo_redis", "redis"),
    Config("flask-silo-redis-fsync", "flask-silo 0.1.6 + Redis (appendfsync always)",
           "flask_silo_redis", "redis-fsync"),
    Config("flask-session-pg", "Flask-Session 0.8 (SQLAlchemy) + PostgreSQL",
           "flask_session", "postgresql", cookie=True),
    Config("silo-sql-sqlite", "flask_silo_sql + SQLite", "silo_sql", "sqlite"),
    Config("silo-sql-pg", "flask_silo_sql + PostgreSQL", "silo_sql", "postgresql"),
    Config("silo-sql-pg-prepared", "flask_silo_sql + PostgreSQL, SILO_PREPARED_STATEMENTS",
           "silo_sql", "postgresql-prepared"),
    Config("silo-sql-pg-async", "flask_silo_sql + PostgreSQL, synchronous_commit=off",
           "silo_sql", "postgresql-async"),
)
NAMED_CHOICES = {
    "postgresql-prepared": {"SILO_PREPARED_STATEMENTS": True},
    "postgresql-async": {"SILO_ENGINE_OPTIONS": {
        "connect_args": {"options": "-c synchronous_commit=off"}}},
}
"""Settings of the configurations measured beside the default (a documented choice each)."""
NAMES = tuple(c.name for c in CONFIGS)
REFERENCE = "flask-silo-redis"


@dataclass(frozen=True)
class Client:
    """One client session: its ``X-Session-ID`` and, for Flask-Session, its cookie."""

    sid: str
    cookie: str | None = None

    def headers(self) -> dict[str, str]:
        if self.cookie is not None:
            return {"Cookie": f"{COOKIE}={self.cookie}"}
        return {HEADER: self.sid}


@dataclass
class WrkResult:
    """One wrk run, from the Lua script's result line (and wrk's ``--latency`` table)."""

    requests: int
    duration_s: float
    non2xx: int
    statuses: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: dict[str, int]
    distribution: dict[str, float]
    """wrk's ``--latency`` table: percentile label to milliseconds."""
    load: float = 0.0
    """The 1-minute load average when the run ended."""

    @property
    def ok(self) -> int:
        return self.requests - self.non2xx

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s

    @property
    def socket_error_count(self) -> int:
        return sum(self.socket_errors.values())


@dataclass
class Run:
    """A configuration being measured: its server, clients and results."""

    config: Config
    base: str
    clients: list[Client] = field(default_factory=list)
    script: Path | None = None
    total: int = 0
    """Sum of the counters after the last check."""
    results: list[WrkResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: Path | None = None
    """gunicorn's log (workers' stderr included)."""

    @property
    def measured(self) -> bool:
        return bool(self.results)

    def rps(self) -> float:
        return statistics.median(r.rps for r in self.results)


# -- tools and processes ---------------------------------------------------------


def require_tools(configs: list[Config]) -> None:
    """Fail with one line naming the first missing tool and how to get it."""
    if shutil.which("wrk") is None:
        raise MissingTool(f"wrk not found on PATH; install it with: {INSTALL_HINT}")
    redis = any(c.backend in ("redis", "redis-fsync") for c in configs)
    if redis and shutil.which("redis-server") is None:
        raise MissingTool(f"redis-server not found on PATH; install it with: {INSTALL_HINT}")
    if importlib.util.find_spec("gunicorn") is None:
        raise MissingTool(f"gunicorn not importable by {sys.executable}; install it with: "
                          "pip install gunicorn (it is in the dev extra)")
    if redis and importlib.util.find_spec("redis") is None:
        raise MissingTool(f"the redis Python client is not importable by {sys.executable}; "
                          "install it with: pip install redis")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(what: str, probe: Callable[[], bool], timeout: float,
             alive: Callable[[], str | None] = lambda: None) -> None:
    """Poll *probe* until true; fail after *timeout* or when *alive* reports a death."""
    deadline = time.monotonic() + timeout
    while not probe():
        died = alive()
        if died is not None:
            raise BenchError(f"{what}: {died}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class Process:
    """A child in its own process group (Ctrl-C does not reach it); stopped by :meth:`stop`."""

    def __init__(self, name: str, cmd: list[str], log: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=cwd, start_new_session=True)

    def died(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of the group we started
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)


def start_redis(tmp: Path, fsync: bool) -> tuple[Process, str, str]:
    """A private redis-server on a free loopback port: its process, URL and settings."""
    import redis

    name = "redis-fsync" if fsync else "redis"
    directory = tmp / name
    directory.mkdir()
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
           "--daemonize", "no"]
    if fsync:
        cmd += ["--appendonly", "yes", "--appendfsync", "always"]
    proc = Process(name, cmd, directory / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=2)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_for(f"{name} on port {port}", answers, 30, proc.died)
        settings: dict[Any, Any] = client.config_get("appendonly", "appendfsync", "save")
        info: dict[str, Any] = client.info("server")
    except BaseException:
        proc.stop()
        raise
    finally:
        client.close()
    described = (f"Redis {info.get('redis_version', '?')}: appendonly {settings['appendonly']}, "
                 f"appendfsync {settings['appendfsync']}, save \"{settings['save']}\"")
    return proc, url, described


def start_postgresql() -> PgServerLike:
    """A private server with fsync on, or the one named by ``SILO_TEST_PG_URL``."""
    sys.path.insert(0, str(REPO / "tests"))
    pgserver = importlib.import_module("pgserver")
    external = os.environ.get("SILO_TEST_PG_URL")
    server: PgServerLike = (
        pgserver.ExternalPg(external) if external else pgserver.PgServer(fsync=True)
    )
    return server


def postgresql_version(url: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SHOW server_version")).scalar_one()).split()[0]
    finally:
        engine.dispose()


def prepare_database(config: Config, url: str) -> None:
    """Create the app's tables before the workers start (so they do not race to)."""
    if config.app == "silo_sql":
        from flask_silo_sql import schema
        from flask_silo_sql.sql.engine import make_engine

        engine = make_engine(url)
        try:
            schema.upgrade(engine)
        finally:
            engine.dispose()
    elif config.app == "flask_session":
        apps = importlib.import_module("benchmarks.throughput_apps")
        app = apps.flask_session_app(url)  # creates the table, like every worker would
        with app.app_context():
            app.extensions["sqlalchemy"].engine.dispose()


def control_socket_options() -> list[str]:
    """``--no-control-socket`` on gunicorn >= 24, which keeps concurrent servers apart."""
    done = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    return ["--no-control-socket"] if "--no-control-socket" in done.stdout else []


def start_gunicorn(config: Config, env: dict[str, str], workers: int, tmp: Path,
                   extra: list[str]) -> tuple[Process, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-k", "sync",
           "-b", f"127.0.0.1:{port}", *extra, APPS_MODULE]
    full_env = {**os.environ, **env, "THROUGHPUT_APP": config.app}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    proc = Process(f"gunicorn ({config.name})", cmd, tmp / f"gunicorn-{config.name}.log",
                   env=full_env, cwd=REPO)
    base = f"127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return http_request(base, "GET", "/health", {})[0] == 200
        except OSError:
            return False

    try:
        wait_for(f"gunicorn ({config.name}) to answer", healthy, 60, proc.died)
    except BaseException:
        proc.stop()
        raise
    return proc, base


# -- HTTP ------------------------------------------------------------------------------


def http_request(base: str, method: str, path: str, headers: dict[str, str]
                 ) -> tuple[int, http.client.HTTPMessage, bytes]:
    host, port = base.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None, headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def counter_of(body: bytes) -> int:
    value = json.loads(body)["n"]
    if not isinstance(value, int):
        raise BenchError(f"counter is not an integer: {body!r}")
    return value


def create_sessions(run: Run, count: int) -> None:
    """One ``POST /api/count`` per client session, so that all exist before timing."""
    for _ in range(count):
        sid = secrets.token_urlsafe(24)
        if run.config.cookie:  # Flask-Session issues its own ID: keep the one it set
            status, headers, body = http_request(run.base, "POST", COUNT_PATH, {})
            cookies = [v for v in headers.get_all("Set-Cookie") or []
                       if v.startswith(f"{COOKIE}=")]
            if not cookies:
                raise BenchError(f"{run.config.name}: no {COOKIE} cookie set: {headers}")
            client = Client(sid, cookies[0].split(";", 1)[0].split("=", 1)[1])
        else:
            client = Client(sid)
            status, _, body = http_request(run.base, "POST", COUNT_PATH, client.headers())
        if status != 200 or counter_of(body) != 1:
            raise BenchError(f"{run.config.name}: creating a session answered {status} "
                             f"{body[:200]!r}, expected 200 with n=1")
        if not SAFE_TOKEN.fullmatch(client.sid + (client.cookie or "")):
            raise BenchError(f"{run.config.name}: unexpected characters in {client}")
        run.clients.append(client)


def settled_counters(run: Run, attempts: int = 10, pause: float = 0.2) -> list[int]:
    """The counters once their sum stops moving.

    When wrk stops, each connection may leave one request in flight, which a
    worker still completes; reading only after that keeps every increment in
    the round that made it.
    """
    values = read_counters(run)
    for _ in range(attempts):
        time.sleep(pause)
        again = read_counters(run)
        if sum(again) == sum(values):
            return again
        values = again
    return values


def read_counters(run: Run) -> list[int]:
    values = []
    for client in run.clients:
        status, _, body = http_request(run.base, "GET", VALUE_PATH, client.headers())
        if status != 200:
            raise BenchError(f"{run.config.name}: {VALUE_PATH} answered {status} "
                             f"{body[:200]!r}")
        values.append(counter_of(body))
    return values


# -- wrk ---------------------------------------------------------------------------------

LUA_TEMPLATE = r"""-- generated by benchmarks/throughput.py for one configuration
local clients = {
%(clients)s
}
local connections = %(connections)d
local threads = {}
local next_id = 0

-- wrk runs one thread per connection: thread `id` owns clients id+1, id+1+connections, ...
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  mine = {}
  for i = id + 1, #clients, connections do
    local sid, cookie = clients[i][1], clients[i][2]
    local headers = {}
    if cookie ~= "" then
      headers["Cookie"] = "%(cookie)s=" .. cookie
    else
      headers["%(header)s"] = sid
    end
    table.insert(mine, wrk.format("POST", "%(path)s", headers, ""))
  end
  turn = 0
  non2xx = 0
  statuses = {}
end

function request()
  turn = turn %% #mine + 1
  return mine[turn]
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    local key = tostring(status)
    statuses[key] = (statuses[key] or 0) + 1
  end
end

function done(summary, latency, requests)
  local total, merged, parts = 0, {}, {}
  for _, thread in ipairs(threads) do
    total = total + thread:get("non2xx")
    for key, n in pairs(thread:get("statuses")) do
      merged[key] = (merged[key] or 0) + n
    end
  end
  for key, n in pairs(merged) do
    table.insert(parts, string.format('"%%s":%%d', key, n))
  end
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"non2xx":%%d,"statuses":{%%s},' ..
    '"p50_us":%%d,"p99_us":%%d,"max_us":%%d,' ..
    '"connect":%%d,"read":%%d,"write":%%d,"timeout":%%d}\n',
    summary.requests, summary.duration, total, table.concat(parts, ","),
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.timeout))
end
"""


def write_script(run: Run, connections: int, tmp: Path) -> Path:
    rows = ",\n".join(f'  {{"{c.sid}", "{c.cookie or ""}"}}' for c in run.clients)
    script = tmp / f"wrk-{run.config.name}.lua"
    script.write_text(LUA_TEMPLATE % {
        "clients": rows, "connections": connections, "cookie": COOKIE, "header": HEADER,
        "path": COUNT_PATH, "mark": RESULT_MARK,
    })
    return script


DISTRIBUTION_LINE = re.compile(r"^\s+(\d+(?:\.\d+)?%)\s+([\d.]+)(us|ms|s)\s*$")
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(run: Run, duration: int, connections: int) -> WrkResult:
    assert run.script is not None
    cmd = ["wrk", "-t", str(connections), "-c", str(connections), "-d", f"{duration}s",
           "--timeout", "30s", "--latency", "-s", str(run.script), f"http://{run.base}/"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120,
                          check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise BenchError(f"{run.config.name}: wrk failed (status {done.returncode}):\n"
                         f"{done.stdout}{done.stderr}")
    data = json.loads(lines[-1][len(RESULT_MARK):])
    distribution = {}
    for line in done.stdout.splitlines():
        match = DISTRIBUTION_LINE.match(line)
        if match:
            distribution[match[1]] = float(match[2]) * UNIT_MS[match[3]]
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        non2xx=int(data["non2xx"]),
        statuses={str(k): int(v) for k, v in data["statuses"].items()},
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        socket_errors={k: int(data[k]) for k in ("connect", "read", "write", "timeout")
                       if int(data[k])},
        distribution=distribution,
        load=os.getloadavg()[0],
    )


# -- measuring -----------------------------------------------------------------------------


def check(run: Run, result: WrkResult, connections: int, what: str) -> None:
    """Record what is wrong with *result* and the counters after it in ``run.problems``."""
    if result.non2xx:
        codes = ", ".join(f"{n} x {code}" for code, n in sorted(result.statuses.items()))
        run.problems.append(f"{what}: {result.non2xx} non-2xx answers ({codes})")
    if result.socket_error_count:
        run.notes.append(f"{what}: socket errors {result.socket_errors}")
    try:
        values = settled_counters(run) if run.config.shared else read_counters(run)
    except (BenchError, OSError, ValueError, KeyError) as exc:
        run.problems.append(f"{what}: reading the counters failed: {exc}")
        return
    total = sum(values)
    if not run.config.shared:
        if max(values) <= 0:
            run.problems.append(f"{what}: every counter read back is 0")
        return
    if min(values) <= 0:
        run.problems.append(f"{what}: {values.count(0)} sessions read back 0 (lost?)")
    grew = total - run.total
    run.total = total
    # Requests in flight when wrk stopped (one per connection) were served without
    # being counted by wrk; so may have been requests whose connection failed.
    slack = connections + result.socket_error_count
    if grew < result.ok:
        run.problems.append(f"{what}: {result.ok} answers 2xx but the counters grew by "
                            f"{grew} ({result.ok - grew} increments lost)")
    elif grew > result.requests + slack:
        run.problems.append(f"{what}: counters grew by {grew}, more than the {result.requests} "
                            f"requests wrk counted (+{slack} possibly uncounted)")


def warm_up(run: Run, args: argparse.Namespace, tmp: Path) -> None:
    create_sessions(run, args.sessions)
    run.script = write_script(run, args.connections, tmp)
    run.total = sum(read_counters(run))
    if args.warmup > 0:
        result = run_wrk(run, args.warmup, args.connections)
        check(run, result, args.connections, "warm-up")


def measure(runs: list[Run], args: argparse.Namespace) -> None:
    active = list(runs)
    for number in range(args.rounds):
        shift = number % len(active) if active else 0
        for run in active[shift:] + active[:shift]:  # a rotating order, for drift
            try:
                result = run_wrk(run, args.duration, args.connections)
            except BenchError as exc:
                run.problems.append(f"round {number + 1}: {exc}")
                active.remove(run)
                continue
            run.results.append(result)
            check(run, result, args.connections, f"round {number + 1}")
            print(f"  round {number + 1}/{args.rounds}  {run.config.name:<24} "
                  f"{result.rps:8.0f} rps  p50 {result.p50_ms:6.1f} ms  "
                  f"p99 {result.p99_ms:6.1f} ms  load {result.load:.2f}"
                  + (f"  non-2xx {result.non2xx}" if result.non2xx else ""), flush=True)


# -- report --------------------------------------------------------------------------------


def ratio(runs: dict[str, Run], name: str, reference: str = REFERENCE) -> float | None:
    ours, ref = runs.get(name), runs.get(reference)
    if ours is None or ref is None or not ours.measured or not ref.measured or not ref.rps():
        return None
    return ours.rps() / ref.rps()


def paired_ratios(runs: dict[str, Run], name: str, reference: str = REFERENCE) -> list[float]:
    """*name*'s rps over the reference's, round by round (both measured in each round)."""
    ours, ref = runs.get(name), runs.get(reference)
    if ours is None or ref is None or len(ours.results) != len(ref.results):
        return []
    return [a.rps / b.rps for a, b in zip(ours.results, ref.results, strict=True) if b.rps]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                          strict=True)]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + [
        "-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return [line(header), rule, *[line(r) for r in rows]]


LOG_NOISE = re.compile(r"\[INFO\]|Flask-Silo initialised")


def log_findings(run: Run, shown: int = 3) -> str | None:
    """What gunicorn's log holds besides its routine lines (errors, warnings, tracebacks)."""
    if run.log is None:
        return None
    try:
        lines = run.log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    unusual = [ln for ln in lines if ln.strip() and not LOG_NOISE.search(ln)]
    if not unusual:
        return None
    tracebacks = sum(ln.startswith("Traceback") for ln in unusual)
    first = sorted(set(unusual), key=unusual.index)[:shown]
    return (f"gunicorn log has {len(unusual)} unusual line(s), {tracebacks} traceback(s); "
            "first: " + " / ".join(ln.strip()[:160] for ln in first))


def report(runs: list[Run], args: argparse.Namespace, setup: list[str],
           load_before: float) -> None:
    by_name = {r.config.name: r for r in runs}
    header = ["configuration", "rps (median)", "rps (min-max)", "p50 ms", "p99 ms",
              "rps / flask-silo+Redis", "non-2xx", "socket errors"]
    rows = []
    for run in runs:
        if not run.measured:
            rows.append([run.config.title, "not measured", "", "", "", "", "", ""])
            continue
        rel = ratio(by_name, run.config.name)
        rps = [r.rps for r in run.results]
        rows.append([
            run.config.title,
            f"{run.rps():.0f}",
            f"{min(rps):.0f}-{max(rps):.0f}",
            f"{statistics.median(r.p50_ms for r in run.results):.1f}",
            f"{statistics.median(r.p99_ms for r in run.results):.1f}",
            f"{rel:.2f}" if rel is not None else "",
            str(sum(r.non2xx for r in run.results)),
            str(sum(r.socket_error_count for r in run.results)),
        ])
    print()
    print(f"Throughput, median of {args.rounds} interleaved rounds x {args.duration} s: "
          f"gunicorn -w {args.workers} (sync), wrk -t {args.connections} "
          f"-c {args.connections}, {args.sessions} sessions, POST {COUNT_PATH}")
    print(", ".join([*setup, f"{os.cpu_count()} CPUs, load average {load_before:.2f} before / "
                     f"{os.getloadavg()[0]:.2f} after"]))
    print()
    for line in markdown_table(header, rows):
        print(line)
    print()
    print("rps counts 2xx answers; p50 and p99 are medians over rounds of wrk's percentiles. "
          "Per round: the ratio of the rps measured in the same round.")
    if args.verbose:
        print()
        print("Rounds:")
        for run in runs:
            print(f"  {run.config.name}")
            for number, r in enumerate(run.results, 1):
                dist = " ".join(f"{k} {v:.2f}" for k, v in r.distribution.items())
                print(f"    {number}: {r.requests} requests in {r.duration_s:.2f} s, "
                      f"{r.rps:.0f} rps, p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f} "
                      f"max {r.max_ms:.1f} ms, load {r.load:.2f}; wrk --latency: {dist}")
    print()
    print("Targets:")
    for name, db, target in (("silo-sql-pg", "PostgreSQL", PG_TARGET),
                             ("silo-sql-sqlite", "SQLite", SQLITE_TARGET)):
        value = ratio(by_name, name)
        what = f"flask_silo_sql on {db} rps / flask-silo+Redis (default) rps"
        if value is None:
            print(f"  ------ {what:<66}  not measured (target >= {target:g})")
        else:
            mark = "MET   " if value >= target else "MISSED"
            paired = paired_ratios(by_name, name)
            same_round = (f"; per round {min(paired):.2f}-{max(paired):.2f}, median "
                          f"{statistics.median(paired):.2f}" if paired else "")
            print(f"  {mark} {what:<66} {value:5.2f}  (target >= {target:g}{same_round})")
    for name in ("silo-sql-pg-prepared", "silo-sql-pg-async"):
        value = ratio(by_name, name)
        paired = paired_ratios(by_name, name)
        if value is not None and paired:
            what = f"{name} rps / flask-silo+Redis (default) rps (a named choice)"
            print(f"  ------ {what:<66} {value:5.2f}  (per round {min(paired):.2f}-"
                  f"{max(paired):.2f}, median {statistics.median(paired):.2f})")
    durable = "flask-silo-redis-fsync"
    for name in ("silo-sql-pg", "silo-sql-sqlite"):
        value = ratio(by_name, name, durable)
        paired = paired_ratios(by_name, name, durable)
        if value is not None and paired:
            what = f"{name} rps / flask-silo+Redis (fsync always) rps (as durable)"
            print(f"  ------ {what:<66} {value:5.2f}  (per round {min(paired):.2f}-"
                  f"{max(paired):.2f}, median {statistics.median(paired):.2f})")
    for run in runs:
        findings = log_findings(run)
        for note in [*run.notes, *([findings] if findings else [])]:
            print(f"NOTE: {run.config.name}: {note}")
    failures = [(run.config.name, p) for run in runs for p in run.problems]
    for name, problem in failures:
        print(f"WRONG: {name}: {problem}")
    if failures:
        print(f"RESULT: {len(failures)} correctness problem(s): the numbers of "
              f"{', '.join(sorted({n for n, _ in failures}))} mean nothing")
    else:
        print("RESULT: every configuration answered correctly")


# -- main ------------------------------------------------------------------------------------


def cpu_busy(seconds: float = 1.0) -> float | None:
    """The share of all CPUs busy over *seconds* (from ``/proc/stat``), or None."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    spent = total1 - total0
    return 1 - (idle1 - idle0) / spent if spent > 0 else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10,
                        help="seconds of wrk per round and configuration (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, interleaved; the median is reported (default 3)")
    parser.add_argument("--connections", type=int, default=16,
                        help="wrk connections, one thread each (default 16)")
    parser.add_argument("--sessions", type=int, default=128,
                        help="client sessions, shared out among the connections (default 128)")
    parser.add_argument("--workers", type=int, default=4,
                        help="gunicorn sync workers per configuration (default 4)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="seconds of wrk per configuration before the rounds (default 2)")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME",
                        help=f"measure only these configurations ({', '.join(NAMES)})")
    parser.add_argument("--verbose", action="store_true", help="also print every round")
    parser.add_argument("--server-cpus", type=cpu_list, default=None, metavar="LIST",
                        help="pin the database servers (Redis, the private PostgreSQL) to these "
                        "CPUs (e.g. 1) and gunicorn and wrk to the others: the database on a "
                        "machine of its own, as in production (default: all share every CPU)")
    args = parser.parse_args(argv)
    if min(args.duration, args.rounds, args.connections, args.workers) < 1:
        parser.error("--duration, --rounds, --connections and --workers must be at least 1")
    if args.sessions < args.connections:
        parser.error("--sessions must be at least --connections (each connection owns some)")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def cpu_list(text: str) -> set[int]:
    """``--server-cpus``: CPU numbers separated by commas."""
    try:
        cpus = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of CPU numbers: {text!r}") from None
    available = os.sched_getaffinity(0)
    if not cpus or not cpus < available:
        raise argparse.ArgumentTypeError(
            f"give some, not all, of this machine's CPUs {sorted(available)}"
        )
    return cpus


def pin_servers(pids: list[int], cpus: set[int] | None) -> None:
    """Move the database servers' processes to *cpus* (their future children follow)."""
    if cpus is None:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(pid, cpus)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so the same clean-up runs as for Ctrl-C."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_all(configs: list[Config], args: argparse.Namespace, tmp: Path,
              stack: contextlib.ExitStack, setup: list[str]) -> list[Run]:
    """Start the backends and one gunicorn per configuration; create the sessions."""
    redis_urls: dict[str, str] = {}
    pg: PgServerLike | None = None
    gunicorn_extra = control_socket_options()
    setup += [f"Python {platform.python_version()}", f"gunicorn {version('gunicorn')}",
              subprocess.run(["wrk", "-v"], capture_output=True, text=True,
                             check=False).stdout.split("[")[0].strip()]
    runs: list[Run] = []
    for config in configs:
        env: dict[str, str] = {}
        if config.backend in ("redis", "redis-fsync"):
            if config.backend not in redis_urls:
                proc, url, described = start_redis(tmp, config.backend == "redis-fsync")
                stack.callback(proc.stop)
                pin_servers([proc.proc.pid], args.server_cpus)
                redis_urls[config.backend] = url
                setup.append(described)
            env["THROUGHPUT_REDIS_URL"] = redis_urls[config.backend]
        elif config.backend in ("postgresql", *NAMED_CHOICES):
            if pg is None:
                pg = start_postgresql()
                stack.callback(pg.destroy)
                pin_servers(getattr(pg, "processes", list)(), args.server_cpus)
            url = pg.create_database()
            if not any(s.startswith("PostgreSQL") for s in setup):
                setup.append(f"PostgreSQL {postgresql_version(url)} (fsync=on, "
                             f"synchronous_commit=on) via psycopg {version('psycopg')}")
            prepare_database(config, url)
            env["THROUGHPUT_DATABASE_URL" if config.cookie else "SILO_DATABASE_URI"] = url
            if config.backend in NAMED_CHOICES:
                env["THROUGHPUT_SILO_CONFIG"] = json.dumps(NAMED_CHOICES[config.backend])
        elif config.backend == "sqlite":
            url = f"sqlite:///{tmp / 'silo.db'}"
            prepare_database(config, url)
            env["SILO_DATABASE_URI"] = url
            setup.append(f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=NORMAL)")
        print(f"starting {config.name} ...", flush=True)
        try:
            proc, base = start_gunicorn(config, env, args.workers, tmp, gunicorn_extra)
        except BenchError as exc:
            runs.append(Run(config, "", problems=[f"did not start: {exc}"]))
            continue
        stack.callback(proc.stop)
        run = Run(config, base, log=proc.log)
        runs.append(run)
        try:
            warm_up(run, args, tmp)
        except (BenchError, OSError, ValueError, KeyError) as exc:
            run.problems.append(f"set-up failed: {exc}")
            run.script = None
            print(f"{config.name}: set-up failed; gunicorn's log ends:\n{proc.log_tail()}",
                  file=sys.stderr)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = [c for c in CONFIGS if not args.only or c.name in args.only]
    try:
        require_tools(configs)
    except MissingTool as exc:
        print(f"throughput.py: {exc}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    busy = cpu_busy()
    setup: list[str] = []
    if busy is not None:
        setup.append(f"CPUs {busy:.0%} busy before the start")
    if args.server_cpus is not None:
        os.sched_setaffinity(0, os.sched_getaffinity(0) - args.server_cpus)  # gunicorn, wrk
        setup.append(f"database servers pinned to CPUs {sorted(args.server_cpus)}, "
                     f"gunicorn and wrk to {sorted(os.sched_getaffinity(0))}")
    tmp = Path(tempfile.mkdtemp(prefix="silo-throughput-"))
    runs: list[Run] = []
    with terminate_as_interrupt(), contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        try:
            runs = start_all(configs, args, tmp, stack, setup)
            ready = [r for r in runs if r.script is not None]
            print(f"measuring {len(ready)} configurations, {args.rounds} rounds x "
                  f"{args.duration} s each ...", flush=True)
            measure(ready, args)
            report(runs, args, setup, load_before)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping every server ...", file=sys.stderr)
            return 130
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
            stack.close()
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 1 if any(r.problems for r in runs) else 0

if __name__ == "__main__":
    sys.exit(main())
