"""``fsck --fix`` never deletes a good file, even while uploads run.

Through ``gunicorn -w 2 --threads 4`` (the concurrency test app), on SQLite and
on PostgreSQL, with the ``local``, ``database`` and ``file://`` backends:
client threads upload (and replace) files without pause while this process
runs ``fsck --fix`` over and over, as an operator's cron would. Afterwards
every file whose last upload answered ``201`` is served whole, and a final
``fsck`` finds the store clean. Damage planted before the load (a file without
a row, a row without its file) is repaired meanwhile. The figures are printed.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import gunicorn
from sqlalchemy import delete, select

from flask_silo_sql import FileStore, SessionStore, SQLStorage, schema, session_key
from flask_silo_sql.files import fsck
from flask_silo_sql.files.catalog import FileKeeping
from flask_silo_sql.files.limits import RETIRED_PREFIX
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import file_chunks
from flask_silo_sql.sql.models import files as files_table

pytestmark = pytest.mark.slow

CLIENTS = 6
LOAD_S = 8.0
NAMES = 4
HEADER = "X-Session-ID"


def records_of(storage: SQLStorage) -> Callable[[], FileKeeping]:
    store = SessionStore(storage=storage)
    return lambda: store.backend.file_records("uploads")


@pytest.mark.parametrize("backend", ["local", "database", "file"])
def test_fsck_fix_during_uploads_deletes_nothing_good(
    db_url: str, tmp_path: Path, backend: str
) -> None:
    engine = make_engine(db_url)
    schema.upgrade(engine)
    base_dir = tmp_path / "uploads"
    url = backend if backend != "file" else f"file://{tmp_path / 'shared'}"
    env = {
        "SILO_DATABASE_URI": db_url,
        "SILO_TEST_UPLOAD_DIR": str(base_dir),
        "SILO_FILE_BACKEND": url,
    }
    storage = SQLStorage(db_url)
    checker = FileStore(str(base_dir), name="uploads", records=records_of(storage), backend=url)
    last: dict[tuple[str, str], bytes] = {}
    failures: list[Any] = []
    uploads = [0]
    stop = threading.Event()
    try:
        with gunicorn(env, tmp_path, workers=2, threads=4) as server:

            def put(sid: str, name: str, data: bytes) -> int:
                answer = requests.put(
                    f"{server.base}/api/upload/{name}", headers={HEADER: sid}, data=data, timeout=60
                )
                return answer.status_code

            # Damage for fsck to repair while the load runs.
            victim = "fsck-load-victim-00000"
            assert put(victim, "gone.bin", b"its file will vanish") == 201
            assert put(victim, "kept.bin", b"kept") == 201
            last[(victim, "kept.bin")] = b"kept"
            with engine.begin() as conn:
                gone = conn.execute(
                    select(files_table).where(files_table.c.filename == "gone.bin")
                ).one()
            if backend == "local":
                (base_dir / session_key(victim) / "gone.bin").unlink()
                stray = base_dir / session_key(victim) / "stray.bin"
                stray.write_bytes(b"no row")
                an_hour_ago = time.time() - 3600
                os.utime(stray, (an_hour_ago, an_hour_ago))
            elif backend == "database":
                with engine.begin() as conn:  # a row without its bytes
                    conn.execute(delete(file_chunks).where(file_chunks.c.file_id == gone.id))
            else:
                os.unlink(tmp_path / "shared" / session_key(victim) / gone.location)

            def client(index: int) -> None:
                sid = f"fsck-load-client-{index:02d}-0000"
                n = 0
                while not stop.is_set():
                    name = f"f{n % NAMES}.bin"
                    data = os.urandom(20_000 + (n * 7919) % 180_000)
                    try:
                        status = put(sid, name, data)
                    except requests.RequestException as exc:
                        failures.append(exc)
                        return
                    if status == 201:
                        last[(sid, name)] = data
                        uploads[0] += 1
                    else:
                        failures.append((sid, name, status))
                    n += 1

            threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
            for thread in threads:
                thread.start()
            runs = 0
            repaired = set()
            deadline = time.monotonic() + LOAD_S
            while time.monotonic() < deadline:
                report = fsck(checker, fix=True)
                runs += 1
                repaired.update(report.missing + report.unrecorded)
                assert report.mismatched == [], report
            stop.set()
            for thread in threads:
                thread.join(timeout=60)

            assert not failures, failures[:5]
            for (sid, name), data in sorted(last.items()):  # every good file is served whole
                got = requests.get(
                    f"{server.base}/api/files/{name}", headers={HEADER: sid}, timeout=30
                )
                assert got.status_code == 200, (sid, name, got.text)
                assert hashlib.sha256(got.content).digest() == hashlib.sha256(data).digest()
            log = server.log_text()
        final = fsck(checker)
        assert final.clean, final
        assert f"{session_key(victim)}/gone.bin" in repaired
        if backend == "local":
            assert f"{session_key(victim)}/stray.bin" in repaired
            assert not stray.exists()
        with engine.connect() as conn:
            found = conn.execute(select(files_table.c.sid, files_table.c.filename)).all()
        # Besides the files: replaced versions kept an hour for their downloads (not local).
        names = {(sid, name) for sid, name in found if not name.startswith(RETIRED_PREFIX)}
        assert names == {(session_key(sid), name) for sid, name in last}
        assert backend != "local" or len(names) == len(found)
    finally:
        stop.set()
        storage.dispose()
        engine.dispose()
    assert "Traceback" not in log, log[-3000:]
    database = db_url.split(":", 1)[0].split("+", 1)[0]
    print(
        f"\nFSCK-UNDER-LOAD db={database} backend={backend}: {runs} fsck --fix runs during "
        f"{LOAD_S:g} s of {uploads[0]} uploads that answered 201 ({CLIENTS} clients, "
        f"{len(last)} files): 0 lost, repaired {sorted(repaired)}"
    )
