"""The S3 helper: a real S3-API server in another process, used through fsspec/s3fs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import fsspec
import pytest
import requests
from s3server import S3Server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


def test_write_and_read_through_fsspec(s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket()
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_server.storage_options())
    with fs.open(f"{bucket}/dir/hello.txt", "wb") as handle:
        handle.write(b"hello s3")
    assert fs.cat(f"{bucket}/dir/hello.txt") == b"hello s3"
    assert fs.info(f"{bucket}/dir/hello.txt")["size"] == 8
    assert fs.ls(f"{bucket}/dir") == [f"{bucket}/dir/hello.txt"]
    fs.rm(f"{bucket}/dir/hello.txt")
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/dir/hello.txt")


def test_credentials_from_the_environment(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With :meth:`S3Server.env` set, only the endpoint needs passing."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.create_bucket()
    endpoint = {"endpoint_url": s3_server.endpoint_url}
    writer = fsspec.filesystem("s3", client_kwargs=endpoint, skip_instance_cache=True)
    writer.pipe(f"{bucket}/blob.bin", bytes(range(256)) * 1000)
    with fsspec.open(f"s3://{bucket}/blob.bin", "rb", client_kwargs=endpoint) as handle:
        assert handle.read() == bytes(range(256)) * 1000


def test_server_is_a_separate_process_and_stops() -> None:
    server = S3Server()
    process = server._process
    assert process is not None
    assert process.pid != os.getpid()
    bucket = server.create_bucket("silo-stop-test")
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options())
    assert fs.ls(bucket) == []
    server.reset()
    fs.invalidate_cache()
    assert not fs.exists(bucket)
    server.stop()
    assert process.poll() is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(server.endpoint_url, timeout=1)
    assert not server.root.exists()
