"""View decorators: ``@silo.idempotent`` (one run per Idempotency-Key) and ``@silo.locked``.

An idempotent view claims the request's key before it runs (see
:mod:`flask_silo_sql.idempotency`): a duplicate of a request in flight is
answered ``409`` with ``Retry-After`` (or, with ``wait``, the first one's
response once it is there); a retry after the first one answered gets that
response again, byte for byte, marked ``Idempotent-Replayed: true``, and
changes nothing. The view's response is stored by the request's commit, with
its state changes (the extension's ``after_request`` stages it); a view that
raises, answers ``5xx`` or dies with its worker leaves the key free for a
retry, and a raising view's state changes are discarded with it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from io import BytesIO
from tempfile import SpooledTemporaryFile
from typing import IO, Any, Protocol, TypeVar

from flask import Response, current_app, request

from .app_state import SiloApp, current_request
from .backends import MemoryBackend
from .errors import (
    IdempotencyKeyInFlight,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    IdempotencyUnsupported,
    IdempotentResponseNotKept,
    ResponseNotStorable,
    SessionExpired,
)
from .idempotency import (
    CHUNK,
    REPLAYED_HEADER,
    SPOOL_MEMORY_BYTES,
    Claim,
    Found,
    IdempotencyRecords,
    KeyRequest,
    StoredResponse,
    fingerprint,
    key_hash,
    parse_key,
    storable_headers,
)
from .setup_checks import wrapping


class Extension(Protocol):
    """What a view decorator needs of its :class:`~flask_silo_sql.Silo`."""

    _apps: list[SiloApp]
    _header: str

    def _app_state(self) -> SiloApp: ...

View = TypeVar("View", bound=Callable[..., Any])

FIRST_POLL_S = 0.02
LAST_POLL_S = 0.25
RETRY_AFTER_S = 1
"""``Retry-After`` of a ``409`` for a key in flight: the first request usually ends soon."""


class IdempotentOptions:
    """What ``@silo.idempotent(...)`` was given."""

    __slots__ = ("lease", "required", "scope", "ttl", "wait")

    def __init__(
        self,
        ttl: float,
        required: bool,
        wait: float,
        scope: Callable[[], object] | None,
        lease: float | None,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        if not wait >= 0:
            raise ValueError(f"wait must be 0 or more seconds, not {wait!r}")
        if lease is not None and not lease > 0:
            raise ValueError(f"lease must be a positive number of seconds, not {lease!r}")
        if scope is not None and not callable(scope):
            raise TypeError("scope must be a callable returning the principal (or None)")
        self.ttl = float(ttl)
        self.required = required
        self.wait = float(wait)
        self.scope = scope
        self.lease = lease


def idempotent_view(silo: Extension, view: View, options: IdempotentOptions) -> View:
    """*view*, run at most once per Idempotency-Key (see the module docstring)."""
    if silo._apps and all(isinstance(a.store.backend, MemoryBackend) for a in silo._apps):
        raise IdempotencyUnsupported()
    wrapping(silo._apps, view, "idempotent")  # not above @app.route

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _run(silo, view, options, args, kwargs)

    return wrapper  # type: ignore[return-value]


def locked_view(silo: Extension, view: View) -> View:
    """*view* with its session locked from its start to the response (``lock=True``)."""
    wrapping(silo._apps, view, "locked")  # not above @app.route

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        unit = current_request().unit
        if not unit.locked:
            if unit.loaded:
                raise RuntimeError(
                    "@silo.locked: state was read before the view ran; the lock must come first"
                )
            unit.lock()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _run(
    silo: Extension,
    view: Callable[..., Any],
    options: IdempotentOptions,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    state = current_request()
    app_state = silo._app_state()
    records = app_state.store.backend.idempotency_records()  # IdempotencyUnsupported: none
    header = app_state.idempotency_header
    key = parse_key(header, request.headers.getlist(header))
    if key is None:
        if options.required:
            raise IdempotencyKeyMissing(header)
        return view(*args, **kwargs)
    if state.claim is not None:
        raise RuntimeError("@silo.idempotent views cannot call one another in one request")
    if state.issued:
        # The client sent no session: a retry would come without one too, so no
        # record could be found again; the view runs as it would without a key.
        return view(*args, **kwargs)
    wanted = _key_request(app_state, options, header, key)
    if app_state.store.session_max_age is not None:
        # A session past its absolute lifetime ends now, its keys with it: the claim
        # then finds no session and answers as for an expired one (a retry under this
        # SID cannot be told from a new request).
        state.unit.expired()
    try:
        outcome = _claim(records, wanted, options.wait)
    except SessionExpired:
        state.gone = True  # the SID's session ended (or was rotated away): nothing to save
        raise
    if isinstance(outcome, StoredResponse):
        state.replayed = True
        if not outcome.kept:
            raise IdempotentResponseNotKept(header, outcome.status, wanted.max_response_bytes)
        return _replay(outcome)
    state.claim = outcome
    state.records = records
    return _answer(silo, view, args, kwargs, outcome, wanted.max_response_bytes)


def _key_request(
    app_state: SiloApp, options: IdempotentOptions, header: str, key: str
) -> KeyRequest:
    """What this request claims: its key (scoped to its method, route and principal) and
    the fingerprint of what it sends (its body spooled for the view when read here)."""
    state = current_request()
    principal = None if options.scope is None else _principal(options.scope())
    route = request.url_rule.rule if request.url_rule is not None else request.path
    body, unread = _body()
    raw_path = request.environ.get("PATH_INFO", "").encode("latin-1", "replace")
    digest, spool = fingerprint(
        request.method,
        raw_path,
        request.query_string,
        request.content_type,
        body,
        request.content_length if unread else None,
    )
    if spool is not None:
        state.spool = spool
        if unread:
            request.__dict__["stream"] = spool  # the view reads the body from the spool
    return KeyRequest(
        header=header,
        sid=state.key,
        key_hash=key_hash(request.method, route, principal, key),
        key=key,
        method=request.method,
        route=route,
        fingerprint=digest,
        ttl=options.ttl,
        lease=options.lease or app_state.idempotency_lease,
        max_keys=app_state.idempotency_max_keys,
        max_response_bytes=app_state.idempotency_max_response,
    )


def _answer(
    silo: Extension,
    view: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    claim: Claim,
    limit: int | None,
) -> Any:
    """Run the view under the claimed key; its response is kept with the request's commit
    (only its status when larger than *limit*: it is sent, but not replayed)."""
    state = current_request()
    try:
        response = current_app.make_response(view(*args, **kwargs))
    except BaseException:
        state.view_failed = True
        raise
    if response.is_streamed or response.direct_passthrough:
        state.view_failed = True
        raise ResponseNotStorable(getattr(view, "__name__", repr(view)))
    sent = response.get_data()
    if limit is not None and len(sent) > limit:  # sent, saved, but not kept for a replay
        claim.response = StoredResponse(response.status_code, [], None)
    else:
        claim.response = StoredResponse(
            response.status_code,
            storable_headers(response.headers.items(), silo._header),
            sent,
        )
    return response


def _principal(value: object) -> str | None:
    """The scope's principal as text: one that has a stable text (the same for the same
    principal in every request and process), or a retry would never find its key."""
    if value is None or isinstance(value, str):
        return value
    kind = type(value)
    if kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__:
        raise TypeError(
            f"@silo.idempotent: scope returned a {kind.__name__} whose text names the "
            "object, not the principal (it differs in every request); return its ID"
        )
    return str(value)


def _claim(records: IdempotencyRecords, wanted: KeyRequest, wait: float) -> Claim | StoredResponse:
    """The key claimed for this request, or the stored response to replay."""
    deadline = time.monotonic() + wait
    pause = FIRST_POLL_S
    while True:
        outcome = records.claim(wanted)
        if isinstance(outcome, Claim):
            return outcome
        found: Found | None = outcome
        while found is not None:
            if found.fingerprint != wanted.fingerprint:
                raise IdempotencyKeyReused(wanted.header)
            if found.response is not None:
                return found.response
            if found.lease_left <= 0:  # the request holding it died: run the view again
                taken = records.take_over(wanted, found)
                if taken is not None:
                    return taken
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IdempotencyKeyInFlight(wanted.header, RETRY_AFTER_S)
                time.sleep(min(pause, left))
                pause = min(pause * 2, LAST_POLL_S)
            found = records.read(wanted)
        # The record went (its request failed and released it): claim it again.


def _replay(stored: StoredResponse) -> Response:
    response = current_app.response_class(
        stored.body, status=stored.status, headers=stored.headers
    )
    response.headers[REPLAYED_HEADER] = "true"
    return response


def _body() -> tuple[IO[bytes] | None, bool]:
    """The request body to hash (None: there is none), and whether it is the unread
    stream (the view will read the spooled copy instead); something may have read it
    before the view."""
    if not request.content_length and not _chunked():
        return None, False  # werkzeug gives such a request an empty stream
    cached = getattr(request, "_cached_data", None)
    if cached is not None:  # request.get_data() was called: the bytes are at hand
        return BytesIO(cached), False
    if "form" in request.__dict__:  # parsed already (a before_request read request.form)
        return _parsed_form(), False
    return request.stream, True


def _chunked() -> bool:
    """Whether a body comes without a length (HTTP/1.1: a body has one or is chunked)."""
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def _parsed_form() -> IO[bytes]:
    """The parsed form and files, laid out unambiguously (their raw bytes are gone)."""
    out: IO[bytes] = SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115

    def field(data: bytes) -> None:
        out.write(len(data).to_bytes(8, "big"))
        out.write(data)

    for name, value in request.form.items(multi=True):
        field(b"form")
        field(name.encode())
        field(value.encode())
    for name, upload in request.files.items(multi=True):
        field(b"file")
        field(name.encode())
        field((upload.filename or "").encode())
        field((upload.content_type or "").encode())
        stream = upload.stream
        while chunk := stream.read(CHUNK):
            out.write(chunk)
        stream.seek(0)
    out.seek(0)
    return out
