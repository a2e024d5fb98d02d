"""Idempotency keys in ``silo_idempotency_keys``: the SQL backend's :class:`IdempotencyRecords`.

A claim is one ``INSERT ... ON CONFLICT DO NOTHING`` on the request's
connection, before the view runs: of any number of requests with the same
key, in any processes, exactly one gets the row, holding it with a random
token for a lease (the database's clock). The response is written into that
row by a :class:`StagedResponse` in the request's commit, in the same
transaction as its namespace writes, and only while the token is still the
row's: a request whose lease ran out and was taken over stores nothing, and
its changes are rolled back with it. A request that fails deletes its claim
(and if it died, the lease lets a retry take the row over).

In atomic mode (see :mod:`.host`) the claim is a statement of the request's
transaction, the host's: a duplicate's claim waits for that transaction and
then finds the stored response (or, if it rolled back, claims the key); a
failed or killed request's claim goes with its rollback, and nothing releases it.
"""

from __future__ import annotations

import secrets
from typing import Any, NoReturn

from ..errors import (
    IdempotencyKeyInFlight,
    IdempotencyKeysExhausted,
    SessionExpired,
    StorageUnavailable,
)
from ..idempotency import Claim, Found, KeyRequest, StoredResponse
from ..logs import silo_logger
from . import sessions as ops
from .context import Context
from .executor import Executor

logger = silo_logger("flask_silo_sql")


class StagedResponse:
    """A response stored in its key's record by the request's commit."""

    directory: str | None = None
    locks_session = False
    """The write is guarded by the claim's token (the row goes with its session)."""

    def __init__(self, records: SQLIdempotencyRecords, claim: Claim, response: StoredResponse):
        self.records = records
        self.claim = claim
        self.response = response

    def write(self, ex: Executor, now: float) -> None:
        self.records.store(ex, self.claim, self.response)

    def write_with(self, ex: Executor, write: ops.Write, sid: str, now: float) -> int | None:
        """PostgreSQL: the namespace update and the response in one statement (no
        transaction round trips); None elsewhere, or for a namespace's first row."""
        return self.records.store_with(ex, self.claim, self.response, write, now)

    def committed(self) -> None:
        self.claim.completed = True

    def discard(self) -> None:
        """Nothing was written: the request's teardown releases the claim."""


class SQLIdempotencyRecords:
    """The rows of ``silo_idempotency_keys`` (see the module docstring)."""

    __slots__ = ("_b",)

    def __init__(self, ctx: Context) -> None:
        self._b = ctx

    def _key(self, request: KeyRequest) -> dict[str, Any]:
        return {"sid": request.sid, "key_hash": request.key_hash}

    def _found(self, row: Any, now: float) -> Found:
        fingerprint, token, status, headers, body, locked_until = row
        v = self._b.st.values
        response = None
        if status is not None:
            response = StoredResponse(
                int(status),
                StoredResponse.parse_headers(headers or "[]"),
                None if body is None else bytes(body),  # None: too large, not kept
            )
        left = 0.0 if locked_until is None else v.unix(locked_until) - now
        return Found(fingerprint, token, response, left)

    def claim(self, request: KeyRequest) -> Claim | Found:
        b = self._b
        st = b.st
        v = st.values
        for _ in range(3):
            now = b.now()
            token = secrets.token_hex(16)
            values = {
                **self._key(request),
                "key": request.key,
                "method": request.method[:16],
                "route": request.route,
                "fingerprint": request.fingerprint,
                "token": token,
                "now": v.time(now),
                "lease_until": v.time(now + request.lease),
                "expires": v.time(now + request.ttl),
                "max_keys": request.max_keys,
            }
            claiming = st.claim_key if request.max_keys is not None else st.claim_key_uncapped
            with b.connector.executor() as ex:
                rows = ex.run(claiming, values).rows
                # (claimed, record...): the claim's row, or the record that was there
                if rows and rows[0][0]:
                    return Claim(request, token)
                record = rows[0][1:] if rows else None
                if record is None:
                    record = ex.run(st.read_key, self._key(request)).first()
                if record is not None:
                    return self._found(record, now)
                head, expired_at = ops.probe(ex, st, request.sid)
                if head is not None:
                    limit = request.max_keys
                    if limit is not None:  # or refused: the session holds all it may
                        held = ex.run(st.count_keys, {"sid": request.sid}).scalar()
                        if held >= limit:
                            raise IdempotencyKeysExhausted(limit)
                    continue  # the record went meanwhile (released, expired): claim again
                if expired_at is not None:
                    # The SID's session expired or was rotated away, its keys with it: a
                    # retry under it cannot be told from a new request, and running the
                    # view again under a new session could do it twice.
                    raise SessionExpired(request.sid)
            self._create_session(request.sid)
        raise IdempotencyKeyInFlight(request.header)  # the record keeps coming and going

    def _create_session(self, sid: str) -> None:
        """The record needs its owner: a session named by the client, used for the first time."""
        b = self._b
        now = b.now()
        with b.connector.transaction() as ex:
            created, _ = ops.lock(ex, b.st, sid, b.times(now), existed=None)
        if created:
            b.policy.created(sid)

    def take_over(self, request: KeyRequest, found: Found) -> Claim | None:
        b = self._b
        v = b.st.values
        now = b.now()
        token = secrets.token_hex(16)
        values = {
            **self._key(request),
            "token": token,
            "old_token": found.token,
            "now": v.time(now),
            "lease_until": v.time(now + request.lease),
        }
        with b.connector.executor() as ex:
            if ex.run(b.st.take_over_key, values).rowcount == 1:
                return Claim(request, token)
        return None

    def read(self, request: KeyRequest) -> Found | None:
        b = self._b
        with b.connector.executor() as ex:
            row = ex.run(b.st.read_key, self._key(request)).first()
        return None if row is None else self._found(row, b.now())

    def complete(self, claim: Claim, response: StoredResponse) -> None:
        unit = self._b.current_unit(claim.request.sid)
        if unit is not None:  # with the request's commit
            unit.saw_session()  # the claim was made under it
            unit.stage(StagedResponse(self, claim, response))
            return
        with self._b.connector.transaction() as ex:
            self.store(ex, claim, response)
        claim.completed = True

    def store(self, ex: Executor, claim: Claim, response: StoredResponse) -> None:
        """In the commit's transaction: the response into the row, if the claim is still ours."""
        st = self._b.st
        values = {
            **self._key(claim.request),
            "token": claim.token,
            "status": response.status,
            "headers": response.headers_json(),
            "body": response.body,
        }
        if ex.run(st.complete_key, values).rowcount == 1:
            return
        if ex.run(st.has_session, {"sid": claim.request.sid}).first() is None:
            raise SessionExpired(claim.request.sid)
        self._lost(claim)

    def store_with(
        self,
        ex: Executor,
        claim: Claim,
        response: StoredResponse,
        write: ops.Write,
        now: float,
    ) -> int | None:
        """The response and one namespace update in one statement, both or neither."""
        st = self._b.st
        statement = st.complete_key_with_namespace
        if statement is None or write.expected is None:
            return None
        values = {
            **self._key(claim.request),
            "token": claim.token,
            "status": response.status,
            "headers": response.headers_json(),
            "body": response.body,
            "name": write.name,
            "data": write.stored,
            "expected": write.expected,
            "now": st.values.time(now),
        }
        _ours, _changed, completed = ex.run(statement, values).first()
        if completed == 1:
            return write.expected + 1
        # Nothing was written (a guard failed: the session went, the namespace changed or
        # the claim was taken over): the commit's general path, with its own guards,
        # finds out which and answers.
        return None

    def _lost(self, claim: Claim) -> NoReturn:
        logger.warning(
            "an idempotent request outlived its lease (%.0f s) and another took its key over: "
            "its changes were not saved; give the view a longer lease",
            claim.request.lease,
        )
        raise IdempotencyKeyInFlight(claim.request.header)

    def release(self, claim: Claim) -> None:
        b = self._b
        try:
            with b.connector.executor() as ex:
                ex.run(b.st.release_key, {**self._key(claim.request), "token": claim.token})
        except StorageUnavailable as exc:  # its lease will let a retry in
            logger.warning("could not release an idempotency key (%s); its lease will", exc)
