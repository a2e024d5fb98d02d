"""Serving a stored file over HTTP, from any backend, as a browser and a cache expect.

The response streams from the backend's stream (a local file, the database's
chunks, an fsspec object) and is conditional: ``ETag`` is the file's SHA-256
(a strong validator: the same bytes on every machine), ``Last-Modified`` its
row's time, so ``If-Match`` / ``If-Unmodified-Since`` that do not hold get ``412``
(JSON), ``If-None-Match`` / ``If-Modified-Since`` get ``304`` (before any range)
and ``If-Range`` is honoured on a strong match; a single ``Range`` gets ``206``
starting at its chunk, one that cannot be satisfied ``416`` with
``Content-Range: bytes */size`` (JSON, like every silo error); several ranges,
another unit or a malformed header get the whole file (RFC 9110 section 14).
``Content-Disposition`` carries the name cleaned of paths and control characters,
in UTF-8 (``filename*``) beside an ASCII ``filename`` (RFC 6266),
``X-Content-Type-Options: nosniff``, and a file shown inline is
sandboxed (``Content-Security-Policy``) so an uploaded HTML page cannot run
script on the API's origin. Caching is the session's: private to the client,
revalidated on every use (``Cache-Control: private, no-cache``; the extension
adds ``Vary`` on the SID header).
"""

from __future__ import annotations

import datetime as dt
import mimetypes
import os
import re
import unicodedata
from typing import IO, Any, Literal
from urllib.parse import quote

from flask import Response, jsonify, request
from werkzeug.http import is_resource_modified, parse_date, parse_etags, unquote_etag
from werkzeug.utils import secure_filename
from werkzeug.wsgi import FileWrapper, wrap_file

from .limits import CHUNK
from .rows import StoredFile

INLINE_POLICY = "default-src 'none'; img-src 'self'; media-src 'self'; sandbox"
"""A file shown inline runs no script and loads nothing else (an uploaded HTML page)."""

MAX_DOWNLOAD_NAME = 200
"""Characters of a download name kept (its extension included)."""

_RANGE_SPEC = re.compile(r"(\d*)[ \t]*-[ \t]*(\d*)")
_BIG = 10**30
"""A position past any file (a range's number of more digits than a file's size can have)."""
_UNSAFE_IN_NAMES = re.compile(r'[<>:"/\\|?*]')


def send(
    info: StoredFile,
    stream: IO[bytes],
    *,
    as_attachment: bool = False,
    download_name: str | None = None,
) -> Response:
    """The response for the file *info* describes, its bytes read from *stream* (closed
    with the response, or here when the answer sends none)."""
    try:
        return _respond(info, stream, as_attachment, download_name)
    except BaseException:
        stream.close()
        raise


def _respond(
    info: StoredFile,
    stream: IO[bytes],
    as_attachment: bool,
    download_name: str | None,
) -> Response:
    size = info.size_bytes
    environ = request.environ
    etag = info.sha256 or None
    last_modified = info.created_at
    # RFC 9110 section 13.2.2, in its order: If-Match / If-Unmodified-Since (412), then a
    # matching If-None-Match / If-Modified-Since (304), before Range, which If-Range
    # decides to count or not; werkzeug is then given the one range to send, or none
    # (it would answer 416 where the RFC ignores, and 412 with the file's bytes).
    if not _preconditions_hold(environ, etag, last_modified):
        stream.close()
        return _failed_precondition()
    conditional = dict(environ)
    for checked in ("HTTP_IF_RANGE", "HTTP_IF_MATCH", "HTTP_IF_UNMODIFIED_SINCE"):
        conditional.pop(checked, None)
    wanted: tuple[int, int] | Literal[False] | None = None
    if (
        "HTTP_RANGE" in environ
        and is_resource_modified(conditional, etag, last_modified=last_modified)
        and _if_range_holds(environ.get("HTTP_IF_RANGE"), etag, last_modified)
    ):
        wanted = byte_range(environ["HTTP_RANGE"], size)
    if wanted is False:
        stream.close()
        return _refused(size)
    if wanted is None:
        conditional.pop("HTTP_RANGE", None)
    else:
        conditional["HTTP_RANGE"] = f"bytes={wanted[0]}-{wanted[1] - 1}"
    mimetype = info.content_type or mimetypes.guess_type(info.name)[0]
    # A range seeks to its start in werkzeug's wrapper; a whole file may go through
    # the server's own (gunicorn sends a local file with sendfile).
    body = (
        FileWrapper(stream, CHUNK)
        if wanted is not None
        else wrap_file(environ, stream, buffer_size=CHUNK)
    )
    response = Response(
        body,
        mimetype=mimetype or "application/octet-stream",
        direct_passthrough=True,
    )
    _describe(response, info, as_attachment, download_name)
    response.make_conditional(conditional, accept_ranges=True, complete_length=size)
    if response.status_code == 304:
        stream.close()
    return response


def _describe(
    response: Response, info: StoredFile, as_attachment: bool, download_name: str | None
) -> None:
    """The headers that say what the file is: its length, ETag, date, name, and that a
    browser must not take it for anything else."""
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


def byte_range(header: str, size: int) -> tuple[int, int] | Literal[False] | None:
    """The ``[start, stop)`` a ``Range`` header asks of a file of *size* bytes.

    None: send the whole file (RFC 9110 section 14.2: a header of another unit, or
    of invalid syntax, is ignored; several ranges are answered with the whole file,
    and so is any range of an empty file). False: no range is satisfiable (``416``).
    A suffix longer than the file is the whole file; an end past it, the file's end.
    """
    unit, equals, specs = header.partition("=")
    if not equals or unit.strip(" \t").lower() != "bytes":
        return None
    found: list[tuple[int, int]] = []
    asked = False
    for raw in specs.split(","):
        spec = raw.strip(" \t")
        if not spec:
            continue  # an empty list element (RFC 9110 section 5.6.1)
        match = _RANGE_SPEC.fullmatch(spec)
        if match is None or match.group(0).strip(" \t-") == "":
            return None
        asked = True
        first, last = (_position(g) for g in match.groups())
        if first is not None:
            if last is not None and last < first:
                return None  # last-pos before first-pos: an invalid range
            if first < size:
                found.append((first, size if last is None else min(last + 1, size)))
        elif last:  # a suffix: the last *last* bytes (a suffix of 0 is not satisfiable)
            found.append((max(0, size - last), size))
    if not asked or size == 0:
        return None
    if not found:
        return False
    return found[0] if len(found) == 1 else None


def _position(digits: str) -> int | None:
    digits = digits.lstrip("0") or ("0" if digits else "")
    if not digits:
        return None
    return _BIG if len(digits) > 25 else int(digits)


def _if_range_holds(value: str | None, etag: str | None, last_modified: Any) -> bool:
    """Whether ``If-Range`` (absent: yes) lets the ``Range`` count: its entity tag is
    the file's by strong comparison, or, for a file without one, its date is exactly
    ``Last-Modified``. A file with a tag ignores dates: ``Last-Modified`` has whole
    seconds, and a version replaced within the second would continue the old one's
    partial download with its own bytes (RFC 9110 section 13.1.5: a weak validator)."""
    if value is None:
        return True
    value = value.strip(" \t")
    if value.startswith(('"', "W/")):
        tag, weak = unquote_etag(value)
        return not weak and etag is not None and value.endswith('"') and tag == etag
    date = parse_date(value)
    if etag is not None or date is None or not isinstance(last_modified, dt.datetime):
        return False
    return date == last_modified.astimezone(dt.timezone.utc).replace(microsecond=0)


def _preconditions_hold(environ: Any, etag: str | None, last_modified: Any) -> bool:
    """``If-Match`` (``*`` or a strong match of the file's tag), else a valid
    ``If-Unmodified-Since`` no earlier than ``Last-Modified``: both hold when absent."""
    if_match = environ.get("HTTP_IF_MATCH")
    if if_match is not None:
        tags = parse_etags(if_match)
        return tags.star_tag or (etag is not None and tags.contains(etag))
    since = parse_date(environ.get("HTTP_IF_UNMODIFIED_SINCE"))
    if since is None or not isinstance(last_modified, dt.datetime):
        return True
    return last_modified.astimezone(dt.timezone.utc).replace(microsecond=0) <= since


def _failed_precondition() -> Response:
    failed = jsonify(
        error="precondition_failed",
        message="The file is not the version the request's If-Match or If-Unmodified-Since names.",
    )
    failed.status_code = 412
    failed.cache_control.private = True
    failed.cache_control.no_cache = True
    return failed


def _refused(size: int) -> Response:
    refused = jsonify(
        error="range_not_satisfiable",
        message="The requested range is outside the file.",
    )
    refused.status_code = 416
    refused.headers["Content-Range"] = f"bytes */{size}"
    refused.headers["Accept-Ranges"] = "bytes"
    refused.cache_control.private = True
    refused.cache_control.no_cache = True
    return refused


def disposition(response: Response, name: str, *, as_attachment: bool) -> None:
    """``Content-Disposition`` with a name no header or path trick gets through: the
    name in UTF-8 (``filename*``, RFC 6266 and 8187) and an ASCII ``filename``."""
    kind = "attachment" if as_attachment else "inline"
    shown = download_name(name)
    simple = ascii_name(shown)
    if simple == shown:
        response.headers.set("Content-Disposition", kind, filename=simple)
        return
    names = {"filename": simple, "filename*": "UTF-8''" + quote(shown, safe="!#$&+-.^_`|~")}
    response.headers.set("Content-Disposition", kind, **names)


def download_name(name: str) -> str:
    """*name* as a browser may save it: its last path part, without control or format
    characters (CR, LF, NUL, bidirectional overrides), characters no file system takes,
    leading dots or trailing dots and spaces; ``download`` when nothing is left."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] not in "CZ" or ch == " ")
    name = _UNSAFE_IN_NAMES.sub("_", name).strip(" .")
    if len(name) > MAX_DOWNLOAD_NAME:
        root, ext = os.path.splitext(name)
        ext = ext if len(ext) < MAX_DOWNLOAD_NAME // 2 else ""
        name = root[: MAX_DOWNLOAD_NAME - len(ext)].rstrip(" .") + ext
    return name or "download"


def ascii_name(name: str) -> str:
    """An ASCII stand-in for *name* (``filename`` beside ``filename*``): accents
    dropped, werkzeug's ``secure_filename`` applied to its stem and its extension."""
    root, ext = os.path.splitext(name)

    def plain(text: str) -> str:
        folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
        return secure_filename(folded)

    stem, suffix = plain(root), plain(ext)
    return (stem or "download") + (f".{suffix}" if suffix else "")
