"""The blueprint checker: one small invalid document per rule (a tiny valid blueprint with one
thing broken), each refused at its path with its message; the seed blueprints pass; canonical
JSON and version ids; the structural diff; warnings; and a property: the checker never crashes,
and every stage of a blueprint it accepts can reach an end."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from core.roles import KNOWN_ROLES
from workflows.blueprint.check import (
    Problem,
    canonical_json,
    diff,
    load_yaml,
    parse_blueprint,
    version_id,
    warnings,
)
from workflows.kernel import HumanProcess

SEEDS = Path(__file__).resolve().parents[2] / "blueprints"


def tiny() -> dict[str, Any]:
    """A valid blueprint: a review task that may send its stage round again (three times at
    most), then the end."""
    return {
        "process": "tiny",
        "dsl": 1,
        "title": "Tiny",
        "description": "A tiny process.",
        "owner_role": "manager",
        "business_key": "ref",
        "input": {
            "ref": {"type": "string", "required": True},
            "amount": {"type": "decimal"},
            "tier": {"type": "choice", "options": ["gold", "silver"]},
        },
        "start": "work",
        "stages": {
            "work": {
                "do": [
                    {
                        "task": "review",
                        "title": "Review",
                        "roles": ["manager"],
                        "fields": {"note": {"type": "text"}},
                        "outcomes": ["done", "redo"],
                        "required": {"done": ["note"]},
                    }
                ],
                "then": [
                    {"when": {"step": "review", "outcome": "redo"}, "go": "work"},
                    {"otherwise": "finished"},
                ],
                "max_visits": 3,
                "on_max_visits": "finished",
            },
            "finished": {"end": {"outcome": "done"}},
        },
        "events": {"nudged": {"fields": {"level": {"type": "int"}}}},
    }


def task(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["stages"]["work"]["do"][0]


def when(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["stages"]["work"]["then"][0]


def add_step(doc: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    doc["stages"]["work"]["do"].append(step)
    return doc


def refused(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, message) of every error the checker names, in its order."""
    with pytest.raises(ValidationError) as caught:
        parse_blueprint(doc)
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in caught.value.errors()]


def test_the_tiny_document_is_valid() -> None:
    blueprint = parse_blueprint(tiny())
    assert list(blueprint.stages) == ["work", "finished"]


# ----------------------------------------------------------------------------- shape
@pytest.mark.parametrize("name", [HumanProcess.FAILED_STAGE, HumanProcess.CANCELLED_STAGE])
def test_stage_names_the_kernel_uses_are_refused(name: str) -> None:
    doc = tiny()
    doc["stages"][name] = doc["stages"].pop("finished")
    doc["stages"]["work"]["then"][1]["otherwise"] = doc["stages"]["work"]["on_max_visits"] = name
    message = f"the stage name {name!r} is reserved: the kernel ends instances there itself"
    assert refused(doc) == [(f"stages.{name}", message)]


def test_unknown_key_is_refused() -> None:
    doc = tiny()
    doc["colour"] = "red"
    assert refused(doc) == [("colour", "Extra inputs are not permitted")]


def test_blueprint_cannot_set_retries() -> None:
    doc = tiny()
    task(doc)["retries"] = 3
    assert refused(doc) == [("stages.work.do.0.task.retries", "Extra inputs are not permitted")]


def test_unknown_step_kind_is_refused() -> None:
    doc = tiny()
    doc["stages"]["work"]["do"] = [{"send": "fax"}]
    message = "a step is one of task, approval, call, wait, parallel: its first key says which"
    assert refused(doc) == [("stages.work.do.0", message)]


def test_task_without_outcomes_is_refused() -> None:
    doc = tiny()
    task(doc)["outcomes"] = []
    message = "List should have at least 1 item after validation, not 0"
    assert refused(doc) == [("stages.work.do.0.task.outcomes", message)]


def test_name_that_is_not_snake_case_is_refused() -> None:
    doc = tiny()
    doc["stages"]["Work"] = doc["stages"].pop("work")
    message = "'Work' is not a name: snake_case (a-z, 0-9 and _, starting with a letter), at "
    assert refused(doc) == [("stages.Work.[key]", message + "most 63 characters")]


def test_other_language_version_is_refused() -> None:
    doc = tiny()
    doc["dsl"] = 2
    assert refused(doc) == [("dsl", "Input should be 1")]


@pytest.mark.parametrize(
    ("duration", "shown"),
    [("PT0S", "0:00:00"), ("-PT1H", "-1 day, 23:00:00"), ("P400D", "400 days, 0:00:00")],
    ids=["zero", "negative", "beyond-ceiling"],
)
def test_duration_zero_negative_or_too_long_is_refused(duration: str, shown: str) -> None:
    doc = tiny()
    task(doc)["timers"] = {"remind_after": duration}
    message = f"a duration must be at least 1 second and at most 366 days, not {shown}"
    assert refused(doc) == [("stages.work.do.0.task.timers.remind_after", message)]


def test_zero_business_duration_is_refused() -> None:
    doc = tiny()
    task(doc)["timers"] = {"business_time": True, "remind_after": "P0D"}
    message = "a business duration must not be zero"
    assert refused(doc) == [("stages.work.do.0.task.timers.remind_after", message)]


def test_escalation_before_reminder_is_refused() -> None:
    doc = tiny()
    levels = [{"after": "PT2H", "to_role": "manager"}]
    task(doc)["timers"] = {"remind_after": "PT4H", "escalations": levels}
    message = "escalation 1 (PT2H) must come after remind_after (PT4H): reminder, escalations "
    message += "earliest first, then the deadline"
    assert refused(doc) == [("stages.work.do.0.task.timers.escalations.0.after", message)]


def test_escalations_out_of_order_are_refused() -> None:
    doc = tiny()
    levels = [{"after": "P2D", "to_role": "manager"}, {"after": "P1D", "to_role": "admin"}]
    task(doc)["timers"] = {"escalations": levels}
    message = "escalation 2 (P1D) must come after escalation 1 (P2D): reminder, escalations "
    message += "earliest first, then the deadline"
    assert refused(doc) == [("stages.work.do.0.task.timers.escalations.1.after", message)]


def test_escalation_after_the_deadline_is_refused() -> None:
    doc = tiny()
    levels = [{"after": "P1D", "to_role": "manager"}, {"after": "P2D", "to_role": "admin"}]
    task(doc)["timers"] = {"escalations": levels, "deadline": "PT36H", "on_deadline": "done"}
    message = "deadline (P1DT12H) must come after escalation 2 (P2D): reminder, escalations "
    message += "earliest first, then the deadline"
    assert refused(doc) == [("stages.work.do.0.task.timers.deadline", message)]
    task(doc)["timers"]["deadline"] = "P2D"  # the last level may fire at the deadline
    parse_blueprint(doc)


def test_deadline_without_on_deadline_is_refused() -> None:
    doc = tiny()
    task(doc)["timers"] = {"deadline": "P1D"}
    message = "a deadline needs on_deadline, the outcome the task closes with then"
    assert refused(doc) == [("stages.work.do.0.task.timers.on_deadline", message)]


def test_on_deadline_that_is_not_an_outcome_is_refused() -> None:
    doc = tiny()
    task(doc)["timers"] = {"deadline": "P1D", "on_deadline": "gone"}
    message = "'gone' is not an outcome of the task; its outcomes: done, redo"
    assert refused(doc) == [("stages.work.do.0.task.timers.on_deadline", message)]


def test_required_field_the_task_lacks_is_refused() -> None:
    doc = tiny()
    task(doc)["required"] = {"done": ["note", "reason"]}
    message = "the task has no field 'reason'; its fields: note, comment"
    assert refused(doc) == [("stages.work.do.0.task.required.done.1", message)]


def test_required_fields_of_an_unknown_outcome_are_refused() -> None:
    doc = tiny()
    task(doc)["required"] = {"maybe": ["note"]}
    message = "'maybe' is not an outcome of the task; its outcomes: done, redo"
    assert refused(doc) == [("stages.work.do.0.task.required.maybe", message)]


def test_task_for_roles_and_an_assignee_is_refused() -> None:
    doc = tiny()
    task(doc)["assignee"] = "ref"
    message = "a task is for roles or for an assignee, not both"
    assert refused(doc) == [("stages.work.do.0.task.assignee", message)]


def test_k_of_n_with_k_above_n_is_refused() -> None:
    level = {"name": "Board", "roles": ["manager", "finance"], "mode": "k_of_n", "k": 3}
    doc = add_step(tiny(), {"approval": "sign_off", "title": "Sign off", "levels": [level]})
    message = "k (3) exceeds the 2 roles of the level: it could never approve"
    assert refused(doc) == [("stages.work.do.1.approval.levels.0.k", message)]


def test_approval_thresholds_out_of_order_are_refused() -> None:
    levels = [
        {"name": "Director", "min_amount": 1000, "roles": ["sales-director"]},
        {"name": "Manager", "min_amount": 500, "roles": ["manager"]},
    ]
    step = {"approval": "sign_off", "title": "Sign", "amount_field": "amount", "levels": levels}
    doc = add_step(tiny(), step)
    message = "min_amount 500 must be greater than the previous level's 1000 (levels go lowest "
    assert refused(doc) == [("stages.work.do.1.approval.levels.1.min_amount", message + "first)")]


def test_then_without_a_final_otherwise_is_refused() -> None:
    doc = tiny()
    doc["stages"]["work"]["then"] = [when(doc)]
    message = "the last rule is {otherwise: <stage>}: some rule must always apply"
    assert refused(doc) == [("stages.work.then.0", message)]


def test_end_stage_that_does_steps_is_refused() -> None:
    doc = tiny()
    doc["stages"]["finished"]["do"] = [{"call": "record_note", "with": {"text": "bye"}}]
    assert refused(doc) == [("stages.finished.do", "an end stage only ends: no do")]


def test_max_visits_without_on_max_visits_is_refused() -> None:
    doc = tiny()
    del doc["stages"]["work"]["on_max_visits"]
    message = "max_visits and on_max_visits go together: the bound, and where the entry after "
    assert refused(doc) == [("stages.work.on_max_visits", message + "the last goes")]


def test_two_steps_of_one_name_in_a_stage_are_refused() -> None:
    doc = add_step(tiny(), copy.deepcopy(task(tiny())))
    message = "a step named 'review' is already in this stage (at do.0.task): step names are "
    assert refused(doc) == [("stages.work.do.1.task.task", message + "unique in a stage")]


def test_event_wait_without_timeout_is_refused() -> None:
    doc = add_step(tiny(), {"wait": {"event": "nudged"}})
    message = "an event wait needs a timeout: without one an instance may wait forever"
    assert refused(doc) == [("stages.work.do.1.wait.wait.timeout", message)]


# ----------------------------------------------------------------------------- references
def test_unknown_start_stage_is_refused() -> None:
    doc = tiny()
    doc["start"] = "begin"
    assert refused(doc) == [("start", "no stage 'begin'; known: work, finished")]


def test_then_to_an_unknown_stage_is_refused() -> None:
    doc = tiny()
    doc["stages"]["work"]["then"][1] = {"otherwise": "nowhere"}
    message = "no stage 'nowhere'; known: work, finished"
    assert refused(doc) == [("stages.work.then.1.otherwise", message)]


def test_then_written_as_one_unknown_stage_is_refused_at_then() -> None:
    doc = tiny()
    doc["stages"]["work"]["then"] = "nowhere"
    assert refused(doc) == [
        ("stages.work.then", "no stage 'nowhere'; known: work, finished"),
        ("stages.finished", "unreachable: no then or on_max_visits leads here from start (work)"),
        ("stages.work", "no end stage can be reached from here: an instance here could never end"),
    ]


def test_on_max_visits_to_an_unknown_stage_is_refused() -> None:
    doc = tiny()
    doc["stages"]["work"]["on_max_visits"] = "limbo"
    message = "no stage 'limbo'; known: work, finished"
    assert refused(doc) == [("stages.work.on_max_visits", message)]


def test_sla_until_an_unknown_stage_is_refused() -> None:
    doc = tiny()
    breach = [{"notify": {"role": "manager"}}]
    sla = {
        "name": "whole",
        "from": "work",
        "until": ["ended"],
        "within": "P1D",
        "on_breach": breach,
    }
    doc["sla"] = [sla]
    assert refused(doc) == [("sla.0.until.0", "no stage 'ended'; known: work, finished")]


def test_condition_on_a_step_not_in_the_stage_is_refused() -> None:
    doc = tiny()
    when(doc)["when"] = {"step": "approve", "outcome": "redo"}
    message = "no step 'approve'; known: review"
    assert refused(doc) == [("stages.work.then.0.when.step.step", message)]


def test_condition_on_an_unknown_outcome_is_refused() -> None:
    doc = tiny()
    when(doc)["when"] = {"step": "review", "outcome": "maybe"}
    message = "step 'review' has no outcome 'maybe'; its outcomes: done, redo"
    assert refused(doc) == [("stages.work.then.0.when.step.outcome", message)]


def test_condition_on_an_unknown_field_is_refused() -> None:
    doc = tiny()
    when(doc)["when"] = {"field": "colour", "eq": "red"}
    message = "no field 'colour'; known: ref, amount, tier, note, level"
    assert refused(doc) == [("stages.work.then.0.when.field.field", message)]


@pytest.mark.parametrize(
    ("condition", "op", "message"),
    [
        (
            {"field": "ref", "lt": 3},
            "lt",
            "lt compares numbers, dates and datetimes, not a string field",
        ),
        (
            {"field": "amount", "gte": "lots"},
            "gte",
            "a decimal field compares with a number, not 'lots'",
        ),
        (
            {"field": "tier", "in": ["gold", "bronze"]},
            "in",
            "'bronze' is not an option of the field: gold, silver",
        ),
    ],
    ids=["ordering-a-string", "number-with-text", "not-an-option"],
)
def test_condition_value_that_does_not_fit_the_field_is_refused(
    condition: dict[str, Any], op: str, message: str
) -> None:
    doc = tiny()
    when(doc)["when"] = condition
    assert refused(doc) == [(f"stages.work.then.0.when.field.{op}", message)]


def test_visits_of_an_unknown_stage_deep_in_a_condition_is_refused() -> None:
    doc = tiny()
    inner = [{"step": "review", "outcome": "redo"}, {"visits": "elsewhere", "gte": 2}]
    when(doc)["when"] = {"not": {"all": inner}}
    message = "no stage 'elsewhere'; known: work, finished"
    # each condition's kind is part of its path, as pydantic names it: not / not / all / all
    path = "stages.work.then.0.when.not.not.all.all.1.visits.visits"
    assert refused(doc) == [(path, message)]


def test_business_key_that_is_not_a_required_input_field_is_refused() -> None:
    doc = tiny()
    doc["business_key"] = "amount"
    message = "the business key is a required input field of type string, email, int; 'amount' "
    assert refused(doc) == [("business_key", message + "is an optional decimal")]


def test_business_key_that_is_no_input_field_is_refused() -> None:
    doc = tiny()
    doc["business_key"] = "order_no"
    message = "no input field 'order_no'; known: ref, amount, tier"
    assert refused(doc) == [("business_key", message)]


def test_field_declared_again_with_another_type_is_refused() -> None:
    doc = tiny()
    task(doc)["fields"]["amount"] = {"type": "int"}
    message = "field 'amount' is of type int here but decimal at input.amount: one name, one "
    path = "stages.work.do.0.task.fields.amount"
    assert refused(doc) == [(path, message + "type (and the same options)")]


def test_assignee_from_an_unknown_field_is_refused() -> None:
    doc = tiny()
    del task(doc)["roles"]
    task(doc)["assignee"] = "boss"
    message = "no field 'boss'; known: ref, amount, tier, note, level"
    assert refused(doc) == [("stages.work.do.0.task.assignee", message)]


def test_assignee_from_a_number_field_is_refused() -> None:
    doc = tiny()
    del task(doc)["roles"]
    task(doc)["assignee"] = "amount"
    message = "assignee is a field of type string or email; 'amount' is a decimal"
    assert refused(doc) == [("stages.work.do.0.task.assignee", message)]


def test_approval_amount_from_a_text_field_is_refused() -> None:
    level = {"name": "Manager", "min_amount": 500, "roles": ["manager"]}
    step = {"approval": "sign_off", "title": "Sign", "amount_field": "ref", "levels": [level]}
    doc = add_step(tiny(), step)
    message = "amount_field is a field of type int or decimal; 'ref' is a string"
    assert refused(doc) == [("stages.work.do.1.approval.amount_field", message)]


def test_call_of_an_activity_not_in_the_catalog_is_refused() -> None:
    doc = add_step(tiny(), {"call": "send_fax"})
    message = "no activity 'send_fax'; known: notify_customer, notify_role, record_note"
    assert refused(doc) == [("stages.work.do.1.call.call", message)]


def test_call_with_an_unknown_parameter_is_refused() -> None:
    doc = add_step(tiny(), {"call": "record_note", "with": {"text": "hi", "url": "http://x"}})
    message = "record_note has no parameter 'url'; its parameters: text"
    assert refused(doc) == [("stages.work.do.1.call.with.url", message)]


def test_call_without_a_required_parameter_is_refused() -> None:
    doc = add_step(tiny(), {"call": "record_note"})
    assert refused(doc) == [("stages.work.do.1.call.with.text", "record_note needs text")]


def test_call_with_a_value_that_does_not_fit_is_refused() -> None:
    params = {"template": "hello", "to": "not-an-address"}
    doc = add_step(tiny(), {"call": "notify_customer", "with": params})
    [(path, message)] = refused(doc)
    assert path == "stages.work.do.1.call.with.to"
    assert message.startswith("value is not a valid email address")


def test_call_with_a_parameter_from_an_unknown_field_is_refused() -> None:
    params = {"template": "hello", "to": {"field": "email"}}
    doc = add_step(tiny(), {"call": "notify_customer", "with": params})
    message = "no field 'email'; known: ref, amount, tier, note, level"
    assert refused(doc) == [("stages.work.do.1.call.with.to.field", message)]


def test_wait_for_an_unknown_event_is_refused() -> None:
    doc = add_step(tiny(), {"wait": {"event": "called", "timeout": "P1D"}})
    assert refused(doc) == [
        ("stages.work.do.1.wait.wait.event", "no event 'called'; known: nudged")
    ]


def test_wait_until_a_field_that_is_no_date_is_refused() -> None:
    doc = add_step(tiny(), {"wait": {"until": "ref"}})
    message = "until is a field of type date or datetime; 'ref' is a string"
    assert refused(doc) == [("stages.work.do.1.wait.wait.until", message)]


def test_end_requiring_an_unknown_field_is_refused() -> None:
    doc = tiny()
    doc["stages"]["finished"]["end"]["required"] = ["signature"]
    message = "no field 'signature'; known: ref, amount, tier, note, level"
    assert refused(doc) == [("stages.finished.end.required.0", message)]


def test_an_end_requiring_a_field_no_path_guarantees_is_refused() -> None:
    """Without it a person's decision into the end is refused and the instance waits forever."""
    doc = tiny()
    doc["stages"]["finished"]["end"]["required"] = ["ref", "tier"]  # ref: a required input
    [(loc, message)] = refused(doc)
    assert loc == "stages.finished.end.required.1"
    assert message.startswith("no path guarantees 'tier' a value before this end")
    # the analysis is per stage, not per outcome: `note`, required for `done` only, is not
    # guaranteed (though only `done` leaves for the end); required for each outcome, it is
    doc["stages"]["finished"]["end"]["required"] = ["note"]
    assert [loc for loc, _ in refused(doc)] == ["stages.finished.end.required.0"]
    task(doc)["required"] = {"done": ["note"], "redo": ["note"]}
    parse_blueprint(doc)
    # ... unless a deadline can close the task, without any of its fields
    task(doc)["timers"] = {"deadline": "P1D", "on_deadline": "done"}
    assert [loc for loc, _ in refused(doc)] == ["stages.finished.end.required.0"]


def test_an_end_field_given_in_every_stage_skipped_by_max_visits_is_guaranteed() -> None:
    doc = tiny()
    task(doc)["required"] = {"done": ["note"], "redo": ["note"]}
    doc["stages"]["work"]["max_visits"] = 2
    doc["stages"]["work"]["on_max_visits"] = "finished"
    doc["stages"]["finished"]["end"]["required"] = ["note"]
    parse_blueprint(doc)  # the third entry into work goes to finished, after work's visits


# ----------------------------------------------------------------------------- business time
def test_business_time_without_a_calendar_is_refused() -> None:
    doc = tiny()
    task(doc)["timers"] = {"business_time": True, "remind_after": "PT2H"}
    message = "business_time needs the blueprint's calendar"
    assert refused(doc) == [("stages.work.do.0.task.timers.business_time", message)]


def test_business_timers_out_of_order_in_business_terms_are_refused() -> None:
    doc = tiny()
    doc["calendar"] = {"timezone": "Europe/Bucharest"}  # 09:00-17:00: a business day is 8 h
    timers = {"business_time": True, "remind_after": "PT9H", "deadline": "P1D"}
    task(doc)["timers"] = {**timers, "on_deadline": "done"}
    message = "deadline (P1D) must come after remind_after (PT9H): reminder, escalations "
    message += "earliest first, then the deadline, in business time (a business day is 8 "
    assert refused(doc) == [("stages.work.do.0.task.timers.deadline", message + "working hours)")]


# ----------------------------------------------------------------------------- stage graph
def test_unreachable_stage_is_refused() -> None:
    doc = tiny()
    doc["stages"]["orphan"] = {"then": "finished"}
    message = "unreachable: no then or on_max_visits leads here from start (work)"
    assert refused(doc) == [("stages.orphan", message)]


def test_stage_from_which_no_end_is_reachable_is_refused() -> None:
    doc = tiny()
    doc["stages"]["work"]["then"][1] = {"otherwise": "limbo"}
    doc["stages"]["limbo"] = {"then": "limbo"}
    assert refused(doc) == [
        ("stages.limbo", "no end stage can be reached from here: an instance here could never end"),
        (
            "stages.limbo",
            "stages limbo loop without a bound: give one of them max_visits, with an "
            "on_max_visits that leaves the loop",
        ),
    ]


def test_loop_without_max_visits_is_refused() -> None:
    doc = tiny()
    del doc["stages"]["work"]["max_visits"], doc["stages"]["work"]["on_max_visits"]
    message = "stages work loop without a bound: give one of them max_visits, with an "
    assert refused(doc) == [("stages.work", message + "on_max_visits that leaves the loop")]


def test_loop_back_through_on_max_visits_is_refused() -> None:
    doc = tiny()
    doc["stages"]["work"]["on_max_visits"] = "fix"
    doc["stages"]["fix"] = {"then": "work"}
    message = "stages fix loop without a bound: an entry past a stage's max_visits goes "
    assert refused(doc) == [("stages.fix", message + "on_max_visits back into them")]


def test_on_max_visits_chain_coming_back_is_refused() -> None:
    doc = tiny()
    doc["stages"]["work"]["on_max_visits"] = "work"
    message = "on_max_visits comes back here (work -> work): an entry past every max_visits "
    assert refused(doc) == [("stages.work.on_max_visits", message + "would have nowhere to go")]


def test_worst_case_history_events_over_budget_are_refused() -> None:
    doc = tiny()
    doc["stages"]["work"]["max_visits"] = 200
    for i in range(10):
        add_step(doc, {"call": "record_note", "name": f"note_{i}", "with": {"text": "x"}})
    message = "the worst case is about 20,810 history events (work x200, finished x1), over the "
    message += "budget of 10,000 (Temporal's limit: 51,200): lower max_visits, or split the process"
    assert refused(doc) == [("stages", message)]


def test_worst_case_updates_over_budget_are_refused() -> None:
    doc = tiny()
    doc["stages"]["work"]["max_visits"] = 260
    message = "the worst case is about 1,040 history updates (work x260, finished x1), over the "
    message += "budget of 1,000 (Temporal's limit: 2,000): lower max_visits, or split the process"
    assert ("stages", message) in refused(doc)  # (its history events are over budget too)


# ----------------------------------------------------------------------------- YAML
def test_load_yaml_refuses_a_document_that_is_not_a_mapping() -> None:
    with pytest.raises(ValidationError) as caught:
        load_yaml("- process\n- stages\n")
    [error] = caught.value.errors()
    assert (error["loc"], error["msg"]) == (
        (),
        "a blueprint is a YAML mapping (process: ..., stages: ...), not list",
    )


def test_load_yaml_refuses_aliases_so_no_document_expands_to_a_billion_nodes() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    with pytest.raises(ValidationError) as caught:
        load_yaml(bomb)
    [error] = caught.value.errors()
    assert "aliases (*name) are not allowed" in error["msg"]
    assert load_yaml("a: &anchor 1\n") == {"a": 1}  # an anchor alone is harmless


def test_load_yaml_refuses_text_that_is_not_yaml() -> None:
    with pytest.raises(ValidationError) as caught:
        load_yaml("process: [tiny\n")
    [error] = caught.value.errors()
    assert error["msg"].startswith("not YAML: while parsing a flow sequence")


# ----------------------------------------------------------------------------- seeds
@pytest.mark.parametrize(
    ("file", "process"), [("complaint", "complaint"), ("onboarding", "customer_onboarding")]
)
def test_seed_blueprint_passes_the_checker(file: str, process: str) -> None:
    document = load_yaml((SEEDS / f"{file}.yaml").read_text())
    blueprint = parse_blueprint(document)
    assert blueprint.process == process
    # its canonical text is a document of the same version
    text = canonical_json(document)
    assert canonical_json(json.loads(text)) == text
    # the roles it names are known roles (core.roles): nothing is suspicious
    assert warnings(blueprint, KNOWN_ROLES) == []


# ----------------------------------------------------------------------------- versions
ONE_SPELLING = """
process: tiny
dsl: 1
title: Tiny
description: A tiny process.
owner_role: manager
business_key: ref
input: {ref: {type: string, required: true}, amount: {type: decimal, min: 10}}
start: work
stages:
  work:
    do:
      - {task: review, title: Review, roles: [manager], outcomes: [done], four_eyes: true,
         timers: {remind_after: PT48H}}
      - wait: {event: nudged, timeout: P1D}
    then: [{otherwise: finished}]
  finished: {end: {outcome: done}}
events: {nudged: {}}
"""

ANOTHER_SPELLING = """
# the same blueprint: other key order, block style, defaults written out, other spellings
dsl: 1
process: tiny
title: Tiny
description: "A tiny process."
owner_role: manager
business_key: ref
start: work
input:
  amount:
    type: decimal
    min: 10.0
  ref:
    required: true
    type: string
events:
  nudged:
    fields: {}
stages:
  finished:
    end:
      outcome: done
      required: []
  work:
    then: finished
    do:
      - task: review
        title: Review
        roles:
          - manager
        outcomes: [done]
        timers:
          remind_after: P2D
          business_time: false
      - wait:
          timeout: PT24H
          event: nudged
"""


def test_canonical_json_is_one_text_for_spellings_of_one_document() -> None:
    one, another = load_yaml(ONE_SPELLING), load_yaml(ANOTHER_SPELLING)
    assert canonical_json(one) == canonical_json(another)
    assert version_id(one) == version_id(another)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", version_id(one))
    assert " " not in canonical_json(one).replace("A tiny process.", "")


def test_canonical_json_differs_for_a_real_change() -> None:
    changed = ONE_SPELLING.replace("outcomes: [done]", "outcomes: [done, dropped]")
    assert version_id(load_yaml(changed)) != version_id(load_yaml(ONE_SPELLING))


# ----------------------------------------------------------------------------- diff
def test_diff_names_what_changed() -> None:
    old = tiny()
    new = tiny()
    new["title"] = "Tiny, revised"
    new["input"]["amount"]["min"] = 0
    del new["input"]["tier"]
    new["input"]["region"] = {"type": "string"}
    task(new)["outcomes"] = ["done", "redo", "dropped"]
    task(new)["timers"] = {"remind_after": "P1D"}
    add_step(new, {"call": "record_note", "with": {"text": "reviewed"}})
    new["stages"]["work"]["max_visits"] = 5
    new["stages"]["archive"] = {"then": "finished"}
    new["stages"]["work"]["then"][1] = {"otherwise": "archive"}
    assert diff(parse_blueprint(old), parse_blueprint(new)) == [
        'title changed: "Tiny" -> "Tiny, revised"',
        "input field added: region",
        "input field removed: tier",
        'input field changed: amount: min changed: (none) -> "0"',
        "stage added: archive",
        'stage work: then changed: [{"go":"work","when":{"outcome":"redo","step":"review"}},'
        '{"otherwise":"finished"}] -> [{"go":"work","when":{"outcome":"redo","step":"review"}},'
        '{"otherwise":"archive"}]',
        "stage work: max_visits changed: 3 -> 5",
        "stage work: step added: call record_note",
        'stage work: task review: outcomes changed: ["done","redo"] -> ["done","redo","dropped"]',
        'stage work: task review: timers changed: (none) -> {"remind_after":"P1D"}',
    ]


def test_diff_of_a_blueprint_with_itself_is_empty() -> None:
    assert diff(parse_blueprint(tiny()), parse_blueprint(tiny())) == []


# ----------------------------------------------------------------------------- warnings
def test_warnings_name_roles_no_one_holds_and_events_no_one_waits_for() -> None:
    doc = tiny()
    task(doc)["timers"] = {"escalations": [{"after": "P1D", "to_role": "night-shift"}]}
    assert warnings(parse_blueprint(doc), KNOWN_ROLES) == [
        Problem(
            ("stages", "work", "do", 0, "task", "timers", "escalations", 0, "to_role"),
            "unknown_role",
            "no one holds the role 'night-shift'",
        ),
        Problem(("events", "nudged"), "unused_event", "no wait waits for the event 'nudged'"),
    ]


# ----------------------------------------------------------------------------- property
STAGES = ("s0", "s1", "s2", "s3", "s4")
ENDS = ("done", "failed")
OUTCOMES = ("ok", "no", "later")


def mostly(draw: st.DrawFn, likely: list[str], other: list[str]) -> str:
    """One of `likely` nine times in ten, else one of `other` (when there is one)."""
    pool = likely if not other or draw(st.integers(0, 9)) else other
    return draw(st.sampled_from(pool))


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Small blueprints: stage graphs of tasks, with branches on their outcomes going forward
    or back (bounded or not), references that may miss and, now and then, a part broken."""
    stages = list(STAGES[: draw(st.integers(1, len(STAGES)))])
    ends = list(ENDS[: draw(st.sampled_from([1, 1, 2, 0]))])
    names = [*stages, *ends]
    body: dict[str, Any] = {}
    for i, name in enumerate(stages):
        onward = names[i + 1 :] or names  # forward usually, to the next: a path to an end
        tasks = [
            {
                "task": f"t{j}",
                "title": "Task",
                "roles": ["manager"],
                "outcomes": draw(st.lists(st.sampled_from(OUTCOMES), min_size=1, unique=True)),
            }
            for j in range(draw(st.integers(0, 2)))
        ]
        rules = []
        for _ in range(draw(st.integers(0, 2)) if tasks else 0):
            step = draw(st.sampled_from(tasks))
            outcome = mostly(draw, step["outcomes"], list(OUTCOMES))
            condition = {"step": mostly(draw, [step["task"]], ["ghost"]), "outcome": outcome}
            rules.append({"when": condition, "go": mostly(draw, onward, [*names, "nowhere"])})
        otherwise = mostly(draw, onward[:1], [*names, "nowhere"])
        stage: dict[str, Any] = {"do": tasks, "then": [*rules, {"otherwise": otherwise}]}
        if not rules and draw(st.booleans()):
            stage["then"] = otherwise
        if draw(st.integers(0, 2)):
            bound = {
                "max_visits": draw(st.integers(1, 5)),
                "on_max_visits": mostly(draw, onward, names),
            }
            stage |= bound
        body[name] = stage
    body |= {name: {"end": {"outcome": name}} for name in ends}
    doc = tiny() | {"start": mostly(draw, stages[:1], ["nowhere", *stages])}
    doc["stages"] = body
    breakage = draw(st.sampled_from([None] * 10 + ["title", "junk", "then", "do"]))
    victim = body[draw(st.sampled_from(stages))]
    if breakage == "title":
        del doc["title"]
    elif breakage == "junk":
        victim["junk"] = 1
    elif breakage == "then":
        victim["then"] = 7
    elif breakage == "do":
        victim["do"] = [{"task": "x"}]
    return doc


def can_end(doc: dict[str, Any], start: str) -> bool:
    """From `start`, some end stage can be reached, by the raw document: `then` targets, and
    where an entry goes on through on_max_visits."""
    stages = doc["stages"]

    def entries(target: str) -> list[str]:
        chain = [target]
        while stages[chain[-1]].get("on_max_visits") in stages.keys() - set(chain):
            chain.append(stages[chain[-1]]["on_max_visits"])
        return chain

    seen, queue = {start}, [start]
    while queue:
        stage = stages[queue.pop()]
        if "end" in stage:
            return True
        then = stage["then"]
        targets = [then] if isinstance(then, str) else [r.get("go") or r["otherwise"] for r in then]
        for after in (e for t in targets for e in entries(t)):
            if after not in seen:
                seen.add(after)
                queue.append(after)
    return False


@given(documents())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_checker_never_crashes_and_every_accepted_stage_can_end(doc: dict[str, Any]) -> None:
    try:
        parse_blueprint(doc)
    except ValidationError as err:
        event("refused")
        assert err.errors() and all(e["loc"] for e in err.errors())
        return
    event("accepted")
    assert all(can_end(doc, name) for name in doc["stages"])
