"""The edges the schema-driven fuzzer does not reach: JSON numbers no field can hold (NaN,
+-Infinity, 1e999, a 5,000-digit integer) anywhere in a body, control characters in query
strings, offsets past 64 bits. Each is a 422 naming the field, never a 5xx, and no answer
echoes a backend's message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from schemathesis import Case, GenerationMode
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from api import errors
from api.app import create_app
from core.settings import Settings
from tests.api.conftest import order_body
from tests.security.conftest import ROOT, Api, bearer, running
from tests.support import free_port, record_figure

MARKER = "__edge_value__"
# raw JSON texts that Python's json parses (to nan, inf or a huge int) but no field can hold
EDGE_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "1." + "5" * 80]
EDGE_TEXTS = ["a\x00b", "\x00", "x\ny", "a\u202eb", "\u200b", "a\x7fb"]
BASES_PER_OPERATION = 4


@pytest_asyncio.fixture
async def edge_api(settings: Settings, client: Client, role_users: dict) -> AsyncIterator[Api]:
    """The app without a worker (every edge is refused before Temporal), limits lifted."""
    app = create_app(
        settings.model_copy(
            update={"api_rate_limit_per_minute": 1_000_000, "api_auth_rate_limit_per_minute": 10**6}
        ),
        temporal_client=client,
    )
    async for a in running(app):
        yield a


def _raw(body: Any, literal: str) -> bytes:
    """body as JSON with the marker string replaced by a raw literal."""
    return json.dumps(body).replace(json.dumps(MARKER), literal).encode()


def _paths(value: Any, at: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every leaf of a JSON document (empty containers count as leaves)."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _paths(v, (*at, k))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from _paths(v, (*at, i))
    else:
        yield at


def _replaced(value: Any, path: tuple[str | int, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {k: (_replaced(v, rest, new) if k == head else v) for k, v in value.items()}
    return [_replaced(v, rest, new) if i == head else v for i, v in enumerate(value)]


def _json_cases(app: FastAPI) -> list[Case]:
    """A few valid generated requests per operation, the bases the edges are put into."""
    schema = schemathesis.openapi.from_dict(app.openapi())
    cases: list[Case] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @hsettings(
            max_examples=BASES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
        def collect(case: Case) -> None:
            cases.append(case)

        collect()
    return cases


def _body_edges(cases: list[Case]) -> list[tuple[Case, bytes, list[Any]]]:
    """(case, raw body, expected loc): each edge number once in a generated leaf, once as an
    unknown top-level field and once nested in a list."""
    from api.jsonbody import refused_number

    out: list[tuple[Case, bytes, list[Any]]] = []
    for n, case in enumerate(c for c in cases if isinstance(c.body, dict)):
        if refused_number(json.dumps(case.body).encode()) is not None:
            continue  # the base itself holds a refused number: its loc would come first
        leaves = list(_paths(case.body))
        for i, literal in enumerate(EDGE_NUMBERS):
            leaf = leaves[(n + i) % len(leaves)]
            out.append((case, _raw(_replaced(case.body, leaf, MARKER), literal), ["body", *leaf]))
            unknown = {**case.body, "zz_unknown": MARKER}
            out.append((case, _raw(unknown, literal), ["body", "zz_unknown"]))
            nested = {**case.body, "zz_nested": {"deep": [1, MARKER]}}
            out.append((case, _raw(nested, literal), ["body", "zz_nested", "deep", 1]))
    return out


def _query_edges(cases: list[Case]) -> list[tuple[Case, dict[str, Any], str]]:
    """(case, query, parameter): a control character in each generated query parameter."""
    out: list[tuple[Case, dict[str, Any], str]] = []
    for n, case in enumerate(c for c in cases if c.query):
        for i, name in enumerate(sorted(case.query)):
            text = EDGE_TEXTS[(n + i) % len(EDGE_TEXTS)]
            out.append((case, {**case.query, name: f"{case.query[name]}{text}"}, name))
    return out


async def test_generated_bodies_with_numbers_no_field_can_hold_are_422_at_their_path(
    edge_api: Api, settings: Settings
):
    app = edge_api.http._transport.app  # type: ignore[attr-defined]
    cases = await asyncio.to_thread(_json_cases, app)
    edges = _body_edges(cases)
    auth = bearer(settings, ROOT)
    operations = {(c.method, c.path) for c, _, _ in edges}
    assert ("POST", "/orders") in operations and ("POST", "/tasks/{task_id}/decision") in operations
    failures: list[str] = []
    for case, raw, loc in edges:
        record_figure("api cases generated", 1, add=True)
        r = await edge_api.http.request(
            case.method,
            case.formatted_path,
            content=raw,
            headers={**auth, "Content-Type": "application/json"},
        )
        detail = r.json().get("detail") if r.status_code == 422 else None
        if not (detail and detail[0]["loc"] == loc and detail[0]["type"] in _NUMBER_TYPES):
            failures.append(
                f"{case.method} {case.formatted_path} {raw[:160]!r} {loc} -> "
                f"{r.status_code} {r.text[:300]}"
            )
    assert len(edges) > 100
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:15])


_NUMBER_TYPES = ("finite_number", "number_too_long")


async def test_generated_query_strings_with_control_characters_are_422_naming_the_parameter(
    edge_api: Api, settings: Settings
):
    app = edge_api.http._transport.app  # type: ignore[attr-defined]
    cases = await asyncio.to_thread(_json_cases, app)
    edges = _query_edges(cases)
    auth = bearer(settings, ROOT)
    paths = {c.path for c, _, _ in edges}
    assert {"/orders", "/orders/search", "/tasks"} <= paths, paths
    failures: list[str] = []
    for case, query, name in edges:
        record_figure("api cases generated", 1, add=True)
        r = await edge_api.http.request(
            case.method, case.formatted_path, params=query, headers=auth
        )
        locs = [e["loc"] for e in r.json()["detail"]] if r.status_code == 422 else []
        if ["query", name] not in locs:
            failures.append(f"{case.formatted_path} {query!r} -> {r.status_code} {r.text[:300]}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:15])


# ------------------------------------------------------------------ the reported cases
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize(
    "field,loc",
    [
        ("known", ["body", "lines", 0, "unit_price"]),
        ("unknown", ["body", "surprise"]),
    ],
)
async def test_a_non_finite_number_in_an_order_is_422_naming_the_field(
    edge_api: Api, client: Client, settings: Settings, literal: str, field: str, loc: list
):
    body = order_body(100)
    if field == "known":
        body["lines"][0]["unit_price"] = MARKER
    else:
        body["surprise"] = MARKER
    r = await edge_api.http.post(
        "/orders",
        content=_raw(body, literal),
        headers={**bearer(settings, ROOT), "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc, r.text
    # without a content type FastAPI parses JSON too: so does the guard
    r = await edge_api.http.post(
        "/orders", content=_raw(body, literal), headers=bearer(settings, ROOT)
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, r.text


async def test_a_huge_integer_is_422_not_a_parse_error(edge_api: Api, settings: Settings):
    r = await edge_api.http.post(
        "/tasks/t1/decision",
        content=b'{"outcome": "approved", "fields": {"x": ' + b"7" * 6000 + b"}}",
        headers={**bearer(settings, ROOT), "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [
        {
            "type": "number_too_long",
            "loc": ["body", "fields", "x"],
            "msg": "numbers are limited to 40 characters",
        }
    ]


async def test_ordinary_numbers_and_form_bodies_pass_the_guard(edge_api: Api, settings: Settings):
    # a finite float in a JSON body reaches the model (which refuses the field by its own rule)
    r = await edge_api.http.post(
        "/orders/X1/payments",
        content=b'{"event_id": "e", "amount": -1.5e3}',
        headers={**bearer(settings, ROOT), "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "greater_than", r.text
    # a form body holding "NaN" is no JSON: the sign-in form is answered as before
    r = await edge_api.http.post("/auth/token", data={"username": "NaN", "password": "Infinity"})
    assert r.status_code == 401, r.text


@pytest.mark.parametrize("url", ["/orders", "/tasks"])
async def test_an_offset_past_64_bits_is_422(edge_api: Api, settings: Settings, url: str):
    for offset in ("9223372036854775808", "1000001"):
        r = await edge_api.http.get(url, params={"offset": offset}, headers=bearer(settings, ROOT))
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["query", "offset"]
    r = await edge_api.http.get(url, params={"offset": "1000000"}, headers=bearer(settings, ROOT))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "url,param",
    [
        ("/orders/search", "customer_id"),
        ("/orders", "customer_id"),
        ("/tasks", "business_key"),
        ("/tasks", "name"),
        ("/tasks", "kind"),
    ],
)
async def test_a_nul_in_a_search_value_is_422_and_echoes_no_backend(
    edge_api: Api, settings: Settings, url: str, param: str
):
    r = await edge_api.http.get(f"{url}?{param}=a%00b", headers=bearer(settings, ROOT))
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["query", param]
    assert error["type"] == "string_control_character"
    assert "sql" not in r.text.lower() and "visibility" not in r.text.lower()


# ------------------------------------------------------------------ nothing echoed
async def test_temporal_unreachable_answers_503_without_naming_its_address(db_url: str):
    port = free_port()
    settings = Settings(
        database_url=db_url,
        temporal_address=f"127.0.0.1:{port}",
        temporal_rpc_timeout_s=2.0,
    )
    async for api in running(create_app(settings)):
        r = await api.get("/orders/X1", "mike")
        assert r.status_code == 503, r.text
        assert r.json() == {"detail": "Temporal is unreachable"}
        assert str(port) not in r.text


async def test_a_database_that_refuses_connections_answers_503_without_its_error(
    settings: Settings, client: Client
):
    port = free_port()
    dead = settings.model_copy(
        update={"database_url": f"postgresql+asyncpg://procflow:x@127.0.0.1:{port}/procflow"}
    )
    async for api in running(create_app(dead, temporal_client=client)):
        r = await api.http.post("/auth/token", data={"username": "mike", "password": "demo"})
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"]
        assert str(port) not in r.text and "errno" not in r.text.lower(), r.text


async def test_an_error_answer_from_temporal_is_not_echoed(client: Client):
    # a real refusal of the real server: a visibility query it cannot parse
    with pytest.raises(RPCError) as caught:
        query = "ProcessType = 'sales_order' AND CustomerId = 'a\x00b'"
        async for _ in client.list_workflows(query):
            pass
    err = caught.value
    assert err.message
    response = errors._rpc_error(err)
    detail = json.loads(bytes(response.body))["detail"]
    assert err.message not in detail and "SQL" not in detail, detail
    assert response.status_code in (409, 502, 503), detail


def test_an_exception_the_sdk_wrapped_is_not_echoed_but_a_business_refusal_is():
    wrapped = ApplicationError(
        "(sqlite3.OperationalError) no such table: orders [SQL: SELECT ...]",
        type="OperationalError",
    )
    response = errors._application_error(wrapped)
    assert response.status_code == 409
    assert json.loads(bytes(response.body)) == {"detail": errors.PROCESS_REFUSED}
    refusal = ApplicationError("the order is shipped", type="NotCancellable", non_retryable=True)
    assert json.loads(bytes(errors._application_error(refusal).body)) == {
        "detail": "the order is shipped"
    }
