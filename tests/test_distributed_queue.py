"""The indexing queue as it works on a distributed database, checked on plain PostgreSQL.

Claims go tenant by tenant (FOR UPDATE SKIP LOCKED works within one shard) yet keep the order
and the sharing of one queue; a worker is woken by the request that queued the job, not only by
the trigger's NOTIFY (on Citus that trigger runs on a worker node, which the coordinator's
LISTEN does not hear).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from api_support import app_client, build_world
from conftest import settings_for
from iafactory.db import server
from iafactory.knowledge.schemas import JOBS_CHANNEL

pytestmark = pytest.mark.anyio


def _tenant(conn: psycopg.Connection, slug: str) -> uuid.UUID:
    return conn.execute(
        "INSERT INTO tenants (name, slug, region, plan, status) VALUES (%s, %s, 'CH', 'pro', 'active') RETURNING id",
        (slug, slug),
    ).fetchone()[0]


def _document(conn: psycopg.Connection, tenant: uuid.UUID, title: str, waited: str) -> int:
    """A document (its trigger queues a job), the job made runnable `waited` ago."""
    doc = conn.execute(
        "INSERT INTO knowledge_base (tenant_id, title, content) VALUES (%s, %s, 'texte') RETURNING id", (tenant, title)
    ).fetchone()[0]
    conn.execute(
        "UPDATE knowledge_jobs SET run_after = now() - %s::interval WHERE tenant_id = %s AND document_id = %s",
        (waited, tenant, doc),
    )
    return doc


@pytest.fixture
def queue(migrated_db: str) -> Iterator[tuple[str, dict[str, uuid.UUID], dict[str, int]]]:
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        tenants = {name: _tenant(conn, f"queue-{name}-{uuid.uuid4().hex[:6]}") for name in ("a", "b", "c")}
        docs = {
            "a": _document(conn, tenants["a"], "A", "1 minute"),
            "b": _document(conn, tenants["b"], "B", "3 minutes"),
            "c": _document(conn, tenants["c"], "C", "2 minutes"),
        }
    yield migrated_db, tenants, docs


def _claim(app: psycopg.Connection) -> tuple[uuid.UUID, int] | None:
    row = app.execute("SELECT tenant_id, document_id FROM app.claim_knowledge_job(30, 'test')").fetchone()
    return None if row is None else (row[0], row[1])


def test_claims_take_the_oldest_runnable_job_whichever_its_tenant(queue: tuple) -> None:
    admin, tenants, docs = queue
    with psycopg.connect(server.app_conninfo(settings_for(admin), admin), autocommit=True) as app:
        order = [_claim(app) for _ in range(4)]
    assert order == [(tenants["b"], docs["b"]), (tenants["c"], docs["c"]), (tenants["a"], docs["a"]), None]


def test_one_claim_takes_one_job_of_a_tenant_with_many(queue: tuple) -> None:
    admin, tenants, _ = queue
    with psycopg.connect(admin, autocommit=True) as conn:
        more = [_document(conn, tenants["b"], f"B{i}", f"{10 + i} minutes") for i in range(3)]
    with psycopg.connect(server.app_conninfo(settings_for(admin), admin), autocommit=True) as app:
        assert _claim(app) == (tenants["b"], more[2])
    with psycopg.connect(admin) as conn:
        assert conn.execute("SELECT count(*) FROM knowledge_jobs WHERE status = 'running'").fetchone() == (1,)


def test_a_claim_skips_a_tenant_whose_jobs_another_worker_holds(queue: tuple) -> None:
    admin, tenants, docs = queue
    with (
        psycopg.connect(admin) as holder,
        psycopg.connect(server.app_conninfo(settings_for(admin), admin), autocommit=True) as app,
    ):
        # Another worker, in the middle of claiming B's (the oldest) job.
        holder.execute("SELECT id FROM knowledge_jobs WHERE tenant_id = %s FOR UPDATE", (tenants["b"],))
        assert _claim(app) == (tenants["c"], docs["c"])
        holder.rollback()
        assert _claim(app) == (tenants["b"], docs["b"])


async def test_a_document_write_wakes_the_workers_from_the_request_itself(migrated_db: str) -> None:
    """With the trigger's NOTIFY gone (as on Citus, where it fires on a worker node), creating or
    changing a document through the API still wakes a listening worker."""
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        for function in ("app.queue_indexing()", "app.queue_indexing_after_insert()"):
            body = conn.execute("SELECT prosrc FROM pg_proc WHERE oid = %s::regprocedure", (function,)).fetchone()[0]
            assert "pg_notify" in body
            conn.execute(
                f"CREATE OR REPLACE FUNCTION {function} RETURNS trigger LANGUAGE plpgsql AS $body$"
                + body.replace(f"PERFORM pg_notify('{JOBS_CHANNEL}', '');", "")
                + "$body$"
            )
    with psycopg.connect(migrated_db, autocommit=True) as listener:
        listener.execute(f"LISTEN {JOBS_CHANNEL}")
        async with app_client(migrated_db) as (client, admin_url, settings):
            world = await build_world(client, admin_url, settings)
            r = await client.post(
                "/api/v1/knowledge-base", json={"title": "Bail", "content": "Le bail."}, headers=world.a.auth("member")
            )
            assert r.status_code == 201, r.text
            assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == [JOBS_CHANNEL]
            r = await client.patch(
                f"/api/v1/knowledge-base/{r.json()['id']}",
                json={"content": "Le bail commercial."},
                headers=world.a.auth("member"),
            )
            assert r.status_code == 200, r.text
            assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == [JOBS_CHANNEL]
