"""Requests per minute per tenant and per API key, shared by every server worker.

Default: PostgreSQL. `app.rate_hit` counts in an UNLOGGED table, in a short transaction of its own
that rides in the same round trip as the request's first statement (no extra round trip).
With IAFACTORY_REDIS_URL set: Redis counters (INCR + EXPIRE in one pipeline), with each tenant's
limits read from PostgreSQL and cached for a few seconds per process.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from iafactory.admission import CREDENTIALS
from iafactory.db.scope import Database, Params
from iafactory.http.problems import Problem

LIMITS_CACHE_SECONDS = 10.0


def postgres_counter(tenant_id: UUID, api_key_id: UUID | None) -> tuple[str, Params]:
    """The statement Database.tenant(before=...) runs ahead of the request."""
    return "SELECT app.rate_hit(%s, %s)", (tenant_id, api_key_id)


def too_many(message: str, retry_after: int) -> Problem:
    return Problem(429, "Too Many Requests", message, headers={"Retry-After": str(retry_after)}, type_="rate-limited")


class RedisRateLimiter:
    def __init__(self, url: str, db: Database) -> None:
        import redis.asyncio as redis

        self._redis = redis.from_url(url)
        self._db = db
        self._limits: dict[UUID, tuple[float, dict[str, Any]]] = {}

    @property
    def redis(self) -> Any:
        """The client, shared with the sign-in throttle."""
        return self._redis

    async def close(self) -> None:
        await self._redis.aclose()

    async def check(self, timeout: float) -> str | None:
        """For /readyz: None when Redis answers a PING within `timeout` seconds, else why not."""
        import asyncio

        try:
            async with asyncio.timeout(timeout):
                await self._redis.ping()
        except TimeoutError:
            return "no answer in time"
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return "unreachable"
        return None

    async def _tenant_limits(self, tenant_id: UUID, db: Database | None) -> dict[str, Any] | None:
        hit = self._limits.get(tenant_id)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        async with (db or self._db).anonymous(read_only=True, lane=CREDENTIALS) as tx:
            row = await tx.fetchrow("SELECT * FROM app.tenant_limits(%s)", (tenant_id,))
        if row is not None:
            self._limits[tenant_id] = (time.monotonic() + LIMITS_CACHE_SECONDS, row)
        return row

    async def hit(self, tenant_id: UUID, api_key_id: UUID | None, db: Database | None = None) -> None:
        """`db`: the pool of the tenant's cell (its plan's limits are read there)."""
        limits = await self._tenant_limits(tenant_id, db)
        if limits is None:
            return  # unknown tenant: the request's own gate refuses it
        now = time.time()
        window = int(now // 60)
        retry_after = max(1, 60 - int(now % 60))
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(f"iaf:rl:tenant:{tenant_id}:{window}")
        pipe.expire(f"iaf:rl:tenant:{tenant_id}:{window}", 120)
        if api_key_id is not None:
            pipe.incr(f"iaf:rl:key:{api_key_id}:{window}")
            pipe.expire(f"iaf:rl:key:{api_key_id}:{window}", 120)
        results = await pipe.execute()
        if results[0] > limits["requests_per_minute"]:
            raise too_many(
                f"rate limit exceeded: {limits['requests_per_minute']} requests per minute for this "
                f"tenant (plan {limits['plan']})",
                retry_after,
            )
        if api_key_id is not None and results[2] > limits["key_requests_per_minute"]:
            raise too_many(
                f"rate limit exceeded: {limits['key_requests_per_minute']} requests per minute for "
                f"this API key (plan {limits['plan']})",
                retry_after,
            )
