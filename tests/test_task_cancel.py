"""Cancel: ``task.cancel()`` from any worker ends a run, durably, and never retries it.

Each "worker" is its own app (its own ``Silo`` and engine) on one database, so a
cancel made by one is learned by another only through the database. Targets block
on events the test sets; nothing waits by sleeping. SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import jsonify
from harness import AppFactory, Harness
from sqlalchemy import select

from flask_silo_sql import BackgroundTask, TaskCancelled, TaskRunner
from flask_silo_sql.sql.models import tasks

SID = "cancel-test-session-0001"
WAIT = 15.0


class Gate:
    """What a target reports back, and the events a test drives it with."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        self.done = threading.Event()
        self.caught: list[str] = []
        self.task: BackgroundTask | None = None

    def wait_reached(self) -> None:
        assert self.reached.wait(WAIT), "the task never reached its checkpoint"

    def wait_done(self) -> None:
        """Wait until the run's thread, and so its final write, has ended."""
        assert self.done.wait(WAIT), "the task never ended"
        assert self.task is not None
        assert self.task._thread is not None
        self.task._thread.join(WAIT)
        assert not self.task._thread.is_alive(), "the task thread did not end"


def worker(silo_app: AppFactory, gate: Gate, **config: Any) -> Harness:
    """An app whose ``/api/start`` runs a task that reports, waits for ``gate.go``, then
    reports again (catching :class:`TaskCancelled` to clean up, and re-raising it)."""
    h = silo_app(
        config={"TESTING": True, "SILO_TASK_FLUSH_INTERVAL": 0.0, **config}, clock=False
    )
    silo = h.silo

    def work(task: BackgroundTask, state: dict[str, Any]) -> None:
        gate.task = task
        try:
            task.update(progress=10, message="started")
            gate.reached.set()
            assert gate.go.wait(WAIT)
            for step in range(2, 10):
                task.update(progress=step * 10, message=f"step {step}")
            state["result"] = "all done"
        except TaskCancelled as exc:
            gate.caught.append(str(exc))
            task.log("cleaned up")
            raise
        finally:
            gate.done.set()

    @silo.task
    def durable(task: BackgroundTask, state: dict[str, Any]) -> None:
        work(task, state)

    silo.register("job", lambda: {"task": BackgroundTask("job"), "result": None})

    @h.app.post("/api/start")
    def start() -> Any:
        job = silo.state("job")
        job["task"].start(work, job)
        return jsonify(started=True)

    @h.app.post("/api/start-durable")
    def start_durable() -> Any:
        job = silo.state("job")
        job["task"].start(durable, job)
        return jsonify(started=True)

    @h.app.post("/api/cancel")
    def cancel() -> Any:
        return silo.cancel_response(silo.state("job")["task"])

    @h.app.get("/api/status")
    def status() -> Any:
        job = silo.state("job")
        return jsonify(task=job["task"].state.to_dict(), status=job["task"].state.status,
                       result=job["result"])

    return h


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.go.set()
    if g.task is not None and g.task._thread is not None:
        g.task._thread.join(WAIT)


def row(h: Harness) -> Any:
    with h.engine.connect() as conn:
        return conn.execute(
            select(tasks.c.status, tasks.c.attempt, tasks.c.cancel_requested_at)
        ).one()


def test_a_running_task_is_cancelled_from_another_worker(
    silo_app: AppFactory, gate: Gate
) -> None:
    a, b = worker(silo_app, gate), worker(silo_app, gate)
    assert a.json("POST", "/api/start", SID) == {"started": True}
    gate.wait_reached()

    answer = b.post("/api/cancel", SID)
    assert answer.status_code == 202
    assert answer.get_json()["outcome"] == "cancelling"
    assert b.json("GET", "/api/status", SID)["task"]["cancel_requested"] is True

    gate.go.set()  # the next update() of the run (in worker a) learns it
    gate.wait_done()
    assert gate.caught == ["task 'job' was cancelled"]
    for h in (a, b):
        body = h.json("GET", "/api/status", SID)
        assert body["status"] == "cancelled"
        state = body["task"]
        assert (state["running"], state["complete"], state["error"]) == (False, False, None)
        assert state["cancelled"] is True
        assert state["message"] == "Cancelled"
        assert state["progress"] < 100
        assert state["logs"][-1] == "cleaned up"  # its clean-up reported as it went
        assert body["result"] is None  # the run never got to its end

    again = b.post("/api/cancel", SID)
    assert again.status_code == 200
    assert again.get_json()["outcome"] == "finished"


def test_a_queued_durable_run_never_starts(silo_app: AppFactory, gate: Gate) -> None:
    web = worker(silo_app, gate, SILO_TASK_RUNNER="worker")
    other = worker(silo_app, gate, SILO_TASK_RUNNER="worker")
    web.json("POST", "/api/start-durable", SID)
    assert row(web).status == "queued"

    answer = other.post("/api/cancel", SID)
    assert (answer.status_code, answer.get_json()["outcome"]) == (200, "cancelled")
    assert row(web).status == "cancelled"

    runner = TaskRunner(other.store, poll_interval=0.05)
    queue = other.store.backend.task_queue()
    assert queue is not None
    assert queue.claim(runner.worker_id, 4) == []  # nothing to claim: it never runs
    assert not gate.reached.is_set()
    state = web.json("GET", "/api/status", SID)["task"]
    assert (state["running"], state["cancelled"], state["attempt"]) == (False, True, 0)


def test_a_cancelled_durable_run_is_never_retried(silo_app: AppFactory, gate: Gate) -> None:
    a, b = worker(silo_app, gate, SILO_TASK_RETRIES=3), worker(silo_app, gate)
    a.json("POST", "/api/start-durable", SID)
    gate.wait_reached()
    assert b.post("/api/cancel", SID).status_code == 202
    gate.go.set()
    gate.wait_done()

    status, attempt, requested = row(a)
    assert (status, attempt) == ("cancelled", 1)
    assert requested is not None
    queue = b.store.backend.task_queue()
    assert queue is not None
    assert queue.claim("some-other-process", 4) == []


def test_cancel_of_a_finished_or_unstarted_task_is_a_no_op(
    silo_app: AppFactory, gate: Gate
) -> None:
    a = worker(silo_app, gate)
    first = a.post("/api/cancel", SID)
    assert (first.status_code, first.get_json()["outcome"]) == (200, "idle")

    gate.go.set()
    a.json("POST", "/api/start", SID)
    gate.wait_done()
    done = a.json("GET", "/api/status", SID)
    assert done["status"] == "complete"

    answer = a.post("/api/cancel", SID)
    assert (answer.status_code, answer.get_json()["outcome"]) == (200, "finished")
    assert "nothing was cancelled" in answer.get_json()["message"]
    assert a.json("GET", "/api/status", SID) == done  # unchanged


def test_a_task_outside_any_session_is_cancelled_the_same_way() -> None:
    reached, go, caught = threading.Event(), threading.Event(), []

    def work(task: BackgroundTask) -> None:
        task.update(progress=5)
        reached.set()
        go.wait(WAIT)
        try:
            task.update(progress=50)
        except TaskCancelled:
            caught.append(True)  # clean up, then return: the run still ends cancelled

    task = BackgroundTask("plain")
    assert task.cancel() == "idle"
    task.start(work)
    assert reached.wait(WAIT)
    assert task.cancel() == "cancelling"
    go.set()
    assert task._thread is not None
    task._thread.join(WAIT)
    assert caught == [True]
    assert task.state.status == "cancelled"
    assert task.state.to_dict()["cancelled"] is True
    assert task.cancel() == "finished"


def test_a_run_asked_to_cancel_whose_process_died_is_not_run_again(
    silo_app: AppFactory, gate: Gate
) -> None:
    h = silo_app(config={"TESTING": True, "SILO_TASK_RUNNER": "worker"})
    silo = h.silo

    @silo.task
    def durable(task: BackgroundTask) -> None:
        gate.reached.set()

    silo.register("job", lambda: {"task": BackgroundTask("job")})

    @h.app.post("/api/start")
    def start() -> Any:
        silo.state("job")["task"].start(durable)
        return jsonify(started=True)

    @h.app.post("/api/cancel")
    def cancel() -> Any:
        return silo.cancel_response(silo.state("job")["task"])

    h.json("POST", "/api/start", SID)
    queue = h.store.backend.task_queue()
    assert queue is not None
    assert len(queue.claim("a-process-that-dies", 1)) == 1  # claimed, then never run
    assert h.post("/api/cancel", SID).get_json()["outcome"] == "cancelling"

    h.clock.now += h.store.heartbeat_timeout + 1  # its lease lapses
    assert queue.claim("a-live-process", 1) == []  # not run again...
    assert row(h).status == "cancelled"  # ...but ended as it was asked
    assert not gate.reached.is_set()
