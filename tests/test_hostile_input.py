"""Hostile input through the real request path, property-based (hypothesis).

One app per database (SQLite and PostgreSQL), built once per test module, with
``Silo(app, storage=SQLStorage(url), auto_cleanup=False)`` on a migrated schema.
Every example is a real request through the Flask test client:

- SIDs of any length (0 to 100 kB) and content (any Unicode, NUL, CR/LF, SQL and
  path metacharacters, near-misses of another client's SID), in the header and
  in ``_sid``: the SID is accepted as sent only when it is a valid SID, otherwise
  the client gets a fresh one; never a 500, never a header injection, never
  another client's data, and the tables survive.
- File names of the same kinds: a ``400`` JSON error, or a file strictly inside
  ``base_dir/<sid>/`` and nothing else written anywhere.
- State values: NaN/Infinity, deep nesting, sizes past ``SILO_MAX_STATE_BYTES``
  are refused with a JSON error and the stored state is kept; any other JSON
  value round-trips through a write request and a read request.

``SILO_HYPOTHESIS_EXAMPLES`` sets the examples per property and database.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from flask import Flask, Response, jsonify, request
from harness import Harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect, make_url, text
from werkzeug.test import TestResponse

from flask_silo_sql import Silo, session_key
from flask_silo_sql.codec import MAX_NESTING
from flask_silo_sql.files import FileStore
from flask_silo_sql.files.limits import TEMP_PREFIX
from flask_silo_sql.keys import KEY_PATTERN
from flask_silo_sql.sql.models import SILO_TABLES
from flask_silo_sql.tasks import TASK_MARKER

HEADER = "X-Session-ID"
PARAM = "_sid"
VALID_SID = re.compile(r"[A-Za-z0-9_-]{16,128}")
"""What a client may present (checked independently of the library's own pattern)."""
FRESH_SID = re.compile(r"[A-Za-z0-9_-]{43}")
"""What the server issues: 256 random bits, URL-safe base64."""
MAX_STATE_BYTES = 4096
VICTIM_SECRET = "victim's secret: 4111-1111-1111-1111"
EXAMPLES = int(os.environ.get("SILO_HYPOTHESIS_EXAMPLES", "100"))

HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# -- the app ------------------------------------------------------------------------


class HostileApp(Harness):
    """One app on one database, plus what the properties check against."""

    def __init__(self, url: str, *, tree: Path, base_dir: Path) -> None:
        self.dialect = make_url(url).get_backend_name()
        super().__init__(
            url,
            import_name=f"hostile-{self.dialect}",
            config={"SILO_MAX_STATE_BYTES": MAX_STATE_BYTES},
            clock=False,
        )
        self.uploads = build_app(self.app, self.silo, base_dir)
        self.tree = tree
        """Everything the app may write to (and much it must not) lives under here."""
        self.base_dir = base_dir
        self.victim_sid = ""
        """The session seeded with ``VICTIM_SECRET`` (by the fixture)."""
        self.fresh_sids: set[str] = set()


def build_app(app: Flask, silo: Silo, base_dir: Path) -> FileStore:
    silo.register("vault", lambda: {"secret": None})
    silo.register("data", lambda: {"value": None})
    uploads = silo.add_file_store("uploads", str(base_dir))

    @app.get("/api/whoami")
    def whoami() -> Response:
        try:
            seen_param = request.args.get(PARAM)
        except UnicodeDecodeError:  # werkzeug: raw non-UTF-8 bytes in the query string
            seen_param = None
        return jsonify(
            sid=silo.sid,
            secret=silo.state("vault")["secret"],
            seen_header=request.headers.get(HEADER),
            seen_param=seen_param,
        )

    @app.post("/api/vault")
    def keep_secret() -> Response:
        silo.state("vault")["secret"] = request.get_json()
        return jsonify(ok=True)

    @app.post("/api/value")
    def write_value() -> Response:
        silo.state("data")["value"] = request.get_json()
        return jsonify(ok=True)

    @app.post("/api/nest")
    def write_nested() -> Response:
        silo.state("data")["value"] = nested(
            int(request.args["depth"]), request.args["kind"], request.args["leaf"]
        )
        return jsonify(ok=True)

    @app.get("/api/value")
    def read_value() -> Response:
        return jsonify(value=silo.state("data")["value"])

    @app.post("/api/upload")
    def upload() -> Response | tuple[Response, int]:
        # As in the README: no error handling here, the extension answers errors.
        file = request.files.get("file")
        if file is None:
            return jsonify(error="no_file"), 400
        path = uploads.save(silo.sid, file.filename or "", file.stream, content_type=file.mimetype)
        return jsonify(path=path, files=uploads.list_files(silo.sid))

    @app.put("/api/upload-raw")
    def upload_raw() -> Response:
        path = uploads.save(silo.sid, request.args.get("name", ""), request.stream)
        return jsonify(path=path, files=uploads.list_files(silo.sid))

    return uploads


def nested(depth: int, kind: str, leaf: str) -> Any:
    """*depth* levels of lists ("list"), objects ("dict") or both ("mixed"), built iteratively."""
    value: Any = leaf
    for level in range(depth):
        as_list = kind == "list" or (kind == "mixed" and level % 2 == 0)
        value = [value] if as_list else {"k": value}
    return value


@pytest.fixture(scope="module")
def hostile(
    module_silo_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostileApp]:
    root = tmp_path_factory.mktemp(f"hostile-{make_url(module_silo_url).get_backend_name()}")
    # The tree holds the upload directory, deep enough that "../../x" from a
    # session's directory still lands inside it, and decoys next to it.
    tree = root / "tree"
    base_dir = tree / "srv" / "app" / "uploads"
    base_dir.mkdir(parents=True)
    for decoy in ("etc/passwd", "srv/app/config.py", "srv/passwd", "passwd"):
        (tree / decoy).parent.mkdir(parents=True, exist_ok=True)
        (tree / decoy).write_text("do not touch\n")
    (tree / "cwd").mkdir()
    with HostileApp(module_silo_url, tree=tree, base_dir=base_dir) as h:
        client = h.client
        seeded = client.post("/api/vault", json=VICTIM_SECRET)
        assert seeded.status_code == 200
        victim = seeded.headers[HEADER]
        assert client.get("/api/whoami", headers={HEADER: victim}).get_json()["secret"] == (
            VICTIM_SECRET
        )
        h.victim_sid = victim
        yield h


def assert_tables_and_victim_intact(h: HostileApp) -> None:
    """The schema survived, and the victim's state is exactly as it was seeded."""
    names = set(inspect(h.storage.engine).get_table_names())
    assert set(SILO_TABLES) <= names
    body = h.client.get("/api/whoami", headers={HEADER: h.victim_sid}).get_json()
    assert body["sid"] == h.victim_sid
    assert body["secret"] == VICTIM_SECRET


def assert_json_error(response: TestResponse, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.is_json, response.get_data(as_text=True)[:500]
    body: dict[str, Any] = response.get_json()
    assert body["error"] == error
    assert isinstance(body["message"], str)
    assert "Traceback" not in body["message"]
    return body


# -- hostile text ---------------------------------------------------------------------

HOSTILE_PIECES = [
    "'; DROP TABLE silo_sessions;--",
    "' OR '1'='1",
    '"; DELETE FROM silo_namespaces; --',
    "\\'; TRUNCATE silo_files; --",
    "../../etc",
    "../../../../../../etc/passwd",
    "..\\..\\windows\\system32",
    "/etc/passwd",
    "%00",
    "%2e%2e%2f",
    "%0d%0aSet-Cookie: pwned=1",
    "\x00",
    "\r\n",
    "\r\nX-Injected: yes",
    "\r\n\r\n<html>",
    "\n",
    "\r",
    " ",
    "\t",
    "\x0b\x0c",
    "\u2028",
    "\u0085",
    "\ufeff",
    "\u202e",
    "\u0130",
    "\uff53",
    "\U0001f4a5",
    "*",
    "?",
    "#",
    "&",
    "=",
    "+",
    ";",
    ",",
    "%",
    "\\",
    "/",
    ".",
    "..",
    ":",
    "$(id)",
    "`id`",
    "{{7*7}}",
    "<script>alert(1)</script>",
    "${jndi:ldap://x}",
    ".silo-upload-",
    "con",
    "NUL",
    "a" * 300,
]

pieces = st.one_of(
    st.sampled_from(HOSTILE_PIECES),
    st.text(max_size=20),
    st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True),
)
composed = st.lists(pieces, max_size=8).map("".join)
"""Concatenations of metacharacters, random Unicode and SID-like runs."""


def _repeat(unit: str, length: int) -> str:
    return (unit * (length // len(unit) + 1))[:length]


long_text = st.builds(
    _repeat,
    st.one_of(st.sampled_from(HOSTILE_PIECES[:-1]), st.text(min_size=1, max_size=8)),
    st.integers(0, 100_000),
)
"""Up to 100 kB of a repeated unit."""

valid_sids = st.from_regex(r"[A-Za-z0-9_-]{16,128}", fullmatch=True)
near_misses = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{0,15}", fullmatch=True),  # too short
    st.from_regex(r"[A-Za-z0-9_-]{129,400}", fullmatch=True),  # too long
    st.builds(
        lambda sid, at, piece: sid[:at] + piece + sid[at:],
        valid_sids,
        st.integers(0, 128),
        st.sampled_from(HOSTILE_PIECES[:-1]),
    ),
)


@dataclass(frozen=True)
class VictimVariant:
    """Something made from the victim's SID (which a strategy cannot know in advance)."""

    how: str
    piece: str

    def apply(self, sid: str) -> str:
        if self.how == "prefix":
            return self.piece + sid
        if self.how == "suffix":
            return sid + self.piece
        if self.how == "swapcase":
            return sid.swapcase()
        if self.how == "truncated":
            return sid[: max(0, len(sid) - 1 - len(self.piece) % 8)]
        if self.how == "inside":
            middle = len(sid) // 2
            return sid[:middle] + self.piece + sid[middle:]
        if self.how == "quoted":
            return f"'{sid}'"
        return sid  # "exact": the victim's own SID, which is the victim


victim_variants = st.builds(
    VictimVariant,
    st.sampled_from(["prefix", "suffix", "swapcase", "truncated", "inside", "quoted", "exact"]),
    st.sampled_from(HOSTILE_PIECES[:-1]),
)

SidInput = str | VictimVariant
sid_inputs: st.SearchStrategy[SidInput] = st.one_of(
    st.just(""),
    composed,
    long_text,
    valid_sids,
    near_misses,
    victim_variants,
)


def realise(value: SidInput, victim: str) -> str:
    return value.apply(victim) if isinstance(value, VictimVariant) else value


# -- SIDs -----------------------------------------------------------------------------


def expected_sid(seen_header: str | None, seen_param: str | None) -> str | None:
    """The SID the server must accept given what it received; None: a fresh one."""
    for candidate in (seen_header, seen_param):
        stripped = (candidate or "").strip()
        if VALID_SID.fullmatch(stripped):
            return stripped
    return None


def check_sid_outcome(h: HostileApp, response: TestResponse) -> None:
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    assert response.is_json
    body = response.get_json()
    echoed_all = response.headers.getlist(HEADER)
    assert len(echoed_all) == 1
    echoed = echoed_all[0]
    # No header injection: the echoed value is a clean SID, nothing was added.
    assert not set(echoed) & {"\r", "\n", "\x00"}
    assert VALID_SID.fullmatch(echoed)
    assert "X-Injected" not in response.headers
    assert "Set-Cookie" not in response.headers
    assert body["sid"] == echoed
    expected = expected_sid(body["seen_header"], body["seen_param"])
    if expected is not None:
        assert echoed == expected  # a valid SID is taken as sent
    else:
        assert FRESH_SID.fullmatch(echoed), echoed  # a server-issued one
        assert echoed != h.victim_sid
        assert echoed not in h.fresh_sids
        h.fresh_sids.add(echoed)
    # Never another client's data.
    if echoed == h.victim_sid:
        assert body["secret"] == VICTIM_SECRET
    else:
        assert body["secret"] is None
    with h.storage.engine.connect() as conn:
        victim_rows = conn.execute(
            text("SELECT count(*) FROM silo_sessions WHERE sid = :sid"),
            {"sid": session_key(h.victim_sid)},
        ).scalar_one()
    assert victim_rows == 1


def as_wsgi_header(value: str, transport: str) -> str:
    """How a header value reaches the app: as is, or as a WSGI server decodes raw UTF-8."""
    if transport == "wsgi":
        return value.encode("utf-8", "surrogatepass").decode("latin-1")
    return value


@HYPOTHESIS
@given(value=sid_inputs, transport=st.sampled_from(["raw", "wsgi"]))
def test_hostile_sid_in_header(hostile: HostileApp, value: SidInput, transport: str) -> None:
    sid = realise(value, hostile.victim_sid)
    header = as_wsgi_header(sid, transport)
    # environ_overrides: the test client itself refuses CR/LF in header values.
    response = hostile.client.get("/api/whoami", environ_overrides={"HTTP_X_SESSION_ID": header})
    body = response.get_json(silent=True) or {}
    assert body.get("seen_header") == header
    check_sid_outcome(hostile, response)


@HYPOTHESIS
@given(value=sid_inputs)
def test_hostile_sid_in_query_param(hostile: HostileApp, value: SidInput) -> None:
    sid = realise(value, hostile.victim_sid)
    query = f"{PARAM}=" + quote(sid.encode("utf-8", "surrogatepass"), safe="")
    response = hostile.client.get("/api/whoami", query_string=query)
    body = response.get_json(silent=True) or {}
    assert body.get("seen_param") == sid
    check_sid_outcome(hostile, response)


@HYPOTHESIS
@given(raw=st.binary(max_size=300), unquoted=st.booleans())
def test_hostile_bytes_in_query_param(hostile: HostileApp, raw: bytes, unquoted: bool) -> None:
    """Invalid UTF-8, raw separators and bare ``%`` in the query string itself."""
    query = (
        PARAM.encode() + b"=" + raw
        if unquoted
        else f"{PARAM}=".encode() + quote(raw, safe="").encode()
    )
    response = hostile.client.get(
        "/api/whoami", environ_overrides={"QUERY_STRING": query.decode("latin-1")}
    )
    check_sid_outcome(hostile, response)


@HYPOTHESIS
@given(header=sid_inputs, param=sid_inputs, transport=st.sampled_from(["raw", "wsgi"]))
def test_hostile_sid_in_header_and_query_param(
    hostile: HostileApp, header: SidInput, param: SidInput, transport: str
) -> None:
    header_value = as_wsgi_header(realise(header, hostile.victim_sid), transport)
    param_value = realise(param, hostile.victim_sid)
    response = hostile.client.get(
        "/api/whoami",
        query_string=f"{PARAM}=" + quote(param_value.encode("utf-8", "surrogatepass"), safe=""),
        environ_overrides={"HTTP_X_SESSION_ID": header_value},
    )
    check_sid_outcome(hostile, response)


@pytest.mark.parametrize(
    "value",
    [
        "'; DROP TABLE silo_sessions;--",
        "x'; DROP TABLE silo_namespaces; SELECT '",
        "../../etc",
        "../../../../../../../../etc/passwd",
        "%00",
        "abcdefghijklmnop\x00qrstuvwxyz",
        "abcdefghijklmnopqrstuvwxyz\r\nX-Injected: yes",
        "abcdefghijklmnopqrstuvwxyz\r\n\r\n<html>",
        "abcdefghijklm\u2028nopqrstuvwxyz",
        "a" * 100_000,
        "",
    ],
)
def test_known_hostile_sids_get_a_fresh_session(hostile: HostileApp, value: str) -> None:
    for environ in (
        {"HTTP_X_SESSION_ID": value},
        {"QUERY_STRING": urlencode({PARAM: value})},
    ):
        response = hostile.client.get("/api/whoami", environ_overrides=environ)
        check_sid_outcome(hostile, response)
        assert FRESH_SID.fullmatch(response.headers[HEADER])
    assert_tables_and_victim_intact(hostile)


def test_sid_properties_leave_tables_and_victim_intact(hostile: HostileApp) -> None:
    """Runs after the properties above (file order): nothing was dropped or overwritten."""
    assert_tables_and_victim_intact(hostile)
    with hostile.storage.engine.connect() as conn:
        sids = [row[0] for row in conn.execute(text("SELECT sid FROM silo_sessions"))]
    assert sids
    assert all(KEY_PATTERN.fullmatch(sid) for sid in sids)  # keys, never a SID


# -- file names -------------------------------------------------------------------------

Snapshot = dict[str, tuple[bool, int, int]]


def snapshot(root: Path) -> Snapshot:
    """Every directory and file under *root*: (is_dir, size, mtime_ns); a directory's own
    size and time change with its entries, so only its existence is recorded."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.join(dirpath, name)] = (True, 0, 0)
        for name in filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            found[path] = (False, info.st_size, info.st_mtime_ns)
    return found


def changes(before: Snapshot, after: Snapshot) -> set[str]:
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


SAFE_STORED_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")

filenames = st.one_of(
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "...",
            "/",
            "//",
            "../../etc/passwd",
            "../../../passwd",
            "..\\..\\passwd",
            "/etc/passwd",
            "a/../../../srv/app/config.py",
            "%2e%2e%2fpasswd",
            "%00",
            "report.pdf\x00.exe",
            "\x00",
            "a\r\nb.txt",
            "'; DROP TABLE silo_files;--",
            ".silo-upload-abc",
            "..silo-upload-abc",
            "_silo-upload-x",
            ".hidden",
            "con",
            "NUL.txt",
            "\u202etxt.exe",
            "\u00e9" * 300,
            "a" * 255,
            "a" * 256,
            "b" * 100_000,
        ]
    ),
    composed,
    long_text,
)


def check_upload(h: HostileApp, response: TestResponse, content: bytes, before: Snapshot) -> None:
    after = snapshot(h.tree)
    changed = changes(before, after)
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    sid = response.headers[HEADER]
    session_dir = h.base_dir / session_key(sid)
    if response.status_code != 200:
        assert response.status_code == 400, response.get_data(as_text=True)[:500]
        if response.is_json:
            assert response.get_json()["error"] in ("invalid_filename", "no_file")
        # Nothing written; at most the session's (empty) directory appeared.
        assert changed <= {str(session_dir)}
        if session_dir.exists():
            assert not any(session_dir.iterdir())
        return
    body = response.get_json()
    stored = Path(body["path"])
    assert stored.is_absolute()
    assert stored.resolve().parent == session_dir.resolve()  # strictly inside base_dir/<key>/
    assert stored.parent == session_dir
    assert not stored.is_symlink()
    assert SAFE_STORED_NAME.fullmatch(stored.name)
    assert stored.name not in (".", "..")
    assert not stored.name.startswith(".")
    assert stored.read_bytes() == content
    assert body["files"] == [stored.name]
    assert not [n for n in os.listdir(session_dir) if n.startswith(TEMP_PREFIX)]
    # Nothing else changed anywhere in the tree.
    assert changed <= {str(stored), str(session_dir)}
    assert str(stored) in changed


@HYPOTHESIS
@given(filename=filenames, content=st.binary(max_size=64))
def test_hostile_filename_multipart(hostile: HostileApp, filename: str, content: bytes) -> None:
    """The name in a part header, CR and LF escaped as browsers do (WHATWG: ``%0D``, ``%0A``).

    Werkzeug's test client writes the name raw: a blank line in it would end the
    part's headers early and send other content than *content*.
    """
    before = snapshot(hostile.tree)
    cwd = os.getcwd()
    os.chdir(hostile.tree / "cwd")  # a relative write would land here
    sent = filename.replace("\r", "%0D").replace("\n", "%0A")
    try:
        response = hostile.client.post(
            "/api/upload",
            data={"file": (io.BytesIO(content), sent)},
            content_type="multipart/form-data",
        )
    finally:
        os.chdir(cwd)
    check_upload(hostile, response, content, before)


@HYPOTHESIS
@given(filename=filenames, content=st.binary(max_size=64))
def test_hostile_filename_raw(hostile: HostileApp, filename: str, content: bytes) -> None:
    """The name in the query string: every string reaches ``FileStore.save`` unchanged."""
    before = snapshot(hostile.tree)
    cwd = os.getcwd()
    os.chdir(hostile.tree / "cwd")
    try:
        response = hostile.client.put(
            "/api/upload-raw",
            query_string="name=" + quote(filename, safe=""),
            data=content,
        )
    finally:
        os.chdir(cwd)
    check_upload(hostile, response, content, before)


@pytest.mark.parametrize(
    ("filename", "stored"),
    [
        ("../../etc/passwd", "etc_passwd"),
        ("/etc/passwd", "etc_passwd"),
        ("a/../../../srv/app/config.py", "a_.._.._.._srv_app_config.py"),
        ("report.pdf\x00.exe", "report.pdf.exe"),
        ("'; DROP TABLE silo_files;--", "DROP_TABLE_silo_files--"),
        ("a" * 255, "a" * 255),
    ],
)
def test_path_and_sql_metacharacters_stay_in_the_session_dir(
    hostile: HostileApp, filename: str, stored: str
) -> None:
    before = snapshot(hostile.tree)
    response = hostile.client.put(
        "/api/upload-raw", query_string="name=" + quote(filename, safe=""), data=b"x"
    )
    check_upload(hostile, response, b"x", before)
    assert Path(response.get_json()["path"]).name == stored
    assert (hostile.tree / "etc" / "passwd").read_text() == "do not touch\n"
    assert_tables_and_victim_intact(hostile)


@pytest.mark.parametrize(
    "filename", ["", ".", "..", "...", "/", "\x00", "%", "../..", "a" * 256, "b" * 100_000]
)
def test_filename_with_nothing_safe_left_is_a_json_400(hostile: HostileApp, filename: str) -> None:
    before = snapshot(hostile.tree)
    response = hostile.client.put(
        "/api/upload-raw", query_string="name=" + quote(filename, safe=""), data=b"x"
    )
    assert_json_error(response, 400, "invalid_filename")
    check_upload(hostile, response, b"x", before)


# -- state values ---------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6), st.dictionaries(st.text(), children, max_size=6)
    ),
    max_leaves=25,
)
"""JSON values as Python's json module reads them (no NaN or Infinity)."""

awkward_text = st.one_of(
    st.text(),
    st.text(  # lone surrogates
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from(
        ["\x00", "a\x00b", "\\u0000", "\\\x00", "\ud800", "\udfff", "\ud83d\ude00", TASK_MARKER]
    ),
)
awkward_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(json_scalars, awkward_text),
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.text(), awkward_text), children, max_size=6),
    ),
    max_leaves=25,
)
"""JSON values that include what some databases cannot hold (NUL, lone surrogates)."""


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings_in(item)


def has_task_marker_key(value: Any) -> bool:
    if isinstance(value, list):
        return any(has_task_marker_key(item) for item in value)
    if isinstance(value, dict):
        return TASK_MARKER in value or any(has_task_marker_key(v) for v in value.values())
    return False


def storable(value: Any) -> bool:
    """Whether the library must store *value*: no NUL, no lone surrogate, no task key."""
    for string in strings_in(value):
        if "\x00" in string or any(0xD800 <= ord(c) <= 0xDFFF for c in string):
            return False
    return not has_task_marker_key(value)


def json_equal(a: Any, b: Any, *, strict_types: bool) -> bool:
    """JSON equality. Numbers compare by the decimal they are written as.

    With *strict_types* a float must come back as a float (it does on both databases:
    state is ``json`` on PostgreSQL, which keeps the text; ``jsonb`` gave 1e+16 back as
    the integer 10000000000000000).
    """
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if strict_types and type(a) is not type(b):
            return False
        return Decimal(repr(a)) == Decimal(repr(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(
            json_equal(x, y, strict_types=strict_types) for x, y in zip(a, b, strict=True)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(
            json_equal(a[k], b[k], strict_types=strict_types) for k in a
        )
    return type(a) is type(b) and bool(a == b)


def write(h: HostileApp, sid: str | None, body: str) -> TestResponse:
    headers = {HEADER: sid} if sid else {}
    return h.client.post("/api/value", data=body, content_type="application/json", headers=headers)


def read(h: HostileApp, sid: str) -> Any:
    response = h.client.get("/api/value", headers={HEADER: sid})
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    assert response.headers[HEADER] == sid
    return response.get_json()["value"]


def seeded_session(h: HostileApp, value: Any) -> str:
    response = write(h, None, json.dumps(value))
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    sid = response.headers[HEADER]
    assert json_equal(read(h, sid), value, strict_types=False)
    return sid


PREVIOUS = {"kept": [1, 2.5, "three", None, True], "n": 42}


def poisoned(base: Any, bad: float, where: int) -> Any:
    return [
        bad,
        [base, bad],
        {"base": base, "bad": bad},
        {"deep": [[{"x": bad}]], "base": base},
    ][where]


@HYPOTHESIS
@given(
    base=json_values,
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    where=st.integers(0, 3),
)
def test_nan_and_infinity_are_refused_and_state_is_kept(
    hostile: HostileApp, base: Any, bad: float, where: int
) -> None:
    sid = seeded_session(hostile, PREVIOUS)
    body = json.dumps(poisoned(base, bad, where))  # "NaN", "Infinity": Flask parses them
    response = write(hostile, sid, body)
    error = assert_json_error(response, 422, "state_not_serializable")
    assert error["namespace"] == "data"
    assert error["key"] == "value"
    assert response.headers[HEADER] == sid
    assert read(hostile, sid) == PREVIOUS  # nothing of the request was stored


@HYPOTHESIS
@given(
    depth=st.one_of(
        st.integers(0, MAX_NESTING + 10),
        st.integers(MAX_NESTING - 10, 1_200),
        st.integers(0, 20_000),
    ),
    kind=st.sampled_from(["list", "dict", "mixed"]),
    leaf=st.sampled_from(["leaf", "[{]}", '"\\"[[[']),
)
def test_deep_nesting_is_stored_readably_or_refused(
    hostile: HostileApp, depth: int, kind: str, leaf: str
) -> None:
    """Never a 500, never state that is written but cannot be read back."""
    sid = seeded_session(hostile, PREVIOUS)
    response = hostile.client.post(
        "/api/nest",
        query_string={"depth": depth, "kind": kind, "leaf": leaf},
        headers={HEADER: sid},
    )
    if response.status_code == 200:
        assert depth < MAX_NESTING  # the namespace's own object is one more level
        assert read(hostile, sid) == nested(depth, kind, leaf)
    else:
        error = assert_json_error(response, 422, "state_not_serializable")
        assert error["namespace"] == "data"
        assert depth >= MAX_NESTING
        assert read(hostile, sid) == PREVIOUS
    # The worker still serves this session.
    assert write(hostile, sid, json.dumps(PREVIOUS)).status_code == 200


@pytest.mark.parametrize("kind", ["list", "dict", "mixed"])
def test_ten_thousand_levels_is_a_json_error_not_a_crash(hostile: HostileApp, kind: str) -> None:
    sid = seeded_session(hostile, PREVIOUS)
    response = hostile.client.post(
        "/api/nest",
        query_string={"depth": 10_000, "kind": kind, "leaf": "x"},
        headers={HEADER: sid},
    )
    error = assert_json_error(response, 422, "state_not_serializable")
    assert error["key"] == "value"
    assert read(hostile, sid) == PREVIOUS
    assert_tables_and_victim_intact(hostile)


@pytest.mark.parametrize("depth", [MAX_NESTING - 1, 700])
def test_deeply_nested_client_json_body(hostile: HostileApp, depth: int) -> None:
    """The same through a JSON request body (which Python's parser can still read)."""
    sid = seeded_session(hostile, PREVIOUS)
    value = nested(depth, "mixed", "x")
    response = write(hostile, sid, json.dumps(value))
    if depth < MAX_NESTING:
        assert response.status_code == 200
        assert read(hostile, sid) == value
    else:
        assert_json_error(response, 422, "state_not_serializable")
        assert read(hostile, sid) == PREVIOUS


def encoded_size(value: Any) -> int:
    """Bytes of the namespace {"value": value} as compact UTF-8 JSON."""
    return len(
        json.dumps({"value": value}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    )


sized_values = st.one_of(
    st.builds(_repeat, st.text(min_size=1, max_size=4).filter(storable), st.integers(0, 6_000)),
    st.lists(st.integers(), min_size=0, max_size=1_200),
    st.dictionaries(
        st.text(max_size=30).filter(storable),
        st.text(max_size=200).filter(storable),
        max_size=40,
    ).filter(storable),  # a key alone passes storable() even when it is TASK_MARKER
    json_values.filter(storable),
)


@HYPOTHESIS
@given(value=sized_values)
def test_state_over_max_state_bytes_is_a_413_and_state_is_kept(
    hostile: HostileApp, value: Any
) -> None:
    sid = seeded_session(hostile, PREVIOUS)
    response = write(hostile, sid, json.dumps(value))
    if encoded_size(value) > MAX_STATE_BYTES:
        error = assert_json_error(response, 413, "state_too_large")
        assert error["namespace"] == "data"
        assert read(hostile, sid) == PREVIOUS
    else:
        assert response.status_code == 200, response.get_data(as_text=True)[:500]
        assert json_equal(read(hostile, sid), value, strict_types=True)


@HYPOTHESIS
@given(value=json_values)
def test_json_values_round_trip_through_requests(hostile: HostileApp, value: Any) -> None:
    body = json.dumps(value)
    if encoded_size(value) > MAX_STATE_BYTES:
        return  # covered by the size property
    response = write(hostile, None, body)
    sid = response.headers[HEADER]
    if storable(value):
        assert response.status_code == 200, response.get_data(as_text=True)[:500]
        got = read(hostile, sid)
        assert json_equal(got, value, strict_types=True), (got, value)
    else:
        assert_json_error(response, 422, "state_not_serializable")


@HYPOTHESIS
@given(value=awkward_values)
def test_unstorable_strings_are_refused_on_every_database(hostile: HostileApp, value: Any) -> None:
    """NUL, lone surrogates and the reserved task key: a 422, the same on SQLite and PostgreSQL."""
    sid = seeded_session(hostile, PREVIOUS)
    body = json.dumps(value)  # ensure_ascii: surrogates travel as \ud800 escapes
    sent = json.loads(body)  # what the server reads (an escaped surrogate pair is one character)
    response = write(hostile, sid, body)
    if not storable(sent):
        error = assert_json_error(response, 422, "state_not_serializable")
        assert error["namespace"] == "data"
        assert read(hostile, sid) == PREVIOUS
    elif encoded_size(sent) > MAX_STATE_BYTES:
        assert_json_error(response, 413, "state_too_large")
        assert read(hostile, sid) == PREVIOUS
    else:
        assert response.status_code == 200, response.get_data(as_text=True)[:500]
        assert json_equal(read(hostile, sid), sent, strict_types=True)


def test_reserved_task_key_cannot_be_injected(hostile: HostileApp) -> None:
    """A client's dict that looks like a task reference is refused, not loaded as a task."""
    sid = seeded_session(hostile, PREVIOUS)
    for forged in (
        {TASK_MARKER: "0" * 32, "name": "other session's task"},
        [{"a": {TASK_MARKER: "x"}}],
    ):
        response = write(hostile, sid, json.dumps(forged))
        assert_json_error(response, 422, "state_not_serializable")
        assert read(hostile, sid) == PREVIOUS
    # The marker as ordinary text is fine.
    assert write(hostile, sid, json.dumps({"note": TASK_MARKER})).status_code == 200
    assert read(hostile, sid) == {"note": TASK_MARKER}


def test_everything_survived(hostile: HostileApp) -> None:
    assert_tables_and_victim_intact(hostile)
