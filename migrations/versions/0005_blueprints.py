"""blueprint definitions: blueprint_versions (each published version, immutable, named by its
content hash) and blueprint_current (the version each blueprint process starts new instances
with)

A version's `document` is its canonical JSON text exactly (its sha256 is the version's name),
its `source` the YAML it was published as, if it came as YAML; `seq` numbers the versions of a
process 1, 2, ... (core/db.py). Nothing to backfill: the seeds in `blueprints/` are published by
the API at start-up.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "blueprint_versions",
        sa.Column("version", sa.String(length=80), nullable=False),
        sa.Column("process", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("published_by", sa.String(length=64), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("version"),
        sa.UniqueConstraint("process", "seq"),
    )
    with op.batch_alter_table("blueprint_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_blueprint_versions_process"), ["process"], unique=False
        )

    op.create_table(
        "blueprint_current",
        sa.Column("process", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=80), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["version"], ["blueprint_versions.version"]),
        sa.PrimaryKeyConstraint("process"),
    )


def downgrade() -> None:
    op.drop_table("blueprint_current")
    with op.batch_alter_table("blueprint_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_blueprint_versions_process"))
    op.drop_table("blueprint_versions")
