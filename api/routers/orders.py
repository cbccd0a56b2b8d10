"""Sales orders: start an instance, read its status, amend, cancel, report payments, search."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from sqlalchemy import func, select
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from api.deps import CurrentUser, SessionDep, SettingsDep, TemporalDep, require_roles
from api.errors import is_process_ended, not_found_as, responses
from api.schemas import (
    Accepted,
    AmendBody,
    CancelBody,
    OrderPage,
    OrderSearchHit,
    OrderSearchPage,
    OrderSummary,
    PaymentBody,
    Principal,
)
from core.db import Order
from core.settings import Settings
from core.temporal import AMOUNT, CUSTOMER_ID, PROCESS_TYPE, STAGE
from workflows.sales_order import (
    MEMO_FINGERPRINT,
    WORKFLOW_ID_PREFIX,
    AmendInput,
    CancelInput,
    OrderDetails,
    PaymentEvent,
    SalesOrderInput,
    SalesOrderResult,
    SalesOrderStatus,
    SalesOrderWorkflow,
    Stage,
    amount_of,
    input_fingerprint,
    sales_order_workflow_id,
)
from workflows.sales_order import PROCESS_TYPE as SALES_ORDER

router = APIRouter(prefix="/orders", tags=["orders"])

Submitter = Annotated[Principal, Depends(require_roles("requester", "sales", "manager"))]
Finance = Annotated[Principal, Depends(require_roles("finance"))]

OrderHandle = WorkflowHandle[SalesOrderWorkflow, SalesOrderResult]

# an order number as OrderDetails accepts it; anything else is 422 before Temporal is asked
OrderNo = Annotated[str, Path(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
# amounts as an order can carry them (16 digits); larger filters are 422, not a broken query
MAX_AMOUNT = Decimal("1e16")


def _rpc_timeout(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.temporal_rpc_timeout_s)


def _update_timeout(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.update_wait_s)


def _handle(client: Client, order_no: str) -> OrderHandle:
    return client.get_workflow_handle_for(SalesOrderWorkflow.run, sales_order_workflow_id(order_no))


def _unknown(order_no: str) -> str:
    return f"order {order_no} not found"


def summary_line(inp: SalesOrderInput) -> str:
    """The instance's static summary, e.g. 'Sales order 1001 - ACME Ltd - 1,200,000.00 EUR'."""
    amount = amount_of(inp.lines)
    customer = inp.customer.company_name
    return f"Sales order {inp.order_no} - {customer} - {amount:,.2f} {inp.currency}"


async def _current_status(
    handle: OrderHandle, settings: Settings, running: bool
) -> SalesOrderStatus:
    """The status once settled (running instance) or as the ended instance left it."""
    if running:
        try:
            return await handle.execute_update(
                SalesOrderWorkflow.settle, rpc_timeout=_update_timeout(settings)
            )
        except Exception as err:
            if not is_process_ended(err):
                raise
    return await handle.query(SalesOrderWorkflow.status, rpc_timeout=_rpc_timeout(settings))


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
    settings: SettingsDep,
    response: Response,
) -> SalesOrderStatus:
    """Start the order's process; returns its status once its first tasks are in the inboxes."""
    inp = SalesOrderInput.model_validate({**details.model_dump(), "requester": user.username})
    fingerprint = input_fingerprint(inp)
    wid = sales_order_workflow_id(inp.order_no)
    try:
        handle = await client.start_workflow(
            SalesOrderWorkflow.run,
            inp,
            id=wid,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            memo={MEMO_FINGERPRINT: fingerprint},
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(PROCESS_TYPE, SALES_ORDER),
                    SearchAttributePair(STAGE, Stage.RECEIVED.value),
                    SearchAttributePair(CUSTOMER_ID, inp.customer.id),
                    SearchAttributePair(AMOUNT, float(amount_of(inp.lines))),
                ]
            ),
            static_summary=summary_line(inp),
            rpc_timeout=_rpc_timeout(settings),
        )
    except WorkflowAlreadyStartedError:
        handle = _handle(client, inp.order_no)
        desc = await handle.describe(rpc_timeout=_rpc_timeout(settings))
        if await desc.memo_value(MEMO_FINGERPRINT, None) != fingerprint:
            raise HTTPException(
                status.HTTP_409_CONFLICT, "order_no already used with a different order"
            ) from None
        response.status_code = status.HTTP_200_OK
        return await _current_status(
            handle, settings, desc.status == WorkflowExecutionStatus.RUNNING
        )
    return await _current_status(handle, settings, running=True)


def _visible(query, user: Principal):
    return query.where(Order.requester == user.username) if user.requester_only else query


@router.get("", response_model=OrderPage, responses=responses(401))
async def list_orders(
    user: CurrentUser,
    session: SessionDep,
    stage: Stage | None = None,
    customer_id: str | None = None,
    min_amount: Annotated[
        Decimal | None, Query(ge=0, le=MAX_AMOUNT, description="amount_due >=")
    ] = None,
    max_amount: Annotated[
        Decimal | None, Query(ge=0, le=MAX_AMOUNT, description="amount_due <=")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
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


def quote(value: str) -> str:
    """A string literal for a visibility query: quotes and backslashes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def visibility_query(
    stage: Stage | None,
    customer_id: str | None,
    min_amount: Decimal | None,
    max_amount: Decimal | None,
) -> str:
    clauses = [f"ProcessType = {quote(SALES_ORDER)}"]
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
    session: SessionDep,
    stage: Stage | None = None,
    customer_id: Annotated[str | None, Query(max_length=64)] = None,
    min_amount: Annotated[
        Decimal | None, Query(ge=0, le=MAX_AMOUNT, description="Amount >=")
    ] = None,
    max_amount: Annotated[
        Decimal | None, Query(ge=0, le=MAX_AMOUNT, description="Amount <=")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> OrderSearchPage:
    """Orders through Temporal visibility (eventually consistent: a new stage shows up late)."""
    query = visibility_query(stage, customer_id, min_amount, max_amount)
    hits: list[OrderSearchHit] = []
    seen = 0
    async for wf in client.list_workflows(
        query, page_size=min(limit + offset, 1000), rpc_timeout=_rpc_timeout(settings)
    ):
        seen += 1
        if seen <= offset:
            continue
        sa = wf.typed_search_attributes
        hits.append(
            OrderSearchHit(
                workflow_id=wf.id,
                order_no=wf.id.removeprefix(WORKFLOW_ID_PREFIX),
                stage=sa.get(STAGE),
                customer_id=sa.get(CUSTOMER_ID),
                amount=sa.get(AMOUNT),
                status=wf.status.name if wf.status else None,
            )
        )
        if len(hits) >= limit:
            break
    if user.requester_only and hits:
        own = set(
            await session.scalars(
                select(Order.order_no).where(
                    Order.requester == user.username,
                    Order.order_no.in_([h.order_no for h in hits]),
                )
            )
        )
        hits = [h for h in hits if h.order_no in own]
    return OrderSearchPage(items=hits, query=query, limit=limit, offset=offset)


async def _visible_status(
    client: Client, order_no: str, user: Principal, settings: Settings
) -> SalesOrderStatus:
    """The order's status; 404 for a requester who did not submit it (its existence is hidden)."""
    with not_found_as(_unknown(order_no)):
        result = await _handle(client, order_no).query(
            SalesOrderWorkflow.status, rpc_timeout=_rpc_timeout(settings)
        )
    if user.requester_only and result.requester != user.username:
        raise HTTPException(status.HTTP_404_NOT_FOUND, _unknown(order_no))
    return result


@router.get(
    "/{order_no}", response_model=SalesOrderStatus, responses=responses(401, 404, 409, 422, 503)
)
async def order_status(
    order_no: OrderNo, user: CurrentUser, client: TemporalDep, settings: SettingsDep
) -> SalesOrderStatus:
    """The live status of an order: stage, pending tasks, decisions, payments, policy version."""
    return await _visible_status(client, order_no, user, settings)


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
    settings: SettingsDep,
) -> SalesOrderStatus:
    """Record a special change; procurement, production and inspection must acknowledge it."""
    arg = AmendInput(description=body.description, actor=user.actor)
    return await _order_update(client, order_no, user, settings, SalesOrderWorkflow.amend, arg)


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
    settings: SettingsDep,
) -> SalesOrderStatus:
    """Cancel the order (requester or manager); what was already done is compensated."""
    arg = CancelInput(reason=body.reason, actor=user.actor)
    return await _order_update(client, order_no, user, settings, SalesOrderWorkflow.cancel, arg)


async def _order_update(
    client: Client,
    order_no: str,
    user: Principal,
    settings: Settings,
    update: Any,  # SalesOrderWorkflow.amend or .cancel
    arg: AmendInput | CancelInput,
) -> SalesOrderStatus:
    """Run an update on an order the caller may see (another requester's order is a 404)."""
    if user.requester_only:
        await _visible_status(client, order_no, user, settings)
    with not_found_as(_unknown(order_no)):
        return await _handle(client, order_no).execute_update(
            update, arg, rpc_timeout=_update_timeout(settings)
        )


@router.post(
    "/{order_no}/payments",
    response_model=Accepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=responses(401, 403, 404, 409, 422, 503),
)
async def report_payment(
    order_no: OrderNo, body: PaymentBody, user: Finance, client: TemporalDep, settings: SettingsDep
) -> Accepted:
    """Report an incoming payment to the order (finance); a repeated event_id changes nothing."""
    with not_found_as(_unknown(order_no)):
        await _handle(client, order_no).signal(
            SalesOrderWorkflow.payment_received,
            PaymentEvent(event_id=body.event_id, amount=body.amount),
            rpc_timeout=_rpc_timeout(settings),
        )
    return Accepted()
