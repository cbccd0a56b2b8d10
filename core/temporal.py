"""The only place a Temporal Client is made, always with the pydantic data converter."""

from __future__ import annotations

import re
from collections.abc import Mapping

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
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
# set once, at start: who submitted the instance (requesters' searches are limited to theirs)
REQUESTER = SearchAttributeKey.for_keyword("Requester")

SEARCH_ATTRIBUTES: dict[str, str] = {
    "ProcessType": "Keyword",
    "Stage": "Keyword",
    "CustomerId": "Keyword",
    "Amount": "Double",
    "PendingRoles": "KeywordList",
    "Requester": "Keyword",
}


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )


class SearchAttributeConflict(Exception):
    """A search attribute is registered with another type than this project needs."""


def indexed_value_type(kind: str) -> IndexedValueType.ValueType:
    """Map a CLI type name to the proto enum: KeywordList -> INDEXED_VALUE_TYPE_KEYWORD_LIST."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", kind).upper()
    return IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{snake}")


async def register_search_attributes(
    client: Client, wanted: Mapping[str, str] = SEARCH_ATTRIBUTES, *, check_existing: bool = True
) -> list[str]:
    """Add the search attributes the server lacks; returns the names added.

    A name registered with another type raises SearchAttributeConflict. The time-skipping test
    server has no ListSearchAttributes: pass check_existing=False there.
    """
    existing: Mapping[str, IndexedValueType.ValueType] = {}
    if check_existing:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
        existing = listed.custom_attributes
    missing: dict[str, IndexedValueType.ValueType] = {}
    for name, kind in wanted.items():
        expected = indexed_value_type(kind)
        have = existing.get(name)
        if have is None:
            missing[name] = expected
        elif have != expected:
            raise SearchAttributeConflict(
                f"search attribute {name} is registered as {IndexedValueType.Name(have)}, "
                f"expected {kind}"
            )
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )
    return sorted(missing)
