"""Serving a stored file to a hostile or careless client: ranges, validators, names.

Through Flask's test client, on SQLite and PostgreSQL, with the ``local`` and the
``database`` backends (the other backends share this code path; they are served
in ``test_file_backends.py``). What a client may send is taken from RFC 9110
(ranges, conditional requests) and RFC 6266 (download names).

The table of ``Range`` headers runs on one database: a header means the same
slice whatever the database holds (reading a slice from each database is held
by the other range tests here and in ``test_file_backends.py``). Download names
never reach the database nor the backend: they run on one of each.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from flask import Flask, jsonify
from flask import request as incoming
from flask.testing import FlaskClient
from sqlalchemy import text
from support import Clock, sql_storage
from werkzeug.test import TestResponse

from flask_silo_sql import FileStore, Silo
from flask_silo_sql.errors import FileCorrupt, FileStorageError
from flask_silo_sql.files.limits import CHUNK
from flask_silo_sql.files.serving import byte_range

SID = "serving-test-session-00001"
SIZE = 1000
DATA = os.urandom(SIZE)


@dataclass
class Server:
    silo: Silo
    client: FlaskClient
    uploads: FileStore

    def put(self, name: str, data: bytes) -> TestResponse:
        return self.client.put(
            f"/api/upload/{name}",
            headers={"X-Session-ID": SID},
            data=data,
            content_type="application/octet-stream",
        )

    def get(self, name: str = "f.bin", **headers: str) -> TestResponse:
        return self.client.get(f"/api/files/{name}", headers={"X-Session-ID": SID, **headers})

    def named(self, download_name: str) -> str:
        answer = self.client.get(
            "/api/files/f.bin",
            headers={"X-Session-ID": SID},
            query_string={"as": download_name},
        )
        assert answer.status_code == 200
        return answer.headers["Content-Disposition"]


@pytest.fixture(params=["local", "database"])
def server(request: pytest.FixtureRequest, silo_url: str, tmp_path: Path) -> Iterator[Server]:
    app = Flask(__name__)
    app.config.update(
        TESTING=True,
        SILO_DATABASE_URI=silo_url,
        SILO_FILE_BACKEND=request.param,
        SILO_TOUCH_INTERVAL=0,
        SILO_MIN_FREE_BYTES=0,
    )
    silo = Silo(app, auto_cleanup=False, ttl=60)
    silo.store.clock = Clock(time.time())
    uploads = silo.add_file_store("uploads", str(tmp_path / "files"))

    @app.put("/api/upload/<name>")
    def put(name: str) -> Any:
        uploads.save(silo.sid, name, incoming.stream, content_type=incoming.content_type)
        return jsonify(ok=True), 201

    @app.route("/api/files/<name>", methods=["GET", "HEAD"])
    def get(name: str) -> Any:
        return silo.send_file("uploads", name, download_name=incoming.args.get("as"))

    @app.post("/api/reset")
    def reset() -> Any:
        silo.reset_current()
        return jsonify(ok=True)

    served = Server(silo, app.test_client(), uploads)
    assert served.put("f.bin", DATA).status_code == 201
    yield served
    silo.stop()
    sql_storage(silo.store).dispose()


# -- Range ------------------------------------------------------------------------------

WHOLE = (200, 0, SIZE)
REFUSED = (416, 0, 0)

ON_SQLITE = pytest.mark.parametrize("silo_url", ["sqlite"], indirect=True)
"""The test runs on SQLite only: what it checks does not depend on the database."""


@ON_SQLITE
@pytest.mark.parametrize(
    ("header", "answer"),
    [
        ("bytes=0-9", (206, 0, 10)),
        ("bytes=990-", (206, 990, SIZE)),
        ("bytes=-5", (206, SIZE - 5, SIZE)),
        ("bytes=0-4,", (206, 0, 5)),  # an empty list element is no range
        ("BYTES = 2 - 3", (206, 2, 4)),
        ("bytes=-5000", (206, 0, SIZE)),  # a suffix longer than the file: all of it
        ("bytes=0-99999999999999999999999999", (206, 0, SIZE)),
        ("bytes=0-9,20-29", WHOLE),  # several ranges: the whole file
        ("bytes=0-0,-1", WHOLE),
        ("bytes=0-9, 5000-", (206, 0, 10)),  # only one of them can be served
        ("items=0-5", WHOLE),  # a unit it does not know is ignored (RFC 9110 14.2)
        ("garbage", WHOLE),
        ("bytes=", WHOLE),
        ("bytes=-", WHOLE),
        ("bytes=5", WHOLE),
        ("bytes=10-5", WHOLE),  # last before first: invalid, ignored
        ("bytes=0x10-", WHOLE),
        ("bytes=" + "9" * 5000 + "-", REFUSED),  # more digits than int() takes
        ("bytes=-" + "9" * 5000, (206, 0, SIZE)),
        ("bytes=-0", REFUSED),  # a suffix of nothing is not satisfiable
        (f"bytes={SIZE}-", REFUSED),
        (f"bytes={SIZE}-,{SIZE + 5}-{SIZE + 9}", REFUSED),
    ],
)
def test_ranges_are_answered_as_rfc_9110_says(
    server: Server, header: str, answer: tuple[int, int, int]
) -> None:
    status, start, stop = answer
    got = server.get(Range=header)
    assert got.status_code == status, got.get_data()[:200]
    if status == 416:
        assert got.get_json()["error"] == "range_not_satisfiable"
        assert got.get_json()["message"]
        assert got.headers["Content-Range"] == f"bytes */{SIZE}"
        return
    assert got.get_data() == DATA[start:stop]
    assert got.headers["Content-Length"] == str(stop - start)
    if status == 206:
        assert got.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{SIZE}"
    else:
        assert "Content-Range" not in got.headers


def test_a_range_of_an_empty_file_is_the_empty_file(server: Server) -> None:
    assert server.put("empty.bin", b"").status_code == 201
    for header in ("bytes=0-", "bytes=-5", "bytes=-0"):
        got = server.get("empty.bin", Range=header)
        assert (got.status_code, got.get_data()) == (200, b""), header


def test_byte_range_never_raises_on_any_header() -> None:
    for header in ("", "=", "bytes", "bytes==1-2", "bytes=1-2-3", "bytes=,,,", "bytes=\x00-1"):
        assert byte_range(header, SIZE) is None, header
    assert byte_range("bytes=0-", 0) is None


@pytest.mark.parametrize("name", ["nothing.bin", "%E6%97%A5", "%2E%2E", "a%00b", "%0D%0A"])
def test_a_missing_or_unsafe_name_is_a_clear_404(server: Server, name: str) -> None:
    """Names ``secure_filename`` empties (``日``, ``..``) are no file either."""
    missing = server.get(name)
    assert missing.status_code == 404
    body = missing.get_json()
    assert body["error"] == "file_not_found"
    assert body["message"].startswith("No file ")
    assert "Errno" not in body["message"]


# -- conditional requests ---------------------------------------------------------------


def test_if_range_counts_only_a_strong_match(server: Server) -> None:
    whole = server.get()
    etag, last_modified = whole.headers["ETag"], whole.headers["Last-Modified"]
    for if_range, status in [
        (etag, 206),
        # A date is a weak validator (whole seconds) where there is a strong tag: a file
        # replaced within the second would continue the old one's download with its bytes.
        (last_modified, 200),
        (f"W/{etag}", 200),  # If-Range compares strongly (RFC 9110 13.1.5)
        ('"other"', 200),
        (etag[:-1], 200),
        ("Mon, 01 Jan 2001 00:00:00 GMT", 200),
        ("garbage", 200),
    ]:
        got = server.get(Range="bytes=0-9", **{"If-Range": if_range})
        assert got.status_code == status, if_range
        assert got.get_data() == (DATA[:10] if status == 206 else DATA)


def test_a_fresh_copy_is_304_before_any_range(server: Server) -> None:
    whole = server.get()
    etag, last_modified = whole.headers["ETag"], whole.headers["Last-Modified"]
    for headers in (
        {"If-None-Match": etag},
        {"If-None-Match": f'"other", W/{etag}'},
        {"If-None-Match": "*"},
        {"If-Modified-Since": last_modified},
    ):
        for rng in ("bytes=0-9", f"bytes={SIZE}-", "bytes=0-9,20-29"):
            got = server.get(Range=rng, **headers)
            assert (got.status_code, got.get_data()) == (304, b""), (headers, rng)
            assert got.headers["ETag"] == etag
    for headers in (
        {"If-None-Match": '"other"'},
        {"If-None-Match": "garbage"},
        {"If-Modified-Since": "garbage"},
        # If-None-Match decides alone when it is there (RFC 9110 13.1.3).
        {"If-None-Match": '"other"', "If-Modified-Since": last_modified},
    ):
        got = server.get(**headers)
        assert (got.status_code, got.get_data()) == (200, DATA), headers


def test_if_match_and_if_unmodified_since_answer_412_without_the_file(server: Server) -> None:
    whole = server.get()
    etag, last_modified = whole.headers["ETag"], whole.headers["Last-Modified"]
    for headers in (
        {"If-Match": '"other"'},
        {"If-Match": f"W/{etag}"},  # If-Match compares strongly
        {"If-Match": '"other"', "Range": "bytes=0-4"},
        {"If-Unmodified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"},
    ):
        got = server.get(**headers)
        assert got.status_code == 412, headers
        assert got.get_json()["error"] == "precondition_failed"
        assert got.get_json()["message"]
    for headers in (
        {"If-Match": etag},
        {"If-Match": f'"other", {etag}'},
        {"If-Match": "*"},
        {"If-Unmodified-Since": last_modified},
        {"If-Unmodified-Since": "garbage"},  # not a date: ignored
        # If-Match decides alone when it is there.
        {"If-Match": etag, "If-Unmodified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"},
    ):
        got = server.get(**headers)
        assert (got.status_code, got.get_data()) == (200, DATA), headers
    part = server.get(Range="bytes=0-4", **{"If-Match": etag})
    assert (part.status_code, part.get_data()) == (206, DATA[:5])


def test_head_answers_the_headers_of_a_get(server: Server) -> None:
    head = server.client.head("/api/files/f.bin", headers={"X-Session-ID": SID})
    assert (head.status_code, head.get_data()) == (200, b"")
    assert head.headers["Content-Length"] == str(SIZE)
    part = server.client.head(
        "/api/files/f.bin", headers={"X-Session-ID": SID, "Range": "bytes=0-9"}
    )
    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes 0-9/{SIZE}"


# -- Content-Disposition ----------------------------------------------------------------


def names(header: str) -> tuple[str, str | None]:
    """The ``filename`` and the decoded ``filename*`` of a Content-Disposition."""
    params = dict(part.strip().split("=", 1) for part in header.split(";")[1:] if "=" in part)
    extended = params.get("filename*")
    if extended is not None:
        assert extended.startswith("UTF-8''")
        extended = unquote(extended[len("UTF-8''") :])
    return params["filename"].strip('"'), extended


@ON_SQLITE
@pytest.mark.parametrize("server", ["local"], indirect=True)
@pytest.mark.parametrize(
    ("given", "ascii_name", "utf8_name"),
    [
        ("report.pdf", "report.pdf", None),
        ("résumé.pdf", "resume.pdf", "résumé.pdf"),
        ("日本語.txt", "download.txt", "日本語.txt"),  # the extension survives
        ("naïve café.tar.gz", "naive_cafe.tar.gz", "naïve café.tar.gz"),
        ('a"b.txt', "a_b.txt", None),
        ("a\r\nSet-Cookie: x=1.txt", "aSet-Cookie__x1.txt", "aSet-Cookie_ x=1.txt"),
        ("../../etc/passwd", "passwd", None),
        ("..\\..\\boot.ini", "boot.ini", None),
        ("evil\u202etxt.exe", "eviltxt.exe", None),  # no bidirectional override
        ("..", "download", None),
        ("", "download", None),
        ("\x00\x01", "download", None),
        (".hidden", "hidden", None),
        ("%41.txt", "41.txt", "%41.txt"),
    ],
)
def test_download_names_are_safe_and_keep_their_characters(
    server: Server, given: str, ascii_name: str, utf8_name: str | None
) -> None:
    header = server.named(given)
    assert header.startswith("inline; ")
    assert "\r" not in header
    assert "\n" not in header
    plain, extended = names(header)
    assert plain == ascii_name
    assert plain.isascii()
    assert extended == utf8_name
    for name in (plain, extended or ""):
        assert not set(name) & set('/\\"')


def test_a_long_download_name_keeps_its_extension(server: Server) -> None:
    plain, extended = names(server.named("é" * 300 + ".pdf"))
    assert extended is not None
    assert extended.endswith(".pdf")
    assert len(extended) <= 200
    assert plain == "e" * 196 + ".pdf"


# -- a file that changes while it is read -----------------------------------------------


@pytest.mark.parametrize("lookup", [1, 2])
def test_a_file_replaced_as_it_is_looked_up_is_served_as_one_version(
    server: Server, lookup: int
) -> None:
    """A replacement committed between the reads of the file's row (its ``file_row``
    statements, observed at the storage's hook): the headers and the bytes are of one
    version, whichever."""
    first, second = b"A" * 5000, b"B" * 3000
    assert server.put("race.bin", first).status_code == 201
    storage = sql_storage(server.silo.store)
    seen: list[str] = []

    def replace_at_lookup(name: str, sql: str, values: Any) -> None:
        if name != "file_row" or not threading.current_thread().name.startswith("reader"):
            return
        seen.append(name)
        if len(seen) == lookup:  # before this lookup runs, another request replaces the file
            with ThreadPoolExecutor(1) as other:
                assert other.submit(server.put, "race.bin", second).result().status_code == 201

    storage.statement_hook = replace_at_lookup
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="reader") as pool:
            got = pool.submit(server.get, "race.bin").result()
    finally:
        storage.statement_hook = None
    assert seen, "the lookup was never observed"
    body = got.get_data()
    assert got.status_code == 200
    assert body in (first, second)
    assert got.headers["Content-Length"] == str(len(body))
    assert got.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'


def test_a_file_replaced_under_a_reused_id_is_never_served_mixed(server: Server) -> None:
    """SQLite gives a new row the id of the last row deleted: the second version's
    chunks must not be read as the rest of the first one's."""
    first, second = b"A" * (3 * CHUNK + 5), b"B" * (3 * CHUNK + 5)
    assert server.client.post("/api/reset", headers={"X-Session-ID": SID}).status_code == 200
    assert server.put("big.bin", first).status_code == 201
    response = server.client.get(
        "/api/files/big.bin", headers={"X-Session-ID": SID}, buffered=False
    )
    parts: Iterator[bytes] = iter(response.response)  # type: ignore[arg-type]
    received = next(parts)
    assert server.client.post("/api/reset", headers={"X-Session-ID": SID}).status_code == 200
    assert server.put("big.bin", second).status_code == 201
    failed: FileStorageError | None = None
    try:
        for part in parts:
            received += part
    except FileStorageError as exc:  # the server then closes the connection
        failed = exc
    finally:
        response.close()
    assert set(received) == {ord("A")}, "bytes of another version were sent"
    # A local file is read from the file opened; the database's ends early instead.
    assert (received == first) if failed is None else (len(received) < len(first))


@pytest.mark.parametrize("size", [SIZE, 2 * CHUNK + 5], ids=["one-chunk", "three-chunks"])
def test_a_chunk_changed_at_rest_fails_its_download(server: Server, size: int) -> None:
    """``database``: bytes changed in ``silo_file_chunks`` behind silo's back are
    caught by the SHA-256 check at the end of a full read: the download fails (its
    headers are sent, so the stream breaks off) and says so in the log."""
    if server.uploads.backend != "database":
        pytest.skip("the check of chunks read back is the database backend's")
    data = os.urandom(size)
    assert server.put("rot.bin", data).status_code == 201
    engine = sql_storage(server.silo.store).engine
    with engine.begin() as conn:
        last = conn.execute(text("SELECT max(seq) FROM silo_file_chunks")).scalar_one()
        changed = conn.execute(
            text("UPDATE silo_file_chunks SET data = :data WHERE seq = :seq"),
            {"data": b"x" * (size - last * CHUNK), "seq": last},
        )
        assert changed.rowcount >= 1
    response = server.client.get(
        "/api/files/rot.bin", headers={"X-Session-ID": SID}, buffered=False
    )
    assert response.status_code == 200
    with pytest.raises(FileCorrupt):
        b"".join(response.iter_encoded())
    response.close()
