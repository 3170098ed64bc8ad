"""The interactive docs, as a new user meets them: a real browser on the real service.

uvicorn serves the app on a free port of 127.0.0.1 (against a migrated test database); Debian's
Chromium, driven by Playwright, opens /docs, sees the operations, clicks Authorize, enters a token
obtained by signing in, runs GET /api/v1/me with "Try it out" -> "Execute" and sees its 200; then
/redoc renders. Every request the page makes to anything but this machine is blocked and
recorded: none may be attempted, so the docs need no CDN.

scripts/test.sh installs Chromium (apt) when it can. Without it this test fails under CI=true and
is skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from api_support import PASSWORD, fast_settings
from iafactory.app import create_app
from iafactory.auth.passwords import hash_password
from iafactory.db.scope import operator_transaction
from iafactory.tenancy import service
from iafactory.tenancy.schemas import TenantCreate

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): what a browser shows
# of /docs and /redoc; the database only signs the user in.
pytestmark = pytest.mark.server_independent

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
TIMEOUT_MS = 30_000


def require_chromium() -> None:
    if os.access(CHROMIUM, os.X_OK):
        return
    reason = (
        f"{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium package when it runs as root "
        f"with apt-get; otherwise run 'apt-get install chromium'"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class _Server(uvicorn.Server):
    """uvicorn that says when it is listening (no polling)."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


@pytest.fixture(scope="module")
def live_server(module_db: str) -> Iterator[str]:
    """The real service on a free port of 127.0.0.1; its lifespan opens its own pool."""
    app = create_app(fast_settings(module_db))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    ready = threading.Event()
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on"), ready)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    if not ready.wait(timeout=60):
        server.should_exit = True
        pytest.fail("uvicorn did not start within 60 s")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def owner_token(module_db: str, live_server: str) -> str:
    """A tenant with one owner (made on the operator path), and the token its owner gets by
    signing in to the live service."""
    tag = uuid.uuid4().hex[:6]
    email = f"docs-owner-{tag}@example.ch"

    async def provision() -> None:
        pw_hash = await hash_password(fast_settings(module_db), PASSWORD)
        async with operator_transaction(module_db) as tx:
            t = await service.create_tenant(
                tx, TenantCreate(name="Docs tenant", slug=f"docs-{tag}", region="CH", plan="pro", status="active")
            )
            await service.add_member(tx, t.slug, email, "owner", name="Docs Owner", password_hash=pw_hash)

    asyncio.run(provision())
    r = httpx.post(f"{live_server}/api/v1/auth/login", json={"email": email, "password": PASSWORD}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["tenant"] is not None  # one tenant: selected at sign-in
    return r.json()["access_token"]


@pytest.fixture
def page(live_server: str) -> Iterator[tuple[Any, list[str]]]:
    """A Chromium page that may only reach this machine; `blocked` lists what it tried elsewhere."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []

    def only_local(route: Any) -> None:
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1600})
            context.route("**/*", only_local)
            pg = context.new_page()
            pg.set_default_timeout(TIMEOUT_MS)
            yield pg, blocked
        finally:
            browser.close()


def test_swagger_ui_lists_the_operations_and_runs_get_me_with_a_token(
    live_server: str, owner_token: str, page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    pg, blocked = page
    doc = httpx.get(f"{live_server}/openapi.json").json()
    operation_ids = sorted(op["operationId"] for item in doc["paths"].values() for op in item.values())
    pg.goto(f"{live_server}/docs")
    pg.locator("#operations-auth-get_me").wait_for()
    # Each operation once (block ids are "operations-<tag>-<operationId>").
    shown = pg.locator(".opblock").evaluate_all("blocks => blocks.map(b => b.id)")
    assert len(shown) == len(operation_ids)
    assert [oid for oid in operation_ids if not any(i.endswith(f"-{oid}") for i in shown)] == []
    assert pg.locator("#operations-auth-login").is_visible()

    # Authorize: the bearerAuth scheme of the document, with a token from signing in.
    pg.locator("button.authorize").first.click()
    bearer = pg.locator(".auth-container").filter(has_text="bearerAuth")
    bearer.locator("input").fill(owner_token)
    bearer.locator("button.authorize").click()
    assert bearer.get_by_text("Authorized").is_visible()
    pg.locator("button.btn-done").first.click()

    me = pg.locator("#operations-auth-get_me")
    me.locator(".opblock-summary").click()
    me.locator("button.try-out__btn").click()
    me.locator("button.execute").click()
    status = me.locator(".live-responses-table .response .response-col_status").first
    status.wait_for()
    assert status.inner_text().strip().startswith("200"), status.inner_text()
    body = me.locator(".live-responses-table .response-col_description pre").first.inner_text()
    assert '"role": "owner"' in body, body
    pg.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
    me.screenshot(path=str(tmp_path / "docs-get-me.png"))
    assert blocked == [], f"the docs page tried to load from outside: {blocked}"


def test_redoc_renders_the_document_offline(live_server: str, page: tuple[Any, list[str]], tmp_path: Path) -> None:
    pg, blocked = page
    pg.goto(f"{live_server}/redoc")
    pg.get_by_role("heading", name="IAFactory API").first.wait_for()
    pg.get_by_role("heading", name="Who am I: user, current tenant and role").wait_for()
    assert pg.locator("[data-section-id]").count() > 10
    pg.screenshot(path=str(tmp_path / "redoc.png"))
    assert blocked == [], f"the ReDoc page tried to load from outside: {blocked}"
