"""Blueprint definitions: the store of published versions, the current version of each blueprint
process, the seeds of `blueprints/`, and the registry entries new instances start through.

A version is immutable and named by the sha256 of its canonical JSON (`check.canonical`): the
same content published again is the same version. Every API replica publishes, so the registry
of one replica can hold a version that another has since replaced: `sync_registry` brings it
up to the database's current versions (the gateway calls it before it starts a blueprint
instance). No routes here: api/routers/definitions.py serves them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db import AuditEntry, BlueprintCurrent, BlueprintVersion, ProcessInstance, utcnow
from core.roles import KNOWN_ROLES
from workflows import registry
from workflows.blueprint import check
from workflows.blueprint.model import Blueprint
from workflows.blueprint.types import blueprint_process_type

log = logging.getLogger("procflow.definitions")

PUBLISHED = "blueprint_published"  # the audit action of a publish that moves the current version
CURRENT = "current"  # the alias of a process's current version in the API's paths
RUNNING = "running"
ATTEMPTS = 5  # inserts tried while other replicas publish the same process at the same time


class CodedProcessType(Exception):
    """The name is a process type in code: no blueprint may take it (409)."""

    def __init__(self, process: str) -> None:
        super().__init__(f"{process} is a process type in code; a blueprint cannot take its name")
        self.process = process


class PublishConflict(Exception):
    """Other versions of the process were published at the same time, every attempt (409)."""


class DocumentWarning(BaseModel):
    """Allowed, but probably not what the author meant."""

    path: str = Field(description="where in the document, e.g. stages.resolve.do.0.task.roles.0")
    kind: str = Field(description="unknown_role, unused_event, ...")
    message: str


class Published(BaseModel):
    """What a publish did."""

    process: str
    version: str = Field(description="sha256:<hex> of the canonical JSON")
    seq: int = Field(description="the version's number within the process: 1, 2, ...")
    title: str
    created: bool = Field(description="a new version was stored (false: published before)")
    made_current: bool = Field(description="new instances start with it now, and did not before")
    previous: str | None = Field(description="the version that was current before; null: none")
    warnings: list[DocumentWarning]
    diff: list[str] = Field(description="what it changes from the previous current version")


@dataclass(frozen=True)
class Counts:
    """Instances of one version: those running and all of them."""

    running: int = 0
    total: int = 0


# ----------------------------------------------------------------------------- reading
def refuse_coded(process: str) -> None:
    """CodedProcessType if the name is a registered process type in code."""
    found = registry.PROCESS_TYPES.get(process)
    if found is not None and not found.is_blueprint:
        raise CodedProcessType(process)


def warnings_of(blueprint: Blueprint) -> list[DocumentWarning]:
    """What the blueprint names that probably does not work as meant (roles no one holds...)."""
    return [
        DocumentWarning(path=p.path, kind=p.kind, message=p.message)
        for p in check.warnings(blueprint, KNOWN_ROLES)
    ]


def blueprint_of(row: BlueprintVersion) -> Blueprint:
    """The blueprint of a stored version (parsed once, then cached: check.parsed_version)."""
    return check.parsed_version(row.version, row.document)


def diff_from(old: BlueprintVersion | None, blueprint: Blueprint, version: str) -> list[str]:
    """What a blueprint (of `version`) changes from a stored version; nothing from no version
    or from itself."""
    if old is None or old.version == version:
        return []
    try:
        before = blueprint_of(old)
    except ValueError:  # stored before the checker refused what it holds
        return [f"the previous version {old.version} no longer passes the checker: no diff"]
    return check.diff(before, blueprint)


async def current_row(session: AsyncSession, process: str) -> BlueprintVersion | None:
    """The current version of a process; None: it has none."""
    return await session.scalar(
        select(BlueprintVersion)
        .join(BlueprintCurrent, BlueprintCurrent.version == BlueprintVersion.version)
        .where(BlueprintCurrent.process == process)
    )


async def version_row(session: AsyncSession, process: str, version: str) -> BlueprintVersion | None:
    """A version of a process (`current`: its current one); None: there is no such version."""
    if version == CURRENT:
        return await current_row(session, process)
    row = await session.get(BlueprintVersion, version)
    return row if row is not None and row.process == process else None


async def versions_of(session: AsyncSession, process: str) -> list[BlueprintVersion]:
    """Every version of a process, newest first."""
    rows = await session.scalars(
        select(BlueprintVersion)
        .where(BlueprintVersion.process == process)
        .order_by(BlueprintVersion.seq.desc())
    )
    return list(rows)


async def current_versions(session: AsyncSession) -> list[tuple[BlueprintVersion, int]]:
    """The current version of every blueprint process, by name, with its count of versions."""
    counts = (
        select(BlueprintVersion.process, func.count().label("versions"))
        .group_by(BlueprintVersion.process)
        .subquery()
    )
    rows = await session.execute(
        select(BlueprintVersion, counts.c.versions)
        .join(BlueprintCurrent, BlueprintCurrent.version == BlueprintVersion.version)
        .join(counts, counts.c.process == BlueprintVersion.process)
        .order_by(BlueprintVersion.process)
    )
    return [(row, versions) for row, versions in rows.all()]


async def instance_counts(session: AsyncSession, process: str) -> dict[str, Counts]:
    """The instances of each version of a process (versions without one are left out)."""
    rows = await session.execute(
        select(
            ProcessInstance.definition_version,
            func.count(),
            func.sum(case((ProcessInstance.status == RUNNING, 1), else_=0)),
        )
        .where(ProcessInstance.process_type == process)
        .group_by(ProcessInstance.definition_version)
    )
    return {version: Counts(int(running or 0), total) for version, total, running in rows.all()}


async def running_by_process(session: AsyncSession, processes: Iterable[str]) -> dict[str, int]:
    """The running instances of each of these processes, of any version (none: left out)."""
    rows = await session.execute(
        select(ProcessInstance.process_type, func.count())
        .where(ProcessInstance.process_type.in_(list(processes)), ProcessInstance.status == RUNNING)
        .group_by(ProcessInstance.process_type)
    )
    return {process: count for process, count in rows.all()}


# ----------------------------------------------------------------------------- publishing
async def publish(
    session: AsyncSession,
    document: dict,
    *,
    actor: str,
    source: str | None,
    note: str = "",
) -> Published:
    """Check a document and make it the current version of its process: stored if its content
    is new (the same content is the same version), audited when the current version changes,
    registered. ValidationError naming every problem's path (nothing is written), or
    CodedProcessType, or PublishConflict."""
    version, text = check.canonical(document)
    blueprint = check.parsed_version(version, text)
    refuse_coded(blueprint.process)
    return await _publish(session, blueprint, version, text, actor=actor, source=source, note=note)


async def _publish(
    session: AsyncSession,
    blueprint: Blueprint,
    version: str,
    text: str,
    *,
    actor: str,
    source: str | None,
    note: str,
) -> Published:
    seq, created = await _store(session, blueprint, version, text, actor, source, note)
    previous = await _make_current(session, blueprint.process, version, seq, actor, note, created)
    old = await session.get(BlueprintVersion, previous) if previous else None
    _register(blueprint, version, text)
    return Published(
        process=blueprint.process,
        version=version,
        seq=seq,
        title=blueprint.title,
        created=created,
        made_current=previous != version,
        previous=previous,
        warnings=warnings_of(blueprint),
        diff=diff_from(old, blueprint, version),
    )


async def _store(
    session: AsyncSession,
    blueprint: Blueprint,
    version: str,
    text: str,
    actor: str,
    source: str | None,
    note: str,
) -> tuple[int, bool]:
    """The version stored, inserted (and committed) if it is new: its seq, and whether it was
    inserted. A concurrent insert of the same version by another replica is read back; one of
    another version that took the next seq makes this one try the seq after it. (A rollback
    expires every loaded row: only plain values leave here.)"""
    for _ in range(ATTEMPTS):
        row = await session.get(BlueprintVersion, version, populate_existing=True)
        if row is not None:
            return row.seq, False
        last = await session.scalar(
            select(func.max(BlueprintVersion.seq)).where(
                BlueprintVersion.process == blueprint.process
            )
        )
        seq = (last or 0) + 1
        row = BlueprintVersion(
            version=version,
            process=blueprint.process,
            seq=seq,
            title=blueprint.title,
            document=text,
            source=source,
            published_by=actor,
            published_at=utcnow(),
            note=note,
        )
        session.add(row)
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            continue
        return seq, True
    raise PublishConflict(
        f"other versions of {blueprint.process} were published at the same time; retry"
    )


async def _make_current(
    session: AsyncSession,
    process: str,
    version: str,
    seq: int,
    actor: str,
    note: str,
    created: bool,
) -> str | None:
    """Make a stored version its process's current one (audited, committed, if it was not);
    the version that was current before."""
    for _ in range(ATTEMPTS):
        current = await session.get(BlueprintCurrent, process, populate_existing=True)
        previous = current.version if current is not None else None
        if previous == version:
            await session.commit()  # ends the reading transaction
            return previous
        now = utcnow()
        if current is None:
            session.add(
                BlueprintCurrent(process=process, version=version, updated_at=now, updated_by=actor)
            )
        else:
            current.version, current.updated_at, current.updated_by = version, now, actor
        session.add(
            AuditEntry(
                event_key=f"definition:{process}:{uuid.uuid4().hex}",
                workflow_id=f"definition:{process}",
                actor=actor,
                action=PUBLISHED,
                comment=note,
                details={
                    "version": version,
                    "seq": seq,
                    "previous": previous,
                    "created": created,
                },
                at=now,
            )
        )
        try:
            await session.commit()
        except IntegrityError:  # another replica made the process's first version current
            await session.rollback()
            continue
        return previous
    raise PublishConflict(f"the current version of {process} changed meanwhile; retry")


# ----------------------------------------------------------------------------- the registry
def _register(blueprint: Blueprint, version: str, text: str) -> None:
    """Register a version as its process's entry, unless the registry holds it already."""
    found = registry.PROCESS_TYPES.get(blueprint.process)
    if found is None or found.version != version:
        registry.register(blueprint_process_type(blueprint, version, text))


async def sync_registry(session: AsyncSession, process: str | None = None) -> None:
    """Register every current version of the database (or just `process`'s) that the registry
    does not hold: what other replicas published since. A version that can no longer be
    registered (a coded type took its name, the checker refuses it) is logged and skipped."""
    began = not session.in_transaction()
    query = select(BlueprintCurrent.process, BlueprintCurrent.version)
    if process is not None:
        query = query.where(BlueprintCurrent.process == process)
    stale = [
        (name, version)
        for name, version in (await session.execute(query)).all()
        if getattr(registry.PROCESS_TYPES.get(name), "version", None) != version
    ]
    for name, version in stale:
        try:
            refuse_coded(name)
            text = await session.scalar(
                select(BlueprintVersion.document).where(BlueprintVersion.version == version)
            )
            if text is None:
                raise ValueError(f"version {version} is not stored")
            _register(check.parsed_version(version, text), version, text)
        except (CodedProcessType, ValueError) as err:  # ValidationError is a ValueError
            log.error("blueprint %s %s is not registered: %s", name, version, _problems(err))
    if began:
        await session.commit()


def _problems(err: Exception) -> str:
    """An error in one line; a ValidationError as its paths and messages (never its input)."""
    if isinstance(err, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(document)'}: {e['msg']}"
            for e in err.errors(include_url=False, include_input=False)
        )
    return str(err)


# ----------------------------------------------------------------------------- seeds
@dataclass(frozen=True)
class _Seed:
    path: Path
    text: str
    blueprint: Blueprint
    version: str
    document: str


def _read_seed(path: Path) -> _Seed | None:
    """A seed file, checked; None (logged as an error) if it cannot be published."""
    try:
        text = path.read_text(encoding="utf-8")
        version, document = check.canonical(check.load_yaml(text))
        blueprint = check.parsed_version(version, document)
        refuse_coded(blueprint.process)
    except (OSError, ValueError, CodedProcessType) as err:  # ValidationError, UnicodeError
        log.error("seed blueprint %s is not published: %s", path, _problems(err))
        return None
    return _Seed(path, text, blueprint, version, document)


async def publish_seeds(
    session_factory: async_sessionmaker, directory: Path, actor: str = "system"
) -> list[Published]:
    """Publish every `*.yaml` of the directory whose version is not in the database yet (a seed
    published before is left alone, even if another version is current now), then register the
    current versions. A broken seed is logged as an error and skipped; database errors pass."""
    published = []
    if not directory.is_dir():
        log.warning("no seed blueprints: %s is not a directory", directory)
    paths = sorted(directory.glob("*.yaml")) if directory.is_dir() else []
    for seed in filter(None, map(_read_seed, paths)):
        async with session_factory() as session:
            if await session.get(BlueprintVersion, seed.version) is not None:
                continue
            try:
                result = await _publish(
                    session,
                    seed.blueprint,
                    seed.version,
                    seed.document,
                    actor=actor,
                    source=seed.text,
                    note=f"seed {seed.path.name}",
                )
            except PublishConflict as err:
                log.error("seed blueprint %s is not published: %s", seed.path, err)
                continue
        log.info("seed blueprint %s published: %s %s", seed.path.name, result.process, seed.version)
        published.append(result)
    async with session_factory() as session:
        await sync_registry(session)
    return published
