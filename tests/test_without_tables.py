"""A storage without tables (``InMemoryStorage``, a flask-silo one), and a ``FileStore`` of
its own: files on disk only and runs in their own process, as in flask-silo.

What such a store lacks is an object that says so (a catalog of the disk, a task queue
with nothing in it), never a ``None`` to test. No database here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flask import Flask

from flask_silo_sql import (
    FileNotStored,
    FileStore,
    InMemoryStorage,
    SessionStore,
    Silo,
    SiloError,
    TaskRunner,
    session_key,
)
from flask_silo_sql.files.limits import TEMP_PREFIX
from flask_silo_sql.tasks import TaskSpec

SID = "no-tables-test-session-01"
OTHER_SID = "no-tables-test-session-02"


def test_a_file_store_of_its_own_keeps_its_files_on_disk_only(tmp_path: Path) -> None:
    """The directory is the whole truth; asking for rows, or a check against them, says
    there are none."""
    files = FileStore(str(tmp_path / "own"), name="own")
    path = files.save(SID, "../a b.txt", b"hello")
    assert path == os.path.join(files.base_dir, session_key(SID), "a_b.txt")
    assert files.get_path(SID, "a b.txt") == path
    assert files.get_path(SID, "missing.txt") is None
    with files.open(SID, "a_b.txt") as stream:
        assert stream.read() == b"hello"
    with pytest.raises(FileNotStored):
        files.open(SID, "missing.txt")
    info = files.stat(SID, "a_b.txt")
    assert info is not None
    assert (info.name, info.size_bytes, info.sha256, info.backend) == ("a_b.txt", 5, "", "local")
    (Path(files.session_dir(SID)) / f"{TEMP_PREFIX}partial").write_bytes(b"x")
    assert files.list_files(SID) == ["a_b.txt"]
    assert files.list_files(SID, details=True) == [info]
    assert files.total_size_bytes == 6  # every byte under base_dir, a partial upload's too
    with Flask(__name__).test_request_context():
        response = files.send(SID, "a_b.txt")
        response.direct_passthrough = False
        assert response.get_data() == b"hello"
        response.close()
    assert files.maintain() == 0
    with pytest.raises(ValueError, match="no SQL storage to check against"):
        files.check()
    with pytest.raises(SiloError, match="has no rows: only a store registered with"):
        _ = files.records
    files.cleanup(SID)
    assert not os.path.exists(os.path.join(files.base_dir, session_key(SID)))
    files.save(OTHER_SID, "b.txt", b"b")
    files.cleanup_all()
    assert os.listdir(files.base_dir) == []


def test_bytes_kept_elsewhere_cannot_be_found_without_rows(tmp_path: Path) -> None:
    """Reading or storing says what is missing; removing what is not there is no error."""
    files = FileStore(str(tmp_path / "chunks"), name="chunks", backend="database")
    for call in (
        lambda: files.save(SID, "a.txt", b"a"),
        lambda: files.get_path(SID, "a.txt"),
        lambda: files.list_files(SID),
    ):
        with pytest.raises(SiloError, match="the database backend needs SQL storage"):
            call()
    files.cleanup(SID)
    assert files.total_size_bytes == 0


def test_a_silo_on_memory_storage_keeps_files_on_disk_only(tmp_path: Path) -> None:
    app = Flask(__name__)
    silo = Silo(app, storage=InMemoryStorage(), auto_cleanup=False)
    uploads = silo.add_file_store("uploads", str(tmp_path / "uploads"))
    path = uploads.save(SID, "a.txt", b"abc")
    assert uploads.list_files(SID) == ["a.txt"]
    assert uploads.get_path(SID, "a.txt") == path
    with pytest.raises(ValueError, match="no SQL storage to check against"):
        uploads.check()


def test_a_runner_on_memory_storage_finds_nothing_to_run_and_stops() -> None:
    """Every run lives in the process that started it: nothing is queued, claimed or
    handed back, as for a runner on a database whose queue is empty."""
    store = SessionStore()
    store.registry.add_task(TaskSpec("job", lambda task: None))
    runner = TaskRunner(store, poll_interval=0.01)
    runner.start()
    assert runner.running
    assert runner.stop() == 0
    assert not runner.running
    assert runner.claimed == 0
