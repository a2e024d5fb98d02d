"""Strict SIDs (``SILO_STRICT_SIDS``): only SIDs the server signed are accepted.

Through the real request path on SQLite and PostgreSQL: issued SIDs verify
and keep working; any SID a client chose (valid-looking, or forged with another
key) is replaced by a fresh signed one and never becomes a session row (no
session fixation); a tampered signature is rejected; SIDs signed with a key in
``SECRET_KEY_FALLBACKS`` survive a key rotation; strict mode without a secret
key fails at start-up; non-strict mode still accepts client SIDs.

``SILO_HYPOTHESIS_EXAMPLES`` sets the examples per property and database.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask, Response, jsonify
from flask.testing import FlaskClient
from harness import Harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import make_url, text
from werkzeug.test import TestResponse

from flask_silo_sql import Silo, SQLStorage, schema, session_key
from flask_silo_sql.sids import is_signed_sid, new_signed_sid

HEADER = "X-Session-ID"
PARAM = "_sid"
NEW_KEY = "the current secret key"
OLD_KEY = "the key before the rotation"
OTHER_KEY = "somebody else's key"
SIGNED_SID = re.compile(r"[A-Za-z0-9_-]{61}")
SID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
EXAMPLES = int(os.environ.get("SILO_HYPOTHESIS_EXAMPLES", "100"))

HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def build_app(
    url: str, *, strict: bool, secret: str | bytes | None, fallbacks: list[Any] | None = None
) -> Harness:
    config: dict[str, Any] = {"SECRET_KEY": secret, "SILO_STRICT_SIDS": strict}
    if fallbacks is not None:
        config["SECRET_KEY_FALLBACKS"] = fallbacks
    h = Harness(url, import_name="strict" if strict else "lenient", config=config, clock=False)
    silo = h.silo
    silo.register("counter", lambda: {"n": 0})

    @h.app.post("/api/count")
    def count() -> Response:
        state = silo.state("counter")
        state["n"] += 1
        return jsonify(sid=silo.sid, n=state["n"])

    return h


@dataclass
class Deployment:
    """One database and the apps that share it (all strict unless named so)."""

    dialect: str
    url: str
    engine_storage: SQLStorage
    current: FlaskClient
    """Signs with NEW_KEY, also accepts OLD_KEY (``SECRET_KEY_FALLBACKS``)."""
    before_rotation: FlaskClient
    """Signs with OLD_KEY only."""
    without_fallback: FlaskClient
    """Signs with NEW_KEY, no fallbacks."""
    lenient: FlaskClient
    """``SILO_STRICT_SIDS = False``."""

    def rows(self, sid: str) -> tuple[int, int]:
        """(session rows, namespace rows) stored under *sid*."""
        key = {"sid": session_key(sid)}  # sessions are stored under their key
        with self.engine_storage.engine.connect() as conn:
            sessions = conn.execute(
                text("SELECT count(*) FROM silo_sessions WHERE sid = :sid"), key
            ).scalar_one()
            namespaces = conn.execute(
                text("SELECT count(*) FROM silo_namespaces WHERE sid = :sid"), key
            ).scalar_one()
        return int(sessions), int(namespaces)


@pytest.fixture(scope="module")
def deployment(module_silo_url: str) -> Iterator[Deployment]:
    url = module_silo_url
    built = [
        build_app(url, strict=True, secret=NEW_KEY, fallbacks=[OLD_KEY]),
        build_app(url, strict=True, secret=OLD_KEY),
        build_app(url, strict=True, secret=NEW_KEY.encode()),  # bytes work too
        build_app(url, strict=False, secret=NEW_KEY),
    ]
    current, before_rotation, without_fallback, lenient = (h.client for h in built)
    dialect = make_url(url).get_backend_name()
    storage = built[0].storage
    yield Deployment(dialect, url, storage, current, before_rotation, without_fallback, lenient)
    for h in built:
        h.close()


def count(client: FlaskClient, sid: str | None = None, *, via: str = "header") -> TestResponse:
    if sid is None:
        return client.post("/api/count")
    if via == "header":
        return client.post("/api/count", environ_overrides={"HTTP_X_SESSION_ID": sid})
    if via == "param":
        return client.post("/api/count", query_string=f"{PARAM}={quote(sid, safe='')}")
    return client.post(  # both: the same SID in the header and in the query
        "/api/count",
        query_string=f"{PARAM}={quote(sid, safe='')}",
        environ_overrides={"HTTP_X_SESSION_ID": sid},
    )


def issued(client: FlaskClient, times: int = 1) -> str:
    """A SID the app issues, used *times* times (its counter is then *times*)."""
    response = count(client)
    sid = response.headers[HEADER]
    for n in range(2, times + 1):
        assert count(client, sid).get_json()["n"] == n
    return sid


def assert_fresh_signed(response: TestResponse, rejected: str, key: str = NEW_KEY) -> str:
    """The app refused *rejected*: a fresh SID signed with *key*, with fresh state."""
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    echoed = response.headers[HEADER]
    assert echoed != rejected
    assert SIGNED_SID.fullmatch(echoed)
    assert is_signed_sid(echoed, [key.encode()])
    body = response.get_json()
    assert body == {"sid": echoed, "n": 1}
    return echoed


# -- issued SIDs ------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["header", "param", "both"])
def test_issued_sids_verify_and_keep_their_session(deployment: Deployment, via: str) -> None:
    first = count(deployment.current)
    sid = first.headers[HEADER]
    assert first.get_json() == {"sid": sid, "n": 1}
    assert SIGNED_SID.fullmatch(sid)
    assert is_signed_sid(sid, [NEW_KEY.encode()])
    assert not is_signed_sid(sid, [OLD_KEY.encode()])  # new SIDs are signed with the first key
    assert not is_signed_sid(sid, [OTHER_KEY.encode()])
    for n in (2, 3):
        again = count(deployment.current, sid, via=via)
        assert again.headers[HEADER] == sid
        assert again.get_json() == {"sid": sid, "n": n}
    assert deployment.rows(sid) == (1, 1)


def test_every_issued_sid_is_new(deployment: Deployment) -> None:
    sids = {count(deployment.current).headers[HEADER] for _ in range(50)}
    assert len(sids) == 50
    assert all(is_signed_sid(sid, [NEW_KEY.encode()]) for sid in sids)


# -- client-chosen SIDs: no session fixation ----------------------------------------------


chosen_sids = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{16,128}", fullmatch=True),  # what lenient mode accepts
    st.from_regex(r"[A-Za-z0-9_-]{61}", fullmatch=True),  # the length of a signed SID
    st.builds(lambda key: new_signed_sid(key.encode()), st.sampled_from([OTHER_KEY, ""])),
    st.builds(  # a token of the attacker's choosing with a signature from another SID
        lambda token, key: token + new_signed_sid(key.encode())[32:],
        st.from_regex(r"[A-Za-z0-9_-]{32}", fullmatch=True),
        st.sampled_from([NEW_KEY, OLD_KEY, OTHER_KEY]),
    ),
    st.sampled_from(
        [
            "attacker-chosen-session-id",
            "'; DROP TABLE silo_sessions;--",
            "../../etc/passwd",
            "A" * 61,
            "0" * 128,
        ]
    ),
)


@HYPOTHESIS
@given(chosen=chosen_sids, via=st.sampled_from(["header", "param", "both"]))
def test_client_chosen_sid_is_replaced_and_never_stored(
    deployment: Deployment, chosen: str, via: str
) -> None:
    response = count(deployment.current, chosen, via=via)
    echoed = assert_fresh_signed(response, chosen)
    # No session fixation: the attacker's SID never became a session.
    assert deployment.rows(chosen) == (0, 0)
    assert deployment.rows(echoed) == (1, 1)
    # Presenting it again changes nothing.
    again = count(deployment.current, chosen, via=via)
    assert_fresh_signed(again, chosen)
    assert deployment.rows(chosen) == (0, 0)


def test_a_sid_planted_in_lenient_mode_is_refused_in_strict_mode(deployment: Deployment) -> None:
    """Even a SID whose row exists (made while strict mode was off) is not accepted."""
    planted = "planted-by-an-attacker-0001"
    response = count(deployment.lenient, planted)
    assert response.headers[HEADER] == planted
    assert count(deployment.lenient, planted).get_json()["n"] == 2
    strict = count(deployment.current, planted)
    assert_fresh_signed(strict, planted)
    assert count(deployment.lenient, planted).get_json()["n"] == 3  # its state was not touched


# -- tampering -----------------------------------------------------------------------------


@HYPOTHESIS
@given(position=st.integers(0, 53), replacement=st.sampled_from(SID_ALPHABET))
def test_tampered_sid_is_rejected(deployment: Deployment, position: int, replacement: str) -> None:
    sid = issued(deployment.current, times=2)
    if sid[position] == replacement:
        replacement = "A" if replacement != "A" else "B"
    tampered = sid[:position] + replacement + sid[position + 1 :]
    response = count(deployment.current, tampered)
    assert_fresh_signed(response, tampered)
    assert deployment.rows(tampered) == (0, 0)
    # The genuine SID still has its own state, untouched by the attempt.
    assert count(deployment.current, sid).get_json() == {"sid": sid, "n": 3}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda sid: sid[:-1], id="truncated"),
        pytest.param(lambda sid: sid + "A", id="extended"),
        pytest.param(lambda sid: sid[:32], id="token-only"),
        pytest.param(lambda sid: sid[32:] + sid[:32], id="swapped-halves"),
        pytest.param(lambda sid: sid.swapcase(), id="swapped-case"),
        pytest.param(lambda sid: sid[:32] + "=" * 22, id="padding-signature"),
        pytest.param(lambda sid: sid + "\x00", id="nul-suffix"),
        pytest.param(lambda sid: sid + "\r\nX-Injected: 1", id="crlf-suffix"),
    ],
)
def test_mangled_sid_is_rejected(deployment: Deployment, change: Any) -> None:
    sid = issued(deployment.current)
    mangled = change(sid)
    response = count(deployment.current, mangled)
    if mangled.strip() == sid:  # (none of these, but header whitespace is not part of a SID)
        pytest.fail("test case does not change the SID")
    assert_fresh_signed(response, mangled)
    assert "X-Injected" not in response.headers
    assert deployment.rows(mangled) == (0, 0)


def test_sid_signed_with_another_key_is_rejected(deployment: Deployment) -> None:
    foreign = new_signed_sid(OTHER_KEY.encode())
    assert_fresh_signed(count(deployment.current, foreign), foreign)
    assert deployment.rows(foreign) == (0, 0)


# -- key rotation ----------------------------------------------------------------------------


def test_sid_signed_with_a_fallback_key_survives_rotation(deployment: Deployment) -> None:
    old_sid = issued(deployment.before_rotation, times=3)
    assert is_signed_sid(old_sid, [OLD_KEY.encode()])
    # After the rotation (SECRET_KEY=new, SECRET_KEY_FALLBACKS=[old]) it still works ...
    for via, n in (("header", 4), ("param", 5)):
        response = count(deployment.current, old_sid, via=via)
        assert response.headers[HEADER] == old_sid
        assert response.get_json() == {"sid": old_sid, "n": n}
    # ... while new SIDs are signed with the new key, which the old deployment does not know.
    new_sid = issued(deployment.current)
    assert not is_signed_sid(new_sid, [OLD_KEY.encode()])
    assert_fresh_signed(count(deployment.before_rotation, new_sid), new_sid, key=OLD_KEY)
    # Without the fallback, the old SID is refused.
    refused = count(deployment.without_fallback, old_sid)
    assert_fresh_signed(refused, old_sid)
    assert count(deployment.current, old_sid).get_json()["n"] == 6  # its session is intact


def test_bytes_and_str_keys_sign_alike(deployment: Deployment) -> None:
    """``app.secret_key`` may be bytes: SIDs verify the same way."""
    sid = issued(deployment.without_fallback)  # secret_key given as bytes
    assert is_signed_sid(sid, [NEW_KEY.encode()])
    assert count(deployment.current, sid).headers[HEADER] == sid


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "fallbacks"),
    [(None, None), ("", None), (None, [OLD_KEY]), (b"", [OLD_KEY])],
)
def test_strict_mode_without_a_secret_key_fails_at_start_up(
    tmp_path: Path, secret: str | bytes | None, fallbacks: list[Any] | None
) -> None:
    url = f"sqlite:///{tmp_path / 'silo.db'}"
    storage = SQLStorage(url)
    schema.upgrade(storage.engine)
    storage.dispose()
    with pytest.raises(RuntimeError, match=r"SILO_STRICT_SIDS.*secret_key"):
        build_app(url, strict=True, secret=secret, fallbacks=fallbacks)


def test_strict_mode_is_off_by_default(tmp_path: Path) -> None:
    app = Flask("default")
    storage = SQLStorage(f"sqlite:///{tmp_path / 'silo.db'}")
    schema.upgrade(storage.engine)
    try:
        Silo(app, storage=storage, auto_cleanup=False)  # no secret key needed
        assert app.config["SILO_STRICT_SIDS"] is False
    finally:
        storage.dispose()


@HYPOTHESIS
@given(chosen=st.from_regex(r"[A-Za-z0-9_-]{16,128}", fullmatch=True))
def test_lenient_mode_accepts_client_sids(deployment: Deployment, chosen: str) -> None:
    response = count(deployment.lenient, chosen)
    assert response.status_code == 200
    assert response.headers[HEADER] == chosen
    n = response.get_json()["n"]
    assert n >= 1
    assert deployment.rows(chosen) == (1, 1)
    assert count(deployment.lenient, chosen, via="param").get_json()["n"] == n + 1


def test_lenient_mode_accepts_signed_sids_too(deployment: Deployment) -> None:
    sid = issued(deployment.current)
    response = count(deployment.lenient, sid)
    assert response.headers[HEADER] == sid
    assert response.get_json()["n"] == 2
