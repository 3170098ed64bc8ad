"""Sessions, sign-in throttling and the password policy, over HTTP.

Access tokens live 15 minutes and carry their session (`sid`); refresh tokens are rotated on every
use, and one used twice ends its whole family (RFC 9700 §4.14.2), recorded in the security log.
Logout, logout-all, a revoked session and a password change take effect on the next request: the
request gate re-checks the session in the database. Failed sign-ins are throttled per account and
per address across app instances (two apps on one database), with 429 + Retry-After, never a lock
that outlives its window. Weak passwords are refused with 422 naming the field.

Each test uses its own client address (the throttle counts per address), on a database shared by
the module.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from api_support import PASSWORD, build_world, fast_settings
from iafactory.app import create_app
from iafactory.db import bootstrap
from iafactory.plans.ratelimit import RedisRateLimiter

pytestmark = pytest.mark.anyio

API = "/api/v1"


@pytest.fixture(scope="module")
def db_url(module_db: str) -> str:
    return module_db


REDIS_URL = "redis://127.0.0.1:6379/15"


@asynccontextmanager
async def client_at(
    admin_url: str, ip: str, *, redis_url: str | None = None, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in process, its requests coming from `ip`. Two of these on one database are two
    app instances (two workers) sharing nothing but PostgreSQL (and Redis, with `redis_url`)."""
    settings = fast_settings(admin_url, **overrides)
    db = bootstrap.database(settings, admin_url)
    async with db:
        app = create_app(settings, db)
        if redis_url is not None:
            app.state.rate_limiter = RedisRateLimiter(redis_url, db)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(ip, 40000))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                yield client
        finally:
            if app.state.rate_limiter is not None:
                await app.state.rate_limiter.close()
            app.state.load.close()


def new_ip() -> str:
    n = uuid.uuid4().int
    return f"10.{n % 250}.{(n >> 8) % 250}.{(n >> 16) % 250 + 1}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register(client: httpx.AsyncClient, password: str = PASSWORD) -> str:
    email = f"s-{uuid.uuid4().hex[:10]}@example.ch"
    r = await client.post(f"{API}/auth/register", json={"email": email, "password": password, "name": "S"})
    assert r.status_code == 202, r.text
    return email


async def sign_in(client: httpx.AsyncClient, email: str, password: str = PASSWORD, **headers: str) -> dict[str, Any]:
    r = await client.post(f"{API}/auth/login", json={"email": email, "password": password}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def events(admin_url: str, event: str, user_id: int | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(admin_url) as conn:
        cur = conn.execute(
            "SELECT event, user_id, session_id, host(ip) AS ip, details FROM security_events "
            "WHERE event = %s AND (%s::int IS NULL OR user_id = %s) ORDER BY id",
            (event, user_id, user_id),
        )
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def sid_of(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["sid"]


async def test_login_gives_a_short_access_token_and_a_refresh_token(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        email = await register(c)
        body = await sign_in(c, email)
        assert body["expires_in"] == 900
        claims = jwt.decode(body["access_token"], options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 900 and uuid.UUID(claims["sid"])
        assert body["refresh_token"].startswith("iafr_")
        with psycopg.connect(db_url) as conn:
            stored = conn.execute(
                "SELECT count(*) FROM refresh_tokens WHERE session_id = %s", (claims["sid"],)
            ).fetchone()
            assert stored == (1,)
            # Only its hash is kept.
            plain = conn.execute(
                "SELECT count(*) FROM refresh_tokens WHERE token_hash = convert_to(%s, 'UTF8')",
                (body["refresh_token"],),
            ).fetchone()
            assert plain == (0,)


async def test_refresh_rotates_and_a_reused_token_ends_the_family(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        w = await build_world(c, db_url, fast_settings(db_url))
        owner_email = await _email_of(db_url, w.a.user_ids["owner"])
        login = await sign_in(c, owner_email)
        assert login["tenant"]["id"] == str(w.a.id)  # one tenant: selected
        r1 = login["refresh_token"]
        r = await c.post(f"{API}/auth/refresh", json={"refresh_token": r1})
        assert r.status_code == 200, r.text
        second = r.json()
        r2 = second["refresh_token"]
        assert r2 != r1 and second["access_token"] != login["access_token"]
        assert second["tenant"]["id"] == str(w.a.id)  # the same tenant selection
        assert sid_of(second["access_token"]) == sid_of(login["access_token"])
        assert (await c.get(f"{API}/tenant", headers=bearer(second["access_token"]))).status_code == 200
        r = await c.post(f"{API}/auth/refresh", json={"refresh_token": r2})
        assert r.status_code == 200, r.text
        third = r.json()

        # r1 again: a replay. The whole family ends, the newest tokens included.
        r = await c.post(f"{API}/auth/refresh", json={"refresh_token": r1})
        assert r.status_code == 401, r.text
        assert "already used" in r.json()["detail"]
        r = await c.post(f"{API}/auth/refresh", json={"refresh_token": third["refresh_token"]})
        assert r.status_code == 401
        for token in (login["access_token"], third["access_token"]):
            assert (await c.get(f"{API}/tenant", headers=bearer(token))).status_code == 401
            assert (await c.get(f"{API}/me", headers=bearer(token))).status_code == 401
        reused = events(db_url, "auth.refresh_token_reused", w.a.user_ids["owner"])
        assert [str(e["session_id"]) for e in reused] == [sid_of(login["access_token"])]
        # The other sessions of the same person (build_world's) are untouched.
        assert (await c.get(f"{API}/tenant", headers=w.a.auth("owner"))).status_code == 200

        for junk in ("iafr_default_" + "A" * 43, "nonsense", "iafr_nocell_x"):
            r = await c.post(f"{API}/auth/refresh", json={"refresh_token": junk})
            assert r.status_code == 401, (junk, r.text)


async def _email_of(admin_url: str, user_id: int) -> str:
    with psycopg.connect(admin_url) as conn:
        row = conn.execute("SELECT email FROM users WHERE id = %s", (user_id,)).fetchone()
    assert row is not None
    return str(row[0])


async def test_select_tenant_keeps_the_session_and_refresh_keeps_the_choice(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        w = await build_world(c, db_url, fast_settings(db_url))
        both = await _email_of_token(c, w.both_user_token)
        login = await sign_in(c, both)
        assert login["tenant"] is None and len(login["tenants"]) == 2
        r = await c.post(
            f"{API}/auth/select-tenant", json={"tenant": str(w.b.id)}, headers=bearer(login["access_token"])
        )
        assert r.status_code == 200, r.text
        chosen = r.json()
        assert sid_of(chosen["access_token"]) == sid_of(login["access_token"])
        # The refresh token of the sign-in is spent by the selection: its replay ends the session.
        r = await c.post(f"{API}/auth/refresh", json={"refresh_token": chosen["refresh_token"]})
        assert r.status_code == 200, r.text
        assert r.json()["tenant"]["id"] == str(w.b.id)


async def _email_of_token(c: httpx.AsyncClient, token: str) -> str:
    r = await c.get(f"{API}/me", headers=bearer(token))
    assert r.status_code == 200, r.text
    return str(r.json()["user"]["email"])


async def test_logout_ends_this_session_only(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        w = await build_world(c, db_url, fast_settings(db_url))
        email = await _email_of(db_url, w.a.user_ids["admin"])
        one, two = await sign_in(c, email), await sign_in(c, email)
        r = await c.post(f"{API}/auth/logout", headers=bearer(one["access_token"]))
        assert r.status_code == 204, r.text
        assert (await c.get(f"{API}/members", headers=bearer(one["access_token"]))).status_code == 401
        assert (await c.post(f"{API}/auth/refresh", json={"refresh_token": one["refresh_token"]})).status_code == 401
        assert (await c.get(f"{API}/members", headers=bearer(two["access_token"]))).status_code == 200
        # An API key has no session to end.
        r = await c.post(f"{API}/auth/logout", headers=w.a.key("write", "bearer"))
        assert r.status_code == 403


async def test_logout_all_then_every_old_token_fails_on_the_next_request(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        w = await build_world(c, db_url, fast_settings(db_url))
        user_id = w.a.user_ids["member"]
        email = await _email_of(db_url, user_id)
        one, two = await sign_in(c, email), await sign_in(c, email)
        assert (await c.get(f"{API}/tenant", headers=bearer(two["access_token"]))).status_code == 200
        r = await c.post(f"{API}/auth/logout-all", headers=bearer(one["access_token"]))
        assert r.status_code == 204, r.text
        for session in (one, two):
            assert (await c.get(f"{API}/tenant", headers=bearer(session["access_token"]))).status_code == 401
            assert (await c.get(f"{API}/me", headers=bearer(session["access_token"]))).status_code == 401
            assert (await c.get(f"{API}/me/sessions", headers=bearer(session["access_token"]))).status_code == 401
            r = await c.post(f"{API}/auth/refresh", json={"refresh_token": session["refresh_token"]})
            assert r.status_code == 401
        # build_world's session of the same member ended too: every session of the person.
        assert (await c.get(f"{API}/tenant", headers=w.a.auth("member"))).status_code == 401
        logged = events(db_url, "auth.logout_all", user_id)
        assert len(logged) == 1 and logged[0]["details"]["ended"] == 3
        # Signing in again works.
        assert (
            await c.get(f"{API}/tenant", headers=bearer((await sign_in(c, email))["access_token"]))
        ).status_code == 200


async def test_my_sessions_list_and_revoke(db_url: str) -> None:
    ip = new_ip()
    async with client_at(db_url, ip) as c:
        email = await register(c)
        laptop = await sign_in(c, email, **{"user-agent": "Laptop/1.0"})
        phone = await sign_in(c, email, **{"user-agent": "Phone/2.0"})
        r = await c.get(f"{API}/me/sessions", headers=bearer(laptop["access_token"]))
        assert r.status_code == 200, r.text
        rows = r.json()
        assert {row["user_agent"] for row in rows} == {"Laptop/1.0", "Phone/2.0"}
        assert all(row["ip"] == ip for row in rows)
        current = [row for row in rows if row["current"]]
        assert len(current) == 1 and current[0]["id"] == sid_of(laptop["access_token"])
        assert all(row["created_at"] and row["last_used_at"] and row["expires_at"] for row in rows)

        r = await c.delete(f"{API}/me/sessions/{sid_of(phone['access_token'])}", headers=bearer(laptop["access_token"]))
        assert r.status_code == 204, r.text
        assert (await c.get(f"{API}/me", headers=bearer(phone["access_token"]))).status_code == 401
        assert (await c.post(f"{API}/auth/refresh", json={"refresh_token": phone["refresh_token"]})).status_code == 401
        r = await c.get(f"{API}/me/sessions", headers=bearer(laptop["access_token"]))
        assert [row["id"] for row in r.json()] == [sid_of(laptop["access_token"])]
        # Someone else's session, or one that does not exist: 404, and nothing ends.
        other = await sign_in(c, await register(c))
        r = await c.delete(f"{API}/me/sessions/{sid_of(other['access_token'])}", headers=bearer(laptop["access_token"]))
        assert r.status_code == 404
        assert (await c.get(f"{API}/me", headers=bearer(other["access_token"]))).status_code == 200
        assert (
            await c.delete(f"{API}/me/sessions/{uuid.uuid4()}", headers=bearer(laptop["access_token"]))
        ).status_code == 404


async def test_throttling_is_shared_by_two_app_instances_and_never_locks_for_good(db_url: str) -> None:
    ip = new_ip()
    # A first wait of 30 s (not 1 s), so that the test never depends on how fast it runs.
    slow = {"login_throttle_base_seconds": 30.0}
    async with client_at(db_url, ip, **slow) as a, client_at(db_url, ip, **slow) as b:
        email = await register(a)
        free = 5  # login_throttle_account_free
        for _ in range(free + 1):  # the free failures, then the one that engages the backoff
            r = await a.post(f"{API}/auth/login", json={"email": email, "password": "wrong password!"})
            assert r.status_code == 401, r.text
        # The other instance knows: 429 with Retry-After, even with the right password.
        r = await b.post(f"{API}/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 429, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # Another account from the same address is not held back by this one.
        other = await register(b)
        await sign_in(b, other)

        engaged = events(db_url, "auth.throttle_engaged")
        assert any(e["details"]["subject"] == "account" and e["ip"] == ip for e in engaged)
        failed = [e for e in events(db_url, "auth.login_failed") if e["ip"] == ip]
        assert len(failed) == free + 1 and all(
            "password" not in str(e["details"]).replace("wrong password", "") for e in failed
        )

        # The wait is a window, not a lock: once it has passed (moved here instead of waited for), the
        # right password works, and clears the account's counter.
        with psycopg.connect(db_url) as conn:
            conn.execute("UPDATE login_throttle SET blocked_until = now() - interval '1 second'")
        await sign_in(b, email)
        r = await a.post(f"{API}/auth/login", json={"email": email, "password": "wrong password!"})
        assert r.status_code == 401  # counting starts again from zero: no wait


async def test_throttling_in_redis_when_configured(db_url: str) -> None:
    try:
        import redis.asyncio as redis

        probe = redis.from_url(REDIS_URL)
        await probe.ping()
    except Exception:  # noqa: BLE001
        pytest.skip("no Redis on 127.0.0.1:6379")
    ip = new_ip()
    try:
        slow: dict[str, Any] = {"redis_url": REDIS_URL, "login_throttle_base_seconds": 30.0}
        async with client_at(db_url, ip, **slow) as a, client_at(db_url, ip, **slow) as b:
            email = await register(a)
            for _ in range(6):
                r = await a.post(f"{API}/auth/login", json={"email": email, "password": "wrong password!"})
                assert r.status_code == 401, r.text
            r = await b.post(f"{API}/auth/login", json={"email": email, "password": PASSWORD})
            assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
            blocks = [k async for k in probe.scan_iter("iaf:lt:block:*")]
            assert blocks
            await probe.delete(*blocks)  # the wait has passed
            await sign_in(b, email)
    finally:
        keys = [k async for k in probe.scan_iter("iaf:lt:*")]
        if keys:
            await probe.delete(*keys)
        await probe.aclose()


async def test_at_most_100_failures_per_account_per_hour(db_url: str) -> None:
    # No backoff at all (base 0), to reach the hourly ceiling quickly: the 100th failure closes the
    # account until the window ends, and no longer.
    async with client_at(db_url, new_ip(), login_throttle_base_seconds=0.0, login_throttle_ip_free=1000) as c:
        email = await register(c)
        for _ in range(100):
            r = await c.post(f"{API}/auth/login", json={"email": email, "password": "wrong password!"})
            assert r.status_code == 401, r.text
        r = await c.post(f"{API}/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 429
        assert 60 < int(r.headers["retry-after"]) <= 3600  # the window's end, beyond any backoff
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "UPDATE login_throttle SET window_start = window_start - interval '1 hour', "
                "blocked_until = now() - interval '1 second'"
            )
        await sign_in(c, email)


async def test_an_address_guessing_many_accounts_is_throttled(db_url: str) -> None:
    async with client_at(db_url, new_ip(), login_throttle_ip_free=3, login_throttle_base_seconds=30.0) as c:
        for _ in range(4):
            email = f"nobody-{uuid.uuid4().hex[:8]}@example.ch"
            r = await c.post(f"{API}/auth/login", json={"email": email, "password": "wrong password!"})
            assert r.status_code == 401
        r = await c.post(f"{API}/auth/login", json={"email": "someone-else@example.ch", "password": "x"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    # Another address is not affected.
    async with client_at(db_url, new_ip()) as c:
        r = await c.post(f"{API}/auth/login", json={"email": "someone-else@example.ch", "password": "x"})
        assert r.status_code == 401


@pytest.mark.parametrize(
    "password",
    ["aaaaaaaaaa", "1234567890", " " * 10, "password123", "abcdefghijkl", "qwertyuiop", "x" * 129, "short"],
    ids=["repeated", "digits", "spaces", "common", "sequence", "keyboard", "too long", "too short"],
)
async def test_weak_passwords_are_refused_naming_the_field(db_url: str, password: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        email = f"weak-{uuid.uuid4().hex[:8]}@example.ch"
        r = await c.post(f"{API}/auth/register", json={"email": email, "password": password})
        assert r.status_code == 422, r.text
        assert [e["field"] for e in r.json()["errors"]] == ["body.password"]


async def test_long_passphrases_and_any_character_are_accepted(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        for password in (
            "le chat dort sur le tapis rouge pendant que la pluie tombe dehors",
            "Ünïcödé pässwörd ✓ ok",
            "x7#Kq!" + "z" * 122,
        ):
            email = f"good-{uuid.uuid4().hex[:8]}@example.ch"
            r = await c.post(f"{API}/auth/register", json={"email": email, "password": password})
            assert r.status_code == 202, (password, r.text)
            await sign_in(c, email, password)
        email = f"self-{uuid.uuid4().hex[:8]}@example.ch"
        r = await c.post(f"{API}/auth/register", json={"email": email, "password": email})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.password"


async def test_change_password_ends_the_other_sessions(db_url: str) -> None:
    async with client_at(db_url, new_ip()) as c:
        email = await register(c)
        here, elsewhere = await sign_in(c, email), await sign_in(c, email)
        change = f"{API}/me/password"
        r = await c.post(
            change,
            json={"current_password": "not it at all", "new_password": "a brand new passphrase"},
            headers=bearer(here["access_token"]),
        )
        assert r.status_code == 403, r.text
        r = await c.post(
            change,
            json={"current_password": PASSWORD, "new_password": "1234567890"},
            headers=bearer(here["access_token"]),
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.new_password"
        r = await c.post(
            change, json={"current_password": PASSWORD, "new_password": email}, headers=bearer(here["access_token"])
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.new_password"
        r = await c.post(
            change,
            json={"current_password": PASSWORD, "new_password": "a brand new passphrase"},
            headers=bearer(here["access_token"]),
        )
        assert r.status_code == 204, r.text
        assert (await c.get(f"{API}/me", headers=bearer(here["access_token"]))).status_code == 200
        assert (await c.get(f"{API}/me", headers=bearer(elsewhere["access_token"]))).status_code == 401
        assert (
            await c.post(f"{API}/auth/refresh", json={"refresh_token": elsewhere["refresh_token"]})
        ).status_code == 401
        r = await c.post(f"{API}/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 401
        await sign_in(c, email, "a brand new passphrase")
        me = (await c.get(f"{API}/me", headers=bearer(here["access_token"]))).json()["user"]["id"]
        changed = events(db_url, "auth.password_changed", me)
        assert len(changed) == 1 and changed[0]["details"]["other_sessions_ended"] == 1
        assert len(events(db_url, "auth.password_change_failed", me)) == 1
