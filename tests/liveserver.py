"""Run the test apps and the examples under a real gunicorn, and wait on real events.

Every wait is a bounded poll of something observable (a socket answering, a
file appearing); a server is always stopped by the ``with`` block that started
it: SIGTERM to its master, then SIGKILL to its process group past a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TypeVar

import requests

APPS_DIR = Path(__file__).parent / "apps"
REPO_ROOT = Path(__file__).parent.parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    what: str, probe: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.02
) -> T:
    """Poll *probe* until it returns something other than None (or fail after *timeout*)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@cache
def control_socket_options() -> tuple[str, ...]:
    """Options that keep concurrent test servers apart (control socket of gunicorn >= 24)."""
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True, timeout=30
    )
    return ("--no-control-socket",) if "--no-control-socket" in done.stdout else ()


def parent_pid(pid: int) -> int | None:
    """The parent of process *pid* (from /proc), or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return None


class Gunicorn:
    """A running gunicorn serving an app on a loopback port."""

    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, log: Path, health: str = "/health"
    ) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.health = health
        self.base = f"http://127.0.0.1:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def worker_pids(self) -> set[int]:
        """Live worker processes of this gunicorn master (from /proc)."""
        return {
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and parent_pid(int(entry.name)) == self.proc.pid
        }

    def healthy(self) -> bool:
        """Whether a worker answers its health path right now."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited ({self.proc.returncode}):\n{self.log_text()}")
        try:
            return requests.get(self.url(self.health), timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_for("gunicorn to answer", lambda: True if self.healthy() else None, timeout=timeout)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group of the master we started
            self.proc.wait(timeout=timeout)


@contextmanager
def gunicorn(
    env: dict[str, str],
    tmp: Path,
    *,
    app: str = "concurrency_app:app",
    chdir: Path = APPS_DIR,
    health: str = "/health",
    workers: int = 1,
    threads: int = 1,
    timeout: int = 120,
    extra: Sequence[str] = (),
) -> Iterator[Gunicorn]:
    """Start gunicorn with *app* (configured by *env*), wait until *health* answers.

    The server's log is printed when the block fails; it is stopped in any case.
    """
    port = free_port()
    log = tmp / f"gunicorn-{port}.log"
    full_env = {**os.environ, **env}
    full_env.pop("FLASK_APP", None)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        *control_socket_options(),
        *extra,
        "--chdir",
        str(chdir),
        "-w",
        str(workers),
        "--threads",
        str(threads),
        "-b",
        f"127.0.0.1:{port}",
        "--timeout",
        str(timeout),
        "--graceful-timeout",
        "5",
        "--log-level",
        "warning",
        app,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Gunicorn(proc, port, log, health)
    try:
        server.wait_healthy()
        yield server
    except BaseException:
        print(f"gunicorn log:\n{server.log_text()}")
        raise
    finally:
        server.stop()


def wait_ready(path: Path, timeout: float = 30.0) -> int:
    """Wait for a barrier's ready file; return the PID of the paused worker."""

    def probe() -> int | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    return wait_for(f"{path.name}", probe, timeout=timeout)


def process_gone(pid: int) -> bool:
    """Whether *pid* is dead (gone, or a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")
