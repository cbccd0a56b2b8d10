"""Policy documents: read the current version, publish validated versions (admin only)."""

from __future__ import annotations

from tests.api.conftest import Api
from workflows.policy import default_policy_document


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
