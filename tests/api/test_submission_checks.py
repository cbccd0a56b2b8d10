"""What an instance would refuse later is refused at submission: a currency that is no ISO 4217
code or that the current sales-order policy does not accept, a SKU the catalog lacks. Each is a
422 naming the field, and nothing is started."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from core.db import PolicyVersion
from tests.api.conftest import Api, order_body
from workflows.sales_order import sales_order_workflow_id


async def _assert_not_started(client: Client, order_no: str) -> None:
    with pytest.raises(RPCError) as err:
        await client.get_workflow_handle(sales_order_workflow_id(order_no)).describe()
    assert err.value.status == RPCStatusCode.NOT_FOUND


async def _refused(api: Api, client: Client, body: dict) -> list[dict]:
    r = await api.post("/orders", "alice", json=body)
    assert r.status_code == 422, r.text
    await _assert_not_started(client, body["order_no"])
    return r.json()["detail"]


async def test_a_currency_that_is_no_iso_4217_code_is_422(api: Api, client: Client):
    detail = await _refused(api, client, order_body(100, currency="XYZ"))
    assert detail == [
        {
            "type": "currency_unknown",
            "loc": ["body", "currency"],
            "msg": "XYZ is not an ISO 4217 currency code",
        }
    ]


async def test_a_currency_the_current_policy_does_not_accept_is_422(
    api: Api, client: Client, sessions: async_sessionmaker
):
    # JPY is ISO 4217 but not among the built-in policy's currencies
    detail = await _refused(api, client, order_body(100, currency="JPY"))
    assert [(e["loc"], e["type"]) for e in detail] == [
        (["body", "currency"], "currency_not_accepted")
    ]
    assert "EUR" in detail[0]["msg"]
    # a newer policy version narrows the list: USD, accepted by the seeded one, is refused
    async with sessions() as session:
        session.add(
            PolicyVersion(
                process_type="sales_order",
                version=99,
                document={"currencies": ["EUR"]},
                published_by="ada",
            )
        )
        await session.commit()
    detail = await _refused(api, client, order_body(100, currency="USD"))
    assert detail[0]["loc"] == ["body", "currency"]
    assert detail[0]["msg"] == "orders are accepted in EUR, not USD"


async def test_every_line_with_a_sku_the_catalog_lacks_is_422_naming_the_line(
    api: Api, client: Client
):
    lines = [
        {"sku": "SKU-PRINTER", "quantity": "1", "unit_price": "10"},
        {"sku": "SKU-NOPE", "quantity": "1", "unit_price": "10"},
        {"sku": "SKU-MUG", "quantity": "1", "unit_price": "10"},
        {"sku": "sku-printer", "quantity": "1", "unit_price": "10"},
    ]
    detail = await _refused(api, client, order_body(100, lines=lines))
    assert [e["loc"] for e in detail] == [["body", "lines", 1, "sku"], ["body", "lines", 3, "sku"]]
    assert {e["type"] for e in detail} == {"sku_unknown"}
    assert detail[0]["msg"] == "no catalog item SKU-NOPE"


async def test_currency_and_sku_errors_come_in_one_answer(api: Api, client: Client):
    lines = [{"sku": "SKU-NOPE", "quantity": "1", "unit_price": "10"}]
    detail = await _refused(api, client, order_body(100, currency="ZZZ", lines=lines))
    assert [e["loc"] for e in detail] == [["body", "currency"], ["body", "lines", 0, "sku"]]


async def test_the_models_submission_checks_run_at_submission_and_answer_422(
    api: Api, client: Client
):
    # workflows.sales_order.submission: checks that run for new orders only (a bidi override in
    # a name); its ValidationError is a 422 naming the field, not a 500
    body = order_body(100)
    body["customer"]["company_name"] = "ACME \u202eLtd"
    detail = await _refused(api, client, body)
    assert [e["loc"] for e in detail] == [["body", "customer", "company_name"]]
    assert "input" not in detail[0]
