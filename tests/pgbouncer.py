"""A throwaway PgBouncer in front of a test PostgreSQL server.

Many PostgreSQL deployments put PgBouncer in transaction pooling mode between
the application and the server: each transaction, or each statement in
autocommit, may run on a different server connection, so session state
(prepared statements, ``SET``, session advisory locks, ``LISTEN``) does not
follow the client. This starts a real ``pgbouncer`` (Debian package
``pgbouncer``) on a free loopback port in a temporary directory, as the
``postgres`` user when run as root (PgBouncer refuses to run as root), with
many client connections allowed and a small server pool, so that clients
really share server connections.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from pgserver import Databases, _free_port
from sqlalchemy import make_url

PoolMode = Literal["session", "transaction", "statement"]
START_TIMEOUT_S = 10.0


def find_pgbouncer() -> Path | None:
    """The ``pgbouncer`` executable, or None."""
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
    return Path(found) if found else None


def _quote(value: str) -> str:
    """A value for PgBouncer's ``auth_file`` (double quotes, doubled inside)."""
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """A PgBouncer process pooling connections to *server*'s databases.

    Clients log in to PgBouncer without a password (``auth_type = trust``) as
    the server's user; PgBouncer logs in to the server as that user, with the
    password from the server's URL if it has one.
    """

    def __init__(
        self,
        server: Databases,
        *,
        pool_mode: PoolMode = "transaction",
        pool_size: int = 5,
        max_client_conn: int = 1000,
    ) -> None:
        binary = find_pgbouncer()
        if binary is None:
            raise RuntimeError("pgbouncer not found (Debian package pgbouncer)")
        self.binary = binary
        self.server = server
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        target = make_url(server.admin_url)
        self.user = target.username or "postgres"
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="silo-pgbouncer-"))
        self.log_path = self.root / "pgbouncer.log"
        self.config_path = self.root / "pgbouncer.ini"
        (self.root / "users.txt").write_text(
            f"{_quote(self.user)} {_quote(target.password or '')}\n"
        )
        self.config_path.write_text(
            "[databases]\n"
            f"* = host={target.host or '127.0.0.1'} port={target.port or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            f"admin_users = {self.user}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            f"max_client_conn = {max_client_conn}\n"
            "max_db_connections = 0\n"
        )
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "postgres", "postgres")
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (or restart) PgBouncer on the same port; return once it accepts connections."""
        if self._process is not None:
            return
        cmd = [str(self.binary), str(self.config_path)]
        if self.as_postgres:
            cmd[1:1] = ["-u", "postgres"]  # PgBouncer drops root itself (it refuses to run as root)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                self.stop()
                raise RuntimeError(f"pgbouncer exited at start:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer did not start listening:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop PgBouncer (its clients are disconnected); :meth:`start` brings it back."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def destroy(self) -> None:
        """Stop PgBouncer and delete its files."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        """SQLAlchemy URL of *database* through PgBouncer (psycopg 3)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def show(self, what: str) -> list[dict[str, Any]]:
        """Rows of PgBouncer's admin console ``SHOW <what>`` (``POOLS``, ``SERVERS``...)."""
        import psycopg  # lazily: a SQLite-only run needs no PostgreSQL driver

        dsn = f"postgresql://{self.user}@127.0.0.1:{self.port}/pgbouncer"
        # The admin console speaks only the simple query protocol.
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            cursor = psycopg.ClientCursor(conn)
            cursor.execute(f"SHOW {what}")
            names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def log(self) -> str:
        """What PgBouncer has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.destroy()
