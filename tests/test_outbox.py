"""Email that really leaves: the outbox, its senders, and what an SMTP server receives.

The SMTP server is aiosmtpd running in the test's own event loop (the sender talks to it from a
thread, with smtplib, as in production). It records every message it accepts and can be told to
answer the next ones 451 or 550, or to hold a message until the test lets it go: the test then
knows a sender is in the middle of a delivery, without timing anything. The sender is driven one
message at a time with `sender.run_once`; a retry "later" is made due by moving its
next_attempt_at, never by waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any
from uuid import UUID

import psycopg
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from psycopg.rows import dict_row

from conftest import run_cli, settings_for
from iafactory.config import ConfigError, Settings, smtp_problems
from iafactory.db import bootstrap
from iafactory.db.scope import Database
from iafactory.notifications import outbox, sender, templates
from iafactory.tenancy.context import TenantContext

pytestmark = pytest.mark.anyio

SYSTEM_TENANT = TenantContext(tenant_id=UUID(int=0))  # migration 006's tenant, present in every test database
USER, PASSWORD = "mailer", "smtp-password-for-tests"
INVITATION = {
    "inviter": "Karim Haddad",
    "tenant": "École <Ibn Khaldoun> & fils",
    "role": "admin",
    "link": "https://app.example.ch/invitations/accept?token=abc123",
    "days": 7,
}
RESET = {"link": "https://app.example.ch/reset?token=xyz789", "minutes": 30}


class Inbox:
    """An aiosmtpd handler: what the server accepted, and what it should answer next."""

    def __init__(self) -> None:
        self.received: list[tuple[list[str], EmailMessage]] = []
        self.logins: list[str] = []
        self.answers: list[str] = []  # the next DATA commands get these instead of 250
        self.hold: asyncio.Event | None = None  # set: DATA waits until the test sets it
        self.arrived = asyncio.Event()

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.answers:
            return self.answers.pop(0)
        mail = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(mail, EmailMessage)
        self.received.append((list(envelope.rcpt_tos), mail))
        return "250 OK"

    def authenticate(self, server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == (USER, PASSWORD)
        if ok:
            self.logins.append(data.login.decode())
        return AuthResult(success=ok)


@pytest.fixture
async def smtp() -> AsyncIterator[tuple[Inbox, int]]:
    """The SMTP server (plain, AUTH allowed without TLS: it is on loopback) and its port."""
    inbox = Inbox()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(inbox, hostname="smtp.test", loop=loop, authenticator=inbox.authenticate, auth_require_tls=False),
        "127.0.0.1",
        0,
    )
    try:
        yield inbox, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def db(module_db: str) -> AsyncIterator[Database]:
    """The application's pool on this module's database, with an empty outbox."""
    with psycopg.connect(module_db) as conn:
        conn.execute("DELETE FROM email_outbox")
    async with bootstrap.database(settings_for(module_db), module_db) as database:
        yield database


def smtp_mailer(url: str, port: int, **overrides: Any) -> sender.SmtpMailer:
    settings = settings_for(
        url,
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_starttls=False,
        smtp_from="IAFactory <no-reply@iafactory.test>",
        **overrides,
    )
    return sender.SmtpMailer(settings)


def rows(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute("""SELECT *, next_attempt_at - now() AS wait FROM email_outbox ORDER BY id""").fetchall()


def make_due(url: str) -> None:
    """What time would do: the message's next attempt is now."""
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE email_outbox SET next_attempt_at = now() WHERE status = 'pending'")


async def enqueue(db: Database, to: str, kind: str, lang: str, context: dict[str, Any]) -> int:
    async with db.tenant(SYSTEM_TENANT) as tx:
        return await outbox.enqueue(tx, to, kind, lang, context)


async def test_delivered_in_its_language_with_text_and_html(db: Database, module_db: str, smtp: Any) -> None:
    inbox, port = smtp
    mailer = smtp_mailer(module_db, port, smtp_user=USER, smtp_password=PASSWORD)
    first = await enqueue(db, "ana@example.ch", "invitation", "fr-CH", INVITATION)
    # Account-level mail, no tenant: from the anonymous scope of registration or reset.
    async with db.anonymous() as tx:
        second = await outbox.enqueue(tx, "bob@école.ch", "password_reset", "en", RESET)

    assert await sender.drain(db, mailer) == 2
    assert inbox.logins == [USER, USER]
    (fr_to, fr), (en_to, en) = inbox.received
    assert fr_to == ["ana@example.ch"]
    assert en_to == ["bob@xn--cole-9oa.ch"]  # the domain in IDNA form: any server accepts it
    assert fr["Subject"] == "Karim Haddad vous invite à rejoindre École <Ibn Khaldoun> & fils sur IAFactory"
    assert en["Subject"] == "Reset your IAFactory password"
    assert (fr["Content-Language"], en["Content-Language"]) == ("fr", "en")
    assert fr["From"] == "IAFactory <no-reply@iafactory.test>"
    assert f"outbox.{first}" in fr["Message-ID"] and f"outbox.{second}" in en["Message-ID"]
    for mail, context, words in ((fr, INVITATION, "valable 7 jours"), (en, RESET, "valid for 30 minutes")):
        text = mail.get_body(("plain",))
        page = mail.get_body(("html",))
        assert text is not None and page is not None
        assert words in text.get_content() and context["link"] in text.get_content()
        assert f'<a href="{context["link"]}">' in page.get_content()
    page_fr = fr.get_body(("html",))
    assert page_fr is not None
    assert '<html lang="fr">' in page_fr.get_content()
    assert "École &lt;Ibn Khaldoun&gt; &amp; fils" in page_fr.get_content()  # values are escaped

    sent = rows(module_db)
    assert [(r["status"], r["attempts"], r["text_body"], r["html_body"]) for r in sent] == [("sent", 1, None, None)] * 2
    assert all(r["sent_at"] is not None for r in sent)
    assert not await sender.run_once(db, mailer)  # nothing is sent twice


async def test_a_rolled_back_action_sends_nothing(db: Database, module_db: str, smtp: Any) -> None:
    inbox, port = smtp
    with pytest.raises(RuntimeError):
        async with db.tenant(SYSTEM_TENANT) as tx:
            await outbox.enqueue(tx, "ana@example.ch", "invitation", "fr", INVITATION)
            raise RuntimeError("the invitation could not be created")
    assert rows(module_db) == []
    assert not await sender.run_once(db, smtp_mailer(module_db, port))
    assert inbox.received == []


async def test_a_deferred_message_is_retried_with_backoff_then_sent(db: Database, module_db: str, smtp: Any) -> None:
    inbox, port = smtp
    mailer = smtp_mailer(module_db, port)
    inbox.answers = ["451 4.3.0 Try again later", "451 4.3.0 Try again later"]
    await enqueue(db, "ana@example.ch", "password_reset", "fr", RESET)

    assert await sender.run_once(db, mailer)
    (row,) = rows(module_db)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert "451" in row["last_error"] and row["text_body"] is not None
    assert row["wait"].total_seconds() > sender.retry_delay(1) / 2  # about a minute away
    assert not await sender.run_once(db, mailer)  # not due yet: the backoff holds it

    make_due(module_db)
    assert await sender.run_once(db, mailer)
    (row,) = rows(module_db)
    assert (row["status"], row["attempts"]) == ("pending", 2)
    assert row["wait"].total_seconds() > sender.retry_delay(1) + 10  # twice as far: about two minutes
    assert sender.retry_delay(2) == 2 * sender.retry_delay(1)
    assert inbox.received == []

    make_due(module_db)
    assert await sender.run_once(db, mailer)
    (row,) = rows(module_db)
    assert (row["status"], row["attempts"], row["text_body"]) == ("sent", 3, None)
    assert len(inbox.received) == 1
    assert inbox.received[0][1]["Subject"] == "Réinitialisation de votre mot de passe IAFactory"


async def test_two_senders_never_send_one_message_twice(db: Database, module_db: str, smtp: Any) -> None:
    inbox, port = smtp
    mailer = smtp_mailer(module_db, port)
    # One message held in the middle of its delivery by sender A: sender B does not take it.
    await enqueue(db, "ana@example.ch", "verify_email", "en", {"link": "https://app.example.ch/verify?t=1"})
    inbox.hold = asyncio.Event()
    async with bootstrap.database(settings_for(module_db), module_db) as other:
        first = asyncio.create_task(sender.run_once(db, mailer, worker_id="sender-a"))
        await asyncio.wait_for(inbox.arrived.wait(), 60)
        (row,) = rows(module_db)
        assert (row["status"], row["worker"]) == ("sending", "sender-a")
        assert not await sender.run_once(other, mailer, worker_id="sender-b")
        inbox.hold.set()
        assert await first
        inbox.hold = None
        assert len(inbox.received) == 1

        # Many messages, two senders at once: each message arrives exactly once.
        for n in range(12):
            await enqueue(
                db, f"person{n}@example.ch", "verify_email", "fr", {"link": f"https://app.example.ch/v?t={n}"}
            )
        done = await asyncio.gather(
            sender.drain(db, mailer, worker_id="sender-a"), sender.drain(other, mailer, worker_id="sender-b")
        )
    assert sum(done) == 12
    recipients = [to for to_list, _ in inbox.received[1:] for to in to_list]
    assert sorted(recipients) == sorted(f"person{n}@example.ch" for n in range(12))
    assert {r["status"] for r in rows(module_db)} == {"sent"}
    assert all(r["attempts"] == 1 for r in rows(module_db))


async def test_without_smtp_the_log_shows_the_link(
    db: Database, module_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    await enqueue(db, "ana@example.ch", "invitation", "en", INVITATION)
    mailer = sender.mailer(settings_for(module_db))  # no IAFACTORY_SMTP_HOST
    assert isinstance(mailer, sender.LogMailer)
    with caplog.at_level(logging.INFO, logger="iafactory.email"):
        assert await sender.run_once(db, mailer)
    assert INVITATION["link"] in caplog.text and "ana@example.ch" in caplog.text
    (row,) = rows(module_db)
    # Delivered to the log, and kept whole: `outbox retry` can send it once SMTP is configured.
    assert row["status"] == "logged" and INVITATION["link"] in row["text_body"]
    assert not await sender.run_once(db, mailer)


async def test_a_refused_recipient_fails_at_once_and_the_cli_sends_it_again(
    db: Database, module_db: str, smtp: Any
) -> None:
    inbox, port = smtp
    inbox.answers = ["550 5.1.1 No such user here"]
    message_id = await enqueue(db, "nobody@example.ch", "verify_email", "fr", {"link": "https://app.example.ch/v"})
    assert await sender.run_once(db, smtp_mailer(module_db, port))
    (row,) = rows(module_db)
    assert (row["status"], row["attempts"]) == ("failed", 1) and "550" in row["last_error"]

    listed = await asyncio.to_thread(run_cli, "outbox", "list", "--failed", "--json", db_url=module_db)
    assert listed.returncode == 0, listed.stderr
    (shown,) = json.loads(listed.stdout)
    assert (shown["id"], shown["status"], shown["to_address"], shown["cell"]) == (
        message_id,
        "failed",
        "nobody@example.ch",
        "default",
    )
    assert "text_body" not in shown  # the list never shows bodies (their links are credentials)

    retried = await asyncio.to_thread(run_cli, "outbox", "retry", str(message_id), db_url=module_db)
    assert retried.returncode == 0 and str(message_id) in retried.stdout, retried.stderr
    (row,) = rows(module_db)
    assert (row["status"], row["attempts"]) == ("pending", 0)
    again = await asyncio.to_thread(run_cli, "outbox", "retry", "999999", db_url=module_db)
    assert again.returncode == 1 and "no message 999999" in again.stderr

    # `iafactory worker --once` sends what is due; without SMTP settings, to its log.
    worker = await asyncio.to_thread(
        run_cli, "worker", "--once", db_url=module_db, env={"IAFACTORY_EMBEDDING_PROVIDER": "none"}
    )
    assert worker.returncode == 0 and "handled 1 email(s)" in worker.stdout, worker.stderr
    assert "https://app.example.ch/v" in worker.stderr
    assert rows(module_db)[0]["status"] == "logged"


def test_every_kind_renders_in_every_language() -> None:
    samples = {name: f"<{name}>" for names in templates.KINDS.values() for name in names}
    for kind in templates.TEXTS:
        for lang in templates.LANGUAGES:
            message = templates.render(kind, lang, samples)
            assert "$" not in message.subject + message.text, (kind, lang)
            assert message.language == lang
    with pytest.raises(ValueError, match="needs days"):
        templates.render("invitation", "fr", {k: v for k, v in INVITATION.items() if k != "days"})
    with pytest.raises(ValueError, match="unknown email kind"):
        templates.render("newsletter", "fr", {})
    assert templates.render("verify_email", "de", {"link": "https://x.test"}).language == "fr"
    # A line break in a value cannot add a header.
    assert "\n" not in templates.render("invitation", "en", {**INVITATION, "tenant": "A\nBcc: x@y.z"}).subject


def test_smtp_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigError, match="IAFACTORY_SMTP_FROM is not set"):
        sender.mailer(Settings(smtp_host="smtp.example.ch"))
    assert smtp_problems(Settings(smtp_host="smtp.example.ch", smtp_from="a@b.ch", smtp_password="x")) == [
        "IAFACTORY_SMTP_PASSWORD is set without IAFACTORY_SMTP_USER"
    ]
    tls = sender.SmtpMailer(Settings(smtp_host="smtp.example.ch", smtp_from="a@b.ch", smtp_tls=True))
    assert (tls.port, tls.tls, tls.starttls) == (465, True, False)  # STARTTLS does not apply inside TLS
    assert sender.SmtpMailer(Settings(smtp_host="smtp.example.ch", smtp_from="a@b.ch")).port == 587
