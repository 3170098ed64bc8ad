"""`Idempotency-Key` on every create: a retried create is answered, not done again.

The defect: billable creates (a PME analysis, a voice transcription) took no idempotency key. In
a crash test four creates were committed but never acknowledged; the client's retry would have
created, and debited, a second time.

* A PME analysis retried with the same key is charged once and answered with the same bytes; the
  same key with another body, or from another credential of the tenant, is refused (409);
  another tenant's identical key is unrelated.
* The key and the record are written in one transaction: a create that fails keeps no key, and
  two concurrent requests with one key create one record.
* Every create route of the OpenAPI document (found there, so a new one is covered) documents the
  header and honours it; the POST routes that do not take it are exactly the documented ones.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest

from api_support import (
    API_PREFIX,
    ROLE_RANKS,
    ApiOperation,
    ApiWorld,
    Seeder,
    api_operations,
    offline_openapi,
    provision_for_load,
    required_role,
)
from iafactory.knowledge import worker

pytestmark = pytest.mark.anyio

HEADER, REPLAYED = "Idempotency-Key", "Idempotent-Replayed"

DOC = offline_openapi()
PME = f"{API_PREFIX}/pme-analyses"


def key() -> dict[str, str]:
    return {HEADER: f"retry-{uuid.uuid4()}"}


def admin_value(world: ApiWorld, query: str, params: Any = ()) -> Any:
    with psycopg.connect(world.admin_url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None


def balance(world: ApiWorld, tenant_id: uuid.UUID) -> int:
    return admin_value(world, "SELECT credit_balance FROM billing_accounts WHERE tenant_id = %s", (tenant_id,))


def analyses(world: ApiWorld, tenant_id: uuid.UUID) -> int:
    return admin_value(world, "SELECT count(*) FROM pme_analyses WHERE tenant_id = %s", (tenant_id,))


def table_counts(world: ApiWorld) -> dict[str, int]:
    """Rows of every table (the rate-limit counters aside): a replay writes nothing."""
    with psycopg.connect(world.admin_url, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' "
                "AND relname <> 'rate_counters' ORDER BY 1"
            ).fetchall()
        ]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


async def test_a_retried_pme_analysis_is_charged_once_and_answered_the_same(api_world: ApiWorld) -> None:
    w, member = api_world, api_world.a.auth("member")
    idem = key()
    body = {"company_name": "Atlas SARL", "fiscal_year": 2025, "inputs": {"revenue": 1_200_000}}
    before, rows = balance(w, w.a.id), analyses(w, w.a.id)
    first = await w.client.post(PME, json=body, headers={**member, **idem})
    assert first.status_code == 201, first.text
    assert REPLAYED not in first.headers
    # The client never saw that answer (say the connection dropped); it retries, key order aside.
    again = await w.client.post(PME, json=dict(reversed(body.items())), headers={**member, **idem})
    assert again.status_code == 201 and again.content == first.content
    assert again.headers[REPLAYED] == "true"
    assert balance(w, w.a.id) == before - 10
    assert analyses(w, w.a.id) == rows + 1
    assert (
        admin_value(
            w,
            "SELECT count(*) FROM credit_transactions WHERE tenant_id = %s AND reason = %s",
            (w.a.id, f"pme_analysis {first.json()['id']}"),
        )
        == 1
    )

    # The same key for another request is a client error, and changes nothing.
    changed = await w.client.post(PME, json={**body, "fiscal_year": 2024}, headers={**member, **idem})
    assert changed.status_code == 409 and changed.headers["content-type"] == "application/problem+json"
    assert "different request" in changed.json()["detail"]
    # So is the same key from another credential of the tenant (its answer is not theirs).
    other = await w.client.post(PME, json=body, headers={**w.a.key("write"), **idem})
    assert other.status_code == 409 and "another user or API key" in other.json()["detail"]
    assert balance(w, w.a.id) == before - 10 and analyses(w, w.a.id) == rows + 1

    # Another tenant's identical key is another key.
    b_before = balance(w, w.b.id)
    theirs = await w.client.post(PME, json=body, headers={**w.b.auth("member"), **idem})
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    assert REPLAYED not in theirs.headers and balance(w, w.b.id) == b_before - 10
    mine = await w.client.post(PME, json=body, headers={**member, **idem})
    assert mine.content == first.content


async def test_a_failed_create_keeps_no_key_and_its_retry_runs(api_world: ApiWorld) -> None:
    """Key and record share one transaction: the create fails (402), so does the key."""
    w, member = api_world, api_world.a.auth("member")
    with psycopg.connect(w.admin_url, autocommit=True) as conn:
        conn.execute(
            "SELECT platform.grant_credits(%s, %s, 'zero out', 'zero-idem', 'adjustment')",
            (w.a.id, -balance(w, w.a.id)),
        )
    idem, body = key(), {"company_name": "Sans Crédit SA"}
    r = await w.client.post(PME, json=body, headers={**member, **idem})
    assert r.status_code == 402, r.text
    assert admin_value(w, "SELECT count(*) FROM idempotency_keys WHERE key = %s", (idem[HEADER],)) == 0
    with psycopg.connect(w.admin_url, autocommit=True) as conn:
        conn.execute("SELECT platform.grant_credits(%s, 100, 'top up', 'topup-idem')", (w.a.id,))
    r = await w.client.post(PME, json=body, headers={**member, **idem})
    assert r.status_code == 201 and REPLAYED not in r.headers, r.text
    assert balance(w, w.a.id) == 90
    stored = admin_value(
        w, "SELECT response_body FROM idempotency_keys WHERE tenant_id = %s AND key = %s", (w.a.id, idem[HEADER])
    )
    assert bytes(stored) == r.content


async def test_concurrent_requests_with_one_key_create_one_record(api_world: ApiWorld) -> None:
    w, member = api_world, api_world.a.auth("member")
    idem, body = key(), {"company_name": "Concurrent SA"}
    before, rows = balance(w, w.a.id), analyses(w, w.a.id)
    answers = await asyncio.gather(*(w.client.post(PME, json=body, headers={**member, **idem}) for _ in range(4)))
    assert {r.status_code for r in answers} == {201}, [r.text for r in answers]
    assert len({r.content for r in answers}) == 1
    assert sum(REPLAYED in r.headers for r in answers) == 3
    assert analyses(w, w.a.id) == rows + 1 and balance(w, w.a.id) == before - 10


async def test_an_expired_key_is_free_again_and_purged(api_world: ApiWorld) -> None:
    w, member = api_world, api_world.a.auth("member")
    idem = key()
    first = await w.client.post(PME, json={"company_name": "Un"}, headers={**member, **idem})
    assert first.status_code == 201
    hours = admin_value(
        w,
        "SELECT extract(epoch FROM expires_at - created_at) / 3600 FROM idempotency_keys WHERE key = %s",
        (idem[HEADER],),
    )
    assert hours >= 24
    admin_value(
        w,
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = %s RETURNING 1",
        (idem[HEADER],),
    )
    second = await w.client.post(PME, json={"company_name": "Deux"}, headers={**member, **idem})
    assert second.status_code == 201 and second.json()["id"] != first.json()["id"]
    admin_value(
        w,
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = %s RETURNING 1",
        (idem[HEADER],),
    )
    # The indexing worker deletes them when idle.
    assert await worker.purge_idempotency_keys(w.client._transport.app.state.db) >= 1  # type: ignore[attr-defined]
    assert admin_value(w, "SELECT count(*) FROM idempotency_keys WHERE key = %s", (idem[HEADER],)) == 0


async def test_malformed_keys_are_refused(api_world: ApiWorld) -> None:
    w = api_world
    for bad in ("", "x" * 256, "with space", "é".encode()):
        r = await w.client.post(PME, json={"company_name": "X"}, headers={**w.a.auth("member"), HEADER: bad})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == f"header.{HEADER}", (bad, r.text)


# --- Every create route ---------------------------------------------------------------------------


def takes_the_header(op: dict[str, Any]) -> bool:
    return any(p["in"] == "header" and p["name"] == HEADER for p in op.get("parameters", []))


def is_create(op: ApiOperation) -> bool:
    """A POST to a collection of the caller's tenant (not a sign-in step, not the platform's, not a
    POST that only reads)."""
    return (
        op.method == "POST"
        and op.path.startswith(API_PREFIX)
        and op.kind == "collection"
        and not op.reads_only
        and required_role(op.method, op.path) in ROLE_RANKS
        and op.path not in SINGLE_RECORD_ACTIONS
    )


# POSTs to a collection's path that never make a second record: the tenant's one open erasure request.
SINGLE_RECORD_ACTIONS = {
    f"{API_PREFIX}/tenant/erasure-requests",
    f"{API_PREFIX}/tenant/erasure-requests/cancel",
}


CREATES = [op for op in api_operations(DOC) if is_create(op)]
# POST routes without the header, and why (see iafactory/http/idempotency.py).
WITHOUT_THE_HEADER = {
    f"{API_PREFIX}/auth/register": "the email is unique: a retry creates nothing (it queues the email "
    "'you already have an account')",
    f"{API_PREFIX}/auth/verify-email": "not a create: a verification link works once",
    f"{API_PREFIX}/auth/verify-email/resend": "not a create: a resend replaces the link",
    f"{API_PREFIX}/auth/login": "not a create",
    f"{API_PREFIX}/auth/select-tenant": "not a create",
    f"{API_PREFIX}/auth/refresh": "not a create: a refresh token is good for one use, a retry is refused",
    f"{API_PREFIX}/auth/logout": "not a create: ending a session twice ends it once",
    f"{API_PREFIX}/auth/logout-all": "not a create: ending the sessions twice ends them once",
    f"{API_PREFIX}/me/password": "not a create: a retry of a change fails its current-password check",
    f"{API_PREFIX}/auth/password-reset": "not a create: a retry's link replaces the first (the answer is the same)",
    f"{API_PREFIX}/auth/password-reset/confirm": "not a create: the token works once, a retry answers 410",
    f"{API_PREFIX}/admin/tenants": "the slug is unique: a retry answers 409 and creates nothing",
    f"{API_PREFIX}/tenants": "no tenant yet to keep the key in; the slug is unique: a retry answers 409",
    f"{API_PREFIX}/admin/tenants/{{tenant_id}}/credits": "the body carries the ledger's idempotency_key",
    f"{API_PREFIX}/knowledge-base/search": "reads only",
    f"{API_PREFIX}/tenant/erasure-requests": "a tenant has one open request: a retry answers the open one",
    f"{API_PREFIX}/tenant/erasure-requests/cancel": "not a create: a retry finds nothing open and answers 404",
    f"{API_PREFIX}/admin/tenants/{{tenant_id}}/erasure-request/confirm": "not a create: confirming twice confirms once",
    f"{API_PREFIX}/auth/accept-invitation": "the token works once: a retry answers 409 and joins nothing",
    f"{API_PREFIX}/members/invitations/{{invitation_id}}/resend": "not a create: a retry's link replaces the first",
}


def test_every_create_route_documents_the_header_and_only_the_listed_posts_do_not() -> None:
    assert len(CREATES) >= 13, [op.label for op in CREATES]
    for path, item in DOC["paths"].items():
        if "post" not in item or not path.startswith(API_PREFIX):
            continue
        assert takes_the_header(item["post"]) == (path not in WITHOUT_THE_HEADER), path
    assert {op.path for op in CREATES}.isdisjoint(WITHOUT_THE_HEADER)


@pytest.fixture
async def world(api_world: ApiWorld) -> ApiWorld:
    await provision_for_load(api_world.admin_url, api_world)
    return api_world


@pytest.mark.parametrize("op", CREATES, ids=[op.label for op in CREATES])
async def test_every_create_route_honours_the_header(world: ApiWorld, op: ApiOperation) -> None:
    headers = world.a.auth("owner")
    seeder = Seeder(world.client, DOC, "idem", headers)
    if op.form is not None:
        # A file upload: the same file again (httpx draws a new multipart boundary for each
        # request, as a client's retry would), then another file under the same name.
        body: dict[str, Any] = {"files": {"file": ("idem.txt", b"idem text", "text/plain")}}
        other_body: dict[str, Any] = {"files": {"file": ("idem.txt", b"another text", "text/plain")}}
    else:
        body = {"json": await seeder.body(op, full=False)}
        # Another body from the same generator (every field, other strings, other email...), same key.
        other_body = {"json": await seeder.body(op, full=True)}
        if other_body == body:
            other_body = {"json": await seeder.body(op, full=False)}
    assert other_body != body
    idem = key()
    first = await world.client.post(op.path, **body, headers={**headers, **idem})
    assert first.status_code in (200, 201), first.text
    counts = table_counts(world)
    again = await world.client.post(op.path, **body, headers={**headers, **idem})
    assert again.status_code == first.status_code and again.headers[REPLAYED] == "true"
    if op.path == f"{API_PREFIX}/api-keys":
        # The secret is shown once and never stored: the replay names the key without it.
        assert first.json()["key"] and again.json()["key"] is None
        assert {**first.json(), "key": None} == again.json()
    else:
        assert again.content == first.content
    assert table_counts(world) == counts  # nothing was created again
    counts = table_counts(world)
    other = await world.client.post(op.path, **other_body, headers={**headers, **idem})
    assert other.status_code == 409 and "different request" in other.json()["detail"], other.text
    assert table_counts(world) == counts


async def test_the_answer_is_stored_in_the_transaction_of_the_create(api_world: ApiWorld) -> None:
    """No answer without its record and no record without its key: both come from one commit."""
    w = api_world
    idem = key()
    r = await w.client.post(
        f"{API_PREFIX}/voice/transcriptions", json={"title": "Consultation"}, headers={**w.a.auth("member"), **idem}
    )
    assert r.status_code == 201
    with psycopg.connect(w.admin_url, autocommit=True) as conn:
        key_xmin, record_xmin = conn.execute(
            """SELECT (SELECT xmin::text FROM idempotency_keys WHERE tenant_id = %s AND key = %s),
                      (SELECT xmin::text FROM voice_transcriptions WHERE tenant_id = %s AND id = %s)""",
            (w.a.id, idem[HEADER], w.a.id, r.json()["id"]),
        ).fetchone()
    assert key_xmin == record_xmin


async def test_without_a_key_nothing_is_stored(api_world: ApiWorld) -> None:
    """The header is optional."""
    w = api_world
    r = await w.client.post(PME, json={"company_name": "Sans clé"}, headers=w.a.auth("member"))
    assert r.status_code == 201 and REPLAYED not in r.headers
    assert admin_value(w, "SELECT count(*) FROM idempotency_keys WHERE tenant_id = %s", (w.a.id,)) == 0
