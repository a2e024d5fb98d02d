"""Files every machine can serve: where each file's bytes are, and a table for their chunks.

``silo_files`` learns which backend holds a file's bytes (``backend``), which
machine's disk for the ``local`` backend (``host``) and the object's path for
an fsspec URL (``location``); ``silo_file_chunks`` holds the bytes of the
``database`` backend, deleted with their row (and so with their session) by
the same transaction. Plain ``ADD COLUMN`` (the one ``NOT NULL`` column with a
server default) and ``CREATE TABLE``: no table is rebuilt, and ``--sql`` needs
no live database. Existing rows are ``local`` files of an unknown host, which
every host treats as its own, as before.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILE_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column(
        "silo_files",
        sa.Column(
            "backend",
            sa.String(16),
            nullable=False,
            server_default=sa.text("'local'"),
            comment="Where the bytes are: local (a host's disk), database (silo_file_chunks) "
            "or fsspec (the store's URL)",
        ),
    )
    op.add_column(
        "silo_files",
        sa.Column(
            "host",
            sa.String(255),
            nullable=True,
            comment="local backend: the machine whose disk holds the bytes",
        ),
    )
    op.add_column(
        "silo_files",
        sa.Column(
            "location",
            sa.String(1024),
            nullable=True,
            comment="fsspec backend: the object's path under <store URL>/<sid>/",
        ),
    )
    op.create_table(
        "silo_file_chunks",
        sa.Column(
            "file_id",
            FILE_ID,
            sa.ForeignKey(
                "silo_files.id", ondelete="CASCADE", name="fk_silo_file_chunks_file_id_silo_files"
            ),
            nullable=False,
            comment="The file (silo_files.id)",
        ),
        sa.Column(
            "seq", sa.Integer(), nullable=False, comment="Position of the chunk in the file, from 0"
        ),
        sa.Column("data", sa.LargeBinary(), nullable=False, comment="The chunk's bytes"),
        sa.PrimaryKeyConstraint("file_id", "seq", name="pk_silo_file_chunks"),
        comment="The bytes of the files of the database backend, in chunks",
    )
    if op.get_context().dialect.name == "postgresql":
        # Chunks are compressed data more often than not: store them out of line as
        # they are, without pglz trying (and failing) to compress each one.
        op.execute("ALTER TABLE silo_file_chunks ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("silo_file_chunks")
    if op.get_context().dialect.name == "postgresql":
        for column in ("location", "host", "backend"):
            op.drop_column("silo_files", column)
    else:  # SQLite >= 3.35 drops a column in place (no table rebuild, no cascade)
        for column in ("location", "host", "backend"):
            op.execute(f"ALTER TABLE silo_files DROP COLUMN {column}")
