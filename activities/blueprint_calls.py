"""The activities a blueprint's `call` step runs: the implementations of the catalog
(`workflows.blueprint.catalog`; their models are in activities/call_models.py), registered as
`blueprint.<catalog name>`.

Each takes one `CallRequest` (the call's parameters, already resolved, and the instance's
data) and returns the catalog entry's output model, dumped to JSON. Parameters are checked
against the entry's input model again here (a blueprint published before a catalog change, a
hand-made request); those that do not fit are a non-retryable `InvalidCallParams` naming the
field, and nothing is written.

- `notify_customer` and `notify_role` queue one mail in the outbox (status `pending`), keyed
  by the call's idempotency key, and wake the mail dispatcher (activities/notifications.py),
  which delivers it over SMTP; a retry with the same key queues nothing and answers from the
  row already queued. A role without an active holder queues a row without recipients (so the
  call stays idempotent), which the dispatcher marks sent without SMTP.
- `record_note` adds one entry to the instance's audit log, keyed the same way.

The mail text comes from `TEMPLATES`; a template name not in the table gets a generic text.
One short transaction per call; database errors propagate, for Temporal's retries.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from pydantic import BaseModel, EmailStr, TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.call_models import (
    ActivityModel,
    NoteRecorded,
    Notified,
    NotifyCustomerInput,
    NotifyRoleInput,
    RecordNoteInput,
)
from activities.models import Notification
from activities.notifications import outbox_rows, resolve_recipients
from activities.records import insert_or_ignore
from core import tracecontext
from core.db import AuditEntry, OutboxMessage, utcnow

# error types (non-retryable): the call's parameters do not fit; a customer mail without address
INVALID_CALL_PARAMS = "InvalidCallParams"
NO_RECIPIENT = "NoRecipient"

CUSTOMER_EMAIL = "customer_email"  # the field a customer mail goes to when `to` is not given
NOTE, SYSTEM = "note", "system"  # audit action and actor of a recorded note
MAX_SUBJECT = 400  # core.db.OutboxMessage.subject

M = TypeVar("M", bound=ActivityModel)
_EMAIL: TypeAdapter[str] = TypeAdapter(EmailStr)


class CallRequest(BaseModel):
    """One call of a catalogued activity by a blueprint instance."""

    idempotency_key: str  # "<workflow_id>:<stage>:<visit>:<step>", unique per call
    workflow_id: str
    process_type: str  # the blueprint's process name, e.g. "complaint"
    title: str  # the blueprint's title, e.g. "Customer complaint"
    business_key: str  # e.g. the ticket number
    params: dict[str, Any]  # the call's `with`, fields already resolved
    fields: dict[str, Any]  # the instance's field values (for the mail text)


# ---------------------------------------------------------------- mail text


@dataclass(frozen=True)
class Template:
    """A mail's subject and body as format strings: `{title}`, `{business_key}` (the
    blueprint's title and the instance's business key) and any field name; a field without a
    value renders empty."""

    subject: str
    body: str


TEMPLATES: Mapping[str, Template] = MappingProxyType(
    {
        "complaint_acknowledged": Template(
            subject="{title} {business_key}: we have received your request",
            body=(
                "Hello {company_name},\n\n"
                "we have received your request and registered it as {business_key}. "
                "We will come back to you as soon as it is resolved.\n\n"
                "Your request:\n{summary}\n"
            ),
        ),
        "complaint_status": Template(
            subject="{title} {business_key}: status",
            body=(
                "Hello {company_name},\n\n"
                "we have dealt with your request {business_key}.\n\n"
                "{resolution}\n\n"
                "Thank you for your patience.\n"
            ),
        ),
        "complaint_declined": Template(
            subject="{title} {business_key}: not handled as a complaint",
            body=(
                "Hello {company_name},\n\n"
                "we have looked at your request {business_key} and will not handle it as a "
                "complaint. Please reply to this mail if you think we have misunderstood it.\n"
            ),
        ),
        "onboarding_welcome": Template(
            subject="Welcome, {company_name}",
            body=(
                "Hello {company_name},\n\n"
                "welcome! Your client code is {business_key}. "
                "We look forward to our first meeting ({meeting_at}).\n"
            ),
        ),
        "onboarding_plan_proposed": Template(
            subject="{title} {business_key}: your action plan",
            body=(
                "Hello {company_name},\n\n"
                "here is the action plan we propose.\n\n"
                "Weekly:\n{weekly_plan}\n\n"
                "Monthly:\n{monthly_plan}\n\n"
                "Yearly:\n{yearly_plan}\n\n"
                "Please tell your account manager what you think of it.\n"
            ),
        ),
        "onboarding_plan_accepted": Template(
            subject="{title} {business_key}: plan accepted",
            body=(
                "Hello {company_name},\n\n"
                "thank you for accepting the action plan. "
                "Our team is now setting up your content and advertising.\n"
            ),
        ),
    }
)


class _Lenient(string.Formatter):
    """Formats against a mapping: a name missing from it or without a value (None) renders "",
    never raises."""

    def get_value(self, key: int | str, args: Any, kwargs: Mapping[str, Any]) -> Any:
        value = kwargs.get(key) if isinstance(key, str) else None
        return "" if value is None else value

    def format_field(self, value: Any, format_spec: str) -> str:
        try:
            return super().format_field(value, format_spec)
        except (TypeError, ValueError):  # a spec that does not fit the value: the value as is
            return str(value)


_FORMATTER = _Lenient()


def render_mail(
    template: str, title: str, business_key: str, fields: Mapping[str, Any]
) -> tuple[str, str]:
    """The subject and body of a template for an instance (a generic text for a name not in
    `TEMPLATES`). The subject is one line of at most MAX_SUBJECT characters."""
    values = {**fields, "title": title, "business_key": business_key}
    known = TEMPLATES.get(template)
    if known is None:
        subject = f"{title} {business_key}: {template.replace('_', ' ')}"
        lines = [f"{name}: {value}" for name, value in fields.items() if value not in (None, "")]
        body = "\n".join([f"{title} {business_key}", "", *lines]) + "\n"
    else:
        subject = _FORMATTER.vformat(known.subject, (), values)
        body = _FORMATTER.vformat(known.body, (), values)
    return " ".join(subject.split())[:MAX_SUBJECT], body


# ---------------------------------------------------------------- the activities


def _params(name: str, model: type[M], req: CallRequest) -> M:
    """The call's parameters, validated by the catalog entry's input model (`model`), or
    InvalidCallParams naming each field that does not fit."""
    try:
        params = model.model_validate(req.params)
    except ValidationError as err:
        problems = [
            (".".join(map(str, e["loc"])) or "(parameters)", e["msg"]) for e in err.errors()
        ]
        raise ApplicationError(
            f"invalid parameters of {name}: " + "; ".join(f"{f}: {m}" for f, m in problems),
            {"fields": [f for f, _ in problems]},
            type=INVALID_CALL_PARAMS,
            non_retryable=True,
        ) from None
    return params


class BlueprintCallActivities:
    def __init__(
        self, session_factory: async_sessionmaker, mail_queued: Callable[[], None] | None = None
    ) -> None:
        self._sessions = session_factory
        self._mail_queued = mail_queued  # the mail dispatcher's wake-up, if one runs here

    @activity.defn(name="blueprint.notify_customer")
    async def notify_customer(self, req: CallRequest) -> dict[str, Any]:
        """Queue one mail of a template to the customer (`to`, else the customer_email field)."""
        params = _params("notify_customer", NotifyCustomerInput, req)
        to = params.to or _customer_email(req.fields)
        recipients = await self._queue(req, params.template, to_emails=[to])
        return Notified(recipients=recipients).model_dump(mode="json")

    @activity.defn(name="blueprint.notify_role")
    async def notify_role(self, req: CallRequest) -> dict[str, Any]:
        """Queue one mail of a template to every active user holding a role (none: no error)."""
        params = _params("notify_role", NotifyRoleInput, req)
        recipients = await self._queue(req, params.template, to_roles=[params.role])
        return Notified(recipients=recipients).model_dump(mode="json")

    @activity.defn(name="blueprint.record_note")
    async def record_note(self, req: CallRequest) -> dict[str, Any]:
        """Add a note to the instance's audit log, once per idempotency key."""
        params = _params("record_note", RecordNoteInput, req)
        async with self._sessions.begin() as session:
            await session.execute(
                insert_or_ignore(session, AuditEntry).values(
                    event_key=req.idempotency_key,
                    workflow_id=req.workflow_id,
                    actor=SYSTEM,
                    action=NOTE,
                    comment=params.text,
                    details={"process_type": req.process_type, "business_key": req.business_key},
                    at=utcnow(),
                )
            )
        return NoteRecorded(note_id=req.idempotency_key).model_dump(mode="json")

    def all(self) -> list[Callable]:
        """The activities, for the worker."""
        return [self.notify_customer, self.notify_role, self.record_note]

    async def _queue(
        self,
        req: CallRequest,
        template: str,
        *,
        to_emails: list[str] | None = None,
        to_roles: list[str] | None = None,
    ) -> int:
        """Queue the mail, once per key, to the addresses and the roles' active users;
        returns how many recipients its row has (the row already queued, on a retry)."""
        subject, body = render_mail(template, req.title, req.business_key, req.fields)
        note = Notification(
            idempotency_key=req.idempotency_key,
            workflow_id=req.workflow_id,
            to_emails=to_emails or [],
            to_roles=to_roles or [],
            subject=subject,
            body=body,
        )
        async with self._sessions.begin() as session:
            recipients = (await resolve_recipients(session, [note]))[0]
            [row] = outbox_rows([note], [recipients], tracecontext.carrier())
            inserted = await session.scalar(
                insert_or_ignore(session, OutboxMessage).values(**row).returning(OutboxMessage.id)
            )
            if inserted is None:
                recipients = await _queued_recipients(session, req.idempotency_key)
        if inserted is None:
            activity.logger.info("mail %s already queued", req.idempotency_key)
        else:
            activity.logger.info(
                "mail %s queued for %s recipient(s)", req.idempotency_key, len(recipients)
            )
            if self._mail_queued is not None:
                self._mail_queued()
        return len(recipients)


def _customer_email(fields: Mapping[str, Any]) -> str:
    """The customer_email field, or NoRecipient; an address that is not one: InvalidCallParams."""
    value = fields.get(CUSTOMER_EMAIL)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ApplicationError(
            f"no recipient: the call has no `to` and the field {CUSTOMER_EMAIL} has no value",
            type=NO_RECIPIENT,
            non_retryable=True,
        )
    try:  # the check of a `to` parameter
        return _EMAIL.validate_python(value)
    except ValidationError as err:
        raise ApplicationError(
            f"invalid parameters of notify_customer: {CUSTOMER_EMAIL} (the default of to): "
            + "; ".join(e["msg"] for e in err.errors()),
            {"fields": [CUSTOMER_EMAIL]},
            type=INVALID_CALL_PARAMS,
            non_retryable=True,
        ) from None


async def _queued_recipients(session: AsyncSession, key: str) -> list[str]:
    row = await session.scalar(
        select(OutboxMessage.recipients).where(OutboxMessage.idempotency_key == key)
    )
    return list(row or [])
