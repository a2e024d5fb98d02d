"""The quickstart: a per-client counter whose state survives restarts.

Run it with ``scripts/example`` (or ``flask --app examples/basic_app.py run``).
With no configuration, sessions live in ``examples/instance/silo.db`` (SQLite),
created and migrated automatically at start-up. Set ``SILO_DATABASE_URI`` to
use another database (then run ``flask --app examples/basic_app.py silo-db
upgrade`` once first).

Every client that sends its own ``X-Session-ID`` header gets its own counter.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

from flask_silo_sql import Silo

app = Flask(__name__)
silo = Silo(app)  # embedded SQLite default: <instance folder>/silo.db

# Each client gets its own copy of this namespace, made by the factory.
silo.register("counter", lambda: {"count": 0})

# A read-only endpoint that needs existing data: a client whose session
# expired gets 410 Gone here instead of a silently empty counter.
silo.add_data_endpoints("/api/count/value")


@app.route("/api/count", methods=["GET", "POST"])
def count() -> Response:
    """Increment this client's counter and return it."""
    state = silo.state("counter")
    state["count"] += 1
    return jsonify(count=state["count"], sid=silo.sid)


@app.get("/api/count/value")
def value() -> Response:
    """This client's counter, unchanged."""
    return jsonify(count=silo.state("counter")["count"], sid=silo.sid)


@app.get("/")
def index() -> Response:
    """How to use this app from a terminal."""
    base = request.host_url.rstrip("/")
    text = f"""flask-silo-sql counter example

Each client has its own counter, kept in SQL and surviving restarts.
A client is identified by the X-Session-ID header (16 to 128 characters
from A-Z a-z 0-9 _ -). Without one, the server issues a new session ID
and returns it in the X-Session-ID response header and in the body.

  # client A increments its counter twice
  curl -X POST -H 'X-Session-ID: client-a-0123456789' {base}/api/count
  curl -X POST -H 'X-Session-ID: client-a-0123456789' {base}/api/count

  # client B has its own counter
  curl -X POST -H 'X-Session-ID: client-b-0123456789' {base}/api/count

  # read without incrementing (410 Gone once the session has expired)
  curl -H 'X-Session-ID: client-a-0123456789' {base}/api/count/value

  # no header: a new session; see the X-Session-ID response header
  curl -i -X POST {base}/api/count
"""
    return Response(text, mimetype="text/plain")
