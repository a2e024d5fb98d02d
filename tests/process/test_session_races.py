"""Two operations of one session sent together, every pair, under gunicorn (4 processes).

The operations: ``start`` (a task that runs about half a second, then writes its
result), ``reset``, ``rotate``, ``upload`` (256 kB) and ``expire`` (the session
made due, then a sweep). Each round makes a fresh session (holding a file), sends
the pair at once from two threads, waits for a started run to end, then checks
what a client relies on, whichever order the database put them in:

- no answer is a 5xx;
- a run whose start answered 200 ends ``complete`` with its result, in the session
  that holds it now (its own, or the one a rotation gave it, or, when its start came
  after a rotation, the fresh one of the old SID): never frozen, lost, or rowless;
- a reset answered 200 while a run started before it would be refused (checked by
  the run above: a deleted row leaves it ``idle``);
- every upload answered 201 left its file under its name; nothing is left behind
  in the file store (``fsck``: no bytes without a row, no row without bytes).

``SILO_RACE_ROUNDS`` sets the rounds per pair (default 3), ``SILO_RACE_PAIR``
(``reset+upload``) races one pair only; the outcome table is printed (``-s``).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import Gunicorn, gunicorn
from sqlalchemy import Engine, text

from flask_silo_sql import session_key

HEADER = "X-Session-ID"
APP = "operations_app:app"
OPERATIONS = ("start", "reset", "rotate", "upload", "expire")
PAIRS = [
    pair
    for pair in itertools.combinations(OPERATIONS, 2)
    if os.environ.get("SILO_RACE_PAIR", "+".join(pair)) == "+".join(pair)
]
ROUNDS = int(os.environ.get("SILO_RACE_ROUNDS", "3"))
BODY = os.urandom(256 * 1024)
RUN_S = 0.5


def _send(web: Gunicorn, operation: str, sid: str) -> requests.Response:
    headers = {HEADER: sid}
    if operation == "start":
        return requests.post(web.url(f"/api/start?seconds={RUN_S}"), headers=headers, timeout=30)
    if operation == "reset":
        return requests.post(web.url("/api/reset"), headers=headers, timeout=30)
    if operation == "rotate":
        return requests.post(web.url("/api/rotate"), headers=headers, timeout=30)
    if operation == "upload":
        return requests.put(web.url("/api/upload/late.bin"), headers=headers, data=BODY, timeout=30)
    assert operation == "expire"
    return requests.post(web.url("/ops/sweep"), timeout=30)


def _status(web: Gunicorn, sid: str) -> dict[str, Any]:
    answer = requests.get(web.url("/api/status"), headers={HEADER: sid}, timeout=30)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _fresh_session(web: Gunicorn, engine: Engine, *, due: bool) -> str:
    made = requests.put(web.url("/api/upload/base.bin"), data=b"base", timeout=30)
    assert made.status_code == 201, made.text
    sid = made.headers[HEADER]
    if due:  # the sweep finds it idle for an hour
        with engine.begin() as conn:
            conn.execute(
                text(  # both: the sweep looks at a session once its sweep_after has passed
                    "UPDATE silo_sessions SET expires_at = :at, sweep_after = :at WHERE sid = :sid"
                ),
                {"at": _past(engine), "sid": session_key(sid)},
            )
    return sid


def _past(engine: Engine) -> Any:
    import datetime as dt

    moment = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    return moment if engine.dialect.name == "postgresql" else moment.replace(tzinfo=None)


def answers_text(answers: dict[str, requests.Response]) -> str:
    return " ".join(f"{op}={answer.status_code}" for op, answer in answers.items())


def _race(web: Gunicorn, pair: tuple[str, str], sid: str) -> dict[str, requests.Response]:
    barrier = threading.Barrier(2)
    answers: dict[str, requests.Response] = {}

    def send(operation: str) -> None:
        barrier.wait()
        answers[operation] = _send(web, operation, sid)

    threads = [threading.Thread(target=send, args=(op,)) for op in pair]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def _settled(web: Gunicorn, sids: list[str]) -> dict[str, dict[str, Any]]:
    """Each session's status once no run of it is running (bounded)."""
    deadline = time.monotonic() + 15 + 4 * RUN_S
    while True:
        found = {sid: _status(web, sid) for sid in sids}
        if all(body["status"] != "running" for body in found.values()):
            return found
        if time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _violations(
    pair: tuple[str, str], answers: dict[str, requests.Response], sid: str, web: Gunicorn
) -> list[str]:
    codes = {op: answer.status_code for op, answer in answers.items()}
    found = [
        f"{op} answered {code}: {answers[op].text[:200]}"
        for op, code in codes.items()
        if code >= 500
    ]
    sids = [sid]
    rotated = answers.get("rotate")
    if rotated is not None and rotated.status_code == 200:
        sids.append(rotated.json()["sid"])
    state = _settled(web, sids)
    if codes.get("start") == 200:
        ended = [s for s in state.values() if s["status"] == "complete" and s["result"]]
        if not ended:
            statuses = {s["status"] for s in state.values()}
            found.append(f"a started run never completed with its result ({statuses})")
    upload = answers.get("upload")
    if upload is not None and upload.status_code == 201:
        holder = [s for s in state.values() if "late.bin" in s["files"]]
        wiped_after = {"reset", "expire"} & set(pair)  # may come after, and remove it
        if not holder and not wiped_after:
            found.append("an upload answered 201 but its file is nowhere")
    return found


@pytest.mark.parametrize("backend", ["local", "database"])
def test_every_pair_of_a_sessions_operations_serialises_or_commutes(
    db_url: str, migrated_engine: Engine, tmp_path: Path, backend: str
) -> None:
    env = {
        "SILO_DATABASE_URI": db_url,
        "SILO_TEST_UPLOAD_DIR": str(tmp_path / "uploads"),
        "SILO_FILE_BACKEND": backend,
        "SILO_MIN_FREE_BYTES": "0",
        "SILO_TASK_HEARTBEAT_TIMEOUT": "6",
        "SILO_TASK_POLL_INTERVAL": "0.2",
    }
    table: dict[tuple[str, str], Counter[str]] = {}
    problems: list[str] = []
    with gunicorn(env, tmp_path, app=APP, workers=4) as web:
        for pair in PAIRS:
            outcomes: Counter[str] = Counter()
            for _ in range(ROUNDS):
                sid = _fresh_session(web, migrated_engine, due="expire" in pair)
                answers = _race(web, pair, sid)
                outcomes[" ".join(f"{op}={answers[op].status_code}" for op in pair)] += 1
                for violation in _violations(pair, answers, sid, web):
                    problems.append(f"{pair}: {violation}")
                fsck = requests.get(web.url("/ops/fsck"), timeout=60).json()
                if fsck != {"unrecorded": [], "missing": []}:
                    problems.append(f"{pair} {answers_text(answers)}: {fsck}")
            table[pair] = outcomes
        log = web.log_text()
    print(f"\n{migrated_engine.dialect.name} / {backend}: {ROUNDS} rounds per pair")
    for pair, outcomes in table.items():
        counts = ", ".join(f"{k}: {n}" for k, n in outcomes.items())
        print(f"  {pair[0]:>6} + {pair[1]:<6} {counts}")
    assert "ERROR" not in log, log
    assert problems == []
