"""Policy documents: read the current version, publish validated versions (admin only)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from scripts.seed import seed
from tests.api.conftest import Api
from tests.api.test_process_types import TINY, TINY_TYPE
from workflows import registry
from workflows.policy import PolicyModel, default_policy_document
from workflows.registry import ProcessType


class TinyPolicy(PolicyModel):
    """A policy of the tests' own process type: one key, checked by its own model."""

    review_days: int = 3


# the tiny type of test_process_types (which has no policy), with a policy of its own
TINY_WITH_POLICY = replace(TINY_TYPE, policy_model=TinyPolicy)


async def test_seeded_policy_is_version_1_and_matches_the_defaults(api: Api):
    r = await api.get("/policies/sales_order", "alice")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1
    assert body["document"] == default_policy_document("sales_order")


async def test_unknown_process_type_is_404(api: Api):
    r = await api.get("/policies/no_such_process", "alice")
    assert r.status_code == 404


async def test_admin_publishes_the_next_version(api: Api):
    doc = default_policy_document("sales_order")
    doc["loyalty_discount_pct"] = "7.5"
    r = await api.post("/policies/sales_order", "ada", json={"document": doc, "note": "7.5%"})
    assert r.status_code == 201, r.text
    assert r.json() == {"process_type": "sales_order", "version": 2}
    current = (await api.get("/policies/sales_order", "alice")).json()
    assert current["version"] == 2
    assert current["published_by"] == "ada"
    assert current["document"]["loyalty_discount_pct"] == "7.5"
    versions = (await api.get("/policies/sales_order/versions", "alice")).json()
    assert [v["version"] for v in versions] == [2, 1]


async def test_invalid_policy_is_422_with_document_locations(api: Api):
    doc = {"approval_tiers": [{"min_amount": -1, "name": "x", "roles": []}], "bogus": 1}
    r = await api.post("/policies/sales_order", "ada", json={"document": doc})
    assert r.status_code == 422, r.text
    fields = {e["field"] for e in r.json()["detail"]}
    assert {
        "document.approval_tiers.0.min_amount",
        "document.approval_tiers.0.roles",
        "document.bogus",
    } <= fields
    for e in r.json()["detail"]:
        assert e["loc"][:2] == ["body", "document"]
    # nothing was stored
    assert (await api.get("/policies/sales_order", "alice")).json()["version"] == 1


async def test_only_admins_publish(api: Api):
    r = await api.post("/policies/sales_order", "mike", json={"document": {}})
    assert r.status_code == 403
    assert r.json()["detail"] == "requires one of the roles: admin"


def _fields(r) -> set[str]:
    assert r.status_code == 422, r.text
    for e in r.json()["detail"]:
        assert e["loc"][:2] == ["body", "document"]
    return {e["field"] for e in r.json()["detail"]}


async def test_publishing_an_empty_document_is_422_naming_every_missing_key(api: Api):
    r = await api.post("/policies/sales_order", "ada", json={"document": {}})
    expected = {f"document.{key}" for key in default_policy_document("sales_order")}
    assert _fields(r) == expected
    assert {e["msg"] for e in r.json()["detail"]} == {"Field required"}
    current = (await api.get("/policies/sales_order", "alice")).json()
    assert current["version"] == 1


async def test_publishing_a_document_missing_a_nested_key_is_422_naming_it(api: Api):
    doc = default_policy_document("sales_order")
    del doc["approval_timers"]["deadline"]
    r = await api.post("/policies/sales_order", "ada", json={"document": doc})
    assert _fields(r) == {"document.approval_timers.deadline"}


def _broken(**changes) -> dict:
    doc = default_policy_document("sales_order")
    for path, value in changes.items():
        target = doc
        *parents, last = path.split("__")
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value
    return doc


@pytest.mark.parametrize(
    "doc, fields",
    [
        (
            _broken(payment_reminder_after="P20D", payment_deadline="P14D"),
            {"document.payment_reminder_after"},
        ),
        (_broken(approval_timers__deadline="P3000000D"), {"document.approval_timers.deadline"}),
        (
            _broken(
                approval_timers__remind_after="-P3D",
                approval_timers__escalate_after="-P2D",
                approval_timers__deadline="-P1D",
            ),
            {
                "document.approval_timers.remind_after",
                "document.approval_timers.escalate_after",
                "document.approval_timers.deadline",
            },
        ),
        (_broken(payment_deadline="PT0S"), {"document.payment_deadline"}),
        (
            _broken(approval_timers__escalation_role="", approval_tiers__0__roles=["cfo"]),
            {"document.approval_timers.escalation_role", "document.approval_tiers.0.roles.0"},
        ),
        (
            _broken(special_change_roles=["inspection", "inspection"]),
            {"document.special_change_roles.1"},
        ),
        (_broken(approval_tiers__1__min_amount="500000"), {"document.approval_tiers.1.min_amount"}),
        (
            _broken(approval_tiers__0__min_amount="2000000"),
            {"document.approval_tiers.1.min_amount"},
        ),
        (_broken(approval_tiers__0__name="x" * 101), {"document.approval_tiers.0.name"}),
        (_broken(currencies=["EUR", "XYZ"]), {"document.currencies.1"}),
    ],
    ids=[
        "payment-reminder-after-deadline",
        "deadline-overflows",
        "negative-timers",
        "zero-duration",
        "unknown-and-empty-roles",
        "role-twice",
        "duplicate-threshold",
        "tiers-out-of-order",
        "tier-name-too-long",
        "unknown-currency",
    ],
)
async def test_a_policy_that_would_break_instances_is_422_and_the_current_version_stays(
    api: Api, doc: dict, fields: set[str]
):
    good = default_policy_document("sales_order")
    good["loyalty_discount_pct"] = "6"
    r = await api.post("/policies/sales_order", "ada", json={"document": good})
    assert r.status_code == 201, r.text
    r = await api.post("/policies/sales_order", "ada", json={"document": doc})
    assert _fields(r) == fields
    current = (await api.get("/policies/sales_order", "alice")).json()
    assert current["version"] == 2
    assert current["document"] == good
    versions = (await api.get("/policies/sales_order/versions", "alice")).json()
    assert [v["version"] for v in versions] == [2, 1]


@contextmanager
def _registered(process_type: ProcessType) -> Iterator[ProcessType]:
    registry.register(process_type)
    try:
        yield process_type
    finally:
        registry.unregister(process_type.name)


async def test_a_registered_type_without_a_policy_is_404_saying_so(api: Api):
    with _registered(replace(TINY_TYPE, name="tiny_no_policy", policy_model=None)):
        for r in (
            await api.get("/policies/tiny_no_policy", "alice"),
            await api.get("/policies/tiny_no_policy/versions", "alice"),
            await api.post("/policies/tiny_no_policy", "ada", json={"document": {}}),
        ):
            assert r.status_code == 404, r.text
            assert r.json()["detail"] == "process type tiny_no_policy has no policy"


async def test_a_registered_types_policy_is_served_checked_and_published(api: Api):
    with _registered(TINY_WITH_POLICY):
        r = await api.get(f"/policies/{TINY}", "alice")
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["document"]) == (0, {"review_days": 3})
        r = await api.post(f"/policies/{TINY}", "ada", json={"document": {}})
        assert _fields(r) == {"document.review_days"}  # strict: every key, by its own model
        bad = {"review_days": "soon"}
        assert _fields(await api.post(f"/policies/{TINY}", "ada", json={"document": bad})) == {
            "document.review_days"
        }
        r = await api.post(f"/policies/{TINY}", "ada", json={"document": {"review_days": 5}})
        assert r.status_code == 201, r.text
        assert r.json() == {"process_type": TINY, "version": 1}
        current = (await api.get(f"/policies/{TINY}", "alice")).json()
        assert (current["version"], current["document"]) == (1, {"review_days": 5})
    # the sales order's policy is its own
    assert (await api.get("/policies/sales_order", "alice")).json()["version"] == 1


async def test_the_seed_publishes_version_1_of_every_registered_types_policy(
    api: Api, sessions: async_sessionmaker
):
    with _registered(TINY_WITH_POLICY):
        added = await seed(sessions)
        assert added["policies"] == 1  # the sales order's was seeded already
        current = (await api.get(f"/policies/{TINY}", "alice")).json()
        assert (current["version"], current["published_by"]) == (1, "system")
        assert current["document"] == TINY_WITH_POLICY.default_policy() == {"review_days": 3}
        assert (await seed(sessions))["policies"] == 0
