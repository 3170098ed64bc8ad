"""`Idempotency-Key` on every create, Stripe-style: a retried create gets the first answer back
instead of creating (and billing) a second time.

* Same key, same request (method, path, canonical JSON body), same caller: the stored status
  and body, with `Idempotent-Replayed: true`. Nothing runs again.
* Same key, another request: 409. Same key from another user or API key of the tenant: 409 (the
  stored answer is theirs; an API key's secret, for one, is never replayed, see `redact`).
* Same key while the first request is still running: the second waits for its outcome (at most
  5 s, then 409 with Retry-After).
* The key, the request's hash and the rendered answer are written in the transaction of the
  create itself: a crash keeps both or neither. A failed create (4xx/5xx) rolls back its key too,
  so a retry runs it again. Keys live in `idempotency_keys` (per tenant, RLS, 013) for at least
  IAFACTORY_IDEMPOTENCY_KEY_TTL_SECONDS (24 h).

Not taken by the sign-in steps (not creates), by POST /auth/register and POST /admin/tenants
(their email and slug are unique: a retry cannot create twice and answers 409), nor by
POST /admin/tenants/{id}/credits (its body carries the ledger's own idempotency key).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Header, Request, Response
from pydantic import TypeAdapter
from starlette.datastructures import UploadFile

from iafactory.auth.dependencies import TenantSession
from iafactory.http.problems import Problem
from iafactory.http.rendering import JSON, render

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
DESCRIPTION = (
    "A key of your choice (1-255 visible ASCII characters, e.g. a UUID) that makes this create safe to retry: "
    "a retry with the same key and body gets the first answer back (status and body, with `Idempotent-Replayed: "
    "true`) instead of creating, and charging, twice. The same key with another body, or from another user or "
    "API key, answers 409. Keys are kept per tenant for at least 24 hours."
)

_CLAIM = "SELECT * FROM app.claim_idempotency_key(%s, %s, %s, %s, %s)"
_STORE = "UPDATE idempotency_keys SET status_code = %s, response_body = %s WHERE tenant_id = %s AND key = %s"


def _conflict(detail: str, **extra: Any) -> Problem:
    return Problem(409, "Conflict", detail, type_="idempotency-key", **extra)


async def request_hash(request: Request) -> str:
    """SHA-256 of method, path and the body as canonical JSON (key order and spacing do not count);
    a multipart form by its fields and each file's name and SHA-256 (a retry's boundary differs)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = await _form_fingerprint(request)
    else:
        raw = await request.body()
        try:
            body = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False) if raw else ""
        except ValueError:
            body = raw.decode("utf-8", "replace")
    text = f"{request.method} {request.url.path}?{request.url.query}\n{body}"
    return hashlib.sha256(text.encode()).hexdigest()


async def _form_fingerprint(request: Request) -> str:
    form = await request.form()  # parsed already for the route: Starlette keeps it
    parts: list[list[str | None]] = []
    for name, value in sorted(form.multi_items(), key=lambda item: item[0]):
        if isinstance(value, UploadFile):
            await value.seek(0)  # the handler may have read it already
            digest = hashlib.sha256()
            while chunk := await value.read(1 << 20):
                digest.update(chunk)
            await value.seek(0)
            parts.append([name, value.filename, digest.hexdigest()])
        else:
            parts.append([name, value])
    return json.dumps(parts, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Idempotency:
    """What a create route receives: the request's Idempotency-Key (or None) and `create`."""

    key: str | None
    request: Request

    async def create(
        self, s: TenantSession, action: Callable[[bool], Awaitable[Any]], *, redact: Iterable[str] = ()
    ) -> Any:
        """Run `action(last)` once per key. `last`: the action may commit with its statement (no
        key: nothing follows it). With a key, the answer is rendered, stored and committed here,
        and returned as a Response; the fields in `redact` are stored as null."""
        if self.key is None:
            return await action(True)
        route = self.request.scope["route"]
        adapter: TypeAdapter[Any] = route.endpoint.response_adapter
        status = route.status_code or 200
        tenant_id = s.ctx.tenant_id
        principal = f"key:{s.ctx.api_key_id}" if s.ctx.api_key_id is not None else f"user:{s.ctx.user_id}"
        fingerprint = await request_hash(self.request)
        settings = self.request.app.state.settings
        try:
            claim = await s.tx.fetchrow(
                _CLAIM, (tenant_id, self.key, principal, fingerprint, settings.idempotency_key_ttl_seconds)
            )
        except psycopg.errors.LockNotAvailable as err:
            raise _conflict(
                "a request with this Idempotency-Key is still in progress; retry shortly", headers={"Retry-After": "1"}
            ) from err
        assert claim is not None
        if not claim["claimed"]:
            if claim["principal"] != principal:
                raise _conflict(
                    "this Idempotency-Key was used by another user or API key of the tenant; use a key of your own"
                )
            if claim["request_hash"] != fingerprint:
                raise _conflict(
                    "this Idempotency-Key was used for a different request (method, path or body); "
                    "use a new key for a new request"
                )
            if claim["status_code"] is None:
                raise _conflict(
                    "a request with this Idempotency-Key is still in progress; retry shortly",
                    headers={"Retry-After": "1"},
                )
            return Response(
                bytes(claim["response_body"]),
                status_code=claim["status_code"],
                media_type=JSON,
                headers={REPLAYED: "true"},
            )
        result = await action(False)
        body = render(adapter, result)
        redact = tuple(redact)
        stored = render(adapter, {**result, **dict.fromkeys(redact)}) if redact else body
        await s.tx.execute(_STORE, (status, stored, tenant_id, self.key), last=True)
        return Response(body, status_code=status, media_type=JSON)


async def _idempotency(
    request: Request,
    key: Annotated[
        str | None,
        Header(alias=HEADER, min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$", description=DESCRIPTION),
    ] = None,
) -> Idempotency:
    return Idempotency(key, request)


# The dependency of every create route: it also documents the header in OpenAPI.
Idempotent = Annotated[Idempotency, Depends(_idempotency)]
