"""A small disk that anonymous uploads fill: JSON answers, the database goes on, the sweep frees it.

The uploads (and, on SQLite, the embedded database, as the default instance
folder has them) live on a tmpfs of a few MiB mounted for the test. Anonymous
clients upload until the store's free-space floor refuses them with ``507``;
state writes still work. A second server without a floor then meets a real
``ENOSPC`` in the middle of an upload: ``507`` JSON, no partial file left.
Finally the sweep expires the sessions and their bytes are gone from the disk.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from liveserver import gunicorn
from support import Clock, small_tmpfs

from flask_silo_sql import Silo, SQLStorage, schema, session_key
from flask_silo_sql.files.limits import TEMP_PREFIX
from flask_silo_sql.sql.engine import make_engine

HEADER = "X-Session-ID"
MIB = 1024 * 1024
DISK_MIB = 24
FILE = 2 * MIB
FLOOR = 6 * MIB


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_MIB MiB (mounting needs root, or CAP_SYS_ADMIN)."""
    with small_tmpfs(tmp_path / "disk", DISK_MIB) as where:
        yield where


def free(path: Path) -> int:
    return shutil.disk_usage(path).free


def upload(server: Any, sid: str | None, name: str, size: int) -> requests.Response:
    headers = {HEADER: sid} if sid else {}
    return requests.put(
        server.url(f"/api/upload/{name}"), headers=headers, data=os.urandom(size), timeout=60
    )


def assert_507(response: requests.Response) -> None:
    assert response.status_code == 507, response.text
    body = response.json()
    assert body["error"] == "insufficient_storage"
    assert body["message"]


def partials(uploads: Path) -> list[Path]:
    return [p for p in uploads.rglob(f"{TEMP_PREFIX}*") if p.is_file()]


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_full_disk_answers_json_keeps_the_database_working_and_the_sweep_frees_it(
    disk: Path, tmp_path: Path, db: str, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{disk / 'silo.db'}" if db == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    schema.upgrade(engine)
    engine.dispose()
    uploads = disk / "uploads"
    env = {
        "SILO_DATABASE_URI": url,
        "SILO_TEST_UPLOAD_DIR": str(uploads),
        "SILO_MAX_FILE_BYTES": str(3 * MIB),
        "SILO_MIN_FREE_BYTES": str(FLOOR),
    }
    stored: list[str] = []
    with gunicorn(env, tmp_path) as server:
        # Anonymous clients, one new session each, fill the disk down to the floor.
        answers = []
        for n in range(DISK_MIB):
            response = upload(server, None, f"f{n}.bin", FILE)
            answers.append(response.status_code)
            if response.status_code == 201:
                stored.append(response.headers[HEADER])
            else:
                assert_507(response)
                break
        assert answers[-1] == 507, answers
        assert len(stored) >= 3, answers
        assert free(disk) >= FLOOR - FILE  # the floor held: room is left for the database
        # The database keeps working (on SQLite, it is on this disk).
        sid = stored[0]
        for expected in (1, 2):
            inc = requests.post(server.url("/api/inc"), headers={HEADER: sid}, timeout=30)
            assert inc.status_code == 200, inc.text
            assert inc.json() == {"value": expected}
        assert "Exception on /api/" not in server.log_text()

    # No floor: a real ENOSPC in the middle of an upload.
    filler = disk / "filler"
    with gunicorn({**env, "SILO_MIN_FREE_BYTES": "0"}, tmp_path) as server:
        with open(filler, "wb") as handle:
            handle.write(b"\0" * max(0, free(disk) - MIB))
        assert free(disk) < FILE
        before = free(disk)
        assert_507(upload(server, stored[1], "big.bin", FILE))
        assert partials(uploads) == []  # nothing of it is left
        assert free(disk) >= before - 64 * 1024
        listed = requests.get(server.url("/api/files"), headers={HEADER: stored[1]}, timeout=30)
        assert listed.status_code == 200, listed.text
        assert listed.json()["files"] == ["f1.bin"]
        filler.unlink()
        inc = requests.post(server.url("/api/inc"), headers={HEADER: sid}, timeout=30)
        assert inc.json() == {"value": 3}
        log = server.log_text()
    assert "Exception on /api/" not in log, log[-3000:]  # every error was answered as JSON
    assert "No space left on device" in log  # the operator learns why
    assert not any(s in log for s in stored)  # by no SID

    # The sweep expires every session, and with them the bytes that filled the disk.
    used = DISK_MIB * MIB - free(disk)
    app = Flask("sweeper")
    storage = SQLStorage(url)
    try:
        silo = Silo(app, storage=storage, ttl=3600, auto_cleanup=False)
        silo.add_file_store("uploads", str(uploads))
        clock = Clock(float(silo.store.backend.now()) + 2 * 3600)
        silo.store.clock = clock
        result = silo.store.sweep()
        assert sorted(result.expired) == sorted(session_key(s) for s in stored)
    finally:
        storage.dispose()
    assert [p.name for p in uploads.iterdir() if p.is_dir()] == []
    freed = DISK_MIB * MIB - free(disk)
    assert used - freed >= len(stored) * FILE * 0.9, (used, freed)
    print(
        f"\nFULL DISK {db}: {len(stored)} anonymous uploads of {FILE // MIB} MiB before 507 "
        f"(floor {FLOOR // MIB} MiB); ENOSPC mid-upload: 507, no partial file; the sweep "
        f"freed {(used - freed) / MIB:.1f} MiB"
    )
