"""File stores recorded in ``silo_files``: safe names, limits, atomic writes, expiry, fsck.

Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from flask import jsonify, request
from harness import AppFactory, Harness
from sqlalchemy import select
from support import Clock, StatementLog
from werkzeug.test import TestResponse

from flask_silo_sql import FileTooLarge, session_key
from flask_silo_sql.cli import silo_db
from flask_silo_sql.files import fsck
from flask_silo_sql.files.limits import TEMP_PREFIX
from flask_silo_sql.sql import SQLStorage
from flask_silo_sql.sql.models import files as files_table

SID = "files-test-session-0001"
OTHER_SID = "files-test-session-0002"
KEY, OTHER_KEY = session_key(SID), session_key(OTHER_SID)


class App(Harness):
    """The upload app on a harness: one file store, recorded in ``silo_files``."""

    def __init__(
        self, url: str | None, *, root: Path, max_session_bytes: int | None = None, **options: Any
    ) -> None:
        super().__init__(url, **options)
        self.root = root
        """Everything the test may write below; the store's base directory is deep inside."""
        silo = self.silo
        silo.register("data", lambda: {"uploaded": []})
        uploads = silo.add_file_store(
            "uploads", str(root / "a" / "b" / "uploads"), max_session_bytes=max_session_bytes
        )
        self.uploads = uploads

        @self.app.post("/api/upload")
        def upload() -> Any:
            upload = request.files["file"]
            path = uploads.save(
                silo.sid, upload.filename or "", upload.stream, content_type=upload.mimetype
            )
            silo.state("data")["uploaded"].append(os.path.basename(path))
            return jsonify(path=path, files=uploads.list_files(silo.sid))

        @self.app.post("/api/reset")
        def reset() -> Any:
            silo.reset_current()
            return jsonify(ok=True)

    def upload(
        self,
        filename: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        sid: str = SID,
    ) -> TestResponse:
        return self.post(
            "/api/upload", sid, data={"file": (io.BytesIO(data), filename, content_type)}
        )

    def session_dir(self, sid: str = SID) -> Path:
        return Path(self.uploads.base_dir) / session_key(sid)

    def rows(self, sid: str | None = None) -> list[Any]:
        query = select(files_table).order_by(files_table.c.sid, files_table.c.filename)
        if sid is not None:
            query = query.where(files_table.c.sid == session_key(sid))
        with self.engine.connect() as conn:
            return list(conn.execute(query).all())


def all_files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


@pytest.fixture
def make_app(silo_app: AppFactory, tmp_path: Path) -> Callable[..., App]:
    """Apps configured with ``SILO_DATABASE_URI`` (plus *config*), on real time."""

    def make(*, max_session_bytes: int | None = None, **config: Any) -> App:
        return silo_app(
            App,
            root=tmp_path / "root",
            max_session_bytes=max_session_bytes,
            via="config",
            config={"TESTING": True, **config},
            clock=False,
        )

    return make


@pytest.fixture
def env(make_app: Any) -> App:
    app: App = make_app()
    return app


# -- recording ------------------------------------------------------------------------


def test_upload_is_recorded_with_size_hash_and_type(env: App) -> None:
    data = bytes(range(256)) * 40 + b"tail"
    before = dt.datetime.now(dt.timezone.utc)
    response = env.upload("report.csv", data, "text/csv")
    assert response.status_code == 200
    path = response.get_json()["path"]
    assert path == str(env.session_dir() / "report.csv")
    assert Path(path).read_bytes() == data

    (row,) = env.rows()
    assert row.sid == KEY
    assert row.store == "uploads"
    assert row.filename == "report.csv"
    assert row.size_bytes == len(data)
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert row.content_type == "text/csv"
    assert row.created_at.tzinfo is not None
    assert before - dt.timedelta(seconds=5) <= row.created_at
    assert row.created_at <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
    assert not [p for p in env.session_dir().iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_list_get_path_and_total_agree_with_the_table(make_app: Any) -> None:
    env: App = make_app()
    assert env.upload("one.bin", b"1" * 10).status_code == 200
    assert env.upload("two.bin", b"2" * 20).status_code == 200
    assert env.upload("three.bin", b"3" * 30, sid=OTHER_SID).status_code == 200
    assert env.upload("one.bin", b"new" * 5).status_code == 200  # replaces the file and row

    rows = env.rows()
    assert sorted((r.sid, r.filename, r.size_bytes) for r in rows) == sorted([
        (KEY, "one.bin", 15),
        (KEY, "two.bin", 20),
        (OTHER_KEY, "three.bin", 30),
    ])
    (one,) = [r for r in rows if (r.sid, r.filename) == (KEY, "one.bin")]
    assert one.sha256 == hashlib.sha256(b"new" * 5).hexdigest()
    uploads = env.uploads
    assert uploads.list_files(SID) == ["one.bin", "two.bin"]
    assert uploads.list_files(OTHER_SID) == ["three.bin"]
    assert uploads.total_size_bytes == sum(r.size_bytes for r in rows) == 65
    for row in rows:
        path = uploads.get_path(row.sid, row.filename)
        assert path == str(env.session_dir(row.sid) / row.filename)
        assert os.path.getsize(path) == row.size_bytes
    assert uploads.get_path(SID, "three.bin") is None  # another session's file
    assert uploads.get_path(SID, "missing.bin") is None

    other: App = make_app()  # a second app object reads the same table
    assert other.uploads.base_dir == uploads.base_dir
    assert other.uploads.list_files(SID) == ["one.bin", "two.bin"]
    assert other.uploads.total_size_bytes == 65
    assert other.uploads.get_path(SID, "two.bin") == uploads.get_path(SID, "two.bin")


# -- hostile names and SIDs ----------------------------------------------------------------


HOSTILE_NAMES = [
    "../../x",
    "../../../../../../tmp/escape.txt",
    "/etc/passwd",
    "..",
    ".",
    "",
    "   ",
    "a\x00b.txt",
    "\x00",
    "..\\..\\windows.ini",
    "C:\\evil\\boot.ini",
    "sub/dir/file.txt",
    "ñandú résumé.pdf",
    "日本語.txt",
    "日本語",
    "emoji-😀.png",
    ".hidden",
    TEMP_PREFIX + "forged",
    "a" * 300 + ".txt",
]


def test_hostile_names_never_leave_the_session_directory(env: App) -> None:
    passwd = Path("/etc/passwd")
    passwd_before = passwd.read_bytes() if passwd.exists() else None
    escape = Path("/tmp/escape.txt")
    escape_before = escape.stat().st_mtime_ns if escape.exists() else None
    env.uploads.session_dir(SID)
    before = all_files(env.root)
    directory = env.session_dir().resolve()
    saved: list[str] = []
    refused: list[str] = []
    absolute = str(env.root / "outside.txt")
    for name in [*HOSTILE_NAMES, absolute]:
        try:
            path = env.uploads.save(SID, name, b"payload")
        except ValueError:
            refused.append(name)
            continue
        saved.append(name)
        assert Path(path).resolve().parent == directory, (name, path)
        assert env.uploads.get_path(SID, name) == path

    for name in ("../../y", "/etc/passwd", "sub/dir/req.txt"):  # through a request too
        response = env.upload(name, b"via request")
        assert response.status_code == 200, name
        assert Path(response.get_json()["path"]).resolve().parent == directory

    assert "" in refused
    assert ".." in refused
    assert "../../x" in saved
    assert "/etc/passwd" in saved
    assert absolute in saved
    created = all_files(env.root) - before
    assert created
    for new_file in created:
        assert new_file.resolve().parent == directory, new_file
    assert not (env.root / "outside.txt").exists()
    assert (passwd.read_bytes() if passwd.exists() else None) == passwd_before
    assert (escape.stat().st_mtime_ns if escape.exists() else None) == escape_before
    names = sorted(p.name for p in created)
    assert not [n for n in names if n.startswith(TEMP_PREFIX)]
    assert [r.filename for r in env.rows(SID)] == names == env.uploads.list_files(SID)
    for name in names:
        assert "/" not in name
        assert "\\" not in name
        assert "\x00" not in name
        assert name not in (".", "..")


BAD_SIDS = [
    "../escape-attempt-0001",
    "..",
    ".",
    "",
    "a/b",
    "/absolute-sid-00000001",
    "x" * 200,
    "nul\x00sid-0000000001",
    "dots.in.the.sid.00001",
    "space in sid 00000001",
    "back\\slash-000000001",
    "ünïcödé-sid-00000001",
]


def test_a_bad_sid_raises_and_creates_nothing(env: App) -> None:
    uploads = env.uploads
    before = set(env.root.rglob("*"))
    for sid in BAD_SIDS:
        with pytest.raises(ValueError, match="invalid session id"):
            uploads.save(sid, "file.txt", b"data")
        with pytest.raises(ValueError, match="invalid session id"):
            uploads.session_dir(sid)
        assert uploads.get_path(sid, "file.txt") is None
        assert uploads.list_files(sid) == []
        uploads.cleanup(sid)  # harmless
        assert set(env.root.rglob("*")) == before, sid
    assert env.rows() == []
    assert not Path("/tmp/escape-attempt-0001").exists()


# -- limits ----------------------------------------------------------------------------


def test_per_file_limit_gives_413_and_leaves_nothing(make_app: Any) -> None:
    env: App = make_app(SILO_MAX_FILE_BYTES=100)
    assert env.uploads.max_file_bytes == 100
    assert env.upload("fits.bin", b"x" * 100).status_code == 200
    too_big = env.upload("big.bin", b"y" * 101)
    assert too_big.status_code == 413
    body = too_big.get_json()
    assert body["error"] == "file_too_large"
    assert body["limit"] == 100
    assert too_big.headers["X-Session-ID"] == SID
    assert sorted(p.name for p in env.session_dir().iterdir()) == ["fits.bin"]
    assert [r.filename for r in env.rows()] == ["fits.bin"]

    # A too-large replacement keeps the old file and its row.
    with pytest.raises(FileTooLarge):
        env.uploads.save(SID, "fits.bin", io.BytesIO(b"z" * 5000))
    assert (env.session_dir() / "fits.bin").read_bytes() == b"x" * 100
    (row,) = env.rows()
    assert row.sha256 == hashlib.sha256(b"x" * 100).hexdigest()
    assert sorted(p.name for p in env.session_dir().iterdir()) == ["fits.bin"]


def test_per_session_limit_gives_413_and_leaves_nothing(make_app: Any) -> None:
    env: App = make_app(max_session_bytes=150)
    assert env.upload("a.bin", b"a" * 100).status_code == 200
    over = env.upload("b.bin", b"b" * 60)
    assert over.status_code == 413
    assert over.get_json()["error"] == "file_too_large"
    assert not (env.session_dir() / "b.bin").exists()
    assert env.upload("b.bin", b"b" * 50).status_code == 200  # exactly at the limit
    assert env.upload("a.bin", b"A" * 100).status_code == 200  # a replacement counts once
    with pytest.raises(FileTooLarge):
        env.uploads.save(SID, "c.bin", b"c")
    assert env.upload("c.bin", b"c", sid=OTHER_SID).status_code == 200  # per session
    assert sorted(p.name for p in env.session_dir().iterdir()) == ["a.bin", "b.bin"]
    assert [(r.filename, r.size_bytes) for r in env.rows(SID)] == [("a.bin", 100), ("b.bin", 50)]
    assert env.uploads.total_size_bytes == 151


# -- interrupted uploads ----------------------------------------------------------------


class BreaksMidway(io.RawIOBase):
    """A client upload that dies after sending *good* bytes."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise ConnectionResetError("client went away")
        n = min(size if size > 0 else self.left, self.left)
        self.left -= n
        return b"p" * n


def test_a_partial_upload_leaves_no_file_and_no_row(env: App) -> None:
    stream: Any = BreaksMidway(200_000)
    with pytest.raises(ConnectionResetError):
        env.uploads.save(SID, "big.bin", stream)
    directory = env.session_dir()
    assert not (directory / "big.bin").exists()
    assert list(directory.iterdir()) == []  # nor its temporary file
    assert env.rows() == []
    assert env.uploads.list_files(SID) == []

    assert env.upload("big.bin", b"complete").status_code == 200
    stream = BreaksMidway(100_000)
    with pytest.raises(ConnectionResetError):
        env.uploads.save(SID, "big.bin", stream)
    assert (directory / "big.bin").read_bytes() == b"complete"  # the old file is intact
    (row,) = env.rows()
    assert row.sha256 == hashlib.sha256(b"complete").hexdigest()
    assert [p.name for p in directory.iterdir()] == ["big.bin"]


# -- expiry and reset -------------------------------------------------------------------


def test_expiry_removes_files_and_rows(env: App) -> None:
    clock = Clock(time.time())
    env.silo.store.clock = clock
    assert env.upload("old.txt", b"old session").status_code == 200
    assert env.upload("keep.txt", b"live session", sid=OTHER_SID).status_code == 200
    clock.now += 2 * env.silo.store.ttl
    assert env.upload("fresh.txt", b"still active", sid=OTHER_SID).status_code == 200

    assert env.silo.store.cleanup() == [KEY]
    assert not env.session_dir(SID).exists()
    assert [(r.sid, r.filename) for r in env.rows()] == [
        (OTHER_KEY, "fresh.txt"),
        (OTHER_KEY, "keep.txt"),
    ]
    assert env.uploads.list_files(SID) == []
    assert env.uploads.get_path(SID, "old.txt") is None
    assert sorted(p.name for p in env.session_dir(OTHER_SID).iterdir()) == [
        "fresh.txt",
        "keep.txt",
    ]


def test_reset_removes_files_and_rows(env: App) -> None:
    assert env.upload("a.txt", b"a").status_code == 200
    assert env.upload("b.txt", b"b", sid=OTHER_SID).status_code == 200
    reset = env.client.post("/api/reset", headers={"X-Session-ID": SID})
    assert reset.status_code == 200
    assert [r.sid for r in env.rows()] == [OTHER_KEY]
    assert env.uploads.list_files(SID) == []
    assert not env.session_dir(SID).exists() or not list(env.session_dir(SID).iterdir())
    assert env.uploads.list_files(OTHER_SID) == ["b.txt"]


class RotatedAfterTheRowsWent(StatementLog):
    """The session's directory renamed (a rotation that waited for the reset's lock, and
    moved no rows: they went) once the reset's rows are deleted, before their bytes go."""

    def __init__(self, env: App) -> None:
        assert isinstance(env.silo.store.storage, SQLStorage)
        super().__init__(env.silo.store.storage)
        self.env = env
        self.renamed = False

    def seen(self, name: str, values: Mapping[str, Any]) -> None:
        if name == "forget_session_files" and not self.renamed:
            self.renamed = True
            os.rename(self.env.session_dir(SID), self.env.session_dir(OTHER_SID))


def test_a_reset_leaves_no_bytes_behind_when_a_rotation_renames_its_directory(
    env: App,
) -> None:
    assert env.upload("a.txt", b"a").status_code == 200
    with RotatedAfterTheRowsWent(env) as rotation:
        reset = env.client.post("/api/reset", headers={"X-Session-ID": SID})
    assert reset.status_code == 200
    assert rotation.renamed
    assert env.rows() == []
    assert all_files(Path(env.uploads.base_dir)) == set()  # none without its row
    report = fsck(env.uploads)
    assert report.unrecorded == []
    assert report.missing == []


def test_cleanup_all_removes_every_session_files_and_rows(env: App) -> None:
    assert env.upload("a.txt", b"a").status_code == 200
    assert env.upload("b.txt", b"bb", sid=OTHER_SID).status_code == 200
    assert env.uploads.total_size_bytes == 3
    env.uploads.cleanup_all()
    assert env.rows() == []
    assert env.uploads.total_size_bytes == 0
    assert env.uploads.list_files(SID) == env.uploads.list_files(OTHER_SID) == []
    assert all_files(Path(env.uploads.base_dir)) == set()


# -- fsck ----------------------------------------------------------------------------------


def damage(env: App) -> None:
    """One good file, a row without a file, a file without a row, a partial upload."""
    assert env.upload("good.txt", b"good").status_code == 200
    assert env.upload("gone.txt", b"gone").status_code == 200
    (env.session_dir() / "gone.txt").unlink()
    (env.session_dir() / "stray.txt").write_bytes(b"no row")
    (env.session_dir() / f"{TEMP_PREFIX}abc123").write_bytes(b"half")
    orphan_dir = env.session_dir(OTHER_SID)
    orphan_dir.mkdir()
    (orphan_dir / "orphan.bin").write_bytes(b"no session")
    an_hour_ago = time.time() - 3600  # left by a crash: fsck judges bytes older than its run
    for left in ("stray.txt", f"{TEMP_PREFIX}abc123"):
        os.utime(env.session_dir() / left, (an_hour_ago, an_hour_ago))
    os.utime(orphan_dir / "orphan.bin", (an_hour_ago, an_hour_ago))


def test_fsck_reports_and_fixes(env: App) -> None:
    assert fsck(env.uploads).clean
    damage(env)

    report = fsck(env.uploads)
    assert not report.clean
    assert sorted(report.unrecorded) == sorted([f"{KEY}/stray.txt", f"{OTHER_KEY}/orphan.bin"])
    assert report.missing == [f"{KEY}/gone.txt"]
    assert report.partial == [f"{KEY}/{TEMP_PREFIX}abc123"]
    assert not report.fixed
    assert (env.session_dir() / "stray.txt").exists()  # a report changes nothing
    assert len(env.rows()) == 2

    fixed = fsck(env.uploads, fix=True)
    assert fixed.fixed
    assert fixed.unrecorded == report.unrecorded
    assert fsck(env.uploads).clean
    assert [p.name for p in env.session_dir().iterdir()] == ["good.txt"]
    assert [r.filename for r in env.rows()] == ["good.txt"]
    assert not (env.session_dir(OTHER_SID) / "orphan.bin").exists()
    assert env.uploads.get_path(SID, "good.txt") is not None


def test_fsck_command_reports_then_repairs(env: App) -> None:
    runner = env.app.test_cli_runner()
    clean = runner.invoke(silo_db, ["fsck"])
    assert clean.exit_code == 0, clean.output
    assert "uploads: clean" in clean.output

    damage(env)
    found = runner.invoke(silo_db, ["fsck"])
    assert found.exit_code == 1, found.output
    assert f"file without a row: {KEY}/stray.txt" in found.output
    assert f"file without a row: {OTHER_KEY}/orphan.bin" in found.output
    assert f"row without a file: {KEY}/gone.txt" in found.output
    assert f"partial upload: {KEY}/{TEMP_PREFIX}abc123" in found.output
    assert "problems found" in found.output
    assert (env.session_dir() / "stray.txt").exists()

    repaired = runner.invoke(silo_db, ["fsck", "--fix"])
    assert repaired.exit_code == 0, repaired.output
    assert "repaired" in repaired.output
    assert [p.name for p in env.session_dir().iterdir()] == ["good.txt"]
    assert [r.filename for r in env.rows()] == ["good.txt"]

    again = runner.invoke(silo_db, ["fsck"])
    assert again.exit_code == 0, again.output
    assert "uploads: clean" in again.output
