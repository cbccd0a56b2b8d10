"""The registered process types: what each is, its stages and roles, the JSON Schema of its
start body and events, and the policy version new instances start with."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from api import definitions
from api.deps import CurrentUser, SessionDep
from api.errors import responses
from core.db import PolicyVersion
from workflows import registry

router = APIRouter(prefix="/process-types", tags=["process types"])


class ProcessEventOut(BaseModel):
    name: str
    description: str
    roles: list[str] = Field(description="who may report it; empty: any signed-in user")
    body_schema: dict[str, Any] = Field(description="JSON Schema of the event's body")


class ProcessTypeOut(BaseModel):
    name: str = Field(description="the type's name in /processes/{type}, policies and tasks")
    title: str
    description: str
    stages: list[str]
    terminal_stages: list[str] = Field(description="the stages in which an instance has ended")
    roles: list[str] = Field(description="roles that act in it (tasks, cancel, events)")
    start_roles: list[str] = Field(description="who may start one; empty: any signed-in user")
    start_schema: dict[str, Any] = Field(
        description="JSON Schema of the body of POST /processes/{type} (the requester is the "
        "caller, never part of the body)"
    )
    events: list[ProcessEventOut]
    cancellable: bool
    cancel_roles: list[str] = Field(description="who may cancel one, besides its requester")
    kind: str = Field(description="code (a workflow class) or blueprint (a published document)")
    version: str | None = Field(
        None, description="a blueprint's current version (`sha256:...`): what new instances run"
    )
    has_policy: bool
    policy_version: int | None = Field(
        description="the policy version new instances start with (0: built-in defaults, "
        "nothing published yet); null when the type has no policy"
    )


def _out(t: registry.ProcessType, published: dict[str, int]) -> ProcessTypeOut:
    return ProcessTypeOut(
        name=t.name,
        title=t.title,
        description=t.description,
        stages=list(t.stages),
        terminal_stages=[s for s in t.stages if s in t.terminal_stages]
        + sorted(t.terminal_stages.difference(t.stages)),
        roles=list(t.roles),
        start_roles=sorted(t.start_roles),
        start_schema=t.start_model.model_json_schema(),
        events=[
            ProcessEventOut(
                name=e.name,
                description=e.description,
                roles=sorted(e.roles),
                body_schema=e.model.model_json_schema(),
            )
            for e in t.events.values()
        ],
        cancellable=t.cancellable,
        cancel_roles=sorted(t.cancel_roles) if t.cancellable else [],
        kind="blueprint" if t.is_blueprint else "code",
        version=t.version,
        has_policy=t.policy_model is not None,
        policy_version=published.get(t.name, 0) if t.policy_model is not None else None,
    )


async def _published(session: SessionDep, names: list[str]) -> dict[str, int]:
    """The newest published policy version of each of these types (absent: none yet)."""
    rows = await session.execute(
        select(PolicyVersion.process_type, func.max(PolicyVersion.version))
        .where(PolicyVersion.process_type.in_(names))
        .group_by(PolicyVersion.process_type)
    )
    return {name: version for name, version in rows.all()}


@router.get("", response_model=list[ProcessTypeOut], responses=responses(401))
async def process_types(user: CurrentUser, session: SessionDep) -> list[ProcessTypeOut]:
    """Every registered process type, in the order of registration, and every published
    blueprint in its current version."""
    await definitions.sync_registry(session)
    types = list(registry.PROCESS_TYPES.values())
    published = await _published(session, [t.name for t in types])
    return [_out(t, published) for t in types]


@router.get("/{process_type}", response_model=ProcessTypeOut, responses=responses(401, 404))
async def process_type(process_type: str, user: CurrentUser, session: SessionDep) -> ProcessTypeOut:
    """One registered process type (a blueprint: its current version)."""
    await definitions.sync_registry(session, process_type)
    try:
        found = registry.get(process_type)
    except registry.UnknownProcessType:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"unknown process type {process_type}"
        ) from None
    return _out(found, await _published(session, [found.name]))
