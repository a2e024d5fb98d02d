"""Encrypted namespaces sealed again under the newest key, in batches, while the app runs.

``flask silo-db reencrypt`` pages through the rows of the encrypted namespaces
in primary-key order, one short read per page, and rewrites in one short
transaction per page the rows not sealed under the newest key (plain rows,
written before the namespace was encrypted, are sealed). Each rewrite is
guarded by the row's version: a row a request wrote meanwhile was sealed
under the newest key by that request, and is left as it is. A row that fails
authentication is counted and logged (without its SID), never rewritten.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import StateUnreadable
from ..logs import silo_logger
from ..sealing import Sealer
from .executor import Connector
from .statements import Statements

logger = silo_logger("flask_silo_sql")


@dataclass(slots=True)
class ResealResult:
    """What one pass did."""

    rows: int = 0
    """Rows of the encrypted namespaces read."""
    resealed: int = 0
    """Rows written under the newest key."""
    unreadable: int = 0
    """Rows that fail authentication (left as they are)."""
    batches: int = 0


def reseal(
    connector: Connector,
    st: Statements,
    sealer_for: Callable[[str], Sealer | None],
    names: Sequence[str],
    *,
    batch_size: int,
    progress: Callable[[ResealResult], None] | None = None,
) -> ResealResult:
    """Seal every row of namespaces *names* under the newest key (see the module docstring)."""
    v = st.values
    result = ResealResult()
    page: dict[str, Any] = {"names": v.sids(list(names)), "batch_size": batch_size}
    after = ("", "")
    while True:
        with connector.executor() as ex:
            rows = ex.run(
                st.reseal_page, {**page, "after_sid": after[0], "after_name": after[1]}
            ).rows
        if not rows:
            break
        after = (rows[-1][0], rows[-1][1])
        updates: list[dict[str, Any]] = []
        for sid, name, data, version in rows:
            sealer = sealer_for(name)
            if sealer is None:
                continue
            try:
                fresh = sealer.reseal(name, sid, v.json(data)[0])
            except StateUnreadable as exc:
                result.unreadable += 1
                logger.error("%s", exc)
                continue
            if fresh is not None:
                updates.append({"sid": sid, "name": name, "data": fresh, "expected": version})
        if updates:
            with connector.transaction() as ex:
                for values in updates:
                    result.resealed += ex.run(st.reseal_row, values).rowcount
        result.rows += len(rows)
        result.batches += 1
        if progress is not None:
            progress(result)
        if len(rows) < batch_size:
            break
    return result
