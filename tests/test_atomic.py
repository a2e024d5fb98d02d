"""Atomic mode: a request's silo work and the host's db.session changes, one transaction.

A Flask-SQLAlchemy shop keeps its orders in silo's database and gives silo
``SQLStorage(db, atomic=True)``. Every test runs on SQLite and on PostgreSQL.
What is counted (connections, COMMITs) is observed with SQLAlchemy's pool and
engine events on the host's engine, the path under test unchanged. The
gunicorn parts (SIGKILL before the commit, concurrent duplicates) are in
``tests/process/test_atomic_gunicorn.py``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from flask import Flask, Response, jsonify, request, stream_with_context
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker

from flask_silo_sql import BackgroundTask, Silo, SQLStorage, alembic_include_name
from flask_silo_sql.sql.models import idempotency_keys, tasks
from flask_silo_sql.tasks import TaskRunner

HEADER = "X-Session-ID"
KEY = "Idempotency-Key"
ALICE = "alice-0000000000000000"


class Shop:
    """A Flask-SQLAlchemy app whose views add orders and change silo state."""

    def __init__(
        self, url: str, *, runner: str = "thread", atomic: bool = True, executor: str = "auto"
    ) -> None:
        class Base(DeclarativeBase):
            pass

        self.db = db = SQLAlchemy(model_class=Base)

        class Order(db.Model):  # type: ignore[name-defined,misc]
            __tablename__ = "shop_orders"
            id: Mapped[int] = mapped_column(primary_key=True)
            item: Mapped[str] = mapped_column(String(64), unique=True)

        self.Order = Order
        self.app = app = Flask(__name__)
        app.config.update(
            SQLALCHEMY_DATABASE_URI=url,
            SILO_TASK_RUNNER=runner,
            SILO_TASK_POLL_INTERVAL=0.05,
        )
        db.init_app(app)
        with app.app_context():
            db.drop_all()
            db.create_all()  # the host's usual fixture: only its own tables
            self.engine: Engine = db.engine
        self.storage = SQLStorage(db, atomic=atomic, executor=executor)  # type: ignore[arg-type]
        self.silo = silo = Silo(app, storage=self.storage, auto_cleanup=False)
        silo.register("charges", lambda: {"ids": []})
        silo.register("job", lambda: {"task": BackgroundTask("ship"), "seen": None})
        self.fail = False
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        engine = self.engine

        def add_order() -> int:
            order = Order(item=request.args.get("item", uuid.uuid4().hex))
            db.session.add(order)
            db.session.flush()
            charges = silo.state("charges")
            charges["ids"].append(order.id)
            return int(order.id)

        def downstream() -> None:
            if self.gate is not None:
                self.entered.set()
                assert self.gate.wait(30)
            if self.fail:
                raise RuntimeError("the payment provider is down")

        @app.post("/api/pay")
        @silo.idempotent()
        def pay() -> tuple[Response, int]:
            order = add_order()
            downstream()
            return jsonify(order=order, mark=uuid.uuid4().hex), 201

        @app.post("/api/pay-commit")
        @silo.idempotent()
        def pay_commit() -> tuple[Response, int]:
            order = add_order()
            db.session.commit()  # atomic mode: a flush; the request commits once
            downstream()
            return jsonify(order=order), 201

        @app.post("/api/order")
        def order() -> tuple[Response, int]:
            number = add_order()
            downstream()
            return jsonify(order=number), 201

        @app.post("/api/order-rolled-back")
        def order_rolled_back() -> tuple[Response, int]:
            add_order()
            db.session.rollback()  # the view gives up: silo saves nothing of it
            return jsonify(error="declined"), 402

        @silo.task(name="ship", retries=0)
        def ship(task: BackgroundTask, state: dict[str, Any], order_id: int) -> None:
            with engine.connect() as conn:
                found = conn.execute(
                    text("SELECT count(*) FROM shop_orders WHERE id = :id"), {"id": order_id}
                ).scalar()
            state["seen"] = found

        @app.post("/api/order-and-ship")
        def order_and_ship() -> tuple[Response, int]:
            number = add_order()
            job = silo.state("job")
            job["task"].start(ship, job, number)
            downstream()
            return jsonify(order=number), 201

        @app.post("/api/login")
        def login() -> Response:
            number = add_order()
            new = silo.rotate()
            silo.state("charges")["ids"].append(-number)  # under the new SID
            downstream()
            return jsonify(sid=new)

        @app.post("/api/order-connection-lost")
        def order_connection_lost() -> tuple[Response, int]:
            number = add_order()
            pid = db.session.execute(text("SELECT pg_backend_pid()")).scalar()
            with engine.connect() as other:  # the database drops the request's connection
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            return jsonify(order=number), 201

        @app.get("/api/stream")
        def stream() -> Response:
            number = add_order()

            def body() -> Iterator[bytes]:
                yield b"order "
                silo.state("charges")["ids"].append(-number)  # changed while streaming
                yield str(number).encode()

            return Response(stream_with_context(body()))

        @app.errorhandler(IntegrityError)
        def duplicate(exc: IntegrityError) -> tuple[Response, int]:
            return jsonify(error="duplicate order"), 409

    def client(self) -> FlaskClient:
        return self.app.test_client()

    def orders(self) -> int:
        with self.engine.connect() as conn:
            table = self.Order.__table__
            return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)

    def charges(self, sid: str = ALICE) -> list[int]:
        with self.app.app_context(), self.silo.session(sid) as state:
            return list(state["charges"]["ids"])

    def count(self, table: Any) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


@pytest.fixture
def shop(silo_url: str) -> Iterator[Shop]:
    made = Shop(silo_url)
    yield made
    made.silo.stop()
    made.engine.dispose()


@pytest.fixture
def make_shop(silo_url: str) -> Iterator[Callable[..., Shop]]:
    made: list[Shop] = []

    def make(**options: Any) -> Shop:
        made.append(Shop(silo_url, **options))
        return made[-1]

    yield make
    for one in made:
        one.silo.stop()
        one.engine.dispose()


def post(client: FlaskClient, path: str, key: str | None = None) -> Any:
    headers = {HEADER: ALICE}
    if key is not None:
        headers[KEY] = key
    return client.post(path, headers=headers)


# -- idempotency covers the host's writes ---------------------------------------------------


@pytest.mark.parametrize("path", ["/api/pay", "/api/pay-commit"])
def test_a_payment_that_failed_after_its_order_is_retried_into_exactly_one_order(
    shop: Shop, path: str
) -> None:
    client = shop.client()
    shop.fail = True
    assert post(client, path, "pay-1").status_code == 500
    assert shop.orders() == 0, "the failed run's order was committed"
    assert shop.count(idempotency_keys) == 0  # the claim went with it: a retry runs again
    shop.fail = False
    first = post(client, path, "pay-1")
    assert first.status_code == 201
    again = post(client, path, "pay-1")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.data == first.data
    assert shop.orders() == 1
    assert shop.charges() == [first.json["order"]]


def test_with_the_core_executor_observers_see_silos_statements_in_the_transaction(
    make_shop: Callable[..., Shop],
) -> None:
    shop = make_shop(executor="core")
    seen: list[tuple[int, str]] = []
    here = threading.get_ident()  # the request's (the task runner polls beside it)

    def observe(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() == here:
            seen.append((id(conn.connection.dbapi_connection), statement.split()[0].upper()))

    event.listen(shop.engine, "before_cursor_execute", observe)
    try:
        shop.fail = True
        assert post(shop.client(), "/api/pay", "core").status_code == 500
        assert (shop.orders(), shop.count(idempotency_keys)) == (0, 0)
        shop.fail = False
        seen.clear()
        assert post(shop.client(), "/api/pay", "core").status_code == 201
    finally:
        event.remove(shop.engine, "before_cursor_execute", observe)
    assert shop.orders() == 1
    assert len({conn for conn, _ in seen}) == 1  # the host's INSERT and silo's: one connection
    assert len(seen) >= 4  # the host's INSERT, silo's claim, read and stored response
    assert "INSERT" in {verb for _, verb in seen}


def test_the_stored_response_names_an_order_that_was_committed(shop: Shop) -> None:
    """A view that only flushes its order: its 201 and the order commit together."""
    client = shop.client()
    answer = post(client, "/api/pay", "flush-only")
    assert answer.status_code == 201
    with shop.engine.connect() as conn:
        ids = [row[0] for row in conn.execute(text("SELECT id FROM shop_orders"))]
    assert ids == [answer.json["order"]]


def test_a_duplicate_in_flight_waits_for_the_first_and_replays_it(
    shop: Shop, silo_url: str
) -> None:
    if silo_url.startswith("sqlite"):
        pytest.skip("SQLite: one writer at a time; the duplicate waits on the database lock")
    shop.gate = threading.Event()
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(post(shop.client(), "/api/pay", "k")))
    first.start()
    assert shop.entered.wait(30)
    second_done = threading.Event()

    def second() -> None:
        results.append(post(shop.client(), "/api/pay", "k"))
        second_done.set()

    threading.Thread(target=second).start()
    assert not second_done.wait(0.3), "the duplicate ran its view beside the first"
    shop.gate.set()
    first.join(30)
    assert second_done.wait(30)
    assert sorted(r.status_code for r in results) == [201, 201]
    assert results[0].data == results[1].data
    assert shop.orders() == 1


# -- one connection, one COMMIT -----------------------------------------------------------------


class PoolWatch:
    """Checkouts from the host engine's pool and COMMITs on its connections, made by
    this thread (the request's, under the test client; the task runner polls beside)."""

    def __init__(self, engine: Engine) -> None:
        self.checkouts = 0
        self.commits = 0
        self.engine = engine
        self.thread = threading.get_ident()
        event.listen(engine, "checkout", self._checkout)
        event.listen(engine, "commit", self._commit)

    def _checkout(self, *args: Any) -> None:
        if threading.get_ident() == self.thread:
            self.checkouts += 1

    def _commit(self, *args: Any) -> None:
        if threading.get_ident() == self.thread:
            self.commits += 1

    def close(self) -> None:
        event.remove(self.engine, "checkout", self._checkout)
        event.remove(self.engine, "commit", self._commit)


@pytest.mark.parametrize("path", ["/api/order", "/api/pay"])
def test_an_atomic_request_uses_one_pooled_connection_and_one_commit(shop: Shop, path: str) -> None:
    client = shop.client()
    post(client, path, "warm")  # the session exists; the pool holds a connection
    watch = PoolWatch(shop.engine)
    try:
        answer = post(client, path, "counted")
    finally:
        watch.close()
    assert answer.status_code == 201
    assert (watch.checkouts, watch.commits) == (1, 1)
    assert shop.orders() == 2
    assert len(shop.charges()) == 2


def test_without_atomic_mode_the_same_request_takes_two_connections(
    make_shop: Callable[..., Shop],
) -> None:
    """The non-atomic mode (the default) keeps silo's own connection and commit (on
    SQLite its commit would wait for the host's flush to let go of the write lock)."""
    shop = make_shop(atomic=False)
    if shop.engine.dialect.name == "sqlite":
        pytest.skip("SQLite: silo's second connection waits on the host's write lock")
    client = shop.client()
    post(client, "/api/order")
    watch = PoolWatch(shop.engine)
    try:
        post(client, "/api/order")
    finally:
        watch.close()
    assert watch.checkouts == 2


def test_a_connection_lost_before_the_commit_is_silos_503_and_keeps_nothing(shop: Shop) -> None:
    if shop.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL: a server that drops the request's connection")
    client = shop.client()
    post(client, "/api/order")
    answer = post(client, "/api/order-connection-lost")
    assert answer.status_code == 503
    assert answer.json["error"] == "storage_unavailable"
    assert (shop.orders(), len(shop.charges())) == (1, 1)
    assert post(client, "/api/order").status_code == 201  # the pool recovered
    assert shop.orders() == 2


# -- the view's own commit and rollback --------------------------------------------------------


def test_commit_inside_an_atomic_view_joins_the_requests_transaction(shop: Shop) -> None:
    client = shop.client()
    shop.fail = True
    assert post(client, "/api/pay-commit", "c").status_code == 500
    assert shop.orders() == 0
    shop.fail = False
    assert post(client, "/api/pay-commit", "c").status_code == 201
    assert shop.orders() == 1


def test_a_view_that_rolls_back_the_session_keeps_nothing_of_silos(shop: Shop) -> None:
    client = shop.client()
    post(client, "/api/order")  # the session exists
    assert post(client, "/api/order-rolled-back").status_code == 402
    assert shop.orders() == 1
    assert len(shop.charges()) == 1


def test_a_raising_view_rolls_back_host_rows_and_state_together(shop: Shop) -> None:
    client = shop.client()
    post(client, "/api/order")
    shop.fail = True
    assert post(client, "/api/order").status_code == 500
    assert shop.orders() == 1
    assert len(shop.charges()) == 1


def test_the_hosts_commit_error_is_the_hosts_and_silo_saves_nothing(shop: Shop) -> None:
    client = shop.client()
    assert post(client, "/api/order?item=once").status_code == 201
    # The order's flush in the view fails: the app's own handler answers it.
    assert post(client, "/api/order?item=once").status_code == 409
    assert shop.orders() == 1
    assert len(shop.charges()) == 1


# -- tasks with the rows they are about ------------------------------------------------------


def wait_for(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_task_started_by_a_failed_view_has_no_row_and_never_runs(shop: Shop) -> None:
    client = shop.client()
    shop.fail = True
    assert post(client, "/api/order-and-ship").status_code == 500
    shop.fail = False
    assert shop.orders() == 0
    assert shop.count(tasks) == 0
    assert post(client, "/api/order").status_code == 201  # a later request of the session
    with shop.app.app_context(), shop.silo.session(ALICE) as state:
        assert state["job"]["seen"] is None
        assert not state["job"]["task"].is_running


def test_a_task_started_with_its_order_runs_after_the_commit_and_sees_it(shop: Shop) -> None:
    client = shop.client()
    answer = post(client, "/api/order-and-ship")
    assert answer.status_code == 201

    def seen() -> Any:
        with shop.app.app_context(), shop.silo.session(ALICE) as state:
            return state["job"]["seen"]

    assert wait_for(seen) == 1
    assert shop.orders() == 1


@pytest.mark.parametrize("fail", [True, False])
def test_a_queued_task_row_commits_with_its_order_or_not_at_all(
    make_shop: Callable[..., Shop], fail: bool
) -> None:
    shop = make_shop(runner="worker")
    shop.fail = fail
    status = post(shop.client(), "/api/order-and-ship").status_code
    assert status == (500 if fail else 201)
    assert (shop.orders(), shop.count(tasks)) == ((0, 0) if fail else (1, 1))
    if fail:
        return
    runner = TaskRunner(shop.silo.store, poll_interval=0.05)  # a worker process's runner
    runner.start()
    try:

        def seen() -> Any:
            with shop.app.app_context(), shop.silo.session(ALICE) as state:
                return state["job"]["seen"]

        assert wait_for(seen) == 1  # the worker's run saw the order
    finally:
        runner.stop()


# -- outside a request -------------------------------------------------------------------------


def test_a_block_outside_a_request_is_one_transaction_with_a_named_session(shop: Shop) -> None:
    Session = scoped_session(sessionmaker(bind=shop.engine))
    Order = shop.Order
    with shop.app.app_context():

        def failing_script() -> None:
            with shop.silo.session(ALICE, host=Session()) as state:
                Session.add(Order(item="script-1"))
                state["charges"]["ids"].append(-1)
                raise RuntimeError("the script fails")

        with pytest.raises(RuntimeError):
            failing_script()
        assert shop.orders() == 0
        assert shop.charges() == []
        session = Session()
        with shop.silo.session(ALICE, host=session) as state:
            session.add(Order(item="script-2"))
            session.commit()  # a flush: the block commits once at its end
            state["charges"]["ids"].append(-2)
        assert shop.orders() == 1
        assert shop.charges() == [-2]
    Session.remove()


def test_a_rotation_is_part_of_the_requests_transaction(shop: Shop) -> None:
    client = shop.client()
    post(client, "/api/order")
    shop.fail = True
    assert post(client, "/api/login").status_code == 500
    assert (shop.orders(), len(shop.charges())) == (1, 1)  # the old SID keeps its session
    shop.fail = False
    watch = PoolWatch(shop.engine)
    try:
        answer = post(client, "/api/login")
    finally:
        watch.close()
    assert answer.status_code == 200
    assert (watch.checkouts, watch.commits) == (1, 1)
    new = answer.json["sid"]
    assert shop.orders() == 2
    assert len(shop.charges(new)) == 3


def test_a_streamed_response_commits_before_its_body_and_again_after_it(shop: Shop) -> None:
    client = shop.client()
    answer = client.get("/api/stream", headers={HEADER: ALICE})
    number = int(answer.data.split()[1])
    assert shop.orders() == 1
    assert shop.charges() == [number, -number]


# -- plain SQLAlchemy ---------------------------------------------------------------------------


def test_a_plain_scoped_session_shares_the_requests_transaction(silo_url: str) -> None:
    """Without Flask-SQLAlchemy: SQLStorage(engine, atomic=a scoped_session)."""
    engine = create_engine(silo_url)
    Session = scoped_session(sessionmaker(bind=engine))
    notes = MetaData()
    Table("notes", notes, Column("id", Integer, primary_key=True), Column("body", String(20)))
    notes.drop_all(engine)
    notes.create_all(engine)
    app = Flask(__name__)
    app.teardown_appcontext(lambda exc: Session.remove())
    silo = Silo(app, storage=SQLStorage(engine, atomic=Session), auto_cleanup=False)
    silo.register("notes", lambda: {"count": 0})

    @app.post("/api/note")
    def note() -> Response:
        Session.execute(text("INSERT INTO notes (body) VALUES ('x')"))
        silo.state("notes")["count"] += 1
        if request.args.get("fail"):
            raise RuntimeError("failed after the insert")
        return jsonify(ok=True)

    client = app.test_client()
    assert post(client, "/api/note").status_code == 200
    assert post(client, "/api/note?fail=1").status_code == 500
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM notes")).scalar() == 1
    with app.app_context(), silo.session(ALICE) as state:
        assert state["notes"]["count"] == 1
    silo.stop()
    notes.drop_all(engine)  # (the module's PostgreSQL database is shared)
    engine.dispose()


# -- what the host keeps ------------------------------------------------------------------------


def test_the_hosts_create_all_and_autogenerate_are_unaffected(shop: Shop) -> None:
    """The shop's fixture ran db.create_all() on silo's database; after atomic requests,
    the host's autogenerate (with silo's filter) sees its own tables and nothing else."""
    assert post(shop.client(), "/api/pay", "k").status_code == 201
    with shop.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_name": alembic_include_name}
        )
        diffs = compare_metadata(context, shop.db.metadata)
    assert diffs == []


def test_outside_requests_the_hosts_session_is_its_own(shop: Shop) -> None:
    """Atomic mode takes the host's session only in API requests (and blocks that name
    it): elsewhere its commit commits."""
    with shop.app.app_context():
        shop.db.session.add(shop.Order(item="admin"))
        shop.db.session.commit()
    assert shop.orders() == 1


# -- what is refused, clearly ------------------------------------------------------------------


def test_atomic_needs_a_session_to_share(silo_url: str) -> None:
    with pytest.raises(TypeError, match="Flask-SQLAlchemy"):
        SQLStorage(silo_url, atomic=True)
    with pytest.raises(TypeError, match="scoped_session"):
        SQLStorage(silo_url, atomic=sessionmaker())
