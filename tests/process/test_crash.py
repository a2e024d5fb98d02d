"""A gunicorn worker killed with SIGKILL mid-request leaves nothing half-written.

A request that changes several namespaces is paused at a chosen point (a
barrier file), its worker is killed, gunicorn starts a new one, and the
session is read back through the app and straight from the database: either
every namespace changed or none did. An upload whose worker is killed while
the body streams in, or after its file is in place but before its row is
written, leaves no ``silo_files`` row without its file and no partial file
under a final name (a leftover ``.silo-upload-*`` temporary file is
acceptable: fsck reports it); a replaced version's row, with the replacement
never committed, still describes the version readers get (kept aside). On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from liveserver import Gunicorn, gunicorn, process_gone, wait_for, wait_ready
from sqlalchemy import Engine, select

from flask_silo_sql import SessionStore, SQLStorage, session_key
from flask_silo_sql.files import FileStore, fsck
from flask_silo_sql.files.catalog import FileKeeping
from flask_silo_sql.files.limits import TEMP_PREFIX
from flask_silo_sql.files.limits import TEMP_PREFIX as PENDING_PREFIX
from flask_silo_sql.files.rows import FileRow, kept_aside
from flask_silo_sql.sql.models import files, namespaces

pytestmark = pytest.mark.slow

HEADER = "X-Session-ID"
MULTI = ("alpha", "beta", "gamma")


@pytest.fixture
def engine(migrated_engine: Engine) -> Engine:
    """The test database at the current schema, for reading behind the app's back."""
    return migrated_engine


@pytest.fixture
def app_env(db_url: str, engine: Engine, tmp_path: Path) -> dict[str, str]:
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    return {
        "SILO_DATABASE_URI": db_url,
        "SILO_TEST_BARRIER_DIR": str(barriers),
        "SILO_TEST_UPLOAD_DIR": str(tmp_path / "uploads"),
    }


def _kill_worker(server: Gunicorn, pid: int) -> None:
    """SIGKILL one worker; wait until it is dead and a new one answers."""
    os.kill(pid, signal.SIGKILL)
    wait_for(f"worker {pid} to die", lambda: True if process_gone(pid) else None)
    server.wait_healthy()


def _db(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0]


def _rows(engine: Engine, sid: str) -> dict[str, tuple[Any, int]]:
    with engine.connect() as conn:
        return {
            row.name: (row.data, row.version)
            for row in conn.execute(
                select(namespaces.c.name, namespaces.c.data, namespaces.c.version).where(
                    namespaces.c.sid == session_key(sid)
                )
            )
        }


# -- a request that writes several namespaces ------------------------------------

POINTS = {
    # pause point: whether the killed request's changes are expected to be there
    "handler": False,  # state changed in the handler, nothing saved yet
    "mid_save": False,  # inside the write transaction, one namespace written
    "after_commit": True,  # committed, response not sent
}


@pytest.mark.parametrize("locking", [False, True], ids=["optimistic", "locking"])
@pytest.mark.parametrize("point", list(POINTS))
def test_worker_killed_mid_request_leaves_no_half_written_session(
    app_env: dict[str, str], engine: Engine, db_url: str, tmp_path: Path, point: str, locking: bool
) -> None:
    env = {**app_env, "SILO_LOCKING": "1" if locking else "0"}
    barriers = Path(env["SILO_TEST_BARRIER_DIR"])
    with gunicorn(env, tmp_path, workers=1) as server:
        first = requests.post(server.url("/api/multi?value=1"), timeout=30)
        assert first.status_code == 200, first.text
        sid = first.headers[HEADER]
        before = _rows(engine, sid)
        assert {name: data for name, (data, _) in before.items() if name in MULTI} == {
            name: {"value": 1} for name in MULTI
        }

        outcome: dict[str, Any] = {}

        def doomed() -> None:
            try:
                outcome["response"] = requests.post(
                    server.url(f"/api/multi?value=2&pause={point}&token=crash"),
                    headers={HEADER: sid},
                    timeout=60,
                )
            except requests.RequestException as exc:
                outcome["error"] = exc

        client = threading.Thread(target=doomed)
        client.start()
        pid = wait_ready(barriers / "crash.ready")
        _kill_worker(server, pid)
        client.join(timeout=60)
        assert not client.is_alive()
        assert "error" in outcome, f"the killed request was answered: {outcome}"

        # Through the app (a new worker): all or nothing, and the session is not stuck.
        seen = requests.get(server.url("/api/multi"), headers={HEADER: sid}, timeout=30)
        assert seen.status_code == 200, seen.text
        values = set(seen.json().values())
        assert len(values) == 1, f"half-written session: {seen.json()}"
        expected = 2 if POINTS[point] else 1
        assert values == {expected}

        after = _rows(engine, sid)
        datas = {after[name][0]["value"] for name in MULTI}
        versions = {after[name][1] - before[name][1] for name in MULTI}
        assert datas == {expected}
        assert versions == ({1} if POINTS[point] else {0})

        # The same session takes writes again (no lock left behind by the dead worker).
        again = requests.post(server.url("/api/multi?value=3"), headers={HEADER: sid}, timeout=30)
        assert again.status_code == 200, again.text
        assert set(
            requests.get(server.url("/api/multi"), headers={HEADER: sid}, timeout=30)
            .json()
            .values()
        ) == {3}
        log = server.log_text()
    assert "Exception on /api/" not in log, log[-3000:]
    print(
        f"\nCRASH {_db(db_url)} multi-namespace point={point} "
        f"{'locking' if locking else 'optimistic'}: "
        f"killed worker {pid}; namespaces after: {sorted(datas)} "
        f"({'all' if POINTS[point] else 'none'} changed, as expected)"
    )


# -- uploads --------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_rows(engine: Engine, sid: str) -> dict[str, tuple[int, str]]:
    """The stored files' rows (not the pending rows of uploads in progress)."""
    with engine.connect() as conn:
        return {
            row.filename: (int(row.size_bytes), row.sha256)
            for row in conn.execute(
                select(files.c.filename, files.c.size_bytes, files.c.sha256).where(
                    files.c.sid == session_key(sid),
                    files.c.store == "uploads",
                    ~files.c.filename.startswith(PENDING_PREFIX, autoescape=True),
                )
            )
        }


def _check_store(engine: Engine, db_url: str, base: Path, sid: str) -> Any:
    """No row without its (complete) file; return fsck's report of the store."""
    directory = base / session_key(sid)
    records = {r.filename: r for r in _row_objects(engine, sid)}
    for name, (size, sha) in _file_rows(engine, sid).items():
        path = directory / name
        aside = Path(kept_aside(str(directory), records[name]))
        if aside.exists():  # an upload that replaced it never committed: its readers read here
            path = aside
        assert path.is_file(), f"silo_files row without its file: {name}"
        data = path.read_bytes()
        assert (len(data), _sha(data)) == (size, sha), f"row does not describe {name}"
    storage = SQLStorage(db_url)
    try:
        store = FileStore(str(base), name="uploads", records=records_of(storage))
        return fsck(store, grace=0)  # no upload is in progress: a pending row is a dead one
    finally:
        storage.dispose()


def records_of(storage: SQLStorage) -> Callable[[], FileKeeping]:
    """The rows of the ``uploads`` store in *storage*, as a Silo's file store reads them."""
    store = SessionStore(storage=storage)
    return lambda: store.backend.file_records("uploads")


def _temp_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


def _row_objects(engine: Engine, sid: str) -> list[FileRow]:
    with engine.connect() as conn:
        found = conn.execute(
            select(files.c.id, files.c.filename, files.c.size_bytes, files.c.sha256).where(
                files.c.sid == session_key(sid), files.c.store == "uploads"
            )
        ).all()
    return [FileRow(sid, r.filename, int(r.size_bytes), r.sha256, id=int(r.id)) for r in found]


def _upload(server: Gunicorn, sid: str | None, name: str, data: bytes) -> str:
    headers = {HEADER: sid} if sid else {}
    done = requests.put(server.url(f"/api/upload/{name}"), headers=headers, data=data, timeout=30)
    assert done.status_code == 201, done.text
    return done.headers[HEADER]


def _listed(server: Gunicorn, sid: str) -> list[str]:
    listed = requests.get(server.url("/api/files"), headers={HEADER: sid}, timeout=30)
    assert listed.status_code == 200, listed.text
    names: list[str] = listed.json()["files"]
    return names


def test_worker_killed_while_upload_streams_in(
    app_env: dict[str, str], engine: Engine, db_url: str, tmp_path: Path
) -> None:
    base = Path(app_env["SILO_TEST_UPLOAD_DIR"])
    old = os.urandom(300_000)
    new = os.urandom(2_000_000)
    with gunicorn(app_env, tmp_path, workers=1) as server:
        sid = _upload(server, None, "data.bin", old)
        directory = base / session_key(sid)
        assert _file_rows(engine, sid) == {"data.bin": (len(old), _sha(old))}
        pid = int(requests.get(server.url("/pid"), timeout=10).text)

        # Replace data.bin, streaming the body slowly: kill while the file is written.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            conn.putrequest("PUT", "/api/upload/data.bin")
            conn.putheader(HEADER, sid)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(len(new)))
            conn.endheaders()
            conn.send(new[:1_500_000])  # more than one piece (CHUNK) of it

            def partial_written() -> Path | None:
                for temp in _temp_files(directory):
                    if temp.stat().st_size >= 64 * 1024:
                        return temp
                return None

            temp = wait_for("the upload's temporary file to grow", partial_written)
            written = temp.stat().st_size
            _kill_worker(server, pid)
        finally:
            conn.close()

        # The old version is intact under its name, and it is what the app lists.
        assert (directory / "data.bin").read_bytes() == old
        assert _listed(server, sid) == ["data.bin"]
        leftovers = [p.name for p in _temp_files(directory)]
        assert leftovers, "the killed upload's temporary file should be left behind"
        report = _check_store(engine, db_url, base, sid)
        assert report.missing == []
        assert report.unrecorded == []
        assert sorted(report.partial) == sorted(f"{session_key(sid)}/{name}" for name in leftovers)

        # The store keeps working.
        _upload(server, sid, "data.bin", new)
        assert _listed(server, sid) == ["data.bin"]
        log = server.log_text()
    fixed = _fsck_fix(db_url, base)
    assert fixed.partial == [f"{session_key(sid)}/{name}" for name in leftovers]
    assert (directory / "data.bin").read_bytes() == new
    assert _file_rows(engine, sid) == {"data.bin": (len(new), _sha(new))}
    assert "Exception on /api/" not in log, log[-3000:]
    print(
        f"\nCRASH {_db(db_url)} upload killed with {written} of {len(new)} bytes in its "
        f"temporary file: old version intact under its name; fsck: partial={fixed.partial}"
    )


def _fsck_fix(db_url: str, base: Path) -> Any:
    storage = SQLStorage(db_url)
    try:
        store = FileStore(str(base), name="uploads", records=records_of(storage))
        fixed = fsck(store, fix=True, grace=0)  # as in _check_store
        assert fsck(store, grace=0).clean
        return fixed
    finally:
        storage.dispose()


@pytest.mark.parametrize("replacing", [False, True], ids=["new-file", "replacement"])
def test_worker_killed_between_rename_and_row(
    app_env: dict[str, str], engine: Engine, db_url: str, tmp_path: Path, replacing: bool
) -> None:
    """The file is complete under its name; no row describes anything but its file."""
    base = Path(app_env["SILO_TEST_UPLOAD_DIR"])
    barriers = Path(app_env["SILO_TEST_BARRIER_DIR"])
    old = os.urandom(300_000)
    new = os.urandom(1_000_000)
    name = "data.bin" if replacing else "late.bin"
    with gunicorn(app_env, tmp_path, workers=1) as server:
        sid = _upload(server, None, "data.bin", old)
        directory = base / session_key(sid)
        outcome: dict[str, Any] = {}

        def doomed() -> None:
            try:
                outcome["response"] = requests.put(
                    server.url(f"/api/upload/{name}?pause=before_record&token=upload"),
                    headers={HEADER: sid},
                    data=new,
                    timeout=60,
                )
            except requests.RequestException as exc:
                outcome["error"] = exc

        client = threading.Thread(target=doomed)
        client.start()
        pid = wait_ready(barriers / "upload.ready")
        _kill_worker(server, pid)
        client.join(timeout=60)
        assert "error" in outcome, outcome

        assert (directory / name).read_bytes() == new  # complete, never partial
        report = _check_store(engine, db_url, base, sid)  # every row describes its file
        rows = _file_rows(engine, sid)
        assert sorted(rows) == _listed(server, sid)  # the app sees only recorded files
        assert (report.missing, report.mismatched) == ([], [])
        # Left over: the killed upload's pending row and, when it replaced a file, the
        # version kept aside, which its row still describes: the replacement never
        # committed, so readers get the old version, whole.
        leftovers = [p.split("/", 1)[1] for p in report.partial]
        aside = [p for p in leftovers if p.startswith(TEMP_PREFIX + "old-")]
        assert len(aside) == (1 if replacing else 0), report.partial
        assert len(leftovers) == len(aside) + 1, report.partial
        if replacing:
            assert rows[name] == (len(old), _sha(old))
            got = requests.get(server.url(f"/api/files/{name}"), headers={HEADER: sid}, timeout=30)
            assert got.content == old
            assert report.unrecorded == []
        else:
            assert name not in rows  # no row for the killed upload
            assert report.unrecorded == [f"{session_key(sid)}/{name}"]

        _upload(server, sid, name, new)  # the store keeps working (and takes the kept version)
        assert name in _listed(server, sid)
        log = server.log_text()
    fixed = _fsck_fix(db_url, base)  # after which fsck finds the store clean
    assert (fixed.unrecorded, fixed.missing) == ([], [])
    pending = [p for p in report.partial if TEMP_PREFIX + "old-" not in p]
    assert fixed.partial == pending  # only the pending row of the killed upload
    assert _file_rows(engine, sid)[name] == (len(new), _sha(new))
    assert "Exception on /api/" not in log, log[-3000:]
    print(
        f"\nCRASH {_db(db_url)} upload killed after its rename, before its row "
        f"({'replacing a recorded file' if replacing else 'new file'}): file complete, "
        f"unrecorded={report.unrecorded}, listed={sorted(rows)}"
    )
