"""A day of traffic on PostgreSQL, then what the tables look like: bloat, dead tuples, HOT.

Every request of a live session may update ``silo_sessions``; sweeps delete sessions,
their namespaces, tasks and idempotency keys. This benchmark replays the equivalent of
one day for a few thousand clients through the real request path (a Flask app's test
client, the store's clock moved forward by the simulation) on a private PostgreSQL
server:

* clients arrive evenly over the day; each stays active for 30 to 240 minutes, sends a
  request every 1 to 5 minutes (a namespace write; every fifth an idempotent ``POST``
  with a new key; every twentieth starts a short background task), then leaves, so its
  session expires one TTL (1 h) later;
* the sweep runs every simulated minute, as the cleanup daemon would;
* autovacuum wakes every second instead of every minute (the day is compressed about a
  thousandfold); its thresholds are the defaults, or the tables' own storage settings.

At the end it reports, for each silo table: heap and index sizes against the size of the
live rows (``sum(pg_column_size(row))``) and against the same table packed afresh
(``VACUUM FULL``, the floor any table of those rows has: at a few hundred sessions, pages
and index roots weigh more than the rows), live and dead tuples, updates and the share of
them that were HOT. The run is made twice: as is, and with another connection holding a
transaction (with a snapshot) open for the whole run, as a forgotten ``BEGIN`` in a
``psql`` window would; that one is reported as it is.

Targets (without the held transaction): table plus index size at most 2 x the live data
on every table holding more than a handful of pages, and at least 90 % HOT updates on
``silo_sessions``. The exit status is 0 whatever the verdicts: this is a report.

Run: ``python benchmarks/churn.py [--clients N] [--hours H] [--only plain|held]``;
``--clients 300`` is a quick run. The default (2,000 clients, 24 h: some 270 live
sessions at any time) sends about 45,000 requests per run and takes a few minutes on
2 CPUs. The tables' sizes are reported at the end of the day, with the live data then.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from flask import Flask, Response, jsonify

REPO = Path(__file__).resolve().parent.parent

from flask_silo_sql import BackgroundTask, Silo  # noqa: E402
from flask_silo_sql.sql.engine import make_engine  # noqa: E402
from flask_silo_sql.sql.schema import upgrade  # noqa: E402

TABLES = (
    "silo_sessions",
    "silo_namespaces",
    "silo_expired_sids",
    "silo_tasks",
    "silo_idempotency_keys",
)
TTL = 3600
MINUTE = 60.0


@dataclass
class Client:
    sid: str | None
    arrives: float
    leaves: float
    next_at: float
    sent: int = 0


def make_app(url: str, clock: list[float]) -> tuple[Flask, Silo]:
    """The app the traffic goes to: one counter namespace, an idempotent POST, a task."""
    app = Flask("churn")
    app.config["SILO_DATABASE_URI"] = url
    app.config["SILO_TASK_FLUSH_INTERVAL"] = 0.0
    silo = Silo(app, ttl=TTL, auto_cleanup=False)
    silo.store.clock = lambda: clock[0]
    silo.register("cart", lambda: {"items": 0, "total": 0.0})
    silo.register("job", lambda: {"task": BackgroundTask("short")})

    @app.post("/api/add")
    def add() -> Response:
        cart = silo.state("cart")
        cart["items"] += 1
        cart["total"] += 9.99
        return jsonify(items=cart["items"])

    @app.post("/api/pay")
    @silo.idempotent()
    def pay() -> Response:
        cart = silo.state("cart")
        cart["items"] = 0
        return jsonify(paid=True)

    @app.post("/api/start")
    def start() -> Response:
        task = silo.state("job")["task"]
        if not task.is_running:
            task.start(lambda t: t.complete("done"))
        return jsonify(started=True)

    return app, silo


def simulate(url: str, clients: int, hours: float, seed: int) -> int:
    """Send a day's requests; return how many were sent."""
    rng = random.Random(seed)
    day = hours * 3600.0
    start = 1_900_000_000.0
    clock = [start]
    app, silo = make_app(url, clock)
    http = app.test_client()
    population = []
    for _ in range(clients):
        arrives = start + rng.uniform(0, day)
        population.append(Client(None, arrives, arrives + rng.uniform(30, 240) * MINUTE, arrives))
    population.sort(key=lambda c: c.arrives)
    active: list[Client] = []
    arriving = iter(population)
    upcoming = next(arriving, None)
    sent = 0
    now = start
    while now < start + day:
        clock[0] = now
        while upcoming is not None and upcoming.arrives <= now:
            active.append(upcoming)
            upcoming = next(arriving, None)
        for client in list(active):
            if client.next_at > now:
                continue
            if client.next_at > client.leaves:
                active.remove(client)
                continue
            client.sent += 1
            headers = {"X-Session-ID": client.sid} if client.sid else {}
            if client.sent % 20 == 0:
                path = "/api/start"
            elif client.sent % 5 == 0:
                path = "/api/pay"
                headers["Idempotency-Key"] = f"k{sent}"
            else:
                path = "/api/add"
            answer = http.post(path, headers=headers)
            if answer.status_code != 200:
                raise SystemExit(f"{path}: {answer.status_code} {answer.get_data(as_text=True)}")
            client.sid = answer.headers["X-Session-ID"]
            client.next_at = now + rng.uniform(1, 5) * MINUTE
            sent += 1
        silo.store.sweep()
        now += MINUTE
    silo.stop()
    return sent


@contextlib.contextmanager
def held_transaction(url: str, hold: bool) -> Iterator[None]:
    """A transaction with a snapshot kept open meanwhile (when *hold*)."""
    if not hold:
        yield
        return
    with psycopg.connect(url) as conn:
        conn.execute("SELECT txid_current()")
        yield
        conn.rollback()


def compact_sizes(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Each table's heap plus indexes once rewritten packed (``VACUUM FULL``): its floor."""
    sizes = {}
    for table in TABLES:
        conn.execute(f"VACUUM FULL {table}")
        row = conn.execute(
            "SELECT pg_relation_size(%s::regclass) + pg_indexes_size(%s::regclass)",
            (table, table),
        ).fetchone()
        assert row is not None
        sizes[table] = int(row[0])
    return sizes


def report(url: str, hold: bool) -> list[dict[str, Any]]:
    time.sleep(1.5)  # PostgreSQL publishes a backend's table statistics at most once a second
    rows = []
    with psycopg.connect(url, autocommit=True) as conn:
        for table in TABLES:
            stats = conn.execute(
                "SELECT pg_relation_size(c.oid), pg_indexes_size(c.oid), s.n_live_tup, "
                "s.n_dead_tup, s.n_tup_upd, s.n_tup_hot_upd, s.autovacuum_count "
                "FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid "
                "WHERE c.relname = %s",
                (table,),
            ).fetchone()
            live = conn.execute(
                f"SELECT count(*), coalesce(sum(pg_column_size(t.*)), 0) FROM {table} t"
            ).fetchone()
            assert stats is not None
            assert live is not None
            heap, index, _n_live, dead, upd, hot, autovacuums = stats
            rows.append(
                {
                    "table": table,
                    "rows": live[0],
                    "live_bytes": int(live[1]),
                    "heap": heap,
                    "index": index,
                    "dead": dead,
                    "updates": upd,
                    "hot": hot,
                    "autovacuums": autovacuums,
                }
            )
        if not hold:  # VACUUM FULL would wait for the held transaction
            for row, floor in zip(rows, compact_sizes(conn).values(), strict=True):
                row["compact"] = floor
    return rows


def kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def print_table(title: str, rows: list[dict[str, Any]], sent: int, seconds: float) -> None:
    print(f"\n### {title}: {sent:,} requests in {seconds:.0f} s\n")
    print(
        "| table | rows | live data KiB | heap KiB | indexes KiB | (heap+idx)/live "
        "| (heap+idx)/packed | dead | updates | HOT | autovacuums |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        total = r["heap"] + r["index"]
        ratio = total / r["live_bytes"] if r["live_bytes"] else float("nan")
        packed = f"{total / r['compact']:.1f}" if r.get("compact") else "-"
        hot = f"{100 * r['hot'] / r['updates']:.0f} %" if r["updates"] else "-"
        print(
            f"| {r['table']} | {r['rows']:,} | {kib(r['live_bytes'])} | {kib(r['heap'])} "
            f"| {kib(r['index'])} | {ratio:.1f} | {packed} | {r['dead']:,} | {r['updates']:,} "
            f"| {hot} "
            f"| {r['autovacuums']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--only", choices=("plain", "held"))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    pgserver = importlib.import_module("pgserver")
    server = pgserver.PgServer(fsync=False)
    try:
        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            # The day runs some 1,000 times faster than a real one: so does autovacuum's
            # wake-up (1 s, its minimum, for 60 s by default). Its thresholds are the
            # server's defaults, or the tables' own where a migration sets them.
            conn.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
            conn.execute("SELECT pg_reload_conf()")
        print(f"PostgreSQL {version[0] if version else '?'}, autovacuum_naptime 1 s")
        for hold in (False, True):
            if args.only and args.only != ("held" if hold else "plain"):
                continue
            url = server.create_database().replace("postgresql://", "postgresql+psycopg://")
            engine = make_engine(url)
            upgrade(engine)
            engine.dispose()
            raw = url.replace("postgresql+psycopg://", "postgresql://")
            began = time.perf_counter()
            with held_transaction(raw, hold):
                sent = simulate(url, args.clients, args.hours, args.seed)
                seconds = time.perf_counter() - began
                rows = report(raw, hold)
            title = "with a transaction held open" if hold else "no transaction held"
            print_table(title, rows, sent, seconds)
    finally:
        server.destroy()


if __name__ == "__main__":
    main()
