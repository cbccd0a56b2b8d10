"""Human tasks: steps that wait for a person, with claim, delegation, reminders and escalation.

Deterministic building block used inside workflows. A `TaskBoard` owns a process instance's
tasks; it validates and applies actions (raising `ApplicationError` with a typed `type`, which
update validators let through so that nothing enters history) and tells the workflow which
timer (reminder, escalation, final deadline) is due next. Side effects (projection, mail) stay
with the workflow, which runs them as activities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from temporalio.exceptions import ApplicationError

from workflows.calendar import BusinessCalendar, BusinessDuration, CalendarError, due

# Error types that validators raise (the API maps them): defined in workflows.errors
from workflows.errors import CONFLICT as CONFLICT
from workflows.errors import FOUR_EYES as FOUR_EYES
from workflows.errors import INVALID_DECISION as INVALID_DECISION
from workflows.errors import NOT_PERMITTED as NOT_PERMITTED
from workflows.errors import TASK_CLOSED as TASK_CLOSED
from workflows.errors import TASK_NOT_FOUND as TASK_NOT_FOUND
from workflows.errors import refuse as _refuse

MANAGER_ROLE = "manager"
SYSTEM_ACTOR = "system"
TIMED_OUT = "timed_out"
WITHDRAWN = "withdrawn"
# A task keeps its newest events only (older ones live in the audit log): its state, and what
# an update echoes back, stay small however often it is claimed and released.
HISTORY_KEPT = 50

# A task's kind is data: a name the process declares (`HumanProcess.TASK_KINDS`), checked when
# the task opens. "approval" tasks also follow the four-eyes rule across one instance.
TaskKind = str
APPROVAL_KIND = "approval"


class Actor(BaseModel):
    """The acting user, always taken from the caller's credentials by the API."""

    model_config = ConfigDict(frozen=True)

    username: str
    roles: list[str] = Field(default_factory=list)


class TaskEvent(BaseModel):
    at: datetime
    actor: str
    action: str
    detail: str = ""


# A timer's duration: elapsed time, or business time by the instance's calendar. Both are
# written as ISO 8601 ("P2D"), so a timer set says which it holds (`business_time`) and its
# strings are read accordingly; the union then tries elapsed time first.
TimerSpan = Annotated[timedelta | BusinessDuration, Field(union_mode="left_to_right")]
DURATION_KEYS = ("remind_after", "escalate_after", "deadline")


def read_business_durations(data: Any) -> Any:
    """A timer set's raw data with its duration strings read as business durations, when it
    says `business_time: true` (for the `before` validators of timer sets); a string that is
    no business duration is refused at its location."""
    if not isinstance(data, dict) or data.get("business_time") is not True:
        return data
    data = dict(data)
    errors: list[InitErrorDetails] = []

    def read(value: Any, loc: tuple[str | int, ...]) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return BusinessDuration.parse(value)
        except ValidationError as err:
            e = err.errors()[0]
            kind = PydanticCustomError(e["type"], e["msg"])
            errors.append(InitErrorDetails(type=kind, loc=loc, input=value))
            return value

    for key in DURATION_KEYS:
        if key in data:
            data[key] = read(data[key], (key,))
    levels = data.get("escalations")
    if isinstance(levels, list):
        data["escalations"] = [
            {**level, "after": read(level["after"], ("escalations", i, "after"))}
            if isinstance(level, dict) and "after" in level
            else level
            for i, level in enumerate(levels)
        ]
    if errors:
        raise ValidationError.from_exception_data("TaskTimers", errors)
    return data


def timer_kind_errors(
    business_time: bool, spans: Sequence[tuple[tuple[str | int, ...], object]]
) -> list[tuple[tuple[str | int, ...], str]]:
    """(loc, message) for each duration of the wrong kind for the timer set's `business_time`."""
    errors = []
    for loc, value in spans:
        if business_time and isinstance(value, timedelta):
            message = "with business_time, a timer is a business duration such as P2D or PT4H"
            errors.append((loc, message))
        elif not business_time and isinstance(value, BusinessDuration):
            errors.append((loc, "a business duration needs business_time: true"))
    return errors


class Escalation(BaseModel):
    """One level of escalation: `after` the task opened, `to_role` may act too."""

    after: TimerSpan
    to_role: str


class TaskTimes(BaseModel):
    """Durations from the task's opening. `escalations`, when given, are every level (stacked,
    in time order) and replace `escalate_after`/`escalation_role` (one level). With
    `business_time` every duration is a `BusinessDuration`, turned into an instant by the
    instance's business calendar when the task opens."""

    business_time: bool = False
    remind_after: TimerSpan | None = None
    escalate_after: TimerSpan | None = None
    deadline: TimerSpan | None = None
    escalation_role: str | None = None
    escalations: list[Escalation] = Field(default_factory=list)

    _business = model_validator(mode="before")(read_business_durations)

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        spans: list[tuple[tuple[str | int, ...], object]]
        spans = [((key,), getattr(self, key)) for key in DURATION_KEYS]
        spans += [(("escalations", i, "after"), e.after) for i, e in enumerate(self.escalations)]
        for loc, message in timer_kind_errors(self.business_time, spans):
            raise PydanticCustomError("timer_kind", f"{'.'.join(map(str, loc))}: {message}")
        return self


class EscalationLevel(BaseModel):
    """A level after the first, with its absolute due time (computed when the task opened)."""

    at: datetime
    to_role: str
    fired: bool = False


class HumanTask(BaseModel):
    task_id: str
    name: str
    kind: str
    candidate_roles: list[str]
    assignee: str | None = None
    appointed: bool = Field(
        False, description="the process named the assignee: they may decide it without a role"
    )
    outcomes: list[str]
    required_fields: dict[str, list[str]] = Field(
        default_factory=dict, description="outcome -> fields that must be non-empty"
    )
    requester: str
    four_eyes: bool = True
    created_at: datetime
    remind_at: datetime | None = None
    escalate_at: datetime | None = None
    deadline_at: datetime | None = None
    escalation_role: str | None = None
    escalations: list[EscalationLevel] = Field(
        default_factory=list, description="levels after the first (escalate_at, escalation_role)"
    )
    reminded: bool = False
    escalated: bool = False
    status: Literal["open", "closed"] = "open"
    outcome: str | None = None
    decided_by: str | None = None
    comment: str = ""
    fields: dict[str, str] = Field(default_factory=dict)
    closed_at: datetime | None = None
    history: list[TaskEvent] = Field(default_factory=list)
    events_dropped: int = Field(0, description="oldest history events no longer kept")
    actions: int = Field(0, description="claims, releases, delegations, reassignments so far")

    @property
    def is_open(self) -> bool:
        return self.status == "open"

    def who_may_act(self) -> str:
        return (
            f"user {self.assignee}" if self.assignee else "roles " + ", ".join(self.candidate_roles)
        )


class DecideInput(BaseModel):
    task_id: str
    outcome: str
    comment: str = ""
    fields: dict[str, str] = Field(default_factory=dict)
    actor: Actor


class TaskActionInput(BaseModel):
    """claim / release / delegate / reassign. `to_user` for delegate and reassign (None: pool),
    with `to_roles`, the roles that user holds now (the API reads them from the users table)."""

    task_id: str
    actor: Actor
    to_user: str | None = None
    to_roles: list[str] | None = None
    comment: str = ""


_PAST = MappingProxyType(
    {
        "claim": "claimed",
        "release": "released",
        "delegate": "delegated",
        "reassign": "reassigned",
    }
)

Due = tuple[datetime, Literal["remind", "escalate", "deadline"], HumanTask]


class TaskBoard:
    """All human tasks of one instance, keyed by id, in creation order."""

    def __init__(self, key_prefix: str, requester: str) -> None:
        self.key_prefix = key_prefix
        self.requester = requester
        self.tasks: dict[str, HumanTask] = {}
        self._seq = 0
        # Since 2026-12 (the workflow sets it behind a patch): whoever finally acts must hold a
        # candidate role, approvers of one instance are distinct people, delegation and
        # reassignment go only to entitled users, and a task takes at most `max_actions`
        # claims/releases/delegations/reassignments. Validators always apply these rules;
        # handlers of older instances replay without them.
        self.strict = False
        self.max_actions: int | None = None

    # ----------------------------------------------------------------- opening and reading
    def open(
        self,
        *,
        name: str,
        kind: str,
        candidate_roles: Sequence[str],
        outcomes: Sequence[str],
        now: datetime,
        times: TaskTimes,
        required_fields: Mapping[str, Sequence[str]] | None = None,
        four_eyes: bool = True,
        calendar: BusinessCalendar | None = None,
        assignee: str | None = None,
    ) -> HumanTask:
        """Open a task; its timers become instants from `now` (business durations by
        `calendar`: `CalendarError` when there is none or it finds no due, and then nothing
        has changed on the board)."""

        def at(span: timedelta | BusinessDuration | None) -> datetime | None:
            if span is None:
                return None
            if isinstance(span, timedelta):  # zero: no timer, as it always was
                return now + span if span else None
            if calendar is None:
                raise CalendarError(
                    f"the business duration {span} needs a business calendar (the policy's "
                    "calendar)"
                )
            return due(calendar, now, span)

        first: Escalation | None = times.escalations[0] if times.escalations else None
        escalate_after = first.after if first else times.escalate_after
        remind_at, escalate_at, deadline_at = (
            at(times.remind_after),
            at(escalate_after),
            at(times.deadline),
        )
        levels = []
        for e in times.escalations[1:]:
            level_at = at(e.after)
            assert level_at is not None
            levels.append(EscalationLevel(at=level_at, to_role=e.to_role))
        self._seq += 1
        task = HumanTask(
            task_id=f"{self.key_prefix}.t{self._seq}",
            name=name,
            kind=kind,
            candidate_roles=list(candidate_roles),
            assignee=assignee,
            appointed=assignee is not None,
            outcomes=list(outcomes),
            required_fields={k: list(v) for k, v in (required_fields or {}).items()},
            requester=self.requester,
            four_eyes=four_eyes,
            created_at=now,
            remind_at=remind_at,
            escalate_at=escalate_at,
            deadline_at=deadline_at,
            escalation_role=first.to_role if first else times.escalation_role,
            escalations=levels,
            history=[TaskEvent(at=now, actor=SYSTEM_ACTOR, action="opened")],
        )
        self.tasks[task.task_id] = task
        return task

    def open_tasks(self) -> list[HumanTask]:
        return [t for t in self.tasks.values() if t.is_open]

    def pending_roles(self) -> list[str]:
        roles: list[str] = []
        for t in self.open_tasks():
            for r in t.candidate_roles:
                if r not in roles:
                    roles.append(r)
        return sorted(roles)

    def get(self, task_id: str) -> HumanTask:
        task = self.tasks.get(task_id)
        if task is None:
            raise _refuse(TASK_NOT_FOUND, f"task {task_id} does not exist in this process")
        return task

    def get_open(self, task_id: str) -> HumanTask:
        task = self.get(task_id)
        if not task.is_open:
            raise _refuse(TASK_CLOSED, f"task {task_id} is already closed ({task.outcome})")
        return task

    # ----------------------------------------------------------------- permissions
    def _check_four_eyes(self, task: HumanTask, username: str) -> None:
        if task.four_eyes and username == task.requester:
            raise _refuse(
                FOUR_EYES, f"{username} requested this process and may not decide its own task"
            )

    def earlier_approvers(self, task: HumanTask) -> list[str]:
        """People who decided another approval task of this instance."""
        return [
            t.decided_by
            for t in self.tasks.values()
            if t.kind == APPROVAL_KIND
            and t.task_id != task.task_id
            and t.decided_by
            and t.decided_by != SYSTEM_ACTOR
        ]

    def _check_entitled(self, task: HumanTask, username: str, roles: Sequence[str]) -> None:
        """username may finally decide task: not the requester, not an earlier approver of this
        instance, and holding one of its candidate roles (the escalation role once escalated)."""
        self._check_four_eyes(task, username)
        if (
            task.four_eyes
            and task.kind == APPROVAL_KIND
            and username in self.earlier_approvers(task)
        ):
            raise _refuse(
                FOUR_EYES,
                f"{username} already decided an earlier approval of this process; "
                "each approval needs another person",
            )
        if task.appointed and task.assignee == username:
            return  # the process named them (a blueprint's assignee from the instance)
        if not set(roles) & set(task.candidate_roles):
            raise _refuse(
                NOT_PERMITTED,
                f"{username} holds none of the roles {task.candidate_roles} of this task",
            )

    def _check_may_act(self, task: HumanTask, actor: Actor, strict: bool) -> None:
        self._check_four_eyes(task, actor.username)
        if task.assignee is not None and task.assignee != actor.username:
            raise _refuse(NOT_PERMITTED, f"task {task.task_id} is taken by {task.assignee}")
        if strict:
            self._check_entitled(task, actor.username, actor.roles)
        elif task.assignee is None and not set(actor.roles) & set(task.candidate_roles):
            raise _refuse(
                NOT_PERMITTED,
                f"{actor.username} holds none of the roles {task.candidate_roles} of this task",
            )

    def _check_target(self, task: HumanTask, inp: TaskActionInput, strict: bool) -> None:
        """The user a task is delegated or reassigned to must be entitled to decide it."""
        assert inp.to_user
        if not strict:
            self._check_four_eyes(task, inp.to_user)
            return
        if inp.to_roles is None:
            raise _refuse(INVALID_DECISION, "to_user: the roles of the user are unknown")
        try:
            self._check_entitled(task, inp.to_user, inp.to_roles)
        except ApplicationError as err:
            if err.type == FOUR_EYES:
                raise
            raise _refuse(
                NOT_PERMITTED,
                f"to_user: {inp.to_user} holds none of the roles {task.candidate_roles} "
                "of this task",
            ) from None

    # ----------------------------------------------------------------- decisions
    def validate_decision(self, inp: DecideInput, strict: bool | None = None) -> HumanTask:
        task = self.get_open(inp.task_id)
        if not task.outcomes:
            raise _refuse(
                INVALID_DECISION, f"task {task.task_id} closes by itself and takes no decision"
            )
        self._check_may_act(task, inp.actor, self.strict if strict is None else strict)
        if inp.outcome not in task.outcomes:
            raise _refuse(
                INVALID_DECISION,
                f"outcome: '{inp.outcome}' is not one of {task.outcomes}",
            )
        for field in task.required_fields.get(inp.outcome, []):
            value = inp.comment if field == "comment" else inp.fields.get(field, "")
            if not value.strip():
                raise _refuse(
                    INVALID_DECISION, f"{field}: required when the outcome is '{inp.outcome}'"
                )
        return task

    def apply_decision(self, inp: DecideInput, now: datetime) -> HumanTask:
        task = self.validate_decision(inp)
        self.close(task, inp.outcome, inp.actor.username, now, comment=inp.comment)
        task.fields = dict(inp.fields)
        return task

    def close(
        self, task: HumanTask, outcome: str, actor: str, now: datetime, comment: str = ""
    ) -> None:
        task.status = "closed"
        task.outcome = outcome
        task.decided_by = actor
        task.comment = comment
        task.closed_at = now
        self._log(task, TaskEvent(at=now, actor=actor, action=outcome, detail=comment))

    @staticmethod
    def _log(task: HumanTask, event: TaskEvent) -> None:
        task.history.append(event)
        if len(task.history) > HISTORY_KEPT:
            dropped = len(task.history) - HISTORY_KEPT
            del task.history[:dropped]
            task.events_dropped += dropped

    # ----------------------------------------------------------------- claim and delegation
    def validate_action(
        self, action: str, inp: TaskActionInput, strict: bool | None = None
    ) -> HumanTask:
        strict = self.strict if strict is None else strict
        task = self.get_open(inp.task_id)
        actor = inp.actor
        is_manager = MANAGER_ROLE in actor.roles
        if strict and self.max_actions is not None and task.actions >= self.max_actions:
            raise _refuse(
                CONFLICT,
                f"task {task.task_id} has reached its limit of {self.max_actions} claims, "
                "releases and delegations; it can still be decided",
            )
        if strict and task.four_eyes and actor.username == task.requester:
            raise _refuse(
                FOUR_EYES,
                f"{actor.username} requested this process and may not {action} its tasks",
            )
        if action == "claim":
            if task.assignee is not None:
                raise _refuse(CONFLICT, f"task {task.task_id} is already taken by {task.assignee}")
            self._check_may_act(task, actor, strict)
        elif action == "release":
            if task.assignee is None:
                raise _refuse(CONFLICT, f"task {task.task_id} is not taken")
            if task.assignee != actor.username and not is_manager:
                raise _refuse(NOT_PERMITTED, "only the assignee or a manager may release a task")
        elif action == "delegate":
            if not inp.to_user:
                raise _refuse(INVALID_DECISION, "to_user: required to delegate")
            if not is_manager:
                self._check_may_act(task, actor, strict)
            self._check_target(task, inp, strict)
        elif action == "reassign":
            if not is_manager:
                raise _refuse(NOT_PERMITTED, "only a manager may reassign a task")
            if inp.to_user:
                self._check_target(task, inp, strict)
        else:  # pragma: no cover - programming error
            raise ValueError(action)
        return task

    def apply_action(self, action: str, inp: TaskActionInput, now: datetime) -> HumanTask:
        task = self.validate_action(action, inp)
        if action == "claim":
            task.assignee = inp.actor.username
        elif action == "release":
            task.assignee = None
        else:
            task.assignee = inp.to_user
        task.appointed = False  # whoever holds it now got it by a person's action
        detail = f"to {inp.to_user or 'the pool'}" if action in ("delegate", "reassign") else ""
        if inp.comment:
            detail = f"{detail} - {inp.comment}".strip(" -")
        task.actions += 1
        self._log(
            task, TaskEvent(at=now, actor=inp.actor.username, action=_PAST[action], detail=detail)
        )
        return task

    # ----------------------------------------------------------------- timers
    def next_due(self) -> Due | None:
        best: Due | None = None
        for t in self.open_tasks():
            candidates: list[tuple[datetime | None, Literal["remind", "escalate", "deadline"]]] = [
                (None if t.reminded else t.remind_at, "remind"),
                (None if t.escalated else t.escalate_at, "escalate"),
                *[(None if e.fired else e.at, "escalate") for e in t.escalations],
                (t.deadline_at, "deadline"),
            ]
            for when, kind in candidates:
                if when is not None and (best is None or when < best[0]):
                    best = (when, kind, t)
        return best

    def escalate(self, task: HumanTask, now: datetime) -> str | None:
        """Fire the task's next escalation level: its role may act too. Returns the role."""
        if not task.escalated:
            task.escalated = True
            role = task.escalation_role
        else:
            level = next(e for e in task.escalations if not e.fired)
            level.fired = True
            role = level.to_role
        if role and role not in task.candidate_roles:
            task.candidate_roles.append(role)
        self._log(
            task, TaskEvent(at=now, actor=SYSTEM_ACTOR, action="escalated", detail=f"to {role}")
        )
        return role

    def widen(self, task: HumanTask, role: str, now: datetime, why: str) -> None:
        """`role` may act on the task too (an SLA's escalation, not one of the task's own)."""
        if role not in task.candidate_roles:
            task.candidate_roles.append(role)
        self._log(task, TaskEvent(at=now, actor=SYSTEM_ACTOR, action="escalated", detail=why))

    def remind(self, task: HumanTask, now: datetime) -> None:
        task.reminded = True
        self._log(task, TaskEvent(at=now, actor=SYSTEM_ACTOR, action="reminded"))
