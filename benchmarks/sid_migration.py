"""How long migration 0009 (SIDs hashed at rest) takes on a database full of sessions.

Each database is brought to revision 0007 and filled with ``--sessions`` sessions as the
previous version stored them (the SID in clear), each with one namespace; then the upgrade
to head is timed (one transaction: every session copied under its key, its rows moved,
the old row deleted, in batches). PostgreSQL is a private server started for the run with
``fsync=on`` (``tests/pgserver.py``), or the server named by ``SILO_TEST_PG_URL``.

Run: ``python benchmarks/sid_migration.py [--sessions N] [--only sqlite|postgresql]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from flask_silo_sql import schema
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import namespaces, sessions

REPO = Path(__file__).resolve().parent.parent


def timed_upgrade(url: str, count: int) -> float:
    """Seconds the upgrade from 0007 to head takes with *count* sessions in clear."""
    engine = make_engine(url)
    try:
        schema.upgrade(engine, "0007")
        now = dt.datetime.now(dt.timezone.utc)
        sids = [secrets.token_urlsafe(32) for _ in range(count)]
        times = {"created_at": now, "last_active": now, "expires_at": now, "sweep_after": now}
        with engine.begin() as conn:
            conn.execute(insert(sessions), [{"sid": s, **times} for s in sids])
            conn.execute(
                insert(namespaces),
                [
                    {"sid": s, "name": "cart", "data": {"n": 1}, "version": 1, "updated_at": now}
                    for s in sids
                ],
            )
        start = time.perf_counter()
        schema.upgrade(engine)
        return time.perf_counter() - start
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="silo-bench-"))
    pg: Any = None
    try:
        if args.only in (None, "sqlite"):
            seconds = timed_upgrade(f"sqlite:///{tmp / 'm.db'}", args.sessions)
            print(f"SQLite      {args.sessions} sessions converted in {seconds:.2f} s "
                  f"({1e6 * seconds / args.sessions:.0f} µs per session)")
        if args.only in (None, "postgresql"):
            sys.path.insert(0, str(REPO / "tests"))
            pgserver = importlib.import_module("pgserver")
            external = os.environ.get("SILO_TEST_PG_URL")
            pg = pgserver.ExternalPg(external) if external else pgserver.PgServer(fsync=True)
            seconds = timed_upgrade(pg.create_database(), args.sessions)
            print(f"PostgreSQL  {args.sessions} sessions converted in {seconds:.2f} s "
                  f"({1e6 * seconds / args.sessions:.0f} µs per session)")
    finally:
        if pg is not None:
            pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
