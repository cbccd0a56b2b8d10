"""The SMTP sender the notification activities and the mail dispatcher use (async, aiosmtplib)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib

Send = Callable[[list[str], str, str], Awaitable[None]]


class SmtpSender:
    def __init__(self, host: str, port: int, timeout: float, mail_from: str) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.mail_from = mail_from

    def _message(self, recipients: list[str], subject: str, body: str) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.mail_from
        message["To"] = ", ".join(recipients)
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain="procflow")
        message.set_content(body)
        return message

    async def send(self, recipients: list[str], subject: str, body: str) -> None:
        """Send one plain-text mail; raises on any SMTP or connection failure."""
        async with self.connection() as send:
            await send(recipients, subject, body)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Send]:
        """One SMTP session for several mails: yields a `send(recipients, subject, body)` that
        raises on a refused mail; connecting raises on a connection failure."""
        smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout)
        await smtp.connect()

        async def send(recipients: list[str], subject: str, body: str) -> None:
            await smtp.send_message(
                self._message(recipients, subject, body),
                sender=self.mail_from,
                recipients=recipients,
            )

        try:
            yield send
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
