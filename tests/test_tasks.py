"""Durable background tasks: state in ``silo_tasks``, visible from every worker.

Each "worker" is its own Flask app with its own ``Silo`` and engine on one
database. Targets block on :class:`threading.Event` objects the test sets,
and time is an injected clock, so nothing here waits by sleeping.
Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import jsonify, request
from harness import AppFactory, Harness
from sqlalchemy import Engine, func, insert, select
from support import T0, Clock, StatementLog, at
from werkzeug.test import TestResponse

from flask_silo_sql import BackgroundTask, SQLStorage, session_key
from flask_silo_sql.sql.models import files as files_table
from flask_silo_sql.sql.models import namespaces, tasks

SID = "tasks-test-session-0001"
OTHER_SID = "tasks-test-session-0002"
WAIT = 15.0  # seconds an Event may take before a test gives up (never reached when passing)
MARKER = "__silo_task__"


# -- workers ------------------------------------------------------------------------


Target = Callable[..., Any]


class Worker(Harness):
    """One app object (a worker process, as far as the database can tell).

    Requests send ``SID`` unless told otherwise; ``/api/start`` runs ``target``.
    """

    def __init__(self, url: str | None, *, upload_dir: str, **options: Any) -> None:
        super().__init__(url, default_sid=SID, **options)
        self.target: Target | None = None
        define_worker(self, upload_dir)

    @property
    def sql(self) -> SQLStorage:
        return self.storage

    def status(self, sid: str = SID) -> dict[str, Any]:
        body: dict[str, Any] = self.json("GET", "/api/status", sid)
        return body

    def start(self, sid: str = SID) -> TestResponse:
        return self.call("POST", "/api/start", sid)


def processing() -> dict[str, Any]:
    return {"task": BackgroundTask("proc"), "results": None, "note": ""}


def define_worker(worker: Worker, upload_dir: str) -> None:
    """The worker's namespaces, its file store and its routes."""
    app, silo = worker.app, worker.silo
    silo.register("proc", processing)
    silo.register("counter", lambda: {"n": 0})
    uploads = silo.add_file_store("uploads", upload_dir)

    @app.get("/api/status")
    def status() -> Any:
        ns = silo.state("proc")
        task: BackgroundTask = ns["task"]
        return jsonify(
            task=task.state.to_dict(),
            task_id=task.task_id,
            running=task.is_running,
            complete=task.is_complete,
            failed=task.is_failed,
            results=ns["results"],
            note=ns["note"],
        )

    @app.post("/api/start")
    def start() -> Any:
        ns = silo.state("proc")
        assert worker.target is not None
        try:
            ns["task"].start(worker.target, ns)
        except RuntimeError as exc:
            return jsonify(error="already_running", message=str(exc)), 409
        return jsonify(started=True)

    @app.post("/api/start-new")
    def start_new() -> Any:
        ns = silo.state("proc")
        ns["extra"] = BackgroundTask("extra")
        assert worker.target is not None
        ns["extra"].start(worker.target, ns)
        return jsonify(started=True)

    @app.get("/api/extra")
    def extra() -> Any:
        task: BackgroundTask = silo.state("proc")["extra"]
        return jsonify(task=task.state.to_dict(), task_id=task.task_id)

    @app.post("/api/note")
    def note() -> Any:
        silo.state("proc")["note"] = request.get_json()["note"]
        return jsonify(ok=True)

    @app.post("/api/task-reset")
    def task_reset() -> Any:
        try:
            silo.state("proc")["task"].reset()
        except RuntimeError as exc:
            return jsonify(error="running", message=str(exc)), 409
        return jsonify(ok=True)

    @app.post("/api/reset")
    def reset() -> Any:
        silo.reset_current()
        return jsonify(ok=True)

    @app.post("/api/upload")
    def upload() -> Any:
        upload = request.files["file"]
        uploads.save(silo.sid, upload.filename or "", upload.stream, content_type=upload.mimetype)
        return jsonify(files=uploads.list_files(silo.sid))


@dataclass
class Probe:
    """What a target reports back, and the Events a test drives it with."""

    reached: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)
    task: BackgroundTask | None = None

    def wait_reached(self) -> None:
        assert self.reached.wait(WAIT), "the task never reached its checkpoint"

    def join(self) -> None:
        """Wait until the task's thread (and so its final write) has ended."""
        assert self.task is not None, "the target never ran"
        thread = self.task._thread
        assert thread is not None
        thread.join(WAIT)
        assert not thread.is_alive(), "the task thread did not end"


@dataclass
class Env:
    """Workers on one database, and the probes of their tasks."""

    silo_app: AppFactory
    upload_dir: str
    workers: list[Worker] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)

    def worker(self, **config: Any) -> Worker:
        """A worker configured with ``SILO_DATABASE_URI`` and *config*, on real time."""
        worker = self.silo_app(
            Worker,
            upload_dir=self.upload_dir,
            via="config",
            # Every update is visible at once, unless a test says otherwise.
            config={"TESTING": True, "SILO_TASK_FLUSH_INTERVAL": 0.0, **config},
            clock=False,
        )
        self.workers.append(worker)
        return worker

    def probe(self) -> Probe:
        probe = Probe()
        self.probes.append(probe)
        return probe

    def engine(self) -> Engine:
        return self.workers[0].sql.engine


@pytest.fixture
def env(silo_app: AppFactory, tmp_path: Path) -> Iterator[Env]:
    environment = Env(silo_app, str(tmp_path / "uploads"))
    yield environment
    for probe in environment.probes:  # release every target still waiting
        probe.gate.set()
    for probe in environment.probes:
        if probe.task is not None and probe.task._thread is not None:
            probe.task._thread.join(WAIT)
    for worker in environment.workers:
        worker.close()


def task_rows(engine: Engine, sid: str = SID) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(tasks).where(tasks.c.sid == session_key(sid))).all())


def namespace_data(engine: Engine, name: str = "proc", sid: str = SID) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(namespaces.c.data).where(
                namespaces.c.sid == session_key(sid), namespaces.c.name == name
            )
        ).scalar_one_or_none()


def blocking_target(probe: Probe, *, raise_after: str | None = None) -> Target:
    """Reports progress, waits for the test, then returns (or raises)."""

    def target(task: BackgroundTask, state: dict[str, Any]) -> None:
        probe.task = task
        task.update(40, "halfway")
        task.log("read the upload")
        task.log("parsed 10 rows")
        probe.reached.set()
        assert probe.gate.wait(WAIT)
        if raise_after is not None:
            raise ValueError(raise_after)
        task.log("finished")

    return target


# -- live state across workers -----------------------------------------------------


def test_running_task_is_visible_live_from_another_worker(env: Env) -> None:
    a, b = env.worker(), env.worker()
    probe = env.probe()
    a.target = blocking_target(probe)
    assert a.start().status_code == 200
    probe.wait_reached()

    seen = b.status()
    assert seen["running"] is True
    assert seen["complete"] is False
    assert seen["failed"] is False
    state = seen["task"]
    assert set(state) == {
        "running",
        "progress",
        "message",
        "logs",
        "complete",
        "error",
        "started_at",
        "finished_at",
    }
    assert state["running"] is True
    assert state["progress"] == 40.0
    assert state["message"] == "halfway"
    assert state["logs"] == ["read the upload", "parsed 10 rows"]
    assert state["error"] is None
    assert state["finished_at"] is None
    assert isinstance(state["started_at"], float)

    probe.gate.set()
    probe.join()
    done = b.status()
    assert done["running"] is False
    assert done["complete"] is True
    assert done["failed"] is False
    assert done["task"]["progress"] == 100.0
    assert done["task"]["message"] == "halfway"  # auto-complete keeps the last message
    assert done["task"]["logs"] == ["read the upload", "parsed 10 rows", "finished"]
    assert done["task"]["finished_at"] >= done["task"]["started_at"]
    assert a.status()["task"] == done["task"]


def test_failure_is_visible_from_another_worker(env: Env) -> None:
    a, b = env.worker(), env.worker()
    probe = env.probe()
    a.target = blocking_target(probe, raise_after="disk on fire")
    assert a.start().status_code == 200
    probe.wait_reached()
    assert b.status()["running"] is True
    probe.gate.set()
    probe.join()

    seen = b.status()
    assert seen["running"] is False
    assert seen["failed"] is True
    assert seen["complete"] is False
    assert seen["task"]["error"] == "disk on fire"
    assert seen["task"]["message"] == "Failed: disk on fire"
    assert seen["task"]["finished_at"] is not None
    (row,) = task_rows(b.sql.engine)
    assert row.status == "failed"
    assert row.error == "disk on fire"


def test_progress_is_clamped_and_rounded_as_in_flask_silo(env: Env) -> None:
    a, b = env.worker(), env.worker()
    probe = env.probe()
    readings: list[float] = []

    def target(task: BackgroundTask, state: dict[str, Any]) -> None:
        probe.task = task
        for value in (150, -20, 33.333):
            task.update(value)
            readings.append(task.state.progress)
        task.update(message="only the message")
        probe.reached.set()
        assert probe.gate.wait(WAIT)

    a.target = target
    a.start()
    probe.wait_reached()
    assert readings == [100.0, 0.0, 33.333]
    seen = b.status()["task"]
    assert seen["progress"] == 33.3
    assert seen["message"] == "only the message"
    probe.gate.set()
    probe.join()


def test_starting_a_running_task_raises_even_from_another_worker(env: Env) -> None:
    a, b = env.worker(), env.worker()
    probe = env.probe()
    a.target = blocking_target(probe)
    a.start()
    probe.wait_reached()

    b.target = blocking_target(env.probe())
    refused = b.start()
    assert refused.status_code == 409
    assert "already running" in refused.get_json()["message"]
    refused_again = a.start()  # a fresh request in the same worker
    assert refused_again.status_code == 409
    assert probe.task is not None
    with pytest.raises(RuntimeError, match="already running"):
        probe.task.start(blocking_target(env.probe()), {})
    with pytest.raises(RuntimeError):
        probe.task.reset()
    assert b.call("POST", "/api/task-reset").status_code == 409

    seen = b.status()  # the refused starts changed nothing
    assert seen["running"] is True
    assert seen["task"]["progress"] == 40.0
    assert seen["task"]["logs"] == ["read the upload", "parsed 10 rows"]
    assert len(task_rows(b.sql.engine)) == 1
    probe.gate.set()
    probe.join()
    assert b.status()["complete"] is True


def test_reset_then_restart_from_another_worker(env: Env) -> None:
    a, b = env.worker(), env.worker()
    first = env.probe()
    a.target = blocking_target(first)
    a.start()
    first.wait_reached()
    first.gate.set()
    first.join()
    assert b.status()["complete"] is True

    assert b.call("POST", "/api/task-reset").status_code == 200
    idle = a.status()
    assert idle["running"] is False
    assert idle["complete"] is False
    assert idle["task"]["progress"] == 0.0
    assert idle["task"]["logs"] == []
    assert task_rows(a.sql.engine) == []

    second = env.probe()
    b.target = blocking_target(second, raise_after="second run failed")
    assert b.start().status_code == 200
    second.wait_reached()
    live = a.status()
    assert live["running"] is True
    assert live["task"]["logs"] == ["read the upload", "parsed 10 rows"]
    second.gate.set()
    second.join()
    assert a.status()["task"]["error"] == "second run failed"


def test_namespace_holds_only_a_reference_to_the_task_row(env: Env) -> None:
    a, b = env.worker(), env.worker()
    probe = env.probe()
    a.target = blocking_target(probe)
    a.start()
    probe.wait_reached()
    assert b.call("POST", "/api/note", json={"note": "written"}).status_code == 200

    task_id = b.status()["task_id"]
    assert isinstance(task_id, str)
    data = namespace_data(b.sql.engine)
    assert data["task"] == {MARKER: task_id, "name": "proc"}
    assert data["note"] == "written"
    assert "progress" not in str(data)
    (row,) = task_rows(b.sql.engine)
    assert row.id == task_id
    assert row.sid == session_key(SID)
    assert row.name == "proc"
    assert row.status == "running"
    assert row.progress == 40.0
    assert row.heartbeat_at is not None
    probe.gate.set()
    probe.join()
    assert task_rows(b.sql.engine)[0].status == "complete"


def test_task_put_in_namespace_by_a_handler_is_durable_too(env: Env) -> None:
    a, b = env.worker(), env.worker()
    probe = env.probe()
    a.target = blocking_target(probe)
    assert a.call("POST", "/api/start-new").status_code == 200
    probe.wait_reached()
    seen = b.call("GET", "/api/extra").get_json()
    assert seen["task_id"] is not None
    assert seen["task"]["running"] is True
    assert seen["task"]["progress"] == 40.0
    assert namespace_data(b.sql.engine)["extra"] == {MARKER: seen["task_id"], "name": "extra"}
    probe.gate.set()
    probe.join()
    assert b.call("GET", "/api/extra").get_json()["task"]["complete"] is True


# -- bounded logs, coalesced writes ---------------------------------------------------


def test_logs_keep_the_newest_task_max_logs(env: Env) -> None:
    a, b = env.worker(SILO_TASK_MAX_LOGS=5), env.worker()
    assert a.store.task_max_logs == 5
    probe = env.probe()

    def target(task: BackgroundTask, state: dict[str, Any]) -> None:
        probe.task = task
        for i in range(20):
            task.log(f"line {i}")
        probe.reached.set()
        assert probe.gate.wait(WAIT)

    a.target = target
    a.start()
    probe.wait_reached()
    newest = [f"line {i}" for i in range(15, 20)]
    assert b.status()["task"]["logs"] == newest
    (row,) = task_rows(b.sql.engine)
    assert list(row.logs) == newest
    probe.gate.set()
    probe.join()
    assert b.status()["task"]["logs"] == newest
    with b.app.test_request_context("/api/status", headers={"X-Session-ID": SID}):
        b.app.preprocess_request()
        task: BackgroundTask = b.silo.state("proc")["task"]
        assert task.state.to_dict(max_logs=2)["logs"] == ["line 18", "line 19"]


class TaskUpdates(StatementLog):
    """Counts UPDATE statements on silo_tasks executed by an engine."""

    @property
    def count(self) -> int:
        return len(self.starting("UPDATE silo_tasks"))


def busy_loop(probe: Probe, clock: Clock, updates: int) -> Target:
    def target(task: BackgroundTask, state: dict[str, Any]) -> None:
        probe.task = task
        for i in range(1, updates + 1):
            clock.advance(0.25)
            task.update(i * 100 / updates, f"item {i}")
        probe.reached.set()
        assert probe.gate.wait(WAIT)

    return target


def test_progress_writes_from_a_busy_loop_are_coalesced(env: Env) -> None:
    clock = Clock()
    # The heartbeat thread runs on real time while this clock races ahead: a
    # timeout far beyond the fake run keeps "worker lost" out of this test.
    patient = {"SILO_TASK_HEARTBEAT_TIMEOUT": 10_000.0}
    a = env.worker(SILO_TASK_FLUSH_INTERVAL=100.0, **patient)
    b = env.worker(**patient)
    a.store.clock = clock
    b.store.clock = clock
    probe = env.probe()
    a.target = busy_loop(probe, clock, 1000)
    with TaskUpdates(a.sql) as updates:
        a.start()
        probe.wait_reached()
        live = b.status()
        probe.gate.set()
        probe.join()
    # 250 fake seconds at one write per 100 s: two coalesced writes, the final
    # one, and at most a couple of heartbeats.
    assert 1 <= updates.count <= 6, updates.count
    assert live["running"] is True
    assert live["task"]["progress"] >= 40.0  # coalesced, yet published
    done = b.status()
    assert done["complete"] is True
    assert done["task"]["progress"] == 100.0
    assert done["task"]["message"] == "item 1000"


def test_without_coalescing_every_update_is_written(env: Env) -> None:
    """The counterpart of the test above: the counter does see each write."""
    clock = Clock()
    a = env.worker(SILO_TASK_FLUSH_INTERVAL=0.0)
    a.store.clock = clock
    probe = env.probe()
    a.target = busy_loop(probe, clock, 200)
    with TaskUpdates(a.sql) as updates:
        a.start()
        probe.wait_reached()
        probe.gate.set()
        probe.join()
    assert updates.count >= 200


# -- lost workers --------------------------------------------------------------------


def insert_running_row(worker: Worker, task_id: str, heartbeat: float) -> None:
    with worker.sql.engine.begin() as conn:
        conn.execute(
            insert(tasks).values(
                id=task_id,
                sid=session_key(SID),
                name="proc",
                status="running",
                progress=30.0,
                message="working",
                logs=["started"],
                error=None,
                started_at=at(heartbeat - 5),
                finished_at=None,
                heartbeat_at=at(heartbeat),
            )
        )


def test_task_of_a_dead_worker_is_reported_and_recorded_failed(env: Env) -> None:
    clock = Clock()
    b = env.worker(SILO_TASK_HEARTBEAT_TIMEOUT=30.0)
    b.store.clock = clock
    task_id = b.status()["task_id"]
    insert_running_row(b, task_id, heartbeat=T0 - 10)  # its worker was SIGKILLed

    alive = b.status()
    assert alive["running"] is True
    assert alive["task"]["progress"] == 30.0
    refused = b.call("POST", "/api/reset")
    assert refused.status_code == 409  # still within the timeout: busy

    clock.advance(21)  # heartbeat now 31 s old
    lost = b.status()
    assert lost["running"] is False
    assert lost["failed"] is True
    assert lost["complete"] is False
    assert "worker" in lost["task"]["error"]
    assert "lost" in lost["task"]["error"]
    assert lost["task"]["message"].startswith("Failed: ")
    assert lost["task"]["finished_at"] == clock()
    (row,) = task_rows(b.sql.engine)
    assert row.status == "failed"
    assert row.error == lost["task"]["error"]
    assert row.finished_at is not None

    other = env.worker(SILO_TASK_HEARTBEAT_TIMEOUT=30.0)  # a later reader sees the record
    other.store.clock = lambda: T0  # even one whose clock lags behind
    assert other.status()["failed"] is True

    probe = env.probe()  # a lost task may be started again
    b.target = blocking_target(probe)
    assert b.start().status_code == 200
    probe.wait_reached()
    assert other.status()["running"] is True
    probe.gate.set()
    probe.join()
    assert b.call("POST", "/api/reset").status_code == 200


def test_a_live_workers_heartbeat_keeps_its_task_running(env: Env) -> None:
    clock = Clock()
    timeout = 0.4  # heartbeats every 0.1 s of real time; the clock decides staleness
    a = env.worker(SILO_TASK_HEARTBEAT_TIMEOUT=timeout)
    b = env.worker(SILO_TASK_HEARTBEAT_TIMEOUT=timeout)
    a.store.clock = clock
    b.store.clock = clock
    probe = env.probe()
    a.target = blocking_target(probe)
    beats = Heartbeats(a.sql)
    a.start()
    probe.wait_reached()
    with beats:
        for _ in range(4):  # 1.2 s of fake time, three times the timeout
            now = clock.advance(0.3)
            beats.wait_for(now)
            assert b.status()["running"] is True
    (row,) = task_rows(b.sql.engine)
    assert row.status == "running"
    probe.gate.set()
    probe.join()
    assert b.status()["complete"] is True


class Heartbeats:
    """Waits until a task row's heartbeat reaches a time (read from the table itself)."""

    def __init__(self, storage: SQLStorage) -> None:
        self.engine = storage.engine

    def latest(self) -> float:
        with self.engine.connect() as conn:
            beats = [b for b in conn.execute(select(tasks.c.heartbeat_at)).scalars() if b]
        return max((b.timestamp() for b in beats), default=0.0)

    def wait_for(self, timestamp: float) -> None:
        deadline = time.monotonic() + WAIT
        while self.latest() < timestamp:
            assert time.monotonic() < deadline, f"no heartbeat at {timestamp}"
            time.sleep(0.01)

    def __enter__(self) -> Heartbeats:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# -- writes from the task thread ----------------------------------------------------


@pytest.mark.parametrize("explicit_complete", [True, False], ids=["complete", "return"])
def test_task_thread_writes_persist_and_merge_with_requests(
    env: Env, explicit_complete: bool
) -> None:
    a, b = env.worker(), env.worker()
    probe = env.probe()

    def target(task: BackgroundTask, state: dict[str, Any]) -> None:
        probe.task = task
        task.update(10, "crunching")
        probe.reached.set()
        assert probe.gate.wait(WAIT)
        state["results"] = [{"row": 1, "label": "cat"}, {"row": 2, "label": "dog"}]
        if explicit_complete:
            task.complete("Classified 2 rows")

    a.target = target
    a.start()
    probe.wait_reached()
    # Meanwhile another worker changes another key of the same namespace.
    assert b.call("POST", "/api/note", json={"note": "keep me"}).status_code == 200
    probe.gate.set()
    probe.join()

    seen = b.status()
    assert seen["complete"] is True
    assert seen["results"] == [{"row": 1, "label": "cat"}, {"row": 2, "label": "dog"}]
    assert seen["note"] == "keep me"
    if explicit_complete:
        assert seen["task"]["message"] == "Classified 2 rows"
    stored = namespace_data(b.sql.engine)
    assert stored["results"][1]["label"] == "dog"
    assert stored["note"] == "keep me"


@pytest.mark.parametrize("changes_note", [False, True], ids=["reads", "changes-a-key"])
def test_a_run_seen_finished_in_a_request_brings_its_results_along(
    env: Env, changes_note: bool
) -> None:
    """A request reads the namespace, the run ends meanwhile, the request then reads the
    run's state: finished, with what the run wrote (the request's own key change kept)."""
    a, viewer = env.worker(), env.worker()
    probe = env.probe()
    read, finished = threading.Event(), threading.Event()

    @viewer.app.get("/api/status-late")
    def status_late() -> Any:
        ns = viewer.silo.state("proc")
        if changes_note:
            ns["note"] = "mine"
        read.set()
        assert finished.wait(WAIT)
        task: BackgroundTask = ns["task"]
        return jsonify(status=task.state.status, results=ns["results"], note=ns["note"])

    def target(task: BackgroundTask, state: dict[str, Any]) -> None:
        probe.task = task
        probe.reached.set()
        assert probe.gate.wait(WAIT)
        state["results"] = [{"row": 1}]

    a.target = target
    a.start()
    probe.wait_reached()
    answers: list[TestResponse] = []
    late = threading.Thread(target=lambda: answers.append(viewer.call("GET", "/api/status-late")))
    late.start()
    assert read.wait(WAIT)
    probe.gate.set()
    probe.join()  # the run's end (its results and its state) is committed
    finished.set()
    late.join(WAIT)
    assert answers[0].status_code == 200, answers[0].get_data(as_text=True)
    seen = answers[0].get_json()
    assert seen["status"] == "complete"
    assert seen["results"] == [{"row": 1}]
    assert seen["note"] == ("mine" if changes_note else "")
    stored = namespace_data(a.sql.engine)
    assert stored["results"] == [{"row": 1}]
    assert stored["note"] == ("mine" if changes_note else "")


# -- load-change-save outside a request ---------------------------------------------


def test_session_context_changes_state_outside_a_request(env: Env) -> None:
    a, b = env.worker(), env.worker()
    with a.silo.session(SID) as state:
        state["proc"]["note"] = "from a script"
        state["counter"]["n"] = 7
    seen = b.status()
    assert seen["note"] == "from a script"
    with b.store.transaction(SID) as state:
        assert state["counter"]["n"] == 7
        state["proc"]["results"] = ["done"]
    assert a.status()["results"] == ["done"]


def test_an_exception_inside_the_transaction_discards_every_change(env: Env) -> None:
    a = env.worker()
    assert a.call("POST", "/api/note", json={"note": "before"}).status_code == 200

    class Abort(Exception):
        pass

    def change_then_fail(state: dict[str, Any]) -> None:
        state["proc"]["note"] = "after"
        state["counter"]["n"] = 99
        raise Abort

    with pytest.raises(Abort), a.silo.session(SID) as state:
        change_then_fail(state)
    assert a.status()["note"] == "before"
    with a.store.transaction(SID) as state:
        assert state["counter"]["n"] == 0

    with pytest.raises(Abort), a.store.transaction(OTHER_SID):
        raise Abort
    assert not a.store.exists(OTHER_SID)  # nor was the session created


def test_concurrent_transactions_lose_no_increment(env: Env) -> None:
    a, b = env.worker(), env.worker()
    a.status()  # the session exists
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def increment(worker: Worker) -> None:
        try:
            start.wait(WAIT)
            for _ in range(50):
                with worker.store.transaction(SID) as state:
                    state["counter"]["n"] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=increment, args=(w,)) for w in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    with a.store.transaction(SID) as state:
        assert state["counter"]["n"] == 100
    assert namespace_data(b.sql.engine, "counter") == {"n": 100}


# -- reset ------------------------------------------------------------------------


def test_reset_is_refused_while_a_task_runs_then_clears_everything(env: Env) -> None:
    a, b = env.worker(), env.worker()
    upload = {"file": (io.BytesIO(b"col\n1\n2\n"), "data.csv", "text/csv")}
    assert a.call("POST", "/api/upload", data=upload).status_code == 200
    probe = env.probe()

    def target(task: BackgroundTask, state: dict[str, Any]) -> None:
        probe.task = task
        probe.reached.set()
        assert probe.gate.wait(WAIT)
        state["results"] = [1, 2]

    a.target = target
    a.start()
    probe.wait_reached()

    busy = b.call("POST", "/api/reset")
    assert busy.status_code == 409
    assert busy.is_json
    assert busy.get_json()["error"] == "session_busy"
    assert busy.headers["X-Session-ID"] == SID
    assert b.silo.file_store("uploads").list_files(SID) == ["data.csv"]
    assert b.status()["running"] is True

    probe.gate.set()
    probe.join()
    assert b.status()["results"] == [1, 2]
    uploads = b.silo.file_store("uploads")
    session_dir = uploads.session_dir(SID)

    assert b.call("POST", "/api/reset").status_code == 200
    fresh = a.status()
    assert fresh["results"] is None
    assert fresh["running"] is False
    assert fresh["complete"] is False
    assert task_rows(a.sql.engine) == []
    with a.sql.engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(files_table)).scalar_one()
    assert count == 0
    assert uploads.list_files(SID) == []
    assert uploads.get_path(SID, "data.csv") is None
    assert not _listdir(session_dir)


@pytest.mark.parametrize("held_at", ["touch", "running_task"], ids=["before-lock", "at-check"])
def test_a_reset_and_a_start_of_one_session_never_interleave(env: Env, held_at: str) -> None:
    """The reset is held before it locks the session, or at its check for a running task,
    while the start commits.

    Held before: the start commits first, and the reset, which checks under the lock,
    is refused (409). Held at the check: the start waits for the reset's lock (it cannot
    slip its run in between the check and the reset's delete), then runs against the
    fresh session or is refused. Never does a started run go on without its row.
    """
    a, b = env.worker(), env.worker()
    assert a.call("POST", "/api/note", json={"note": "before"}).status_code == 200
    probe = env.probe()
    a.target = blocking_target(probe)
    checked, go_on, start_sent = threading.Event(), threading.Event(), threading.Event()
    resetting = threading.local()

    def hold_the_reset(name: str, sql: str, values: Any) -> None:
        if name == held_at and getattr(resetting, "on", False):
            checked.set()
            assert go_on.wait(WAIT)

    def see_the_start(name: str, sql: str, values: Any) -> None:
        if name == "touch":
            start_sent.set()

    b.sql.statement_hook = hold_the_reset
    a.sql.statement_hook = see_the_start
    answers: dict[str, int] = {}

    def reset() -> None:
        resetting.on = True
        answers["reset"] = b.call("POST", "/api/reset").status_code

    def start() -> None:
        answers["start"] = a.start().status_code

    resetter = threading.Thread(target=reset)
    resetter.start()
    assert checked.wait(WAIT)
    starter = threading.Thread(target=start)
    starter.start()
    assert start_sent.wait(WAIT)  # its commit is under way (waiting for the reset's lock)
    starter.join(1.0)  # (before the fix it got through: then the reset deletes its row)
    go_on.set()
    resetter.join(WAIT)
    starter.join(WAIT)
    b.sql.statement_hook = a.sql.statement_hook = None

    rows = task_rows(a.sql.engine)
    if answers["start"] == 200:
        probe.wait_reached()
        assert [row.status for row in rows] == ["running"], answers
        assert b.status()["running"] is True
        probe.gate.set()
        probe.join()
        assert b.status()["complete"] is True  # its writes landed on its row
    else:
        assert answers["start"] == 409, answers
        assert rows == []
    if answers["reset"] == 200:
        assert b.status()["note"] == ""  # the reset ran (first)
    else:
        assert answers["reset"] == 409, answers
        assert answers["start"] == 200


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


# -- outside any session: flask-silo's in-memory task --------------------------------


def run_script(task: Any, *, fail: bool) -> None:
    """The same calls on a flask-silo task and on ours."""

    def target(t: Any) -> None:
        t.update(150, "over")
        t.update(-3)
        t.update(42.46, "working")
        for i in range(60):
            t.log(f"log {i}")
        if fail:
            raise RuntimeError("broken")

    task.start(target)
    task._thread.join(WAIT)
    assert not task._thread.is_alive()


@pytest.mark.parametrize("fail", [False, True], ids=["completes", "fails"])
def test_task_outside_a_session_behaves_as_flask_silo(env: Env, fail: bool) -> None:
    flask_silo = pytest.importorskip("flask_silo")
    a = env.worker()
    a.status()
    ours = BackgroundTask("standalone")
    theirs = flask_silo.BackgroundTask("standalone")
    assert ours.task_id is None
    assert ours.reference() is None
    with TaskUpdates(a.sql) as updates:
        for task in (ours, theirs):
            run_script(task, fail=fail)
    assert updates.count == 0
    assert len(updates.statements) == 0  # no database involved at all
    assert task_rows(a.sql.engine) == []

    mine, original = ours.state, theirs.state
    for key in ("started_at", "finished_at"):
        assert isinstance(getattr(mine, key), float)
    assert mine.finished_at is not None
    assert mine.started_at is not None
    assert mine.finished_at >= mine.started_at
    strip = {"started_at": None, "finished_at": None}
    assert {**mine.to_dict(), **strip} == {**original.to_dict(), **strip}
    assert {**mine.to_dict(max_logs=3), **strip} == {**original.to_dict(max_logs=3), **strip}
    assert mine.logs == original.logs
    assert len(mine.logs) == 60  # not bounded: nothing is stored
    assert ours.is_running is theirs.is_running is False
    assert ours.is_complete is theirs.is_complete
    assert ours.is_failed is theirs.is_failed is fail

    ours.reset()
    theirs.reset()
    assert ours.state.to_dict() == theirs.state.to_dict()
