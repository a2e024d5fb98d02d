"""Serving a stored file over HTTP, from any backend, as a browser and a cache expect.

The response streams from the backend's stream (a local file, the database's
chunks, an fsspec object) and is conditional: ``ETag`` is the file's SHA-256
(a strong validator: the same bytes on every machine), ``Last-Modified`` its
row's time, so ``If-None-Match`` / ``If-Modified-Since`` get ``304`` and
``If-Range`` is honoured; a single ``Range`` gets ``206`` starting at its
chunk, one that cannot be satisfied ``416`` with ``Content-Range: bytes */size``
(JSON, like every silo error); several ranges get the whole file.
``Content-Disposition`` carries the sanitised name (RFC 6266, with an ASCII
fallback), ``X-Content-Type-Options: nosniff``, and a file shown inline is
sandboxed (``Content-Security-Policy``) so an uploaded HTML page cannot run
script on the API's origin. Caching is the session's: private to the client,
revalidated on every use (``Cache-Control: private, no-cache``; the extension
adds ``Vary`` on the SID header).
"""

from __future__ import annotations

import mimetypes
import unicodedata
from typing import TYPE_CHECKING
from urllib.parse import quote

from flask import Response, jsonify, request
from werkzeug.exceptions import RequestedRangeNotSatisfiable
from werkzeug.wsgi import FileWrapper, wrap_file

from .errors import FileNotStored
from .files import CHUNK, safe_filename

if TYPE_CHECKING:
    from .files import FileStore

INLINE_POLICY = "default-src 'none'; img-src 'self'; media-src 'self'; sandbox"
"""A file shown inline runs no script and loads nothing else (an uploaded HTML page)."""


def send(
    files: FileStore,
    sid: str,
    filename: str,
    *,
    as_attachment: bool = False,
    download_name: str | None = None,
) -> Response:
    """See :meth:`FileStore.send`."""
    info = files.stat(sid, filename)
    if info is None:
        raise FileNotStored(filename)
    stream = files.open(sid, info.name)
    mimetype = info.content_type or mimetypes.guess_type(info.name)[0]
    # A range seeks to its start in werkzeug's wrapper; a whole file may go through
    # the server's own (gunicorn sends a local file with sendfile).
    body = (
        FileWrapper(stream, CHUNK)
        if "HTTP_RANGE" in request.environ
        else wrap_file(request.environ, stream, buffer_size=CHUNK)
    )
    response = Response(
        body,
        mimetype=mimetype or "application/octet-stream",
        direct_passthrough=True,
    )
    response.content_length = info.size_bytes
    if info.sha256:
        response.set_etag(info.sha256)
    if info.created_at is not None:
        response.last_modified = info.created_at
    name = download_name if download_name is not None else info.name
    disposition(response, name, as_attachment=as_attachment)
    response.headers["X-Content-Type-Options"] = "nosniff"
    if not as_attachment:
        response.headers["Content-Security-Policy"] = INLINE_POLICY
    response.cache_control.private = True
    response.cache_control.no_cache = True
    try:
        response.make_conditional(request, accept_ranges=True, complete_length=info.size_bytes)
    except RequestedRangeNotSatisfiable:
        stream.close()
        refused = jsonify(
            error="range_not_satisfiable",
            message="The requested range is outside the file.",
        )
        refused.status_code = 416
        refused.headers["Content-Range"] = f"bytes */{info.size_bytes}"
        refused.headers["Accept-Ranges"] = "bytes"
        refused.cache_control.private = True
        refused.cache_control.no_cache = True
        return refused
    if response.status_code == 304:
        stream.close()
    return response


def disposition(response: Response, name: str, *, as_attachment: bool) -> None:
    """``Content-Disposition`` with a name no header or path trick gets through."""
    try:
        safe = safe_filename(name)
    except ValueError:
        safe = "download"
    kind = "attachment" if as_attachment else "inline"
    try:
        safe.encode("ascii")
    except UnicodeEncodeError:
        simple = unicodedata.normalize("NFKD", safe).encode("ascii", "ignore").decode("ascii")
        quoted = quote(safe, safe="!#$&+-.^_`|~")
        names = {"filename": simple or "download", "filename*": f"UTF-8''{quoted}"}
        response.headers.set("Content-Disposition", kind, **names)
        return
    response.headers.set("Content-Disposition", kind, filename=safe)
