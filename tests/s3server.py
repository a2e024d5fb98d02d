"""A throwaway S3-API server on loopback, in its own process.

Tests of S3-backed storage need a server that speaks the S3 protocol without
reaching any cloud: moto's standalone server (``python -m moto.server``, from
``moto[server]``) runs as a subprocess on a free loopback port, keeps its
buckets in memory and accepts any credentials. :meth:`S3Server.env` and
:meth:`S3Server.storage_options` give clients (boto3, ``fsspec``/``s3fs``) the
endpoint and fake credentials, so nothing falls back to a real account.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import requests
from pgserver import _free_port

ACCESS_KEY_ID = "silo-test-key"
SECRET_ACCESS_KEY = "silo-test-secret"
REGION = "us-east-1"
START_TIMEOUT_S = 30.0


class S3Server:
    """moto's S3 server as a subprocess; a context manager that stops it on exit."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.root = Path(tempfile.mkdtemp(prefix="silo-s3-"))
        self.log_path = self.root / "moto.log"
        self._log: IO[bytes] | None = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env()},
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                self.stop()
                raise RuntimeError(f"moto server exited at start:\n{self.log()}")
            try:
                requests.get(self.endpoint_url + "/moto-api/", timeout=1)
                return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not start:\n{self.log()}")
            time.sleep(0.1)

    def env(self) -> dict[str, str]:
        """Environment variables pointing AWS clients at this server with fake credentials."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``fsspec.filesystem("s3", ...)`` (s3fs) on this server."""
        return {
            "key": ACCESS_KEY_ID,
            "secret": SECRET_ACCESS_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
        }

    def create_bucket(self, name: str | None = None) -> str:
        """Create an empty bucket and return its name."""
        name = name or "silo-" + uuid.uuid4().hex[:12]
        response = requests.put(f"{self.endpoint_url}/{name}", timeout=10)
        response.raise_for_status()
        return name

    def reset(self) -> None:
        """Delete every bucket and object."""
        requests.post(self.endpoint_url + "/moto-api/reset", timeout=10).raise_for_status()

    def log(self) -> str:
        """What the server has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop the server (its data is lost) and delete its files."""
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
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
