"""Versioned policy documents; instances load the current version when they start."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from api.deps import CurrentUser, SessionDep, require_roles
from api.errors import responses
from api.schemas import PolicyOut, Principal, PublishedPolicy, PublishPolicyBody
from core.db import PolicyVersion
from workflows import registry

router = APIRouter(prefix="/policies", tags=["policies"])

Admin = Annotated[Principal, Depends(require_roles("admin"))]


def _known(process_type: str) -> registry.ProcessType:
    """The registered type of this name, if it has a policy; 404 naming it otherwise."""
    try:
        found = registry.get(process_type)
    except registry.UnknownProcessType:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"unknown process type {process_type}"
        ) from None
    if found.policy_model is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"process type {process_type} has no policy")
    return found


def _out(row: PolicyVersion) -> PolicyOut:
    return PolicyOut(
        process_type=row.process_type,
        version=row.version,
        document=row.document,
        published_by=row.published_by,
        published_at=row.published_at,
        note=row.note,
    )


@router.get("/{process_type}", response_model=PolicyOut, responses=responses(401, 404))
async def current_policy(process_type: str, user: CurrentUser, session: SessionDep) -> PolicyOut:
    """The policy new instances of process_type start with (version 0: built-in defaults)."""
    found = _known(process_type)
    row = await session.scalar(
        select(PolicyVersion)
        .where(PolicyVersion.process_type == process_type)
        .order_by(PolicyVersion.version.desc())
        .limit(1)
    )
    if row is None:
        return PolicyOut(
            process_type=process_type, version=0, document=found.default_policy() or {}
        )
    return _out(row)


@router.get(
    "/{process_type}/versions", response_model=list[PolicyOut], responses=responses(401, 404)
)
async def policy_versions(
    process_type: str, user: CurrentUser, session: SessionDep
) -> list[PolicyOut]:
    """Every published version of the policy of process_type, newest first."""
    _known(process_type)
    rows = await session.scalars(
        select(PolicyVersion)
        .where(PolicyVersion.process_type == process_type)
        .order_by(PolicyVersion.version.desc())
    )
    return [_out(r) for r in rows]


@router.post(
    "/{process_type}",
    response_model=PublishedPolicy,
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 409, 422),
)
async def publish_policy(
    process_type: str, body: PublishPolicyBody, admin: Admin, session: SessionDep
) -> PublishedPolicy:
    """Validate a complete document and publish it as the next version; running instances
    keep the version they loaded."""
    found = _known(process_type)
    try:
        model = found.validate_policy(body.document, strict=True)
    except ValidationError as err:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [
                {
                    "type": e["type"],
                    "loc": ["body", "document", *e["loc"]],
                    "field": ".".join(["document", *map(str, e["loc"])]),
                    "msg": e["msg"],
                }
                for e in err.errors(include_url=False, include_input=False)
            ],
        ) from err
    latest = await session.scalar(
        select(func.max(PolicyVersion.version)).where(PolicyVersion.process_type == process_type)
    )
    version = (latest or 0) + 1
    session.add(
        PolicyVersion(
            process_type=process_type,
            version=version,
            document=model.model_dump(mode="json"),
            published_by=admin.username,
            note=body.note,
        )
    )
    try:
        await session.commit()
    except IntegrityError as err:
        await session.rollback()
        raise HTTPException(
            status.HTTP_409_CONFLICT, "another version was published at the same time; retry"
        ) from err
    return PublishedPolicy(process_type=process_type, version=version)
