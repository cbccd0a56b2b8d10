"""Human tasks: the caller's inbox (read model) and decisions/actions (workflow updates)."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import and_, exists, func, or_, select
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError

from api.deps import CurrentUser, SessionDep, SettingsDep, TemporalDep
from api.errors import application_error_of, field_error, not_found_as, responses
from api.schemas import (
    MAX_OFFSET,
    CommentBody,
    DecisionBody,
    DelegateBody,
    Principal,
    QueryText,
    ReassignBody,
    TaskOut,
    TaskPage,
)
from core.db import AuditEntry, TaskCandidate, TaskRow, User
from core.settings import Settings
from workflows import registry
from workflows.human_task import FOUR_EYES, NOT_PERMITTED, DecideInput, TaskActionInput
from workflows.kernel import DecideResult, TaskView

log = logging.getLogger("procflow.api")

router = APIRouter(prefix="/tasks", tags=["tasks"])

DECISION_REFUSED = "decision_refused"
ACKNOWLEDGED = "acknowledged"  # the only outcome of an acknowledgement task

ALL_ERRORS = responses(401, 403, 404, 409, 422, 503)


def _has_role(user: Principal):
    return exists().where(
        TaskCandidate.task_id == TaskRow.task_id, TaskCandidate.role.in_(user.roles)
    )


def _out(row: TaskRow, user: Principal) -> TaskOut:
    out = TaskOut.model_validate(row)
    out.taken = row.assignee is not None and row.assignee != user.username
    return out


@router.get("", response_model=TaskPage, responses=responses(401))
async def inbox(
    user: CurrentUser,
    session: SessionDep,
    kind: Annotated[QueryText | None, Query(max_length=32)] = None,
    business_key: Annotated[QueryText | None, Query(max_length=64)] = None,
    name: Annotated[
        QueryText | None, Query(max_length=200, description="part of the task name")
    ] = None,
    include_taken: Annotated[
        bool, Query(description="also show tasks of my roles taken by others")
    ] = False,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> TaskPage:
    """Open tasks assigned to the caller or offered to one of their roles, never their own."""
    mine = TaskRow.assignee == user.username
    pooled = and_(TaskRow.assignee.is_(None), _has_role(user))
    scope = [mine, pooled]
    if include_taken:
        scope.append(and_(TaskRow.assignee.is_not(None), _has_role(user)))
    query = select(TaskRow).where(
        TaskRow.status == "open", TaskRow.requester != user.username, or_(*scope)
    )
    if kind is not None:
        query = query.where(TaskRow.kind == kind)
    if business_key is not None:
        query = query.where(TaskRow.business_key == business_key)
    if name is not None:
        query = query.where(TaskRow.name.contains(name, autoescape=True))
    total = await session.scalar(select(func.count()).select_from(query.subquery()))
    rows = await session.scalars(
        query.order_by(TaskRow.created_at, TaskRow.task_id).limit(limit).offset(offset)
    )
    return TaskPage(
        items=[_out(r, user) for r in rows], total=total or 0, limit=limit, offset=offset
    )


async def _task(session, task_id: str, user: Principal) -> TaskRow:
    row = await session.get(TaskRow, task_id)
    visible = row is not None and (
        not user.requester_only or user.username in (row.requester, row.assignee)
    )
    if not visible:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"task {task_id} not found")
    return row


@router.get("/{task_id}", response_model=TaskOut, responses=responses(401, 404))
async def task_detail(task_id: str, user: CurrentUser, session: SessionDep) -> TaskOut:
    """One task as the read model holds it."""
    return _out(await _task(session, task_id, user), user)


def _process_type(row: TaskRow) -> registry.ProcessType:
    """The registered type of the task's process; 409 naming it otherwise (nothing is sent)."""
    try:
        return registry.get(row.process_type)
    except registry.UnknownProcessType:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"task {row.task_id} belongs to process type {row.process_type}, which is not "
            "registered in this deployment",
        ) from None


def _update(process_type: registry.ProcessType, action: str) -> str:
    """The name of the update of the type's workflow that performs this task action (the
    kernel's handlers `decide`, `claim`, ... are updates of the same name)."""
    if not callable(getattr(process_type.workflow, action, None)):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"process type {process_type.name} has no task action {action}",
        )
    return action


def _handle(client: Client, row: TaskRow) -> WorkflowHandle:
    return client.get_workflow_handle(row.workflow_id)


def _wait(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.update_wait_s)


async def _decide(
    task_id: str,
    outcome: str,
    comment: str,
    fields: dict[str, str],
    user: Principal,
    session,
    client: Client,
    settings: Settings,
) -> DecideResult:
    row = await _task(session, task_id, user)
    update = _update(_process_type(row), "decide")
    if row.status == "open" and row.outcomes and row.requester == user.username:
        # the four-eyes rule, checked here too; the workflow's validator stays the authority
        reason = f"{user.username} requested this process and may not decide its own task"
        await _audit_refusal(session, row, user, outcome, FOUR_EYES, reason)
        raise HTTPException(status.HTTP_403_FORBIDDEN, reason)
    await session.close()  # no database connection held while the process moves on
    try:
        with not_found_as(f"task {task_id} not found"):
            return await _handle(client, row).execute_update(
                update,
                DecideInput(
                    task_id=task_id,
                    outcome=outcome,
                    comment=comment,
                    fields=fields,
                    actor=user.actor,
                ),
                result_type=DecideResult,
                rpc_timeout=_wait(settings),
            )
    except WorkflowUpdateFailedError as err:
        refusal = application_error_of(err)
        if refusal is not None and refusal.type in (FOUR_EYES, NOT_PERMITTED):
            await _audit_refusal(session, row, user, outcome, refusal.type, refusal.message)
        raise


async def _audit_refusal(
    session, row: TaskRow, user: Principal, outcome: str, kind: str, reason: str
) -> None:
    """An audit_log row for a decision refused with 403 (the workflow's history has none)."""
    session.add(
        AuditEntry(
            event_key=f"refused:{uuid.uuid4()}",
            workflow_id=row.workflow_id,
            task_id=row.task_id,
            actor=user.username,
            action=DECISION_REFUSED,
            comment=reason,
            details={"outcome": outcome, "refusal": kind},
            at=datetime.now(UTC),
        )
    )
    await session.commit()
    log.warning("decision on %s by %s refused: %s", row.task_id, user.username, reason)


@router.post("/{task_id}/decision", response_model=DecideResult, responses=ALL_ERRORS)
async def decide(
    task_id: str,
    body: DecisionBody,
    user: CurrentUser,
    session: SessionDep,
    client: TemporalDep,
    settings: SettingsDep,
) -> DecideResult:
    """Decide a task (e.g. approved / rejected); returns it once the process has moved on."""
    return await _decide(
        task_id, body.outcome, body.comment, body.fields, user, session, client, settings
    )


@router.post("/{task_id}/acknowledge", response_model=DecideResult, responses=ALL_ERRORS)
async def acknowledge(
    task_id: str,
    user: CurrentUser,
    session: SessionDep,
    client: TemporalDep,
    settings: SettingsDep,
    body: CommentBody | None = None,
) -> DecideResult:
    """Acknowledge a special change (an acknowledgement task's only outcome)."""
    comment = body.comment if body else ""
    return await _decide(task_id, ACKNOWLEDGED, comment, {}, user, session, client, settings)


async def _action(
    action: str,
    task_id: str,
    to_user: str | None,
    comment: str,
    user: Principal,
    session,
    client: Client,
    settings: Settings,
) -> TaskView:
    row = await _task(session, task_id, user)
    update = _update(_process_type(row), action)
    to_roles: list[str] | None = None
    if to_user is not None:
        target = await session.get(User, to_user)
        if target is None or not target.active:
            raise field_error("to_user", f"no active user named {to_user}")
        to_roles = list(target.roles or [])  # the workflow checks the target is entitled
    await session.close()  # no database connection held while the process moves on
    with not_found_as(f"task {task_id} not found"):
        return await _handle(client, row).execute_update(
            update,
            TaskActionInput(
                task_id=task_id,
                actor=user.actor,
                to_user=to_user,
                to_roles=to_roles,
                comment=comment,
            ),
            result_type=TaskView,
            rpc_timeout=_wait(settings),
        )


@router.post("/{task_id}/claim", response_model=TaskView, responses=ALL_ERRORS)
async def claim(
    task_id: str,
    user: CurrentUser,
    session: SessionDep,
    client: TemporalDep,
    settings: SettingsDep,
    body: CommentBody | None = None,
) -> TaskView:
    """Take a task of one of your roles; other candidates then see it as taken."""
    comment = body.comment if body else ""
    return await _action("claim", task_id, None, comment, user, session, client, settings)


@router.post("/{task_id}/release", response_model=TaskView, responses=ALL_ERRORS)
async def release(
    task_id: str,
    user: CurrentUser,
    session: SessionDep,
    client: TemporalDep,
    settings: SettingsDep,
    body: CommentBody | None = None,
) -> TaskView:
    """Hand a task you hold (or, as a manager, anyone's) back to its candidates."""
    comment = body.comment if body else ""
    return await _action("release", task_id, None, comment, user, session, client, settings)


@router.post("/{task_id}/delegate", response_model=TaskView, responses=ALL_ERRORS)
async def delegate(
    task_id: str,
    body: DelegateBody,
    user: CurrentUser,
    session: SessionDep,
    client: TemporalDep,
    settings: SettingsDep,
) -> TaskView:
    """Pass a task to another user (its assignee, a candidate or a manager may)."""
    return await _action(
        "delegate", task_id, body.to_user, body.comment, user, session, client, settings
    )


@router.post("/{task_id}/reassign", response_model=TaskView, responses=ALL_ERRORS)
async def reassign(
    task_id: str,
    body: ReassignBody,
    user: CurrentUser,
    session: SessionDep,
    client: TemporalDep,
    settings: SettingsDep,
) -> TaskView:
    """Assign a task to a user, or back to the pool with to_user null (managers only)."""
    return await _action(
        "reassign", task_id, body.to_user, body.comment, user, session, client, settings
    )
