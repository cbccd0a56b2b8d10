"""A published blueprint version as a process type of the registry: its start and event models
(pydantic models built from the document's typed fields, with the engine's own reading of each
value, so the gateway refuses with 422 naming the field exactly what the engine would refuse),
its stages and roles, its events, and how a start body becomes the interpreter's input with
the version pinned.

Imported by the API (and tests), never by workflow code.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema, create_model

from workflows.blueprint import check
from workflows.blueprint import engine as eng
from workflows.blueprint.interpreter import (
    BlueprintInput,
    BlueprintStatus,
    BlueprintWorkflow,
    blueprint_workflow_id,
)
from workflows.blueprint.model import Blueprint, FieldSpec
from workflows.kernel import HumanProcess
from workflows.registry import ProcessEvent, ProcessType

_FORMATS = MappingProxyType({"email": "email", "date": "date", "datetime": "date-time"})


def _schema(spec: FieldSpec) -> dict[str, Any]:
    """The JSON Schema of one field (what `GET /process-types` shows)."""
    schema: dict[str, Any]
    match spec.type:
        case "int":
            schema = {"type": "integer"}
        case "decimal":
            schema = {"type": ["number", "string"], "description": "a decimal number"}
        case "bool":
            schema = {"type": "boolean"}
        case "choice":
            schema = {"enum": list(spec.options or ())}
        case _:
            schema = {"type": "string"}
    if spec.type in _FORMATS:
        schema["format"] = _FORMATS[spec.type]
    if spec.pattern is not None:
        schema["pattern"] = spec.pattern
    if spec.max_length is not None:
        schema["maxLength"] = spec.max_length
    if spec.min is not None:
        schema["minimum"] = float(spec.min) if spec.type == "decimal" else int(spec.min)
    if spec.max is not None:
        schema["maximum"] = float(spec.max) if spec.type == "decimal" else int(spec.max)
    if spec.label is not None:
        schema["title"] = spec.label
    return schema


def _read(spec: FieldSpec, value: Any) -> Any:
    """A value as the engine keeps it (None: no value); ValueError saying why it does not fit."""
    try:
        kept = eng.coerce(spec, value)
    except (TypeError, ArithmeticError) as err:
        raise ValueError(str(err)) from None
    if kept is None and spec.required:
        raise ValueError("a value is required")
    return kept


def fields_model(name: str, specs: Mapping[str, FieldSpec]) -> type[BaseModel]:
    """A request model of typed blueprint fields: unknown fields refused, each value read by
    the engine's rules, a required field without a value refused naming it."""
    definitions: dict[str, Any] = {}
    for field_name, spec in specs.items():
        kind = Annotated[
            Any,
            BeforeValidator(functools.partial(_read, spec)),
            WithJsonSchema(_schema(spec)),
        ]
        definitions[field_name] = (kind, ...) if spec.required else (kind, None)
    model = create_model(  # type: ignore[call-overload]
        name,
        __config__=ConfigDict(extra="forbid"),
        __module__=__name__,
        **definitions,
    )
    model.model_rebuild()
    return model


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def values_of(body: BaseModel) -> dict[str, Any]:
    """The field values of a validated body, as the engine keeps them (no value left out)."""
    return {k: v for k, v in body.model_dump(mode="json").items() if v is not None}


def roles_of(blueprint: Blueprint) -> tuple[str, ...]:
    """Every role the blueprint names (tasks, approvals, escalations, SLAs, events), its owner
    first."""
    found = [blueprint.owner_role] + [role for _, role in check._roles(blueprint)]
    return tuple(dict.fromkeys(["requester", *found]))


def blueprint_process_type(blueprint: Blueprint, version: str, document: str) -> ProcessType:
    """The registry entry of a published version (`document`: its canonical JSON, whose hash is
    `version`): new instances started through it run exactly that version."""
    if check.parsed_version(version, document) != blueprint:
        raise ValueError(f"the document given for {version} is not that blueprint")
    process = blueprint.process
    start_model = fields_model(f"{_camel(process)}Start", blueprint.input)
    key_field = blueprint.business_key

    def build_input(body: BaseModel, requester: str) -> BlueprintInput:
        return BlueprintInput(
            process=process,
            version=version,
            document=document,
            business_key=str(getattr(body, key_field)),
            requester=requester,
            values=values_of(body),
        )

    events = {
        name: ProcessEvent(
            name=name,
            model=fields_model(f"{_camel(process)}{_camel(name)}", event.fields),
            update=name,  # the interpreter's dynamic update handler takes it by this name
            description=event.description or name.replace("_", " "),
            roles=frozenset(event.roles),
        )
        for name, event in blueprint.events.items()
    }
    ends = [name for name, stage in blueprint.stages.items() if stage.end is not None]
    reserved = [HumanProcess.FAILED_STAGE, HumanProcess.CANCELLED_STAGE]
    stages = [blueprint.start] + [s for s in blueprint.stages if s != blueprint.start]
    return ProcessType(
        name=process,
        title=blueprint.title,
        description=blueprint.description,
        workflow=BlueprintWorkflow,
        input_model=BlueprintInput,
        start_model=start_model,
        build_input=build_input,
        business_key=lambda body: str(getattr(body, key_field)),
        workflow_id=functools.partial(blueprint_workflow_id, process),
        status_model=BlueprintStatus,
        stages=tuple(dict.fromkeys([*stages, *reserved])),
        terminal_stages=frozenset([*ends, *reserved]),
        roles=roles_of(blueprint),
        events=MappingProxyType(events),
        cancel_update="cancel",
        cancel_roles=frozenset({blueprint.owner_role}),
        workflow_name=process,
        version=version,
    )


def from_document(document: dict[str, Any]) -> ProcessType:
    """The process type of a blueprint document (checked; a ValidationError otherwise)."""
    version, text = check.canonical(document)
    return blueprint_process_type(check.parsed_version(version, text), version, text)
