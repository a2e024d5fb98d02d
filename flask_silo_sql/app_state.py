"""What the extension keeps per app and per request, apart from the extension itself.

:class:`SiloApp` is one app's part (``app.extensions["silo"]``): its store, its
settings, its cleanup thread and task runner. :class:`RequestState` is what
the current API request holds (in ``flask.g``): its SID, its unit of work and,
for an idempotent view, its claim. The view decorators and the CLI read them
without depending on the :class:`~flask_silo_sql.Silo` object.
"""

from __future__ import annotations

from typing import IO

from flask import Flask, g

from .backends import Unit
from .cleanup import CleanupDaemon
from .idempotency import Claim, IdempotencyRecords
from .runner import TaskRunner
from .sids import is_signed_sid, is_valid_sid, new_signed_sid
from .store import SessionStore

REQUEST_KEY = "_silo_request"
"""The current request's :class:`RequestState` in ``flask.g``."""

NO_REQUEST = (
    "No active session: silo.state() and silo.sid work inside an API request. "
    "A task thread should use the state its view handed it (the namespace dict "
    "captured when the task started); other code uses `with silo.session(sid) as state:`."
)


class SiloApp:
    """What one app's Silo keeps: its store, its settings, its cleanup thread."""

    def __init__(self, silo: object, app: Flask, store: SessionStore) -> None:
        self.silo = silo
        self.store = store
        self.config = config = app.config
        self.locking = bool(config["SILO_LOCKING"])
        self.sid_keys: list[bytes] = []
        """Strict SIDs: the signing key first, then the ones that still verify."""
        if config["SILO_STRICT_SIDS"]:
            keys = [app.secret_key, *(config.get("SECRET_KEY_FALLBACKS") or ())]
            if not keys[0]:
                raise RuntimeError("SILO_STRICT_SIDS needs app.secret_key to sign SIDs")
            self.sid_keys = [k.encode() if isinstance(k, str) else bytes(k) for k in keys if k]
        max_age = config["SILO_SID_MAX_AGE"]
        self.sid_max_age: float | None = None if max_age is None else float(max_age)
        """Strict SIDs: how long after its issue a SID is accepted (then a new one is given)."""
        self.idempotency_header = str(config["SILO_IDEMPOTENCY_HEADER"])
        self.idempotency_lease = float(config["SILO_IDEMPOTENCY_LEASE"])
        """Seconds an idempotent request holds its key while its view runs."""
        max_keys = config["SILO_IDEMPOTENCY_MAX_KEYS"]
        self.idempotency_max_keys: int | None = None if max_keys is None else int(max_keys)
        """Keys a session may hold at once (None: any number)."""
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


class RequestState:
    """What the extension knows about the current request."""

    __slots__ = (
        "claim",
        "gone",
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




def current_request() -> RequestState:
    """The current API request's state (a RuntimeError outside one)."""
    state: RequestState | None = g.get(REQUEST_KEY) if g else None
    if state is None:
        raise RuntimeError(NO_REQUEST)
    return state
