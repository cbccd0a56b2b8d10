"""Processes of every registered type (workflows/registry.py): start, status, search, cancel and
external events. `/orders` answers as friendly aliases of the sales order's routes here.

What differs per type is data: the registry entry (start model, business key, workflow id,
status model, events, cancel update, roles) and, for what needs the API's own resources (the
database), the type's `GatewayHooks` (registered by the module that owns the type's routes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Annotated, Any, cast

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Query, Request, status
from fastapi import Response as FastAPIResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.client import (
    Client,
    WorkflowExecution,
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

from api import definitions
from api.deps import CurrentUser, SessionDep, SettingsDep, TemporalDep, require_roles
from api.errors import (
    RETRY_AFTER_S,
    application_error_of,
    body_errors,
    is_not_found,
    is_process_ended,
    not_found_as,
    param_error,
    responses,
)
from api.schemas import (
    CancelBody,
    EventReceipt,
    MigrateBody,
    Principal,
    ProcessHit,
    ProcessPage,
    QueryText,
)
from core.health import database_takes_write
from core.settings import Settings
from core.temporal import CUSTOMER_ID, PENDING_ROLES, PROCESS_TYPE, REQUESTER, STAGE
from workflows import registry
from workflows.blueprint.interpreter import MigrateInput
from workflows.errors import DUPLICATE_EVENT
from workflows.registry import ProcessEvent, ProcessType

log = logging.getLogger("procflow.api")

router = APIRouter(prefix="/processes", tags=["processes"])

# memo key holding the fingerprint of the input that started an instance (every type)
MEMO_FINGERPRINT = "input_fingerprint"
# the handlers every process has (the kernel's): the status query and the settle update
STATUS_QUERY = "status"
SETTLE_UPDATE = "settle"
MIGRATE_UPDATE = "migrate"  # a blueprint instance's move to another version
KEY_TAKEN = "this business key is already used by another instance"
DATABASE_READ_ONLY = "the database does not take writes: no instance is started; retry later"
# between two status queries of a resubmitted instance that is still acting on something
SETTLE_POLL_MIN_S = 0.02
SETTLE_POLL_MAX_S = 0.25
# component names of the schemas this router documents itself (start, event, status models)
SCHEMA_PREFIX = "process."

TypeName = Annotated[
    str,
    Path(min_length=1, max_length=64, description="a registered process type (GET /process-types)"),
]
# a business key as it can stand in a workflow id; anything else is 422 before Temporal is asked
BusinessKey = Annotated[
    str,
    Path(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$",
        description="the instance's business key (for a sales order: its order_no)",
    ),
]
EventName = Annotated[str, Path(min_length=1, max_length=64, description="the event's name")]

AnyHandle = WorkflowHandle[Any, Any]
# what a start's fingerprint leaves out: the carry, and a blueprint's pinned version (the same
# request again after a publish is still the same request)
FINGERPRINT_EXCLUDES = frozenset({"carry", "version", "document"})


def input_fingerprint(inp: BaseModel) -> str:
    """Stable hash of a start input (its `carry` and pinned version aside), to tell a retry from a
    conflicting reuse of the business key."""
    canonical = json.dumps(
        inp.model_dump(mode="json", exclude=set(FINGERPRINT_EXCLUDES)),
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@functools.cache
def strict(model: type[BaseModel]) -> type[BaseModel]:
    """The model as a request body: unknown fields refused (an `actor` or `requester` in a body
    is a 422, never ignored), whatever the workflow's own model allows."""
    if model.model_config.get("extra") == "forbid":
        return model
    config = ConfigDict(**{**model.model_config, "extra": "forbid"})  # type: ignore[typeddict-item]
    return cast(
        type[BaseModel],
        type(model.__name__, (model,), {"model_config": config, "__module__": model.__module__}),
    )


# ------------------------------------------------------------------------------ per-type hooks
DuplicateOutcome = Callable[[Any, Any], BaseModel]  # (event body, status) -> outcome


@dataclass(frozen=True)
class GatewayHooks:
    """What the gateway does differently for one process type; each default is the generic
    behaviour. Checks that need the database live here, not in the registry (workflow code)."""

    # refuse at start what the instance would refuse later: raise an HTTPException (422)
    check_start: Callable[[AsyncSession, Any], Awaitable[None]] | None = None
    # the workflow id the read model holds for a business key (ids of older code); None: none
    recorded_workflow_id: Callable[[AsyncSession, str], Awaitable[str | None]] | None = None
    # search attributes set at start besides ProcessType, Stage and Requester
    search_attributes: Callable[[Any], list[SearchAttributePair]] | None = None
    summary: Callable[[Any], str] | None = None  # the instance's line in the Temporal UI
    fingerprint: Callable[[Any], str] = input_fingerprint
    business_key_of: Callable[[str], str] | None = None  # workflow id -> business key
    not_found: Callable[[str], str] | None = None  # 404 text for a business key
    key_taken: str = KEY_TAKEN  # 409 text: the same whoever holds the key
    # event name -> (event body, status) -> what a duplicate event answers as its outcome
    duplicate_outcomes: Mapping[str, DuplicateOutcome] = field(
        default_factory=lambda: MappingProxyType({})
    )


_HOOKS: dict[str, GatewayHooks] = {}
_DEFAULT_HOOKS = GatewayHooks()


def register_hooks(process_type: str, hooks: GatewayHooks) -> GatewayHooks:
    """Give a registered process type its hooks (once, by the module owning its routes)."""
    registry.get(process_type)  # UnknownProcessType for a name the registry lacks
    existing = _HOOKS.get(process_type)
    if existing is not None and existing is not hooks:
        raise ValueError(f"process type {process_type!r} has hooks already")
    _HOOKS[process_type] = hooks
    return hooks


def hooks_of(process_type: str) -> GatewayHooks:
    return _HOOKS.get(process_type, _DEFAULT_HOOKS)


def _not_found(ptype: ProcessType, key: str) -> str:
    hooks = hooks_of(ptype.name)
    return hooks.not_found(key) if hooks.not_found else f"{ptype.name} {key} not found"


def business_key_of(ptype: ProcessType, workflow_id: str) -> str:
    """The business key in an instance id."""
    hooks = hooks_of(ptype.name)
    if hooks.business_key_of is not None:
        return hooks.business_key_of(workflow_id)
    return workflow_id.removeprefix(ptype.workflow_id(""))


def role_list(ptype: ProcessType, roles: Iterable[str]) -> str:
    """Roles in the order the type lists them (then the rest, sorted), for messages."""
    wanted = set(roles)
    ordered = [r for r in ptype.roles if r in wanted]
    return ", ".join(ordered + sorted(wanted - set(ordered)))


def _require(ptype: ProcessType, roles: frozenset[str], user: Principal) -> None:
    if roles and not roles & set(user.roles):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"requires one of the roles: {role_list(ptype, roles)}"
        )


# ------------------------------------------------------------------------------ dependencies
async def _known_type(
    process_type: TypeName, user: CurrentUser, session: SessionDep
) -> ProcessType:
    """The registered type named in the path (signed-in callers only); 404 naming it. A
    blueprint's entry is brought up to the version current in the database first (another API
    replica may have published one), so a start pins the version current now."""
    found = registry.PROCESS_TYPES.get(process_type)
    if found is None or found.is_blueprint:
        await definitions.sync_registry(session, process_type)
    try:
        return registry.get(process_type)
    except registry.UnknownProcessType:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"unknown process type {process_type!r}"
        ) from None


KnownType = Annotated[ProcessType, Depends(_known_type)]


def _starter(ptype: KnownType, user: CurrentUser) -> ProcessType:
    _require(ptype, ptype.start_roles, user)
    return ptype


def _event(ptype: KnownType, event: EventName, user: CurrentUser) -> ProcessEvent:
    """The type's event named in the path (404 naming it), if the caller may report it (403)."""
    found = ptype.events.get(event)
    if found is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"process type {ptype.name} has no event {event!r}"
        )
    _require(ptype, found.roles, user)
    return found


Startable = Annotated[ProcessType, Depends(_starter)]
KnownEvent = Annotated[ProcessEvent, Depends(_event)]


# ------------------------------------------------------------------------------ handles
def _rpc_timeout(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.temporal_rpc_timeout_s)


def _update_timeout(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.update_wait_s)


async def _query_status(ptype: ProcessType, handle: AnyHandle, timeout: timedelta) -> BaseModel:
    return await handle.query(STATUS_QUERY, result_type=ptype.status_model, rpc_timeout=timeout)


async def workflow_id_of(ptype: ProcessType, key: str, session: AsyncSession) -> str:
    """The instance id of a business key; the session's connection is given back before
    Temporal is waited on."""
    hooks = hooks_of(ptype.name)
    recorded = None
    if hooks.recorded_workflow_id is not None:
        recorded = await hooks.recorded_workflow_id(session, key)
    await session.close()
    return recorded or ptype.workflow_id(key)


def _stage(result: BaseModel) -> str | None:
    stage = getattr(result, "stage", None)
    return stage.value if isinstance(stage, Enum) else stage


def _ready(ptype: ProcessType, result: BaseModel) -> bool:
    """The instance acted on everything it received and waits (or has ended); an instance that
    has not reached its first wait yet reports settled too, but waits for nothing yet."""
    if not getattr(result, "settled", True):
        return False
    if "waiting_for" not in type(result).model_fields:
        return True
    return bool(getattr(result, "waiting_for", "")) or _stage(result) in ptype.terminal_stages


async def _settled_status(ptype: ProcessType, handle: AnyHandle, settings: Settings) -> BaseModel:
    """The status of a running instance once it is settled, by queries only (nothing enters its
    history); after settings.update_wait_s the last status, with settled false."""
    deadline = time.monotonic() + settings.update_wait_s
    pause = SETTLE_POLL_MIN_S
    while True:
        remaining = deadline - time.monotonic()
        wait = timedelta(seconds=max(0.5, min(settings.temporal_rpc_timeout_s, remaining)))
        try:
            result = await _query_status(ptype, handle, wait)
        except RPCError as err:
            # the instance has not completed its first workflow task yet (WorkflowNotReady)
            if err.status != RPCStatusCode.FAILED_PRECONDITION or remaining <= 0:
                raise
        else:
            if _ready(ptype, result) or remaining <= 0:
                return result
        await asyncio.sleep(min(pause, max(remaining, 0.0)))
        pause = min(pause * 2, SETTLE_POLL_MAX_S)


# ------------------------------------------------------------------------------ start
async def _resubmitted(
    ptype: ProcessType,
    handle: AnyHandle,
    fingerprint: str,
    settings: Settings,
    response: FastAPIResponse,
) -> BaseModel:
    """A start for a business key that has an instance: the same request again answers 200
    with its status (writing nothing to its history); anything else, whoever started the
    first, is 409 with the same text."""
    taken = hooks_of(ptype.name).key_taken
    try:
        desc = await handle.describe(rpc_timeout=_rpc_timeout(settings))
    except RPCError as err:
        if is_not_found(err):  # recorded, but no longer kept by Temporal: the key is taken
            raise HTTPException(status.HTTP_409_CONFLICT, taken) from None
        raise
    if await desc.memo_value(MEMO_FINGERPRINT, None) != fingerprint:
        raise HTTPException(status.HTTP_409_CONFLICT, taken)
    response.status_code = status.HTTP_200_OK
    if desc.status == WorkflowExecutionStatus.RUNNING:
        return await _settled_status(ptype, handle, settings)
    return await _query_status(ptype, handle, _rpc_timeout(settings))


async def _started_status(ptype: ProcessType, handle: AnyHandle, settings: Settings) -> BaseModel:
    """The status of the instance this request started, once its first tasks are open."""
    try:
        return await handle.execute_update(
            SETTLE_UPDATE, result_type=ptype.status_model, rpc_timeout=_update_timeout(settings)
        )
    except Exception as err:
        if not is_process_ended(err):
            raise
    return await _query_status(ptype, handle, _rpc_timeout(settings))


async def start(
    ptype: ProcessType,
    details: BaseModel,
    user: Principal,
    client: Client,
    session: AsyncSession,
    settings: Settings,
    request: Request,
    response: FastAPIResponse,
) -> BaseModel:
    """Start an instance from a validated start body (roles checked by the caller); 201 with
    its status once its first tasks are open, 200 for the same request again, 409 for another
    body under the same business key."""
    hooks = hooks_of(ptype.name)
    try:
        inp = ptype.build_input(details, user.username)
    except ValidationError as err:  # the checks that run for new starts only
        raise body_errors(err) from None
    key = ptype.business_key(details)
    fingerprint = hooks.fingerprint(inp)
    # a key the read model knows has an instance (perhaps under an id of older code)
    recorded = None
    if hooks.recorded_workflow_id is not None:
        recorded = await hooks.recorded_workflow_id(session, key)
    if recorded is None and hooks.check_start is not None:
        await hooks.check_start(session, inp)
    await session.close()  # no database connection held while waiting on Temporal
    if recorded is not None:
        handle = client.get_workflow_handle(recorded)
        return await _resubmitted(ptype, handle, fingerprint, settings, response)
    # an instance that cannot write its read model would hang at its first step: start none
    try:
        await database_takes_write(request.app.state.engine, settings.temporal_rpc_timeout_s)
    except Exception as err:  # noqa: BLE001 - read-only, locked, unreachable: all the same
        log.warning("%s %s not started: the database does not take writes: %s", ptype, key, err)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            DATABASE_READ_ONLY,
            headers={"Retry-After": RETRY_AFTER_S},
        ) from None
    wid = ptype.workflow_id(key)
    pairs = [
        SearchAttributePair(PROCESS_TYPE, ptype.name),
        SearchAttributePair(STAGE, ptype.stages[0]),
        SearchAttributePair(REQUESTER, user.username),
    ]
    if hooks.search_attributes is not None:
        pairs.extend(hooks.search_attributes(inp))
    summary = hooks.summary(inp) if hooks.summary else f"{ptype.title} {key}"
    try:
        started: AnyHandle = await client.start_workflow(
            ptype.workflow_type(),
            inp,
            id=wid,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            memo={MEMO_FINGERPRINT: fingerprint},
            search_attributes=TypedSearchAttributes(pairs),
            static_summary=summary,
            rpc_timeout=_rpc_timeout(settings),
        )
    except WorkflowAlreadyStartedError:
        handle = client.get_workflow_handle(wid)
        return await _resubmitted(ptype, handle, fingerprint, settings, response)
    return await _started_status(ptype, started, settings)


_STATUS_RESPONSE = "The instance's status (the process type's status model)"


@router.post(
    "/{process_type}",
    response_model=None,
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {"description": "Started: " + _STATUS_RESPONSE},
        200: {"description": "The same start was made before: " + _STATUS_RESPONSE},
        **responses(401, 403, 404, 409, 422, 503),
    },
)
async def start_process(
    ptype: Startable,
    body: Annotated[dict[str, Any], Body(description="the process type's start model")],
    user: CurrentUser,
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
    request: Request,
    response: FastAPIResponse,
) -> BaseModel:
    """Start an instance of the process type; the requester comes from the credentials and the
    id from the business key: the same body again answers 200, another body under its key 409."""
    try:
        details = strict(ptype.start_model).model_validate(body)
    except ValidationError as err:
        raise body_errors(err) from None
    return await start(ptype, details, user, client, session, settings, request, response)


# ------------------------------------------------------------------------------ one instance
async def status_of(
    ptype: ProcessType, client: Client, workflow_id: str, key: str, user: Principal, s: Settings
) -> BaseModel:
    """The instance's status; 404 for a requester who did not start it (it is not revealed)."""
    with not_found_as(_not_found(ptype, key)):
        result = await _query_status(
            ptype, client.get_workflow_handle(workflow_id), _rpc_timeout(s)
        )
    if user.requester_only and getattr(result, "requester", None) != user.username:
        raise HTTPException(status.HTTP_404_NOT_FOUND, _not_found(ptype, key))
    return result


async def visible_status(
    ptype: ProcessType,
    key: str,
    user: Principal,
    client: Client,
    session: AsyncSession,
    settings: Settings,
) -> BaseModel:
    wid = await workflow_id_of(ptype, key, session)
    return await status_of(ptype, client, wid, key, user, settings)


async def update_visible(
    ptype: ProcessType,
    key: str,
    update: str,
    arg: Any,
    user: Principal,
    client: Client,
    session: AsyncSession,
    settings: Settings,
) -> BaseModel:
    """Run an update that answers the status, on an instance the caller may see (another
    requester's instance is a 404); the workflow's validator decides the rest."""
    wid = await workflow_id_of(ptype, key, session)
    if user.requester_only:
        await status_of(ptype, client, wid, key, user, settings)
    with not_found_as(_not_found(ptype, key)):
        return await client.get_workflow_handle(wid).execute_update(
            update, arg, result_type=ptype.status_model, rpc_timeout=_update_timeout(settings)
        )


@router.get(
    "/{process_type}/{business_key}",
    response_model=None,
    responses={
        200: {"description": _STATUS_RESPONSE},
        **responses(401, 404, 409, 422, 503),
    },
)
async def process_status(
    ptype: KnownType,
    business_key: BusinessKey,
    user: CurrentUser,
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> BaseModel:
    """The live status of an instance: stage, open tasks, decisions and the type's own fields;
    requesters see only the instances they started."""
    return await visible_status(ptype, business_key, user, client, session, settings)


async def cancel(
    ptype: ProcessType,
    key: str,
    reason: str,
    user: Principal,
    client: Client,
    session: AsyncSession,
    settings: Settings,
) -> BaseModel:
    """Cancel an instance through the type's cancel update (its requester or cancel_roles)."""
    if ptype.cancel_update is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"process type {ptype.name} cannot be cancelled"
        )
    wid = await workflow_id_of(ptype, key, session)
    if not ptype.cancel_roles & set(user.roles):
        current = await status_of(ptype, client, wid, key, user, settings)
        if getattr(current, "requester", None) != user.username:
            allowed = role_list(ptype, ptype.cancel_roles)
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"only the requester or one of the roles {allowed} may cancel it"
                if allowed
                else "only the requester may cancel it",
            )
    elif user.requester_only:
        await status_of(ptype, client, wid, key, user, settings)
    arg = {"reason": reason, "actor": user.actor.model_dump(mode="json")}
    with not_found_as(_not_found(ptype, key)):
        return await client.get_workflow_handle(wid).execute_update(
            ptype.cancel_update,
            arg,
            result_type=ptype.status_model,
            rpc_timeout=_update_timeout(settings),
        )


@router.post(
    "/{process_type}/{business_key}/cancel",
    response_model=None,
    responses={
        200: {"description": "Cancelled: " + _STATUS_RESPONSE},
        **responses(401, 403, 404, 409, 422, 503),
    },
)
async def cancel_process(
    ptype: KnownType,
    business_key: BusinessKey,
    body: CancelBody,
    user: CurrentUser,
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> BaseModel:
    """Cancel the instance (its requester, or a role the type allows); what was already done
    is compensated by the process. A type without cancellation is 409."""
    return await cancel(ptype, business_key, body.reason, user, client, session, settings)


# ------------------------------------------------------------------------------ versions
@router.post(
    "/{process_type}/{business_key}/migrate",
    response_model=None,
    responses={
        200: {"description": "Moved: " + _STATUS_RESPONSE},
        **responses(401, 403, 404, 409, 422, 503),
    },
)
async def migrate_process(
    ptype: KnownType,
    business_key: BusinessKey,
    body: MigrateBody,
    admin: Annotated[Principal, Depends(require_roles("admin"))],
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> BaseModel:
    """Move a waiting blueprint instance to another version of its blueprint (admins only,
    audited); refused (409) inside a parallel stage, for a stage or an open task the target
    lacks, and for a coded process type."""
    if not ptype.is_blueprint:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"{ptype.name} is a coded process: its instances do not move between versions",
        )
    row = await definitions.version_row(session, ptype.name, body.version)
    if row is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"{ptype.name} has no version {body.version!r}"
        )
    arg = MigrateInput(
        version=row.version, document=row.document, actor=admin.actor, reason=body.reason
    )
    wid = await workflow_id_of(ptype, business_key, session)
    with not_found_as(_not_found(ptype, business_key)):
        return await client.get_workflow_handle(wid).execute_update(
            MIGRATE_UPDATE,
            arg,
            result_type=ptype.status_model,
            rpc_timeout=_update_timeout(settings),
        )


# ------------------------------------------------------------------------------ events
async def send_event(
    ptype: ProcessType,
    key: str,
    event: ProcessEvent,
    arg: BaseModel,
    user: Principal,
    client: Client,
    session: AsyncSession,
    settings: Settings,
) -> EventReceipt:
    """Send a validated event through its update (roles checked by the caller); the same event
    again is a duplicate that changes nothing (its validator refuses it: nothing enters
    history), an event that conflicts with what the instance knows is 409."""
    wid = await workflow_id_of(ptype, key, session)
    if user.requester_only:
        await status_of(ptype, client, wid, key, user, settings)
    handle = client.get_workflow_handle(wid)
    try:
        with not_found_as(_not_found(ptype, key)):
            outcome = await handle.execute_update(
                event.update, arg, rpc_timeout=_update_timeout(settings)
            )
    except WorkflowUpdateFailedError as err:
        refusal = application_error_of(err)
        if refusal is None or refusal.type != DUPLICATE_EVENT:
            raise
        current = await _query_status(ptype, handle, _rpc_timeout(settings))
        known = hooks_of(ptype.name).duplicate_outcomes.get(event.name)
        duplicate = known(arg, current).model_dump(mode="json") if known else None
        return EventReceipt(event=event.name, duplicate=True, outcome=duplicate)
    return EventReceipt(event=event.name, duplicate=False, outcome=outcome)


@router.post(
    "/{process_type}/{business_key}/events/{event}",
    response_model=EventReceipt,
    status_code=status.HTTP_202_ACCEPTED,
    responses=responses(401, 403, 404, 409, 422, 503),
)
async def report_event(
    ptype: KnownType,
    found: KnownEvent,
    business_key: BusinessKey,
    body: Annotated[dict[str, Any], Body(description="the event's model")],
    user: CurrentUser,
    client: TemporalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> EventReceipt:
    """Report an external event to an instance (the type's events, each with its model and the
    roles that may report it); a duplicate changes nothing (202, duplicate), a conflict is 409."""
    try:
        arg = strict(found.model).model_validate(body)
    except ValidationError as err:
        raise body_errors(err) from None
    return await send_event(ptype, business_key, found, arg, user, client, session, settings)


# ------------------------------------------------------------------------------ search
class ExecutionStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    TERMINATED = "TERMINATED"
    CONTINUED_AS_NEW = "CONTINUED_AS_NEW"
    TIMED_OUT = "TIMED_OUT"


# the ExecutionStatus values of the visibility query language
_VISIBILITY_STATUS = {
    ExecutionStatus.RUNNING: "Running",
    ExecutionStatus.COMPLETED: "Completed",
    ExecutionStatus.FAILED: "Failed",
    ExecutionStatus.CANCELED: "Canceled",
    ExecutionStatus.TERMINATED: "Terminated",
    ExecutionStatus.CONTINUED_AS_NEW: "ContinuedAsNew",
    ExecutionStatus.TIMED_OUT: "TimedOut",
}


def quote(value: str) -> str:
    """A string literal for a visibility query: quotes and backslashes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _instant(value: datetime) -> str:
    """An RFC 3339 instant in UTC (a time without an offset is taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return quote(value.astimezone(UTC).isoformat().replace("+00:00", "Z"))


@dataclass(frozen=True)
class SearchFilter:
    types: tuple[str, ...]
    stage: str | None = None
    status: ExecutionStatus | None = None
    requesters: tuple[str, ...] = ()
    pending_role: str | None = None
    customer_id: str | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None

    def query(self) -> str:
        """The visibility query; the ownership filter is one of its clauses (pages stay full)."""
        if len(self.types) == 1:
            clauses = [f"ProcessType = {quote(self.types[0])}"]
        else:
            clauses = [f"ProcessType IN ({', '.join(quote(t) for t in self.types)})"]
        clauses.extend(f"Requester = {quote(r)}" for r in self.requesters)
        if self.stage is not None:
            clauses.append(f"Stage = {quote(self.stage)}")
        if self.status is not None:
            clauses.append(f"ExecutionStatus = {quote(_VISIBILITY_STATUS[self.status])}")
        if self.pending_role is not None:
            clauses.append(f"PendingRoles = {quote(self.pending_role)}")
        if self.customer_id is not None:
            clauses.append(f"CustomerId = {quote(self.customer_id)}")
        if self.started_after is not None:
            clauses.append(f"StartTime > {_instant(self.started_after)}")
        if self.started_before is not None:
            clauses.append(f"StartTime < {_instant(self.started_before)}")
        return " AND ".join(clauses)


def _query_digest(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def encode_page_token(query: str, token: bytes) -> str:
    """Temporal's page token, bound to the query it pages through."""
    return f"{_query_digest(query)}.{base64.urlsafe_b64encode(token).decode()}"


def decode_page_token(query: str, page_token: str) -> bytes:
    """Temporal's page token of a token this API gave out for the same query; else 422."""
    digest, _, encoded = page_token.partition(".")
    if digest != _query_digest(query):
        raise param_error("query", "page_token", "not a page token of this search")
    try:
        return base64.urlsafe_b64decode(encoded.encode())
    except (binascii.Error, ValueError):
        raise param_error("query", "page_token", "not a page token of this search") from None


def _hit(wf: WorkflowExecution) -> ProcessHit:
    sa = wf.typed_search_attributes
    type_name = sa.get(PROCESS_TYPE)
    try:
        key = business_key_of(registry.get(type_name or ""), wf.id)
    except registry.UnknownProcessType:
        key = wf.id
    return ProcessHit(
        process_type=type_name,
        business_key=key,
        workflow_id=wf.id,
        stage=sa.get(STAGE),
        status=wf.status.name if wf.status else None,
        requester=sa.get(REQUESTER),
        customer_id=sa.get(CUSTOMER_ID),
        pending_roles=list(sa.get(PENDING_ROLES) or []),
        started_at=wf.start_time,
        closed_at=wf.close_time,
    )


def _search_filter(
    user: Principal,
    process_type: str | None,
    stage: str | None,
    status_: ExecutionStatus | None,
    requester: str | None,
    pending_role: str | None,
    customer_id: str | None,
    started_after: datetime | None,
    started_before: datetime | None,
) -> SearchFilter:
    """The filter of a search, each parameter checked (422 naming it); requesters' searches
    are narrowed to their own instances."""
    if process_type is None:
        types = tuple(registry.PROCESS_TYPES)
    elif process_type in registry.PROCESS_TYPES:
        types = (process_type,)
    else:
        raise param_error("query", "process_type", f"unknown process type {process_type!r}")
    if stage is not None:
        stages = {s for t in types for s in registry.get(t).stages}
        if stage not in stages:
            scope = f"process type {types[0]}" if len(types) == 1 else "any process type"
            raise param_error("query", "stage", f"{stage!r} is not a stage of {scope}")
    if started_after and started_before:
        after = started_after if started_after.tzinfo else started_after.replace(tzinfo=UTC)
        before = started_before if started_before.tzinfo else started_before.replace(tzinfo=UTC)
        if after >= before:
            raise param_error("query", "started_before", "must be later than started_after")
    requesters: tuple[str, ...] = () if requester is None else (requester,)
    if user.requester_only and requesters != (user.username,):
        # their own only: another requester asked for gives both clauses, and nothing
        requesters = (user.username, *requesters)
    return SearchFilter(
        types=types,
        stage=stage,
        status=status_,
        requesters=requesters,
        pending_role=pending_role,
        customer_id=customer_id,
        started_after=started_after,
        started_before=started_before,
    )


Text64 = Annotated[QueryText | None, Query(max_length=64)]


@router.get("", response_model=ProcessPage, responses=responses(401, 422, 503))
async def search_processes(
    user: CurrentUser,
    client: TemporalDep,
    settings: SettingsDep,
    process_type: Text64 = None,
    stage: Text64 = None,
    status_: Annotated[
        ExecutionStatus | None, Query(alias="status", description="execution status")
    ] = None,
    requester: Text64 = None,
    pending_role: Annotated[
        QueryText | None,
        Query(max_length=64, description="a role the instance waits for (PendingRoles)"),
    ] = None,
    customer_id: Text64 = None,
    started_after: Annotated[
        datetime | None, Query(description="ISO 8601; without an offset: UTC")
    ] = None,
    started_before: Annotated[
        datetime | None, Query(description="ISO 8601; without an offset: UTC")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    page_token: Annotated[
        QueryText | None, Query(min_length=1, max_length=4096, description="next_page_token")
    ] = None,
) -> ProcessPage:
    """Instances of every type through Temporal visibility (eventually consistent: a new stage
    shows up late), newest first; requesters see only their own, in full pages."""
    search = _search_filter(
        user,
        process_type,
        stage,
        status_,
        requester,
        pending_role,
        customer_id,
        started_after,
        started_before,
    )
    query = search.query()
    token = decode_page_token(query, page_token) if page_token else None
    listing = client.list_workflows(
        query, page_size=limit, next_page_token=token, rpc_timeout=_rpc_timeout(settings)
    )
    try:
        await listing.fetch_next_page()
    except RPCError as err:
        if token is not None and err.status == RPCStatusCode.INVALID_ARGUMENT:
            raise param_error("query", "page_token", "not a page token of this search") from None
        raise
    page = listing.current_page or []
    after = listing.next_page_token
    return ProcessPage(
        items=[_hit(wf) for wf in page],
        query=query,
        limit=limit,
        next_page_token=encode_page_token(query, after) if after and page else None,
    )


# ------------------------------------------------------------------------------ OpenAPI
def _schema_refs(
    models: list[tuple[type[BaseModel], JsonSchemaMode]], openapi: dict[str, Any]
) -> dict[tuple[type[BaseModel], JsonSchemaMode], dict[str, Any]]:
    """JSON Schemas of the models as components of openapi (named 'process.<Model>')."""
    refs, defs = models_json_schema(
        models, ref_template="#/components/schemas/" + SCHEMA_PREFIX + "{model}"
    )
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        components[SCHEMA_PREFIX + name] = schema
    return cast(dict[tuple[type[BaseModel], JsonSchemaMode], dict[str, Any]], refs)


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def document_process_schemas(openapi: dict[str, Any]) -> dict[str, Any]:
    """Document each registered type's start, event and status models on the generic routes
    (a union: `anyOf` the types' models; `x-process-types` says which model is whose)."""
    types = list(registry.PROCESS_TYPES.values())
    events = [e for t in types for e in t.events.values()]
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for model, mode in (
        [(strict(t.start_model), "validation") for t in types]
        + [(strict(e.model), "validation") for e in events]
        + [(t.status_model, "serialization") for t in types]
    ):
        if (model, mode) not in wanted:
            wanted.append((model, cast(JsonSchemaMode, mode)))
    refs = _schema_refs(wanted, openapi)

    def union(models: list[tuple[type[BaseModel], JsonSchemaMode]]) -> dict[str, Any]:
        unique = list(dict.fromkeys(models))
        return refs[unique[0]] if len(unique) == 1 else {"anyOf": [refs[m] for m in unique]}

    statuses = union([(t.status_model, "serialization") for t in types])
    paths = openapi.get("paths", {})
    base = router.prefix
    start = paths.get(f"{base}/{{process_type}}", {}).get("post")
    if start is not None:
        start["requestBody"] = {
            "required": True,
            "description": "the start model of the process type in the path",
            "content": _json_content(union([(strict(t.start_model), "validation") for t in types])),
        }
        start["x-process-types"] = {t.name: t.start_model.__name__ for t in types}
        for code in ("200", "201"):
            start["responses"][code]["content"] = _json_content(statuses)
    for path in (f"{base}/{{process_type}}/{{business_key}}",):
        op = paths.get(path, {}).get("get")
        if op is not None:
            op["responses"]["200"]["content"] = _json_content(statuses)
    cancel_op = paths.get(f"{base}/{{process_type}}/{{business_key}}/cancel", {}).get("post")
    if cancel_op is not None:
        cancel_op["responses"]["200"]["content"] = _json_content(statuses)
    event_op = paths.get(f"{base}/{{process_type}}/{{business_key}}/events/{{event}}", {}).get(
        "post"
    )
    if event_op is not None and events:
        event_op["requestBody"] = {
            "required": True,
            "description": "the model of the event in the path",
            "content": _json_content(union([(strict(e.model), "validation") for e in events])),
        }
        event_op["x-process-events"] = {
            t.name: {e.name: e.model.__name__ for e in t.events.values()} for t in types
        }
    return openapi


def install_openapi(app: FastAPI) -> None:
    """Make app's OpenAPI document the registered types' models on the generic routes."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        return document_process_schemas(build())

    app.openapi = openapi  # type: ignore[method-assign]
