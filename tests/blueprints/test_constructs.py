"""The constructs the seed blueprints do not use, on the interpreter (time-skipping server, fake
activities): an approval chain by amount (a level for every amount, an all-of level above a
threshold, distinct approvers), a refusal's rule, a stage SLA that escalates the open approval,
and a wait `after` a duration."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from temporalio.client import WorkflowUpdateFailedError

from workflows.blueprint import types
from workflows.blueprint.interpreter import BlueprintStatus
from workflows.human_task import Actor

pytestmark = pytest.mark.asyncio(loop_scope="session")

PURCHASE = {
    "process": "purchase",
    "dsl": 1,
    "title": "Purchase",
    "description": "A purchase approved by amount, then a cooling-off day.",
    "owner_role": "manager",
    "business_key": "ref",
    "input": {
        "ref": {"type": "string", "required": True},
        "amount": {"type": "decimal", "required": True, "min": 0},
    },
    "start": "approve",
    "stages": {
        "approve": {
            "sla": {"within": "PT4H", "on_breach": [{"escalate": {"to_role": "admin"}}]},
            "do": [
                {
                    "approval": "chain",
                    "title": "Approve the purchase",
                    "amount_field": "amount",
                    "levels": [
                        {"name": "Manager", "roles": ["manager"]},
                        {
                            "name": "Board",
                            "min_amount": 1000,
                            "roles": ["finance", "sales-director"],
                            "mode": "all",
                        },
                    ],
                }
            ],
            "then": [
                {"when": {"step": "chain", "outcome": "rejected"}, "go": "refused"},
                {"otherwise": "cooling_off"},
            ],
        },
        "cooling_off": {"do": [{"wait": {"after": "P1D"}}], "then": "bought"},
        "bought": {"end": {"outcome": "bought"}},
        "refused": {"end": {"outcome": "refused"}},
    },
}
PURCHASE_TYPE = types.from_document(PURCHASE)
MANAGER = Actor(username="mike", roles=["manager"])
FINANCE = Actor(username="fiona", roles=["finance"])
DIRECTOR = Actor(username="diana", roles=["sales-director"])
ADMIN = Actor(username="ada", roles=["admin"])


def purchase(amount: str) -> dict:
    return {"ref": f"P-{uuid.uuid4().hex[:8]}", "amount": amount}


async def test_a_small_purchase_needs_the_manager_and_a_day_of_cooling_off(bp) -> None:
    handle = await bp.start(PURCHASE_TYPE, purchase("500"))
    status = await bp.status(handle)
    assert [t.name for t in status.pending_tasks] == ["Manager"]
    await bp.decide(handle, MANAGER, "approved", comment="fine")
    status = await bp.status(handle)
    assert (status.stage, status.open_steps) == ("cooling_off", ["#0.wait"])
    await bp.env.sleep(timedelta(hours=23))
    assert (await bp.status(handle)).stage == "cooling_off"
    await bp.env.sleep(timedelta(hours=2))
    result = await bp.result(handle)
    assert (result.stage, result.outcome) == ("bought", "bought")


async def test_a_large_purchase_needs_every_board_role_after_the_manager(bp) -> None:
    handle = await bp.start(PURCHASE_TYPE, purchase("5000"))
    await bp.decide(handle, MANAGER, "approved", comment="fine")
    status = await bp.status(handle)
    board = sorted(t.name for t in status.pending_tasks)
    assert board == ["Board (finance)", "Board (sales-director)"]
    # the manager who approved the first level may not approve another (distinct approvers)
    both = Actor(username="mike", roles=["manager", "finance"])
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await bp.decide(handle, both, "approved", task="Board (finance)", comment="me again")
    assert err.value.cause.type == "FourEyesViolation"
    await bp.decide(handle, FINANCE, "approved", task="Board (finance)", comment="ok")
    assert (await bp.status(handle)).stage == "approve"  # all of the board: one more
    await bp.decide(handle, DIRECTOR, "approved", task="Board (sales-director)", comment="ok")
    assert (await bp.status(handle)).stage == "cooling_off"


async def test_a_refusal_at_any_level_takes_the_refusal_rule(bp) -> None:
    handle = await bp.start(PURCHASE_TYPE, purchase("5000"))
    await bp.decide(handle, MANAGER, "approved", comment="fine")
    await bp.decide(handle, FINANCE, "rejected", task="Board (finance)", comment="no budget")
    result = await bp.result(handle)
    assert (result.stage, result.outcome) == ("refused", "refused")
    status = await handle.query("status", result_type=BlueprintStatus)
    outcomes = {d.name: d.outcome for d in status.decisions}
    assert outcomes["Board (sales-director)"] == "withdrawn"  # the quorum cannot be reached


async def test_the_stage_sla_escalates_the_open_approval_to_its_role(bp) -> None:
    handle = await bp.start(PURCHASE_TYPE, purchase("500"))
    await bp.env.sleep(timedelta(hours=5))
    [task] = (await bp.status(handle)).pending_tasks
    assert task.candidate_roles == ["manager", "admin"]
    await bp.decide(handle, ADMIN, "approved", comment="escalated to me")
    assert (await bp.status(handle)).stage == "cooling_off"
