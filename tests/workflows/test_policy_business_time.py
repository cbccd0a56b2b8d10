"""Business time in policy documents: a `calendar` and timer sets with `business_time: true`,
checked at publishing in business terms of the calendar; documents without them unchanged."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from workflows.calendar import BusinessDuration
from workflows.policy import SalesOrderPolicy, default_policy_document, validate_policy

CALENDAR = {"timezone": "Europe/Bucharest", "holidays": {"country": "RO"}}


def _document(timers: dict | None = None, **changes) -> dict:
    document = default_policy_document("sales_order")
    document["calendar"] = CALENDAR
    document["approval_timers"] = {
        "business_time": True,
        "remind_after": "PT4H",
        "escalations": [
            {"after": "P2D", "to_role": "manager"},
            {"after": "P3D", "to_role": "sales-director"},
        ],
        "deadline": "P5D",
        **(timers or {}),
    }
    document.update(changes)
    return document


def _errors(document: dict) -> dict[tuple, str]:
    with pytest.raises(ValidationError) as err:
        validate_policy("sales_order", document, strict=True)
    return {tuple(e["loc"]): e["msg"] for e in err.value.errors()}


def test_business_timers_publish_and_give_the_board_business_durations():
    policy = validate_policy("sales_order", _document(), strict=True)
    assert isinstance(policy, SalesOrderPolicy) and policy.calendar is not None
    times = policy.approval_timers.task_times()
    assert times.business_time
    assert times.remind_after == BusinessDuration.parse("PT4H")
    assert [e.after for e in times.escalations] == [
        BusinessDuration.parse("P2D"),
        BusinessDuration.parse("P3D"),
    ]
    # the other timer sets keep elapsed time
    assert policy.acknowledgement_timers.task_times().remind_after == timedelta(hours=8)


def test_a_business_policy_dumps_and_validates_again():
    policy = validate_policy("sales_order", _document(), strict=True)
    dumped = policy.model_dump(mode="json")
    assert dumped["approval_timers"]["remind_after"] == "PT4H"
    assert dumped["approval_timers"]["business_time"] is True
    assert validate_policy("sales_order", dumped, strict=True) == policy


def test_todays_documents_keep_their_keys_and_meaning():
    document = default_policy_document("sales_order")
    assert "calendar" not in document and "business_time" not in document["approval_timers"]
    policy = validate_policy("sales_order", document, strict=True)  # the new keys: optional
    assert policy.calendar is None  # type: ignore[attr-defined]
    assert policy.model_dump(mode="json") == document
    assert policy.approval_timers.task_times().escalate_after == timedelta(days=2)  # type: ignore[attr-defined]


def test_business_time_needs_the_calendar():
    document = _document()
    del document["calendar"]
    errors = _errors(document)
    assert list(errors) == [("approval_timers", "business_time")]
    assert "calendar" in errors[("approval_timers", "business_time")]


def test_the_reminder_is_compared_with_the_first_level_in_business_terms():
    # nine business hours come after one business day of eight working hours...
    timers = {"remind_after": "PT9H", "escalations": [{"after": "P1D", "to_role": "manager"}]}
    errors = _errors(_document(timers))
    assert list(errors) == [("approval_timers", "remind_after")]
    assert "a business day is 8 working hours" in errors[("approval_timers", "remind_after")]
    # ...but before one of ten
    long_days = {**CALENDAR, "hours": {"start": "08:00", "end": "18:00"}}
    validate_policy("sales_order", _document(timers, calendar=long_days), strict=True)


def test_levels_must_increase_in_business_terms():
    levels = [
        {"after": "P1D", "to_role": "manager"},
        {"after": "PT8H", "to_role": "sales-director"},
    ]
    errors = _errors(_document({"remind_after": "PT1H", "escalations": levels}))
    assert list(errors) == [("approval_timers", "escalations", 1, "after")]
    assert "earliest first" in errors[("approval_timers", "escalations", 1, "after")]


def test_no_level_after_the_deadline_in_business_terms():
    errors = _errors(_document({"deadline": "PT20H"}))  # 2.5 business days, before P3D
    assert list(errors) == [("approval_timers", "escalations", 1, "after")]
    assert "deadline" in errors[("approval_timers", "escalations", 1, "after")]
    timers = {"escalations": None, "escalate_after": "P2D", "escalation_role": "manager"}
    errors = _errors(_document({**timers, "deadline": "P1DT7H"}))
    assert list(errors) == [("approval_timers", "escalate_after")]


@pytest.mark.parametrize(
    "timers, loc, fragment",
    [
        ({"remind_after": "P1W"}, ("approval_timers", "remind_after"), "not a business duration"),
        ({"deadline": "PT10S"}, ("approval_timers", "deadline"), "not a business duration"),
        ({"deadline": "P367D"}, ("approval_timers", "deadline"), "too long"),
        ({"remind_after": 3600}, ("approval_timers", "remind_after"), "business duration"),
        (
            {"escalations": [{"after": "P0D", "to_role": "manager"}]},
            ("approval_timers", "escalations", 0, "after"),
            "must not be zero",
        ),
    ],
)
def test_bad_business_durations_are_refused_naming_the_path(timers, loc, fragment):
    errors = _errors(_document(timers))
    assert loc in errors
    assert fragment in errors[loc]


def test_a_business_duration_is_refused_in_elapsed_timers():
    from workflows.policy import TaskTimers

    with pytest.raises(ValidationError) as err:
        TaskTimers(remind_after=BusinessDuration.parse("PT4H"))
    [error] = err.value.errors()
    assert error["loc"] == ("remind_after",) and "business_time: true" in error["msg"]


def test_durations_the_calendar_cannot_reach_are_refused_at_publishing():
    # ten working minutes a day: 8784 business hours would take over a century
    tiny = {**CALENDAR, "hours": {"start": "09:00", "end": "09:10"}}
    timers = {"remind_after": "PT1M", "deadline": "PT8784H"}
    errors = _errors(_document(timers, calendar=tiny))
    assert list(errors) == [("approval_timers", "deadline")]
    assert "too little working time" in errors[("approval_timers", "deadline")]


def test_a_bad_calendar_is_refused_naming_its_path():
    errors = _errors(_document(calendar={**CALENDAR, "timezone": "Mars/Olympus_Mons"}))
    assert ("calendar", "timezone") in errors
