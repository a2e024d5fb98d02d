"""A client that goes away mid-upload leaves nothing stored, through gunicorn.

gunicorn marks its input terminated and, when the client closes its side of
the connection before the ``Content-Length`` it announced, ends the body early
without an error: the bytes received so far look like the whole file. The
upload counts them against the announced length and answers ``400
request_body_incomplete`` (the client can still read it: only its sending side
is closed), with no row, no chunk and no file kept, on both databases and the
``local`` and ``database`` backends. The session's next upload of the same
name is stored whole.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import requests
from liveserver import gunicorn
from sqlalchemy import func, select

from flask_silo_sql import schema, session_key
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import file_chunks, files

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
SID = "short-body-session-000000001"
ANNOUNCED = 3_000_000
SENT = 1_200_000


def send_short(port: int, name: str) -> tuple[int, dict[str, object]]:
    """PUT announcing ANNOUNCED bytes, send SENT of them, close the sending side, read
    the answer."""
    head = (
        f"PUT /api/upload/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n{HEADER}: {SID}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {ANNOUNCED}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + os.urandom(SENT))
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(body)


@pytest.mark.parametrize("backend", ["local", "database"])
def test_an_upload_cut_short_by_its_client_keeps_nothing(
    db_url: str, tmp_path: Path, backend: str
) -> None:
    engine = make_engine(db_url)
    schema.upgrade(engine)
    base_dir = tmp_path / "uploads"
    env = {
        "SILO_DATABASE_URI": db_url,
        "SILO_TEST_UPLOAD_DIR": str(base_dir),
        "SILO_FILE_BACKEND": backend,
    }
    try:
        with gunicorn(env, tmp_path, workers=1, threads=2) as server:
            status, body = send_short(server.port, "cut.bin")
            assert status == 400, body
            assert body["error"] == "request_body_incomplete"
            with engine.connect() as conn:
                mine = select(files.c.filename).where(files.c.sid == session_key(SID))
                rows = conn.execute(mine).all()
                chunks = conn.execute(select(func.count()).select_from(file_chunks)).scalar()
            assert rows == []  # no file row, and no pending one left
            assert chunks == 0
            assert not [p for p in base_dir.rglob("*") if p.is_file()]

            whole = os.urandom(SENT)
            put = requests.put(
                f"{server.base}/api/upload/cut.bin", headers={HEADER: SID}, data=whole, timeout=30
            )
            assert put.status_code == 201, put.text
            got = requests.get(
                f"{server.base}/api/files/cut.bin", headers={HEADER: SID}, timeout=30
            )
            assert got.content == whole
            log = server.log_text()
    finally:
        engine.dispose()
    assert "Traceback" not in log, log[-3000:]
