"""The SMTP sender the notification activities and the mail dispatcher use (async, aiosmtplib).

A mail that the server refuses for itself (a 4xx or 5xx answer to its envelope or content,
every recipient refused) or that cannot go to this server at all (an address it cannot take)
raises `MailRefused` and leaves the session usable for the next mail; a session that fails
(connection refused or lost, timeout) raises aiosmtplib's or the OS's error as it is.

On a server without SMTPUTF8 the domain of an internationalized address goes out as punycode
(IDNA 2008 with UTS 46 mapping, so `straße.de` stays `xn--strae-oqa.de` and does not become
`strasse.de`, another domain); a non-ASCII local part has no ASCII form and refuses that mail
permanently. A server with SMTPUTF8 gets the addresses as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib
import idna

# send(recipients, subject, body) -> the recipients refused while others accepted the mail,
# each with the server's answer ({} when every recipient accepted it)
Send = Callable[[list[str], str, str], Awaitable[dict[str, str]]]


class MailRefused(Exception):
    """This one mail was not accepted; `permanent`: sending it again will not help (a 5xx
    answer, an address this server cannot take), else it may (a 4xx answer)."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


class SessionClosed(aiosmtplib.SMTPServerDisconnected):
    """The server closed the session before this mail was offered (e.g. after a 421 answer to
    the previous one): nothing is wrong with this mail."""


def ascii_address(address: str) -> str:
    """The address for a server without SMTPUTF8: an internationalized domain as punycode.

    Raises MailRefused (permanent) for a non-ASCII local part or a domain IDNA cannot encode.
    """
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        raise MailRefused(
            f"{address}: the local part is not ASCII and the server does not support SMTPUTF8",
            permanent=True,
        )
    try:
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
    except UnicodeError as err:  # idna.IDNAError included
        reason = f"{address}: the domain has no IDNA form ({err})"
        raise MailRefused(reason, permanent=True) from err
    return f"{local}@{ascii_domain}"


def _refusal(err: aiosmtplib.SMTPException) -> MailRefused:
    """The MailRefused for aiosmtplib's answer to one mail."""
    if isinstance(err, aiosmtplib.SMTPRecipientsRefused):
        answers = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in err.recipients)
        permanent = all(r.code >= 500 for r in err.recipients)
        return MailRefused(f"every recipient refused: {answers}", permanent=permanent)
    if isinstance(err, aiosmtplib.SMTPResponseException):
        return MailRefused(f"{err.code} {err.message}", permanent=err.code >= 500)
    return MailRefused(str(err) or type(err).__name__, permanent=True)  # SMTPNotSupported


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

    async def send(self, recipients: list[str], subject: str, body: str) -> dict[str, str]:
        """Send one plain-text mail; raises MailRefused or a connection failure."""
        async with self.connection() as send:
            return await send(recipients, subject, body)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Send]:
        """One SMTP session for several mails: yields a `send(recipients, subject, body)` that
        raises MailRefused for a refused mail, and SessionClosed or a connection failure when
        the session is gone; connecting raises on a connection failure."""
        smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout)
        await smtp.connect()
        if smtp.is_ehlo_or_helo_needed:  # connect() greets already; the extensions decide below
            await smtp.ehlo()

        async def send(recipients: list[str], subject: str, body: str) -> dict[str, str]:
            if not smtp.is_connected:
                raise SessionClosed("the SMTP server closed the session before this mail")
            utf8 = smtp.supports_extension("smtputf8")
            sender = self.mail_from if utf8 else ascii_address(self.mail_from)
            to = recipients if utf8 else [ascii_address(r) for r in recipients]
            try:
                refused, _ = await smtp.send_message(
                    self._message(to, subject, body), sender=sender, recipients=to
                )
            except ValueError as err:  # an address or header that cannot go on the wire
                raise MailRefused(str(err), permanent=True) from err
            except (
                aiosmtplib.SMTPRecipientsRefused,
                aiosmtplib.SMTPNotSupported,
                aiosmtplib.SMTPResponseException,
            ) as err:
                raise _refusal(err) from err
            return {address: f"{r.code} {r.message}" for address, r in refused.items()}

        try:
            yield send
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
