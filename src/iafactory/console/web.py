"""The console's framework: routes declared with their role, one context per request, rendering.

    @page("GET", "/members", role="viewer", api="GET /api/v1/members")
    async def members(c: Ctx) -> Response:
        async with c.tenant() as s:           # the API's gate: app.authorize(role, write)
            rows = await members_service.list_members(s.tx, s.ctx.tenant_id)
        return c.render("members.html", members=rows)

Every route is registered in ROUTES (tests/test_console.py generates its role and isolation
checks from it). For each request the decorator:

* reads the cookie session (a tenant route without one redirects to the sign-in page; an access
  token that has expired is refreshed, and the new cookie set on the answer);
* checks the CSRF token of every POST (403 page otherwise), before anything else is read;
* turns the API's refusals (Problem, and the SQLSTATEs of app.authorize) into an HTML page with
  the same status; 401 (the session has ended) clears the cookie and goes to the sign-in page.

`c.tenant()` is the API's own path to the database: the credential's Principal → tenant_context
→ open_tenant_session (Database.tenant(ctx) gated on the route's role), the same functions the
API's Viewer/Member/Admin/Owner dependencies use.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from iafactory.auth import endpoints as auth_endpoints
from iafactory.auth import service as auth_service
from iafactory.auth.dependencies import (
    Principal,
    TenantSession,
    accounts_of,
    open_tenant_session,
    principal_cell,
    principal_from_token,
    tenant_context,
    user_transaction,
)
from iafactory.auth.schemas import MyTenant, RefreshIn, TokenOut
from iafactory.config import Settings
from iafactory.console import i18n
from iafactory.console import session as cookie
from iafactory.http.problems import Problem, database_problem
from iafactory.tenancy.context import ROLE_RANK

PREFIX = "/console"
# The CSP of the console's pages: its own script and stylesheet only, no inline code, forms post
# to this origin only, never framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; connect-src 'self'"
)

router = APIRouter(prefix=PREFIX, include_in_schema=False)
templates = Environment(
    loader=PackageLoader("iafactory.console", "templates"),
    autoescape=select_autoescape(("html",)),
    trim_blocks=True,
    lstrip_blocks=True,
)

Handler = Callable[["Ctx"], Awaitable[Response]]


@dataclass(frozen=True)
class ConsoleRoute:
    method: str
    path: str  # below /console, with Starlette convertors: /members/{user_id:int}
    role: str | None  # minimum tenant role (the API's); None: no tenant needed
    signed_in: bool  # False: the sign-in steps (anonymous)
    api: str | None  # the API operation this route does the same as ("POST /api/v1/members/invitations")
    params: dict[str, str]  # path parameter → what it names (member, invitation, api_key ...)
    handler: Handler
    platform: bool = False  # platform administrators only (the API's app.assert_platform_operator)

    @property
    def full_path(self) -> str:
        return PREFIX + self.path

    @property
    def label(self) -> str:
        return f"{self.method} {self.full_path}"


ROUTES: list[ConsoleRoute] = []


@dataclass
class Ctx:
    """One console request: who, in which language, and what to set on the answer."""

    request: Request
    route: ConsoleRoute
    lang: i18n.Lang
    who: Principal | None = None
    form: dict[str, str] = field(default_factory=dict)
    new_tokens: cookie.Tokens | None = None
    anon: str | None = None  # pre-session CSRF nonce
    anon_new: bool = False
    layout: dict[str, Any] | None = None  # user, tenant, role, tenants (filled by layout_data)
    ended: bool = False  # the cookie's session is over: clear it on the answer

    @property
    def settings(self) -> Settings:
        return self.request.app.state.settings

    @property
    def csrf(self) -> str:
        return cookie.csrf_token(self.settings, self.binding)

    @property
    def binding(self) -> str:
        if self.who is not None and self.who.session_id is not None:
            return f"sid:{self.who.session_id}"
        if self.anon is None:
            self.anon, self.anon_new = cookie.anon_nonce(self.request)
        return f"anon:{self.anon}"

    def t(self, key: str, **values: object) -> str:
        return self.lang.t(key, **values)

    @asynccontextmanager
    async def tenant(self, read_only: bool | None = None, role: str | None = None) -> AsyncIterator[TenantSession]:
        """The request's tenant transaction, gated like the API's on the route's role (or `role`).
        It commits when the block ends; an exception inside rolls it back."""
        assert self.who is not None
        need = role or self.route.role or "viewer"
        ctx = await tenant_context(self.request, self.who)
        reading = self.request.method == "GET" if read_only is None else read_only
        async with open_tenant_session(self.request, self.who, ctx, need, reading) as s:
            yield s

    def render(self, template: str, status: int = 200, **values: Any) -> Response:
        page = templates.get_template(template).render(
            _=self.t,
            lang=self.lang,
            languages=[(code, i18n.NATIVE[code]) for code in i18n.LANGUAGES],
            csrf=self.csrf,
            path=self.request.url.path,
            here=_here(self.request),
            prefix=PREFIX,
            layout=self.layout,
            can=self.can,
            **values,
        )
        response = HTMLResponse(page, status_code=status)
        return self.finish(response)

    def can(self, role: str) -> bool:
        """Whether the signed-in person's role in the current tenant reaches `role` (for menus
        and buttons only: the database's gate decides)."""
        current = (self.layout or {}).get("role")
        return current is not None and ROLE_RANK[current] >= ROLE_RANK[role]

    def redirect(self, path: str, **query: str) -> Response:
        target = PREFIX + path if not path.startswith(PREFIX) else path
        if query:
            target += "?" + "&".join(f"{k}={quote(v)}" for k, v in query.items())
        return self.finish(RedirectResponse(target, status_code=303))

    def finish(self, response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Cache-Control"] = "no-store"
        if self.new_tokens is not None:
            cookie.store(self.request, response, self.new_tokens)
        elif self.ended:
            cookie.clear(self.request, response)
        if self.anon_new and self.anon is not None:
            cookie.store_anon(self.request, response, self.anon)
        return response

    def signed_in_with(self, tokens: TokenOut) -> None:
        """A sign-in, refresh or tenant switch gave a new pair: act with it, and store it."""
        self.new_tokens = cookie.Tokens(tokens.access_token, tokens.refresh_token)
        self.who = principal_from_token(self.settings, tokens.access_token)


def _here(request: Request) -> str:
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


def safe_next(value: str | None) -> str:
    """A console path to go back to after signing in (never another site)."""
    if not value:
        return PREFIX + "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not value.startswith(PREFIX + "/") or "\\" in value:
        return PREFIX + "/"
    return value


def page(
    method: str,
    path: str,
    *,
    role: str | None = "viewer",
    signed_in: bool = True,
    api: str | None = None,
    params: dict[str, str] | None = None,
    platform: bool = False,
) -> Callable[[Handler], Handler]:
    """Declare a console route. `role`: the minimum tenant role, as the API's route `api` requires
    (tests/test_console.py checks they agree); None for pages that need a signed-in person but no
    tenant. `signed_in=False`: the sign-in steps. `params`: what each path parameter names, for
    the generated isolation test. `platform=True`: platform administrators only, whatever their
    tenant role (no tenant needed: `role` is ignored); the API's platform check runs before the
    handler, as the API's /admin routes run it (`assert_platform`)."""
    if platform:
        role = None
    if role is not None and role not in ROLE_RANK:
        raise ValueError(role)

    def register(handler: Handler) -> Handler:
        route = ConsoleRoute(method, path, role, signed_in, api, params or {}, handler, platform)
        ROUTES.append(route)

        async def endpoint(request: Request) -> Response:
            return await _serve(request, route)

        endpoint.__name__ = f"console_{handler.__name__}"
        router.add_api_route(path, endpoint, methods=[method], include_in_schema=False, response_model=None)
        return handler

    return register


async def _serve(request: Request, route: ConsoleRoute) -> Response:
    c = Ctx(
        request, route, i18n.negotiate(request.cookies.get(i18n.LANG_COOKIE), request.headers.get("accept-language"))
    )
    try:
        tokens = cookie.read(request)
        if tokens is not None:
            c.who = await _principal(c, tokens)
            c.ended = c.who is None  # neither token works any more: the answer drops the cookie
        if route.signed_in and c.who is None:
            return _to_sign_in(c)
        if route.method == "POST":
            form = await request.form()
            c.form = {k: v for k, v in form.items() if isinstance(v, str)}
            if not cookie.csrf_ok(c.settings, c.binding, c.form.get("csrf")):
                return error_page(c, 403, c.t("error.csrf"))
        if c.who is not None and route.signed_in:
            await layout_data(c)
            if route.role is not None and (c.who.tenant_id is None or (c.layout or {}).get("tenant") is None):
                return c.redirect("/tenants")
            if route.role is not None and not c.can(route.role):
                # Refused before the form is read, as the API's gate refuses before the body; the
                # role is the one /me read from the database in this request, and the handler's
                # own transaction is gated on it again.
                return error_page(c, 403, c.t("error.role", role=c.t(f"role.{route.role}")))
            if route.platform:
                await assert_platform(c)  # before the handler, as for a role
        return await route.handler(c)
    except Problem as problem:
        return refusal(c, problem.status, problem.detail or problem.title)
    except psycopg.Error as err:
        # The API's reading of the database's refusal (app.authorize's SQLSTATEs, constraints).
        answer = database_problem(request, err)
        try:
            detail = str(json.loads(bytes(answer.body)).get("detail") or "")
        except ValueError:
            detail = ""
        return refusal(c, answer.status_code, detail)


async def assert_platform(c: Ctx) -> None:
    """The API's platform check: app.assert_platform_operator() as the person's own account in
    their own cell (the database reads is_platform_admin and is_active from its users table, not
    the token's claim). Anyone else: the 403 page."""
    assert c.who is not None
    try:
        async with user_transaction(c.request, c.who, principal_cell(c.request, c.who)) as tx:
            await tx.execute("SELECT app.assert_platform_operator()")
    except psycopg.Error as err:
        if err.sqlstate == "IA403":
            raise Problem(403, "Forbidden", c.t("platform.only")) from err
        raise


def refusal(c: Ctx, status: int, detail: str) -> Response:
    """The API's refusal as a page; 401 means the session is over: sign in again."""
    if status == 401:
        c.who, c.new_tokens, c.ended = None, None, True
        return _to_sign_in(c)
    return error_page(c, status, detail)


def error_page(c: Ctx, status: int, detail: str) -> Response:
    title = c.t(f"error.{status}") if f"error.{status}" in _known() else c.t("error.other")
    return c.render("error.html", status=status, title=title, detail=detail, code=status)


@functools.cache
def _known() -> frozenset[str]:
    from iafactory.console.messages import MESSAGES

    return frozenset(MESSAGES[i18n.DEFAULT])


def _to_sign_in(c: Ctx) -> Response:
    target = PREFIX + "/sign-in"
    if c.request.method == "GET" and c.request.url.path != target:
        target += "?next=" + quote(_here(c.request), safe="")
    return c.finish(RedirectResponse(target, status_code=303))


async def _principal(c: Ctx, tokens: cookie.Tokens) -> Principal | None:
    """Who the cookie says is signed in; an expired access token is refreshed (once per refresh
    token in this process). None when neither works any more."""
    try:
        return principal_from_token(c.settings, tokens.access)
    except Problem:
        pass
    share: cookie.RefreshShare = c.request.app.state.console_refresh

    async def spend() -> TokenOut:
        return await auth_endpoints.refresh(RefreshIn(refresh_token=tokens.refresh), c.request)

    try:
        fresh = await share.once(tokens.refresh, spend)
    except Problem as problem:
        if problem.status == 401:
            return None
        raise
    c.signed_in_with(fresh)
    return c.who


async def layout_data(c: Ctx) -> None:
    """The signed-in person, their tenants (every cell) and their role in the current one, as /me
    answers it: the header, the tenant switcher and the menus show it. When the current tenant
    refuses them (suspended, or they were removed: 403), the person's tenants still show, with none
    current, so that they can choose another one or sign out."""
    assert c.who is not None
    try:
        me = await auth_endpoints.me(c.who, c.request)
    except (Problem, psycopg.Error) as err:
        if _status(c.request, err) != 403:
            raise
        pools = c.request.app.state.cells
        tenants = await auth_service.all_memberships(pools, accounts_of(c.request, c.who))
        c.layout = {
            "user": None,
            "tenant": None,
            "role": None,
            "tenants": [MyTenant(**t.model_dump(), current=False) for t in tenants],
            "platform_admin": c.who.platform_admin,
        }
        return
    c.layout = {
        "user": me.user,
        "tenant": me.tenant,
        "role": me.role,
        "tenants": me.tenants,
        "platform_admin": c.who.platform_admin,
    }


def _status(request: Request, err: Exception) -> int:
    if isinstance(err, Problem):
        return err.status
    assert isinstance(err, psycopg.Error)
    return database_problem(request, err).status_code
