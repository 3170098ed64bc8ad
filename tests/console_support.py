"""Helpers for the console's tests: a browser-like HTTP client (its own cookie jar, reads the CSRF
token of the page it last loaded) over the same in-process app as the API tests."""

from __future__ import annotations

import html
import re
from typing import Any

import httpx

from api_support import PASSWORD

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(page: str) -> str:
    match = _CSRF.search(page)
    assert match, "no CSRF field on the page"
    return html.unescape(match.group(1))


class Console:
    """One browser: cookies kept, redirects not followed (tests look at them)."""

    def __init__(self, api: httpx.AsyncClient, base_url: str = "http://testserver") -> None:
        self.client = httpx.AsyncClient(transport=api._transport, base_url=base_url)
        self.csrf: str | None = None

    async def __aenter__(self) -> Console:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.aclose()

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        r = await self.client.get(path, **kwargs)
        if r.status_code == 200 and 'name="csrf"' in r.text:
            self.csrf = csrf_of(r.text)
        return r

    async def post(self, path: str, data: dict[str, str] | None = None, *, csrf: bool = True) -> httpx.Response:
        form = dict(data or {})
        if csrf:
            assert self.csrf is not None, "load a page first"
            form.setdefault("csrf", self.csrf)
        r = await self.client.post(path, data=form)
        if 'name="csrf"' in r.text:
            self.csrf = csrf_of(r.text)
        return r

    async def sign_in(self, email: str, password: str = PASSWORD, tenant: str | None = None) -> httpx.Response:
        await self.get("/console/sign-in")
        r = await self.post("/console/sign-in", {"email": email, "password": password})
        assert r.status_code == 303, r.text
        if tenant is not None:
            await self.get("/console/tenants")
            r = await self.post("/console/tenants", {"tenant": tenant})
            assert r.status_code == 303, r.text
        await self.get("/console/overview")
        return r


def email_of(world: Any, tenant: str, role: str) -> str:
    """The email build_world gave `role` of tenant "a" or "b" (its tag is in the slug)."""
    t = world.a if tenant == "a" else world.b
    tag = t.slug.rsplit("-", 1)[1]
    return f"{role}-{tenant}-{tag}@example.ch"


def both_email(world: Any) -> str:
    return f"both-{world.a.slug.rsplit('-', 1)[1]}@example.ch"


def platform_email(world: Any) -> str:
    """The platform administrator build_world made (no tenant of their own)."""
    return f"platform-{world.a.slug.rsplit('-', 1)[1]}@example.ch"
