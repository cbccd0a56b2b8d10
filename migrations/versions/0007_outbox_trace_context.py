"""outbox trace context: notification_outbox.trace_context

The W3C trace-context headers of the span that queued a mail (core/tracecontext.py), so that
the mail dispatcher's SendMail span, later and in another loop, is in the trace of the decision
or step that queued it. Null when tracing is off and for every row queued before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("notification_outbox") as batch:
        batch.add_column(sa.Column("trace_context", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("notification_outbox") as batch:
        batch.drop_column("trace_context")
