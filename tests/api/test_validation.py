"""Request bodies are validated before anything reaches Temporal; unknown fields are refused."""

from __future__ import annotations

import pytest
from temporalio.service import RPCError, RPCStatusCode

from tests.api.conftest import Api, order_body
from workflows.sales_order import sales_order_workflow_id


async def _assert_not_started(client, order_no: str) -> None:
    with pytest.raises(RPCError) as err:
        await client.get_workflow_handle(sales_order_workflow_id(order_no)).describe()
    assert err.value.status == RPCStatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "change,loc",
    [
        pytest.param({"requester": "victor"}, ["body", "requester"], id="requester-in-body"),
        pytest.param({"status": "closed"}, ["body", "status"], id="status-in-body"),
        pytest.param({"actor": {"username": "x"}}, ["body", "actor"], id="actor-in-body"),
        pytest.param({"lines": []}, ["body", "lines"], id="no-lines"),
        pytest.param({"currency": "euro"}, ["body", "currency"], id="bad-currency"),
        pytest.param({"installments": ["50", "40"]}, ["body", "installments"], id="not-100"),
        pytest.param({"order_no": "has space"}, ["body", "order_no"], id="bad-order-no"),
        pytest.param(
            {"lines": [{"sku": "SKU-MUG", "quantity": "0", "unit_price": "1"}]},
            ["body", "lines", 0, "quantity"],
            id="zero-quantity",
        ),
    ],
)
async def test_bad_order_body_is_422_naming_the_field_and_starts_nothing(
    api: Api, client, change: dict, loc: list
):
    body = order_body(**change)
    r = await api.post("/orders", "alice", json=body)
    assert r.status_code == 422, r.text
    assert [e["loc"][: len(loc)] for e in r.json()["detail"]].count(loc) >= 1, r.text
    await _assert_not_started(client, body["order_no"])


@pytest.mark.parametrize(
    "url,body,field",
    [
        ("/orders/X1/amend", {"description": "x", "actor": {"username": "mike"}}, "actor"),
        ("/orders/X1/cancel", {"reason": "x", "requester": "mike"}, "requester"),
        ("/orders/X1/cancel", {}, "reason"),
        ("/tasks/t1/decision", {"outcome": "approved", "actor": {"username": "v"}}, "actor"),
        ("/tasks/t1/delegate", {"comment": "x"}, "to_user"),
    ],
)
async def test_action_bodies_refuse_unknown_and_missing_fields(
    api: Api, url: str, body: dict, field: str
):
    r = await api.post(url, "mike", json=body)
    assert r.status_code == 422, r.text
    assert ["body", field] in [e["loc"] for e in r.json()["detail"]]


async def test_list_filters_are_validated(api: Api):
    r = await api.get("/orders", "mike", params={"limit": 500})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "limit"]
    r = await api.get("/orders", "mike", params={"stage": "nonsense"})
    assert r.status_code == 422
