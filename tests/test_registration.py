"""Registration that does not tell whether an email has an account, and email verification, end to
end over HTTP with the emails read from a real SMTP server (tests/test_outbox.py's aiosmtpd).

`POST /auth/register` answers 202 with the same status, body and headers for a known and an
unknown email. An unknown one gets an unverified account and "verify your address" (French or
English by Accept-Language) with a single-use link; a known one keeps its account as it was and
gets "you already have an account". An unverified account signs in but cannot create a tenant
(403 email-not-verified) until it opens its link (`POST /auth/verify-email`, once). A password
reset and an invitation accepted by the signed-in account verify the address too. Unknown tokens
(verification and invitation) are throttled per client address. With two cells, the account and
its link live in the cell of the region. Each test uses its own client address.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest

from api_support import (
    PASSWORD,
    login,
    queued_email,
    two_cell_client,
    two_cell_databases,
    verification_token,
    verified_user,
)
from conftest import settings_for
from iafactory.auth import verification
from iafactory.db import bootstrap
from iafactory.notifications import sender
from iafactory.tenancy import invitations
from test_outbox import Inbox, smtp, smtp_mailer  # noqa: F401 - smtp is a fixture
from test_sessions import API, bearer, client_at, events, new_ip, sign_in

pytestmark = pytest.mark.anyio

REGISTER = f"{API}/auth/register"
VERIFY = f"{API}/auth/verify-email"
RESEND = f"{API}/auth/verify-email/resend"
TENANTS = f"{API}/tenants"
_LINK = re.compile(r"/verify-email\?token=(eml_[A-Za-z0-9_-]+)")
# What differs between any two answers, whatever they are about.
PER_REQUEST = {"x-request-id", "date", "server-timing", "traceparent"}


@pytest.fixture(scope="module")
def db_url(module_db: str) -> str:
    return module_db


def fresh_email(tag: str = "reg") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.ch"


def tenant_body() -> dict[str, Any]:
    return {"name": "Cabinet Martin", "slug": f"cabinet-{uuid.uuid4().hex[:8]}", "region": "CH"}


async def delivered(url: str, smtp: tuple[Inbox, int], email: str) -> tuple[str, str]:  # noqa: F811
    """Delivers the outbox of `url` to the SMTP server, then the newest message to `email`: (subject, text)."""
    inbox, port = smtp
    async with bootstrap.database(settings_for(url), url) as db:
        await sender.drain(db, smtp_mailer(url, port))
    for rcpts, mail in reversed(inbox.received):
        if email in rcpts:
            return str(mail["subject"]), mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    raise AssertionError(f"no email to {email}")


def token_in(text: str) -> str:
    match = _LINK.search(text)
    assert match, text
    return match.group(1)


def stored_user(url: str, email: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id, name, password_hash, email_verified_at FROM users WHERE lower(email) = lower(%s)", (email,)
        ).fetchall()
    assert len(rows) == 1, rows
    return dict(zip(("id", "name", "password_hash", "email_verified_at"), rows[0], strict=True))


def same_answer(a: httpx.Response, b: httpx.Response) -> None:
    assert (a.status_code, a.content) == (b.status_code, b.content) == (202, a.content), (a.text, b.text)
    assert {k: v for k, v in a.headers.items() if k not in PER_REQUEST} == {
        k: v for k, v in b.headers.items() if k not in PER_REQUEST
    }


async def test_register_email_verify_then_create_a_tenant(db_url: str, smtp: tuple[Inbox, int]) -> None:  # noqa: F811
    async with client_at(db_url, new_ip()) as c:
        email = fresh_email()
        r = await c.post(
            REGISTER,
            json={"email": email, "password": PASSWORD, "name": "Léa"},
            headers={"Accept-Language": "en-GB,en;q=0.8"},
        )
        assert r.status_code == 202 and r.json() == {"detail": verification.ANSWER}, r.text
        subject, text = await delivered(db_url, smtp, email)
        assert subject == "Confirm your address for IAFactory", subject
        token = token_in(text)
        assert f"http://127.0.0.1:8000/verify-email?token={token}" in text and token.startswith("eml_")

        # Unverified: it signs in, /me says so, and it cannot create a tenant.
        session = await sign_in(c, email)
        me = (await c.get(f"{API}/me", headers=bearer(session["access_token"]))).json()
        assert me["user"]["email_verified"] is False and me["user"]["name"] == "Léa"
        refused = await c.post(TENANTS, json=tenant_body(), headers=bearer(session["access_token"]))
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"].endswith("/email-not-verified") and "verify" in refused.json()["detail"]

        # The link verifies the address, once; the same access token now creates a tenant.
        assert (await c.post(VERIFY, json={"token": token})).status_code == 204
        again = await c.post(VERIFY, json={"token": token})
        assert again.status_code == 410 and again.json()["type"].endswith("verify-used"), again.text
        me = (await c.get(f"{API}/me", headers=bearer(session["access_token"]))).json()
        assert me["user"]["email_verified"] is True
        created = await c.post(TENANTS, json=tenant_body(), headers=bearer(session["access_token"]))
        assert created.status_code == 201, created.text

        user_id = stored_user(db_url, email)["id"]
        assert [e["details"] for e in events(db_url, "auth.register_requested", user_id)] == [{"new_account": True}]
        assert len(events(db_url, "auth.email_verified", user_id)) == 1
        with psycopg.connect(db_url) as conn:
            stored = conn.execute(
                "SELECT token_hash FROM email_verifications WHERE user_id = %s", (user_id,)
            ).fetchall()
        assert stored and all(token.encode() not in bytes(h) for (h,) in stored)  # only its HMAC


async def test_a_known_email_gets_the_same_answer_and_its_account_is_unchanged(
    db_url: str,
    smtp: tuple[Inbox, int],  # noqa: F811
) -> None:
    async with client_at(db_url, new_ip()) as c:
        known = fresh_email("known")
        assert (await c.post(REGISTER, json={"email": known, "password": PASSWORD, "name": "Owner"})).status_code == 202
        await delivered(db_url, smtp, known)  # its "verify your address"
        before = stored_user(db_url, known)
        unknown = fresh_email("unknown")

        a = await c.post(REGISTER, json={"email": known.upper(), "password": "an attacker's password", "name": "X"})
        b = await c.post(REGISTER, json={"email": unknown, "password": "an attacker's password", "name": "X"})
        same_answer(a, b)

        # The known address is told it has an account (French by default), with a sign-in and a reset
        # hint; no verification link. Its account is as it was: name, password, (un)verified state.
        subject, text = await delivered(db_url, smtp, known)
        assert subject == "Vous avez déjà un compte IAFactory", subject
        assert "http://127.0.0.1:8000/sign-in" in text and "http://127.0.0.1:8000/reset-password" in text
        assert not _LINK.search(text)
        assert stored_user(db_url, known) == before
        await sign_in(c, known, PASSWORD)
        wrong = await c.post(f"{API}/auth/login", json={"email": known, "password": "an attacker's password"})
        assert wrong.status_code == 401
        # The unknown one got an account and its link.
        subject, text = await delivered(db_url, smtp, unknown)
        assert subject == "Confirmez votre adresse pour IAFactory" and token_in(text)
        with psycopg.connect(db_url) as conn:
            kinds = conn.execute(
                "SELECT to_address, kind FROM email_outbox WHERE to_address IN (%s, %s) ORDER BY id", (known, unknown)
            ).fetchall()
        assert kinds == [(known, "verify_email"), (known, "account_exists"), (unknown, "verify_email")]
        details = [e["details"] for e in events(db_url, "auth.register_requested", before["id"])]
        assert details == [{"new_account": True}, {"new_account": False}]


async def test_policy_violations_are_answered_before_naming_the_field(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        r = await c.post(REGISTER, json={"email": fresh_email(), "password": "1234567890"})
        assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["body.password"], r.text


async def test_expired_unknown_and_replaced_links(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        email = fresh_email()
        assert (await c.post(REGISTER, json={"email": email, "password": PASSWORD})).status_code == 202
        first = verification_token(db_url, email)
        session = await sign_in(c, email)

        # A new link (signed in) replaces the first one.
        r = await c.post(RESEND, headers=bearer(session["access_token"]), json={})
        assert r.status_code == 202, r.text
        second = verification_token(db_url, email)
        assert second != first
        replaced = await c.post(VERIFY, json={"token": first})
        assert replaced.status_code == 410 and replaced.json()["type"].endswith("verify-used"), replaced.text

        # What 24 hours would do: the link has expired.
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "UPDATE email_verifications SET expires_at = now() - interval '1 second' WHERE token_hash = %s",
                (verification.digest(settings_for(db_url), second),),
            )
        expired = await c.post(VERIFY, json={"token": second})
        assert expired.status_code == 410 and expired.json()["type"].endswith("verify-expired"), expired.text
        assert stored_user(db_url, email)["email_verified_at"] is None

        forged = second[:-4] + ("AAAA" if not second.endswith("AAAA") else "BBBB")
        for bad in (forged, second.replace("eml_", "eml_nowhere-"), "eml_x_short", "not a token"):
            r = await c.post(VERIFY, json={"token": bad})
            assert r.status_code == 404 and r.json()["type"].endswith("verify-unknown"), (bad, r.text)

        # A third link works; then there is nothing left to resend.
        assert (await c.post(RESEND, headers=bearer(session["access_token"]), json={})).status_code == 202
        assert (await c.post(VERIFY, json={"token": verification_token(db_url, email)})).status_code == 204
        done = await c.post(RESEND, headers=bearer(session["access_token"]), json={})
        assert done.status_code == 409 and done.json()["type"].endswith("already-verified"), done.text


async def test_a_password_reset_verifies_the_address(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        email = fresh_email()
        assert (await c.post(REGISTER, json={"email": email, "password": PASSWORD})).status_code == 202
        assert (await c.post(f"{API}/auth/password-reset", json={"email": email})).status_code == 202
        with psycopg.connect(db_url) as conn:
            (text,) = conn.execute(
                "SELECT text_body FROM email_outbox WHERE to_address = %s AND kind = 'password_reset'", (email,)
            ).fetchone() or ("",)
        token = re.search(r"token=(pwr_[A-Za-z0-9_-]+)", text)
        assert token, text
        r = await c.post(
            f"{API}/auth/password-reset/confirm", json={"token": token.group(1), "new_password": "a new passphrase 9"}
        )
        assert r.status_code == 204, r.text
        assert stored_user(db_url, email)["email_verified_at"] is not None
        access = await login(c, email, "a new passphrase 9")
        assert (await c.post(TENANTS, json=tenant_body(), headers=bearer(access))).status_code == 201


async def test_accepting_an_invitation_signed_in_verifies_the_address(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        owner = await login(c, await verified_user(c, db_url, "owner"))
        body = tenant_body()
        assert (await c.post(TENANTS, json=body, headers=bearer(owner))).status_code == 201
        r = await c.post(f"{API}/auth/select-tenant", json={"tenant": body["slug"]}, headers=bearer(owner))
        owner = r.json()["access_token"]
        guest = fresh_email("guest")
        assert (await c.post(REGISTER, json={"email": guest, "password": PASSWORD})).status_code == 202
        r = await c.post(f"{API}/members/invitations", json={"email": guest, "role": "member"}, headers=bearer(owner))
        assert r.status_code == 201, r.text
        token = re.search(r"token=(inv_[A-Za-z0-9_-]+)", queued_email(db_url, guest, "invitation"))
        assert token
        signed_in = await login(c, guest)
        r = await c.post(f"{API}/auth/accept-invitation", json={"token": token.group(1)}, headers=bearer(signed_in))
        assert r.status_code == 200, r.text
        assert stored_user(db_url, guest)["email_verified_at"] is not None


async def test_unknown_verification_tokens_are_throttled_per_address(db_url: str) -> None:
    async with client_at(db_url, new_ip(), login_throttle_base_seconds=60.0) as c:
        statuses = []
        for _ in range(30):
            r = await c.post(VERIFY, json={"token": verification.new_token("default")})
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {404}, statuses
        assert int(r.headers["retry-after"]) >= 1


async def test_registrations_of_one_email_are_throttled(db_url: str) -> None:
    async with client_at(db_url, new_ip(), login_throttle_base_seconds=60.0) as c:
        email = fresh_email()
        statuses = [(await c.post(REGISTER, json={"email": email, "password": PASSWORD})).status_code for _ in range(7)]
        assert statuses[:6] == [202] * 6 and statuses[6] == 429, statuses
        # Another address from the same client is not slowed down.
        assert (await c.post(REGISTER, json={"email": fresh_email(), "password": PASSWORD})).status_code == 202


async def test_unknown_invitation_tokens_are_throttled_per_address(db_url: str) -> None:
    async with client_at(db_url, new_ip(), login_throttle_base_seconds=60.0) as c:
        statuses = []
        for _ in range(30):
            r = await c.post(
                f"{API}/auth/accept-invitation",
                json={"token": invitations.new_token("default"), "name": "X", "password": "a new passphrase 9"},
            )
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {404}, statuses
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["content-type"] == "application/problem+json"
    # Another address is not refused.
    async with client_at(db_url, new_ip(), login_throttle_base_seconds=60.0) as c:
        r = await c.post(
            f"{API}/auth/accept-invitation",
            json={"token": invitations.new_token("default"), "password": "a new passphrase 9"},
        )
        assert r.status_code == 404, r.text


# --- two cells ---------------------------------------------------------------------------------------


@pytest.fixture
def cell_urls(server_url: str) -> Any:
    with two_cell_databases(server_url) as urls:
        yield urls


@pytest.fixture
async def two_cells(cell_urls: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with two_cell_client(cell_urls) as (c, _, _settings):
        yield c


async def test_with_two_cells_the_account_and_its_link_live_in_the_region_cell(
    cell_urls: dict[str, str], two_cells: httpx.AsyncClient
) -> None:
    c, urls = two_cells, cell_urls
    email, other = fresh_email("oran"), fresh_email("oran")
    first = await c.post(REGISTER, json={"email": email, "password": PASSWORD, "region": "DZ"})
    assert first.status_code == 202, first.text
    token = verification_token(urls["dz"], email)
    assert token.startswith("eml_dz_")
    with psycopg.connect(urls["eu"]) as conn:
        assert conn.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone() == (0,)

    # Known in DZ: the same answer as an unknown address, and "you already have an account" from dz.
    again = await c.post(REGISTER, json={"email": email, "password": "another password 55", "region": "DZ"})
    fresh = await c.post(REGISTER, json={"email": other, "password": "another password 55", "region": "DZ"})
    same_answer(again, fresh)
    with psycopg.connect(urls["dz"]) as conn:
        kinds = conn.execute("SELECT kind FROM email_outbox WHERE to_address = %s ORDER BY id", (email,)).fetchall()
    assert kinds == [("verify_email",), ("account_exists",)]

    access = await login(c, email)
    refused = await c.post(TENANTS, json={**tenant_body(), "region": "DZ"}, headers=bearer(access))
    assert refused.status_code == 403 and refused.json()["type"].endswith("email-not-verified"), refused.text
    # No directory route is left behind by the refusal.
    assert (await c.post(VERIFY, json={"token": token})).status_code == 204
    body = {**tenant_body(), "region": "DZ"}
    created = await c.post(TENANTS, json=body, headers=bearer(access))
    assert created.status_code == 201, created.text
    with psycopg.connect(urls["dz"]) as conn:
        assert conn.execute("SELECT count(*) FROM tenants WHERE slug = %s", (body["slug"],)).fetchone() == (1,)
