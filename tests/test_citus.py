"""`iafactory citus distribute` and the service on a real Citus cluster.

Skipped unless IAFACTORY_CITUS_URL names a Citus coordinator (an admin URL of a database where
the citus extension is installed and the workers are registered; CI has none). The test makes a
database of its own on the coordinator and on every worker, and drops them afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from api_support import app_client, build_world
from conftest import prepare_sync, run_cli, settings_for
from iafactory.db import citus, migrate, server
from iafactory.db.scope import operator_transaction

CITUS_URL = os.environ.get("IAFACTORY_CITUS_URL")
pytestmark = pytest.mark.skipif(not CITUS_URL, reason="IAFACTORY_CITUS_URL (a Citus coordinator) is not set")
OWNER_PASSWORD = "citus-test-owner-password"


def _nodes(url: str) -> tuple[tuple[str, int], list[tuple[str, int]]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT nodename, nodeport, groupid FROM pg_dist_node WHERE noderole = 'primary' ORDER BY groupid"
        ).fetchall()
    coordinator = next(((h, p) for h, p, g in rows if g == 0), None)
    if coordinator is None:
        info = psycopg.conninfo.conninfo_to_dict(url)
        coordinator = (info.get("host", "127.0.0.1"), int(info.get("port", 5432)))
    return coordinator, [(h, p) for h, p, g in rows if g != 0]


def _node_url(url: str, host: str, port: int, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, host=host, port=port, dbname=dbname)


@pytest.fixture(scope="module")
def cluster_db() -> Iterator[str]:
    """A new database with citus on the coordinator and every worker, workers registered."""
    assert CITUS_URL
    coordinator, workers = _nodes(CITUS_URL)
    name = f"iaf_citus_{uuid.uuid4().hex[:10]}"
    nodes = [*workers, coordinator]
    try:
        for host, port in nodes:
            with psycopg.connect(_node_url(CITUS_URL, host, port, "postgres"), autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            with psycopg.connect(_node_url(CITUS_URL, host, port, name), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION citus")
        url = _node_url(CITUS_URL, *coordinator, name)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host(%s, %s)", coordinator)
            for host, port in workers:
                conn.execute("SELECT citus_add_node(%s, %s)", (host, port))
        yield url
    finally:
        for host, port in nodes:
            with psycopg.connect(_node_url(CITUS_URL, host, port, "postgres"), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def distributed(cluster_db: str) -> str:
    prepare_sync(cluster_db)
    settings = settings_for(cluster_db, owner_db_password=OWNER_PASSWORD)
    lines: list[str] = []
    plan = asyncio.run(citus.distribute(cluster_db, settings, lines.append))
    assert "tenants" in plan.distributed and "users" in plan.reference, lines
    return cluster_db


def test_distribute_makes_every_tenant_table_colocated_with_tenants(distributed: str) -> None:
    with psycopg.connect(distributed) as conn:
        kinds = {
            t: (k, c)
            for t, k, c in conn.execute(
                "SELECT table_name::text, citus_table_type, distribution_column FROM citus_tables"
            )
        }
        tenant_tables = {
            r[0]
            for r in conn.execute(
                """SELECT c.relname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'
               WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'"""
            )
        }
        colocations = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT colocation_id FROM citus_tables WHERE citus_table_type = 'distributed'"
            )
        }
        owner = conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'iaf_owner'").fetchone()[0]
    assert kinds["tenants"] == ("distributed", "id")
    assert all(kinds[t] == ("distributed", "tenant_id") for t in tenant_tables), kinds
    assert len(colocations) == 1
    assert {"users", "plan_limits", "billable_actions", "tenant_slugs"} <= {
        t for t, (k, _) in kinds.items() if k == "reference"
    }
    assert "schema_migrations" not in kinds and "rate_counters" not in kinds
    assert owner


def test_second_run_and_migrate_find_nothing_to_do(distributed: str) -> None:
    settings = settings_for(distributed, owner_db_password=OWNER_PASSWORD)
    assert asyncio.run(citus.distribute(distributed, settings)).empty
    assert prepare_sync(distributed) == []
    result = run_cli("citus", "distribute", db_url=distributed, env={"IAFACTORY_OWNER_DB_PASSWORD": OWNER_PASSWORD})
    assert result.returncode == 0 and "nothing to do" in result.stdout, result.stdout + result.stderr


def test_a_later_migration_runs_on_the_distributed_schema(distributed: str, tmp_path: Any) -> None:
    """The DDL later migrations write (columns, indexes, functions, triggers, policies, and a new
    tenant table distributed by app.distribute_tenant_table) is accepted by Citus."""
    (tmp_path / "900_later.sql").write_text("""
ALTER TABLE projects ADD COLUMN IF NOT EXISTS color varchar(7);
CREATE INDEX IF NOT EXISTS idx_projects_tenant_color ON projects (tenant_id, color);
CREATE OR REPLACE FUNCTION app.project_names(p_tenant uuid) RETURNS SETOF text LANGUAGE plpgsql STABLE AS $$
BEGIN RETURN QUERY SELECT p.name::text FROM public.projects p WHERE p.tenant_id = p_tenant; END $$;
CREATE TABLE IF NOT EXISTS notes (
    tenant_id uuid NOT NULL DEFAULT app.current_tenant_id(),
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id));
CALL app.distribute_tenant_table('notes');
ALTER TABLE notes DROP CONSTRAINT IF EXISTS notes_tenant_id_fkey;
ALTER TABLE notes ADD CONSTRAINT notes_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES tenants (id);
CREATE INDEX IF NOT EXISTS idx_notes_tenant_created ON notes (tenant_id, created_at DESC);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
ALTER TABLE notes FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON notes;
CREATE POLICY tenant_isolation ON notes USING (tenant_id = app.current_tenant_id())
    WITH CHECK (tenant_id = app.current_tenant_id());
CREATE OR REPLACE TRIGGER notes_touch_updated_at BEFORE UPDATE ON notes
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();
""")
    later = migrate.discover() + migrate.discover(tmp_path)
    assert [m.version for m in asyncio.run(migrate.migrate(distributed, migrations=later))] == ["900"]
    with psycopg.connect(distributed) as conn:
        assert conn.execute(
            "SELECT citus_table_type, distribution_column FROM citus_tables WHERE table_name = 'notes'::regclass"
        ).fetchone() == ("distributed", "tenant_id")


def _task_count(conn: psycopg.Connection, query: str, params: tuple) -> int:
    plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {query}", params))
    m = re.search(r"Task Count: (\d+)", plan)
    assert m, plan
    return int(m.group(1))


def test_the_api_works_and_a_request_reaches_one_shard(distributed: str) -> None:
    async def flows() -> dict[str, Any]:
        async with app_client(distributed) as (client, admin_url, settings):
            world = await build_world(client, admin_url, settings)
            a = world.a.auth("owner")
            out: dict[str, Any] = {"world": world}
            r = await client.post("/api/v1/projects", json={"name": "Cabinet"}, headers=a)
            assert r.status_code == 201, r.text
            out["project"] = r.json()["id"]
            for path in (
                "/api/v1/projects",
                f"/api/v1/projects/{out['project']}",
                "/api/v1/members",
                "/api/v1/tenant",
                "/api/v1/api-keys",
                "/api/v1/billing-account",
                "/api/v1/credits",
                "/api/v1/audit-events",
                "/api/v1/me",
            ):
                r = await client.get(path, headers=a)
                assert r.status_code == 200, (path, r.text)
            members = (await client.get("/api/v1/members", headers=a)).json()
            assert len(members) == 5, members  # owner, admin, member, viewer, and the user of both tenants
            viewer = world.a.user_ids["viewer"]
            r = await client.patch(f"/api/v1/members/{viewer}", json={"role": "member"}, headers=a)
            assert r.status_code == 200 and r.json()["role"] == "member", r.text
            r = await client.post(
                "/api/v1/knowledge-base", json={"title": "Statuts", "content": "Le bail commercial."}, headers=a
            )
            assert r.status_code == 201, r.text
            r = await client.post(
                "/api/v1/usage-events",
                json={
                    "events": [
                        {"event_type": "tokens", "quantity": 3, "idempotency_key": "k1"},
                        {"event_type": "tokens", "quantity": 4, "idempotency_key": "k2"},
                    ]
                },
                headers=world.a.key("write"),
            )
            assert r.status_code in (200, 201), r.text
            r = await client.post("/api/v1/pme-analyses", json={"company_name": "Atlas SA"}, headers=a)
            assert r.status_code == 201, r.text
            keys = (await client.get("/api/v1/api-keys", headers=a)).json()
            r = await client.delete(f"/api/v1/api-keys/{keys[0]['id']}", headers=a)
            assert r.status_code == 204, r.text
            r = await client.get("/api/v1/audit-events", headers=a)
            actions = {e["action"] for e in r.json()["items"]}
            assert {"member.added", "member.role_changed", "api_key.created", "api_key.revoked"} <= actions, actions
            # Nothing of B.
            r = await client.get(f"/api/v1/projects/{out['project']}", headers=world.b.auth("owner"))
            assert r.status_code == 404
            async with operator_transaction(admin_url) as tx:
                from iafactory.tenancy import service

                granted = await service.grant_monthly(tx)
            assert {world.a.id, world.b.id} <= {g["tenant_id"] for g in granted}
            return out

    out = asyncio.run(flows())
    world = out["world"]
    app_url = server.app_conninfo(settings_for(distributed), distributed)
    with psycopg.connect(app_url) as conn:
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (str(world.a.id),))
        assert (
            _task_count(
                conn, "SELECT * FROM projects WHERE tenant_id = %s ORDER BY created_at DESC LIMIT 50", (world.a.id,)
            )
            == 1
        )
        assert (
            _task_count(conn, "SELECT * FROM projects WHERE tenant_id = %s AND id = %s", (world.a.id, out["project"]))
            == 1
        )
        # The policy alone would reach every shard: the explicit filter is what routes.
        assert _task_count(conn, "SELECT * FROM projects", ()) > 1


def test_every_route_and_the_operator_commands_work_distributed(distributed: str, tmp_path: Any) -> None:
    """The route-by-route drive of test_distribution_statements, then export, erase and import."""
    from api_support import provision_for_load
    from iafactory.db import bootstrap
    from iafactory.knowledge import worker
    from iafactory.knowledge.embeddings import embedder
    from iafactory.tenancy import portability
    from test_distribution_statements import _drive

    async def run() -> tuple[list[tuple[str, int]], int, dict[str, int]]:
        async with app_client(distributed, embedding_provider="none") as (client, admin_url, settings):
            world = await build_world(client, admin_url, settings)
            await provision_for_load(admin_url, world)
            db = bootstrap.database(settings, admin_url)
            async with db:
                calls, indexed = await _drive(client, world, lambda: worker.drain(db, embedder(settings)))
            archive = tmp_path / "a.tar.gz"
            manifest = await portability.export_tenant(admin_url, world.a.slug, archive)
            await portability.erase_tenant(admin_url, world.a.slug, world.a.slug)
            imported = await portability.import_tenant(admin_url, archive)
            assert imported == {t: m["rows"] for t, m in manifest["tables"].items()}
            return calls, indexed, imported

    calls, indexed, imported = asyncio.run(run())
    failed = [(label, status) for label, status in calls if status >= 500 or status == 429]
    assert not failed, failed
    assert sum(200 <= status < 300 for _, status in calls) >= 50, calls
    assert indexed >= 1
    # The drive deleted its records at the end; the tenant still has members, keys, ledger, audit log.
    assert imported["tenant_users"] >= 4 and imported["audit_events"] >= 10 and imported["credit_transactions"] >= 1


def test_the_gate_reaches_one_shard_and_a_new_document_wakes_the_workers(distributed: str) -> None:
    """app.authorize() (every request) sends its queries to one shard group; a document created
    through the API NOTIFYs the coordinator, where workers LISTEN."""

    async def make() -> Any:
        async with app_client(distributed) as (client, admin_url, settings):
            world = await build_world(client, admin_url, settings)
            with psycopg.connect(distributed, autocommit=True) as listener:
                listener.execute("LISTEN iafactory_knowledge_jobs")
                r = await client.post(
                    "/api/v1/knowledge-base",
                    json={"title": "Réveil", "content": "Le worker."},
                    headers=world.a.auth("member"),
                )
                assert r.status_code == 201, r.text
                heard = [n.channel for n in listener.notifies(timeout=5, stop_after=1)]
            return world, heard

    world, heard = asyncio.run(make())
    assert heard == ["iafactory_knowledge_jobs"]
    app_url = server.app_conninfo(settings_for(distributed), distributed)
    remote: list[str] = []
    with psycopg.connect(app_url) as conn:
        conn.add_notice_handler(lambda d: remote.append(d.message_primary or ""))
        conn.execute("SET LOCAL citus.log_remote_commands = on")
        conn.execute("SET LOCAL client_min_messages = log")
        conn.execute(sql.SQL("SET LOCAL app.tenant_id = {}").format(sql.Literal(str(world.a.id))))
        conn.execute(sql.SQL("SET LOCAL app.user_id = {}").format(sql.Literal(str(world.a.user_ids["member"]))))
        conn.execute("SELECT app.authorize('member', true)")
    shards = {int(s) for line in remote for s in re.findall(r"_(\d{6,})\b", line)}
    with psycopg.connect(distributed) as conn:
        groups = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT shardminvalue FROM pg_dist_shard WHERE shardid = ANY (%s) AND shardminvalue IS NOT NULL",
                (list(shards),),
            )
        }  # reference tables' one shard has no range
    assert remote and len(groups) == 1, remote


def test_a_distributed_cell_refuses_a_tenant_of_a_region_it_does_not_serve(distributed: str) -> None:
    """cell_regions is a reference table; the trigger on tenants runs on the shards and reads it."""

    from iafactory.cells import service as cell_service
    from iafactory.cells.config import REGIONS, Cell
    from iafactory.db.scope import admin_connect

    async def record(regions: tuple[str, ...]) -> None:
        async with await admin_connect(distributed) as conn:
            await conn.execute("SET citus.multi_shard_modify_mode = 'sequential'")
            await cell_service.record_regions(conn, Cell("test", distributed, None, regions))

    with psycopg.connect(distributed, autocommit=True) as conn:
        held = {r for (r,) in conn.execute("SELECT DISTINCT region FROM tenants")}
    asyncio.run(record(tuple(r for r in REGIONS if r in held or r != "FR")))
    try:
        with psycopg.connect(distributed, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.CheckViolation, match="region FR is not served by this cell"):
                conn.execute(
                    "SELECT * FROM platform.tenant_create('Étude Paris', 'etude-paris-citus', 'FR', 'free', 'trial',"
                    " NULL, NULL, NULL, NULL, NULL)"
                )
            assert conn.execute("SELECT count(*) FROM tenants WHERE slug = 'etude-paris-citus'").fetchone()[0] == 0
    finally:
        asyncio.run(record(REGIONS))
