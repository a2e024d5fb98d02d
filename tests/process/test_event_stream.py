"""The event stream and cancel under real gunicorn (gthread), on SQLite and PostgreSQL.

Two servers ("machines") share one database: one runs a task, the other cancels it
and streams its events. A client that loses its connection, or whose server restarts,
gets what it missed by ``Last-Event-ID``: no gap, no duplicate, in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import Gunicorn, gunicorn, wait_for

ALICE = "event-stream-process-alice-01"
BOB = "event-stream-process-bob-0001"
TIMEOUT = 30.0


def env_for(url: str, **extra: str) -> dict[str, str]:
    return {
        "SILO_DATABASE_URI": url,
        "SECRET_KEY": "process-test-secret",
        "SILO_STREAM_POLL_INTERVAL": "0.05",
        "SILO_STREAM_HEARTBEAT": "0.5",
        "SILO_TASK_FLUSH_INTERVAL": "0.05",
        "SILO_TASK_RUNNER": '"worker"',  # queued runs wait: nothing here runs them
        **extra,
    }


def serve(env: dict[str, str], tmp: Path) -> contextlib.AbstractContextManager[Gunicorn]:
    return gunicorn(env, tmp, app="events_app:app", workers=2, threads=4)


def call(server: Gunicorn, method: str, path: str, sid: str) -> requests.Response:
    return requests.request(
        method, server.url(path), headers={"X-Session-ID": sid}, timeout=TIMEOUT
    )


class Client:
    """An EventSource, as far as the server can tell: a token in the URL, Last-Event-ID."""

    def __init__(self, server: Gunicorn, sid: str, last: int | None = None) -> None:
        token = call(server, "POST", "/api/token", sid).json()
        headers = {} if last is None else {"Last-Event-ID": str(last)}
        since = "" if last is not None else f"&last_event_id={token['last_event_id']}"
        self.response = requests.get(
            server.url(f"/events?token={token['token']}{since}"),
            headers=headers,
            stream=True,
            timeout=TIMEOUT,
        )
        assert self.response.status_code == 200
        assert self.response.headers["Content-Type"].startswith("text/event-stream")
        assert self.response.headers["Cache-Control"] == "no-store"
        assert self.response.headers["X-Accel-Buffering"] == "no"
        self._lines = self.response.iter_lines(decode_unicode=True)

    def events(self) -> Iterator[dict[str, Any]]:
        fields: dict[str, str] = {}
        for line in self._lines:
            if line:
                if not line.startswith(":") and ": " in line:
                    key, value = line.split(": ", 1)
                    fields[key] = value
                continue
            if "event" in fields:
                yield {"id": int(fields["id"]), "event": fields["event"], "data": fields["data"]}
            fields = {}

    def take(self, count: int) -> list[dict[str, Any]]:
        taken: list[dict[str, Any]] = []
        for event in self.events():
            taken.append(event)
            if len(taken) == count:
                break
        return taken

    def until(self, kind: str) -> list[dict[str, Any]]:
        taken: list[dict[str, Any]] = []
        for event in self.events():
            taken.append(event)
            if event["event"] == kind:
                break
        return taken

    def close(self) -> None:
        self.response.close()


def steps(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["data"].split(":")[1].rstrip("}")) for e in events]


def test_replay_restart_cancel_and_tokens_under_gunicorn(silo_url: str, tmp_path: Path) -> None:
    env = env_for(silo_url)
    with serve(env, tmp_path) as first:
        # Replay after a client disconnect: no gap, no duplicate, in order.
        client = Client(first, ALICE)
        for n in range(1, 4):
            call(first, "POST", f"/api/publish/{n}", ALICE)
        seen = client.take(3)
        assert steps(seen) == [1, 2, 3]
        client.close()
        for n in range(4, 6):
            call(first, "POST", f"/api/publish/{n}", ALICE)
        client = Client(first, ALICE, last=seen[-1]["id"])
        again = client.take(2)
        assert steps(again) == [4, 5]
        client.close()

        # Tokens: forged, of another session.
        token = call(first, "POST", "/api/token", ALICE).json()["token"]
        forged = requests.get(first.url(f"/events?token={token[:-4]}AAAA"), timeout=TIMEOUT)
        assert (forged.status_code, forged.json()["error"]) == (401, "stream_token_invalid")
        other = requests.get(
            first.url(f"/events?token={token}"), headers={"X-Session-ID": BOB}, timeout=TIMEOUT
        )
        assert (other.status_code, other.json()["error"]) == (403, "stream_token_other_session")

    # Replay across a restart of the server (a deploy).
    with serve(env, tmp_path) as second, serve(env, tmp_path) as other_machine:
        call(second, "POST", "/api/publish/6", ALICE)
        client = Client(second, ALICE, last=again[-1]["id"])
        assert steps(client.take(1)) == [6]

        # Cancel from another machine while the task runs: the stream tells it all.
        assert call(second, "POST", "/api/start", ALICE).json() == {"started": True}
        progressed = client.until("progress")
        assert progressed[-1]["event"] == "progress"
        answer = call(other_machine, "POST", "/api/cancel", ALICE)
        assert (answer.status_code, answer.json()["outcome"]) == (202, "cancelling")
        told = client.until("cancelled")
        kinds = [e["event"] for e in told]
        assert "cancelling" in kinds
        assert kinds[-1] == "cancelled"
        ids = [e["id"] for e in [*progressed, *told]]
        assert ids == sorted(set(ids))
        status = call(other_machine, "GET", "/api/status", ALICE).json()
        assert status["status"] == "cancelled"

        # After it finished: a no-op, said so.
        answer = call(other_machine, "POST", "/api/cancel", ALICE)
        assert (answer.status_code, answer.json()["outcome"]) == (200, "finished")

        # While it is queued: it never starts.
        call(second, "POST", "/api/start-queued", BOB)
        answer = call(other_machine, "POST", "/api/cancel", BOB)
        assert (answer.status_code, answer.json()["outcome"]) == (200, "cancelled")
        wait_for(
            "the cancelled run's state",
            lambda: True
            if call(second, "GET", "/api/status", BOB).json()["status"] == "cancelled"
            else None,
            timeout=TIMEOUT,
        )
        client.close()


def test_the_listener_heals_after_a_database_restart(private_pg: Any, tmp_path: Path) -> None:
    """With polling all but off, events still come after PostgreSQL restarts mid-stream:
    the listener reconnects by itself, and what committed meanwhile is read at once."""
    from harness import Harness
    from sqlalchemy import make_url

    from flask_silo_sql import schema
    from flask_silo_sql.sql.engine import make_engine

    url = private_pg.create_database()
    engine = make_engine(url)
    schema.upgrade(engine)
    engine.dispose()
    config = {
        "SECRET_KEY": "process-test-secret",
        "SILO_STREAM_POLL_INTERVAL": 3600.0,  # only notifications (and the healing) deliver
        "SILO_STREAM_HEARTBEAT": 0.1,
        "SILO_STREAM_MAX_AGE": 60.0,
    }
    h = Harness(url, config=config, instance_path=tmp_path, clock=False)
    assert make_url(url).get_backend_name() == "postgresql"

    @h.app.post("/api/token")
    def token_view() -> Any:
        return h.silo.stream_token()

    @h.app.get("/events")
    def stream_view() -> Any:
        return h.silo.stream()

    try:
        token = h.json("POST", "/api/token", ALICE)
        response = h.client.get(
            f"/events?token={token['token']}&last_event_id={token['last_event_id']}",
            buffered=False,
        )
        chunks: Iterator[Any] = iter(response.response)

        def next_step() -> int:
            for chunk in chunks:
                text = str(chunk.decode())
                if text.startswith("id: "):
                    return int(text.split("data: ")[1].split(":")[1].rstrip("}\n"))
            raise AssertionError("the stream ended")

        h.silo.publish("step", {"n": 1}, sid=ALICE)
        assert next_step() == 1
        private_pg.stop_server()
        private_pg.start_server()

        def published() -> bool | None:
            try:
                h.silo.publish("step", {"n": 2}, sid=ALICE)
            except Exception:
                return None  # the app's pool finds the server back by itself
            return True

        wait_for("the database back", published, timeout=TIMEOUT)
        assert next_step() == 2
        h.silo.publish("step", {"n": 3}, sid=ALICE)
        assert next_step() == 3
        response.close()
    finally:
        h.close()


def test_streams_and_cancel_under_gevent_workers(silo_url: str, tmp_path: Path) -> None:
    """``gunicorn -k gevent``: streams are greenlets; the hub, the listener and a task's
    thread are too (gevent patches threading), and they work the same."""
    pytest.importorskip("gevent")
    env = env_for(silo_url)
    with gunicorn(
        env, tmp_path, app="events_app:app", workers=2, extra=("-k", "gevent")
    ) as server:
        clients = [Client(server, f"{ALICE}-{n}") for n in range(5)]
        for n, _client in enumerate(clients):
            call(server, "POST", f"/api/publish/{n}", f"{ALICE}-{n}")
        for n, client in enumerate(clients):
            assert steps(client.take(1)) == [n]
        call(server, "POST", "/api/start", f"{ALICE}-0")
        assert clients[0].until("progress")[-1]["event"] == "progress"
        answer = call(server, "POST", "/api/cancel", f"{ALICE}-0")
        assert answer.json()["outcome"] == "cancelling"
        assert clients[0].until("cancelled")[-1]["event"] == "cancelled"
        for client in clients:
            client.close()
