"""Database engine and tables of the business records and the read model (SQLAlchemy 2, async).

Every table that activities write has a natural or idempotency key with a unique constraint, so
that an activity retried after a crash writes nothing twice.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
)
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import operators


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


def to_minor_units(value: Any, scale: int, precision: int, rounding: str = "exact") -> int:
    """value (int or Decimal) as an integer count of 10**-scale units, computed exactly.

    `exact` refuses (ValueError) a value with more than `scale` decimals, or beyond the range
    of a column of `precision` digits (|value| >= 10**(precision - scale)), instead of rounding
    it silently.
    `ceiling` and `floor` round a comparison bound towards the side that keeps the comparison
    exact, and clamp a bound beyond the range to its edge (no stored value reaches it).
    """
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError(f"{value!r} is not an exact amount: pass a Decimal or an int")
    limit = 10**precision
    if isinstance(value, int):
        units = value * 10**scale
    else:
        if not value.is_finite():
            raise ValueError(f"{value} is not a finite amount")
        sign, digits, exponent = value.as_tuple()
        assert isinstance(exponent, int)  # finite
        coefficient = int("".join(map(str, digits)))
        if coefficient and value.adjusted() >= precision - scale:
            if rounding == "exact":
                raise ValueError(f"{value} is beyond the range of {precision - scale} digits")
            return -limit if sign else limit
        shift = exponent + scale
        if shift >= 0:
            units = coefficient * 10**shift
        else:
            # shift is negative: drop -shift digits, which must be zeros for an exact value
            divisor = 10 ** min(-shift, len(digits))
            units, remainder = divmod(coefficient, divisor)
            if remainder:
                if rounding == "exact":
                    raise ValueError(f"{value} has more than {scale} decimal places")
                # toward +infinity for a lower bound, -infinity for an upper one
                units += 1 if (rounding == "ceiling") != bool(sign) else 0
        units = -units if sign else units
    if abs(units) >= limit:
        if rounding == "exact":
            raise ValueError(f"{value} is beyond the range of {precision - scale} digits")
        return max(-limit, min(limit, units))
    return units


def from_minor_units(value: Any, scale: int) -> Decimal:
    """A stored count of 10**-scale units (int; a Decimal from SUM on PostgreSQL) as a Decimal
    with `scale` places."""
    return Decimal(value if isinstance(value, int | Decimal) else str(value)).scaleb(-scale)


# x >= b  <=>  units >= ceil(b * 10**scale); x <= b  <=>  units <= floor(b * 10**scale)
_BOUND_ROUNDING = {
    operators.ge: "ceiling",
    operators.lt: "ceiling",
    operators.le: "floor",
    operators.gt: "floor",
}


class _MinorUnitsComparator(TypeDecorator.Comparator, BigInteger.Comparator):
    """Sums and differences of columns of one scale keep the type, so `on_hand - reserved >=
    delta` (activities/warehouse.py) binds delta in minor units too; left to SQLAlchemy the
    difference is a plain BIGINT and delta would be compared as units against thousandths.
    Products and quotients are refused: `amount * 2` would bind 2 as 200 cents, and cents
    times thousandths is neither."""

    def _adapt_expression(self, op, other_comparator):
        own, other = self.type, other_comparator.type
        if op in (operators.add, operators.sub):
            if isinstance(own, MinorUnits) and isinstance(other, MinorUnits):
                if other.scale == own.scale:
                    return op, own
        if op in (operators.mul, operators.truediv, operators.floordiv, operators.mod):
            raise NotImplementedError(
                f"{op.__name__} on an amount stored in minor units: compute it in Python"
            )
        return super()._adapt_expression(op, other_comparator)


class MinorUnits(TypeDecorator):
    """An exact decimal with `scale` places stored as a BIGINT count of 10**-scale units
    (money in cents, quantities in thousandths): exact on SQLite, whose NUMERIC is a float,
    and on PostgreSQL, and compared, ordered and summed in SQL as integers.

    Values with more decimals than `scale`, or of `precision` digits or more, are refused
    (ValueError) when stored. A comparison bound (`amount_due >= x`) is converted with the
    operator in view, so any Decimal bound compares exactly.
    """

    impl = BigInteger
    cache_ok = True
    comparator_factory = _MinorUnitsComparator

    def __init__(self, scale: int, precision: int = 18) -> None:
        super().__init__()
        self.scale = scale
        self.precision = precision

    def coerce_compared_value(self, op, value):
        rounding = _BOUND_ROUNDING.get(op)
        if rounding is None:
            return self
        return _MinorUnitsBound(self.scale, self.precision, rounding)

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        return to_minor_units(value, self.scale, self.precision)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return from_minor_units(value, self.scale)


class _MinorUnitsBound(MinorUnits):
    """The type of a bound compared with a MinorUnits column: rounded towards the side that
    keeps the comparison exact instead of refused."""

    cache_ok = True

    def __init__(self, scale: int, precision: int, rounding: str) -> None:
        super().__init__(scale, precision)
        self.rounding = rounding

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        return to_minor_units(value, self.scale, self.precision, self.rounding)


# NUMERIC(18, 2) and NUMERIC(18, 3) before migration 0003
Money = MinorUnits(2)
Quantity = MinorUnits(3)


class UTCDateTime(TypeDecorator):
    """Timestamps stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


TZDateTime = UTCDateTime()


class User(Base):
    __tablename__ = "users"
    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(254))
    password_hash: Mapped[str] = mapped_column(String(200))
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(default=True)


class PolicyVersion(Base):
    __tablename__ = "policy_versions"
    __table_args__ = (UniqueConstraint("process_type", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    process_type: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    document: Mapped[dict] = mapped_column(JSON)
    published_by: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    note: Mapped[str] = mapped_column(Text, default="")


class BlueprintVersion(Base):
    """One published version of a blueprint, named by the sha256 of its canonical JSON and
    numbered per process (seq 1, 2, ...); immutable: never updated after it is inserted."""

    __tablename__ = "blueprint_versions"
    __table_args__ = (UniqueConstraint("process", "seq"),)
    version: Mapped[str] = mapped_column(String(80), primary_key=True)  # sha256:<hex>
    process: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(String(200))
    document: Mapped[str] = mapped_column(Text)  # the canonical JSON text, exactly
    source: Mapped[str | None] = mapped_column(Text, nullable=True)  # the YAML as published
    published_by: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    note: Mapped[str] = mapped_column(Text, default="")


class BlueprintCurrent(Base):
    """The version of each blueprint process that new instances start with."""

    __tablename__ = "blueprint_current"
    process: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(ForeignKey("blueprint_versions.version"))
    updated_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(64))


class ProcessInstance(Base):
    """The read model of one process instance, of any type (code or blueprint), keyed by its
    workflow id; written by the `project` activity, never older over newer (revision)."""

    __tablename__ = "process_instances"
    __table_args__ = (
        UniqueConstraint("process_type", "business_key"),
        Index("ix_process_instances_type_stage", "process_type", "stage"),
    )
    workflow_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    process_type: Mapped[str] = mapped_column(String(64))
    business_key: Mapped[str] = mapped_column(String(64))
    definition_kind: Mapped[str] = mapped_column(String(16), default="code")  # code | blueprint
    definition_version: Mapped[str] = mapped_column(String(80), default="")
    policy_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stage: Mapped[str] = mapped_column(String(64))
    # running | completed | failed | cancelled | terminated
    status: Mapped[str] = mapped_column(String(16), index=True)
    requester: Mapped[str] = mapped_column(String(64), index=True)
    owner_role: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[datetime] = mapped_column(TZDateTime)
    stage_entered_at: Mapped[datetime] = mapped_column(TZDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[dict] = mapped_column(JSON, default=dict)


class StageVisit(Base):
    """One entry into a stage, numbered by the workflow (seq 0: the stage an instance was in
    when the read model was introduced); `left_at` is null while the instance sits there."""

    __tablename__ = "stage_visits"
    __table_args__ = (Index("ix_stage_visits_stage_left", "stage", "left_at"),)
    workflow_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    stage: Mapped[str] = mapped_column(String(64))
    entered_at: Mapped[datetime] = mapped_column(TZDateTime)
    left_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(64), nullable=True)
    by: Mapped[str | None] = mapped_column(String(64), nullable=True)


class SlaEvent(Base):
    """A reminder, escalation or breach of a task's timer or a stage or process SLA."""

    __tablename__ = "sla_events"
    event_key: Mapped[str] = mapped_column(String(300), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(String(200), index=True)
    task_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    sla: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # reminded | escalated | breached
    at: Mapped[datetime] = mapped_column(TZDateTime)
    details: Mapped[dict] = mapped_column(JSON, default=dict)


class Order(Base):
    """The sales order's extension of its instance (`process_instances`)."""

    __tablename__ = "orders"
    order_no: Mapped[str] = mapped_column(String(64), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(
        ForeignKey("process_instances.workflow_id"), unique=True
    )
    customer_id: Mapped[str] = mapped_column(String(64), index=True)
    customer_name: Mapped[str] = mapped_column(String(200))
    customer_email: Mapped[str] = mapped_column(String(254))
    requester: Mapped[str] = mapped_column(String(64), index=True)
    variant: Mapped[str] = mapped_column(String(32))
    currency: Mapped[str] = mapped_column(String(3))
    amount: Mapped[Decimal] = mapped_column(Money)
    amount_due: Mapped[Decimal] = mapped_column(Money, index=True)
    special_change: Mapped[bool] = mapped_column(default=False)
    stage: Mapped[str] = mapped_column(String(32), index=True)
    policy_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)


class OrderLine(Base):
    __tablename__ = "order_lines"
    __table_args__ = (UniqueConstraint("order_no", "line_no"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_no: Mapped[str] = mapped_column(ForeignKey("orders.order_no", ondelete="CASCADE"))
    line_no: Mapped[int] = mapped_column(Integer)
    sku: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(400), default="")
    quantity: Mapped[Decimal] = mapped_column(Quantity)
    unit_price: Mapped[Decimal] = mapped_column(Money)


class TaskRow(Base):
    """Read model of human tasks: the inbox reads this, never Temporal visibility."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_open", "status", "assignee"),
        # the inbox pages open tasks oldest first: walked in order, it stops after one page
        Index("ix_tasks_inbox_order", "status", "created_at", "task_id"),
    )
    task_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(String(200), index=True)
    process_type: Mapped[str] = mapped_column(String(64))
    business_key: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    candidate_roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    assignee: Mapped[str | None] = mapped_column(String(64), nullable=True)
    requester: Mapped[str] = mapped_column(String(64))
    outcomes: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    due_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    escalated: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(TZDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    # monotonic version from the workflow: an older snapshot never overwrites a newer one
    revision: Mapped[int] = mapped_column(Integer, default=0)


class TaskCandidate(Base):
    """One row per candidate role of a task, for indexed inbox queries."""

    __tablename__ = "task_candidates"
    task_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.task_id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_key: Mapped[str] = mapped_column(String(300), unique=True)
    workflow_id: Mapped[str] = mapped_column(String(200), index=True)
    task_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    at: Mapped[datetime] = mapped_column(TZDateTime)


class LedgerEntry(Base):
    """The payments ledger; the embedded sandbox provider keeps its charges here too."""

    __tablename__ = "payments_ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(300), unique=True)
    order_no: Mapped[str] = mapped_column(String(64), index=True)
    # the instance the money belongs to (null: booked outside an activity, or an order unknown
    # when migration 0004 filled it in)
    workflow_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(16))  # charge | refund | incoming
    amount: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(String(3))
    provider_ref: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16))
    # for a refund: the key of the charge or incoming payment it gives back
    original_key: Mapped[str | None] = mapped_column(String(300), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)


# the longest provider message kept with a decline (payment_declines.reason)
DECLINE_REASON_LENGTH = 200


class PaymentDecline(Base):
    """A charge or refund the provider declined, once per idempotency key (the first decline
    is kept). Never a row of payments_ledger: the sandbox reads a ledger key as "charged", so a
    retried declined charge would then succeed."""

    __tablename__ = "payment_declines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # the key of the charge or refund that was declined
    idempotency_key: Mapped[str] = mapped_column(String(300), unique=True)
    # the instance that asked (null: outside an activity)
    workflow_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    order_no: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # charge | refund
    amount: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(String(3))
    # the provider's message, cut to DECLINE_REASON_LENGTH, long digit runs masked
    reason: Mapped[str] = mapped_column(String(DECLINE_REASON_LENGTH))
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)


class OutboxMessage(Base):
    __tablename__ = "notification_outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(300), unique=True)
    workflow_id: Mapped[str] = mapped_column(String(200), index=True)
    recipients: Mapped[list[str]] = mapped_column(JSON)
    subject: Mapped[str] = mapped_column(String(400))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | sending | sent
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    # delivery by the mail dispatcher: failed attempts so far, when to try again, until when
    # a dispatcher holds the row, and the last failure
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the trace-context headers of the span that queued it (core/tracecontext.py; null: none)
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)


class StockItem(Base):
    __tablename__ = "stock"
    sku: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(String(400), default="")
    on_hand: Mapped[Decimal] = mapped_column(Quantity)
    reserved: Mapped[Decimal] = mapped_column(Quantity, default=0)


class StockReservation(Base):
    __tablename__ = "stock_reservations"
    __table_args__ = (UniqueConstraint("order_no", "sku"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_no: Mapped[str] = mapped_column(String(64), index=True)
    sku: Mapped[str] = mapped_column(String(64))
    quantity: Mapped[Decimal] = mapped_column(Quantity)
    status: Mapped[str] = mapped_column(String(16))  # held | released | shipped


class Shipment(Base):
    __tablename__ = "shipments"
    order_no: Mapped[str] = mapped_column(String(64), primary_key=True)
    tracking_no: Mapped[str] = mapped_column(String(64))
    shipped_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)


class Invoice(Base):
    __tablename__ = "invoices"
    invoice_no: Mapped[str] = mapped_column(String(64), primary_key=True)
    order_no: Mapped[str] = mapped_column(String(64), unique=True)
    amount: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(String(3))
    issued_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)


# SQLite primary result codes after which a connection is not to be trusted again: a file
# opened while it could not be written stays read-only for the life of the connection
# (SQLITE_READONLY), and one that failed to write or open (SQLITE_IOERR, SQLITE_CANTOPEN) may
# hold a half-opened journal
_SQLITE_STALE_CODES = {8, 10, 14}
_SQLITE_STALE_MESSAGES = ("readonly database", "disk i/o error", "unable to open database")
# PostgreSQL: read_only_sql_transaction (a standby, or default_transaction_read_only, which a
# session keeps from its start)
_PG_STALE_SQLSTATES = {"25006"}


def _is_stale_connection_error(err: BaseException | None) -> bool:
    """A DBAPI error after which the connection must be thrown away (a new one may work)."""
    if err is None:
        return False
    code = getattr(err, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _SQLITE_STALE_CODES:
        return True
    if getattr(err, "sqlstate", None) in _PG_STALE_SQLSTATES:
        return True
    message = str(err).lower()
    return type(err).__name__ == "OperationalError" and any(
        m in message for m in _SQLITE_STALE_MESSAGES
    )


def make_engine(url: str, **kwargs) -> AsyncEngine:
    """Create the async engine; SQLite gets WAL, a busy timeout and enforced foreign keys.

    A connection that failed because the database could not be written (a read-only or
    unreachable file, a read-only PostgreSQL session) counts as disconnected: the pool drops it
    and the connections opened alongside it, so the engine writes again, without a restart,
    once the database does.
    """
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"timeout": 30})
    # an error's text never carries the statement's parameters (personal data) into a log
    kwargs.setdefault("hide_parameters", True)
    engine = create_async_engine(url, **kwargs)

    @event.listens_for(engine.sync_engine, "handle_error")
    def _stale_is_disconnect(context) -> None:
        if not context.is_disconnect and _is_stale_connection_error(context.original_exception):
            context.is_disconnect = True

    if url.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)
