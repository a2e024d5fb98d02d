"""@silo.idempotent through Flask's test client: keys, replays, failures, leases, expiry.

Every test runs on SQLite and on PostgreSQL (on the default executor: the
storage contract holds both executors to the same statements). Time is an
injected clock (leases, ttl); requests that must overlap run in threads held at
an event. Statements are observed at the storage's statement hook, the path
under test unchanged. The process-level tests (gunicorn, SIGKILL) are in
``process/test_idempotency.py``.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask, Response, g, jsonify, request, stream_with_context
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from support import Clock, Recorder, StatementLog

from flask_silo_sql import (
    IdempotencyUnsupported,
    InMemoryStorage,
    Silo,
    SQLStorage,
    session_key,
)
from flask_silo_sql.errors import IdempotencyKeyInvalid, SessionExpired
from flask_silo_sql.idempotency import Claim, KeyRequest, StoredResponse, parse_key
from flask_silo_sql.sql.models import idempotency_keys, namespaces

HEADER = "X-Session-ID"
KEY = "Idempotency-Key"
ALICE = "alice-0000000000000000"
BOB = "bob-00000000000000000000"
LEASE = 30.0
TTL = 3600.0


class KeysApp:
    """An app whose views change state under @silo.idempotent; it counts their runs."""

    def __init__(self, url: str, executor: str, **config: Any) -> None:
        self.storage = SQLStorage(url, executor=executor)  # type: ignore[arg-type]
        self.app = Flask(__name__)
        self.app.config.update(SILO_IDEMPOTENCY_LEASE=LEASE, **config)
        self.silo = silo = Silo(self.app, storage=self.storage, auto_cleanup=False, ttl=7200)
        self.clock = Clock()
        silo.store.clock = self.clock
        self.runs: list[str] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        silo.register("counter", lambda: {"n": 0})
        app = self.app

        def run() -> str:
            self.runs.append(request.path)
            if self.gate is not None:
                self.entered.set()
                assert self.gate.wait(30)
            return uuid.uuid4().hex  # a replay shows this run's mark, not a new one

        @app.post("/api/inc")
        @silo.idempotent(ttl=TTL)
        def inc() -> Response:
            mark = run()
            state = silo.state("counter")
            state["n"] += 1
            return jsonify(n=state["n"], run=mark, body=request.get_data(as_text=True))

        @app.post("/api/read-then-inc")
        @silo.idempotent()
        def read_then_inc() -> Response:
            state = silo.state("counter")  # read first: another request may change it now
            mark = run()
            state["n"] += 1
            return jsonify(n=state["n"], run=mark)

        @app.post("/api/plain")
        def plain() -> Response:
            state = silo.state("counter")
            state["n"] += 1
            return jsonify(n=state["n"])

        @app.post("/api/required")
        @silo.idempotent(required=True)
        def required() -> Response:
            return jsonify(run=run())

        @app.post("/api/wait")
        @silo.idempotent(wait=20)
        def waits() -> Response:
            mark = run()
            silo.state("counter")["n"] += 1
            return jsonify(run=mark)

        @app.post("/api/items/<int:item>")
        @silo.idempotent
        def item(item: int) -> Response:
            silo.state("counter")["n"] += 1
            return jsonify(item=item, run=run())

        @app.route("/api/either", methods=["POST", "PUT"])
        @silo.idempotent()
        def either() -> Response:
            return jsonify(method=request.method, run=run())

        @app.post("/api/raises")
        @silo.idempotent()
        def raises() -> Response:
            mark = run()
            silo.state("counter")["n"] += 1
            if request.headers.get("X-Fail"):
                raise RuntimeError("the view failed")
            return jsonify(run=mark)

        @app.post("/api/status/<int:code>")
        @silo.idempotent()
        def status(code: int) -> tuple[Response, int]:
            silo.state("counter")["n"] += 1
            return jsonify(run=run()), code

        @app.post("/api/stream")
        @silo.idempotent()
        def stream() -> Response:
            silo.state("counter")["n"] += 1
            run()
            return Response(stream_with_context(iter([b"a", b"b"])))

        @app.post("/api/headers")
        @silo.idempotent()
        def headers() -> Response:
            response = jsonify(run=run())
            response.headers["X-Custom"] = "kept"
            response.headers.add("Set-Cookie", "a=1")
            response.headers.add("Set-Cookie", "b=2")
            response.headers["Keep-Alive"] = "timeout=5"  # hop-by-hop: not stored
            return response

        @app.post("/api/login")
        @silo.idempotent()
        def login() -> Response:
            silo.state("counter")["n"] += 1
            return jsonify(run=run(), sid=silo.rotate())

        @app.post("/api/path/<name>")
        @silo.idempotent()
        def path(name: str) -> Response:
            return jsonify(run=run())

        @app.post("/api/upload")
        @silo.idempotent()
        def upload() -> Response:
            data = request.files["file"].read()
            silo.state("counter")["n"] += 1
            return jsonify(size=len(data), run=run(), head=data[:4].hex())

        @app.post("/api/big/<int:size>")
        @silo.idempotent()
        def big(size: int) -> Response:
            silo.state("counter")["n"] += 1
            response = Response(b"x" * size, mimetype="application/octet-stream")
            response.headers["X-Run"] = run()
            return response

        @app.post("/api/raw")
        @silo.idempotent()
        def raw() -> Response:
            size = 0
            while chunk := request.stream.read(65536):
                size += len(chunk)
            return jsonify(size=size, run=run())

        self.client: FlaskClient = app.test_client()

    def post(self, path: str, sid: str = ALICE, key: str | None = "k-1", **kwargs: Any) -> Any:
        headers = {HEADER: sid, **kwargs.pop("headers", {})}
        if key is not None:
            headers[KEY] = key
        return self.app.test_client().post(path, headers=headers, **kwargs)  # one per thread

    def counter(self, sid: str = ALICE) -> int:
        with self.storage.engine.connect() as conn:
            data = conn.execute(
                select(namespaces.c.data).where(
                    namespaces.c.sid == session_key(sid), namespaces.c.name == "counter"
                )
            ).scalar()
        if data is None:
            return 0
        return int((data if isinstance(data, dict) else json.loads(data))["n"])

    def keys(self) -> int:
        with self.storage.engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(idempotency_keys)).scalar_one()
        return int(count)

    def close(self) -> None:
        self.silo.stop()
        self.storage.dispose()


@pytest.fixture
def keys_app(silo_url: str, executor: str) -> Iterator[KeysApp]:
    app = KeysApp(silo_url, executor)
    yield app
    app.close()


def first_use(app: KeysApp, sid: str = ALICE) -> None:
    """Give *sid* its session row (a key needs its session)."""
    assert app.client.post("/api/plain", headers={HEADER: sid}).status_code == 200


# -- replays ---------------------------------------------------------------------------


def test_a_retry_gets_the_first_response_byte_for_byte_and_changes_nothing(
    keys_app: KeysApp,
) -> None:
    first_use(keys_app)
    first = keys_app.post("/api/inc", data="hello")
    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.get_json()["n"] == 2
    assert "Idempotent-Replayed" not in first.headers
    with StatementLog(keys_app.storage) as log:
        again = keys_app.post("/api/inc", data="hello")
    assert again.status_code == 200
    assert again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Content-Type"] == first.headers["Content-Type"]
    assert again.headers[HEADER] == ALICE
    assert not any(name.startswith(("update", "insert_namespace", "touch")) for name in log.names)
    assert keys_app.runs == ["/api/inc"]
    assert keys_app.counter() == 2


def test_the_same_key_with_another_request_is_422(keys_app: KeysApp) -> None:
    first_use(keys_app)
    assert keys_app.post("/api/inc", data="one").status_code == 200
    for other in (
        {"data": "two"},
        {"data": "one", "query_string": {"x": "1"}},
        {"data": "one", "content_type": "application/json"},
    ):
        reused = keys_app.post("/api/inc", **other)
        assert reused.status_code == 422, other
        body = reused.get_json()
        assert body["error"] == "idempotency_key_reused"
        assert body["message"]
    # A different path of the same route is another request under the same key, too.
    assert keys_app.post("/api/items/1", key="k-item").status_code == 200
    assert keys_app.post("/api/items/2", key="k-item").status_code == 422
    assert keys_app.runs == ["/api/inc", "/api/items/1"]
    assert keys_app.counter() == 3


def test_a_missing_key_is_400_when_required_and_runs_the_view_otherwise(
    keys_app: KeysApp,
) -> None:
    first_use(keys_app)
    missing = keys_app.post("/api/required", key=None)
    assert missing.status_code == 400
    assert missing.get_json()["error"] == "idempotency_key_missing"
    assert missing.get_json()["message"]
    assert keys_app.runs == []
    assert keys_app.post("/api/inc", key=None).get_json()["n"] == 2
    assert keys_app.post("/api/inc", key=None).get_json()["n"] == 3  # no key: no protection
    assert keys_app.keys() == 0


@pytest.mark.parametrize(
    "value",
    [
        "",
        '""',
        '"unterminated',
        '"bad\\escape"',
        "two words",
        "k" * 256,
        '"' + "k" * 256 + '"',
        "caf\u00e9",
        "key;param=1",
    ],
    ids=lambda v: repr(v[:20]),
)
def test_a_malformed_key_is_400_and_runs_nothing(keys_app: KeysApp, value: str) -> None:
    first_use(keys_app)
    answer = keys_app.post("/api/inc", key=value)
    assert answer.status_code == 400
    assert answer.get_json()["error"] == "idempotency_key_invalid"
    assert keys_app.runs == []
    assert keys_app.counter() == 1


def test_two_key_headers_are_400(keys_app: KeysApp) -> None:
    first_use(keys_app)
    answer = keys_app.client.post(
        "/api/inc", headers=[(HEADER, ALICE), (KEY, "a"), (KEY, "b")]
    )
    assert answer.status_code == 400
    assert answer.get_json()["error"] == "idempotency_key_invalid"


def test_key_forms() -> None:
    assert parse_key(KEY, []) is None
    assert parse_key(KEY, ['"8e03978e-40d5-43e8-bc93-6894a57f9324"']) == (
        "8e03978e-40d5-43e8-bc93-6894a57f9324"
    )
    assert parse_key(KEY, ["8e03978e-40d5-43e8-bc93-6894a57f9324"]) == (
        "8e03978e-40d5-43e8-bc93-6894a57f9324"
    )
    assert parse_key(KEY, ['"a \\"quoted\\" \\\\ key"']) == 'a "quoted" \\ key'
    assert parse_key(KEY, ["  token:with/slash  "]) == "token:with/slash"
    assert parse_key(KEY, ["k" * 255]) == "k" * 255
    assert parse_key(KEY, ['"' + "k" * 255 + '"']) == "k" * 255
    with pytest.raises(IdempotencyKeyInvalid):
        parse_key(KEY, ["k" * 256])


def test_the_quoted_and_the_token_form_are_the_same_key(keys_app: KeysApp) -> None:
    first_use(keys_app)
    first = keys_app.post("/api/inc", key="abc-123")
    again = keys_app.post("/api/inc", key='"abc-123"')
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()


def test_stored_headers_leave_out_hop_by_hop_and_the_sid(keys_app: KeysApp) -> None:
    first_use(keys_app)
    first = keys_app.post("/api/headers")
    again = keys_app.post("/api/headers")
    assert again.get_data() == first.get_data()
    assert again.headers["X-Custom"] == "kept"
    assert first.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    # A cookie is a credential of its moment (a login, a CSRF token): a replay must not
    # set it again (the client may have logged out, or another user in), nor may it rest
    # in the table.
    assert again.headers.getlist("Set-Cookie") == []
    assert "Keep-Alive" not in again.headers
    with keys_app.storage.engine.connect() as conn:
        stored = str(conn.execute(select(idempotency_keys.c.headers)).scalar_one())
    assert ALICE not in stored
    assert HEADER not in stored
    assert "Keep-Alive" not in stored
    assert "cookie" not in stored.lower()


def test_a_4xx_answer_is_stored_with_its_changes(keys_app: KeysApp) -> None:
    first_use(keys_app)
    first = keys_app.post("/api/status/400")
    assert first.status_code == 400
    again = keys_app.post("/api/status/400")
    assert again.status_code == 400
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()
    assert keys_app.runs == ["/api/status/400"]
    assert keys_app.counter() == 2


# -- scopes ------------------------------------------------------------------------------


def test_keys_of_different_sessions_routes_and_methods_never_collide(keys_app: KeysApp) -> None:
    first_use(keys_app, ALICE)
    first_use(keys_app, BOB)
    alice = keys_app.post("/api/inc", sid=ALICE, key="shared")
    bob = keys_app.post("/api/inc", sid=BOB, key="shared")
    assert "Idempotent-Replayed" not in bob.headers
    assert alice.get_json()["run"] != bob.get_json()["run"]
    assert keys_app.counter(ALICE) == 2
    assert keys_app.counter(BOB) == 2
    other_route = keys_app.post("/api/required", sid=ALICE, key="shared")
    assert "Idempotent-Replayed" not in other_route.headers
    post = keys_app.post("/api/either", key="m")
    put = keys_app.client.put("/api/either", headers={HEADER: ALICE, KEY: "m"})
    assert post.get_json()["method"] == "POST"
    assert put.get_json()["method"] == "PUT"
    assert "Idempotent-Replayed" not in put.headers
    assert len(keys_app.runs) == 5


def test_a_scope_callable_adds_the_principal(silo_url: str, executor: str) -> None:
    app = KeysApp(silo_url, executor)
    try:
        silo = app.silo

        @app.app.post("/api/pay")
        @silo.idempotent(scope=lambda: request.headers.get("X-User"))
        def pay() -> Response:
            return jsonify(user=request.headers.get("X-User"), run=uuid.uuid4().hex)

        first_use(app)
        ann = app.post("/api/pay", key="pay-1", headers={"X-User": "ann"})
        ben = app.post("/api/pay", key="pay-1", headers={"X-User": "ben"})
        assert "Idempotent-Replayed" not in ben.headers
        assert ben.get_json()["user"] == "ben"
        again = app.post("/api/pay", key="pay-1", headers={"X-User": "ann"})
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.get_data() == ann.get_data()
    finally:
        app.close()


def test_a_scope_without_a_stable_text_is_refused(silo_url: str, executor: str) -> None:
    """A principal whose text is object's default (``<User object at 0x...>``) differs for
    every request: each retry would get a new key and run the view again."""

    class User:
        def __init__(self, uid: int) -> None:
            self.uid = uid

    app = KeysApp(silo_url, executor)
    try:
        silo = app.silo

        @app.app.post("/api/as-user")
        @silo.idempotent(scope=lambda: User(1))
        def as_user() -> Response:
            app.runs.append("/api/as-user")
            return jsonify(run=uuid.uuid4().hex)

        @app.app.post("/api/as-id")
        @silo.idempotent(scope=lambda: uuid.UUID(int=7))
        def as_id() -> Response:
            return jsonify(run=uuid.uuid4().hex)

        first_use(app)
        app.app.testing = False
        refused = app.post("/api/as-user", key="u")
        assert refused.status_code == 500
        assert app.runs == []
        assert app.keys() == 0
        app.app.testing = True
        with pytest.raises(TypeError, match="scope"):
            app.post("/api/as-user", key="u")
        first = app.post("/api/as-id", key="u")
        assert app.post("/api/as-id", key="u").get_data() == first.get_data()
    finally:
        app.close()


def test_a_client_without_a_session_is_not_protected(keys_app: KeysApp) -> None:
    """No SID sent: a retry would come without one too, so no record could serve it."""
    one = keys_app.client.post("/api/inc", headers={KEY: "k"})
    two = keys_app.client.post("/api/inc", headers={KEY: "k"})
    assert one.status_code == two.status_code == 200
    assert one.headers[HEADER] != two.headers[HEADER]
    assert keys_app.runs == ["/api/inc", "/api/inc"]
    assert keys_app.keys() == 0


def test_a_session_named_by_the_client_is_created_for_its_first_key(
    silo_url: str, executor: str
) -> None:
    app = KeysApp(silo_url, executor)
    created = Recorder()
    app.silo.store.on_create(created)
    try:
        first = app.post("/api/inc", sid="fresh-client-00000000")
        assert first.status_code == 200, first.get_data(as_text=True)
        again = app.post("/api/inc", sid="fresh-client-00000000")
        assert again.headers["Idempotent-Replayed"] == "true"
        assert created.calls == [session_key("fresh-client-00000000")]
        assert app.counter("fresh-client-00000000") == 1
    finally:
        app.close()


# -- failures ------------------------------------------------------------------------------


def test_a_view_that_raises_saves_nothing_and_its_retry_runs_it(keys_app: KeysApp) -> None:
    keys_app.app.config["PROPAGATE_EXCEPTIONS"] = False
    first_use(keys_app)
    failed = keys_app.post("/api/raises", headers={"X-Fail": "1"})
    assert failed.status_code == 500
    assert keys_app.keys() == 0
    assert keys_app.counter() == 1
    retry = keys_app.post("/api/raises")
    assert retry.status_code == 200
    assert "Idempotent-Replayed" not in retry.headers
    assert keys_app.counter() == 2
    assert keys_app.runs == ["/api/raises", "/api/raises"]


def test_an_early_commit_in_an_idempotent_view_is_refused(keys_app: KeysApp) -> None:
    """silo.commit() would save the change without the response: a failure after it
    frees the key, and the retry would make the change a second time."""

    @keys_app.app.post("/api/commits")
    @keys_app.silo.idempotent()
    def commits() -> Response:
        keys_app.runs.append("/api/commits")
        keys_app.silo.state("counter")["n"] += 1
        keys_app.silo.commit()
        return jsonify(n=keys_app.silo.state("counter")["n"])

    keys_app.app.config["PROPAGATE_EXCEPTIONS"] = True  # the test client raises it
    first_use(keys_app)
    with pytest.raises(RuntimeError, match=r"silo\.commit\(\)"):
        keys_app.post("/api/commits", key="early")
    assert keys_app.counter() == 1
    assert keys_app.keys() == 0
    assert keys_app.post("/api/plain", key=None).get_json()["n"] == 2  # commit() elsewhere


def test_a_raise_that_propagates_releases_the_key_too(keys_app: KeysApp) -> None:
    keys_app.app.config["PROPAGATE_EXCEPTIONS"] = True  # the test client raises it
    first_use(keys_app)
    with pytest.raises(RuntimeError, match="the view failed"):
        keys_app.post("/api/raises", headers={"X-Fail": "1"})
    assert keys_app.keys() == 0
    assert keys_app.post("/api/raises").status_code == 200
    assert keys_app.counter() == 2


def test_a_5xx_answer_releases_the_key_and_saves_nothing(keys_app: KeysApp) -> None:
    first_use(keys_app)
    assert keys_app.post("/api/status/503").status_code == 503
    assert keys_app.keys() == 0
    assert keys_app.counter() == 1
    assert keys_app.post("/api/status/503").status_code == 503
    assert keys_app.runs == ["/api/status/503", "/api/status/503"]


def test_a_streamed_response_is_refused_and_saves_nothing(keys_app: KeysApp) -> None:
    keys_app.app.config["PROPAGATE_EXCEPTIONS"] = False
    first_use(keys_app)
    refused = keys_app.post("/api/stream")
    assert refused.status_code == 500
    body = refused.get_json()
    assert body["error"] == "response_not_storable"
    assert "stream" in body["message"]
    assert keys_app.keys() == 0
    assert keys_app.counter() == 1


def test_memory_storage_refuses_idempotent_views_clearly() -> None:
    app = Flask(__name__)
    silo = Silo(app, storage=InMemoryStorage(), auto_cleanup=False)
    with pytest.raises(IdempotencyUnsupported, match="needs SQL storage"):

        @silo.idempotent()
        def view() -> str:
            return "never"

    # Decorated before the app is known: the first request answers the same error.
    later = Silo(auto_cleanup=False, storage=InMemoryStorage())

    @later.idempotent()
    def early() -> str:
        return "never"

    other = Flask(__name__)
    other.add_url_rule("/api/early", view_func=early, methods=["POST"])
    later.init_app(other)
    answer = other.test_client().post("/api/early", headers={KEY: "k", HEADER: ALICE})
    assert answer.status_code == 500
    assert answer.get_json()["error"] == "idempotency_unsupported"
    silo.stop()
    later.stop()


# -- concurrency, leases ---------------------------------------------------------------------


def _in_thread(app: KeysApp, path: str, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(app.post(path, **kwargs)))
    thread.start()
    return thread, out


def test_a_duplicate_in_flight_is_409_with_retry_after(keys_app: KeysApp) -> None:
    first_use(keys_app)
    keys_app.gate = threading.Event()
    thread, out = _in_thread(keys_app, "/api/inc")
    assert keys_app.entered.wait(30)
    duplicate = keys_app.post("/api/inc")
    assert duplicate.status_code == 409
    assert duplicate.get_json()["error"] == "idempotency_key_in_flight"
    assert duplicate.get_json()["message"]
    assert int(duplicate.headers["Retry-After"]) >= 1
    keys_app.gate.set()
    thread.join(30)
    assert out[0].status_code == 200
    later = keys_app.post("/api/inc")
    assert later.get_data() == out[0].get_data()
    assert keys_app.runs == ["/api/inc"]


def test_with_wait_a_duplicate_waits_and_replays(keys_app: KeysApp) -> None:
    first_use(keys_app)
    keys_app.gate = threading.Event()
    thread, out = _in_thread(keys_app, "/api/wait")
    assert keys_app.entered.wait(30)
    waiting, answers = _in_thread(keys_app, "/api/wait")
    keys_app.gate.set()
    thread.join(30)
    waiting.join(30)
    assert out[0].status_code == 200
    assert answers[0].status_code == 200
    assert answers[0].headers["Idempotent-Replayed"] == "true"
    assert answers[0].get_data() == out[0].get_data()
    assert keys_app.runs == ["/api/wait"]
    assert keys_app.counter() == 2


def test_a_claim_whose_lease_ran_out_is_taken_over_and_its_late_commit_saves_nothing(
    keys_app: KeysApp,
) -> None:
    first_use(keys_app)
    keys_app.gate = gate = threading.Event()
    thread, out = _in_thread(keys_app, "/api/inc")
    assert keys_app.entered.wait(30)
    assert keys_app.post("/api/inc").status_code == 409  # within the lease
    keys_app.clock.advance(LEASE + 1)  # as if the first request's worker had died
    keys_app.gate = None
    retry = keys_app.post("/api/inc")
    assert retry.status_code == 200, retry.get_data(as_text=True)
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.get_json()["n"] == 2
    gate.set()
    thread.join(30)
    late = out[0]
    assert late.status_code == 409  # its key is another's now: its change is not saved
    assert keys_app.counter() == 2
    replay = keys_app.post("/api/inc")
    assert replay.get_data() == retry.get_data()


def test_a_conflict_at_the_commit_saves_nothing_and_frees_the_key(keys_app: KeysApp) -> None:
    first_use(keys_app)
    keys_app.gate = gate = threading.Event()
    thread, out = _in_thread(keys_app, "/api/read-then-inc")
    assert keys_app.entered.wait(30)
    keys_app.gate = None
    assert keys_app.post("/api/plain", key=None).get_json()["n"] == 2  # changed meanwhile
    gate.set()
    thread.join(30)
    conflict = out[0]
    assert conflict.status_code == 409
    assert conflict.get_json()["error"] == "state_conflict"
    assert keys_app.keys() == 0
    assert keys_app.counter() == 2
    retry = keys_app.post("/api/read-then-inc")
    assert retry.status_code == 200
    assert retry.get_json()["n"] == 3
    assert keys_app.post("/api/read-then-inc").get_data() == retry.get_data()


def test_a_session_expired_during_the_view_keeps_nothing(keys_app: KeysApp) -> None:
    first_use(keys_app)
    keys_app.gate = gate = threading.Event()
    thread, out = _in_thread(keys_app, "/api/read-then-inc")
    assert keys_app.entered.wait(30)
    keys_app.silo.store.destroy(ALICE)  # its key goes with it
    gate.set()
    thread.join(30)
    assert out[0].status_code == 410
    assert keys_app.keys() == 0
    assert keys_app.counter() == 0


def test_a_session_expired_during_a_view_that_changes_no_state_is_410(keys_app: KeysApp) -> None:
    """The key went with its session: the commit finds no claim to store the response in,
    and says why (410), rather than "another request holds the key" (409)."""
    first_use(keys_app)
    keys_app.gate = gate = threading.Event()
    thread, out = _in_thread(keys_app, "/api/required")
    assert keys_app.entered.wait(30)
    keys_app.silo.store.destroy(ALICE)
    gate.set()
    thread.join(30)
    assert out[0].status_code == 410, out[0].get_data(as_text=True)
    assert out[0].get_json()["error"] == "session_expired"
    assert keys_app.keys() == 0


def test_a_response_stored_outside_a_request_into_a_gone_session_is_refused(
    keys_app: KeysApp,
) -> None:
    """The records' own commit (no request unit) finds the session gone: SessionExpired."""
    first_use(keys_app)
    records = keys_app.silo.store.backend.idempotency_records()
    assert records is not None
    wanted = KeyRequest(
        header=KEY, sid=session_key(ALICE), key_hash="a" * 64, key="k", method="POST",
        route="/api/x", fingerprint="f" * 64, ttl=TTL, lease=LEASE,
    )  # fmt: skip
    claim = records.claim(wanted)
    assert isinstance(claim, Claim)
    keys_app.silo.store.destroy(ALICE)
    with pytest.raises(SessionExpired):
        records.complete(claim, StoredResponse(200, [], b"{}"))
    assert keys_app.keys() == 0


def test_one_of_many_concurrent_duplicates_runs_the_view(keys_app: KeysApp) -> None:
    first_use(keys_app)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: keys_app.post("/api/inc", data="x"), range(24)))
    fresh = [a for a in answers if a.status_code == 200 and "Idempotent-Replayed" not in a.headers]
    replays = [a for a in answers if a.headers.get("Idempotent-Replayed") == "true"]
    busy = [a for a in answers if a.status_code == 409]
    assert len(fresh) == 1
    assert len(fresh) + len(replays) + len(busy) == len(answers)
    assert all(r.get_data() == fresh[0].get_data() for r in replays)
    assert keys_app.runs == ["/api/inc"]
    assert keys_app.counter() == 2


# -- request bodies ---------------------------------------------------------------------------


def test_an_upload_is_fingerprinted_and_still_reaches_the_view(keys_app: KeysApp) -> None:
    first_use(keys_app)
    data = bytes(range(256)) * 12_000  # 3 MB: spooled to disk while hashed
    boundary = "fixed-boundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    first = keys_app.post("/api/upload", data=body, content_type=content_type)
    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.get_json()["size"] == len(data)
    again = keys_app.post("/api/upload", data=body, content_type=content_type)
    assert again.headers["Idempotent-Replayed"] == "true"
    changed = body.replace(b"\x00\x01\x02\x03", b"\xff\x01\x02\x03", 1)
    assert keys_app.post("/api/upload", data=changed, content_type=content_type).status_code == 422
    raw = keys_app.post("/api/raw", key="raw", data=data)
    assert raw.get_json()["size"] == len(data)
    assert keys_app.runs == ["/api/upload", "/api/raw"]


def test_a_body_cut_short_is_400_and_claims_nothing(keys_app: KeysApp) -> None:
    """gunicorn (``wsgi.input_terminated``) ends the stream of a client that sent fewer
    bytes than its Content-Length said without an error: what came must not be taken
    for the request, run and stored under its key."""
    first_use(keys_app)
    cut = {"CONTENT_LENGTH": "100", "wsgi.input_terminated": True}
    short = keys_app.post("/api/raw", key="cut", data=b"0123456789", environ_overrides=cut)
    assert short.status_code == 400
    assert short.get_json()["error"] == "request_body_incomplete"
    assert short.get_json()["message"]
    assert keys_app.runs == []
    assert keys_app.keys() == 0
    whole = keys_app.post("/api/raw", key="cut", data=b"0" * 100)
    assert whole.status_code == 200
    assert whole.get_json()["size"] == 100


def test_a_form_read_before_the_view_is_still_fingerprinted(silo_url: str, executor: str) -> None:
    app = KeysApp(silo_url, executor)
    try:

        @app.app.before_request
        def read_form() -> None:  # as a CSRF check does
            request.form.get("csrf")

        @app.app.post("/api/form")
        @app.silo.idempotent()
        def form() -> Response:
            return jsonify(name=request.form["name"], run=uuid.uuid4().hex)

        first_use(app)
        first = app.post("/api/form", data={"name": "ann"})
        again = app.post("/api/form", data={"name": "ann"})
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.get_data() == first.get_data()
        assert app.post("/api/form", data={"name": "ben"}).status_code == 422
    finally:
        app.close()


# -- what it costs -------------------------------------------------------------------------


def test_statements_of_a_first_request_and_of_a_replay(keys_app: KeysApp) -> None:
    first_use(keys_app)
    keys_app.post("/api/plain")
    with StatementLog(keys_app.storage) as plain:
        keys_app.post("/api/plain")
    with StatementLog(keys_app.storage) as first:
        keys_app.post("/api/inc", key="cost")
    with StatementLog(keys_app.storage) as replay:
        keys_app.post("/api/inc", key="cost")
    assert plain.names == ["load_one", "update_namespace"]
    postgresql = keys_app.storage.dialect == "postgresql"
    # The claim before the view; the response with the namespace in the commit: one
    # statement on PostgreSQL, a transaction of two on SQLite.
    assert first.names == (
        ["claim_key", "load_one", "complete_key_with_namespace"]
        if postgresql
        else ["claim_key", "load_one", "update_namespace", "complete_key"]
    )
    assert replay.names == ["claim_key"]  # the claim's statement returns the stored record


# -- expiry --------------------------------------------------------------------------------------


def test_a_session_holds_at_most_its_number_of_keys(silo_url: str, executor: str) -> None:
    """A client that sends a new key with every request cannot grow the table without
    bound: past SILO_IDEMPOTENCY_MAX_KEYS a new key is refused (429, the view does not
    run), the keys held still replay, another session is not affected, and once the
    oldest expire through the sweep new keys are taken again."""
    app = KeysApp(silo_url, executor, SILO_IDEMPOTENCY_MAX_KEYS=3)
    try:
        first_use(app)
        first_use(app, BOB)
        for key in ("a", "b", "c"):
            assert app.post("/api/inc", key=key).status_code == 200
        refused = app.post("/api/inc", key="d")
        assert refused.status_code == 429
        assert refused.get_json()["error"] == "idempotency_keys_exhausted"
        assert refused.get_json()["limit"] == 3
        assert app.counter() == 4  # first_use, then a, b, c: the refused view did not run
        assert app.post("/api/inc", key="a").headers["Idempotent-Replayed"] == "true"
        assert app.post("/api/inc", sid=BOB, key="d").status_code == 200
        assert app.post("/api/plain").status_code == 200  # no key: runs as usual
        app.clock.advance(TTL + 1)
        app.post("/api/plain")  # the session stays alive
        assert app.silo.store.sweep().keys_expired == 4
        assert app.post("/api/inc", key="d").status_code == 200
        assert app.keys() == 1
    finally:
        app.close()


def test_a_response_too_large_to_keep_is_sent_once_and_its_retry_is_409(
    silo_url: str, executor: str
) -> None:
    """A response above SILO_IDEMPOTENCY_MAX_RESPONSE_BYTES is sent and its changes saved,
    but the key keeps only its status: a retry is answered 409 saying so, and the view
    does not run twice. A response at the limit is kept and replayed as usual."""
    limit = 1000
    app = KeysApp(silo_url, executor, SILO_IDEMPOTENCY_MAX_RESPONSE_BYTES=limit)
    try:
        first_use(app)
        first = app.post("/api/big/5000", key="big")
        assert first.status_code == 200
        assert first.get_data() == b"x" * 5000
        runs, counter = len(app.runs), app.counter()
        retry = app.post("/api/big/5000", key="big")
        assert retry.status_code == 409
        error = retry.get_json()
        assert error["error"] == "idempotent_response_not_kept"
        assert (error["first_status"], error["limit"]) == (200, limit)
        assert "new key" in error["message"]
        assert (len(app.runs), app.counter()) == (runs, counter)  # nothing ran again
        with app.storage.engine.connect() as conn:
            status, body = conn.execute(
                select(idempotency_keys.c.status, idempotency_keys.c.body).where(
                    idempotency_keys.c.idempotency_key == "big"
                )
            ).one()
        assert (status, body) == (200, None)  # the 5,000 bytes were not kept

        fits = app.post("/api/big/1000", key="fits")
        again = app.post("/api/big/1000", key="fits")
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.get_data() == fits.get_data() == b"x" * limit
        assert again.headers["X-Run"] == fits.headers["X-Run"]
    finally:
        app.close()


def test_without_a_cap_keys_are_claimed_and_replayed_alike(silo_url: str, executor: str) -> None:
    app = KeysApp(silo_url, executor, SILO_IDEMPOTENCY_MAX_KEYS=None)
    try:
        first_use(app)
        with StatementLog(app.storage) as log:
            assert app.post("/api/inc", key="a").status_code == 200
        assert log.names[0] == "claim_key"
        assert app.post("/api/inc", key="b").status_code == 200
        assert app.post("/api/inc", key="a").headers["Idempotent-Replayed"] == "true"
        assert (app.counter(), app.keys()) == (3, 2)
    finally:
        app.close()


def test_keys_expire_after_their_ttl_through_the_sweep(keys_app: KeysApp) -> None:
    first_use(keys_app)
    keys_app.post("/api/inc", key="old")
    keys_app.clock.advance(TTL / 2)
    keys_app.post("/api/inc", key="young")
    keys_app.clock.advance(TTL / 2 + 1)
    keys_app.post("/api/plain")  # the session stays alive
    assert keys_app.silo.store.sweep().keys_expired == 1
    assert keys_app.keys() == 1
    rerun = keys_app.post("/api/inc", key="old")
    assert "Idempotent-Replayed" not in rerun.headers
    assert keys_app.post("/api/inc", key="young").headers["Idempotent-Replayed"] == "true"


def test_keys_go_with_their_session(keys_app: KeysApp) -> None:
    first_use(keys_app)
    first_use(keys_app, BOB)
    keys_app.post("/api/wait", key="a")  # a day's ttl: longer than the sessions'
    keys_app.post("/api/wait", key="b", sid=BOB)
    keys_app.clock.advance(7200 + 3600)  # both sessions idle past their ttl
    keys_app.post("/api/plain", key=None, sid=BOB)
    result = keys_app.silo.store.sweep()
    assert result.expired == [session_key(ALICE)]
    assert result.keys_expired == 0  # Alice's key went with her session
    assert keys_app.keys() == 1  # Bob's
    keys_app.silo.store.destroy(BOB)
    assert keys_app.keys() == 0


def test_a_retry_under_a_sid_rotated_away_or_expired_is_410_and_runs_nothing(
    keys_app: KeysApp,
) -> None:
    first_use(keys_app)
    first = keys_app.post("/api/login", key="login")  # its answer is lost on the way
    assert first.status_code == 200
    new = first.get_json()["sid"]
    assert first.headers[HEADER] == new
    # The client knows only the SID it sent: its retry must not log in (run) again.
    retry = keys_app.post("/api/login", key="login")
    assert retry.status_code == 410
    assert retry.get_json()["error"] == "session_expired"
    assert retry.get_json()["message"]
    assert keys_app.runs == ["/api/login"]
    assert keys_app.counter() == 0  # no session was started under the old SID
    again = keys_app.post("/api/login", key="login", sid=new)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()
    assert again.headers[HEADER] == new

    first_use(keys_app, BOB)
    assert keys_app.post("/api/inc", sid=BOB, key="e").status_code == 200
    keys_app.clock.advance(7200 + 3600)  # idle past its ttl
    assert session_key(BOB) in keys_app.silo.store.sweep().expired
    late = keys_app.post("/api/inc", sid=BOB, key="e")
    assert late.status_code == 410
    assert late.get_json()["error"] == "session_expired"
    assert keys_app.runs == ["/api/login", "/api/inc"]
    assert keys_app.counter(BOB) == 0


def test_paths_that_decode_alike_are_different_requests(keys_app: KeysApp) -> None:
    """``/api/path/%FF`` and ``/api/path/%FE`` (as a WSGI server passes them, the raw
    bytes: Flask's test client would decode them first) are both U+FFFD to Flask."""
    first_use(keys_app)

    def post(raw: str) -> Any:
        return keys_app.post("/api/path/x", key="p", environ_overrides={"PATH_INFO": raw})

    assert post("/api/path/\xff").status_code == 200
    assert post("/api/path/\xff").headers["Idempotent-Replayed"] == "true"
    other = post("/api/path/\xfe")
    assert other.status_code == 422
    assert other.get_json()["error"] == "idempotency_key_reused"


def test_a_rotated_session_keeps_its_keys(keys_app: KeysApp) -> None:
    first_use(keys_app)
    first = keys_app.post("/api/inc", key="r")
    new = keys_app.silo.store.rotate(ALICE)
    again = keys_app.post("/api/inc", key="r", sid=new)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()


# -- @silo.locked ------------------------------------------------------------------------------


def test_locked_views_run_one_after_another(silo_url: str, executor: str) -> None:
    app = Flask(__name__)
    storage = SQLStorage(silo_url, executor=executor)  # type: ignore[arg-type]
    silo = Silo(app, storage=storage, auto_cleanup=False)
    silo.register("counter", lambda: {"n": 0})
    seen: list[bool] = []

    @app.post("/api/locked")
    @silo.locked
    def locked() -> Response:
        seen.append(g._silo_request.unit.locked)  # before any state was read
        state = silo.state("counter")
        state["n"] += 1
        return jsonify(n=state["n"])

    client = app.test_client()
    assert client.post("/api/locked", headers={HEADER: ALICE}).get_json() == {"n": 1}
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(
            pool.map(
                lambda _: app.test_client().post("/api/locked", headers={HEADER: ALICE}),
                range(30),
            )
        )
    assert [a.status_code for a in answers] == [200] * 30
    assert sorted(a.get_json()["n"] for a in answers) == list(range(2, 32))
    assert all(seen)
    with storage.engine.begin() as conn:  # nothing left locked
        conn.execute(update(namespaces).values(version=namespaces.c.version))
    silo.stop()
    storage.dispose()
