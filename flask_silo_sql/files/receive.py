"""An upload on its way in: its size checked, its bytes streamed to the store's backend
in pieces, reserved against the session's quota as they come, then staged for the commit.

:class:`~flask_silo_sql.files.FileStore` hands the body here whole; it goes down from
here (sizing and pieces, then the backend's sink), never back up to the store.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import time
from collections.abc import Iterator

from ..errors import FileTooLarge, InsufficientStorage, SiloError
from ..logs import log_failure, silo_logger
from .body import Piece, Readable, announced_length, declared_size, pieces
from .digest import StreamDigest
from .failures import storage_error
from .limits import CHUNK, FREE_SPACE_STEP, HEARTBEAT_S, TEMP_PREFIX
from .records import FileRecords, StoreView
from .rows import FileRow, Reservation
from .staging import StagedUpload

logger = silo_logger("flask_silo_sql.files")


def check_free_space(store: StoreView, directory: str, database_dir: str | None) -> None:
    """``507`` while the disk holding *directory* (and *database_dir*, an SQLite database's,
    when the bytes go to it) has less free space than the store's ``min_free_bytes``: the
    database keeps room."""
    floor = store.min_free_bytes
    if not floor:
        return
    places = [directory]
    if database_dir and store.blobs.kind == "database":
        places.append(database_dir)
    for place in places:
        try:
            free = shutil.disk_usage(place).free
        except OSError:
            continue
        if free < floor:
            logger.warning(
                "file store %r refused an upload: %d bytes free, the floor is %d",
                store.name,
                free,
                floor,
            )
            raise InsufficientStorage(store.name)


@contextlib.contextmanager
def upload_errors(store: StoreView, records: FileRecords, row: FileRow) -> Iterator[None]:
    """A file operation of an upload that fails because its session was reset,
    rotated or expired meanwhile (its directory went or moved): the upload was
    interrupted (``409``/``410``, as its pending row says), not a storage error."""
    try:
        yield
    except SiloError:
        raise
    except OSError as exc:
        interrupted = records.interrupted(row)
        if interrupted is not None:
            raise interrupted from None
        raise storage_error(exc, store.name, row.sid, "store a file") from None


def incoming(
    store: StoreView,
    sid: str,
    name: str,
    data: Readable | bytes,
    *,
    size: int | None,
    database_dir: str | None,
) -> tuple[int | None, str, Iterator[Piece]]:
    """An upload's declared size, its session's directory and its pieces, once its size
    and the free space allow it (what every upload checks before a byte is read)."""
    declared = size if size is not None else declared_size(data)
    # A body that says nothing of its size (a server's own stream) is held to the
    # request's Content-Length: read whole, or refused.
    announced = announced_length(data) if declared is None else None
    if declared is None:
        declared = announced
    limit = store.max_file_bytes
    if declared is not None and limit is not None and declared > limit:
        raise FileTooLarge(name, declared, limit)
    check_free_space(store, store.base_dir, database_dir)  # a refusal creates no directory
    directory = store.session_dir(sid)
    return declared, directory, pieces(data, declared, announced)


def save(
    store: StoreView,
    sid: str,
    name: str,
    data: Readable | bytes,
    *,
    records: FileRecords,
    content_type: str | None,
    size: int | None,
) -> str:
    """Store *data* as *name* of session *sid* (see :meth:`FileStore.save
    <flask_silo_sql.files.FileStore.save>`); the local path of the stored file."""
    declared, directory, chunks = incoming(
        store, sid, name, data, size=size, database_dir=records.database_dir
    )
    row = FileRow(
        sid,
        name,
        0,
        "",
        content_type,
        backend=store.blobs.kind,
        host=store.host if store.blobs.kind == "local" else None,
        location=store.blobs.new_location(name),
    )
    return _save_recorded(store, records, row, declared, directory, chunks)


def _save_recorded(
    store: StoreView,
    records: FileRecords,
    row: FileRow,
    declared: int | None,
    directory: str,
    chunks: Iterator[Piece],
) -> str:
    """Under a pending row (which reserves the bytes), streamed, then staged."""
    pending = TEMP_PREFIX + secrets.token_hex(8)
    reservation = records.begin(
        row, pending_name=pending, reserve=declared or 0, quota=store.max_session_bytes
    )
    if reservation.stale:
        store.drop_bytes(reservation.stale)
    row.id = reservation.id
    try:
        upload = _receive(store, records, row, reservation, directory, pending, chunks)
    except BaseException:
        with contextlib.suppress(Exception):
            records.release(row, reservation.id)
        raise
    with upload_errors(store, records, row):
        records.stage(upload)
        if not os.path.lexists(upload.path):  # its session moved meanwhile?
            raise FileNotFoundError(errno.ENOENT, "stored, then gone", upload.path)
    return upload.path


def _receive(
    store: StoreView,
    records: FileRecords,
    row: FileRow,
    reservation: Reservation,
    directory: str,
    pending: str,
    chunks: Iterator[Piece],
) -> StagedUpload:
    """Stream *chunks* to the backend (and a local temporary file), reserving as they
    come.

    Past what was reserved, each chunk reserves what it adds (with a quota),
    so concurrent uploads of unknown size never take more than is left.
    """
    limit = store.max_file_bytes
    quota = store.max_session_bytes
    digest = StreamDigest()  # hashed beside the writes
    size = 0
    checked = 0
    beat = time.monotonic()
    with upload_errors(store, records, row):
        sink = store.blobs.sink(row, directory, pending)
    try:
        while True:
            chunk = next(chunks, None)  # the client's own errors pass as they are
            if chunk is None:
                break
            size += len(chunk)
            if limit is not None and size > limit:
                raise FileTooLarge(row.filename, size, limit)
            if size - checked >= FREE_SPACE_STEP:
                check_free_space(store, directory, records.database_dir)
                checked = size
            over = quota is not None and size > reservation.reserved
            if over or time.monotonic() - beat > HEARTBEAT_S:
                target = max(size, reservation.reserved + CHUNK)  # ahead, by the chunk
                records.reserve(reservation, row, needed=size, target=target, quota=quota)
                beat = time.monotonic()
            digest.update(chunk)
            with upload_errors(store, records, row):
                sink.write(chunk)
        with upload_errors(store, records, row):
            sink.finish()
    except BaseException:
        try:
            sink.abort()
        except Exception as again:
            log_failure(logger, "could not remove a partial upload", exc=again, sid=row.sid)
        raise
    row.size_bytes = size
    row.sha256 = digest.hexdigest()
    return StagedUpload(store.blobs, row, reservation, sink.tmp, sink.path(row))
