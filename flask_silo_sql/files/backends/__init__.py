"""Where a file store's bytes live: this machine's disk, the database, or an fsspec URL.

* :class:`LocalBytes` (``local``, the default): ``<base_dir>/<key>/<name>`` on
  the machine that received the upload; its rows record that machine
  (``host``), and other machines answer ``None``/``409`` for them.
* :class:`DatabaseBytes` (``database``): the bytes in ``silo_file_chunks``,
  1 MiB per row, written as they arrive (each chunk one short transaction, none
  held open while the client sends; on PostgreSQL its commit does not wait for
  the WAL flush, which the file's row, committed after it, waits for) and
  deleted with their row, so with their session, by the transaction that
  deletes it. They are read by their row's id (and hash), so a download reads
  the version it began.
* :class:`FsspecBytes` (an fsspec URL: ``s3://bucket/prefix``,
  ``file:///mnt/shared/uploads``, any installed protocol): each upload goes to
  a new object, ``<url>/<key>/<token>/<name>``, which a row names only once
  the request commits (the row is written last), so no object is ever
  overwritten in place.

A replaced ``database`` or fsspec version keeps its chunks or object for an
hour (its row *retired*), so downloads that began before read it to its end;
a replaced ``local`` version is kept aside until the replacement commits,
then read through the descriptors open on it.

For the last two, ``base_dir`` is this machine's :class:`Cache` of verified
copies (``<base_dir>/<key>/<sha256[:32]>/<name>``, one directory per version),
which ``get_path`` and ``save`` answer with, so code that opens a path keeps
working on any machine. A newer version never removes the copy of another:
the upkeep removes copies no row names once unused for its grace period.
Uploads stream through a local temporary file as well, which becomes the
cached copy on the machine that received them.

Cached copies are not synced to the disk (where the machine says when it
started): the copy is not the file, and a copy that a process wrote is in the
page cache for every process until the machine stops. Only a power cut or a
crash of the machine can lose it, and after one the machine's boot time is
later than the copy's time, so a copy from before the last start is checked
against its row's SHA-256 once before it is used again (and fetched anew if it
does not match).
"""

from __future__ import annotations

from ..blobs import Bytes
from ..records import StoreView
from .database import DatabaseBytes
from .fsspec import FsspecBytes
from .local import LocalBytes
from .urls import check_backend


def make_bytes(store: StoreView) -> Bytes:
    """The backend object of *store*, from its ``backend`` setting."""
    backend = store.backend
    if backend == "local":
        return LocalBytes(store)
    if backend == "database":
        return DatabaseBytes(store)
    if isinstance(backend, str) and "://" in backend:
        return FsspecBytes(store, backend)
    raise ValueError(
        f"file store {store.name!r}: unknown backend {backend!r} "
        "(use 'local', 'database' or an fsspec URL such as 's3://bucket/prefix')"
    )


__all__ = ["DatabaseBytes", "FsspecBytes", "LocalBytes", "check_backend", "make_bytes"]
