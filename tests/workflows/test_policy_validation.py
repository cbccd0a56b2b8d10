"""The sales order policy validator refuses every document that would break an instance."""

from __future__ import annotations

import copy
from datetime import timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError

from core.roles import KNOWN_ROLES
from scripts.seed import DEMO_USERS
from workflows.human_task import TaskTimes
from workflows.policy import (
    MAX_DURATION,
    SalesOrderPolicy,
    TaskTimers,
    default_policy_document,
    validate_policy,
)


def doc(**changes) -> dict:
    """The default (seeded) document with some top-level keys replaced."""
    d = default_policy_document("sales_order")
    d.update(copy.deepcopy(changes))
    return d


def tier(min_amount="500000", name="vp", roles=("vice-president",), **kw) -> dict:
    return {"min_amount": min_amount, "name": name, "roles": list(roles), **kw}


def refusals(document: dict, *, strict: bool = False) -> dict[tuple, str]:
    """loc -> message of every error; fails the test if the document is accepted."""
    with pytest.raises(ValidationError) as err:
        if strict:
            validate_policy("sales_order", document, strict=True)
        else:
            validate_policy("sales_order", document)
    return {tuple(e["loc"]): e["msg"] for e in err.value.errors()}


# ----------------------------------------------------------------------------- durations
def test_payment_reminder_after_the_deadline_is_refused():
    errors = refusals(doc(payment_reminder_after="P20D", payment_deadline="P14D"))
    assert "payment_deadline" in errors[("payment_reminder_after",)]


def test_payment_reminder_at_the_deadline_is_refused():
    assert ("payment_reminder_after",) in refusals(
        doc(payment_reminder_after="P14D", payment_deadline="P14D")
    )


def test_approval_deadline_beyond_the_maximum_is_refused():
    timers = {**doc()["approval_timers"], "deadline": "P3000000D"}
    errors = refusals(doc(approval_timers=timers))
    assert "366 days" in errors[("approval_timers", "deadline")]


def test_the_maximum_duration_itself_is_accepted():
    timers = {**doc()["approval_timers"], "deadline": f"P{MAX_DURATION.days}D"}
    policy = validate_policy("sales_order", doc(approval_timers=timers))
    assert isinstance(policy, SalesOrderPolicy)
    assert policy.approval_timers.deadline == MAX_DURATION


def test_negative_approval_timers_are_refused():
    timers = {
        "remind_after": "-P3D",
        "escalate_after": "-P2D",
        "deadline": "-P1D",
        "escalation_role": "manager",
    }
    errors = refusals(doc(approval_timers=timers))
    assert {
        ("approval_timers", "remind_after"),
        ("approval_timers", "escalate_after"),
        ("approval_timers", "deadline"),
    } <= set(errors)


@pytest.mark.parametrize(
    "loc",
    [
        ("approval_timers", "remind_after"),
        ("approval_timers", "escalate_after"),
        ("approval_timers", "deadline"),
        ("acknowledgement_timers", "remind_after"),
        ("acknowledgement_timers", "escalate_after"),
        ("acknowledgement_timers", "deadline"),
        ("payment_reminder_after",),
        ("payment_deadline",),
    ],
)
def test_zero_duration_is_refused_not_taken_as_no_timer(loc):
    d = doc()
    target = d
    for key in loc[:-1]:
        target = target[key]
    target[loc[-1]] = "PT0S"
    assert loc in refusals(d)


def test_reminder_must_come_before_escalation():
    timers = {**doc()["approval_timers"], "remind_after": "P2D", "escalate_after": "P2D"}
    assert ("approval_timers", "remind_after") in refusals(doc(approval_timers=timers))


def test_escalation_after_the_deadline_is_refused():
    timers = {**doc()["acknowledgement_timers"], "escalate_after": "P6D", "deadline": "P5D"}
    assert ("acknowledgement_timers", "escalate_after") in refusals(
        doc(acknowledgement_timers=timers)
    )


def test_escalation_at_the_deadline_is_accepted():
    # what the payment task does: it escalates and times out at the payment deadline
    timers = TaskTimers(
        remind_after=timedelta(days=1), escalate_after=timedelta(days=3), deadline=timedelta(3)
    )
    assert timers.escalate_after == timers.deadline


# ----------------------------------------------------------------------------- roles
def test_known_roles_are_those_of_the_demo_users_and_the_api():
    # the API requires requester, sales, manager, finance and admin: all demo roles
    assert KNOWN_ROLES == {r for roles in DEMO_USERS.values() for r in roles}


@pytest.mark.parametrize("role", ["cfo", "", "Manager", " manager"])
def test_unknown_or_empty_escalation_role_is_refused(role):
    timers = {**doc()["approval_timers"], "escalation_role": role}
    errors = refusals(doc(approval_timers=timers))
    assert "unknown role" in errors[("approval_timers", "escalation_role")]


@pytest.mark.parametrize("role", ["board", ""])
def test_unknown_or_empty_tier_role_is_refused(role):
    errors = refusals(doc(approval_tiers=[tier(roles=["vice-president", role])]))
    assert ("approval_tiers", 0, "roles", 1) in errors


def test_unknown_special_change_role_is_refused():
    errors = refusals(doc(special_change_roles=["procurement", "marketing"]))
    assert ("special_change_roles", 1) in errors


@pytest.mark.parametrize(
    "changes, loc",
    [
        ({"special_change_roles": ["procurement", "procurement"]}, ("special_change_roles", 1)),
        (
            {"approval_tiers": [tier(roles=["finance", "manager", "finance"], mode="all")]},
            ("approval_tiers", 0, "roles", 2),
        ),
    ],
)
def test_a_role_listed_twice_is_refused(changes, loc):
    assert "twice" in refusals(doc(**changes))[loc]


def test_empty_role_lists_are_refused():
    assert ("special_change_roles",) in refusals(doc(special_change_roles=[]))
    assert ("approval_tiers", 0, "roles") in refusals(doc(approval_tiers=[tier(roles=[])]))


# ----------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "vp\x00", "line\nbreak"])
def test_tier_names_are_1_to_100_characters(name):
    assert ("approval_tiers", 0, "name") in refusals(doc(approval_tiers=[tier(name=name)]))


def test_a_tier_name_of_100_characters_is_accepted():
    validate_policy("sales_order", doc(approval_tiers=[tier(name="x" * 100)]))


def test_at_most_10_tiers():
    tiers = [tier(min_amount=str(1000 * (i + 1)), name=f"t{i}") for i in range(11)]
    assert ("approval_tiers",) in refusals(doc(approval_tiers=tiers))
    validate_policy("sales_order", doc(approval_tiers=tiers[:10]))


def test_at_most_10_roles_per_list():
    roles = sorted(KNOWN_ROLES) + ["manager"]
    assert ("approval_tiers", 0, "roles") in refusals(
        doc(approval_tiers=[tier(roles=roles, mode="all")])
    )
    assert ("special_change_roles",) in refusals(doc(special_change_roles=roles))


def test_k_must_lie_within_the_roles_and_only_for_k_of_n():
    roles = ["vice-president", "sales-director"]
    assert ("approval_tiers", 0, "k") in refusals(
        doc(approval_tiers=[tier(roles=roles, mode="k_of_n", k=3)])
    )
    assert ("approval_tiers", 0, "k") in refusals(
        doc(approval_tiers=[tier(roles=roles, mode="k_of_n")])
    )
    assert ("approval_tiers", 0, "k") in refusals(
        doc(approval_tiers=[tier(roles=roles, mode="sequential", k=1)])
    )
    validate_policy("sales_order", doc(approval_tiers=[tier(roles=roles, mode="k_of_n", k=2)]))


@pytest.mark.parametrize(
    "currencies, loc",
    [
        ([], ("currencies",)),
        (["EUR", "XYZ"], ("currencies", 1)),
        (["eur"], ("currencies", 0)),
        (["EUR", "USD", "EUR"], ("currencies", 2)),
        (
            ["EUR", "USD", "GBP", "CHF", "RON", "JPY", "CAD", "AUD", "NZD", "SEK", "NOK"]
            + ["DKK", "PLN", "CZK", "HUF", "SGD", "TRY", "CNY", "INR", "BRL", "MXN"],
            ("currencies",),
        ),
    ],
)
def test_currencies_are_1_to_20_distinct_iso_4217_codes(currencies, loc):
    assert loc in refusals(doc(currencies=currencies), strict=True)


@pytest.mark.parametrize("code", ["eur", "EU1", "EURO", ""])
def test_a_stored_policy_needs_currency_codes_of_three_capital_letters(code):
    assert ("currencies", 0) in refusals(doc(currencies=[code]))


def test_a_stored_policy_with_a_withdrawn_currency_still_loads_but_is_not_published():
    # BGN left ISO 4217 when Bulgaria adopted the euro: instances that load an older version
    # listing it must not fail (nor must their replay), a new version may not list it
    stored = doc(currencies=["EUR", "BGN"])
    assert SalesOrderPolicy.model_validate(stored).currencies == ["EUR", "BGN"]
    assert ("currencies", 1) in refusals(stored, strict=True)


def test_twenty_iso_codes_are_accepted():
    codes = ["EUR", "USD", "GBP", "CHF", "RON", "JPY", "CAD", "AUD", "NZD", "SEK"]
    codes += ["NOK", "DKK", "PLN", "CZK", "HUF", "SGD", "TRY", "CNY", "INR", "BRL"]
    policy = validate_policy("sales_order", doc(currencies=codes), strict=True)
    assert isinstance(policy, SalesOrderPolicy) and policy.currencies == codes


@pytest.mark.parametrize(
    "changes, loc",
    [
        ({"max_open_special_changes": 0}, ("max_open_special_changes",)),
        ({"max_actions_per_task": 10_001}, ("max_actions_per_task",)),
        ({"overpayment": "keep"}, ("overpayment",)),
    ],
)
def test_limits_and_overpayment_are_checked(changes, loc):
    assert loc in refusals(doc(**changes))


# ----------------------------------------------------------------------------- tiers
def test_duplicate_thresholds_are_refused():
    tiers = [tier("500000", "a"), tier("500000.00", "b", roles=["sales-director"])]
    errors = refusals(doc(approval_tiers=tiers))
    assert "greater than" in errors[("approval_tiers", 1, "min_amount")]


def test_tiers_out_of_order_are_refused_not_re_sorted():
    tiers = [tier("1000000", "sd", roles=["sales-director"]), tier("500000", "vp")]
    assert ("approval_tiers", 1, "min_amount") in refusals(doc(approval_tiers=tiers))


@pytest.mark.parametrize("amount", ["100000000000000.01", "1000000000000000", "0.001", "-1"])
def test_thresholds_are_bounded_with_at_most_two_decimals(amount):
    assert ("approval_tiers", 0, "min_amount") in refusals(
        doc(approval_tiers=[tier(min_amount=amount)])
    )


def test_the_largest_threshold_is_accepted():
    policy = validate_policy("sales_order", doc(approval_tiers=[tier(min_amount="1e14")]))
    assert isinstance(policy, SalesOrderPolicy)
    assert policy.approval_tiers[0].min_amount == Decimal(10**14)


def test_no_tiers_means_no_approval():
    policy = validate_policy("sales_order", doc(approval_tiers=[]))
    assert isinstance(policy, SalesOrderPolicy) and policy.approval_tiers == []


def test_loyalty_discount_has_at_most_two_decimals():
    assert ("loyalty_discount_pct",) in refusals(doc(loyalty_discount_pct="5.125"))
    validate_policy("sales_order", doc(loyalty_discount_pct="7.25"))


# ----------------------------------------------------------------------------- completeness
def test_publishing_an_empty_document_names_every_missing_key():
    errors = refusals({}, strict=True)
    required = set(SalesOrderPolicy.model_fields) - SalesOrderPolicy.OPTIONAL  # the calendar
    assert set(errors) == {(name,) for name in required}
    assert all(msg == "Field required" for msg in errors.values())


def test_publishing_names_a_missing_nested_key_and_the_other_errors():
    d = doc(special_change_roles=["marketing"])
    del d["approval_timers"]["deadline"]
    del d["approval_tiers"][1]["mode"]
    del d["overpayment"]
    errors = refusals(d, strict=True)
    assert {
        ("approval_timers", "deadline"),
        ("approval_tiers", 1, "mode"),
        ("overpayment",),
        ("special_change_roles", 0),
    } <= set(errors)


def test_k_may_be_left_out_of_a_tier_that_is_not_k_of_n():
    d = doc()
    del d["approval_tiers"][0]["k"]
    validate_policy("sales_order", d, strict=True)


def test_the_seeded_default_document_passes_publishing():
    d = default_policy_document("sales_order")
    assert validate_policy("sales_order", d, strict=True).model_dump(mode="json") == d


def test_defaults_stay_for_version_0():
    assert validate_policy("sales_order", {}) == SalesOrderPolicy()


# ----------------------------------------------------------------------------- builders
def test_task_times_are_what_the_task_board_takes():
    t = TaskTimers(
        remind_after=timedelta(hours=1),
        escalate_after=timedelta(hours=2),
        deadline=timedelta(hours=3),
        escalation_role="finance",
    )
    assert t.task_times() == TaskTimes(
        remind_after=timedelta(hours=1),
        escalate_after=timedelta(hours=2),
        deadline=timedelta(hours=3),
        escalation_role="finance",
    )


def test_payment_timers_remind_then_escalate_and_time_out_at_the_deadline():
    policy = SalesOrderPolicy.model_validate(
        doc(
            payment_reminder_after="P2D",
            payment_deadline="P9D",
            approval_timers={**doc()["approval_timers"], "escalation_role": "sales-director"},
        )
    )
    assert policy.payment_timers() == TaskTimers(
        remind_after=timedelta(days=2),
        escalate_after=timedelta(days=9),
        deadline=timedelta(days=9),
        escalation_role="sales-director",
    )
