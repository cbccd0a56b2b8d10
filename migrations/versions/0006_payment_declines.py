"""payment declines: payment_declines (each charge or refund the provider declined, once per
idempotency key)

PaymentActivities records a decline there before it raises PaymentDeclined, so that the
business metrics count declined charges and refunds (procflow_payments{status="declined"}).
A decline is not a row of `payments_ledger`: the sandbox provider reads a ledger key as "charged",
and a retried declined charge would then succeed. `amount` is in minor units (cents) as the
ledger's since 0003, `reason` the provider's message cut to 200 characters (core/db.py). Nothing
to backfill: declines were not stored before.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "payment_declines",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(length=300), nullable=False),
        sa.Column("workflow_id", sa.String(length=200), nullable=True),
        sa.Column("order_no", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("payment_declines", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_payment_declines_workflow_id"), ["workflow_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("payment_declines", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payment_declines_workflow_id"))
    op.drop_table("payment_declines")
