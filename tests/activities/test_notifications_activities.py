"""Notifications over real SMTP to a loopback mail sink."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from activities.mail import SmtpSender
from activities.models import Notification
from activities.notifications import NotificationActivities
from core.db import OutboxMessage
from scripts.mailsink import MailSink, PortBusyError

ROOT = Path(__file__).resolve().parents[2]


def _sender(sink: MailSink) -> SmtpSender:
    return SmtpSender(sink.host, sink.port, timeout=5, mail_from="procflow@localhost")


def _note(key: str = "sales-order-SO-1/notify-approval", **to: list[str]) -> Notification:
    return Notification(
        idempotency_key=key,
        workflow_id="sales-order-SO-1",
        subject="Approval needed: SO-1",
        body="Please approve order SO-1.",
        **to,
    )


async def test_notify_resolves_roles_and_sends_a_real_mail(
    sessions, users, mail_sink, activity_env
):
    notifications = NotificationActivities(sessions, _sender(mail_sink))
    result = await activity_env.run(
        notifications.notify,
        _note(to_roles=["vice-president"], to_users=["alice"], to_emails=["ops@acme.test"]),
    )
    expected = ["alice@example.com", "ops@acme.test", "vera@example.com", "victor@example.com"]
    assert (result.recipients, result.sent, result.duplicate) == (expected, True, False)
    assert len(mail_sink.messages) == 1
    mail = mail_sink.messages[0]
    assert mail["Subject"] == "Approval needed: SO-1"
    assert sorted(a.strip() for a in mail["To"].split(",")) == expected
    assert "Please approve order SO-1." in mail.get_content()
    assert len(list(mail_sink.directory.glob("*.eml"))) == 1

    async with sessions() as session:
        row = (await session.execute(select(OutboxMessage))).scalar_one()
    assert (row.status, row.recipients) == ("sent", expected)
    assert row.sent_at is not None


async def test_notify_with_the_same_key_sends_nothing_twice(
    sessions, users, mail_sink, activity_env
):
    notifications = NotificationActivities(sessions, _sender(mail_sink))
    await activity_env.run(notifications.notify, _note(to_users=["victor"]))
    again = await activity_env.run(notifications.notify, _note(to_users=["victor"]))
    assert (again.duplicate, again.recipients) == (True, ["victor@example.com"])
    assert len(mail_sink.messages) == 1


async def test_notify_without_recipients_marks_sent_and_sends_nothing(
    sessions, users, mail_sink, activity_env
):
    notifications = NotificationActivities(sessions, _sender(mail_sink))
    result = await activity_env.run(notifications.notify, _note(to_roles=["nobody-has-this"]))
    assert (result.recipients, result.sent) == ([], False)
    assert mail_sink.messages == []
    async with sessions() as session:
        row = (await session.execute(select(OutboxMessage))).scalar_one()
    assert (row.status, row.recipients) == ("sent", [])


async def test_smtp_failure_raises_and_a_retry_delivers(sessions, users, mail_sink, activity_env):
    mail_sink.stop()
    notifications = NotificationActivities(sessions, _sender(mail_sink))
    with pytest.raises(Exception):  # noqa: B017 - any SMTP/connection error, the retry handles it
        await activity_env.run(notifications.notify, _note(to_users=["alice"]))
    mail_sink.start()
    result = await activity_env.run(notifications.notify, _note(to_users=["alice"]))
    assert (result.sent, result.duplicate) == (True, False)
    assert len(mail_sink.messages) == 1


def test_mail_sink_refuses_a_busy_port(mail_sink, tmp_path):
    with pytest.raises(PortBusyError):
        MailSink(mail_sink.host, mail_sink.port, tmp_path / "other").start()


async def test_mailsink_command_exits_non_zero_on_a_busy_port(mail_sink):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scripts.mailsink",
        "--host",
        mail_sink.host,
        "--port",
        str(mail_sink.port),
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert b"port" in err and str(mail_sink.port).encode() in err


async def test_mailsink_command_stores_mail_and_stops_cleanly_on_sigterm(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scripts.mailsink",
        "--port",
        str(port),
        "--dir",
        str(tmp_path / "mail"),
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        while b"listening" not in await asyncio.wait_for(proc.stderr.readline(), 30):
            pass
        sender = SmtpSender("127.0.0.1", port, timeout=5, mail_from="procflow@localhost")
        await sender.send(["a@example.com"], "hello", "body")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert b"hello" in err
    [eml] = (tmp_path / "mail").glob("*.eml")
    assert b"Subject: hello" in eml.read_bytes()
