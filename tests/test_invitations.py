"""Invitations by email, end to end over HTTP, with the email read from a real SMTP server.

An admin invites an address; the outbox's sender delivers the email to the in-process aiosmtpd
server (tests/test_outbox.py); the test reads the link in it and accepts, as a new person (name
and password) or as an existing account (signed in). The token works once, names its tenant (and
cell) and no other; resend replaces it, revoke kills it. A tenant created by the platform with an
admin_email invites that person as owner; `iafactory tenants add-user` for an unknown email
prints an invitation link. With IAFACTORY_TEST_CELLS=2 the same runs across two cells (tenant A
in "eu", B in "dz").
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from api_support import PASSWORD, ApiWorld, two_cells_requested
from conftest import run_cli, settings_for
from iafactory.db import bootstrap
from iafactory.notifications import sender
from test_outbox import Inbox, smtp, smtp_mailer  # noqa: F401 - smtp is a fixture

pytestmark = pytest.mark.anyio

INVITE = "/api/v1/members/invitations"
ACCEPT = "/api/v1/auth/accept-invitation"
_TOKEN = re.compile(r"/accept-invitation\?token=(inv_[A-Za-z0-9_-]+)")


@pytest.fixture
async def world(module_api_world: ApiWorld) -> ApiWorld:
    return module_api_world


class Mail:
    """Delivers what tenant A's cell queued to the SMTP server, and reads invitation links."""

    def __init__(self, world: ApiWorld, inbox: Inbox, port: int) -> None:
        self.world, self.inbox, self.port = world, inbox, port

    async def deliver(self) -> None:
        url = self.world.url_of("a")
        async with bootstrap.database(settings_for(url), url) as db:
            await sender.drain(db, smtp_mailer(url, self.port))

    async def link_to(self, email: str) -> tuple[str, str]:
        """The newest invitation delivered to `email`: (text body, token)."""
        await self.deliver()
        for rcpts, mail in reversed(self.inbox.received):
            if email in rcpts:
                text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
                match = _TOKEN.search(text)
                assert match, text
                return text, match.group(1)
        raise AssertionError(f"no email to {email}: {[r for r, _ in self.inbox.received]}")


@pytest.fixture
async def mail(world: ApiWorld, smtp: tuple[Inbox, int]) -> AsyncIterator[Mail]:  # noqa: F811
    yield Mail(world, *smtp)


def fresh_email(tag: str = "new") -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}@example.ch"


async def invite(w: ApiWorld, email: str, role: str = "member", tenant: str = "a") -> dict[str, Any]:
    t = w.a if tenant == "a" else w.b
    r = await w.client.post(INVITE, json={"email": email, "role": role}, headers=t.auth("admin"))
    assert r.status_code == 201, r.text
    return r.json()


async def events(w: ApiWorld, action: str) -> list[dict[str, Any]]:
    r = await w.client.get("/api/v1/audit-events", params={"action": action}, headers=w.a.auth("owner"))
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def test_invite_email_accept_as_a_new_person_then_sign_in(world: ApiWorld, mail: Mail) -> None:
    w = world
    email = fresh_email()
    created = await invite(w, email, "member")
    assert created["status"] == "pending" and created["email"] == email and created["role"] == "member"
    text, token = await mail.link_to(email)
    assert "Tenant A" in text and f"http://127.0.0.1:8000/accept-invitation?token={token}" in text
    if w.cell_urls:
        assert token.startswith("inv_eu_")  # the token names the tenant's cell

    r = await w.client.post(ACCEPT, json={"token": token, "name": "Nouvelle", "password": "a new password 1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant"]["id"] == str(w.a.id) and body["tenant"]["role"] == "member"
    assert body["refresh_token"]  # a session like a sign-in's
    me = await w.client.get("/api/v1/me", headers=w.headers(body["access_token"]))
    assert me.status_code == 200, me.text
    assert me.json()["role"] == "member" and me.json()["user"]["email"] == email

    # The new account signs in (through the directory, with two cells) and lands in tenant A.
    r = await w.client.post("/api/v1/auth/login", json={"email": email, "password": "a new password 1"})
    assert r.status_code == 200, r.text
    assert r.json()["tenant"]["id"] == str(w.a.id)

    # The token works once.
    again = await w.client.post(ACCEPT, json={"token": token, "name": "Other", "password": "another password"})
    assert again.status_code == 409 and again.json()["type"].endswith("invitation-used"), again.text
    listed = await w.client.get(INVITE, headers=w.a.auth("admin"))
    assert {i["id"]: i["status"] for i in listed.json()}[created["id"]] == "accepted"

    sent = [e for e in await events(w, "invitation.sent") if e["details"]["invitation_id"] == created["id"]]
    accepted = [e for e in await events(w, "invitation.accepted") if e["details"]["invitation_id"] == created["id"]]
    assert len(sent) == 1 and len(accepted) == 1
    assert sent[0]["request_id"] and accepted[0]["request_id"] and accepted[0]["details"]["new_account"] is True


async def test_an_existing_account_accepts_after_signing_in(world: ApiWorld, mail: Mail) -> None:
    w = world
    email = fresh_email("known")
    register = {"email": email, "password": PASSWORD, "name": "Known", **({"region": "CH"} if w.cell_urls else {})}
    assert (await w.client.post("/api/v1/auth/register", json=register)).status_code == 202
    created = await invite(w, email, "viewer")
    _, token = await mail.link_to(email)

    anonymous = await w.client.post(ACCEPT, json={"token": token})
    assert anonymous.status_code == 401, anonymous.text
    # A new account for an email that has one here: sign in first.
    exists = await w.client.post(ACCEPT, json={"token": token, "name": "X", "password": "some password 12"})
    assert exists.status_code == 409 and exists.json()["type"].endswith("invitation-sign-in"), exists.text
    # Someone else's account cannot take it.
    other = await w.client.post(ACCEPT, json={"token": token}, headers=w.b.auth("viewer"))
    assert other.status_code == 403, other.text
    key = await w.client.post(ACCEPT, json={"token": token}, headers=w.a.key("write", "bearer"))
    assert key.status_code == 403, key.text

    signed_in = (await w.client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})).json()
    assert signed_in["tenants"] == []
    r = await w.client.post(ACCEPT, json={"token": token}, headers=w.headers(signed_in["access_token"]))
    assert r.status_code == 200, r.text
    assert r.json()["tenant"]["id"] == str(w.a.id) and r.json()["tenant"]["role"] == "viewer"
    assert [t["id"] for t in r.json()["tenants"]] == [str(w.a.id)]
    accepted = [e for e in await events(w, "invitation.accepted") if e["details"]["invitation_id"] == created["id"]]
    assert accepted and accepted[0]["details"]["new_account"] is False


async def test_an_invitation_of_a_never_joins_b(world: ApiWorld, mail: Mail) -> None:
    w = world
    email = fresh_email("onlya")
    created = await invite(w, email, "admin")
    _, token = await mail.link_to(email)
    # B's admins neither see nor touch A's invitations.
    listed_b = await w.client.get(INVITE, headers=w.b.auth("admin"))
    assert created["id"] not in {i["id"] for i in listed_b.json()}
    for method, path in (("POST", f"{INVITE}/{created['id']}/resend"), ("DELETE", f"{INVITE}/{created['id']}")):
        r = await w.client.request(method, path, headers=w.b.auth("owner"))
        assert r.status_code == 404, r.text
    # A credential of B sent along changes nothing: the token names A.
    r = await w.client.post(ACCEPT, json={"token": token, "name": "A only", "password": "a new password 2"})
    assert r.status_code == 200, r.text
    assert r.json()["tenant"]["id"] == str(w.a.id)
    assert [t["id"] for t in r.json()["tenants"]] == [str(w.a.id)]
    select_b = await w.client.post(
        "/api/v1/auth/select-tenant", json={"tenant": w.b.slug}, headers=w.headers(r.json()["access_token"])
    )
    assert select_b.status_code == 403, select_b.text
    # A forged token (another random part, or another cell's name) finds nothing.
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    other_cell = token.replace("inv_eu_", "inv_dz_") if w.cell_urls else token.replace("inv_", "inv_nowhere-")
    for bad in (forged, other_cell, "inv_default_short", "not a token"):
        r = await w.client.post(ACCEPT, json={"token": bad, "name": "X", "password": "a new password 3"})
        assert r.status_code == 404, (bad, r.text)


async def test_resend_replaces_the_link_and_revoke_kills_it(world: ApiWorld, mail: Mail) -> None:
    w = world
    email = fresh_email("resend")
    created = await invite(w, email)
    _, first = await mail.link_to(email)
    dup = await w.client.post(INVITE, json={"email": email, "role": "member"}, headers=w.a.auth("admin"))
    assert dup.status_code == 409, dup.text

    r = await w.client.post(f"{INVITE}/{created['id']}/resend", headers=w.a.auth("admin"))
    assert r.status_code == 200, r.text
    assert r.json()["last_sent_at"] > created["last_sent_at"]
    _, second = await mail.link_to(email)
    assert second != first
    old = await w.client.post(ACCEPT, json={"token": first, "name": "X", "password": "a new password 4"})
    assert old.status_code == 404, old.text

    r = await w.client.delete(f"{INVITE}/{created['id']}", headers=w.a.auth("admin"))
    assert r.status_code == 204, r.text
    assert (await w.client.delete(f"{INVITE}/{created['id']}", headers=w.a.auth("admin"))).status_code == 204
    revoked = await w.client.post(ACCEPT, json={"token": second, "name": "X", "password": "a new password 4"})
    assert revoked.status_code == 410 and revoked.json()["type"].endswith("invitation-revoked"), revoked.text
    resend = await w.client.post(f"{INVITE}/{created['id']}/resend", headers=w.a.auth("admin"))
    assert resend.status_code == 409, resend.text
    # Members cannot invite; admins cannot invite owners.
    assert (await w.client.post(INVITE, json={"email": fresh_email()}, headers=w.a.auth("member"))).status_code == 403
    owner = await w.client.post(INVITE, json={"email": fresh_email(), "role": "owner"}, headers=w.a.auth("admin"))
    assert owner.status_code == 403, owner.text
    revoked_events = [
        e for e in await events(w, "invitation.revoked") if e["details"]["invitation_id"] == created["id"]
    ]
    assert len(revoked_events) == 1


async def test_an_expired_invitation_is_refused(world: ApiWorld, mail: Mail) -> None:
    w = world
    email = fresh_email("late")
    created = await invite(w, email)
    _, token = await mail.link_to(email)
    with psycopg.connect(w.url_of("a")) as conn:
        conn.execute(
            "UPDATE invitations SET expires_at = now() - interval '1 second' WHERE tenant_id = %s AND id = %s",
            (w.a.id, created["id"]),
        )
    r = await w.client.post(ACCEPT, json={"token": token, "name": "X", "password": "a new password 5"})
    assert r.status_code == 410 and r.json()["type"].endswith("invitation-expired"), r.text
    listed = await w.client.get(INVITE, headers=w.a.auth("admin"))
    assert {i["id"]: i["status"] for i in listed.json()}[created["id"]] == "expired"


async def test_a_tenant_created_with_an_admin_email_invites_its_owner(world: ApiWorld, mail: Mail) -> None:
    w = world
    email = fresh_email("owner")
    slug = f"invited-{uuid.uuid4().hex[:8]}"
    r = await w.client.post(
        "/api/v1/admin/tenants",
        json={"name": "Cabinet Invité", "slug": slug, "region": "CH", "admin_email": email},
        headers=w.headers(w.platform_token),
    )
    assert r.status_code == 201, r.text
    tenant_id = r.json()["id"]
    text, token = await mail.link_to(email)
    assert "Cabinet Invité" in text
    r = await w.client.post(ACCEPT, json={"token": token, "name": "Owner", "password": "a new password 6"})
    assert r.status_code == 200, r.text
    assert r.json()["tenant"]["id"] == tenant_id and r.json()["tenant"]["role"] == "owner"
    # The new owner administers the tenant over HTTP at once.
    members = await w.client.get("/api/v1/members", headers=w.headers(r.json()["access_token"]))
    assert members.status_code == 200 and [m["email"] for m in members.json()] == [email]


async def test_the_cli_invites_a_tenants_admin_and_unknown_users(world: ApiWorld, module_db: str) -> None:
    if two_cells_requested():
        pytest.skip("the CLI's cells come from IAFACTORY_CELLS; covered with one cell")
    w = world
    owner, member = fresh_email("cliowner"), fresh_email("climember")
    slug = f"cli-{uuid.uuid4().hex[:8]}"
    created = run_cli(
        "tenants", "create", "--name", "Par la CLI", "--slug", slug, "--region", "CH", "--admin-email", owner,
        db_url=module_db,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    owner_token = _TOKEN.search(created.stdout.replace("\n", ""))
    assert owner_token, created.stdout
    added = run_cli("tenants", "add-user", slug, member, "--role", "viewer", db_url=module_db)
    assert added.returncode == 0, added.stderr
    member_token = _TOKEN.search(added.stdout)
    assert member_token, added.stdout

    for token, _email, role in ((owner_token.group(1), owner, "owner"), (member_token.group(1), member, "viewer")):
        r = await w.client.post(ACCEPT, json={"token": token, "name": "Via CLI", "password": "a new password 7"})
        assert r.status_code == 200, r.text
        assert r.json()["tenant"]["slug"] == slug and r.json()["tenant"]["role"] == role
    with psycopg.connect(module_db) as conn:
        queued = conn.execute(
            "SELECT to_address FROM email_outbox WHERE kind = 'invitation' AND to_address IN (%s, %s)", (owner, member)
        ).fetchall()
    assert sorted(r[0] for r in queued) == sorted([owner, member])
