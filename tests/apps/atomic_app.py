"""A Flask-SQLAlchemy shop in atomic mode, served by gunicorn in the atomic process tests.

- ``SILO_DATABASE_URI``: the database (silo's schema current; the app makes its own
  ``shop_orders`` table with ``db.create_all()``);
- ``SILO_TEST_BARRIER_DIR``: where a request paused with ``X-Test-Pause: before_commit``
  writes ``<X-Test-Token>.ready`` (its PID) once its view has run, and blocks until
  the test kills its worker.

``POST /api/pay`` (idempotent) adds an order through ``db.session`` (flushed, not
committed), appends its ID to the ``charges`` namespace and answers 201; with
``?delay=`` it stays in flight that long first.
"""

from __future__ import annotations

import os
import time

from flask import Flask, Response, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_silo_sql import Silo, SQLStorage


class Base(DeclarativeBase):
    pass


app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["SILO_DATABASE_URI"]
db = SQLAlchemy(app, model_class=Base)


class Order(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "shop_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(64))


with app.app_context():
    try:
        db.create_all()
    except Exception:  # another worker made it at the same moment
        db.create_all()

silo = Silo(app, storage=SQLStorage(db, atomic=True), auto_cleanup=False)
silo.register("charges", lambda: {"ids": []})
BARRIERS = os.environ.get("SILO_TEST_BARRIER_DIR", "")


@app.get("/health")
def health() -> str:
    return "ok"


@app.post("/api/start")
def start() -> Response:
    """A session with its row (a key needs its session)."""
    return jsonify(charges=silo.state("charges")["ids"])


@app.post("/api/pay")
@silo.idempotent()
def pay() -> tuple[Response, int]:
    order = Order(item=request.get_data(as_text=True)[:64] or "item")
    db.session.add(order)
    db.session.flush()
    silo.state("charges")["ids"].append(order.id)
    delay = float(request.args.get("delay", "0"))
    if delay:
        time.sleep(delay)  # in flight while the duplicates arrive
    if request.headers.get("X-Test-Pause") == "before_commit":
        token = request.headers["X-Test-Token"]
        path = os.path.join(BARRIERS, token + ".ready")
        with open(path + ".tmp", "w") as handle:
            handle.write(str(os.getpid()))
        os.replace(path + ".tmp", path)
        time.sleep(3600)  # the test kills this worker here, before the commit
    return jsonify(order=order.id), 201
