"""Session events and stream tokens: written, read in order, replayed, pruned.

An event's ID grows in commit order: on PostgreSQL every transaction that writes an
event first takes one transaction-level advisory lock (:attr:`EventStatements.order`),
so IDs are drawn and committed one transaction after another, and a reader that saw ID
*n* can never see a smaller one commit later; SQLite has one writer at a time anyway.
The lock is taken as the transaction's last write, so it is held only up to its commit.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Text,
    bindparam,
    cast,
    delete,
    func,
    literal,
    select,
)

from ..executor import Prepared
from ..models import events, stream_tokens
from .kit import Kit, ts

EVENT_CHANNEL = "silo_events"
"""The PostgreSQL channel an event's ID is announced on (each process's listener)."""
LISTEN = f"LISTEN {EVENT_CHANNEL}"
"""What each process's listener sends on its own connection (not a prepared statement)."""
ORDER_LOCK = 0x5_11_0E_7E
"""The advisory lock key that puts event-writing transactions in line (PostgreSQL)."""


class EventStatements:
    """The statements of ``silo_events`` and ``silo_stream_tokens``, for one engine."""

    def __init__(self, k: Kit) -> None:
        self._writes(k)
        self._reads(k)
        self._upkeep(k)
        self._tokens(k)

    def _writes(self, k: Kit) -> None:
        prepare = k.prepare
        self.order: Prepared | None = (
            prepare("event_order", select(func.pg_advisory_xact_lock(literal(ORDER_LOCK))))
            if k.postgresql
            else None
        )
        self.insert = prepare(
            "insert_event",
            k.insert(events)
            .values(
                sid=k.sid,
                task_id=bindparam("task_id", type_=String(32)),
                kind=bindparam("kind", type_=String(32)),
                data=bindparam("data", type_=Text()),
                created_at=k.now,
            )
            .returning(events.c.id),
        )
        self.notify: Prepared | None = (
            prepare(
                "notify_event",
                select(
                    func.pg_notify(EVENT_CHANNEL, cast(bindparam("id", type_=BigInteger()), Text))
                ),
            )
            if k.postgresql
            else None
        )

    def _reads(self, k: Kit) -> None:
        prepare = k.prepare
        after = bindparam("after", type_=BigInteger())
        limit = bindparam("limit", type_=Integer())
        self.after = prepare(
            "events_after",
            select(events.c.id, events.c.sid, events.c.task_id, events.c.kind, events.c.data)
            .where(events.c.id > after)
            .order_by(events.c.id)
            .limit(limit),
        )
        self.session_after = prepare(
            "session_events_after",
            select(events.c.id, events.c.task_id, events.c.kind, events.c.data)
            .where(events.c.sid == k.sid, events.c.id > after)
            .order_by(events.c.id)
            .limit(limit),
        )
        self.has = prepare(
            "has_event",
            select(literal(1)).where(
                events.c.sid == k.sid, events.c.id == bindparam("id", type_=BigInteger())
            ),
        )
        self.last = prepare("last_event", select(func.max(events.c.id)))
        self.session_last = prepare(
            "session_last_event", select(func.max(events.c.id)).where(events.c.sid == k.sid)
        )

    def _upkeep(self, k: Kit) -> None:
        prepare = k.prepare
        batch = bindparam("batch_size", type_=Integer())
        self.prune = prepare(
            "prune_events",
            delete(events).where(
                events.c.id.in_(
                    select(events.c.id)
                    .where(events.c.created_at < ts("cutoff"))
                    .order_by(events.c.id)
                    .limit(batch)
                    .scalar_subquery()
                )
            ),
        )
        self.delete_session = prepare(
            "delete_session_events", delete(events).where(events.c.sid == k.sid)
        )

    def _tokens(self, k: Kit) -> None:
        prepare = k.prepare
        token_hash = bindparam("token_hash", type_=String(64))
        self.insert_token = prepare(
            "insert_stream_token",
            k.insert(stream_tokens).values(token_hash=token_hash, sid=k.sid, expires_at=k.expires),
        )
        self.token_session = prepare(
            "stream_token_session",
            select(stream_tokens.c.sid).where(
                stream_tokens.c.token_hash == token_hash, stream_tokens.c.expires_at >= k.now
            ),
        )
        self.prune_tokens = prepare(
            "prune_stream_tokens",
            delete(stream_tokens).where(
                stream_tokens.c.token_hash.in_(
                    select(stream_tokens.c.token_hash)
                    .where(stream_tokens.c.expires_at < k.now)
                    .limit(bindparam("batch_size", type_=Integer()))
                    .scalar_subquery()
                )
            ),
        )
