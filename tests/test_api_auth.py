"""Authentication and the per-request gate, from the outside.

Bad tokens and keys get 401 problem+json with a WWW-Authenticate challenge; a revoked or expired
key stops working on the very next request; membership, role and tenant status are read from the
database on every request, so a removed member, a demoted admin or a suspended tenant is refused
with a still-valid token; the owner set cannot be emptied; a user of two tenants switches between
them and sees one at a time; registration and login answer without telling which emails exist.

Each test gets new tenants (build_world on a database shared by the module), so tests that change
memberships or suspend a tenant touch nobody else's.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from pydantic import SecretStr

from api_support import PASSWORD, ApiWorld, build_world
from iafactory.app import create_app
from iafactory.auth import api_keys, tokens
from iafactory.config import Settings
from iafactory.db import bootstrap

pytestmark = pytest.mark.anyio

API = "/api/v1"


@pytest.fixture
async def world(module_api_client: tuple[httpx.AsyncClient, str, Settings]) -> ApiWorld:
    client, admin_url, settings = module_api_client
    return await build_world(client, admin_url, settings)


@asynccontextmanager
async def app_on(admin_url: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Another server process on the same database, with other settings (e.g. a rotated key)."""
    async with bootstrap.database(settings, admin_url) as db:
        transport = httpx.ASGITransport(app=create_app(settings, db), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def claims(w: ApiWorld, role: str = "owner", **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": w.settings.jwt_issuer,
        "aud": w.settings.jwt_audience,
        "sub": str(w.a.user_ids[role]),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "tenant_id": str(w.a.id),
        "role": role,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


# The JWT secret every install shared before secrets had to be configured or generated.
OLD_DEV_SECRET = "dev-only-secret-change-me-in-production-0123456789"


def signed(w: ApiWorld, payload: dict[str, Any], secret: str | None = None, kid: str | None = None) -> str:
    """Signed with `secret` (default: the service's key), naming the service's current key unless
    `kid` says otherwise."""
    return jwt.encode(
        payload,
        secret or w.settings.jwt_secret.get_secret_value(),
        algorithm="HS256",
        headers={"kid": kid or tokens.keyring(w.settings).current.kid},
    )


def assert_problem(r: httpx.Response, status: int, *, detail: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body = r.json()
    assert body["status"] == status and body["title"]
    if detail is not None:
        assert detail in body.get("detail", ""), body
    return body


def assert_401(r: httpx.Response, *, detail: str | None = None) -> dict[str, Any]:
    body = assert_problem(r, 401, detail=detail)
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), r.headers
    return body


# --- tokens --------------------------------------------------------------------------------------

BAD_TOKENS = {
    "alg none": lambda w: f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(claims(w))}.",
    "alg none, signature kept": lambda w: ".".join(
        [b64url({"alg": "none", "typ": "JWT"}), *signed(w, claims(w)).split(".")[1:]]
    ),
    "wrong signature": lambda w: signed(w, claims(w), secret="another-secret-of-the-same-length-0123456789abc"),
    "tampered payload": lambda w: ".".join(
        [
            signed(w, claims(w, role="viewer")).split(".")[0],
            b64url(claims(w, role="owner")),
            signed(w, claims(w, role="viewer")).split(".")[2],
        ]
    ),
    "expired": lambda w: signed(
        w, claims(w, iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    ),
    "another audience": lambda w: signed(w, claims(w, aud="another-api")),
    "another issuer": lambda w: signed(w, claims(w, iss="someone-else")),
    "no expiry": lambda w: signed(w, claims(w, exp=None)),
    "HS512 with the right secret": lambda w: jwt.encode(
        claims(w),
        w.settings.jwt_secret.get_secret_value(),
        algorithm="HS512",  # only HS256 is accepted
        headers={"kid": tokens.keyring(w.settings).current.kid},
    ),
    "31 years of validity": lambda w: signed(w, claims(w, exp=int(time.time()) + 31 * 365 * 86400)),
    "longer than the maximum lifetime": lambda w: signed(
        w, claims(w, exp=int(time.time()) + w.settings.jwt_max_token_lifetime_seconds + 60)
    ),
    "no issued-at": lambda w: signed(w, claims(w, iat=None)),
    "issued in the future": lambda w: signed(w, claims(w, iat=int(time.time()) + 3600, exp=int(time.time()) + 3900)),
    "no key id": lambda w: jwt.encode(claims(w), w.settings.jwt_secret.get_secret_value(), algorithm="HS256"),
    "unknown key id": lambda w: signed(w, claims(w), kid="0123456789abcdef"),
    "old public dev secret": lambda w: jwt.encode(claims(w), OLD_DEV_SECRET, algorithm="HS256"),
    "old public dev secret, its key id": lambda w: signed(
        w, claims(w), secret=OLD_DEV_SECRET, kid=tokens.key_id(OLD_DEV_SECRET)
    ),
    "old public dev secret, our key id": lambda w: signed(w, claims(w), secret=OLD_DEV_SECRET),
    "garbage": lambda w: "not.a.jwt",
    "random bytes": lambda w: base64.urlsafe_b64encode(uuid.uuid4().bytes * 3).decode(),
}


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512 with the HS256 secret
@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_bad_token_is_401(world: ApiWorld, kind: str) -> None:
    token = BAD_TOKENS[kind](world)
    for path in (f"{API}/tenant", f"{API}/me", f"{API}/projects"):
        assert_401(await world.client.get(path, headers=bearer(token)))
    assert_401(await world.client.post(f"{API}/projects", json={"name": "x"}, headers=bearer(token)))


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing credentials"),
        ({"Authorization": "Basic b3duZXI6cGFzc3dvcmQ="}, "Bearer"),
        ({"Authorization": "Bearer"}, "Bearer"),
        ({"Authorization": "Bearer   "}, "Bearer"),
        ({"Authorization": "Token abc"}, "Bearer"),
    ],
    ids=["missing", "basic scheme", "bearer without token", "bearer blank", "other scheme"],
)
async def test_missing_or_malformed_header_is_401(world: ApiWorld, headers: dict[str, str], detail: str) -> None:
    assert_401(await world.client.get(f"{API}/tenant", headers=headers), detail=detail)


async def test_a_valid_token_still_works(world: ApiWorld) -> None:
    """Control for the negatives above: the same claims, signed properly, are accepted."""
    r = await world.client.get(f"{API}/tenant", headers=bearer(signed(world, claims(world))))
    assert r.status_code == 200 and r.json()["id"] == str(world.a.id)


async def test_platform_admin_cannot_be_forged_with_the_old_public_secret(world: ApiWorld) -> None:
    """The defect: anyone could sign `{"sub": <admin's id>}` with the secret printed in config.py
    and administer every tenant."""
    admin_id = jwt.decode(world.platform_token, options={"verify_signature": False})["sub"]
    assert (await world.client.get(f"{API}/admin/tenants", headers=bearer(world.platform_token))).status_code == 200
    now = int(time.time())
    forged = {
        "iss": world.settings.jwt_issuer,
        "aud": world.settings.jwt_audience,
        "sub": admin_id,
        "iat": now,
        "nbf": now,
        "exp": now + 31 * 365 * 86400,
        "platform_admin": True,
    }
    for token in (
        jwt.encode(forged, OLD_DEV_SECRET, algorithm="HS256"),
        signed(world, forged, secret=OLD_DEV_SECRET),
        signed(world, {**forged, "exp": now + 600}, secret=OLD_DEV_SECRET),
    ):
        assert_401(await world.client.get(f"{API}/admin/tenants", headers=bearer(token)))


async def test_key_rotation_keeps_tokens_of_the_previous_key_until_it_retires(
    module_api_client: tuple[httpx.AsyncClient, str, Settings],
) -> None:
    """Rotate: the new key signs, tokens of the previous key keep working until the configured
    moment, then they are refused; tokens name their key in the `kid` header."""
    client, admin_url, old_settings = module_api_client
    w = await build_world(client, admin_url, old_settings)
    old_token = w.a.tokens["owner"]
    new_secret = "the-key-after-rotation-" + uuid.uuid4().hex
    soon = datetime.now(UTC) + timedelta(hours=1)
    rotated = old_settings.model_copy(
        update={
            "jwt_secret": SecretStr(new_secret),
            "jwt_previous_secret": old_settings.jwt_secret,
            "jwt_previous_secret_expires_at": soon,
        }
    )
    retired = rotated.model_copy(update={"jwt_previous_secret_expires_at": datetime.now(UTC) - timedelta(seconds=1)})
    async with app_on(admin_url, rotated) as after_rotation, app_on(admin_url, retired) as after_expiry:
        assert (await after_rotation.get(f"{API}/tenant", headers=bearer(old_token))).status_code == 200
        email = (await client.get(f"{API}/me", headers=bearer(old_token))).json()["user"]["email"]
        r = await after_rotation.post(f"{API}/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        new_token = r.json()["access_token"]
        assert jwt.get_unverified_header(new_token)["kid"] == tokens.key_id(new_secret)
        assert jwt.get_unverified_header(old_token)["kid"] == tokens.key_id(old_settings.jwt_secret.get_secret_value())
        assert (await after_rotation.get(f"{API}/tenant", headers=bearer(new_token))).status_code == 200
        assert_401(await after_expiry.get(f"{API}/tenant", headers=bearer(old_token)), detail="retired key")
        assert (await after_expiry.get(f"{API}/tenant", headers=bearer(new_token))).status_code == 200
    # The servers still on the old key do not know the new one.
    assert_401(await client.get(f"{API}/tenant", headers=bearer(new_token)), detail="unknown key")


async def test_signed_claims_are_checked_against_the_database(world: ApiWorld) -> None:
    """Even a properly signed token only claims: a tenant the user is not in, or a role above theirs,
    is refused by the per-request gate."""
    c, w = world.client, world
    other_tenant = signed(w, claims(w, role="owner", tenant_id=str(w.b.id)))
    assert_problem(await c.get(f"{API}/projects", headers=bearer(other_tenant)), 403, detail="not a member")
    inflated = signed(w, {**claims(w, "viewer"), "role": "owner"})
    assert (await c.get(f"{API}/projects", headers=bearer(inflated))).status_code == 200
    assert_problem(
        await c.post(f"{API}/projects", json={"name": "x"}, headers=bearer(inflated)),
        403,
        detail="requires the member role",
    )


# --- API keys --------------------------------------------------------------------------------------


async def create_key(w: ApiWorld, **body: Any) -> dict[str, Any]:
    r = await w.client.post(
        f"{API}/api-keys", json={"name": "test key", "scope": "write", **body}, headers=w.a.auth("admin")
    )
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize("header", ["x-api-key", "bearer"])
async def test_revoked_key_is_refused_on_the_next_request(world: ApiWorld, header: str) -> None:
    c, w = world.client, world
    key = await create_key(w)
    headers = {"X-API-Key": key["key"]} if header == "x-api-key" else bearer(key["key"])
    assert (await c.get(f"{API}/projects", headers=headers)).status_code == 200  # now cached
    r = await c.delete(f"{API}/api-keys/{key['id']}", headers=w.a.auth("admin"))
    assert r.status_code == 204, r.text
    assert_401(await c.get(f"{API}/projects", headers=headers), detail="revoked")
    assert_401(await c.post(f"{API}/projects", json={"name": "x"}, headers=headers), detail="revoked")
    listed = {k["id"]: k for k in (await c.get(f"{API}/api-keys", headers=w.a.auth("admin"))).json()}
    assert listed[key["id"]]["revoked_at"] is not None


async def test_revocation_reaches_a_key_cached_in_another_worker(world: ApiWorld) -> None:
    """Revoked in the database by another process (this app's cache still holds the key): the gate
    reads the database, so the next request is refused all the same."""
    c, w = world.client, world
    key = await create_key(w)
    assert (await c.get(f"{API}/projects", headers={"X-API-Key": key["key"]})).status_code == 200
    with psycopg.connect(w.admin_url) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key["id"],))
    assert_401(await c.get(f"{API}/projects", headers={"X-API-Key": key["key"]}), detail="revoked")


async def test_expired_key_is_401_and_says_so(world: ApiWorld) -> None:
    c, w = world.client, world
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    r = await c.post(
        f"{API}/api-keys",
        json={"name": "born expired", "scope": "write", "expires_at": past},
        headers=w.a.auth("admin"),
    )
    if r.status_code == 201:  # the API accepts a past expiry: such a key is dead on arrival
        assert_401(await c.get(f"{API}/projects", headers={"X-API-Key": r.json()["key"]}), detail="expired")
    else:
        assert_problem(r, 422)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    key = await create_key(w, expires_at=future)
    headers = {"X-API-Key": key["key"]}
    assert (await c.get(f"{API}/projects", headers=headers)).status_code == 200
    with psycopg.connect(w.admin_url) as conn:  # time passes
        conn.execute("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = %s", (key["id"],))
    expired = assert_401(await c.get(f"{API}/projects", headers=headers), detail="expired")
    await c.delete(f"{API}/api-keys/{key['id']}", headers=w.a.auth("admin"))
    revoked = assert_401(await c.get(f"{API}/projects", headers=headers))
    assert "revoked" in revoked["detail"] and expired["detail"] != revoked["detail"]


async def test_unknown_and_malformed_keys_are_401(world: ApiWorld) -> None:
    c, w = world.client, world
    unknown, _ = api_keys.generate(w.settings)  # well formed, checksum right, never stored
    real = w.a.keys["write"]
    tampered = real[:-7] + ("A" if real[-7] != "A" else "B") + real[-6:]  # checksum no longer matches
    cases = {
        unknown: "unknown API key",
        tampered: "malformed API key",
        "iaf_live_short": "malformed API key",
        "iaf_": "malformed API key",
        real + "x": "malformed API key",
    }
    for key, detail in cases.items():
        assert_401(await c.get(f"{API}/projects", headers={"X-API-Key": key}), detail=detail)
        assert_401(await c.get(f"{API}/projects", headers=bearer(key)), detail=detail)
    # Another key's secret under a real key's prefix: the HMAC does not match.
    forged_body = real[:-38] + "a" * 32
    forged = forged_body + api_keys._checksum(forged_body)
    assert api_keys.parse_prefix(forged) is not None
    assert_401(await c.get(f"{API}/projects", headers={"X-API-Key": forged}), detail="unknown API key")


async def test_read_key_cannot_write(world: ApiWorld) -> None:
    c, w = world.client, world
    for headers in (w.a.key("read"), w.a.key("read", "bearer")):
        assert (await c.get(f"{API}/projects", headers=headers)).status_code == 200
        assert_problem(await c.post(f"{API}/projects", json={"name": "x"}, headers=headers), 403, detail="read-only")
    assert (await c.post(f"{API}/projects", json={"name": "x"}, headers=w.a.key("write"))).status_code == 201


async def test_api_key_cannot_reach_user_routes(world: ApiWorld) -> None:
    c, w = world.client, world
    for path in (f"{API}/admin/tenants",):
        assert_problem(await c.get(path, headers=w.a.key("write")), 403, detail="user token")
    assert_problem(
        await c.post(f"{API}/auth/select-tenant", json={"tenant": w.a.slug}, headers=w.a.key("write")),
        403,
        detail="user token",
    )


# --- membership and roles, checked per request ----------------------------------------------------------


async def test_removed_member_is_refused_with_their_still_valid_token(world: ApiWorld) -> None:
    c, w = world.client, world
    token = w.a.tokens["member"]
    assert (await c.get(f"{API}/projects", headers=bearer(token))).status_code == 200
    r = await c.delete(f"{API}/members/{w.a.user_ids['member']}", headers=w.a.auth("admin"))
    assert r.status_code == 204, r.text
    for path in (f"{API}/projects", f"{API}/tenant", f"{API}/me"):
        assert_problem(await c.get(path, headers=bearer(token)), 403, detail="not a member")
    assert_problem(await c.post(f"{API}/projects", json={"name": "x"}, headers=bearer(token)), 403)
    r = await c.post(f"{API}/auth/select-tenant", json={"tenant": w.a.slug}, headers=bearer(token))
    assert_problem(r, 403)


async def test_demoted_admin_loses_admin_routes_with_their_old_token(world: ApiWorld) -> None:
    c, w = world.client, world
    token = w.a.tokens["admin"]
    assert (await c.post(f"{API}/api-keys", json={"name": "k"}, headers=bearer(token))).status_code == 201
    r = await c.patch(f"{API}/members/{w.a.user_ids['admin']}", json={"role": "viewer"}, headers=w.a.auth("owner"))
    assert r.status_code == 200 and r.json()["role"] == "viewer", r.text
    assert_problem(
        await c.post(f"{API}/api-keys", json={"name": "k"}, headers=bearer(token)),
        403,
        detail="requires the admin role (you are viewer)",
    )
    assert_problem(await c.post(f"{API}/projects", json={"name": "x"}, headers=bearer(token)), 403)
    assert (await c.get(f"{API}/projects", headers=bearer(token))).status_code == 200  # still a viewer
    me = (await c.get(f"{API}/me", headers=bearer(token))).json()
    assert me["role"] == "viewer"


async def test_the_last_owner_stays(world: ApiWorld) -> None:
    c, w = world.client, world
    owner, owner_id = w.a.auth("owner"), w.a.user_ids["owner"]
    assert_problem(await c.delete(f"{API}/members/{owner_id}", headers=owner), 409, detail="last owner")
    for role in ("admin", "member", "viewer"):
        assert_problem(
            await c.patch(f"{API}/members/{owner_id}", json={"role": role}, headers=owner), 409, detail="last owner"
        )
    members = {m["user_id"]: m["role"] for m in (await c.get(f"{API}/members", headers=owner)).json()}
    assert members[owner_id] == "owner"
    # With a second owner, the first may step down.
    r = await c.patch(f"{API}/members/{w.a.user_ids['admin']}", json={"role": "owner"}, headers=owner)
    assert r.status_code == 200, r.text
    r = await c.patch(f"{API}/members/{owner_id}", json={"role": "admin"}, headers=owner)
    assert r.status_code == 200 and r.json()["role"] == "admin", r.text
    new_owner = w.a.auth("admin")  # their token says admin; the database says owner
    assert_problem(
        await c.delete(f"{API}/members/{w.a.user_ids['admin']}", headers=new_owner), 409, detail="last owner"
    )


async def test_only_owners_grant_owner(world: ApiWorld) -> None:
    c, w = world.client, world
    admin, owner = w.a.auth("admin"), w.a.auth("owner")
    member_id = w.a.user_ids["member"]
    assert_problem(
        await c.patch(f"{API}/members/{member_id}", json={"role": "owner"}, headers=admin), 403, detail="only an owner"
    )
    email = f"new-{uuid.uuid4().hex[:8]}@example.ch"
    assert (await c.post(f"{API}/auth/register", json={"email": email, "password": PASSWORD})).status_code == 202
    assert_problem(
        await c.post(f"{API}/members", json={"email": email, "role": "owner"}, headers=admin),
        403,
        detail="only an owner",
    )
    # Nor may an admin demote or remove an owner.
    assert_problem(await c.patch(f"{API}/members/{w.a.user_ids['owner']}", json={"role": "viewer"}, headers=admin), 403)
    assert_problem(await c.delete(f"{API}/members/{w.a.user_ids['owner']}", headers=admin), 403)
    # Admins manage the roles below owner.
    r = await c.post(f"{API}/members", json={"email": email, "role": "admin"}, headers=admin)
    assert r.status_code == 201 and r.json()["role"] == "admin", r.text
    # An owner grants owner.
    r = await c.patch(f"{API}/members/{member_id}", json={"role": "owner"}, headers=owner)
    assert r.status_code == 200 and r.json()["role"] == "owner", r.text
    members = {m["user_id"]: m["role"] for m in (await c.get(f"{API}/members", headers=owner)).json()}
    assert members[member_id] == "owner" and members[w.a.user_ids["admin"]] == "admin"


# --- tenant status ---------------------------------------------------------------------------------


async def test_suspended_tenant_is_refused_then_reactivated(world: ApiWorld) -> None:
    c, w = world.client, world
    platform = w.headers(w.platform_token)
    credentials = [w.a.auth(role) for role in ("owner", "admin", "member", "viewer")]
    credentials += [w.a.key("read"), w.a.key("write"), w.a.key("write", "bearer")]
    for headers in credentials:
        assert (await c.get(f"{API}/projects", headers=headers)).status_code == 200
    r = await c.patch(f"{API}/admin/tenants/{w.a.id}", json={"status": "suspended"}, headers=platform)
    assert r.status_code == 200 and r.json()["status"] == "suspended", r.text
    for headers in credentials:
        assert_problem(await c.get(f"{API}/projects", headers=headers), 403, detail="suspended")
        assert_problem(await c.get(f"{API}/tenant", headers=headers), 403, detail="suspended")
    assert_problem(
        await c.post(f"{API}/projects", json={"name": "x"}, headers=w.a.auth("owner")), 403, detail="suspended"
    )
    # B is untouched.
    assert (await c.get(f"{API}/projects", headers=w.b.auth("viewer"))).status_code == 200
    # No new token for a suspended tenant; login works but does not select it.
    r = await c.post(f"{API}/auth/select-tenant", json={"tenant": str(w.a.id)}, headers=bearer(w.both_user_token))
    assert_problem(r, 403, detail="suspended")
    r = await c.post(f"{API}/auth/login", json={"email": await email_of(c, w.both_user_token), "password": PASSWORD})
    assert r.status_code == 200 and r.json()["tenant"] is None
    assert {t["id"]: t["status"] for t in r.json()["tenants"]}[str(w.a.id)] == "suspended"
    r = await c.patch(f"{API}/admin/tenants/{w.a.id}", json={"status": "active"}, headers=platform)
    assert r.status_code == 200 and r.json()["status"] == "active", r.text
    for headers in credentials:
        assert (await c.get(f"{API}/projects", headers=headers)).status_code == 200
    r = await c.post(f"{API}/auth/select-tenant", json={"tenant": str(w.a.id)}, headers=bearer(w.both_user_token))
    assert r.status_code == 200, r.text


async def test_cancelled_tenant_is_refused(world: ApiWorld) -> None:
    c, w = world.client, world
    r = await c.patch(
        f"{API}/admin/tenants/{w.a.id}", json={"status": "cancelled"}, headers=w.headers(w.platform_token)
    )
    assert r.status_code == 200, r.text
    assert_problem(await c.get(f"{API}/projects", headers=w.a.auth("owner")), 403, detail="cancelled")
    assert_problem(await c.get(f"{API}/projects", headers=w.a.key("read")), 403, detail="cancelled")


async def test_only_platform_admins_change_tenant_status(world: ApiWorld) -> None:
    c, w = world.client, world
    for headers in (w.a.auth("owner"), w.a.key("write"), bearer(w.both_user_token)):
        r = await c.patch(f"{API}/admin/tenants/{w.a.id}", json={"status": "suspended"}, headers=headers)
        assert_problem(r, 403)
    assert (await c.get(f"{API}/projects", headers=w.a.auth("owner"))).status_code == 200


# --- a user in two tenants -----------------------------------------------------------------------------


async def email_of(c: httpx.AsyncClient, token: str) -> str:
    return (await c.get(f"{API}/me", headers=bearer(token))).json()["user"]["email"]


async def test_user_in_two_tenants_switches_between_them(world: ApiWorld) -> None:
    c, w = world.client, world
    a_project = (await c.post(f"{API}/projects", json={"name": "only in A"}, headers=w.a.auth("member"))).json()
    b_project = (await c.post(f"{API}/projects", json={"name": "only in B"}, headers=w.b.auth("member"))).json()

    r = await c.post(f"{API}/auth/login", json={"email": await email_of(c, w.both_user_token), "password": PASSWORD})
    assert r.status_code == 200, r.text
    session = r.json()
    assert session["tenant"] is None
    assert {t["id"]: t["role"] for t in session["tenants"]} == {str(w.a.id): "admin", str(w.b.id): "member"}
    unselected = bearer(session["access_token"])
    assert_problem(await c.get(f"{API}/projects", headers=unselected), 403, detail="no tenant selected")
    me = (await c.get(f"{API}/me", headers=unselected)).json()
    assert me["tenant"] is None and me["role"] is None and len(me["tenants"]) == 2

    async def select(tenant: str, headers: dict[str, str]) -> dict[str, str]:
        r = await c.post(f"{API}/auth/select-tenant", json={"tenant": tenant}, headers=headers)
        assert r.status_code == 200, r.text
        return bearer(r.json()["access_token"])

    async def visible(headers: dict[str, str]) -> set[str]:
        r = await c.get(f"{API}/projects", headers=headers)
        assert r.status_code == 200, r.text
        return {p["name"] for p in r.json()["items"]}

    in_a = await select(str(w.a.id), unselected)
    assert await visible(in_a) == {"only in A"}
    me = (await c.get(f"{API}/me", headers=in_a)).json()
    assert (me["tenant"]["id"], me["role"]) == (str(w.a.id), "admin")
    assert (await c.get(f"{API}/projects/{b_project['id']}", headers=in_a)).status_code == 404

    in_b = await select(w.b.slug, in_a)  # by slug, from a token that has A selected
    assert await visible(in_b) == {"only in B"}
    me = (await c.get(f"{API}/me", headers=in_b)).json()
    assert (me["tenant"]["id"], me["role"]) == (str(w.b.id), "member")
    assert (await c.get(f"{API}/projects/{a_project['id']}", headers=in_b)).status_code == 404
    assert_problem(await c.post(f"{API}/api-keys", json={"name": "k"}, headers=in_b), 403)  # member in B

    back = await select(w.a.slug, in_b)
    assert await visible(back) == {"only in A"}
    assert (await c.post(f"{API}/api-keys", json={"name": "k"}, headers=back)).status_code == 201  # admin in A

    # A tenant they do not belong to: another existing tenant, and one that does not exist.
    r = await c.post(
        f"{API}/admin/tenants",
        json={"name": "C", "slug": f"c-{uuid.uuid4().hex[:8]}", "region": "CH", "status": "active"},
        headers=w.headers(w.platform_token),
    )
    assert r.status_code == 201, r.text
    for tenant in (r.json()["id"], r.json()["slug"], str(uuid.uuid4()), "no-such-tenant"):
        assert_problem(await c.post(f"{API}/auth/select-tenant", json={"tenant": tenant}, headers=back), 403)


async def test_single_tenant_login_selects_it(world: ApiWorld) -> None:
    r = await world.client.get(f"{API}/me", headers=world.a.auth("viewer"))
    me = r.json()
    assert (me["tenant"]["id"], me["role"]) == (str(world.a.id), "viewer")
    r = await world.client.post(f"{API}/auth/login", json={"email": me["user"]["email"], "password": PASSWORD})
    assert r.json()["tenant"]["id"] == str(world.a.id) and len(r.json()["tenants"]) == 1


async def test_me_lists_my_tenants_with_role_and_current_for_every_credential(world: ApiWorld) -> None:
    """GET /me and GET /me/tenants answer the same list, whatever the credential."""
    c, w = world.client, world

    async def tenants(headers: dict[str, str]) -> list[tuple[str, str, bool]]:
        me = await c.get(f"{API}/me", headers=headers)
        mine = await c.get(f"{API}/me/tenants", headers=headers)
        assert me.status_code == mine.status_code == 200, (me.text, mine.text)
        assert me.json()["tenants"] == mine.json()
        return sorted((t["id"], t["role"], t["current"]) for t in mine.json())

    a, b = str(w.a.id), str(w.b.id)
    # A token for one tenant (the case that used to answer "tenants": []).
    assert await tenants(w.a.auth("owner")) == [(a, "owner", True)]
    # A user of two tenants: none selected, then A selected.
    assert await tenants(bearer(w.both_user_token)) == sorted([(a, "admin", False), (b, "member", False)])
    r = await c.post(f"{API}/auth/select-tenant", json={"tenant": w.a.slug}, headers=bearer(w.both_user_token))
    assert await tenants(bearer(r.json()["access_token"])) == sorted([(a, "admin", True), (b, "member", False)])
    # API keys: their own tenant only, with the role the key acts as.
    assert await tenants(w.a.key("read")) == [(a, "viewer", True)]
    assert await tenants(w.b.key("write", header="bearer")) == [(b, "member", True)]
    # A user with no tenant.
    assert await tenants(bearer(w.platform_token)) == []
    listed = (await c.get(f"{API}/me/tenants", headers=w.a.auth("viewer"))).json()
    assert listed[0]["slug"] == w.a.slug and listed[0]["status"] == "active"


# --- register and login ------------------------------------------------------------------------------


async def test_register(world: ApiWorld) -> None:
    c = world.client
    email = f"Reg-{uuid.uuid4().hex[:8]}@Example.ch"
    first = await c.post(f"{API}/auth/register", json={"email": email, "password": PASSWORD, "name": "Reg"})
    assert first.status_code == 202 and "password" not in first.text, first.text
    # A known email (any spelling) gets the very same answer, and no second account
    # (tests/test_registration.py shows the emails each one gets).
    for duplicate in (email, email.lower(), email.upper()):
        r = await c.post(f"{API}/auth/register", json={"email": duplicate, "password": "another password 77"})
        assert (r.status_code, r.content) == (202, first.content), r.text
    r = await c.post(
        f"{API}/auth/register", json={"email": f"weak-{uuid.uuid4().hex[:8]}@example.ch", "password": "short"}
    )
    body = assert_problem(r, 422)
    assert [e["field"] for e in body["errors"]] == ["body.password"]
    r = await c.post(f"{API}/auth/register", json={"email": "not-an-email", "password": PASSWORD})
    assert [e["field"] for e in assert_problem(r, 422)["errors"]] == ["body.email"]
    r = await c.post(
        f"{API}/auth/register",
        json={"email": f"x-{uuid.uuid4().hex[:8]}@example.ch", "password": PASSWORD, "is_platform_admin": True},
    )
    assert [e["field"] for e in assert_problem(r, 422)["errors"]] == ["body.is_platform_admin"]
    # The new account can sign in (its address not verified yet), and belongs to no tenant.
    r = await c.post(f"{API}/auth/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200 and r.json()["tenants"] == [] and r.json()["tenant"] is None
    me = (await c.get(f"{API}/me", headers=world.headers(r.json()["access_token"]))).json()
    assert me["user"]["email_verified"] is False and me["user"]["is_platform_admin"] is False
    assert (
        await c.post(f"{API}/auth/login", json={"email": email, "password": "another password 77"})
    ).status_code == 401


async def test_login_failures_do_not_tell_which_emails_exist(world: ApiWorld) -> None:
    c = world.client
    me = (await c.get(f"{API}/me", headers=world.a.auth("owner"))).json()
    wrong_password = await c.post(
        f"{API}/auth/login", json={"email": me["user"]["email"], "password": "wrong-" + PASSWORD}
    )
    unknown_email = await c.post(
        f"{API}/auth/login", json={"email": f"nobody-{uuid.uuid4().hex[:8]}@example.ch", "password": PASSWORD}
    )
    a, b = assert_401(wrong_password), assert_401(unknown_email)
    assert (a["title"], a["detail"], a["type"]) == (b["title"], b["detail"], b["type"])
