"""The SMTP sender the notification activities use (async, aiosmtplib)."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib


class SmtpSender:
    def __init__(self, host: str, port: int, timeout: float, mail_from: str) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.mail_from = mail_from

    async def send(self, recipients: list[str], subject: str, body: str) -> None:
        """Send one plain-text mail; raises on any SMTP or connection failure."""
        message = EmailMessage()
        message["From"] = self.mail_from
        message["To"] = ", ".join(recipients)
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain="procflow")
        message.set_content(body)
        await aiosmtplib.send(
            message,
            sender=self.mail_from,
            recipients=recipients,
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
        )
