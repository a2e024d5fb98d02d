"""An app whose silo uses the host's own Flask-SQLAlchemy engine (run with --preload).

``SILO_DATABASE_URI`` names the database; the app has no ``post_fork`` hook:
silo must leave nothing in the host's pool in the master for the workers to
inherit. The cleanup thread sweeps every second.
"""

from __future__ import annotations

import os

from flask import Flask, Response, jsonify
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import text

from flask_silo_sql import Silo, SQLStorage

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["SILO_DATABASE_URI"]
db = SQLAlchemy(app)
silo = Silo(app, storage=SQLStorage(db), cleanup_interval=1, ttl=3600)
silo.register("counter", lambda: {"value": 0})


@app.get("/health")
def health() -> str:
    return "ok"


@app.post("/api/inc")
def inc() -> Response:
    state = silo.state("counter")
    state["value"] += 1
    return jsonify(value=state["value"], worker=os.getpid())


@app.get("/api/host")
def host() -> Response:
    """The host's own use of its engine, in a worker."""
    value = db.session.execute(text("SELECT 1")).scalar()
    return jsonify(value=value)
