"""Set-up mistakes that used to do nothing, or fail without saying why, now say what to do.

``silo.state()`` in a route outside ``api_prefix``; a namespace registered twice,
or once the app serves; ``@silo.idempotent`` (or ``@silo.locked``) written above
the route decorator; a PostgreSQL URL without the ``postgres`` extra installed.
Through real apps on SQLite and PostgreSQL (the missing driver: a real process).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flask import Blueprint, Flask
from harness import AppFactory, close_silo

from flask_silo_sql import (
    NamespaceError,
    NamespaceTaken,
    OutsideApiPrefix,
    RegisteredTooLate,
    Silo,
    SQLStorage,
    ViewDecoratorOrder,
)

ALICE = "alice-setup-mistakes-0001"


# -- silo.state() outside api_prefix ------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/api/", "/v2/"])
def test_state_outside_the_prefix_names_the_path_and_the_prefix(
    silo_app: AppFactory, prefix: str
) -> None:
    h = silo_app(api_prefix=prefix)
    h.silo.register("profile", lambda: {"name": ""})

    @h.app.get("/me")
    def me() -> dict[str, Any]:
        return h.silo.state("profile")

    @h.app.get("/v1/items")
    def items() -> dict[str, str]:
        return {"sid": h.silo.sid}

    for path in ("/me", "/v1/items"):
        response = h.get(path, ALICE)
        assert response.status_code == 500
        body = response.get_json()
        assert body is not None, response.get_data(as_text=True)[:200]
        assert body["error"] == "outside_api_prefix"
        assert (body["path"], body["api_prefix"]) == (path, prefix)
        message = body["message"]
        assert repr(path) in message
        assert f"api_prefix {prefix!r}" in message
        assert "Move the route under" in message
        assert "Silo(api_prefix=...)" in message
    assert h.storage.session_count() == 0  # and nothing was stored


def test_the_error_is_a_runtime_error_for_code_that_catches_one(silo_app: AppFactory) -> None:
    h = silo_app()
    with h.app.test_request_context("/me"), pytest.raises(RuntimeError) as raised:
        h.silo.state()
    assert isinstance(raised.value, OutsideApiPrefix)
    assert "'/me' is not under api_prefix '/api/'" in str(raised.value)
    with h.app.app_context(), pytest.raises(RuntimeError, match=r"silo\.session\(sid\)"):
        h.silo.state()  # outside any request: the way for threads and scripts, as before


# -- register() --------------------------------------------------------------------------


def cart_app(silo_app: AppFactory) -> Any:
    h = silo_app()

    @h.app.get("/api/cart")
    def cart() -> dict[str, Any]:
        return h.silo.state("cart")

    return h


def test_a_name_registered_twice_is_refused_and_the_first_kept(silo_app: AppFactory) -> None:
    h = cart_app(silo_app)
    h.silo.register("cart", lambda: {"items": []})
    taken = r"Namespace 'cart' is already registered.*replace=True"
    with pytest.raises(NamespaceTaken, match=taken):
        h.silo.register("cart", lambda: {"items": ["surprise"]})
    assert issubclass(NamespaceTaken, NamespaceError)
    assert h.json("GET", "/api/cart", ALICE) == {"items": []}


def test_replace_true_replaces_the_factory(silo_app: AppFactory) -> None:
    h = cart_app(silo_app)
    h.silo.register("cart", lambda: {"items": []})
    h.silo.register("cart", lambda: {"items": [], "currency": "EUR"}, replace=True)
    assert h.json("GET", "/api/cart", ALICE) == {"items": [], "currency": "EUR"}


def test_registering_once_the_app_serves_is_refused(silo_app: AppFactory) -> None:
    h = cart_app(silo_app)
    h.silo.register("cart", lambda: {"items": []})
    h.json("GET", "/api/cart", ALICE)
    for name, replace in (("wishlist", False), ("cart", True)):
        with pytest.raises(RegisteredTooLate, match=rf"'{name}' is registered after the app"):
            h.silo.register(name, dict, replace=replace)
    assert h.json("GET", "/api/cart", ALICE) == {"items": []}


# -- a silo view decorator above the route decorator ------------------------------------------


def test_idempotent_above_the_route_is_refused_at_once(silo_app: AppFactory) -> None:
    h = silo_app()
    with pytest.raises(ViewDecoratorOrder) as raised:

        @h.silo.idempotent()
        @h.app.post("/api/pay")
        def pay() -> dict[str, bool]:
            return {"paid": True}

    message = str(raised.value)
    assert "@silo.idempotent is above the route decorator of view 'pay'" in message
    assert '    @app.post("/api/...")\n    @silo.idempotent()\n    def pay(): ...' in message

    with pytest.raises(ViewDecoratorOrder, match=r"@silo\.idempotent is above"):

        @h.silo.idempotent
        @h.app.post("/api/refund")
        def refund() -> dict[str, bool]:
            return {"refunded": True}

    with pytest.raises(ViewDecoratorOrder, match=r"@silo\.locked is above"):

        @h.silo.locked
        @h.app.route("/api/count", methods=["POST"])
        def count() -> dict[str, bool]:
            return {"counted": True}


def test_idempotent_below_the_route_runs(silo_app: AppFactory) -> None:
    h = silo_app()
    runs: list[int] = []

    @h.app.post("/api/pay")
    @h.silo.idempotent()
    @h.silo.locked
    def pay() -> dict[str, int]:
        runs.append(1)
        return {"run": len(runs)}

    headers = {"Idempotency-Key": "pay-1"}
    h.json("GET", "/api/nothing", ALICE, status=404)  # the session exists
    assert h.json("POST", "/api/pay", ALICE, headers=headers) == {"run": 1}
    assert h.json("POST", "/api/pay", ALICE, headers=headers) == {"run": 1}  # replayed
    assert runs == [1]


def test_idempotent_above_a_blueprint_route_fails_the_first_request(
    silo_app: AppFactory,
) -> None:
    h = silo_app()
    shop = Blueprint("shop", __name__)

    @h.silo.idempotent()  # the blueprint is not registered yet: nothing to see here
    @shop.post("/api/shop/pay")
    def pay() -> dict[str, bool]:
        return {"paid": True}

    @shop.post("/api/shop/ok")
    @h.silo.idempotent()
    def ok() -> dict[str, bool]:
        return {"ok": True}

    h.app.register_blueprint(shop)
    for path in ("/api/shop/ok", "/api/shop/pay", "/healthz"):  # every request, until fixed
        response = h.post(path, ALICE, headers={"Idempotency-Key": "k"})
        assert response.status_code == 500
        assert response.get_json()["error"] == "view_decorator_order"
        assert "view 'pay'" in response.get_json()["message"]


def test_idempotent_above_the_route_before_init_app_fails_init_app(silo_url: str) -> None:
    app = Flask(__name__)
    silo = Silo(auto_cleanup=False, storage=SQLStorage(silo_url))

    @silo.idempotent(ttl=60)
    @app.post("/api/pay")
    def pay() -> dict[str, bool]:
        return {"paid": True}

    try:
        with pytest.raises(ViewDecoratorOrder, match="view 'pay'"):
            silo.init_app(app)
    finally:
        close_silo(silo)


def test_one_function_registered_both_plain_and_idempotent_is_allowed(
    silo_app: AppFactory,
) -> None:
    h = silo_app()

    def quote() -> dict[str, int]:
        return {"price": 3}

    once = h.silo.idempotent()(quote)  # wrapped before the plain one is registered
    h.app.add_url_rule("/api/quote", view_func=quote)
    h.app.add_url_rule("/api/quote/once", endpoint="quote_once", view_func=once)
    assert h.json("GET", "/api/quote", ALICE) == {"price": 3}
    assert h.json("GET", "/api/quote/once", ALICE) == {"price": 3}


# -- a PostgreSQL URL without the postgres extra -------------------------------------------------

NO_PSYCOPG = """
import sys
sys.modules["psycopg"] = None  # as in an installation without the `postgres` extra
from flask import Flask
from flask_silo_sql import Silo
app = Flask(__name__, instance_path={instance!r})
app.config["SILO_DATABASE_URI"] = "postgresql://app@127.0.0.1:1/app"
Silo(app)
"""


def test_a_missing_psycopg_names_the_postgres_extra(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_PSYCOPG.format(instance=str(tmp_path / "instance"))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("flask_silo_sql.errors.SiloError: "), done.stderr
    assert 'pip install "flask-silo-sql[postgres]"' in last
    assert "ModuleNotFoundError" not in done.stderr
