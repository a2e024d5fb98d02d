"""What operators see: spans (OpenTelemetry) and metrics (Prometheus), through real requests.

Spans go to an in-memory exporter of opentelemetry-sdk; metrics are scraped
from the app's own ``/metrics`` view (``silo.metrics_view()``) and parsed with
prometheus-client's parser. SQLite and PostgreSQL; the store's clock is the
test's.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import request
from harness import AppFactory, Harness
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler, SamplingResult
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from flask_silo_sql import BackgroundTask, session_key
from flask_silo_sql.instruments import spans
from flask_silo_sql.sids import tag

ALICE = "alice-instruments-0001"
BOB = "bob-instruments-000002"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Silo's spans, finished, in memory (a private provider, restored after)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    spans.set_tracer_provider(provider)
    try:
        yield memory
    finally:
        spans.set_tracer_provider(None)
        provider.shutdown()


def app_with_metrics(silo_app: AppFactory, tmp_path: Path, **config: Any) -> Harness:
    h = silo_app(config={"SILO_METRICS": True, "SILO_MAX_STATE_BYTES": 2000, **config})
    silo = h.silo
    silo.register("notes", lambda: {"items": []})
    silo.add_data_endpoints("/api/notes")
    uploads = silo.add_file_store("uploads", str(tmp_path / "uploads"))
    h.app.add_url_rule("/metrics", view_func=silo.metrics_view())

    @h.app.post("/api/notes")
    def add() -> dict[str, int]:
        items = silo.state("notes")["items"]
        items.append(request.get_data(as_text=True))
        return {"count": len(items)}

    @h.app.get("/api/notes")
    def notes() -> dict[str, Any]:
        return {"items": silo.state("notes")["items"]}

    @h.app.post("/api/upload")
    def upload() -> dict[str, str]:
        uploads.save(silo.sid, "a.txt", io.BytesIO(request.get_data()))
        return {"saved": "a.txt"}

    @h.app.get("/api/download")
    def download() -> Any:
        return silo.send_file("uploads", "a.txt")

    return h


def scrape(h: Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the app's ``/metrics``: (name, labels) -> value."""
    response = h.client.get("/metrics")
    assert response.status_code == 200
    assert "X-Session-ID" not in response.headers  # outside api_prefix: no session
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def requests_by_outcome(h: Harness) -> dict[str, float]:
    return {
        dict(labels)["outcome"]: value
        for (name, labels), value in scrape(h).items()
        if name == "silo_requests_total"
    }


# -- metrics -------------------------------------------------------------------------------


def test_requests_are_counted_by_outcome(silo_app: AppFactory, tmp_path: Path) -> None:
    h = app_with_metrics(silo_app, tmp_path)
    assert requests_by_outcome(h) == {}
    assert h.post("/api/notes", ALICE, data="one").status_code == 200
    assert h.get("/api/notes", ALICE).status_code == 200
    assert h.post("/api/notes", ALICE, data="x" * 5000).status_code == 413  # state too large
    h.expire(ALICE)
    assert h.get("/api/notes", ALICE).status_code == 410
    assert requests_by_outcome(h) == {"ok": 2.0, "413": 1.0, "410": 1.0}


def test_sessions_and_file_bytes_are_read_at_scrape_time(
    silo_app: AppFactory, tmp_path: Path
) -> None:
    h = app_with_metrics(silo_app, tmp_path)
    h.post("/api/notes", ALICE, data="one")
    h.post("/api/upload", BOB, data=b"z" * 1234)
    samples = scrape(h)
    assert samples["silo_database_up", ()] == 1
    assert samples["silo_sessions_live", ()] == 2
    assert samples["silo_file_stored_bytes", ()] == 1234
    assert samples["silo_task_queue_depth", ()] == 0


def test_sweep_metrics_after_a_sweep(silo_app: AppFactory, tmp_path: Path) -> None:
    h = app_with_metrics(silo_app, tmp_path)
    h.post("/api/notes", ALICE, data="one")
    h.post("/api/notes", BOB, data="two")
    assert scrape(h)["silo_sweeps_total", ()] == 0
    h.clock.now += h.store.ttl + h.store.touch_interval + 1
    assert sorted(h.store.cleanup()) == sorted(map(session_key, [ALICE, BOB]))
    samples = scrape(h)
    assert samples["silo_sweeps_total", ()] == 1
    assert samples["silo_sweep_expired_sessions_total", ()] == 2
    assert samples["silo_sweep_duration_seconds_count", ()] == 1
    assert samples["silo_sweep_last_success_timestamp_seconds", ()] > 0
    assert samples["silo_sessions_live", ()] == 0


def test_queue_depth_and_oldest_age_while_no_worker_runs(
    silo_app: AppFactory, tmp_path: Path
) -> None:
    h = app_with_metrics(silo_app, tmp_path, SILO_TASK_RUNNER="worker")

    @h.silo.task
    def crunch(task: BackgroundTask) -> None:
        pass

    h.silo.register("job", lambda: {"task": BackgroundTask("crunch")})

    @h.app.post("/api/start")
    def start() -> dict[str, str]:
        h.silo.state("job")["task"].start(crunch)
        return {"started": "yes"}

    assert h.post("/api/start", ALICE).status_code == 200
    h.clock.now += 30
    samples = scrape(h)
    assert samples["silo_task_queue_depth", ()] == 1
    assert samples["silo_task_oldest_queued_age_seconds", ()] == 30
    assert samples["silo_task_workers_live", (("kind", "worker"),)] == 0


def test_task_attempts_retries_and_failures_are_counted(
    silo_app: AppFactory, tmp_path: Path
) -> None:
    h = app_with_metrics(silo_app, tmp_path)
    tasks: list[BackgroundTask] = []

    @h.silo.task(retries=0)
    def doomed(task: BackgroundTask) -> None:
        raise ValueError("no luck")

    h.silo.register("job", lambda: {"task": BackgroundTask("doomed")})

    @h.app.post("/api/start")
    def start() -> dict[str, str]:
        task = h.silo.state("job")["task"]
        tasks.append(task)
        task.start(doomed)
        return {"started": "yes"}

    assert h.post("/api/start", ALICE).status_code == 200
    thread = tasks[0]._thread
    assert thread is not None
    thread.join(10)
    samples = scrape(h)
    assert samples["silo_task_attempts_total", (("task", "doomed"),)] == 1
    assert samples["silo_task_failures_total", (("task", "doomed"),)] == 1


def test_a_registry_the_app_gives_gets_the_metrics(silo_app: AppFactory) -> None:
    registry = CollectorRegistry()
    h = silo_app(config={"SILO_METRICS": registry})

    @h.app.get("/api/ping")
    def ping() -> str:
        return "pong"

    h.get("/api/ping", ALICE)
    assert registry.get_sample_value("silo_requests_total", {"outcome": "ok"}) == 1
    assert registry.get_sample_value("silo_sessions_live") == 0  # nothing stored by a ping


def test_metrics_off_by_default_and_the_view_says_how_to_turn_them_on(
    silo_app: AppFactory,
) -> None:
    h = silo_app()
    h.app.add_url_rule("/metrics", view_func=h.silo.metrics_view())
    h.app.config["PROPAGATE_EXCEPTIONS"] = True  # the error itself, not a 500 page
    with pytest.raises(RuntimeError, match="SILO_METRICS = True"):
        h.client.get("/metrics")


def test_a_wrong_setting_is_refused_at_start_up(silo_app: AppFactory) -> None:
    with pytest.raises(TypeError, match="SILO_METRICS must be True, False or"):
        silo_app(config={"SILO_METRICS": "yes"})


# -- spans ---------------------------------------------------------------------------------


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def assert_no_sid(finished: list[ReadableSpan], *sids: str) -> None:
    for span in finished:
        text = repr(attributes(span)) + repr(span.status.description) + span.name
        for sid in sids:
            assert sid not in text, span.name


def test_a_request_and_its_commit_are_spans_naming_the_session_by_its_tag(
    silo_app: AppFactory, tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    h = app_with_metrics(silo_app, tmp_path)
    assert h.post("/api/notes", ALICE, data="secret-state").status_code == 200
    finished = list(exporter.get_finished_spans())
    by_name = {span.name: span for span in finished}
    request_span, commit = by_name["silo.request"], by_name["silo.commit"]
    assert attributes(request_span) == {
        "http.request.method": "POST",
        "http.route": "/api/notes",
        "http.response.status_code": 200,
        "silo.outcome": "ok",
        "silo.session": tag(ALICE),
    }
    assert attributes(commit) == {
        "silo.session": tag(ALICE),
        "silo.commit.state": True,
        "silo.commit.files": True,
    }
    assert commit.parent is not None
    assert commit.parent.span_id == request_span.context.span_id
    assert_no_sid(finished, ALICE)
    assert "secret-state" not in repr([attributes(s) for s in finished])


class CountingSampler(Sampler):
    """The SDK's sampling, dropping every trace and counting the decisions asked of it."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def should_sample(
        self, parent_context: Any, trace_id: int, name: str, *args: Any, **kwargs: Any
    ) -> SamplingResult:
        self.asked.append(name)
        return ALWAYS_OFF.should_sample(parent_context, trace_id, name, *args, **kwargs)

    def get_description(self) -> str:
        return "counting"


def test_a_trace_sampled_out_starts_no_child_span(silo_app: AppFactory, tmp_path: Path) -> None:
    """Under a request span the sampler dropped, the commit is not even offered to it:
    its child would be dropped too, and asking costs a sub-millisecond request dearly."""
    sampler = CountingSampler()
    spans.set_tracer_provider(TracerProvider(sampler=sampler))
    try:
        h = app_with_metrics(silo_app, tmp_path)
        assert h.post("/api/notes", ALICE, data="one").status_code == 200
    finally:
        spans.set_tracer_provider(None)
    assert sampler.asked == ["silo.request"]


def test_an_error_answer_is_a_request_span_with_its_outcome(
    silo_app: AppFactory, tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    h = app_with_metrics(silo_app, tmp_path)
    h.post("/api/notes", ALICE, data="one")
    h.expire(ALICE)
    exporter.clear()
    assert h.get("/api/notes", ALICE).status_code == 410
    (request_span,) = [s for s in exporter.get_finished_spans() if s.name == "silo.request"]
    assert attributes(request_span)["silo.outcome"] == "410"


def test_sweep_task_and_file_spans(
    silo_app: AppFactory, tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    h = app_with_metrics(silo_app, tmp_path)
    tasks: list[BackgroundTask] = []

    def work(task: BackgroundTask) -> None:
        task.update(50)

    h.silo.register("job", lambda: {"task": BackgroundTask("work")})

    @h.app.post("/api/start")
    def start() -> dict[str, str]:
        task = h.silo.state("job")["task"]
        tasks.append(task)
        task.start(work)
        return {"started": "yes"}

    assert h.post("/api/upload", ALICE, data=b"y" * 100).status_code == 200
    assert h.get("/api/download", ALICE).data == b"y" * 100
    assert h.post("/api/start", BOB).status_code == 200
    thread = tasks[0]._thread
    assert thread is not None
    thread.join(10)
    h.expire(ALICE)

    finished = list(exporter.get_finished_spans())
    by_name = {span.name: span for span in finished}
    assert attributes(by_name["silo.file.save"]) == {
        "silo.file.store": "uploads",
        "silo.session": tag(ALICE),
    }
    assert attributes(by_name["silo.file.send"]) == {
        "silo.file.store": "uploads",
        "silo.session": tag(ALICE),
        "http.response.status_code": 200,
        "silo.file.bytes": 100,
    }
    assert attributes(by_name["silo.task.attempt"]) == {
        "silo.task.name": "work",
        "silo.task.attempt": 1,
        "silo.session": tag(BOB),
        "silo.task.outcome": "complete",
    }
    sweep = attributes(by_name["silo.sweep"])
    assert sweep["silo.sweep.expired"] >= 1
    assert sweep["silo.sweep.dry_run"] is False
    assert_no_sid(finished, ALICE, BOB)


# -- absent ----------------------------------------------------------------------------------

WITHOUT_PACKAGES = """
import sys
sys.modules["opentelemetry"] = None  # as if not installed
sys.modules["prometheus_client"] = None
from flask import Flask
from flask_silo_sql import Silo, SQLStorage
from flask_silo_sql.files import FileStore
from flask_silo_sql.sql import schema
from flask_silo_sql.store import SessionStore

storage = SQLStorage(sys.argv[1])
schema.upgrade(storage.engine)
app = Flask("bare")
silo = Silo(app, storage=storage, auto_cleanup=False)
silo.register("n", lambda: {"n": 0})
app.post("/api/n")(lambda: {"n": silo.state("n").__setitem__("n", 1) or 1})
assert app.test_client().post("/api/n").status_code == 200
hooked = (FileStore.save, FileStore.send, SessionStore.sweep)
wrapped = [f for f in hooked if hasattr(f, "__wrapped__")]
assert not wrapped, wrapped
loaded = [m for m in sys.modules if m.startswith(("opentelemetry", "prometheus"))]
assert all(sys.modules[m] is None for m in loaded), loaded
silo.stop()
print("nothing wrapped, nothing imported")
"""


def test_without_the_packages_nothing_is_wrapped_or_imported(sqlite_url: str) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PACKAGES, sqlite_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "nothing wrapped, nothing imported" in done.stdout


def test_with_the_api_alone_no_span_is_started() -> None:
    """No SDK configured: every span would be a no-op, so silo starts none."""
    assert spans.AVAILABLE
    assert spans.on() is False
