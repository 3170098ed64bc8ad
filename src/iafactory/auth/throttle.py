"""Sign-in throttling per account and per client address, shared by every worker.

Each failed sign-in counts against two subjects: the account (an HMAC of the normalised email, so
unknown emails are throttled exactly like known ones and the store names nobody) and the client
address (an HMAC of the IP). Within a one-hour window starting at a subject's first failure, the
first `free` failures cost nothing; each further one makes the next attempt wait base, 2 x base,
4 x base ... seconds, up to a cap (60 s by default: at most about 70 failures an hour); the 100th
failure of the window (ASVS 5.0 V6.3.1's "at most 100 failed attempts per hour") waits for the
window's end. An attempt during a wait is refused with 429 and `Retry-After` before the password is
even hashed, and does not count. A successful sign-in clears its account's subject (not its
address's: one valid account must not reset the counter of an address guessing others).

Never a lockout: every wait ends, at the latest an hour after the window began, whatever an
attacker does; the victim's correct password works as soon as it does. (An attacker can still slow
a known account down to one attempt a minute: the price of a per-account limit, which ASVS
requires; the address limit alone would not stop a botnet.)

Where: PostgreSQL by default (migration 025's UNLOGGED `login_throttle`, in the directory when
there are cells, else the one database); Redis when IAFACTORY_REDIS_URL is set, as the rate
limiter does.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from iafactory.admission import CREDENTIALS
from iafactory.config import Settings
from iafactory.db.scope import Database
from iafactory.plans.ratelimit import too_many

WINDOW_SECONDS = 3600


@dataclass(frozen=True)
class Subject:
    key: bytes
    free: int
    kind: str  # "account" or "ip"


@dataclass(frozen=True)
class Failure:
    subject: Subject
    failures: int
    wait: float
    engaged: bool  # this failure started the backoff of its window


def subjects(settings: Settings, email: str, ip: str | None, scope: str = "login") -> list[Subject]:
    """The account's and the address's subjects. `scope` keeps separate counters for another use
    of the same limits (password-reset requests: "reset"), so that one does not slow the other."""
    key = settings.secret("api_key_secret").encode()
    prefix = b"iafactory-" + scope.encode()
    out = [
        Subject(
            hmac.new(key, prefix + b"-account\0" + email.lower().encode(), hashlib.sha256).digest(),
            settings.login_throttle_account_free,
            "account",
        )
    ]
    if ip is not None:
        out.append(
            Subject(
                hmac.new(key, prefix + b"-ip\0" + ip.encode(), hashlib.sha256).digest(),
                settings.login_throttle_ip_free,
                "ip",
            )
        )
    return out


def refusal(wait: float) -> Exception:
    seconds = max(1, math.ceil(wait))
    return too_many(f"too many failed sign-ins: try again in {seconds} s", seconds)


class Throttle(Protocol):
    async def wait(self, subjects: list[Subject]) -> float: ...

    async def fail(self, subject: Subject) -> Failure: ...

    async def clear(self, subject: Subject) -> None: ...


class PostgresThrottle:
    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings

    async def wait(self, subjects: list[Subject]) -> float:
        async with self._db.anonymous(read_only=True, lane=CREDENTIALS) as tx:
            return float(await tx.fetchval("SELECT app.login_throttle_wait(%s)", ([s.key for s in subjects],)))

    async def fail(self, subject: Subject) -> Failure:
        s = self._settings
        async with self._db.anonymous(lane=CREDENTIALS) as tx:
            row = await tx.fetchrow(
                "SELECT * FROM app.login_throttle_fail(%s, %s, %s, %s, %s, %s)",
                (
                    subject.key,
                    subject.free,
                    s.login_throttle_base_seconds,
                    s.login_throttle_cap_seconds,
                    s.login_throttle_max_per_hour,
                    WINDOW_SECONDS,
                ),
                last=True,
            )
        assert row is not None
        return Failure(subject, row["failures"], float(row["wait_seconds"]), bool(row["engaged"]))

    async def clear(self, subject: Subject) -> None:
        async with self._db.anonymous(lane=CREDENTIALS) as tx:
            await tx.execute("SELECT app.login_throttle_clear(%s)", (subject.key,), last=True)


class RedisThrottle:
    """The same windows in Redis: a failure counter per subject that expires with its window, and
    a `blocked` key that expires when the wait ends."""

    def __init__(self, redis: Any, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings

    @staticmethod
    def _keys(subject: Subject) -> tuple[str, str]:
        h = subject.key.hex()
        return f"iaf:lt:fail:{h}", f"iaf:lt:block:{h}"

    async def wait(self, subjects: list[Subject]) -> float:
        pipe = self._redis.pipeline(transaction=False)
        for s in subjects:
            pipe.pttl(self._keys(s)[1])
        ttls = await pipe.execute()
        return max([t / 1000 for t in ttls if t and t > 0] or [0.0])

    async def fail(self, subject: Subject) -> Failure:
        s = self._settings
        fail_key, block_key = self._keys(subject)
        pipe = self._redis.pipeline(transaction=True)
        pipe.incr(fail_key)
        pipe.expire(fail_key, WINDOW_SECONDS, nx=True)
        pipe.ttl(fail_key)
        failures, _, window_left = await pipe.execute()
        wait = 0.0
        if failures > subject.free:
            wait = min(
                s.login_throttle_cap_seconds, s.login_throttle_base_seconds * 2 ** min(failures - subject.free - 1, 30)
            )
        if failures >= s.login_throttle_max_per_hour:
            wait = max(wait, float(window_left))
        if wait > 0:
            await self._redis.set(block_key, b"1", px=max(1, int(wait * 1000)))
        return Failure(subject, int(failures), wait, failures == subject.free + 1)

    async def clear(self, subject: Subject) -> None:
        await self._redis.delete(*self._keys(subject))


def make(settings: Settings, db: Database, redis: Any | None = None) -> Throttle:
    if redis is not None:
        return RedisThrottle(redis, settings)
    return PostgresThrottle(db, settings)


def now() -> float:
    return time.time()
