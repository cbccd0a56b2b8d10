"""the instance read model: process_instances, stage_visits, sla_events; orders extend their
instance, the ledger is keyed by instance

Every process instance, of any type, gets a row in `process_instances` (its stage, status,
requester, a small summary), each entry into a stage a row in `stage_visits`, each reminder,
escalation or breach a row in `sla_events` (core/db.py). The sales order's `orders` row becomes
the extension of its instance (a foreign key on `workflow_id`), and `payments_ledger` gets the
workflow id of the instance the money belongs to.

Backfill, from the orders of the 0003 schema: one instance per order (type `sales_order`,
business key the order number, status from its stage), one stage visit of seq 0 for the stage it
is in (seq 0 is "before the read model": the workflow numbers its own visits from 1), and the
ledger's workflow ids by order number (null where no order matches).

SQLite adds a foreign key by recreating the table (batch mode); as in 0003, `order_lines` gives
up its foreign key while `orders` is recreated (dropping `orders` with foreign keys enforced
would cascade into it) and gets it back afterwards.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SALES_ORDER = "sales_order"
# the status of an instance whose order is in this stage; every other stage is running
STATUS_OF_STAGE = {
    "closed": "completed",
    "rejected": "completed",
    "cancelled": "cancelled",
    "failed": "failed",
}
_ORDERS_FK = "orders_workflow_id_fkey"
_ORDER_LINES_FK = "order_lines_order_no_fkey"
_NAMING = {"fk": "%(table_name)s_%(column_0_name)s_fkey"}

# the tables as they stand at this revision, for the backfill
_meta = sa.MetaData()
_orders = sa.Table(
    "orders",
    _meta,
    *(sa.Column(n, sa.String) for n in ("order_no", "workflow_id", "customer_id")),
    *(sa.Column(n, sa.String) for n in ("customer_name", "requester", "currency", "stage")),
    sa.Column("amount", sa.BigInteger),  # cents since 0003
    sa.Column("special_change", sa.Boolean),
    sa.Column("policy_version", sa.Integer),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _create_tables() -> None:
    op.create_table(
        "process_instances",
        sa.Column("workflow_id", sa.String(length=200), nullable=False),
        sa.Column("process_type", sa.String(length=64), nullable=False),
        sa.Column("business_key", sa.String(length=64), nullable=False),
        sa.Column("definition_kind", sa.String(length=16), nullable=False),
        sa.Column("definition_version", sa.String(length=80), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=True),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("requester", sa.String(length=64), nullable=False),
        sa.Column("owner_role", sa.String(length=64), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stage_entered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("workflow_id"),
        sa.UniqueConstraint("process_type", "business_key"),
    )
    with op.batch_alter_table("process_instances", schema=None) as batch_op:
        batch_op.create_index(
            "ix_process_instances_type_stage", ["process_type", "stage"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_process_instances_status"), ["status"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_process_instances_requester"), ["requester"], unique=False
        )

    op.create_table(
        "stage_visits",
        sa.Column("workflow_id", sa.String(length=200), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column("entered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("left_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=64), nullable=True),
        sa.Column("by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("workflow_id", "seq"),
    )
    with op.batch_alter_table("stage_visits", schema=None) as batch_op:
        batch_op.create_index("ix_stage_visits_stage_left", ["stage", "left_at"], unique=False)

    op.create_table(
        "sla_events",
        sa.Column("event_key", sa.String(length=300), nullable=False),
        sa.Column("workflow_id", sa.String(length=200), nullable=False),
        sa.Column("task_id", sa.String(length=200), nullable=True),
        sa.Column("sla", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("event_key"),
    )
    with op.batch_alter_table("sla_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_sla_events_workflow_id"), ["workflow_id"], unique=False
        )


def _backfill_instances() -> None:
    bind = op.get_bind()
    orders = bind.execute(sa.select(_orders).order_by(_orders.c.order_no)).mappings().all()
    if not orders:
        return
    instances = sa.table(
        "process_instances",
        *(
            sa.column(n)
            for n in (
                "workflow_id", "process_type", "business_key", "definition_kind",
                "definition_version", "policy_version", "stage", "status", "requester",
                "owner_role", "started_at", "stage_entered_at", "closed_at", "updated_at",
                "revision",
            )
        ),
        sa.column("summary", sa.JSON),
    )  # fmt: skip
    visits = sa.table(
        "stage_visits",
        *(sa.column(n) for n in ("workflow_id", "seq", "stage", "entered_at", "left_at")),
        *(sa.column(n) for n in ("outcome", "by")),
    )
    rows = []
    for o in orders:
        status = STATUS_OF_STAGE.get(o["stage"], "running")
        rows.append(
            {
                "workflow_id": o["workflow_id"],
                "process_type": SALES_ORDER,
                "business_key": o["order_no"],
                "definition_kind": "code",
                "definition_version": "",
                "policy_version": o["policy_version"],
                "stage": o["stage"],
                "status": status,
                "requester": o["requester"],
                "owner_role": None,
                "started_at": o["created_at"],
                "stage_entered_at": o["updated_at"],
                "closed_at": None if status == "running" else o["updated_at"],
                "updated_at": o["updated_at"],
                "revision": 0,
                "summary": {
                    "customer_id": o["customer_id"],
                    "customer_name": o["customer_name"],
                    "amount": str(Decimal(o["amount"]).scaleb(-2)),  # cents: "1234.50"
                    "currency": o["currency"],
                    "special_change": bool(o["special_change"]),
                },
            }
        )
    bind.execute(instances.insert(), rows)
    bind.execute(
        visits.insert(),
        [
            {
                "workflow_id": o["workflow_id"],
                "seq": 0,
                "stage": o["stage"],
                "entered_at": o["updated_at"],
                "left_at": None,
                "outcome": None,
                "by": None,
            }
            for o in orders
        ],
    )


def _alter_orders(add_fk: bool) -> None:
    """Add or drop the foreign key of orders.workflow_id (on SQLite: recreate orders, with
    order_lines' foreign key set aside meanwhile)."""
    sqlite = _sqlite()
    if sqlite:
        with op.batch_alter_table("order_lines", naming_convention=_NAMING) as batch_op:
            batch_op.drop_constraint(_ORDER_LINES_FK, type_="foreignkey")
    with op.batch_alter_table("orders", naming_convention=_NAMING) as batch_op:
        if add_fk:
            batch_op.create_foreign_key(
                _ORDERS_FK, "process_instances", ["workflow_id"], ["workflow_id"]
            )
        else:
            batch_op.drop_constraint(_ORDERS_FK, type_="foreignkey")
    if sqlite:
        with op.batch_alter_table("order_lines") as batch_op:
            batch_op.create_foreign_key(
                _ORDER_LINES_FK, "orders", ["order_no"], ["order_no"], ondelete="CASCADE"
            )


def upgrade() -> None:
    _create_tables()
    _backfill_instances()
    _alter_orders(add_fk=True)
    with op.batch_alter_table("payments_ledger", schema=None) as batch_op:
        batch_op.add_column(sa.Column("workflow_id", sa.String(length=200), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_payments_ledger_workflow_id"), ["workflow_id"], unique=False
        )
    op.execute(
        "UPDATE payments_ledger SET workflow_id = (SELECT orders.workflow_id FROM orders "
        "WHERE orders.order_no = payments_ledger.order_no)"
    )


def downgrade() -> None:
    with op.batch_alter_table("payments_ledger", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payments_ledger_workflow_id"))
        batch_op.drop_column("workflow_id")
    _alter_orders(add_fk=False)
    with op.batch_alter_table("sla_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sla_events_workflow_id"))
    op.drop_table("sla_events")
    with op.batch_alter_table("stage_visits", schema=None) as batch_op:
        batch_op.drop_index("ix_stage_visits_stage_left")
    op.drop_table("stage_visits")
    with op.batch_alter_table("process_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_process_instances_requester"))
        batch_op.drop_index(batch_op.f("ix_process_instances_status"))
        batch_op.drop_index("ix_process_instances_type_stage")
    op.drop_table("process_instances")
