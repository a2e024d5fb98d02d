"""An app whose process clock may be wrong (``SILO_TEST_CLOCK_SKEW`` seconds ahead).

It stands for a machine whose system clock is off: ``time.time()`` (and so
``datetime.now()``) is shifted for the whole process. Silo measures TTLs,
expiry and heartbeats with the database's clock, so such a machine must agree
with the others. TTL is 120 s.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flask import Flask, Response, jsonify

from flask_silo_sql import BackgroundTask, Silo

SKEW = float(os.environ.get("SILO_TEST_CLOCK_SKEW", "0"))
if SKEW:
    _real_time = time.time
    time.time = lambda: _real_time() + SKEW

app = Flask(__name__)
app.config["SILO_DATABASE_URI"] = os.environ["SILO_DATABASE_URI"]
app.config["SILO_TASK_HEARTBEAT_TIMEOUT"] = 60.0
silo = Silo(app, ttl=120, auto_cleanup=False)
silo.register("counter", lambda: {"value": 0})
silo.register("job", lambda: {"task": BackgroundTask("wait")})
silo.add_data_endpoints("/api/data")
GATE = Path(os.environ.get("SILO_TEST_GATE", "/nonexistent"))


@app.get("/health")
def health() -> str:
    return "ok"


@app.post("/api/write")
def write() -> Response:
    state = silo.state("counter")
    state["value"] += 1
    return jsonify(value=state["value"])


@app.get("/api/data")
def data() -> Response:
    return jsonify(value=silo.state("counter")["value"])


@app.post("/api/sweep")
def sweep() -> Response:
    return jsonify(expired=silo.store.sweep().expired)


@app.post("/api/start")
def start() -> Response:
    def wait(task: BackgroundTask) -> None:
        deadline = time.monotonic() + 60
        while not GATE.exists() and time.monotonic() < deadline:
            task.update(message="waiting")
            time.sleep(0.05)

    silo.state("job")["task"].start(wait)
    return jsonify(started=True)


@app.get("/api/status")
def status() -> Response:
    return jsonify(silo.state("job")["task"].state.to_dict())
