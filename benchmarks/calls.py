"""Python function calls per request: a cost that does not move with the machine's load.

Timing ratios on a busy machine vary by a factor of two between runs; the
number of Python calls a request makes (counted by cProfile) does not, so it
shows whether a change made the request path heavier. One app on the embedded
SQLite default, one namespace: a write (read-modify-write) and a read.

    python benchmarks/calls.py [--requests N]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from typing import Any

from flask import Flask, Response, jsonify

from flask_silo_sql import Silo, schema
from flask_silo_sql.sql.engine import make_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=200, help="requests counted per kind")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/silo.db"
        engine = make_engine(url)
        schema.upgrade(engine)
        engine.dispose()
        app = Flask("calls")
        app.config["SILO_DATABASE_URI"] = url
        silo = Silo(app, auto_cleanup=False)
        silo.register("counter", lambda: {"n": 0})

        @app.post("/api/write")
        def write() -> Response:
            state = silo.state("counter")
            state["n"] += 1
            return jsonify(n=state["n"])

        @app.get("/api/read")
        def read() -> Response:
            return jsonify(n=silo.state("counter")["n"])

        client = app.test_client()
        sid = client.post("/api/write").headers["X-Session-ID"]
        headers = {"X-Session-ID": sid}
        for _ in range(50):  # warm up: statements compiled, pools filled
            client.post("/api/write", headers=headers)
            client.get("/api/read", headers=headers)
        kinds: dict[str, Any] = {"write": client.post, "read": client.get}
        print(f"Python calls per request (cProfile, {args.requests} requests each)")
        for kind, send in kinds.items():
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.requests):
                send(f"/api/{kind}", headers=headers)
            profile.disable()
            calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
            print(f"  {kind:5} {calls / args.requests:8.1f}")


if __name__ == "__main__":
    main()
