"""The outbox: `project` queues a step's mails in its transaction; the mail dispatcher delivers
them over real SMTP to a loopback sink, once each, with leases and backoff (SQLite and
PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import select, update

from activities.mail import SmtpSender
from activities.models import Notification, ProjectionBatch
from activities.notifications import MailDispatcher, NotificationActivities
from activities.records import RecordActivities
from core.db import OutboxMessage, utcnow
from scripts.mailsink import MailSink


def _sender(sink: MailSink) -> SmtpSender:
    return SmtpSender(sink.host, sink.port, timeout=5, mail_from="procflow@localhost")


def _mail(n: int, **to: list[str]) -> Notification:
    return Notification(
        idempotency_key=f"sales-order-SO-1:mail:{n}",
        workflow_id="sales-order-SO-1",
        subject=f"mail {n}",
        body=f"body {n}",
        **(to or {"to_emails": ["buyer@example.com"]}),
    )


async def _rows(sessions) -> list[OutboxMessage]:
    async with sessions() as session:
        return list(
            (await session.execute(select(OutboxMessage).order_by(OutboxMessage.id))).scalars()
        )


async def test_project_queues_the_mails_of_a_step_once_and_wakes_the_dispatcher(
    sessions, users, activity_env
):
    woken: list[bool] = []
    records = RecordActivities(sessions, mail_queued=lambda: woken.append(True))
    batch = ProjectionBatch(
        mails=[_mail(1, to_roles=["vice-president"]), _mail(2, to_users=["alice"]), _mail(3)]
    )
    await activity_env.run(records.project, batch)
    await activity_env.run(records.project, batch)  # a retry after a lost answer
    rows = await _rows(sessions)
    assert [(r.subject, r.recipients, r.status) for r in rows] == [
        ("mail 1", ["vera@example.com", "victor@example.com"], "pending"),  # not olga: inactive
        ("mail 2", ["alice@example.com"], "pending"),
        ("mail 3", ["buyer@example.com"], "pending"),
    ]
    assert woken == [True, True]
    await activity_env.run(records.project, ProjectionBatch())
    assert woken == [True, True]  # nothing queued, nobody woken


async def test_dispatcher_delivers_each_queued_mail_once_over_one_session(
    sessions, activity_env, mail_sink
):
    records = RecordActivities(sessions)
    await activity_env.run(records.project, ProjectionBatch(mails=[_mail(i) for i in range(5)]))
    dispatcher = MailDispatcher(sessions, _sender(mail_sink), batch_size=3)
    assert await dispatcher.deliver_due() == 3
    assert await dispatcher.deliver_due() == 2
    assert await dispatcher.deliver_due() == 0
    assert sorted(m["Subject"] for m in mail_sink.messages) == [f"mail {i}" for i in range(5)]
    rows = await _rows(sessions)
    assert {r.status for r in rows} == {"sent"} and all(r.sent_at for r in rows)
    assert dispatcher.sent == 5


async def test_a_mail_without_recipients_is_marked_sent_without_smtp(sessions, activity_env):
    records = RecordActivities(sessions)
    await activity_env.run(
        records.project, ProjectionBatch(mails=[_mail(1, to_roles=["nobody-has-this"])])
    )
    # no SMTP server at all on this port: it is never contacted
    dispatcher = MailDispatcher(sessions, SmtpSender("127.0.0.1", 9, 1, "procflow@localhost"))
    assert await dispatcher.deliver_due() == 1
    [row] = await _rows(sessions)
    assert (row.status, row.recipients, row.attempts) == ("sent", [], 0)


async def test_smtp_outage_backs_off_and_delivers_when_the_server_is_back(
    sessions, activity_env, mail_sink
):
    records = RecordActivities(sessions)
    await activity_env.run(records.project, ProjectionBatch(mails=[_mail(1), _mail(2)]))
    mail_sink.stop()
    dispatcher = MailDispatcher(sessions, _sender(mail_sink), first_backoff_s=30)
    assert await dispatcher.deliver_due() == 2
    rows = await _rows(sessions)
    assert [(r.status, r.attempts) for r in rows] == [("pending", 1), ("pending", 1)]
    assert all(r.last_error and r.next_attempt_at and r.next_attempt_at > utcnow() for r in rows)
    assert all(r.lease_until is None for r in rows)
    mail_sink.start()
    assert await dispatcher.deliver_due() == 0  # not due yet: backing off
    async with sessions.begin() as session:  # 30 s later
        await session.execute(update(OutboxMessage).values(next_attempt_at=utcnow()))
    assert await dispatcher.deliver_due() == 2
    assert sorted(m["Subject"] for m in mail_sink.messages) == ["mail 1", "mail 2"]
    assert dispatcher.failures == 2


async def test_backoff_doubles_up_to_its_cap(sessions, activity_env):
    records = RecordActivities(sessions)
    await activity_env.run(records.project, ProjectionBatch(mails=[_mail(1)]))
    nowhere = SmtpSender("127.0.0.1", 9, 1, "procflow@localhost")
    dispatcher = MailDispatcher(sessions, nowhere, first_backoff_s=10, max_backoff_s=25)
    for expected in (10, 20, 25, 25):
        async with sessions.begin() as session:
            await session.execute(update(OutboxMessage).values(next_attempt_at=utcnow()))
        before = utcnow()
        assert await dispatcher.deliver_due() == 1
        after = utcnow()
        [row] = await _rows(sessions)
        assert row.next_attempt_at is not None
        # the next attempt is `expected` seconds after the failure, which happened between
        # `before` and `after` (however long the attempt took); 1 ms for stored precision
        slack = timedelta(milliseconds=1)
        earliest, latest = before + timedelta(seconds=expected), after + timedelta(seconds=expected)
        assert earliest - slack <= row.next_attempt_at <= latest + slack, (expected, row)
    assert row.attempts == 4


async def test_a_leased_row_waits_and_an_expired_lease_is_taken_over(
    sessions, activity_env, mail_sink
):
    records = RecordActivities(sessions)
    await activity_env.run(records.project, ProjectionBatch(mails=[_mail(1)]))
    async with sessions.begin() as session:  # another dispatcher holds it
        await session.execute(
            update(OutboxMessage).values(lease_until=utcnow() + timedelta(seconds=60))
        )
    dispatcher = MailDispatcher(sessions, _sender(mail_sink))
    assert await dispatcher.deliver_due() == 0
    async with sessions.begin() as session:  # ... and died holding it
        await session.execute(
            update(OutboxMessage).values(lease_until=utcnow() - timedelta(seconds=1))
        )
    assert await dispatcher.deliver_due() == 1
    assert [m["Subject"] for m in mail_sink.messages] == ["mail 1"]


async def test_concurrent_dispatchers_send_each_mail_exactly_once(
    sessions, activity_env, mail_sink
):
    records = RecordActivities(sessions)
    mails = [_mail(i) for i in range(40)]
    await activity_env.run(records.project, ProjectionBatch(mails=mails))
    dispatchers = [MailDispatcher(sessions, _sender(mail_sink), batch_size=5) for _ in range(4)]

    async def drain(d: MailDispatcher) -> None:
        while await d.deliver_due():
            pass

    await asyncio.gather(*(drain(d) for d in dispatchers))
    subjects = sorted(m["Subject"] for m in mail_sink.messages)
    assert subjects == sorted(m.subject for m in mails)  # every one, none twice
    assert sum(d.sent for d in dispatchers) == 40


async def test_running_dispatcher_is_woken_by_project_and_drains_on_stop(
    sessions, activity_env, mail_sink
):
    dispatcher = MailDispatcher(sessions, _sender(mail_sink), poll_s=3600)  # no polling
    records = RecordActivities(sessions, mail_queued=dispatcher.wake)
    other = RecordActivities(sessions)  # another worker process's: it wakes nobody here
    await activity_env.run(other.project, ProjectionBatch(mails=[_mail(0)]))
    dispatcher.start()
    try:
        # its first round delivers what was queued; then only a wake-up starts another round
        await _until_sent(mail_sink, ["mail 0"])
        await activity_env.run(records.project, ProjectionBatch(mails=[_mail(1)]))
        await _until_sent(mail_sink, ["mail 0", "mail 1"])
        # queued by another worker process (nobody wakes this one): the last round on stop
        await activity_env.run(other.project, ProjectionBatch(mails=[_mail(2)]))
        await asyncio.sleep(0.5)
        assert _subjects(mail_sink) == ["mail 0", "mail 1"]
    finally:
        await dispatcher.stop()
    assert _subjects(mail_sink) == ["mail 0", "mail 1", "mail 2"]


def _subjects(sink: MailSink) -> list[str]:
    return sorted(m["Subject"] for m in sink.messages)


async def _until_sent(sink: MailSink, subjects: list[str], timeout_s: float = 60) -> None:
    """Wait until the sink holds exactly these mails (a generous bound, not a speed check)."""
    async with asyncio.timeout(timeout_s):
        while _subjects(sink) != subjects:
            assert set(_subjects(sink)) <= set(subjects), _subjects(sink)
            await asyncio.sleep(0.05)


async def test_the_notify_activitys_rows_are_not_the_dispatchers(
    sessions, users, activity_env, mail_sink
):
    mail_sink.stop()
    notifications = NotificationActivities(sessions, _sender(mail_sink))
    try:
        await activity_env.run(notifications.notify, _mail(1, to_users=["alice"]))
    except Exception:  # noqa: BLE001 - the SMTP server is down: Temporal would retry
        pass
    mail_sink.start()
    dispatcher = MailDispatcher(sessions, _sender(mail_sink))
    assert await dispatcher.deliver_due() == 0  # the activity's retry sends it, not both
    [row] = await _rows(sessions)
    assert row.status == "sending"


async def test_stop_returns_even_when_woken_as_it_stops(sessions, mail_sink):
    """A worker shutdown must not hang on its dispatcher. Stopping by cancelling the task lost
    the cancellation now and then (Python 3.11's `asyncio.wait_for` swallows one that arrives
    as its inner wait completes) and the shutdown waited forever."""
    dispatcher = MailDispatcher(sessions, _sender(mail_sink), poll_s=0.01, gather_s=0)
    for i in range(120):
        dispatcher.start()
        await asyncio.sleep(0.02)  # it waits to be woken
        dispatcher.wake()
        for _ in range(i % 4):  # let the wake-up get a little way before the stop
            await asyncio.sleep(0)
        async with asyncio.timeout(10):
            await dispatcher.stop(drain_s=1)
