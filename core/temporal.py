"""The only place a Temporal Client is made, always with the pydantic data converter (and the
payload codec of core.codec when payload encryption is configured)."""

from __future__ import annotations

import dataclasses
import logging
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
from temporalio.converter import DataConverter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from core.settings import Settings

log = logging.getLogger("procflow.temporal")

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


def data_converter(settings: Settings) -> DataConverter:
    """The pydantic data converter, with the payload codec of core.codec when the settings ask
    for one (payload_encryption on, or keys listed to decrypt what was written with them).
    PayloadKeyError (a ValueError naming the setting) when the key settings are invalid."""
    from core.codec import EncryptionCodec  # here: the workflows import this module's keys

    codec = EncryptionCodec.from_settings(settings)
    if codec is None:
        return pydantic_data_converter
    return dataclasses.replace(pydantic_data_converter, payload_codec=codec)


# one SDK runtime per metrics address: a runtime binds its Prometheus port once, for the process
_METRICS_RUNTIMES: dict[str, Runtime] = {}


def metrics_runtime(bind_address: str) -> Runtime:
    """The Temporal SDK runtime that serves the SDK's own metrics (workflow task and activity
    latencies, schedule-to-start, sticky cache, slots) in the Prometheus text format at
    http://<bind_address>/metrics, durations in seconds; one per address for the process.
    ValueError from the SDK when the address cannot be bound."""
    runtime = _METRICS_RUNTIMES.get(bind_address)
    if runtime is None:
        runtime = Runtime(
            telemetry=TelemetryConfig(
                metrics=PrometheusConfig(bind_address=bind_address, durations_as_seconds=True)
            )
        )
        _METRICS_RUNTIMES[bind_address] = runtime
    return runtime


async def connect(settings: Settings, *, metrics_address: str = "") -> Client:
    """A client with data_converter(settings); the key settings are checked before connecting.
    metrics_address (the worker passes PROCFLOW_WORKER_METRICS_ADDRESS): the client, and the
    workers built on it, report the SDK's metrics on that Prometheus endpoint (an address
    that cannot be bound is logged and the client runs without it, so a second worker on a
    host still starts); "": the default runtime, no endpoint."""
    converter = data_converter(settings)
    runtime = None
    if metrics_address:
        try:
            runtime = metrics_runtime(metrics_address)
        except ValueError as err:  # the address is taken (another worker on this host)
            log.warning(
                "Temporal SDK metrics not served at %s (%s): set PROCFLOW_WORKER_METRICS_ADDRESS "
                "to a free host:port for each worker on a host; running without them",
                metrics_address,
                err,
            )
    # here: the workflows import this module's keys, and the sandbox need not see OpenTelemetry
    from core.tracing import interceptors

    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=converter,
        runtime=runtime,
        # tracing on: the client's spans, and the worker's (a Worker takes them from its client)
        interceptors=interceptors(settings),
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
