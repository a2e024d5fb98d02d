"""Upload a text file, process it in the background with progress, fetch the results.

flask-silo's flagship flow, durable: the session's namespace, the uploaded
file's record and the background task's progress live in SQL, so any worker of
``gunicorn -w 4`` answers any poll. The processing function is registered
(``@silo.task``), so its runs are durable: a run whose process dies (a deploy,
a kill) is run again by a live process, from the start.

Run it:

* embedded SQLite, no configuration (state in ``examples/instance/data_processor/``)::

      flask --app examples/data_processor.py run

  then open http://127.0.0.1:5000/ in a browser;

* with the processing done by a worker process instead of the web process::

      SILO_TASK_RUNNER=worker flask --app examples/data_processor.py run
      SILO_TASK_RUNNER=worker flask --app examples/data_processor.py silo-db worker

  (two terminals; the page shows which process ran the task);

* on PostgreSQL, with several workers::

      export SILO_DATABASE_URI=postgresql://user:password@localhost/mydb
      flask --app examples/data_processor.py silo-db upgrade
      gunicorn -w 4 examples.data_processor:app

* on several machines without a shared filesystem: the same, with the
  uploaded files kept in the database too (``SILO_FILE_BACKEND=database``;
  ``UPLOAD_DIR`` is then each machine's cache), or in an object store
  (``SILO_FILE_BACKEND=s3://bucket/prefix``).

Environment: every ``SILO_*`` configuration key of the library
(``SILO_DATABASE_URI``, ``SILO_TASK_HEARTBEAT_TIMEOUT``, ...; values are read
as JSON when they parse, else as text), plus, for this example only,
``SILO_TTL`` and ``SILO_CLEANUP_INTERVAL`` (seconds, for :class:`Silo`),
``INSTANCE_DIR`` (default ``examples/instance/data_processor``), ``SECRET_KEY``
(signs the stream tokens; default: one kept in ``<instance folder>/secret_key``) and
``UPLOAD_DIR`` (default ``<instance folder>/uploads``: the files, or this
machine's cache of them when ``SILO_FILE_BACKEND`` is not ``local``).

API (every response carries the session ID in ``X-Session-ID``; send it back):

* ``POST /api/upload``: multipart field ``file``; returns its name and size.
* ``POST /api/process?steps=N&delay=S``: start counting lines and words of the
  uploaded file in N steps, sleeping S seconds after each (to watch progress).
* ``GET /api/status``: the task's state, plus the pid of the worker answering
  (``worker``) and of the process that ran the task (``task_worker``).
* ``POST /api/cancel``: cancel the run (``outcome``: ``cancelled``, ``cancelling``,
  ``finished`` or ``idle``), from whichever worker answers.
* ``POST /api/stream-token``: a short-lived token for ``GET /events?token=...``, the
  session's live progress as ``text/event-stream`` (what the page shows; it polls
  ``/api/status`` in a browser without ``EventSource``).
* ``GET /api/results``: the results (``null`` until complete); ``410 Gone``
  with ``{"error": "session_expired"}`` once the session has expired.
* ``GET /api/download``: the uploaded file, from whichever machine answers
  (``ETag``, ``Range``, ``If-None-Match`` as a browser expects); ``410`` once
  the session has expired.
* ``POST /api/reset``: fresh state, uploaded files removed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections import Counter
from typing import Any

from flask import Flask, Response, jsonify, request

from flask_silo_sql import BackgroundTask, Silo
from flask_silo_sql.ext import CONFIG_DEFAULTS

NAMESPACE = "processing"
MAX_STEPS = 1000
MAX_DELAY = 5.0
WORD = re.compile(r"\w+")


def _env_value(text: str) -> Any:
    """A setting from the environment: JSON when it parses, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


HERE = os.path.dirname(os.path.abspath(__file__))

# The same instance folder however the app is started (gunicorn or flask --app), and
# one of its own: the quickstart's counters live in examples/instance/silo.db.
app = Flask(
    __name__,
    instance_path=os.path.abspath(
        os.environ.get("INSTANCE_DIR") or os.path.join(HERE, "instance", "data_processor")
    ),
)
app.config["MAX_CONTENT_LENGTH"] = 32 * 1024 * 1024
for _key in CONFIG_DEFAULTS:
    if _key in os.environ:
        app.config[_key] = _env_value(os.environ[_key])


def _secret_key(folder: str) -> str:
    """The key that signs stream tokens: the same in every process of the app, so one kept
    in the instance folder (made once) unless ``SECRET_KEY`` is set."""
    if os.environ.get("SECRET_KEY"):
        return os.environ["SECRET_KEY"]
    path = os.path.join(folder, "secret_key")
    os.makedirs(folder, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made already (by another process, maybe just now)
        for _ in range(50):
            with open(path) as handle:
                key = handle.read().strip()
            if key:
                return key
            time.sleep(0.02)
        raise RuntimeError(f"{path} is empty: delete it and start again") from None
    key = secrets.token_hex(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key


app.secret_key = _secret_key(app.instance_path)

silo = Silo(
    app,
    ttl=int(os.environ.get("SILO_TTL", "3600")),
    cleanup_interval=int(os.environ.get("SILO_CLEANUP_INTERVAL", "60")),
)
uploads = silo.add_file_store(
    "uploads", os.environ.get("UPLOAD_DIR") or os.path.join(app.instance_path, "uploads")
)

# Each client gets its own copy of this namespace. The task's progress lives in
# the silo_tasks table, so every worker sees it.
silo.register(
    NAMESPACE,
    lambda: {
        "task": BackgroundTask("process"),
        "filename": None,
        "size": None,
        "results": None,
        "worker": None,
    },
)

# Needs existing data: an expired client gets 410 Gone here, not an empty answer.
silo.add_data_endpoints("/api/results", "/api/download")

# Operators: SILO_METRICS=true serves Prometheus metrics here; a readiness probe always.
if app.config.get("SILO_METRICS"):
    app.add_url_rule("/metrics", view_func=silo.metrics_view())
app.add_url_rule("/healthz", view_func=silo.health_view())


def _error(status: int, error: str, message: str) -> tuple[Response, int]:
    return jsonify(error=error, message=message), status


@app.post("/api/upload")
def upload() -> Response | tuple[Response, int]:
    """Store the uploaded file in this session's directory."""
    state = silo.state(NAMESPACE)
    task: BackgroundTask = state["task"]
    if task.is_running:
        return _error(409, "busy", "A file is being processed; wait for it or reset.")
    file = request.files.get("file")
    if file is None or not file.filename:
        return _error(400, "no_file", "Send a file in the multipart field 'file'.")
    try:
        path = uploads.save(silo.sid, file.filename, file.stream, content_type=file.mimetype)
    except ValueError:
        return _error(400, "invalid_filename", "That file name cannot be used.")
    task.reset()
    state["filename"] = os.path.basename(path)
    state["size"] = os.path.getsize(path)
    state["results"] = None
    state["worker"] = None
    return jsonify(filename=state["filename"], size=state["size"])


@silo.task(name="process_file", retries=2)
def process_file(
    task: BackgroundTask, state: dict[str, Any], path: str, steps: int, delay: float
) -> None:
    """The task: count lines, words and characters in *steps* steps.

    Registered, and started with JSON arguments (*state* is the namespace
    holding the task, which the process running it loads), so its runs are
    durable: another process runs it again if this one dies.
    """
    state["worker"] = os.getpid()
    task.update(0, f"Reading {state['filename']}")
    with open(path, "rb") as handle:
        text = handle.read().decode("utf-8", errors="replace")
    lines = text.splitlines()
    words: Counter[str] = Counter()
    per_step = max(1, -(-len(lines) // steps))  # ceiling division
    for step in range(steps):
        for line in lines[step * per_step : (step + 1) * per_step]:
            words.update(w.lower() for w in WORD.findall(line))
        if delay:
            time.sleep(delay)
        task.update(100 * (step + 1) / steps, f"Step {step + 1} of {steps}")
        task.log(f"step {step + 1}/{steps}: {sum(words.values())} words so far")
    # Written on the namespace captured during the request, as in flask-silo:
    # it is saved when the task's state changes (complete() below).
    state["results"] = {
        "filename": state["filename"],
        "bytes": len(text.encode("utf-8")),
        "lines": len(lines),
        "words": sum(words.values()),
        "characters": len(text),
        "top_words": words.most_common(5),
    }
    task.complete(f"Processed {len(lines)} lines")


@app.post("/api/process")
def process() -> Response | tuple[Response, int]:
    """Start processing the uploaded file in the background."""
    state = silo.state(NAMESPACE)
    task: BackgroundTask = state["task"]
    filename = state["filename"]
    path = uploads.get_path(silo.sid, filename) if filename else None
    if path is None:
        return _error(400, "no_upload", "Upload a file first.")
    try:
        steps = min(max(int(request.args.get("steps", "10")), 1), MAX_STEPS)
        delay = min(max(float(request.args.get("delay", "0.2")), 0.0), MAX_DELAY)
    except ValueError:
        return _error(400, "bad_parameters", "steps must be an integer, delay a number.")
    if task.is_running:
        return _error(409, "busy", "A file is already being processed.")
    state["results"] = None
    state["worker"] = None
    try:
        task.start(process_file, state, path, steps, delay)
    except RuntimeError:  # started meanwhile by another request of this client
        return _error(409, "busy", "A file is already being processed.")
    return jsonify(started=True, steps=steps, delay=delay, worker=os.getpid())


@app.get("/api/status")
def status() -> Response:
    """The task's progress, and which workers are involved."""
    state = silo.state(NAMESPACE)
    task: BackgroundTask = state["task"]
    body = task.state.to_dict()
    body.update(
        filename=state["filename"],
        worker=os.getpid(),
        task_worker=state["worker"],
    )
    return jsonify(body)


@app.post("/api/cancel")
def cancel() -> tuple[Response, int]:
    """Cancel the run (it stops at its next progress report); a finished one is left as is."""
    return silo.cancel_response(silo.state(NAMESPACE)["task"])


@app.post("/api/stream-token")
def stream_token() -> Response:
    """A token for ``/events`` (an ``EventSource`` cannot send the session header)."""
    return jsonify(silo.stream_token())


@app.get("/events")
def events() -> Response:
    """The session's task events as they commit, replayed after a reconnect."""
    return silo.stream()


@app.get("/api/results")
def results() -> Response:
    """The results of the last completed run (null before)."""
    state = silo.state(NAMESPACE)
    return jsonify(results=state["results"], filename=state["filename"])


@app.get("/api/download")
def download() -> Response | tuple[Response, int]:
    """The uploaded file, streamed from wherever it is kept."""
    filename = silo.state(NAMESPACE)["filename"]
    if not filename:
        return _error(404, "no_upload", "Upload a file first.")
    return silo.send_file(uploads, filename, as_attachment=True)


@app.post("/api/reset")
def reset() -> Response:
    """Start over: fresh state, uploaded files removed (409 while a task runs)."""
    silo.reset_current()
    return jsonify(reset=True)


@app.get("/")
def index() -> Response:
    """The single-page client."""
    return Response(PAGE, mimetype="text/html")


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>flask-silo-sql: data processor</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
  progress { width: 100%; height: 1.2rem; }
  #expired { color: #a00; font-weight: bold; }
  #error { color: #a00; }
  dt { font-weight: bold; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<h1>Data processor</h1>
<p>Upload a text file: it is processed in the background, its progress is shown,
then its line and word counts. Your session is kept on the server.</p>

<p>
  <input type="file" id="file">
  <button id="upload" type="button">Upload and process</button>
  <button id="cancel" type="button" disabled>Cancel</button>
  <button id="show-results" type="button">Show results</button>
  <button id="reset" type="button">Reset</button>
</p>

<p id="expired" hidden>Session expired, please re-upload</p>
<p id="error" hidden></p>

<progress id="progress" max="100" value="0"></progress>
<p id="status">Idle.</p>

<section id="results" hidden>
  <h2>Results</h2>
  <dl>
    <dt>File</dt><dd id="r-filename"></dd>
    <dt>Bytes</dt><dd id="r-bytes"></dd>
    <dt>Lines</dt><dd id="r-lines"></dd>
    <dt>Words</dt><dd id="r-words"></dd>
    <dt>Characters</dt><dd id="r-characters"></dd>
    <dt>Top words</dt><dd id="r-top"></dd>
  </dl>
</section>

<script>
"use strict";
const SID_KEY = "silo-sid";
const $ = (id) => document.getElementById(id);
let pollTimer = null;

async function api(method, path, body) {
  const headers = {};
  const sid = sessionStorage.getItem(SID_KEY);
  if (sid) headers["X-Session-ID"] = sid;
  const response = await fetch(path, { method, headers, body });
  const issued = response.headers.get("X-Session-ID");
  if (issued) sessionStorage.setItem(SID_KEY, issued);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  return { status: response.status, data };
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function showProgress(value, text) {
  $("progress").value = value;
  $("status").textContent = text;
}

function showResults(r) {
  $("r-filename").textContent = r.filename;
  $("r-bytes").textContent = r.bytes;
  $("r-lines").textContent = r.lines;
  $("r-words").textContent = r.words;
  $("r-characters").textContent = r.characters;
  $("r-top").textContent = r.top_words.map((p) => p[0] + " (" + p[1] + ")").join(", ");
  $("results").hidden = false;
}

async function loadResults() {
  const { status, data } = await api("GET", "/api/results");
  if (status === 410) {
    stopLive();
    $("results").hidden = true;
    $("expired").hidden = false;
    showProgress(0, "Idle.");
    return status;
  }
  if (status !== 200) { showError((data && data.message) || "Error " + status); return status; }
  $("expired").hidden = true;
  if (data.results) showResults(data.results);
  else $("results").hidden = true;
  return status;
}

let source = null;  // the EventSource while a run is watched live
let busy = false;   // an upload is on its way: a second click does nothing

function stopLive() {
  if (pollTimer !== null) { clearTimeout(pollTimer); pollTimer = null; }
  if (source !== null) { source.close(); source = null; }
}

// The task's state (from /api/status, or from an event's data) on the page.
function render(data) {
  $("cancel").disabled = !data.running || !!data.cancel_requested;
  const pct = Math.round(data.progress);
  if (data.cancelled) {
    showProgress(data.progress, "Cancelled at " + pct + "%.");
  } else if (data.error) {
    showProgress(data.progress, "Failed: " + data.error);
  } else if (data.complete) {
    showProgress(100, "Complete (100%): " + data.message);
    if ($("results").hidden) loadResults();
  } else if (data.running) {
    const note = data.cancel_requested ? " (cancelling…)" : "";
    showProgress(data.progress, pct + "%: " + data.message + note);
  } else {
    showProgress(0, "Idle.");
  }
}

function fromEvent(kind, d) {
  const running = ["progress", "cancelling", "queued", "retrying"].includes(kind);
  return {
    running, progress: d.progress, message: d.message, error: kind === "failed" ? d.error : null,
    complete: kind === "complete", cancelled: kind === "cancelled",
    cancel_requested: !!d.cancel_requested,
  };
}

// The session's true state, then live updates while its task runs: from the event
// stream, or by polling /api/status where EventSource is missing.
async function sync() {
  stopLive();
  const live = window.EventSource ? await api("POST", "/api/stream-token") : null;
  const { status, data } = await api("GET", "/api/status");
  if (status !== 200) { showError((data && data.message) || "Error " + status); return; }
  render(data);
  if (!data.running) return;
  if (live && live.status === 200) listen(live.data.token, live.data.last_event_id);
  else pollTimer = setTimeout(poll, 300);
}

function listen(token, since) {
  const url = "/events?token=" + encodeURIComponent(token) + "&last_event_id=" + since;
  const es = source = new EventSource(url);
  const onEvent = (e) => {
    const state = fromEvent(e.type, JSON.parse(e.data));
    render(state);
    if (!state.running) stopLive();
  };
  for (const kind of ["progress", "cancelling", "queued", "retrying", "complete", "failed",
                      "cancelled"]) {
    es.addEventListener(kind, onEvent);
  }
  es.addEventListener("resync", () => sync());  // events missed for good: reload the state
  es.addEventListener("reset", () => sync());
  es.onerror = () => {  // the browser reconnects by itself, unless the server refused
    if (es.readyState === EventSource.CLOSED && source === es) {
      stopLive();
      setTimeout(sync, 1000);
    }
  };
}

async function poll() {
  pollTimer = null;
  const { status, data } = await api("GET", "/api/status");
  if (status !== 200) { showError((data && data.message) || "Error " + status); return; }
  render(data);
  if (data.running) pollTimer = setTimeout(poll, 300);
}

$("upload").addEventListener("click", async () => {
  if (busy) return;
  const file = $("file").files[0];
  if (!file) { showError("Choose a file first."); return; }
  busy = true;
  $("upload").disabled = true;
  showError("");
  stopLive();
  $("expired").hidden = true;
  $("results").hidden = true;
  showProgress(0, "Uploading…");
  try {
    const form = new FormData();
    form.append("file", file);
    let reply = await api("POST", "/api/upload", form);
    if (reply.status === 200) reply = await api("POST", "/api/process?steps=20&delay=0.1");
    if (reply.status !== 200) showError(reply.data && reply.data.message);
  } finally {
    busy = false;
    $("upload").disabled = false;
  }
  await sync();  // whatever happened, show the session's true state
});

$("cancel").addEventListener("click", async () => {
  $("cancel").disabled = true;
  const { status, data } = await api("POST", "/api/cancel");
  if (status !== 200 && status !== 202) {
    showError((data && data.message) || "Error " + status);
  } else if (data.outcome === "finished" || data.outcome === "idle") {
    showError(data.message);
  }
  if (source === null) await sync();  // live updates tell the rest
});

$("show-results").addEventListener("click", () => { showError(""); loadResults(); });

$("reset").addEventListener("click", async () => {
  stopLive();
  const { status, data } = await api("POST", "/api/reset");
  if (status !== 200) { showError((data && data.message) || "Error " + status); return; }
  showError("");
  $("results").hidden = true;
  $("expired").hidden = true;
  showProgress(0, "Idle.");
});

// A returning visitor (same tab): show what the server still has, or the 410 message.
if (sessionStorage.getItem(SID_KEY)) {
  loadResults().then((status) => { if (status === 200) sync(); });
}
</script>
</body>
</html>
"""
