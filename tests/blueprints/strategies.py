"""Hypothesis strategies of blueprint documents (plain dicts, as YAML gives them), and values
that fit a blueprint's fields.

`documents()` draws 1-6 stages of tasks, approvals, calls, waits and parallel steps with `then`
strings or rules (step outcomes, field comparisons, visits, all/any/not), loops bounded by
`max_visits`, task timers (elapsed and business time, with and without a calendar), stage and
process SLAs, input fields of every type, events with fields and end stages with required
fields. Most are built to pass the checker; `hostile` ones then have one to three parts broken
(unknown stages, unbounded loops, a missing otherwise, wrong types, duplicates, huge numbers,
unknown keys...), which the checker may or may not notice.

`fitting_value(spec, rng, literals)` is a value a form would send for a field (text, as a
decision's fields are), checked with the engine's own reading (`engine.coerce`).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from core.roles import KNOWN_ROLES
from workflows.blueprint import engine as eng
from workflows.blueprint.model import FieldSpec

ROLES = sorted(KNOWN_ROLES - {"requester"})
REQUESTER = "rita"  # who starts the instances: never an assignee, never a decider
PEOPLE = ("ana", "bob", "cora")  # usernames an assignee field holds
OUTCOMES = ("done", "ok", "no", "redo", "later")
FIELD_TYPES = ("string", "text", "email", "int", "decimal", "date", "datetime", "bool", "choice")
# patterns of text fields, with values that match them (the walk's SAMPLE_TEXTS match each too)
PATTERNS: dict[str, tuple[str, ...]] = {
    "^[A-Z0-9-]{3,40}$": ("AB-123", "SAMPLE-1", "X9Z"),
    "^[a-z]+$": ("sample", "abc"),
    "[0-9]": ("a1", "AB-123", "1"),
}
TEXTS = ("sample", "AB-123", "a1", "A", "Quarterly review", "x" * 50)
EMAILS = ("ana@example.com", "bob@example.org")
ELAPSED = ("PT1S", "PT30S", "PT5M", "PT1H", "PT4H", "P1D", "P2D", "P7D", "P30D", "P366D")
# in the order of their length in any calendar whose day has at least 5 working hours
BUSINESS = ("PT30M", "PT1H", "PT4H", "P1D", "P1DT2H", "P2D", "P5D")
TEMPLATES = ("welcome", "status_update", "closed")
ZONES = ("UTC", "Europe/Bucharest", "America/New_York", "Asia/Tokyo")


# ----------------------------------------------------------------------------- values
def fitting_value(spec: FieldSpec, rng: random.Random, literals: Sequence[Any] = ()) -> str | None:
    """A text a form could send for a field of `spec` that the engine reads as a value (near
    the `literals` conditions compare it with, now and then); None if none is found."""
    candidates: list[Any] = []
    for literal in literals:
        candidates += [literal, *_near(spec, literal)]
    match spec.type:
        case "int" | "decimal":
            low = spec.min if spec.min is not None else Decimal(-5)
            high = spec.max if spec.max is not None else low + 1000
            candidates += [low, high, low + 1, Decimal(rng.randint(0, 100)) + low]
            if spec.type == "decimal":
                candidates.append(low + Decimal("0.5"))
        case "bool":
            candidates += [True, False]
        case "date":
            candidates += [_day(rng).isoformat()]
        case "datetime":
            candidates += [
                f"{_day(rng).isoformat()}T09:30:00{rng.choice(['+00:00', '+02:00', ''])}"
            ]
        case "choice":
            candidates += list(spec.options or ())
        case "email":
            candidates += list(EMAILS)
        case _:
            candidates += [*PATTERNS.get(spec.pattern or "", ()), *TEXTS, *PEOPLE]
    texts = [_as_text(spec, value) for value in candidates]
    fitting = [text for text in texts if _fits(spec, text)]
    return rng.choice(fitting) if fitting else None


def _day(rng: random.Random) -> date:
    """A day from a few years back to a few years ahead (a wait until it may pass at once)."""
    return date(2024, 1, 1) + timedelta(days=rng.randint(0, 5 * 365))


def _near(spec: FieldSpec, literal: Any) -> list[Any]:
    try:
        match spec.type:
            case "int" | "decimal":
                number = Decimal(str(literal))
                return [number - 1, number + 1]
            case "date":
                day = date.fromisoformat(str(literal))
                return [(day + timedelta(days=d)).isoformat() for d in (-1, 1)]
    except (ArithmeticError, ValueError):
        pass
    return []


def _as_text(spec: FieldSpec, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal) and spec.type == "int":
        return str(int(value)) if value == value.to_integral_value() else format(value, "f")
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _fits(spec: FieldSpec, text: str) -> bool:
    try:
        return eng.coerce(spec, text) is not None
    except (ValueError, TypeError, ArithmeticError):
        return False


# ----------------------------------------------------------------------------- documents
@dataclass
class _Doc:
    """What a document being drawn has declared so far."""

    fields: dict[str, dict[str, Any]] = field(default_factory=dict)  # every field, by name
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    business: bool = False  # some timer says business_time
    counter: int = 0
    unnamed: set[str] = field(default_factory=set)  # calls named by their activity, this stage

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def of_types(self, *types: str) -> list[str]:
        return [name for name, spec in self.fields.items() if spec["type"] in types]


def _pick(draw: st.DrawFn, items: Sequence[Any]) -> Any:
    return draw(st.sampled_from(list(items)))


def _chance(draw: st.DrawFn, p: float) -> bool:
    return draw(st.integers(0, 99)) < p * 100


@st.composite
def field_specs(draw: st.DrawFn, types: Sequence[str] = FIELD_TYPES) -> dict[str, Any]:
    """A field of any type, with the options its type takes."""
    kind = _pick(draw, types)
    spec: dict[str, Any] = {"type": kind}
    if _chance(draw, 0.2):
        spec["label"] = "A " + kind
    if kind in ("string", "text") and _chance(draw, 0.3):
        spec["pattern"] = _pick(draw, list(PATTERNS))
    if kind in ("string", "text", "email") and _chance(draw, 0.3):
        # short enough to matter, long enough that a value of the pattern (an e-mail) fits
        short = [] if "pattern" in spec else [1] if kind != "email" else []
        spec["max_length"] = _pick(draw, [*short, *([6] * (kind != "email")), 200, 4000])
    if kind in ("int", "decimal"):
        low = draw(st.sampled_from([None, -10, 0, 1, 100]))
        if low is not None:
            spec["min"] = low
        if low is not None and _chance(draw, 0.4):
            spec["max"] = low + _pick(draw, [0, 5, 10_000])
        if (
            kind == "decimal"
            and low is not None
            and spec.get("max", low + 1) > low
            and _chance(draw, 0.3)
        ):
            spec["min"] = f"{spec['min']}.25"
    if kind == "choice":
        spec["options"] = draw(
            st.lists(
                st.sampled_from(["gold", "silver", "bronze", "web", "mail"]),
                min_size=1,
                max_size=4,
                unique=True,
            )
        )
    return spec


def _duration(draw: st.DrawFn, business: bool) -> str:
    return _pick(draw, BUSINESS if business else ELAPSED)


def _ordered_durations(draw: st.DrawFn, business: bool, n: int) -> list[str]:
    pool = BUSINESS if business else ELAPSED
    indexes = sorted(
        draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n, unique=True))
    )
    return [pool[i] for i in indexes]


def _timers(draw: st.DrawFn, doc: _Doc, outcomes: Sequence[str] | None) -> dict[str, Any]:
    """A timer set: reminder, escalations, deadline (and, for a task, on_deadline), in order."""
    business = _chance(draw, 0.25)
    keys = draw(
        st.lists(
            st.sampled_from(["remind", "escalate", "escalate2", "deadline"]),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    order = [k for k in ("remind", "escalate", "escalate2", "deadline") if k in keys]
    spans = _ordered_durations(draw, business, len(order))
    timers: dict[str, Any] = {"business_time": True} if business else {}
    for key, span in zip(order, spans, strict=True):
        if key == "remind":
            timers["remind_after"] = span
        elif key.startswith("escalate"):
            timers.setdefault("escalations", []).append(
                {"after": span, "to_role": _pick(draw, ROLES)}
            )
        else:
            timers["deadline"] = span
            if outcomes is not None:
                timers["on_deadline"] = _pick(draw, outcomes)
    doc.business |= business
    return timers


def _task(draw: st.DrawFn, doc: _Doc) -> dict[str, Any]:
    name = doc.name("t")
    outcomes = draw(st.lists(st.sampled_from(OUTCOMES), min_size=1, max_size=3, unique=True))
    task: dict[str, Any] = {"task": name, "title": _pick(draw, ["Review", "Check it", "Decide"])}
    assignees = doc.of_types("string", "email")
    if assignees and _chance(draw, 0.2):
        task["assignee"] = _pick(draw, assignees)
    else:
        task["roles"] = draw(st.lists(st.sampled_from(ROLES), min_size=1, max_size=3, unique=True))
    fields: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 3))):
        if doc.fields and _chance(draw, 0.15):  # the same field again, declared alike
            reused = _pick(draw, sorted(doc.fields))
            if not reused.startswith("ref"):
                fields[reused] = doc.fields[reused]
                continue
        spec = draw(field_specs())
        if _chance(draw, 0.2):
            spec["required"] = True
        fields[doc.name("tf")] = spec
    if fields:
        task["fields"] = fields
        doc.fields |= {k: v for k, v in fields.items() if k not in doc.fields}
    task["outcomes"] = outcomes
    required: dict[str, list[str]] = {}
    for outcome in outcomes:
        if _chance(draw, 0.4):
            names = [*fields, "comment"]
            required[outcome] = draw(
                st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)
            )
    if required:
        task["required"] = required
    if _chance(draw, 0.2):
        task["four_eyes"] = draw(st.booleans())
    if _chance(draw, 0.4):
        task["timers"] = _timers(draw, doc, outcomes)
    return task


def _approval(draw: st.DrawFn, doc: _Doc) -> dict[str, Any]:
    step: dict[str, Any] = {"approval": doc.name("a"), "title": "Approve"}
    amounts = doc.of_types("int", "decimal")
    use_amount = bool(amounts) and _chance(draw, 0.6)
    if use_amount:
        step["amount_field"] = _pick(draw, amounts)
    thresholds = sorted(
        draw(
            st.lists(st.sampled_from([0, 1, 50, 500, 10_000]), min_size=1, max_size=3, unique=True)
        )
    )
    levels = []
    for i, threshold in enumerate(
        thresholds if use_amount else thresholds[:1] * draw(st.integers(1, 2))
    ):
        roles = draw(st.lists(st.sampled_from(ROLES), min_size=1, max_size=3, unique=True))
        level: dict[str, Any] = {"name": f"Level {i + 1}", "roles": roles}
        if use_amount and threshold:
            level["min_amount"] = threshold
        mode = _pick(draw, ["sequential", "all", "k_of_n"])
        if mode != "sequential" or _chance(draw, 0.3):
            level["mode"] = mode
        if mode == "k_of_n":
            level["k"] = draw(st.integers(1, len(roles)))
        levels.append(level)
    step["levels"] = levels
    if _chance(draw, 0.3):
        step["timers"] = _timers(draw, doc, None)
    return step


def _call(draw: st.DrawFn, doc: _Doc) -> dict[str, Any]:
    activity = _pick(draw, ["notify_customer", "notify_role", "record_note"])
    texts = doc.of_types("string", "text")
    emails = doc.of_types("email")
    with_: dict[str, Any]
    if activity == "notify_customer":
        with_ = {"template": _pick(draw, TEMPLATES)}
        if emails and _chance(draw, 0.4):
            with_["to"] = {"field": _pick(draw, emails)}
        elif _chance(draw, 0.2):
            with_["to"] = _pick(draw, EMAILS)
    elif activity == "notify_role":
        with_ = {"role": _pick(draw, ROLES), "template": _pick(draw, TEMPLATES)}
    else:
        text: Any = {"field": _pick(draw, texts)} if texts and _chance(draw, 0.5) else "noted"
        with_ = {"text": text}
    if _chance(draw, 0.08):  # a `with` the catalog refuses
        broken = _pick(draw, ["unknown", "missing", "bad_value", "unknown_field"])
        if broken == "unknown":
            with_["colour"] = "red"
        elif broken == "missing":
            with_ = {}
        elif broken == "bad_value":
            with_ = {k: ("Not A Template" if k == "template" else 7) for k in with_}
        else:
            with_[next(iter(with_))] = {"field": "ghost"}
    step: dict[str, Any] = {"call": activity}
    if activity in doc.unnamed or _chance(draw, 0.5):
        step["name"] = doc.name("c")
    else:
        doc.unnamed.add(activity)
    if with_ or _chance(draw, 0.5):
        step["with"] = with_
    return step


def _wait(draw: st.DrawFn, doc: _Doc) -> dict[str, Any]:
    kinds = ["after"]
    if doc.of_types("date", "datetime"):
        kinds.append("until")
    if doc.events:
        kinds += ["event", "event"]
    kind = _pick(draw, kinds)
    if kind == "after":
        business = _chance(draw, 0.25)
        doc.business |= business
        spec: dict[str, Any] = {"after": _duration(draw, business)}
        if business:
            spec["business_time"] = True
        return {"wait": spec}
    if kind == "until":
        return {"wait": {"until": _pick(draw, doc.of_types("date", "datetime"))}}
    business = _chance(draw, 0.2)
    doc.business |= business
    spec = {"event": _pick(draw, sorted(doc.events)), "timeout": _duration(draw, business)}
    if business:
        spec["business_time"] = True
    return {"wait": spec, "name": doc.name("w")}


def _step(draw: st.DrawFn, doc: _Doc, depth: int = 0) -> dict[str, Any]:
    kinds = ["task", "task", "task", "approval", "call", "wait", "parallel"]
    kind = _pick(draw, kinds if depth == 0 else kinds[:-1])
    if kind == "approval":
        return _approval(draw, doc)
    if kind == "call":
        return _call(draw, doc)
    if kind == "wait":
        return _wait(draw, doc)
    if kind == "parallel":
        branches = {
            f"b{i}": [_step(draw, doc, depth + 1) for _ in range(draw(st.integers(1, 2)))]
            for i in range(draw(st.integers(2, 3)))
        }
        return {"parallel": doc.name("p"), "branches": branches}
    return _task(draw, doc)


def _named_steps(steps: list[dict[str, Any]]) -> list[tuple[str, tuple[str, ...]]]:
    """The steps (branches' too) a condition can name, with their outcomes."""
    found: list[tuple[str, tuple[str, ...]]] = []
    for step in steps:
        if "task" in step:
            outcomes = tuple(step["outcomes"])
            found.append((step["task"], outcomes))
        elif "approval" in step:
            timed = "deadline" in step.get("timers", {})
            found.append((step["approval"], ("approved", "rejected", *(["timed_out"] * timed))))
        elif "wait" in step and "event" in step["wait"]:
            found.append((step.get("name") or step["wait"]["event"], ("received", "timed_out")))
        elif "parallel" in step:
            for branch in step["branches"].values():
                found += _named_steps(branch)
    return found


def _literal(draw: st.DrawFn, spec: dict[str, Any]) -> Any:
    match spec["type"]:
        case "int":
            return draw(st.integers(-5, 600))
        case "decimal":
            return _pick(draw, [0, 10, 99.5, 1000])
        case "date":
            return _pick(draw, ["2025-06-01", "2028-01-01", "2029-12-31"])
        case "datetime":
            return _pick(draw, ["2026-03-01T10:00:00+00:00", "2029-01-01T00:00:00"])
        case "bool":
            return draw(st.booleans())
        case "choice":
            return _pick(draw, spec["options"])
        case "email":
            return _pick(draw, EMAILS)
    return _pick(draw, TEXTS)


def _condition(
    draw: st.DrawFn,
    doc: _Doc,
    steps: list[tuple[str, tuple[str, ...]]],
    stages: list[str],
    depth: int = 0,
) -> dict[str, Any]:
    kinds = ["field", "visits"] + ["step"] * 3 * bool(steps)
    if depth < 2:
        kinds += ["all", "any", "not"]
    kind = _pick(draw, kinds)
    if kind == "step":
        name, outcomes = _pick(draw, steps)
        return {"step": name, "outcome": _pick(draw, outcomes)}
    if kind == "visits":
        return {"visits": _pick(draw, stages), "gte": draw(st.integers(1, 3))}
    if kind == "field":
        name = _pick(draw, sorted(doc.fields))
        spec = doc.fields[name]
        ordered = spec["type"] in ("int", "decimal", "date", "datetime")
        op = _pick(draw, ["eq", "ne", "in", *(["lt", "lte", "gt", "gte"] * 2 * ordered)])
        if op == "in":
            return {
                "field": name,
                "in": [_literal(draw, spec) for _ in range(draw(st.integers(1, 3)))],
            }
        return {"field": name, op: _literal(draw, spec)}
    if kind == "not":
        return {"not": _condition(draw, doc, steps, stages, depth + 1)}
    inner = [
        _condition(draw, doc, steps, stages, depth + 1) for _ in range(draw(st.integers(1, 3)))
    ]
    return {kind: inner}


def _sla(draw: st.DrawFn, doc: _Doc) -> dict[str, Any]:
    business = _chance(draw, 0.25)
    doc.business |= business
    actions = []
    for _ in range(draw(st.integers(1, 2))):
        role = _pick(draw, ROLES)
        actions.append(
            {"escalate": {"to_role": role}} if draw(st.booleans()) else {"notify": {"role": role}}
        )
    sla: dict[str, Any] = {"within": _duration(draw, business), "on_breach": actions}
    if business:
        sla["business_time"] = True
    return sla


def _calendar(draw: st.DrawFn) -> dict[str, Any]:
    calendar: dict[str, Any] = {"timezone": _pick(draw, ZONES)}
    if _chance(draw, 0.3):
        calendar["working_days"] = _pick(
            draw, [["mon", "tue", "wed", "thu", "fri", "sat"], ["mon", "wed", "fri"]]
        )
    if _chance(draw, 0.3):
        calendar["hours"] = {"start": "08:00", "end": "18:00"}
    if _chance(draw, 0.2):
        calendar["holidays"] = {"country": _pick(draw, ["RO", "US", "DE"])}
    return calendar


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A document built to pass the checker (a few, by the draw, do not: over the budget...)."""
    doc = _Doc()
    key_type = _pick(draw, ["string", "email", "int"])
    key: dict[str, Any] = {"type": key_type, "required": True}
    if key_type == "string" and _chance(draw, 0.4):
        key["pattern"] = "^[A-Z0-9-]{3,40}$"
    inputs: dict[str, Any] = {"ref": key}
    for _ in range(draw(st.integers(0, 4))):
        spec = draw(field_specs())
        if _chance(draw, 0.4):
            spec["required"] = True
        inputs[doc.name("in")] = spec
    if _chance(draw, 0.3):  # a username field an assignee reads
        inputs["owner_user"] = {"type": "string", "required": draw(st.booleans())}
    doc.fields |= inputs
    for _ in range(draw(st.integers(0, 2))):
        fields = {doc.name("ev"): draw(field_specs()) for _ in range(draw(st.integers(0, 2)))}
        for spec in fields.values():
            spec.setdefault("required", _chance(draw, 0.3))
        event: dict[str, Any] = {"fields": fields} if fields else {}
        if _chance(draw, 0.3):
            event["roles"] = [_pick(draw, ROLES)]
        doc.events[doc.name("event")] = event
        doc.fields |= fields

    n = draw(st.integers(1, 6))
    stages = [f"s{i}" for i in range(n)]
    ends = ["finished", "closed"][: draw(st.integers(1, 2))]
    names = [*stages, *ends]
    body: dict[str, dict[str, Any]] = {}
    loops: dict[str, int] = {}  # a back edge's target -> the furthest stage it comes back from
    for i, name in enumerate(stages):
        doc.unnamed = set()
        steps = [_step(draw, doc) for _ in range(draw(st.integers(0, 3)))]
        named = _named_steps(steps)
        forward = names[i + 1 :]
        rules = []
        for _ in range(draw(st.integers(0, 2))):
            back = _chance(draw, 0.3)
            target = _pick(draw, stages[: i + 1]) if back else _pick(draw, forward)
            if back:
                loops[target] = max(loops.get(target, 0), i)
            rules.append({"when": _condition(draw, doc, named, stages), "go": target})
        otherwise = forward[0] if _chance(draw, 0.85) else _pick(draw, forward)
        stage: dict[str, Any] = {}
        if _chance(draw, 0.2):
            stage["title"] = f"Stage {name}"
        if steps or _chance(draw, 0.5):
            stage["do"] = steps
        stage["then"] = [*rules, {"otherwise": otherwise}]
        if not rules and draw(st.booleans()):
            stage["then"] = otherwise
        if _chance(draw, 0.2):
            stage["sla"] = _sla(draw, doc)
        body[name] = stage
    for target, furthest in loops.items():  # every loop bounded, its overflow leaving it
        onward = [*stages[furthest + 1 :], *ends]
        body[target]["max_visits"] = draw(st.integers(1, 3))
        body[target]["on_max_visits"] = _pick(draw, onward)
    for name in stages:
        if name not in loops and _chance(draw, 0.1):
            body[name]["max_visits"] = draw(st.integers(1, 3))
            body[name]["on_max_visits"] = _pick(draw, names[names.index(name) + 1 :])
    _reach_every_stage(body, stages[0])
    ends = [name for name in ends if any(name in _targets(body, s) for s in stages)]
    names = [*stages, *ends]
    given = sorted(name for name, spec in inputs.items() if spec.get("required"))
    for name in ends:
        end: dict[str, Any] = {"outcome": name}
        if _chance(draw, 0.25):  # fields every instance has, mostly; any field now and then
            pool = given if given and _chance(draw, 0.8) else sorted(doc.fields)
            end["required"] = draw(
                st.lists(st.sampled_from(pool), min_size=1, max_size=2, unique=True)
            )
        body[name] = {"end": end}

    document: dict[str, Any] = {
        "process": "generated",
        "dsl": 1,
        "title": "Generated",
        "description": "A generated process.",
        "owner_role": _pick(draw, ROLES),
        "business_key": "ref",
        "input": inputs,
        "start": stages[0],
        "stages": body,
    }
    if doc.events:
        document["events"] = doc.events
    if _chance(draw, 0.25):
        start = draw(st.integers(0, n - 1))
        until = draw(
            st.lists(st.sampled_from(names[start + 1 :]), min_size=1, max_size=2, unique=True)
        )
        document["sla"] = [
            {"name": "overall", "from": stages[start], "until": until, **_sla(draw, doc)}
        ]
    if doc.business and _chance(draw, 0.9) or _chance(draw, 0.1):
        document["calendar"] = _calendar(draw)
    return document


def _targets(body: dict[str, dict[str, Any]], name: str) -> list[str]:
    """Where a stage of a document being drawn goes on: its `then` targets and where an entry
    into each goes past its max_visits (as the checker's successors)."""
    then = body[name].get("then", [])
    found = []
    for target in (
        [then] if isinstance(then, str) else [r.get("go") or r["otherwise"] for r in then]
    ):
        while target is not None and target not in found:
            found.append(target)
            target = body.get(target, {}).get("on_max_visits")
    return found


def _reach_every_stage(body: dict[str, dict[str, Any]], start: str) -> None:
    """Lead each stage no `then` leads to from the one before it (an `otherwise` skipping it
    now goes to it)."""
    stages = list(body)
    for before, name in zip(stages, stages[1:], strict=False):
        reached, queue = {start}, [start]
        while queue:
            for after in _targets(body, queue.pop()):
                if after in body and after not in reached:
                    reached.add(after)
                    queue.append(after)
        if name not in reached:
            then = body[before]["then"]
            if isinstance(then, str):
                body[before]["then"] = name
            else:
                then[-1] = {"otherwise": name}


# ----------------------------------------------------------------------------- hostile
def _stage_names(doc: dict[str, Any]) -> list[str]:
    return sorted(doc["stages"])


def _working(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in doc["stages"].values() if "end" not in s]


def _all_steps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found = []

    def add(steps: list[dict[str, Any]]) -> None:
        for step in steps:
            found.append(step)
            for branch in step.get("branches", {}).values():
                add(branch)

    for stage in _working(doc):
        add(stage.get("do", []))
    return found


def _mutate(draw: st.DrawFn, doc: dict[str, Any], kind: str) -> None:
    stages = _working(doc)
    stage = _pick(draw, stages)
    steps = _all_steps(doc)
    tasks = [s for s in steps if "task" in s]
    if kind == "unknown_stage":
        where = _pick(draw, ["start", "then", "on_max_visits", "sla"])
        if where == "start":
            doc["start"] = "nowhere"
        elif where == "sla":
            doc["sla"] = [
                {
                    "name": "x",
                    "from": "nowhere",
                    "until": ["s0"],
                    "within": "P1D",
                    "on_breach": [{"notify": {"role": "manager"}}],
                }
            ]
        elif where == "on_max_visits":
            stage |= {"max_visits": 2, "on_max_visits": "nowhere"}
        else:
            stage["then"] = "nowhere"
    elif kind == "unbounded_loop":
        for s in stages:
            s.pop("max_visits", None)
            s.pop("on_max_visits", None)
        stage["then"] = [{"when": {"visits": "s0", "gte": 1}, "go": "s0"}, {"otherwise": "s0"}]
    elif kind == "missing_otherwise":
        then = stage["then"]
        rules = [r for r in then if "otherwise" not in r] if isinstance(then, list) else []
        stage["then"] = rules or [{"when": {"visits": "s0", "gte": 1}, "go": "s0"}]
    elif kind == "wrong_type":
        target, key, value = _pick(
            draw,
            [
                (doc, "title", 7),
                (doc, "dsl", "1"),
                (doc, "input", []),
                (doc, "stages", "s0"),
                (stage, "then", 7),
                (stage, "max_visits", "three"),
                (stage, "do", {"task": "x"}),
                *[(t, "outcomes", "done") for t in tasks[:1]],
                *[(t, "roles", "manager") for t in tasks[:1]],
                *[(t, "fields", {"f": {"type": "number"}}) for t in tasks[:1]],
            ],
        )
        target[key] = value
    elif kind == "duplicate":
        what = _pick(draw, ["step", "outcome", "role", "sla", "field"])
        if what == "step" and stage.get("do"):
            stage["do"].append(copy.deepcopy(stage["do"][0]))
        elif what == "outcome" and tasks:
            tasks[0]["outcomes"] = [*tasks[0]["outcomes"], tasks[0]["outcomes"][0]]
        elif what == "role" and tasks and "roles" in tasks[0]:
            tasks[0]["roles"] = [*tasks[0]["roles"], tasks[0]["roles"][0]]
        elif what == "sla":
            sla = {
                "name": "twice",
                "from": "s0",
                "until": [_stage_names(doc)[0]],
                "within": "P1D",
                "on_breach": [{"notify": {"role": "manager"}}],
            }
            doc["sla"] = [sla, dict(sla)]
        elif tasks:  # a field declared again with another type
            tasks[0]["fields"] = {"ref": {"type": "bool"}}
    elif kind == "huge":
        what = _pick(draw, ["visits", "duration", "amount", "k", "gte", "length", "bounds"])
        if what == "visits":
            stage |= {
                "max_visits": _pick(draw, [10**6, 1000, 0, -1]),
                "on_max_visits": _stage_names(doc)[0],
            }
        elif what == "duration" and tasks:
            tasks[0]["timers"] = {"remind_after": _pick(draw, ["P99999D", "PT0S", "-P1D", 10**9])}
        elif what == "amount":
            doc["input"]["big"] = {"type": "decimal", "min": _pick(draw, ["1e20", 10**20, "NaN"])}
        elif what == "k" and tasks:
            stage.setdefault("do", []).append(
                {
                    "approval": "huge_k",
                    "title": "A",
                    "levels": [{"name": "L", "roles": ["manager"], "mode": "k_of_n", "k": 99}],
                }
            )
        elif what == "gte":
            stage["then"] = [
                {"when": {"visits": "s0", "gte": 10**7}, "go": "s0"},
                {"otherwise": _stage_names(doc)[0]},
            ]
        elif what == "length":
            doc["input"]["long"] = {"type": "text", "max_length": 10**9}
        else:
            doc["input"]["odd"] = {"type": "int", "min": 10, "max": 1}
    elif kind == "unknown_key":
        target = _pick(draw, [doc, stage, *(tasks[:1])])
        target[_pick(draw, ["retries", "colour", "url"])] = 3
    elif kind == "timers_order" and tasks:
        tasks[0]["timers"] = {
            "remind_after": "P2D",
            "deadline": "P1D",
            "on_deadline": tasks[0]["outcomes"][0],
        }
    elif kind == "reserved":
        doc["stages"][_pick(draw, ["failed", "cancelled"])] = {"end": {"outcome": "x"}}
    elif kind == "no_calendar":
        doc.pop("calendar", None)
        if tasks:
            tasks[0]["timers"] = {"business_time": True, "remind_after": "P1D"}
    elif kind == "over_budget":
        loop = {"max_visits": 1000, "on_max_visits": _stage_names(doc)[0]}
        first = doc["stages"][doc["start"]] if doc["start"] in doc["stages"] else stage
        if "end" not in first:
            first |= loop
            review = {"task": "again", "title": "Again", "roles": ["manager"], "outcomes": ["ok"]}
            first.setdefault("do", []).append(review)
            first["then"] = [
                {"when": {"visits": "s0", "gte": 1}, "go": doc["start"]},
                {"otherwise": doc["start"]},
            ]
    elif kind == "unknown_reference":
        what = _pick(draw, ["event", "step", "field", "activity", "assignee"])
        if what == "event":
            stage.setdefault("do", []).append({"wait": {"event": "ghost", "timeout": "P1D"}})
        elif what == "step":
            stage["then"] = [
                {"when": {"step": "ghost", "outcome": "done"}, "go": "s0"},
                {"otherwise": _stage_names(doc)[0]},
            ]
        elif what == "field":
            stage["then"] = [
                {"when": {"field": "ghost", "eq": 1}, "go": "s0"},
                {"otherwise": _stage_names(doc)[0]},
            ]
        elif what == "activity":
            stage.setdefault("do", []).append({"call": "send_fax"})
        elif tasks:
            tasks[0].pop("roles", None)
            tasks[0]["assignee"] = "ghost"


MUTATIONS = (
    "unknown_stage",
    "unbounded_loop",
    "missing_otherwise",
    "wrong_type",
    "duplicate",
    "huge",
    "unknown_key",
    "timers_order",
    "reserved",
    "no_calendar",
    "over_budget",
    "unknown_reference",
)


@st.composite
def hostile_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid-looking document with one to three parts broken (or, by chance, not)."""
    doc = copy.deepcopy(draw(valid_documents()))
    for kind in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        try:
            _mutate(draw, doc, kind)
        except (AttributeError, KeyError, TypeError, IndexError):
            pass  # an earlier breakage left nothing of the shape this one breaks
    return doc


def documents() -> st.SearchStrategy[dict[str, Any]]:
    """Mostly documents built to pass the checker, a quarter of them broken."""
    return st.one_of(valid_documents(), valid_documents(), valid_documents(), hostile_documents())
