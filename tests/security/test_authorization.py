"""The authorization matrix, generated from the app's route table: every endpoint and method
against bad credentials (401) and against a user of each demo role (403 or not), from one
explicit table of who each endpoint admits."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from core.settings import Settings
from scripts.seed import DEMO_PASSWORD
from tests.api.conftest import order_body
from tests.security.conftest import DEMO_ROLES, Api, bad_tokens, bearer, role_user
from tests.support import record_figure
from workflows.blueprint.check import load_yaml

PUBLIC = frozenset({"public"})  # no credentials needed
COMPLAINT = load_yaml((Path(__file__).parents[2] / "blueprints" / "complaint.yaml").read_text())
ANY = frozenset(DEMO_ROLES)  # any authenticated user

# Which roles each endpoint admits. Task endpoints act on a vice-president approval task of an
# order that the requester submitted; who may act on a task is decided by the workflow from
# its candidates, assignee and the manager role.
ADMITS: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,  # Prometheus: on an internal port (README, Metrics)
    ("POST", "/auth/token"): PUBLIC,
    ("GET", "/auth/me"): ANY,
    ("POST", "/orders"): frozenset({"requester", "sales", "manager"}),
    ("GET", "/orders"): ANY,
    ("GET", "/orders/search"): ANY,
    ("GET", "/orders/{order_no}"): ANY,  # requesters: their own
    ("POST", "/orders/{order_no}/amend"): frozenset({"requester", "sales", "manager"}),
    ("POST", "/orders/{order_no}/cancel"): frozenset({"requester", "manager"}),
    ("POST", "/orders/{order_no}/payments"): frozenset({"finance"}),
    ("GET", "/tasks"): ANY,
    ("GET", "/tasks/{task_id}"): ANY,  # requesters: tasks of their own orders
    ("POST", "/tasks/{task_id}/decision"): frozenset({"vice-president"}),  # the candidates
    ("POST", "/tasks/{task_id}/acknowledge"): frozenset({"vice-president"}),
    ("POST", "/tasks/{task_id}/claim"): frozenset({"vice-president"}),
    ("POST", "/tasks/{task_id}/release"): frozenset({"vice-president", "manager"}),  # assignee
    ("POST", "/tasks/{task_id}/delegate"): frozenset({"vice-president", "manager"}),
    ("POST", "/tasks/{task_id}/reassign"): frozenset({"manager"}),
    ("GET", "/policies/{process_type}"): ANY,
    ("GET", "/policies/{process_type}/versions"): ANY,
    ("POST", "/policies/{process_type}"): frozenset({"admin"}),
    ("GET", "/outbox"): frozenset({"admin"}),
    ("GET", "/process-types"): ANY,
    ("GET", "/process-types/{process_type}"): ANY,
    ("POST", "/processes/{process_type}"): frozenset({"requester", "sales", "manager"}),
    ("GET", "/processes"): ANY,
    ("GET", "/processes/{process_type}/{business_key}"): ANY,  # requesters: their own
    ("POST", "/processes/{process_type}/{business_key}/cancel"): frozenset(
        {"requester", "manager"}
    ),
    ("POST", "/processes/{process_type}/{business_key}/events/{event}"): frozenset({"finance"}),
    ("POST", "/processes/{process_type}/{business_key}/migrate"): frozenset({"admin"}),
    ("GET", "/definitions"): ANY,
    ("GET", "/definitions/{process}"): ANY,
    ("GET", "/definitions/{process}/versions/{version}"): ANY,
    ("GET", "/definitions/{process}/versions/{version}/yaml"): ANY,
    ("POST", "/definitions/{process}"): frozenset({"admin"}),
    ("POST", "/definitions/{process}/validate"): frozenset({"admin"}),
    # the codec server (payload encryption): operators only; /codec/session sets a cookie that
    # the client keeps, so it stays the last codec route (the routes' order is the matrix's)
    ("POST", "/codec/decode"): frozenset({"admin", "manager"}),
    ("POST", "/codec/encode"): frozenset({"admin", "manager"}),
    ("POST", "/codec/session"): frozenset({"admin", "manager"}),
}


def route_table(app: FastAPI) -> Iterator[tuple[str, str]]:
    """(method, path) of every route of app, routers included (HEAD aside)."""
    for route in app.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        routes = [c.original_route for c in contexts()] if contexts else [route]
        for r in routes:
            for method in sorted(getattr(r, "methods", None) or []):
                if method != "HEAD":
                    yield method, r.path  # type: ignore[attr-defined]


def test_the_matrix_lists_every_route(app: FastAPI):
    routes = set(route_table(app))
    assert routes == set(ADMITS), (
        f"not in the table: {routes - set(ADMITS)}; gone: {set(ADMITS) - routes}"
    )


@dataclass
class World:
    """Orders and tasks that the matrix acts on, one per endpoint that changes them."""

    order: str
    cancel_order: str
    tasks: dict[str, str]  # endpoint action -> task id
    policy: dict[str, Any]


async def _order(http, settings: Settings) -> tuple[str, str]:
    """An order of 1,200,000 by the requester; returns its number and its open task."""
    body = order_body(1_200_000)
    r = await http.post("/orders", json=body, headers=bearer(settings, role_user("requester")))
    assert r.status_code == 201, r.text
    return body["order_no"], r.json()["pending_tasks"][0]["task_id"]


def _request(
    method: str, path: str, w: World
) -> Callable[[], dict[str, Any]]:  # a fresh request for each cell
    order, task = w.order, w.tasks.get(path.rsplit("/", 1)[-1], w.tasks["decision"])
    url = path.format(
        order_no=order,
        task_id=task,
        process_type="sales_order",
        business_key=order,
        event="payment",
        process="complaint",  # a seed blueprint, published when the app starts
        version="current",
    )
    if path in ("/orders/{order_no}/cancel", "/processes/{process_type}/{business_key}/cancel"):
        url = path.format(
            order_no=w.cancel_order, process_type="sales_order", business_key=w.cancel_order
        )
    bodies: dict[str, Callable[[], dict[str, Any]]] = {
        "/auth/token": lambda: {"data": {"username": "alice", "password": DEMO_PASSWORD}},
        "/orders": lambda: {"json": order_body(100)},
        "/orders/{order_no}/amend": lambda: {"json": {"description": "matrix"}},
        "/orders/{order_no}/cancel": lambda: {"json": {"reason": "matrix"}},
        "/orders/{order_no}/payments": lambda: {
            "json": {"event_id": f"evt-{uuid.uuid4()}", "amount": "1.00"}
        },
        # an outcome the task does not offer: 422 once permitted, so the task stays open
        "/tasks/{task_id}/decision": lambda: {"json": {"outcome": "not-an-outcome"}},
        "/tasks/{task_id}/delegate": lambda: {"json": {"to_user": role_user("vice-president")}},
        "/tasks/{task_id}/reassign": lambda: {"json": {"to_user": None}},
        "/policies/{process_type}": lambda: {"json": {"document": w.policy, "note": "matrix"}},
        "/processes/{process_type}": lambda: {"json": order_body(100)},
        "/processes/{process_type}/{business_key}/cancel": lambda: {"json": {"reason": "matrix"}},
        "/processes/{process_type}/{business_key}/events/{event}": lambda: {
            "json": {"event_id": f"evt-{uuid.uuid4()}", "amount": "1.00"}
        },
        # the seed again: the same content, nothing changes (200)
        "/definitions/{process}": lambda: {"json": COMPLAINT},
        "/definitions/{process}/validate": lambda: {"json": COMPLAINT},
        # a coded type: 409 once permitted
        "/processes/{process_type}/{business_key}/migrate": lambda: {"json": {}},
        "/codec/decode": lambda: {"json": {"payloads": []}},
        "/codec/encode": lambda: {"json": {"payloads": []}},
    }
    key = path if method == "POST" else ""
    extra = bodies.get(key, dict)

    def build() -> dict[str, Any]:
        return {"method": method, "url": url, **extra()}

    return build


async def test_every_endpoint_refuses_bad_credentials_and_admits_exactly_its_roles(
    live_api: Api, app: FastAPI, settings: Settings, role_users: dict
):
    http = live_api.http
    order, t_decide = await _order(http, settings)
    cancel_order, _ = await _order(http, settings)
    tasks = {"decision": t_decide, "acknowledge": t_decide}
    for action in ("claim", "release", "delegate", "reassign"):
        tasks[action] = (await _order(http, settings))[1]
    r = await http.post(
        f"/tasks/{tasks['release']}/claim", headers=bearer(settings, role_user("vice-president"))
    )
    assert r.status_code == 200, r.text
    r = await http.get("/policies/sales_order", headers=bearer(settings, role_user("admin")))
    world = World(order, cancel_order, tasks, r.json()["document"])

    cells = 0
    wrong: list[str] = []
    for method, path in route_table(app):
        admits = ADMITS[(method, path)]
        build = _request(method, path, world)
        if admits is PUBLIC:
            r = await http.request(**build())
            cells += 1
            if r.status_code in (401, 403) or r.status_code >= 500:
                wrong.append(f"{method} {path} without credentials: {r.status_code}")
            continue
        for name, headers in bad_tokens(settings, role_user("admin")).items():
            r = await http.request(**build(), headers=headers)
            cells += 1
            if r.status_code != 401 or "Bearer" not in r.headers.get("www-authenticate", ""):
                wrong.append(f"{method} {path} with {name}: {r.status_code} {r.text[:120]}")
        # roles refused first, so that an admitted call cannot change what they would see
        for role in sorted(DEMO_ROLES, key=lambda role: role in admits):
            r = await http.request(**build(), headers=bearer(settings, role_user(role)))
            cells += 1
            expected = "not 401/403" if role in admits else "403"
            got_refused = r.status_code == 403
            if r.status_code == 401 or got_refused == (role in admits) or r.status_code >= 500:
                wrong.append(
                    f"{method} {path} as {role}: {r.status_code} (expected {expected}) "
                    f"{r.text[:160]}"
                )
    record_figure("authorization cells checked", cells)
    assert not wrong, "\n".join(wrong)
