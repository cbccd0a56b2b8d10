"""A local SMTP sink: every received mail is kept in memory and written as an .eml file.

`python -m scripts.mailsink --host 127.0.0.1 --port 8025 --dir .data/mail`; runs until
SIGINT/SIGTERM. Tests use `MailSink` as the real SMTP server on loopback.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import itertools
import logging
import signal
import socket
import sys
import threading
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("procflow.mailsink")


class PortBusyError(OSError):
    pass


class _Handler:
    def __init__(self, sink: MailSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        self._sink._receive(raw, envelope.mail_from, list(envelope.rcpt_tos))
        return "250 Message accepted for delivery"


class MailSink:
    """An SMTP server on its own thread; received mail lands in `messages` (and `directory`)."""

    def __init__(self, host: str, port: int, directory: Path | str | None = None) -> None:
        self.host = host
        self.port = port
        self.directory = Path(directory) if directory is not None else None
        self.messages: list[EmailMessage] = []
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    def start(self) -> None:
        """Start serving; raises PortBusyError if host:port cannot be bound."""
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._check_port()
        controller = Controller(_Handler(self), hostname=self.host, port=self.port)
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> MailSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _check_port(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as err:
                raise PortBusyError(
                    err.errno, f"cannot listen on {self.host}:{self.port}: {err.strerror}"
                ) from err

    def _receive(self, raw: bytes, mail_from: str | None, rcpt_tos: list[str]) -> None:
        message = email.message_from_bytes(raw, policy=email.policy.default)
        with self._lock:
            number = next(self._counter)
            self.messages.append(message)  # type: ignore[arg-type]
        path = None
        if self.directory is not None:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            path = self.directory / f"{stamp}-{number:04d}.eml"
            path.write_bytes(raw)
        log.info(
            "mail from %s to %s: %r%s",
            mail_from,
            ", ".join(rcpt_tos),
            message.get("Subject", ""),
            f" -> {path}" if path else "",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local SMTP sink that stores mail as .eml files")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--dir", default=".data/mail", help="directory for the .eml files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    sink = MailSink(args.host, args.port, args.dir)
    try:
        sink.start()
    except OSError as err:
        print(f"mailsink: {err.strerror or err} (is the port busy?)", file=sys.stderr)
        return 1

    stopping = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    log.info("mail sink listening on %s:%s, writing to %s", args.host, args.port, args.dir)
    while not stopping.wait(0.5):
        pass
    sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
