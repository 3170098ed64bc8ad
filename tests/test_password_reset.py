"""Password reset by email, end to end over HTTP, with the email read from a real SMTP server.

A request answers 202 with the same body whether or not the email has an account; the outbox's
sender delivers the email to the in-process aiosmtpd server (tests/test_outbox.py); the link's
token sets a new password once, within 30 minutes, and ends every session of the account (old
access and refresh tokens fail on their next request). Requests are throttled like sign-ins.
Each test uses its own client address (the throttle counts per address).
"""

from __future__ import annotations

import re
import uuid

import psycopg
import pytest

from api_support import PASSWORD
from conftest import settings_for
from iafactory.auth import resets
from iafactory.db import bootstrap
from iafactory.notifications import sender
from test_outbox import Inbox, smtp, smtp_mailer  # noqa: F401 - smtp is a fixture
from test_sessions import API, bearer, client_at, events, new_ip, register, sign_in

pytestmark = pytest.mark.anyio

REQUEST = f"{API}/auth/password-reset"
CONFIRM = f"{API}/auth/password-reset/confirm"
NEW_PASSWORD = "a brand new passphrase 7"
_LINK = re.compile(r"/reset-password\?token=(pwr_[A-Za-z0-9_-]+)")


@pytest.fixture(scope="module")
def db_url(module_db: str) -> str:
    return module_db


async def reset_link(url: str, smtp: tuple[Inbox, int], email: str) -> tuple[str, str]:  # noqa: F811
    """Delivers the outbox, then the newest reset email to `email`: (text body, token)."""
    inbox, port = smtp
    async with bootstrap.database(settings_for(url), url) as db:
        await sender.drain(db, smtp_mailer(url, port))
    for rcpts, mail in reversed(inbox.received):
        if email in rcpts:
            text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            match = _LINK.search(text)
            assert match, text
            return text, match.group(1)
    raise AssertionError(f"no email to {email}")


def user_id_of(url: str, email: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT id FROM users WHERE lower(email) = lower(%s)", (email,)).fetchone()
    assert row is not None
    return int(row[0])


async def test_reset_by_email_sets_the_password_and_ends_every_session(
    db_url: str,
    smtp: tuple[Inbox, int],  # noqa: F811
) -> None:
    async with client_at(db_url, new_ip()) as c:
        email = await register(c)
        one, two = await sign_in(c, email), await sign_in(c, email)
        r = await c.post(REQUEST, json={"email": email}, headers={"Accept-Language": "en-GB,en;q=0.8"})
        assert r.status_code == 202 and r.json() == {"detail": resets.ANSWER}, r.text
        text, token = await reset_link(db_url, smtp, email)
        assert f"http://127.0.0.1:8000/reset-password?token={token}" in text and "30 minutes" in text
        assert token.startswith("pwr_")

        # The password policy names the field; the token stays usable.
        weak = await c.post(CONFIRM, json={"token": token, "new_password": "1234567890"})
        assert weak.status_code == 422 and "new_password" in weak.text, weak.text
        r = await c.post(CONFIRM, json={"token": token, "new_password": NEW_PASSWORD})
        assert r.status_code == 204, r.text

        # Old access and refresh tokens fail on their next request.
        for session in (one, two):
            assert (await c.get(f"{API}/me", headers=bearer(session["access_token"]))).status_code == 401
            r = await c.post(f"{API}/auth/refresh", json={"refresh_token": session["refresh_token"]})
            assert r.status_code == 401, r.text
        # The old password fails, the new one works.
        old = await c.post(f"{API}/auth/login", json={"email": email, "password": PASSWORD})
        assert old.status_code == 401, old.text
        fresh = await sign_in(c, email, NEW_PASSWORD)
        assert (await c.get(f"{API}/me", headers=bearer(fresh["access_token"]))).status_code == 200

        # The token works once.
        again = await c.post(CONFIRM, json={"token": token, "new_password": "yet another passphrase 8"})
        assert again.status_code == 410 and again.json()["type"].endswith("reset-used"), again.text

        user_id = user_id_of(db_url, email)
        requested = events(db_url, "auth.password_reset_requested", user_id)
        done = events(db_url, "auth.password_reset", user_id)
        assert len(requested) == 1 and len(done) == 1 and done[0]["details"]["sessions_ended"] == 2
        with psycopg.connect(db_url) as conn:
            stored = conn.execute("SELECT token_hash FROM password_resets WHERE user_id = %s", (user_id,)).fetchall()
        assert stored and all(token.encode() not in bytes(h) for (h,) in stored)  # only its HMAC


async def test_known_and_unknown_emails_get_the_same_answer(db_url: str, smtp: tuple[Inbox, int]) -> None:  # noqa: F811
    async with client_at(db_url, new_ip()) as c:
        known = await register(c)
        unknown = f"nobody-{uuid.uuid4().hex[:10]}@example.ch"
        a = await c.post(REQUEST, json={"email": known})
        b = await c.post(REQUEST, json={"email": unknown})
        assert (a.status_code, a.content) == (b.status_code, b.content) == (202, a.content)
        drop = {"x-request-id", "date", "server-timing", "traceparent"}
        assert {k: v for k, v in a.headers.items() if k not in drop} == {
            k: v for k, v in b.headers.items() if k not in drop
        }
        await reset_link(db_url, smtp, known)
        with psycopg.connect(db_url) as conn:
            queued = conn.execute("SELECT count(*) FROM email_outbox WHERE to_address = %s", (unknown,)).fetchone()
        assert queued == (0,)  # nothing is sent to an address without an account
        unknown_events = [e for e in events(db_url, "auth.password_reset_requested") if e["user_id"] is None]
        assert unknown_events and unknown_events[-1]["details"] == {"account": False}


async def test_a_newer_request_replaces_the_link_and_expired_or_forged_tokens_are_refused(
    db_url: str,
    smtp: tuple[Inbox, int],  # noqa: F811
) -> None:
    async with client_at(db_url, new_ip()) as c:
        email = await register(c)
        assert (await c.post(REQUEST, json={"email": email})).status_code == 202
        _, first = await reset_link(db_url, smtp, email)
        assert (await c.post(REQUEST, json={"email": email})).status_code == 202
        _, second = await reset_link(db_url, smtp, email)
        assert first != second
        replaced = await c.post(CONFIRM, json={"token": first, "new_password": NEW_PASSWORD})
        assert replaced.status_code == 410, replaced.text

        # What 30 minutes would do: the link has expired.
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "UPDATE password_resets SET expires_at = now() - interval '1 second' WHERE token_hash = %s",
                (resets.digest(settings_for(db_url), second),),
            )
        expired = await c.post(CONFIRM, json={"token": second, "new_password": NEW_PASSWORD})
        assert expired.status_code == 410 and expired.json()["type"].endswith("reset-expired"), expired.text
        assert (await c.post(f"{API}/auth/login", json={"email": email, "password": PASSWORD})).status_code == 200

        forged = second[:-4] + ("AAAA" if not second.endswith("AAAA") else "BBBB")
        for bad in (forged, second.replace("pwr_", "pwr_nowhere-"), "pwr_x_short", "not a token"):
            r = await c.post(CONFIRM, json={"token": bad, "new_password": NEW_PASSWORD})
            assert r.status_code == 404 and r.json()["type"].endswith("reset-unknown"), (bad, r.text)


async def test_requests_are_throttled_like_sign_ins(db_url: str) -> None:
    # A minute's backoff: no test machine is slow enough for it to end between two requests.
    async with client_at(db_url, new_ip(), login_throttle_base_seconds=60.0) as c:
        email = await register(c)
        statuses = [(await c.post(REQUEST, json={"email": email})).status_code for _ in range(7)]
        assert statuses[:6] == [202] * 6 and statuses[6] == 429, statuses
        r = await c.post(REQUEST, json={"email": email})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
        # An unknown email is throttled exactly the same way.
        unknown = f"nobody-{uuid.uuid4().hex[:10]}@example.ch"
        statuses = [(await c.post(REQUEST, json={"email": unknown})).status_code for _ in range(7)]
        assert statuses[:6] == [202] * 6 and statuses[6] == 429, statuses
        # Sign-in has its own counters: the account still signs in.
        assert (await c.post(f"{API}/auth/login", json={"email": email, "password": PASSWORD})).status_code == 200


async def test_unknown_tokens_are_throttled_per_address(db_url: str) -> None:
    async with client_at(db_url, new_ip(), login_throttle_base_seconds=60.0) as c:
        statuses = []
        for _ in range(30):
            r = await c.post(CONFIRM, json={"token": resets.new_token("default"), "new_password": NEW_PASSWORD})
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {404}, statuses
