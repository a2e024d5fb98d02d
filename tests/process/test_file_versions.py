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
from liveserver import Gunicorn, gunicorn, wait_ready

from flask_silo_sql import schema
from flask_silo_sql.sql.engine import make_engine

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
SIZE = 1_200_000
"""Two ``database`` chunks: a download reads the second after the first was sent."""
LARGE = 6 * 1024 * 1024
"""Larger than what the sockets buffer: a download begun reads most of it later."""
REPLACEMENTS = 8
READERS = 3
UPLOADS = 16


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
    (tmp_path / "barriers").mkdir()
    env = {
        "SILO_DATABASE_URI": db_url,
        "SILO_TEST_UPLOAD_DIR": str(tmp_path / "uploads"),
        "SILO_TEST_BARRIER_DIR": str(tmp_path / "barriers"),
        **backend_env,
    }
    with gunicorn(env, tmp_path, workers=2, threads=4) as live:
        yield live


def _put(
    server: Gunicorn, sid: str, name: str, data: bytes, *, counted: bool = True, query: str = ""
) -> requests.Response:
    """An upload; *counted*: by a view that also changes the session's state, so its
    file's row is written with the request's commit, after the view returned."""
    path = f"/api/upload/{name}?count={int(counted)}{query}"
    return requests.put(server.url(path), headers={HEADER: sid}, data=data, timeout=60)


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


def test_a_download_sees_one_whole_version_across_a_replacement(
    server: Gunicorn, tmp_path: Path
) -> None:
    """Step by step: a download begun before a replacement, one while the replacement
    is not committed, one after it."""
    sid = "versions-step-by-step-000000000"
    name = "big.bin"
    old, new = os.urandom(LARGE), os.urandom(LARGE)
    assert _put(server, sid, name, old).status_code == 201
    early = requests.get(
        server.url(f"/api/files/{name}"), headers={HEADER: sid}, stream=True, timeout=60
    )
    assert early.status_code == 200
    head = early.raw.read(64 * 1024)  # begun: the rest is read after the replacement
    barriers = tmp_path / "barriers"
    with ThreadPoolExecutor(max_workers=1) as pool:
        replacing = pool.submit(_put, server, sid, name, new, query="&pause=before_record&token=r")
        wait_ready(barriers / "r.ready")  # its bytes are in, its row not yet written
        during = requests.get(server.url(f"/api/files/{name}"), headers={HEADER: sid}, timeout=60)
        assert during.status_code == 200, during.text
        assert during.content == old  # the committed version, whole
        (barriers / "r.go").touch()
        assert replacing.result().status_code == 201
    rest = early.raw.read()
    assert head + rest == old  # the version it began, to its end
    after = requests.get(server.url(f"/api/files/{name}"), headers={HEADER: sid}, timeout=60)
    assert after.status_code == 200
    assert after.content == new
    assert after.headers["ETag"].strip('"') == hashlib.sha256(new).hexdigest()


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
        response = _put(server, sid, name, data, counted=False)  # no state: no 409s
        json_body = response.headers.get("Content-Type") == "application/json"
        body = response.json() if json_body else None
        return response.status_code, body

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(upload, range(UPLOADS)))
    statuses = Counter(status for status, _ in answers)
    print(f"\n{UPLOADS} concurrent uploads of one name: {dict(statuses)}")
    assert statuses == {201: UPLOADS}, [body for status, body in answers if status != 201]
    if backend_env["SILO_FILE_BACKEND"] != "local":  # local: the name itself, replaced whole
        sizes = {body["size"] for _, body in answers}
        assert sizes == {200_000 + index for index in range(UPLOADS)}  # each its own version
