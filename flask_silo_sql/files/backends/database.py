"""``database``: the bytes in ``silo_file_chunks`` (see :mod:`flask_silo_sql.files.backends`)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import IO, Any, cast

from ...errors import FileCorrupt, FileStorageError
from ...logs import silo_logger
from ..blobs import Sink
from ..body import Piece
from ..digest import StreamDigest
from ..limits import CHUNK
from ..records import FileRecords, StoreView
from ..rows import FileRow
from .cache import Cache, CachedSink

logger = silo_logger("flask_silo_sql.files")


class ChunkSink(CachedSink):
    """An upload into ``silo_file_chunks``: each full chunk one ``INSERT`` as it comes."""

    def __init__(
        self, records: FileRecords, row: FileRow, cache: Cache, directory: str, tmp_name: str
    ) -> None:
        super().__init__(cache, directory, tmp_name)
        self.records = records
        self.row = row
        self._buffer = bytearray()
        self._seq = 0

    def send(self, chunk: Piece) -> None:
        buffer = self._buffer
        if not buffer and len(chunk) == CHUNK:
            self._put(chunk)  # a whole chunk as it came: no copy
            return
        buffer += chunk
        while len(buffer) >= CHUNK:
            self._put(bytes(buffer[:CHUNK]))
            del buffer[:CHUNK]

    def _put(self, data: Piece) -> None:
        assert self.row.id is not None
        self.records.put_chunk(self.row, self.row.id, self._seq, data)
        self._seq += 1

    def flush(self) -> None:
        if self._buffer:
            self._put(bytes(self._buffer))
            self._buffer.clear()

    def cancel(self) -> None:
        self._buffer.clear()  # the chunks go with the pending row


class ChunkReader(io.RawIOBase):
    """The bytes of a ``database`` file, read one chunk (one ``SELECT``) at a time.

    Seekable, so ranges start at their chunk. Read from its start to its end, it
    checks the bytes against the row's SHA-256 (a mismatch is logged and raised
    at the end; *verify* False: a caller that hashes them itself). A file replaced
    while it is read ends the read with an error.
    """

    def __init__(
        self, store: StoreView, records: FileRecords, row: FileRow, *, verify: bool = True
    ) -> None:
        super().__init__()
        assert row.id is not None
        self.store = store
        self.records = records
        self.row = row
        self.file_id = row.id
        self.size = row.size_bytes
        self._pos = 0
        self._chunk_size = CHUNK
        self._seq = -1
        self._data = b""
        self._digest: StreamDigest | None = StreamDigest() if verify else None
        self._hashed = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            offset += self.size
        self._pos = max(0, offset)
        if self._pos != self._hashed:
            self._digest = None  # not read straight through: nothing to check
        return self._pos

    def _load(self, seq: int) -> None:
        data = self.records.read_chunk(self.file_id, seq, self.row.sha256)
        if data is None:
            raise FileStorageError(
                self.store.name, "read a file", "its bytes changed while they were read"
            )
        if seq == 0 and self.size > len(data):
            self._chunk_size = len(data)
        self._seq, self._data = seq, bytes(data)

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self.size:
            self._check()
            return 0
        seq, offset = divmod(self._pos, self._chunk_size)
        if seq != self._seq:
            if seq > 0 and self._seq < 0 and self._chunk_size == CHUNK:
                self._load(0)  # learn the chunk size the file was written with
                seq, offset = divmod(self._pos, self._chunk_size)
            if seq != self._seq:
                self._load(seq)
        piece = memoryview(self._data)[offset : offset + len(buffer)]  # copied once, below
        if not piece:
            raise FileStorageError(self.store.name, "read a file", "a chunk is missing")
        view = memoryview(buffer)
        view[: len(piece)] = piece
        if self._digest is not None and self._hashed == self._pos:
            self._digest.update(piece, last=self._pos + len(piece) == self.size)
            self._hashed += len(piece)
        self._pos += len(piece)
        return len(piece)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._pos
        if self._pos >= self.size:
            self._check()
            return b""
        seq, offset = divmod(self._pos, self._chunk_size)
        if offset == 0 and size >= self._chunk_size and seq != self._seq:
            self._load(seq)  # whole chunks: no copy through a buffer
            piece = self._data[: min(size, len(self._data))]
            if self._digest is not None and self._hashed == self._pos:
                self._digest.update(piece, last=self._pos + len(piece) == self.size)
                self._hashed += len(piece)
            self._pos += len(piece)
            return piece
        buffer = bytearray(min(size, self.size - self._pos))
        got = self.readinto(buffer)
        return bytes(buffer[:got])

    def _check(self) -> None:
        digest, self._digest = self._digest, None
        if digest is None or self._hashed != self.size:
            return
        if digest.hexdigest() != self.row.sha256:
            logger.error(
                "file store %r: the chunks of a file do not match its SHA-256", self.store.name
            )
            raise FileCorrupt(self.row.filename)


class DatabaseBytes:
    """``database``: the bytes in ``silo_file_chunks`` (see the module docstring)."""

    kind = "database"

    def __init__(self, store: StoreView) -> None:
        self.store = store
        self.cache = Cache(store)

    def _records(self) -> FileRecords:
        """The store's rows (a store without them says so, naming what it needs)."""
        return self.store.records

    def new_location(self, name: str) -> str | None:
        return None

    def sink(self, row: FileRow, directory: str, tmp_name: str) -> Sink:
        return ChunkSink(self._records(), row, self.cache, directory, tmp_name)

    def install(self, tmp: str, path: str) -> None:
        self.cache.install(tmp, path)

    def drop_upload(self, row: FileRow, path: str) -> None:
        self.cache.drop(row, path)

    def here(self, row: FileRow) -> bool:
        return True

    def open(self, row: FileRow, *, buffered: bool = True) -> IO[bytes]:
        reader = ChunkReader(self.store, self._records(), row)
        if not buffered:  # a whole chunk read is the driver's bytes themselves
            return cast(IO[bytes], reader)
        return io.BufferedReader(reader, CHUNK)

    def local_copy(self, row: FileRow) -> str | None:
        return self.cache.get(row, lambda: self.open(row, buffered=False))

    def remove(self, rows: list[FileRow]) -> None:
        for row in rows:  # the chunks went with their rows; the cached copies go now
            if row.sha256 and not row.pending:
                self.cache.drop(row)

    def remove_session(self, sid: str) -> None:
        return None

    def remove_all(self) -> None:
        return None

    def move_session(self, old: str, new: str) -> Callable[[], None]:
        return lambda: None
