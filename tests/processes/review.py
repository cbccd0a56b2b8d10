"""Document review: a second coded process on the kernel, defined for the tests only (the proof
of issue 12 §3: a process type is its module and its registry entry, nothing else).

submitted -> review (one approval task for a manager; the requester may not decide; reminded,
escalated and timed out by the policy's timers) -> approved | rejected; its requester may
cancel it (`cancelled`); the external event `comment_added` adds a comment, once per id.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow

# the sandbox re-imports this module for each instance: what it needs besides comes through
with workflow.unsafe.imports_passed_through():
    from activities.models import InstanceStatus
    from core.temporal import CUSTOMER_ID
    from workflows.approval import APPROVED, ApprovalLevel
    from workflows.errors import CONFLICT, DUPLICATE_EVENT, refuse
    from workflows.kernel import HumanProcess, ProcessStatus, Stop
    from workflows.policy import ProcessPolicy, TaskTimers
    from workflows.registry import ProcessEvent, ProcessType

PROCESS_TYPE = "review"
STAGES = ("submitted", "review", "approved", "rejected", "cancelled")
END_STATUS: Mapping[str, InstanceStatus] = MappingProxyType(
    {"approved": "completed", "rejected": "completed", "cancelled": "cancelled"}
)
REVIEWER_ROLE = "manager"


class ReviewStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    doc_no: str = Field(pattern=r"^[A-Z0-9][A-Z0-9-]{2,39}$", description="the business key")
    title: str = Field(min_length=1, max_length=200)
    customer_id: str | None = Field(None, min_length=1, max_length=64)


class ReviewInput(ReviewStart):
    requester: str


class ReviewPolicy(ProcessPolicy):
    review_timers: TaskTimers = TaskTimers()


class CommentAdded(BaseModel):
    comment_id: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1, max_length=2000)


class ReviewStatus(ProcessStatus):
    doc_no: str
    title: str
    comments: dict[str, str]


def review_workflow_id(doc_no: str) -> str:
    return f"{PROCESS_TYPE}-{doc_no}"


@workflow.defn(name=PROCESS_TYPE)
class ReviewWorkflow(HumanProcess):
    """One document, reviewed by a manager."""

    PROCESS_TYPE = PROCESS_TYPE
    END_STATUS = END_STATUS
    NOUN = "review"

    @workflow.init
    def __init__(self, inp: ReviewInput) -> None:
        self.inp = inp
        self.comments: dict[str, str] = {}
        super().__init__(
            business_key=inp.doc_no, requester=inp.requester, initial_stage="submitted"
        )

    @workflow.run
    async def run(self, inp: ReviewInput) -> str:
        policy = await self.load_policy(ReviewPolicy, ReviewPolicy())
        if inp.customer_id:
            self.rt.upsert(CUSTOMER_ID.value_set(inp.customer_id))
        await self.set_stage("review")
        level = ApprovalLevel(name="review", roles=[REVIEWER_ROLE])
        times = policy.review_timers.task_times()
        try:
            outcome = await self.approval_level(level, "review", times, f"Review: {inp.title}")
            await self.finish("approved" if outcome == APPROVED else "rejected", outcome)
        except Stop as stop:  # cancelled: the kernel's `cancel` update and `checkpoint`
            await self.end_on_stop(stop)
        await self.handlers_finished()
        return self.stage

    def summary(self) -> dict[str, Any]:
        return {"title": self.inp.title, "customer_id": self.inp.customer_id}

    @workflow.query
    def status(self) -> ReviewStatus:
        """The review's live status: the kernel's fields, the document and its comments."""
        return ReviewStatus(
            **self.status_fields(),
            doc_no=self.inp.doc_no,
            title=self.inp.title,
            comments=dict(self.comments),
        )

    @workflow.update
    async def add_comment(self, event: CommentAdded) -> ReviewStatus:
        """An external system reports a comment on the document."""
        self.comments[event.comment_id] = event.text
        await self.record_event("comment_added", event.text, {"id": event.comment_id})
        return self.status()

    @add_comment.validator
    def _validate_add_comment(self, event: CommentAdded) -> None:
        self.refuse_if_ended()
        known = self.comments.get(event.comment_id)
        if known == event.text:
            raise refuse(DUPLICATE_EVENT, f"comment {event.comment_id} was added before")
        if known is not None:
            raise refuse(CONFLICT, f"comment {event.comment_id} was added with another text")


REVIEW = ProcessType(
    name=PROCESS_TYPE,
    title="Document review",
    description="A manager approves or rejects a document; its requester may cancel it.",
    workflow=ReviewWorkflow,
    input_model=ReviewInput,
    start_model=ReviewStart,
    build_input=lambda body, requester: ReviewInput(**body.model_dump(), requester=requester),
    business_key=lambda body: body.doc_no,
    workflow_id=review_workflow_id,
    status_model=ReviewStatus,
    stages=STAGES,
    terminal_stages=frozenset(END_STATUS),
    roles=("requester", REVIEWER_ROLE),
    policy_model=ReviewPolicy,
    events=MappingProxyType(
        {
            "comment_added": ProcessEvent(
                name="comment_added",
                model=CommentAdded,
                update="add_comment",
                description="a comment on the document, from the document system",
            )
        }
    ),
    cancel_update="cancel",
)
