"""Property-based testing of every endpoint against the app's own OpenAPI schema (schemathesis):
no 5xx, every status code documented, every body and header as documented."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest_asyncio
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from temporalio.client import Client

from api.app import create_app
from core.settings import Settings
from tests.security.conftest import ROOT, Api, bearer, running
from tests.support import record_figure

EXAMPLES_PER_OPERATION = 12  # per generation mode: positive and negative data
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest_asyncio.fixture
async def fuzz_api(
    settings: Settings, client: Client, worker: None, role_users: dict
) -> AsyncIterator[Api]:
    """The app with the worker, its rate limits out of the way of the fuzzer."""
    app = create_app(
        settings.model_copy(
            update={"api_rate_limit_per_minute": 1_000_000, "api_auth_rate_limit_per_minute": 10**6}
        ),
        temporal_client=client,
    )
    async for a in running(app):
        yield a


def generate_cases(app: FastAPI) -> list[Case]:
    """Cases for every operation of the app's schema, positive and negative, reproducibly."""
    schema = schemathesis.openapi.from_dict(app.openapi())
    cases: list[Case] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hsettings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def collect(case: Case) -> None:
                cases.append(case)

            try:
                collect()
            except Unsatisfiable:  # nothing to break in an operation without parameters
                assert mode is GenerationMode.NEGATIVE
    return cases


def _request_kwargs(case: Case, auth: dict[str, str]) -> dict:
    kw = case.as_transport_kwargs(base_url="http://test", headers=auth)
    kw.pop("cookies", None)
    data = kw.pop("data", None)
    if isinstance(data, bytes | str):
        kw["content"] = data
    elif data is not None:
        kw["data"] = data
    return kw


async def test_every_endpoint_answers_as_documented_to_generated_requests(
    fuzz_api: Api, settings: Settings
):
    app = fuzz_api.http._transport.app  # type: ignore[attr-defined]
    started = time.monotonic()
    cases = await asyncio.to_thread(generate_cases, app)
    auth = bearer(settings, ROOT)
    failures: list[str] = []
    server_errors = 0
    for case in cases:
        kw = _request_kwargs(case, auth)
        record_figure("api cases generated", 1, add=True)
        try:
            response = await fuzz_api.http.request(**kw)
        except Exception as err:  # noqa: BLE001 - an unhandled exception is a 500
            server_errors += 1
            failures.append(f"{case.method} {case.formatted_path} body={case.body!r:.200}: {err!r}")
            continue
        if response.status_code >= 500 and response.status_code != 503:
            server_errors += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as err:  # every failure is collected and reported
            failures.append(
                f"{case.method} {case.formatted_path} query={case.query} body={case.body!r:.200}"
                f" -> {response.status_code} {response.text[:300]}\n{err}"
            )
    record_figure("api 5xx seen", server_errors)
    record_figure("api fuzzing seconds", round(time.monotonic() - started, 1))
    assert len(cases) > 100
    assert server_errors == 0
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures[:15])
