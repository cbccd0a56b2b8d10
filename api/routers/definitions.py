"""Blueprint definitions: each blueprint process's versions (canonical JSON and YAML), which one
new instances start with, how many instances run each; admins publish and dry-run documents."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, cast

import yaml
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field, ValidationError

from api import definitions
from api.definitions import (
    CodedProcessType,
    Counts,
    DocumentWarning,
    PublishConflict,
    Published,
)
from api.deps import CurrentUser, SessionDep, require_roles
from api.errors import body_errors, responses
from api.schemas import ErrorOut, Principal, QueryText
from core.db import BlueprintVersion
from workflows.blueprint import check
from workflows.blueprint.model import Blueprint
from workflows.documents import show_value

router = APIRouter(prefix="/definitions", tags=["definitions"])

Admin = Annotated[Principal, Depends(require_roles("admin"))]

JSON_TYPE = "application/json"
YAML_TYPES = ("application/yaml", "text/yaml", "application/x-yaml")
MAX_NOTE = 2000

_UNSUPPORTED: dict[int | str, dict[str, Any]] = {
    415: {
        "description": f"The body is neither JSON ({JSON_TYPE}) nor YAML ({', '.join(YAML_TYPES)})",
        "model": ErrorOut,
    }
}
_DOCUMENT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the blueprint document, as JSON or as YAML text",
        "content": {
            JSON_TYPE: {"schema": {"type": "object"}},
            **{kind: {"schema": {"type": "string"}} for kind in YAML_TYPES},
        },
    }
}
Note = Annotated[QueryText, Query(max_length=MAX_NOTE, description="why it was published")]


# ----------------------------------------------------------------------------- models
class DefinitionSummary(BaseModel):
    process: str
    title: str = Field(description="the current version's title")
    version: str = Field(description="the current version: new instances start with it")
    seq: int = Field(description="the current version's number within the process")
    versions: int = Field(description="how many versions were published")
    running: int = Field(description="running instances, of every version")


class VersionOut(BaseModel):
    seq: int
    version: str = Field(description="sha256:<hex> of the canonical JSON")
    title: str
    published_by: str
    published_at: datetime
    note: str
    current: bool = Field(description="new instances start with this version")
    running: int = Field(description="running instances of this version")
    total: int = Field(description="instances of this version, ended ones too")


class DefinitionOut(BaseModel):
    process: str
    title: str = Field(description="the current version's title")
    current: str | None = Field(description="the version new instances start with")
    versions: list[VersionOut] = Field(description="newest first")


class VersionDocument(VersionOut):
    process: str
    document: dict[str, Any] = Field(description="the canonical JSON document")


class ProblemOut(BaseModel):
    path: str = Field(description="where in the document, e.g. stages.resolve.then")
    message: str
    type: str


class Validation(BaseModel):
    valid: bool
    version: str | None = Field(description="the version it would be; null when invalid")
    current: str | None = Field(description="the process's current version; null: none")
    errors: list[ProblemOut]
    warnings: list[DocumentWarning]
    diff: list[str] = Field(description="what it would change from the current version")


# ----------------------------------------------------------------------------- helpers
def _version_out(
    row: BlueprintVersion, current: BlueprintVersion | None, counts: dict[str, Counts]
) -> VersionOut:
    found = counts.get(row.version, Counts())
    return VersionOut(
        seq=row.seq,
        version=row.version,
        title=row.title,
        published_by=row.published_by,
        published_at=row.published_at,
        note=row.note,
        current=current is not None and row.version == current.version,
        running=found.running,
        total=found.total,
    )


def _not_coded(process: str) -> None:
    """409 if the name is a process type in code."""
    try:
        definitions.refuse_coded(process)
    except CodedProcessType as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None


async def _version(session: SessionDep, process: str, version: str) -> BlueprintVersion:
    row = await definitions.version_row(session, process, version)
    if row is None:
        if not await definitions.versions_of(session, process):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no blueprint {process}")
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"blueprint {process} has no version {version}"
        )
    return row


def _invalid(loc: list[str | int], type_: str, msg: str) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"type": type_, "loc": loc, "msg": msg}]
    )


async def _document(request: Request) -> tuple[dict[str, Any], str | None]:
    """The body's document and, when it came as YAML, its text: 400 if it is not UTF-8, 415
    if it is neither JSON nor YAML, 422 if it does not parse or is not a mapping."""
    kind = request.headers.get("content-type", JSON_TYPE).split(";")[0].strip().lower()
    if kind not in (JSON_TYPE, *YAML_TYPES):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"send the document as {JSON_TYPE} or YAML ({', '.join(YAML_TYPES)}), not {kind}",
        )
    try:
        text = (await request.body()).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the body is not UTF-8 text") from None
    if kind in YAML_TYPES:
        try:
            return check.load_yaml(text), text
        except ValidationError as err:
            raise body_errors(err) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise _invalid(["body", err.pos], "json_invalid", f"not JSON: {err.msg}") from None
    except RecursionError:
        raise _invalid(["body"], "json_invalid", "not JSON: nested too deeply") from None
    if not isinstance(document, dict):
        message = (
            f"a blueprint is a JSON object (process, stages...), not {type(document).__name__}"
        )
        raise _invalid(["body"], "not_a_mapping", message)
    return document, None


def _mismatch(process: str, document: dict[str, Any]) -> list[dict[str, Any]]:
    """The error of a document whose `process` is not the one of the path (none: it is, or
    it has none, which the checker reports)."""
    named = document.get("process", process)
    if named == process:
        return []
    message = f"the document is of process {show_value(named)}, "
    message += f"but it is published at /definitions/{process}"
    return [{"type": "process_mismatch", "loc": ["body", "process"], "msg": message}]


def _entries(refusal: ValidationError) -> list[dict[str, Any]]:
    """The checker's errors in FastAPI's list format (loc from "body")."""
    return cast(list[dict[str, Any]], body_errors(refusal).detail)


def _checked(document: dict[str, Any]) -> tuple[Blueprint, str, str] | ValidationError:
    """The blueprint, its version and canonical JSON; the ValidationError that refuses it."""
    try:
        version, text = check.canonical(document)
    except ValidationError as err:
        return err
    return check.parsed_version(version, text), version, text


# ----------------------------------------------------------------------------- reading
@router.get("", response_model=list[DefinitionSummary], responses=responses(401))
async def list_definitions(user: CurrentUser, session: SessionDep) -> list[DefinitionSummary]:
    """Every blueprint process, with its current version and running instances."""
    current = await definitions.current_versions(session)
    running = await definitions.running_by_process(session, [row.process for row, _ in current])
    return [
        DefinitionSummary(
            process=row.process,
            title=row.title,
            version=row.version,
            seq=row.seq,
            versions=count,
            running=running.get(row.process, 0),
        )
        for row, count in current
    ]


@router.get("/{process}", response_model=DefinitionOut, responses=responses(401, 404))
async def definition(process: str, user: CurrentUser, session: SessionDep) -> DefinitionOut:
    """A blueprint process's versions, newest first, with their instances and the current one."""
    rows = await definitions.versions_of(session, process)
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no blueprint {process}")
    current = await definitions.current_row(session, process)
    counts = await definitions.instance_counts(session, process)
    return DefinitionOut(
        process=process,
        title=(current or rows[0]).title,
        current=current.version if current is not None else None,
        versions=[_version_out(row, current, counts) for row in rows],
    )


@router.get(
    "/{process}/versions/{version}",
    response_model=VersionDocument,
    responses=responses(401, 404),
)
async def definition_version(
    process: str, version: str, user: CurrentUser, session: SessionDep
) -> VersionDocument:
    """One version (`current`: the current one): its canonical JSON document and what it is."""
    row = await _version(session, process, version)
    current = await definitions.current_row(session, process)
    counts = await definitions.instance_counts(session, process)
    return VersionDocument(
        **_version_out(row, current, counts).model_dump(),
        process=process,
        document=json.loads(row.document),
    )


@router.get(
    "/{process}/versions/{version}/yaml",
    response_class=Response,  # documents no JSON body for 200, only the YAML below
    responses={
        200: {
            "content": {"text/yaml": {"schema": {"type": "string"}}},
            "description": "The version's YAML",
        },
        **responses(401, 404),
    },
)
async def definition_yaml(
    process: str, version: str, user: CurrentUser, session: SessionDep
) -> PlainTextResponse:
    """One version (`current`: the current one) as YAML: the text it was published as, or its
    canonical document in YAML when it came as JSON."""
    row = await _version(session, process, version)
    text = row.source
    if text is None:
        text = yaml.safe_dump(json.loads(row.document), sort_keys=False, allow_unicode=True)
    return PlainTextResponse(text, media_type="text/yaml")


# ----------------------------------------------------------------------------- publishing
@router.post(
    "/{process}",
    response_model=Published,
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_DOCUMENT_BODY,
    responses={
        200: {"model": Published, "description": "The same content was published before"},
        **responses(400, 401, 403, 409, 422),
        **_UNSUPPORTED,
    },
)
async def publish_definition(
    process: str,
    request: Request,
    response: Response,
    admin: Admin,
    session: SessionDep,
    note: Note = "",
) -> Published:
    """Check a blueprint document and make it the version new instances start with; 201 if its
    content is new, 200 if it was published before (current again, if it was not)."""
    _not_coded(process)
    document, source = await _document(request)
    mismatch = _mismatch(process, document)
    if mismatch:  # refused, with the document's other problems
        checked = _checked(document)
        others = _entries(checked) if isinstance(checked, ValidationError) else []
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, mismatch + others)
    try:
        published = await definitions.publish(
            session, document, actor=admin.username, source=source, note=note
        )
    except ValidationError as err:
        raise body_errors(err) from None
    except (CodedProcessType, PublishConflict) as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    if not published.created:
        response.status_code = status.HTTP_200_OK
    return published


@router.post(
    "/{process}/validate",
    response_model=Validation,
    openapi_extra=_DOCUMENT_BODY,
    responses={**responses(400, 401, 403, 409, 422), **_UNSUPPORTED},
)
async def validate_definition(
    process: str, request: Request, admin: Admin, session: SessionDep
) -> Validation:
    """Check a blueprint document without publishing it: its errors, warnings, and what it
    would change from the current version (422 only for a body that is no document at all)."""
    _not_coded(process)
    document, _ = await _document(request)
    current = await definitions.current_row(session, process)
    checked = _checked(document)
    errors = _mismatch(process, document)
    if isinstance(checked, ValidationError):
        errors += _entries(checked)
    if errors or isinstance(checked, ValidationError):
        return Validation(
            valid=False,
            version=None,
            current=current.version if current is not None else None,
            errors=[
                ProblemOut(path=".".join(map(str, e["loc"][1:])), message=e["msg"], type=e["type"])
                for e in errors
            ],
            warnings=[],
            diff=[],
        )
    blueprint, version, _ = checked
    return Validation(
        valid=True,
        version=version,
        current=current.version if current is not None else None,
        errors=[],
        warnings=definitions.warnings_of(blueprint),
        diff=definitions.diff_from(current, blueprint, version),
    )
