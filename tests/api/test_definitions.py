"""Blueprint definitions: the seeds published at start-up, versions named by their content and
published by admins as JSON or YAML, refused documents (422 naming the path, the current
version untouched), the validate dry run, the canonical JSON and YAML of each version, instance
counts, and the registry entry new instances start through."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from api import definitions
from api.app import ROOT, create_app
from core.db import AuditEntry, BlueprintCurrent, BlueprintVersion, ProcessInstance
from core.settings import Settings
from tests.api.conftest import Api
from tests.support import sqlite_url
from workflows import registry
from workflows.blueprint import check
from workflows.blueprint.types import blueprint_process_type

SEEDS = ROOT / "blueprints"
COMPLAINT = "complaint"
ONBOARDING = "customer_onboarding"
LEAVE = "leave_request"
YAML = "application/yaml"


@pytest.fixture(autouse=True)
def registry_restored() -> Iterator[None]:
    """The registry as it was before the test: the seeds and documents the test's apps publish
    are registered for the test only."""
    before = dict(registry.PROCESS_TYPES)
    try:
        yield
    finally:
        for name, entry in list(registry.PROCESS_TYPES.items()):
            if name not in before:
                registry.unregister(name)
            elif entry is not before[name]:
                registry.register(before[name])


def seed_text(name: str) -> str:
    return (SEEDS / f"{name}.yaml").read_text(encoding="utf-8")


def seed(name: str = "complaint") -> dict[str, Any]:
    return check.load_yaml(seed_text(name))


def seed_version(name: str = "complaint") -> str:
    return check.version_id(seed(name))


def leave_request(title: str = "Leave request", role: str = "manager") -> dict[str, Any]:
    """A small valid blueprint of a process no seed defines."""
    return {
        "process": LEAVE,
        "dsl": 1,
        "title": title,
        "description": "An employee asks for leave; a manager decides.",
        "owner_role": "manager",
        "business_key": "request_no",
        "input": {"request_no": {"type": "string", "required": True}},
        "start": "review",
        "stages": {
            "review": {
                "do": [
                    {
                        "task": "review",
                        "title": "Review the request",
                        "roles": [role],
                        "outcomes": ["approved", "rejected"],
                    }
                ],
                "then": "done",
            },
            "done": {"end": {"outcome": "done"}},
        },
    }


def chain(stages: int) -> dict[str, Any]:
    """A blueprint of `stages` task stages one after the other, and an end."""
    document = leave_request("A long chain") | {"process": "long_chain", "start": "s0"}
    document["stages"] = {
        f"s{i}": {
            "do": [
                {"task": f"t{i}", "title": f"Step {i}", "roles": ["manager"], "outcomes": ["done"]}
            ],
            "then": f"s{i + 1}" if i + 1 < stages else "done",
        }
        for i in range(stages)
    }
    document["stages"]["done"] = {"end": {"outcome": "done"}}
    return document


async def _state(sessions: async_sessionmaker, process: str) -> tuple[str | None, int, int]:
    """The current version of a process, its count of versions and of publish audit entries."""
    async with sessions() as s:
        current = await s.scalar(
            select(BlueprintCurrent.version).where(BlueprintCurrent.process == process)
        )
        versions = await s.scalar(
            select(func.count())
            .select_from(BlueprintVersion)
            .where(BlueprintVersion.process == process)
        )
        audits = await s.scalar(
            select(func.count())
            .select_from(AuditEntry)
            .where(
                AuditEntry.workflow_id == f"definition:{process}",
                AuditEntry.action == definitions.PUBLISHED,
            )
        )
    return current, versions or 0, audits or 0


@asynccontextmanager
async def _started(settings: Settings, client: Client) -> AsyncIterator[Api]:
    app: FastAPI = create_app(settings, temporal_client=client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield Api(http)


async def _post(
    api: Api, url: str, as_: str, text: str | bytes, kind: str = YAML
) -> httpx.Response:
    """POST a body of this content type (YAML by default) as the user."""
    headers = await api.login(as_) | {"Content-Type": kind}
    return await api.http.post(url, content=text, headers=headers)


def _locs(r: httpx.Response) -> list[list]:
    return [e["loc"] for e in r.json()["detail"]]


# ----------------------------------------------------------------------------- seeds
async def test_the_seeds_are_published_at_start_up_and_listed(
    api: Api, sessions: async_sessionmaker
):
    r = await api.get("/definitions", "alice")
    assert r.status_code == 200, r.text
    listed = {d["process"]: d for d in r.json()}
    assert listed == {
        COMPLAINT: {
            "process": COMPLAINT,
            "title": "Customer complaint",
            "version": seed_version("complaint"),
            "seq": 1,
            "versions": 1,
            "running": 0,
        },
        ONBOARDING: {
            "process": ONBOARDING,
            "title": "Customer onboarding",
            "version": seed_version("onboarding"),
            "seq": 1,
            "versions": 1,
            "running": 0,
        },
    }
    assert registry.get(COMPLAINT).version == seed_version("complaint")
    assert registry.get(ONBOARDING).version == seed_version("onboarding")
    assert await _state(sessions, COMPLAINT) == (seed_version("complaint"), 1, 1)
    one = (await api.get(f"/definitions/{COMPLAINT}", "alice")).json()
    assert [(v["published_by"], v["note"]) for v in one["versions"]] == [
        ("system", "seed complaint.yaml")
    ]


async def test_starting_the_app_again_publishes_nothing_new(
    settings: Settings, client: Client, sessions: async_sessionmaker
):
    async with _started(settings, client):
        first = await _state(sessions, COMPLAINT)
    async with _started(settings, client) as api:
        listed = (await api.get("/definitions", "alice")).json()
    assert await _state(sessions, COMPLAINT) == first == (seed_version("complaint"), 1, 1)
    assert [d["versions"] for d in listed] == [1, 1]
    assert await definitions.publish_seeds(sessions, SEEDS) == []


async def test_a_seed_published_before_leaves_a_newer_current_version_alone(
    settings: Settings, client: Client, sessions: async_sessionmaker
):
    newer = seed() | {"title": "Customer complaint, revised"}
    async with _started(settings, client) as api:
        r = await api.post(f"/definitions/{COMPLAINT}", "ada", json=newer)
        assert r.status_code == 201, r.text
    async with _started(settings, client):
        assert registry.get(COMPLAINT).version == r.json()["version"]
    assert await _state(sessions, COMPLAINT) == (r.json()["version"], 2, 2)


async def test_a_broken_seed_is_logged_and_skipped(
    sessions: async_sessionmaker, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    (tmp_path / "a_broken.yaml").write_text("process: broken\nstages: [", encoding="utf-8")
    wrong = leave_request() | {"start": "nowhere"}
    (tmp_path / "b_wrong.yaml").write_text(yaml.safe_dump(wrong), encoding="utf-8")
    coded = leave_request() | {"process": "sales_order"}
    (tmp_path / "c_coded.yaml").write_text(yaml.safe_dump(coded), encoding="utf-8")
    (tmp_path / "d_good.yaml").write_text(yaml.safe_dump(leave_request()), encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="procflow.definitions"):
        published = await definitions.publish_seeds(sessions, tmp_path)
    assert [(p.process, p.seq, p.created) for p in published] == [(LEAVE, 1, True)]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 3
    assert "a_broken.yaml" in logged[0] and "not YAML" in logged[0]
    assert "b_wrong.yaml" in logged[1] and "start: no stage 'nowhere'" in logged[1]
    assert "c_coded.yaml" in logged[2] and "process type in code" in logged[2]
    assert registry.get(LEAVE).version == published[0].version
    assert registry.get("sales_order").is_blueprint is False


async def test_the_api_starts_on_a_database_without_the_tables(
    settings: Settings, client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    empty = settings.model_copy(update={"database_url": sqlite_url(tmp_path / "empty.db")})
    with caplog.at_level(logging.WARNING, logger="procflow.api"):
        async with _started(empty, client) as api:
            r = await api.http.get("/healthz")
    assert r.status_code == 200, r.text
    assert any("blueprints not published" in m for m in caplog.messages)


# ----------------------------------------------------------------------------- publishing
async def test_a_new_process_is_published_as_json_and_the_same_content_in_yaml_is_one_version(
    api: Api, sessions: async_sessionmaker
):
    document = leave_request(role="night-shift")
    r = await api.post(f"/definitions/{LEAVE}", "ada", json=document)
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["version"] == check.version_id(document)
    assert (first["seq"], first["created"], first["made_current"]) == (1, True, True)
    assert (first["previous"], first["diff"]) == (None, [])
    assert [(w["path"], w["kind"]) for w in first["warnings"]] == [
        ("stages.review.do.0.task.roles.0", "unknown_role")  # published all the same
    ]
    # the same blueprint spelled differently: YAML, keys in another order, a comment
    text = "# the same leave request\n" + yaml.safe_dump(document, sort_keys=True)
    again = await _post(api, f"/definitions/{LEAVE}", "ada", text)
    assert again.status_code == 200, again.text
    body = again.json()
    assert (body["version"], body["seq"]) == (first["version"], 1)
    assert (body["created"], body["made_current"], body["previous"]) == (
        False,
        False,
        first["version"],
    )
    assert await _state(sessions, LEAVE) == (first["version"], 1, 1)  # audited once
    assert registry.get(LEAVE).version == first["version"]
    assert registry.get(LEAVE).is_blueprint


async def test_a_yaml_document_is_stored_with_its_text(api: Api):
    text = "# a leave request, as the author wrote it\n" + yaml.safe_dump(leave_request())
    r = await _post(api, f"/definitions/{LEAVE}", "ada", text)
    assert r.status_code == 201, r.text
    served = await api.get(f"/definitions/{LEAVE}/versions/current/yaml", "alice")
    assert served.status_code == 200, served.text
    assert served.text == text


async def test_a_changed_document_is_the_next_version_with_its_diff_and_becomes_current(
    api: Api, sessions: async_sessionmaker
):
    changed = seed() | {"title": "Complaint, revised"}
    r = await api.post(f"/definitions/{COMPLAINT}", "ada", json=changed, params={"note": "v2"})
    assert r.status_code == 201, r.text
    v2 = r.json()
    assert (v2["seq"], v2["created"], v2["made_current"]) == (2, True, True)
    assert v2["previous"] == seed_version()
    assert v2["diff"] == ['title changed: "Customer complaint" -> "Complaint, revised"']
    assert await _state(sessions, COMPLAINT) == (v2["version"], 2, 2)
    assert registry.get(COMPLAINT).version == v2["version"]
    listed = {t["name"]: t for t in (await api.get("/process-types", "alice")).json()}
    assert listed[COMPLAINT]["title"] == "Complaint, revised"
    one = (await api.get(f"/definitions/{COMPLAINT}", "alice")).json()
    assert one["current"] == v2["version"]
    assert [(v["seq"], v["current"], v["note"]) for v in one["versions"]] == [
        (2, True, "v2"),
        (1, False, "seed complaint.yaml"),
    ]
    # the first version again: stored before (200), current again, audited
    back = await _post(api, f"/definitions/{COMPLAINT}", "ada", seed_text("complaint"))
    assert back.status_code == 200, back.text
    body = back.json()
    assert (body["seq"], body["created"], body["made_current"]) == (1, False, True)
    assert body["previous"] == v2["version"]
    assert body["diff"] == ['title changed: "Complaint, revised" -> "Customer complaint"']
    assert await _state(sessions, COMPLAINT) == (seed_version(), 2, 3)
    assert registry.get(COMPLAINT).version == seed_version()
    async with sessions() as s:
        audit = await s.scalar(
            select(AuditEntry)
            .where(AuditEntry.workflow_id == f"definition:{COMPLAINT}")
            .order_by(AuditEntry.id.desc())
            .limit(1)
        )
    assert audit is not None and (audit.actor, audit.action) == ("ada", "blueprint_published")
    assert audit.details["previous"] == v2["version"]


@pytest.mark.parametrize(
    ("break_it", "loc", "kind"),
    [
        (
            lambda d: d["stages"]["acknowledge"].update(then="nowhere"),
            ["body", "stages", "acknowledge", "then"],
            "unknown_stage",
        ),
        (
            lambda d: d["stages"]["acknowledge"]["do"][0].pop("roles"),
            ["body", "stages", "acknowledge", "do", 0, "task", "roles"],
            "task_actor",
        ),
    ],
    ids=["then-to-an-unknown-stage", "task-without-roles"],
)
async def test_a_broken_document_is_422_naming_the_path_and_the_current_version_stays(
    api: Api, sessions: async_sessionmaker, break_it, loc: list, kind: str
):
    broken = copy.deepcopy(seed())
    break_it(broken)
    r = await api.post(f"/definitions/{COMPLAINT}", "ada", json=broken)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc
    assert r.json()["detail"][0]["type"] == kind
    as_yaml = await _post(
        api, f"/definitions/{COMPLAINT}", "ada", yaml.safe_dump(broken, sort_keys=False)
    )
    assert as_yaml.status_code == 422, as_yaml.text
    assert _locs(as_yaml) == _locs(r)
    assert await _state(sessions, COMPLAINT) == (seed_version(), 1, 1)
    assert registry.get(COMPLAINT).version == seed_version()


async def test_a_document_of_another_process_is_422_naming_process(
    api: Api, sessions: async_sessionmaker
):
    r = await api.post(f"/definitions/{COMPLAINT}", "ada", json=leave_request())
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [
        {
            "type": "process_mismatch",
            "loc": ["body", "process"],
            "msg": "the document is of process 'leave_request', but it is published at "
            "/definitions/complaint",
        }
    ]
    assert await _state(sessions, COMPLAINT) == (seed_version(), 1, 1)
    assert await _state(sessions, LEAVE) == (None, 0, 0)


async def test_a_coded_process_types_name_is_409(api: Api, sessions: async_sessionmaker):
    document = leave_request() | {"process": "sales_order"}
    for url in ("/definitions/sales_order", "/definitions/sales_order/validate"):
        r = await api.post(url, "ada", json=document)
        assert r.status_code == 409, r.text
        assert "sales_order is a process type in code" in r.json()["detail"]
    async with sessions() as session:  # the store refuses it too (seeds, other callers)
        with pytest.raises(definitions.CodedProcessType):
            await definitions.publish(session, document, actor="ada", source=None)
    assert await _state(sessions, "sales_order") == (None, 0, 0)
    assert registry.get("sales_order").is_blueprint is False


async def test_only_an_admin_publishes_or_validates(api: Api, sessions: async_sessionmaker):
    for user in ("alice", "mike"):
        for url in (f"/definitions/{LEAVE}", f"/definitions/{LEAVE}/validate"):
            r = await api.post(url, user, json=leave_request())
            assert r.status_code == 403, r.text
    assert (await api.http.post(f"/definitions/{LEAVE}", json=leave_request())).status_code == 401
    assert await _state(sessions, LEAVE) == (None, 0, 0)
    assert LEAVE not in registry.PROCESS_TYPES


async def test_a_body_that_is_no_document_is_refused(api: Api):
    url = f"/definitions/{LEAVE}"
    bad_yaml = await _post(api, url, "ada", "stages: [")
    assert bad_yaml.status_code == 422, bad_yaml.text
    assert bad_yaml.json()["detail"][0]["type"] == "yaml"
    a_list = await _post(api, url, "ada", "- one\n- two\n")
    assert a_list.status_code == 422, a_list.text
    assert a_list.json()["detail"][0]["type"] == "not_a_mapping"
    bad_json = await _post(api, url, "ada", "{", "application/json")
    assert bad_json.status_code == 422, bad_json.text
    assert bad_json.json()["detail"][0]["type"] == "json_invalid"
    not_utf8 = await _post(api, url, "ada", b"process: \xff")
    assert not_utf8.status_code == 400, not_utf8.text
    form = await api.post(url, "ada", data={"process": LEAVE})
    assert form.status_code == 415, form.text
    assert LEAVE not in registry.PROCESS_TYPES


def _stale(session: AsyncSession, entity: type) -> None:
    """Make the session's first get of `entity` find nothing, as a replica that looked just
    before another one wrote it would."""
    real_get = session.get
    stale = [entity]

    async def get(cls, key, **kw):  # type: ignore[no-untyped-def]
        if cls in stale:
            stale.remove(cls)
            return None
        return await real_get(cls, key, **kw)

    session.get = get  # type: ignore[method-assign, assignment]


async def test_concurrent_publishes_of_the_same_content_by_two_replicas_are_one_version(
    sessions: async_sessionmaker,
):
    async with sessions() as other:
        theirs = await definitions.publish(other, leave_request(), actor="ada", source=None)
    async with sessions() as session:
        _stale(session, BlueprintVersion)  # its insert fails on the version's key: read back
        ours = await definitions.publish(session, leave_request(), actor="bob", source=None)
    assert (ours.version, ours.seq, ours.created) == (theirs.version, 1, False)
    assert (ours.made_current, ours.previous) == (False, theirs.version)
    assert await _state(sessions, LEAVE) == (theirs.version, 1, 1)


async def test_concurrent_first_publishes_of_a_process_by_two_replicas_both_count(
    sessions: async_sessionmaker,
):
    async with sessions() as other:
        theirs = await definitions.publish(other, leave_request(), actor="ada", source=None)
    async with sessions() as session:
        _stale(session, BlueprintCurrent)  # it saw no current version, then could not add one
        ours = await definitions.publish(
            session, leave_request("Leave, revised"), actor="bob", source=None
        )
    assert (ours.seq, ours.created, ours.made_current) == (2, True, True)
    assert ours.previous == theirs.version
    assert ours.diff == ['title changed: "Leave request" -> "Leave, revised"']
    assert await _state(sessions, LEAVE) == (ours.version, 2, 2)


async def test_fifty_stages_are_published(api: Api):
    r = await api.post("/definitions/long_chain", "ada", json=chain(50))
    assert r.status_code == 201, r.text
    served = (await api.get("/definitions/long_chain/versions/current", "alice")).json()
    assert len(served["document"]["stages"]) == 51


# ----------------------------------------------------------------------------- validate
async def test_validate_answers_errors_warnings_and_diff_and_writes_nothing(
    api: Api, sessions: async_sessionmaker
):
    url = f"/definitions/{COMPLAINT}/validate"
    changed = seed() | {"title": "Complaint, revised"}
    r = await api.post(url, "ada", json=changed)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["valid"] is True
    assert body["version"] == check.version_id(changed)
    assert body["current"] == seed_version()
    assert body["errors"] == []
    assert body["diff"] == ['title changed: "Customer complaint" -> "Complaint, revised"']
    same = (await _post(api, url, "ada", seed_text("complaint"))).json()
    assert (same["valid"], same["version"], same["diff"]) == (True, seed_version(), [])

    broken = copy.deepcopy(seed())
    broken["stages"]["acknowledge"]["then"] = "nowhere"
    broken["process"] = "other"
    bad = await api.post(url, "ada", json=broken)
    assert bad.status_code == 200, bad.text
    refused = bad.json()
    assert (refused["valid"], refused["version"], refused["diff"]) == (False, None, [])
    assert [(e["path"], e["type"]) for e in refused["errors"][:2]] == [
        ("process", "process_mismatch"),
        ("stages.acknowledge.then", "unknown_stage"),
    ]
    assert "no stage 'nowhere'" in refused["errors"][1]["message"]

    assert await _state(sessions, COMPLAINT) == (seed_version(), 1, 1)
    assert registry.get(COMPLAINT).version == seed_version()
    new = await api.post(
        f"/definitions/{LEAVE}/validate", "ada", json=leave_request(role="night-shift")
    )
    assert (new.json()["valid"], new.json()["current"], new.json()["diff"]) == (True, None, [])
    assert new.json()["warnings"] == [
        {
            "path": "stages.review.do.0.task.roles.0",
            "kind": "unknown_role",
            "message": "no one holds the role 'night-shift'",
        }
    ]
    assert await _state(sessions, LEAVE) == (None, 0, 0)
    assert LEAVE not in registry.PROCESS_TYPES


# ----------------------------------------------------------------------------- reading
async def test_each_version_is_served_as_canonical_json_and_as_yaml(api: Api):
    version = seed_version()
    r = await api.get(f"/definitions/{COMPLAINT}/versions/{version}", "alice")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["process"], body["version"], body["seq"], body["current"]) == (
        COMPLAINT,
        version,
        1,
        True,
    )
    assert json.dumps(body["document"], sort_keys=True, separators=(",", ":")) == (
        check.canonical_json(seed())
    )
    assert check.version_id(body["document"]) == version
    alias = await api.get(f"/definitions/{COMPLAINT}/versions/current", "alice")
    assert alias.json() == body
    served = await api.get(f"/definitions/{COMPLAINT}/versions/{version}/yaml", "alice")
    assert served.status_code == 200, served.text
    assert served.headers["content-type"].startswith("text/yaml")
    assert served.text == seed_text("complaint")  # the seed as it was published

    # published as JSON: its YAML is the canonical document's, the same version
    published = (await api.post(f"/definitions/{LEAVE}", "ada", json=leave_request())).json()
    as_yaml = await api.get(f"/definitions/{LEAVE}/versions/{published['version']}/yaml", "alice")
    assert as_yaml.status_code == 200, as_yaml.text
    assert check.version_id(check.load_yaml(as_yaml.text)) == published["version"]


async def test_unknown_processes_and_versions_are_404_naming_them(api: Api):
    other = seed_version("onboarding")
    cases = [
        ("/definitions/no_such_process", "no blueprint no_such_process"),
        ("/definitions/sales_order", "no blueprint sales_order"),
        ("/definitions/no_such_process/versions/current", "no blueprint no_such_process"),
        (
            f"/definitions/{COMPLAINT}/versions/sha256:0",
            f"blueprint {COMPLAINT} has no version sha256:0",
        ),
        (  # a version of another process
            f"/definitions/{COMPLAINT}/versions/{other}",
            f"blueprint {COMPLAINT} has no version {other}",
        ),
        (
            f"/definitions/{COMPLAINT}/versions/sha256:0/yaml",
            f"blueprint {COMPLAINT} has no version sha256:0",
        ),
    ]
    for url, detail in cases:
        r = await api.get(url, "alice")
        assert r.status_code == 404, (url, r.text)
        assert r.json()["detail"] == detail
    assert (await api.http.get("/definitions")).status_code == 401


async def _instance(
    session: AsyncSession, key: str, version: str, status: str, process: str = COMPLAINT
) -> None:
    at = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    session.add(
        ProcessInstance(
            workflow_id=f"{process}-{key}",
            process_type=process,
            business_key=key,
            definition_kind="blueprint",
            definition_version=version,
            stage="acknowledge" if status == "running" else "closed",
            status=status,
            requester="alice",
            started_at=at,
            stage_entered_at=at,
            updated_at=at,
        )
    )


async def test_the_instances_of_each_version_are_counted(api: Api, sessions: async_sessionmaker):
    v1 = seed_version()
    v2 = (
        await api.post(f"/definitions/{COMPLAINT}", "ada", json=seed() | {"title": "Revised"})
    ).json()["version"]
    async with sessions() as s:
        await _instance(s, "T-1", v1, "running")
        await _instance(s, "T-2", v1, "running")
        await _instance(s, "T-3", v1, "completed")
        await _instance(s, "T-4", v2, "running")
        await _instance(s, "T-5", v2, "cancelled")
        await _instance(s, "C-1", seed_version("onboarding"), "running", ONBOARDING)
        await s.commit()
    one = (await api.get(f"/definitions/{COMPLAINT}", "alice")).json()
    assert {v["seq"]: (v["running"], v["total"]) for v in one["versions"]} == {
        1: (2, 3),
        2: (1, 2),
    }
    listed = {d["process"]: d for d in (await api.get("/definitions", "alice")).json()}
    assert (listed[COMPLAINT]["running"], listed[ONBOARDING]["running"]) == (3, 1)
    version = (await api.get(f"/definitions/{COMPLAINT}/versions/{v1}", "alice")).json()
    assert (version["running"], version["total"], version["current"]) == (2, 3, False)


# ----------------------------------------------------------------------------- the registry
async def test_sync_registry_registers_what_another_replica_made_current(
    api: Api, sessions: async_sessionmaker
):
    r = await api.post(f"/definitions/{COMPLAINT}", "ada", json=seed() | {"title": "Revised"})
    v2 = r.json()["version"]
    # this replica still holds the first version, as one that did not publish v2 would
    async with sessions() as s:
        first = await s.get(BlueprintVersion, seed_version())
        assert first is not None
        registry.register(
            blueprint_process_type(definitions.blueprint_of(first), first.version, first.document)
        )
    assert registry.get(COMPLAINT).version == seed_version()
    async with sessions() as s:
        await definitions.sync_registry(s, ONBOARDING)  # another process: left as it is
        assert registry.get(COMPLAINT).version == seed_version()
        await definitions.sync_registry(s, COMPLAINT)
        assert not s.in_transaction()  # the transaction it began is ended
    assert registry.get(COMPLAINT).version == v2


async def test_openapi_documents_both_bodies_and_the_errors(api: Api):
    spec = (await api.http.get("/openapi.json")).json()
    publish = spec["paths"]["/definitions/{process}"]["post"]
    assert set(publish["requestBody"]["content"]) == {
        "application/json",
        "application/yaml",
        "text/yaml",
        "application/x-yaml",
    }
    assert {"200", "201", "403", "409", "415", "422"} <= set(publish["responses"])
    yaml_route = spec["paths"]["/definitions/{process}/versions/{version}/yaml"]["get"]
    assert "text/yaml" in yaml_route["responses"]["200"]["content"]
