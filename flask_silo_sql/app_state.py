"""What the extension keeps per app and per request, apart from the extension itself.

:class:`SiloApp` is one app's part (``app.extensions["silo"]``): its store, its
settings, its cleanup thread and task runner. :class:`RequestState` is what
the current API request holds (in ``flask.g``): its SID, its unit of work and,
for an idempotent view, its claim. The view decorators and the CLI read them
without depending on the :class:`~flask_silo_sql.Silo` object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from flask import Flask, Response, current_app, g, has_request_context, request

from .backends import Unit
from .cleanup import CleanupDaemon
from .config import SiloConfig
from .errors import OutsideApiPrefix
from .idempotency import Claim, IdempotencyRecords
from .keys import session_key
from .sids import is_signed_sid, is_valid_sid, new_signed_sid
from .store import SessionStore
from .tasks import TaskRunner

if TYPE_CHECKING:
    from .sql.host import HostTransaction

REQUEST_KEY = "_silo_request"
"""The current request's :class:`RequestState` in ``flask.g``."""

NO_REQUEST = (
    "No active session: silo.state() and silo.sid work inside an API request. "
    "A task thread should use the state its view handed it (the namespace dict "
    "captured when the task started); other code uses `with silo.session(sid) as state:`."
)


class SiloApp:
    """What one app's Silo keeps: its store, its settings, its cleanup thread."""

    def __init__(self, silo: object, app: Flask, store: SessionStore, settings: SiloConfig) -> None:
        self.silo = silo
        self.store = store
        self.settings = settings
        """The app's ``SILO_*`` values, read once by ``init_app``."""
        self.api_prefix: str = getattr(silo, "_api_prefix", "/")
        self.view_functions = app.view_functions
        """The app's views (for the check of decorators put above a route's)."""
        self.served = False
        """The app has begun serving requests (namespaces can no longer be registered)."""
        self.config = app.config
        self.locking = settings.locking
        self.sid_keys: list[bytes] = []
        """Strict SIDs: the signing key first, then the ones that still verify."""
        if settings.strict_sids:
            keys = [app.secret_key, *(app.config.get("SECRET_KEY_FALLBACKS") or ())]
            if not keys[0]:
                raise RuntimeError("SILO_STRICT_SIDS needs app.secret_key to sign SIDs")
            self.sid_keys = [k.encode() if isinstance(k, str) else bytes(k) for k in keys if k]
        self.sid_max_age = settings.sid_max_age
        """Strict SIDs: how long after its issue a SID is accepted (then a new one is given)."""
        self.idempotency_header = settings.idempotency_header
        self.idempotency_lease = settings.idempotency_lease
        """Seconds an idempotent request holds its key while its view runs."""
        self.idempotency_max_keys = settings.idempotency_max_keys
        """Keys a session may hold at once (None: any number)."""
        self.rolls_back: Callable[[Response], bool] = atomic_rollback(settings.atomic_rollback)
        """Atomic mode: whether a response rolls its request's transaction back."""
        self.idempotency_max_response = settings.idempotency_max_response_bytes
        """Largest response body an idempotent view's key keeps (None: any size)."""
        self.schema_ok = True
        self.daemon = CleanupDaemon(store, interval=store.cleanup_interval)
        self.runner: TaskRunner | None = None
        """With ``SILO_TASK_RUNNER = "thread"`` on SQL storage: this process's claimer of
        runs whose process died (web processes run durable tasks too)."""

    def acceptable(self, sid: str, min_length: int) -> bool:
        if not is_valid_sid(sid, min_length):
            return False
        if not self.sid_keys:
            return True
        if self.sid_max_age is None:
            return is_signed_sid(sid, self.sid_keys)
        return is_signed_sid(sid, self.sid_keys, now=self.store.now(), max_age=self.sid_max_age)

    def new_sid(self) -> str:
        if self.sid_keys:
            return new_signed_sid(self.sid_keys[0], self.store.now())
        return self.store.generate_sid()


def atomic_rollback(setting: object) -> Callable[[Response], bool]:
    """``SILO_ATOMIC_ROLLBACK``: a status (responses at or above it roll back), or a
    callable given the response that says whether it does."""
    if callable(setting):
        return setting
    if isinstance(setting, int) and not isinstance(setting, bool) and 100 <= setting <= 600:
        threshold = setting
        return lambda response: response.status_code >= threshold
    raise ValueError(
        "SILO_ATOMIC_ROLLBACK must be a status (responses at or above it roll the request's "
        f"transaction back; default 500) or a callable(response) -> bool, not {setting!r}"
    )


class RequestState:
    """What the extension knows about the current request."""

    __slots__ = (
        "claim",
        "gone",
        "host",
        "issued",
        "records",
        "replayed",
        "sid",
        "spool",
        "streamed",
        "unit",
        "view_failed",
    )

    def __init__(self, sid: str, unit: Unit, *, issued: bool = False) -> None:
        self.sid = sid
        self.unit = unit
        self.issued = issued
        """The SID was made for this request (the client sent none usable)."""
        self.gone = False
        self.streamed = False
        """The response streams: what its generator changes is saved when it ends."""
        self.claim: Claim | None = None
        """The Idempotency-Key this request holds (an idempotent view runs)."""
        self.records: IdempotencyRecords | None = None
        self.replayed = False
        """Answered with a stored response: nothing is saved."""
        self.view_failed = False
        """The idempotent view raised: its changes are discarded, its key released."""
        self.spool: IO[bytes] | None = None
        self.host: HostTransaction | None = None
        """Atomic mode: the hold on the host session's transaction, ended after the view."""

    @property
    def key(self) -> str:
        """The session's key at rest (the SID itself stays in the request and response)."""
        return session_key(self.sid)


def current_request() -> RequestState:
    """The current API request's state (a RuntimeError outside one; in a request
    outside ``api_prefix``, an :class:`OutsideApiPrefix` naming the path and the prefix)."""
    state: RequestState | None = g.get(REQUEST_KEY) if g else None
    if state is None:
        if has_request_context():
            app_state = current_app.extensions.get("silo")
            if isinstance(app_state, SiloApp) and not request.path.startswith(app_state.api_prefix):
                raise OutsideApiPrefix(request.path, app_state.api_prefix)
        raise RuntimeError(NO_REQUEST)
    return state
