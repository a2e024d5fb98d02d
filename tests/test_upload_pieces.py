"""An upload's bytes arrive whole, whatever its size against the 1 MiB piece.

Uploads are read in pieces whose buffers are filled again two pieces later
(the hash of one runs while the next is read), and a request body is asked
for no more than its ``Content-Length`` leaves. Sizes around the piece's, on
both databases and on the ``local`` and ``database`` backends, must come back
byte for byte, with the row's SHA-256 that of the bytes sent; a stream whose
declared size is wrong is still read to its end; a request body that ends
before its ``Content-Length`` keeps nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request

from flask_silo_sql import Silo
from flask_silo_sql.files.body import pieces
from flask_silo_sql.files.limits import CHUNK

SID = "upload-pieces-session-0001"
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7]


def make_app(silo_url: str, tmp_path: Path, backend: str) -> tuple[Flask, Silo, Any]:
    app = Flask("upload-pieces")
    app.config.update(
        TESTING=True, SILO_DATABASE_URI=silo_url, SILO_FILE_BACKEND=backend, SILO_MIN_FREE_BYTES=0
    )
    silo = Silo(app, auto_cleanup=False, ttl=60)
    uploads = silo.add_file_store("uploads", str(tmp_path / "files"))

    @app.put("/api/upload/<name>")
    def put(name: str) -> Any:
        uploads.save(silo.sid, name, request.stream)
        return jsonify(ok=True), 201

    @app.get("/api/files/<name>")
    def get(name: str) -> Any:
        return silo.send_file(uploads, name)

    return app, silo, uploads


@pytest.mark.parametrize("backend", ["local", "database"])
def test_every_size_around_the_piece_comes_back_whole(
    silo_url: str, tmp_path: Path, backend: str
) -> None:
    app, silo, uploads = make_app(silo_url, tmp_path, backend)
    client = app.test_client()
    sent = {f"f{size}.bin": os.urandom(size) for size in SIZES}
    try:
        for name, data in sent.items():
            source = tmp_path / name
            source.write_bytes(data)
            with open(source, "rb") as body:  # a real file: its readinto fills the pieces
                response = client.put(
                    f"/api/upload/{name}",
                    input_stream=body,
                    content_length=len(data),
                    headers={"X-Session-ID": SID, "Content-Type": "application/octet-stream"},
                )
            assert response.status_code == 201, response.get_data(as_text=True)
        with app.app_context():
            stored = {info.name: info for info in uploads.list_files(SID, details=True)}
        for name, data in sent.items():
            assert stored[name].size_bytes == len(data)
            assert stored[name].sha256 == hashlib.sha256(data).hexdigest()
            got = client.get(f"/api/files/{name}", headers={"X-Session-ID": SID})
            assert got.status_code == 200
            assert got.get_data() == data
    finally:
        silo.stop()


class SaysItsSize(io.RawIOBase):
    """A body with werkzeug's ``limit`` (its ``Content-Length``), which may be wrong."""

    def __init__(self, data: bytes, limit: int) -> None:
        self._data = io.BytesIO(data)
        self.limit = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._data.readinto(buffer)


def _says(said: int) -> Callable[[bytes], Any]:
    return lambda data: SaysItsSize(data, said)


SOURCES: dict[str, Callable[[bytes], Any]] = {
    "bytes": lambda data: data,
    "stream": io.BytesIO,
    **{f"says {said}": _says(said) for said in (0, 1, CHUNK - 1, CHUNK + 3, 5 * CHUNK)},
}
"""What ``save`` may be given, a stream that says a wrong size included."""


@pytest.mark.parametrize("source", list(SOURCES))
def test_save_outside_a_request_keeps_every_piece(
    sqlite_silo_url: str, tmp_path: Path, source: str
) -> None:
    app, silo, uploads = make_app(sqlite_silo_url, tmp_path, "database")
    data = os.urandom(4 * CHUNK + 11)
    try:
        with app.app_context():
            uploads.save(SID, "direct.bin", SOURCES[source](data))
            (info,) = uploads.list_files(SID, details=True)
            assert info.sha256 == hashlib.sha256(data).hexdigest()
            with uploads.open(SID, "direct.bin") as stream:
                assert stream.read() == data
    finally:
        silo.stop()


class ServerBody(io.RawIOBase):
    """A WSGI server's input as gunicorn's: not seekable, saying nothing of its size
    (werkzeug's test client measures it with tell and seek, which the app never uses)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._data.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._data.seek(offset, whence)

    def readinto(self, buffer: Any) -> int:
        return self._data.readinto(buffer)


@pytest.mark.parametrize("backend", ["local", "database"])
def test_a_body_that_ends_before_its_content_length_keeps_nothing(
    sqlite_silo_url: str, tmp_path: Path, backend: str
) -> None:
    """A WSGI server that marks its input terminated (gunicorn) ends a body early without
    an error when the client goes away: the upload counts what it got."""
    app, silo, uploads = make_app(sqlite_silo_url, tmp_path, backend)
    data = os.urandom(CHUNK + 100)
    try:
        response = app.test_client().put(
            "/api/upload/cut.bin",
            input_stream=ServerBody(data),
            headers={"X-Session-ID": SID, "Content-Type": "application/octet-stream"},
            environ_overrides={
                "wsgi.input_terminated": True,
                "CONTENT_LENGTH": str(len(data) + 5000),
            },
        )
        assert response.status_code == 400, response.get_data(as_text=True)
        assert response.get_json()["error"] == "request_body_incomplete"
        with app.app_context():
            assert uploads.list_files(SID) == []
        assert not [p for p in (tmp_path / "files").rglob("*") if p.is_file()]
    finally:
        silo.stop()


def test_a_view_that_read_the_start_of_the_body_says_what_is_left(
    sqlite_silo_url: str, tmp_path: Path
) -> None:
    app, silo, uploads = make_app(sqlite_silo_url, tmp_path, "database")

    @app.put("/api/sniffed/<name>")
    def sniffed(name: str) -> Any:
        magic = request.stream.read(4)
        left = (request.content_length or 0) - len(magic)
        uploads.save(silo.sid, name, request.stream, size=left)
        return jsonify(magic=magic.hex()), 201

    data = b"\x89PNG" + os.urandom(CHUNK + 10)
    try:
        response = app.test_client().put(
            "/api/sniffed/image.png",
            input_stream=ServerBody(data),
            headers={"X-Session-ID": SID, "Content-Type": "application/octet-stream"},
            environ_overrides={"wsgi.input_terminated": True},
        )
        assert response.status_code == 201, response.get_data(as_text=True)
        with app.app_context(), uploads.open(SID, "image.png") as stream:
            assert stream.read() == data[4:]
    finally:
        silo.stop()


def test_a_body_of_one_piece_holds_one_buffer() -> None:
    """A file smaller than a piece (most uploads) is read into one buffer: zeroing the
    memory of a second, never filled, costs as much as its upload's own copying."""
    tracemalloc.start()
    try:
        got = b"".join(bytes(p) for p in pieces(io.BytesIO(b"x" * 1000), 1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == b"x" * 1000
    assert peak < 1.5 * CHUNK
