"""Stacked escalation levels in a task's timers; today's one-level documents keep their meaning."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from workflows.human_task import Escalation, TaskTimes
from workflows.policy import default_policy_document, validate_policy

LEVELS = [{"after": "PT2H", "to_role": "manager"}, {"after": "PT4H", "to_role": "sales-director"}]


def _timers(**timers) -> dict:
    document = default_policy_document("sales_order")
    document["approval_timers"] = {"remind_after": "PT1H", "deadline": "P1D", **timers}
    return document


def _errors(document: dict, *, strict: bool = False) -> dict[tuple, str]:
    with pytest.raises(ValidationError) as err:
        validate_policy("sales_order", document, strict=strict)
    return {tuple(e["loc"]): e["msg"] for e in err.value.errors()}


def test_two_levels_validate_and_give_the_board_both():
    policy = validate_policy("sales_order", _timers(escalations=LEVELS))
    times = policy.approval_timers.task_times()  # type: ignore[attr-defined]
    assert times.escalations == [
        Escalation(after=timedelta(hours=2), to_role="manager"),
        Escalation(after=timedelta(hours=4), to_role="sales-director"),
    ]
    # the first level stands for escalate_after / escalation_role (payment timers read them)
    assert times.escalate_after == timedelta(hours=2) and times.escalation_role == "manager"


def test_publishing_accepts_levels_without_escalate_after_and_role():
    document = default_policy_document("sales_order")
    document["approval_timers"] = {"remind_after": "PT1H", "deadline": "P1D", "escalations": LEVELS}
    validate_policy("sales_order", document, strict=True)
    document["approval_timers"] = {"remind_after": "PT1H", "deadline": "P1D"}
    assert ("approval_timers", "escalate_after") in _errors(document, strict=True)


def test_a_dumped_policy_with_levels_validates_again():
    policy = validate_policy("sales_order", _timers(escalations=LEVELS))
    again = validate_policy("sales_order", policy.model_dump(mode="json"))
    assert again == policy


def test_today_single_level_document_means_one_level_with_todays_times():
    policy = validate_policy("sales_order", default_policy_document("sales_order"))
    times = policy.approval_timers.task_times()  # type: ignore[attr-defined]
    assert times == TaskTimes(
        remind_after=timedelta(days=1),
        escalate_after=timedelta(days=2),
        deadline=timedelta(days=7),
        escalation_role="manager",
    )


def test_levels_out_of_order_are_refused_naming_the_level():
    levels = [LEVELS[1], LEVELS[0]]
    errors = _errors(_timers(escalations=levels))
    assert "earliest first" in errors[("approval_timers", "escalations", 1, "after")]


def test_a_level_after_the_deadline_is_refused():
    levels = [LEVELS[0], {"after": "P2D", "to_role": "sales-director"}]
    errors = _errors(_timers(escalations=levels))
    assert "deadline" in errors[("approval_timers", "escalations", 1, "after")]


def test_escalate_after_that_contradicts_the_first_level_is_refused():
    errors = _errors(_timers(escalations=LEVELS, escalate_after="PT3H"))
    assert "first level" in errors[("approval_timers", "escalate_after")]


def test_unknown_role_in_a_level_is_refused():
    levels = [LEVELS[0], {"after": "PT4H", "to_role": "cfo"}]
    errors = _errors(_timers(escalations=levels))
    assert "unknown role" in errors[("approval_timers", "escalations", 1, "to_role")]


def test_remind_after_the_first_level_is_refused():
    errors = _errors(_timers(escalations=LEVELS, remind_after="PT3H"))
    assert ("approval_timers", "remind_after") in errors
