"""The SQL of "Querying the tables" in docs/operators.md runs on both databases, answering right."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, text

from flask_silo_sql import schema, session_key
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import expired_sids, files, namespaces, sessions, tasks

PAGE = Path(__file__).resolve().parent.parent / "docs" / "operators.md"
UTC = dt.timezone.utc
A = session_key("client-a-0123456789")
B = session_key("client-b-0123456789")
GONE = session_key("gone-0123456789ab")


def readme_queries() -> list[tuple[str, str, str | None]]:
    """``(title, sql, dialect or None)`` for each query block of the section."""
    body = PAGE.read_text()
    section = body.split("## Querying the tables", 1)[1].split("\n## ", 1)[0]
    found = []
    blocks = re.findall(r"```sql\n(.*?)```", section, flags=re.S)
    # The docs build accepts these blocks as examples because this test runs them.
    assert section.count("{.run-by-test}\n```sql\n") == len(blocks)
    for block in blocks:
        first, sql = block.split("\n", 1)
        title = first.removeprefix("-- ").strip()
        tag = re.search(r"\((PostgreSQL|SQLite)\)$", title)
        dialect = {"PostgreSQL": "postgresql", "SQLite": "sqlite"}[tag.group(1)] if tag else None
        found.append((title, sql.strip().rstrip(";"), dialect))
    return found


QUERIES = readme_queries()


def test_readme_has_the_queries_operators_need() -> None:
    titles = " ".join(title for title, _, _ in QUERIES)
    for needed in (
        "Active sessions in the last hour",
        "Largest namespaces",
        "Running and failed tasks",
        "Disk used per session",
        "Expired SIDs still remembered",
        "One client's state",
        "The session of a log line's tag",
    ):
        assert needed in titles
    for title, _, dialect in QUERIES:
        if dialect is not None:  # every dialect-specific query has its twin
            base = title.rsplit("(", 1)[0]
            assert {d for t, _, d in QUERIES if t.startswith(base)} == {"postgresql", "sqlite"}


CASES = [
    pytest.param(database, title, id=f"{database}-{title}")
    for title, _, dialect in QUERIES
    for database in ("sqlite", "postgresql")
    if dialect in (None, database)
]


def seed(url: str) -> Engine:
    engine = make_engine(url)
    schema.upgrade(engine)
    now = dt.datetime.now(UTC)
    old = now - dt.timedelta(hours=3)
    with engine.begin() as conn:
        conn.execute(
            insert(sessions),
            [
                {
                    "sid": A,
                    "created_at": old,
                    "last_active": now,
                    "expires_at": now + dt.timedelta(hours=1),
                },
                {
                    "sid": B,
                    "created_at": old,
                    "last_active": old,
                    "expires_at": old + dt.timedelta(hours=1),
                },
            ],
        )
        conn.execute(
            insert(namespaces),
            [
                {
                    "sid": A,
                    "name": "counter",
                    "data": {"count": 3},
                    "version": 3,
                    "updated_at": now,
                },
                {
                    "sid": B,
                    "name": "big",
                    "data": {"x": "y" * 5000},
                    "version": 1,
                    "updated_at": old,
                },
            ],
        )
        task = {
            "progress": 40.0,
            "message": "",
            "logs": [],
            "error": None,
            "started_at": old,
            "finished_at": None,
            "heartbeat_at": now,
        }
        conn.execute(
            insert(tasks),
            [
                {
                    **task,
                    "id": "a" * 32,
                    "sid": A,
                    "name": "p",
                    "status": "running",
                },
                {
                    **task,
                    "id": "b" * 32,
                    "sid": B,
                    "name": "q",
                    "status": "failed",
                    "error": "boom",
                },
                {
                    **task,
                    "id": "c" * 32,
                    "sid": B,
                    "name": "r",
                    "status": "complete",
                },
            ],
        )
        conn.execute(
            insert(files),
            [
                {
                    "sid": A,
                    "store": "uploads",
                    "filename": f"f{i}",
                    "size_bytes": 100 * (i + 1),
                    "sha256": "0" * 64,
                    "content_type": None,
                    "created_at": now,
                }
                for i in range(3)
            ],
        )
        conn.execute(insert(expired_sids), [{"sid": GONE, "expired_at": old}])
    return engine


@pytest.mark.parametrize(("database", "title"), CASES)
def test_readme_query(request: pytest.FixtureRequest, database: str, title: str) -> None:
    _, sql, _ = next(q for q in QUERIES if q[0] == title)
    url: str = request.getfixturevalue("sqlite_url" if database == "sqlite" else "pg_url")
    seeded = seed(url)
    with seeded.connect() as conn:
        rows = conn.execute(text(sql)).all()
    if title.startswith("Active sessions"):
        assert [r.sid for r in rows] == [A]
    elif title.startswith("Largest namespaces"):
        assert [r.name for r in rows] == ["big", "counter"]
        assert rows[0].bytes > 1000
    elif title.startswith("Running and failed"):
        assert sorted((r.status, r.name) for r in rows) == [("failed", "q"), ("running", "p")]
    elif title.startswith("Disk used"):
        assert [(r.sid, r.files, r.bytes) for r in rows] == [(A, 3, 600)]
    elif title.startswith("Expired SIDs"):
        assert [r.sid for r in rows] == [GONE]
    elif title.startswith("One client's state"):
        assert [(r.name, r.version) for r in rows] == [("counter", 3)]
    elif title.startswith("The session of a log line's tag"):
        assert [r.sid for r in rows] == [A]
    else:
        raise AssertionError(f"no expectation for query {title!r}")
