"""Password hashing with argon2id. It is deliberately slow (and takes argon2_memory_cost_kib of
memory each time), so it never runs on the event loop nor while a database connection is held: on
a request's path it runs in the hashing pool (`CpuWork`, app.state.load.hashing), whose bound keeps
a sign-in flood from taking every core and gigabytes of memory."""

from __future__ import annotations

from functools import lru_cache

import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from iafactory.admission import ANONYMOUS, CpuWork
from iafactory.config import Settings


@lru_cache(maxsize=4)
def _hasher(time_cost: int, memory_cost: int, parallelism: int) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism)


def hasher(settings: Settings) -> PasswordHasher:
    return _hasher(settings.argon2_time_cost, settings.argon2_memory_cost_kib, settings.argon2_parallelism)


async def hash_password(settings: Settings, password: str, cpu: CpuWork | None = None) -> str:
    """`cpu`: the request path's bounded pool; without it (CLI, tests) a worker thread."""
    if cpu is not None:
        return await cpu.run(ANONYMOUS, hasher(settings).hash, password)
    return await anyio.to_thread.run_sync(hasher(settings).hash, password)


async def verify_password(
    settings: Settings, stored_hash: str | None, password: str, cpu: CpuWork | None = None
) -> bool:
    """False for a wrong password or a missing hash. An unknown email is checked against a dummy
    hash, so that timing does not tell which emails have accounts."""
    ph = hasher(settings)

    def check() -> bool:
        # The dummy hash is made here, in the thread, the first time it is needed.
        target = stored_hash or _dummy_hash(
            settings.argon2_time_cost, settings.argon2_memory_cost_kib, settings.argon2_parallelism
        )
        try:
            return ph.verify(target, password)
        except (VerificationError, InvalidHashError):
            return False

    ok = await (cpu.run(ANONYMOUS, check) if cpu is not None else anyio.to_thread.run_sync(check))
    return ok and stored_hash is not None


@lru_cache(maxsize=4)
def _dummy_hash(time_cost: int, memory_cost: int, parallelism: int) -> str:
    return _hasher(time_cost, memory_cost, parallelism).hash("not-a-real-password")
