"""Property: no policy document the validator accepts can break a sales order instance.

Generated documents, valid-looking and hostile (zero, negative and huge durations, timers out
of order, unknown and empty roles, odd tiers and thresholds, bad currencies, missing and unknown
keys), go through `validate_policy(..., strict=True)` as `POST /policies/sales_order` does.
Every accepted one is stored as the API stores it and loaded by real sales order instances on
the time-skipping server: an order that needs the whole approval chain and a prepaid order with
a special change. Each must reach its waiting state, run through its timers to the end, and
never fail a workflow task.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.models import PolicyDocument
from core.roles import KNOWN_ROLES
from workflows.approval import approval_chain
from workflows.human_task import Actor
from workflows.policy import (
    ISO_4217_CODES,
    MAX_AMOUNT,
    MAX_DURATION,
    MIN_DURATION,
    SalesOrderPolicy,
    validate_policy,
)
from workflows.sales_order import (
    AmendInput,
    OrderLine,
    SalesOrderInput,
    SalesOrderStatus,
    SalesOrderWorkflow,
    Stage,
    TaskView,
)

from .conftest import order, start_time_skipping

T = TypeVar("T")
ROLES = sorted(KNOWN_ROLES)
CODES = sorted(ISO_4217_CODES)
TIMER_KEYS = ("remind_after", "escalate_after", "deadline")
# the most harmful first: hypothesis draws early entries more often
DURATION_PATHS: list[tuple[str, ...]] = [("payment_deadline",), ("payment_reminder_after",)]
DURATION_PATHS += [
    (t, k) for k in reversed(TIMER_KEYS) for t in ("approval_timers", "acknowledgement_timers")
]
ROLE_PATHS = [
    ("approval_timers", "escalation_role"),
    ("acknowledgement_timers", "escalation_role"),
    ("special_change_roles", 0),
]
HOSTILE_DURATIONS = [
    "-P3D",
    "PT0S",
    "P3000000D",
    0,
    -1,
    "-PT1S",
    "PT0.5S",
    "P367D",
    "P366DT1S",
    "P9999999999D",
    1e300,
    float("inf"),
    float("nan"),
    "soon",
    None,
    [],
    True,
]
HOSTILE_ROLES = ["", " ", "cfo", "Manager", "manager ", "x" * 300, None, 7, ["manager"]]
HOSTILE_NAMES = ["", "   ", "x" * 101, "vp\x00", "a\nb", None, 5]
HOSTILE_AMOUNTS = ["-1", "-0.01", "0.001", "1e15", "100000000000000.01", "NaN", "Infinity", None]
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)

VALUE_MUTATIONS = [
    "payment_order",
    "duration",
    "duration_order",
    "role",
    "tier_role",
    "tier_name",
    "tier_amount",
    "tier_order",
    "tier_k",
    "too_many_tiers",
    "currency",
]

# ----------------------------------------------------------------------------- strategies
seconds = st.integers(
    min_value=int(MIN_DURATION.total_seconds()), max_value=int(MAX_DURATION.total_seconds())
)


def _iso(s: int) -> str:
    return f"PT{s}S"


@st.composite
def timers(draw) -> dict:
    a, b, c = sorted(draw(st.lists(seconds, min_size=3, max_size=3, unique=True)))
    if draw(st.booleans()):
        b = c  # escalation at the deadline, as the payment task does
    return {
        "remind_after": _iso(a),
        "escalate_after": _iso(b),
        "deadline": _iso(c),
        "escalation_role": draw(st.sampled_from(ROLES)),
    }


role_lists = st.lists(st.sampled_from(ROLES), min_size=1, max_size=4, unique=True)
names = st.text(st.characters().filter(str.isprintable), min_size=1, max_size=100).filter(str.strip)
amounts = st.decimals(min_value=0, max_value=MAX_AMOUNT, places=2, allow_nan=False)


@st.composite
def tiers(draw) -> list[dict]:
    thresholds = sorted(draw(st.lists(amounts, max_size=4, unique=True)))
    out = []
    for threshold in thresholds:
        roles = draw(role_lists)
        mode = draw(st.sampled_from(["sequential", "all", "k_of_n"]))
        tier: dict[str, Any] = {
            "min_amount": str(threshold),
            "name": draw(names),
            "roles": roles,
            "mode": mode,
        }
        if mode == "k_of_n":
            tier["k"] = draw(st.integers(min_value=1, max_value=len(roles)))
        elif draw(st.booleans()):
            tier["k"] = None
        out.append(tier)
    return out


@st.composite
def valid_documents(draw) -> dict:
    reminder, deadline = sorted(draw(st.lists(seconds, min_size=2, max_size=2, unique=True)))
    return {
        "approval_tiers": draw(tiers()),
        "prepaid_exempt_from_approval": draw(st.booleans()),
        "loyalty_discount_pct": str(draw(st.decimals(min_value=0, max_value=100, places=2))),
        "approval_timers": draw(timers()),
        "acknowledgement_timers": draw(timers()),
        "special_change_roles": draw(role_lists),
        "payment_deadline": _iso(deadline),
        "payment_reminder_after": _iso(reminder),
        "currencies": draw(st.lists(st.sampled_from(CODES), min_size=1, max_size=5, unique=True)),
        "max_open_special_changes": draw(st.integers(min_value=1, max_value=20)),
        "max_actions_per_task": draw(st.integers(min_value=1, max_value=10_000)),
        "overpayment": draw(st.sampled_from(["refund", "finance_task"])),
    }


def _plus(roles: list, role: object) -> list:
    return [*roles, role]


def _set(doc: dict, path: tuple, value: object) -> None:
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


@st.composite
def hostile_documents(draw) -> dict:
    """A valid-looking document with one to three values broken (or, by chance, not), and
    perhaps a key missing, unknown or of any type."""
    doc = copy.deepcopy(draw(valid_documents()))
    for kind in draw(st.lists(st.sampled_from(VALUE_MUTATIONS), min_size=1, max_size=3)):
        tiers_ = doc["approval_tiers"]
        if kind == "duration":
            _set(
                doc, draw(st.sampled_from(DURATION_PATHS)), draw(st.sampled_from(HOSTILE_DURATIONS))
            )
        elif kind == "duration_order":
            t = doc[draw(st.sampled_from(["approval_timers", "acknowledgement_timers"]))]
            a, b = draw(st.sampled_from([(0, 1), (1, 2), (0, 2)]))
            t[TIMER_KEYS[a]], t[TIMER_KEYS[b]] = t[TIMER_KEYS[b]], t[TIMER_KEYS[a]]
        elif kind == "payment_order":
            doc["payment_reminder_after"], doc["payment_deadline"] = (
                doc["payment_deadline"],
                doc["payment_reminder_after"],
            )
        elif kind == "role":
            _set(doc, draw(st.sampled_from(ROLE_PATHS)), draw(st.sampled_from(HOSTILE_ROLES)))
        elif kind == "tier_role" and tiers_:
            tier = draw(st.sampled_from(tiers_))
            tier["roles"] = draw(
                st.one_of(
                    st.just([]),
                    st.just(tier["roles"] + tier["roles"][:1]),  # a role twice
                    st.just(ROLES + ["manager"]),  # 11 roles
                    st.sampled_from(HOSTILE_ROLES).map(partial(_plus, tier["roles"])),
                )
            )
        elif kind == "tier_name" and tiers_:
            draw(st.sampled_from(tiers_))["name"] = draw(st.sampled_from(HOSTILE_NAMES))
        elif kind == "tier_amount" and tiers_:
            draw(st.sampled_from(tiers_))["min_amount"] = draw(st.sampled_from(HOSTILE_AMOUNTS))
        elif kind == "tier_order" and tiers_:
            if len(tiers_) > 1 and draw(st.booleans()):
                tiers_.reverse()
            else:
                tiers_.append({**copy.deepcopy(tiers_[-1]), "name": "same threshold"})
        elif kind == "tier_k" and tiers_:
            tier = draw(st.sampled_from(tiers_))
            tier["k"] = draw(st.sampled_from([0, -1, len(tier["roles"]) + 1, 11, 1, None, "2"]))
        elif kind == "too_many_tiers":
            doc["approval_tiers"] = [
                {"min_amount": str(1000 * (i + 1)), "name": f"t{i}", "roles": ["manager"]}
                | {"mode": "sequential", "k": None}
                for i in range(draw(st.integers(min_value=10, max_value=12)))
            ]
        elif kind == "currency":
            doc["currencies"] = draw(
                st.sampled_from(
                    [[], ["eur"], ["XYZ"], ["EUR", "EUR"], CODES[:21], CODES[:20], ["", "EUR"]]
                )
            )
    shape = draw(st.sampled_from([None, "missing_key", "missing_nested_key", "unknown_key", "any"]))
    if shape == "missing_key":
        del doc[draw(st.sampled_from(sorted(doc)))]
    elif shape == "missing_nested_key":
        del doc[draw(st.sampled_from(["approval_timers", "acknowledgement_timers"]))]["deadline"]
    elif shape == "unknown_key":
        doc[draw(st.sampled_from(["bogus", "approval_tier", "Payment_deadline"]))] = 1
    elif shape == "any":
        doc[draw(st.sampled_from(sorted(doc)))] = draw(ANY_VALUE)
    return doc


documents = st.one_of(valid_documents(), hostile_documents())


def _accepted(document: dict) -> SalesOrderPolicy | None:
    """The policy publishing makes of document, None if it is refused (only ValidationError
    may refuse it: anything else would be a 500 of the API)."""
    try:
        policy = validate_policy("sales_order", document, strict=True)
    except ValidationError:
        event("refused")
        return None
    event("accepted")
    assert isinstance(policy, SalesOrderPolicy)
    return policy


# ----------------------------------------------------------------------------- the validator
@settings(max_examples=300, deadline=None, database=None)
@given(document=documents)
def test_validation_refuses_cleanly_and_an_accepted_policy_builds_everything(document):
    policy = _accepted(document)
    if policy is None:
        return
    # the API stores the dump; instances validate the dump again
    stored = policy.model_dump(mode="json")
    assert validate_policy("sales_order", stored, strict=True) == policy
    assert SalesOrderPolicy.model_validate(stored) == policy
    for t in (policy.approval_timers, policy.acknowledgement_timers, policy.payment_timers()):
        times = t.task_times()
        assert times.remind_after and times.escalate_after and times.deadline
        assert timedelta(0) < times.remind_after < times.escalate_after <= times.deadline
        assert times.deadline <= MAX_DURATION and times.escalation_role in KNOWN_ROLES
    if policy.approval_tiers:
        levels = approval_chain(policy.approval_tiers, policy.approval_tiers[-1].min_amount)
        assert [lv.name for lv in levels] == [t.name for t in policy.approval_tiers]
        assert all(1 <= lv.needed() <= len(lv.task_roles()) for lv in levels)


# ----------------------------------------------------------------------------- the workflow
@pytest_asyncio.fixture(scope="module")
async def ts_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of this module's own (the harness takes it): run beside other
    files' tests on the session's server, an instance here sometimes never saw its time skip."""
    env = await start_time_skipping()
    try:
        yield env
    finally:
        await env.shutdown()


BOUND_S = 120  # generous (time is skipped; a loaded machine is slow): a failed task is seen at once


async def _task_failures(h: WorkflowHandle) -> list[str]:
    return [
        e.workflow_task_failed_event_attributes.failure.message
        async for e in h.fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
    ]


async def _unless_failed(h: WorkflowHandle, call: Awaitable[T], what: str, document: dict) -> T:
    """What call returns, unless a workflow task of h fails first (or nothing comes)."""
    task = asyncio.ensure_future(call)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + BOUND_S
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            failures = await _task_failures(h)
            assert not failures, f"{h.id}: a workflow task failed ({what}): {failures[0]}"
            assert loop.time() < give_up, f"{h.id}: {what} never came\npolicy: {document}"
    finally:
        task.cancel()


async def _settled(h: WorkflowHandle, document: dict) -> SalesOrderStatus:
    """The status once the instance waits (or has ended: a timer of seconds can run out)."""
    try:
        return await _unless_failed(
            h, h.execute_update(SalesOrderWorkflow.settle), "settle", document
        )
    except RPCError:  # it has ended: nothing takes an update any more
        return await h.query(SalesOrderWorkflow.status)


def _check_timers(task: TaskView, escalate_after: timedelta, deadline: timedelta) -> None:
    """The task escalates and times out when the policy says, and not before it opened."""
    assert task.due_at is not None and task.deadline_at is not None
    assert task.created_at < task.due_at == task.created_at + escalate_after
    assert task.due_at <= task.deadline_at == task.created_at + deadline


def _entered(status: SalesOrderStatus, stage: Stage) -> datetime:
    return next(s.at for s in status.stages if s.stage == stage)


def _order_reaching(policy: SalesOrderPolicy, currency: str) -> SalesOrderInput:
    """A standard order whose amount needs every level of the chain (or any, without tiers)."""
    top = policy.approval_tiers[-1].min_amount if policy.approval_tiers else Decimal(100)
    quantity = Decimal(1) if top < MAX_AMOUNT else Decimal(2)  # unit prices stay below 10**14
    price = max(top / quantity, Decimal("0.01"))
    inp = order(100, currency=currency)
    return inp.model_copy(
        update={"lines": [OrderLine(sku="SKU-MUG", quantity=quantity, unit_price=price)]}
    )


async def _run_instances(harness, policy: SalesOrderPolicy, document: dict) -> None:
    harness.fakes.policy = PolicyDocument(
        process_type="sales_order", version=3, document=policy.model_dump(mode="json")
    )
    currency = policy.currencies[0]
    chain = await harness.start(_order_reaching(policy, currency))
    prepaid = await harness.start(order(800, variant="prepaid_entry", currency=currency))

    # the prepaid order waits for its advance, with a payment task on the policy's timers, and
    # takes a special change: one acknowledgement task per special change role
    status = await _settled(prepaid, document)
    assert status.policy_version == 3
    if status.stage == Stage.AWAITING_PAYMENT:  # unless a timer of seconds already ran out
        [payment] = [t for t in status.pending_tasks if t.kind == "payment"]
        _check_timers(payment, policy.payment_deadline, policy.payment_deadline)
        amend = AmendInput(description="blue logo", actor=Actor(username="alice"))
        try:
            status = await _unless_failed(
                prepaid, prepaid.execute_update(SalesOrderWorkflow.amend, amend), "amend", document
            )
        except (WorkflowUpdateFailedError, RPCError):  # the payment deadline ran out meanwhile
            pass
        else:
            acks = [t for t in status.pending_tasks if t.kind == "acknowledgement"]
            assert sorted(t.candidate_roles[0] for t in acks) == sorted(policy.special_change_roles)

    # the other order waits for the first level of its chain
    if policy.approval_tiers:
        status = await _settled(chain, document)
        if status.stage == Stage.APPROVAL:
            first = approval_chain(policy.approval_tiers, status.amount_due)[0]
            expected = sorted(first.task_roles())
            n = len(expected[0])  # an escalated task has the escalation role appended
            assert sorted(t.candidate_roles[:n] for t in status.pending_tasks) == expected
            for t in status.pending_tasks:
                timers = policy.approval_timers
                _check_timers(t, timers.escalate_after, timers.deadline)

    # time skips through every reminder, escalation and deadline until both have ended, and
    # neither ended before its deadline
    for h, waited_in, deadline in [
        (prepaid, Stage.AWAITING_PAYMENT, policy.payment_deadline),
        (chain, Stage.APPROVAL, policy.approval_timers.deadline),
    ]:
        result = await _unless_failed(h, h.result(), "the end", document)
        assert await _task_failures(h) == []
        final = await h.query(SalesOrderWorkflow.status)
        if h is chain and not policy.approval_tiers:
            assert result.stage == Stage.CLOSED, result.reason
            continue
        assert result.stage == Stage.CANCELLED, result.reason
        waited = _entered(final, Stage.CANCELLED) - _entered(final, waited_in)
        assert waited >= max(deadline, MIN_DURATION), f"cancelled after {waited}: {result.reason}"


@pytest.mark.timeout(600)
@settings(
    max_examples=30,
    deadline=None,
    database=None,
    # a failing example costs up to BOUND_S: report the first one found, unshrunk
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(document=documents)
async def test_every_accepted_policy_runs_through_the_sales_order_without_a_failed_task(
    harness, document
):
    policy = _accepted(document)
    if policy is not None:
        await _run_instances(harness, policy, document)
