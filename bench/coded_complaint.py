"""The customer complaint hand-coded on the kernel: what `blueprints/complaint.yaml` runs on the
interpreter, written as a coded process, so that `bench.run --phases blueprint` can measure
the interpreter against it on the same server, through the same API (bench/README.md,
"Blueprints: the interpreter against coded").

received -> acknowledge (a support task; then the acknowledgement mail to the customer) ->
record (a support task: category and severity; "not a complaint" is declined with a mail) ->
resolve (a support task; reworked up to three visits, then the service manager; a high
severity needs the manager's sign-off) -> notify (the status mail) -> feedback (waits for the
event `feedback_received` at most 14 days; a score of 2 or less is followed up by the manager)
-> closed. The resolution SLA (two business days by the blueprint's calendar, from receipt
until the customer hears the outcome) escalates the open tasks to the service manager and
mails them when breached. The same task titles, roles, outcomes, required fields, business
timers and mail templates as the blueprint; the mails go through the catalog's real activity
(`BlueprintCallActivities.notify_customer`, by the kernel's `business_step`).

Registered as process type `coded_complaint` at import: the bench's worker and API import it
through `PROCFLOW_PROCESS_MODULES=bench.coded_complaint`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow

# passed through the sandbox (the worker passes this module through too: it registers its type)
with workflow.unsafe.imports_passed_through():
    from activities.blueprint_calls import BlueprintCallActivities, CallRequest
    from activities.models import InstanceStatus
    from workflows import registry
    from workflows.blueprint.engine import EMAIL_PATTERN
    from workflows.calendar import BusinessCalendar, BusinessDuration
    from workflows.errors import CONFLICT, INVALID_DECISION, refuse
    from workflows.human_task import DecideInput, HumanTask, TaskTimes
    from workflows.kernel import HumanProcess, ProcessStatus, Stop
    from workflows.registry import ProcessEvent, ProcessType
    from workflows.runtime import DueTime

PROCESS_TYPE = "coded_complaint"
TITLE = "Customer complaint"
SUPPORT, SUPPORT_LEAD, MANAGER = "support", "support-lead", "service-manager"
STAGES = (
    "acknowledge",
    "record",
    "resolve",
    "manager_review",
    "notify",
    "feedback",
    "follow_up",
    "decline",
    "closed",
    "declined",
    HumanProcess.FAILED_STAGE,
    HumanProcess.CANCELLED_STAGE,
)
END_STATUS: Mapping[str, InstanceStatus] = MappingProxyType(
    {
        "closed": "completed",
        "declined": "completed",
        HumanProcess.FAILED_STAGE: "failed",
        HumanProcess.CANCELLED_STAGE: "cancelled",
    }
)
TASK_KIND = "task"
FEEDBACK_EVENT = "feedback_received"
FEEDBACK_TIMEOUT = timedelta(days=14)
UNHAPPY_SCORE = 2  # this score or less is followed up
MAX_RESOLVE_VISITS = 3  # the next entry goes to the manager instead
RESOLUTION_SLA = "resolution"
RESOLUTION_WITHIN = BusinessDuration.parse("P2D")
CALENDAR = BusinessCalendar(timezone="Europe/Bucharest")  # Mon-Fri 09:00-17:00
ACKNOWLEDGE_TIMERS = TaskTimes.model_validate(
    {
        "business_time": True,
        "remind_after": "PT2H",
        "escalations": [{"after": "PT4H", "to_role": SUPPORT_LEAD}],
    }
)
RESOLVE_TIMERS = TaskTimes.model_validate(
    {
        "business_time": True,
        "remind_after": "PT4H",
        "escalations": [{"after": "P1D", "to_role": SUPPORT_LEAD}],
    }
)
NO_TIMERS = TaskTimes()
MAX_TEXT = 4000
CATEGORIES = ("product", "delivery", "billing", "service", "other")
SEVERITIES = ("low", "medium", "high")
# task name -> its form: field -> the choices it offers, or the longest text it takes
ACKNOWLEDGE = "Acknowledge the complaint"
RECORD = "Record the complaint"
RESOLVE = "Resolve the complaint"
DECIDE = "Sign off or close the complaint"
FOLLOW_UP = "Call the customer back about their feedback"
FORMS: Mapping[str, Mapping[str, tuple[str, ...] | int]] = MappingProxyType(
    {
        RECORD: {"category": CATEGORIES, "severity": SEVERITIES},
        RESOLVE: {"resolution": MAX_TEXT},
        DECIDE: {"resolution": MAX_TEXT},
    }
)


class CodedComplaintStart(BaseModel):
    """The blueprint's input fields."""

    model_config = ConfigDict(extra="forbid")

    ticket_no: str = Field(pattern=r"^[A-Z0-9-]{3,40}$", title="Ticket")
    company_name: str = Field(min_length=1, max_length=200)
    customer_email: str = Field(pattern=f"^{EMAIL_PATTERN}$")  # the engine's reading of `email`
    channel: Literal["email", "phone", "web", "crm"]
    summary: str = Field(min_length=1, max_length=MAX_TEXT)


class CodedComplaintInput(CodedComplaintStart):
    requester: str


class FeedbackReceived(BaseModel):
    """The customer's answer to the satisfaction survey."""

    model_config = ConfigDict(extra="forbid")

    score: int = Field(ge=1, le=5)
    remarks: str | None = Field(None, max_length=MAX_TEXT)


class CodedComplaintStatus(ProcessStatus):
    ticket_no: str
    fields: dict[str, Any] = Field(description="the input and the tasks' field values so far")
    feedback: FeedbackReceived | None = None


def coded_complaint_workflow_id(ticket_no: str) -> str:
    return f"{PROCESS_TYPE}-{ticket_no}"


@workflow.defn(name=PROCESS_TYPE)
class CodedComplaintWorkflow(HumanProcess):
    """One complaint, from receipt to the customer's feedback."""

    PROCESS_TYPE = PROCESS_TYPE
    TASK_KINDS = frozenset({TASK_KIND})
    END_STATUS = END_STATUS
    OWNER_ROLE = MANAGER
    CANCEL_ROLES = frozenset({MANAGER})
    NOUN = "complaint"

    @workflow.init
    def __init__(self, inp: CodedComplaintInput) -> None:
        self.inp = inp
        self.fields: dict[str, Any] = inp.model_dump(mode="json", exclude={"requester"})
        self.feedback: FeedbackReceived | None = None
        self.awaiting_feedback = False
        super().__init__(
            business_key=inp.ticket_no, requester=inp.requester, initial_stage="acknowledge"
        )
        self.calendar = CALENDAR  # business time of the SLA and the task timers

    @workflow.run
    async def run(self, inp: CodedComplaintInput) -> str:
        try:
            self.start_sla(RESOLUTION_SLA, RESOLUTION_WITHIN)
            await self._task(ACKNOWLEDGE, [SUPPORT], ["acknowledged"], ACKNOWLEDGE_TIMERS)
            await self._mail("complaint_acknowledged")
            await self.set_stage("record")
            record = await self._task(
                RECORD,
                [SUPPORT],
                ["recorded", "not_a_complaint"],
                NO_TIMERS,
                {"recorded": ["category", "severity"], "not_a_complaint": ["comment"]},
            )
            if record.outcome == "not_a_complaint":
                await self._decline()
            else:
                await self._resolve()
                await self._notify_and_hear_back()
        except Stop as stop:  # cancelled, or a mail that could not be queued
            await self.end_on_stop(stop)
        await self.handlers_finished()
        return self.stage

    async def _resolve(self) -> None:
        for visit in range(1, MAX_RESOLVE_VISITS + 1):
            await self.set_stage("resolve", f"visit {visit}" if visit > 1 else "", again=True)
            task = await self._task(
                RESOLVE,
                [SUPPORT],
                ["resolved", "needs_rework"],
                RESOLVE_TIMERS,
                {"resolved": ["resolution"], "needs_rework": ["comment"]},
            )
            if task.outcome == "resolved":
                break
        else:  # every visit reworked: the manager takes it over
            await self._manager_review()
            return
        if self.fields.get("severity") == "high":  # a high severity needs sign-off
            await self._manager_review()

    async def _manager_review(self) -> None:
        await self.set_stage("manager_review")
        await self._task(
            DECIDE,
            [MANAGER],
            ["resolved", "closed_unresolved"],
            NO_TIMERS,
            {"resolved": ["resolution"], "closed_unresolved": ["comment"]},
        )

    async def _notify_and_hear_back(self) -> None:
        await self.set_stage("notify")
        self.stop_sla(RESOLUTION_SLA)  # the customer hears the outcome
        await self._mail("complaint_status")
        await self.set_stage("feedback")
        due = self.rt.deadlines.start(FEEDBACK_EVENT, "until", workflow.now() + FEEDBACK_TIMEOUT)
        self.awaiting_feedback = True
        await self.wait(
            lambda: self.feedback is not None or due.fired, f"{FEEDBACK_EVENT} (a time or an event)"
        )
        self.awaiting_feedback = False
        self.rt.deadlines.stop(FEEDBACK_EVENT)
        if self.feedback is not None and self.feedback.score <= UNHAPPY_SCORE:
            await self.set_stage("follow_up")
            await self._task(FOLLOW_UP, [MANAGER], ["done"], NO_TIMERS, {"done": ["comment"]})
        await self.finish("closed", "ended closed", outcome="closed")

    async def _decline(self) -> None:
        await self.set_stage("decline")
        self.stop_sla(RESOLUTION_SLA)
        await self._mail("complaint_declined")
        await self.finish("declined", "ended declined", outcome="declined")

    # ------------------------------------------------------------------ steps
    async def _task(
        self,
        name: str,
        roles: Sequence[str],
        outcomes: Sequence[str],
        times: TaskTimes,
        required: Mapping[str, Sequence[str]] | None = None,
    ) -> HumanTask:
        """Open a task, mail its candidates, wait for its decision; its fields are kept."""
        task = self.open_task(
            name=name,
            kind=TASK_KIND,
            roles=roles,
            outcomes=outcomes,
            times=times,
            required_fields=required,
        )
        await self.notify_candidates([task], f"Task for you: {name}")
        await self.wait(lambda: not task.is_open, f"{name} (a decision)")
        self.fields.update(task.fields)
        return task

    async def _mail(self, template: str) -> None:
        """A template mailed to the customer by the catalog's activity (once per stage entry)."""
        request = CallRequest(
            idempotency_key=f"{self.rt.workflow_id}:{self.stage}:{len(self.stages)}",
            workflow_id=self.rt.workflow_id,
            process_type=PROCESS_TYPE,
            title=TITLE,
            business_key=self.inp.ticket_no,
            params={"template": template, "to": self.inp.customer_email},
            fields=dict(self.fields),
        )
        await self.business_step(
            BlueprintCallActivities.notify_customer, request, f"notify_customer ({template})"
        )

    # ------------------------------------------------------------------ kernel hooks
    async def on_sla_breach(self, due: DueTime) -> None:
        """The resolution SLA breached: the manager may act on the open tasks, and is told."""
        now = workflow.now()
        for task in self.rt.board.open_tasks():
            self.rt.board.widen(task, MANAGER, now, f"SLA {due.name}: to {MANAGER}")
            self.rt.task_changed(task)
        await self.notify(
            f"sla:{due.name}",
            f"{self.label()}: SLA {due.name} breached",
            f"The SLA {due.name} of {self.label()} is breached; it is in stage {self.stage}.",
            to_roles=[MANAGER],
        )

    def summary(self) -> dict[str, Any]:
        return {"title": TITLE}

    def label(self) -> str:
        return f"{TITLE} {self.rt.business_key}"

    def check_decision(self, task: HumanTask, inp: DecideInput) -> None:
        """The form's own checks: only its fields, a choice among its options, a text not too
        long (the board has checked who decides, the outcome and the required fields)."""
        form = FORMS.get(task.name, {})
        for name, value in inp.fields.items():
            allowed = form.get(name)
            if allowed is None:
                raise refuse(INVALID_DECISION, f"{task.name} has no field {name!r}")
            if isinstance(allowed, tuple) and value not in allowed:
                raise refuse(INVALID_DECISION, f"{name}: choose one of {', '.join(allowed)}")
            if isinstance(allowed, int) and len(value) > allowed:
                raise refuse(INVALID_DECISION, f"{name}: at most {allowed} characters")

    # ------------------------------------------------------------------ handlers
    @workflow.query
    def status(self) -> CodedComplaintStatus:
        """The complaint's live status: the kernel's fields, its fields and the feedback."""
        return CodedComplaintStatus(
            **self.status_fields(),
            ticket_no=self.inp.ticket_no,
            fields=dict(self.fields),
            feedback=self.feedback,
        )

    @workflow.update
    async def feedback_received(self, event: FeedbackReceived) -> CodedComplaintStatus:
        """The customer's answer to the satisfaction survey ends the feedback wait."""
        self.feedback = event
        self.fields.update(event.model_dump(mode="json", exclude_none=True))
        await self.record_event(FEEDBACK_EVENT, "", {"fields": event.model_dump(mode="json")})
        return self.status()

    @feedback_received.validator
    def _validate_feedback_received(self, event: FeedbackReceived) -> None:
        self.refuse_if_ended()
        if not self.awaiting_feedback or self.feedback is not None:
            raise refuse(CONFLICT, f"no step of {self.label()} waits for {FEEDBACK_EVENT} now")


CODED_COMPLAINT = ProcessType(
    name=PROCESS_TYPE,
    title=f"{TITLE} (coded)",
    description="The complaint blueprint hand-coded on the kernel, for the benchmark.",
    workflow=CodedComplaintWorkflow,
    input_model=CodedComplaintInput,
    start_model=CodedComplaintStart,
    build_input=lambda body, requester: CodedComplaintInput(
        **body.model_dump(), requester=requester
    ),
    business_key=lambda body: body.ticket_no,
    workflow_id=coded_complaint_workflow_id,
    status_model=CodedComplaintStatus,
    stages=STAGES,
    terminal_stages=frozenset(END_STATUS),
    roles=("requester", MANAGER, SUPPORT, SUPPORT_LEAD),
    events=MappingProxyType(
        {
            FEEDBACK_EVENT: ProcessEvent(
                name=FEEDBACK_EVENT,
                model=FeedbackReceived,
                update=FEEDBACK_EVENT,
                description="the customer's answer to the satisfaction survey",
            )
        }
    ),
    cancel_update="cancel",
    cancel_roles=frozenset({MANAGER}),
)

# registered once, by the import that PROCFLOW_PROCESS_MODULES makes (never inside a sandbox)
if not workflow.unsafe.in_sandbox():
    registry.register(CODED_COMPLAINT)
