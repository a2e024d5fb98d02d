"""The schema: models and migrations agree, and the migration machinery behaves.

Every test runs on a fresh SQLite file and on a fresh PostgreSQL database.
"""

from __future__ import annotations

import datetime as dt
import io
import multiprocessing
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    func,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from flask_silo_sql import (
    SchemaError,
    SQLStorage,
    alembic_include_name,
    alembic_include_object,
    schema,
)
from flask_silo_sql.sql.engine import make_engine
from flask_silo_sql.sql.models import SILO_TABLES, VERSION_TABLE, UTCDateTime, metadata

UTC = dt.timezone.utc
REPO = Path(__file__).resolve().parent.parent
SID = "s" * 32


def schema_diffs(engine: Engine, target: MetaData = metadata) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match *target*."""
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "version_table": VERSION_TABLE,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return list(compare_metadata(context, target))


def copy_of_models() -> MetaData:
    copy = MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.sorted_tables:
        table.to_metadata(copy)
    return copy


def flatten(diffs: list[Any]) -> list[tuple[Any, ...]]:
    """compare_metadata's answer with per-column groups of changes unpacked."""
    flat: list[tuple[Any, ...]] = []
    for diff in diffs:
        flat.extend(diff if isinstance(diff, list) else [diff])
    return flat


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def version_rows(engine: Engine, table: str) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(text(f"SELECT version_num FROM {table}")).scalars())


def row_count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        query = select(func.count()).select_from(metadata.tables[table])
        return int(conn.execute(query).scalar_one())


def put_data(engine: Engine) -> None:
    """A session with a namespace and an expired-SID record, through SQLStorage."""
    storage = SQLStorage(engine)
    now = dt.datetime.now(UTC).timestamp()
    meta = {"created_at": now, "last_active": now}
    storage.set_session(SID, {"counter": {"n": 3}, "_meta": meta})
    storage.mark_expired("e" * 32, now)
    assert storage.session_count() == 1
    assert storage.expired_count() == 1


# -- models and migrations agree ------------------------------------------------------------


def test_models_and_migrations_agree(engine: Engine) -> None:
    schema.upgrade(engine)
    assert schema_diffs(engine) == []


def test_comparison_detects_drift(engine: Engine) -> None:
    """The comparison above is sensitive: a drifted copy of the models is reported."""
    schema.upgrade(engine)
    drifted = copy_of_models()
    drifted.tables["silo_sessions"].append_column(Column("extra", Integer, nullable=True))
    drifted.tables["silo_namespaces"].c.name.type = String(100)
    Table("silo_not_migrated", drifted, Column("id", Integer, primary_key=True))
    diffs = schema_diffs(engine, drifted)
    kinds = {d[0] for d in flatten(diffs)}
    assert {"add_column", "add_table", "modify_type"} <= kinds, diffs

    if engine.dialect.name == "postgresql":
        drifted = copy_of_models()
        drifted.tables["silo_namespaces"].c.data.type = JSONB()  # JSONB instead of json
        drifted.tables["silo_sessions"].c.sid.comment = "something else"
        drifted.tables["silo_tasks"].comment = "another table comment"
        diffs = schema_diffs(engine, drifted)
        kinds = {d[0] for d in flatten(diffs)}
        assert {"modify_type", "modify_comment", "add_table_comment"} <= kinds, diffs


# -- round trip and version tables ----------------------------------------------------------


def test_upgrade_downgrade_round_trip(engine: Engine) -> None:
    schema.upgrade(engine)
    assert table_names(engine) >= SILO_TABLES
    put_data(engine)

    schema.downgrade(engine, "base")
    assert table_names(engine) & SILO_TABLES == set()
    assert schema.current(engine) is None
    if VERSION_TABLE in table_names(engine):
        assert version_rows(engine, VERSION_TABLE) == []

    schema.upgrade(engine)
    assert table_names(engine) >= SILO_TABLES
    assert schema.current(engine) == schema.head()
    for table in SILO_TABLES:
        assert row_count(engine, table) == 0, table
    assert schema_diffs(engine) == []
    put_data(engine)  # the re-created tables are usable


def test_version_table_is_ours_and_hosts_alembic_version_is_untouched(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        )
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('host_rev_1')"))
    assert schema.current(engine) is None  # the host's version is not ours

    schema.upgrade(engine)
    assert version_rows(engine, VERSION_TABLE) == [schema.head()]
    assert version_rows(engine, "alembic_version") == ["host_rev_1"]

    schema.downgrade(engine, "base")
    assert version_rows(engine, "alembic_version") == ["host_rev_1"]
    assert "alembic_version" in table_names(engine)

    schema.upgrade(engine)
    schema.stamp(engine, "base")
    assert schema.current(engine) is None
    schema.stamp(engine, "head")
    assert schema.current(engine) == schema.head()
    assert version_rows(engine, "alembic_version") == ["host_rev_1"]


# -- current / head / check -----------------------------------------------------------------


def test_head_is_the_single_head_of_the_shipped_migrations() -> None:
    script = ScriptDirectory(str(schema.migrations_dir()))
    assert script.get_heads() == [schema.head()]
    versions = REPO / "migrations" / "versions"
    shipped = {p.name for p in versions.glob("*.py")}
    revision = script.get_revision(schema.head())
    assert revision is not None
    assert Path(revision.path).name in shipped


def test_current_and_check(engine: Engine) -> None:
    assert schema.current(engine) is None
    assert not schema.is_current(engine)
    with pytest.raises(SchemaError, match="flask silo-db upgrade") as info:
        schema.check(engine)
    assert info.value.current is None
    assert info.value.head == schema.head()

    schema.upgrade(engine)
    assert schema.current(engine) == schema.head()
    assert schema.is_current(engine)
    schema.check(engine)

    # Behind: every older revision (none yet, when only one is shipped), and "no schema".
    script = ScriptDirectory(str(schema.migrations_dir()))
    older = [r.revision for r in script.walk_revisions() if r.revision != schema.head()]
    for revision in [*older, "base"]:
        schema.downgrade(engine, revision)
        with pytest.raises(SchemaError, match="flask silo-db upgrade"):
            schema.check(engine)
        schema.upgrade(engine)
        schema.check(engine)


def test_schema_error_names_the_database_without_its_password(pg_url: str) -> None:
    url = make_url(pg_url)
    password = url.password or "hunter2"  # the private test server trusts any password
    url = url.set(password=password)
    engine = make_engine(url)
    try:
        with pytest.raises(SchemaError) as info:
            schema.check(engine)
    finally:
        engine.dispose()
    message = str(info.value)
    assert password not in message
    assert str(url.database) in message
    assert "flask silo-db upgrade" in message


# -- offline SQL ----------------------------------------------------------------------------


def test_upgrade_sql_prints_ddl_and_leaves_the_database_alone(
    engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    schema.upgrade(engine, sql=True)
    ddl = capsys.readouterr().out
    for table in SILO_TABLES:
        assert f"CREATE TABLE {table}" in ddl
    assert f"CREATE TABLE {VERSION_TABLE}" in ddl
    assert "CREATE INDEX ix_silo_sessions_last_active" in ddl
    assert schema.head() in ddl
    if engine.dialect.name == "postgresql":
        assert "JSONB" in ddl
        assert "TIMESTAMP WITH TIME ZONE" in ddl
        assert "COMMENT ON" in ddl

    buffer = io.StringIO()
    schema.upgrade(engine, sql=True, stdout=buffer)
    assert buffer.getvalue() == ddl  # an explicit stdout receives the DDL
    assert capsys.readouterr().out == ""

    if engine.dialect.name == "sqlite":
        database = make_url(str(engine.url)).database
        assert database is not None
        assert not Path(database).exists()  # never even opened
    assert table_names(engine) == set()
    assert schema.current(engine) is None


def test_downgrade_sql_prints_drops(engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    schema.upgrade(engine)
    schema.downgrade(engine, f"{schema.head()}:base", sql=True)
    ddl = capsys.readouterr().out
    for table in SILO_TABLES:
        assert f"DROP TABLE {table}" in ddl
    assert table_names(engine) >= SILO_TABLES  # nothing was dropped
    assert schema.current(engine) == schema.head()


# -- concurrent upgrades --------------------------------------------------------------------


def _upgrade_worker(url: str, barrier: Any, results: Any) -> None:
    """Child process: wait for every sibling, then upgrade the same database."""
    try:
        engine = make_engine(url)
        barrier.wait()
        schema.upgrade(engine, stdout=io.StringIO())
        engine.dispose()
        results.put("ok")
    except BaseException:
        results.put(traceback.format_exc())


@pytest.mark.parametrize("workers", [4])
def test_concurrent_upgrades_of_a_fresh_database(db_url: str, workers: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers, timeout=120)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_upgrade_worker, args=(db_url, barrier, results))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert outcomes == ["ok"] * workers, "\n".join(o for o in outcomes if o != "ok")

    engine = make_engine(db_url)
    try:
        assert version_rows(engine, VERSION_TABLE) == [schema.head()]
        assert schema_diffs(engine) == []
        for table in SILO_TABLES:
            assert row_count(engine, table) == 0
    finally:
        engine.dispose()


# -- PostgreSQL column types and comments ---------------------------------------------------


def test_postgresql_types_and_comments(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        schema.upgrade(engine)
        with engine.connect() as conn:
            types = {
                (row.table_name, row.column_name): row.data_type
                for row in conn.execute(
                    text(
                        "SELECT table_name, column_name, data_type "
                        "FROM information_schema.columns WHERE table_schema = current_schema()"
                    )
                )
            }
        # Clients' JSON is json (kept as sent: numbers keep their text); the library's jsonb.
        assert types[("silo_namespaces", "data")] == "json"
        assert types[("silo_tasks", "args")] == "json"
        assert types[("silo_tasks", "checkpoint")] == "json"
        assert types[("silo_tasks", "logs")] == "jsonb"
        timestamps = [
            (table.name, column.name)
            for table in metadata.sorted_tables
            for column in table.columns
            if isinstance(column.type, UTCDateTime)
        ]
        assert ("silo_sessions", "last_active") in timestamps
        for key in timestamps:
            assert types[key] == "timestamp with time zone", key
        assert "timestamp without time zone" not in types.values()
        json_columns = {key for key, kind in types.items() if kind == "json"}
        assert json_columns == {
            ("silo_namespaces", "data"),
            ("silo_tasks", "args"),
            ("silo_tasks", "checkpoint"),
        }

        inspector = inspect(engine)
        for table in metadata.sorted_tables:
            comment = inspector.get_table_comment(table.name)["text"]
            assert comment, table.name
            assert comment == table.comment
            columns = {c["name"]: c for c in inspector.get_columns(table.name)}
            assert set(columns) == set(table.columns.keys())
            for column in table.columns:
                assert columns[column.name].get("comment"), (table.name, column.name)
                assert columns[column.name]["comment"] == column.comment

        # timestamptz round trip: an aware UTC value comes back as the same instant
        put_data(engine)
        with engine.connect() as conn:
            raw = conn.execute(text("SELECT created_at FROM silo_sessions")).scalar_one()
        assert raw.tzinfo is not None
    finally:
        engine.dispose()


def test_contract_tables_columns_and_indexes(engine: Engine) -> None:
    schema.upgrade(engine)
    inspector = inspect(engine)
    required = {
        "silo_sessions": {"sid", "created_at", "last_active"},
        "silo_namespaces": {"sid", "name", "data", "updated_at"},
        "silo_expired_sids": {"sid", "expired_at"},
        "silo_files": {
            "sid", "store", "filename", "size_bytes", "sha256", "created_at",
            "backend", "host", "location",
        },
        "silo_file_chunks": {"file_id", "seq", "data"},
        "silo_tasks": {
            "sid", "name", "status", "progress", "message", "logs", "error",
            "started_at", "finished_at", "heartbeat_at",
            "target", "args", "attempt", "max_attempts", "lease_expires_at", "checkpoint",
        },
        "silo_workers": {"id", "hostname", "pid", "kind", "heartbeat_at"},
        "silo_idempotency_keys": {
            "sid", "key_hash", "idempotency_key", "fingerprint", "status", "headers", "body",
            "locked_until", "expires_at",
        },
        "silo_events": {"id", "sid", "task_id", "kind", "data", "created_at"},
        "silo_stream_tokens": {"token_hash", "sid", "expires_at"},
    }
    assert set(required) == SILO_TABLES
    for table, columns in required.items():
        assert columns <= {c["name"] for c in inspector.get_columns(table)}, table
    assert inspector.get_pk_constraint("silo_sessions")["constrained_columns"] == ["sid"]
    assert inspector.get_pk_constraint("silo_expired_sids")["constrained_columns"] == ["sid"]

    def leading_index_columns(table: str) -> set[str | None]:
        """Columns that lead an index (so the index serves range scans on them)."""
        return {ix["column_names"][0] for ix in inspector.get_indexes(table)}

    # The session's own expiry, and the sweep's index on a lower bound of it.
    assert {"expires_at", "sweep_after"} <= {
        c["name"] for c in inspector.get_columns("silo_sessions")
    }
    assert "sweep_after" in leading_index_columns("silo_sessions")
    assert "expired_at" in leading_index_columns("silo_expired_sids")
    assert "heartbeat_at" in leading_index_columns("silo_workers")

    chunk_fks = inspector.get_foreign_keys("silo_file_chunks")
    assert any(
        fk["referred_table"] == "silo_files"
        and fk["constrained_columns"] == ["file_id"]
        and (fk.get("options") or {}).get("ondelete", "").upper() == "CASCADE"
        for fk in chunk_fks
    ), chunk_fks
    assert inspector.get_pk_constraint("silo_file_chunks")["constrained_columns"] == [
        "file_id",
        "seq",
    ]
    assert "expires_at" in leading_index_columns("silo_idempotency_keys")
    assert inspector.get_pk_constraint("silo_idempotency_keys")["constrained_columns"] == [
        "sid", "key_hash",
    ]

    assert "created_at" in leading_index_columns("silo_events")
    assert "expires_at" in leading_index_columns("silo_stream_tokens")
    assert "cancel_requested_at" in {c["name"] for c in inspector.get_columns("silo_tasks")}

    for table in (
        "silo_namespaces", "silo_files", "silo_tasks", "silo_idempotency_keys", "silo_events",
        "silo_stream_tokens",
    ):
        fks = inspector.get_foreign_keys(table)
        assert any(
            fk["referred_table"] == "silo_sessions"
            and fk["constrained_columns"] == ["sid"]
            and (fk.get("options") or {}).get("ondelete", "").upper() == "CASCADE"
            for fk in fks
        ), (table, fks)


# -- host autogenerate filters --------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("silo_sessions", False),
        ("silo_namespaces", False),
        ("silo_expired_sids", False),
        ("silo_files", False),
        ("silo_tasks", False),
        ("silo_workers", False),
        ("silo_idempotency_keys", False),
        ("silo_events", False),
        ("silo_stream_tokens", False),
        (VERSION_TABLE, False),
        ("users", True),
        ("alembic_version", True),
        ("silo_something_of_the_host", True),
    ],
)
def test_include_filters_by_table(table: str, expected: bool) -> None:
    assert alembic_include_name(table, "table", {}) is expected
    assert alembic_include_name("sid", "column", {"table_name": table}) is expected
    assert alembic_include_name(f"ix_{table}_x", "index", {"table_name": table}) is expected
    obj = Table(table, MetaData(), Column("sid", String(10), primary_key=True))
    assert alembic_include_object(obj, table, "table", True, None) is expected
    assert alembic_include_object(obj.c.sid, "sid", "column", True, None) is expected


def test_include_filters_keep_schemas() -> None:
    assert alembic_include_name(None, "schema", {}) is True
    assert alembic_include_name("public", "schema", {}) is True


FilterSet = dict[str, Callable[..., bool]]


@pytest.mark.parametrize(
    "filters",
    [
        {"include_name": alembic_include_name},
        {"include_object": alembic_include_object},
        {"include_name": alembic_include_name, "include_object": alembic_include_object},
    ],
    ids=["include_name", "include_object", "both"],
)
def test_host_autogenerate_ignores_silo_tables(engine: Engine, filters: FilterSet) -> None:
    schema.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))
    host = MetaData()
    Table("users", host, Column("id", Integer, primary_key=True))

    def host_diffs(opts: dict[str, Any]) -> list[Any]:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, **opts})
            return list(compare_metadata(context, host))

    unfiltered = host_diffs({})
    removed = {d[1].name for d in unfiltered if isinstance(d, tuple) and d[0] == "remove_table"}
    assert removed == SILO_TABLES | {VERSION_TABLE, "orders"}  # what the filters must hide

    diffs = host_diffs(dict(filters))
    summary = sorted((d[0], d[1].name) for d in diffs if isinstance(d, tuple))
    assert summary == [("add_table", "users"), ("remove_table", "orders")], diffs
    assert "silo_" not in repr(diffs)
