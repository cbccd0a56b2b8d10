"""The only place a Temporal Client is made, always with the pydantic data converter."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter

from core.settings import Settings

# Search attributes this project keeps current on every instance (registered at server start).
PROCESS_TYPE = SearchAttributeKey.for_keyword("ProcessType")
STAGE = SearchAttributeKey.for_keyword("Stage")
CUSTOMER_ID = SearchAttributeKey.for_keyword("CustomerId")
AMOUNT = SearchAttributeKey.for_float("Amount")
PENDING_ROLES = SearchAttributeKey.for_keyword_list("PendingRoles")

SEARCH_ATTRIBUTES: dict[str, str] = {
    "ProcessType": "Keyword",
    "Stage": "Keyword",
    "CustomerId": "Keyword",
    "Amount": "Double",
    "PendingRoles": "KeywordList",
}


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )


async def register_search_attributes(client: Client, *, check_existing: bool = True) -> None:
    """Register this project's search attributes where the server does not do it at start.

    The time-skipping test server has no ListSearchAttributes: pass check_existing=False.
    """
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import (
        AddSearchAttributesRequest,
        ListSearchAttributesRequest,
    )

    existing: set[str] = set()
    if check_existing:
        resp = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
        existing = set(resp.custom_attributes)
    missing = {
        name: IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{_SNAKE[type_]}")
        for name, type_ in SEARCH_ATTRIBUTES.items()
        if name not in existing
    }
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )


_SNAKE = {"Keyword": "KEYWORD", "Double": "DOUBLE", "KeywordList": "KEYWORD_LIST",
          "Int": "INT", "Text": "TEXT", "Bool": "BOOL", "Datetime": "DATETIME"}
