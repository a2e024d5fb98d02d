"""The expiry sweep: due sessions in keyset order, deleted and remembered as expired."""

from __future__ import annotations

from sqlalchemy import (
    Integer,
    String,
    Text,
    bindparam,
    delete,
    exists,
    func,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite

from ..executor import Prepared
from ..models import expired_sids, sessions, tasks
from .kit import Kit, ts
from .task import live_task


class SweepStatements:
    """The statements of the expiry sweep, compiled for one engine."""

    def __init__(self, k: Kit) -> None:
        self._sweep_candidates(k)
        self._sweep_expiry(k)

    def _sweep_candidates(self, k: Kit) -> None:
        """The due sessions, in the keyset order of their sweep bound; old expired SIDs pruned."""
        prepare = k.prepare
        in_list = k.in_list
        now = k.now
        running_task = exists().where(
            tasks.c.sid == sessions.c.sid, live_task(now, ts("heartbeat_cutoff"))
        )
        # Candidates come by the sweep's bound; each one's expires_at decides. Those
        # still alive get their bound moved up to their expiry, once per lifetime.
        after = tuple_(sessions.c.sweep_after, sessions.c.sid) > tuple_(
            ts("after_ts"), bindparam("after_sid", type_=String())
        )
        due = (
            select(sessions.c.sid, sessions.c.sweep_after, sessions.c.expires_at < now)
            .where(sessions.c.sweep_after < now, ~running_task)
            .order_by(sessions.c.sweep_after, sessions.c.sid)
            .limit(bindparam("batch_size", type_=Integer()))
        )
        self.sweep_first = prepare("sweep_first", due)
        self.sweep_candidates = prepare("sweep_candidates", due.where(after))
        self.sweep_defer = prepare(
            "sweep_defer",
            update(sessions)
            .where(
                in_list(sessions.c.sid, "sids"),
                sessions.c.sweep_after < now,
                sessions.c.expires_at >= now,
            )
            .values(sweep_after=sessions.c.expires_at),
        )
        self.prune_expired = prepare(
            "prune_expired",
            delete(expired_sids).where(
                expired_sids.c.sid.in_(
                    select(expired_sids.c.sid)
                    .where(expired_sids.c.expired_at < ts("cutoff"))
                    .limit(bindparam("batch_size", type_=Integer()))
                    .scalar_subquery()
                )
            ),
        )

    def _sweep_expiry(self, k: Kit) -> None:
        """Due sessions deleted and their SIDs recorded as expired, one batch at a time."""
        prepare = k.prepare
        in_list = k.in_list
        now = k.now
        postgresql = k.postgresql
        self.sweep_expire: Prepared | None = None
        self.sweep_delete: Prepared | None = None
        self.mark_expired_many: Prepared | None = None
        if postgresql:
            # One statement per batch: the rows locked (skipping those a request
            # holds), deleted (their children cascade) and recorded as expired.
            locked = (
                select(sessions.c.sid)
                .where(in_list(sessions.c.sid, "sids"), sessions.c.expires_at < now)
                .with_for_update(skip_locked=True)
            )
            gone = (
                delete(sessions)
                .where(sessions.c.sid.in_(locked.scalar_subquery()))
                .returning(sessions.c.sid)
                .cte("gone")
            )
            record = pg.insert(expired_sids).from_select(
                ["sid", "expired_at"], select(gone.c.sid, now)
            )
            self.sweep_expire = prepare(
                "sweep_expire",
                record.on_conflict_do_update(
                    index_elements=[expired_sids.c.sid],
                    set_={"expired_at": record.excluded.expired_at},
                ).returning(expired_sids.c.sid),
            )
        else:
            self.sweep_delete = prepare(
                "sweep_delete",
                delete(sessions)
                .where(in_list(sessions.c.sid, "sids"), sessions.c.expires_at < now)
                .returning(sessions.c.sid),
            )
            values = func.json_each(bindparam("sids", type_=Text())).table_valued("value")
            many = sqlite.insert(expired_sids).from_select(
                ["sid", "expired_at"], select(values.c.value, now).where(literal(True))
            )
            self.mark_expired_many = prepare(
                "mark_expired_many",
                many.on_conflict_do_update(
                    index_elements=[expired_sids.c.sid],
                    set_={"expired_at": many.excluded.expired_at},
                ),
            )
