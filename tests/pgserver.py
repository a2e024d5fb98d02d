"""A throwaway PostgreSQL server for the tests and benchmarks.

Starts a private cluster (``initdb`` + ``pg_ctl``, as the ``postgres`` user when
run as root) on a free loopback port in a temporary directory. Set
``SILO_TEST_PG_URL`` to use an existing server instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for directory in candidates:
        if os.path.exists(os.path.join(directory, "pg_ctl")):
            return Path(directory)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _version_key(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Databases:
    """Creating and dropping databases on a server (``admin_url``, ``url(name)``)."""

    @property
    def admin_url(self) -> str:
        raise NotImplementedError

    def url(self, database: str) -> str:
        raise NotImplementedError

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """Create a database (empty, or a copy of the database *template*); return its URL."""
        import psycopg  # lazily: a SQLite-only run needs no PostgreSQL driver

        name = name or "silo_" + uuid.uuid4().hex[:12]
        copy = f' TEMPLATE "{template}"' if template else ""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{copy}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PgServer(Databases):
    """A private PostgreSQL cluster; :meth:`stop_server`/:meth:`start_server` simulate outages."""

    def __init__(self, *, fsync: bool = False) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bindir = bindir
        self.fsync = fsync
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="silo-pg-"))
        self.datadir = self.root / "data"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        self.start_server()

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start_server(self) -> None:
        """Start (or restart) the server on the same port and data."""
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200 "
            "-c synchronous_commit=" + ("on" if self.fsync else "off")
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-o",
            opts,
            "-l",
            str(self.root / "server.log"),
            "-w",
            "start",
        )

    def processes(self) -> list[int]:
        """The PIDs of the server: the postmaster and every process it started."""
        first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
        postmaster = int(first)
        found = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
        )
        return [postmaster, *(int(p) for p in found.stdout.split())]

    def freeze(self) -> None:
        """Stop every server process (SIGSTOP): connections stay open, nothing answers."""
        for pid in self.processes():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen server go on (SIGCONT)."""
        for pid in self.processes():
            os.kill(pid, signal.SIGCONT)

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` disconnects clients; ``immediate`` simulates a crash)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        """SQLAlchemy URL of *database* on this server (psycopg 3)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        """Stop the server and delete its files."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop_server("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class ExternalPg(Databases):
    """An existing server given by ``SILO_TEST_PG_URL`` (a URL to a maintenance database)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import make_url

        self._base = make_url(url).set(drivername="postgresql+psycopg")

    @property
    def admin_url(self) -> str:
        return self._base.set(drivername="postgresql").render_as_string(hide_password=False)

    def url(self, database: str) -> str:
        return self._base.set(database=database).render_as_string(hide_password=False)

    def destroy(self) -> None:
        pass
