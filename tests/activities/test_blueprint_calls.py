"""The activities a blueprint's `call` step runs (activities/blueprint_calls.py): what each
returns and writes, once per idempotency key, the refusals, the mail text, and delivery of a
queued mail over real SMTP by the mail dispatcher (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.activity import _Definition
from temporalio.exceptions import ApplicationError

from activities.blueprint_calls import (
    TEMPLATES,
    BlueprintCallActivities,
    CallRequest,
    render_mail,
)
from activities.mail import SmtpSender
from activities.notifications import MailDispatcher
from core.db import AuditEntry, OutboxMessage, User
from scripts.mailsink import MailSink
from workflows.blueprint.catalog import CATALOG, Notified

WORKFLOW_ID = "complaint-T-100"
FIELDS = {
    "ticket_no": "T-100",
    "company_name": "ACME Ltd",
    "customer_email": "buyer@acme.example",
    "summary": "The parcel arrived damaged.",
}


def _call(params: dict[str, Any], step: str = "notify_customer", **changes: Any) -> CallRequest:
    values: dict[str, Any] = {
        "idempotency_key": f"{WORKFLOW_ID}:acknowledge:1:{step}",
        "workflow_id": WORKFLOW_ID,
        "process_type": "complaint",
        "title": "Customer complaint",
        "business_key": "T-100",
        "params": params,
        "fields": FIELDS,
    }
    return CallRequest(**(values | changes))


async def _outbox(sessions) -> list[OutboxMessage]:
    async with sessions() as session:
        return list(
            (await session.execute(select(OutboxMessage).order_by(OutboxMessage.id))).scalars()
        )


async def _notes(sessions) -> list[AuditEntry]:
    async with sessions() as session:
        return list((await session.execute(select(AuditEntry).order_by(AuditEntry.id))).scalars())


def test_the_activities_are_the_catalogs_under_the_blueprint_prefix():
    calls = BlueprintCallActivities(async_sessionmaker())
    names = [_Definition.must_from_callable(fn).name for fn in calls.all()]
    assert names == [f"blueprint.{name}" for name in CATALOG]


async def test_notify_customer_queues_one_pending_mail_to_the_customer_email(
    sessions, activity_env
):
    woken: list[bool] = []
    calls = BlueprintCallActivities(sessions, mail_queued=lambda: woken.append(True))
    result = await activity_env.run(
        calls.notify_customer, _call({"template": "complaint_acknowledged"})
    )
    assert result == {"recipients": 1}
    assert CATALOG["notify_customer"].output_model.model_validate(result) == Notified(recipients=1)
    [row] = await _outbox(sessions)
    assert (row.idempotency_key, row.workflow_id, row.status, row.recipients) == (
        f"{WORKFLOW_ID}:acknowledge:1:notify_customer",
        WORKFLOW_ID,
        "pending",
        ["buyer@acme.example"],
    )
    assert row.subject == "Customer complaint T-100: we have received your request"
    assert "Hello ACME Ltd," in row.body and "The parcel arrived damaged." in row.body
    assert woken == [True]


async def test_notify_customer_to_overrides_the_customer_email_field(sessions, activity_env):
    calls = BlueprintCallActivities(sessions)
    req = _call({"template": "complaint_status", "to": "claims@acme.example"})
    assert await activity_env.run(calls.notify_customer, req) == {"recipients": 1}
    [row] = await _outbox(sessions)
    assert row.recipients == ["claims@acme.example"]


async def test_notify_customer_twice_with_one_key_queues_one_mail_and_answers_the_same(
    sessions, activity_env
):
    woken: list[bool] = []
    calls = BlueprintCallActivities(sessions, mail_queued=lambda: woken.append(True))
    req = _call({"template": "complaint_acknowledged"})
    first = await activity_env.run(calls.notify_customer, req)
    # a retry after a lost answer, the instance's data changed meanwhile
    again = req.model_copy(update={"fields": FIELDS | {"company_name": "Other"}})
    assert await activity_env.run(calls.notify_customer, again) == first
    [row] = await _outbox(sessions)
    assert "ACME Ltd" in row.body
    assert woken == [True]  # nothing new queued: nobody woken


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("notify_customer", {"template": "Not A Name"}, "template"),
        ("notify_customer", {"template": "complaint_status", "to": "not-an-address"}, "to"),
        ("notify_customer", {"template": "complaint_status", "cc": "x@acme.example"}, "cc"),
        ("notify_customer", {}, "template"),
        ("notify_role", {"template": "complaint_status"}, "role"),
        ("notify_role", {"template": "complaint_status", "role": "Service Manager"}, "role"),
        ("record_note", {"text": ""}, "text"),
    ],
)
async def test_invalid_params_are_a_non_retryable_error_naming_the_field_and_write_nothing(
    sessions, activity_env, method, params, field
):
    woken: list[bool] = []
    calls = BlueprintCallActivities(sessions, mail_queued=lambda: woken.append(True))
    with pytest.raises(ApplicationError) as caught:
        await activity_env.run(getattr(calls, method), _call(params, step=method))
    err = caught.value
    assert (err.type, err.non_retryable) == ("InvalidCallParams", True)
    assert f"{field}:" in err.message and method in err.message
    assert field in err.details[0]["fields"]
    assert await _outbox(sessions) == [] and await _notes(sessions) == []
    assert woken == []


@pytest.mark.parametrize("fields", [{}, {"customer_email": None}, {"customer_email": " "}])
async def test_notify_customer_without_any_address_is_a_non_retryable_no_recipient(
    sessions, activity_env, fields
):
    calls = BlueprintCallActivities(sessions)
    req = _call({"template": "complaint_status", "to": None}, fields=fields)
    with pytest.raises(ApplicationError) as caught:
        await activity_env.run(calls.notify_customer, req)
    assert (caught.value.type, caught.value.non_retryable) == ("NoRecipient", True)
    assert await _outbox(sessions) == []


async def test_notify_customer_refuses_a_customer_email_field_that_is_no_address(
    sessions, activity_env
):
    calls = BlueprintCallActivities(sessions)
    req = _call({"template": "complaint_status"}, fields={"customer_email": "nobody"})
    with pytest.raises(ApplicationError) as caught:
        await activity_env.run(calls.notify_customer, req)
    assert (caught.value.type, caught.value.non_retryable) == ("InvalidCallParams", True)
    assert "customer_email" in caught.value.message
    assert await _outbox(sessions) == []


async def test_notify_role_mails_every_active_holder_of_the_role(sessions, users, activity_env):
    woken: list[bool] = []
    calls = BlueprintCallActivities(sessions, mail_queued=lambda: woken.append(True))
    req = _call({"template": "complaint_status", "role": "vice-president"}, step="notify_role")
    assert await activity_env.run(calls.notify_role, req) == {"recipients": 2}
    async with sessions.begin() as session:  # victor leaves before the retry
        (await session.get(User, "victor")).active = False
    assert await activity_env.run(calls.notify_role, req) == {"recipients": 2}  # the queued row's
    [row] = await _outbox(sessions)
    # olga holds the role too, but is inactive
    assert (row.recipients, row.status) == (["vera@example.com", "victor@example.com"], "pending")
    assert woken == [True]


async def test_notify_role_without_an_active_holder_queues_a_row_the_dispatcher_settles(
    sessions, users, activity_env
):
    async with sessions.begin() as session:  # the role's only holder has left
        session.add(
            User(
                username="ivan",
                display_name="ivan",
                email="ivan@example.com",
                password_hash="x",
                roles=["service-manager"],
                active=False,
            )
        )
    calls = BlueprintCallActivities(sessions)
    req = _call({"template": "complaint_status", "role": "service-manager"}, step="notify_role")
    assert await activity_env.run(calls.notify_role, req) == {"recipients": 0}
    assert await activity_env.run(calls.notify_role, req) == {"recipients": 0}
    [row] = await _outbox(sessions)
    assert (row.recipients, row.status) == ([], "pending")
    # no SMTP server on this port: a row without recipients is done without one
    dispatcher = MailDispatcher(sessions, SmtpSender("127.0.0.1", 9, 1, "procflow@localhost"))
    assert await dispatcher.deliver_due() == 1
    [row] = await _outbox(sessions)
    assert (row.status, row.attempts) == ("sent", 0)


async def test_record_note_adds_one_audit_entry_per_key(sessions, activity_env):
    calls = BlueprintCallActivities(sessions)
    req = _call({"text": "Onboarding complete."}, step="record_note")
    first = await activity_env.run(calls.record_note, req)
    assert first == {"note_id": f"{WORKFLOW_ID}:acknowledge:1:record_note"}
    assert await activity_env.run(calls.record_note, req) == first
    [note] = await _notes(sessions)
    assert (note.event_key, note.workflow_id, note.action, note.actor, note.comment) == (
        first["note_id"],
        WORKFLOW_ID,
        "note",
        "system",
        "Onboarding complete.",
    )
    other = req.model_copy(update={"idempotency_key": f"{WORKFLOW_ID}:acknowledge:2:record_note"})
    await activity_env.run(calls.record_note, other)  # the next visit: a note of its own
    assert len(await _notes(sessions)) == 2


async def test_a_queued_mail_is_delivered_over_smtp_by_the_dispatcher(
    sessions, activity_env, mail_sink: MailSink
):
    sender = SmtpSender(mail_sink.host, mail_sink.port, timeout=5, mail_from="procflow@localhost")
    dispatcher = MailDispatcher(sessions, sender)
    calls = BlueprintCallActivities(sessions, mail_queued=dispatcher.wake)
    await activity_env.run(calls.notify_customer, _call({"template": "complaint_acknowledged"}))
    assert await dispatcher.deliver_due() == 1
    [mail] = mail_sink.messages
    assert mail["To"] == "buyer@acme.example"
    assert mail["Subject"] == "Customer complaint T-100: we have received your request"
    assert "registered it as T-100" in mail.get_content()
    [row] = await _outbox(sessions)
    assert row.status == "sent"


# ---------------------------------------------------------------- mail text


def test_an_unknown_template_renders_a_generic_text_with_the_fields():
    subject, body = render_mail(
        "parcel_lost_apology", "Customer complaint", "T-100", {"company_name": "ACME", "n": 3}
    )
    assert subject == "Customer complaint T-100: parcel lost apology"
    assert "company_name: ACME" in body and "n: 3" in body


def test_a_template_renders_a_field_without_a_value_as_empty():
    fields = {"company_name": "ACME", "resolution": None}  # and no summary at all
    for name in ("complaint_status", "complaint_acknowledged"):
        subject, body = render_mail(name, "Customer complaint", "T-100", fields)
        assert subject.startswith("Customer complaint T-100: ")
        assert "Hello ACME," in body and "None" not in body and "{" not in body


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_renders_for_an_instance_without_fields(name):
    subject, body = render_mail(name, "Customer onboarding", "K-1", {})
    assert subject and body and "{" not in subject + body


def test_the_required_templates_are_in_the_table():
    assert {
        "complaint_acknowledged",
        "complaint_status",
        "complaint_declined",
        "onboarding_welcome",
        "onboarding_plan_accepted",
    } <= set(TEMPLATES)


def test_a_subject_is_one_line_short_enough_for_the_outbox():
    subject, _ = render_mail("x_" * 10, "Title", "K-1", {})
    long, _ = render_mail(
        "onboarding_welcome", "Title", "K-1", {"company_name": "A\nBcc: x@y\n" + "z" * 500}
    )
    assert "\n" not in subject + long and len(long) <= 400
