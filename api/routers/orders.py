"""Sales orders: friendly aliases of the sales order's routes in /processes (start, status,
cancel, the payment event), its own amend, read-model list and visibility search, and the
sales order's gateway hooks (checks at start, ids of older code, search attributes, summary)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any

import pycountry
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.common import SearchAttributePair

from api.deps import CurrentUser, SessionDep, SettingsDep, TemporalDep, require_roles
from api.errors import responses
from api.routers import processes
from api.routers.processes import GatewayHooks, quote
from api.schemas import (
    MAX_OFFSET,
    AmendBody,
    CancelBody,
    OrderPage,
    OrderSearchHit,
    OrderSearchPage,
    OrderSummary,
    PaymentBody,
    PaymentReceipt,
    Principal,
    QueryText,
)
from core.db import Order, PolicyVersion, StockItem
from core.temporal import AMOUNT, CUSTOMER_ID, STAGE
from workflows import registry
from workflows.policy import SalesOrderPolicy
from workflows.sales_order import (
    LEGACY_WORKFLOW_ID_PREFIX,
    PROCESS_TYPE,
    WORKFLOW_ID_PREFIX,
    AmendInput,
    OrderDetails,
    PaymentEvent,
    PaymentOutcome,
    SalesOrderInput,
    SalesOrderStatus,
    Stage,
    amount_of,
    input_fingerprint,
)

router = APIRouter(prefix="/orders", tags=["orders"])

SALES_ORDER = registry.get(PROCESS_TYPE)
PAYMENT = SALES_ORDER.events["payment"]

Submitter = Annotated[Principal, Depends(require_roles("requester", "sales", "manager"))]
Finance = Annotated[Principal, Depends(require_roles("finance"))]

# an order number as OrderDetails accepts it; anything else is 422 before Temporal is asked
OrderNo = Annotated[str, Path(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
# amounts as an order can carry them (16 digits); larger filters are 422, not a broken query
MAX_AMOUNT = Decimal("1e16")
# visibility is paged through from its start: deeper search pages are 422
MAX_SEARCH_OFFSET = 10_000
# the same answer whoever holds the number (another requester's order is not revealed)
ORDER_NO_TAKEN = "order_no already used with a different order"


def order_no_of(workflow_id: str) -> str:
    """The order number in an instance id, current ('sales_order-1001') or legacy."""
    for prefix in (WORKFLOW_ID_PREFIX, LEGACY_WORKFLOW_ID_PREFIX):
        if workflow_id.startswith(prefix):
            return workflow_id.removeprefix(prefix)
    return workflow_id


async def _recorded_workflow_id(session: AsyncSession, order_no: str) -> str | None:
    """The id the read model holds for the order (instances started before the rename keep
    'sales-order-<no>'); None before its first projection."""
    return await session.scalar(select(Order.workflow_id).where(Order.order_no == order_no))


def _unknown(order_no: str) -> str:
    return f"order {order_no} not found"


def summary_line(inp: SalesOrderInput) -> str:
    """The instance's static summary, e.g. 'Sales order 1001 - ACME Ltd - 1,200,000.00 EUR'."""
    amount = amount_of(inp.lines)
    customer = inp.customer.company_name
    return f"Sales order {inp.order_no} - {customer} - {amount:,.2f} {inp.currency}"


def _search_attributes(inp: SalesOrderInput) -> list[SearchAttributePair]:
    return [
        SearchAttributePair(CUSTOMER_ID, inp.customer.id),
        SearchAttributePair(AMOUNT, float(amount_of(inp.lines))),
    ]


# ------------------------------------------------------------------------------ submission
async def current_policy(session: AsyncSession) -> SalesOrderPolicy:
    """The policy new instances load at start: the newest published version, else defaults."""
    document = await session.scalar(
        select(PolicyVersion.document)
        .where(PolicyVersion.process_type == SALES_ORDER.name)
        .order_by(PolicyVersion.version.desc())
        .limit(1)
    )
    return SalesOrderPolicy() if document is None else SalesOrderPolicy.model_validate(document)


async def _check_submission(session: AsyncSession, inp: SalesOrderInput) -> None:
    """What the instance would refuse later, refused now: 422 naming each field."""
    errors: list[dict[str, Any]] = []
    if pycountry.currencies.get(alpha_3=inp.currency) is None:
        errors.append(
            {
                "type": "currency_unknown",
                "loc": ["body", "currency"],
                "msg": f"{inp.currency} is not an ISO 4217 currency code",
            }
        )
    else:
        accepted = (await current_policy(session)).currencies
        if inp.currency not in accepted:
            errors.append(
                {
                    "type": "currency_not_accepted",
                    "loc": ["body", "currency"],
                    "msg": f"orders are accepted in {', '.join(accepted)}, not {inp.currency}",
                }
            )
    skus = [line.sku for line in inp.lines]
    known = set(await session.scalars(select(StockItem.sku).where(StockItem.sku.in_(skus))))
    errors.extend(
        {
            "type": "sku_unknown",
            "loc": ["body", "lines", i, "sku"],
            "msg": f"no catalog item {sku}",
        }
        for i, sku in enumerate(skus)
        if sku not in known
    )
    if errors:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, errors)


def _duplicate_payment(event: PaymentEvent, current: SalesOrderStatus) -> PaymentOutcome:
    """A payment event reported again as it was: what the ledger holds now."""
    return PaymentOutcome(
        event_id=event.event_id,
        duplicate=True,
        paid=current.paid,
        refunded=current.refunded,
        balance=current.balance,
    )


HOOKS = processes.register_hooks(
    SALES_ORDER.name,
    GatewayHooks(
        check_start=_check_submission,
        recorded_workflow_id=_recorded_workflow_id,
        search_attributes=_search_attributes,
        summary=summary_line,
        fingerprint=input_fingerprint,
        business_key_of=order_no_of,
        not_found=_unknown,
        key_taken=ORDER_NO_TAKEN,
        duplicate_outcomes={PAYMENT.name: _duplicate_payment},
    ),
)


@router.post(
    "",
    response_model=SalesOrderStatus,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": SalesOrderStatus, "description": "The same order was already submitted"},
        **responses(401, 403, 409, 422, 503),
    },
)
async def submit_order(
    details: OrderDetails,
    user: Submitter,
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
) -> Any:
    """Start the order's process; returns its status once its first tasks are in the inboxes
    (`POST /processes/sales_order`)."""
    return await processes.start(
        SALES_ORDER, details, user, client, session, settings, request, response
    )


# ------------------------------------------------------------------------------ lists
def _visible(query, user: Principal):
    return query.where(Order.requester == user.username) if user.requester_only else query


@router.get("", response_model=OrderPage, responses=responses(401))
async def list_orders(
    user: CurrentUser,
    session: SessionDep,
    stage: Stage | None = None,
    customer_id: Annotated[QueryText | None, Query(max_length=64)] = None,
    min_amount: Annotated[
        Decimal | None, Query(ge=0, le=MAX_AMOUNT, description="amount_due >=")
    ] = None,
    max_amount: Annotated[
        Decimal | None, Query(ge=0, le=MAX_AMOUNT, description="amount_due <=")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> OrderPage:
    """Orders from the read model, newest first; requesters see only their own."""
    query = _visible(select(Order), user)
    if stage is not None:
        query = query.where(Order.stage == stage.value)
    if customer_id is not None:
        query = query.where(Order.customer_id == customer_id)
    if min_amount is not None:
        query = query.where(Order.amount_due >= min_amount)
    if max_amount is not None:
        query = query.where(Order.amount_due <= max_amount)
    total = await session.scalar(select(func.count()).select_from(query.subquery()))
    rows = await session.scalars(
        query.order_by(Order.created_at.desc(), Order.order_no).limit(limit).offset(offset)
    )
    return OrderPage(
        items=[OrderSummary.model_validate(r) for r in rows],
        total=total or 0,
        limit=limit,
        offset=offset,
    )


def visibility_query(
    stage: Stage | None,
    customer_id: str | None,
    min_amount: Decimal | None,
    max_amount: Decimal | None,
    requester: str | None = None,
) -> str:
    clauses = [f"ProcessType = {quote(SALES_ORDER.name)}"]
    if requester is not None:
        clauses.append(f"Requester = {quote(requester)}")
    if stage is not None:
        clauses.append(f"Stage = {quote(stage.value)}")
    if customer_id is not None:
        clauses.append(f"CustomerId = {quote(customer_id)}")
    if min_amount is not None:
        clauses.append(f"Amount >= {float(min_amount)!r}")
    if max_amount is not None:
        clauses.append(f"Amount <= {float(max_amount)!r}")
    return " AND ".join(clauses)


@router.get("/search", response_model=OrderSearchPage, responses=responses(401, 503))
async def search_orders(
    user: CurrentUser,
    client: TemporalDep,
    settings: SettingsDep,
    stage: Stage | None = None,
    customer_id: Annotated[QueryText | None, Query(max_length=64)] = None,
    min_amount: Annotated[
        Decimal | None, Query(ge=0, le=MAX_AMOUNT, description="Amount >=")
    ] = None,
    max_amount: Annotated[
        Decimal | None, Query(ge=0, le=MAX_AMOUNT, description="Amount <=")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_SEARCH_OFFSET)] = 0,
) -> OrderSearchPage:
    """Orders through Temporal visibility (eventually consistent: a new stage shows up late);
    requesters see only their own."""
    requester = user.username if user.requester_only else None
    query = visibility_query(stage, customer_id, min_amount, max_amount, requester)
    hits: list[OrderSearchHit] = []
    seen = 0
    async for wf in client.list_workflows(
        query,
        page_size=min(limit + offset, 1000),
        rpc_timeout=timedelta(seconds=settings.temporal_rpc_timeout_s),
    ):
        seen += 1
        if seen <= offset:
            continue
        sa = wf.typed_search_attributes
        hits.append(
            OrderSearchHit(
                workflow_id=wf.id,
                order_no=order_no_of(wf.id),
                stage=sa.get(STAGE),
                customer_id=sa.get(CUSTOMER_ID),
                amount=sa.get(AMOUNT),
                status=wf.status.name if wf.status else None,
            )
        )
        if len(hits) >= limit:
            break
    return OrderSearchPage(items=hits, query=query, limit=limit, offset=offset)


# ------------------------------------------------------------------------------ one order
@router.get(
    "/{order_no}", response_model=SalesOrderStatus, responses=responses(401, 404, 409, 422, 503)
)
async def order_status(
    order_no: OrderNo,
    user: CurrentUser,
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> Any:
    """The live status of an order: stage, pending tasks, decisions, payments, policy version
    (`GET /processes/sales_order/{order_no}`)."""
    return await processes.visible_status(SALES_ORDER, order_no, user, client, session, settings)


@router.post(
    "/{order_no}/amend",
    response_model=SalesOrderStatus,
    responses=responses(401, 403, 404, 409, 422, 503),
)
async def amend_order(
    order_no: OrderNo,
    body: AmendBody,
    user: CurrentUser,
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> Any:
    """Record a special change; procurement, production and inspection must acknowledge it."""
    arg = AmendInput(description=body.description, actor=user.actor)
    return await processes.update_visible(
        SALES_ORDER, order_no, "amend", arg, user, client, session, settings
    )


@router.post(
    "/{order_no}/cancel",
    response_model=SalesOrderStatus,
    responses=responses(401, 403, 404, 409, 422, 503),
)
async def cancel_order(
    order_no: OrderNo,
    body: CancelBody,
    user: CurrentUser,
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> Any:
    """Cancel the order (requester or manager); what was already done is compensated
    (`POST /processes/sales_order/{order_no}/cancel`)."""
    return await processes.cancel(
        SALES_ORDER, order_no, body.reason, user, client, session, settings
    )


@router.post(
    "/{order_no}/payments",
    response_model=PaymentReceipt,
    status_code=status.HTTP_202_ACCEPTED,
    responses=responses(401, 403, 404, 409, 422, 503),
)
async def report_payment(
    order_no: OrderNo,
    body: PaymentBody,
    user: Finance,
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> PaymentReceipt:
    """Report an incoming payment (finance): booked once in the ledger; the same event again
    changes nothing (202, duplicate), for another order or amount it is 409 and counts nowhere
    (`POST /processes/sales_order/{order_no}/events/payment`)."""
    event = PaymentEvent(event_id=body.event_id, amount=body.amount)
    receipt = await processes.send_event(
        SALES_ORDER, order_no, PAYMENT, event, user, client, session, settings
    )
    return PaymentReceipt.model_validate(receipt.outcome)
