"""Durable runs in one process, on both databases: the row a durable
start writes, fencing by attempt, retries, lapsed leases, hand-backs and claims.

The processes of ``tests/test_durable.py`` show the same behaviour end to end; these
tests look at each piece through :class:`~flask_silo_sql.SessionStore`, a
:class:`~flask_silo_sql.TaskRunner` and the tables.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, update
from support import StatementLog, at

from flask_silo_sql import (
    BackgroundTask,
    SessionStore,
    SQLStorage,
    TaskLeaseLost,
    TaskRunner,
    session_key,
)
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import namespaces, tasks
from flask_silo_sql.tasks import PROCESS, TaskSpec, mark_registered

SID = "durable-rows-session-0001"
WAIT = 20.0


def poll(what: str, probe: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def other(silo_url: str) -> Iterator[Engine]:
    """Another client of the database (what another process sees and does)."""
    engine = make_engine(silo_url)
    yield engine
    engine.dispose()


Make = Callable[..., SessionStore]


@pytest.fixture
def make_store(silo_url: str, executor: Any) -> Iterator[Make]:
    made: list[tuple[SessionStore, list[TaskRunner]]] = []

    def make(**settings: Any) -> SessionStore:
        store = SessionStore(storage=SQLStorage(silo_url, executor=executor))
        store.heartbeat_timeout = settings.pop("heartbeat_timeout", 30.0)
        store.task_flush_interval = 0.0
        for key, value in settings.items():
            setattr(store, key, value)
        store.register_namespace("job", lambda: {"task": BackgroundTask("job"), "result": None})
        made.append((store, []))
        return store

    yield make
    for store, runners in made:
        for runner in runners:
            runner.stop()
        storage = store.storage
        assert isinstance(storage, SQLStorage)
        storage.dispose()


def register(store: SessionStore, fn: Callable[..., Any], **options: Any) -> None:
    spec = TaskSpec(fn.__name__, fn, options.get("retries"), options.get("retry_delay", 0.0))
    store.registry.add_task(spec)
    mark_registered(fn, spec)


def namespace(store: SessionStore, sid: str = SID) -> dict[str, Any]:
    unit = store.unit(sid)
    value = unit.namespace("job")
    unit.commit()
    unit.close()
    return value


def row(engine: Engine, sid: str = SID) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(tasks).where(tasks.c.sid == session_key(sid))).one()


def stored_result(engine: Engine, sid: str = SID) -> Any:
    with engine.connect() as conn:
        data = conn.execute(
            select(namespaces.c.data).where(
                namespaces.c.sid == session_key(sid), namespaces.c.name == "job"
            )
        ).scalar_one()
    return data["result"]


def test_a_durable_start_records_the_function_its_arguments_and_a_lease(
    make_store: Make, other: Engine
) -> None:
    store = make_store()
    gate = threading.Event()

    def crunch(task: BackgroundTask, state: dict[str, Any], rows: int, *, label: str) -> None:
        assert gate.wait(WAIT)
        state["result"] = {"rows": rows, "label": label, "attempt": task.attempt}

    register(store, crunch, retries=2)
    ns = namespace(store)
    ns["task"].start(crunch, ns, 3, label="x")
    started = row(other)
    assert started.status == "running"
    assert started.target == "crunch"
    assert started.args == {"args": [{"__silo_namespace__": "job"}, 3], "kwargs": {"label": "x"}}
    assert (started.attempt, started.max_attempts, started.namespace) == (1, 3, "job")
    assert started.worker == PROCESS.id
    assert started.lease_expires_at > started.heartbeat_at
    gate.set()
    poll("completion", lambda: row(other).status == "complete")
    assert stored_result(other) == {"rows": 3, "label": "x", "attempt": 1}
    state = ns["task"].state.to_dict()
    assert (state["attempt"], state["last_error"]) == (1, None)


def test_a_registered_task_with_arguments_that_are_not_json_is_refused(
    make_store: Make, other: Engine
) -> None:
    store = make_store()

    def crunch(task: BackgroundTask, value: Any) -> None:
        pass

    register(store, crunch)
    ns = namespace(store)
    with pytest.raises(TypeError, match="must be JSON"):
        ns["task"].start(crunch, {1, 2})
    assert not ns["task"].is_running
    with other.connect() as conn:
        assert conn.execute(select(tasks)).first() is None


def test_an_attempt_whose_lease_was_taken_writes_nothing_and_finds_out(
    make_store: Make, other: Engine
) -> None:
    store = make_store()
    gate = threading.Event()
    seen: list[BaseException] = []

    def crunch(task: BackgroundTask, state: dict[str, Any]) -> None:
        assert gate.wait(WAIT)
        state["result"] = "from the stale attempt"
        try:
            task.update(50, "still here?")
            task.update(60, "again")
        except TaskLeaseLost as exc:
            seen.append(exc)
            raise

    register(store, crunch)
    ns = namespace(store)
    task: BackgroundTask = ns["task"]
    task.start(crunch, ns)
    with other.begin() as conn:  # another process claimed the run as attempt 2
        conn.execute(update(tasks).values(attempt=2, message="attempt 2 runs"))
    gate.set()
    assert task._thread is not None
    task._thread.join(WAIT)
    assert seen, "the stale attempt never found out"
    assert task.lease_lost
    after = row(other)
    assert (after.status, after.attempt, after.message) == ("running", 2, "attempt 2 runs")
    assert not _has_row(other) or stored_result(other) is None  # rolled back with the refusal


def _has_row(engine: Engine) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(namespaces.c.sid)).first() is not None


def test_a_run_that_raises_is_retried_by_a_runner_then_fails_with_its_last_error(
    make_store: Make, other: Engine
) -> None:
    store = make_store()
    attempts: list[int] = []

    def flaky(task: BackgroundTask, state: dict[str, Any], succeed_on: int) -> None:
        attempts.append(task.attempt)
        if task.attempt < succeed_on:
            raise RuntimeError(f"attempt {task.attempt} broke")
        state["result"] = task.attempt

    register(store, flaky, retries=2)
    runner = TaskRunner(store, poll_interval=0.05)
    runner.start()
    try:
        ns = namespace(store)
        ns["task"].start(flaky, ns, 3)
        poll("completion", lambda: row(other).status == "complete")
        assert attempts == [1, 2, 3]
        assert stored_result(other) == 3
        other_sid = SID + "x"
        ns2 = namespace(store, other_sid)
        ns2["task"].start(flaky, ns2, 99)
        poll("failure", lambda: row(other, other_sid).status == "failed")
    finally:
        runner.stop()
    failed = row(other, other_sid)
    assert (failed.error, failed.attempt) == ("attempt 3 broke", 3)
    state = namespace(store, other_sid)["task"].state
    assert state.error == "attempt 3 broke"
    assert state.running is False


def insert_lapsed(engine: Engine, store: SessionStore, sid: str, target: str, **values: Any) -> str:
    ns = namespace(store, sid)  # the session and its task's ID
    task_id = ns["task"].task_id
    now = store.now()
    with engine.begin() as conn:
        conn.execute(
            insert(tasks).values(
                id=task_id, sid=session_key(sid), name="job", status="running", progress=40.0,
                message="was working", logs=["started"], error=None,
                started_at=at(now - 60), heartbeat_at=at(now - 50), namespace="job",
                target=target, args={"args": [{"__silo_namespace__": "job"}], "kwargs": {}},
                attempt=1, max_attempts=values.get("max_attempts", 3), retry_delay=0.0,
                lease_expires_at=at(now - 20), worker="gone:1:dead",
                checkpoint=values.get("checkpoint"),
            )
        )  # fmt: skip
    return str(task_id)


def test_a_lapsed_lease_is_claimed_as_the_next_attempt_from_its_checkpoint(
    make_store: Make, other: Engine
) -> None:
    store = make_store()

    def resume(task: BackgroundTask, state: dict[str, Any]) -> None:
        state["result"] = {"attempt": task.attempt, "from": task.last_checkpoint}

    register(store, resume)
    insert_lapsed(other, store, SID, "resume", checkpoint={"done": 7})
    assert namespace(store)["task"].is_running  # lapsed, attempts left: it is not over
    runner = TaskRunner(store, poll_interval=0.05)
    runner.start()
    try:
        poll("completion", lambda: row(other).status == "complete")
    finally:
        runner.stop()
    assert stored_result(other) == {"attempt": 2, "from": {"done": 7}}
    assert row(other).logs == ["started"]


def test_a_lapsed_lease_with_no_attempt_left_is_failed_as_lost(
    make_store: Make, other: Engine
) -> None:
    store = make_store()

    def resume(task: BackgroundTask, state: dict[str, Any]) -> None:
        raise AssertionError("must not run again")

    register(store, resume)
    insert_lapsed(other, store, SID, "resume", max_attempts=1)
    state = namespace(store)["task"].state
    assert state.running is False
    assert state.error is not None
    assert "worker lost" in state.error
    assert row(other).status == "failed"


def test_a_runner_fails_an_exhausted_lapsed_run_unread_and_drains_a_backlog_cheaply(
    make_store: Make, other: Engine
) -> None:
    """No reader needed: the runner itself fails a run whose lease lapsed with no attempt
    left. A runner of concurrency 1 drains a backlog one run per claim (a claim never takes
    more than it asks for), and does not pay that failing statement for every claim."""
    queued = make_store(task_runner="worker")

    def quick(task: BackgroundTask, state: dict[str, Any]) -> None:
        state["result"] = task.attempt

    def resume(task: BackgroundTask, state: dict[str, Any]) -> None:
        raise AssertionError("must not run again")

    register(queued, quick)
    sids = [f"{SID}-{i:03d}" for i in range(12)]
    for sid in sids:
        ns = namespace(queued, sid)
        ns["task"].start(quick, ns)
    worker_store = make_store()
    register(worker_store, quick)
    register(worker_store, resume)
    insert_lapsed(other, worker_store, SID, "resume", max_attempts=1)
    runner = TaskRunner(worker_store, concurrency=1, poll_interval=0.02)
    storage = worker_store.storage
    assert isinstance(storage, SQLStorage)
    with StatementLog(storage) as log:
        runner.start()
        try:
            poll(
                "the backlog and the exhausted run",
                lambda: all(row(other, sid).status == "complete" for sid in sids)
                and row(other).status == "failed",
            )
        finally:
            runner.stop()
    assert "worker lost" in row(other).error
    assert log.names.count("claim_runs") >= len(sids)  # one run per claim: its concurrency
    assert log.names.count("fail_exhausted") < len(sids) / 2


def test_two_claimers_never_take_one_run_twice(make_store: Make, other: Engine) -> None:
    queued = make_store(task_runner="worker")
    ran: list[str] = []
    lock = threading.Lock()

    def quick(task: BackgroundTask, state: dict[str, Any]) -> None:
        with lock:
            ran.append(str(task.task_id))
        state["result"] = task.attempt

    register(queued, quick)
    sids = [f"{SID}-{i:03d}" for i in range(30)]
    for sid in sids:
        ns = namespace(queued, sid)
        ns["task"].start(quick, ns)
        assert ns["task"].state.waiting == "queued"
    assert not ran  # only queued here
    stores = [make_store(), make_store()]
    runners = [TaskRunner(s, concurrency=4, poll_interval=0.02) for s in stores]
    for s in stores:
        register(s, quick)
    for runner in runners:
        runner.start()
    try:
        poll(
            "every run",
            lambda: all(row(other, sid).status == "complete" for sid in sids),
            timeout=60,
        )
    finally:
        handed = [runner.stop() for runner in runners]
    assert sorted(ran) == sorted(set(ran))
    assert len(ran) == len(sids)
    assert all(row(other, sid).attempt == 1 for sid in sids)
    assert handed == [0, 0]


def test_a_stopping_runner_hands_its_runs_back_without_using_a_retry(
    make_store: Make, other: Engine
) -> None:
    store = make_store(task_runner="worker")
    gate = threading.Event()

    def slow(task: BackgroundTask, state: dict[str, Any]) -> None:
        gate.wait(WAIT)

    register(store, slow, retries=0)
    ns = namespace(store)
    ns["task"].start(slow, ns)
    worker_store = make_store()
    register(worker_store, slow, retries=0)
    runner = TaskRunner(worker_store, concurrency=1, poll_interval=0.02)
    runner.start()
    poll("the claim", lambda: row(other).attempt == 1)
    assert runner.stop(grace=0.1) == 1
    back = row(other)
    assert (back.status, back.attempt, back.max_attempts, back.worker) == ("queued", 1, 2, None)
    gate.set()
    assert ns["task"].state.waiting == "queued"
