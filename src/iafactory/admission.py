"""Admission control: what a worker process does when more work arrives than it can do.

A process has three scarce things: database connections (the pool), CPU for password hashing
(argon2id, 64 MiB of memory each) and CPU for query embeddings. Each sits behind a `Gate`: a
fixed number of slots, a cap per key (a tenant, or the unauthenticated lane) so that one tenant's
flood leaves slots to the others, and a bounded waiting queue. A request

* that finds its queue full is refused at once: `Busy` (503, "busy, retry after N s");
* that waits longer than the queue timeout is refused the same way, instead of holding on for
  psycopg_pool's 30 s while its client has long given up;
* whose client disconnects while it waits is dropped (`ClientGone`) before it reaches the database:
  `AdmissionMiddleware` starts listening for the ASGI `http.disconnect` as soon as a request has
  to queue, and buffers whatever body it reads on the application's behalf.

Work that is not a request (the indexing worker, CLI commands, tests driving the Database) waits
its turn without a deadline: it is capped, never shed.

Every counter is a plain attribute (`Gate.stats()`, `LoadControl.stats()` on `app.state.load`) so
that metrics can read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import os
import sys
import threading
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from time import monotonic
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("iafactory.admission")
T = TypeVar("T")

# Keys of the lanes that are not a tenant.
ANONYMOUS = "anonymous"  # before a credential: sign-in, registration
CREDENTIALS = "credentials"  # API-key lookups (kept apart so that a sign-in flood does not starve them)


class Busy(Exception):
    """Refused for load: answered 503 with Retry-After."""

    def __init__(self, what: str, retry_after: int) -> None:
        super().__init__(f"busy, retry after {retry_after} s")
        self.what, self.retry_after = what, retry_after


class Unavailable(Exception):
    """A dependency is down (the database): answered 503 naming it, with Retry-After."""

    def __init__(self, what: str, reason: str, retry_after: int = 1) -> None:
        super().__init__(f"{what} unavailable: {reason}")
        self.what, self.reason, self.retry_after = what, reason, retry_after


class ClientGone(Exception):
    """The client disconnected while its request waited: nothing is done, nobody reads the answer."""


# --- the client, seen from a queued request -------------------------------------------------------


class ClientWatch:
    """The request's ASGI `receive`, able to notice a disconnect while the request is queued.

    Until `watch()` is called it is a plain pass-through (no cost for a request that never waits).
    From then on a task of its own reads the real `receive`: body messages are buffered for the
    application, `http.disconnect` marks the client gone and fails whatever it was waiting for.
    """

    __slots__ = ("_buffer", "_error", "_hooks", "_more", "_receive", "_task", "gone")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._buffer: deque[Message] = deque()
        self._more: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._hooks: list[Callable[[], None]] = []
        self._error: BaseException | None = None
        self.gone = False

    async def receive(self) -> Message:
        """What the application calls instead of the server's `receive`."""
        if self._task is None:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._mark_gone()
            return message
        assert self._more is not None
        while not self._buffer:
            if self._error is not None:
                raise self._error
            if self.gone:
                return {"type": "http.disconnect"}
            self._more.clear()
            await self._more.wait()
        return self._buffer.popleft()

    def watch(self) -> None:
        """Start listening for a disconnect (idempotent)."""
        if self._task is None and not self.gone:
            self._more = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def on_gone(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call `hook` when the client disconnects; returns the function that unregisters it."""
        self._hooks.append(hook)

        def unhook() -> None:
            with suppress(ValueError):
                self._hooks.remove(hook)

        return unhook

    async def _run(self) -> None:
        try:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self._mark_gone()
                    return
                self._buffer.append(message)
                assert self._more is not None
                self._more.set()
        except Exception as err:  # noqa: BLE001 - e.g. the body-size limit: handed to the application
            self._error = err
            if self._more is not None:
                self._more.set()

    def _mark_gone(self) -> None:
        self.gone = True
        if self._more is not None:
            self._more.set()
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task


# The watch of the request being served in this task (None outside a request).
current_request: contextvars.ContextVar[ClientWatch | None] = contextvars.ContextVar("iaf_request", default=None)


# --- gates ------------------------------------------------------------------------------------------


class _Waiter:
    __slots__ = ("future", "key")

    def __init__(self, key: Hashable, future: asyncio.Future[None]) -> None:
        self.key, self.future = key, future


class Gate:
    """`slots` units of work at once, at most `cap(key)` of them for one key, and a bounded queue.

    A slot freed is handed directly to the oldest waiter whose key is under its cap, so a waiter
    never sits behind a key that is at its cap, and a newcomer never overtakes a waiter it could
    have been served with. `lanes` gives some keys (the unauthenticated lane) a cap of their own.
    """

    def __init__(
        self,
        name: str,
        slots: int,
        *,
        max_waiting: int,
        timeout: float,
        key_slots: int | None = None,
        key_waiting: int | None = None,
        lanes: dict[Hashable, int] | None = None,
    ) -> None:
        self.name = name
        self.slots = max(1, slots)
        self.max_waiting = max(0, max_waiting)
        self.timeout = timeout
        self.key_slots = max(1, min(key_slots or self.slots, self.slots))
        self.key_waiting = max(0, min(key_waiting if key_waiting is not None else self.max_waiting, self.max_waiting))
        self.lanes = {k: max(1, min(v, self.slots)) for k, v in (lanes or {}).items()}
        self.active = 0
        self._active_by_key: Counter[Hashable] = Counter()
        self._waiting_by_key: Counter[Hashable] = Counter()
        self._queue: deque[_Waiter] = deque()
        self._hold = 0.05  # moving average of how long a slot is held, for Retry-After
        # Counters for metrics (monotonic) and high-water marks.
        self.admitted = 0
        self.queued = 0
        self.shed_full = 0
        self.shed_timeout = 0
        self.gone = 0
        self.peak_active = 0
        self.peak_waiting = 0

    # -- reading -------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._queue)

    def cap(self, key: Hashable) -> int:
        return self.lanes.get(key, self.key_slots)

    def active_for(self, key: Hashable) -> int:
        return self._active_by_key[key]

    def waiting_for(self, key: Hashable) -> int:
        return self._waiting_by_key[key]

    def retry_after(self) -> int:
        """Seconds until the queue ahead has probably drained (at least 1, at most 30)."""
        return max(1, min(30, math.ceil((len(self._queue) + 1) * self._hold / self.slots)))

    def stats(self) -> dict[str, Any]:
        return {
            "slots": self.slots,
            "active": self.active,
            "waiting": len(self._queue),
            "max_waiting": self.max_waiting,
            "admitted": self.admitted,
            "queued": self.queued,
            "shed_full": self.shed_full,
            "shed_timeout": self.shed_timeout,
            "gone": self.gone,
            "peak_active": self.peak_active,
            "peak_waiting": self.peak_waiting,
        }

    # -- admission -----------------------------------------------------------------------------
    def _free_for(self, key: Hashable) -> bool:
        return self.active < self.slots and self._active_by_key[key] < self.cap(key)

    def _take(self, key: Hashable) -> None:
        self.active += 1
        self._active_by_key[key] += 1
        self.admitted += 1
        if self.active > self.peak_active:
            self.peak_active = self.active

    def _full_for(self, key: Hashable) -> bool:
        return len(self._queue) >= self.max_waiting or self._waiting_by_key[key] >= self.key_waiting

    def check_room(self, key: Hashable = None) -> None:
        """Raise `Busy` now if a request for `key` would be shed, so that it skips work it would
        waste (e.g. a sign-in reading its password hash while the hashing queue is full)."""
        if current_request.get() is not None and not self._free_for(key) and self._full_for(key):
            self.shed_full += 1
            raise Busy(self.name, self.retry_after())

    async def acquire(self, key: Hashable = None) -> None:
        """Take a slot for `key`, waiting if needed. Requests: `Busy` when the queue is full or
        the wait exceeds `timeout`, `ClientGone` when the client disconnects meanwhile."""
        watch = current_request.get()
        if watch is not None and watch.gone:
            self.gone += 1
            raise ClientGone
        if self._free_for(key):
            self._take(key)
            return
        if watch is not None and self._full_for(key):
            self.shed_full += 1
            raise Busy(self.name, self.retry_after())
        waiter = _Waiter(key, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self._waiting_by_key[key] += 1
        self.queued += 1
        if len(self._queue) > self.peak_waiting:
            self.peak_waiting = len(self._queue)
        unhook = None
        if watch is not None:
            watch.watch()
            unhook = watch.on_gone(functools.partial(self._drop, waiter))
        try:
            done, _ = await asyncio.wait((waiter.future,), timeout=self.timeout if watch is not None else None)
        except BaseException:
            self._abandon(waiter)  # cancelled: give the slot back if it was already ours
            raise
        finally:
            if unhook is not None:
                unhook()
        if not done:
            self._abandon(waiter)
            self.shed_timeout += 1
            raise Busy(self.name, self.retry_after())
        if waiter.future.exception() is not None or (watch is not None and watch.gone):
            self._abandon(waiter)
            self.gone += 1
            raise ClientGone

    def release(self, key: Hashable = None, held: float | None = None) -> None:
        self.active -= 1
        left = self._active_by_key[key] - 1
        if left > 0:
            self._active_by_key[key] = left
        else:
            del self._active_by_key[key]
        if held is not None:
            self._hold += 0.1 * (held - self._hold)
        if self._queue:
            self._dispatch()

    @asynccontextmanager
    async def slot(self, key: Hashable = None):
        await self.acquire(key)
        started = monotonic()
        try:
            yield
        finally:
            self.release(key, monotonic() - started)

    # -- internals -----------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Hand free slots to the oldest waiters whose key is under its cap."""
        if self.active >= self.slots:
            return
        keep: deque[_Waiter] = deque()
        while self._queue:
            waiter = self._queue.popleft()
            if self.active < self.slots and self._active_by_key[waiter.key] < self.cap(waiter.key):
                self._unqueue_count(waiter.key)
                self._take(waiter.key)
                waiter.future.set_result(None)
            else:
                keep.append(waiter)
        self._queue = keep

    def _unqueue_count(self, key: Hashable) -> None:
        left = self._waiting_by_key[key] - 1
        if left > 0:
            self._waiting_by_key[key] = left
        else:
            del self._waiting_by_key[key]

    def _drop(self, waiter: _Waiter) -> None:
        """The client went away: leave the queue (a slot already handed over is given back by
        the acquirer, which sees the client gone)."""
        if not waiter.future.done():
            self._queue.remove(waiter)
            self._unqueue_count(waiter.key)
            waiter.future.set_exception(ClientGone())

    def _abandon(self, waiter: _Waiter) -> None:
        future = waiter.future
        if future.done():
            if not future.cancelled() and future.exception() is None:
                self.release(waiter.key)  # the slot had been handed over: hand it on
            return
        self._queue.remove(waiter)
        self._unqueue_count(waiter.key)
        future.cancel()


class CpuWork:
    """A gate in front of a thread pool of its own for CPU-heavy work (argon2id, embeddings).

    The threads run at a lower CPU priority (Linux `nice`, per thread; anything they start
    inherits it), so that a flood of slow work takes the CPU only when serving requests does not
    need it. A slot is held until the thread has finished, even if the request was cancelled:
    the bound on concurrent work (and on argon2's memory) is exact.
    """

    def __init__(
        self,
        name: str,
        threads: int,
        *,
        max_waiting: int,
        timeout: float,
        key_slots: int | None = None,
        key_waiting: int | None = None,
        nice: int = 10,
    ) -> None:
        self.gate = Gate(
            name, threads, max_waiting=max_waiting, timeout=timeout, key_slots=key_slots, key_waiting=key_waiting
        )
        self._nice = nice
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, key: Hashable, fn: Callable[..., T], *args: Any) -> T:
        await self.gate.acquire(key)
        started = monotonic()
        try:
            future = asyncio.get_running_loop().run_in_executor(self._threads(), functools.partial(fn, *args))
        except BaseException:
            self.gate.release(key)
            raise
        future.add_done_callback(lambda _: self.gate.release(key, monotonic() - started))
        return await asyncio.shield(future)

    async def run_async(self, key: Hashable, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """For work done elsewhere (a remote embedding service): only the gate applies."""
        async with self.gate.slot(key):
            return await fn(*args)

    def _threads(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.gate.slots,
                thread_name_prefix=f"iaf-{self.gate.name}",
                initializer=_lower_priority,
                initargs=(self._nice,),
            )
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


def _lower_priority(nice: int) -> None:
    if nice > 0 and sys.platform.startswith("linux"):
        # On Linux the nice value belongs to the thread, not the process. Not allowed: normal priority.
        with contextlib.suppress(OSError):
            os.setpriority(
                os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice)
            )


# --- the HTTP side ------------------------------------------------------------------------------------


class AdmissionMiddleware:
    """Pure ASGI, in front of everything else the application does for a request.

    * Gives each request a `ClientWatch` (see `current_request`).
    * Bounds the requests in progress in this process (`max_in_flight`), and, in lanes of their
      own, those of the unauthenticated endpoints (`anonymous_paths`: sign-in, registration) and
      those of any one credential (the raw Authorization / X-API-Key value: a forged one only
      ever counts against itself). Beyond, 503 busy at once, before the body is read, JSON
      parsed or a token verified: a flood of hundreds of clients then costs a few microseconds
      per refused request instead of a millisecond, and a burst of them does not hold up the
      event loop in front of other tenants' requests. The finer, per-tenant caps come later,
      once the credential is verified (`Gate`).
    * Health probes are always let through.
    """

    EXEMPT = frozenset({"/healthz", "/readyz"})

    def __init__(
        self,
        app: ASGIApp,
        max_in_flight: int,
        load: LoadControl | None = None,
        *,
        anonymous_paths: frozenset[str] = frozenset(),
        anonymous_max_in_flight: int | None = None,
        credential_max_in_flight: int | None = None,
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.anonymous_paths = anonymous_paths
        self.anonymous_max_in_flight = anonymous_max_in_flight or max_in_flight
        self.credential_max_in_flight = credential_max_in_flight or max_in_flight
        self.in_flight = 0
        self.anonymous_in_flight = 0
        self._by_credential: Counter[bytes] = Counter()
        self.shed = 0  # over max_in_flight
        self.shed_anonymous = 0
        self.shed_credential = 0
        if load is not None:
            load.http = self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        anonymous = path in self.anonymous_paths
        credential = None if anonymous else _credential(scope)
        if path not in self.EXEMPT:
            if self.in_flight >= self.max_in_flight:
                self.shed += 1
                await _busy(send, 1)
                return
            if anonymous and self.anonymous_in_flight >= self.anonymous_max_in_flight:
                self.shed_anonymous += 1
                await _busy(send, 1)
                return
            if credential is not None and self._by_credential[credential] >= self.credential_max_in_flight:
                self.shed_credential += 1
                await _busy(send, 1)
                return
        watch = ClientWatch(receive)
        token = current_request.set(watch)
        self.in_flight += 1
        if anonymous:
            self.anonymous_in_flight += 1
        if credential is not None:
            self._by_credential[credential] += 1
        try:
            await self.app(scope, watch.receive, send)
        finally:
            self.in_flight -= 1
            if anonymous:
                self.anonymous_in_flight -= 1
            if credential is not None:
                left = self._by_credential[credential] - 1
                if left > 0:
                    self._by_credential[credential] = left
                else:
                    del self._by_credential[credential]
            current_request.reset(token)
            await watch.close()

    def stats(self) -> dict[str, int]:
        return {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "shed": self.shed,
            "anonymous_in_flight": self.anonymous_in_flight,
            "shed_anonymous": self.shed_anonymous,
            "credentials_in_flight": len(self._by_credential),
            "shed_credential": self.shed_credential,
        }


def _credential(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization" or name == b"x-api-key":
            return value
    return None


async def _busy(send: Send, retry_after: int) -> None:
    body = (
        f'{{"type":"https://docs.iafactory.ch/problems/busy","title":"Service Unavailable","status":503,'
        f'"detail":"busy, retry after {retry_after} s"}}'
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"retry-after", str(retry_after).encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LoadControl:
    """The process's admission state, on `app.state.load`: the gates and their counters."""

    def __init__(self, hashing: CpuWork, embedding: CpuWork) -> None:
        self.hashing = hashing
        self.embedding = embedding
        self.http: AdmissionMiddleware | None = None  # set when the middleware is built
        self.database: Any = None  # the Database (its gate and pool), set by the app

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hashing": self.hashing.gate.stats(), "embedding": self.embedding.gate.stats()}
        if self.http is not None:
            out["http"] = self.http.stats()
        if self.database is not None:
            out["database"] = self.database.load_stats()
        return out

    def close(self) -> None:
        self.hashing.close()
        self.embedding.close()
