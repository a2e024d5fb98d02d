"""Every file backend behind one FileStore: ``local``, ``database``, ``file://`` and S3.

Each test runs on SQLite and on PostgreSQL, with each backend; S3 is moto's
standalone server on loopback (``tests/s3server.py``). Two "machines" are two
apps on one database, each with its own working directory (its files or its
cache) and its own host name, as two servers have.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select
from support import Clock, sql_storage
from werkzeug.test import TestResponse

from flask_silo_sql import FileStore, Silo, session_key
from flask_silo_sql.files import fsck
from flask_silo_sql.files.backends.local import boot_time
from flask_silo_sql.files.limits import CHUNK, RETIRED_KEEP_S, RETIRED_PREFIX, TEMP_PREFIX
from flask_silo_sql.files.rows import kept_aside
from flask_silo_sql.sql.models import file_chunks, files

SID = "backend-test-session-0001"
KEY = session_key(SID)
OTHER = "backend-test-session-0002"
BACKENDS = ["local", "database", "file", "s3"]
DATA = os.urandom(2 * CHUNK + 12345)  # three chunks, the last one short


@dataclass
class Backend:
    kind: str
    url: str
    options: dict[str, Any]
    shared: Path | None = None
    """file://: the shared directory."""

    def objects(self) -> list[str]:
        """Every object of the store (fsspec backends), relative to its URL."""
        if self.kind not in ("file", "s3"):
            return []
        import fsspec.core

        fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        fs.invalidate_cache()
        try:
            found = fs.find(root)
        except FileNotFoundError:
            return []
        return sorted(str(k)[len(str(root).rstrip("/")) + 1 :] for k in found)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    kind: str = request.param
    if kind in ("local", "database"):
        return Backend(kind, kind, {})
    if kind == "file":
        shared = tmp_path / "shared"
        shared.mkdir()
        return Backend(kind, f"file://{shared}", {}, shared)
    server = request.getfixturevalue("s3_server")
    bucket = server.create_bucket()
    return Backend(kind, f"s3://{bucket}/uploads", server.storage_options())


@dataclass
class Machine:
    name: str
    app: Flask
    silo: Silo
    client: FlaskClient
    uploads: FileStore
    home: Path
    """This machine's working directory (its files, or its cache)."""

    @property
    def engine(self) -> Engine:
        sql = sql_storage(self.silo.store)
        assert sql is not None
        return sql.engine

    def put(self, name: str, data: bytes, sid: str = SID, **query: str) -> TestResponse:
        return self.client.put(
            f"/api/upload/{name}",
            headers={"X-Session-ID": sid},
            data=data,
            query_string=query,
            content_type="application/octet-stream",
        )

    def get(self, name: str, sid: str = SID, **headers: str) -> TestResponse:
        return self.client.get(f"/api/files/{name}", headers={"X-Session-ID": sid, **headers})

    def rows(self, sid: str | None = None) -> list[Any]:
        query = select(files).order_by(files.c.sid, files.c.filename)
        if sid is not None:
            query = query.where(files.c.sid == session_key(sid))
        with self.engine.connect() as conn:
            return list(conn.execute(query).all())

    def chunks(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(file_chunks)).scalar_one())

    def cached(self, sid: str = SID) -> list[str]:
        directory = self.home / session_key(sid)
        if not directory.is_dir():
            return []
        return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def machines(silo_url: str, backend: Backend, tmp_path: Path) -> Iterator[Any]:
    made: list[Silo] = []
    clock = Clock(time.time())

    def make(name: str, **config: Any) -> Machine:
        app = Flask(f"machine-{name}")
        app.config.update(
            TESTING=True,
            SILO_DATABASE_URI=silo_url,
            SILO_FILE_BACKEND=backend.url,
            SILO_FILE_STORAGE_OPTIONS=backend.options,
            SILO_FILE_HOST=name,
            SILO_TOUCH_INTERVAL=0,
            SILO_MIN_FREE_BYTES=0,
            **config,
        )
        silo = Silo(app, auto_cleanup=False, ttl=60)
        silo.store.clock = clock
        silo.register("data", lambda: {"files": []})
        silo.add_data_endpoints("/api/data")
        home = tmp_path / name
        uploads = silo.add_file_store("uploads", str(home))

        @app.put("/api/upload/<name>")
        def put(name: str) -> Any:
            path = uploads.save(silo.sid, name, request.stream, content_type=request.content_type)
            silo.state("data")["files"].append(name)
            with open(path, "rb") as saved:  # the path can be opened at once
                assert saved.read(4) is not None
            if request.args.get("fail"):
                return jsonify(error="refused"), 400
            return jsonify(path=path), 201

        @app.get("/api/files/<name>")
        def get(name: str) -> Any:
            return silo.send_file("uploads", name, download_name=request.args.get("as"))

        @app.get("/api/data")
        def data() -> Any:
            return jsonify(silo.state("data"))

        @app.post("/api/reset")
        def reset() -> Any:
            silo.reset_current()
            return jsonify(ok=True)

        @app.post("/api/rotate")
        def rotate() -> Any:
            return jsonify(sid=silo.rotate())

        made.append(silo)
        return Machine(name, app, silo, app.test_client(), uploads, home)

    make.clock = clock  # type: ignore[attr-defined]
    yield make
    for silo in made:
        silo.stop()
        sql = sql_storage(silo.store)
        assert sql is not None
        sql.dispose()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- storing and reading -------------------------------------------------------------------


def test_a_file_saved_on_one_machine_is_read_on_another(machines: Any, backend: Backend) -> None:
    a: Machine = machines("host-a")
    b: Machine = machines("host-b")
    saved = a.put("data.bin", DATA)
    assert saved.status_code == 201, saved.get_data(as_text=True)
    path = saved.get_json()["path"]
    assert Path(path).read_bytes() == DATA
    assert os.path.basename(path) == "data.bin"

    (row,) = a.rows()
    assert (row.filename, row.size_bytes, row.sha256) == ("data.bin", len(DATA), sha(DATA))
    assert row.backend == {"file": "fsspec", "s3": "fsspec"}.get(backend.kind, backend.kind)
    assert row.host == ("host-a" if backend.kind == "local" else None)
    assert a.chunks() == (3 if backend.kind == "database" else 0)
    if backend.kind in ("file", "s3"):
        assert backend.objects() == [f"{KEY}/{row.location}"]
        assert row.location.endswith("/data.bin")

    for machine in (a, b):
        assert machine.uploads.list_files(SID) == ["data.bin"]
        assert machine.uploads.total_size_bytes == len(DATA)
        (info,) = machine.uploads.list_files(SID, details=True)
        assert (info.name, info.size_bytes, info.sha256) == ("data.bin", len(DATA), sha(DATA))
        here = backend.kind != "local" or machine is a
        assert info.here is here
        assert info.host == row.host
    # Every machine reads it, except a local file's other host.
    assert a.uploads.get_path(SID, "data.bin") == path
    with a.uploads.open(SID, "data.bin") as stream:
        assert stream.read() == DATA
    elsewhere = b.uploads.get_path(SID, "data.bin")
    if backend.kind == "local":
        assert elsewhere is None
        assert b.get("data.bin").status_code == 409
        assert b.get("data.bin").get_json()["error"] == "file_on_other_host"
    else:
        assert elsewhere is not None
        assert Path(elsewhere).read_bytes() == DATA
        if backend.kind != "file":  # file:// objects are local paths already
            assert str(b.home) in elsewhere
        with b.uploads.open(SID, "data.bin") as stream:
            assert stream.read() == DATA
        assert b.get("data.bin").get_data() == DATA


@pytest.mark.parametrize("backend", ["database", "s3"], indirect=True)
def test_a_cached_copy_from_before_the_machine_started_is_checked_before_use(
    machines: Any, backend: Backend
) -> None:
    """Cached copies are not synced: one older than the machine's start may have lost
    its bytes in the crash, so it is hashed once, and fetched again if it is wrong."""
    started = boot_time()
    if started is None:
        pytest.skip("this system does not say when it started: cached copies are synced")
    a: Machine = machines("host-a")
    saved = a.put("data.bin", DATA)
    assert saved.status_code == 201, saved.get_data(as_text=True)
    path = Path(saved.get_json()["path"])
    before = started - 120

    os.utime(path, (before, before))  # an intact copy from before the start
    assert a.uploads.get_path(SID, "data.bin") == str(path)
    assert path.read_bytes() == DATA
    assert path.stat().st_mtime >= started  # checked: not hashed again

    path.write_bytes(bytes(len(DATA)))  # the crash left zeros of the right length
    os.utime(path, (before, before))
    again = a.uploads.get_path(SID, "data.bin")
    assert again is not None
    assert Path(again).read_bytes() == DATA
    assert a.get("data.bin").get_data() == DATA


def test_a_replacement_wins_whole_and_a_failed_request_keeps_nothing(
    machines: Any, backend: Backend
) -> None:
    a: Machine = machines("host-a")
    b: Machine = machines("host-b")
    first, second, refused = os.urandom(CHUNK + 1), os.urandom(10), os.urandom(3 * CHUNK)
    assert a.put("f.bin", first).status_code == 201
    reader = a if backend.kind == "local" else b
    assert reader.get("f.bin").get_data() == first  # (b: now in its cache)

    failed = a.put("f.bin", refused, fail="1")  # the view answers 400 after saving
    assert failed.status_code == 400
    assert a.put("new.bin", refused, fail="1").status_code == 400
    assert [(r.filename, r.sha256) for r in a.rows()] == [("f.bin", sha(first))]
    assert reader.get("f.bin").get_data() == first
    assert a.chunks() == (2 if backend.kind == "database" else 0)
    if backend.kind in ("file", "s3"):
        assert len(backend.objects()) == 1
    assert not [n for n in a.cached() if TEMP_PREFIX in n or n.endswith("new.bin")]

    assert a.put("f.bin", second).status_code == 201
    (row,) = [r for r in a.rows() if r.filename == "f.bin"]
    assert (row.size_bytes, row.sha256) == (len(second), sha(second))
    assert reader.get("f.bin").get_data() == second
    # The replaced version stays for downloads that began before (local: they hold it open).
    retired = [r for r in a.rows() if r.filename.startswith(RETIRED_PREFIX)]
    assert [r.sha256 for r in retired] == ([] if backend.kind == "local" else [sha(first)])
    assert a.uploads.list_files(SID) == ["f.bin"]
    assert a.chunks() == (1 + 2 if backend.kind == "database" else 0)
    if backend.kind in ("file", "s3"):
        assert len(backend.objects()) == 2
    if backend.kind in ("database", "s3"):
        assert f"{sha(first)[:32]}/f.bin" in a.cached()  # a path handed out stays
    # The upkeep removes it once no download can need it.
    a.uploads.maintain(grace=0)
    assert len(a.rows()) == 1 + len(retired)
    machines.clock.advance(RETIRED_KEEP_S + 1)
    a.uploads.maintain(grace=0)
    assert [r.filename for r in a.rows()] == ["f.bin"]
    assert a.chunks() == (1 if backend.kind == "database" else 0)
    if backend.kind in ("file", "s3"):
        assert backend.objects() == [f"{KEY}/{row.location}"]
    if backend.kind in ("database", "s3"):
        assert a.cached() == [f"{sha(second)[:32]}/f.bin"]
    assert not [n for n in os.listdir(a.home / KEY) if n.startswith(TEMP_PREFIX)]


def test_serving_is_conditional_and_range_aware(machines: Any, backend: Backend) -> None:
    a: Machine = machines("host-a")
    b: Machine = machines("host-b")
    assert a.put("report.pdf", DATA).status_code == 201
    for machine in (a, b) if backend.kind != "local" else (a,):
        whole = machine.get("report.pdf")
        assert whole.status_code == 200
        assert whole.get_data() == DATA
        etag = whole.headers["ETag"]
        assert etag == f'"{sha(DATA)}"'
        assert whole.headers["Content-Length"] == str(len(DATA))
        assert whole.headers["Accept-Ranges"] == "bytes"
        assert whole.headers["Content-Type"] == "application/octet-stream"
        assert whole.headers["Content-Disposition"] == "inline; filename=report.pdf"
        assert whole.headers["X-Content-Type-Options"] == "nosniff"
        assert "sandbox" in whole.headers["Content-Security-Policy"]
        assert "private" in whole.headers["Cache-Control"]
        assert "X-Session-ID" in whole.headers["Vary"]
        last_modified = whole.headers["Last-Modified"]

        again = machine.get("report.pdf", **{"If-None-Match": etag})
        assert again.status_code == 304
        assert again.get_data() == b""
        assert machine.get("report.pdf", **{"If-Modified-Since": last_modified}).status_code == 304
        assert machine.get("report.pdf", **{"If-None-Match": '"other"'}).status_code == 200

        start, end = CHUNK - 100, CHUNK + 99  # across a chunk boundary
        part = machine.get("report.pdf", Range=f"bytes={start}-{end}")
        assert part.status_code == 206
        assert part.headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
        assert part.get_data() == DATA[start : end + 1]
        tail = machine.get("report.pdf", Range="bytes=-100")
        assert (tail.status_code, tail.get_data()) == (206, DATA[-100:])
        late = machine.get("report.pdf", Range=f"bytes={2 * CHUNK + 5}-")
        assert (late.status_code, late.get_data()) == (206, DATA[2 * CHUNK + 5 :])

        refused = machine.get("report.pdf", Range=f"bytes={len(DATA)}-")
        assert refused.status_code == 416
        assert refused.headers["Content-Range"] == f"bytes */{len(DATA)}"
        assert refused.get_json()["error"] == "range_not_satisfiable"
        stale = machine.get("report.pdf", Range="bytes=0-9", **{"If-Range": '"other"'})
        assert (stale.status_code, stale.get_data()) == (200, DATA)
        fresh = machine.get("report.pdf", Range="bytes=0-9", **{"If-Range": etag})
        assert (fresh.status_code, fresh.get_data()) == (206, DATA[:10])
        several = machine.get("report.pdf", Range="bytes=0-9,20-29")
        assert several.status_code in (200, 416) or several.get_data() == DATA

        named = machine.client.get(
            "/api/files/report.pdf?as=r%C3%A9sum%C3%A9%20%22x%22.pdf",
            headers={"X-Session-ID": SID},
        )
        assert named.headers["Content-Disposition"].startswith("inline; filename=")
        assert '"' not in named.headers["Content-Disposition"].split("filename=", 1)[1].strip('"')
        missing = machine.get("nothing.bin")
        assert missing.status_code == 404
        assert missing.get_json()["error"] == "file_not_found"


# -- expiry, reset, rotation ---------------------------------------------------------------


def test_expiry_leaves_no_bytes_anywhere(machines: Any, backend: Backend) -> None:
    a: Machine = machines("host-a")
    b: Machine = machines("host-b")
    assert a.put("gone.bin", DATA).status_code == 201
    assert a.put("kept.bin", b"kept", sid=OTHER).status_code == 201
    if backend.kind != "local":
        assert b.get("gone.bin").get_data() == DATA
    if backend.kind in ("database", "s3"):
        assert b.uploads.get_path(SID, "gone.bin")  # b caches a copy
        assert b.cached() == [f"{sha(DATA)[:32]}/gone.bin"]
    machines.clock.advance(3600)
    assert a.client.get("/api/data", headers={"X-Session-ID": OTHER}).status_code == 200
    assert a.silo.store.cleanup() == [KEY]

    for machine in (a, b):
        assert machine.client.get("/api/data", headers={"X-Session-ID": SID}).status_code == 410
        assert machine.uploads.get_path(SID, "gone.bin") is None
    assert [r.sid for r in a.rows()] == [session_key(OTHER)]
    assert a.chunks() == (1 if backend.kind == "database" else 0)
    assert [o.split("/")[0] for o in backend.objects()] == (
        [session_key(OTHER)] if backend.kind in ("file", "s3") else []
    )
    assert not (a.home / KEY).exists()  # the sweeping machine's directory or cache
    b.silo.store.cleanup()  # b's own sweep finds nothing to expire, and tidies up
    assert not (b.home / KEY).exists()
    assert b.uploads.list_files(OTHER) == ["kept.bin"]


def test_reset_and_rotation(machines: Any, backend: Backend) -> None:
    a: Machine = machines("host-a")
    assert a.put("one.bin", DATA).status_code == 201
    rotated = a.client.post("/api/rotate", headers={"X-Session-ID": SID})
    assert rotated.status_code == 200
    new = rotated.get_json()["sid"]
    assert a.get("one.bin", sid=new).get_data() == DATA
    assert a.uploads.get_path(SID, "one.bin") is None
    if backend.kind in ("file", "s3"):
        assert [o.split("/")[0] for o in backend.objects()] == [session_key(new)]

    assert a.client.post("/api/reset", headers={"X-Session-ID": new}).status_code == 200
    assert a.rows() == []
    assert a.chunks() == 0
    assert backend.objects() == []
    assert a.uploads.list_files(new) == []


class HeldBody(io.RawIOBase):
    """A request body that stops after its first chunk until the test lets it go on."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.started = threading.Event()
        self.go_on = threading.Event()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # (the test client measures the body)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._data.seek(offset, whence)

    def tell(self) -> int:
        return self._data.tell()

    def readinto(self, buffer: Any) -> int:
        if self._data.tell() > 0:
            self.started.set()
            assert self.go_on.wait(30)
        return self._data.readinto(memoryview(buffer)[:CHUNK])


@pytest.mark.parametrize("operation", ["reset", "rotate"])
def test_a_reset_or_rotation_during_an_upload_interrupts_it_on_every_backend(
    machines: Any, backend: Backend, caplog: pytest.LogCaptureFixture, operation: str
) -> None:
    """The upload finds its session reset (``409``) or rotated away (``410``): a JSON
    answer, nothing of it kept anywhere, no ERROR logged."""
    a: Machine = machines("host-a")
    assert a.put("kept.bin", DATA).status_code == 201
    data = os.urandom(3 * CHUNK)
    body = HeldBody(data)
    answers: list[TestResponse] = []

    def upload() -> None:
        answers.append(
            a.app.test_client().put(
                "/api/upload/late.bin",
                headers={"X-Session-ID": SID, "Content-Length": str(len(data))},
                input_stream=body,
                content_type="application/octet-stream",
            )
        )

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert body.started.wait(30)  # its pending row and its first bytes are in place
    done = a.client.post(f"/api/{operation}", headers={"X-Session-ID": SID})
    assert done.status_code == 200
    body.go_on.set()
    uploader.join(30)
    (answer,) = answers
    expected = {"reset": (409, "upload_interrupted"), "rotate": (410, "session_expired")}
    assert (answer.status_code, answer.get_json()["error"]) == expected[operation]
    sid = SID if operation == "reset" else done.get_json()["sid"]
    kept = [] if operation == "reset" else ["kept.bin"]
    assert [row.filename for row in a.rows()] == kept
    remote = kept if backend.kind in ("file", "s3") else []
    assert [o.rsplit("/", 1)[-1] for o in backend.objects()] == remote
    assert a.uploads.list_files(sid) == kept
    assert [name for name in a.cached(sid) if "late.bin" in name] == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert a.put("again.bin", DATA, sid=sid).status_code == 201  # the session goes on


# -- limits ------------------------------------------------------------------------------------


class Unsized(io.RawIOBase):
    """A stream that does not say how long it is (a chunked request body)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._data.readinto(buffer)


def test_limits_hold_on_every_backend(machines: Any, backend: Backend) -> None:
    a: Machine = machines("host-a", SILO_MAX_FILE_BYTES=CHUNK, SILO_MAX_SESSION_BYTES=CHUNK + 10)
    big = a.put("big.bin", os.urandom(CHUNK + 1))
    assert big.status_code == 413
    assert big.get_json() == {
        "error": "file_too_large",
        "limit": CHUNK,
        "message": big.get_json()["message"],
    }
    assert a.put("a.bin", os.urandom(CHUNK)).status_code == 201
    over = a.put("b.bin", os.urandom(11))
    assert over.status_code == 413
    assert over.get_json()["limit"] == CHUNK + 10
    with pytest.raises(Exception, match="exceeds"):
        a.uploads.save(SID, "c.bin", Unsized(os.urandom(11)))  # found out while streaming
    assert a.uploads.save(SID, "d.bin", Unsized(b"0123456789"))
    assert [(r.filename, r.size_bytes) for r in a.rows()] == [("a.bin", CHUNK), ("d.bin", 10)]
    assert a.chunks() == (2 if backend.kind == "database" else 0)
    if backend.kind in ("file", "s3"):
        assert len(backend.objects()) == 2


# -- fsck ---------------------------------------------------------------------------------------


def test_fsck_reports_bytes_that_differ_and_fixes_the_rest(
    machines: Any, backend: Backend
) -> None:
    a: Machine = machines("host-a")
    assert a.put("good.bin", b"good bytes").status_code == 201
    assert a.put("bad.bin", b"right bytes").status_code == 201
    assert a.put("gone.bin", b"will vanish").status_code == 201
    assert fsck(a.uploads).clean
    rows = {r.filename: r for r in a.rows()}
    wrong = b"wrong bytes"  # the same size: only the hash tells
    if backend.kind == "local":
        (a.home / KEY / "bad.bin").write_bytes(wrong)
        os.utime(a.home / KEY / "bad.bin", (time.time() - 60, time.time() - 60))
        (a.home / KEY / "gone.bin").unlink()
    elif backend.kind == "database":
        with a.engine.begin() as conn:
            conn.execute(
                file_chunks.update()
                .where(file_chunks.c.file_id == rows["bad.bin"].id)
                .values(data=wrong)
            )
            conn.execute(file_chunks.delete().where(file_chunks.c.file_id == rows["gone.bin"].id))
    else:
        import fsspec.core

        fs, root = fsspec.core.url_to_fs(backend.url, **backend.options)
        fs.pipe(f"{root}/{KEY}/{rows['bad.bin'].location}", wrong)
        fs.rm(f"{root}/{KEY}/{rows['gone.bin'].location}")
        fs.invalidate_cache()
    report = fsck(a.uploads)
    assert report.mismatched == [f"{KEY}/bad.bin"]
    assert report.missing == [f"{KEY}/gone.bin"]
    assert not report.clean
    fixed = fsck(a.uploads, fix=True)
    assert fixed.mismatched == [f"{KEY}/bad.bin"]  # reported, left for a person to judge
    assert sorted(r.filename for r in a.rows()) == ["bad.bin", "good.bin"]
    after = fsck(a.uploads)
    assert (after.missing, after.unrecorded, after.partial) == ([], [], [])
    assert after.mismatched == [f"{KEY}/bad.bin"]


def test_a_replaced_version_is_no_problem_for_fsck_and_takes_no_quota(
    machines: Any, backend: Backend
) -> None:
    a: Machine = machines("host-a", SILO_MAX_SESSION_BYTES=1000)
    for _ in range(3):  # each replacement fits: the versions it retired are not counted
        assert a.put("f.bin", os.urandom(600)).status_code == 201
    assert a.put("g.bin", os.urandom(300)).status_code == 201
    assert a.put("h.bin", os.urandom(200)).status_code == 413  # 600 + 300 stored
    kept = 0 if backend.kind == "local" else 2
    for fix in (False, True):
        report = fsck(a.uploads, fix=fix)
        assert report.clean, report
        assert report.retired == kept
    assert len(a.rows()) == 2 + kept  # fsck --fix leaves them to the upkeep


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_fsck_puts_back_a_version_kept_aside_by_an_upload_that_died(
    machines: Any, backend: Backend
) -> None:
    a: Machine = machines("host-a")
    old, new = b"the committed version", b"an upload never committed"
    assert a.put("f.bin", old).status_code == 201
    (row,) = a.rows()
    directory = a.home / KEY
    # What a process that died between moving its bytes in and its commit leaves.
    records = a.uploads.records
    assert records is not None
    committed = records.row(KEY, "f.bin")
    assert committed is not None
    aside = Path(kept_aside(str(directory), committed))
    os.link(directory / "f.bin", aside)
    (directory / "tmp").write_bytes(new)
    os.replace(directory / "tmp", directory / "f.bin")
    for path in (aside, directory / "f.bin"):  # before this run of fsck
        os.utime(path, (time.time() - 60, time.time() - 60))
    assert a.get("f.bin").get_data() == old  # its readers find it aside
    report = fsck(a.uploads)
    assert report.partial == [f"{KEY}/{aside.name}"], report
    assert report.mismatched == []  # the row's bytes are those kept aside, and they match
    fsck(a.uploads, fix=True)
    assert (directory / "f.bin").read_bytes() == old
    assert not aside.exists()
    assert fsck(a.uploads).clean
    assert [r.sha256 for r in a.rows()] == [row.sha256]


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_fsck_of_local_files_touches_only_its_own_host(machines: Any, backend: Backend) -> None:
    a: Machine = machines("host-a")
    b: Machine = machines("host-b")
    assert a.put("on-a.bin", b"a's bytes").status_code == 201
    assert b.put("on-b.bin", b"b's bytes", sid=OTHER).status_code == 201
    report = fsck(b.uploads, fix=True)  # b's disk has no file of a's: none is "missing"
    assert report.clean
    assert report.elsewhere == 1
    assert sorted(r.filename for r in a.rows()) == ["on-a.bin", "on-b.bin"]
    assert a.get("on-a.bin").get_data() == b"a's bytes"
    assert b.get("on-b.bin", sid=OTHER).get_data() == b"b's bytes"


# -- errors ------------------------------------------------------------------------------------


def test_a_disk_error_is_json_and_its_log_has_no_sid(
    machines: Any, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    a: Machine = machines("host-a")
    a.home.mkdir(parents=True, exist_ok=True)
    (a.home / KEY).write_bytes(b"a file where the session's directory goes")
    with caplog.at_level(logging.DEBUG):
        answer = a.put("x.bin", b"data")
    assert answer.status_code == 500
    body = answer.get_json()
    assert body["error"] == "file_storage_error"
    assert set(body) == {"error", "message"}
    assert SID not in answer.get_data(as_text=True)
    assert any(r.levelno >= logging.ERROR for r in caplog.records)
    for record in caplog.records:
        assert SID not in record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            assert SID not in str(record.exc_info[1])
    assert a.rows() == []


def test_objects_stored_under_a_sid_move_to_its_key(machines: Any, backend: Backend) -> None:
    """A store's bytes from before SIDs were hashed at rest (``<base or url>/<SID>/``):
    fsck moves them under the key first, and the file is served again, whole."""
    a: Machine = machines("host-a")
    assert a.put("old.bin", DATA).status_code == 201
    if backend.kind in ("file", "s3"):
        a.uploads.blobs.move_session(KEY, SID)  # as the previous version named them
    elif backend.kind == "local":
        (a.home / KEY).rename(a.home / SID)
    report = fsck(a.uploads)
    assert report.clean, report
    assert a.get("old.bin").get_data() == DATA
    if backend.kind in ("file", "s3"):
        assert [o.split("/")[0] for o in backend.objects()] == [KEY]
