"""Human tasks: the caller's inbox (read model) and decisions/actions (workflow updates)."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import and_, bindparam, exists, func, or_, select, tuple_, union_all
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError

from api.deps import CurrentUser, SessionDep, SettingsDep, TemporalDep
from api.errors import (
    application_error_of,
    field_error,
    not_found_as,
    param_error,
    responses,
)
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


# Below this many candidate rows (task_candidates of the caller's roles plus open tasks assigned
# to them) the page is found from those rows; above it, by walking the open tasks oldest first
# (ix_tasks_inbox_order), which stops after one page when most of them are the caller's.
ROLE_DRIVEN_BELOW = 2_000


def _has_role(user: Principal):
    return exists().where(
        TaskCandidate.task_id == TaskRow.task_id, TaskCandidate.role.in_(user.roles)
    )


def _candidate_ids(user: Principal):
    """Ids of the tasks offered to one of the caller's roles or assigned to them (UNION ALL:
    read in index order, without sorting or deduplicating)."""
    return union_all(
        select(TaskCandidate.task_id).where(TaskCandidate.role.in_(user.roles)),
        select(TaskRow.task_id).where(TaskRow.status == "open", TaskRow.assignee == user.username),
    )


async def _few_candidates(session, user: Principal) -> bool:
    """Whether the caller's candidate rows are fewer than ROLE_DRIVEN_BELOW (reads at most
    that many index entries)."""
    ids = _candidate_ids(user).subquery()
    beyond = select(ids.c.task_id).limit(1).offset(ROLE_DRIVEN_BELOW)
    return (await session.scalar(beyond)) is None


async def _after(session, task_id: str, user: Principal) -> tuple[datetime, str]:
    """The inbox position of the task a keyset page starts after; 422 naming `after` when the
    caller cannot see such a task (as GET /tasks/{id} would answer 404)."""
    row = await session.get(TaskRow, task_id)
    if row is None or (user.requester_only and user.username not in (row.requester, row.assignee)):
        raise param_error("query", "after", f"no task {task_id} to page after")
    return row.created_at, row.task_id


def _out(row: TaskRow, user: Principal) -> TaskOut:
    out = TaskOut.model_validate(row)
    out.taken = row.assignee is not None and row.assignee != user.username
    return out


@router.get("", response_model=TaskPage, responses=responses(401, 422))
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
    after: Annotated[
        QueryText | None,
        Query(
            max_length=200,
            description="keyset paging: the task_id of the previous page's last item; the page "
            "starts after it, as fast deep in the inbox as on its first page (offset must be 0)",
        ),
    ] = None,
    count: Annotated[
        bool,
        Query(
            description="count every matching task into `total`; false: `total` is null and a "
            "long inbox answers without counting it"
        ),
    ] = True,
) -> TaskPage:
    """Open tasks assigned to the caller or offered to one of their roles, never their own."""
    if after is not None and offset:
        raise param_error("query", "offset", "page by offset or by after, not both")
    mine = TaskRow.assignee == user.username
    if await _few_candidates(session, user):
        # Found from the caller's candidate rows, then sorted: `status || ''` keeps the planner
        # off the status indexes (SQLite has no statistics to tell that the list is short).
        role = TaskRow.task_id.in_(
            select(TaskCandidate.task_id).where(TaskCandidate.role.in_(user.roles))
        )
        where = [TaskRow.task_id.in_(_candidate_ids(user)), TaskRow.status.concat("") == "open"]
    else:  # the open tasks walked oldest first (ix_tasks_inbox_order), each checked
        role, where = _has_role(user), [TaskRow.status == "open"]
    scope = [mine, and_(TaskRow.assignee.is_(None), role)]
    if include_taken:
        scope.append(and_(TaskRow.assignee.is_not(None), role))
    query = select(TaskRow).where(*where, TaskRow.requester != user.username, or_(*scope))
    if kind is not None:
        query = query.where(TaskRow.kind == kind)
    if business_key is not None:
        query = query.where(TaskRow.business_key == business_key)
    if name is not None:
        query = query.where(TaskRow.name.contains(name, autoescape=True))
    total = None
    if count:
        total = await session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = query
    if after is not None:
        created_at, task_id = await _after(session, after, user)
        at = bindparam("after_created_at", created_at, type_=TaskRow.__table__.c.created_at.type)
        page = page.where(
            TaskRow.created_at >= at,  # a plain range on the index; the row value decides ties
            tuple_(TaskRow.created_at, TaskRow.task_id)
            > tuple_(at, bindparam("after_id", task_id)),
        )
    rows = await session.scalars(
        page.order_by(TaskRow.created_at, TaskRow.task_id).limit(limit).offset(offset)
    )
    return TaskPage(items=[_out(r, user) for r in rows], total=total, limit=limit, offset=offset)


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
