"""Two machines, one PostgreSQL database, no shared filesystem: the data processor example.

Two gunicorn instances on different ports play two machines: each has its own
working directory, cache (``UPLOAD_DIR``), instance folder and host name; they
share only the database (and, for the fsspec backends, the store they are
configured with). A client uploads through A, starts the processing through B,
downloads through both (byte-identical, a ``Range``, ``If-None-Match``), and
once the session has expired every machine answers ``410`` and no byte of it is
left in the database, in the store, or in either cache.

Backends: ``database`` (nothing shared but the database), S3 (moto's server on
loopback) and ``file://`` on a directory both machines see.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import REPO_ROOT, Gunicorn, wait_for
from liveserver import gunicorn as live_gunicorn
from sqlalchemy import func, select

from flask_silo_sql import session_key
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import file_chunks, files, sessions

pytestmark = pytest.mark.slow

ROOT = REPO_ROOT
APP_FILE = "examples/data_processor.py"
HEADER = "X-Session-ID"
TTL = 4
TEXT = "".join(f"line {i} alpha beta gamma\n" for i in range(30_000))  # ~760 kB


@dataclass
class Store:
    kind: str
    url: str
    options: dict[str, Any]

    def objects(self, sid: str) -> list[str]:
        if self.kind == "database":
            return []
        import fsspec.core

        fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        fs.invalidate_cache()
        try:
            return [str(k) for k in fs.find(f"{str(root).rstrip('/')}/{session_key(sid)}")]
        except FileNotFoundError:
            return []


@pytest.fixture(params=["database", "s3", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "database":
        return Store("database", "database", {})
    if request.param == "file":
        shared = tmp_path / "shared"
        shared.mkdir()
        return Store("file", f"file://{shared}", {})
    server = request.getfixturevalue("s3_server")
    return Store("s3", f"s3://{server.create_bucket()}/uploads", server.storage_options())


def machine_env(pg_url: str, store: Store, home: Path, name: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "FLASK_APP"}
    env.update(
        SILO_DATABASE_URI=pg_url,
        SILO_FILE_BACKEND=store.url,
        SILO_FILE_STORAGE_OPTIONS=json.dumps(store.options),
        SILO_FILE_HOST=name,
        SILO_TTL=str(TTL),
        SILO_CLEANUP_INTERVAL="1",
        SILO_TOUCH_INTERVAL="0",
        SILO_TASK_FLUSH_INTERVAL="0.1",
        UPLOAD_DIR=str(home / "cache"),
        INSTANCE_DIR=str(home / "instance"),
        PYTHONUNBUFFERED="1",
    )
    return env


@contextmanager
def two_machines(pg_url: str, store: Store, tmp_path: Path) -> Iterator[list[Gunicorn]]:
    env_a = machine_env(pg_url, store, tmp_path / "a", "machine-a")
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", str(ROOT / APP_FILE), "silo-db", "upgrade"],
        cwd=tmp_path / "a",
        env=env_a,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with ExitStack() as stack:
        servers = []
        for name in ("a", "b"):
            env = machine_env(pg_url, store, tmp_path / name, f"machine-{name}")
            servers.append(
                stack.enter_context(
                    live_gunicorn(
                        env,
                        tmp_path / name,
                        app="examples.data_processor:app",
                        chdir=tmp_path / name,
                        health="/",
                        workers=2,
                        timeout=60,
                    )
                )
            )
        yield servers


class Client:
    """A client that keeps its session ID and talks to whichever machine it is told."""

    def __init__(self) -> None:
        self.sid: str | None = None

    def call(self, server: Gunicorn, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {HEADER: self.sid} if self.sid else {}
        headers.update(kwargs.pop("headers", {}))
        response = requests.request(method, server.url(path), headers=headers, timeout=30, **kwargs)
        self.sid = response.headers.get(HEADER, self.sid)
        return response


def test_the_data_processor_on_two_machines(pg_url: str, store: Store, tmp_path: Path) -> None:
    data = TEXT.encode()
    digest = hashlib.sha256(data).hexdigest()
    with two_machines(pg_url, store, tmp_path) as (a, b):
        client = Client()
        uploaded = client.call(a, "POST", "/api/upload", files={"file": ("big.txt", data)})
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json() == {"filename": "big.txt", "size": len(data)}
        sid = client.sid
        assert sid

        started = client.call(b, "POST", "/api/process", params={"steps": 3, "delay": 0.05})
        assert started.status_code == 200, started.text  # B reads the file A received

        def complete() -> dict[str, Any] | None:
            body: dict[str, Any] = client.call(a, "GET", "/api/status").json()
            return body if body["complete"] else None

        wait_for("the task to complete", complete, timeout=60, interval=0.1)
        for server in (a, b):
            results = client.call(server, "GET", "/api/results").json()["results"]
            assert results["bytes"] == len(data)
            assert results["lines"] == TEXT.count("\n")

        etags = set()
        for server in (a, b):
            whole = client.call(server, "GET", "/api/download")
            assert whole.status_code == 200, whole.text
            assert whole.content == data
            assert "filename=big.txt" in whole.headers["Content-Disposition"]
            etags.add(whole.headers["ETag"])
        assert etags == {f'"{digest}"'}
        part = client.call(b, "GET", "/api/download", headers={"Range": "bytes=100000-100099"})
        assert part.status_code == 206
        assert part.content == data[100000:100100]
        assert part.headers["Content-Range"] == f"bytes 100000-100099/{len(data)}"
        cached = client.call(a, "GET", "/api/download", headers={"If-None-Match": f'"{digest}"'})
        assert cached.status_code == 304
        assert cached.content == b""

        # While it lives, the bytes are in the database or the store.
        engine = make_engine(pg_url)
        try:
            with engine.connect() as conn:
                (row,) = conn.execute(select(files).where(files.c.sid == session_key(sid))).all()
                chunks = conn.execute(select(func.count()).select_from(file_chunks)).scalar()
            assert (row.filename, row.size_bytes, row.sha256) == ("big.txt", len(data), digest)
            assert chunks == (1 if store.kind == "database" else 0)
            assert len(store.objects(sid)) == (0 if store.kind == "database" else 1)
            caches = [tmp_path / name / "cache" / session_key(sid) for name in ("a", "b")]
            if store.kind == "file":
                assert not any(c.exists() and any(c.rglob("*.txt")) for c in caches)
            else:
                assert all(any(c.rglob("big.txt")) for c in caches)  # B fetched its copy

            # Idle past its TTL: the sweep of either machine expires it.
            def swept() -> bool | None:
                with engine.connect() as conn:
                    left = conn.execute(
                        select(func.count())
                        .select_from(sessions)
                        .where(sessions.c.sid == session_key(sid))
                    ).scalar()
                return True if left == 0 else None

            wait_for("the session to be swept", swept, timeout=TTL + 30, interval=0.2)
            for server in (a, b):
                assert client.call(server, "GET", "/api/results").status_code == 410
                assert client.call(server, "GET", "/api/download").status_code == 410

            def no_bytes_left() -> bool | None:
                with engine.connect() as conn:
                    rows = conn.execute(select(func.count()).select_from(files)).scalar()
                    chunks = conn.execute(select(func.count()).select_from(file_chunks)).scalar()
                if rows or chunks or store.objects(sid) or any(c.exists() for c in caches):
                    return None
                return True

            wait_for("every machine to let the session's bytes go", no_bytes_left, timeout=30)
        finally:
            engine.dispose()
        for server in (a, b):
            assert "Traceback" not in server.log_text(), server.log_text()[-3000:]
