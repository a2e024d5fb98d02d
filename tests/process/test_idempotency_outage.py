"""@silo.idempotent through gunicorn while PostgreSQL goes away: at the claim, at the commit.

The database is a private cluster of this module, stopped and started by the
test. Whatever the moment, the client is answered 503 with a JSON body, and the
key is never stuck: released, or pending until its lease ends.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import gunicorn, wait_for
from pgserver import PgServer
from sqlalchemy import select

from flask_silo_sql import session_key
from flask_silo_sql.sql import schema
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import idempotency_keys, namespaces

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
KEY = "Idempotency-Key"
LEASE_S = 3.0


def _json_503(response: requests.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"] == "storage_unavailable"
    assert body["message"]


@pytest.mark.parametrize("point", ["claim", "commit"])
def test_an_outage_at_the_claim_or_the_commit_answers_503_and_frees_the_key(
    private_pg: PgServer, tmp_path: Path, point: str
) -> None:
    url = private_pg.create_database()
    engine = make_engine(url)
    schema.upgrade(engine)
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    runs = tmp_path / "runs.txt"
    env = {
        "SILO_DATABASE_URI": url,
        "SILO_TEST_BARRIER_DIR": str(barriers),
        "SILO_TEST_RUNS_FILE": str(runs),
        "SILO_IDEMPOTENCY_LEASE": str(LEASE_S),
        "SILO_DB_TIMEOUT": "2",
    }
    down = False
    try:
        with gunicorn(env, tmp_path, workers=2) as server:
            first = requests.post(server.url("/api/inc"), timeout=30)
            sid = first.headers[HEADER]
            headers = {HEADER: sid, KEY: '"order-1"'}
            if point == "claim":
                private_pg.stop_server("immediate")
                down = True
                answer = requests.post(
                    server.url("/api/idem/inc"), headers=headers, data=b"x", timeout=60
                )
                _json_503(answer)
            else:
                outcome: dict[str, Any] = {}

                def send() -> None:
                    outcome["response"] = requests.post(
                        server.url("/api/idem/inc"),
                        headers={
                            **headers,
                            "X-Test-Pause": "before_response",
                            "X-Test-Token": "outage",
                        },
                        data=b"x",
                        timeout=60,
                    )

                client = threading.Thread(target=send)
                client.start()
                wait_for(
                    "the commit to pause",
                    lambda: True if (barriers / "outage.ready").exists() else None,
                )
                private_pg.stop_server("immediate")
                down = True
                (barriers / "outage.go").touch()
                client.join(60)
                _json_503(outcome["response"])
            private_pg.start_server()
            down = False

            def retry() -> requests.Response | None:
                answer = requests.post(
                    server.url("/api/idem/inc"), headers=headers, data=b"x", timeout=60
                )
                if answer.status_code in (409, 503):
                    return None
                return answer

            served = wait_for("the key to be free", retry, timeout=60, interval=0.2)
            assert served.status_code == 200, served.text
            assert "Idempotent-Replayed" not in served.headers
            again = requests.post(
                server.url("/api/idem/inc"), headers=headers, data=b"x", timeout=60
            )
            assert again.headers["Idempotent-Replayed"] == "true"
            assert again.content == served.content
    finally:
        if down:
            private_pg.start_server()
    engine.dispose()  # its connections did not outlive the server
    with engine.connect() as conn:
        data = conn.execute(
            select(namespaces.c.data).where(
                namespaces.c.sid == session_key(sid), namespaces.c.name == "counter"
            )
        ).scalar()
        statuses = conn.execute(select(idempotency_keys.c.status)).scalars().all()
    assert data is not None
    value = (data if isinstance(data, dict) else json.loads(data))["value"]
    assert value == 2  # the /api/inc, and one idempotent run saved
    assert statuses == [200]
    engine.dispose()
