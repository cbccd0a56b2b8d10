"""Sales orders: start an instance, read its status, amend, cancel, report payments, search."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any

import pycountry
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import CurrentUser, SessionDep, SettingsDep, TemporalDep, require_roles
from api.errors import (
    RETRY_AFTER_S,
    application_error_of,
    body_errors,
    is_not_found,
    is_process_ended,
    not_found_as,
    responses,
)
from api.routers.health import database_takes_write
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
from core.settings import Settings
from core.temporal import AMOUNT, CUSTOMER_ID, PROCESS_TYPE, REQUESTER, STAGE
from workflows.policy import SalesOrderPolicy
from workflows.sales_order import (
    DUPLICATE_EVENT,
    LEGACY_WORKFLOW_ID_PREFIX,
    MEMO_FINGERPRINT,
    TERMINAL_STAGES,
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
    submission,
)
from workflows.sales_order import PROCESS_TYPE as SALES_ORDER

log = logging.getLogger("procflow.api")

router = APIRouter(prefix="/orders", tags=["orders"])

Submitter = Annotated[Principal, Depends(require_roles("requester", "sales", "manager"))]
Finance = Annotated[Principal, Depends(require_roles("finance"))]

OrderHandle = WorkflowHandle[SalesOrderWorkflow, SalesOrderResult]

# an order number as OrderDetails accepts it; anything else is 422 before Temporal is asked
OrderNo = Annotated[str, Path(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
# amounts as an order can carry them (16 digits); larger filters are 422, not a broken query
MAX_AMOUNT = Decimal("1e16")
# visibility is paged through from its start: deeper search pages are 422
MAX_SEARCH_OFFSET = 10_000
# the same answer whoever holds the number (another requester's order is not revealed)
ORDER_NO_TAKEN = "order_no already used with a different order"
DATABASE_READ_ONLY = "the database does not take writes: no order is started; retry later"
# between two status queries of a resubmitted order that is still acting on something
SETTLE_POLL_MIN_S = 0.02
SETTLE_POLL_MAX_S = 0.25


def _rpc_timeout(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.temporal_rpc_timeout_s)


def _update_timeout(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.update_wait_s)


def _handle(client: Client, workflow_id: str) -> OrderHandle:
    return client.get_workflow_handle_for(SalesOrderWorkflow.run, workflow_id)


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


async def _workflow_id(session: AsyncSession, order_no: str) -> str:
    """The order's instance id; the session's connection is given back before Temporal waits."""
    recorded = await _recorded_workflow_id(session, order_no)
    await session.close()
    return recorded or sales_order_workflow_id(order_no)


def _unknown(order_no: str) -> str:
    return f"order {order_no} not found"


def summary_line(inp: SalesOrderInput) -> str:
    """The instance's static summary, e.g. 'Sales order 1001 - ACME Ltd - 1,200,000.00 EUR'."""
    amount = amount_of(inp.lines)
    customer = inp.customer.company_name
    return f"Sales order {inp.order_no} - {customer} - {amount:,.2f} {inp.currency}"


# ------------------------------------------------------------------------------ submission
async def current_policy(session: AsyncSession) -> SalesOrderPolicy:
    """The policy new instances load at start: the newest published version, else defaults."""
    document = await session.scalar(
        select(PolicyVersion.document)
        .where(PolicyVersion.process_type == SALES_ORDER)
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


def _ready(result: SalesOrderStatus) -> bool:
    """The instance acted on everything it received and waits (or has ended); an instance that
    has not reached its first wait yet reports settled too, but no waiting_for."""
    return result.settled and (bool(result.waiting_for) or result.stage in TERMINAL_STAGES)


async def _settled_status(handle: OrderHandle, settings: Settings) -> SalesOrderStatus:
    """The status of a running instance once it is settled, by queries only (nothing enters its
    history); after settings.update_wait_s the last status, with settled false."""
    deadline = time.monotonic() + settings.update_wait_s
    pause = SETTLE_POLL_MIN_S
    while True:
        remaining = deadline - time.monotonic()
        wait = timedelta(seconds=max(0.5, min(settings.temporal_rpc_timeout_s, remaining)))
        try:
            result = await handle.query(SalesOrderWorkflow.status, rpc_timeout=wait)
        except RPCError as err:
            # the instance has not completed its first workflow task yet (WorkflowNotReady)
            if err.status != RPCStatusCode.FAILED_PRECONDITION or remaining <= 0:
                raise
        else:
            if _ready(result) or remaining <= 0:
                return result
        await asyncio.sleep(min(pause, max(remaining, 0.0)))
        pause = min(pause * 2, SETTLE_POLL_MAX_S)


async def _resubmitted(
    handle: OrderHandle, fingerprint: str, settings: Settings, response: Response
) -> SalesOrderStatus:
    """A start for an order number that has an instance: the same request again answers 200
    with its status (writing nothing to its history); anything else, whoever submitted the
    first, is 409 with the same text."""
    try:
        desc = await handle.describe(rpc_timeout=_rpc_timeout(settings))
    except RPCError as err:
        if is_not_found(err):  # recorded, but no longer kept by Temporal: the number is taken
            raise HTTPException(status.HTTP_409_CONFLICT, ORDER_NO_TAKEN) from None
        raise
    if await desc.memo_value(MEMO_FINGERPRINT, None) != fingerprint:
        raise HTTPException(status.HTTP_409_CONFLICT, ORDER_NO_TAKEN)
    response.status_code = status.HTTP_200_OK
    if desc.status == WorkflowExecutionStatus.RUNNING:
        return await _settled_status(handle, settings)
    return await handle.query(SalesOrderWorkflow.status, rpc_timeout=_rpc_timeout(settings))


async def _started_status(handle: OrderHandle, settings: Settings) -> SalesOrderStatus:
    """The status of the instance this request started, once its first tasks are open."""
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
    session: SessionDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
) -> SalesOrderStatus:
    """Start the order's process; returns its status once its first tasks are in the inboxes."""
    try:
        inp = submission(details, user.username)
    except ValidationError as err:  # the checks that run for new submissions only
        raise body_errors(err) from None
    fingerprint = input_fingerprint(inp)
    # an order number the read model knows has an instance (perhaps under a legacy id)
    recorded = await _recorded_workflow_id(session, inp.order_no)
    if recorded is None:
        await _check_submission(session, inp)
    await session.close()  # no database connection held while waiting on Temporal
    if recorded is not None:
        return await _resubmitted(_handle(client, recorded), fingerprint, settings, response)
    # an instance that cannot write its read model would hang at its first step: start none
    try:
        await database_takes_write(request.app.state.engine, settings.temporal_rpc_timeout_s)
    except Exception as err:  # noqa: BLE001 - read-only, locked, unreachable: all the same
        log.warning(
            "order %s not started: the database does not take writes: %s", inp.order_no, err
        )
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            DATABASE_READ_ONLY,
            headers={"Retry-After": RETRY_AFTER_S},
        ) from None
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
                    SearchAttributePair(REQUESTER, inp.requester),
                ]
            ),
            static_summary=summary_line(inp),
            rpc_timeout=_rpc_timeout(settings),
        )
    except WorkflowAlreadyStartedError:
        return await _resubmitted(_handle(client, wid), fingerprint, settings, response)
    return await _started_status(handle, settings)


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


def quote(value: str) -> str:
    """A string literal for a visibility query: quotes and backslashes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def visibility_query(
    stage: Stage | None,
    customer_id: str | None,
    min_amount: Decimal | None,
    max_amount: Decimal | None,
    requester: str | None = None,
) -> str:
    clauses = [f"ProcessType = {quote(SALES_ORDER)}"]
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
        query, page_size=min(limit + offset, 1000), rpc_timeout=_rpc_timeout(settings)
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
async def _visible_status(
    client: Client, workflow_id: str, order_no: str, user: Principal, settings: Settings
) -> SalesOrderStatus:
    """The order's status; 404 for a requester who did not submit it (its existence is hidden)."""
    with not_found_as(_unknown(order_no)):
        result = await _handle(client, workflow_id).query(
            SalesOrderWorkflow.status, rpc_timeout=_rpc_timeout(settings)
        )
    if user.requester_only and result.requester != user.username:
        raise HTTPException(status.HTTP_404_NOT_FOUND, _unknown(order_no))
    return result


@router.get(
    "/{order_no}", response_model=SalesOrderStatus, responses=responses(401, 404, 409, 422, 503)
)
async def order_status(
    order_no: OrderNo,
    user: CurrentUser,
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> SalesOrderStatus:
    """The live status of an order: stage, pending tasks, decisions, payments, policy version."""
    wid = await _workflow_id(session, order_no)
    return await _visible_status(client, wid, order_no, user, settings)


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
) -> SalesOrderStatus:
    """Record a special change; procurement, production and inspection must acknowledge it."""
    arg = AmendInput(description=body.description, actor=user.actor)
    wid = await _workflow_id(session, order_no)
    return await _order_update(client, wid, order_no, user, settings, SalesOrderWorkflow.amend, arg)


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
) -> SalesOrderStatus:
    """Cancel the order (requester or manager); what was already done is compensated."""
    arg = CancelInput(reason=body.reason, actor=user.actor)
    wid = await _workflow_id(session, order_no)
    return await _order_update(
        client, wid, order_no, user, settings, SalesOrderWorkflow.cancel, arg
    )


async def _order_update(
    client: Client,
    workflow_id: str,
    order_no: str,
    user: Principal,
    settings: Settings,
    update: Any,  # SalesOrderWorkflow.amend or .cancel
    arg: AmendInput | CancelInput,
) -> SalesOrderStatus:
    """Run an update on an order the caller may see (another requester's order is a 404)."""
    if user.requester_only:
        await _visible_status(client, workflow_id, order_no, user, settings)
    with not_found_as(_unknown(order_no)):
        return await _handle(client, workflow_id).execute_update(
            update, arg, rpc_timeout=_update_timeout(settings)
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
    changes nothing (202, duplicate), for another order or amount it is 409 and counts nowhere."""
    wid = await _workflow_id(session, order_no)
    event = PaymentEvent(event_id=body.event_id, amount=body.amount)
    handle = _handle(client, wid)
    try:
        with not_found_as(_unknown(order_no)):
            outcome = await handle.execute_update(
                SalesOrderWorkflow.pay, event, rpc_timeout=_update_timeout(settings)
            )
    except WorkflowUpdateFailedError as err:
        refusal = application_error_of(err)
        if refusal is None or refusal.type != DUPLICATE_EVENT:
            raise
        st = await handle.query(SalesOrderWorkflow.status, rpc_timeout=_rpc_timeout(settings))
        return PaymentReceipt(
            event_id=event.event_id,
            duplicate=True,
            paid=st.paid,
            refunded=st.refunded,
            balance=st.balance,
        )
    return PaymentReceipt(**outcome.model_dump())
