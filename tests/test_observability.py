"""Observability in process: the JSON access log and its context, /metrics (labels, who may read
it, login failures, the job queue), and tracing with an in-memory exporter. The same things with
the real `iafactory serve --workers 2` are in tests/test_serve_observability.py."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api_support import ApiWorld, build_world, fast_settings
from iafactory.app import create_app
from iafactory.auth.dependencies import Viewer
from iafactory.config import Settings
from iafactory.db import bootstrap
from iafactory.observability import logs, metrics, tracing

pytestmark = pytest.mark.anyio
TOKEN = "metrics-token-for-tests-0123456789"


class LogLines:
    """What the app logged, formatted as `serve` formats it (JSON), parsed back line by line."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter([json.loads(line) for line in self.stream.getvalue().splitlines()])


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("iafactory")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield LogLines(stream)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def access(lines: LogLines, request_id: str) -> list[dict[str, Any]]:
    return [e for e in lines if e["logger"] == "iafactory.access" and e.get("request_id") == request_id]


def samples(body: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(body: str, name: str, **labels: str) -> float:
    return samples(body, name).get(tuple(sorted(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


# --- access log -------------------------------------------------------------------------------------
async def test_one_json_access_line_per_request_with_tenant_caller_and_route_template(
    api_world: ApiWorld, log_lines: LogLines
) -> None:
    c, a = api_world.client, api_world.a
    r = await c.post("/api/v1/projects", json={"name": "Suivi"}, headers=a.auth("member"))
    project = r.json()["id"]
    r = await c.get(f"/api/v1/projects/{project}", headers={**a.auth("viewer"), "X-Request-Id": "req-user-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-user-1"
    r = await c.get(f"/api/v1/projects/{project}", headers={**a.key("read"), "X-Request-Id": "req-key-1"})
    assert r.status_code == 200

    [line] = access(log_lines, "req-user-1")
    assert line["tenant_id"] == str(a.id) and line["user_id"] == a.user_ids["viewer"]
    assert "api_key_id" not in line
    assert line["route"] == "/api/v1/projects/{item_id}"
    assert (line["method"], line["status"], line["plan"]) == ("GET", 200, "pro")
    assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
    assert line["client_ip"] == "127.0.0.1"
    assert line["level"] == "info" and line["ts"].endswith("Z")

    [by_key] = access(log_lines, "req-key-1")
    assert by_key["tenant_id"] == str(a.id) and "user_id" not in by_key
    assert by_key["api_key_id"]  # the key's id, never the key


async def test_refusals_and_unknown_paths_are_logged_with_bounded_routes(
    api_world: ApiWorld, log_lines: LogLines
) -> None:
    c = api_world.client
    r = await c.get("/api/v1/projects", headers={"X-Request-Id": "no-credential"})
    assert r.status_code == 401
    r = await c.get("/no/such/path/12345", headers={"X-Request-Id": "unknown-path"})
    assert r.status_code == 404
    r = await c.post(
        "/api/v1/projects",
        content=b"x" * (api_world.settings.max_body_bytes + 1),
        headers={**api_world.a.auth(), "content-type": "application/json", "X-Request-Id": "too-big"},
    )
    assert r.status_code == 413
    [refused] = access(log_lines, "no-credential")
    assert (refused["route"], refused["status"], refused["plan"]) == ("/api/v1/projects", 401, "none")
    [unknown] = access(log_lines, "unknown-path")
    assert (unknown["route"], unknown["status"]) == ("unmatched", 404)
    [big] = access(log_lines, "too-big")
    assert big["status"] == 413


async def test_an_unexpected_error_is_logged_with_its_request_and_tenant(migrated_db: str, log_lines: LogLines) -> None:
    """The 500 handler runs outside the middleware: its line still names the request and tenant."""
    settings = fast_settings(migrated_db)
    async with bootstrap.database(settings, migrated_db) as db:
        app = create_app(settings, db)

        @app.get("/api/v1/explode")
        async def explode(s: Viewer) -> None:  # a handler with a bug
            raise RuntimeError("bug in a handler")

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            world = await build_world(client, migrated_db, settings)
            r = await client.get("/api/v1/explode", headers={**world.a.auth(), "X-Request-Id": "boom-1"})
    assert r.status_code == 500
    [line] = access(log_lines, "boom-1")
    assert (line["status"], line["route"], line["tenant_id"]) == (500, "/api/v1/explode", str(world.a.id))
    [error] = [e for e in log_lines if e["logger"] == "iafactory.http" and e.get("request_id") == "boom-1"]
    assert error["level"] == "error" and error["tenant_id"] == str(world.a.id)
    assert "RuntimeError: bug in a handler" in error["exception"]


async def test_the_indexing_worker_logs_each_job_with_its_tenant(migrated_db: str, log_lines: LogLines) -> None:
    from iafactory.knowledge import worker
    from iafactory.knowledge.embeddings import embedder

    settings = fast_settings(migrated_db, embedding_provider="none")
    async with bootstrap.database(settings, migrated_db) as db:
        transport = httpx.ASGITransport(app=create_app(settings, db))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            world = await build_world(client, migrated_db, settings)
            for tenant in (world.a, world.b):
                r = await client.post(
                    "/api/v1/knowledge-base", json={"title": "t", "content": "un texte"}, headers=tenant.auth("member")
                )
                assert r.status_code == 201, r.text
        assert await worker.drain(db, embedder(settings)) == 2
    done = [e for e in log_lines if e["logger"] == "iafactory.worker" and e["message"].startswith("indexed")]
    assert sorted(e["tenant_id"] for e in done) == sorted([str(world.a.id), str(world.b.id)])
    assert all(isinstance(e["job_id"], int) and "request_id" not in e for e in done)


def test_text_format_for_people_keeps_the_fields() -> None:
    record = logging.LogRecord("iafactory.access", logging.INFO, __file__, 1, "GET %s 200", ("/x",), None)
    record.fields = {"tenant_id": "t-1", "status": 200}
    assert logs.TextFormatter().format(record).endswith("GET /x 200 tenant_id=t-1 status=200")
    assert json.loads(logs.JsonFormatter().format(record))["tenant_id"] == "t-1"


def test_log_settings_are_checked() -> None:
    assert Settings(log_format="TEXT", log_level="debug").log_level == "DEBUG"
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")
    with pytest.raises(ValueError, match="metrics_token"):
        Settings(metrics_token="short")


# --- /metrics ------------------------------------------------------------------------------------------
async def test_metrics_count_requests_by_route_template_and_plan_never_by_tenant(api_world: ApiWorld) -> None:
    c, a = api_world.client, api_world.a
    r = await c.post("/api/v1/projects", json={"name": "Compteur"}, headers=a.auth("member"))
    project = r.json()["id"]
    labels = {"route": "/api/v1/projects/{item_id}", "method": "GET", "status": "2xx", "plan": "pro"}
    before = value(await scrape(c), "iafactory_http_requests_total", **labels)
    for _ in range(3):
        assert (await c.get(f"/api/v1/projects/{project}", headers=a.auth("viewer"))).status_code == 200
    await c.get(f"/api/v1/projects/{project + 999}", headers=a.auth("viewer"))  # 404: another status class
    body = await scrape(c)
    assert value(body, "iafactory_http_requests_total", **labels) == before + 3
    assert value(body, "iafactory_http_requests_total", **{**labels, "status": "4xx"}) >= 1
    assert value(body, "iafactory_http_request_duration_seconds_count", **labels) >= 3
    for tenant in (a, api_world.b):
        assert str(tenant.id) not in body and tenant.slug not in body
    label_names = {k for series in samples(body, "iafactory_http_requests_total") for k, _ in series}
    assert label_names == {"route", "method", "status", "plan"}
    for name in (
        "iafactory_db_pool_size",
        "iafactory_db_pool_available",
        "iafactory_db_pool_requests_waiting",
        "iafactory_db_pool_max_size",
        "iafactory_admission_queue_length",
        "iafactory_requests_shed_total",
    ):
        assert name in samples_names(body), name
    assert value(body, "iafactory_db_pool_max_size") == api_world.settings.pool_max_size


def samples_names(body: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(body) for s in f.samples}


async def test_login_failures_are_counted_by_reason(api_world: ApiWorld) -> None:
    c = api_world.client
    before = value(await scrape(c), "iafactory_login_failures_total", reason="bad_credentials")
    for email in ("nobody@example.ch", "nobody-else@example.ch"):
        r = await c.post("/api/v1/auth/login", json={"email": email, "password": "wrong-password-1"})
        assert r.status_code == 401
    assert value(await scrape(c), "iafactory_login_failures_total", reason="bad_credentials") == before + 2


async def test_job_queue_depth_and_age_across_tenants(api_world: ApiWorld) -> None:
    c = api_world.client
    body = await scrape(c)
    assert value(body, "iafactory_knowledge_jobs_pending") == 0
    assert value(body, "iafactory_knowledge_jobs_oldest_pending_age_seconds") == 0
    for tenant, n in ((api_world.a, 2), (api_world.b, 1)):
        for i in range(n):
            r = await c.post(
                "/api/v1/knowledge-base",
                json={"title": f"doc {i}", "content": "du texte"},
                headers=tenant.auth("member"),
            )
            assert r.status_code == 201, r.text
    body = await scrape(c)
    # Nobody indexes here (the test owns the pool: no in-process worker): both tenants' jobs wait.
    assert value(body, "iafactory_knowledge_jobs_pending") == 3
    assert value(body, "iafactory_knowledge_jobs_runnable") == 3
    assert value(body, "iafactory_knowledge_jobs_oldest_pending_age_seconds") >= 0


async def test_the_job_figures_come_from_a_narrow_definer_function(migrated_db: str) -> None:
    import psycopg

    with psycopg.connect(migrated_db) as conn:
        secdef, config, public = conn.execute(
            """SELECT p.prosecdef, p.proconfig, has_function_privilege('public', p.oid, 'EXECUTE')
               FROM pg_proc p WHERE p.oid = 'app.knowledge_job_stats'::regproc"""
        ).fetchone()
        assert secdef and 'search_path=""' in config and not public
        assert conn.execute(
            "SELECT has_function_privilege('iaf_app', 'app.knowledge_job_stats()', 'EXECUTE')"
        ).fetchone()[0]


async def test_admission_placeholders_reach_the_scrape(api_world: ApiWorld) -> None:
    c = api_world.client
    shed = value(await scrape(c), "iafactory_requests_shed_total")
    metrics.set_admission_queue_length(7)
    metrics.count_shed(2)
    try:
        body = await scrape(c)
        assert value(body, "iafactory_admission_queue_length") == 7
        assert value(body, "iafactory_requests_shed_total") == shed + 2
    finally:
        metrics.set_admission_queue_length(0)


async def test_plan_labels_one_lookup_per_tenant_then_cached(api_world: ApiWorld) -> None:
    import asyncio
    import uuid

    from iafactory.db.scope import operator_transaction
    from iafactory.tenancy import service

    class CountingDatabase:
        """The real database; counts the scopes opened through it."""

        def __init__(self, db: Any) -> None:
            self.db, self.opened = db, 0

        def anonymous(self, **kwargs: Any) -> Any:
            self.opened += 1
            return self.db.anonymous(**kwargs)

    settings = api_world.settings
    async with bootstrap.database(settings, api_world.admin_url) as real:
        db = CountingDatabase(real)
        labels = metrics.PlanLabels()
        tenant = api_world.a.id
        assert await labels.plan(db, tenant, lookup=False) == "unknown"  # nothing cached, no lookup allowed
        assert await asyncio.gather(*(labels.plan(db, tenant) for _ in range(20))) == ["pro"] * 20
        assert db.opened == 1  # concurrent misses share one lookup
        async with operator_transaction(api_world.admin_url) as tx:
            await service.update_tenant(tx, tenant, plan="enterprise")
        assert await labels.plan(db, tenant) == "pro" and db.opened == 1  # cached for a minute
        labels._cache[str(tenant)] = (0.0, "pro")  # as if the minute had passed
        assert await labels.plan(db, tenant) == "enterprise" and db.opened == 2
        assert await labels.plan(db, uuid.uuid4()) == "unknown"  # no such tenant
        assert await labels.plan(db, None) == "none"


@pytest.fixture
async def remote_client(migrated_db: str) -> AsyncIterator[Any]:
    """Clients of one app: from loopback, from a public address; with and without a metrics token."""

    async def make(token: str | None, client_addr: tuple[str, int]) -> httpx.AsyncClient:
        settings = fast_settings(migrated_db, metrics_token=token)
        app = create_app(settings, db)
        transport = httpx.ASGITransport(app=app, client=client_addr)
        c = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        clients.append(c)
        return c

    clients: list[httpx.AsyncClient] = []
    settings = fast_settings(migrated_db)
    async with bootstrap.database(settings, migrated_db) as db:
        yield make
        for c in clients:
            await c.aclose()


async def test_metrics_are_not_public(remote_client: Any) -> None:
    local = await remote_client(None, ("127.0.0.1", 50000))
    assert (await local.get("/metrics")).status_code == 200
    r = await local.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"})  # a proxy on this host
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    public = await remote_client(None, ("203.0.113.7", 50000))
    r = await public.get("/metrics")
    assert r.status_code == 403 and "IAFACTORY_METRICS_TOKEN" in r.json()["detail"]

    with_token = await remote_client(TOKEN, ("203.0.113.7", 50000))
    assert (await with_token.get("/metrics")).status_code == 401
    assert (await with_token.get("/metrics", headers={"Authorization": "Bearer wrong-token"})).status_code == 401
    r = await with_token.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and "iafactory_http_requests_total" in r.text
    # With a token, loopback is no exemption.
    local_with_token = await remote_client(TOKEN, ("127.0.0.1", 50000))
    assert (await local_with_token.get("/metrics")).status_code == 401
    assert "/metrics" not in (await local.get("/openapi.json")).json()["paths"]


# --- tracing -------------------------------------------------------------------------------------------
async def test_traces_carry_the_tenant_and_no_sql_literals(migrated_db: str) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    settings = fast_settings(migrated_db)
    db = bootstrap.database(settings, migrated_db)
    app = create_app(settings, db, span_exporter=exporter)  # instruments psycopg before the pool connects
    try:
        async with db:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                world = await build_world(client, migrated_db, settings)
                exporter.clear()
                r = await client.post(
                    "/api/v1/projects",
                    json={"name": "Projet très confidentiel"},
                    headers={**world.a.auth("member"), "X-Request-Id": "traced-1"},
                )
                assert r.status_code == 201
    finally:
        app.state.tracing.shutdown()
    spans = exporter.get_finished_spans()
    [server] = [s for s in spans if s.attributes.get("iafactory.request_id") == "traced-1"]
    assert server.attributes["iafactory.tenant_id"] == str(world.a.id)
    assert server.attributes["http.route"] == "/api/v1/projects"
    statements = [s.attributes.get("db.statement") or s.attributes.get("db.query.text") for s in spans]
    statements = [st for st in statements if st]
    assert statements, "no database span: psycopg is not instrumented"
    assert all(
        s.context.trace_id == server.context.trace_id
        for s in spans
        if (s.attributes.get("db.statement") or s.attributes.get("db.query.text"))
    )
    joined = "\n".join(statements)
    assert "INSERT INTO" in joined and "'?'" in joined
    assert "confidentiel" not in joined and str(world.a.id) not in joined


def test_redaction_keeps_the_shape_and_drops_every_literal() -> None:
    sql = "SET LOCAL app.tenant_id = '7c9e'; EXECUTE iaf_3('it''s', E'back\\\\slash', 42, NULL)"
    assert tracing.redact_sql(sql) == "SET LOCAL app.tenant_id = '?'; EXECUTE iaf_3('?', E'?', 42, NULL)"


def test_tracing_without_the_packages_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.psycopg", None)  # as if not installed
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    settings = Settings(database_url="postgresql://unused@127.0.0.1:1/unused")
    assert settings.otlp_endpoint == "http://127.0.0.1:4318"
    with pytest.raises(RuntimeError, match=r"pip install 'iafactory\[otel\]'"):
        create_app(settings)


def test_nothing_of_tracing_is_loaded_without_an_endpoint() -> None:
    """(FastAPI itself imports the OpenTelemetry *API* when it is installed; the SDK, the exporters
    and the instrumentations are ours to load, and stay out.)"""
    import subprocess

    code = (
        "import sys; from iafactory.app import create_app; from iafactory.config import Settings; "
        "create_app(Settings(database_url='postgresql://u@127.0.0.1:1/x')); "
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter', "
        "'opentelemetry.instrumentation', 'iafactory.observability.tracing'))))"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("OTEL_", "IAFACTORY_OTLP"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
