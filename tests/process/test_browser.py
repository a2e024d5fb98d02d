"""``examples/data_processor.py``'s page, driven in headless Chromium.

The example is served by a real HTTP server (werkzeug's, in a thread of this
process) on 127.0.0.1, with ``SILO_DATABASE_URI`` on an SQLite file and on a
PostgreSQL database. Debian's ``chromium`` (``/usr/bin/chromium``), driven by
Playwright, does what a person would: choose a file, click "Upload and
process", watch the progress bar reach 100%, read the results. Then the
session expires, deterministically: the store's clock is moved past the TTL
and one cleanup sweep runs, as the cleanup daemon would. "Show results" then
shows "Session expired, please re-upload" (the ``410`` path). A screenshot of
each stage is left in the test's tmp_path.

Without Chromium or the ``playwright`` package the test is skipped with a
message, except under ``CI=true``, where that is a failure. No browser is ever
downloaded: Playwright only drives the system's Chromium.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine, select
from support import UNDER_CI, sql_storage
from werkzeug.serving import make_server

from flask_silo_sql import Silo, schema, session_key
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import expired_sids, sessions

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "data_processor.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TTL = 60
TIMEOUT_MS = 20_000
EXPIRED_TEXT = "Session expired, please re-upload"
WORD = re.compile(r"\w+")
TEXT = "".join(f"the quick brown fox {i}\njumps over the lazy dog\n" for i in range(150))


def _browser_problem() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the 'playwright' package is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (Debian's chromium: scripts/setup --browser installs it)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (never a downloaded browser)."""
    problem = _browser_problem()
    if problem is not None:
        message = f"browser test cannot run: {problem}"
        if UNDER_CI:
            pytest.fail(message + " (CI=true: the browser test is required)")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield chromium
        finally:
            chromium.close()


class Served:
    """The example app module, served on a loopback port."""

    def __init__(self, module: ModuleType, base: str, engine: Engine) -> None:
        self.module = module
        self.base = base
        self.engine = engine

    @property
    def silo(self) -> Silo:
        silo = self.module.silo
        assert isinstance(silo, Silo)
        return silo


@pytest.fixture
def served(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """examples/data_processor.py on *db_url*, behind werkzeug's threaded server."""
    engine = make_engine(db_url)
    schema.upgrade(engine)  # what `flask silo-db upgrade` does for a configured database
    monkeypatch.setenv("SILO_DATABASE_URI", db_url)
    monkeypatch.setenv("UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("SILO_TTL", str(TTL))
    monkeypatch.setenv("SILO_CLEANUP_INTERVAL", "3600")  # the test sweeps, not the daemon
    monkeypatch.setenv("SILO_TASK_FLUSH_INTERVAL", "0.1")

    name = f"data_processor_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)

    server = make_server("127.0.0.1", 0, module.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="example-server", daemon=True)
    thread.start()
    try:
        yield Served(module, f"http://127.0.0.1:{server.server_port}", engine)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        silo = module.silo
        silo.stop()
        sql_storage(silo.store).dispose()
        engine.dispose()


def _progress_until_complete(page: Page, timeout: float = 30.0) -> list[float]:
    """Every distinct value of #progress seen until it reads 100 (bounded)."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while True:
        value = float(page.eval_on_selector("#progress", "el => el.value"))
        if not seen or seen[-1] != value:
            seen.append(value)
        if value >= 100:
            return seen
        assert time.monotonic() < deadline, f"progress stuck at {seen}"
        page.wait_for_timeout(50)


def test_upload_progress_results_then_expired(
    browser: Browser, served: Served, tmp_path: Path
) -> None:
    upload = tmp_path / "fox.txt"
    upload.write_text(TEXT)
    lines = TEXT.splitlines()
    words = Counter(w.lower() for line in lines for w in WORD.findall(line))

    context = browser.new_context(viewport={"width": 900, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(served.base + "/")
        assert page.text_content("#status") == "Idle."
        assert page.is_hidden("#results")
        assert page.is_hidden("#expired")

        # Upload and process; the progress bar moves, then reaches 100%.
        page.set_input_files("#file", str(upload))
        page.click("#upload")
        seen = _progress_until_complete(page)
        assert seen[-1] == 100
        assert any(0 < v < 100 for v in seen), f"no intermediate progress seen: {seen}"
        page.wait_for_selector("#results", state="visible")
        assert page.text_content("#status") == "Complete (100%): Processed 300 lines"
        assert page.text_content("#r-filename") == "fox.txt"
        assert page.text_content("#r-lines") == str(len(lines))
        assert page.text_content("#r-words") == str(sum(words.values()))
        assert page.text_content("#r-bytes") == str(len(TEXT.encode()))
        assert (page.text_content("#r-top") or "").startswith("the (300)")
        assert page.is_hidden("#error")
        page.screenshot(path=str(tmp_path / "data_processor-results.png"), full_page=True)

        # The session the page holds is in the database, with its file.
        sid = page.evaluate("sessionStorage.getItem('silo-sid')")
        assert isinstance(sid, str)
        assert sid
        uploads = served.silo.file_store("uploads")
        assert uploads.list_files(sid) == ["fox.txt"]

        # Time passes beyond the TTL; one cleanup sweep expires the session.
        store = served.silo.store
        database_clock = sql_storage(store).clock
        store.clock = lambda: database_clock() + 10 * TTL
        try:
            expired = store.cleanup()
        finally:
            store.clock = None
        assert session_key(sid) in expired
        with served.engine.connect() as conn:
            key = session_key(sid)
            assert conn.execute(select(sessions.c.sid).where(sessions.c.sid == key)).first() is None
            assert conn.execute(select(expired_sids).where(expired_sids.c.sid == key)).first()
        assert not (tmp_path / "uploads" / session_key(sid)).exists()

        # "Show results" now gets 410 Gone: the page says so and hides the old results.
        page.click("#show-results")
        page.wait_for_selector("#expired", state="visible")
        assert page.text_content("#expired") == EXPIRED_TEXT
        assert page.is_hidden("#results")
        assert page.is_hidden("#error")
        assert float(page.eval_on_selector("#progress", "el => el.value")) == 0
        page.screenshot(path=str(tmp_path / "data_processor-expired.png"), full_page=True)
        assert errors == []
    finally:
        context.close()


def _progress_between(page: Page, timeout: float = 30.0) -> float:
    """Wait until #progress reads strictly between 0 and 100; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = float(page.eval_on_selector("#progress", "el => el.value"))
        if 0 < value < 100:
            return value
        assert time.monotonic() < deadline, f"no progress under way (at {value})"
        page.wait_for_timeout(20)


def test_live_progress_from_the_stream_then_cancel_and_reload(
    browser: Browser, served: Served, tmp_path: Path
) -> None:
    upload = tmp_path / "fox.txt"
    upload.write_text(TEXT * 20)
    context = browser.new_context(viewport={"width": 900, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        paths: list[str] = []
        page.on(
            "request", lambda req: paths.append(req.url.split("?")[0].removeprefix(served.base))
        )
        page.goto(served.base + "/")

        # A double click starts one run, and the page follows it live from the stream.
        page.set_input_files("#file", str(upload))
        page.dblclick("#upload")
        _progress_between(page)
        assert paths.count("/api/upload") == 1
        assert paths.count("/events") >= 1
        page.click("#cancel")
        page.wait_for_function(
            "document.getElementById('status').textContent.startsWith('Cancelled at')"
        )
        assert page.is_hidden("#results")
        assert paths.count("/api/status") <= 3  # the stream, not polling every 300 ms
        page.screenshot(path=str(tmp_path / "data_processor-cancelled.png"), full_page=True)

        # A reload shows the session's true state.
        page.reload()
        page.wait_for_function(
            "document.getElementById('status').textContent.startsWith('Cancelled at')"
        )
        assert page.is_disabled("#cancel")
        assert errors == []
    finally:
        context.close()
