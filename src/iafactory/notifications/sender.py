"""The sender: delivers the outbox of one cell over SMTP, with retries; one loop per cell runs in
`iafactory worker`, and in `serve` with the indexing worker (the embedded default).

* One message at a time, claimed under a lease (`app.claim_email`, FOR UPDATE SKIP LOCKED) that a
  heartbeat renews while the SMTP conversation lasts: two senders never hand one message to the
  server at once, and a sender that died loses its message to another when the lease runs out.
* A temporary failure (a 4xx answer, no connection, a timeout, refused credentials) is tried
  again after 1, 2, 4 ... minutes (at most an hour apart), MAX_ATTEMPTS in all; a permanent one
  (5xx to the sender, a recipient or the content) fails the message at once. `iafactory outbox
  retry` queues failed messages again.
* Without IAFACTORY_SMTP_HOST (the demo) each message is printed in the log with its links and
  marked `logged`; it keeps its bodies, so it can be sent for real later.
* A message whose SMTP conversation has begun is finished even when the sender is stopped (the
  conversation runs in a thread, bounded by IAFACTORY_SMTP_TIMEOUT_SECONDS per step): stopping
  half-way would leave it unknown whether the server has it, and it could go out twice.

`run_once` is the unit the tests drive (no timing involved); `run_forever` adds LISTEN, polling
for retries that become due, and the purge of messages finished 30 days ago.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any, Literal, Protocol
from uuid import UUID

from iafactory.config import ConfigError, Settings, smtp_problems
from iafactory.db.scope import Database
from iafactory.notifications.outbox import CHANNEL
from iafactory.notifications.templates import links

log = logging.getLogger("iafactory.email")

MAX_ATTEMPTS = 8  # 1+2+4+8+16+32+60 minutes apart: about two hours of trying
BACKOFF_FIRST_SECONDS = 60
BACKOFF_MAX_SECONDS = 3600
IDLE_POLL_SECONDS = 5.0  # a retry that becomes due is noticed within this
PURGE_EVERY_SECONDS = 3600.0
KEEP_DAYS = 30  # finished messages (their envelope; sent ones have no body) are deleted after this
LEASE_SECONDS = 25
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

Outcome = Literal["sent", "logged", "retry", "failed"]


@dataclass(frozen=True)
class Message:
    """A claimed message, as `app.claim_email` returns it."""

    id: int
    to_address: str
    subject: str
    text_body: str | None
    html_body: str | None
    language: str
    kind: str
    attempts: int
    lease_token: UUID


class TemporaryFailure(Exception):
    """Worth trying again later (4xx, no connection, timeout, refused credentials)."""


class PermanentFailure(Exception):
    """The server refused this message for good (5xx to its sender, recipient or content)."""


class Mailer(Protocol):
    """Where messages go. `delivered` names the outcome of a delivery that did not raise."""

    delivered: Literal["sent", "logged"]

    async def deliver(self, message: Message) -> None: ...


class LogMailer:
    """No SMTP server configured: the message (subject and links) goes to the log."""

    delivered: Literal["sent", "logged"] = "logged"

    async def deliver(self, message: Message) -> None:
        found = links(message.text_body or "")
        log.warning(
            "email %s to %s not sent (IAFACTORY_SMTP_HOST is not set): %s%s",
            message.id,
            message.to_address,
            message.subject,
            "".join(f"\n  {url}" for url in found),
        )


class SmtpMailer:
    """smtplib in a thread: one connection per message (transactional email is rare; a connection
    kept open would time out between them anyway)."""

    delivered: Literal["sent", "logged"] = "sent"

    def __init__(self, settings: Settings) -> None:
        if problems := smtp_problems(settings):
            raise ConfigError("; ".join(problems))
        assert settings.smtp_host and settings.smtp_from  # (smtp_problems says so otherwise)
        self.host = settings.smtp_host
        self.tls = settings.smtp_tls
        self.starttls = settings.smtp_starttls and not settings.smtp_tls
        self.port = settings.smtp_port or (465 if self.tls else 587)
        self.user = settings.smtp_user
        self.password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        self.sender = settings.smtp_from
        self.timeout = settings.smtp_timeout_seconds

    def build(self, message: Message) -> EmailMessage:
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = _address(message.to_address)
        mail["Subject"] = message.subject
        mail["Date"] = formatdate(usegmt=True)
        domain = parseaddr(self.sender)[1].rpartition("@")[2] or None
        mail["Message-ID"] = make_msgid(f"outbox.{message.id}", domain=domain)
        mail["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to a robot
        mail.set_content(message.text_body or "")
        if message.html_body:
            mail.add_alternative(message.html_body, subtype="html")
        mail["Content-Language"] = message.language  # after the content, which resets Content-* headers
        return mail

    async def deliver(self, message: Message) -> None:
        try:
            mail = self.build(message)
        except (ValueError, TypeError) as err:
            raise PermanentFailure(f"cannot write this message: {err}") from err
        await asyncio.to_thread(self._send, mail)

    def _send(self, mail: EmailMessage) -> None:
        context = ssl.create_default_context()
        try:
            client: smtplib.SMTP = (
                smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
                if self.tls
                else smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            )
            with client:
                if self.starttls:
                    client.starttls(context=context)
                if self.user:
                    client.login(self.user, self.password or "")
                client.send_message(mail)
        except smtplib.SMTPRecipientsRefused as err:
            answers = list(err.recipients.values())
            text = "; ".join(f"{code} {reply.decode(errors='replace')}" for code, reply in answers)
            if all(code >= 500 for code, _ in answers):
                raise PermanentFailure(f"recipient refused: {text}") from err
            raise TemporaryFailure(f"recipient deferred: {text}") from err
        except (smtplib.SMTPAuthenticationError, smtplib.SMTPNotSupportedError) as err:
            # The configuration's doing, not the message's: every message fails alike until it is
            # fixed, then the retries (or `outbox retry --all-failed`) send them.
            raise TemporaryFailure(f"SMTP server: {err}") from err
        except smtplib.SMTPResponseException as err:
            reply = err.smtp_error.decode(errors="replace") if isinstance(err.smtp_error, bytes) else err.smtp_error
            failure = PermanentFailure if err.smtp_code >= 500 else TemporaryFailure
            raise failure(f"{err.smtp_code} {reply}") from err
        except (smtplib.SMTPException, OSError) as err:  # no connection, timeout, TLS, hung up
            raise TemporaryFailure(f"SMTP server {self.host}:{self.port}: {type(err).__name__}: {err}") from err


def _address(to: str) -> Address | str:
    """The recipient, its domain in IDNA (ASCII) form, which any SMTP server accepts."""
    local, _, domain = to.rpartition("@")
    try:
        return Address(addr_spec=f"{local}@{domain.encode('idna').decode('ascii')}")
    except (UnicodeError, ValueError):
        return to


def mailer(settings: Settings) -> Mailer:
    """SMTP when IAFACTORY_SMTP_HOST is set, else the log."""
    return SmtpMailer(settings) if settings.smtp_host else LogMailer()


def retry_delay(attempts: int) -> int:
    """Seconds before the next attempt after `attempts` failed ones: 60, 120, 240 ... at most 3600."""
    return min(BACKOFF_FIRST_SECONDS * 2 ** max(attempts - 1, 0), BACKOFF_MAX_SECONDS)


async def _attempt(mailer: Mailer, message: Message) -> tuple[Outcome, str | None]:
    """Deliver and say what became of it; never raises (but for cancellation)."""
    if message.attempts > MAX_ATTEMPTS:
        # Claimed again and again after its lease ran out: this message stops its senders.
        return "failed", f"the sender of this message stopped without finishing {MAX_ATTEMPTS} times"
    try:
        await mailer.deliver(message)
    except PermanentFailure as err:
        return "failed", str(err)
    except Exception as err:  # noqa: BLE001 - temporary, or unforeseen: tried again, then failed
        error = str(err) if isinstance(err, TemporaryFailure) else f"{type(err).__name__}: {err}"
        return ("failed" if message.attempts >= MAX_ATTEMPTS else "retry"), error
    return mailer.delivered, None


async def _finish(db: Database, message: Message, outcome: str, error: str | None) -> bool:
    async with db.anonymous() as tx:
        held = await tx.fetchval(
            "SELECT app.finish_email(%s, %s, %s, %s, %s)",
            (message.id, message.lease_token, outcome, error, retry_delay(message.attempts)),
        )
    if not held:
        log.warning("lost the lease of email %s before recording %s: another sender had taken it", message.id, outcome)
    return bool(held)


async def _heartbeat(db: Database, message: Message, lease_seconds: int) -> None:
    """Renew the lease every third of it while the message is being delivered."""
    while True:
        await asyncio.sleep(lease_seconds / 3)
        try:
            async with db.anonymous() as tx:
                held = await tx.fetchval(
                    "SELECT app.renew_email_lease(%s, %s, %s)", (message.id, message.lease_token, lease_seconds)
                )
        except Exception:  # the database may be restarting: try again next beat
            log.warning("could not renew the lease of email %s", message.id, exc_info=True)
            continue
        if not held:
            log.warning("lost the lease of email %s: another sender may take it", message.id)
            return


async def run_once(
    db: Database, mailer: Mailer, *, lease_seconds: int = LEASE_SECONDS, worker_id: str = WORKER_ID
) -> bool:
    """Claim one due message of `db`'s outbox and deliver it. False when none is due."""
    async with db.anonymous() as tx:
        row = await tx.fetchrow("SELECT * FROM app.claim_email(%s, %s)", (lease_seconds, worker_id))
    if row is None:
        return False
    message = Message(**row)
    heartbeat = asyncio.create_task(_heartbeat(db, message, lease_seconds))
    attempt = asyncio.create_task(_attempt(mailer, message))
    try:
        try:
            outcome, error = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # Stopping: the SMTP conversation cannot be taken back half-way. Let it end (bounded
            # by the SMTP timeout), record what became of the message, then stop.
            outcome, error = await attempt
            await asyncio.shield(_finish(db, message, outcome, error))
            raise
    finally:
        heartbeat.cancel()
    if error is None:
        log.info("email %s (%s) %s to %s", message.id, message.kind, outcome, message.to_address)
    else:
        log.warning(
            "email %s (%s) to %s, attempt %s: %s%s",
            message.id,
            message.kind,
            message.to_address,
            message.attempts,
            error,
            f" (next attempt in {retry_delay(message.attempts)} s)" if outcome == "retry" else " (failed)",
        )
    await asyncio.shield(_finish(db, message, outcome, error))
    return True


async def drain(db: Database, mailer: Mailer, **kwargs: Any) -> int:
    """Deliver every due message; returns how many were handled (tests, `worker --once`)."""
    done = 0
    while await run_once(db, mailer, **kwargs):
        done += 1
    return done


async def purge(db: Database, keep_days: int = KEEP_DAYS) -> int:
    """Delete the messages finished more than `keep_days` ago, a batch at a time."""
    deleted = 0
    while True:
        async with db.anonymous() as tx:
            batch = await tx.fetchval("SELECT app.purge_email_outbox(%s, 1000)", (keep_days,))
        deleted += batch
        if batch < 1000:
            return deleted


async def run_forever(
    db: Database, mailer: Mailer, stop: asyncio.Event | None = None, *, lease_seconds: int = LEASE_SECONDS
) -> None:
    """Deliver while messages are due; otherwise wait for a NOTIFY from a new one (or a retry
    that becomes due: a short poll). Returns when `stop` is set, after the message in hand."""
    stop = stop or asyncio.Event()
    wake = asyncio.Event()
    listener = asyncio.create_task(db.listen(CHANNEL, wake, stop))
    stopping = asyncio.create_task(stop.wait())
    next_purge = time.monotonic()
    try:
        while not stop.is_set():
            try:
                if await run_once(db, mailer, lease_seconds=lease_seconds):
                    continue
            except Exception:  # the database may be restarting: keep the sender alive
                log.exception("email sender loop error")
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + PURGE_EVERY_SECONDS
                try:
                    if deleted := await purge(db):
                        log.info("deleted %s emails finished more than %s days ago", deleted, KEEP_DAYS)
                except Exception:  # housekeeping: try again next time
                    log.warning("could not delete old emails", exc_info=True)
            wake.clear()
            woken = asyncio.create_task(wake.wait())
            await asyncio.wait({woken, stopping}, timeout=IDLE_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
    finally:
        stopping.cancel()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
