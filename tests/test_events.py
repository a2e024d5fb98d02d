"""Session events and their stream: written with their change, replayed by
``Last-Event-ID`` in order and exactly once, gone with their session, pruned by the sweep,
opened only by a token of the session. SQLite and PostgreSQL, through real apps.

A stream is read through the test client as the server sends it (``buffered=False``);
heartbeats every fraction of a second keep a read from ever blocking for long, and a
stream's maximum age bounds it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import abort, jsonify
from harness import AppFactory, Harness
from sqlalchemy import func, make_url, select
from support import StatementLog
from werkzeug.test import TestResponse

from flask_silo_sql import BackgroundTask, SessionExpired
from flask_silo_sql.events import HUBS
from flask_silo_sql.sql.models import events

ALICE = "events-test-session-alice-1"
BOB = "events-test-session-bob-0001"
FAST = {
    "SECRET_KEY": "test-secret",
    "SILO_STREAM_HEARTBEAT": 0.05,
    "SILO_STREAM_MAX_AGE": 10.0,
    "SILO_STREAM_POLL_INTERVAL": 0.02,
    "SILO_TASK_FLUSH_INTERVAL": 0.0,
}


def events_app(silo_app: AppFactory, **config: Any) -> Harness:
    h = silo_app(config={**FAST, **config})
    silo = h.silo
    silo.register("job", lambda: {"task": BackgroundTask("job"), "n": 0})

    @h.app.post("/api/token")
    def token() -> Any:
        return jsonify(silo.stream_token())

    @h.app.post("/api/publish/<int:n>")
    def publish(n: int) -> Any:
        silo.state("job")["n"] = n
        silo.publish("step", {"n": n})
        return jsonify(ok=True)

    @h.app.post("/api/publish-then-fail")
    def publish_then_fail() -> Any:
        silo.state("job")["n"] = -1
        silo.publish("step", {"n": -1})
        abort(500)

    @h.app.post("/api/run")
    def run() -> Any:
        def work(task: BackgroundTask) -> None:
            for step in range(1, 4):
                task.update(progress=step * 25, message=f"step {step}")
                task.log(f"did {step}")
            task.complete("all done")

        silo.state("job")["task"].start(work)
        return jsonify(ok=True)

    @h.app.post("/api/rotate")
    def rotate() -> Any:
        return jsonify(sid=silo.rotate())

    @h.app.post("/api/reset")
    def reset() -> Any:
        silo.reset_current()
        return jsonify(ok=True)

    @h.app.get("/events")
    def stream() -> Any:
        return silo.stream()

    return h


class Stream:
    """An open stream as a client reads it: its frames, parsed."""

    def __init__(self, response: TestResponse) -> None:
        assert response.status_code == 200, response.get_data()
        self.response = response
        self._chunks: Iterator[Any] = iter(response.response)

    def next_events(self, count: int) -> list[dict[str, Any]]:
        """The next *count* events (comments and the retry hint skipped)."""
        found: list[dict[str, Any]] = []
        while len(found) < count:
            chunk = next(self._chunks)
            text = str(chunk.decode() if isinstance(chunk, bytes) else chunk)
            fields = dict(
                line.split(": ", 1) for line in text.splitlines() if line and ": " in line
            )
            if "event" in fields:
                found.append(
                    {"id": int(fields["id"]), "event": fields["event"],
                     "data": json.loads(fields["data"])}
                )
        return found

    def quiet_for(self, chunks: int) -> bool:
        """Whether the next *chunks* chunks are all heartbeats (no event)."""
        for _ in range(chunks):
            chunk = next(self._chunks)
            text = str(chunk.decode() if isinstance(chunk, bytes) else chunk)
            if "event:" in text:
                return False
        return True

    def close(self) -> None:
        self.response.close()


@pytest.fixture
def opened() -> Iterator[list[Stream]]:
    streams: list[Stream] = []
    yield streams
    for stream in streams:
        stream.close()


def token(h: Harness, sid: str) -> dict[str, Any]:
    body: dict[str, Any] = h.json("POST", "/api/token", sid)
    return body


def open_stream(
    h: Harness, opened: list[Stream], sid: str, *, last: int | None = None, since: int | None = None
) -> Stream:
    query = f"/events?token={token(h, sid)['token']}"
    if since is not None:
        query += f"&last_event_id={since}"
    headers = {} if last is None else {"Last-Event-ID": str(last)}
    stream = Stream(h.client.get(query, headers=headers, buffered=False))
    opened.append(stream)
    return stream


def count_events(h: Harness) -> int:
    with h.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(events)).scalar_one())


def test_events_are_written_only_with_the_change_they_tell_of(silo_app: AppFactory) -> None:
    h = events_app(silo_app)
    h.json("POST", "/api/publish/1", ALICE)
    assert count_events(h) == 1
    assert h.post("/api/publish-then-fail", ALICE).status_code == 500
    assert count_events(h) == 1  # rolled back with the request's state: never seen

    with StatementLog(h.storage) as log:
        h.json("POST", "/api/publish/2", ALICE)
    # The event is the last write of the request's transaction, after its state.
    after_state = log.names[log.names.index("update_namespace") + 1 :]
    assert after_state in (
        ["insert_event"],  # SQLite
        ["event_order", "insert_event", "notify_event"],  # PostgreSQL: in line, announced
    )


def test_publishing_to_a_session_that_is_gone_says_so(silo_app: AppFactory) -> None:
    h = events_app(silo_app)
    with pytest.raises(SessionExpired):
        h.silo.publish("step", {"n": 1}, sid="events-test-no-such-session-01")
    with pytest.raises(ValueError, match="kind"):
        h.silo.publish("not a kind!", sid=ALICE)
    assert count_events(h) == 0


def test_a_task_run_is_told_as_events_in_order(
    silo_app: AppFactory, opened: list[Stream]
) -> None:
    h = events_app(silo_app)
    since = token(h, ALICE)["last_event_id"]
    stream = open_stream(h, opened, ALICE, since=since)
    h.json("POST", "/api/run", ALICE)
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["event"] != "complete":
        seen += stream.next_events(1)
    ids = [e["id"] for e in seen]
    assert ids == sorted(set(ids))  # increasing, each once
    progress = [e["data"]["progress"] for e in seen]
    assert progress == sorted(progress)
    assert seen[-1]["data"]["message"] == "all done"
    logged = [line for e in seen for line in e["data"]["logs"]]
    assert logged == ["did 1", "did 2", "did 3"]  # each line once, in order


def test_last_event_id_replays_what_was_missed_in_order_exactly_once(
    silo_app: AppFactory, opened: list[Stream]
) -> None:
    h = events_app(silo_app)
    for n in range(1, 6):
        h.json("POST", f"/api/publish/{n}", ALICE)
    h.json("POST", "/api/publish/99", BOB)  # another session's: never in Alice's stream
    first = open_stream(h, opened, ALICE, since=0).next_events(5)
    assert [e["data"]["n"] for e in first] == [1, 2, 3, 4, 5]

    # The client saw the second event, then lost its connection.
    stream = open_stream(h, opened, ALICE, last=first[1]["id"])
    assert [e["data"]["n"] for e in stream.next_events(3)] == [3, 4, 5]
    h.json("POST", "/api/publish/6", ALICE)  # live, after the replay
    live = stream.next_events(1)
    assert live[0]["data"]["n"] == 6
    assert live[0]["id"] > first[-1]["id"]
    assert stream.quiet_for(5)  # nothing twice


def test_an_event_no_longer_kept_asks_the_client_to_resync(
    silo_app: AppFactory, opened: list[Stream]
) -> None:
    h = events_app(silo_app, SILO_EVENT_RETENTION=60)
    h.json("POST", "/api/publish/1", ALICE)
    old = open_stream(h, opened, ALICE, since=0).next_events(1)[0]["id"]
    h.clock.now += 120
    h.json("POST", "/api/publish/2", ALICE)
    h.store.cleanup()  # the sweep prunes what is older than the retention
    assert count_events(h) == 1

    stream = open_stream(h, opened, ALICE, last=old)
    resync = stream.next_events(1)[0]
    assert resync["event"] == "resync"
    assert "reload" in resync["data"]["reason"]
    assert resync["id"] > old  # the client goes on from the newest event
    h.json("POST", "/api/publish/3", ALICE)
    assert [e["data"]["n"] for e in stream.next_events(1)] == [3]


def test_stream_tokens_open_only_their_own_session(silo_app: AppFactory) -> None:
    h = events_app(silo_app)
    alice = token(h, ALICE)["token"]

    missing = h.client.get("/events")
    assert (missing.status_code, missing.get_json()["error"]) == (401, "stream_token_missing")
    forged = h.client.get(f"/events?token={alice[:-3]}abc")
    assert (forged.status_code, forged.get_json()["error"]) == (401, "stream_token_invalid")
    other = h.client.get(f"/events?token={alice}", headers={h.header: BOB})
    assert (other.status_code, other.get_json()["error"]) == (403, "stream_token_other_session")
    assert ALICE not in other.get_data(as_text=True)

    h.clock.now += 301  # past SILO_STREAM_TOKEN_TTL, by the database's clock
    expired = h.client.get(f"/events?token={alice}")
    assert (expired.status_code, expired.get_json()["error"]) == (401, "stream_token_expired")


def test_events_go_with_their_session(silo_app: AppFactory, opened: list[Stream]) -> None:
    h = events_app(silo_app)
    h.json("POST", "/api/publish/1", ALICE)
    new_sid = h.json("POST", "/api/rotate", ALICE)["sid"]
    moved = open_stream(h, opened, new_sid, since=0).next_events(1)
    assert moved[0]["data"]["n"] == 1  # rotated with the session

    h.json("POST", "/api/reset", new_sid)
    stream = open_stream(h, opened, new_sid, since=0)
    assert [e["event"] for e in stream.next_events(1)] == ["reset"]  # the old ones are gone

    h.expire(new_sid)
    h.store.cleanup()
    assert count_events(h) == 0


def test_open_streams_are_limited_per_session_and_per_process(
    silo_app: AppFactory, opened: list[Stream]
) -> None:
    h = events_app(silo_app, SILO_STREAMS_PER_SESSION=1, SILO_STREAMS_PER_PROCESS=2)
    open_stream(h, opened, ALICE)
    second = h.client.get(f"/events?token={token(h, ALICE)['token']}")
    assert (second.status_code, second.get_json()["error"]) == (429, "too_many_streams")
    open_stream(h, opened, BOB)
    third = h.client.get(f"/events?token={token(h, 'events-test-session-carol-1')['token']}")
    assert (third.status_code, third.get_json()["error"]) == (503, "streams_exhausted")

    opened.pop(0).close()  # a closed stream frees its place
    open_stream(h, opened, ALICE)


def test_idle_streams_cost_one_query_per_poll_whatever_their_number(
    silo_app: AppFactory, opened: list[Stream]
) -> None:
    h = events_app(silo_app, SILO_STREAM_POLL_INTERVAL=3600.0)
    for n in range(5):
        open_stream(h, opened, f"events-test-idle-session-{n:02d}")
    hub = HUBS.of(h.store.backend.ctx, lambda: 3600.0)  # type: ignore[attr-defined]
    with StatementLog(h.storage) as log:
        hub.poll()
    assert log.names == ["events_after"]

    for stream in opened:
        stream.close()
    opened.clear()
    with StatementLog(h.storage) as log:
        hub.poll()
    assert log.names == []  # no stream open: no query at all


def test_a_stream_opened_as_the_last_one_closes_still_gets_live_events(
    silo_app: AppFactory, opened: list[Stream]
) -> None:
    h = events_app(silo_app)
    for round_ in range(3):
        first = open_stream(h, opened, ALICE)
        opened.remove(first)
        first.close()  # the process's last stream: its reader is told to stop
        stream = open_stream(h, opened, ALICE)  # at once: a reader runs for it
        assert stream.quiet_for(2)  # the hint, the (empty) replay, a heartbeat: live now
        h.json("POST", f"/api/publish/{round_}", ALICE)
        assert [e["data"]["n"] for e in stream.next_events(1)] == [round_]
        opened.remove(stream)
        stream.close()


def test_events_arrive_through_pgbouncer_in_transaction_mode(
    pg_bouncer: Any, pg_silo_url: str, opened: list[Stream], tmp_path: Path
) -> None:
    url = pg_bouncer.url(str(make_url(pg_silo_url).database))
    h = Harness(url, config=FAST, instance_path=tmp_path)
    try:
        h.silo.register("job", lambda: {"task": BackgroundTask("job"), "n": 0})

        @h.app.post("/api/token")
        def token_view() -> Any:
            return jsonify(h.silo.stream_token())

        @h.app.get("/events")
        def stream_view() -> Any:
            return h.silo.stream()

        stream = open_stream(h, opened, ALICE)
        for n in (1, 2):  # notifications or not, the poll brings them
            h.silo.publish("step", {"n": n}, sid=ALICE)
        assert [e["data"]["n"] for e in stream.next_events(2)] == [1, 2]
    finally:
        for stream in opened:
            stream.close()
        opened.clear()
        h.close()
