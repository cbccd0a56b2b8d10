"""The mail outbox for operators: which mails are waiting, sent, or failed for good."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select

from api.deps import SessionDep, require_roles
from api.errors import responses
from api.schemas import MAX_OFFSET, Principal, QueryText
from core.db import OutboxMessage

router = APIRouter(prefix="/outbox", tags=["outbox"])

Admin = Annotated[Principal, Depends(require_roles("admin"))]


class OutboxStatus(StrEnum):
    """pending: the mail dispatcher's to send (or retrying); sending: a `notify` activity's to
    send; sent; failed: given up after PROCFLOW_MAIL_MAX_ATTEMPTS (or ..._TRANSIENT_ATTEMPTS)."""

    pending = "pending"
    sending = "sending"
    sent = "sent"
    failed = "failed"


class OutboxMessageOut(BaseModel):
    """One outbox row: its mail, where its delivery stands and the last failure."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    idempotency_key: str
    workflow_id: str
    recipients: list[str]
    subject: str
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None
    next_attempt_at: datetime | None


class OutboxPage(BaseModel):
    items: list[OutboxMessageOut]
    total: int
    limit: int
    offset: int


@router.get("", response_model=OutboxPage, responses=responses(401, 403))
async def list_outbox(
    _: Admin,
    session: SessionDep,
    status: Annotated[
        OutboxStatus | None, Query(description="only rows of this status, e.g. failed")
    ] = None,
    workflow_id: Annotated[QueryText | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> OutboxPage:
    """Outbox rows, newest first (admin only); `status=failed` lists the mails given up on."""
    query = select(OutboxMessage)
    if status is not None:
        query = query.where(OutboxMessage.status == status.value)
    if workflow_id is not None:
        query = query.where(OutboxMessage.workflow_id == workflow_id)
    total = await session.scalar(select(func.count()).select_from(query.subquery()))
    rows = await session.scalars(
        query.order_by(OutboxMessage.id.desc()).limit(limit).offset(offset)
    )
    return OutboxPage(
        items=[OutboxMessageOut.model_validate(r) for r in rows],
        total=total or 0,
        limit=limit,
        offset=offset,
    )
