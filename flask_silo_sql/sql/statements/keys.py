"""Idempotency keys: claimed, taken over, completed (with a namespace), released, expired."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    LargeBinary,
    String,
    Text,
    and_,
    bindparam,
    delete,
    exists,
    func,
    literal,
    null,
    select,
    tuple_,
    update,
)
from sqlalchemy.sql import ColumnElement

from ..executor import Prepared
from ..models import idempotency_keys as keys
from ..models import namespaces, sessions
from .kit import Kit, ts

KEY_HASH = bindparam("key_hash", type_=String(64))
TOKEN = bindparam("token", type_=String(32))
KEY_RECORD = (
    keys.c.fingerprint,
    keys.c.token,
    keys.c.status,
    keys.c.headers,
    keys.c.body,
    keys.c.locked_until,
)
"""What a key's row tells a request: the claim, and the stored response if any."""


def _this_key(k: Kit) -> ColumnElement[bool]:
    return and_(keys.c.sid == k.sid, keys.c.key_hash == KEY_HASH)


def _held(k: Kit) -> Any:
    """How many keys the session holds."""
    return select(func.count()).select_from(keys).where(keys.c.sid == k.sid)


def _claimed_key(k: Kit) -> dict[str, Any]:
    """A claimed key's row: the request it names, its claim's token and lease."""
    return {
        "sid": k.sid,
        "key_hash": KEY_HASH,
        "idempotency_key": bindparam("key", type_=String(255)),
        "method": bindparam("method", type_=String(16)),
        "route": bindparam("route", type_=Text()),
        "fingerprint": bindparam("fingerprint", type_=String(64)),
        "token": TOKEN,
        "created_at": k.now,
        "locked_until": ts("lease_until"),
        "expires_at": k.expires,
    }


def _stored() -> dict[str, Any]:
    """A stored response (the claim's lease ends with it)."""
    return {
        "status": bindparam("status", type_=Integer()),
        "headers": bindparam("headers", type_=Text()),
        "body": bindparam("body", type_=LargeBinary()),
        "locked_until": null(),
    }


class KeyStatements:
    """The statements of idempotency keys, compiled for one engine."""

    def __init__(self, k: Kit) -> None:
        self._key_claims(k)
        self._key_completion(k)
        self._key_ends(k)

    def _key_claims(self, k: Kit) -> None:
        """Reading a key, and claiming it (first request) or taking it over (a lapsed claim)."""
        prepare = k.prepare
        now = k.now
        token = TOKEN
        this_key = _this_key(k)
        key_record = KEY_RECORD
        held = _held(k)
        self.read_key = prepare("read_key", select(*key_record).where(this_key))
        self.count_keys = prepare("count_keys", held)
        self.claim_key = self._key_claiming(k, "claim_key", capped=True)
        self.claim_key_uncapped = self._key_claiming(k, "claim_key", capped=False)
        """``SILO_IDEMPOTENCY_MAX_KEYS = None``: no count of the session's keys."""
        self.take_over_key = prepare(
            "take_over_key",
            update(keys)
            .where(
                this_key,
                keys.c.token == bindparam("old_token", type_=String(32)),
                keys.c.status.is_(None),
                keys.c.locked_until < now,
            )
            .values(token=token, locked_until=ts("lease_until")),
        )

    def _key_claiming(self, k: Kit, name: str, capped: bool) -> Prepared:
        """The claim: the key's row if the session exists (and, *capped*, holds fewer
        than ``max_keys`` keys), returning (claimed, record...): its own row, or
        the record that was there."""
        insert = k.insert
        sid = k.sid
        postgresql = k.postgresql
        token = TOKEN
        this_key = _this_key(k)
        key_record = KEY_RECORD
        claimed_key = _claimed_key(k)
        held = _held(k)
        wanted: ColumnElement[bool] = exists().where(sessions.c.sid == sid)
        if capped:
            below = held.scalar_subquery() < bindparam("max_keys", type_=BigInteger())
            wanted = and_(wanted, below)
        if postgresql:
            # The claim commits without waiting for its WAL flush: the request's own
            # commit, later, flushes it too, and a claim lost with a crash had a
            # request that could not finish anyway (its retry runs the view).
            no_flush = func.set_config("synchronous_commit", "off", True) == "off"
            wanted = and_(wanted, no_flush)
        rows = insert(keys).from_select(
            list(claimed_key), select(*claimed_key.values()).where(wanted)
        )
        if postgresql:
            # One round trip for both answers (a row committed during the statement
            # is in neither: read again).
            mine = (
                rows.on_conflict_do_nothing(index_elements=[keys.c.sid, keys.c.key_hash])
                .returning(*key_record)
                .cte("claimed")
            )
            return k.prepare(
                name,
                select(literal(True).label("claimed"), *mine.c).union_all(
                    select(literal(False), *key_record).where(this_key)
                ),
            )
        # SQLite has no DML in a WITH: a no-op update of the key's row makes the
        # statement return the record that was there (the INSERT takes the write
        # lock either way), so a replay is one statement, as on PostgreSQL.
        return k.prepare(
            name,
            rows.on_conflict_do_update(
                index_elements=[keys.c.sid, keys.c.key_hash], set_={"sid": keys.c.sid}
            ).returning((keys.c.token == token).label("claimed"), *key_record),
        )

    def _key_completion(self, k: Kit) -> None:
        """A response stored (with, on PostgreSQL, its one namespace in the same statement)."""
        prepare = k.prepare
        sid = k.sid
        name = k.name
        now = k.now
        data = k.data
        postgresql = k.postgresql
        token = TOKEN
        this_key = _this_key(k)
        stored = _stored()
        self.complete_key = prepare(
            "complete_key",
            update(keys)
            .where(this_key, keys.c.token == token, keys.c.status.is_(None))
            .values(**stored),
        )
        self.complete_key_with_namespace: Prepared | None = None
        if postgresql:
            # A commit with one namespace to update and the response to store, in one
            # statement: the key's row locked while the claim is still ours, then the
            # namespace under its version guard, then the response; any guard that fails
            # leaves all three untouched. Returns what each step matched.
            ours = (
                select(keys.c.token)
                .where(this_key, keys.c.token == token, keys.c.status.is_(None))
                .with_for_update()
                .cte("ours")
            )
            changed = (
                update(namespaces)
                .where(
                    namespaces.c.sid == sid,
                    namespaces.c.name == name,
                    namespaces.c.version == bindparam("expected", type_=Integer()),
                    exists(select(ours.c.token)),
                )
                .values(data=data, version=namespaces.c.version + 1, updated_at=now)
                .returning(namespaces.c.version)
                .cte("changed")
            )
            completed = (
                update(keys)
                .where(this_key, keys.c.token == token, exists(select(changed.c.version)))
                .values(**stored)
                .returning(keys.c.token)
                .cte("completed")
            )
            self.complete_key_with_namespace = prepare(
                "complete_key_with_namespace",
                select(
                    select(func.count()).select_from(ours).scalar_subquery(),
                    select(func.count()).select_from(changed).scalar_subquery(),
                    select(func.count()).select_from(completed).scalar_subquery(),
                ),
            )

    def _key_ends(self, k: Kit) -> None:
        """Claims released, and keys past their ttl forgotten."""
        prepare = k.prepare
        token = TOKEN
        this_key = _this_key(k)
        self.release_key = prepare(
            "release_key",
            delete(keys).where(this_key, keys.c.token == token, keys.c.status.is_(None)),
        )
        self.expire_keys = prepare(
            "expire_keys",
            delete(keys).where(
                tuple_(keys.c.sid, keys.c.key_hash).in_(
                    select(keys.c.sid, keys.c.key_hash)
                    .where(keys.c.expires_at < ts("cutoff"))
                    .limit(bindparam("batch_size", type_=Integer()))
                )
            ),
        )
