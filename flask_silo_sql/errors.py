"""Exceptions raised by flask-silo-sql, each with the HTTP answer it stands for.

Every error derives from :class:`SiloError`, so ``except SiloError`` catches
them all; the first four names are flask-silo 0.1.6's. Each class carries its
HTTP ``status`` and its ``slug`` (the ``error`` field of the JSON body), and
:meth:`SiloError.body` gives that body, so the extension's error handler is a
lookup, not a chain of cases. ``public_message`` is what a client is told;
``str(exc)`` is for logs and may say more (never state, SQL parameters or SIDs).
"""

from __future__ import annotations

from typing import Any, ClassVar

from .sids import tag


class SiloError(Exception):
    """Base class for every flask-silo-sql error."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "silo_error"
    logged: ClassVar[bool] = True
    """Whether the extension logs it when it answers a request with it (an error of ours)."""

    @property
    def http_status(self) -> int:
        """The status the extension answers with."""
        return self.status

    @property
    def public_message(self) -> str:
        """What the client is told (``message`` in the JSON body)."""
        return str(self)

    def details(self) -> dict[str, Any]:
        """Fields of the JSON body besides ``error`` and ``message``."""
        return {}

    def headers(self) -> dict[str, str]:
        """Headers the answer carries besides the JSON body's (``Retry-After``, ...)."""
        return {}

    def body(self) -> dict[str, Any]:
        """The JSON body: ``error`` (the slug), ``message``, and the details."""
        return {"error": self.slug, "message": self.public_message, **self.details()}


EXPIRED_MESSAGE = "Your session has expired due to inactivity. Please re-upload your data."


class SessionExpired(SiloError):
    """A session was expired because it was idle for longer than its TTL."""

    status = 410
    slug = "session_expired"
    logged = False

    def __init__(self, sid: str, message: str | None = None) -> None:
        self.sid = sid
        super().__init__(message or "The session has expired due to inactivity.")

    @property
    def public_message(self) -> str:
        return EXPIRED_MESSAGE


class SessionBusy(SiloError):
    """A session is busy (running work) and cannot be reset or expired now."""

    status = 409
    slug = "session_busy"
    logged = False

    def __init__(self, sid: str, message: str | None = None) -> None:
        self.sid = sid
        super().__init__(message or "The session has active tasks and cannot be modified.")


class NamespaceError(SiloError):
    """A namespace was used that was never registered."""

    slug = "namespace_not_registered"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        super().__init__(f"Namespace '{namespace}' is not registered. Call register() first.")

    def details(self) -> dict[str, Any]:
        return {"namespace": self.namespace}


class StateNotSerializable(SiloError, TypeError):
    """Namespace state holds a value that cannot be stored as JSON.

    Durable state is JSON: the error names the namespace and the top-level key
    whose value failed, and nothing of the session is written. ``invalid_value``
    is True for JSON data that cannot be stored (NaN or Infinity, a NUL
    character, a lone surrogate, nesting too deep, the reserved task key):
    data a client may have sent, answered ``422``; False for a value that is
    not JSON at all (a bug in the application), answered ``500``.
    """

    slug = "state_not_serializable"

    def __init__(
        self, namespace: str, key: str | None, reason: str, *, invalid_value: bool = False
    ) -> None:
        self.namespace = namespace
        self.key = key
        self.invalid_value = invalid_value
        where = f"key '{key}' of namespace '{namespace}'" if key else f"namespace '{namespace}'"
        super().__init__(f"Cannot store {where} as JSON: {reason}")

    @property
    def http_status(self) -> int:
        return 422 if self.invalid_value else 500

    def details(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "key": self.key}


class StateTooLarge(SiloError):
    """A namespace's JSON is larger than the configured ``max_state_bytes``."""

    status = 413
    slug = "state_too_large"
    logged = False

    def __init__(self, namespace: str, size: int, limit: int) -> None:
        self.namespace = namespace
        self.size = size
        self.limit = limit
        super().__init__(
            f"Namespace '{namespace}' would take {size} bytes as JSON; the limit is {limit}."
        )

    def details(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "limit": self.limit}


class StateUnreadable(SiloError):
    """An encrypted namespace's stored value fails authentication (``500``).

    It was changed outside silo, or sealed under a key no longer in
    ``SILO_ENCRYPTION_KEYS``. The request changes nothing: the row stays as it
    is, for an operator to restore (or to put the key back).
    """

    slug = "state_unreadable"

    def __init__(self, namespace: str, sid: str) -> None:
        self.namespace = namespace
        self.sid = sid
        super().__init__(
            f"The stored state of namespace {namespace!r} of session {tag(sid)} fails "
            "authentication: changed outside silo, or sealed under a key that is not in "
            "SILO_ENCRYPTION_KEYS. Nothing was changed; restore the row or the key."
        )

    @property
    def public_message(self) -> str:
        return "The stored state of this session cannot be read."


class FileTooLarge(SiloError):
    """A file (or a session's files together) would exceed a configured byte limit."""

    status = 413
    slug = "file_too_large"
    logged = False

    def __init__(self, filename: str, size: int, limit: int) -> None:
        self.filename = filename
        self.size = size
        self.limit = limit
        super().__init__(f"File '{filename}' exceeds the limit of {limit} bytes.")

    def details(self) -> dict[str, Any]:
        return {"limit": self.limit}


class InsufficientStorage(SiloError):
    """No room for a file: the disk is below the store's free-space floor, or full.

    Answered ``507`` while the database, which the floor keeps room for, goes on
    working; nothing of the upload is kept.
    """

    status = 507
    slug = "insufficient_storage"

    def __init__(self, store: str) -> None:
        self.store = store
        super().__init__(f"File store '{store}' has no room for this file.")

    @property
    def public_message(self) -> str:
        return "There is not enough storage space for this file."


class StateInsufficientStorage(SiloError):
    """No room for more state: the SQLite database's disk is below its free-space floor
    (``SILO_DB_MIN_FREE_BYTES``). Answered ``507``; nothing of the request is written, the
    state it read is kept, and writes that do not grow state (or free it) still work."""

    status = 507
    slug = "insufficient_storage"

    def __init__(self, floor: int) -> None:
        self.floor = floor
        super().__init__(
            "The silo database's disk has less free space than SILO_DB_MIN_FREE_BYTES "
            f"({floor} bytes): state that grows is refused until expired sessions are swept "
            "or the disk is given room."
        )

    @property
    def public_message(self) -> str:
        return "There is not enough storage space to save this state."


class FileStorageError(SiloError):
    """A file operation failed (a disk error, a remote store that does not answer).

    ``500`` for this machine's disk, ``503`` for a remote store. The message
    names the store and the operation, never a path (a session's directory is
    its SID).
    """

    slug = "file_storage_error"

    def __init__(self, store: str, action: str, reason: str, *, remote: bool = False) -> None:
        self.store = store
        self.action = action
        self.remote = remote
        super().__init__(f"File store '{store}' could not {action}: {reason}")

    @property
    def http_status(self) -> int:
        return 503 if self.remote else 500

    @property
    def public_message(self) -> str:
        return f"The file store could not {self.action}."


class FileNotStored(SiloError, FileNotFoundError):
    """No such file in the session (a ``FileNotFoundError``; ``404``)."""

    status = 404
    slug = "file_not_found"
    logged = False

    def __init__(self, filename: str) -> None:
        self.filename = filename
        super().__init__(f"No file {filename[:100]!r} in this session.")

    def __str__(self) -> str:
        # OSError's own would be "[Errno None] None: 'name'" once ``filename`` is set.
        return str(self.args[0])


class FileElsewhere(SiloError):
    """A ``local`` file kept on another machine's disk (``409``): route the client there,
    or use a backend every machine reads (``database``, an fsspec URL)."""

    status = 409
    slug = "file_on_other_host"

    def __init__(self, filename: str, host: str | None) -> None:
        self.filename = filename
        self.host = host
        super().__init__(f"File {filename[:100]!r} is stored on host {host!r}, not this one.")

    @property
    def public_message(self) -> str:
        return "The file is stored on another server."


class FileCorrupt(SiloError):
    """A file's bytes do not match the size and SHA-256 its row recorded (``500``)."""

    slug = "file_corrupt"

    def __init__(self, filename: str) -> None:
        self.filename = filename
        super().__init__(f"The bytes of file {filename[:100]!r} do not match its record.")


class UploadInterrupted(SiloError):
    """An upload's pending row was removed before its request committed (``409``)."""

    status = 409
    slug = "upload_interrupted"
    logged = False

    def __init__(self, filename: str) -> None:
        self.filename = filename
        super().__init__(f"The upload of {filename[:100]!r} was interrupted; send it again.")


class InvalidFilename(SiloError, ValueError):
    """A file name with nothing safe left, or too long (answered ``400``)."""

    status = 400
    slug = "invalid_filename"
    logged = False

    def __init__(self, filename: str, reason: str = "nothing safe is left of it") -> None:
        self.filename = filename
        super().__init__(f"Invalid file name {filename[:100]!r}: {reason}.")


class StateConflict(SiloError):
    """Another request changed a namespace after this request read it.

    The write is refused instead of silently overwriting the other change.
    """

    status = 409
    slug = "state_conflict"
    logged = False

    def __init__(self, sid: str, namespace: str) -> None:
        self.sid = sid
        self.namespace = namespace
        super().__init__(
            f"Namespace '{namespace}' was changed by another request since it was read; "
            "the change was not saved."
        )

    def details(self) -> dict[str, Any]:
        return {"namespace": self.namespace}


class TaskAlreadyRunning(SiloError, RuntimeError):
    """``BackgroundTask.start()`` while that task runs (in this or any other worker).

    A ``RuntimeError``, as in flask-silo; answered ``409`` through the extension.
    """

    status = 409
    slug = "task_running"
    logged = False

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"Task '{name}' is already running")


class TaskLeaseLost(SiloError, RuntimeError):
    """A durable run's attempt lost its lease: another process runs the task now.

    Raised in the task's thread by ``update()``, ``log()`` and ``checkpoint()``
    once the attempt finds out; its writes are refused (fencing by attempt).
    """

    slug = "task_lease_lost"
    logged = False

    def __init__(self, name: str, attempt: int) -> None:
        self.name = name
        self.attempt = attempt
        super().__init__(
            f"task '{name}' attempt {attempt} lost its lease: another process runs it now, "
            "and this attempt's writes are refused"
        )


class TaskCancelled(SiloError, RuntimeError):
    """A cancel was asked for the run (``task.cancel()``, from any process).

    Raised in the task's thread by ``update()``, ``log()`` and ``checkpoint()``
    once the run learns of it; the task may catch it to clean up. However the
    target then ends, the run ends ``cancelled`` and is never retried.
    """

    slug = "task_cancelled"
    logged = False

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"task '{name}' was cancelled")


class SchemaError(SiloError):
    """The database schema is missing or not at the revision this version needs."""

    slug = "schema_out_of_date"

    def __init__(self, current: str | None, head: str, url: str) -> None:
        self.current = current
        self.head = head
        state = "has no flask-silo-sql schema" if current is None else f"is at revision {current}"
        super().__init__(
            f"The silo database ({url}) {state}; this version needs revision {head}. "
            "Run `flask silo-db upgrade` to migrate it."
        )

    @property
    def public_message(self) -> str:
        return "The session database schema is not current: run `flask silo-db upgrade`."


class StorageUnavailable(SiloError):
    """The database could not be reached or failed (answered ``503``).

    The driver's error is kept as ``original`` rather than chained, so that a
    traceback logged anywhere never prints a statement's parameters (state,
    SIDs); its class and first line are in the message.
    """

    status = 503
    slug = "storage_unavailable"

    def __init__(self, message: str = "Silo storage unavailable") -> None:
        super().__init__(message)
        self.original: BaseException | None = None

    @property
    def public_message(self) -> str:
        return "Session storage is unavailable."


class IdempotencyKeyInvalid(SiloError, ValueError):
    """An ``Idempotency-Key`` header that is not a string or token of 1 to 255 characters."""

    status = 400
    slug = "idempotency_key_invalid"
    logged = False

    def __init__(self, header: str, reason: str) -> None:
        self.header = header
        super().__init__(
            f"The {header} header must be one string (RFC 8941, quoted) or token of "
            f"1 to 255 characters: {reason}."
        )

    def details(self) -> dict[str, Any]:
        return {"header": self.header}


class RequestBodyIncomplete(SiloError):
    """A request body shorter than its ``Content-Length``: the client went away mid-body
    (``400``). An idempotent view does not run on it, nor is its key claimed."""

    status = 400
    slug = "request_body_incomplete"
    logged = False

    def __init__(self, expected: int, received: int) -> None:
        self.expected = expected
        self.received = received
        super().__init__(
            f"The request body ended after {received} of the {expected} bytes its "
            "Content-Length announced."
        )


class IdempotencyKeysExhausted(SiloError):
    """The session holds ``SILO_IDEMPOTENCY_MAX_KEYS`` keys already (``429``): a new key
    is refused until the oldest expire; replays of the keys it holds still answer."""

    status = 429
    slug = "idempotency_keys_exhausted"
    logged = False

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"This session holds {limit} idempotency keys, the most it may: a new key is "
            "accepted once the oldest expire."
        )

    def details(self) -> dict[str, Any]:
        return {"limit": self.limit}


class IdempotencyKeyMissing(SiloError):
    """A view that requires an ``Idempotency-Key`` was called without one."""

    status = 400
    slug = "idempotency_key_missing"
    logged = False

    def __init__(self, header: str) -> None:
        self.header = header
        super().__init__(f"This request needs an {header} header.")

    def details(self) -> dict[str, Any]:
        return {"header": self.header}


class IdempotencyKeyInFlight(SiloError):
    """Another request with the same key is running the view now (answered ``409``).

    The answer carries ``Retry-After``: retrying with the same key then gets the
    first request's response, or runs the view if that request failed.
    """

    status = 409
    slug = "idempotency_key_in_flight"
    logged = False

    def __init__(self, header: str, retry_after: int = 1) -> None:
        self.header = header
        self.retry_after = retry_after
        super().__init__(
            f"A request with this {header} is still in progress; "
            f"retry in {retry_after} s to get its response."
        )

    def details(self) -> dict[str, Any]:
        return {"header": self.header}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class IdempotencyKeyReused(SiloError):
    """The key was first used with another request (method, path, query, content, body)."""

    status = 422
    slug = "idempotency_key_reused"
    logged = False

    def __init__(self, header: str) -> None:
        self.header = header
        super().__init__(
            f"This {header} was used with a different request; use a new key for a new request."
        )

    def details(self) -> dict[str, Any]:
        return {"header": self.header}


class IdempotentResponseNotKept(SiloError):
    """A retry of a request whose response was too large to keep (``409``): the first
    request ran and its changes were saved; its response cannot be replayed."""

    status = 409
    slug = "idempotent_response_not_kept"
    logged = False

    def __init__(self, header: str, first_status: int, limit: int | None) -> None:
        self.header = header
        self.first_status = first_status
        self.limit = limit
        most = f"the {limit} bytes" if limit is not None else "what"
        super().__init__(
            f"The first request with this {header} was answered {first_status} and its "
            f"changes were saved, but its response was larger than {most} a key keeps "
            "(SILO_IDEMPOTENCY_MAX_RESPONSE_BYTES), so it cannot be replayed: read the "
            "result another way, or send a new key to run the request again."
        )

    def details(self) -> dict[str, Any]:
        return {"header": self.header, "first_status": self.first_status, "limit": self.limit}


class IdempotencyUnsupported(SiloError):
    """``@silo.idempotent`` on a storage without tables (``InMemoryStorage``, a flask-silo one)."""

    slug = "idempotency_unsupported"

    def __init__(self) -> None:
        super().__init__(
            "@silo.idempotent needs SQL storage (SQLStorage, the default): this app's storage "
            "keeps no idempotency keys."
        )


class ResponseNotStorable(SiloError, TypeError):
    """An idempotent view answered with a streamed response, which cannot be stored."""

    slug = "response_not_storable"

    def __init__(self, view: str) -> None:
        self.view = view
        super().__init__(
            f"The idempotent view {view!r} returned a streamed response (a generator, "
            "send_file, ...), which cannot be stored for a replay: return the body whole, or "
            "remove @silo.idempotent. Its changes were not saved."
        )


class OutsideApiPrefix(SiloError, RuntimeError):
    """Session state was asked for in a request whose path is not under ``api_prefix``.

    Only API requests have a session: the route must move under the prefix, or the
    prefix must cover the route (``Silo(api_prefix=...)``). A ``RuntimeError``.
    """

    slug = "outside_api_prefix"

    def __init__(self, path: str, api_prefix: str) -> None:
        self.path = path
        self.api_prefix = api_prefix
        shown = path if len(path) <= 200 else path[:200] + "…"
        super().__init__(
            f"No session in this request: its path {shown!r} is not under api_prefix "
            f"{api_prefix!r}, and only requests under it take part (silo.state(), silo.sid). "
            f"Move the route under {api_prefix!r}, or give Silo(api_prefix=...) a prefix "
            "that covers it (api_prefix='/' includes every path)."
        )

    def details(self) -> dict[str, Any]:
        return {"path": self.path, "api_prefix": self.api_prefix}


class NamespaceTaken(NamespaceError):
    """``silo.register()`` of a namespace that is registered already.

    Two factories for one name would leave it to the order of imports which one a
    session gets; ``register(name, factory, replace=True)`` replaces it on purpose.
    """

    slug = "namespace_taken"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        SiloError.__init__(
            self,
            f"Namespace '{namespace}' is already registered: use another name, or "
            f"register('{namespace}', factory, replace=True) to replace its factory.",
        )


class RegisteredTooLate(NamespaceError):
    """``silo.register()`` after an app of the Silo served its first request.

    Every process of the app must know every namespace before it serves: one
    registered later exists in the processes that ran that code and in no other.
    """

    slug = "namespace_registered_too_late"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        SiloError.__init__(
            self,
            f"Namespace '{namespace}' is registered after the app served its first request: "
            "register every namespace while the app is set up (where the routes are "
            "defined), so that every worker process knows it before it serves.",
        )


class ViewDecoratorOrder(SiloError, TypeError):
    """``@silo.idempotent`` (or ``@silo.locked``) written above the route decorator.

    Flask registered the undecorated function, so the silo decorator would never
    run; it must sit below ``@app.route`` / ``@app.post`` (it is raised at once, or
    when the app starts serving). A ``TypeError``.
    """

    slug = "view_decorator_order"

    def __init__(self, decorator: str, view: str) -> None:
        self.decorator = decorator
        self.view = view
        super().__init__(
            f"@silo.{decorator} is above the route decorator of view {view!r}: Flask "
            f"registered the function without it, so @silo.{decorator} would never run. "
            "Put it below the route decorator:\n\n"
            '    @app.post("/api/...")\n'
            f"    @silo.{decorator}{'()' if decorator == 'idempotent' else ''}\n"
            f"    def {view}(): ..."
        )
