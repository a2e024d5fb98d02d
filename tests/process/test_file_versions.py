"""A file replaced while it is downloaded, and the path ``save`` returns, under gunicorn.

Through ``gunicorn -w 2 --threads 4`` (the concurrency test app), on SQLite and
on PostgreSQL, with the ``local``, ``database`` and S3 (moto's server)
backends:

* one client replaces a file (PUT after PUT, each a new version) while three
  others download it: the file exists all along, so every download answers
  ``200`` with one whole version, its ``ETag`` (its SHA-256) and length those of
  the bytes sent;
* concurrent uploads of one name: the upload view opens the path ``save``
  returned (``os.path.getsize``), which a newer version must never remove (for
  ``database`` and S3 a cached copy of that upload's own version; for ``local``
  the file's name, whose bytes a newer version replaces whole).

A bounded number of rounds each; the figures are printed (``-s``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import Gunicorn, gunicorn

from flask_silo_sql import schema
from flask_silo_sql.sql.engine import make_engine

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
SIZE = 1_200_000
"""Two ``database`` chunks: a download reads the second after the first was sent."""
REPLACEMENTS = 12
READERS = 3
UPLOADS = 24


@pytest.fixture(params=["local", "database", "s3"])
def backend_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param != "s3":
        return {"SILO_FILE_BACKEND": request.param}
    server = request.getfixturevalue("s3_server")
    return {
        **server.env(),
        "SILO_FILE_BACKEND": f"s3://{server.create_bucket()}/uploads",
        "SILO_FILE_STORAGE_OPTIONS": json.dumps(server.storage_options()),
    }


@pytest.fixture
def server(db_url: str, tmp_path: Path, backend_env: dict[str, str]) -> Iterator[Gunicorn]:
    engine = make_engine(db_url)
    schema.upgrade(engine)
    engine.dispose()
    env = {
        "SILO_DATABASE_URI": db_url,
        "SILO_TEST_UPLOAD_DIR": str(tmp_path / "uploads"),
        **backend_env,
    }
    with gunicorn(env, tmp_path, workers=2, threads=4) as live:
        yield live


def _put(server: Gunicorn, sid: str, name: str, data: bytes) -> requests.Response:
    return requests.put(
        server.url(f"/api/upload/{name}"), headers={HEADER: sid}, data=data, timeout=60
    )


def _download(server: Gunicorn, sid: str, name: str, versions: set[str]) -> str:
    """``ok``, or what went wrong with one download."""
    try:
        response = requests.get(server.url(f"/api/files/{name}"), headers={HEADER: sid}, timeout=60)
        body = response.content
    except requests.RequestException as exc:
        return f"no answer: {type(exc).__name__}"
    if response.status_code != 200:
        return f"status {response.status_code}"
    digest = hashlib.sha256(body).hexdigest()
    if response.headers.get("ETag", "").strip('"') != digest:
        return "ETag of other bytes"
    if int(response.headers.get("Content-Length", "-1")) != len(body):
        return "length of other bytes"
    return "ok" if digest in versions else "bytes of no version"


def test_a_file_downloads_whole_while_it_is_replaced(server: Gunicorn) -> None:
    sid = "versions-replace-download-0000000"
    name = "data.bin"
    first = os.urandom(SIZE)
    versions = {hashlib.sha256(first).hexdigest()}
    assert _put(server, sid, name, first).status_code == 201
    done = threading.Event()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def read() -> None:
        while not done.is_set():
            outcome = _download(server, sid, name, versions)
            with lock:
                outcomes[outcome] += 1

    with ThreadPoolExecutor(max_workers=READERS) as pool:
        readers = [pool.submit(read) for _ in range(READERS)]
        try:
            for _ in range(REPLACEMENTS):
                data = os.urandom(SIZE)
                versions.add(hashlib.sha256(data).hexdigest())  # before a reader can see it
                assert _put(server, sid, name, data).status_code == 201
        finally:
            done.set()
        for reader in readers:
            reader.result()
    print(f"\n{REPLACEMENTS} replacements, downloads: {dict(outcomes)}")
    assert outcomes["ok"] > 0
    assert set(outcomes) == {"ok"}, dict(outcomes)


def test_the_path_save_returns_stays_while_the_name_is_replaced(
    server: Gunicorn, backend_env: dict[str, str]
) -> None:
    sid = "versions-save-path-000000000000"
    name = "same.bin"
    start = threading.Barrier(8)

    def upload(index: int) -> tuple[int, Any]:
        if index < 8:
            start.wait(timeout=30)
        data = os.urandom(200_000 + index)
        response = _put(server, sid, name, data)
        body = response.json() if response.headers.get("Content-Type") == "application/json" else None
        return response.status_code, body

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(upload, range(UPLOADS)))
    statuses = Counter(status for status, _ in answers)
    print(f"\n{UPLOADS} concurrent uploads of one name: {dict(statuses)}")
    assert statuses == {201: UPLOADS}, [body for status, body in answers if status != 201]
    if backend_env["SILO_FILE_BACKEND"] != "local":  # local: the name itself, replaced whole
        sizes = {body["size"] for _, body in answers}
        assert sizes == {200_000 + index for index in range(UPLOADS)}  # each its own version
