"""The web console in a real browser: Debian's Chromium, driven by Playwright, on the real service.

uvicorn serves the app on a free port of 127.0.0.1 (public URL = that address, so the invitation
email's link opens this server); an SMTP server runs in a thread of the test process, and the
outbox is delivered to it on demand (sender.drain). A person who owns one tenant and administers
another signs in, chooses a tenant, invites a colleague (who accepts from the email's link in a
browser of their own), creates and revokes an API key, switches tenants, reads the console in
Arabic (right to left) and reaches the main form with the keyboard. Every request the pages make
to anything but this machine is blocked and recorded: none may be attempted.

Screenshots of the main pages are saved under the run's temporary directory; their paths are
printed (pytest -s shows them).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from aiosmtpd.smtp import SMTP

from api_support import PASSWORD, fast_settings
from conftest import settings_for
from iafactory.app import create_app
from iafactory.auth.passwords import hash_password
from iafactory.db import bootstrap
from iafactory.db.scope import operator_transaction
from iafactory.notifications import sender
from iafactory.tenancy import service
from iafactory.tenancy.schemas import TenantCreate
from test_docs_browser import CHROMIUM, CHROMIUM_ARGS, LOCAL_HOSTS, TIMEOUT_MS, _Server, require_chromium
from test_outbox import Inbox, smtp_mailer

pytestmark = pytest.mark.server_independent

_LINK = re.compile(r"(http://127\.0\.0\.1:\d+/accept-invitation\?token=inv_[A-Za-z0-9_-]+)")


@pytest.fixture(scope="module")
def smtp_thread() -> Iterator[tuple[Inbox, int]]:
    """An SMTP server on its own event loop in a thread (the browser tests are synchronous)."""
    inbox = Inbox()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    found: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            loop.create_server(
                lambda: SMTP(inbox, hostname="smtp.test", loop=loop, auth_require_tls=False), "127.0.0.1", 0
            )
        )
        found["port"], found["server"] = server.sockets[0].getsockname()[1], server
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(timeout=30), "the SMTP server did not start"
    yield inbox, found["port"]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def console_server(module_db: str) -> Iterator[str]:
    """The real service on a free port, its public URL that port (the emails' links open here)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(fast_settings(module_db, public_url=base, run_worker=False))
    ready = threading.Event()
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on"), ready)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    if not ready.wait(timeout=60):
        server.should_exit = True
        pytest.fail("uvicorn did not start within 60 s")
    yield base
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def people(module_db: str, console_server: str) -> dict[str, Any]:
    """Two tenants (Algiers and Geneva); a consultant who owns the first and administers the
    second; some usage this month for the chart."""
    tag = uuid.uuid4().hex[:6]
    consultant = f"consultant-{tag}@example.ch"
    names = {"dz": "École Ibn Khaldoun", "ch": "Cabinet du Lac"}

    async def provision() -> dict[str, Any]:
        pw_hash = await hash_password(fast_settings(module_db), PASSWORD)
        out: dict[str, Any] = {"email": consultant, "names": names, "slugs": {}}
        async with operator_transaction(module_db) as tx:
            for key, region, role in (("dz", "DZ", "owner"), ("ch", "CH", "admin")):
                slug = f"{key}-{tag}"
                t = await service.create_tenant(
                    tx, TenantCreate(name=names[key], slug=slug, region=region, plan="pro", status="active")
                )
                await tx.fetch("SELECT * FROM platform.grant_credits(%s, 25000, 'welcome', %s)", (t.id, slug))
                await service.add_member(tx, slug, consultant, role, name="Amina Consultant", password_hash=pw_hash)
                out["slugs"][key] = slug
        return out

    out = in_thread(provision)
    r = httpx.post(f"{console_server}/api/v1/auth/login", json={"email": consultant, "password": PASSWORD})
    token = httpx.post(
        f"{console_server}/api/v1/auth/select-tenant",
        json={"tenant": out["slugs"]["dz"]},
        headers={"Authorization": f"Bearer {r.json()['access_token']}"},
    ).json()["access_token"]
    events = [{"event_type": "llm.tokens", "quantity": 10, "idempotency_key": f"e{i}"} for i in range(5)]
    r = httpx.post(
        f"{console_server}/api/v1/usage-events", json={"events": events}, headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 200, r.text
    return out


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-screenshots")


def in_thread(work: Any) -> Any:
    """Run a coroutine function to completion on a thread of its own: Playwright's synchronous API
    keeps an event loop running in the test's thread, where asyncio.run refuses to start."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(work())).result()


@pytest.fixture(scope="module")
def browser(people: dict[str, Any]) -> Iterator[Any]:
    """Started after the database and the people exist (their setup runs asyncio.run)."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """A browser context of its own (its own cookies), limited to this machine."""

    def __init__(self, browser: Any, base: str, **options: Any) -> None:
        self.blocked: list[str] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 1000}, **options)
        self.context.route("**/*", self._only_local)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("dialog", lambda dialog: dialog.accept())  # the confirmations of console.js
        self.base = base

    def _only_local(self, route: Any) -> None:
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def goto(self, path: str) -> Any:
        return self.page.goto(self.base + path)

    def shot(self, folder: Path, name: str) -> None:
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")

    def close(self) -> None:
        assert self.blocked == [], f"the console tried to load from outside: {self.blocked}"
        self.context.close()


@pytest.fixture
def tab(browser: Any, console_server: str) -> Iterator[Tab]:
    t = Tab(browser, console_server, locale="en-GB")
    yield t
    t.close()


def sign_in(t: Tab, email: str, tenant_name: str | None = None) -> None:
    t.goto("/console/")
    t.page.get_by_label("Email").fill(email)
    t.page.get_by_label("Password").fill(PASSWORD)
    t.page.get_by_role("button", name="Sign in").click()
    if tenant_name is not None:
        t.page.get_by_role("heading", name="Your tenants").wait_for()
        t.page.get_by_label(tenant_name).check()
        t.page.get_by_role("button", name="Open").click()
        t.page.get_by_role("heading", name="Overview").wait_for()


def deliver(module_db: str, port: int) -> None:
    async def run() -> None:
        async with bootstrap.database(settings_for(module_db), module_db) as db:
            await sender.drain(db, smtp_mailer(module_db, port))

    in_thread(run)


def test_sign_in_choose_a_tenant_and_read_the_overview(tab: Tab, people: dict[str, Any], shots: Path) -> None:
    sign_in(tab, people["email"], people["names"]["dz"])
    main = tab.page.locator("main")
    assert people["names"]["dz"] in main.inner_text()
    for label in ("Plan", "Region", "Where the data lives", "Credits"):
        assert main.get_by_text(label, exact=True).count() >= 1, label
    assert "25,000" in main.inner_text()  # the credits, in the en-GB locale
    meters = tab.page.locator("[role=meter]").all()  # one bar per plan limit, each named by its label
    names = [tab.page.locator("#" + str(m.get_attribute("aria-labelledby"))).inner_text() for m in meters]
    assert names == [
        "Members",
        "Active API keys",
        "Knowledge base",
        "Largest file (kept / allowed)",
        "Credits spent this month",
    ]
    assert tab.page.locator("svg.chart rect:not(.base)").count() >= 28
    tab.shot(shots, "overview")


def test_invite_a_member_who_accepts_from_the_email(
    browser: Any,
    tab: Tab,
    people: dict[str, Any],
    console_server: str,
    smtp_thread: tuple[Inbox, int],
    module_db: str,
    shots: Path,
) -> None:
    inbox, port = smtp_thread
    invitee = f"colleague-{uuid.uuid4().hex[:6]}@example.ch"
    sign_in(tab, people["email"], people["names"]["dz"])
    tab.page.get_by_role("link", name="Members").click()
    tab.page.get_by_label("Email").fill(invitee)
    tab.page.get_by_label("Role", exact=True).select_option("member")
    tab.page.get_by_role("button", name="Send the invitation").click()
    assert "Invitation sent." in tab.page.get_by_role("status").inner_text()
    assert invitee in tab.page.locator("main table").last.inner_text()
    tab.shot(shots, "members")

    deliver(module_db, port)
    mail = next(m for rcpts, m in reversed(inbox.received) if invitee in rcpts)
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    link = _LINK.search(text)
    assert link, text

    other = Tab(browser, console_server, locale="en-GB")
    try:
        other.page.goto(link.group(1))
        other.page.get_by_role("heading", name="Accept an invitation").wait_for()
        other.page.get_by_label("Name").fill("Karim Collègue")
        other.page.get_by_label("Choose a password").fill("a long and new password")
        other.page.get_by_role("button", name="Accept and create my account").click()
        assert "you have joined" in other.page.get_by_role("status").inner_text()
        assert people["names"]["dz"] in other.page.locator("main").inner_text()
        other.shot(shots, "invitation-accepted")
        # A member: no admin forms.
        other.page.get_by_role("link", name="Members").click()
        assert other.page.locator("#invite-form").count() == 0
    finally:
        other.close()
    tab.page.reload()
    assert "Accepted" in tab.page.locator("main").inner_text()


def test_create_an_api_key_then_revoke_it(tab: Tab, people: dict[str, Any], console_server: str, shots: Path) -> None:
    sign_in(tab, people["email"], people["names"]["dz"])
    tab.page.get_by_role("link", name="API keys").click()
    tab.page.get_by_label("Name").fill("Accounting export")
    tab.page.get_by_label("Access").select_option("write")
    tab.page.get_by_role("button", name="Create the key").click()
    secret = tab.page.get_by_label("Secret key").input_value()
    assert secret.startswith("iaf_")
    assert httpx.get(f"{console_server}/api/v1/tenant", headers={"X-API-Key": secret}).status_code == 200
    tab.shot(shots, "api-key-created")
    tab.page.get_by_role("button", name="Revoke Accounting export").click()
    assert "Revoked." in tab.page.get_by_role("status").inner_text()
    assert "Revoked on" in tab.page.locator("main table").inner_text()
    assert httpx.get(f"{console_server}/api/v1/tenant", headers={"X-API-Key": secret}).status_code == 401
    tab.shot(shots, "api-keys")


def test_switch_tenants_from_the_header(tab: Tab, people: dict[str, Any], shots: Path) -> None:
    sign_in(tab, people["email"], people["names"]["dz"])
    tab.page.get_by_label("Tenant", exact=True).select_option(label=people["names"]["ch"])
    tab.page.get_by_role("button", name="Switch").click()
    tab.page.get_by_role("heading", name="Overview").wait_for()
    main = tab.page.locator("main").inner_text()
    assert people["names"]["ch"] in main and "Switzerland" in main and "Administrator" in main
    tab.page.get_by_role("link", name="Settings").click()
    assert tab.page.locator("#tenant-form").count() == 0  # an admin here, not the owner
    assert tab.page.locator("#billing-form").count() == 1
    tab.shot(shots, "settings")


def test_arabic_renders_right_to_left(tab: Tab, people: dict[str, Any], shots: Path) -> None:
    sign_in(tab, people["email"], people["names"]["dz"])
    tab.page.get_by_label("Language").select_option("ar")
    tab.page.get_by_role("button", name="Change").click()
    tab.page.wait_for_selector("html[lang=ar]")
    assert tab.page.evaluate("getComputedStyle(document.documentElement).direction") == "rtl"
    assert tab.page.evaluate("getComputedStyle(document.querySelector('main')).direction") == "rtl"
    assert "نظرة عامة" in tab.page.locator("h1").inner_text()
    # The header starts on the right: the brand is right of the language switcher.
    brand = tab.page.locator(".brand").bounding_box()
    switcher = tab.page.locator("form.language").bounding_box()
    assert brand is not None and switcher is not None and brand["x"] > switcher["x"]
    tab.shot(shots, "overview-ar")
    tab.page.get_by_label("اللغة").select_option("en")
    tab.page.get_by_role("button", name="تغيير").click()
    tab.page.wait_for_selector("html[lang=en]")


def test_the_keyboard_reaches_the_main_form(tab: Tab, people: dict[str, Any]) -> None:
    sign_in(tab, people["email"], people["names"]["dz"])
    tab.goto("/console/members")
    tab.page.keyboard.press("Tab")
    focused = tab.page.evaluate("document.activeElement.textContent")
    assert focused.strip() == "Skip to main content"
    tab.page.keyboard.press("Enter")
    assert tab.page.evaluate("document.activeElement.id") == "main"
    for _ in range(100):
        tab.page.keyboard.press("Tab")
        if tab.page.evaluate("document.activeElement.id") == "invite-email":
            break
    else:
        pytest.fail("Tab never reached the invitation form's email field")
    tab.page.keyboard.type("keyboard-user@example.ch")
    tab.page.keyboard.press("Tab")
    assert tab.page.evaluate("document.activeElement.id") == "invite-role"


def test_pages_read_without_javascript(browser: Any, console_server: str, people: dict[str, Any]) -> None:
    t = Tab(browser, console_server, locale="fr-FR", java_script_enabled=False)
    try:
        sign_in_fr = t.page
        t.goto("/console/")
        sign_in_fr.get_by_label("Adresse e-mail").fill(people["email"])
        sign_in_fr.get_by_label("Mot de passe").fill(PASSWORD)
        sign_in_fr.get_by_role("button", name="Se connecter").click()
        sign_in_fr.get_by_label(people["names"]["dz"]).check()
        sign_in_fr.get_by_role("button", name="Ouvrir").click()
        assert "25\u202f000" in sign_in_fr.locator("main").inner_text()  # French grouping
        for link, heading in (("Membres", "Membres et invitations"), ("Clés d’API", "Clés d’API")):
            sign_in_fr.get_by_role("link", name=link).click()
            sign_in_fr.get_by_role("heading", name=heading, exact=True).wait_for()
    finally:
        t.close()


# --- platform pages (console3) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform_admin(module_db: str, people: dict[str, Any]) -> str:
    """A platform administrator (no tenant of their own), made as `iafactory platform-admin` does."""
    email = f"platform-{uuid.uuid4().hex[:6]}@example.ch"

    async def provision() -> None:
        pw_hash = await hash_password(fast_settings(module_db), PASSWORD)
        async with operator_transaction(module_db) as tx:
            await tx.fetchval("SELECT app.register_user(%s, 'Nadia Platform', %s)", (email, pw_hash))
            await service.set_platform_admin(tx, email, True)

    in_thread(provision)
    return email


def test_the_platform_admin_lists_searches_and_creates_a_tenant(
    tab: Tab,
    people: dict[str, Any],
    platform_admin: str,
    smtp_thread: tuple[Inbox, int],
    module_db: str,
    shots: Path,
) -> None:
    inbox, port = smtp_thread
    sign_in(tab, platform_admin)
    tab.page.get_by_role("link", name="Platform").click()
    tab.page.get_by_role("heading", name="Tenants of the platform").wait_for()
    table = tab.page.locator("#tenant-table")
    for name in people["names"].values():
        assert name in table.inner_text(), name
    tab.shot(shots, "platform-tenants")

    tab.page.get_by_label("Search").fill(people["slugs"]["dz"])
    tab.page.locator("#filter-form").get_by_label("Plan").select_option("pro")
    tab.page.get_by_role("button", name="Show").click()
    tab.page.wait_for_url(re.compile(r"q=dz-"))
    rows = table.locator("tbody tr")
    assert rows.count() == 1 and people["names"]["dz"] in rows.inner_text() and "Algeria" in rows.inner_text()
    tab.shot(shots, "platform-search")

    slug = f"atelier-{uuid.uuid4().hex[:6]}"
    owner = f"owner-{slug}@example.ch"
    form = tab.page.locator("#tenant-form")
    form.get_by_label("Name").fill("Atelier de Tlemcen")
    form.get_by_label("Identifier").fill(slug)
    form.get_by_label("Region").select_option("DZ")
    form.get_by_label("Plan").select_option("pro")
    form.get_by_label("Admin email").fill(owner)
    form.get_by_role("button", name="Create the tenant").click()
    tab.page.get_by_role("heading", name="Atelier de Tlemcen").wait_for()
    assert "Its admin has been invited by email." in tab.page.get_by_role("status").inner_text()
    facts = tab.page.locator("dl.facts").inner_text()
    assert "Algeria" in facts and "Pro" in facts and owner in facts and "cell " in facts
    tab.page.get_by_label("Amount").fill("750")
    tab.page.get_by_label("Reason").fill("Welcome credits")
    tab.page.get_by_role("button", name="Grant the credits").click()
    assert "750 credits granted. Balance: 750." in tab.page.locator("#granted").inner_text()
    tab.shot(shots, "platform-tenant")

    deliver(module_db, port)
    mail = next(m for rcpts, m in reversed(inbox.received) if owner in rcpts)
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Atelier de Tlemcen" in text and _LINK.search(text), text

    tab.page.get_by_role("link", name="All tenants").click()
    tab.page.get_by_label("Search").fill(slug)
    tab.page.get_by_role("button", name="Show").click()
    tab.page.wait_for_url(re.compile(slug))
    assert "Atelier de Tlemcen" in table.inner_text()


def test_a_tenant_owner_cannot_open_the_platform_pages(tab: Tab, people: dict[str, Any]) -> None:
    sign_in(tab, people["email"], people["names"]["dz"])
    assert tab.page.get_by_role("link", name="Platform").count() == 0
    response = tab.goto("/console/platform/tenants")
    assert response is not None and response.status == 403
    assert "Platform administrators only." in tab.page.locator("main").inner_text()


# --- knowledge base, usage, credits, audit log, your data (console2) ---------------------------------


def index_waiting_documents(module_db: str) -> int:
    """What the indexing worker would do next (driven here, never waited for)."""
    from iafactory.knowledge import worker
    from iafactory.knowledge.embeddings import embedder

    async def run() -> int:
        settings = settings_for(module_db)
        async with bootstrap.database(settings, module_db) as db:
            return await worker.drain(db, embedder(settings))

    return int(in_thread(run))


def test_upload_a_document_and_find_it_by_search(
    tab: Tab, people: dict[str, Any], module_db: str, tmp_path: Path, shots: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    upload = tmp_path / f"reglement-{tag}.md"
    upload.write_text(
        f"# Règlement intérieur {tag}\n\n## Absences\n\nToute absence d'un élève est signalée au secrétariat "
        f"avant 9 h, par écrit ou par téléphone ({tag}).\n",
        encoding="utf-8",
    )
    sign_in(tab, people["email"], people["names"]["dz"])
    tab.page.get_by_role("link", name="Knowledge base").click()
    tab.page.get_by_label("File", exact=True).set_input_files(str(upload))
    tab.page.get_by_label("Title (optional: the file name otherwise)").fill(f"Règlement {tag}")
    tab.page.get_by_role("button", name="Upload").click()
    assert "File uploaded" in tab.page.get_by_role("status").inner_text()
    assert f"Règlement {tag}" in tab.page.locator("main table").inner_text()
    # A document typed in, too.
    tab.page.get_by_label("Title", exact=True).fill(f"Horaires {tag}")
    tab.page.get_by_label("Text", exact=True).fill(f"Le secrétariat {tag} est ouvert de 8 h à 16 h.")
    tab.page.get_by_role("button", name="Add the document").click()
    assert "Document added" in tab.page.get_by_role("status").inner_text()
    assert index_waiting_documents(module_db) >= 2
    tab.page.reload()
    assert tab.page.locator("main table").inner_text().count("Indexed") >= 2
    tab.page.get_by_label("Words or a question").fill(f"absence secrétariat {tag}")
    tab.page.get_by_label("Kind of search").select_option("keyword")
    tab.page.get_by_role("button", name="Search", exact=True).click()
    first = tab.page.locator("ol.passages li").first
    source = first.locator(".source").inner_text()
    assert f"Règlement {tag}" in source and "passage 1" in source and "relevance" in source
    assert "signalée au secrétariat" in first.locator("blockquote").inner_text()
    tab.shot(shots, "knowledge")


def test_usage_and_credits(tab: Tab, people: dict[str, Any], shots: Path) -> None:
    sign_in(tab, people["email"], people["names"]["dz"])
    tab.page.get_by_role("link", name="Usage").click()
    tab.page.get_by_role("heading", name="Usage", exact=True).wait_for()
    assert "llm.tokens" in tab.page.locator("#usage-by-type").inner_text()
    assert tab.page.locator("svg.chart rect:not(.base)").count() >= 28
    tab.page.get_by_text("The same figures as a table").click()  # the chart's figures, as a table
    assert tab.page.locator("#usage-by-day tbody tr").count() >= 1
    tab.shot(shots, "usage")
    tab.page.get_by_role("link", name="Previous month").click()
    assert "No usage recorded this month." in tab.page.locator("main").inner_text()
    tab.page.get_by_role("link", name="Credits").click()
    assert "25,000" in tab.page.locator("#credit-balance").inner_text()
    ledger = tab.page.locator("#ledger").inner_text()
    assert "welcome" in ledger and "Grant" in ledger and "+25,000" in ledger
    tab.shot(shots, "credits")


def test_audit_log_filter_and_csv_download(tab: Tab, people: dict[str, Any], shots: Path) -> None:
    import csv
    import io

    sign_in(tab, people["email"], people["names"]["dz"])
    tab.page.get_by_role("link", name="Audit log").click()
    tab.page.get_by_label("Action").fill("member.added")
    tab.page.get_by_role("button", name="Filter").click()
    rows = tab.page.locator("#audit-events tbody tr")
    assert rows.count() >= 1
    assert {rows.nth(i).locator("td").nth(1).inner_text() for i in range(rows.count())} == {"member.added"}
    tab.shot(shots, "audit")
    with tab.page.expect_download() as info:
        tab.page.get_by_role("link", name="Download as CSV (these filters)").click()
    download = info.value
    assert download.suggested_filename.startswith(f"audit-{people['slugs']['dz']}-")
    table = list(csv.reader(io.StringIO(Path(download.path()).read_text(encoding="utf-8-sig"))))
    assert table[0][:3] == ["created_at", "action", "actor"]
    assert len(table) - 1 == rows.count() and {r[1] for r in table[1:]} == {"member.added"}


def test_export_and_erasure_request(tab: Tab, people: dict[str, Any], shots: Path) -> None:
    import tarfile

    sign_in(tab, people["email"], people["names"]["dz"])
    tab.page.get_by_role("link", name="Your data").click()
    with tab.page.expect_download() as info:
        tab.page.get_by_role("link", name="Download the export").click()
    download = info.value
    assert download.suggested_filename.startswith(f"{people['slugs']['dz']}-export-")
    with tarfile.open(download.path(), "r:gz") as archive:
        names = archive.getnames()
    assert "manifest.json" in names and "tables/tenant_users.jsonl" in names
    tab.page.get_by_label("Reason (optional)").fill("Fin du contrat")
    tab.page.get_by_label(f"Type the tenant’s identifier ({people['slugs']['dz']}) to confirm").fill(
        people["slugs"]["dz"]
    )
    tab.page.get_by_role("button", name="Request the erasure").click()  # console.js asks first: accepted
    assert "Erasure requested" in tab.page.locator("p.notice").inner_text()
    assert "Waiting for the platform’s confirmation" in tab.page.locator("#erasure-requests").inner_text()
    tab.shot(shots, "data")
    tab.page.get_by_role("button", name="Cancel the request").click()
    assert "Erasure request cancelled." in tab.page.locator("p.notice").inner_text()
    assert "Cancelled" in tab.page.locator("#erasure-requests").inner_text()


def test_the_platform_admin_confirms_an_erasure_request(
    tab: Tab, browser: Any, console_server: str, people: dict[str, Any], platform_admin: str, shots: Path
) -> None:
    """The owner asks again (after the cancelled request above); the platform administrator opens
    the erasure requests from the platform menu, sees it, types the slug and confirms it."""
    slug, reason = people["slugs"]["dz"], "Fermeture de l’école"
    sign_in(tab, people["email"], people["names"]["dz"])
    tab.page.get_by_role("link", name="Your data").click()
    tab.page.get_by_label("Reason (optional)").fill(reason)
    tab.page.get_by_label(f"Type the tenant’s identifier ({slug}) to confirm").fill(slug)
    tab.page.get_by_role("button", name="Request the erasure").click()
    assert "Erasure requested" in tab.page.locator("p.notice").inner_text()

    admin = Tab(browser, console_server, locale="en-GB")
    try:
        sign_in(admin, platform_admin)
        admin.page.get_by_role("link", name="Erasure requests").click()
        admin.page.get_by_role("heading", name="Erasure requests").wait_for()
        row = admin.page.locator("#pending-erasures tbody tr", has_text=slug)
        text = row.inner_text()
        assert people["names"]["dz"] in text and reason in text and people["email"] in text and "Algeria" in text
        assert "--confirmed-request" in admin.page.locator("main").inner_text()
        admin.shot(shots, "platform-erasures")
        row.get_by_label(f"Type the tenant’s identifier ({slug}) to confirm").fill(slug)
        row.get_by_role("button", name="Confirm the erasure request").click()  # console.js asks first: accepted
        assert "Erasure request confirmed." in admin.page.locator("p.notice").inner_text()
        decided = admin.page.locator("#decided-erasures tbody tr", has_text=slug).first.inner_text()
        assert "Confirmed: an operator will erase the data" in decided
        assert admin.page.locator("#pending-erasures tbody tr", has_text=slug).count() == 0
        admin.shot(shots, "platform-erasures-confirmed")
    finally:
        admin.close()
    tab.page.reload()
    assert "Confirmed: an operator will erase the data" in tab.page.locator("#erasure-requests").inner_text()
