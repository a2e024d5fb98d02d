"""``SILO_TASK_RUNNER = "worker"`` with no worker alive: the log and the task's state say so.

A run queued by a web process while no ``flask silo-db worker`` is alive is
warned about in that process's log (when it is queued, then at most every 60 s
while runs wait), and its ``to_dict()`` adds ``queued_for`` (seconds) and
``workers`` (how many are alive). Through a real app on SQLite and PostgreSQL,
with the store's clock moved by the test.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from harness import AppFactory, Harness

from flask_silo_sql import BackgroundTask

ALICE = "alice-queued-no-worker-01"
FLASK_SILO_KEYS = [
    "running",
    "progress",
    "message",
    "logs",
    "complete",
    "error",
    "started_at",
    "finished_at",
]


def queueing_app(silo_app: AppFactory) -> Harness:
    h = silo_app(config={"SILO_TASK_RUNNER": "worker"})

    @h.silo.task
    def crunch(task: BackgroundTask, state: dict[str, Any]) -> None:
        state["done"] = True

    h.silo.register("job", lambda: {"task": BackgroundTask("crunch")})

    @h.app.post("/api/start")
    def start() -> dict[str, str]:
        job = h.silo.state("job")
        job["task"].start(crunch, job)
        return {"started": "yes"}

    @h.app.get("/api/status")
    def status() -> dict[str, Any]:
        state: dict[str, Any] = h.silo.state("job")["task"].state.to_dict()
        return state

    return h


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "no task worker is alive" in r.getMessage()
    ]


def test_a_run_queued_with_no_worker_is_warned_about_and_reported(
    silo_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    h = queueing_app(silo_app)
    with caplog.at_level(logging.WARNING, logger="flask_silo_sql.tasks"):
        h.json("POST", "/api/start", ALICE)
        assert len(warnings(caplog)) == 1
        assert "flask silo-db worker" in warnings(caplog)[0]
        assert ALICE not in caplog.text

        state = h.json("GET", "/api/status", ALICE)
        assert set(state) == {*FLASK_SILO_KEYS, "attempt", "last_error", "queued_for", "workers"}
        assert state["message"] == "Queued"
        assert (state["queued_for"], state["workers"]) == (0.0, 0)

        h.clock.now += 30
        state = h.json("GET", "/api/status", ALICE)
        assert (state["queued_for"], state["workers"]) == (30.0, 0)
        assert len(warnings(caplog)) == 1  # once, then at intervals

        h.clock.now += 31
        state = h.json("GET", "/api/status", ALICE)
        assert state["queued_for"] == 61.0
        assert len(warnings(caplog)) == 2
        assert "waited 61 s" in warnings(caplog)[1]


def test_a_live_worker_is_counted_and_nothing_is_warned(
    silo_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    h = queueing_app(silo_app)
    queue = h.store.backend.task_queue()
    assert queue is not None
    queue.register("worker-host:4242:cafe", "worker", 4)  # as a worker's heartbeat does
    with caplog.at_level(logging.WARNING, logger="flask_silo_sql.tasks"):
        h.json("POST", "/api/start", ALICE)
        h.clock.now += 5
        state = h.json("GET", "/api/status", ALICE)
    assert (state["queued_for"], state["workers"]) == (5.0, 1)
    assert warnings(caplog) == []
    # A worker that stopped heartbeating is not counted.
    h.clock.now += h.store.heartbeat_timeout + 1
    assert h.json("GET", "/api/status", ALICE)["workers"] == 0
