"""GET /outbox: admins see the mails the dispatcher gave up on (status=failed), paginated;
nobody else sees the outbox, and a status that does not exist is 422 naming the field."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import async_sessionmaker
from temporalio.testing import ActivityEnvironment

from activities.mail import SmtpSender
from activities.models import Notification, ProjectionBatch
from activities.notifications import MailDispatcher
from activities.records import RecordActivities
from tests.api.conftest import Api


def _mail(n: int, **to: list[str]) -> Notification:
    return Notification(
        idempotency_key=f"sales-order-OB-{n}:mail:1",
        workflow_id=f"sales-order-OB-{n}",
        subject=f"mail {n}",
        body=f"body {n}",
        **(to or {"to_emails": [f"buyer{n}@example.com"]}),
    )


async def _two_failed_and_one_sent(sessions: async_sessionmaker) -> None:
    """Three queued mails; the SMTP server is away and one attempt is all they get, so the
    two with recipients fail and the one without any is sent."""
    batch = ProjectionBatch(mails=[_mail(1), _mail(2, to_roles=["nobody-has-this"]), _mail(3)])
    await ActivityEnvironment().run(RecordActivities(sessions).project, batch)
    nowhere = SmtpSender("127.0.0.1", 9, 1, "procflow@localhost")
    dispatcher = MailDispatcher(sessions, nowhere, max_attempts=1, max_transient_attempts=1)
    assert await dispatcher.deliver_due() == 3
    assert dispatcher.given_up == 2


async def test_admins_see_failed_mails_others_get_403_and_a_bad_status_is_422(
    api: Api, sessions: async_sessionmaker
):
    await _two_failed_and_one_sent(sessions)

    r = await api.get("/outbox", "ada", params={"status": "failed"})
    assert r.status_code == 200, r.text
    page = r.json()
    assert (page["total"], page["limit"], page["offset"]) == (2, 50, 0)
    assert [m["subject"] for m in page["items"]] == ["mail 3", "mail 1"]  # newest first
    first = page["items"][0]
    assert first["status"] == "failed" and first["attempts"] == 1
    assert first["workflow_id"] == "sales-order-OB-3"
    assert first["recipients"] == ["buyer3@example.com"]
    assert first["last_error"] and first["next_attempt_at"] is None and first["sent_at"] is None

    r = await api.get("/outbox", "ada", params={"status": "failed", "limit": 1, "offset": 1})
    assert [m["subject"] for m in r.json()["items"]] == ["mail 1"] and r.json()["total"] == 2
    r = await api.get("/outbox", "ada", params={"status": "sent"})
    assert [m["subject"] for m in r.json()["items"]] == ["mail 2"]
    assert (await api.get("/outbox", "ada")).json()["total"] == 3

    for user in ("mike", "alice", "fiona"):  # manager, requester, finance: not admins
        r = await api.get("/outbox", user, params={"status": "failed"})
        assert r.status_code == 403, (user, r.text)
        assert r.json()["detail"] == "requires one of the roles: admin"
    assert (await api.http.get("/outbox", params={"status": "failed"})).status_code == 401

    r = await api.get("/outbox", "ada", params={"status": "bounced"})
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["query", "status"]]
    for limit in (0, 201):
        r = await api.get("/outbox", "ada", params={"status": "failed", "limit": limit})
        assert r.status_code == 422, r.text
        assert [e["loc"] for e in r.json()["detail"]] == [["query", "limit"]]
