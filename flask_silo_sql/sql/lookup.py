"""An operator's lookup of one session by its key (``flask silo-db find``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, func, select

from .models import expired_sids, files, namespaces, sessions, tasks


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def find_session(engine: Engine, key: str) -> dict[str, Any]:
    """What the tables hold of the session *key*: ``state`` (``live``, ``expired`` or
    ``unknown``), its times, and for a live one how many namespaces, files and tasks."""
    with engine.connect() as conn:
        head = conn.execute(
            select(sessions.c.created_at, sessions.c.last_active, sessions.c.expires_at).where(
                sessions.c.sid == key
            )
        ).first()
        if head is not None:
            found: dict[str, Any] = {
                "state": "live",
                "created_at": _iso(head[0]),
                "last_active": _iso(head[1]),
                "expires_at": _iso(head[2]),
            }
            for name, table in (("namespaces", namespaces), ("files", files), ("tasks", tasks)):
                count = select(func.count()).select_from(table).where(table.c.sid == key)
                found[name] = int(conn.execute(count).scalar_one())
            return found
        expired = conn.execute(
            select(expired_sids.c.expired_at).where(expired_sids.c.sid == key)
        ).first()
    if expired is not None:
        return {"state": "expired", "expired_at": _iso(expired[0])}
    return {"state": "unknown"}
