"""Race pairs of file operations of one session against a real gunicorn.

The concurrency test app (``tests/apps/concurrency_app.py``) under ``gunicorn -w 2
--threads 4``: one client runs ROUNDS of the pair's first operation while another
runs its second until they are done. Prints each side's outcomes.

usage: python -m benchmarks.file_races ROUNDS sqlite,postgresql local,database,s3 [PAIRS]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(os.environ.get("SILO_REPO") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
from liveserver import gunicorn  # noqa: E402
from pgserver import PgServer  # noqa: E402

from flask_silo_sql import schema  # noqa: E402
from flask_silo_sql.sql.engine import make_engine  # noqa: E402

HEADER = "X-Session-ID"
SIZE = 1_200_000


def _slug(r: requests.Response) -> str:
    try:
        return str(r.json().get("error"))
    except ValueError:
        return "-"


class Client:
    def __init__(self, base: str, sid: str) -> None:
        self.base, self.sid = base, sid
        self.http = requests.Session()

    def put(self, name: str, data: bytes, counted: bool) -> str:
        try:
            r = self.http.put(
                f"{self.base}/api/upload/{name}?count={int(counted)}",
                headers={HEADER: self.sid},
                data=data,
                timeout=60,
            )
        except requests.RequestException as exc:
            return f"no answer {type(exc).__name__}"
        return "ok" if r.status_code == 201 else f"{r.status_code} {_slug(r)}"

    def get(self, name: str, versions: set[str]) -> str:
        try:
            url = f"{self.base}/api/files/{name}"
            r = self.http.get(url, headers={HEADER: self.sid}, timeout=60)
            body = r.content
        except requests.RequestException as exc:
            return f"no answer {type(exc).__name__}"
        if r.status_code != 200:
            return f"{r.status_code}" if r.status_code == 404 else f"{r.status_code} {_slug(r)}"
        digest = hashlib.sha256(body).hexdigest()
        if r.headers.get("ETag", "").strip('"') != digest:
            return "etag of other bytes"
        return "ok" if digest in versions else "bytes of no version"

    def post(self, what: str) -> str:
        try:
            r = self.http.post(f"{self.base}/api/{what}", headers={HEADER: self.sid}, timeout=60)
        except requests.RequestException as exc:
            return f"no answer {type(exc).__name__}"
        if r.status_code == 200 and what == "rotate":
            self.sid = r.json()["sid"]
        return "ok" if r.status_code == 200 else f"{r.status_code} {_slug(r)}"


def run_pair(base: str, pair: str, rounds: int, index: int) -> tuple[Counter[str], Counter[str]]:
    sid = f"race-{pair.replace('/', '-')}-{index}-{os.urandom(6).hex()}"
    name = "f.bin"
    a, b = Client(base, sid), Client(base, sid)
    first = os.urandom(SIZE)
    versions = {hashlib.sha256(first).hexdigest()}
    a.put(name, first, True)
    left: Counter[str] = Counter()
    right: Counter[str] = Counter()
    done = threading.Event()

    def loop(fn: Callable[[], str], counter: Counter[str]) -> None:  # until the first is done
        while not done.is_set():
            counter[fn()] += 1

    def versioned() -> bytes:
        data = os.urandom(SIZE)
        versions.add(hashlib.sha256(data).hexdigest())
        return data

    if pair == "replace/download":
        first_op: Callable[[], str] = lambda: a.put(name, versioned(), True)  # noqa: E731
        second_op: Callable[[], str] = lambda: b.get(name, versions)  # noqa: E731
    elif pair == "replace/replace":
        first_op = lambda: a.put(name, versioned(), False)  # noqa: E731
        second_op = lambda: b.put(name, versioned(), False)  # noqa: E731
    elif pair == "upload/reset":
        first_op = lambda: a.put(name, versioned(), False)  # noqa: E731
        second_op = lambda: b.post("reset")  # noqa: E731
    elif pair == "upload/rotate":

        def first_op() -> str:
            a.sid = b.sid  # the client follows its rotations
            return a.put(name, versioned(), False)

        second_op = lambda: b.post("rotate")  # noqa: E731
    elif pair == "download/reset":

        def first_op() -> str:
            got = a.get(name, versions)
            if got == "404":
                a.put(name, versioned(), False)
            return got

        second_op = lambda: b.post("reset")  # noqa: E731
    else:
        raise ValueError(pair)
    other = threading.Thread(target=loop, args=(second_op, right))
    other.start()
    try:
        for _ in range(rounds):
            left[first_op()] += 1
    finally:
        done.set()
        other.join()
    return left, right


def main() -> None:
    rounds = int(sys.argv[1])
    dbs = sys.argv[2].split(",")
    backends = sys.argv[3].split(",")
    pairs = (
        sys.argv[4].split(",")
        if len(sys.argv) > 4
        else [
            "replace/download",
            "replace/replace",
            "upload/reset",
            "upload/rotate",
            "download/reset",
        ]
    )
    pg: Any = PgServer() if "postgresql" in dbs else None
    s3: Any = None
    if "s3" in backends:
        from s3server import S3Server

        s3 = S3Server().__enter__()
    try:
        for db in dbs:
            for backend in backends:
                tmp = Path(tempfile.mkdtemp(prefix="race-"))
                url = f"sqlite:///{tmp / 'silo.db'}" if db == "sqlite" else pg.create_database()
                engine = make_engine(url)
                schema.upgrade(engine)
                engine.dispose()
                env = {"SILO_DATABASE_URI": url, "SILO_TEST_UPLOAD_DIR": str(tmp / "up")}
                if backend == "s3":
                    env.update(s3.env())
                    env["SILO_FILE_BACKEND"] = f"s3://{s3.create_bucket()}/uploads"
                    env["SILO_FILE_STORAGE_OPTIONS"] = json.dumps(s3.storage_options())
                else:
                    env["SILO_FILE_BACKEND"] = backend
                with gunicorn(env, tmp, workers=2, threads=4) as server:
                    base = server.url("")
                    for i, pair in enumerate(pairs):
                        left, right = run_pair(base.rstrip("/"), pair, rounds, i)
                        print(
                            f"{db:10} {backend:8} {pair:17} "
                            f"first {sum(left.values()):4} bad {_bad(pair, left):3} {dict(left)} | "
                            f"second {sum(right.values()):4} bad {_bad(pair, right):3} "
                            f"{dict(right)}",
                            flush=True,
                        )
                    log = server.log_text().splitlines()
                    errors = [line for line in log if "Error" in line or "error" in line]
                    if errors:
                        common = Counter(e[:120] for e in errors).most_common(4)
                        print("   log:", common, flush=True)
    finally:
        if s3 is not None:
            s3.__exit__(None, None, None)
        if pg is not None:
            pg.destroy()


# What a client may rightly get: the session it used may be reset or rotated away.
GOOD = {
    "replace/download": {"ok"},
    "replace/replace": {"ok"},
    "upload/reset": {"ok", "409 upload_interrupted", "410 session_expired"},
    "upload/rotate": {"ok", "410 session_expired", "409 upload_interrupted"},
    "download/reset": {"ok", "404", "410 session_expired"},
}


def _bad(pair: str, outcomes: Counter[str]) -> int:
    return sum(count for what, count in outcomes.items() if what not in GOOD[pair])


if __name__ == "__main__":
    main()
