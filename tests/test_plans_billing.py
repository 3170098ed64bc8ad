"""Plans, statuses, rate limits, credits and the audit log: what the business runs on."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from api_support import PASSWORD, ApiWorld, login
from iafactory.app import create_app
from iafactory.auth.passwords import hash_password
from iafactory.db import bootstrap
from iafactory.db.scope import operator_transaction
from iafactory.plans.ratelimit import RedisRateLimiter
from iafactory.tenancy import service
from iafactory.tenancy.context import TenantContext
from iafactory.tenancy.schemas import TenantCreate

pytestmark = pytest.mark.anyio


async def set_limits(world: ApiWorld, tenant_id: uuid.UUID, **limits: int) -> None:
    r = await world.client.patch(
        f"/api/v1/admin/tenants/{tenant_id}", json={"limits": limits}, headers=world.headers(world.platform_token)
    )
    assert r.status_code == 200, r.text


def fresh_window(admin_url: str) -> datetime:
    """Forget the counts so far (the fixture's own requests count too); the current window."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("DELETE FROM rate_counters")
        return conn.execute("SELECT date_trunc('minute', now())").fetchone()[0]


async def in_one_window(admin_url: str, burst, reset=None):
    """Run `burst` inside a single rate-limit window. The windows are fixed minutes: if the burst
    happened to straddle a minute boundary, the observation is void and the burst runs again."""
    for _ in range(3):
        start = fresh_window(admin_url)
        if reset is not None:
            await reset()
        result = await burst()
        with psycopg.connect(admin_url) as conn:
            end = conn.execute("SELECT date_trunc('minute', now())").fetchone()[0]
        if start == end:
            return result
    raise AssertionError("could not run the burst inside one minute")


async def set_status(world: ApiWorld, tenant_id: uuid.UUID, status: str) -> httpx.Response:
    return await world.client.patch(
        f"/api/v1/admin/tenants/{tenant_id}", json={"status": status}, headers=world.headers(world.platform_token)
    )


# --- rate limits ----------------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after(api_world: ApiWorld) -> None:
    await set_limits(api_world, api_world.a.id, requests_per_minute=5)

    async def burst() -> list[httpx.Response]:
        return [await api_world.client.get("/api/v1/projects", headers=api_world.a.auth("viewer")) for _ in range(7)]

    responses = await in_one_window(api_world.admin_url, burst)
    assert [r.status_code for r in responses] == [200] * 5 + [429, 429]
    r = responses[-1]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert "5 requests per minute" in r.json()["detail"]
    # Tenant B is not affected.
    assert (await api_world.client.get("/api/v1/projects", headers=api_world.b.auth("viewer"))).status_code == 200


async def test_rate_limit_is_shared_by_workers(api_world: ApiWorld) -> None:
    """Two app instances with their own pools stand for two server processes."""
    await set_limits(api_world, api_world.a.id, requests_per_minute=6)
    settings = api_world.settings
    second_db = bootstrap.database(settings, api_world.admin_url)
    async with second_db:
        other = create_app(settings, second_db)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://w2") as second:
            clients = [api_world.client, second] * 5

            async def burst() -> list[httpx.Response]:
                return await asyncio.gather(
                    *(c.get("/api/v1/projects", headers=api_world.a.auth("viewer")) for c in clients)
                )

            codes = await in_one_window(api_world.admin_url, burst)
    assert sorted(r.status_code for r in codes) == [200] * 6 + [429] * 4


async def test_api_key_rate_limit_is_per_key(api_world: ApiWorld) -> None:
    await set_limits(api_world, api_world.a.id, key_requests_per_minute=3)

    async def burst() -> list[int]:
        codes = [
            (await api_world.client.get("/api/v1/projects", headers=api_world.a.key("read"))).status_code
            for _ in range(4)
        ]
        return [*codes, (await api_world.client.get("/api/v1/projects", headers=api_world.a.key("write"))).status_code]

    assert await in_one_window(api_world.admin_url, burst) == [200, 200, 200, 429, 200]


async def test_redis_rate_limiter_when_configured(api_world: ApiWorld) -> None:
    try:
        import redis.asyncio as redis

        probe = redis.from_url("redis://127.0.0.1:6379/15")
        await probe.ping()
        await probe.aclose()
    except Exception:  # noqa: BLE001
        pytest.skip("no Redis on 127.0.0.1:6379")
    await set_limits(api_world, api_world.a.id, requests_per_minute=4)
    app = api_world.client._transport.app  # type: ignore[attr-defined]
    limiters = [RedisRateLimiter("redis://127.0.0.1:6379/15", app.state.db) for _ in range(2)]
    app.state.rate_limiter = limiters[0]

    async def burst() -> list[int]:
        app.state.rate_limiter = limiters[0]
        codes = [
            (await api_world.client.get("/api/v1/projects", headers=api_world.a.auth("viewer"))).status_code
            for _ in range(3)
        ]
        app.state.rate_limiter = limiters[1]  # another worker, same Redis
        return codes + [
            (await api_world.client.get("/api/v1/projects", headers=api_world.a.auth("viewer"))).status_code
            for _ in range(3)
        ]

    async def reset() -> None:
        keys = [k async for k in limiters[0]._redis.scan_iter(f"iaf:rl:*{api_world.a.id}*")]
        if keys:
            await limiters[0]._redis.delete(*keys)

    try:
        codes = await in_one_window(api_world.admin_url, burst, reset)
    finally:
        app.state.rate_limiter = None
        for limiter in limiters:
            await limiter.close()
    assert codes == [200, 200, 200, 200, 429, 429]


# --- count and storage limits ----------------------------------------------------------------------


async def test_member_key_and_storage_limits_answer_403_naming_the_limit(api_world: ApiWorld) -> None:
    c, a = api_world.client, api_world.a
    members = len((await c.get("/api/v1/members", headers=a.auth("owner"))).json())
    keys = len([k for k in (await c.get("/api/v1/api-keys", headers=a.auth("owner"))).json() if not k["revoked_at"]])
    await set_limits(api_world, a.id, max_members=members, max_api_keys=keys, max_kb_bytes=1000)
    email = f"new-{uuid.uuid4().hex[:6]}@example.ch"
    r = await c.post("/api/v1/auth/register", json={"email": email, "password": "long-enough-password"})
    assert r.status_code == 202, r.text
    r = await c.post("/api/v1/members", json={"email": email, "role": "viewer"}, headers=a.auth("admin"))
    assert r.status_code == 403 and r.json()["limit"] == "max_members", r.text
    r = await c.post("/api/v1/api-keys", json={"name": "one too many"}, headers=a.auth("admin"))
    assert r.status_code == 403 and r.json()["limit"] == "max_api_keys"
    r = await c.post("/api/v1/knowledge-base", json={"title": "small", "content": "x" * 600}, headers=a.auth("member"))
    assert r.status_code == 201, r.text
    r = await c.post("/api/v1/knowledge-base", json={"title": "big", "content": "x" * 600}, headers=a.auth("member"))
    assert r.status_code == 403 and r.json()["limit"] == "max_kb_bytes"


async def test_a_tenant_owner_cannot_raise_their_own_limits(api_world: ApiWorld) -> None:
    r = await api_world.client.patch(
        "/api/v1/tenant",
        json={"settings": {"limits": {"requests_per_minute": 10**6}}},
        headers=api_world.a.auth("owner"),
    )
    assert r.status_code == 403
    r = await api_world.client.patch(
        "/api/v1/tenant", json={"settings": {"theme": "dark"}}, headers=api_world.a.auth("owner")
    )
    assert r.status_code == 200 and r.json()["settings"] == {"theme": "dark"}


# --- statuses ---------------------------------------------------------------------------------------


async def test_suspended_and_cancelled_tenants_are_refused_with_a_reason(api_world: ApiWorld) -> None:
    c, a = api_world.client, api_world.a
    assert (await set_status(api_world, a.id, "suspended")).status_code == 200
    for headers in (a.auth("owner"), a.key("read")):
        r = await c.get("/api/v1/projects", headers=headers)
        assert r.status_code == 403 and "suspended" in r.json()["detail"]
    assert (await set_status(api_world, a.id, "active")).status_code == 200
    assert (await c.get("/api/v1/projects", headers=a.auth("owner"))).status_code == 200
    assert (await set_status(api_world, a.id, "cancelled")).status_code == 200
    r = await c.get("/api/v1/projects", headers=a.auth("owner"))
    assert r.status_code == 403 and "cancelled" in r.json()["detail"]
    # Cancelled is final: the transition table refuses to reopen it.
    r = await set_status(api_world, a.id, "active")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]


async def test_an_expired_trial_reads_but_does_not_write(api_world: ApiWorld) -> None:
    c, a = api_world.client, api_world.a
    with psycopg.connect(api_world.admin_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE tenants SET status = 'trial', trial_ends_at = now() - interval '1 day' WHERE id = %s", (a.id,)
        )
    assert (await c.get("/api/v1/projects", headers=a.auth("owner"))).status_code == 200
    r = await c.post("/api/v1/projects", json={"name": "after the trial"}, headers=a.auth("owner"))
    assert r.status_code == 403 and "trial ended" in r.json()["detail"]
    with psycopg.connect(api_world.admin_url, autocommit=True) as conn:
        conn.execute("UPDATE tenants SET trial_ends_at = now() + interval '1 day' WHERE id = %s", (a.id,))
    assert (
        await c.post("/api/v1/projects", json={"name": "still in trial"}, headers=a.auth("owner"))
    ).status_code == 201


# --- credits ----------------------------------------------------------------------------------------


async def balance_and_ledger(admin_url: str, tenant_id: uuid.UUID) -> tuple[int, int, int]:
    with psycopg.connect(admin_url) as conn:
        balance = conn.execute(
            "SELECT credit_balance FROM billing_accounts WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()[0]
        total, n = conn.execute(
            "SELECT coalesce(sum(amount), 0), count(*) FROM credit_transactions WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()
    return balance, int(total), n


async def test_concurrent_debits_never_overdraw(api_world: ApiWorld) -> None:
    db = api_world.client._transport.app.state.db  # type: ignore[attr-defined]
    tenant = uuid.uuid4()
    async with operator_transaction(api_world.admin_url) as tx:
        await tx.execute(
            "INSERT INTO tenants (id, name, slug, region, plan, status) VALUES (%s, 'Debits', %s, 'FR', "
            "'pro', 'active')",
            (tenant, f"debits-{tenant.hex[:8]}"),
        )
        await service.grant_credits(tx, tenant, 100, "start", "start")
    ctx = TenantContext(tenant_id=tenant)
    outcomes: list[str] = []

    async def debit(i: int) -> None:
        try:
            async with db.tenant(ctx) as tx:
                await tx.fetch("SELECT * FROM app.debit_credits(7, 'job', %s)", (f"job-{i}",))
            outcomes.append("ok")
        except psycopg.Error as err:
            assert err.sqlstate == "IA402", err
            outcomes.append("refused")

    await asyncio.gather(*(debit(i) for i in range(40)))
    balance, ledger_sum, _ = await balance_and_ledger(api_world.admin_url, tenant)
    assert outcomes.count("ok") == 100 // 7 and balance == 100 - 7 * (100 // 7)
    assert balance == ledger_sum >= 0


async def test_a_retried_debit_or_grant_counts_once(api_world: ApiWorld) -> None:
    r1 = await api_world.client.post(
        f"/api/v1/admin/tenants/{api_world.b.id}/credits",
        json={"amount": 50, "reason": "goodwill", "idempotency_key": "gw-1"},
        headers=api_world.headers(api_world.platform_token),
    )
    r2 = await api_world.client.post(
        f"/api/v1/admin/tenants/{api_world.b.id}/credits",
        json={"amount": 50, "reason": "goodwill", "idempotency_key": "gw-1"},
        headers=api_world.headers(api_world.platform_token),
    )
    assert r1.status_code == r2.status_code == 200
    assert r2.json()["duplicate"] and r2.json()["transaction_id"] == r1.json()["transaction_id"]
    balance, ledger_sum, _ = await balance_and_ledger(api_world.admin_url, api_world.b.id)
    assert balance == ledger_sum == 100_050
    r = await api_world.client.post(
        f"/api/v1/admin/tenants/{api_world.b.id}/credits",
        json={"amount": 50, "reason": "x", "idempotency_key": "k"},
        headers=api_world.b.auth("owner"),
    )
    assert r.status_code == 403


async def test_the_monthly_grant_applies_once_per_month(api_world: ApiWorld) -> None:
    async with operator_transaction(api_world.admin_url) as tx:
        first = {r["tenant_id"]: r for r in await service.grant_monthly(tx, datetime(2031, 5, 1).date())}
    async with operator_transaction(api_world.admin_url) as tx:
        second = {r["tenant_id"]: r for r in await service.grant_monthly(tx, datetime(2031, 5, 1).date())}
    assert first[api_world.a.id]["granted"] and not second[api_world.a.id]["granted"]
    assert first[api_world.a.id]["credits"] == 5000  # the pro plan
    balance, ledger_sum, _ = await balance_and_ledger(api_world.admin_url, api_world.a.id)
    assert balance == ledger_sum == 100_000 + 5000


async def tenant_with_admin(world: ApiWorld, region: str) -> tuple[uuid.UUID, dict[str, str]]:
    """A new tenant of `region` (no billing account yet) and its admin's token."""
    tag = uuid.uuid4().hex[:6]
    email = f"admin-{region.lower()}-{tag}@example.org"
    async with operator_transaction(world.admin_url) as tx:
        t = await service.create_tenant(
            tx,
            TenantCreate(
                name=f"Cabinet {region}",
                slug=f"cabinet-{region.lower()}-{tag}",
                region=region,
                plan="pro",
                status="active",
            ),
        )
        await service.add_member(
            tx, t.slug, email, "admin", password_hash=await hash_password(world.settings, PASSWORD)
        )
    return t.id, world.headers(await login(world.client, email))


async def test_currency_follows_the_region_unless_set(api_world: ApiWorld) -> None:
    c, w = api_world.client, api_world
    expected = {"DZ": "DZD", "CH": "CHF", "FR": "EUR", "BE": "EUR", "CA": "CAD"}
    for region, currency in expected.items():
        tenant_id, admin = await tenant_with_admin(w, region)
        # Before the account exists, then once a grant has created it (the credit functions of 010).
        assert (await c.get("/api/v1/credits/balance", headers=admin)).json() == {"balance": 0, "currency": currency}
        r = await c.post(
            f"/api/v1/admin/tenants/{tenant_id}/credits",
            json={"amount": 100, "reason": "welcome", "idempotency_key": "welcome"},
            headers=w.headers(w.platform_token),
        )
        assert r.status_code == 200, r.text
        assert (await c.get("/api/v1/credits/balance", headers=admin)).json() == {"balance": 100, "currency": currency}
        assert (await c.get("/api/v1/billing-account", headers=admin)).json()["currency"] == currency
        # A deal takes the region's currency too, unless the client names one.
        lead = (await c.post("/api/v1/crm/leads", json={"full_name": "Client"}, headers=admin)).json()
        r = await c.post("/api/v1/crm/deals", json={"lead_id": lead["id"], "title": "Audit"}, headers=admin)
        assert r.status_code == 201 and r.json()["currency"] == currency, r.text
        r = await c.post(
            "/api/v1/crm/deals", json={"lead_id": lead["id"], "title": "Export", "currency": "CAD"}, headers=admin
        )
        assert r.status_code == 201 and r.json()["currency"] == "CAD", r.text

    # A currency set explicitly is kept when the account is created later by a grant.
    tenant_id, admin = await tenant_with_admin(w, "DZ")
    r = await c.patch("/api/v1/billing-account", json={"billing_name": "Haddad SARL", "currency": "EUR"}, headers=admin)
    assert r.status_code == 200 and r.json()["currency"] == "EUR", r.text
    async with operator_transaction(w.admin_url) as tx:
        await service.grant_credits(tx, tenant_id, 10, "start", "start")
    assert (await c.get("/api/v1/credits/balance", headers=admin)).json() == {"balance": 10, "currency": "EUR"}


async def test_billable_actions_debit_and_refuse_with_402_when_out_of_credits(api_world: ApiWorld) -> None:
    c, a = api_world.client, api_world.a
    before, _, _ = await balance_and_ledger(api_world.admin_url, a.id)
    r = await c.post("/api/v1/pme-analyses", json={"company_name": "Atlas SARL"}, headers=a.auth("member"))
    assert r.status_code == 201, r.text
    after, ledger_sum, _ = await balance_and_ledger(api_world.admin_url, a.id)
    assert after == before - 10 == ledger_sum
    with psycopg.connect(api_world.admin_url, autocommit=True) as conn:
        conn.execute("SELECT platform.grant_credits(%s, %s, 'zero out', 'zero', 'adjustment')", (a.id, -after))
    r = await c.post("/api/v1/pme-analyses", json={"company_name": "No credits SA"}, headers=a.auth("member"))
    assert r.status_code == 402 and "insufficient credits" in r.json()["detail"]
    assert [
        p["company_name"] for p in (await c.get("/api/v1/pme-analyses", headers=a.auth("viewer"))).json()["items"]
    ] == ["Atlas SARL"]


# --- audit log ----------------------------------------------------------------------------------------


async def test_security_relevant_actions_are_audited_and_append_only(api_world: ApiWorld) -> None:
    c, a = api_world.client, api_world.a
    member_id = a.user_ids["member"]
    await c.patch(f"/api/v1/members/{member_id}", json={"role": "viewer"}, headers=a.auth("admin"))
    await c.delete(f"/api/v1/members/{member_id}", headers=a.auth("admin"))
    key = (await c.post("/api/v1/api-keys", json={"name": "audited"}, headers=a.auth("admin"))).json()
    await c.delete(f"/api/v1/api-keys/{key['id']}", headers=a.auth("admin"))
    await c.patch("/api/v1/tenant", json={"name": "Renamed"}, headers=a.auth("owner"))
    await c.post(
        "/api/v1/auth/select-tenant", json={"tenant": a.slug}, headers=api_world.headers(api_world.both_user_token)
    )
    await set_limits(api_world, a.id, max_members=99)
    r = await c.get("/api/v1/audit-events?limit=100", headers=a.auth("admin"))
    assert r.status_code == 200
    actions = [e["action"] for e in r.json()["items"]]
    for expected in (
        "member.role_changed",
        "member.removed",
        "api_key.created",
        "api_key.revoked",
        "tenant.settings_changed",
        "auth.tenant_selected",
        "auth.login",
        "member.added",
    ):
        assert expected in actions, (expected, actions)
    removed = next(e for e in r.json()["items"] if e["action"] == "member.removed")
    assert removed["actor_user_id"] == a.user_ids["admin"] and removed["target_id"] == str(member_id)
    filtered = await c.get("/api/v1/audit-events?action=api_key.created", headers=a.auth("admin"))
    assert {e["action"] for e in filtered.json()["items"]} == {"api_key.created"}
    assert (await c.get("/api/v1/audit-events", headers=a.auth("member"))).status_code == 403
    # B's log shows none of A's events.
    b_log = (await c.get("/api/v1/audit-events?limit=100", headers=api_world.b.auth("admin"))).json()["items"]
    assert all(e["target_id"] != str(member_id) for e in b_log)
    # The application role cannot rewrite history.
    app_db = c._transport.app.state.db  # type: ignore[attr-defined]
    for statement in ("UPDATE audit_events SET action = 'nothing'", "DELETE FROM audit_events"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with app_db.tenant(TenantContext(tenant_id=a.id)) as tx:
                await tx.execute(statement)


async def test_audit_rows_carry_ip_and_request_id(api_world: ApiWorld) -> None:
    r = await api_world.client.post(
        "/api/v1/api-keys", json={"name": "traced"}, headers={**api_world.a.auth("admin"), "X-Request-Id": "trace-1234"}
    )
    assert r.status_code == 201
    log = (
        await api_world.client.get(
            "/api/v1/audit-events?action=api_key.created&limit=100", headers=api_world.a.auth("admin")
        )
    ).json()["items"]
    traced = [e for e in log if e["details"].get("name") == "traced"]
    assert traced and traced[0]["request_id"] == "trace-1234" and traced[0]["ip"] == "127.0.0.1"


async def test_tenant_creation_and_platform_actions_are_audited_with_ip_and_request_id(api_world: ApiWorld) -> None:
    """Platform actions run without a tenant scope (platform.* definer functions); their audit rows
    still name the administrator, the client's IP and the request."""
    c, w = api_world.client, api_world

    def platform(request_id: str) -> dict[str, str]:
        return {**w.headers(w.platform_token), "X-Request-Id": request_id}

    admin_id = (await c.get("/api/v1/me", headers=w.headers(w.platform_token))).json()["user"]["id"]
    slug = f"audited-{uuid.uuid4().hex[:8]}"
    r = await c.post(
        "/api/v1/admin/tenants",
        json={"name": "Cabinet Audité", "slug": slug, "region": "FR", "status": "active"},
        headers=platform("create-1"),
    )
    assert r.status_code == 201, r.text
    created = r.json()["id"]
    tenant = f"/api/v1/admin/tenants/{w.a.id}"
    for body, rid in (
        ({"plan": "enterprise"}, "plan-1"),
        ({"status": "suspended"}, "status-1"),
        ({"status": "active"}, "status-2"),
        ({"limits": {"max_members": 50}}, "limits-1"),
    ):
        assert (await c.patch(tenant, json=body, headers=platform(rid))).status_code == 200
    r = await c.post(
        f"{tenant}/credits",
        json={"amount": 5, "reason": "audit", "idempotency_key": "audit-1"},
        headers=platform("grant-1"),
    )
    assert r.status_code == 200, r.text

    with psycopg.connect(w.admin_url) as conn:
        rows = conn.execute(
            """SELECT tenant_id::text, action, request_id, host(ip), actor_user_id FROM audit_events
               WHERE request_id = ANY (%s) ORDER BY created_at""",
            (["create-1", "plan-1", "status-1", "status-2", "limits-1", "grant-1"],),
        ).fetchall()
        details = conn.execute(
            "SELECT details FROM audit_events WHERE tenant_id = %s AND action = 'tenant.created'", (created,)
        ).fetchone()[0]
    a = str(w.a.id)
    assert rows == [
        (created, "tenant.created", "create-1", "127.0.0.1", admin_id),
        (a, "tenant.plan_changed", "plan-1", "127.0.0.1", admin_id),
        (a, "tenant.status_changed", "status-1", "127.0.0.1", admin_id),
        (a, "tenant.status_changed", "status-2", "127.0.0.1", admin_id),
        (a, "tenant.settings_changed", "limits-1", "127.0.0.1", admin_id),
        (a, "credits.grant", "grant-1", "127.0.0.1", admin_id),
    ]
    assert details == {"name": "Cabinet Audité", "slug": slug, "region": "FR", "plan": "free", "status": "active"}
    # The tenant's admins see them in their own log.
    log = (await c.get("/api/v1/audit-events?limit=100", headers=w.a.auth("admin"))).json()["items"]
    grant = next(e for e in log if e["action"] == "credits.grant" and e["request_id"] == "grant-1")
    assert grant["ip"] == "127.0.0.1" and grant["actor_user_id"] == admin_id


def _since(minutes: int) -> str:
    return (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat()


# --- usage ------------------------------------------------------------------------------------------


async def test_usage_batches_count_once_and_summaries_aggregate_in_the_database(api_world: ApiWorld) -> None:
    c, headers = api_world.client, api_world.a.auth("member")
    events = [
        {
            "event_type": "llm.tokens",
            "quantity": 100,
            "idempotency_key": f"k{i}",
            "occurred_at": "2026-11-02T10:00:00Z" if i % 2 else "2026-11-03T10:00:00Z",
        }
        for i in range(6)
    ]
    events.append(
        {"event_type": "voice.minutes", "quantity": 3, "idempotency_key": "v1", "occurred_at": "2026-11-02T11:00:00Z"}
    )
    first, retry = await asyncio.gather(
        c.post("/api/v1/usage-events", json={"events": events}, headers=headers),
        c.post("/api/v1/usage-events", json={"events": events}, headers=headers),
    )
    assert first.status_code == retry.status_code == 200
    # Sent twice at once: every event is new in exactly one of the answers.
    assert sorted(first.json()["accepted"] + retry.json()["accepted"]) == sorted(e["idempotency_key"] for e in events)
    window = "from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z"
    by_type = (await c.get(f"/api/v1/usage/summary?{window}&group_by=type", headers=headers)).json()["rows"]
    assert by_type == [
        {"key": "llm.tokens", "events": 6, "quantity": 600.0},
        {"key": "voice.minutes", "events": 1, "quantity": 3.0},
    ]
    by_day = (await c.get(f"/api/v1/usage/summary?{window}&group_by=day", headers=headers)).json()["rows"]
    assert by_day == [
        {"key": "2026-11-02", "events": 4, "quantity": 303.0},
        {"key": "2026-11-03", "events": 3, "quantity": 300.0},
    ]
    other = (await c.get(f"/api/v1/usage/summary?{window}", headers=api_world.b.auth("viewer"))).json()["rows"]
    assert other == []
    r = await c.get("/api/v1/usage/summary?from=2026-12-01T00:00:00Z&to=2026-11-01T00:00:00Z", headers=headers)
    assert r.status_code == 422
