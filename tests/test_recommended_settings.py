"""The recommended settings of docs/security.md work pasted into the quickstart.

The block is read from ``examples/recommended_settings.py`` (the docs include
the same lines) and pasted into ``examples/basic_app.py`` right after
``app = Flask(__name__)``, as a new user would; the app then serves its
clients with SIDs it issued, refuses SIDs a client made up, and stores an
encrypted namespace sealed.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from flask import Flask
from sqlalchemy import Text, cast, create_engine, select

from flask_silo_sql import Silo
from flask_silo_sql.sealing import SEALED
from flask_silo_sql.sids import is_signed_sid
from flask_silo_sql.sql.models import namespaces

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BEGIN = "# -- recommended settings: begin\n"
END = "# -- recommended settings: end\n"
HEADER = "X-Session-ID"


def recommended_block() -> str:
    text = (EXAMPLES / "recommended_settings.py").read_text()
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def quickstart_with_block(where: Path) -> Path:
    source = (EXAMPLES / "basic_app.py").read_text()
    anchor = "app = Flask(__name__)\n"
    assert source.count(anchor) == 1
    path = where / "quickstart_recommended.py"
    path.write_text(source.replace(anchor, anchor + recommended_block()))
    return path


def test_the_block_sets_what_the_docs_recommend() -> None:
    block = recommended_block()
    for key in ("SILO_STRICT_SIDS", "SILO_SID_MAX_AGE", "SILO_SESSION_MAX_AGE"):
        assert key in block
    assert "from_prefixed_env" in block  # FLASK_SECRET_KEY
    assert "recommended-settings" not in block
    docs = (EXAMPLES.parent / "docs" / "security.md").read_text()
    assert "../examples/recommended_settings.py" in docs


def test_the_recommended_settings_work_in_the_quickstart(
    silo_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("FLASK_SECRET_KEY", "a secret key of this deployment")
    monkeypatch.setenv("SILO_DATABASE_URI", silo_url)
    monkeypatch.setenv("SILO_ENCRYPTION_KEYS", key)
    module: dict[str, Any] = runpy.run_path(str(quickstart_with_block(tmp_path)))
    app: Flask = module["app"]
    silo = module["silo"]
    assert isinstance(silo, Silo)
    silo.register("profile", lambda: {"email": None}, encrypted=True)

    @app.post("/api/profile")
    def profile() -> dict[str, Any]:
        silo.state("profile")["email"] = "someone@example.org"
        return {}

    try:
        client = app.test_client()
        first = client.post("/api/count")
        sid = first.headers[HEADER]
        assert first.get_json() == {"count": 1, "sid": sid}
        assert is_signed_sid(sid, [b"a secret key of this deployment"])  # strict SIDs
        again = client.post("/api/count", headers={HEADER: sid})
        assert again.get_json() == {"count": 2, "sid": sid}
        made_up = client.post("/api/count", headers={HEADER: "client-a-0123456789"})
        assert made_up.headers[HEADER] != "client-a-0123456789"  # refused: a new SID
        assert made_up.get_json()["count"] == 1
        assert app.config["SILO_SESSION_MAX_AGE"] == 24 * 3600
        assert client.post("/api/profile", headers={HEADER: sid}).status_code == 200
        engine = create_engine(silo_url)
        try:
            with engine.connect() as conn:
                query = select(cast(namespaces.c.data, Text)).where(namespaces.c.name == "profile")
                [stored] = conn.execute(query).scalars().all()
        finally:
            engine.dispose()
        token = json.loads(stored)[SEALED]
        assert "someone@example.org" not in stored
        assert json.loads(Fernet(key).decrypt(token.encode())) == {"email": "someone@example.org"}
    finally:
        silo.stop()
        silo.store.storage.dispose()  # type: ignore[attr-defined]
