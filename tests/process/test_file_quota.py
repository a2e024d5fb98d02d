"""Quotas hold under concurrency: parallel uploads of one session never store more than
``SILO_MAX_SESSION_BYTES``, and the ones refused keep nothing.

Through ``gunicorn -w 4 --threads 3`` (the concurrency test app), on SQLite and
on PostgreSQL, with the ``local`` and ``database`` backends: 10 uploads of
400 kB each, sent at once into a 1,000,000-byte quota, 3 trials. With a
``Content-Length`` each upload reserves its size before it reads a byte, so
exactly two fit; without one (chunked bodies) each reserves what it receives
as it comes, and whatever is stored still fits the quota. The figures are
printed (``-s``).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import gunicorn
from sqlalchemy import func, select

from flask_silo_sql import schema, session_key
from flask_silo_sql.files.limits import TEMP_PREFIX
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import file_chunks, files

pytestmark = pytest.mark.slow

QUOTA = 1_000_000
SIZE = 400_000
UPLOADS = 10
TRIALS = 3
HEADER = "X-Session-ID"


def _put(base: str, sid: str, name: str, data: bytes, start: threading.Barrier, sized: bool) -> Any:
    body: Any = data
    if not sized:

        def pieces() -> Iterator[bytes]:
            for at in range(0, len(data), 64 * 1024):
                yield data[at : at + 64 * 1024]

        body = pieces()
    start.wait(timeout=30)
    response = requests.put(
        f"{base}/api/upload/{name}", headers={HEADER: sid}, data=body, timeout=60
    )
    return response.status_code, response.json()


@pytest.mark.parametrize("backend", ["local", "database"])
@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
def test_parallel_uploads_never_exceed_the_quota(
    db_url: str, tmp_path: Path, backend: str, sized: bool
) -> None:
    engine = make_engine(db_url)
    schema.upgrade(engine)
    base_dir = tmp_path / "uploads"
    env = {
        "SILO_DATABASE_URI": db_url,
        "SILO_TEST_UPLOAD_DIR": str(base_dir),
        "SILO_FILE_BACKEND": backend,
        "SILO_MAX_SESSION_BYTES": str(QUOTA),
    }
    figures = []
    try:
        with gunicorn(env, tmp_path, workers=4, threads=3) as server:
            for trial in range(TRIALS):
                sid = f"quota-trial-{trial}-{'sized' if sized else 'chunked'}-0000"
                contents = {f"f{i}.bin": os.urandom(SIZE) for i in range(UPLOADS)}
                start = threading.Barrier(UPLOADS)
                with ThreadPoolExecutor(max_workers=UPLOADS) as pool:
                    futures = {
                        name: pool.submit(_put, server.base, sid, name, data, start, sized)
                        for name, data in contents.items()
                    }
                    answers = {name: future.result() for name, future in futures.items()}
                statuses = Counter(status for status, _ in answers.values())
                assert set(statuses) <= {201, 413}, answers
                for status, body in answers.values():
                    if status == 413:
                        assert body["error"] == "file_too_large"
                        assert body["limit"] == QUOTA
                with engine.connect() as conn:
                    rows = conn.execute(
                        select(files.c.filename, files.c.size_bytes)
                        .where(files.c.sid == session_key(sid))
                    ).all()
                    chunks = conn.execute(
                        select(func.count())
                        .select_from(file_chunks)
                        .join(files, files.c.id == file_chunks.c.file_id)
                        .where(files.c.sid == session_key(sid))
                    ).scalar()
                stored = sum(size for _, size in rows)
                kept = sorted(name for name, _ in rows)
                accepted = sorted(n for n, (status, _) in answers.items() if status == 201)
                assert stored <= QUOTA
                assert kept == accepted  # the refused ones left no row, pending or not
                assert all(size == SIZE for _, size in rows)
                if sized:
                    assert statuses[201] == QUOTA // SIZE  # exactly what fits
                directory = base_dir / session_key(sid)
                on_disk = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
                if backend == "local":
                    assert on_disk == accepted
                    assert chunks == 0
                else:
                    assert chunks == len(accepted)  # 400 kB: one chunk each
                    assert not [n for n in on_disk if n.startswith(TEMP_PREFIX)]
                for name in accepted:  # every stored file is whole
                    got = requests.get(
                        f"{server.base}/api/files/{name}", headers={HEADER: sid}, timeout=30
                    )
                    assert got.content == contents[name]
                figures.append((statuses[201], statuses[413], stored))
            log = server.log_text()
    finally:
        engine.dispose()
    assert "Traceback" not in log, log[-3000:]
    database = db_url.split(":", 1)[0].split("+", 1)[0]
    print(
        f"\nQUOTA db={database} backend={backend} body={'sized' if sized else 'chunked'}: "
        f"{UPLOADS} x {SIZE} B in parallel under {QUOTA} B, {TRIALS} trials: "
        + "; ".join(f"201={ok} 413={no} stored={total} B" for ok, no, total in figures)
    )
