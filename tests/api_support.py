"""Fixtures and helpers for HTTP tests: the real app on a real, migrated database.

`api_world` gives two tenants (A and B), each with an owner, an admin, a member and a viewer,
tokens for each, and a read and a write API key per tenant; plus a user who belongs to both and a
platform administrator. Everything is created through the public API or the operator path, the
way a customer would end up with it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest

from conftest import _create_database, _drop_database, prepare_sync, settings_for
from iafactory.app import create_app
from iafactory.auth.passwords import hash_password
from iafactory.config import Settings
from iafactory.db import bootstrap
from iafactory.db.scope import operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.schemas import TenantCreate

PASSWORD = "correct-horse-battery"
ROLES = ("owner", "admin", "member", "viewer")


def fast_settings(admin_url: str, **overrides: Any) -> Settings:
    """Real argon2id, with test-sized cost (the production defaults take ~50 ms per hash)."""
    return settings_for(admin_url, argon2_time_cost=1, argon2_memory_cost_kib=1024, argon2_parallelism=1,
                        **overrides)


@dataclass
class TenantFixture:
    id: uuid.UUID
    slug: str
    tokens: dict[str, str] = field(default_factory=dict)  # role -> JWT for that tenant
    user_ids: dict[str, int] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # "read" / "write" -> API key

    def auth(self, role: str = "owner") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def key(self, scope: str = "write", header: str = "x-api-key") -> dict[str, str]:
        if header == "bearer":
            return {"Authorization": f"Bearer {self.keys[scope]}"}
        return {"X-API-Key": self.keys[scope]}


@dataclass
class ApiWorld:
    client: httpx.AsyncClient
    admin_url: str
    settings: Settings
    a: TenantFixture
    b: TenantFixture
    both_user_token: str  # member of A (admin) and B (member), no tenant selected
    platform_token: str

    def headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD, tenant: str | None = None) -> str:
    r = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    if tenant is not None:
        r = await client.post("/api/v1/auth/select-tenant", json={"tenant": tenant},
                              headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
    return token


async def build_world(client: httpx.AsyncClient, admin_url: str, settings: Settings) -> ApiWorld:
    tag = uuid.uuid4().hex[:6]
    pw_hash = await hash_password(settings, PASSWORD)
    tenants: dict[str, TenantFixture] = {}
    async with operator_transaction(admin_url) as tx:
        for name in ("a", "b"):
            slug = f"tenant-{name}-{tag}"
            t = await service.create_tenant(tx, TenantCreate(name=f"Tenant {name.upper()}", slug=slug, region="CH",
                                                             plan="pro", status="active"))
            tenants[name] = TenantFixture(id=t.id, slug=slug)
            # Billable actions (PME analyses, transcriptions) need credits.
            await tx.fetch("SELECT * FROM platform.grant_credits(%s, 100000, 'test credits', 'seed')", (t.id,))
            for role in ROLES:
                row = await service.add_member(tx, slug, f"{role}-{name}-{tag}@example.ch", role,
                                               name=f"{role} {name}", password_hash=pw_hash)
                tenants[name].user_ids[role] = row["user_id"]
        both = f"both-{tag}@example.ch"
        await service.add_member(tx, tenants["a"].slug, both, "admin", name="Both", password_hash=pw_hash)
        await service.add_member(tx, tenants["b"].slug, both, "member", name="Both", password_hash=pw_hash)
        platform = f"platform-{tag}@example.ch"
        await tx.fetchval("SELECT app.register_user(%s, 'Platform', %s)", (platform, pw_hash))
        await service.set_platform_admin(tx, platform, True)
    for name, t in tenants.items():
        for role in ROLES:
            t.tokens[role] = await login(client, f"{role}-{name}-{tag}@example.ch")
        for scope in ("read", "write"):
            r = await client.post("/api/v1/api-keys", json={"name": f"{scope} key", "scope": scope}, headers=t.auth("admin"))
            assert r.status_code == 201, r.text
            t.keys[scope] = r.json()["key"]
    return ApiWorld(client, admin_url, settings, tenants["a"], tenants["b"],
                    both_user_token=await login(client, both), platform_token=await login(client, platform))


@pytest.fixture
async def api_client(migrated_db: str) -> AsyncIterator[tuple[httpx.AsyncClient, str, Settings]]:
    settings = fast_settings(migrated_db)
    db = bootstrap.database(settings, migrated_db)
    async with db:
        app = create_app(settings, db)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client, migrated_db, settings


@pytest.fixture
async def api_world(api_client: tuple[httpx.AsyncClient, str, Settings]) -> ApiWorld:
    client, admin_url, settings = api_client
    return await build_world(client, admin_url, settings)


@pytest.fixture(scope="module")
def module_db(server_url: str) -> Any:
    """A migrated database shared by one test module (for read-mostly matrices)."""
    name, admin = _create_database(server_url)
    prepare_sync(admin)
    yield admin
    _drop_database(server_url, name)


def count_rows(admin_url: str, table: str, tenant_id: uuid.UUID | None = None) -> int:
    with psycopg.connect(admin_url) as conn:
        if tenant_id is None:
            return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        return conn.execute(f'SELECT count(*) FROM "{table}" WHERE tenant_id = %s', (tenant_id,)).fetchone()[0]
