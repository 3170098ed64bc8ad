"""The web console at /console: server-rendered pages (Jinja2) for tenant admins, signed in with
the API's own accounts and sessions, reading and writing through the API's services and tenant
boundary. See README.md in this directory for how to add a page."""

from __future__ import annotations

import importlib
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from iafactory.console import session
from iafactory.console.web import PREFIX, router

# The page modules register their routes on `router` when imported.
PAGES: tuple[str, ...] = ("auth", "overview", "members", "api_keys", "settings", "platform")
# console2: knowledge base, usage, credits, audit log, export and erasure
PAGES += ("knowledge", "usage", "credits", "audit", "data")


# The paths of the emails' links (cells/links.py CellToken, the account-exists email's sign-in
# link), each opening the console page of the same name with its query (the token).
EMAIL_LINKS = ("/accept-invitation", "/verify-email", "/reset-password", "/sign-in")


async def _email_link(request: Request) -> RedirectResponse:
    query = f"?{request.url.query}" if request.url.query else ""
    return RedirectResponse(f"{PREFIX}{request.url.path}{query}", status_code=303)


def load_pages() -> None:
    """Import the page modules: each registers its routes (web.ROUTES, web.router) once."""
    for name in PAGES:
        importlib.import_module(f"iafactory.console.pages.{name}")


def install(app: FastAPI) -> None:
    """Mount the console: its routes (outside the OpenAPI document: HTML pages for browsers, not
    API operations; tests/test_console.py covers them from the console's own route table), its
    static files, and the paths where the links of our emails open (EMAIL_LINKS)."""
    load_pages()
    app.state.console_refresh = session.RefreshShare()
    app.include_router(router)
    static = resources.files("iafactory.console") / "static"
    app.mount(f"{PREFIX}/static", StaticFiles(directory=str(static)), name="console-static")

    for path in EMAIL_LINKS:
        app.add_api_route(path, _email_link, methods=["GET"], include_in_schema=False)

    @app.get(PREFIX, include_in_schema=False)
    async def console_root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=307)
