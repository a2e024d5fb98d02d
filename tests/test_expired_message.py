"""The message of the ``410`` answer to an expired client is the app's (SILO_EXPIRED_MESSAGE)."""

from __future__ import annotations

from harness import AppFactory, Harness

from flask_silo_sql.errors import EXPIRED_MESSAGE

ALICE = "alice-expired-message-0001"


def expired_client(h: Harness) -> dict[str, object]:
    """The JSON body a client gets on a data endpoint once its session expired."""
    h.silo.register("upload", lambda: {"rows": 0})
    h.silo.add_data_endpoints("/api/rows")

    @h.app.get("/api/rows")
    def rows() -> dict[str, int]:
        return {"rows": h.silo.state("upload")["rows"]}

    assert h.json("GET", "/api/rows", ALICE) == {"rows": 0}
    h.expire(ALICE)
    body: dict[str, object] = h.json("GET", "/api/rows", ALICE, status=410)
    return body


def test_the_app_words_the_410(silo_app: AppFactory) -> None:
    words = "Ihre Sitzung ist abgelaufen. Bitte laden Sie die Tabelle erneut hoch."
    h = silo_app(config={"SILO_EXPIRED_MESSAGE": words})
    assert expired_client(h) == {"error": "session_expired", "message": words}


def test_flask_silo_wording_is_the_default(silo_app: AppFactory) -> None:
    h = silo_app()
    assert h.app.config["SILO_EXPIRED_MESSAGE"] == EXPIRED_MESSAGE
    assert expired_client(h) == {
        "error": "session_expired",
        "message": "Your session has expired due to inactivity. Please re-upload your data.",
    }
