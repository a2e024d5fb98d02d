"""Sessions and namespaces: loaded, touched, created, written, rotated, deleted, counted."""

from __future__ import annotations

from sqlalchemy import (
    Integer,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy import text as sa_text

from ...sids import SID_LENGTH
from ..models import (
    events,
    expired_sids,
    file_chunks,
    files,
    idempotency_keys,
    namespaces,
    sessions,
    stream_tokens,
    tasks,
)
from .kit import Kit, ts

CHILD_TABLES = (namespaces, files, tasks, idempotency_keys, events, stream_tokens)
"""The tables whose rows belong to a session (moved by a rotation, deleted with it)."""


class SessionStatements:
    """The statements of sessions and namespaces, compiled for one engine."""

    def __init__(self, k: Kit) -> None:
        self.values = k.values
        self._sessions_reads(k)
        self._sessions_heads(k)
        self._sessions_namespaces(k)
        self._sessions_rotation(k)
        self._sessions_deletes(k)
        self._sessions_listings(k)
        self._sessions_resealing(k)

    def _sessions_reads(self, k: Kit) -> None:
        """Reading a session and its namespaces."""
        prepare = k.prepare
        sid = k.sid
        name = k.name
        key = select(cast(sid, String(SID_LENGTH)).label("sid")).subquery("k")
        self.probe = prepare(
            "probe",
            select(
                sessions.c.created_at, sessions.c.last_active, expired_sids.c.expired_at
            ).select_from(
                key.outerjoin(sessions, sessions.c.sid == key.c.sid).outerjoin(
                    expired_sids, expired_sids.c.sid == key.c.sid
                )
            ),
        )
        self.load_one = prepare(
            "load_one",
            select(
                sessions.c.created_at,
                sessions.c.last_active,
                namespaces.c.data,
                namespaces.c.version,
            )
            .select_from(
                sessions.outerjoin(
                    namespaces, and_(namespaces.c.sid == sessions.c.sid, namespaces.c.name == name)
                )
            )
            .where(sessions.c.sid == sid),
        )
        self.load_all = prepare(
            "load_all",
            select(
                sessions.c.created_at,
                sessions.c.last_active,
                namespaces.c.name,
                namespaces.c.data,
                namespaces.c.version,
            )
            .select_from(sessions.outerjoin(namespaces, namespaces.c.sid == sessions.c.sid))
            .where(sessions.c.sid == sid),
        )
        self.load_namespace = prepare(
            "load_namespace",
            select(namespaces.c.data, namespaces.c.version).where(
                namespaces.c.sid == sid, namespaces.c.name == name
            ),
        )

    def _sessions_heads(self, k: Kit) -> None:
        """The session row: touched, created, and its SID remembered as expired."""
        prepare = k.prepare
        insert = k.insert
        sid = k.sid
        now = k.now
        expires = k.expires
        # A touch moves the sweep's bound only once it has passed (or to keep it at most
        # expires_at): most touches change no indexed column, a HOT update on PostgreSQL.
        sweep_after = case(
            (or_(sessions.c.sweep_after < now, expires < sessions.c.sweep_after), expires),
            else_=sessions.c.sweep_after,
        )
        self.touch = prepare(
            "touch",
            update(sessions)
            .where(sessions.c.sid == sid)
            .values(last_active=now, expires_at=expires, sweep_after=sweep_after)
            .returning(sessions.c.created_at),
        )
        self.touch_stale = prepare(
            "touch_stale",
            update(sessions)
            .where(sessions.c.sid == sid, sessions.c.last_active <= ts("stale_before"))
            .values(last_active=now, expires_at=expires, sweep_after=sweep_after),
        )
        # A new session, unless its SID was expired after :since (while the
        # request that would create it ran: that request must not bring it back).
        self.create = prepare(
            "create",
            insert(sessions)
            .from_select(
                ["sid", "created_at", "last_active", "expires_at", "sweep_after"],
                select(sid, now, now, expires, expires).where(
                    ~exists().where(
                        expired_sids.c.sid == sid,
                        expired_sids.c.expired_at > ts("since"),
                    )
                ),
            )
            .on_conflict_do_nothing(index_elements=[sessions.c.sid]),
        )
        self.has_session = prepare("has_session", select(literal(1)).where(sessions.c.sid == sid))
        self.is_expired = prepare("is_expired", select(literal(1)).where(expired_sids.c.sid == sid))
        self.clear_expired = prepare(
            "clear_expired", delete(expired_sids).where(expired_sids.c.sid == sid)
        )
        mark = insert(expired_sids).values(sid=sid, expired_at=now)
        self.mark_expired = prepare(
            "mark_expired",
            mark.on_conflict_do_update(
                index_elements=[expired_sids.c.sid], set_={"expired_at": mark.excluded.expired_at}
            ),
        )

    def _sessions_namespaces(self, k: Kit) -> None:
        """Writing namespaces, each under its version guard."""
        prepare = k.prepare
        insert = k.insert
        in_list = k.in_list
        sid = k.sid
        name = k.name
        now = k.now
        data = k.data
        self.update_namespace = prepare(
            "update_namespace",
            update(namespaces)
            .where(
                namespaces.c.sid == sid,
                namespaces.c.name == name,
                namespaces.c.version == bindparam("expected", type_=Integer()),
            )
            .values(data=data, version=namespaces.c.version + 1, updated_at=now),
        )
        self.insert_namespace = prepare(
            "insert_namespace",
            insert(namespaces)
            .from_select(
                ["sid", "name", "data", "version", "updated_at"],
                select(sid, name, data, literal(1, Integer()), now).where(
                    exists().where(sessions.c.sid == sid)
                ),
            )
            .on_conflict_do_nothing(index_elements=[namespaces.c.sid, namespaces.c.name]),
        )
        ns_upsert = insert(namespaces).values(
            sid=sid, name=name, data=data, version=1, updated_at=now
        )
        self.upsert_namespace = prepare(
            "upsert_namespace",
            ns_upsert.on_conflict_do_update(
                index_elements=[namespaces.c.sid, namespaces.c.name],
                set_={
                    "data": ns_upsert.excluded.data,
                    "version": namespaces.c.version + 1,
                    "updated_at": ns_upsert.excluded.updated_at,
                },
            ),
        )
        self.delete_namespaces_except = prepare(
            "delete_namespaces_except",
            delete(namespaces).where(namespaces.c.sid == sid, ~in_list(namespaces.c.name, "names")),
        )

    def _sessions_rotation(self, k: Kit) -> None:
        """Rotation (a session copied to a new SID) and deletion."""
        prepare = k.prepare
        insert = k.insert
        sid = k.sid
        expires = k.expires
        session_upsert = insert(sessions).values(
            sid=sid,
            created_at=ts("created_at"),
            last_active=ts("last_active"),
            expires_at=expires,
            sweep_after=expires,
        )
        self.upsert_session = prepare(
            "upsert_session",
            session_upsert.on_conflict_do_update(
                index_elements=[sessions.c.sid],
                set_={
                    "last_active": session_upsert.excluded.last_active,
                    "expires_at": session_upsert.excluded.expires_at,
                    "sweep_after": case(
                        (
                            session_upsert.excluded.expires_at < sessions.c.sweep_after,
                            session_upsert.excluded.expires_at,
                        ),
                        else_=sessions.c.sweep_after,
                    ),
                },
            ),
        )
        new_sid = bindparam("new_sid", type_=String(SID_LENGTH))
        self.copy_session = prepare(
            "copy_session",
            insert(sessions).from_select(
                ["sid", "created_at", "last_active", "expires_at", "sweep_after"],
                select(
                    new_sid,
                    sessions.c.created_at,
                    sessions.c.last_active,
                    sessions.c.expires_at,
                    sessions.c.sweep_after,
                ).where(sessions.c.sid == sid),
            ),
        )
        self.renew_session = prepare(
            "renew_session",
            update(sessions).where(sessions.c.sid == sid).values(created_at=k.now),
        )
        self.move_children = [
            prepare(f"move_{t.name}", update(t).where(t.c.sid == sid).values(sid=new_sid))
            for t in CHILD_TABLES
        ]

    def _sessions_deletes(self, k: Kit) -> None:
        """Sessions deleted with what they own."""
        prepare = k.prepare
        in_list = k.in_list
        # Chunks first: a host's SQLite engine may not cascade from silo_files.
        self.delete_children = [
            prepare(
                "delete_session_chunks",
                delete(file_chunks).where(
                    file_chunks.c.file_id.in_(
                        select(files.c.id).where(in_list(files.c.sid, "sids"))
                    )
                ),
            ),
            *(
                prepare(f"delete_{t.name}", delete(t).where(in_list(t.c.sid, "sids")))
                for t in CHILD_TABLES
            ),
        ]
        self.delete_sessions = prepare(
            "delete_sessions", delete(sessions).where(in_list(sessions.c.sid, "sids"))
        )
        # A session past its absolute lifetime, ended by the request that finds it.
        self.end_session = prepare(
            "end_session",
            delete(sessions)
            .where(sessions.c.sid == k.sid, sessions.c.created_at <= ts("born_before"))
            .returning(sessions.c.sid),
        )

    def _sessions_resealing(self, k: Kit) -> None:
        """Encrypted namespaces sealed again under the newest key, a page at a time."""
        prepare = k.prepare
        after = tuple_(namespaces.c.sid, namespaces.c.name) > tuple_(
            bindparam("after_sid", type_=String()), bindparam("after_name", type_=String())
        )
        self.reseal_page = prepare(
            "reseal_page",
            select(namespaces.c.sid, namespaces.c.name, namespaces.c.data, namespaces.c.version)
            .where(k.in_list(namespaces.c.name, "names"), after)
            .order_by(namespaces.c.sid, namespaces.c.name)
            .limit(bindparam("batch_size", type_=Integer())),
        )
        # The same JSON under another key: the version stays (a request that read the
        # row may still write it), and a row written meanwhile is left as it is.
        self.reseal_row = prepare(
            "reseal_row",
            update(namespaces)
            .where(
                namespaces.c.sid == k.sid,
                namespaces.c.name == k.name,
                namespaces.c.version == bindparam("expected", type_=Integer()),
            )
            .values(data=k.data),
        )

    def _sessions_listings(self, k: Kit) -> None:
        """Counts and listings for operators, and what the database says of itself."""
        prepare = k.prepare
        postgresql = k.postgresql
        self.count_sessions = prepare("count_sessions", select(func.count()).select_from(sessions))
        self.count_expired = prepare(
            "count_expired", select(func.count()).select_from(expired_sids)
        )
        self.all_sids = prepare("all_sids", select(sessions.c.sid).order_by(sessions.c.sid))
        self.all_heads = prepare(
            "all_heads",
            select(sessions.c.sid, sessions.c.created_at, sessions.c.last_active).order_by(
                sessions.c.sid
            ),
        )
        self.all_namespaces = prepare(
            "all_namespaces", select(namespaces.c.sid, namespaces.c.name, namespaces.c.data)
        )
        self.foreign_keys = (
            None if postgresql else prepare("foreign_keys", sa_text("PRAGMA foreign_keys"))
        )
        self.db_time = prepare("db_time", select(func.clock_timestamp())) if postgresql else None
