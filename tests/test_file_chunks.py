"""How the ``database`` backend commits its chunks on PostgreSQL.

A chunk's commit does not wait for its WAL to reach the disk (``SET LOCAL
synchronous_commit TO OFF`` in its own short transaction): the file's row is
committed synchronously after the last chunk, and a WAL flush covers every
record before it, so the file is durable when its row is, as before, at a
fraction of the flushes. In locking mode, once the request's transaction is
open, the chunks join it, and it must stay synchronous: there no chunk sets
anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request
from support import StatementLog, sql_storage

from flask_silo_sql import Silo
from flask_silo_sql.files.limits import CHUNK

SID = "chunk-commit-session-0001"
DATA = os.urandom(2 * CHUNK + 999)  # three chunks


@pytest.mark.parametrize("locking", [False, True], ids=["per-request", "locking"])
def test_chunks_commit_without_a_wal_flush_and_the_row_with_one(
    pg_silo_url: str, tmp_path: Path, locking: bool
) -> None:
    app = Flask("chunk-commits")
    app.config.update(
        TESTING=True,
        SILO_DATABASE_URI=pg_silo_url,
        SILO_FILE_BACKEND="database",
        SILO_LOCKING=locking,
        SILO_MIN_FREE_BYTES=0,
    )
    silo = Silo(app, auto_cleanup=False, ttl=60)
    silo.register("data", lambda: {"files": 0})
    uploads = silo.add_file_store("uploads", str(tmp_path / "cache"))

    @app.put("/api/upload/<name>")
    def put(name: str) -> Any:
        silo.state("data")["files"] += 1  # locking mode: the request's transaction is open
        uploads.save(silo.sid, name, request.stream)
        return jsonify(ok=True), 201

    @app.get("/api/files/<name>")
    def get(name: str) -> Any:
        return silo.send_file(uploads, name)

    client = app.test_client()
    storage = sql_storage(silo.store)
    try:
        with StatementLog(storage) as log:
            put_response = client.put("/api/upload/a.bin", data=DATA, headers={"X-Session-ID": SID})
        assert put_response.status_code == 201, put_response.get_data(as_text=True)
        names = log.names
        chunks = [at for at, name in enumerate(names) if name == "put_chunk"]
        assert len(chunks) == 3
        if locking:
            assert "chunk_commit_async" not in names
        else:
            assert [names[at - 1] for at in chunks] == ["chunk_commit_async"] * 3
            assert names.count("chunk_commit_async") == 3  # never before the row's commit
        assert names.index("finish_upload") > chunks[-1]
        got = client.get("/api/files/a.bin", headers={"X-Session-ID": SID})
        assert got.status_code == 200
        assert got.get_data() == DATA
    finally:
        silo.stop()
        storage.dispose()
