"""File store throughput: every backend against a bare Flask view doing the same transfer.

Each configuration uploads a file (``PUT``, the body streamed into
``FileStore.save`` from ``request.stream``) and downloads it (``GET`` answered
by ``silo.send_file``, the body read to its end), through Flask's test client,
in-process, for 1 MB and 100 MB files:

* ``local`` (rows in SQLite): the bytes on this disk;
* ``database`` on SQLite and on PostgreSQL: the bytes in ``silo_file_chunks``;
* ``file://`` (rows in SQLite): a directory of this disk through fsspec;
* S3 (rows in SQLite): moto's server on loopback (``tests/s3server.py``), if
  moto and s3fs are installed.

Floors (the verdicts): for each backend, a bare Flask app (no silo) whose view
does the same transfer, through the same test client, in 1 MiB pieces, hashing
(SHA-256) what it stores, as every backend does:

* ``local``: the view copies ``request.stream`` into a file, hashing, then
  ``fsync``; a download is ``flask.send_file``;
* ``database``: the view inserts the chunks with the DBAPI (a connection
  of a :func:`~flask_silo_sql.sql.engine.make_engine` pool: the same connection
  settings; a table shaped like ``silo_file_chunks``), hashing, and commits
  once; a download streams the chunks, one ``SELECT`` each (rows in
  PostgreSQL's binary format, as the backend reads them), hashing them, as the
  backend checks a full read against its SHA-256;
* ``file://`` and S3: the view writes the body to an object through fsspec
  (the local filesystem, s3fs; silo's block size), hashing; a download
  streams the object read through fsspec.

Raw floors (context, no target; no Flask on the measured path): a plain copy
(``shutil.copyfileobj`` of the source into a new file on the same disk, then
``fsync``; its download reads the file to its end) and the same copy and read
hashing the bytes (SHA-256); raw chunks on each database (one DBAPI
connection, one ``INSERT`` per chunk and one ``COMMIT`` per file, one
``SELECT`` per chunk); the same bytes written to and read from an S3 object
with s3fs. A bare Flask view reaches a fraction of these (the request's own
cost), which is why the targets are set against the views.

A round uploads and downloads each size once per configuration (the 1 MB file
``SMALL_REPEAT`` times), interleaved across configurations (each floor just
before the configurations compared with it); the median round's throughput is
reported, and each ratio is the median of the rounds' ratios (a configuration
over its floor in the same round), so that the drift of a shared, loaded
machine between rounds cancels out. Peak RSS
per transfer: the process's high water mark is reset before it
(``/proc/self/clear_refs``) and read after it;
the table shows the highest of the rounds, and how far it rose above the
resident set at the transfer's start (the benchmark's process holds every
configuration, so the peak itself is mostly theirs).

Targets: every backend ≥ 0.9 x its bare Flask view, for uploads and
downloads of each size. The exit status is 0 whatever the verdicts: this is
a report.

PostgreSQL is a private server started for the run with ``fsync=on`` and
``synchronous_commit=on`` (``tests/pgserver.py``), or the server named by
``SILO_TEST_PG_URL``.

Run: ``python benchmarks/files.py [--rounds R] [--only local|sqlite|postgresql|file|s3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

from flask import Flask, Response, jsonify, request, send_file
from sqlalchemy import Column, Engine, Integer, LargeBinary, MetaData, Table

import flask_silo_sql
from flask_silo_sql import schema
from flask_silo_sql.files.limits import CHUNK
from flask_silo_sql.sql.engine import make_engine

REPO = Path(__file__).resolve().parent.parent
# Run as a script, this directory comes first on the path, and its requests.py would stand
# in for the requests package that tests/s3server.py uses.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
HEADER = "X-Session-ID"
MB = 1_000_000
MIB = 1024 * 1024
SIZES = (1 * MB, 100 * MB)
SMALL_REPEAT = 10
"""Transfers of the 1 MB file per round (one is too short to time)."""
DIRECTIONS = ("upload", "download")
TARGET = 0.9
"""Every silo configuration, over its bare Flask view (median of the rounds' ratios)."""
CHOICES = ("local", "sqlite", "postgresql", "file", "s3")
TITLES = {
    "disk": "This disk",
    "sqlite": "SQLite",
    "postgresql": "PostgreSQL",
    "s3": "S3 (moto, loopback)",
}


class BenchError(RuntimeError):
    """A configuration answered wrongly: its numbers would mean nothing."""


class PgServerLike(Protocol):
    def create_database(self, name: str | None = None) -> str: ...

    def destroy(self) -> None: ...


Upload = Callable[[Path, str], None]
"""Store the source file under a name."""
Download = Callable[[str], int]
"""Read the stored name to its end; how many bytes."""


@dataclass
class Config:
    """One configuration: how it uploads and downloads, and what it is compared with."""

    label: str
    group: str
    """``disk``, ``sqlite``, ``postgresql`` or ``s3``: where its bytes go."""
    upload: Upload
    download: Download
    floor: str | None = None
    """The label of the configuration it is compared with (None: it is a floor)."""
    target: float | None = None
    context: str | None = None
    """The label of a raw floor (no Flask) it is shown beside, with no target."""
    new_round: Callable[[], None] = lambda: None
    """Called before each round, outside the timing (a new session, an emptied table)."""
    closers: list[Callable[[], None]] = field(default_factory=list)
    rates: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    """MB/s per round, by (size, direction)."""
    peaks: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    """The highest peak RSS of a transfer, and the largest rise of a peak over the RSS
    at its transfer's start, bytes."""

    def rate(self, size: int, direction: str) -> float:
        return statistics.median(self.rates[(size, direction)])

    def close(self) -> None:
        for closer in reversed(self.closers):
            closer()


# -- memory -------------------------------------------------------------------------------


def _status(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no {field_name} in /proc/self/status")


def measured(op: Callable[[], Any]) -> tuple[float, int, int]:
    """Seconds *op* took, the process's peak RSS while it ran, and how far that peak
    rose above the RSS at its start."""
    Path("/proc/self/clear_refs").write_text("5")  # the high water mark := the RSS now
    start_rss = _status("VmRSS")
    start = time.perf_counter()
    op()
    elapsed = time.perf_counter() - start
    peak = _status("VmHWM")
    return elapsed, peak, max(0, peak - start_rss)


# -- silo configurations ------------------------------------------------------------------


def silo_config(
    label: str,
    group: str,
    url: str,
    home: Path,
    backend: str,
    *,
    floor: str,
    context: str,
    storage_options: dict[str, Any] | None = None,
) -> Config:
    """A Flask app with one file store on *backend*, its rows in *url*."""
    storage = flask_silo_sql.SQLStorage(url)
    schema.upgrade(storage.engine)
    app = Flask(f"bench_files_{label}")
    app.config.update(SILO_MAX_FILE_BYTES=None, SILO_MAX_SESSION_BYTES=None)
    silo = flask_silo_sql.Silo(app, storage=storage, auto_cleanup=False)
    files = silo.add_file_store(
        "bench", str(home), backend=backend, storage_options=storage_options
    )

    @app.put("/api/files/<name>")
    def put(name: str) -> tuple[Response, int]:
        files.save(silo.sid, name, request.stream, content_type="application/octet-stream")
        return jsonify(name=name), 201

    @app.get("/api/files/<name>")
    def get(name: str) -> Response:
        return silo.send_file(files, name)

    sid = {"current": secrets.token_urlsafe(32)}
    upload, download = client_transfers(app, label, lambda: {HEADER: sid["current"]})

    def new_round() -> None:
        with app.app_context():
            files.cleanup(sid["current"])
        sid["current"] = secrets.token_urlsafe(32)

    return Config(label, group, upload, download, floor=floor, target=TARGET, context=context,
                  new_round=new_round, closers=[silo.stop, storage.dispose])


def client_transfers(
    app: Flask, label: str, headers: Callable[[], dict[str, str]]
) -> tuple[Upload, Download]:
    """Uploads and downloads through *app*'s test client, the body streamed both ways."""
    client = app.test_client()

    def upload(source: Path, name: str) -> None:
        size = source.stat().st_size
        with open(source, "rb") as body:
            response = client.put(
                f"/api/files/{name}",
                headers={**headers(), "Content-Type": "application/octet-stream"},
                input_stream=body,
                content_length=size,
            )
        if response.status_code != 201:
            raise BenchError(f"{label}: upload answered {response.status_code}: {response.text}")

    def download(name: str) -> int:
        response = client.get(f"/api/files/{name}", headers=headers(), buffered=False)
        try:
            if response.status_code != 200:
                raise BenchError(f"{label}: download answered {response.status_code}")
            return sum(len(piece) for piece in response.response)
        finally:
            response.close()

    return upload, download


def body_pieces() -> Iterator[bytes]:
    """The request's body in pieces of :data:`CHUNK` bytes, as a view would read it."""
    stream = request.stream
    while True:
        piece = stream.read(CHUNK)
        if not piece:
            return
        yield piece


def bare_app(
    label: str,
    group: str,
    store: Callable[[str], None],
    serve: Callable[[str], Response],
    clear: Callable[[], None],
    *,
    context: str | None,
) -> Config:
    """A bare Flask app whose ``PUT`` view calls *store* (the body is ``request.stream``)
    and whose ``GET`` view answers *serve*'s response, through the same test client as
    silo's: what a Flask view doing the same transfer costs, and nothing of silo."""
    app = Flask(f"bench_files_bare_{group}")

    @app.put("/api/files/<name>")
    def put(name: str) -> tuple[Response, int]:
        store(name)
        return jsonify(name=name), 201

    @app.get("/api/files/<name>")
    def get(name: str) -> Response:
        return serve(name)

    upload, download = client_transfers(app, label, dict)
    return Config(label, group, upload, download, context=context, new_round=clear)


def bare_local(home: Path, context: str) -> Config:
    """The view copies ``request.stream`` into a file in 1 MiB pieces, hashing them
    (SHA-256), and syncs it; a download is ``flask.send_file``: the floor of ``local``."""

    def store(name: str) -> None:
        digest = hashlib.sha256()
        with open(home / name, "wb") as out:
            for piece in body_pieces():
                digest.update(piece)
                out.write(piece)
            out.flush()
            os.fsync(out.fileno())
        digest.hexdigest()

    def serve(name: str) -> Response:
        return send_file(home / name, mimetype="application/octet-stream")

    def clear() -> None:
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)

    clear()
    return bare_app("bare Flask: file + SHA-256 + fsync", "disk", store, serve, clear,
                    context=context)


def bare_fsspec(fs: Any, root: str, group: str, context: str | None) -> Config:
    """The view writes ``request.stream`` to an object through fsspec (*fs*: the local
    filesystem or s3fs, silo's block size), hashing it (SHA-256); a download streams the
    object read through fsspec in 1 MiB pieces: the floor of ``file://`` and S3."""
    from flask_silo_sql.files.backends import FsspecBytes

    def store(name: str) -> None:
        digest = hashlib.sha256()
        with fs.open(f"{root}/{name}", "wb", block_size=FsspecBytes.block_size) as out:
            for piece in body_pieces():
                digest.update(piece)
                out.write(piece)
        digest.hexdigest()

    def serve(name: str) -> Response:
        source = fs.open(f"{root}/{name}", "rb", block_size=CHUNK)

        def stream() -> Iterator[bytes]:
            with source:
                yield from iter(lambda: source.read(CHUNK), b"")

        return Response(stream(), mimetype="application/octet-stream")

    def clear() -> None:
        if fs.exists(root):
            fs.rm(root, recursive=True)
        fs.invalidate_cache()
        fs.makedirs(root, exist_ok=True)

    clear()
    return bare_app(f"bare Flask: fsspec + SHA-256 ({TITLES[group]})", group, store, serve,
                    clear, context=context)


def bare_chunks(group: str, url: str, context: str) -> Config:
    """The view inserts the body's 1 MiB chunks with the DBAPI (a connection of a
    :func:`~flask_silo_sql.sql.engine.make_engine` pool, one ``INSERT`` per chunk),
    hashing them (SHA-256), and commits; a download streams the chunks, one ``SELECT``
    each (binary rows on PostgreSQL), hashing them as the backend checks a full read:
    the floor of ``database``."""
    engine: Engine = make_engine(url)
    chunks_table(engine, "bare_chunks")
    mark = "%s" if engine.dialect.name == "postgresql" else "?"
    insert = f"INSERT INTO bare_chunks (file_id, seq, data) VALUES ({mark}, {mark}, {mark})"
    select = f"SELECT data FROM bare_chunks WHERE file_id = {mark} AND seq = {mark}"
    binary = {"binary": True} if engine.dialect.driver == "psycopg" else {}
    ids: dict[str, tuple[int, int]] = {}

    def store(name: str) -> None:
        file_id = len(ids) + 1
        digest = hashlib.sha256()
        seq = 0
        pooled = engine.raw_connection()
        try:
            cursor = pooled.cursor()
            for piece in body_pieces():
                digest.update(piece)
                cursor.execute(insert, (file_id, seq, piece))
                seq += 1
            cursor.close()
            pooled.commit()
        finally:
            pooled.close()
        digest.hexdigest()
        ids[name] = (file_id, seq)

    def serve(name: str) -> Response:
        file_id, count = ids[name]

        def stream() -> Iterator[bytes]:
            digest = hashlib.sha256()
            pooled = engine.raw_connection()
            try:
                cursor: Any = pooled.cursor()
                for seq in range(count):
                    cursor.execute(select, (file_id, seq), **binary)
                    piece = bytes(cursor.fetchone()[0])
                    digest.update(piece)
                    yield piece
                cursor.close()
                pooled.commit()
            finally:
                pooled.close()
            digest.hexdigest()

        return Response(stream(), mimetype="application/octet-stream")

    def clear() -> None:
        pooled = engine.raw_connection()
        try:
            cursor = pooled.cursor()
            cursor.execute("DELETE FROM bare_chunks")
            cursor.close()
            pooled.commit()
        finally:
            pooled.close()
        ids.clear()

    config = bare_app(f"bare Flask: DBAPI chunks + SHA-256 ({TITLES[group]})", group, store,
                      serve, clear, context=context)
    config.closers.append(engine.dispose)
    return config


# -- raw floors (no Flask; context) --------------------------------------------------------


def copy_floor(home: Path) -> Config:
    """A plain copy into a file of the same disk, synced; reading it back."""
    home.mkdir(parents=True, exist_ok=True)

    def upload(source: Path, name: str) -> None:
        with open(source, "rb") as src, open(home / name, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())

    def download(name: str) -> int:
        total = 0
        with open(home / name, "rb") as src:
            for piece in iter(lambda: src.read(CHUNK), b""):
                total += len(piece)
        return total

    def new_round() -> None:
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)

    return Config("plain copy (copyfileobj + fsync)", "disk", upload, download,
                  new_round=new_round)


def hashed_copy(home: Path, context: str) -> Config:
    """The plain copy, also hashing what it copies (SHA-256, inline): the work every
    backend does besides moving the bytes (the row records the hash; a full read checks
    it). Shown beside the plain copy, with no target."""
    home.mkdir(parents=True, exist_ok=True)

    def upload(source: Path, name: str) -> None:
        digest = hashlib.sha256()
        with open(source, "rb") as src, open(home / name, "wb") as out:
            for piece in iter(lambda: src.read(CHUNK), b""):
                digest.update(piece)
                out.write(piece)
            out.flush()
            os.fsync(out.fileno())
        digest.hexdigest()

    def download(name: str) -> int:
        digest = hashlib.sha256()
        total = 0
        with open(home / name, "rb") as src:
            for piece in iter(lambda: src.read(CHUNK), b""):
                digest.update(piece)
                total += len(piece)
        digest.hexdigest()
        return total

    def new_round() -> None:
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)

    return Config("plain copy + SHA-256", "disk", upload, download, context=context,
                  new_round=new_round)


def chunks_table(engine: Engine, name: str) -> None:
    """A table shaped like ``silo_file_chunks`` (its key and its bytes)."""
    metadata = MetaData()
    Table(
        name,
        metadata,
        Column("file_id", Integer, primary_key=True),
        Column("seq", Integer, primary_key=True),
        Column("data", LargeBinary, nullable=False),
    )
    metadata.create_all(engine)


def chunk_floor(group: str, url: str) -> Config:
    """Raw chunk INSERTs (one COMMIT per file) and SELECTs on the same database."""
    engine: Engine = make_engine(url)
    chunks_table(engine, "bench_chunks")
    pooled = engine.raw_connection()
    connection: Any = pooled.dbapi_connection
    cursor = connection.cursor()
    mark = "%s" if engine.dialect.name == "postgresql" else "?"
    insert = f"INSERT INTO bench_chunks (file_id, seq, data) VALUES ({mark}, {mark}, {mark})"
    select = f"SELECT data FROM bench_chunks WHERE file_id = {mark} AND seq = {mark}"
    ids: dict[str, tuple[int, int]] = {}
    # psycopg: rows in the binary format, as the backend reads its chunks (a bytea
    # as hexadecimal text costs both ends five times as much).
    binary = {"binary": True} if engine.dialect.driver == "psycopg" else {}

    def upload(source: Path, name: str) -> None:
        file_id = len(ids) + 1
        seq = 0
        with open(source, "rb") as src:
            for piece in iter(lambda: src.read(CHUNK), b""):
                cursor.execute(insert, (file_id, seq, piece))
                seq += 1
        connection.commit()
        ids[name] = (file_id, seq)

    def download(name: str) -> int:
        file_id, count = ids[name]
        total = 0
        for seq in range(count):
            cursor.execute(select, (file_id, seq), **binary)
            total += len(cursor.fetchone()[0])
        connection.commit()  # PostgreSQL: end the read's transaction, as an autocommit would
        return total

    def new_round() -> None:
        cursor.execute("DELETE FROM bench_chunks")
        connection.commit()
        ids.clear()

    def close() -> None:
        cursor.close()
        pooled.close()
        engine.dispose()

    return Config(f"raw chunk INSERTs/SELECTs ({TITLES[group]})", group, upload, download,
                  new_round=new_round, closers=[close])


def s3_floor(fs: Any, bucket: str) -> Config:
    """The same bytes written to an object and read back with s3fs (its block size)."""
    from flask_silo_sql.files.backends import FsspecBytes

    prefix = f"{bucket}/floor"

    def upload(source: Path, name: str) -> None:
        with open(source, "rb") as src, fs.open(f"{prefix}/{name}", "wb",
                                                block_size=FsspecBytes.block_size) as out:
            shutil.copyfileobj(src, out, CHUNK)

    def download(name: str) -> int:
        total = 0
        with fs.open(f"{prefix}/{name}", "rb", block_size=CHUNK) as src:
            for piece in iter(lambda: src.read(CHUNK), b""):
                total += len(piece)
        return total

    def new_round() -> None:
        if fs.exists(prefix):
            fs.rm(prefix, recursive=True)
        fs.invalidate_cache()

    return Config("raw s3fs object write/read", "s3", upload, download, new_round=new_round)


# -- servers --------------------------------------------------------------------------------


def tests_module(name: str) -> Any:
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


def start_postgresql() -> PgServerLike:
    """A private server with fsync on, or the one named by ``SILO_TEST_PG_URL``."""
    pgserver = tests_module("pgserver")
    external = os.environ.get("SILO_TEST_PG_URL")
    server: PgServerLike = (
        pgserver.ExternalPg(external) if external else pgserver.PgServer(fsync=True)
    )
    return server


# -- measuring ------------------------------------------------------------------------------


def sources(tmp: Path) -> dict[int, Path]:
    """One file of random bytes per size (random: nothing compresses on the way)."""
    made = {}
    for size in SIZES:
        path = tmp / f"source-{size}.bin"
        with open(path, "wb") as out:
            left = size
            while left:
                piece = os.urandom(min(CHUNK, left))
                out.write(piece)
                left -= len(piece)
        made[size] = path
    return made


def check(config: Config, source: Path) -> None:
    """Upload and download once, outside the timing: every byte comes back."""
    size = source.stat().st_size
    config.upload(source, "check.bin")
    got = config.download("check.bin")
    if got != size:
        raise BenchError(f"{config.label}: downloaded {got} bytes of {size}")


def one_round(config: Config, src: dict[int, Path], number: int) -> None:
    config.new_round()
    for size, source in src.items():
        repeat = SMALL_REPEAT if size < 10 * MB else 1
        names = [f"r{number}-{size}-{i}.bin" for i in range(repeat)]

        def upload_all(names: list[str] = names, source: Path = source) -> None:
            for name in names:
                config.upload(source, name)

        def download_all(names: list[str] = names, size: int = size) -> None:
            for name in names:
                if config.download(name) != size:
                    raise BenchError(f"{config.label}: a download came back short")

        for direction, op in (("upload", upload_all), ("download", download_all)):
            seconds, peak, rise = measured(op)
            config.rates.setdefault((size, direction), []).append(size * repeat / MB / seconds)
            key = (size, direction)
            before = config.peaks.get(key, (0, 0))
            config.peaks[key] = (max(before[0], peak), max(before[1], rise))


def run(configs: list[Config], src: dict[int, Path], rounds: int) -> None:
    for config in configs:
        check(config, src[SIZES[0]])
        check(config, src[SIZES[-1]])
    for number in range(rounds):  # interleaved, so drift hits every configuration alike
        for config in configs:
            one_round(config, src, number)
    for config in configs:
        config.new_round()


# -- report ---------------------------------------------------------------------------------


def paired_ratio(config: Config, floor: Config, size: int, direction: str) -> float:
    """The median over rounds of the configuration's rate over its floor's in the same
    round: the two ran one after the other, so a drift of the machine (its disk's
    write-back, its page cache) between rounds moves both alike."""
    mine = config.rates[(size, direction)]
    theirs = floor.rates[(size, direction)]
    return statistics.median(a / b for a, b in zip(mine, theirs, strict=True))


@dataclass
class Verdict:
    label: str
    what: str
    ratio: float
    target: float

    @property
    def ok(self) -> bool:
        return self.ratio >= self.target

    def line(self) -> str:
        mark = "PASS" if self.ok else "FAIL"
        return f"  {mark}  {self.label:<34} {self.what:<32} {self.ratio:5.2f}  " \
               f"(target >= {self.target:g})"


def size_title(size: int) -> str:
    return f"{size // MB} MB"


def report(configs: list[Config], skipped: dict[str, str], rounds: int, setup: list[str],
           load_before: float) -> list[Verdict]:
    by_label = {c.label: c for c in configs}
    columns = ["configuration", "size", "up MB/s", "down MB/s", "up/view", "down/view",
               "up/raw", "down/raw", "peak RSS up, MiB", "peak RSS down, MiB"]
    rows: list[list[str] | str] = []
    verdicts: list[Verdict] = []
    for group in TITLES:
        members = [c for c in configs if c.group == group]
        if not members:
            continue
        rows.append(TITLES[group])
        for config in members:  # each floor before what is compared with it
            for size in SIZES:
                cells = [config.label, size_title(size),
                         f"{config.rate(size, 'upload'):.1f}",
                         f"{config.rate(size, 'download'):.1f}"]
                floor = by_label.get(config.floor or "")
                for direction in DIRECTIONS:
                    if floor is None:
                        cells.append("")
                        continue
                    ratio = paired_ratio(config, floor, size, direction)
                    cell = f"{ratio:.2f}"
                    if config.target is not None:
                        verdict = Verdict(config.label, f"{direction} {size_title(size)} / view",
                                          ratio, config.target)
                        verdicts.append(verdict)
                        cell += " PASS" if verdict.ok else " FAIL"
                    cells.append(cell)
                context = by_label.get(config.context or "")
                for direction in DIRECTIONS:
                    cells.append("" if context is None else
                                 f"{paired_ratio(config, context, size, direction):.2f}")
                for direction in DIRECTIONS:
                    peak, rise = config.peaks[(size, direction)]
                    cells.append(f"{peak / MIB:.1f} (+{rise / MIB:.1f})")
                rows.append(cells)
    cell_rows = [columns, *[r for r in rows if isinstance(r, list)]]
    widths = [max(len(row[i]) for row in cell_rows) for i in range(len(columns))]
    rule = "-+-".join("-" * w for w in widths)

    def fmt(row: list[str]) -> str:
        first = [row[0].ljust(widths[0]), row[1].rjust(widths[1])]
        rest = [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        return " | ".join([*first, *rest]).rstrip()

    print()
    print(f"File store throughput, median of {rounds} rounds (1 MB: {SMALL_REPEAT} files per "
          "round; Flask test client, in-process; 1 MiB pieces)")
    print(", ".join([*setup, f"{os.cpu_count()} CPUs, load average {load_before:.2f} before / "
                     f"{os.getloadavg()[0]:.2f} after"]))
    print()
    print(fmt(columns))
    print(rule)
    for row in rows:
        if isinstance(row, str):
            print(f"-- {row} " + "-" * max(0, len(rule) - len(row) - 4))
        else:
            print(fmt(row))
    print()
    print("MB = 10^6 bytes. up/view, down/view: over the bare Flask view of the same "
          "backend (the verdicts); up/raw, down/raw: over the raw floor (no Flask; context). "
          "The plain copy syncs the file it writes; raw chunks are one INSERT per 1 MiB chunk "
          "and one COMMIT per file, one SELECT per chunk. Peak RSS: the "
          "process's high water mark during a transfer (reset before it; 1 MB: its "
          f"{SMALL_REPEAT} files), the highest of the rounds, and in brackets the largest rise "
          "above the resident set at a transfer's start.")
    print("Verdicts:")
    for verdict in verdicts:
        print(verdict.line())
    failed = sum(not v.ok for v in verdicts)
    if failed:
        print(f"RESULT: {failed} of {len(verdicts)} targets MISSED")
    elif verdicts:
        print(f"RESULT: all {len(verdicts)} targets met")
    for what, reason in skipped.items():
        print(f"NOTE: {what} was not measured ({reason}).")
    return verdicts


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--only", choices=CHOICES, action="append",
                        help="measure only these (repeatable); floors come with them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = set(args.only or CHOICES)
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="silo-bench-files-"))
    configs: list[Config] = []
    skipped: dict[str, str] = {}
    setup = [f"Python {platform.python_version()}", f"Flask {version('flask')}",
             f"SQLAlchemy {version('sqlalchemy')}"]
    pg: PgServerLike | None = None
    s3: Any = None
    count = iter(range(1_000))

    def sqlite_url() -> str:
        return f"sqlite:///{tmp / f'bench{next(count)}.db'}"

    try:
        src = sources(tmp)
        copy = copy_floor(tmp / "copy")
        if wanted & {"local", "file"}:
            configs += [copy, hashed_copy(tmp / "hashed", copy.label)]
        if "local" in wanted:
            bare = bare_local(tmp / "bare", copy.label)
            configs += [bare, silo_config("local", "disk", sqlite_url(), tmp / "local", "local",
                                          floor=bare.label, context=copy.label)]
        if "file" in wanted:
            import fsspec

            shared = tmp / "shared"
            shared.mkdir()
            bare = bare_fsspec(fsspec.filesystem("file"), str(tmp / "bare-file"), "disk",
                               copy.label)
            configs += [bare, silo_config("file:// (fsspec)", "disk", sqlite_url(),
                                          tmp / "file-cache", f"file://{shared}",
                                          floor=bare.label, context=copy.label)]
        if "sqlite" in wanted:
            raw = chunk_floor("sqlite", sqlite_url())
            bare = bare_chunks("sqlite", sqlite_url(), raw.label)
            configs += [raw, bare, silo_config("database (SQLite)", "sqlite", sqlite_url(),
                                               tmp / "db-sqlite", "database",
                                               floor=bare.label, context=raw.label)]
            setup.append(f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=NORMAL)")
        if "postgresql" in wanted:
            try:
                pg = start_postgresql()
            except Exception as exc:
                skipped["PostgreSQL"] = f"no PostgreSQL server: {exc}"
            if pg is not None:
                raw = chunk_floor("postgresql", pg.create_database())
                bare = bare_chunks("postgresql", pg.create_database(), raw.label)
                configs += [raw, bare,
                            silo_config("database (PostgreSQL)", "postgresql",
                                        pg.create_database(), tmp / "db-pg", "database",
                                        floor=bare.label, context=raw.label)]
                setup.append(f"PostgreSQL via psycopg {version('psycopg')} "
                             "(fsync=on, synchronous_commit=on)")
        if "s3" in wanted:
            try:
                import s3fs

                s3 = tests_module("s3server").S3Server()
            except Exception as exc:
                skipped["S3"] = f"moto or s3fs unavailable: {exc}"
            if s3 is not None:
                options = s3.storage_options()
                fs = s3fs.S3FileSystem(**options)
                raw = s3_floor(fs, s3.create_bucket())
                bare = bare_fsspec(fs, f"{s3.create_bucket()}/bare", "s3", raw.label)
                configs += [raw, bare,
                            silo_config("S3 (fsspec, s3fs)", "s3", sqlite_url(),
                                        tmp / "s3-cache", f"s3://{s3.create_bucket()}/up",
                                        floor=bare.label, context=raw.label,
                                        storage_options=options)]
                setup.append(f"moto {version('moto')}, s3fs {version('s3fs')}")
        print(f"measuring {len(configs)} configurations, {args.rounds} rounds ...", flush=True)
        run(configs, src, args.rounds)
        report(configs, skipped, args.rounds, setup, load_before)
    finally:
        for config in configs:
            config.close()
        if pg is not None:
            pg.destroy()
        if s3 is not None:
            s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
