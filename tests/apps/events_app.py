"""A small API with live tasks, served by gunicorn in the event stream's process tests.

Configured from the environment: every ``SILO_*`` key (read as JSON when it parses,
else as text) and ``SECRET_KEY``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from flask import Flask, jsonify

from flask_silo_sql import BackgroundTask, Silo
from flask_silo_sql.ext import CONFIG_DEFAULTS

app = Flask(__name__)
app.secret_key = os.environ["SECRET_KEY"]
for _key in CONFIG_DEFAULTS:
    if _key in os.environ:
        try:
            app.config[_key] = json.loads(os.environ[_key])
        except ValueError:
            app.config[_key] = os.environ[_key]

silo = Silo(app, auto_cleanup=False)
silo.register("job", lambda: {"task": BackgroundTask("job")})


def endless(task: BackgroundTask) -> None:
    """Reports progress until it is cancelled (or two minutes pass)."""
    for step in range(2400):
        task.update(progress=step / 24, message=f"step {step} in pid {os.getpid()}")
        time.sleep(0.05)


@silo.task
def queued(task: BackgroundTask) -> None:
    task.complete("ran")


@app.get("/health")
def health() -> Any:
    return jsonify(ok=True, pid=os.getpid())


@app.post("/api/token")
def token() -> Any:
    return jsonify(silo.stream_token())


@app.post("/api/publish/<int:n>")
def publish(n: int) -> Any:
    silo.publish("step", {"n": n})
    return jsonify(ok=True)


@app.post("/api/start")
def start() -> Any:
    silo.state("job")["task"].start(endless)
    return jsonify(started=True)


@app.post("/api/start-queued")
def start_queued() -> Any:
    silo.state("job")["task"].start(queued)
    return jsonify(started=True)


@app.post("/api/cancel")
def cancel() -> Any:
    return silo.cancel_response(silo.state("job")["task"])


@app.get("/api/status")
def status() -> Any:
    task = silo.state("job")["task"]
    return jsonify(status=task.state.status, task=task.state.to_dict())


@app.get("/events")
def events() -> Any:
    return silo.stream()
