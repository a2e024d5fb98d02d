"""The expiry sweep: due sessions deleted in batches, each batch one short transaction.

Candidates come through the ``(sweep_after, sid)`` index in keyset order, so a
sweep's cost follows the number of due sessions, not of live ones, and each
batch holds its locks briefly. Each session's own ``expires_at`` (written by
the app that touched it) decides, so apps with different TTLs share a
database. ``sweep_after`` is a lower bound of ``expires_at`` that a touch moves
only once it has passed (so most touches change no indexed column and are
updated in place on PostgreSQL): a candidate still alive has its bound moved up
to its ``expires_at``, once per lifetime. A session with a running task whose
heartbeat is fresh is not a candidate; the busy check may veto more (it is called outside any
transaction). The delete re-checks ``expires_at`` (a request may have touched
the session since it was listed) and, on PostgreSQL, skips rows a request
holds locked. Deleted SIDs are recorded as expired in the same transaction, and
``DELETE ... RETURNING`` means that when several processes sweep at once each
SID is expired by exactly one. After the sessions, the sweep forgets old
expired-SID records and idempotency keys past their ttl, in batches too.
"""

from __future__ import annotations

from collections.abc import Callable

from ..backends.base import SweepResult
from .executor import Connector, Executor
from .statements import Statements


def sweep(
    connector: Connector,
    st: Statements,
    *,
    now: float,
    heartbeat_cutoff: float,
    batch_size: int,
    is_busy: Callable[[list[str]], set[str]] | None = None,
    on_batch: Callable[[list[str]], None] | None = None,
    dry_run: bool = False,
) -> SweepResult:
    """Expire the sessions due by *now*; *on_batch* gets each batch's SIDs after its commit."""
    v = st.values
    result = SweepResult()
    after: tuple[object, str] | None = None  # the keyset: the last row of the batch before
    params = {
        "now": v.time(now),
        "heartbeat_cutoff": v.time(heartbeat_cutoff),
        "batch_size": batch_size,
    }
    while True:
        with connector.executor() as ex:
            if after is None:
                rows = ex.run(st.sweep_first, params).rows
            else:  # the driver's own value of the key: compared exactly as stored
                keyset = {"after_ts": after[0], "after_sid": after[1]}
                rows = ex.run(st.sweep_candidates, {**params, **keyset}).rows
        if not rows:
            break
        after = (rows[-1][1], rows[-1][0])
        candidates = [row[0] for row in rows if row[2]]
        alive = [row[0] for row in rows if not row[2]]
        if alive and not dry_run:
            with connector.executor() as ex:
                ex.run(st.sweep_defer, {"sids": st.values.sids(alive), "now": params["now"]})
        busy = is_busy(candidates) if is_busy is not None and candidates else set()
        result.skipped_busy += len(busy)
        chosen = [sid for sid in candidates if sid not in busy]
        result.batches += 1
        if chosen:
            if dry_run:
                expired = chosen
            else:
                with connector.transaction() as ex:
                    expired = expire_batch(ex, st, chosen, now)
            result.expired.extend(expired)
            if on_batch is not None and expired:
                on_batch(expired)
        if len(rows) < batch_size:
            break
    return result


def expire_batch(ex: Executor, st: Statements, sids: list[str], now: float) -> list[str]:
    """In the open transaction: delete those of *sids* still due, record them; return them."""
    v = st.values
    values = {"sids": v.sids(sids), "now": v.time(now)}
    if st.sweep_expire is not None:  # PostgreSQL: one statement
        return [row[0] for row in ex.run(st.sweep_expire, values).rows]
    if st.sweep_delete is None or st.mark_expired_many is None:
        raise RuntimeError("the SQLite sweep statements are missing")
    deleted = [row[0] for row in ex.run(st.sweep_delete, values).rows]
    if deleted:
        gone = {"sids": v.sids(deleted), "now": v.time(now)}
        if not foreign_keys_enforced(ex, st):  # a host's SQLite engine may not cascade
            for statement in st.delete_children:
                ex.run(statement, gone)
        ex.run(st.mark_expired_many, gone)
    return deleted


def foreign_keys_enforced(ex: Executor, st: Statements) -> bool:
    """Whether deleting a session row deletes its children by itself."""
    if st.foreign_keys is None:
        return True
    return bool(ex.run(st.foreign_keys, {}).scalar())


def prune(connector: Connector, st: Statements, *, cutoff: float, batch_size: int = 5000) -> int:
    """Forget expired-SID records older than *cutoff*, in batches; how many went."""
    total = 0
    values = {"cutoff": st.values.time(cutoff), "batch_size": batch_size}
    while True:
        with connector.executor() as ex:
            count = ex.run(st.prune_expired, values).rowcount
        total += count
        if count < batch_size:
            return total


def expire_keys(connector: Connector, st: Statements, *, cutoff: float, batch_size: int) -> int:
    """Forget idempotency keys whose ttl ran out by *cutoff*, in batches; how many went.

    Each batch is one short statement through the ``expires_at`` index. Keys of
    expired sessions went with them already (their foreign key cascades).
    """
    total = 0
    values = {"cutoff": st.values.time(cutoff), "batch_size": batch_size}
    while True:
        with connector.executor() as ex:
            count = ex.run(st.expire_keys, values).rowcount
        total += count
        if count < batch_size:
            return total
